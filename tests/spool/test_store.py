"""The spool against a real SQLite file: a model-based test of spool + ledger, then group commit,
quarantine, locking, permissions and the catalog tables."""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import sqlite3
import stat
import threading
import types
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from agent.ops.metrics import AgentMetrics
from agent.records import Kind, Record
from agent.spool import store
from agent.spool.ledger import Ledger
from agent.spool.schema import ROW_OVERHEAD
from agent.spool.store import (
    AckResult,
    CatalogWrite,
    DeadLetter,
    ExperimentUpsert,
    ParamPut,
    PendingSummary,
    Row,
    RowChange,
    RunUpsert,
    Spool,
    SpoolClosed,
    SpoolFull,
    SpoolLocked,
    TagPut,
)
from agent.upload.batcher import Barrier, Limits, next_operation
from tests.spool.accounting import (
    BUFFERED,
    BUFFERED_BYTES,
    DEAD_LETTERED,
    DROPPED,
    RECEIVED,
    UPLOADED,
    assert_conserved,
    by_kind,
    snapshot,
    total,
)

T = TypeVar("T")

RUNS = ("run-a", "run-b", "run-c")
KEYS = ("k1", "k2", "k3")

# --- strategies ----------------------------------------------------------------------------------

texts = st.text(alphabet="abxyz é€", max_size=40)  # multi-byte characters vary the UTF-8 size
metric_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(["NaN", "Infinity", "-Infinity"])
)
metric_items = st.tuples(
    st.sampled_from(KEYS), metric_values, st.integers(0, 2**41), st.integers(-5, 10**6)
).map(list)
kv_items = st.tuples(st.sampled_from(KEYS), texts).map(list)


@st.composite
def records(draw: st.DrawFn) -> Record:
    run = draw(st.sampled_from(RUNS))
    kind = draw(st.sampled_from([Kind.METRICS, Kind.METRICS, Kind.METRICS, Kind.PARAMS, Kind.TAGS,
                                 Kind.CREATE_RUN, Kind.UPDATE_RUN, Kind.DELETE_TAG]))
    payload: list[Any] | dict[str, Any]
    if kind is Kind.METRICS:
        payload = draw(st.lists(metric_items, min_size=1, max_size=6))
    elif kind in (Kind.PARAMS, Kind.TAGS):
        payload = draw(st.lists(kv_items, min_size=1, max_size=4))
    elif kind is Kind.CREATE_RUN:
        payload = {"experiment_id": "0", "start_time": draw(st.integers(0, 2**41)), "run_name": draw(texts)}
    elif kind is Kind.UPDATE_RUN:
        payload = {"status": draw(st.sampled_from(["RUNNING", "FINISHED", "FAILED"]))}
    else:
        payload = {"key": draw(st.sampled_from(KEYS))}
    return Record(run, kind, payload)


catalog_writes: st.SearchStrategy[CatalogWrite] = st.one_of(
    st.builds(ParamPut, st.sampled_from(RUNS), st.sampled_from(KEYS), texts),
    st.builds(TagPut, st.sampled_from(RUNS), st.sampled_from(KEYS), st.none() | texts),
)


# --- the model -----------------------------------------------------------------------------------


@dataclass
class ModelRow:
    seq: int
    run: str
    kind: Kind
    payload: list[Any] | dict[str, Any]
    size: int
    done: int = 0
    source: str = "http"  # the lifetime's label: "spool" once found at a restart

    @property
    def n(self) -> int:
        return len(self.payload) if isinstance(self.payload, list) else 1

    @property
    def pending(self) -> int:
        return self.n - self.done


def row_size(record: Record) -> int:
    return len(orjson.dumps(record.payload)) + ROW_OVERHEAD


def assert_rows_match(rows: list[Row], expected: list[ModelRow]) -> None:
    got = [(r.seq, r.run, r.kind, r.n, r.done, r.size, r.payload) for r in rows]
    want = [(m.seq, m.run, m.kind, m.n, m.done, m.size, m.payload) for m in expected]
    assert got == want


