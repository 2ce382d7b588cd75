from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from dingdifyd import config
from dingdifyd.errors import ConfigError

# The original project's example, byte for byte (zfanswer/dify-on-dingtalk .bots.yaml.example, filled in).
ORIGINAL_BOTS_YAML = """\
bots:
  - name: 问答助手
    dingtalk_app_client_id: dingabc123
    dingtalk_app_client_secret: s3cr3t-client-value
    dify_app_type: chatbot
    dify_app_api_key: app-0123456789abcdefghij
    handler: DifyAiCardBotHandler
"""

ORIGINAL_ENV = {
    "LOG_LEVEL": "INFO",
    "DEFAULT_MAX_WORKERS": "2",
    "DIFY_OPEN_API_URL": '"https://dify.example.com/v1"',
    "DIFY_CONVERSATION_REMAIN_TIME": "15",
    "DINGTALK_AI_CARD_TEMPLATE_ID": '"tpl-123.schema"',
    "HOME": "/home/someone",
}


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "bots.yaml"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def test_original_bots_yaml_and_env_are_accepted_unchanged(tmp_path):
    loaded = config.load(write(tmp_path, ORIGINAL_BOTS_YAML), environ=ORIGINAL_ENV)
    (bot,) = loaded.bots
    assert bot.name == "问答助手"
    assert bot.dify.app_type == "chatbot"
    assert bot.dingtalk.client_secret.reveal() == "s3cr3t-client-value"
    assert bot.dify.api_key.reveal() == "app-0123456789abcdefghij"
    # .env names honoured, quotes as written in an .env file removed
    assert bot.dify.url == "https://dify.example.com/v1"
    assert bot.dingtalk.card_template_id == "tpl-123.schema"
    assert bot.conversation.ttl == 15 * 60
    assert bot.state_dir == "/home/someone/.local/state/dingdifyd"
    assert loaded.warnings == ()


def test_file_values_win_over_environment_and_bots_override_top_level(tmp_path):
    text = ORIGINAL_BOTS_YAML.replace(
        "bots:\n", "dify_open_api_url: http://127.0.0.1:9/v1\nsession_scope: chat\nbots:\n"
    )
    text += "    session_scope: user\n"
    loaded = config.load(write(tmp_path, text), environ=ORIGINAL_ENV)
    assert loaded.bots[0].dify.url == "http://127.0.0.1:9/v1"
    assert loaded.bots[0].conversation.session_scope == "user"


def test_app_type_is_case_insensitive_and_chatflow_is_known(tmp_path):
    loaded = config.load(write(tmp_path, ORIGINAL_BOTS_YAML.replace("chatbot", "CHATFLOW")), environ={})
    assert loaded.bots[0].dify.app_type == "chatflow"


def test_every_problem_is_named_by_its_key_path(tmp_path):
    text = """\
dify_conversation_remain_time: soon
bots:
  - name: a
    dingtalk_app_client_id: ding1
    dingtalk_app_client_secret: x
    dify_app_type: chatbot
    dify_app_api_key: app-1
  - name: b
    dingtalk_app_client_id: ding2
    dify_app_type: robot
    dify_open_api_url: ftp://nope
  - name: a
    dingtalk_app_client_id: ding3
    dingtalk_app_client_secret: y
    dify_app_type: workflow
    dify_app_api_key: app-3
"""
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text), environ={})
    problems = "\n".join(caught.value.problems)
    assert "dify_conversation_remain_time: 'soon' is not a number" in problems
    assert "bots[1].dingtalk_app_client_secret: missing" in problems
    assert "bots[1].dify_app_api_key: missing" in problems
    assert "bots[1].dify_app_type: 'robot' is not one of" in problems
    assert "bots[1].dify_open_api_url: 'ftp://nope' is not an http(s) URL" in problems
    assert "bots[2].name: duplicate of bots[0].name" in problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "bots: missing"),
        ("bots: []\n", "bots: must be a non-empty list"),
        ("- just a list\n", "the top level must be a mapping"),
        ("bots: [1]\n", "bots[0]: must be a mapping"),
        ("bots:\n  - name: [unclosed\n", "not valid YAML (line 3"),
    ],
)
def test_malformed_files_are_reported_not_crashed(tmp_path, text, expected):
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text), environ={})
    assert expected in str(caught.value)


