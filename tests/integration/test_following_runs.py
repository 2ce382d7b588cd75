"""A run whose stream broke, or whose bot process died, is followed on Dify's run events route (1.x) into the
same card, chatflows too, without asking Dify again; Dify 0.15.3 keeps the old ways (a workflow's run record is
polled, a cut chat stream is stopped; a dead process's question is asked again). A Dify that refuses the route
(404, 400) is treated like 0.15.3, and nothing hangs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import aiohttp
import pytest

from dingdifyd.bridge import session
from dingdifyd.bridge.session import message_key, out_track_id
from dingdifyd.dingtalk.stream import parse_incoming
from dingdifyd.errors import DifyStreamCut, DifyTimeout
from dingdifyd.simulator.dify import FakeDify
from dingdifyd.simulator.dingtalk import FakeDingTalk
from dingdifyd.store.base import InFlight
from dingdifyd.store.disk import DiskStore
from tests.integration.harness import bot_entry, dify_key, echo, push, running_bot, write_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def dify(any_dify: FakeDify) -> FakeDify:
    return any_dify


def config_for(tmp_path, dingtalk: FakeDingTalk, dify: FakeDify, app_type: str, **top: Any):
    return write_config(tmp_path / "c.yaml", dingtalk, dify, bots=[bot_entry(app_type=app_type)], **top)


def bot_stops(dify: FakeDify) -> list:
    return [stop for stop in dify.stops if stop.user != "dingdifyd-probe"]


@pytest.mark.parametrize("app_type", ["chatflow", "workflow"])
@pytest.mark.parametrize("fault", ["cut_after", "stall_after"])
async def test_a_broken_stream_is_followed_to_the_end_of_the_run(tmp_path, dingtalk, dify, app_type, fault):
    if dify.version == "0.15.3" and app_type == "workflow":
        pytest.skip("0.15.3 workflows are finished from their polled run record: test_long_answers.py")
    dify.configure(dify_key(app_type), **{fault: 4}, token_delay=0.01)
    async with running_bot(config_for(tmp_path, dingtalk, dify, app_type, dify_idle_timeout=0.5)):
        card = await dingtalk.wait_card_final(push(dingtalk, "a long story"), timeout=20)
    full = echo("a long story", dify)
    if dify.version == "0.15.3":  # no run events route: the card says what happened, and Dify is told to stop
        note = DifyStreamCut.user_message if fault == "cut_after" else DifyTimeout.user_message
        assert card.failed and card.final_content == f"Echo: a long story\n\n---\n⚠️ {note}"
        assert len(bot_stops(dify)) == 1 and not dify.requests_to("/events")
        return
    assert not card.failed
    assert card.final_content == full
    assert all(full.startswith(content) for content in card.contents)  # never a word twice
    (follow,) = dify.requests_to("/events")
    assert follow.query == {"user": "dingtalk:dingcorp001:user001", "include_state_snapshot": "true"}
    assert bot_stops(dify) == []
    assert len(dify.requests_to("/chat-messages" if app_type == "chatflow" else "/workflows/run")) == 1


@pytest.mark.parametrize("status", [404, 400])
@pytest.mark.parametrize("app_type", ["chatflow", "workflow"])
async def test_a_dify_refusing_the_events_route_gets_the_old_ways(tmp_path, dingtalk, dify, status, app_type):
    if dify.version == "0.15.3":
        pytest.skip("0.15.3 has no events route: the test above covers it")
    dify.configure(dify_key(app_type), cut_after=3, events_route_status=status, hold_for_subscriber=0,
                   token_delay=0.01)  # fmt: skip
    async with running_bot(config_for(tmp_path, dingtalk, dify, app_type)):
        card = await dingtalk.wait_card_final(push(dingtalk, "refused route"), timeout=20)
    assert len(dify.requests_to("/events")) == 1
    if app_type == "chatflow":  # nothing else to follow it with: a clear note, and Dify is told to stop
        assert card.failed and DifyStreamCut.user_message in card.final_content
        assert len(bot_stops(dify)) == 1
    else:  # the run record, polled until the run (which went on in Dify) finished
        assert not card.failed and card.final_content == echo("refused route", dify)
        assert any(r.path.startswith("/v1/workflows/run/") for r in dify.requests)


async def start_and_abandon(dify: FakeDify, app_type: str, user: str, query: str) -> tuple[str, str]:
    """What a bot process that dies does to Dify: it asks, learns the run, and is gone. (run id, task id)"""
    body: dict[str, Any] = {"inputs": {}, "response_mode": "streaming", "user": user}
    if app_type == "workflow":
        path, body["inputs"] = "/workflows/run", {"query": query}
    else:
        path, body["query"] = "/chat-messages", query
    headers = {"Authorization": f"Bearer {dify_key(app_type)}"}
    async with aiohttp.ClientSession() as http, http.post(dify.base_url + path, json=body, headers=headers) as r:
        async for line in r.content:
            if b'"workflow_run_id"' in line and line.startswith(b"data: "):
                event = json.loads(line[6:])
                return event["workflow_run_id"], event["task_id"]
    raise AssertionError("the run never named itself")


@pytest.mark.parametrize("app_type", ["chatflow", "workflow"])
async def test_the_answer_of_a_dead_process_is_finished_from_its_run(tmp_path, dingtalk, dify, app_type):
    dify.configure(dify_key(app_type), token_delay=0.03)
    config = config_for(tmp_path, dingtalk, dify, app_type)
    data = dingtalk.make_text_message("asked before the crash")
    message = parse_incoming(data)
    assert message is not None
    user = session.dify_user(message, "user")
    run_id, task_id = await start_and_abandon(dify, app_type, user, "asked before the crash")
    store = DiskStore(tmp_path / "state" / "helpdesk")  # as the dead process left it
    assert store.claim_message(message_key(message))
    record = InFlight(message_key(message), dataclasses.asdict(message), out_track_id(message), 1)
    store.begin_answer(dataclasses.replace(record, workflow_run_id=run_id, task_id=task_id))
    store.close()
    asked = len(dify.requests)
    async with running_bot(config):
        card = await dingtalk.wait_card_final(out_track_id(message), timeout=20)
    assert not card.failed
    assert card.final_content == echo("asked before the crash", dify)
    new_requests = [r.path for r in dify.requests[asked:]]
    generation = "/v1/chat-messages" if app_type == "chatflow" else "/v1/workflows/run"
    if dify.version == "0.15.3":  # no events route: the question is asked again, as before
        assert generation in new_requests
    else:
        assert generation not in new_requests  # followed, not asked again
        assert f"/v1/workflow/{run_id}/events" in new_requests
    await asyncio.sleep(0)
