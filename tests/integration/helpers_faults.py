"""Helpers for the fault tests: the acknowledging training script as a subprocess, what it was told,
and checks that the upstream holds exactly that.

The training script (``scripts/train_acked.py``) uses the unmodified mlflow client against an agent and
appends every record whose call RETURNED to an ack file; :func:`read_acks` turns that file into the
expected picture, :func:`assert_delivered_exactly_once` compares it with what a real MLflow server
holds (through the public client API).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.agent_process import AgentProcess
from tests.support.processes import REPO_ROOT, kill_process, log_tail, python_env, spawn, wait_until
from tests.support.snapshot import MetricRow, duplicate_rows, snapshot, sorted_rows

SCRIPTS = Path(__file__).resolve().parent / "scripts"
TRAIN_SCRIPT = SCRIPTS / "train_acked.py"
#: Metric keys the training script logs at every step (mirrors ``KEYS`` in the script).
TRAIN_KEYS = ("loss", "accuracy", "lr")

#: Agent flags that keep retries and batching quick enough for tests.
FAST_AGENT_FLAGS = (
    "--retry-initial-backoff", "100ms",
    "--retry-max-backoff", "1s",
    "--request-timeout", "3s",
    "--create-run-timeout", "1s",
    "--upload-linger", "50ms",
)  # fmt: skip

SCRIPT_TIMEOUT = 180.0
DRAIN_TIMEOUT = 120.0


# -- what the training script was told ----------------------------------------------------------------


@dataclass
class AckedRun:
    name: str
    run_id: str = ""
    experiment_id: str = ""
    parent_id: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, list[MetricRow]] = field(default_factory=dict)
    status: str | None = None

    @property
    def metric_count(self) -> int:
        return sum(len(rows) for rows in self.metrics.values())


@dataclass
class Acked:
    """Everything the client got a successful answer for, by run name (in creation order)."""

    runs: dict[str, AckedRun] = field(default_factory=dict)

    def run(self, name: str) -> AckedRun:
        return self.runs.setdefault(name, AckedRun(name))

    @property
    def metric_count(self) -> int:
        return sum(r.metric_count for r in self.runs.values())


def read_acks(path: Path) -> Acked:
    """Parse the ack file; a torn last line (the script was writing it) is ignored."""
    acked = Acked()
    if not path.exists():
        return acked
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            continue
        run = acked.run(rec["run"])
        kind = rec["kind"]
        if kind == "run":
            run.run_id, run.experiment_id, run.parent_id = rec["run_id"], rec["experiment_id"], rec["parent_id"]
        elif kind == "param":
            run.params[rec["key"]] = rec["value"]
        elif kind == "tag":
            run.tags[rec["key"]] = rec["value"]
        elif kind == "metric":
            run.metrics.setdefault(rec["key"], []).append(
                (rec["key"], float(rec["value"]), int(rec["step"]), int(rec["timestamp"]))
            )
        elif kind == "status":
            run.status = rec["status"]
        else:
            raise AssertionError(f"unknown ack record {rec!r}")
    return acked


def ack_lines(path: Path) -> int:
    """Complete lines in the ack file so far (one per acknowledged record)."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


# -- the training script as a process ------------------------------------------------------------------


