"""`dingdifyd doctor` against the simulators: the OK path, and each way a bot can be set up wrong."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dingdifyd import config
from dingdifyd.commands.doctor import doctor_main
from dingdifyd.errors import EX_CONFIG, EX_OK, EX_UNAVAILABLE, EX_USAGE
from dingdifyd.simulator.dify import FakeDify, start_fake_dify
from dingdifyd.simulator.dingtalk import FakeDingTalk
from tests.integration.harness import (
    CLIENT_ID,
    TEMPLATE,
    bot_entry,
    dify_key,
    fake_dingtalk,
    write_config,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def dingtalk() -> AsyncIterator[FakeDingTalk]:
    async with fake_dingtalk(templates={TEMPLATE}) as fake:
        yield fake


@pytest.fixture
async def dify() -> AsyncIterator[FakeDify]:
    fake = await start_fake_dify(default_apps=True)
    yield fake
    await fake.close()


async def doctor(path: Path, bots: list[str] | None = None) -> tuple[int, dict[str, str]]:
    """Run the doctor; its exit status, and each check's line by check name (bot prefix removed)."""
    out = io.StringIO()
    code = await doctor_main(config.load(path, environ={}), bots, out)
    lines = {}
    for line in out.getvalue().splitlines()[:-1]:  # the last line is the summary
        status, rest = line.split(None, 1)
        _, check, detail = rest.split(": ", 2)
        lines[check] = f"{status} {detail}"
    return code, lines


async def test_a_well_set_up_bot_passes_every_check(tmp_path, dingtalk, dify):
    code, lines = await doctor(write_config(tmp_path / "c.yaml", dingtalk, dify))
    assert code == EX_OK, lines
    assert list(lines) == [
        "DingTalk token", "Stream gateway", "card permission", "card template", "card streaming", "robot files",
        "Dify key", "Dify app type", "Dify inputs",
    ]  # fmt: skip
    assert all(line.startswith("OK ") for line in lines.values()), lines
    assert "tpl-bridge.schema accepted" in lines["card template"]
    assert "chatbot matches the app" in lines["Dify app type"] or "chat routes" in lines["Dify app type"]
    assert dingtalk.connections == 0  # the gateway gave a ticket; no connection was kept
    assert dingtalk.cards == {}  # the card probes never made a card


async def test_a_wrong_client_secret_fails_the_token_and_skips_what_needs_it(tmp_path, dingtalk, dify):
    path = write_config(tmp_path / "c.yaml", dingtalk, dify, bots=[bot_entry(client_secret="wrong")])
    code, lines = await doctor(path)
    assert code == EX_CONFIG
    assert lines["DingTalk token"].startswith("FAIL DingTalk refused the client id / secret")
    assert "bots[0].dingtalk_app_client_id and .dingtalk_app_client_secret" in lines["DingTalk token"]
    assert lines["card permission"].startswith("SKIP")
    assert lines["Dify key"].startswith("OK")  # the Dify side is checked all the same
    assert "wrong" not in "".join(lines.values())


async def test_a_wrong_dify_key_fails_and_names_the_key(tmp_path, dingtalk, dify):
    path = write_config(tmp_path / "c.yaml", dingtalk, dify, bots=[bot_entry(dify_key="app-nope-1234")])
    code, lines = await doctor(path)
    assert code == EX_CONFIG
    assert lines["Dify key"].startswith("FAIL refused by")
    assert "set bots[0].dify_app_api_key" in lines["Dify key"]
    assert lines["Dify app type"].startswith("SKIP")
    assert "app-nope-1234" not in "".join(lines.values())


@pytest.mark.parametrize("with_mode", [True, False])
async def test_a_wrong_app_type_fails_with_the_right_one(tmp_path, dingtalk, with_mode):
    dify = await start_fake_dify(default_apps=True, info_with_mode=with_mode)
    try:
        bots = [bot_entry(app_type="chatbot", dify_key=dify_key("workflow"))]
        code, lines = await doctor(write_config(tmp_path / "c.yaml", dingtalk, dify, bots=bots))
    finally:
        await dify.close()
    assert code == EX_CONFIG
    assert lines["Dify app type"].startswith("FAIL 'chatbot', but the key belongs to a workflow app")
    assert "set bots[0].dify_app_type: workflow" in lines["Dify app type"]


