"""Two daemons serving the same robot on one Redis (two bot runtimes, as on two hosts), with the fake DingTalk
handing each message to one of their connections at random: contexts continue across them, a redelivery is
answered once, a live host's answer is never taken over, a crashed host's answer is finished by the other."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dingdifyd.bridge.session import message_key, out_track_id
from dingdifyd.dingtalk.stream import parse_incoming
from dingdifyd.simulator.dify import FakeDify, start_fake_dify
from dingdifyd.simulator.dingtalk import FakeDingTalk
from dingdifyd.store.base import InFlight
from tests.integration.harness import (
    CLIENT_ID,
    dify_key,
    fake_dingtalk,
    push_text,
    running_bot,
    write_config,
)
from tests.integration.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.timeout(60)
WAIT = 20.0


@pytest.fixture
def redis_service(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as server:
        yield server


@pytest.fixture
async def dingtalk() -> AsyncIterator[FakeDingTalk]:
    async with fake_dingtalk(rng=random.Random(20240611)) as fake:
        yield fake


@pytest.fixture
async def dify() -> AsyncIterator[FakeDify]:
    fake = await start_fake_dify(default_apps=True)
    fake.configure(dify_key("chatbot"), token_delay=0.002, slow_token_delay=0.05, mention_turn=True)
    yield fake
    await fake.close()


def host_config(tmp_path: Path, name: str, dingtalk: FakeDingTalk, dify: FakeDify, redis: RedisServer) -> Path:
    """Each host has its own config file and state directory; they share the robot and the Redis."""
    directory = tmp_path / name
    directory.mkdir()
    return write_config(directory / "c.yaml", dingtalk, dify, store=redis.url)


async def idle(dingtalk: FakeDingTalk, *hosts) -> None:
    """Until every host has finished its answers (a card is final a moment before its answer is counted)."""
    await dingtalk.wait_for(lambda: all(host.bridge.in_flight == 0 for host in hosts), WAIT, "the hosts to idle")


async def test_context_continues_across_hosts_and_a_redelivery_is_answered_once(tmp_path, dingtalk, dify,
                                                                                redis_service):  # fmt: skip
    config_a = host_config(tmp_path, "host-a", dingtalk, dify, redis_service)
    config_b = host_config(tmp_path, "host-b", dingtalk, dify, redis_service)
    async with running_bot(config_a) as host_a, running_bot(config_b) as host_b:
        await dingtalk.wait_connections(2, CLIENT_ID)
        cards = []
        frames = []
        for turn in range(1, 7):
            frame, track = push_text(dingtalk, f"turn {turn}", sender_staff_id="u1")
            frames.append(frame)
            cards.append(await dingtalk.wait_card_final(track, WAIT))
        await idle(dingtalk, host_a, host_b)
        answered = (host_a.bridge.answered, host_b.bridge.answered)
        asked = len(dify.requests_to("/chat-messages"))
        # DingTalk delivers the last message again, three times, to whichever connection it picks
        for _ in range(3):
            dingtalk.redeliver(frames[-1])
        await dingtalk.wait_for(lambda: len(dingtalk.acks_for(frames[-1])) >= 4, WAIT, "the redeliveries' ACKs")
        # each ACK follows the bridge's decision, and an answer it takes is in flight at once: once both hosts
        # are idle, any (wrong) second answer has run and been counted
        await idle(dingtalk, host_a, host_b)
        assert host_a.bridge.redeliveries + host_b.bridge.redeliveries == 3
        assert (host_a.bridge.answered, host_b.bridge.answered) == answered
        assert host_a.bridge.failed == host_b.bridge.failed == 0
    assert all(answered), f"the messages should have been spread over both hosts: {answered}"
    assert sum(answered) == 6
    for turn, card in enumerate(cards, start=1):
        assert not card.failed
        assert f"Turn {turn} of this conversation" in card.final_content  # one context across both hosts
    requests = dify.requests_to("/chat-messages")
    assert len(requests) == asked == 6  # the redeliveries asked Dify nothing
    assert len({r.json.get("conversation_id") for r in requests[1:]}) == 1


async def test_a_host_starting_next_to_a_live_one_leaves_its_answers_alone(tmp_path, dingtalk, dify, redis_service):
    config_a = host_config(tmp_path, "host-a", dingtalk, dify, redis_service)
    config_b = host_config(tmp_path, "host-b", dingtalk, dify, redis_service)
    async with running_bot(config_a) as host_a:
        _, track = push_text(dingtalk, "a slow question")  # only host A is connected: it answers, for ~2 s
        await dingtalk.wait_for(lambda: track in dingtalk.cards and dingtalk.cards[track].timeline, WAIT, "text")
        async with running_bot(config_b) as host_b:  # starts while A's answer is in flight, and recovers
            card = await dingtalk.wait_card_final(track, WAIT)
            await idle(dingtalk, host_a, host_b)
            assert host_b.bridge.answered == host_b.bridge.failed == 0  # it did not resume A's live answer
        assert host_a.bridge.answered == 1
    assert not card.failed and card.final_content.endswith("word39")
    assert len(dify.requests_to("/chat-messages")) == 1


async def test_an_answer_left_by_a_crashed_host_is_finished_by_another(tmp_path, dingtalk, dify, redis_service):
    from dingdifyd.store.redis_store import RedisStore

    data = dingtalk.make_text_message("asked just before host A crashed")
    message = parse_incoming(data)
    assert message is not None
    crashed = RedisStore(redis_service.url, "helpdesk", lease_ttl=0.3)  # host A's store, as it died
    assert crashed.claim_message(message_key(message))
    crashed.begin_answer(InFlight(message_key(message), dataclasses.asdict(message), out_track_id(message), 1))
    # host A is gone: nobody renews its lease; host B starts after it lapsed and adopts the answer
    survivor = RedisStore(redis_service.url, "helpdesk")
    await dingtalk.wait_for(lambda: not survivor._owners_alive([crashed.consumer_id])[0], WAIT, "the lease to lapse")
    survivor.close()
    async with running_bot(host_config(tmp_path, "host-b", dingtalk, dify, redis_service)) as host_b:
        card = await dingtalk.wait_card_final(out_track_id(message), WAIT)
        await idle(dingtalk, host_b)
        assert host_b.bridge.answered == 1
        # DingTalk redelivering that message now changes nothing: it was claimed by host A
        frame = dingtalk.push_message(CLIENT_ID, data)
        await dingtalk.wait_ack(frame, WAIT)
        await idle(dingtalk, host_b)  # the ACK follows the decision; an answer taken would be in flight
        assert host_b.bridge.redeliveries == 1
        assert (host_b.bridge.answered, host_b.bridge.failed) == (1, 0)
    assert not card.failed and "asked just before host A crashed" in card.final_content
    assert len(dify.requests_to("/chat-messages")) == 1
    crashed._redis.close()
