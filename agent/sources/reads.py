"""Read-your-writes: the upstream's answer merged with what this agent holds but has not uploaded yet.

Pure functions (no I/O): the API handlers fetch both sides and answer with the merge. Metric points are
identified as MLflow's SQL store identifies them, (timestamp, step, value), so a point that is both
upstream and still in the spool (delivered, not yet acknowledged) appears once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from agent.catalog import Catalog, RunEntry
from agent.records import MetricValue

# MLflow's SQL store keeps ±inf as the largest finite doubles: the same point, once uploaded.
_FLOAT_MAX = 1.7976931348623157e308


def _number(value: Any) -> float:
    if value is None:
        return 0.0  # the proto default: what the client reads for a point without a value
    if isinstance(value, str):
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(value, math.nan)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _identity(timestamp: Any, step: Any, value: Any) -> tuple[int, int, str]:
    number = _number(value)
    if math.isinf(number):
        number = math.copysign(_FLOAT_MAX, number)
    return int(timestamp or 0), int(step or 0), repr(number + 0.0)  # repr: NaN equals NaN; + 0.0: -0.0 is 0.0


def _order(point: Mapping[str, Any]) -> tuple[int, int, float]:
    """MLflow's history order: timestamp, step, value (NaN is stored, and sorted, as 0)."""
    number = _number(point.get("value"))
    return int(point.get("timestamp") or 0), int(point.get("step") or 0), 0.0 if math.isnan(number) else number


def merge_history(upstream: Iterable[Mapping[str, Any]], buffered: Iterable[list[Any]]) -> list[dict[str, Any]]:
    """``metrics/get-history`` points: the upstream's, plus spooled ``[key, value, timestamp, step]`` items
    not among them, in MLflow's order."""
    merged: dict[tuple[int, int, str], dict[str, Any]] = {}
    for point in upstream:
        merged.setdefault(_identity(point.get("timestamp"), point.get("step"), point.get("value")), dict(point))
    for item in buffered:
        key, value, timestamp, step = item[:4]
        point = {"key": key, "value": value, "timestamp": timestamp, "step": step}
        if len(item) > 4 and isinstance(item[4], dict):  # model_id, dataset_name, dataset_digest
            point.update(item[4])
        merged.setdefault(_identity(timestamp, step, value), point)
    return sorted(merged.values(), key=_order)


def _latest_key(step: int, timestamp: int, value: MetricValue) -> tuple[int, int, float]:
    number = _number(value)
    return step, timestamp, 0.0 if math.isnan(number) else number


def merge_run_data(data: Mapping[str, Any], entry: RunEntry, deleted_tags: Iterable[str] = ()) -> dict[str, Any]:
    """A ``runs/get`` answer's ``data`` with the run's writes this agent still holds: params and tags
    added (the client's latest tag values win), tags whose deletion waits for upload removed, and each
    metric's latest value picked as MLflow picks it (highest step, then timestamp, then value)."""
    params = {p["key"]: p for p in data.get("params", []) if isinstance(p, dict) and "key" in p}
    for key, value in entry.params.items():
        params.setdefault(key, {"key": key, "value": value})
    tags = {t["key"]: t for t in data.get("tags", []) if isinstance(t, dict) and "key" in t}
    for key in deleted_tags:
        if key not in entry.tags:  # set again after the deletion: the new value stays
            tags.pop(key, None)
    for key, value in entry.tags.items():
        tags[key] = {"key": key, "value": value}
    metrics = {m["key"]: m for m in data.get("metrics", []) if isinstance(m, dict) and "key" in m}
    for name, (step, timestamp, _, metric_value) in entry.metrics.items():
        current = metrics.get(name)
        if current is None or _latest_key(step, timestamp, metric_value) > _latest_key(
                int(current.get("step") or 0), int(current.get("timestamp") or 0), current.get("value", 0.0)):
            metrics[name] = {"key": name, "value": metric_value, "timestamp": timestamp, "step": step}
    out = dict(data)
    for name, merged in (("params", params), ("tags", tags), ("metrics", metrics)):
        if merged:
            out[name] = list(merged.values())
        else:
            out.pop(name, None)  # proto2: an empty repeated field is left out
    return out


def merge_lineage(run: dict[str, Any], entry: RunEntry, catalog: Catalog) -> None:
    """A ``runs/get`` answer's ``inputs`` and ``outputs`` in the client's ids, with what the client logged
    through this agent that the upstream does not show yet (datasets by name and digest, models by id and
    step). In place."""
    inputs = run.get("inputs") if isinstance(run.get("inputs"), dict) else {}
    outputs = run.get("outputs") if isinstance(run.get("outputs"), dict) else {}
    assert isinstance(inputs, dict) and isinstance(outputs, dict)
    for container, name in ((inputs, "model_inputs"), (outputs, "model_outputs")):
        for item in container.get(name) or []:
            if isinstance(item, dict) and isinstance(item.get("model_id"), str):
                item["model_id"] = catalog.client_model_id(item["model_id"])

    def dataset_key(item: Any) -> tuple[Any, Any]:
        dataset = item.get("dataset") if isinstance(item, dict) else None
        return (dataset.get("name"), dataset.get("digest")) if isinstance(dataset, dict) else (None, None)

    def model_key(item: Any) -> tuple[Any, Any]:
        return (item.get("model_id"), int(item.get("step") or 0)) if isinstance(item, dict) else (None, None)

    for container, name, key in ((inputs, "dataset_inputs", dataset_key), (inputs, "model_inputs", model_key),
                                 (outputs, "model_outputs", model_key)):
        local = entry.lineage(name)
        if not local:
            continue
        present = list(container.get(name) or [])
        seen = {key(item) for item in present}
        present.extend(item for item in local if key(item) not in seen)
        container[name] = present
    run["inputs"], run["outputs"] = inputs, outputs


def search_request(raw: bytes) -> tuple[dict[str, Any], list[str]] | None:
    """A search's JSON body and the experiment ids it names, or None for a body the agent does not judge
    (the upstream answers it, malformed ones included, as it would without the agent)."""
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        return None
    ids = body.get("experiment_ids") if isinstance(body, dict) else None
    if not isinstance(body, dict) or not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        return None
    return body, ids
