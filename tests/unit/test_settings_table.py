"""The table of settings is the one declaration: the model, the README, the man page and the examples agree with it."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from dingdifyd import config
from dingdifyd.config import docs
from dingdifyd.config.model import BotConfig, DaemonConfig, RouteConfig
from dingdifyd.config.readers import read
from dingdifyd.config.settings import (
    BOT_KEYS,
    DIFY_CONTEXT_INPUTS,
    ROUTE_KEYS,
    SETTINGS,
    TOP_LEVEL_KEYS,
    Kind,
    Scope,
    in_scope,
    route_settings,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "etc" / "example.yaml"
# The environment names honoured before the table existed (the old INHERITED_KEYS, upper-cased): exactly these.
ENV_NAMES_BEFORE = {
    "DIFY_OPEN_API_URL", "DIFY_FILES_URL", "DIFY_CONVERSATION_REMAIN_TIME", "DINGTALK_AI_CARD_TEMPLATE_ID",
    "DINGTALK_API_BASE", "DINGTALK_OAPI_BASE", "STATE_DIR", "STORE", "LOG_LEVEL", "SESSION_SCOPE", "ALLOW_USERS",
    "ALLOW_GROUPS", "DENY_USERS", "DENY_GROUPS", "ACCESS_DENIED_REPLY", "DIFY_INPUT_VARIABLE", "DIFY_INPUTS",
    "SHOW_PROGRESS", "SHOW_SUGGESTED_QUESTIONS", "SUGGESTED_QUESTIONS_TIMEOUT", "DIFY_CONNECT_TIMEOUT",
    "DIFY_FIRST_BYTE_TIMEOUT", "DIFY_IDLE_TIMEOUT", "DIFY_TOTAL_TIMEOUT", "DIFY_MAX_CONCURRENCY", "MAX_MESSAGE_CHARS",
    "DINGTALK_TIMEOUT", "CARD_UPDATE_INTERVAL", "CARD_UPDATE_MIN_CHARS", "DINGTALK_CARD_QPS",
    "DINGTALK_API_MONTHLY_BUDGET", "COMMAND_PREFIX", "SHOW_REASONING", "MARKDOWN_TABLES", "IMAGE_DELIVERY",
    "DEFAULT_IMAGE_QUERY", "DEFAULT_FILE_QUERY",
}  # fmt: skip


def leaves(cls: type, prefix: str = "") -> set[str]:
    """The place of every value in a model class, its parts walked into."""
    hints = typing.get_type_hints(cls)
    found: set[str] = set()
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            found |= leaves(hints[field.name], f"{prefix}{field.name}.")
        else:
            found.add(prefix + field.name)
    return found


def test_every_value_of_the_model_comes_from_exactly_one_setting():
    bot = [s.at for s in in_scope(Scope.BOT_ONLY, Scope.BOT) if s.at]
    assert sorted(bot) == sorted(leaves(BotConfig))
    route = [s.route_at for s in route_settings()]
    assert sorted(route) == sorted(leaves(RouteConfig))
    daemon = [s.at for s in in_scope(Scope.DAEMON) if s.at]
    assert sorted(daemon) == sorted(leaves(DaemonConfig) - {"path", "bots", "log_level", "warnings"})


def test_keys_are_unique_where_they_are_written():
    for settings in (in_scope(Scope.BOT, Scope.DAEMON), in_scope(Scope.BOT, Scope.BOT_ONLY), route_settings()):
        keys = [s.key for s in settings]
        assert len(keys) == len(set(keys)), keys


def test_the_environment_names_are_exactly_those_honoured_before():
    # a new setting read from the environment too? Pass env=None unless that is meant: a general name such as
    # LANGUAGE (gettext's) would be taken from every shell
    assert {s.env for s in SETTINGS if s.env} == ENV_NAMES_BEFORE


def test_every_default_passes_its_own_check():
    for s in SETTINGS:
        if s.kind in (Kind.NAME, Kind.ROUTES, Kind.SECRET, Kind.IGNORED) or callable(s.default) or s.required:
            continue
        problems: list[str] = []
        value = read(s, s.default, lambda message, sub="", found=problems: found.append(message))
        assert problems == [] and value == s.default, (s.key, problems)


def test_every_choice_is_explained_in_its_doc():
    for s in SETTINGS:
        for choice in s.choices:
            assert f"`{choice}`" in s.doc, (s.key, choice)


def test_every_see_names_a_readme_section():
    headings = {docs.anchor(line.lstrip("#").strip().replace("`", ""))
                for line in docs.README.read_text(encoding="utf-8").splitlines() if line.startswith("#")}  # fmt: skip
    for s in SETTINGS:
        if s.see:
            assert docs.anchor(s.see) in headings, (s.key, s.see)


def test_the_readme_and_the_man_page_are_generated_from_the_table():
    assert docs.stale() == [], "run: python -m dingdifyd.config.docs"


def generated(path: Path, markers: tuple[str, str]) -> str:
    text = path.read_text(encoding="utf-8")
    return text[text.index(markers[0]) : text.index(markers[1])]


def readme_rows() -> dict[str, dict[str, str]]:
    """Each README section's {key: default}, as a reader sees them."""
    sections: dict[str, dict[str, str]] = {}
    section = ""
    for line in generated(docs.README, docs.README_MARKERS).splitlines():
        if line.startswith("**"):
            section = line.split("**")[1]
        elif row := re.match(r"\| `([a-z_]+)` \| ([^|]*) \|", line):
            sections.setdefault(section, {})[row.group(1)] = row.group(2).strip()
    return sections


