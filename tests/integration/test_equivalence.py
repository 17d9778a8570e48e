"""Equivalence: one training script, run once straight against MLflow server A and once through the
agent in front of server B, leaves both servers holding the same thing.

The script (scripts/equivalence_train.py) uses only the MLflow client: named, unnamed, nested, failed
and killed runs; params, tags, a deleted tag; 2,000 steps x 5 metrics with NaN/+-Infinity and negative
steps, single log_metric calls and a client log_batch. Every metric point carries an explicit timestamp,
so full (key, value, step, timestamp) histories must match exactly. Runs are keyed by a ``case`` tag,
since MLflow names unnamed runs at random.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AgentFactory, MlflowServerFactory
from tests.integration.helpers import (
    PARENT_TAG,
    all_runs,
    assert_accounting,
    expected_rows,
    match_client_runs,
    read_json,
    run_script,
    snapshot_by_tag,
)
from tests.support.mlflow_server import MlflowServer

pytestmark = pytest.mark.integration

SCRIPT = "equivalence_train.py"
AGENT_ARGS = (
    "--retry-initial-backoff", "100ms",
    "--retry-max-backoff", "1s",
    "--request-timeout", "10s",
    "--create-run-timeout", "2s",
    "--upload-linger", "50ms",
    "--drain-timeout", "10s",
)  # fmt: skip


def _without_generated_names(snap: dict[str, Any], cases: dict[str, Any]) -> dict[str, Any]:
    """Drop the names MLflow generated (runs the script left unnamed); keep every other field."""
    out: dict[str, Any] = {}
    for experiment, runs in snap.items():
        out[experiment] = (
            None
            if runs is None
            else {
                case: {k: v for k, v in run.items() if k != "name" or cases[case]["run_name"] is not None}
                for case, run in runs.items()
            }
        )
    return out


def _expected(cases: dict[str, Any]) -> dict[str, Any]:
    """What the script says it logged, in the shape of :func:`snapshot_by_tag` (minus generated names)."""
    return {
        case: {
            "status": c["status"],
            "lifecycle_stage": "active",
            "parent": c["parent_case"],
            "params": dict(sorted(c["params"].items())),
            "tags": dict(sorted(c["tags"].items())),
            "metrics": expected_rows(c["metrics"]),
            **({"name": c["run_name"]} if c["run_name"] is not None else {}),
        }
        for case, c in sorted(cases.items())
    }


def test_agent_and_direct_runs_leave_identical_servers(
    *,
    mlflow_server: MlflowServer,
    mlflow_server_factory: MlflowServerFactory,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server_a = mlflow_server
    server_b = mlflow_server_factory()
    agent = agent_factory(server_b, *AGENT_ARGS)

    direct_out, agent_out = tmp_path / "direct.json", tmp_path / "agent.json"
    direct_wall = run_script(
        SCRIPT,
        experiment_name,
        str(direct_out),
        tracking_uri=server_a.url,
        log_path=tmp_path / "direct-script.log",
        timeout=300,
    )
    agent_wall = run_script(
        SCRIPT,
        experiment_name,
        str(agent_out),
        tracking_uri=agent.url,
        log_path=tmp_path / "agent-script.log",
        timeout=300,
    )
    status = agent.wait_drained(timeout=120)
    with capsys.disabled():  # informational, shown without -s too
        print(
            f"\n[equivalence] script wall time: direct {direct_wall:.2f}s, through the agent {agent_wall:.2f}s "
            f"(in-script: {read_json(direct_out)['elapsed']:.2f}s vs {read_json(agent_out)['elapsed']:.2f}s)"
        )

    direct_cases = read_json(direct_out)["cases"]
    agent_cases = read_json(agent_out)["cases"]
    assert set(direct_cases) == set(agent_cases) == {"main", "child", "unnamed", "unnamed-child", "failed", "killed"}

    # The premise: the direct server holds exactly what the script logged.
    snap_a = snapshot_by_tag(server_a.url, [experiment_name])
    assert snap_a[experiment_name] is not None
    assert _without_generated_names(snap_a, direct_cases)[experiment_name] == _expected(direct_cases)

    # The claim: through the agent, server B holds the same (every field, every metric row).
    snap_b = snapshot_by_tag(server_b.url, [experiment_name])
    assert _without_generated_names(snap_b, agent_cases) == _without_generated_names(snap_a, direct_cases)
    assert _without_generated_names(snap_b, agent_cases)[experiment_name] == _expected(agent_cases)

    # Exactly one upstream run per client run, and the parent links name the right upstream runs.
    runs_b = all_runs(server_b.url, experiment_name)
    assert len(runs_b) == len(agent_cases)
    upstream = match_client_runs(runs_b, {case: c["run_id"] for case, c in agent_cases.items()})
    for case, c in agent_cases.items():
        parent_case = c["parent_case"]
        expected_parent = upstream[parent_case].info.run_id if parent_case is not None else None
        assert upstream[case].data.tags.get(PARENT_TAG) == expected_parent, case

    # The agent's own accounting: everything received was uploaded, nothing lost on the way.
    assert_accounting(status)
    final = agent.status()
    assert_accounting(final)
    assert final["dead_letters"]["recent"] == []
