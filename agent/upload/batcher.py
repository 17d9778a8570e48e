"""Turns a run's spooled rows, in arrival order, into the next upstream operation. Pure logic.

Params, tags and metrics from consecutive rows are merged into one ``log-batch`` up to MLflow's
limits (and the upstream profile's, e.g. Azure's 250 values per metric key). A run-lifecycle row
(create, update, delete-tag) is a barrier: it goes alone, and only after everything before it.
Every item keeps its provenance (row, index) so a batch can be split, acknowledged partially or
dead-lettered item by item.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from agent.records import Kind
from agent.spool.store import Row

# JSON field names and punctuation around one item in a log-batch body.
_ITEM_OVERHEAD = 48


@dataclass(frozen=True, slots=True)
class Limits:
    max_metrics: int = 1000
    max_params: int = 100
    max_tags: int = 100
    max_items: int = 1000
    # MLflow documents 1 MB per request; stay under it with room for the envelope.
    max_bytes: int = 900_000
    max_values_per_metric_key: int | None = None  # Azure ML: 250
    max_params_per_run: int | None = None  # Azure ML: 200; the rest is dead-lettered


MLFLOW_LIMITS = Limits()
# Azure ML's MLflow endpoint refuses more than 250 values of one metric key in one log-batch and more
# than 200 params per run (research/azureml.md §3.2).
AZUREML_LIMITS = Limits(max_values_per_metric_key=250, max_params_per_run=200)


@dataclass(frozen=True, slots=True)
class Piece:
    """One item of a log-batch and where it came from."""

    seq: int
    kind: Kind
    index: int  # position in the row's payload
    item: list[Any]
    send: bool = True  # False for a param repeated with the same value: consumed, not sent


@dataclass(slots=True)
class LogBatch:
    pieces: list[Piece] = field(default_factory=list)

    def body(self, run_id: str) -> dict[str, Any]:
        metrics, params, tags = [], [], []
        for p in self.pieces:
            if not p.send:
                continue
            if p.kind is Kind.METRICS:
                m: dict[str, Any] = {"key": p.item[0], "value": p.item[1], "timestamp": p.item[2], "step": p.item[3]}
                if len(p.item) > 4 and isinstance(p.item[4], dict):
                    m.update(p.item[4])
                metrics.append(m)
            elif p.kind is Kind.PARAMS:
                params.append({"key": p.item[0], "value": p.item[1]})
            else:
                tags.append({"key": p.item[0], "value": p.item[1]})
        body: dict[str, Any] = {"run_id": run_id}
        if metrics:
            body["metrics"] = metrics
        if params:
            body["params"] = params
        if tags:
            body["tags"] = tags
        return body

    @property
    def sent_count(self) -> int:
        return sum(1 for p in self.pieces if p.send)

    def split(self) -> tuple[LogBatch, LogBatch]:
        """Two halves, for isolating the items an upstream refuses. Keeps order within each kind."""
        kinds = {p.kind for p in self.pieces if p.send}
        if len(kinds) > 1:
            # Split by kind first: MLflow applies params, metrics and tags separately anyway.
            first = next(k for k in (Kind.PARAMS, Kind.METRICS, Kind.TAGS) if k in kinds)
            return (LogBatch([p for p in self.pieces if p.kind is first]),
                    LogBatch([p for p in self.pieces if p.kind is not first]))
        mid = len(self.pieces) // 2
        return LogBatch(self.pieces[:mid]), LogBatch(self.pieces[mid:])

    def progress(self) -> dict[int, int]:
        """Row seq -> items of that row consumed once this batch is delivered."""
        out: dict[int, int] = {}
        for p in self.pieces:
            out[p.seq] = max(out.get(p.seq, 0), p.index + 1)
        return out


@dataclass(frozen=True, slots=True)
class Barrier:
    """A run-lifecycle row: create, update or delete-tag."""

    row: Row


Operation = LogBatch | Barrier


def next_operation(rows: list[Row], limits: Limits = MLFLOW_LIMITS) -> Operation | None:
    """The next call to make for a run whose pending rows are ``rows`` (in seq order)."""
    if not rows:
        return None
    if not rows[0].kind.batchable:
        return Barrier(rows[0])
    batch = LogBatch()
    counts = {Kind.METRICS: 0, Kind.PARAMS: 0, Kind.TAGS: 0}
    caps = {Kind.METRICS: limits.max_metrics, Kind.PARAMS: limits.max_params, Kind.TAGS: limits.max_tags}
    total = 0
    size = 0
    params_seen: set[str] = set()
    per_key: dict[str, int] = {}
    for row in rows:
        if not row.kind.batchable:
            break
        payload = row.payload
        assert isinstance(payload, list)
        for index in range(row.done, row.n):
            item = payload[index]
            kind = row.kind
            if kind is Kind.PARAMS and item[0] in params_seen:
                # Same key twice in one batch is refused by MLflow even with equal values; the
                # agent refused differing values at ingest, so this repeat carries nothing new.
                batch.pieces.append(Piece(row.seq, kind, index, item, send=False))
                continue
            if counts[kind] >= caps[kind] or total >= limits.max_items:
                return batch
            per_key_cap = limits.max_values_per_metric_key
            if kind is Kind.METRICS and per_key_cap is not None and per_key.get(item[0], 0) >= per_key_cap:
                return batch
            item_size = len(orjson.dumps(item)) + _ITEM_OVERHEAD
            if batch.pieces and size + item_size > limits.max_bytes:
                return batch
            batch.pieces.append(Piece(row.seq, kind, index, item))
            counts[kind] += 1
            total += 1
            size += item_size
            if kind is Kind.PARAMS:
                params_seen.add(item[0])
            elif kind is Kind.METRICS:
                per_key[item[0]] = per_key.get(item[0], 0) + 1
    return batch
