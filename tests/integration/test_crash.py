"""kill -9 of the agent while the mlflow client logs through it: nothing acknowledged is lost or doubled.

The training script (real mlflow client, subprocess) records every call that returned. The agent is
SIGKILLed mid-script and restarted on the same port and spool dir within about a second; the client's
own HTTP retries carry the script over the gap. At the end the upstream must hold every acknowledged
record exactly once, the run FINISHED, and the params and tags logged before the kill.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import AgentFactory, FaultyProxyFactory
from tests.integration.helpers_faults import (
    DRAIN_TIMEOUT,
    FAST_AGENT_FLAGS,
    TRAIN_KEYS,
    Training,
    assert_delivered_exactly_once,
    find_events,
    run_cli,
    spool_loaded,
    upstream_runs,
)
from tests.support.agent_process import AgentProcess
from tests.support.mlflow_server import MlflowServer
from tests.support.processes import REPO_ROOT, kill_process, python_env, spawn, wait_until

pytestmark = pytest.mark.integration

STEPS = 1500
K = len(TRAIN_KEYS)  # acknowledged records per step (one log_batch call)


def _kill_and_restart(agent: AgentProcess, training: Training) -> int:
    """SIGKILL the agent mid-script and start it again at once on the same port and spool dir;
    returns how many records were acknowledged when it was killed."""
    assert training.running, "the script finished before the kill: raise STEPS"
    acked = training.acks()
    assert agent.sigkill() == -9
    agent.start()
    return acked


def test_sigkill_twice_mid_run_loses_and_doubles_nothing(
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    faulty_proxy_factory: FaultyProxyFactory,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    proxy = faulty_proxy_factory(mlflow_server)
    agent = agent_factory(proxy, *FAST_AGENT_FLAGS)
    with Training(agent.url, tmp_path / "train", experiment=experiment_name, run_name="crashy", steps=STEPS) as train:
        # Params, tags and a few hundred steps go through a healthy upstream (the run gets its real id).
        train.wait_acks(300 * K)

        # Kill 1, upstream refusing everything: what was acknowledged since is only in the spool.
        proxy.set_faults(p_503=1.0)
        blocked_from = train.acks()  # every call that starts from here on cannot reach the upstream
        train.wait_acks(blocked_from + 100 * K)
        assert agent.status()["buffered_records"] > 0
        killed_with = _kill_and_restart(agent, train)
        # At most the one call in flight when the faults went on may have been uploaded before.
        stranded = killed_with - blocked_from - K
        loaded = spool_loaded(agent)
        assert loaded >= stranded, (
            f"the restarted agent found {loaded:.0f} metric(s) in its spool, but {stranded} acknowledged ones "
            f"could not have been uploaded\n{agent.log_tail()}")
        opened = find_events(agent, "opened:")
        assert opened and opened[0]["pending"] >= stranded, opened
        assert agent.status()["buffered_records"] >= stranded

        # The script goes on against the restarted agent (its first retries hit a closed port).
        train.wait_acks(killed_with + 100 * K)

        # Kill 2, upstream healthy: uploads are in flight when the agent dies.
        proxy.clear_faults()
        wait_until(lambda: agent.metric_sum("mlflow_agent_records_uploaded_total") > 0, 60,
                   message="uploads to resume after the faults were cleared", proc=agent.proc)
        train.wait_acks(train.acks() + 100 * K)
        _kill_and_restart(agent, train)

        train.wait()
    agent.wait_drained(DRAIN_TIMEOUT)

    acked = train.acked()
    assert acked.runs["crashy"].metric_count == STEPS * K
    assert acked.runs["crashy"].status == "FINISHED"
    snap = assert_delivered_exactly_once(mlflow_server.url, experiment_name, acked)
    assert snap["crashy"]["params"] == acked.runs["crashy"].params != {}
    assert snap["crashy"]["tags"] == acked.runs["crashy"].tags != {}
    # One run upstream: the client's id is its id, or (created provisionally) the id it is tagged with.
    runs = upstream_runs(mlflow_server.url, experiment_name)
    assert len(runs) == 1
    client_id = acked.runs["crashy"].run_id
    assert client_id in (runs[0].info.run_id, runs[0].data.tags.get("mlflow_agent.provisional_run_id"))


def test_sigkill_while_run_is_provisional(
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    faulty_proxy_factory: FaultyProxyFactory,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    """Upstream unreachable from the start: experiment and runs get provisional ids. A kill -9 and a
    restart by a NEW process must keep the id mapping: one experiment, no twin runs, the child still
    linked to its parent."""
    proxy = faulty_proxy_factory(mlflow_server, p_503=1.0)
    first = agent_factory(proxy, *FAST_AGENT_FLAGS)
    with Training(first.url, tmp_path / "train", experiment=experiment_name, run_name="parent", steps=600,
                  child_run="child") as train:
        train.wait_acks(200 * K)
        status = first.status()
        assert experiment_name in status["experiments_pending"]
        assert [r["provisional"] for r in status["runs"]] == [True]
        stuck = train.acked().metric_count  # nothing ever reached the upstream
        assert first.sigkill() == -9
        second = agent_factory(proxy, *FAST_AGENT_FLAGS, spool_dir=first.spool_dir, port=first.port)
        assert spool_loaded(second) >= stuck
        assert spool_loaded(second, "run_op") >= 1, "the pending create-run was not reloaded"
        status = second.status()
        assert experiment_name in status["experiments_pending"]
        assert status["runs"] and status["runs"][0]["provisional"] is True

        train.wait_acks(train.acks() + 100 * K)
        proxy.clear_faults()
        train.wait()
    second.wait_drained(DRAIN_TIMEOUT)

    acked = train.acked()
    assert set(acked.runs) == {"parent", "child"}
    assert_delivered_exactly_once(mlflow_server.url, experiment_name, acked)
    runs = upstream_runs(mlflow_server.url, experiment_name)
    by_name = {r.info.run_name: r for r in runs}
    assert len(runs) == 2 == len(by_name), [r.info.run_name for r in runs]
    tag = by_name["parent"].data.tags.get("mlflow_agent.provisional_run_id")
    assert tag == acked.runs["parent"].run_id, "the upstream run is not tagged with the client's provisional id"
    assert by_name["child"].data.tags["mlflow.parentRunId"] == by_name["parent"].info.run_id


def test_sigkill_of_sync_mid_upload_then_sync_again(
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    faulty_proxy_factory: FaultyProxyFactory,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    """``sync`` killed -9 halfway through a spool of provisional runs, over an upstream that refuses some
    requests and loses the answers to others (applied upstream, never acknowledged): the next ``sync``
    finishes the job without twin runs or lost records."""
    offline = agent_factory(None)
    acked = Training(offline.url, tmp_path / "train", experiment=experiment_name, run_name="parent", steps=400,
                     child_run="child").run_to_end()
    assert offline.stop() == 0
    proxy = faulty_proxy_factory(mlflow_server, seed=7, p_503=0.3, p_reset_after=0.3)
    sync_cmd = [sys.executable, "-m", "agent", "sync", "--spool-dir", str(offline.spool_dir),
                "--upstream", proxy.url, "--retry-initial-backoff", "200ms", "--retry-max-backoff", "1s",
                "--request-timeout", "3s", "--log-format", "json"]
    sync = spawn(sync_cmd, tmp_path / "sync-1.log", env=python_env(), cwd=REPO_ROOT)
    try:
        def parent_upstream() -> bool:
            experiment = mlflow_server.client().get_experiment_by_name(experiment_name)
            return experiment is not None and bool(mlflow_server.client().search_runs([experiment.experiment_id]))

        wait_until(parent_upstream, 90, message="the first run to be created upstream", proc=sync)
        assert sync.poll() is None, "sync finished before it could be killed"
    finally:
        assert kill_process(sync) == -9
    assert proxy.counts()["reset_after"] > 0

    proxy.clear_faults()
    again = run_cli("sync", "--spool-dir", str(offline.spool_dir), "--upstream", proxy.url, "--timeout", "90",
                    "--retry-max-backoff", "1s", timeout=150)
    assert again.returncode == 0, f"stdout:\n{again.stdout}\nstderr:\n{again.stderr}"
    assert again.stdout.splitlines()[-1].endswith("dead-lettered 0, left in spool 0"), again.stdout
    assert_delivered_exactly_once(mlflow_server.url, experiment_name, acked)
    runs = upstream_runs(mlflow_server.url, experiment_name)
    assert sorted(r.info.run_name for r in runs) == ["child", "parent"]
    for run in runs:
        assert run.data.tags.get("mlflow_agent.provisional_run_id") == acked.runs[run.info.run_name].run_id