def read_db(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read the spool file through a second, read-only connection (WAL lets it read beside the writer)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


class SpoolModel(RuleBasedStateMachine):
    """Drives a real Spool and a Ledger, one event loop per example, against a list-of-rows model."""

    policy = "drop_oldest"
    make_dir: Callable[[], Path]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.directory = self.make_dir()
        self.spool: Spool | None = None
        self.max_bytes = 0
        # the model
        self.rows: list[ModelRow] = []
        self.next_seq = 1
        self.dead_in_db = 0
        # delivered metric rows kept as history (ack(keep=True)), oldest first, and runs whose history was cut
        self.kept: list[ModelRow] = []
        self.lost: set[str] = set()
        self.params: dict[str, dict[str, str]] = {}
        self.tags: dict[str, dict[str, str]] = {}
        # what this process lifetime's counters must say, by kind label
        self.received: Counter[str] = Counter()
        self.uploaded: Counter[str] = Counter()
        self.dead: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.metrics = AgentMetrics()
        self.woken: list[str] = []
        self.ledger = Ledger(self.metrics, on_new_records=self.woken.append)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    @property
    def sp(self) -> Spool:
        assert self.spool is not None
        return self.spool

    def teardown(self) -> None:
        try:
            if self.spool is not None:
                self.run(self.spool.close())
            self.run(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()

    # model helpers ------------------------------------------------------------------------------

    def charged(self) -> int:
        return sum(r.size for r in self.rows)

    def run_rows(self, run: str) -> list[ModelRow]:
        return [r for r in self.rows if r.run == run]

    def kept_bytes(self) -> int:
        return sum(r.size for r in self.kept)

    def history_to_let_go(self, recs: list[Record]) -> list[ModelRow]:
        """Kept rows that go (oldest first) to make room for ``recs``, whatever happens next."""
        need = self.charged() + self.kept_bytes() + sum(row_size(r) for r in recs) - self.max_bytes
        out, freed = [], 0
        for row in self.kept:
            if freed >= need:
                break
            out.append(row)
            freed += row.size
        return out

    def predict_append(self, recs: list[Record]) -> list[ModelRow] | None:
        """The metric rows evicted to make room, or None if the append must raise SpoolFull."""
        incoming = sum(row_size(r) for r in recs)
        charged = self.charged()
        if charged + incoming <= self.max_bytes:
            return []
        if self.policy == "reject":
            return None
        need = charged + incoming - self.max_bytes
        victims: list[ModelRow] = []
        freed = 0
        for row in self.rows:
            if freed >= need:
                break
            if row.kind is Kind.METRICS:
                victims.append(row)
                freed += row.size
        return victims if freed >= need else None

    def apply_append(self, recs: list[Record], writes: list[CatalogWrite], victims: list[ModelRow]) -> None:
        for v in victims:
            self.rows.remove(v)
            self.dropped[v.kind.label] += v.pending
        for w in writes:
            if isinstance(w, ParamPut):
                self.params.setdefault(w.run, {}).setdefault(w.key, w.value)
            elif isinstance(w, TagPut):
                if w.value is None:
                    self.tags.get(w.run, {}).pop(w.key, None)
                    if not self.tags.get(w.run, True):
                        del self.tags[w.run]
                else:
                    self.tags.setdefault(w.run, {})[w.key] = w.value
        for r in recs:
            self.rows.append(ModelRow(self.next_seq, r.run, r.kind, r.payload, row_size(r)))
            self.next_seq += 1
            self.received[r.kind.label] += r.count

    def check_append(self, recs: list[Record], writes: list[CatalogWrite], outcome: object) -> None:
        victims = self.predict_append(recs)
        if victims is None:
            event("append: spool full")
            assert isinstance(outcome, SpoolFull), outcome
            return  # the history let go for it stays let go only if the append commits: not here
        for row in self.history_to_let_go(recs):
            event("append: kept history let go")
            self.kept.remove(row)
            self.lost.add(row.run)
        event(f"append: evicted {min(len(victims), 2)}+ rows")
        assert isinstance(outcome, store.AppendResult), outcome
        assert outcome.added == [RowChange(r.run, r.kind, r.count, row_size(r)) for r in recs]
        assert outcome.evicted == [RowChange(v.run, Kind.METRICS, v.pending, v.size, v.source) for v in victims]
        assert all(c.kind is Kind.METRICS for c in outcome.evicted)
        self.woken.clear()
        self.ledger.appended(outcome)
        assert set(self.woken) == {r.run for r in recs}
        self.apply_append(recs, writes, victims)

    def apply_ack(self, progress: dict[int, int], dead: list[DeadLetter], result: AckResult,
                  keep: bool = False) -> None:
        """Check an AckResult against the model, then apply it to the model."""
        by_seq = {r.seq: r for r in self.rows}
        dead_per_seq: Counter[int] = Counter()
        want_dead: Counter[RowChange] = Counter()
        for letter in dead:
            row = by_seq.get(letter.row_seq)
            if row is None:
                continue
            dead_per_seq[letter.row_seq] += letter.count
            want_dead[RowChange(row.run, row.kind, letter.count, 0, row.source)] += 1
        want_delivered: Counter[RowChange] = Counter()
        want_freed: Counter[RowChange] = Counter()
        for seq, new_done in progress.items():
            row = by_seq.get(seq)
            if row is None:
                continue
            moved = max(min(new_done, row.n) - row.done, 0)
            delivered = moved - dead_per_seq[seq]
            assert delivered >= 0, "the test must only dead-letter items its progress covers"
            if delivered:
                want_delivered[RowChange(row.run, row.kind, delivered, 0, row.source)] += 1
            self.uploaded[row.kind.label] += delivered
            self.dead[row.kind.label] += dead_per_seq[seq]
            self.dead_in_db += dead_per_seq[seq]
            row.done = max(row.done, min(new_done, row.n))
            if row.done >= row.n:
                if keep and row.kind is Kind.METRICS:
                    if dead_per_seq[seq]:
                        self.lost.add(row.run)
                    else:
                        self.kept.append(row)
                        self.kept.sort(key=lambda r: r.seq)
                self.rows.remove(row)
                want_freed[RowChange(row.run, row.kind, 0, row.size, row.source)] += 1
        assert Counter(result.delivered) == want_delivered
        assert Counter(result.dead) == want_dead
        assert Counter(result.freed) == want_freed
        self.ledger.acked(result)

    def any_run(self) -> st.SearchStrategy[str]:
        pending = sorted({r.run for r in self.rows})
        return st.sampled_from(pending) if pending else st.sampled_from(RUNS)

    # rules --------------------------------------------------------------------------------------

    @initialize(max_bytes=st.sampled_from([450, 1200, 4000, 10**9]))
    def open_spool(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.spool = Spool(self.directory, max_bytes=max_bytes, overflow_policy=self.policy)
        loaded = self.run(self.spool.open())
        assert loaded.pending == [] and loaded.quarantined is None
        self.ledger.loaded(loaded.pending)

    @rule(recs=st.lists(records(), min_size=1, max_size=3), writes=st.lists(catalog_writes, max_size=2))
    def append(self, recs: list[Record], writes: list[CatalogWrite]) -> None:
        try:
            outcome: object = self.run(self.sp.append(recs, writes))
        except SpoolFull as exc:
            outcome = exc
        self.check_append(recs, writes, outcome)

    @rule(batches=st.lists(st.lists(records(), min_size=1, max_size=2), min_size=2, max_size=6))
    def concurrent_appends(self, batches: list[list[Record]]) -> None:
        """Appends awaited together share commits; they are queued (and so applied) in gather order."""

        async def together() -> list[Any]:
            return await asyncio.gather(*(self.sp.append(b) for b in batches), return_exceptions=True)

        for recs, outcome in zip(batches, self.run(together()), strict=True):
            self.check_append(recs, [], outcome)

    @rule(data=st.data())
    def ack_some(self, data: st.DataObject) -> None:
        """Read a prefix of a run, then acknowledge any progress on it, dead-lettering some items."""
        run = data.draw(self.any_run(), label="run")
        limit = data.draw(st.integers(1, 6), label="limit")
        rows = self.run(self.sp.read_run(run, limit))
        assert_rows_match(rows, self.run_rows(run)[:limit])
        progress: dict[int, int] = {}
        dead: list[DeadLetter] = []
        for row in rows:
            new_done = data.draw(st.none() | st.integers(row.done, row.n) | st.just(row.n), label="new_done")
            if new_done is None:
                continue
            progress[row.seq] = new_done
            refused = data.draw(st.integers(0, new_done - row.done), label="refused")
            split = data.draw(st.integers(0, refused), label="split")
            for count in (split, refused - split):
                if count:
                    items = row.payload[row.done:row.done + count] if isinstance(row.payload, list) else row.payload
                    dead.append(DeadLetter(row.seq, items, count, 400, "INVALID_PARAMETER_VALUE", "refused"))
        if data.draw(st.booleans(), label="stale seq"):
            progress[self.next_seq + 100] = 1  # a row that does not exist (any more): ignored
            dead.append(DeadLetter(self.next_seq + 100, [], 1, 400, None, "gone"))
        keep = data.draw(st.booleans(), label="keep")
        result = self.run(self.sp.ack(progress, dead, keep=keep))
        self.apply_ack(progress, dead, result, keep)

    @rule(data=st.data(), recs=st.lists(records(), min_size=1, max_size=3))
    def ack_after_append(self, data: st.DataObject, recs: list[Record]) -> None:
        """Progress read before an append that evicts rows: acks for evicted rows are ignored."""
        run = data.draw(self.any_run(), label="run")
        rows = self.run(self.sp.read_run(run, 100))
        try:
            outcome: object = self.run(self.sp.append(recs))
        except SpoolFull as exc:
            outcome = exc
        self.check_append(recs, [], outcome)
        progress = {row.seq: row.n for row in rows}
        dead = [DeadLetter(row.seq, row.payload, row.n - row.done, 404, None, "x") for row in rows[:1]]
        self.apply_ack(progress, dead, self.run(self.sp.ack(progress, dead)))

    @rule(data=st.data())
    def upload_step(self, data: st.DataObject) -> None:
        """What the uploader does: read a run, take next_operation, acknowledge it (refusing some items)."""
        run = data.draw(self.any_run(), label="run")
        rows = self.run(self.sp.read_run(run, 1000))
        assert_rows_match(rows, self.run_rows(run))
        limits = Limits(max_metrics=data.draw(st.integers(1, 4)), max_params=data.draw(st.integers(1, 3)),
                        max_tags=data.draw(st.integers(1, 3)), max_items=data.draw(st.integers(1, 6)),
                        max_bytes=data.draw(st.integers(40, 400)))
        op = next_operation(rows, limits)
        if op is None:
            assert rows == []
            return
        if isinstance(op, Barrier):
            assert op.row == rows[0]
            progress = {op.row.seq: 1}
            refused = data.draw(st.booleans(), label="refused")
            dead = [DeadLetter(op.row.seq, op.row.payload, 1, 400, None, "no")] if refused else []
        else:
            assert op.pieces, "a batch for pending rows must make progress"
            progress = op.progress()
            sent = [p for p in op.pieces if p.send]
            chosen = data.draw(st.lists(st.sampled_from(sent), unique_by=lambda p: (p.seq, p.index))
                               if sent else st.just([]), label="refused pieces")
            dead = [DeadLetter(p.seq, [p.item], 1, 400, "INVALID_PARAMETER_VALUE", "bad") for p in chosen]
        keep = data.draw(st.booleans(), label="keep")
        self.apply_ack(progress, dead, self.run(self.sp.ack(progress, dead, keep=keep)), keep)

    @rule(run=st.sampled_from(RUNS))
    def deliver_run_keeping_history(self, run: str) -> None:
        """The whole run delivered, its metrics kept: later appends must make room by letting them go."""
        rows = self.run(self.sp.read_run(run, 1000))
        progress = {row.seq: row.n for row in rows}
        self.apply_ack(progress, [], self.run(self.sp.ack(progress, keep=True)), keep=True)

    @rule(run=st.sampled_from(RUNS))
    def forget_history(self, run: str) -> None:
        self.run(self.sp.forget_history(run))
        self.kept = [r for r in self.kept if r.run != run]
        self.lost.add(run)

    @rule(run=st.sampled_from(RUNS))
    def dead_letter_run(self, run: str) -> None:
        result = self.run(self.sp.dead_letter_run(run, 404, "RESOURCE_DOES_NOT_EXIST", "run gone"))
        gone = self.run_rows(run)
        assert Counter(result.dead) == Counter(RowChange(r.run, r.kind, r.pending, 0, r.source) for r in gone)
        assert Counter(result.freed) == Counter(RowChange(r.run, r.kind, 0, r.size, r.source) for r in gone)
        assert result.delivered == []
        for r in gone:
            self.rows.remove(r)
            self.dead[r.kind.label] += r.pending
            self.dead_in_db += r.pending
        self.kept = [r for r in self.kept if r.run != run]
        self.lost.add(run)
        self.ledger.acked(result)

    @rule()
    def restart(self) -> None:
        """Close and reopen: what the new process loads is exactly what the model says is pending."""
        self.run(self.sp.close())
        with pytest.raises(SpoolClosed):
            self.run(self.sp.read_run(RUNS[0], 1))
        self.spool = Spool(self.directory, max_bytes=self.max_bytes, overflow_policy=self.policy)
        loaded = self.run(self.spool.open())
        assert loaded.quarantined is None
        event(f"restart with {'some' if self.rows else 'no'} rows pending")
        want: dict[tuple[str, Kind], PendingSummary] = {}
        for r in self.rows:
            p = want.setdefault((r.run, r.kind), PendingSummary(r.run, r.kind, 0, 0, 0))
            p.rows += 1
            p.items += r.pending
            p.size += r.size
        assert sorted(loaded.pending, key=lambda p: (p.run, p.kind)) == [want[k] for k in sorted(want)]
        assert loaded.dead_letters == self.dead_in_db
        assert loaded.params == self.params
        assert loaded.tags == self.tags
        # A new process: new counters, fed from what was found.
        self.metrics = AgentMetrics()
        self.woken = []
        self.ledger = Ledger(self.metrics, on_new_records=self.woken.append)
        self.ledger.loaded(loaded.pending)
        assert sorted(self.woken) == sorted({r.run for r in self.rows})
        self.received = Counter()
        for r in self.rows:
            self.received[r.kind.label] += r.pending
            r.source = "spool"  # this lifetime counts them as found at start
        self.uploaded, self.dead, self.dropped = Counter(), Counter(), Counter()
        assert by_kind(self.metrics, RECEIVED) == {k: float(v) for k, v in self.received.items() if v}

    @rule()
    def maintenance(self) -> None:
        result = self.run(self.sp.maintenance())
        assert result["freelist_pages"] >= 0

    # invariants ---------------------------------------------------------------------------------

    @precondition(lambda self: self.spool is not None)
    @invariant()
    def database_is_the_model(self) -> None:
        conn = sqlite3.connect(f"file:{self.sp.path}?mode=ro", uri=True)
        try:
            got = [(seq, run, Kind(kind), n, done, size, orjson.loads(body)) for seq, run, kind, n, done, size, body
                   in conn.execute("SELECT seq, run, kind, n, done, size, body FROM records ORDER BY seq")]
            (dead_in_db,) = conn.execute("SELECT COALESCE(SUM(n), 0) FROM dead_letters").fetchone()
            params: dict[str, dict[str, str]] = {}
            for run, key, value in conn.execute("SELECT run, key, value FROM run_params"):
                params.setdefault(run, {})[key] = value
        finally:
            conn.close()
        assert got == [(r.seq, r.run, r.kind, r.n, r.done, r.size, r.payload) for r in self.rows]
        assert dead_in_db == self.dead_in_db
        assert params == self.params
        # charged_bytes is the sum of the row sizes in the file, and the ledger's mirror agrees
        db_bytes = sum(size for _, _, _, _, _, size, _ in got)
        assert self.sp.charged_bytes == db_bytes == self.ledger.bytes
        assert db_bytes <= self.max_bytes
        assert self.sp.history_bytes == self.kept_bytes()
        assert db_bytes + self.kept_bytes() <= self.max_bytes or not self.kept

    @precondition(lambda self: self.spool is not None)
    @invariant()
    def history_is_the_model(self) -> None:
        """Each run's metric history here: the kept rows and the waiting ones, whole, in order; whole as
        long as none of the run's kept rows was let go."""
        for run in RUNS:
            points, whole = self.run(self.sp.metric_history(run, None))
            rows = sorted([*(r for r in self.kept if r.run == run),
                           *(r for r in self.rows if r.run == run and r.kind is Kind.METRICS)], key=lambda r: r.seq)
            assert points == [item for r in rows for item in r.payload], run
            assert whole == (run not in self.lost), run
            key_points, _ = self.run(self.sp.metric_history(run, KEYS[0]))
            assert key_points == [p for p in points if p[0] == KEYS[0]]

    @invariant()
    def ledger_and_counters_agree(self) -> None:
        pending: Counter[str] = Counter()
        per_run: dict[str, Counter[str]] = {}
        for r in self.rows:
            pending[r.kind.label] += r.pending
            per_run.setdefault(r.run, Counter())[r.kind.label] += r.pending
        assert self.ledger.total_items() == sum(pending.values())
        assert {k: v for k, v in self.ledger.by_kind().items() if v} == dict(pending)
        assert sorted(self.ledger.runs()) == sorted(per_run)
        for run in RUNS:
            assert self.ledger.run_items(run) == sum(per_run.get(run, Counter()).values())
            assert self.ledger.run_breakdown(run) == dict(per_run.get(run, Counter()))
        snap = snapshot(self.metrics)
        assert by_kind(snap, BUFFERED) == {k: float(v) for k, v in pending.items()}
        assert total(snap, BUFFERED_BYTES) == self.charged()
        assert_conserved(snap)
        for family, want in ((RECEIVED, self.received), (UPLOADED, self.uploaded),
                             (DEAD_LETTERED, self.dead), (DROPPED, self.dropped)):
            assert by_kind(snap, family) == {k: float(v) for k, v in want.items() if v}, family


@pytest.mark.parametrize("policy", ["drop_oldest", "reject"])
def test_spool_and_ledger_follow_the_model(tmp_path: Path, policy: str) -> None:
    counter = itertools.count()

    class Machine(SpoolModel):
        def make_dir(self) -> Path:
            return tmp_path / f"example-{next(counter)}" / "spool"

    Machine.policy = policy
    run_state_machine_as_test(
        Machine, settings=settings(max_examples=60, stateful_step_count=30, deadline=None)
    )


# --- overflow policies, by example -------------------------------------------------------------


def metrics_record(run: str, n: int, pad: str = "") -> Record:
    return Record(run, Kind.METRICS, [[f"m{pad}", float(i), 1000 + i, i] for i in range(n)])


async def db_kinds(spool: Spool) -> list[tuple[str, Kind]]:
    return [(run, Kind(kind)) for run, kind in read_db(spool.path, "SELECT run, kind FROM records ORDER BY seq")]


async def test_drop_oldest_evicts_only_the_oldest_metric_rows(tmp_path: Path) -> None:
    params = Record("r", Kind.PARAMS, [["p", "v"]])
    create = Record("r", Kind.CREATE_RUN, {"experiment_id": "0"})
    m1, m2, m3 = metrics_record("r", 2), metrics_record("s", 2), metrics_record("r", 2)
    limit = sum(row_size(r) for r in (create, m1, params, m2))
    spool = Spool(tmp_path, max_bytes=limit, overflow_policy="drop_oldest")
    await spool.open()
    try:
        for rec in (create, m1, params, m2):
            assert (await spool.append([rec])).evicted == []
        result = await spool.append([m3])  # needs room: the oldest metric row goes, nothing else
        assert result.evicted == [RowChange("r", Kind.METRICS, 2, row_size(m1))]
        assert await db_kinds(spool) == [("r", Kind.CREATE_RUN), ("r", Kind.PARAMS), ("s", Kind.METRICS),
                                         ("r", Kind.METRICS)]
        assert spool.charged_bytes == limit - row_size(m1) + row_size(m3)
        # A params row bigger than all metric rows together: nothing can make room, nothing changes.
        huge = Record("r", Kind.PARAMS, [["big", "x" * limit]])
        with pytest.raises(SpoolFull):
            await spool.append([huge], [ParamPut("r", "big", "x")])
        assert await db_kinds(spool) == [("r", Kind.CREATE_RUN), ("r", Kind.PARAMS), ("s", Kind.METRICS),
                                         ("r", Kind.METRICS)]
        assert read_db(spool.path, "SELECT key FROM run_params") == []
    finally:
        await spool.close()


async def test_reject_raises_and_writes_nothing(tmp_path: Path) -> None:
    m1 = metrics_record("r", 3)
    spool = Spool(tmp_path, max_bytes=row_size(m1) + 10, overflow_policy="reject")
    await spool.open()
    try:
        await spool.append([m1])
        with pytest.raises(SpoolFull):
            await spool.append([metrics_record("r", 1)], [TagPut("r", "t", "v"), ParamPut("r", "p", "v")])
        assert await db_kinds(spool) == [("r", Kind.METRICS)]
        assert read_db(spool.path, "SELECT COUNT(*) FROM run_tags") == [(0,)]
        assert spool.charged_bytes == row_size(m1)
        # Once delivered, there is room again.
        (row,) = await spool.read_run("r", 10)
        await spool.ack({row.seq: row.n})
        await spool.append([metrics_record("r", 1)])
    finally:
        await spool.close()


# --- group commit --------------------------------------------------------------------------------


async def test_500_concurrent_appends_all_land(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path, max_bytes=10**9)
    await spool.open()
    transactions: list[int] = []
    real = spool._run_transaction

    def counting(conn: sqlite3.Connection, batch: list[Any]) -> None:
        transactions.append(len(batch))
        real(conn, batch)

    monkeypatch.setattr(spool, "_run_transaction", counting)
    try:
        recs = [Record(f"run-{i % 7}", Kind.METRICS, [["m", float(i), i, i]]) for i in range(500)]
        results = await asyncio.gather(*(spool.append([r]) for r in recs))
        assert [res.added for res in results] == [[RowChange(r.run, r.kind, 1, row_size(r))] for r in recs]
        assert sum(transactions) == 500
        assert len(transactions) < 500, "concurrent appends should share commits"
        for run in {r.run for r in recs}:
            rows = await spool.read_run(run, 1000)
            assert [row.payload for row in rows] == [r.payload for r in recs if r.run == run]
        assert spool.charged_bytes == sum(row_size(r) for r in recs)
    finally:
        await spool.close()
    # Durable: a new spool finds them all.
    again = Spool(tmp_path, max_bytes=10**9)
    loaded = await again.open()
    await again.close()
    assert sum(p.items for p in loaded.pending) == 500


async def test_a_failing_job_does_not_undo_the_others_in_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec_size = row_size(metrics_record("r", 1))
    fits = 40
    spool = Spool(tmp_path, max_bytes=rec_size * fits, overflow_policy="reject")
    await spool.open()
    transactions: list[int] = []
    real = spool._run_transaction

    def counting(conn: sqlite3.Connection, batch: list[Any]) -> None:
        transactions.append(len(batch))
        real(conn, batch)

    monkeypatch.setattr(spool, "_run_transaction", counting)
    gate = threading.Event()
    try:
        # Hold the writer thread inside a transaction until every append is queued behind it, so the
        # appends commit together (at most two transactions for 61 jobs).
        blocker = asyncio.ensure_future(spool._submit(lambda conn: gate.wait(30)))
        appends = [asyncio.ensure_future(spool.append([metrics_record("r", 1)])) for _ in range(60)]
        asyncio.get_running_loop().call_soon(gate.set)  # runs after every task above has queued its job
        assert await blocker is True
        outcomes = await asyncio.gather(*appends, return_exceptions=True)
        assert sum(transactions) == 61 and len(transactions) <= 2
        assert [isinstance(o, SpoolFull) for o in outcomes] == [False] * fits + [True] * (60 - fits)
        rows = await spool.read_run("r", 1000)
        assert len(rows) == fits
        assert spool.charged_bytes == fits * rec_size
    finally:
        gate.set()
        await spool.close()
    again = Spool(tmp_path, max_bytes=rec_size * fits)
    loaded = await again.open()
    await again.close()
    assert [(p.rows, p.items) for p in loaded.pending] == [(fits, fits)]


async def test_jobs_after_close_raise_spool_closed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10**6)
    await spool.open()
    await spool.close()
    await spool.close()  # twice is fine
    with pytest.raises(SpoolClosed):
        await spool.append([metrics_record("r", 1)])
    with pytest.raises(SpoolClosed):
        await spool.ack({1: 1})


# --- quarantine, lock, permissions -------------------------------------------------------------

_SQLITE_MAGIC = b"SQLite format 3\x00"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=16, max_size=9000).filter(lambda b: not b.startswith(_SQLITE_MAGIC[:6])))
def test_garbage_file_is_quarantined(tmp_path: Path, garbage: bytes) -> None:
    directory = tmp_path / os.urandom(6).hex()
    directory.mkdir()
    (directory / "spool.db").write_bytes(garbage)

    async def scenario() -> store.Loaded:
        spool = Spool(directory, max_bytes=10**6)
        loaded = await spool.open()
        try:
            await spool.append([metrics_record("r", 2)])  # the fresh spool works
        finally:
            await spool.close()
        return loaded

    loaded = asyncio.run(scenario())
    assert loaded.quarantined is not None
    assert loaded.quarantined.parent == directory
    assert loaded.quarantined.name.startswith("spool.db.corrupt-")
    assert loaded.quarantined.read_bytes() == garbage
    assert loaded.pending == []

    async def reopen() -> store.Loaded:
        spool = Spool(directory, max_bytes=10**6)
        try:
            return await spool.open()
        finally:
            await spool.close()

    again = asyncio.run(reopen())
    assert again.quarantined is None
    assert [(p.run, p.items) for p in again.pending] == [("r", 2)]


