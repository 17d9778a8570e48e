"""SIGTERM with a backlog: a bounded drain, exit code 0, and nothing lost.

With the upstream blocked the agent must give up draining after ``--drain-timeout``, exit 0 and keep
the backlog on disk (and say how much in its log); the next start delivers it. With a healthy upstream
the drain uploads everything before the process exits.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AgentFactory, FaultyProxyFactory
from tests.integration.helpers_faults import (
    DRAIN_TIMEOUT,
    FAST_AGENT_FLAGS,
    Training,
    assert_delivered_exactly_once,
    find_events,
    spool_loaded,
)
from tests.support.agent_process import AgentProcess
from tests.support.faulty_proxy import FaultyProxy
from tests.support.mlflow_server import MlflowServer

pytestmark = pytest.mark.integration

#: Slack on top of the drain timeout for the rest of the shutdown and process exit (a loaded 2-core box).
EXIT_SLACK = 2.0

BLOCKED: dict[str, dict[str, Any]] = {
    "http_503": {"p_503": 1.0},
    # Requests are read and never answered: the agent's own request timeout is what ends each try.
    "hang": {"p_hang": 1.0, "hang_seconds": 120.0},
}


def _sigterm(agent: AgentProcess, timeout: float = 60) -> tuple[int, float]:
    """SIGTERM the agent and wait for it to exit; returns (exit code, seconds from the signal to exit)."""
    signalled = time.monotonic()
    agent.sigterm()
    rc = agent.wait(timeout)
    return rc, time.monotonic() - signalled


@pytest.fixture(params=sorted(BLOCKED))
def blocked_proxy(
    request: pytest.FixtureRequest, mlflow_server: MlflowServer, faulty_proxy_factory: FaultyProxyFactory
) -> FaultyProxy:
    """A faulty proxy in front of the session server that lets nothing through (until cleared)."""
    return faulty_proxy_factory(mlflow_server, **BLOCKED[request.param])


def test_sigterm_with_blocked_upstream_keeps_backlog_for_next_start(
    blocked_proxy: FaultyProxy,
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    drain_timeout = 3.0
    proxy = blocked_proxy
    agent = agent_factory(proxy, *FAST_AGENT_FLAGS, "--drain-timeout", f"{drain_timeout:g}s")
    acked = Training(agent.url, tmp_path / "train", experiment=experiment_name, run_name="backlog",
                     steps=200).run_to_end()
    status = agent.status()
    backlog = status["buffered_records"]
    # Nothing could be uploaded: every metric, param and tag, plus the run's create and update, waits.
    assert status["buffered_by_kind"].get("metric") == acked.metric_count
    assert backlog >= acked.metric_count + len(acked.runs["backlog"].params) + 2

    rc, took = _sigterm(agent)
    assert rc == 0, agent.log_tail()
    assert took <= drain_timeout + EXIT_SLACK, f"exit took {took:.1f}s after SIGTERM\n{agent.log_tail()}"
    draining = find_events(agent, "draining")
    assert len(draining) == 1 and f"draining {backlog} record(s)" in draining[0]["msg"], draining
    kept = find_events(agent, "kept in the spool")
    assert len(kept) == 1, f"no 'kept in the spool' line\n{agent.log_tail()}"
    assert kept[0]["pending"] == backlog and f"stopped with {backlog} record(s) kept" in kept[0]["msg"], kept

    # Next start, upstream healthy: the backlog arrives, exactly once.
    proxy.clear_faults()
    agent.start()
    assert spool_loaded(agent) == acked.metric_count
    opened = find_events(agent, "opened:")
    assert opened and opened[0]["pending"] == backlog, opened
    agent.wait_drained(DRAIN_TIMEOUT)
    assert_delivered_exactly_once(mlflow_server.url, experiment_name, acked)


def test_sigterm_with_healthy_upstream_uploads_everything_before_exit(
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    # A long linger keeps small writes waiting to fill a batch: at SIGTERM they are still pending, and
    # the drain ("flush without lingering") must send them at once.
    drain_timeout = 10.0
    agent = agent_factory(mlflow_server, *FAST_AGENT_FLAGS, "--upload-linger", "30s",
                          "--drain-timeout", f"{drain_timeout:g}s")
    acked = Training(agent.url, tmp_path / "train", experiment=experiment_name, run_name="lingering",
                     steps=150).run_to_end()
    pending = agent.status()["buffered_records"]
    assert pending > 0, "nothing pending at SIGTERM: the drain would have nothing to do"

    rc, took = _sigterm(agent)
    assert rc == 0, agent.log_tail()
    assert took <= drain_timeout + EXIT_SLACK, f"exit took {took:.1f}s after SIGTERM\n{agent.log_tail()}"
    assert find_events(agent, "stopped; the spool is empty"), (
        f"{pending} record(s) were pending at SIGTERM and the upstream was healthy, yet the drain "
        f"did not deliver them within {drain_timeout:g}s (took {took:.1f}s)\n{agent.log_tail()}")
    assert_delivered_exactly_once(mlflow_server.url, experiment_name, acked)
