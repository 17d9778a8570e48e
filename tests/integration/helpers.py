"""Small helpers shared by the integration tests: training scripts as subprocesses, comparisons of
what an MLflow server holds, and the agent's loss accounting."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support.processes import REPO_ROOT, log_tail, python_env, spawn, stop_process
from tests.support.snapshot import NAN, MetricRow, snapshot, sorted_rows

if TYPE_CHECKING:
    from mlflow.entities import Run

SCRIPTS = Path(__file__).resolve().parent / "scripts"
PROVISIONAL_TAG = "mlflow_agent.provisional_run_id"
PARENT_TAG = "mlflow.parentRunId"
FLOAT_MAX = 1.7976931348623157e308


class ScriptFailedError(AssertionError):
    """A training script exited non-zero or did not finish in time."""


def start_script(
    script: str | Path, *args: str, tracking_uri: str, log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``scripts/<script>`` (or a path) with ``MLFLOW_TRACKING_URI`` set; output goes to ``log_path``."""
    path = Path(script) if Path(script).is_absolute() else SCRIPTS / script
    extra = {"MLFLOW_TRACKING_URI": tracking_uri, **(env or {})}
    return spawn([sys.executable, str(path), *args], log_path, env=python_env(extra), cwd=REPO_ROOT)


def finish_script(proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    """Wait for a script; raise with its log tail unless it exits 0 within ``timeout`` s (it is
    stopped by its pid either way)."""
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc, timeout=5)
        raise ScriptFailedError(
            f"script pid {proc.pid} did not finish within {timeout:.0f}s\n--- log tail ---\n{log_tail(log_path)}"
        ) from None
    finally:
        stop_process(proc, timeout=5)  # reaps it and anything it left in its group
    if returncode != 0:
        raise ScriptFailedError(f"script exited with {returncode}\n--- log tail ---\n{log_tail(log_path)}")


def run_script(script: str | Path, *args: str, tracking_uri: str, log_path: Path, timeout: float = 180) -> float:
    """Run a script to completion (exit code 0 required); return its wall time in seconds."""
    started = time.monotonic()
    proc = start_script(script, *args, tracking_uri=tracking_uri, log_path=log_path)
    finish_script(proc, log_path, timeout)
    return time.monotonic() - started


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# -- what a server holds ------------------------------------------------------------------------------


def stored_value(value: float) -> float | str:
    """A logged metric value as MLflow's SQL store gives it back: NaN as ``"NaN"``, +/-Infinity as the
    largest finite float (the store clamps them)."""
    if math.isnan(value):
        return NAN
    if math.isinf(value):
        return FLOAT_MAX if value > 0 else -FLOAT_MAX
    return float(value)


def expected_rows(logged: Iterable[Sequence[Any]]) -> dict[str, list[MetricRow]]:
    """``[[key, value, step, timestamp], ...]`` as logged -> ``{key: sorted rows}`` as stored."""
    rows: dict[str, list[MetricRow]] = {}
    for key, value, step, timestamp in logged:
        rows.setdefault(key, []).append((key, stored_value(float(value)), int(step), int(timestamp)))
    return {key: sorted_rows(r) for key, r in sorted(rows.items())}


def snapshot_by_tag(tracking_uri: str, experiment_names: Sequence[str], tag: str = "case") -> dict[str, Any]:
    """:func:`snapshot`, but runs keyed by the user tag ``tag`` instead of their (maybe generated) name.

    Each run's ``parent`` becomes the parent's ``tag`` value and its name is kept under ``name``.
    """
    result: dict[str, Any] = {}
    for experiment, runs in snapshot(tracking_uri, experiment_names).items():
        if runs is None:
            result[experiment] = None
            continue
        case_of_name = {name: run["tags"].get(tag) for name, run in runs.items()}
        by_case: dict[str, Any] = {}
        for name, run in runs.items():
            case = run["tags"].get(tag)
            if case is None or case in by_case:
                raise AssertionError(
                    f"run {name!r} of {experiment!r} on {tracking_uri}: tag {tag!r} missing or "
                    f"not unique ({case!r}); runs: {sorted(case_of_name.items())}"
                )
            parent = run["parent"]
            by_case[case] = {
                **run,
                "name": name,
                "parent": case_of_name.get(parent, parent) if parent is not None else None,
            }
        result[experiment] = dict(sorted(by_case.items()))
    return result


def all_runs(tracking_uri: str, experiment_name: str) -> list[Run]:
    """Every run (all lifecycle stages) of an experiment; [] if the experiment does not exist."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs(
            [experiment.experiment_id], run_view_type=ViewType.ALL, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def match_client_runs(runs: Sequence[Run], client_ids: Mapping[str, str]) -> dict[str, Run]:
    """For each ``label -> run id the client was given``, the one upstream run that is that run: either
    it has that id (the agent got a real id in time) or it carries ``mlflow_agent.provisional_run_id``
    equal to it. Raises AssertionError on a missing run or on twins."""
    found: dict[str, Run] = {}
    problems: list[str] = []
    for label, client_id in client_ids.items():
        matches = [r for r in runs if r.info.run_id == client_id or r.data.tags.get(PROVISIONAL_TAG) == client_id]
        if len(matches) != 1:
            problems.append(
                f"{label} ({client_id}): {len(matches)} upstream runs "
                f"{[(r.info.run_id, r.info.run_name) for r in matches]}"
            )
        else:
            found[label] = matches[0]
    if problems:
        listing = [(r.info.run_id, r.info.run_name, r.data.tags.get(PROVISIONAL_TAG)) for r in runs]
        raise AssertionError(
            "upstream runs do not match the client's runs one to one:\n  "
            + "\n  ".join(problems)
            + f"\nupstream runs: {listing}"
        )
    return found


# -- the agent's accounting ----------------------------------------------------------------------------


def assert_accounting(status: Mapping[str, Any]) -> None:
    """received == uploaded, nothing dropped or dead-lettered, nothing buffered."""
    totals = status["totals"]
    assert status["buffered_records"] == 0, status
    assert totals.get("dropped", 0) == 0, totals
    assert totals.get("dead_lettered", 0) == 0, f"{totals}; dead letters: {status.get('dead_letters')}"
    assert totals["received"] > 0, totals
    assert totals["received"] == totals["uploaded"], totals
    assert status["dead_letters"].get("total", 0) == 0, status["dead_letters"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by the nearest-rank method."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]
