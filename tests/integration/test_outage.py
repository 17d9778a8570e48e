"""Outage: the upstream is unreachable for the whole training script, or goes away in its middle.

The training script (scripts/outage_train.py, plain MLflow client) must never block: every call
returns, fast (p99 < 0.5 s, a wide margin for a call answered on loopback). Once an MLflow server
answers on the upstream port, the agent drains and the server holds everything, exactly once: the
experiment, the runs with their names, the parent link, params, tags, statuses and every metric row.
Runs the agent created provisionally carry ``mlflow_agent.provisional_run_id`` equal to the id the
client was given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AgentFactory, MlflowServerFactory
from tests.integration.helpers import (
    PARENT_TAG,
    PROVISIONAL_TAG,
    all_runs,
    assert_accounting,
    expected_rows,
    finish_script,
    match_client_runs,
    percentile,
    read_json,
    run_script,
    start_script,
)
from tests.support.agent_process import AgentProcess
from tests.support.ports import free_port
from tests.support.processes import stop_process, wait_until
from tests.support.snapshot import duplicate_rows, is_user_tag, metric_rows

pytestmark = pytest.mark.integration

SCRIPT = "outage_train.py"
STEPS = 500
P99_LIMIT = 0.5
AGENT_ARGS = (
    "--retry-initial-backoff", "100ms",
    "--retry-max-backoff", "1s",
    "--request-timeout", "3s",
    "--upload-linger", "50ms",
    "--drain-timeout", "10s",
)  # fmt: skip

EXPECTED_PARAMS = {
    "parent": {"optimizer": "sgd", "lr": "0.01", "epochs": str(STEPS), "note": "outage"},
    "child": {"fold": "1"},
}
EXPECTED_TAGS = {
    "parent": {"phase": "train", "team": "infra", "purpose": "outage-test"},
    "child": {"role": "child"},
}
RUN_NAMES = {"parent": "outage-parent", "child": "outage-child"}


def _report_latency(label: str, calls: list[list[Any]], capsys: pytest.CaptureFixture[str]) -> None:
    """Print p50/p99/max and the slowest calls (shown without -s too); assert that nothing blocked."""
    seconds = [c[1] for c in calls]
    p50, p99 = percentile(seconds, 0.50), percentile(seconds, 0.99)
    slowest = sorted(calls, key=lambda c: -c[1])[:5]
    with capsys.disabled():
        print(
            f"\n[{label}] {len(seconds)} MLflow calls: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
            f"max {max(seconds) * 1000:.1f} ms; slowest: {[(n, round(s, 3)) for n, s in slowest]}"
        )
    assert p99 < P99_LIMIT, f"p99 {p99:.3f}s: calls blocked on the unreachable upstream; slowest {slowest}"


def _check_upstream(url: str, experiment: str, out: dict[str, Any]) -> dict[str, Any]:
    """The server holds exactly what the script logged; returns the upstream runs by label."""
    runs = all_runs(url, experiment)
    assert runs, f"experiment {experiment!r} missing or empty upstream"
    assert len(runs) == 2, [(r.info.run_id, r.info.run_name) for r in runs]
    upstream = match_client_runs(runs, out["ids"])
    for label, run in upstream.items():
        assert run.info.run_name == RUN_NAMES[label]
        assert run.info.status == "FINISHED", (label, run.info.status)
        assert run.info.lifecycle_stage == "active"
        assert run.data.params == EXPECTED_PARAMS[label], label
        user_tags = {k: v for k, v in run.data.tags.items() if is_user_tag(k)}
        assert user_tags == EXPECTED_TAGS[label], label
        expected = expected_rows(out["logged"][label])
        assert sorted(run.data.metrics) == sorted(expected), label
        for key, rows in expected.items():
            stored = metric_rows(url, run.info.run_id, key)
            assert duplicate_rows(stored) == {}, (label, key)
            assert stored == rows, f"{label}/{key}: {len(stored)} rows upstream, {len(rows)} logged"
    assert upstream["parent"].data.tags.get(PARENT_TAG) is None
    assert upstream["child"].data.tags.get(PARENT_TAG) == upstream["parent"].info.run_id
    return upstream


def _finish(agent: AgentProcess) -> None:
    status = agent.wait_drained(timeout=120)
    assert status["upstream"]["up"] is True, status["upstream"]
    assert_accounting(status)
    assert status["dead_letters"]["recent"] == []


def test_upstream_down_for_the_whole_script(
    *,
    mlflow_server_factory: MlflowServerFactory,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()  # nothing listens here until the server is started below
    agent = agent_factory(f"http://127.0.0.1:{port}", *AGENT_ARGS, "--create-run-timeout", "1s")
    out_path = tmp_path / "out.json"
    run_script(
        SCRIPT,
        experiment_name,
        str(out_path),
        "--steps",
        str(STEPS),
        "--child-at",
        "100",
        tracking_uri=agent.url,
        log_path=tmp_path / "script.log",
        timeout=180,
    )
    out = read_json(out_path)
    _report_latency("upstream down throughout", out["calls"], capsys)

    status = agent.status()
    assert status["upstream"]["up"] is False, status["upstream"]
    assert status["buffered_records"] > 0
    assert status["totals"].get("uploaded", 0) == 0
    assert {r["run_id"] for r in status["runs"]} == set(out["ids"].values())
    assert all(r["provisional"] for r in status["runs"]), status["runs"]

    server = mlflow_server_factory(port=port)
    _finish(agent)
    upstream = _check_upstream(server.url, experiment_name, out)
    # Every run was created during the outage: its upstream id is new, mapped by the provisional tag.
    for label, run in upstream.items():
        assert run.data.tags.get(PROVISIONAL_TAG) == out["ids"][label], label
        assert run.info.run_id != out["ids"][label], label


def test_upstream_goes_down_in_the_middle_of_the_script(
    *,
    mlflow_server_factory: MlflowServerFactory,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = mlflow_server_factory()
    # A generous create-run timeout: the parent, created while the server is up, must get a real id.
    agent = agent_factory(server, *AGENT_ARGS, "--create-run-timeout", "5s")
    ready, resume = tmp_path / "paused", tmp_path / "resume"
    out_path, log_path = tmp_path / "out.json", tmp_path / "script.log"
    proc = start_script(
        SCRIPT,
        experiment_name,
        str(out_path),
        "--steps",
        str(STEPS),
        "--pause-after",
        str(STEPS // 2 - 1),
        "--child-at",
        str(STEPS // 2 + 50),
        "--ready-file",
        str(ready),
        "--resume-file",
        str(resume),
        tracking_uri=agent.url,
        log_path=log_path,
    )
    try:
        wait_until(ready.exists, 120, message="the script to reach half of its steps", proc=proc)
        # Some of the first half may already be upstream; then the server goes away.
        server.stop()
        resume.write_text("go")
        finish_script(proc, log_path, timeout=180)
    finally:
        stop_process(proc, timeout=5)  # a no-op unless something above failed
    out = read_json(out_path)
    _report_latency("upstream lost mid-script", out["calls"], capsys)

    status = agent.status()
    assert status["upstream"]["up"] is False, status["upstream"]
    assert status["buffered_records"] > 0, "the second half cannot have been uploaded"

    server.start()  # same port, same database
    _finish(agent)
    upstream = _check_upstream(server.url, experiment_name, out)
    # The parent was created while the server answered: the client holds its real id. The child was
    # created during the outage: provisional id, mapped to the upstream run by the tag.
    assert upstream["parent"].info.run_id == out["ids"]["parent"]
    assert upstream["child"].data.tags.get(PROVISIONAL_TAG) == out["ids"]["child"]
    assert upstream["child"].info.run_id != out["ids"]["child"]