def test_the_readme_shows_every_setting_where_it_may_be_written_with_its_default():
    rows = readme_rows()
    assert set(rows["Per bot"]) == {s.key for s in in_scope(Scope.BOT_ONLY)}
    assert set(rows["In a route"]) == {s.key for s in route_settings()}
    assert set(rows["For every bot or one"]) == {s.key for s in in_scope(Scope.BOT)}
    assert set(rows["Top level only"]) == {s.key for s in in_scope(Scope.DAEMON)}
    assert rows["For every bot or one"]["dify_total_timeout"] == "`1200`"
    assert rows["For every bot or one"]["card_update_interval"] == "`0.5`"
    assert rows["Top level only"]["start_timeout"] == "`30`"
    assert rows["Per bot"]["dify_app_api_key"] == "required"


def test_the_man_page_lists_every_key_in_its_section():
    text = generated(docs.MAN_PAGE, docs.MAN_MARKERS)
    for scope_settings, _, section, _ in docs.SECTIONS:
        body = text.split(f".SH {section}\n", 1)[1].split("\n.SH ", 1)[0]
        keys = [key.replace("\\-", "-") for key in re.findall(r"^\.TP\n\.B (\S+)$", body, re.MULTILINE)]
        assert keys == [s.key for s in scope_settings()], section
    assert ".B dify_total_timeout\n" in text and "Default: \\fB1200\\fR." in text


@pytest.mark.parametrize(("path", "markers", "make"), docs.TARGETS, ids=lambda t: getattr(t, "name", ""))
@pytest.mark.parametrize(
    "drift",
    [
        pytest.param(lambda text: text.replace("1200", "1300"), id="a default that differs"),
        pytest.param(lambda text: re.sub(r".*dify_idle_timeout.*\n", "", text, count=1), id="a key missing"),
        pytest.param(lambda text: text.replace("dify_idle_timeout", "dify_nap_timeout"), id="an unknown key"),
    ],
)
def test_a_document_that_disagrees_with_the_table_is_found(path, markers, make, drift):
    text = path.read_text(encoding="utf-8")
    begin, end = text.index(markers[0]), text.index(markers[1])
    drifted = text[:begin] + drift(text[begin:end]) + text[end:]
    assert drifted != text
    assert not docs.current(drifted, markers, make)


def unknown_keys(doc: dict) -> list[str]:
    """The keys of a configuration document the table does not know, by key path."""
    unknown = [key for key in doc if key not in TOP_LEVEL_KEYS]
    for index, bot in enumerate(doc.get("bots") or []):
        unknown += [f"bots[{index}].{key}" for key in bot if key not in BOT_KEYS]
        unknown += [f"bots[{index}].dify_inputs.{key}" for key in bot.get("dify_inputs") or {}
                    if key not in DIFY_CONTEXT_INPUTS]  # fmt: skip
        for number, route in enumerate(bot.get("routes") or []):
            unknown += [f"bots[{index}].routes[{number}].{key}" for key in route if key not in ROUTE_KEYS]
    return unknown


def documented_examples() -> list[tuple[str, dict]]:
    readme = docs.README.read_text(encoding="utf-8")
    blocks = [("README.md", yaml.safe_load(block)) for block in re.findall(r"^```yaml\n(.*?)^```", readme, re.S | re.M)]
    man = docs.MAN_PAGE.read_text(encoding="utf-8").split(".SH EXAMPLE\n.nf\n", 1)[1].split("\n.fi", 1)[0]
    return [*blocks, ("dingdifyd.yaml.5", yaml.safe_load(man.replace("\\-", "-")))]


def test_the_documents_examples_name_only_keys_that_exist():
    examples = documented_examples()
    assert len(examples) >= 4
    for where, doc in examples:
        assert unknown_keys(doc) == [], where


def test_the_annotated_example_loads_and_names_only_keys_that_exist():
    loaded = config.load(EXAMPLE, environ={"HOME": "/home/someone"})
    assert not [w for w in loaded.warnings if "unknown key" in w]
    text = EXAMPLE.read_text(encoding="utf-8")
    # the keys shown commented out too: every `some_key:` line, and every environment name given
    written = re.findall(r"^\s*#?\s*(?:- )?([a-z][a-z0-9]*_[a-z0-9_]*):(?:\s|$)", text, re.MULTILINE)
    known = TOP_LEVEL_KEYS | BOT_KEYS | ROUTE_KEYS | set(DIFY_CONTEXT_INPUTS)
    assert len(written) > 40 and sorted(set(written) - known) == []
    env_names = re.findall(r"env: ([A-Z_]+(?:, [A-Z_]+)*)", text)
    assert env_names and {name for names in env_names for name in names.split(", ")} <= ENV_NAMES_BEFORE


def test_check_config_prints_flat_keys_that_read_back_as_the_same_configuration(tmp_path):
    text = """\
dify_total_timeout: 3600
deny_users: "troll1, troll2"
state_dir: /var/lib/dingdifyd/x
bots:
  - name: hr
    dingtalk_app_client_id: ding1
    dingtalk_app_client_secret: s
    dify_app_type: workflow
    dify_app_api_key: app-main
    show_reasoning: quote
    dify_inputs: {nick: who}
    routes:
      - name: sales
        conversation_ids: [cidSALES==]
        dify_app_type: chatbot
        dify_app_api_key: app-sales
"""
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    shown = config.render_effective(config.load(path, environ={}))
    doc = yaml.safe_load(shown)
    assert unknown_keys(doc) == []
    assert set(doc["bots"][0]) == {s.key for s in in_scope(Scope.BOT_ONLY, Scope.BOT) if s.at}
    assert doc["bots"][0]["dify_total_timeout"] == 3600 and doc["bots"][0]["dify_inputs"]["nick"] == "who"
    again = config.parse(doc, "printed", environ={})  # the masked secrets read back as (other) inline ones
    assert config.render_effective(again) == shown
