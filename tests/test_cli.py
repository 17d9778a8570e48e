"""The command line: ``python -m agent run|sync|status|version`` as real processes.

A spool is built the way users build one: an agent with ``--upstream none`` (offline: it answers
everything itself, with provisional experiment and run ids) and the mlflow client in a subprocess.
``status`` then reads it through the running agent and, after the agent stopped, from disk; ``sync``
uploads it to a real MLflow server.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import pytest

from tests.conftest import AgentFactory
from tests.integration.helpers_faults import (
    TRAIN_KEYS,
    Acked,
    Training,
    assert_delivered_exactly_once,
    find_events,
    run_cli,
)
from tests.support.agent_process import AgentProcess
from tests.support.mlflow_server import MlflowServer
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

PROVISIONAL_ID = re.compile(r"[0-9a-f]{32}")


def _offline_spool(agent_factory: AgentFactory, experiment: str, workdir: Path, steps: int = 40
                   ) -> tuple[AgentProcess, Acked]:
    """An offline agent holding a parent and a child run logged by the mlflow client."""
    agent = agent_factory(None)
    acked = Training(agent.url, workdir, experiment=experiment, run_name="parent", steps=steps,
                     child_run="child").run_to_end()
    assert set(acked.runs) == {"parent", "child"}
    for run in acked.runs.values():
        assert PROVISIONAL_ID.fullmatch(run.experiment_id), f"not a provisional experiment id: {run.experiment_id}"
        assert PROVISIONAL_ID.fullmatch(run.run_id), f"not a provisional run id: {run.run_id}"
    return agent, acked


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    return lines[0]


def test_status_of_a_running_agent_and_of_its_spool_after_stop(
    agent_factory: AgentFactory, experiment_name: str, tmp_path: Path
) -> None:
    agent, acked = _offline_spool(agent_factory, experiment_name, tmp_path / "train")
    live = agent.status()
    buffered = live["buffered_records"]
    # Everything is kept: each run's create, params, tags, metrics and final update.
    assert buffered >= acked.metric_count + 2 * (1 + 3 + 2 + 1)
    assert live["experiments_pending"] == [experiment_name]
    assert {r["run_id"]: r["provisional"] for r in live["runs"]} == {r.run_id: True for r in acked.runs.values()}

    text = run_cli("status", "--http", f"127.0.0.1:{agent.port}")
    assert text.returncode == 0, text.stderr
    assert "upstream:  none (offline)" in text.stdout.splitlines(), text.stdout
    # a running agent adds the age of the oldest waiting record to the line
    assert any(line.startswith(f"buffered:  {buffered} record(s), oldest waiting ")
               for line in text.stdout.splitlines()), text.stdout
    for name, run in acked.runs.items():
        line = next((x for x in text.stdout.splitlines() if x.strip().startswith(f"run {run.run_id}")), None)
        assert line is not None and f"({name}): {run.metric_count} metric," in line, text.stdout

    raw = run_cli("status", "--http", f"127.0.0.1:{agent.port}", "--json")
    assert raw.returncode == 0, raw.stderr
    data = json.loads(raw.stdout)
    assert data["buffered_records"] == buffered
    assert data["upstream"] == {"url": None, "offline": True}
    assert data["buffered_by_kind"]["metric"] == acked.metric_count
    assert sorted(r["run_name"] for r in data["runs"]) == ["child", "parent"]

    assert agent.stop() == 0
    kept = find_events(agent, "kept in the spool")
    assert kept and kept[0]["pending"] == buffered, agent.log_tail()

    stored = run_cli("status", "--spool-dir", str(agent.spool_dir))
    assert stored.returncode == 0, stored.stderr
    assert f"buffered:  {buffered} record(s)" in stored.stdout.splitlines(), stored.stdout
    stored_json = json.loads(run_cli("status", "--spool-dir", str(agent.spool_dir), "--json").stdout)
    assert stored_json["buffered_records"] == buffered
    pending = {r["run_id"]: r["pending"] for r in stored_json["runs"]}
    assert {run_id: p.get("metric") for run_id, p in pending.items()} == {
        r.run_id: r.metric_count for r in acked.runs.values()}

    nobody = run_cli("status", "--http", f"127.0.0.1:{free_port()}")
    assert nobody.returncode == 1
    assert "no agent answering" in _one_line(nobody.stderr)


def test_sync_uploads_an_offline_spool(
    agent_factory: AgentFactory, mlflow_server: MlflowServer, experiment_name: str, tmp_path: Path
) -> None:
    agent, acked = _offline_spool(agent_factory, experiment_name, tmp_path / "train", steps=300)
    assert agent.stop() == 0
    kept = find_events(agent, "kept in the spool")
    assert kept, agent.log_tail()
    pending = kept[0]["pending"]

    sync = run_cli("sync", "--spool-dir", str(agent.spool_dir), "--upstream", mlflow_server.url,
                   "--timeout", "90", "--progress-interval", "0.5", "--retry-max-backoff", "1s", timeout=150)
    assert sync.returncode == 0, f"stdout:\n{sync.stdout}\nstderr:\n{sync.stderr}"
    lines = sync.stdout.splitlines()
    assert lines[0] == f"sync: {pending} record(s) pending in 2 run(s) -> {mlflow_server.url}", sync.stdout
    summary = re.fullmatch(r"sync: done in [0-9.]+s: uploaded (\d+), dead-lettered 0, left in spool 0", lines[-1])
    assert summary is not None, sync.stdout
    assert int(summary[1]) == pending, sync.stdout

    # The experiment is created by name, both runs by name, with everything the client was told.
    assert_delivered_exactly_once(mlflow_server.url, experiment_name, acked)
    assert acked.runs["parent"].metric_count == 300 * len(TRAIN_KEYS)

    again = run_cli("sync", "--spool-dir", str(agent.spool_dir), "--upstream", mlflow_server.url, "--timeout", "30")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0].startswith("sync: 0 record(s) pending"), again.stdout
    assert "uploaded 0," in again.stdout.splitlines()[-1], again.stdout
    assert_delivered_exactly_once(mlflow_server.url, experiment_name, acked)


def test_sync_refuses_a_spool_an_agent_holds(agent_factory: AgentFactory, mlflow_server: MlflowServer) -> None:
    agent = agent_factory(None)
    sync = run_cli("sync", "--spool-dir", str(agent.spool_dir), "--upstream", mlflow_server.url, "--timeout", "20")
    assert sync.returncode != 0, sync.stdout
    message = _one_line(sync.stderr)
    assert "in use" in message and str(agent.spool_dir) in message and f"pid {agent.pid}" in message, message
    assert "sync: done" not in sync.stdout
    assert agent.get("/readyz").status_code == 200


def test_status_of_a_spool_an_agent_holds_fails_cleanly(agent_factory: AgentFactory) -> None:
    """Reading the spool of a running agent either works or says why in one line: never a traceback."""
    agent = agent_factory(None)
    status = run_cli("status", "--spool-dir", str(agent.spool_dir))
    assert "Traceback" not in status.stderr, status.stderr
    if status.returncode == 0:
        assert "buffered:  0 record(s)" in status.stdout.splitlines(), status.stdout
    else:
        assert "in use" in _one_line(status.stderr)


def test_status_of_a_missing_spool_dir_reports_it_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-spool"
    status = run_cli("status", "--spool-dir", str(missing))
    assert not missing.exists(), "status created a spool where there was none"
    assert status.returncode != 0, f"status reported on a spool that does not exist:\n{status.stdout}"
    assert str(missing) in _one_line(status.stderr)


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--spool-max-bytes", "lots"], {}, "spool_max_bytes"),
        ([], {"MLFLOW_AGENT_FOO": "1"}, "MLFLOW_AGENT_FOO"),
        (["--upstream", "ftp://x"], {}, "upstream"),
        (["--azureml-config", "/nonexistent/mlflow-agent/config.json"], {}, "azureml_config"),
        (["--azureml-config", "/nonexistent/mlflow-agent/config.json", "--upstream", "http://127.0.0.1:5000"], {},
         "azureml_config"),
        (["--azure-credential", "msal"], {}, "azure_credential"),
        (["--azure-arm-endpoint", "http://management.azure.com"], {}, "azure_arm_endpoint"),
    ],
    ids=["bad-size", "unknown-env", "bad-upstream", "missing-azureml-config", "azureml-config-and-upstream",
         "bad-azure-credential", "plain-http-arm-endpoint"],
)
def test_bad_config_exits_2_with_one_line_naming_the_setting(
    args: list[str], env: dict[str, str], named: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    base = ["--upstream", "none"] if "--upstream" not in args else []
    result = run_cli("run", *base, "--http", "127.0.0.1:0", "--spool-dir", str(spool), *args, env=env, timeout=60)
    assert result.returncode == 2, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    line = _one_line(result.stderr)
    assert f"'{named}'" in line, line
    assert result.stdout == ""
    assert not spool.exists(), "a refused configuration must not touch the spool"


def test_version() -> None:
    result = run_cli("version", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"mlflow-agent {importlib.metadata.version('mlflow-agent')}\n"
