"""What is buffered, by run and kind, mirrored on the event loop from the spool's job results.

The uploader asks it which runs have work; the metrics read their gauges from it; every change to
it is also a change to one of the loss-accounting counters, so the identity in ``agent.ops.metrics``
holds by construction.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from agent.ops.metrics import AgentMetrics
from agent.records import Kind
from agent.spool.store import FOUND_AT_START, AckResult, AppendResult, PendingSummary, RowChange

# Per-run totals are kept for runs with records waiting and for the most recent others, up to this many.
MAX_RUN_STATS = 10_000


@dataclass(slots=True)
class RunStats:
    """One run's share of the loss-accounting counters, for this process lifetime (for /status)."""

    received: int = 0
    uploaded: int = 0
    dead_lettered: int = 0
    dropped: int = 0


class Ledger:
    def __init__(self, metrics: AgentMetrics, on_new_records: Callable[[str], None] | None = None) -> None:
        self._metrics = metrics
        self._stats: OrderedDict[str, RunStats] = OrderedDict()  # least recently changed first
        self._on_new = on_new_records
        self._items: dict[str, dict[Kind, int]] = defaultdict(lambda: defaultdict(int))
        self._by_label: dict[str, int] = defaultdict(int)
        self._total = 0  # an int, so other threads (the metrics scrape) can read it safely
        self.bytes = 0

    def subscribe(self, on_new_records: Callable[[str], None]) -> None:
        self._on_new = on_new_records

    # feeding ----------------------------------------------------------------------------------

    def loaded(self, pending: Iterable[PendingSummary]) -> None:
        for p in pending:
            self._change(p.run, p.kind, p.items)
            self.bytes += p.size
            self._metrics.received.labels(kind=p.kind.label, source=FOUND_AT_START).inc(p.items)
            self._stat(p.run).received += p.items
        self._publish()
        if self._on_new is not None:
            for run in list(self._items):
                self._on_new(run)

    def appended(self, result: AppendResult) -> None:
        for c in result.added:
            self._change(c.run, c.kind, c.items)
            self.bytes += c.size
            self._metrics.received.labels(kind=c.kind.label, source=c.source).inc(c.items)
            self._stat(c.run).received += c.items
        self._drop(result.evicted, "spool_full")
        self._publish()
        if self._on_new is not None:
            for run in {c.run for c in result.added}:
                self._on_new(run)

    def acked(self, result: AckResult) -> None:
        for c in result.delivered:
            self._change(c.run, c.kind, -c.items)
            self._metrics.uploaded.labels(kind=c.kind.label, source=c.source).inc(c.items)
            self._stat(c.run).uploaded += c.items
        for c in result.dead:
            self._change(c.run, c.kind, -c.items)
            self._metrics.dead_lettered.labels(kind=c.kind.label, source=c.source).inc(c.items)
            self._stat(c.run).dead_lettered += c.items
        for c in result.freed:
            self.bytes -= c.size
        for seconds in result.delivery_seconds:
            self._metrics.delivery_latency.observe(seconds)
        self._publish()

    def _drop(self, changes: Iterable[RowChange], reason: str) -> None:
        for c in changes:
            self._change(c.run, c.kind, -c.items)
            self.bytes -= c.size
            self._metrics.dropped.labels(kind=c.kind.label, source=c.source, reason=reason).inc(c.items)
            self._stat(c.run).dropped += c.items

    def _stat(self, run: str) -> RunStats:
        stats = self._stats.get(run)
        if stats is None:
            stats = self._stats[run] = RunStats()
            if len(self._stats) > MAX_RUN_STATS:
                self._forget_one()
        else:
            self._stats.move_to_end(run)
        return stats

    def _forget_one(self) -> None:
        """Drop the least recently changed run with nothing waiting (runs with records are always kept)."""
        for run in self._stats:
            if run not in self._items:
                del self._stats[run]
                return

    def _change(self, run: str, kind: Kind, delta: int) -> None:
        per_run = self._items[run]
        per_run[kind] += delta
        if per_run[kind] <= 0:
            del per_run[kind]
            if not per_run:
                del self._items[run]
        self._by_label[kind.label] += delta
        self._total += delta

    def _publish(self) -> None:
        for label, value in self._by_label.items():
            self._metrics.buffered_records.labels(kind=label).set(value)
        self._metrics.buffered_bytes.set(self.bytes)

    # reading ----------------------------------------------------------------------------------

    def runs(self) -> list[str]:
        return list(self._items)

    def run_items(self, run: str) -> int:
        per_run = self._items.get(run)
        return sum(per_run.values()) if per_run else 0

    def run_breakdown(self, run: str) -> dict[str, int]:
        per_run = self._items.get(run, {})
        out: dict[str, int] = defaultdict(int)
        for kind, n in per_run.items():
            out[kind.label] += n
        return dict(out)

    def run_stats(self, run: str) -> dict[str, int]:
        """This lifetime's received / uploaded / dead_lettered / dropped for a run, plus what waits."""
        stats = self._stats.get(run) or RunStats()
        return {**asdict(stats), "buffered": self.run_items(run)}

    def known_runs(self) -> list[str]:
        """Runs with records waiting or with recent activity (at most MAX_RUN_STATS + those waiting)."""
        return list(dict.fromkeys([*self._stats, *self._items]))

    def total_items(self) -> int:
        return self._total

    def by_kind(self) -> dict[str, int]:
        return {k: v for k, v in self._by_label.items()}
