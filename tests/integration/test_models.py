"""MLflow 3 logged models through the agent: ``mlflow.sklearn.log_model`` during an outage and after it,
``load_model`` and a prediction through the agent while the upstream is down, and the upstream holding
the same model once it is back (its files byte-identical to what the client uploaded, its status, its
run's outputs and inputs, metrics logged for it) — created once, whatever happens in between.

Real processes: MLflow servers and agent processes; the client is the real mlflow client in this process
(fluent API and ``MlflowClient``), pointed at the agent.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import AgentFactory, FaultyProxyFactory, MlflowServerFactory
from tests.integration.helpers import PROVISIONAL_TAG, all_runs, match_client_runs
from tests.integration.helpers_faults import FAST_AGENT_FLAGS
from tests.integration.test_artifacts import tree_digests, wait_artifacts_uploaded
from tests.support.mlflow_server import MlflowServer
from tests.support.ports import LOOPBACK, free_port

if TYPE_CHECKING:
    from mlflow.entities import LoggedModel
    from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration

MODEL_TAG = "mlflow_agent.provisional_model_id"
API = "/api/2.0/mlflow/"


def training_data() -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(7)
    features = rng.normal(size=(60, 3))
    labels = (features[:, 0] + 0.5 * features[:, 1] > 0).astype(int)
    return features, labels


def fitted_model() -> Any:
    from sklearn.linear_model import LogisticRegression

    features, labels = training_data()
    return LogisticRegression().fit(features, labels)


def upstream_model(server: MlflowServer, experiment_id: str, client_model_id: str) -> LoggedModel:
    """The one upstream model that is the client's: its own id, or tagged with it. Twins fail."""
    found = [m for m in server.client().search_logged_models([experiment_id])
             if m.model_id == client_model_id or m.tags.get(MODEL_TAG) == client_model_id]
    assert len(found) == 1, [(m.model_id, m.name, m.tags.get(MODEL_TAG)) for m in found]
    return found[0]


def model_files(client: MlflowClient, model_uri: str, dst: Path) -> dict[str, str]:
    """``relative path -> sha256`` of a model's files, downloaded from where ``client`` points (models:/
    URIs resolve through the global tracking URI, so it points there for the call)."""
    import mlflow

    dst.mkdir(parents=True)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst))
    finally:
        mlflow.set_tracking_uri(before)
    return tree_digests(Path(local))


def log_a_model(name: str, *, step: int = 0) -> tuple[str, str]:
    """Inside the active run: a dataset input, the model, a metric for the model. (model id, uri)"""
    import mlflow

    features, labels = training_data()
    mlflow.log_input(mlflow.data.from_numpy(features, targets=labels, name=f"{name}-data"), context="training")
    info = mlflow.sklearn.log_model(fitted_model(), name=name, input_example=features[:2], step=step)
    mlflow.log_metric("accuracy", 0.9 + step / 100, step=step, model_id=info.model_id)
    return info.model_id, info.model_uri