async def test_a_newer_agents_spool_is_refused_and_left_untouched(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "spool.db")
    conn.execute("CREATE TABLE records (x)")
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    before = (tmp_path / "spool.db").read_bytes()
    spool = Spool(tmp_path, max_bytes=10**6)
    with pytest.raises(store.SpoolTooNew, match="schema version 99"):
        await spool.open()
    assert (tmp_path / "spool.db").read_bytes() == before
    assert quarantined_contents(tmp_path) == []


def quarantined_contents(directory: Path) -> list[bytes]:
    return sorted(p.read_bytes() for p in directory.glob("spool.db.corrupt-*")
                  if not p.name.endswith(("-wal", "-shm")))


async def test_two_quarantines_in_the_same_second_keep_both_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The moved-aside file holds records that were NOT uploaded: a second quarantine must not
    # overwrite the first one (the stamp has a one-second resolution; pin it to one second).
    frozen = types.SimpleNamespace(
        strftime=lambda fmt, t=None: "20250101T000000Z", gmtime=lambda t=None: None, time=lambda: 1.0
    )
    monkeypatch.setattr(store, "time", frozen)
    quarantined = []
    for garbage in (b"first garbage" * 10, b"second garbage" * 10):
        (tmp_path / "spool.db").write_bytes(garbage)
        for suffix in ("-wal", "-shm"):
            (tmp_path / f"spool.db{suffix}").unlink(missing_ok=True)
        spool = Spool(tmp_path, max_bytes=10**6)
        loaded = await spool.open()
        await spool.close()
        assert loaded.quarantined is not None
        quarantined.append(loaded.quarantined)
    assert quarantined_contents(tmp_path) == sorted([b"first garbage" * 10, b"second garbage" * 10])
    assert quarantined[0] != quarantined[1]