def test_secrets_from_files_and_systemd_credentials(tmp_path):
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("from-a-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "hr.dify_app_api_key").write_text("app-from-credential")
    text = f"""\
bots:
  - name: hr
    dingtalk_app_client_id: ding1
    dingtalk_app_client_secret_file: {secret_file}
    dify_app_type: agent
"""
    loaded = config.load(write(tmp_path, text), environ={"CREDENTIALS_DIRECTORY": str(creds)})
    bot = loaded.bots[0]
    assert bot.dingtalk.client_secret.reveal() == "from-a-file"
    assert bot.dingtalk.client_secret.source == "file"
    assert bot.dify.api_key.reveal() == "app-from-credential"
    assert bot.dify.api_key.source == "systemd credential"


def test_unreadable_secret_file_is_named(tmp_path):
    text = ORIGINAL_BOTS_YAML.replace(
        "dingtalk_app_client_secret: s3cr3t-client-value", "dingtalk_app_client_secret_file: /nonexistent/secret"
    )
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text), environ={})
    assert "bots[0].dingtalk_app_client_secret_file: cannot read /nonexistent/secret" in str(caught.value)


def test_world_readable_inline_secret_warns(tmp_path):
    loaded = config.load(write(tmp_path, ORIGINAL_BOTS_YAML, mode=0o644), environ={})
    assert any("chmod 600" in w for w in loaded.warnings)


def test_unknown_keys_warn(tmp_path):
    loaded = config.load(write(tmp_path, ORIGINAL_BOTS_YAML + "    sesion_scope: chat\n"), environ={})
    assert "bots[0].sesion_scope: unknown key, ignored" in loaded.warnings


def test_state_directory_from_systemd(tmp_path):
    loaded = config.load(write(tmp_path, ORIGINAL_BOTS_YAML), environ={"STATE_DIRECTORY": "/var/lib/dingdifyd/x"})
    assert loaded.bots[0].state_dir == "/var/lib/dingdifyd/x"


def test_without_home_state_goes_to_the_accounts_home_never_to_a_shared_place(tmp_path):
    import pwd

    loaded = config.load(write(tmp_path, ORIGINAL_BOTS_YAML), environ={})
    home = pwd.getpwuid(os.geteuid()).pw_dir
    assert loaded.bots[0].state_dir == os.path.join(home, ".local/state/dingdifyd")
    assert not loaded.bots[0].state_dir.startswith("/tmp")


def test_secret_repr_never_shows_the_value():
    secret = config.Secret("app-verysecret", "inline")
    assert "verysecret" not in repr(secret)
    assert "verysecret" not in str(secret)
    assert "verysecret" not in f"{secret}"


def _check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dingdifyd", "check-config", "-c", str(path)],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_check_config_masks_secrets_and_exits_0(tmp_path):
    result = _check_config(write(tmp_path, ORIGINAL_BOTS_YAML))
    assert result.returncode == 0, result.stderr
    assert "s3cr3t-client-value" not in result.stdout + result.stderr
    assert "app-0123456789abcdefghij" not in result.stdout + result.stderr
    assert "dingtalk_app_client_secret: '**** (inline)'" in result.stdout
    assert "name: 问答助手" in result.stdout


def test_check_config_exits_78_naming_the_key(tmp_path):
    result = _check_config(
        write(tmp_path, ORIGINAL_BOTS_YAML.replace("    dify_app_api_key: app-0123456789abcdefghij\n", ""))
    )
    assert result.returncode == 78
    assert "bots[0].dify_app_api_key: missing" in result.stderr
    assert "s3cr3t-client-value" not in result.stdout + result.stderr


def test_rich_message_settings_have_defaults_and_are_checked(tmp_path):
    (bot,) = config.load(write(tmp_path, ORIGINAL_BOTS_YAML), environ={}).bots
    shown = bot.presentation
    assert (shown.show_reasoning, shown.markdown_tables, shown.image_delivery) == ("hide", "list", "card")
    assert bot.conversation.default_image_query == "Please describe this picture."
    assert bot.conversation.default_file_query == "Please read the attached file."
    text = "show_reasoning: quote\nmarkdown_tables: code\n" + ORIGINAL_BOTS_YAML + (
        "    image_delivery: message\n    default_image_query: 请描述这张图片。\n"
    )
    (bot,) = config.load(write(tmp_path, text), environ={}).bots
    shown = bot.presentation
    assert (shown.show_reasoning, shown.markdown_tables, shown.image_delivery) == ("quote", "code", "message")
    assert bot.conversation.default_image_query == "请描述这张图片。"
    bad = "show_reasoning: show\n" + ORIGINAL_BOTS_YAML + "    markdown_tables: html\n    default_file_query: ''\n"
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, bad), environ={})
    problems = "\n".join(caught.value.problems)
    assert "show_reasoning: 'show' is not one of: hide, quote" in problems
    assert "bots[0].markdown_tables: 'html' is not one of: list, code, keep" in problems
    assert "bots[0].default_file_query: missing" in problems