def test_log_model_during_an_outage_and_after_it(
    *,
    mlflow_server_factory: MlflowServerFactory,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
    fluent: None,
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    features, _ = training_data()
    expected = fitted_model().predict(features[:10]).tolist()
    port = free_port()  # nothing listens here until the server is started below
    agent = agent_factory(f"http://{LOOPBACK}:{port}", *FAST_AGENT_FLAGS, "--drain-timeout", "5s")
    mlflow.set_tracking_uri(agent.url)
    client = MlflowClient(agent.url)
    experiment_id = mlflow.set_experiment(experiment_name).experiment_id

    # -- the upstream is down: log_model, load_model and reads all work through the agent ---------------
    with mlflow.start_run() as run:
        down_id, down_uri = log_a_model("model")
    assert down_id.startswith("m-") and len(down_id) == 34
    assert agent.status()["upstream"]["up"] is False
    assert mlflow.sklearn.load_model(down_uri).predict(features[:10]).tolist() == expected
    assert mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict(features[:10]).tolist() == expected
    model = client.get_logged_model(down_id)
    assert (model.name, model.status.to_proto(), model.source_run_id) == ("model", 2, run.info.run_id)
    assert [m.model_id for m in client.search_logged_models([experiment_id])] == [down_id]
    assert [m.model_id for m in client.search_logged_models([experiment_id], filter_string="name = 'model'")] == [
        down_id]
    assert client.search_logged_models([experiment_id], filter_string="name = 'other'") == []
    got = client.get_run(run.info.run_id)
    assert [(o.model_id, o.step) for o in got.outputs.model_outputs] == [(down_id, 0)]
    assert [d.dataset.name for d in got.inputs.dataset_inputs] == ["model-data"]
    assert got.data.metrics == {"accuracy": 0.9}
    through_agent_down = model_files(client, down_uri, tmp_path / "down")
    assert "MLmodel" in through_agent_down and "model.skops" in through_agent_down

    # -- the upstream comes back: the model arrives, once, with everything the client logged -------------
    server = mlflow_server_factory(port=port)
    wait_artifacts_uploaded(agent, 90)
    upstream_run = match_client_runs(all_runs(server.url, experiment_name), {"run": run.info.run_id})["run"]
    assert upstream_run.data.tags[PROVISIONAL_TAG] == run.info.run_id
    upstream_experiment = upstream_run.info.experiment_id
    up = upstream_model(server, upstream_experiment, down_id)
    assert up.model_id != down_id  # the upstream's own id; the provisional one is its tag
    assert (up.name, up.status.to_proto(), up.source_run_id) == ("model", 2, upstream_run.info.run_id)
    assert up.tags["mlflow.source.name"] == model.tags["mlflow.source.name"]
    direct = server.client()
    upstream_files = model_files(direct, f"models:/{up.model_id}", tmp_path / "upstream")
    assert upstream_files == through_agent_down  # byte-identical to what the client uploaded
    mlflow.set_tracking_uri(server.url)
    try:  # straight from the upstream, without the agent
        assert mlflow.sklearn.load_model(f"models:/{up.model_id}").predict(features[:10]).tolist() == expected
    finally:
        mlflow.set_tracking_uri(agent.url)
    stored = direct.get_run(upstream_run.info.run_id)
    assert [(o.model_id, o.step) for o in stored.outputs.model_outputs] == [(up.model_id, 0)]
    assert [d.dataset.name for d in stored.inputs.dataset_inputs] == ["model-data"]
    # The metric logged for the model names the upstream's model id.
    assert [(m.key, m.value, m.step, m.model_id) for m in direct.get_logged_model(up.model_id).metrics] == [
        ("accuracy", 0.9, 0, up.model_id)]
    # The provisional id keeps working through the agent, now translated.
    assert client.get_logged_model(down_id).model_id == down_id
    assert mlflow.sklearn.load_model(down_uri).predict(features[:10]).tolist() == expected

    # -- with the upstream up: a second model gets the upstream's id at once -----------------------------
    with mlflow.start_run(run_id=run.info.run_id):
        up_id, up_uri = log_a_model("second", step=1)
    assert upstream_model(server, upstream_experiment, up_id).model_id == up_id
    wait_artifacts_uploaded(agent, 60)
    assert model_files(direct, f"models:/{up_id}", tmp_path / "second") == model_files(
        client, up_uri, tmp_path / "second-agent")

    # The same calls made directly against the server give the same listing of files.
    mlflow.set_tracking_uri(server.url)
    mlflow.set_experiment(experiment_name + "-direct")
    with mlflow.start_run():
        _, reference_uri = log_a_model("model")
    reference = model_files(direct, reference_uri, tmp_path / "reference")
    assert sorted(reference) == sorted(upstream_files)
    status = agent.status()
    assert status["totals"].get("dead_lettered", 0) == 0 and status["buffered_records"] == 0, status


def test_models_arrive_once_through_lost_answers_and_a_kill_9(
    *,
    mlflow_server_factory: MlflowServerFactory,
    agent_factory: AgentFactory,
    faulty_proxy_factory: FaultyProxyFactory,
    experiment_name: str,
    tmp_path: Path,
    fluent: None,
) -> None:
    """Models created while a third of the upstream's answers are lost after it applied the request, with
    params logged after creation (which MLflow refuses when repeated) and runs/outputs (likewise): each
    arrives exactly once, complete. Then a model logged during an outage and the agent killed -9 right
    after: it arrives after the restart, once, with all its files."""
    import mlflow
    from mlflow.tracking import MlflowClient

    server = mlflow_server_factory()
    proxy = faulty_proxy_factory(server, seed=11, p_reset_after=0.3, p_503=0.1)
    agent = agent_factory(proxy, *FAST_AGENT_FLAGS, "--retry-max-backoff", "300ms")
    mlflow.set_tracking_uri(agent.url)
    client = MlflowClient(agent.url)
    experiment_id = mlflow.set_experiment(experiment_name).experiment_id
    created: dict[str, dict[str, str]] = {}
    with mlflow.start_run() as run:
        for i in range(4):
            model = client.create_logged_model(experiment_id, name=f"m{i}", source_run_id=run.info.run_id,
                                               params={"alpha": str(i)}, tags={"t": str(i)})
            client.log_model_params(model.model_id, {"beta": str(i * 10)})
            client.set_logged_model_tags(model.model_id, {"u": "x"})
            client.finalize_logged_model(model.model_id, "READY")
            mlflow.log_outputs([mlflow.entities.LoggedModelOutput(model.model_id, step=i)])
            created[model.model_id] = {"alpha": str(i), "beta": str(i * 10)}
    status = agent.wait_drained(timeout=120)
    assert status["totals"].get("dead_lettered", 0) == 0, status["dead_letters"]
    faults = proxy.counts()
    assert faults.get("reset_after", 0) >= 5, faults  # enough answers were really lost
    direct = server.client()
    upstream_exp = direct.get_experiment_by_name(experiment_name).experiment_id
    upstream_ids = {}
    for model_id, params in created.items():
        up = upstream_model(server, upstream_exp, model_id)
        upstream_ids[model_id] = up.model_id
        assert up.params == params, (model_id, up.params)
        assert up.tags["u"] == "x" and up.status.to_proto() == 2
    upstream_run = match_client_runs(all_runs(server.url, experiment_name), {"run": run.info.run_id})["run"]
    outputs = direct.get_run(upstream_run.info.run_id).outputs.model_outputs
    assert sorted((o.model_id, o.step) for o in outputs) == sorted(
        (upstream_ids[m], i) for i, m in enumerate(created))

    # -- kill -9 right after log_model during an outage ------------------------------------------------
    proxy.set_faults(p_reset_after=0.0, p_503=1.0)  # the upstream is away (every call answered 503)
    features, _ = training_data()
    with mlflow.start_run(run_id=run.info.run_id):
        model_id, model_uri = log_a_model("after-crash", step=9)
    held = model_files(client, model_uri, tmp_path / "held")
    agent.sigkill()
    proxy.set_faults(p_503=0.0)
    agent.start()
    agent.wait_drained(timeout=120)
    wait_artifacts_uploaded(agent, 60)
    up = upstream_model(server, upstream_exp, model_id)
    assert up.status.to_proto() == 2
    assert model_files(direct, f"models:/{up.model_id}", tmp_path / "arrived") == held
    assert mlflow.sklearn.load_model(model_uri).predict(features[:3]).tolist() == fitted_model().predict(
        features[:3]).tolist()


def test_log_model_on_a_run_that_is_upstream_during_an_outage(
    *,
    mlflow_server_factory: MlflowServerFactory,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
    fluent: None,
) -> None:
    """A run created upstream, its first metrics uploaded; then the upstream goes away. ``log_model`` reads
    the history of every metric of the run (to link the points of its step to the model): through the
    agent it is answered in full, also after a kill -9, and everything arrives once the upstream is back."""
    import mlflow
    from mlflow.tracking import MlflowClient

    server = mlflow_server_factory()
    agent = agent_factory(server, *FAST_AGENT_FLAGS)
    mlflow.set_tracking_uri(agent.url)
    client = MlflowClient(agent.url)
    mlflow.set_experiment(experiment_name)
    run = mlflow.start_run()
    run_id = run.info.run_id
    assert server.client().get_run(run_id).info.run_id == run_id  # created upstream, the real id
    for step in range(50):
        mlflow.log_metrics({"loss": 1 / (step + 1), "acc": step / 50}, step=step)
    agent.wait_drained(timeout=60)  # uploaded: nothing of it waits
    server.stop()
    for step in range(50, 80):
        mlflow.log_metrics({"loss": 1 / (step + 1), "acc": step / 50}, step=step)

    def history(key: str) -> list[tuple[float, int]]:
        return [(m.value, m.step) for m in client.get_metric_history(run_id, key)]

    expected = {"loss": [(1 / (s + 1), s) for s in range(80)], "acc": [(s / 50, s) for s in range(80)]}
    assert {k: history(k) for k in expected} == expected
    agent.sigkill()
    agent.start()
    assert {k: history(k) for k in expected} == expected  # kept across the crash
    assert client.get_run(run_id).data.metrics == {"loss": 1 / 80, "acc": 79 / 50}
    features, _ = training_data()
    info = mlflow.sklearn.log_model(fitted_model(), name="model", input_example=features[:2], step=0)
    mlflow.end_run()

    server.start()
    agent.wait_drained(timeout=120)
    wait_artifacts_uploaded(agent, 60)
    direct = server.client()
    assert {k: [(m.value, m.step) for m in direct.get_metric_history(run_id, k)] for k in expected} == expected
    up = upstream_model(server, direct.get_run(run_id).info.experiment_id, info.model_id)
    # The points of step 0 were linked to the model, as log_model does without the agent.
    assert sorted((m.key, m.value, m.step) for m in direct.get_logged_model(up.model_id).metrics) == [
        ("acc", 0.0, 0), ("loss", 1.0, 0)]
    assert direct.get_run(run_id).info.status == "FINISHED"
    assert agent.status()["spool"]["history_bytes"] == 0  # the run ended: its history is the upstream's
