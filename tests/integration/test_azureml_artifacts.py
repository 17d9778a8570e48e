"""Artifacts and logged models through the agent to an Azure ML workspace (the stand-in): the stock mlflow
client, which cannot write to Azure's ``azureml://`` artifact URIs by itself, logs files and an sklearn model
through the agent while the workspace is away and after it is back; run history and blob storage end with
every file byte-identical, the model in its run's artifacts with its description in the run's tags, and
everything reads back through the agent (listing, downloads, ``load_model``) once the local copies are gone.
No workspace token ever goes to storage, and none leaks.

Real processes: the session's MLflow server behind the gateway process, an agent process; the client in
this process.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import AgentFactory
from tests.integration.azure_helpers import AGENT_ARGS, GatewayFactory, assert_no_secrets, identity_env
from tests.integration.helpers import PROVISIONAL_TAG, all_runs, match_client_runs
from tests.integration.test_artifacts import download_digests, listing, make_tree, tree_digests, wait_artifacts_uploaded
from tests.integration.test_models import fitted_model, training_data
from tests.support.mlflow_server import MlflowServer

pytestmark = pytest.mark.integration

HISTORY_TAG = "mlflow.log-model.history"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_artifacts_and_models_reach_azure_ml_through_an_outage(
    *,
    make_gateway: GatewayFactory,
    no_tools: Path,
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
    fluent: None,
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    gateway = make_gateway(token_ttl=600.0)
    agent = agent_factory(gateway.uri, *AGENT_ARGS, env=identity_env(gateway, no_tools))
    mlflow.set_tracking_uri(agent.url)
    client = MlflowClient(agent.url)
    experiment_id = mlflow.set_experiment(experiment_name).experiment_id  # while the workspace answers
    src = tmp_path / "src"
    make_tree(src / "tree")
    (src / "hello.txt").write_text("hello, Azure\n")
    features, _ = training_data()
    expected = fitted_model().predict(features[:10]).tolist()

    gateway.stop()  # the workspace is away
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(src / "hello.txt"))
        mlflow.log_artifacts(str(src / "tree"), "tree")
        mlflow.log_text("first", "notes/readme.md")
        mlflow.log_text("second", "notes/readme.md")  # supersedes the first before anything is sent
        mlflow.log_dict({"lr": 0.1}, "config/params.json")
        model = mlflow.sklearn.log_model(fitted_model(), name="model", input_example=features[:2])
    free = mlflow.sklearn.log_model(fitted_model(), name="free-model")  # outside any run
    run_id = run.info.run_id
    assert run.info.artifact_uri == f"mlflow-artifacts:/{experiment_id}/{run_id}/artifacts"
    # Everything reads back from the agent while the workspace is away, the model's files in their run
    # (where Azure ML will keep them) and as the model's.
    logged = download_digests(client, run_id, tmp_path / "down")
    model_files = download_digests(client, run_id, tmp_path / "down-model", "model")
    model_files.pop("registered_model_meta", None)  # written by the client itself when it downloads a model
    assert {f"model/{k}": v for k, v in model_files.items()} == {k: v for k, v in logged.items()
                                                                 if k.startswith("model/")}
    assert {"MLmodel", "model.skops", "input_example.json"} <= set(model_files)
    assert logged["hello.txt"] == sha256(src / "hello.txt")
    assert {k.removeprefix("tree/"): v for k, v in logged.items() if k.startswith("tree/")} == tree_digests(
        src / "tree")
    assert mlflow.sklearn.load_model(model.model_uri).predict(features[:10]).tolist() == expected
    assert client.get_logged_model(model.model_id).status.to_proto() == 2

    gateway.start()  # back, same port and secret
    wait_artifacts_uploaded(agent, 120)
    upstream = match_client_runs(all_runs(mlflow_server.url, experiment_name), {"run": run_id})["run"]
    assert upstream.data.tags[PROVISIONAL_TAG] == run_id
    # Run history holds each file once, blob storage its exact bytes (the superseded readme was never sent).
    paths = gateway.artifact_paths(upstream.info.run_id)
    assert sorted(paths) == sorted(logged)
    for path, digest in logged.items():
        assert sha256(gateway.blob_file(upstream.info.run_id, path)) == digest, path
    assert (gateway.blob_file(upstream.info.run_id, "notes/readme.md").read_text()) == "second"
    # The model's description is in its run's tags.
    history = json.loads(upstream.data.tags[HISTORY_TAG])
    assert [(h["artifact_path"], h["model_uuid"], h["run_id"]) for h in history] == [
        ("model", model.model_id, upstream.info.run_id)]
    described = json.loads(upstream.data.tags[f"mlflow_agent.logged_model.{model.model_id}"])
    assert (described["name"], described["status"]) == ("model", "LOGGED_MODEL_READY")
    # A model logged outside any run got a run of its own, named after it, finished with it.
    holders = [r for r in all_runs(mlflow_server.url, experiment_name)
               if r.data.tags.get("mlflow_agent.logged_model_id") == free.model_id]
    assert len(holders) == 1 and holders[0].info.run_name == "free-model", holders
    assert holders[0].info.status == "FINISHED"
    assert "free-model/MLmodel" in gateway.artifact_paths(holders[0].info.run_id)

    # With the local copies gone, reads go to run history and storage, through the agent.
    assert agent.status()["artifacts"]["waiting"] == 0
    assert download_digests(client, run_id, tmp_path / "after") == logged
    root = [(p, d) for p, d, _ in listing(client, run_id) if "/" not in p]
    assert root == [("config", True), ("hello.txt", False), ("model", True), ("notes", True), ("tree", True)]
    assert mlflow.sklearn.load_model(model.model_uri).predict(features[:10]).tolist() == expected
    assert mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(features[:10]).tolist() == expected

    stats = gateway.stats()
    assert stats["blob"]["bearer_seen"] == 0, stats["blob"]
    assert stats["blob"]["put"] >= len(paths)
    assert_no_secrets(agent, gateway, min_tokens=1)
    totals = agent.status()["totals"]
    assert totals.get("dead_lettered", 0) == 0, totals
    assert agent.metric_sum("mlflow_agent_artifacts_total", result="superseded") == 1
    assert agent.metric_sum("mlflow_agent_artifacts_total", result="dead_lettered") == 0