def test_rich_conversation_keys_access_progress_inputs_and_routes(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "hr.sales.dify_app_api_key").write_text("app-route-from-credential")
    text = """\
show_progress: "no"
deny_users: "troll1, troll2"
access_denied_reply: ""
bots:
  - name: hr
    dingtalk_app_client_id: ding1
    dingtalk_app_client_secret: s
    dify_app_type: auto
    dify_app_api_key: app-main
    show_suggested_questions: false
    dify_inputs: {nick: who, chat_title: null}
    routes:
      - name: sales
        conversation_ids: [cidSALES==]
        dify_app_type: workflow
      - conversation_ids: cidA== cidB==
        dify_app_type: chatflow
        dify_app_api_key: app-second
        dify_open_api_url: http://dify2.example/v1
"""
    bot = config.load(write(tmp_path, text), environ={"CREDENTIALS_DIRECTORY": str(creds)}).bots[0]
    assert bot.presentation.show_progress is False and bot.presentation.show_suggested_questions is False
    assert bot.access.deny_users == ("troll1", "troll2") and bot.access.deny_groups == ()
    assert bot.access.denied_reply == ""
    assert bot.dify.input_variable is None  # found via /parameters unless set
    expected_inputs = {**config.DIFY_CONTEXT_INPUTS, "nick": "who"}
    del expected_inputs["chat_title"]  # null switches one off; the others keep their defaults
    assert bot.dify.inputs == expected_inputs
    sales, second = bot.routes
    assert sales.api_key.reveal() == "app-route-from-credential"
    assert sales.url == bot.dify.url
    assert second.name == "route1" and second.conversation_ids == ("cidA==", "cidB==")
    assert second.url == "http://dify2.example/v1"
    effective = config.render_effective(config.load(write(tmp_path, text), {"CREDENTIALS_DIRECTORY": str(creds)}))
    assert "app-second" not in effective and "app-route-from-credential" not in effective
    assert "cidSALES==" in effective


def test_rich_conversation_keys_are_validated_by_key_path(tmp_path):
    text = ORIGINAL_BOTS_YAML + """\
    show_progress: maybe
    dify_inputs: {shoe_size: x}
    routes:
      - conversation_ids: [cidA==]
        dify_app_type: bogus
      - conversation_ids: [cidA==]
        dify_app_type: chatbot
        dify_app_api_key: app-x
      - dify_app_type: chatbot
        dify_app_api_key: app-y
"""
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text), environ={})
    problems = "\n".join(caught.value.problems)
    assert "bots[0].show_progress: 'maybe' is not true or false" in problems
    assert "bots[0].dify_inputs.shoe_size: unknown" in problems
    assert "bots[0].routes[0].dify_app_type: 'bogus' is not one of" in problems
    assert "bots[0].routes[0].dify_app_api_key: missing" in problems
    assert "bots[0].routes[1].conversation_ids: cidA== is already in bots[0].routes[0]" in problems
    assert "bots[0].routes[2].conversation_ids: missing" in problems


def test_long_answer_and_message_size_limits_have_defaults_and_are_checked(tmp_path):
    (bot,) = config.load(write(tmp_path, ORIGINAL_BOTS_YAML), environ={}).bots
    assert bot.dify.timeouts.total == 1200  # Dify's own APP_MAX_EXECUTION_TIME
    assert bot.conversation.max_message_chars == 20000
    text = "dify_total_timeout: 3600\nmax_message_chars: 5000\n" + ORIGINAL_BOTS_YAML + "    max_message_chars: 100\n"
    (bot,) = config.load(write(tmp_path, text), environ={}).bots
    assert (bot.dify.timeouts.total, bot.conversation.max_message_chars) == (3600, 100)
    bad = "dify_total_timeout: 0\n" + ORIGINAL_BOTS_YAML + "    max_message_chars: lots\n"
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, bad), environ={})
    problems = "\n".join(caught.value.problems)
    assert "dify_total_timeout: 0 must be a number from 1 to 86400" in problems
    assert "bots[0].max_message_chars: 'lots' is not a number" in problems