async def test_a_busy_spool_file_is_not_quarantined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "database is locked" is an OperationalError, a DatabaseError like corruption, but the file is
    # healthy: whatever open() does about it, it must not move the pending records aside.
    spool = Spool(tmp_path, max_bytes=10**6)
    await spool.open()
    await spool.append([metrics_record("r", 1)])
    await spool.close()
    other = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)  # e.g. an operator's sqlite3 shell
    try:
        other.execute("PRAGMA locking_mode = EXCLUSIVE")
        other.execute("BEGIN EXCLUSIVE")
        # SQLite's busy timeout (5 s by default) only delays the outcome; shorten it.
        monkeypatch.setattr(sqlite3, "connect", functools.partial(sqlite3.connect, timeout=0.05))
        busy = Spool(tmp_path, max_bytes=10**6)
        quarantined: Path | None = None
        try:
            quarantined = (await busy.open()).quarantined
            await busy.close()
        except SpoolLocked as exc:  # a clear refusal is fine; moving the file aside is not
            assert "locked" in str(exc)
    finally:
        other.close()
    monkeypatch.undo()
    assert quarantined is None, f"a healthy, busy spool was moved aside to {quarantined}"
    again = Spool(tmp_path, max_bytes=10**6)
    loaded = await again.open()
    await again.close()
    assert [(p.run, p.items) for p in loaded.pending] == [("r", 1)]


