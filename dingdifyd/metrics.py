"""What a bot process counts for the metrics endpoint: plain counters and histograms, no I/O, no library.

A bot process records here and sends `snapshot()` (its totals since it started) to the supervisor with its
heartbeats; the supervisor adds up the snapshots of the bot's processes, past and present, and serves them in
Prometheus text format (supervisor/exposition.py). The metric families are defined once, in FAMILIES, for
both sides. Labels are closed sets (outcome, api, result, kind) and the bot's name: never message text, never
a user or conversation id.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

COUNTER, HISTOGRAM, GAUGE = "counter", "histogram", "gauge"


@dataclass(frozen=True)
class Family:
    name: str  # without the `_total` a counter's samples get
    kind: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms: upper bounds, +Inf implied


# People notice the first words within seconds; a whole answer may take minutes (Dify allows 20).
FIRST_TEXT_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 60.0)
FINAL_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)

FAMILIES: Mapping[str, Family] = {
    f.name: f
    for f in (
        Family("dingdifyd_answers", COUNTER,
               "Messages handled, by outcome: answered, failed, interrupted (the bot stopped), refused (access).",
               ("bot", "outcome")),
        Family("dingdifyd_answer_first_text_seconds", HISTOGRAM,
               "From a message's arrival to the first text of its answer shown (card update or reply).",
               ("bot",), FIRST_TEXT_BUCKETS),
        Family("dingdifyd_answer_seconds", HISTOGRAM,
               "From a message's arrival to its final answer delivered.", ("bot",), FINAL_BUCKETS),
        Family("dingdifyd_dingtalk_calls", COUNTER,
               "DingTalk OpenAPI calls by API (card.streaming, card.createAndDeliver, ...) and result: ok, "
               "rate_limited (403 QpsLimit, 429), forbidden (other 403s), client_error, server_error, unreachable.",
               ("bot", "api", "result")),
        Family("dingdifyd_dify_errors", COUNTER,
               "Answers that failed on Dify, by kind: timeout, total_timeout, stream_cut, unavailable, "
               "rate_limited, auth, error.", ("bot", "kind")),
        Family("dingdifyd_store_errors", COUNTER, "Failed store operations (disk or Redis).", ("bot",)),
        Family("dingdifyd_answers_in_flight", GAUGE, "Answers being written now.", ("bot",)),
        Family("dingdifyd_card_queue_length", GAUGE,
               "Cards waiting for a turn at the bot's card-call scheduler (DingTalk's rate limit).", ("bot",)),
        Family("dingdifyd_dingtalk_calls_this_month", GAUGE,
               "DingTalk calls counted against the organisation's monthly quota this month.", ("bot",)),
        Family("dingdifyd_bot_restarts", COUNTER,
               "Times the supervisor started a bot's process again (crash, hang, configuration change).", ("bot",)),
        Family("dingdifyd_bot_up", GAUGE, "1 while the bot's process is connected to DingTalk.", ("bot",)),
    )
}  # fmt: skip

# a DifyError subclass name -> its kind label
DIFY_ERROR_KINDS = {
    "DifyTimeout": "timeout",
    "DifyTotalTimeout": "total_timeout",
    "DifyStreamCut": "stream_cut",
    "DifyUnavailable": "unavailable",
    "DifyRateLimited": "rate_limited",
    "DifyAuthError": "auth",
    "ConversationNotFound": "error",
    "DifyError": "error",
}


def dify_error_kind(exc: BaseException) -> str | None:
    """The kind label of a Dify failure, or None when `exc` is not one."""
    for cls in type(exc).__mro__:
        kind = DIFY_ERROR_KINDS.get(cls.__name__)
        if kind is not None:
            return kind
    return None


def call_result(status: int | None, code: str) -> str:
    """The result label of a DingTalk call: its HTTP status (None: no answer) and error code."""
    if status is None:
        return "unreachable"
    if 200 <= status < 300:
        return "ok"
    if status == 429 or (status == 403 and code.startswith("Forbidden.AccessDenied.QpsLimit")):
        return "rate_limited"
    if status == 403:
        return "forbidden"
    return "server_error" if status >= 500 else "client_error"


Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs


class Recorder:
    """One bot process's metrics since it started. Values only grow (gauges are not kept here)."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, Labels], float] = {}
        self.histograms: dict[tuple[str, Labels], list[float]] = {}  # bucket counts..., +Inf count, sum

    def count(self, family: str, amount: float = 1.0, **labels: str) -> None:
        key = (family, _labels(family, labels))
        self.counters[key] = self.counters.get(key, 0.0) + amount

    def observe(self, family: str, value: float, **labels: str) -> None:
        buckets = FAMILIES[family].buckets
        key = (family, _labels(family, labels))
        data = self.histograms.setdefault(key, [0.0] * (len(buckets) + 2))
        data[bisect.bisect_left(buckets, value)] += 1  # non-cumulative here; the exposition sums them up
        data[-1] += value

    def snapshot(self) -> dict[str, Any]:
        """Plain data for the pipe: `{"c": [[family, labels, value]...], "h": [[family, labels, data]...]}`."""
        return {
            "c": [[family, list(labels), value] for (family, labels), value in self.counters.items()],
            "h": [[family, list(labels), list(data)] for (family, labels), data in self.histograms.items()],
        }


def _labels(family: str, labels: Mapping[str, str]) -> Labels:
    expected = set(FAMILIES[family].labels) - {"bot"}  # the bot label is the supervisor's to add
    if set(labels) != expected:
        raise ValueError(f"{family}: labels {sorted(labels)}, expected {sorted(expected)}")
    return tuple(sorted((name, str(value)) for name, value in labels.items()))