class Training:
    """``scripts/train_acked.py`` in a subprocess with ``MLFLOW_TRACKING_URI`` set; killed on exit."""

    def __init__(
        self,
        tracking_uri: str,
        workdir: Path,
        *,
        experiment: str,
        run_name: str,
        steps: int,
        child_run: str | None = None,
        step_sleep: float = 0.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ack_path = workdir / f"{run_name}.acks.jsonl"
        self.log_path = workdir / f"{run_name}.train.log"
        self.cmd = [
            sys.executable, str(TRAIN_SCRIPT),
            "--experiment", experiment,
            "--run-name", run_name,
            "--steps", str(steps),
            "--ack", str(self.ack_path),
            "--step-sleep", repr(step_sleep),
        ]  # fmt: skip
        if child_run is not None:
            self.cmd += ["--child-run", child_run]
        self.env = python_env({
            "MLFLOW_TRACKING_URI": tracking_uri,
            # The client's own retries carry it over an agent restart: urllib3 retries at once, then
            # after 4 s, 8 s, ... (backoff factor 2); 7 retries cover minutes.
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
            **(env or {}),
        })
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Training:
        self.proc = spawn(self.cmd, self.log_path, env=self.env, cwd=self.workdir)
        return self

    def __enter__(self) -> Training:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_process(self.proc)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def acks(self) -> int:
        return ack_lines(self.ack_path)

    def acked(self) -> Acked:
        return read_acks(self.ack_path)

    def output(self) -> str:
        return log_tail(self.log_path, 200)

    def wait_acks(self, n: int, timeout: float = SCRIPT_TIMEOUT) -> int:
        """Wait until at least ``n`` records were acknowledged; fails if the script exits first."""
        assert self.proc is not None
        return wait_until(lambda: (count := self.acks()) >= n and count, timeout, interval=0.05,
                          message=f"{n} acknowledged records in {self.ack_path}", proc=self.proc)

    def wait(self, timeout: float = SCRIPT_TIMEOUT) -> int:
        """Wait for the script to exit; assert it succeeded (with its output on failure)."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"training script still running after {timeout:.0f}s\n{self.output()}") from None
        assert rc == 0, f"training script exited with {rc}\n{self.output()}"
        assert "DONE" in self.log_path.read_text(errors="replace"), self.output()
        return rc

    def run_to_end(self, timeout: float = SCRIPT_TIMEOUT) -> Acked:
        with self:
            self.wait(timeout)
        return self.acked()


# -- checks against the upstream -----------------------------------------------------------------------


def expected_snapshot(acked: Acked) -> dict[str, dict[str, Any]]:
    """What :func:`tests.support.snapshot.snapshot` must show for the experiment the script logged to."""
    ids = {run.run_id: name for name, run in acked.runs.items()}
    out: dict[str, dict[str, Any]] = {}
    for name, run in acked.runs.items():
        out[name] = {
            "status": run.status or "RUNNING",
            "lifecycle_stage": "active",
            "parent": ids.get(run.parent_id, f"<unknown run {run.parent_id}>") if run.parent_id else None,
            "params": dict(sorted(run.params.items())),
            "tags": dict(sorted(run.tags.items())),
            "metrics": {key: sorted_rows(rows) for key, rows in sorted(run.metrics.items())},
        }
    return out


def _sample(rows: Iterable[Any], n: int = 5) -> str:
    items = sorted(rows, key=repr)
    return ", ".join(map(repr, items[:n])) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def metric_problems(expected: Sequence[MetricRow], actual: Sequence[MetricRow]) -> list[str]:
    """Readable differences between two metric histories (missing, unexpected, duplicated rows)."""
    want, got = Counter(expected), Counter(actual)
    problems = []
    if missing := set(want) - set(got):
        problems.append(f"{len(missing)} acknowledged row(s) missing upstream: {_sample(missing)}")
    if extra := set(got) - set(want):
        problems.append(f"{len(extra)} row(s) upstream that were never logged: {_sample(extra)}")
    if dups := duplicate_rows(actual):
        problems.append(f"{len(dups)} row(s) stored more than once: {_sample(dups.items())}")
    return problems


def assert_delivered_exactly_once(tracking_uri: str, experiment_name: str, acked: Acked) -> dict[str, Any]:
    """The upstream experiment holds exactly the acknowledged runs, each once, with every acknowledged
    param, tag, status and metric row exactly once (and nothing else). Returns the snapshot."""
    assert acked.runs, "the training script acknowledged nothing"
    snap: dict[str, Any] | None = snapshot(tracking_uri, [experiment_name])[experiment_name]
    assert snap is not None, f"experiment {experiment_name!r} does not exist upstream"
    expected = expected_snapshot(acked)
    assert sorted(snap) == sorted(expected), f"upstream runs {sorted(snap)} != acknowledged runs {sorted(expected)}"
    problems: list[str] = []
    for name, want in expected.items():
        got = snap[name]
        for part in ("status", "lifecycle_stage", "parent", "params", "tags"):
            if got[part] != want[part]:
                problems.append(f"run {name!r}: {part} upstream {got[part]!r} != acknowledged {want[part]!r}")
        if sorted(got["metrics"]) != sorted(want["metrics"]):
            problems.append(f"run {name!r}: metric keys upstream {sorted(got['metrics'])} != "
                            f"acknowledged {sorted(want['metrics'])}")
        for key, rows in want["metrics"].items():
            found = got["metrics"].get(key, [])
            problems.extend(f"run {name!r} metric {key!r}: {p}" for p in metric_problems(rows, found))
    assert not problems, "upstream differs from what the client was acknowledged:\n" + "\n".join(problems)
    return snap


def upstream_runs(tracking_uri: str, experiment_name: str) -> list[Any]:
    """Every run (all lifecycle stages) of the named experiment on the upstream."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"experiment {experiment_name!r} does not exist on {tracking_uri}"
    return list(client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=1000))


# -- the agent's log and metrics ------------------------------------------------------------------------


def log_events(agent: AgentProcess, *, all_runs: bool = False) -> list[dict[str, Any]]:
    """The agent's JSON log lines (of its current run, or of every start with ``all_runs``)."""
    paths = agent.log_paths if all_runs else [p for p in [agent.log_path] if p is not None]
    events = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return events


def find_events(agent: AgentProcess, text: str, *, level: str | None = None) -> list[dict[str, Any]]:
    """Log events of the current run whose message contains ``text`` (and of ``level`` if given)."""
    return [e for e in log_events(agent)
            if text in str(e.get("msg", "")) and (level is None or e.get("level") == level)]


def spool_loaded(agent: AgentProcess, kind: str = "metric") -> float:
    """``mlflow_agent_records_received_total{source="spool"}``: records found in the spool at start."""
    return agent.metric_sum("mlflow_agent_records_received_total", kind=kind, source="spool")


# -- the command line ------------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``python -m agent ARGS`` to completion; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        env=python_env(env), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def elapsed_since(start: float) -> float:
    return time.monotonic() - start
