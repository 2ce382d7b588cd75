"""One answer's card (CardStreamer) on the shared scheduler, with an in-memory card standing in for DingTalk's:
coalescing, the exact final text, retries, the template fall-back, and the plain reply when the card fails."""

from __future__ import annotations

import asyncio

import pytest

from dingdifyd.bridge.streamer import CardStreamer
from dingdifyd.errors import CardAlreadyExists, DingTalkError, DingTalkRateLimited, DingTalkUnavailable, PeerError
from dingdifyd.pacing.coalesce import UpdatePolicy
from dingdifyd.pacing.scheduler import CardScheduler, Pacing

pytestmark = pytest.mark.timeout(10)

FAST = {"hold_base": 0.001, "hold_cap": 0.002, "retry_base": 0.001, "retry_cap": 0.002}


class MemoryCard:
    """A card that records its calls; `failures[call]` lists errors its next calls of that kind raise."""

    def __init__(self, failures: dict[str, list[Exception]] | None = None, *, available: bool = True):
        self.calls: list[tuple[str, str]] = []
        self.failures = failures or {}
        self.gate: asyncio.Event | None = None  # set: calls wait for it (a slow DingTalk)
        self.available = available
        self.fell_back = False

    def fall_back(self, exc: Exception) -> bool:
        return False

    async def _call(self, kind: str, text: str = "") -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.calls.append((kind, text))
        pending = self.failures.get(kind)
        if pending:
            raise pending.pop(0)

    async def open(self) -> None:
        await self._call("open")

    async def update(self, text: str) -> None:
        await self._call("update", text)

    async def finish(self, text: str) -> None:
        await self._call("finish", text)

    async def fail(self, text: str) -> None:
        await self._call("fail", text)


class FallbackCard(MemoryCard):
    def fall_back(self, exc: BaseException) -> bool:
        if self.fell_back or not (isinstance(exc, PeerError) and exc.code == "param.templateNotExist"):
            return False
        self.fell_back = True
        return True


class Replies:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def __call__(self, text: str) -> None:
        self.sent.append(text)


def streamer(card: MemoryCard, replies: Replies, pacing: Pacing | None = None) -> CardStreamer:
    scheduler = CardScheduler(None, pacing=(lambda: pacing) if pacing else (lambda: Pacing()), **FAST)
    return CardStreamer(card, UpdatePolicy(interval=0.0, min_chars=1), replies, scheduler=scheduler)


async def test_text_set_while_a_call_is_in_flight_is_coalesced_and_the_final_is_exact():
    card, replies = MemoryCard(), Replies()
    answer = streamer(card, replies)
    card.gate = asyncio.Event()  # DingTalk is slow: the card's calls wait
    await answer.open()
    for i in range(1, 101):
        answer.set_text("x" * i)
    card.gate.set()
    await answer.finish("the full answer")
    kinds = [kind for kind, _ in card.calls]
    assert kinds[0] == "open" and kinds[-1] == "finish"
    assert card.calls[-1] == ("finish", "the full answer")
    assert len(card.calls) <= 3  # open, at most the newest text, the final: not a hundred updates
    assert all(text == "x" * 100 for kind, text in card.calls if kind == "update")
    assert answer.delivered_by == "card" and replies.sent == []
    assert answer.calls == len(card.calls)


async def test_a_card_that_cannot_be_created_answers_with_a_plain_reply():
    card, replies = MemoryCard({"open": [DingTalkError("refused", status=400, code="param.invalid")]}), Replies()
    answer = streamer(card, replies)
    await answer.open()
    answer.set_text("partial")
    await answer.finish("the answer")
    assert card.calls == [("open", "")]
    assert replies.sent == ["the answer"]
    assert answer.delivered_by == "reply"


async def test_a_refused_template_falls_back_and_the_card_is_created_again():
    refused = DingTalkError("no template", status=400, code="param.templateNotExist")
    card, replies = FallbackCard({"open": [refused]}), Replies()
    answer = streamer(card, replies)
    await answer.open()
    await answer.finish("done")
    assert [kind for kind, _ in card.calls] == ["open", "open", "finish"]
    assert card.fell_back and replies.sent == []


