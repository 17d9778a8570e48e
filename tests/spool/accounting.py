"""Reading the loss-accounting counters of an ``AgentMetrics`` registry, for the spool and ledger tests."""

from __future__ import annotations

from collections import defaultdict

from agent.ops.metrics import AgentMetrics

RECEIVED = "mlflow_agent_records_received"
UPLOADED = "mlflow_agent_records_uploaded"
DEAD_LETTERED = "mlflow_agent_records_dead_lettered"
DROPPED = "mlflow_agent_records_dropped"
BUFFERED = "mlflow_agent_buffered_records"
BUFFERED_BYTES = "mlflow_agent_buffered_bytes"

Snapshot = dict[str, dict[str, float]]


def snapshot(metrics: AgentMetrics) -> Snapshot:
    """family -> kind label -> value, summed over every other label (counters: their ``_total``
    samples); zeros left out. One pass over the registry."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for fam in metrics.registry.collect():
        for sample in fam.samples:
            if sample.name in (fam.name, f"{fam.name}_total"):
                out[fam.name][sample.labels.get("kind", "")] += sample.value
    return {name: {k: v for k, v in values.items() if v != 0} for name, values in out.items()}


def by_kind(metrics: AgentMetrics | Snapshot, family: str) -> dict[str, float]:
    snap = snapshot(metrics) if isinstance(metrics, AgentMetrics) else metrics
    return snap.get(family, {})


def total(metrics: AgentMetrics | Snapshot, family: str) -> float:
    return sum(by_kind(metrics, family).values())


def assert_conserved(metrics: AgentMetrics | Snapshot) -> None:
    """received = uploaded + buffered + dead_lettered + dropped, summed over labels and per kind."""
    snap = snapshot(metrics) if isinstance(metrics, AgentMetrics) else metrics
    received = by_kind(snap, RECEIVED)
    parts = [by_kind(snap, f) for f in (UPLOADED, BUFFERED, DEAD_LETTERED, DROPPED)]
    assert total(snap, RECEIVED) == sum(sum(p.values()) for p in parts), (received, parts)
    for kind in set(received).union(*parts):
        accounted = sum(p.get(kind, 0.0) for p in parts)
        assert received.get(kind, 0.0) == accounted, (kind, received, parts)