async def test_a_second_spool_on_the_same_directory_is_locked_out(tmp_path: Path) -> None:
    first = Spool(tmp_path, max_bytes=10**6)
    await first.open()
    try:
        for _ in range(2):  # a failed attempt must not release the first spool's lock
            second = Spool(tmp_path, max_bytes=10**6)
            with pytest.raises(SpoolLocked, match=str(os.getpid())):
                await second.open()
            await second.close()
        await first.append([metrics_record("r", 1)])  # the holder is unaffected
        assert (tmp_path / "lock").read_text().strip() == str(os.getpid())
    finally:
        await first.close()
    third = Spool(tmp_path, max_bytes=10**6)
    loaded = await third.open()
    await third.close()
    assert [(p.run, p.items) for p in loaded.pending] == [("r", 1)]


async def test_spool_files_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    old = os.umask(0o022)
    try:
        spool = Spool(directory, max_bytes=10**6)
        await spool.open()
        try:
            await spool.append([metrics_record("r", 3)])
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
            names = {p.name for p in directory.iterdir()}
            assert {"spool.db", "spool.db-wal", "spool.db-shm", "lock"} <= names
            for p in directory.iterdir():
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name
            assert spool.file_bytes() > 0
        finally:
            await spool.close()
        fresh = tmp_path / "new" / "spool"
        spool = Spool(fresh, max_bytes=10**6)
        await spool.open()
        await spool.close()
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
        assert stat.S_IMODE((fresh / "spool.db").stat().st_mode) == 0o600
    finally:
        os.umask(old)