async def test_rate_limits_and_busy_answers_on_the_final_are_retried_until_it_is_delivered():
    failures: dict[str, list[Exception]] = {"finish": [
        DingTalkRateLimited("qps", status=403, code="Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"),
        DingTalkUnavailable("no answer within 10s"),
        DingTalkError("busy", status=500, code="system.busy"),
    ]}
    card, replies = MemoryCard(failures), Replies()
    answer = streamer(card, replies)
    await answer.open()
    await answer.finish("made it")
    assert card.calls[-1] == ("finish", "made it")
    assert [kind for kind, _ in card.calls].count("finish") == 4
    assert replies.sent == []


async def test_a_final_that_keeps_failing_goes_out_as_a_plain_reply():
    card = MemoryCard({"fail": [DingTalkError("busy", status=500, code="system.busy") for _ in range(10)]})
    replies = Replies()
    answer = streamer(card, replies)
    await answer.open()
    await answer.fail("sorry, it failed")
    assert [kind for kind, _ in card.calls].count("fail") == 6
    assert replies.sent == ["sorry, it failed"]


async def test_a_card_resumed_by_a_new_process_accepts_that_it_exists():
    exists = CardAlreadyExists("exists", status=400, code="param.cardAlreadyExist")
    card, replies = MemoryCard({"open": [exists]}), Replies()
    answer = streamer(card, replies)
    await answer.open(already_exists_ok=True)
    await answer.finish("resumed")
    assert card.calls[-1] == ("finish", "resumed") and replies.sent == []


async def test_a_card_an_earlier_failed_attempt_created_is_accepted_when_it_exists():
    failures: dict[str, list[Exception]] = {"open": [
        DingTalkError("busy", status=500, code="system.busy"),  # DingTalk may have created it before failing
        CardAlreadyExists("exists", status=400, code="param.cardAlreadyExist"),
    ]}
    card, replies = MemoryCard(failures), Replies()
    answer = streamer(card, replies)
    await answer.open()
    await answer.finish("created once")
    assert [kind for kind, _ in card.calls] == ["open", "open", "finish"] and replies.sent == []


async def test_a_new_card_that_exists_already_is_not_written_to():
    card = MemoryCard({"open": [CardAlreadyExists("exists", status=400, code="param.cardAlreadyExist")]})
    replies = Replies()
    answer = streamer(card, replies)
    await answer.open()
    await answer.finish("the answer")
    assert card.calls == [("open", "")] and replies.sent == ["the answer"]


async def test_a_card_that_is_not_available_is_not_tried_and_the_answer_is_a_plain_reply():
    card, replies = MemoryCard(available=False), Replies()
    answer = streamer(card, replies)
    await answer.open()
    answer.set_text("partial")
    await answer.finish("the answer")
    assert card.calls == [] and answer.calls == 0
    assert replies.sent == ["the answer"] and answer.delivered_by == "reply"


@pytest.mark.parametrize(
    ("pacing", "expected"),
    [
        (Pacing("final-only", first_text=False, intermediate=False), ["open", "finish"]),
        (Pacing("essential", intermediate=False), ["open", "update", "finish"]),
    ],
)
async def test_a_tight_budget_keeps_only_the_essential_calls(pacing, expected):
    card, replies = MemoryCard(), Replies()
    answer = streamer(card, replies, pacing)
    await answer.open()
    for i in range(1, 30):
        answer.set_text("y" * i)
        await asyncio.sleep(0.001)  # let turns happen between the texts
    while pacing.first_text and not answer.updates_sent:
        await asyncio.sleep(0.001)  # the first text is due: wait for it however busy the machine is
    answer.set_text("y" * 40)  # more text after the first: not sent under this budget
    await asyncio.sleep(0.01)
    await answer.finish("final")
    assert [kind for kind, _ in card.calls] == expected
    assert card.calls[-1] == ("finish", "final")


async def test_a_bug_in_a_card_call_still_ends_with_a_plain_reply():
    card, replies = MemoryCard({"finish": [RuntimeError("a bug")]}), Replies()
    answer = streamer(card, replies)
    await answer.open()
    await answer.finish("still delivered")
    assert replies.sent == ["still delivered"]
