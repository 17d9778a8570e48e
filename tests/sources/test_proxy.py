"""The pass-through proxy with the real mlflow client: artifacts stream through, searches and metric
history work, and provisional ids are translated once the run exists upstream."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import AgentFactory
from tests.support.mlflow_server import MlflowServer
from tests.support.ports import free_port
from tests.support.processes import python_env

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent('''
    import sys, mlflow
    from mlflow.tracking import MlflowClient
    mlflow.set_experiment(sys.argv[1])
    payload = bytes(range(256)) * 8192  # 2 MiB, streamed through the agent
    with open("blob.bin", "wb") as f:
        f.write(payload)
    with mlflow.start_run(run_name="with-artifacts") as run:
        mlflow.log_metric("loss", 0.5, step=1)
        mlflow.log_text("hello through the agent", "notes/hello.txt")
        mlflow.log_artifact("blob.bin", artifact_path="data")
    client = MlflowClient()
    text_path = client.download_artifacts(run.info.run_id, "notes/hello.txt", "downloads")
    assert open(text_path).read() == "hello through the agent"
    assert open(client.download_artifacts(run.info.run_id, "data/blob.bin", "downloads"), "rb").read() == payload
    found = client.search_runs([run.info.experiment_id], "attributes.run_name = 'with-artifacts'")
    assert len(found) == 1, found
    print(run.info.run_id)
''')


def test_artifacts_and_searches_pass_through(mlflow_server: MlflowServer, agent_factory: AgentFactory,
                                             tmp_path: Path, experiment_name: str) -> None:
    agent = agent_factory(mlflow_server)
    (tmp_path / "s.py").write_text(SCRIPT)
    out = subprocess.run([sys.executable, "s.py", experiment_name], cwd=tmp_path, capture_output=True, timeout=300,
                         check=False,
                         env=python_env({"MLFLOW_TRACKING_URI": agent.url}))
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    run_id = out.stdout.decode().split()[-1]
    files = {f.path for f in MlflowClient(mlflow_server.url).list_artifacts(run_id, "data")}
    assert files == {"data/blob.bin"}


def test_provisional_ids_are_translated_in_proxied_calls(mlflow_server_factory: object, agent_factory: AgentFactory,
                                                         experiment_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # see the agent's 503 at once
    port = free_port()
    agent = agent_factory(f"http://127.0.0.1:{port}", "--retry-max-backoff", "500ms", "--upload-linger", "0s")
    client = MlflowClient(agent.url)
    exp_id = client.create_experiment(experiment_name)
    run_id = client.create_run(exp_id).info.run_id  # provisional: nothing listens upstream
    client.log_metric(run_id, "m", 1.5, timestamp=10, step=3)
    # read-your-writes: the history of a run not created upstream yet comes from the spool
    assert [(m.value, m.step, m.timestamp) for m in client.get_metric_history(run_id, "m")] == [(1.5, 3, 10)]
    # read-your-writes: the experiment exists only here, so a search of it is answered here in full ...
    assert [r.info.run_id for r in client.search_runs([exp_id])] == [run_id]
    with pytest.raises(Exception, match="503"):
        client.search_experiments()  # ... while a forwarded read needs the upstream
    server = mlflow_server_factory(port=port)  # type: ignore[operator]
    agent.wait_drained(timeout=120)
    history = client.get_metric_history(run_id, "m")  # provisional id in the query, translated
    assert [(m.value, m.step, m.timestamp) for m in history] == [(1.5, 3, 10)]
    upstream = MlflowClient(server.url).search_runs(
        [MlflowClient(server.url).get_experiment_by_name(experiment_name).experiment_id])
    assert len(upstream) == 1 and upstream[0].data.tags["mlflow_agent.provisional_run_id"] == run_id
