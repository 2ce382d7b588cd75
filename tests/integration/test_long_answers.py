"""Long answers against the loopback fake Dify: the total timeout, workflows finished from their run record
after the stream died, and Dify tasks stopped when an answer is given up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from dingdifyd.config import Secret
from dingdifyd.dify.client import DifyClient, DifyTimeouts
from dingdifyd.dify.events import DifyEvent, TextDelta, TextReplace, WorkflowFinished
from dingdifyd.dify.guarded import GuardedAnswers, PollSchedule, run_outputs
from dingdifyd.errors import DifyError, DifyStreamCut, DifyTimeout, DifyTotalTimeout
from dingdifyd.simulator.dify import ANSWER_TAIL, FakeDify
from dingdifyd.simulator.dingtalk import FakeDingTalk
from tests.integration.harness import bot_entry, push, running_bot, write_config

pytestmark = pytest.mark.timeout(30)

USER = "dingtalk:corp1:staff1"
QUICK_POLL = PollSchedule(first=0.05, factor=2, cap=0.2)
MODES = {"chatbot": "chat", "chatflow": "advanced-chat", "workflow": "workflow"}


def key_of(app_type: str) -> str:
    return f"app-long-{app_type}-xxxxxxxx"


@pytest.fixture
async def fake() -> AsyncIterator[FakeDify]:
    fake = FakeDify(ping_interval=10)
    for app_type, mode in MODES.items():
        fake.add_app(key_of(app_type), mode, token_delay=0.01)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def answers(fake: FakeDify, session: aiohttp.ClientSession, app_type: str, **timeouts: float) -> GuardedAnswers:
    limits = DifyTimeouts(**{"connect": 2, "first_byte": 5, "idle": 5, **timeouts})
    client = DifyClient(base_url=fake.base_url, api_key=Secret(key_of(app_type)), app_type=app_type,
                        session=session, timeouts=limits)  # fmt: skip
    return GuardedAnswers(client, poll=QUICK_POLL)


async def collect(source: GuardedAnswers, query: str, into: list[DifyEvent] | None = None) -> list[DifyEvent]:
    events = [] if into is None else into
    async for event in source.stream_answer(query=query, user=USER):
        events.append(event)
    return events


def text_of(events: list[DifyEvent]) -> str:
    text = ""
    for event in events:
        if isinstance(event, TextDelta):
            text += event.text
        elif isinstance(event, TextReplace):
            text = event.text
    return text


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def finish_run_when_its_stream_is_gone(fake: FakeDify, status: str = "succeeded", **fields: Any) -> str:
    """What Dify does on its own: the run goes on after the client lost the stream, and ends."""
    await wait_until(lambda: fake.workflow_runs and not fake.running_task_ids)
    (run,) = fake.workflow_runs.values()
    await asyncio.sleep(0.1)  # the client is polling a running run by now
    run.status, run.finished_at = status, int(time.time())
    for name, value in fields.items():
        setattr(run, name, value)
    return run.id


# --- workflows outliving their stream -------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["cut_after", "stall_after"])
async def test_a_workflow_whose_stream_dies_is_finished_from_its_run_record(fake, session, fault):
    fake.configure(key_of("workflow"), **{fault: 3})
    full = f"Echo: long job | {ANSWER_TAIL}"
    finisher = asyncio.create_task(
        finish_run_when_its_stream_is_gone(fake, outputs={"answer": full, "echo_query": "long job"})
    )
    events = await collect(answers(fake, session, "workflow", idle=0.3), "long job")
    run_id = await finisher
    assert text_of(events[:-2]) == "Echo: long job"  # what streamed before the stream died
    replace, finished = events[-2:]
    assert isinstance(replace, TextReplace) and replace.text == full  # the whole answer, from the run record
    assert isinstance(finished, WorkflowFinished) and finished.status == "succeeded"
    assert finished.workflow_run_id == run_id
    assert len(fake.requests_to(f"/workflows/run/{run_id}")) >= 1
    assert fake.stops == []  # a run followed to its end is not stopped


async def test_a_workflow_that_fails_after_its_stream_was_cut_says_so(fake, session):
    fake.configure(key_of("workflow"), cut_after=2)
    finisher = asyncio.create_task(finish_run_when_its_stream_is_gone(fake, "failed", error="node llm failed"))
    with pytest.raises(DifyError) as failed:
        await collect(answers(fake, session, "workflow"), "doomed job")
    await finisher
    assert failed.value.code == "workflow_failed"
    assert "node llm failed" in str(failed.value)


async def test_a_workflow_run_still_going_at_the_total_timeout_is_stopped(fake, session):
    fake.configure(key_of("workflow"), cut_after=2)
    with pytest.raises(DifyTotalTimeout):
        await collect(answers(fake, session, "workflow", total=1.0), "endless job")
    (run,) = fake.workflow_runs.values()
    assert run.status == "running"  # the fake never finished it: polling gave up at the bound
    (stop,) = fake.stops
    assert stop.path.startswith("/v1/workflows/tasks/") and stop.path.endswith("/stop")
    assert stop.user == USER  # the same user, as Dify requires


def test_run_outputs_are_read_from_both_dify_generations():
    assert run_outputs({"outputs": '{"answer": "0.x: a JSON string"}'}) == {"answer": "0.x: a JSON string"}
    assert run_outputs({"outputs": {"answer": "1.x: an object"}}) == {"answer": "1.x: an object"}
    assert run_outputs({"outputs": None}) == {}
    assert run_outputs({"outputs": "not json"}) == {"text": "not json"}


# --- the total timeout and stopping what is given up -------------------------------------------------------


async def test_a_lively_answer_still_ends_at_the_total_timeout_and_dify_is_told_to_stop(fake, session):
    fake.configure(key_of("chatbot"), token_delay=0.1)  # a token every 0.1 s: never idle, just long
    events: list[DifyEvent] = []
    with pytest.raises(DifyTotalTimeout) as too_long:
        await collect(answers(fake, session, "chatbot", total=0.6, idle=5), "long story", events)
    assert "0.6 s in total" in str(too_long.value)
    assert 0 < len(text_of(events)) < len(f"Echo: long story | {ANSWER_TAIL}")
    (stop,) = fake.stops
    assert stop.found and stop.user == USER and stop.task_id == events[0].task_id
    assert stop.path == f"/v1/chat-messages/{stop.task_id}/stop"


async def test_an_idle_timeout_stops_the_silent_task(fake, session):
    fake.configure(key_of("chatbot"), stall_after=2)
    with pytest.raises(DifyTimeout) as silent:
        await collect(answers(fake, session, "chatbot", idle=0.3), "stalls")
    assert not isinstance(silent.value, DifyTotalTimeout)
    (stop,) = fake.stops
    assert stop.found


@pytest.mark.parametrize("app_type", ["chatbot", "chatflow"])
async def test_a_cut_chat_stream_is_not_followed_but_stopped(fake, session, app_type):
    fake.configure(key_of(app_type), cut_after=2)
    with pytest.raises(DifyStreamCut):
        await collect(answers(fake, session, app_type), "cut")
    assert len(fake.stops) == 1
    assert not fake.requests_to("/workflows/run/")  # only workflow apps have a run record to follow


async def test_an_answer_cancelled_by_the_bot_is_stopped_in_dify(fake, session):
    fake.configure(key_of("chatbot"), token_delay=0.2)
    events: list[DifyEvent] = []
    consumer = asyncio.create_task(collect(answers(fake, session, "chatbot"), "cancel me", events))
    await wait_until(lambda: events)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    (stop,) = fake.stops
    assert stop.found and stop.task_id == events[0].task_id
    await wait_until(lambda: not fake.running_task_ids)  # Dify stopped generating


async def test_a_completed_answer_is_never_stopped(fake, session):
    for app_type in MODES:
        events = await collect(answers(fake, session, app_type), "fine")
        assert "fine" in text_of(events) or isinstance(events[-1], WorkflowFinished)
    assert fake.stops == []


# --- end to end: a bot between the fake DingTalk and the fake Dify ------------------------------------------


def bot_config(tmp_path, dingtalk: FakeDingTalk, fake: FakeDify, app_type: str, **top: Any):
    return write_config(tmp_path / "c.yaml", dingtalk, fake,
                        bots=[bot_entry(app_type=app_type, dify_key=key_of(app_type))], **top)  # fmt: skip


async def test_a_bot_finishes_a_cut_workflow_answer_in_its_card(tmp_path, dingtalk, fake):
    fake.configure(key_of("workflow"), cut_after=4)
    full = f"Echo: the long report | {ANSWER_TAIL}"
    finisher = asyncio.create_task(finish_run_when_its_stream_is_gone(fake, outputs={"answer": full}))
    async with running_bot(bot_config(tmp_path, dingtalk, fake, "workflow")):
        card = await dingtalk.wait_card_final(push(dingtalk, "the long report"), 20)
    await finisher
    assert not card.failed
    assert card.final_content == full


async def test_a_stopping_bot_stops_the_dify_tasks_it_gives_up(tmp_path, dingtalk, fake):
    fake.configure(key_of("chatbot"), token_delay=0.3)
    async with running_bot(bot_config(tmp_path, dingtalk, fake, "chatbot", stop_timeout=0.2)):
        track = push(dingtalk, "a long one")
        await dingtalk.wait_for(lambda: track in dingtalk.cards and dingtalk.cards[track].timeline, 20, "text")
    card = dingtalk.cards[track]
    assert card.done and card.failed  # ended visibly: the bot is restarting
    (stop,) = [s for s in fake.stops if s.user != "dingdifyd-probe"]  # (the bot's start-up check of its key)
    assert stop.found and stop.user == "dingtalk:dingcorp001:user001"
    await wait_until(lambda: not fake.running_task_ids)