# --- damaged rows ------------------------------------------------------------------------------


async def spool_with_two_rows(directory: Path, damage: str) -> None:
    spool = Spool(directory, max_bytes=10**6)
    await spool.open()
    await spool.append([metrics_record("r", 2), Record("r", Kind.PARAMS, [["p", "v"]])])
    await spool.close()
    conn = sqlite3.connect(directory / "spool.db")
    conn.execute(damage)
    conn.commit()
    conn.close()


async def test_a_row_with_a_damaged_body_is_handed_over_as_corrupt(tmp_path: Path) -> None:
    await spool_with_two_rows(tmp_path, "UPDATE records SET body = x'7b00ff' WHERE seq = 1")
    spool = Spool(tmp_path, max_bytes=10**6)
    loaded = await spool.open()
    try:
        assert loaded.quarantined is None
        damaged, params = await spool.read_run("r", 10)
        assert damaged.corrupt is not None and (damaged.n, damaged.kind) == (2, Kind.METRICS)
        assert damaged.payload == {"unreadable_body": "7b00ff"}  # the bytes, kept for the dead letter
        assert params.corrupt is None and params.payload == [["p", "v"]]
        # what the uploader does with it: dead-letter the whole row
        result = await spool.ack({damaged.seq: damaged.n}, [DeadLetter(damaged.seq, damaged.payload, 2, None, None,
                                                                       "unreadable")])
        # found at start: counted as the spool's, whatever source it first came from
        assert result.dead == [RowChange("r", Kind.METRICS, 2, 0, "spool")] and result.delivered == []
        assert [row.seq for row in await spool.read_run("r", 10)] == [params.seq]
    finally:
        await spool.close()


