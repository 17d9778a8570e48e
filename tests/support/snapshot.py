"""Comparable pictures of what an MLflow server holds, read through the public client API.

``snapshot(a.url, names) == snapshot(b.url, names)`` checks that two servers hold the same experiments,
runs (keyed by run name), params, user tags, parent/child links and full metric histories.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.entities import Metric, Run
    from mlflow.tracking import MlflowClient

#: NaN never equals itself; snapshots carry this string instead.
NAN = "NaN"
PARENT_RUN_ID_TAG = "mlflow.parentRunId"
SYSTEM_TAG_PREFIXES = ("mlflow.", "mlflow_agent.")

MetricRow = tuple[str, float | str, int, int]


class DuplicateRunNameError(ValueError):
    """Two runs of one experiment share a name, so runs cannot be keyed by name."""


def _value(value: float) -> float | str:
    return NAN if math.isnan(value) else float(value)


def _row(metric: Metric) -> MetricRow:
    return (metric.key, _value(metric.value), int(metric.step), int(metric.timestamp))


def _row_sort_key(row: MetricRow) -> tuple[int, int, int, float]:
    key_step_ts = (row[2], row[3])
    value = row[1]
    if isinstance(value, str):
        return (*key_step_ts, 1, 0.0)
    return (*key_step_ts, 0, value)


def sorted_rows(rows: Iterable[MetricRow]) -> list[MetricRow]:
    """Rows sorted by (key, step, timestamp, value), NaN after numbers."""
    return sorted(rows, key=lambda r: (r[0], *_row_sort_key(r)))


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _all_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    from mlflow.entities import ViewType

    runs: list[Run] = []
    page_token: str | None = None
    while True:
        page = client.search_runs(
            [experiment_id], run_view_type=ViewType.ALL, max_results=10_000, page_token=page_token
        )
        runs.extend(page)
        page_token = page.token
        if not page_token:
            return runs


def is_user_tag(key: str) -> bool:
    """False for tags the MLflow client or the agent set themselves (``mlflow.*``, ``mlflow_agent.*``)."""
    return not key.startswith(SYSTEM_TAG_PREFIXES)


def _run_snapshot(client: MlflowClient, run: Run, names_by_id: dict[str, str]) -> dict[str, Any]:
    tags = run.data.tags
    parent_id = tags.get(PARENT_RUN_ID_TAG)
    parent: str | None = None
    if parent_id:
        parent = names_by_id.get(parent_id)
        if parent is None:  # a parent in another experiment, or one that does not exist
            try:
                parent = client.get_run(parent_id).info.run_name
            except Exception:
                parent = f"<missing run {parent_id}>"
    metrics = {
        key: sorted_rows(_row(m) for m in client.get_metric_history(run.info.run_id, key))
        for key in sorted(run.data.metrics)
    }
    return {
        "status": run.info.status,
        "lifecycle_stage": run.info.lifecycle_stage,
        "parent": parent,
        "params": dict(sorted(run.data.params.items())),
        "tags": {k: v for k, v in sorted(tags.items()) if is_user_tag(k)},
        "metrics": metrics,
    }


def snapshot(tracking_uri: str, experiment_names: Sequence[str]) -> dict[str, Any]:
    """``{experiment name: {run name: {status, lifecycle_stage, parent, params, tags, metrics}}}``.

    ``parent`` is the parent run's *name* (from the ``mlflow.parentRunId`` tag) or None; ``tags`` keeps
    only user tags; ``metrics`` maps each key to its full history as sorted ``(key, value, step,
    timestamp)`` tuples with NaN as ``"NaN"``. A missing experiment maps to None. Runs of all lifecycle
    stages are included. Raises DuplicateRunNameError if two runs of an experiment share a name.
    """
    client = _client(tracking_uri)
    result: dict[str, Any] = {}
    for name in experiment_names:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            result[name] = None
            continue
        runs = _all_runs(client, experiment.experiment_id)
        names_by_id = {run.info.run_id: run.info.run_name for run in runs}
        duplicates = [n for n, c in Counter(names_by_id.values()).items() if c > 1]
        if duplicates:
            raise DuplicateRunNameError(
                f"experiment {name!r} on {tracking_uri} has several runs named {sorted(duplicates)}"
            )
        result[name] = {
            run.info.run_name: _run_snapshot(client, run, names_by_id)
            for run in sorted(runs, key=lambda r: r.info.run_name or "")
        }
    return result


def metric_rows(tracking_uri: str, run_id: str, key: str) -> list[MetricRow]:
    """Every stored row of metric ``key`` of ``run_id`` as sorted ``(key, value, step, timestamp)``
    tuples (NaN as ``"NaN"``), duplicates kept."""
    return sorted_rows(_row(m) for m in _client(tracking_uri).get_metric_history(run_id, key))


def duplicate_rows(rows: Iterable[MetricRow]) -> dict[MetricRow, int]:
    """Rows that occur more than once, with their counts ({} means exactly-once)."""
    return {row: n for row, n in Counter(rows).items() if n > 1}