def test_a_redis_store_url_is_accepted_and_its_password_never_shown(tmp_path):
    pytest.importorskip("redis")
    text = "store: redis://:pa55word@10.0.0.5:6379/2\n" + ORIGINAL_BOTS_YAML
    loaded = config.load(write(tmp_path, text), environ={})
    assert loaded.bots[0].store == "redis://:pa55word@10.0.0.5:6379/2"
    effective = config.render_effective(loaded)
    assert "pa55word" not in effective and "redis://:***@10.0.0.5:6379/2" in effective
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, "store: memcached://x\n" + ORIGINAL_BOTS_YAML), environ={})
    assert "store: 'memcached://x' must be 'disk' or a redis:// URL" in caught.value.problems


def test_monthly_api_budget_is_optional_from_file_or_environment_and_checked(tmp_path):
    (bot,) = config.load(write(tmp_path, ORIGINAL_BOTS_YAML), environ={}).bots
    assert bot.dingtalk.monthly_budget is None  # no budget: only DingTalk's own quota
    env = {"DINGTALK_API_MONTHLY_BUDGET": '"5000"'}
    (bot,) = config.load(write(tmp_path, ORIGINAL_BOTS_YAML), environ=env).bots
    assert bot.dingtalk.monthly_budget == 5000
    text = "dingtalk_api_monthly_budget: 5000\n" + ORIGINAL_BOTS_YAML + "    dingtalk_api_monthly_budget: null\n"
    (bot,) = config.load(write(tmp_path, text), environ={}).bots
    assert bot.dingtalk.monthly_budget is None  # a bot may opt out of the file's budget
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, ORIGINAL_BOTS_YAML + "    dingtalk_api_monthly_budget: 0\n"), environ={})
    assert "bots[0].dingtalk_api_monthly_budget: 0 must be a whole number from 1 to 1000000000" in caught.value.problems


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("max_message_chars: .inf", "max_message_chars: inf must be a whole number from 1 to 1000000"),
        ("dify_idle_timeout: .nan", "dify_idle_timeout: nan must be a number from 0.1 to 3600"),
        ("card_update_min_chars: 1e400", "card_update_min_chars: '1e400' must be a whole number from 0 to 10000"),
        ("dify_total_timeout: -5", "dify_total_timeout: -5 must be a number from 1 to 86400"),
        ("dingtalk_timeout: 1.0e+30", "dingtalk_timeout: 1e+30 must be a number from 0.1 to 600"),
        ("heartbeat_timeout: .inf", "heartbeat_timeout: inf must be a number from 1 to 3600"),
        ("stop_timeout: -1", "stop_timeout: -1 must be a number from 0 to 3600"),
        ("dify_conversation_remain_time: .inf", "dify_conversation_remain_time: inf must be a number from 0 to"),
        ("max_message_chars: 2.5", "max_message_chars: 2.5 must be a whole number from 1 to 1000000"),
        ("dingtalk_api_monthly_budget: .inf", "dingtalk_api_monthly_budget: inf must be a whole number from 1"),
    ],
)
def test_every_number_has_a_range_and_nan_inf_and_huge_values_are_refused_by_key(tmp_path, line, expected):
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, line + "\n" + ORIGINAL_BOTS_YAML), environ={})
    assert any(problem.startswith(expected) for problem in caught.value.problems), caught.value.problems


def test_numbers_from_the_environment_are_range_checked_too(tmp_path):
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, ORIGINAL_BOTS_YAML), environ={"DIFY_CONVERSATION_REMAIN_TIME": "nan"})
    assert any(p.startswith("dify_conversation_remain_time: 'nan' must be") for p in caught.value.problems)


def test_check_config_exits_78_naming_an_infinite_number(tmp_path):
    result = _check_config(write(tmp_path, "max_message_chars: .inf\n" + ORIGINAL_BOTS_YAML))
    assert result.returncode == 78, result.stderr
    assert "max_message_chars: inf must be a whole number from 1 to 1000000" in result.stderr
    assert "Traceback" not in result.stderr


def _numeric_fields(cls: type, prefix: str = "") -> set[str]:
    """The place (`dify.timeouts.connect`) of every number in the model, parts walked into."""
    hints = typing.get_type_hints(cls)
    places = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            places |= _numeric_fields(hints[f.name], f"{prefix}{f.name}.")
        elif str(f.type).replace(" | None", "") in ("float", "int"):
            places.add(prefix + f.name)
    return places