async def test_a_row_of_an_unknown_kind_does_not_stop_the_spool(tmp_path: Path) -> None:
    # A kind this version cannot interpret is moved to the dead-letter table when the spool opens:
    # the spool still opens, and the rest of the run is not held up behind it.
    await spool_with_two_rows(tmp_path, "UPDATE records SET kind = 99 WHERE seq = 1")
    spool = Spool(tmp_path, max_bytes=10**6)
    loaded = await spool.open()
    try:
        assert loaded.quarantined is None
        assert [(p.kind, p.items) for p in loaded.pending] == [(Kind.PARAMS, 1)]
        assert loaded.dead_letters == 2
        assert [row.kind for row in await spool.read_run("r", 10)] == [Kind.PARAMS]
        assert [d["message"] for d in await spool.dead_letters()] == ["unknown record kind"]
    finally:
        await spool.close()


# --- catalog tables, dead letters, maintenance ----------------------------------------------------


async def test_catalog_writes_survive_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10**6)
    await spool.open()
    await spool.write_catalog([
        RunUpsert("r1", None, True, {"experiment_id": "e1", "status": "RUNNING"}),
        RunUpsert("r2", "up-2", False, {"experiment_id": "0"}),
        ExperimentUpsert("e1", None, True, "exp", {"lifecycle_stage": "active"}),
        ParamPut("r1", "p", "first"),
        ParamPut("r1", "p", "second"),  # params never change: the first value stays
        TagPut("r1", "t", "a"),
        TagPut("r1", "t", "b"),
        TagPut("r1", "gone", "x"),
        TagPut("r1", "gone", None),
    ])
    await spool.append([metrics_record("r1", 1)], [RunUpsert("r1", "up-1", True, {"experiment_id": "e1"}),
                                                     ExperimentUpsert("e1", "7", True, "exp", {})])
    await spool.close()
    again = Spool(tmp_path, max_bytes=10**6)
    loaded = await again.open()
    await again.close()
    assert sorted(loaded.runs, key=lambda r: r.run) == [
        RunUpsert("r1", "up-1", True, {"experiment_id": "e1"}),
        RunUpsert("r2", "up-2", False, {"experiment_id": "0"}),
    ]
    assert loaded.experiments == [ExperimentUpsert("e1", "7", True, "exp", {})]
    assert loaded.params == {"r1": {"p": "first"}}
    assert loaded.tags == {"r1": {"t": "b"}}


async def test_dead_letters_are_listed_newest_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10**6)
    await spool.open()
    try:
        await spool.append([metrics_record("r", 3), Record("r", Kind.UPDATE_RUN, {"status": "FINISHED"})])
        first = (await spool.read_run("r", 1))[0]
        assert isinstance(first.payload, list)
        result = await spool.ack({first.seq: 2},
                                 [DeadLetter(first.seq, [first.payload[0]], 1, 400, "INVALID_PARAMETER_VALUE", "bad")])
        assert result.delivered == [RowChange("r", Kind.METRICS, 1, 0)]
        assert result.dead == [RowChange("r", Kind.METRICS, 1, 0)]
        assert result.freed == []
        result = await spool.dead_letter_run("r", None, None, "gave up")
        assert Counter(result.dead) == Counter([RowChange("r", Kind.METRICS, 1, 0),
                                                RowChange("r", Kind.UPDATE_RUN, 1, 0)])
        listed = await spool.dead_letters()
        assert [(d["kind"], d["records"], d["status"], d["error_code"], d["message"], d["run_id"])
                for d in listed] == [
            ("run_op", 1, None, None, "gave up", "r"),
            ("metric", 1, None, None, "gave up", "r"),
            ("metric", 1, 400, "INVALID_PARAMETER_VALUE", "bad", "r"),
        ]
        assert [d["id"] for d in listed] == sorted((d["id"] for d in listed), reverse=True)
        assert len(await spool.dead_letters(limit=1)) == 1
        # a refused item is kept as sent
        bodies = read_db(spool.path, "SELECT body FROM dead_letters ORDER BY id")
        assert orjson.loads(bodies[0][0]) == [first.payload[0]]
        assert await spool.read_run("r", 10) == []
        assert spool.charged_bytes == 0
    finally:
        await spool.close()


