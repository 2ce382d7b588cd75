"""`dingdifyd demo`: the real daemon against the built-in simulators, with the cards drawn in the terminal.

Starts a fake DingTalk and a fake Dify on 127.0.0.1, writes a throw-away config pointing at them, runs
`dingdifyd run` as a real subprocess (supervisor and bot process), plays a short conversation, and prints every
card update as the DingTalk client would show it. Nothing leaves the machine. The fake Dify speaks 1.16.1 (and
then the conversation includes a human-input form answered from the chat), or 0.15.3 (`--dify-version`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from dingdifyd.bridge.session import out_track_id
from dingdifyd.dingtalk.stream import parse_incoming
from dingdifyd.simulator.configfile import bot_entry, write_config
from dingdifyd.simulator.dify import DIFY_0_15, DIFY_1_16, HumanInputNode, start_fake_dify
from dingdifyd.simulator.dingtalk import FakeCard, FakeDingTalk

CLIENT_ID = "dingdemo0000000000"
CLIENT_SECRET = "demo-client-secret"
DIFY_KEY = "app-fake-chatbot"
APPROVALS_KEY = "app-fake-approvals"  # a chatflow with a Human Input node (Dify 1.x), for one group
APPROVALS_GROUP = "cidDEMOAPPROVALS=="

TEAM, APPROVALS = "Demo team", "Approvals"
SCRIPT = [
    # (who, staff id, group or None, text)
    ("Zhang San", "zhangsan", None, "Hello! What can you do?"),
    ("Zhang San", "zhangsan", None, "Nice. Do you remember what I asked first?"),
    ("Li Si", "lisi", TEAM, "@helpdesk Give the team a status update, please."),
]
FORM_SCRIPT = [
    ("Wang Wu", "wangwu", APPROVALS, "@helpdesk Deploy v2 to production, please."),
    ("Wang Wu", "wangwu", APPROVALS, "@helpdesk 1 tested on staging"),
]


class CardRenderer:
    """Draws the card being watched as a typewriter: each update prints only what it adds."""

    def __init__(self, out: TextIO):
        self.out = out
        self.watching: str | None = None
        self.shown = ""

    def watch(self, track_id: str, bot_name: str) -> None:
        self.watching, self.shown = track_id, ""
        self.out.write(f"  {bot_name} ▸ ")
        self.out.flush()

    def on_change(self, card: FakeCard) -> None:
        if card.out_track_id != self.watching:
            return
        text = card.text
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown) :].replace("\n", "\n    "))
        else:
            self.out.write("\n    " + text.replace("\n", "\n    "))
        self.shown = text
        self.out.flush()


def run_demo(speed: float = 1.0, out: TextIO = sys.stdout, dify_version: str = DIFY_1_16) -> int:
    return asyncio.run(_demo(max(speed, 0.01), out, dify_version))


async def _demo(speed: float, out: TextIO, dify_version: str) -> int:
    dingtalk = FakeDingTalk(ping_interval=20.0)
    dingtalk.register_app(CLIENT_ID, CLIENT_SECRET)
    await dingtalk.start()
    dify = await start_fake_dify(default_apps=True, version=dify_version)
    dify.configure(DIFY_KEY, token_delay=0.04 / speed, mention_turn=True)
    routes = []
    script = list(SCRIPT)
    if dify_version != DIFY_0_15:  # human input exists from Dify 1.13 on
        content = "Release request: {{#sys.query#}}\n\nComment: {{#$output.comment#}}"
        review = HumanInputNode(title="Release approval", form_content=content)
        dify.add_app(APPROVALS_KEY, "advanced-chat", name="approvals", human_input=review, user_input_form=[],
                     token_delay=0.04 / speed)  # fmt: skip
        routes.append({"name": "approvals", "conversation_ids": [APPROVALS_GROUP], "dify_app_type": "chatflow",
                       "dify_app_api_key": APPROVALS_KEY})  # fmt: skip
        script += FORM_SCRIPT
    workdir = Path(tempfile.mkdtemp(prefix="dingdifyd-demo-"))
    config = write_config(
        workdir / "demo.yaml", dingtalk_url=dingtalk.base_url, dify_url=dify.base_url, state_dir=workdir / "state",
        bots=[bot_entry("helpdesk", client_id=CLIENT_ID, client_secret=CLIENT_SECRET, app_type="chatbot",
                        dify_key=DIFY_KEY, routes=routes)],
    )  # fmt: skip
    renderer = CardRenderer(out)
    dingtalk.add_card_listener(renderer.on_change)
    out.write(
        f"dingdifyd demo: a fake DingTalk and a fake Dify {dify_version} on 127.0.0.1, the real daemon in between.\n"
        f"  config: {config}\n  daemon log: {workdir / 'daemon.log'}\n\n"
    )
    log_file = (workdir / "daemon.log").open("wb")
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost"}
    env.pop("NOTIFY_SOCKET", None)
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dingdifyd", "run", "-c", str(config),
        stdout=log_file, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        await dingtalk.wait_connections(1, timeout=30)
        out.write("The daemon connected to the (fake) DingTalk Stream gateway.\n\n")
        for who, staff, group, text in script:
            where = f"group chat “{group}”" if group else "1:1 chat"
            out.write(f"[{where}] {who}: {text}\n")
            conversation = APPROVALS_GROUP if group == APPROVALS else "cidDEMOTEAM==" if group else None
            data = dingtalk.make_text_message(
                text.removeprefix("@helpdesk ") if group else text, sender_staff_id=staff, sender_nick=who,
                group=group is not None, conversation_id=conversation, conversation_title=group or "",
            )  # fmt: skip
            message = parse_incoming(data)
            assert message is not None
            track = out_track_id(message)
            renderer.watch(track, "helpdesk")
            started = time.monotonic()
            dingtalk.push_message(CLIENT_ID, data)
            card = await dingtalk.wait_card_final(track, timeout=60)
            mark = "✗ failed" if card.failed else "✓ done"
            writes = len(card.timeline) + len(card.param_updates)  # streaming calls and card-data calls
            out.write(f"\n    [{mark}: {writes} card updates in {time.monotonic() - started:.1f}s]\n\n")
        out.write(
            "The second answer says “Turn 2”: the conversation continued in Dify. The group message started its own.\n"
        )
        if dify_version != DIFY_0_15:
            out.write(
                "In “Approvals” the Dify app paused for a form; the reply “1 tested on staging” chose its first\n"
                "action and filled its comment, and the run went on into the reply's card.\n"
            )
        out.write("Next: write /etc/dingdifyd/NAME.yaml (see etc/example.yaml) and `systemctl start dingdifyd@NAME`.\n")
        return 0
    finally:
        if daemon.returncode is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(daemon.wait(), 30)
            except TimeoutError:
                daemon.kill()
                await daemon.wait()
        log_file.close()
        await dify.close()
        await dingtalk.close()
