"""The batcher: a run's pending rows -> the next upstream operation, within MLflow's limits."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.records import Kind
from agent.spool.store import Row
from agent.upload.batcher import (
    _ITEM_OVERHEAD,
    MLFLOW_LIMITS,
    Barrier,
    Limits,
    LogBatch,
    Operation,
    Piece,
    next_operation,
)

KEYS = ("a", "b", "c", "d")

# --- strategies ----------------------------------------------------------------------------------

texts = st.text(alphabet="xyz é", max_size=30)
metric_items = st.one_of(
    st.tuples(st.sampled_from(KEYS), st.floats(allow_nan=False, allow_infinity=False) | st.just("NaN"),
              st.integers(0, 2**41), st.integers(0, 10**6)).map(list),
    st.tuples(st.sampled_from(KEYS), st.floats(-1, 1), st.integers(0, 99), st.integers(0, 99),
              st.fixed_dictionaries({"model_id": st.sampled_from(["m-1", "m-2"])})).map(list),
)
kv_items = st.tuples(st.sampled_from(KEYS), texts).map(list)


@st.composite
def row_specs(draw: st.DrawFn, max_items: int = 12) -> tuple[Kind, list[Any] | dict[str, Any], int]:
    """(kind, payload, done) of one pending row."""
    kind = draw(st.sampled_from([Kind.METRICS, Kind.METRICS, Kind.PARAMS, Kind.TAGS, Kind.PARAMS,
                                 Kind.CREATE_RUN, Kind.UPDATE_RUN, Kind.DELETE_TAG]))
    if kind is Kind.METRICS:
        payload: list[Any] | dict[str, Any] = draw(st.lists(metric_items, min_size=1, max_size=max_items))
    elif kind.batchable:
        payload = draw(st.lists(kv_items, min_size=1, max_size=max_items))
    else:
        return kind, {"status": "FINISHED"}, 0
    done = draw(st.integers(0, len(payload) - 1))
    return kind, payload, done


def make_rows(specs: list[tuple[Kind, list[Any] | dict[str, Any], int]], first_seq: int = 1) -> list[Row]:
    rows = []
    for i, (kind, payload, done) in enumerate(specs):
        n = len(payload) if isinstance(payload, list) else 1
        rows.append(Row(first_seq + 3 * i, "run", kind, n, done, len(orjson.dumps(payload)) + 48, payload))
    return rows


row_lists = st.lists(row_specs(), max_size=8).map(make_rows)
limits = st.builds(
    Limits,
    max_metrics=st.integers(1, 10), max_params=st.integers(1, 5), max_tags=st.integers(1, 5),
    max_items=st.integers(1, 14), max_bytes=st.integers(30, 700),
    max_values_per_metric_key=st.none() | st.integers(1, 4),
)


def flatten(rows: list[Row]) -> list[tuple[int, Kind, int, Any]]:
    """(seq, kind, index, item) of every pending item before the first barrier, in order."""
    out: list[tuple[int, Kind, int, Any]] = []
    for row in rows:
        if not row.kind.batchable:
            break
        assert isinstance(row.payload, list)
        out.extend((row.seq, row.kind, i, row.payload[i]) for i in range(row.done, row.n))
    return out


def cost(item: Any) -> int:
    return len(orjson.dumps(item)) + _ITEM_OVERHEAD


def check_batch(rows: list[Row], op: Operation | None, lim: Limits) -> None:
    """Every property one operation must have."""
    if not rows:
        assert op is None
        return
    if not rows[0].kind.batchable:
        assert op == Barrier(rows[0])
        return
    assert isinstance(op, LogBatch)
    pieces = op.pieces
    # A prefix of the pending items in arrival order: order kept, nothing skipped, no barrier crossed.
    expected = flatten(rows)
    assert [(p.seq, p.kind, p.index, p.item) for p in pieces] == expected[:len(pieces)]
    assert pieces, "pending rows must give a non-empty batch"
    sent = [p for p in pieces if p.send]
    kinds = Counter(p.kind for p in sent)
    assert kinds[Kind.METRICS] <= lim.max_metrics
    assert kinds[Kind.PARAMS] <= lim.max_params
    assert kinds[Kind.TAGS] <= lim.max_tags
    assert len(sent) <= lim.max_items
    if len(sent) > 1:
        assert sum(cost(p.item) for p in sent) <= lim.max_bytes
    # Duplicate param keys are consumed, not sent; nothing else is held back.
    sent_params = [p.item[0] for p in sent if p.kind is Kind.PARAMS]
    assert len(sent_params) == len(set(sent_params))
    seen: set[str] = set()
    for p in pieces:
        if not p.send:
            assert p.kind is Kind.PARAMS and p.item[0] in seen
        elif p.kind is Kind.PARAMS:
            seen.add(p.item[0])
    if lim.max_values_per_metric_key is not None:
        per_key = Counter(p.item[0] for p in sent if p.kind is Kind.METRICS)
        assert all(v <= lim.max_values_per_metric_key for v in per_key.values())
    # The batch stops only for a reason: the next item is a barrier, or would break a limit.
    if len(pieces) < len(expected):
        _, kind, _, item = expected[len(pieces)]
        assert not (kind is Kind.PARAMS and item[0] in seen)
        caps = {Kind.METRICS: lim.max_metrics, Kind.PARAMS: lim.max_params, Kind.TAGS: lim.max_tags}
        per_key_full = (kind is Kind.METRICS and lim.max_values_per_metric_key is not None
                        and sum(1 for p in sent if p.kind is Kind.METRICS and p.item[0] == item[0])
                        >= lim.max_values_per_metric_key)
        assert (kinds[kind] >= caps[kind] or len(sent) >= lim.max_items or per_key_full
                or sum(cost(p.item) for p in sent) + cost(item) > lim.max_bytes)
    # What the upstream gets: the sent items, under the byte limit plus the envelope.
    body = op.body("r" * 32)
    assert [m["key"] for m in body.get("metrics", [])] == [p.item[0] for p in sent if p.kind is Kind.METRICS]
    assert [[q["key"], q["value"]] for q in body.get("params", [])] == [p.item for p in sent if p.kind is Kind.PARAMS]
    assert [[q["key"], q["value"]] for q in body.get("tags", [])] == [p.item for p in sent if p.kind is Kind.TAGS]
    if len(sent) > 1:
        envelope = len(orjson.dumps({"run_id": "r" * 32, "metrics": [], "params": [], "tags": []}))
        assert len(orjson.dumps(body)) <= lim.max_bytes + envelope


@settings(max_examples=400, deadline=None)
@given(rows=row_lists, lim=limits)
def test_one_operation_respects_every_limit(rows: list[Row], lim: Limits) -> None:
    check_batch(rows, next_operation(rows, lim), lim)


def consume(rows: list[Row], op: Operation) -> list[Row]:
    """What the spool holds after the operation is acknowledged."""
    progress = {op.row.seq: 1} if isinstance(op, Barrier) else op.progress()
    out = []
    for row in rows:
        done = max(row.done, progress.get(row.seq, 0))
        if done < row.n:
            out.append(Row(row.seq, row.run, row.kind, row.n, done, row.size, row.payload))
    return out


@settings(max_examples=300, deadline=None)
@given(rows=row_lists, lim=limits)
def test_repeated_operations_consume_every_item_once_in_order(rows: list[Row], lim: Limits) -> None:
    everything = [(row.seq, i) for row in rows for i in range(row.done, row.n)]
    consumed: list[tuple[int, int]] = []
    for _ in range(len(everything) + 1):
        op = next_operation(rows, lim)
        if op is None:
            break
        check_batch(rows, op, lim)
        if isinstance(op, Barrier):
            consumed.append((op.row.seq, 0))
        else:
            consumed.extend((p.seq, p.index) for p in op.pieces)
        rows = consume(rows, op)
    assert rows == []
    assert consumed == everything


@settings(max_examples=300, deadline=None)
@given(rows=row_lists, lim=limits)
def test_split_partitions_the_pieces(rows: list[Row], lim: Limits) -> None:
    op = next_operation(rows, lim)
    if not isinstance(op, LogBatch):
        return
    batches = [op]
    while batches:
        batch = batches.pop()
        if batch.sent_count <= 1:
            continue
        first, second = batch.split()
        ids = [(p.seq, p.index) for p in batch.pieces]
        a = [(p.seq, p.index) for p in first.pieces]
        b = [(p.seq, p.index) for p in second.pieces]
        assert sorted(a + b) == sorted(ids) and not set(a) & set(b)
        # each half keeps the batch's order, and both are smaller: bisection terminates
        assert a == [i for i in ids if i in set(a)] and b == [i for i in ids if i in set(b)]
        assert 0 < len(a) < len(ids) and 0 < len(b) < len(ids)
        sent_kinds = {p.kind for p in batch.pieces if p.send}
        if len(sent_kinds) > 1:
            assert len({p.kind for p in first.pieces}) == 1, "a mixed batch splits by kind first"
        batches.extend([first, second])


# --- examples ------------------------------------------------------------------------------------


def metric_row(seq: int, n: int, key: str = "m", done: int = 0) -> Row:
    payload = [[key, float(i), i, i] for i in range(n)]
    return Row(seq, "run", Kind.METRICS, n, done, 0, payload)


def test_mlflow_limits_are_the_documented_ones() -> None:
    assert (MLFLOW_LIMITS.max_metrics, MLFLOW_LIMITS.max_params, MLFLOW_LIMITS.max_tags,
            MLFLOW_LIMITS.max_items) == (1000, 100, 100, 1000)
    assert MLFLOW_LIMITS.max_bytes < 1_000_000
    assert MLFLOW_LIMITS.max_values_per_metric_key is None


def test_large_backlog_is_cut_at_mlflow_limits() -> None:
    rows = [metric_row(1, 1500),
            Row(2, "run", Kind.PARAMS, 150, 0, 0, [[f"p{i}", "v"] for i in range(150)])]
    op = next_operation(rows)
    assert isinstance(op, LogBatch)
    assert op.sent_count == 1000 and all(p.kind is Kind.METRICS for p in op.pieces)
    rows = consume(rows, op)
    op = next_operation(rows)
    assert isinstance(op, LogBatch)
    # 500 metrics and 100 params: the params cap stops the batch at 600 items
    assert Counter(p.kind for p in op.pieces) == {Kind.METRICS: 500, Kind.PARAMS: 100}
    assert op.progress() == {1: 1500, 2: 100}


def test_items_per_metric_key_are_capped() -> None:
    rows = [metric_row(1, 300, key="loss"), metric_row(2, 10, key="acc")]
    op = next_operation(rows, Limits(max_values_per_metric_key=250))
    assert isinstance(op, LogBatch)
    assert len(op.pieces) == 250 and op.progress() == {1: 250}


def test_an_item_bigger_than_max_bytes_goes_alone() -> None:
    big = Row(1, "run", Kind.TAGS, 2, 0, 0, [["t", "x" * 500], ["u", "y"]])
    op = next_operation([big], Limits(max_bytes=100))
    assert isinstance(op, LogBatch)
    assert [p.index for p in op.pieces] == [0]
    op = next_operation(consume([big], op), Limits(max_bytes=100))
    assert isinstance(op, LogBatch) and [p.index for p in op.pieces] == [1]


def test_barrier_goes_alone_and_stops_a_batch() -> None:
    create = Row(1, "run", Kind.CREATE_RUN, 1, 0, 0, {"experiment_id": "0"})
    update = Row(3, "run", Kind.UPDATE_RUN, 1, 0, 0, {"status": "FINISHED"})
    rows = [create, metric_row(2, 2), update, metric_row(4, 1)]
    assert next_operation(rows) == Barrier(create)
    op = next_operation(rows[1:])
    assert isinstance(op, LogBatch) and op.progress() == {2: 2}
    assert next_operation(rows[2:]) == Barrier(update)
    assert next_operation([]) is None


def test_duplicate_param_is_consumed_not_sent() -> None:
    rows = [Row(1, "run", Kind.PARAMS, 2, 0, 0, [["lr", "0.1"], ["bs", "8"]]),
            Row(2, "run", Kind.PARAMS, 1, 0, 0, [["lr", "0.1"]])]
    op = next_operation(rows)
    assert isinstance(op, LogBatch)
    assert [(p.seq, p.index, p.send) for p in op.pieces] == [(1, 0, True), (1, 1, True), (2, 0, False)]
    assert op.sent_count == 2
    assert op.body("R") == {"run_id": "R", "params": [{"key": "lr", "value": "0.1"}, {"key": "bs", "value": "8"}]}
    assert op.progress() == {1: 2, 2: 1}


def test_body_shapes_metrics_with_extras() -> None:
    batch = LogBatch([
        Piece(1, Kind.METRICS, 0, ["loss", "NaN", 5, 2, {"model_id": "m-1"}]),
        Piece(1, Kind.METRICS, 1, ["loss", 0.5, 6, 3]),
        Piece(2, Kind.TAGS, 0, ["t", "v"]),
    ])
    assert batch.body("up") == {
        "run_id": "up",
        "metrics": [{"key": "loss", "value": "NaN", "timestamp": 5, "step": 2, "model_id": "m-1"},
                    {"key": "loss", "value": 0.5, "timestamp": 6, "step": 3}],
        "tags": [{"key": "t", "value": "v"}],
    }
    assert LogBatch().body("up") == {"run_id": "up"}


def test_progress_counts_items_through_the_last_piece_of_each_row() -> None:
    batch = LogBatch([Piece(7, Kind.METRICS, 3, ["m", 1.0, 1, 1]), Piece(7, Kind.METRICS, 4, ["m", 1.0, 1, 1]),
                      Piece(9, Kind.TAGS, 0, ["t", "v"])])
    assert batch.progress() == {7: 5, 9: 1}
    assert LogBatch().progress() == {}


def test_split_of_a_mixed_batch_takes_params_first() -> None:
    batch = LogBatch([Piece(1, Kind.METRICS, 0, ["m", 1.0, 1, 1]), Piece(2, Kind.PARAMS, 0, ["p", "v"]),
                      Piece(3, Kind.TAGS, 0, ["t", "v"])])
    first, second = batch.split()
    assert [p.kind for p in first.pieces] == [Kind.PARAMS]
    assert [p.kind for p in second.pieces] == [Kind.METRICS, Kind.TAGS]