async def test_dead_letter_run_keeps_only_the_undelivered_items(tmp_path: Path) -> None:
    # A dead letter says how many records it holds; its body must hold those and no more (the first
    # three points below are upstream already: whoever replays the body must not send them twice).
    spool = Spool(tmp_path, max_bytes=10**6)
    await spool.open()
    try:
        rec = metrics_record("r", 5)
        assert isinstance(rec.payload, list)
        await spool.append([rec])
        (row,) = await spool.read_run("r", 10)
        await spool.ack({row.seq: 3})
        result = await spool.dead_letter_run("r", 404, "RESOURCE_DOES_NOT_EXIST", "run gone")
        assert result.dead == [RowChange("r", Kind.METRICS, 2, 0)]
        ((n, body),) = read_db(spool.path, "SELECT n, body FROM dead_letters")
        assert n == 2
        assert orjson.loads(body) == rec.payload[3:]
    finally:
        await spool.close()


async def test_maintenance_hands_freed_pages_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10**9)
    await spool.open()
    try:
        keep = Record("keep", Kind.PARAMS, [["p", "v"]])
        await spool.append([keep])
        await asyncio.gather(*(spool.append([Record("big", Kind.TAGS, [["t", "x" * 4000]])]) for _ in range(600)))
        assert (await spool.maintenance())["freelist_pages"] == 0
        full = (tmp_path / "spool.db").stat().st_size
        assert full > 600 * 4000
        rows = await spool.read_run("big", 1000)
        assert len(rows) == 600
        await spool.ack({row.seq: row.n for row in rows})
        assert (await spool.maintenance())["freelist_pages"] > 256
        # The pages of the delivered rows went back to the file system, not just to SQLite's freelist.
        assert (tmp_path / "spool.db").stat().st_size < full // 4
        assert (await spool.maintenance())["freelist_pages"] == 0
        assert [row.payload for row in await spool.read_run("keep", 10)] == [keep.payload]
        assert spool.charged_bytes == row_size(keep)
    finally:
        await spool.close()


# --- delivered metrics kept as a run's local history ---------------------------------------------


@pytest.mark.parametrize("policy", ["drop_oldest", "reject"])
async def test_kept_history_reads_whole_until_room_is_needed(tmp_path: Path, policy: str) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=3000, overflow_policy=policy)
    await spool.open()
    try:
        first = metrics_record("run-a", 10)
        await spool.append([first])
        (row,) = await spool.read_run("run-a", 10)
        await spool.ack({row.seq: 4})  # partly delivered: still waiting, and part of the history
        assert await spool.metric_history("run-a", None) == (first.payload, True)
        await spool.ack({row.seq: 10}, keep=True)
        assert await spool.read_run("run-a", 10) == []  # nothing waits
        assert await spool.metric_history("run-a", None) == (first.payload, True)  # all kept
        kept = spool.history_bytes
        assert kept == row.size and spool.charged_bytes == 0
        second = metrics_record("run-a", 5, pad="x")
        await spool.append([second])
        points, whole = await spool.metric_history("run-a", None)
        assert (points, whole) == ([*first.payload, *second.payload], True)
        # Room is needed: the kept rows go first (nothing is dropped, under either policy), and the run's
        # history is no longer whole here.
        big = next(r for r in (metrics_record("run-b", n) for n in range(1, 200))
                   if row_size(r) + spool.charged_bytes + kept > 3000)
        assert row_size(big) + spool.charged_bytes <= 3000  # it fits next to what waits, not next to the kept
        result = await spool.append([big])
        assert result.evicted == []
        assert spool.history_bytes == 0
        assert await spool.metric_history("run-a", None) == (second.payload, False)
        assert (await spool.metric_history("run-b", None))[1] is True
    finally:
        await spool.close()


async def test_history_is_forgotten_when_the_run_ends_and_survives_a_restart(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=1 << 20)
    await spool.open()
    record = metrics_record("run-a", 3)
    await spool.append([record])
    (row,) = await spool.read_run("run-a", 10)
    await spool.ack({row.seq: 3}, keep=True)
    await spool.close()
    spool = Spool(directory, max_bytes=1 << 20)
    await spool.open()
    try:
        assert spool.history_bytes == row.size
        assert await spool.metric_history("run-a", "k0") == ([p for p in record.payload if p[0] == "k0"], True)
        await spool.forget_history("run-a")
        assert spool.history_bytes == 0
        assert await spool.metric_history("run-a", None) == ([], False)
        # A run that never ends (its process gone): its history goes once nothing was delivered for a while.
        other = metrics_record("run-b", 2)
        await spool.append([other])
        (row,) = await spool.read_run("run-b", 10)
        await spool.ack({row.seq: 2}, keep=True)
        assert await spool.expire_history(3600) == []
        assert await spool.expire_history(-1) == ["run-b"]
        assert await spool.metric_history("run-b", None) == ([], False) and spool.history_bytes == 0
    finally:
        await spool.close()