def test_every_numeric_setting_has_a_range():
    numeric = _numeric_fields(config.BotConfig) | _numeric_fields(config.DaemonConfig)
    ranged = {s.at for s in config.SETTINGS if s.limits is not None}
    assert numeric == ranged


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pa55word@10.0.0.5:6379/2", "redis://:***@10.0.0.5:6379/2"),
        ("redis://app:pa55word@10.0.0.5/0", "redis://app:***@10.0.0.5/0"),
        ("unix:///run/redis/redis.sock?db=1&password=pa55word", "unix:///run/redis/redis.sock?db=1&password=***"),
        ("redis://10.0.0.5:6379/0?password=pa55word", "redis://10.0.0.5:6379/0?password=***"),
        ("rediss://10.0.0.5/0?ssl_password=pa55word&ssl_check_hostname=true",
         "rediss://10.0.0.5/0?ssl_password=***&ssl_check_hostname=true"),
        ("unix://app:pa55word@/run/redis.sock?db=0", "unix://app:***@/run/redis.sock?db=0"),
        ("redis://:pa%2F55word@10.0.0.5/0", "redis://:***@10.0.0.5/0"),
        ("redis://:pa55word@[::1", "redis://***"),  # unparsable: nothing of it is shown
        ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
    ],
)
def test_every_credential_form_redis_accepts_is_masked(url, shown):
    assert config.redact_url(url) == shown
    assert "pa55word" not in config.redact_url(url) and "pa%2F55word" not in config.redact_url(url)


def test_check_config_hides_a_password_given_in_the_query(tmp_path):
    pytest.importorskip("redis")
    path = write(tmp_path, "store: unix:///run/redis/redis.sock?password=pa55word\n" + ORIGINAL_BOTS_YAML)
    result = _check_config(path)
    assert result.returncode == 0, result.stderr
    assert "pa55word" not in result.stdout + result.stderr
    assert "unix:///run/redis/redis.sock?password=***" in result.stdout


def test_the_supervisor_keeps_sealed_secrets_and_a_bot_process_reads_only_its_own(tmp_path):
    key_file = tmp_path / "b.key"
    key_file.write_text("app-key-of-b\n")
    text = ORIGINAL_BOTS_YAML + f"""  - name: b
    dingtalk_app_client_id: dingb
    dingtalk_app_client_secret: client-secret-of-b
    dify_app_type: chatbot
    dify_app_api_key_file: {key_file}
"""
    path = write(tmp_path, text)
    loaded = config.load(path, environ={})
    kept = config.sealed(loaded)
    for bot, original in zip(kept.bots, loaded.bots, strict=True):
        for secret in config.bot_secrets(bot):
            assert secret.is_sealed
            with pytest.raises(config.SealedSecretError):
                secret.reveal()
        assert bot == original  # compared by digest: a reload still sees whether a secret changed
    key_file.chmod(0)  # b's file unreadable: a's process never tries to read it
    key_file.unlink()
    mine = config.unseal_bot(path, kept.bots[0], environ={})
    assert mine.dingtalk.client_secret.reveal() == "s3cr3t-client-value"
    assert mine.dify.api_key.reveal() == "app-0123456789abcdefghij"
    assert mine == loaded.bots[0]


def test_a_changed_secret_makes_the_sealed_configs_differ(tmp_path):
    first = config.sealed(config.load(write(tmp_path, ORIGINAL_BOTS_YAML), environ={}))
    changed = ORIGINAL_BOTS_YAML.replace("s3cr3t-client-value", "another-client-value")
    second = config.sealed(config.load(write(tmp_path, changed), environ={}))
    assert first.bots[0] != second.bots[0]


@pytest.mark.parametrize("written", ["log_level: ''", "log_level: null"])
def test_an_empty_log_level_is_the_default_never_debug(tmp_path, written):
    # DEBUG logs message text: a level left empty must not switch it on
    loaded = config.load(write(tmp_path, written + "\n" + ORIGINAL_BOTS_YAML), environ={})
    assert loaded.log_level == "INFO" and loaded.bots[0].log_level == "INFO"


def test_a_bad_top_level_value_is_named_once_where_it_is_written(tmp_path):
    second = ORIGINAL_BOTS_YAML.split("\n", 1)[1].replace("问答助手", "second")
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, "dify_idle_timeout: soon\n" + ORIGINAL_BOTS_YAML + second), environ={})
    assert caught.value.problems == ["dify_idle_timeout: 'soon' is not a number"]
