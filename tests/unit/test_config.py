from __future__ import annotations

import os
import subprocess
import sys
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
    assert bot.dify_app_type == "chatbot"
    assert bot.dingtalk_app_client_secret.reveal() == "s3cr3t-client-value"
    assert bot.dify_app_api_key.reveal() == "app-0123456789abcdefghij"
    # .env names honoured, quotes as written in an .env file removed
    assert bot.dify_open_api_url == "https://dify.example.com/v1"
    assert bot.dingtalk_ai_card_template_id == "tpl-123.schema"
    assert bot.conversation_ttl == 15 * 60
    assert bot.state_dir == "/home/someone/.local/state/dingdifyd"
    assert loaded.warnings == ()


def test_file_values_win_over_environment_and_bots_override_top_level(tmp_path):
    text = ORIGINAL_BOTS_YAML.replace(
        "bots:\n", "dify_open_api_url: http://127.0.0.1:9/v1\nsession_scope: chat\nbots:\n"
    )
    text += "    session_scope: user\n"
    loaded = config.load(write(tmp_path, text), environ=ORIGINAL_ENV)
    assert loaded.bots[0].dify_open_api_url == "http://127.0.0.1:9/v1"
    assert loaded.bots[0].session_scope == "user"


def test_app_type_is_case_insensitive_and_chatflow_is_known(tmp_path):
    loaded = config.load(write(tmp_path, ORIGINAL_BOTS_YAML.replace("chatbot", "CHATFLOW")), environ={})
    assert loaded.bots[0].dify_app_type == "chatflow"


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
    assert bot.dingtalk_app_client_secret.reveal() == "from-a-file"
    assert bot.dingtalk_app_client_secret.source == "file"
    assert bot.dify_app_api_key.reveal() == "app-from-credential"
    assert bot.dify_app_api_key.source == "systemd credential"


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
