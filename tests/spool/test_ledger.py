"""The ledger: the event-loop mirror of what the spool buffers, and the counters it feeds."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ops.metrics import AgentMetrics
from agent.records import Kind
from agent.spool.ledger import Ledger
from agent.spool.store import AckResult, AppendResult, PendingSummary, RowChange
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


def sample(metrics: AgentMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_appended_records_are_counted_and_announced() -> None:
    metrics = AgentMetrics()
    woken: list[str] = []
    ledger = Ledger(metrics, on_new_records=woken.append)
    ledger.appended(AppendResult(added=[
        RowChange("a", Kind.METRICS, 3, 100),
        RowChange("a", Kind.PARAMS, 2, 60),
        RowChange("b", Kind.TAGS, 1, 50),
        RowChange("b", Kind.DELETE_TAG, 1, 50),
        RowChange("a", Kind.CREATE_RUN, 1, 70),
    ], evicted=[]))
    assert sorted(woken) == ["a", "b"]  # each run once
    assert sorted(ledger.runs()) == ["a", "b"]
    assert ledger.run_items("a") == 6
    assert ledger.run_items("b") == 2
    assert ledger.run_items("nobody") == 0
    assert ledger.run_breakdown("a") == {"metric": 3, "param": 2, "run_op": 1}
    assert ledger.run_breakdown("b") == {"tag": 2}  # a delete-tag counts as a tag
    assert ledger.run_breakdown("nobody") == {}
    assert ledger.total_items() == 8
    assert ledger.by_kind() == {"metric": 3, "param": 2, "tag": 2, "run_op": 1}
    assert ledger.bytes == 330
    assert sample(metrics, "mlflow_agent_records_received_total", kind="metric", source="http") == 3
    assert sample(metrics, "mlflow_agent_records_received_total", kind="tag", source="http") == 2
    assert sample(metrics, "mlflow_agent_buffered_records", kind="tag") == 2
    assert sample(metrics, "mlflow_agent_buffered_records", kind="run_op") == 1
    assert sample(metrics, "mlflow_agent_buffered_bytes") == 330
    assert_conserved(metrics)


def test_evicted_rows_are_dropped_for_spool_full() -> None:
    metrics = AgentMetrics()
    ledger = Ledger(metrics)
    ledger.appended(AppendResult(added=[RowChange("a", Kind.METRICS, 5, 200)], evicted=[]))
    ledger.appended(AppendResult(added=[RowChange("b", Kind.METRICS, 1, 80, "udp")],
                                 evicted=[RowChange("a", Kind.METRICS, 5, 200)]))
    assert ledger.runs() == ["b"]
    assert ledger.bytes == 80
    assert sample(metrics, "mlflow_agent_records_dropped_total", kind="metric", source="http",
                  reason="spool_full") == 5
    assert sample(metrics, "mlflow_agent_records_received_total", kind="metric", source="udp") == 1
    assert sample(metrics, "mlflow_agent_buffered_records", kind="metric") == 1
    assert sample(metrics, "mlflow_agent_buffered_bytes") == 80
    assert_conserved(metrics)


def test_acked_records_leave_the_buffer() -> None:
    metrics = AgentMetrics()
    ledger = Ledger(metrics)
    ledger.appended(AppendResult(added=[RowChange("a", Kind.METRICS, 4, 100),
                                        RowChange("a", Kind.UPDATE_RUN, 1, 60)], evicted=[]))
    ledger.acked(AckResult(delivered=[RowChange("a", Kind.METRICS, 2, 0)], dead=[RowChange("a", Kind.METRICS, 1, 0)],
                           freed=[]))
    assert ledger.run_items("a") == 2
    assert ledger.bytes == 160  # bytes leave only with freed rows
    ledger.acked(AckResult(delivered=[RowChange("a", Kind.METRICS, 1, 0)], dead=[RowChange("a", Kind.UPDATE_RUN, 1, 0)],
                           freed=[RowChange("a", Kind.METRICS, 0, 100), RowChange("a", Kind.UPDATE_RUN, 0, 60)]))
    assert ledger.runs() == []
    assert ledger.total_items() == 0
    assert ledger.bytes == 0
    assert sample(metrics, "mlflow_agent_records_uploaded_total", kind="metric", source="http") == 3
    assert sample(metrics, "mlflow_agent_records_dead_lettered_total", kind="metric", source="http") == 1
    assert sample(metrics, "mlflow_agent_records_dead_lettered_total", kind="run_op", source="http") == 1
    assert sample(metrics, "mlflow_agent_buffered_records", kind="metric") == 0
    assert sample(metrics, "mlflow_agent_buffered_bytes") == 0
    assert_conserved(metrics)


def test_loaded_records_count_as_received_from_the_spool() -> None:
    metrics = AgentMetrics()
    ledger = Ledger(metrics)
    woken: list[str] = []
    ledger.subscribe(woken.append)
    ledger.loaded([PendingSummary("a", Kind.METRICS, 2, 7, 300), PendingSummary("a", Kind.TAGS, 1, 1, 50),
                   PendingSummary("b", Kind.CREATE_RUN, 1, 1, 90)])
    assert sorted(woken) == ["a", "b"]
    assert ledger.total_items() == 9
    assert ledger.bytes == 440
    assert by_kind(metrics, RECEIVED) == {"metric": 7, "tag": 1, "run_op": 1}
    assert sample(metrics, "mlflow_agent_records_received_total", kind="metric", source="spool") == 7
    assert sample(metrics, "mlflow_agent_records_received_total", kind="metric", source="http") == 0
    assert_conserved(metrics)


def test_empty_loaded_announces_nothing() -> None:
    woken: list[str] = []
    ledger = Ledger(AgentMetrics(), on_new_records=woken.append)
    ledger.loaded([])
    assert woken == []
    assert ledger.runs() == []


# --- any consistent sequence of changes keeps the books -------------------------------------------

RUNS = ("a", "b", "c")


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_sequence_of_changes_keeps_the_identity(data: st.DataObject) -> None:
    metrics = AgentMetrics()
    ledger = Ledger(metrics)
    held: Counter[tuple[str, Kind]] = Counter()  # items buffered, per run and kind
    size: Counter[tuple[str, Kind]] = Counter()  # bytes buffered, per run and kind
    loaded = data.draw(st.lists(st.tuples(st.sampled_from(RUNS), st.sampled_from(list(Kind)),
                                          st.integers(1, 20), st.integers(1, 500)),
                                unique_by=lambda t: (t[0], t[1]), max_size=4), label="loaded")
    ledger.loaded([PendingSummary(run, kind, 1, items, b) for run, kind, items, b in loaded])
    for run, kind, items, b in loaded:
        held[run, kind] += items
        size[run, kind] += b
    for _ in range(data.draw(st.integers(1, 25), label="steps")):
        step = data.draw(st.sampled_from(["append", "ack"]), label="step")
        keys = sorted(k for k, v in held.items() if v > 0)
        if step == "append" or not keys:
            added = data.draw(st.lists(st.tuples(st.sampled_from(RUNS), st.sampled_from(list(Kind)),
                                                 st.integers(1, 20), st.integers(1, 500)), min_size=1, max_size=3))
            metric_keys = [k for k in keys if k[1] is Kind.METRICS]
            evicted = data.draw(st.lists(st.sampled_from(metric_keys), unique=True) if metric_keys else st.just([]))
            result = AppendResult(
                added=[RowChange(r, k, n, b) for r, k, n, b in added],
                evicted=[RowChange(r, k, held[r, k], size[r, k]) for r, k in evicted],
            )
            for r, k in evicted:
                held[r, k] = 0
                size[r, k] = 0
            for r, k, n, b in added:
                held[r, k] += n
                size[r, k] += b
            ledger.appended(result)
        else:
            key = data.draw(st.sampled_from(keys))
            delivered = data.draw(st.integers(0, held[key]))
            dead = data.draw(st.integers(0, held[key] - delivered))
            freed = size[key] if delivered + dead == held[key] else 0
            ledger.acked(AckResult(
                delivered=[RowChange(*key, delivered, 0)] if delivered else [],
                dead=[RowChange(*key, dead, 0)] if dead else [],
                freed=[RowChange(*key, 0, freed)] if freed else [],
            ))
            held[key] -= delivered + dead
            size[key] -= freed
        snap = snapshot(metrics)
        assert_conserved(snap)
        assert ledger.total_items() == sum(held.values())
        assert ledger.bytes == sum(size.values()) == total(snap, BUFFERED_BYTES)
        assert sorted(ledger.runs()) == sorted({r for (r, _), v in held.items() if v > 0})
        for run in RUNS:
            assert ledger.run_items(run) == sum(v for (r, _), v in held.items() if r == run)
        want: Counter[str] = Counter()
        for (_, k), v in held.items():
            want[k.label] += v
        assert by_kind(snap, BUFFERED) == {k: float(v) for k, v in want.items() if v}
        assert total(snap, RECEIVED) == (total(snap, UPLOADED) + total(snap, DEAD_LETTERED)
                                         + total(snap, DROPPED) + sum(held.values()))
