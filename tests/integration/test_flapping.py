"""Flapping upstream: agent -> fault-injecting proxy -> real MLflow server.

While the training script (scripts/flapping_train.py, plain MLflow client) runs, the proxy answers
upstream requests with 503s, 429s (Retry-After), connection resets before and after forwarding (the
latter: the server applied the request, the agent never learns it) and hangs. Then the faults stop and
the agent drains. The server must hold every run exactly once (no twin from a retried or lost
runs/create), every metric row exactly once, params and tags intact, every run FINISHED.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import AgentFactory, FaultyProxyFactory
from tests.integration.helpers import (
    PARENT_TAG,
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
from tests.support.faulty_proxy import FAULT_KINDS
from tests.support.mlflow_server import MlflowServer
from tests.support.processes import stop_process, wait_until
from tests.support.snapshot import duplicate_rows, is_user_tag, metric_rows

pytestmark = pytest.mark.integration

SCRIPT = "flapping_train.py"
SEED = 20240611
FAULTS = {
    "p_503": 0.15,
    "p_429": 0.1,
    "retry_after": 1,
    "p_reset_before": 0.05,
    "p_reset_after": 0.1,
    "p_hang": 0.03,
    "hang_seconds": 5,
}
AGENT_ARGS = (
    "--request-timeout", "2s",
    "--retry-initial-backoff", "100ms",
    "--retry-max-backoff", "1s",
    "--create-run-timeout", "1s",
    "--upload-linger", "50ms",
    "--drain-timeout", "10s",
)  # fmt: skip


def test_flapping_upstream_loses_and_doubles_nothing(
    *,
    mlflow_server: MlflowServer,
    faulty_proxy_factory: FaultyProxyFactory,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = mlflow_server
    proxy = faulty_proxy_factory(server, seed=SEED, **FAULTS)
    agent = agent_factory(proxy, *AGENT_ARGS)
    out_path = tmp_path / "out.json"
    wall = run_script(
        SCRIPT,
        experiment_name,
        str(out_path),
        "--steps",
        "1000",
        tracking_uri=agent.url,
        log_path=tmp_path / "script.log",
        timeout=240,
    )
    out = read_json(out_path)
    calls = out["calls"]

    # Stop the faults and let the agent settle.
    injected = proxy.counts()
    proxy.clear_faults()
    status = agent.wait_drained(timeout=120)
    final_counts = proxy.counts()
    retries = agent.metric_sum("mlflow_agent_upload_retries_total")
    with capsys.disabled():
        print(
            f"\n[flapping] script {wall:.1f}s; log_metrics p50 {percentile(calls, 0.5) * 1000:.1f} ms, "
            f"p99 {percentile(calls, 0.99) * 1000:.1f} ms, max {max(calls) * 1000:.0f} ms; proxy counts while "
            f"faulty: {injected}, at the end: {final_counts}; agent upload retries: {retries:.0f}"
        )
    # The test is only worth something if every kind of fault actually happened (the seed's draws give
    # every kind within the first 21 requests; the script causes about 50) and the agent had to retry.
    missing = [kind for kind in FAULT_KINDS if final_counts[kind] == 0]
    assert not missing, f"the proxy injected no {missing}: {final_counts}"
    assert retries > 0

    assert_accounting(status)
    assert status["dead_letters"]["recent"] == []

    runs_by_label = out["runs"]
    upstream_runs = all_runs(server.url, experiment_name)
    assert len(upstream_runs) == len(runs_by_label), [(r.info.run_id, r.info.run_name) for r in upstream_runs]
    upstream = match_client_runs(upstream_runs, {label: r["run_id"] for label, r in runs_by_label.items()})
    for label, logged in runs_by_label.items():
        run = upstream[label]
        assert run.info.run_name == logged["name"], label
        assert run.info.status == "FINISHED", (label, run.info.status)
        assert run.data.params == logged["params"], label
        assert {k: v for k, v in run.data.tags.items() if is_user_tag(k)} == logged["tags"], label
        parent = logged["parent"]
        assert run.data.tags.get(PARENT_TAG) == (upstream[parent].info.run_id if parent else None), label
        expected = expected_rows(logged["metrics"])
        assert sorted(run.data.metrics) == sorted(expected), label
        for key, rows in expected.items():
            stored = metric_rows(server.url, run.info.run_id, key)
            assert duplicate_rows(stored) == {}, (label, key)
            assert stored == rows, f"{label}/{key}: {len(stored)} rows upstream, {len(rows)} logged"


def test_lost_create_answers_make_no_twins_and_keep_names(
    *,
    mlflow_server: MlflowServer,
    faulty_proxy_factory: FaultyProxyFactory,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    """The idempotency case, made deterministic: every upstream answer is lost (the proxy forwards each
    request, then resets the connection) while the client creates runs. The upstream applied each
    runs/create; the agent must find those runs instead of creating twins, and every run must end up
    upstream under the name the client was given."""
    server = mlflow_server
    proxy = faulty_proxy_factory(server, seed=SEED)  # no faults until phase 2
    agent = agent_factory(proxy, *AGENT_ARGS)
    ready, resume = tmp_path / "ready", tmp_path / "resume"
    out_path, log_path = tmp_path / "out.json", tmp_path / "script.log"
    proc = start_script(
        "lost_create_train.py", experiment_name, str(out_path), str(ready), str(resume),
        tracking_uri=agent.url, log_path=log_path,
    )  # fmt: skip
    try:
        wait_until(ready.exists, 120, message="phase 1 of the script", proc=proc)
        agent.wait_drained(timeout=120)  # the upstream is known up and idle: phase 2's create goes to it
        proxy.set_faults(p_reset_after=1.0)
        resume.write_text("go")
        finish_script(proc, log_path, timeout=120)
    finally:
        stop_process(proc, timeout=5)  # a no-op unless something above failed
    lost_creates = [
        e for e in proxy.request_log() if e.get("fault") == "reset_after" and "runs/create" in str(e.get("path"))
    ]
    proxy.clear_faults()
    status = agent.wait_drained(timeout=120)
    assert lost_creates, "no runs/create answer was lost: the test did not test anything"
    assert_accounting(status)

    runs_by_label = read_json(out_path)["runs"]
    upstream_runs = all_runs(server.url, experiment_name)
    listing = [
        (r.info.run_id, r.info.run_name, r.data.tags.get("mlflow_agent.provisional_run_id")) for r in upstream_runs
    ]
    upstream = match_client_runs(upstream_runs, {label: r["run_id"] for label, r in runs_by_label.items()})
    assert len(upstream_runs) == len(runs_by_label), listing
    for label, logged in runs_by_label.items():
        run = upstream[label]
        assert run.info.status == "FINISHED", (label, run.info.status)
        assert run.data.params == logged["params"], label
        parent = logged["parent"]
        assert run.data.tags.get(PARENT_TAG) == (upstream[parent].info.run_id if parent else None), label
        for key, rows in expected_rows(logged["metrics"]).items():
            assert metric_rows(server.url, run.info.run_id, key) == rows, (label, key)
    # Last: the name the client was given (run.info.run_name from start_run) is the name upstream.
    names = {label: (r["name"], upstream[label].info.run_name) for label, r in runs_by_label.items()}
    assert all(given == stored for given, stored in names.values()), (
        f"run names (given to the client, stored upstream): {names}"
    )
