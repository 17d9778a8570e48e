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


def by_kind(metrics: AgentMetrics, family: str) -> dict[str, float]:
    """A counter (``*_total`` samples) or gauge summed over every label but ``kind``; zeros left out."""
    out: dict[str, float] = defaultdict(float)
    for fam in metrics.registry.collect():
        if fam.name != family:
            continue
        for sample in fam.samples:
            if sample.name in (family, f"{family}_total"):
                out[sample.labels.get("kind", "")] += sample.value
    return {k: v for k, v in out.items() if v != 0}


def total(metrics: AgentMetrics, family: str) -> float:
    return sum(by_kind(metrics, family).values())


def assert_conserved(metrics: AgentMetrics) -> None:
    """received = uploaded + buffered + dead_lettered + dropped, summed over labels and per kind."""
    received = by_kind(metrics, RECEIVED)
    parts = [by_kind(metrics, f) for f in (UPLOADED, BUFFERED, DEAD_LETTERED, DROPPED)]
    for kind in set(received).union(*parts):
        accounted = sum(p.get(kind, 0.0) for p in parts)
        assert received.get(kind, 0.0) == accounted, (kind, received, parts)
    assert total(metrics, RECEIVED) == sum(sum(p.values()) for p in parts)
