"""The instance's metrics in Prometheus text format: the bots' processes' counts added up, by the supervisor.

Each bot process sends its totals since it started (metrics.Recorder snapshots) with its heartbeats. When a
process ends, its last totals are kept and the next process's are added to them, so a counter of the bot
never goes back while the supervisor runs (a restart of the whole service starts from zero, which Prometheus
reads as a counter reset). Gauges come from the latest report and the supervisor's own state.

prometheus-client does the exposition (format, escaping, the histogram series); it is imported when the
endpoint is enabled only, and never in a bot process.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from dingdifyd.metrics import COUNTER, FAMILIES, GAUGE, HISTOGRAM, Labels

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class BotTotals:
    """One bot's counts: those of its ended processes, plus the running one's latest snapshot."""

    past_counters: dict[tuple[str, Labels], float] = field(default_factory=dict)
    past_histograms: dict[tuple[str, Labels], list[float]] = field(default_factory=dict)
    current: Mapping[str, Any] = field(default_factory=dict)

    def report(self, snapshot: Mapping[str, Any]) -> None:
        self.current = snapshot

    def process_ended(self) -> None:
        counters, histograms = _parse(self.current)
        for key, value in counters.items():
            self.past_counters[key] = self.past_counters.get(key, 0.0) + value
        for key, data in histograms.items():
            _add_into(self.past_histograms, key, data)
        self.current = {}

    def counters(self) -> dict[tuple[str, Labels], float]:
        counters, _ = _parse(self.current)
        total = dict(self.past_counters)
        for key, value in counters.items():
            total[key] = total.get(key, 0.0) + value
        return total

    def histograms(self) -> dict[tuple[str, Labels], list[float]]:
        _, histograms = _parse(self.current)
        total = {key: list(data) for key, data in self.past_histograms.items()}
        for key, data in histograms.items():
            _add_into(total, key, data)
        return total


def _add_into(into: dict[tuple[str, Labels], list[float]], key: tuple[str, Labels], data: list[float]) -> None:
    if key not in into:
        into[key] = list(data)
    elif len(into[key]) == len(data):
        into[key] = [a + b for a, b in zip(into[key], data, strict=True)]


Counters = dict[tuple[str, Labels], float]
Histograms = dict[tuple[str, Labels], list[float]]


def _parse(snapshot: Mapping[str, Any]) -> tuple[Counters, Histograms]:
    """A snapshot from a bot process, read defensively: whatever is malformed is left out."""
    counters: Counters = {}
    histograms: Histograms = {}
    for _, key, value in _items(snapshot, "c"):
        if isinstance(value, int | float):
            counters[key] = float(value)
    for family, key, value in _items(snapshot, "h"):
        if isinstance(value, list) and len(value) == len(FAMILIES[family].buckets) + 2:
            histograms[key] = [float(v) for v in value]
    return counters, histograms


def _items(snapshot: Mapping[str, Any], kind: str) -> Iterator[tuple[str, tuple[str, Labels], Any]]:
    """The (family, key, value) items of one kind ("c" counters, "h" histograms) of a known family."""
    for item in snapshot.get(kind) or ():
        try:
            family, labels, value = item
            key = (str(family), tuple((str(k), str(v)) for k, v in labels))
        except (TypeError, ValueError):
            continue
        if family in FAMILIES:
            yield family, key, value


@dataclass(frozen=True)
class BotMetrics:
    """What the exposition needs of one bot."""

    name: str
    totals: BotTotals
    gauges: Mapping[str, float]  # family -> value (no labels besides the bot)


def render(bots: Iterable[BotMetrics]) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(list(bots)))
    return generate_latest(registry)


class _Collector:
    def __init__(self, bots: list[BotMetrics]):
        self.bots = bots

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        for name, family in FAMILIES.items():
            if family.kind == COUNTER:
                counter = CounterMetricFamily(name, family.help, labels=list(family.labels))
                for bot in self.bots:
                    for (metric, labels), value in sorted(bot.totals.counters().items()):
                        if metric == name:
                            counter.add_metric(_values(family.labels, bot.name, labels), value)
                    if name in bot.gauges:  # a count the supervisor keeps (restarts)
                        counter.add_metric([bot.name], bot.gauges[name])
                yield counter
            elif family.kind == HISTOGRAM:
                histogram = HistogramMetricFamily(name, family.help, labels=list(family.labels))
                for bot in self.bots:
                    for (metric, labels), data in sorted(bot.totals.histograms().items()):
                        if metric == name:
                            buckets, total, running = [], data[-1], 0.0
                            for bound, count in zip([*family.buckets, float("inf")], data[:-1], strict=True):
                                running += count
                                buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
                            histogram.add_metric(_values(family.labels, bot.name, labels), buckets, total)
                yield histogram
            elif family.kind == GAUGE:
                gauge = GaugeMetricFamily(name, family.help, labels=list(family.labels))
                for bot in self.bots:
                    if name in bot.gauges:
                        gauge.add_metric([bot.name], bot.gauges[name])
                yield gauge


def _values(names: tuple[str, ...], bot: str, labels: Labels) -> list[str]:
    given = dict(labels)
    return [bot if name == "bot" else given.get(name, "") for name in names]