@pytest.mark.parametrize(
    ("scope", "check", "status", "code"),
    [
        ("Card.Instance.Write", "card permission", "FAIL", EX_CONFIG),
        ("Card.Streaming.Write", "card streaming", "FAIL", EX_CONFIG),
        ("qyapi_robot_sendmsg", "robot files", "WARN", EX_OK),  # text still works: a warning
    ],
)
async def test_a_missing_permission_is_named_with_its_fix(tmp_path, dingtalk, dify, scope, check, status, code):
    dingtalk.deny_scopes(CLIENT_ID, scope)
    exit_code, lines = await doctor(write_config(tmp_path / "c.yaml", dingtalk, dify))
    assert exit_code == code
    assert lines[check].startswith(f"{status} {scope} is not granted")
    assert f"grant {scope}" in lines[check]
    if scope == "Card.Instance.Write":
        assert lines["card template"].startswith("SKIP")


async def test_an_unknown_card_template_fails(tmp_path, dingtalk, dify):
    path = write_config(tmp_path / "c.yaml", dingtalk, dify, dingtalk_ai_card_template_id="tpl-typo.schema")
    code, lines = await doctor(path)
    assert code == EX_CONFIG
    assert lines["card template"].startswith("FAIL tpl-typo.schema does not exist")
    assert "bots[0].dingtalk_ai_card_template_id" in lines["card template"]


async def test_inputs_the_bridge_cannot_fill_fail_and_a_route_is_checked_too(tmp_path, dingtalk, dify):
    form = [{"paragraph": {"label": "Q", "variable": "question", "required": True}},
            {"select": {"label": "L", "variable": "lang", "required": True, "options": ["en", "zh"]}}]  # fmt: skip
    dify.add_app("app-strict", "workflow", name="strict", user_input_form=form)
    route = {"name": "hr", "conversation_ids": ["cidHR=="], "dify_app_type": "chatbot", "dify_app_api_key": "app-x1"}
    bots = [bot_entry(app_type="workflow", dify_key="app-strict", routes=[route])]
    code, lines = await doctor(write_config(tmp_path / "c.yaml", dingtalk, dify, bots=bots))
    assert code == EX_CONFIG
    assert lines["Dify inputs"].startswith("FAIL `lang` is required and nothing fills it")
    assert "make `lang` optional in the app" in lines["Dify inputs"]
    assert lines["Dify key (route hr)"].startswith("FAIL")
    assert "bots[0].routes[0].dify_app_api_key" in lines["Dify key (route hr)"]


async def test_the_message_input_of_a_workflow_is_reported(tmp_path, dingtalk, dify):
    form = [{"paragraph": {"label": "Q", "variable": "question", "required": True}},
            {"text-input": {"label": "Who", "variable": "sys_user_id", "required": False}}]  # fmt: skip
    dify.add_app("app-wf", "workflow", name="wf", user_input_form=form)
    bots = [bot_entry(app_type="workflow", dify_key="app-wf")]
    code, lines = await doctor(write_config(tmp_path / "c.yaml", dingtalk, dify, bots=bots))
    assert code == EX_OK, lines
    assert lines["Dify inputs"] == "OK the message goes to `question`; DingTalk context: sys_user_id (staff_id)"


async def test_an_unreachable_dify_is_exit_69(tmp_path, dingtalk, dify):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens there once the socket is closed
    path = write_config(tmp_path / "c.yaml", dingtalk, dify, dify_open_api_url=f"http://127.0.0.1:{port}/v1")
    code, lines = await doctor(path)
    assert code == EX_UNAVAILABLE
    assert lines["Dify key"].startswith("FAIL could not ask")


async def test_the_command_line(tmp_path, dingtalk, dify):
    path = write_config(tmp_path / "c.yaml", dingtalk, dify, bots=[bot_entry(), bot_entry("second")])
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost"}

    async def run(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dingdifyd", "doctor", "-c", str(path), *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode is not None
        return process.returncode, out.decode()

    code, out = await run("--bot", "second")
    assert code == EX_OK, out
    assert "OK    second: DingTalk token:" in out
    assert "helpdesk" not in out
    assert out.rstrip().endswith("9 OK")
    code, out = await run("--bot", "nobody")
    assert code == EX_USAGE
    assert "no bot named 'nobody'" in out


@pytest.mark.parametrize("app_type", ["agent", "chatflow"])
async def test_auto_on_a_dify_that_does_not_name_modes_says_only_what_it_knows(tmp_path, dingtalk, dify, app_type):
    """Dify 0.15's /info has no mode: a chat-route probe cannot tell a chatbot from an agent or a chatflow."""
    assert not dify.info_with_mode
    path = write_config(tmp_path / "c.yaml", dingtalk, dify,
                        bots=[bot_entry(app_type="auto", dify_key=dify_key(app_type))])  # fmt: skip
    code, lines = await doctor(path)
    assert code == EX_OK, lines
    line = lines["Dify app type"]
    assert line.startswith("OK ") and "chat-route app" in line, line
    assert "chatbot" not in line.replace("chatbot, agent or chatflow", ""), line
