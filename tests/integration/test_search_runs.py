"""Read-your-writes for ``search_runs``: what the client finds through the agent while records wait for
upload is what the server itself answers once they are uploaded — same runs, same order, same data.

Two situations, each checked by asking the same searches twice: through the agent while the upstream
cannot take anything, and of the server directly after everything arrived (ids mapped through the
provisional-id tag):

* an outage from the start: the experiment and its runs exist only in the agent;
* runs created upstream, then metrics, params and tags held back by the proxy (503 on every write, reads pass),
  so that filters match only because of what waits in the spool.

Real processes: MLflow servers, agent processes, the fault-injecting proxy; the client is the real
``MlflowClient`` in this process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pytest
import requests

from tests.conftest import AgentFactory, FaultyProxyFactory, MlflowServerFactory
from tests.integration.helpers import PROVISIONAL_TAG
from tests.integration.helpers_faults import FAST_AGENT_FLAGS
from tests.support.mlflow_server import MlflowServer
from tests.support.ports import LOOPBACK, free_port

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration

#: (filter, order_by) pairs asked both ways.
SEARCHES: list[tuple[str, list[str]]] = [
    ("", []),
    ("metrics.loss < 0.5", ["metrics.loss ASC"]),
    ("params.lr = '0.1'", ["attributes.run_name DESC"]),
    ("tags.stage = 'final' AND metrics.acc >= 0.8", []),
    ("attributes.status = 'FINISHED'", ["metrics.acc DESC", "attributes.run_name ASC"]),
    ("attributes.run_name LIKE 'run-%' AND params.layers != '3'", ["params.layers ASC"]),
    ("metrics.loss > 10", []),
]


def client_of(url: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def log_runs(client: MlflowClient, experiment_id: str, *, ended: bool = True) -> dict[str, str]:
    """Five runs with params, tags and metrics that the searches above tell apart; name -> client id."""
    ids = {}
    for i in range(5):
        run = client.create_run(experiment_id, run_name=f"run-{i}")
        ids[run.info.run_name] = run.info.run_id
        log_data(client, run.info.run_id, i)
        if ended and i % 2 == 0:
            client.set_terminated(run.info.run_id)
    return ids


def log_data(client: MlflowClient, run_id: str, i: int) -> None:
    from mlflow.entities import Metric, Param, RunTag

    client.log_batch(run_id, metrics=[Metric("loss", 1.0 / (i + 1), 1_760_000_000_000 + i, 0),
                                      Metric("acc", 0.6 + i / 10, 1_760_000_000_000 + i, 0)],
                     params=[Param("lr", "0.1" if i % 2 else "0.01"), Param("layers", str(2 + i % 3))],
                     tags=[RunTag("stage", "final" if i >= 2 else "warmup")])


def answers(client: MlflowClient, experiment_id: str, names: dict[str, str]) -> list[list[tuple[Any, ...]]]:
    """Each search's runs as (name, status, metrics, params, user tags), in the order found; runs are named
    by ``names`` (id -> name) so the agent's and the server's ids compare."""
    out = []
    for filter_string, order_by in SEARCHES:
        runs = client.search_runs([experiment_id], filter_string=filter_string, order_by=order_by, max_results=100)
        out.append([describe(r, names) for r in runs])
    return out


def describe(run: Run, names: dict[str, str]) -> tuple[Any, ...]:
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith(("mlflow.", "mlflow_agent."))}
    return (names[run.info.run_id], run.info.status, sorted(run.data.metrics.items()), sorted(run.data.params.items()),
            sorted(tags.items()))


def upstream_names(server: MlflowServer, experiment_name: str,
                   client_ids: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The server's experiment id and its runs' ids -> names, through the provisional-id tag (or the id)."""
    direct = server.client()
    experiment = direct.get_experiment_by_name(experiment_name)
    assert experiment is not None
    names = {}
    by_client_id = {v: k for k, v in client_ids.items()}
    for run in direct.search_runs([experiment.experiment_id], max_results=100):
        # A run created upstream in time has the client's id (its tag holds the id it would have had).
        client_id = run.info.run_id if run.info.run_id in by_client_id else run.data.tags.get(PROVISIONAL_TAG)
        names[run.info.run_id] = by_client_id[str(client_id)]
    assert sorted(names.values()) == sorted(client_ids), names
    return experiment.experiment_id, names


def assert_same(agent_view: Sequence[Any], server_view: Sequence[Any]) -> None:
    for (search, a), s in zip(zip(SEARCHES, agent_view, strict=True), server_view, strict=True):
        assert a == s, f"search {search}:\n  agent:  {a}\n  server: {s}"


def test_an_outage_from_the_start_searches_as_the_server_will(
        mlflow_server_factory: MlflowServerFactory, agent_factory: AgentFactory, experiment_name: str) -> None:
    port = free_port()
    agent = agent_factory(f"http://{LOOPBACK}:{port}", *FAST_AGENT_FLAGS)
    client = client_of(agent.url)
    experiment_id = client.create_experiment(experiment_name)
    ids = log_runs(client, experiment_id)
    assert all(r["provisional"] for r in agent.status()["runs"])
    through_agent = answers(client, experiment_id, {v: k for k, v in ids.items()})
    assert [len(a) for a in through_agent] == [5, 3, 2, 3, 3, 3, 0], through_agent
    # A page token of ours never exists: held runs are all on the first page.
    page = requests.post(f"{agent.url}/api/2.0/mlflow/runs/search", timeout=10,
                         json={"experiment_ids": [experiment_id], "max_results": 2}).json()
    assert len(page["runs"]) == 5 and "next_page_token" not in page
    bad = requests.post(f"{agent.url}/api/2.0/mlflow/runs/search", timeout=10,
                        json={"experiment_ids": [experiment_id], "filter": "metrics.loss <"})
    assert bad.status_code == 400 and bad.json()["error_code"] == "INVALID_PARAMETER_VALUE", bad.text

    server = mlflow_server_factory(port=port)
    agent.wait_drained(timeout=60)
    upstream_experiment, names = upstream_names(server, experiment_name, ids)
    assert_same(through_agent, answers(server.client(), upstream_experiment, names))
    # Uploaded: the agent forwards now, and answers in the client's ids what the server answers.
    assert_same(answers(client, experiment_id, {v: k for k, v in ids.items()}),
                answers(server.client(), upstream_experiment, names))


def test_held_back_writes_to_upstream_runs_are_searched_as_the_server_will(
        mlflow_server: MlflowServer, faulty_proxy_factory: FaultyProxyFactory, agent_factory: AgentFactory,
        experiment_name: str) -> None:
    proxy = faulty_proxy_factory(mlflow_server)
    agent = agent_factory(proxy, *FAST_AGENT_FLAGS, "--create-run-timeout", "10s")
    client = client_of(agent.url)
    experiment_id = client.create_experiment(experiment_name)
    runs = {f"run-{i}": client.create_run(experiment_id, run_name=f"run-{i}").info.run_id for i in range(5)}
    agent.wait_drained(timeout=60)
    assert not any(r["provisional"] for r in agent.status()["runs"])  # all created upstream, real ids
    proxy.set_faults(p_503=1.0, only_paths="runs/log-batch,runs/update")  # no writes get through, reads do
    for i, run_id in enumerate(runs.values()):
        log_data(client, run_id, i)
        if i % 2 == 0:
            client.set_terminated(run_id)
    assert agent.status()["buffered_records"] > 0
    names = {v: k for k, v in runs.items()}
    through_agent = answers(client, experiment_id, names)
    assert [len(a) for a in through_agent] == [5, 3, 2, 3, 3, 3, 0], through_agent

    proxy.clear_faults()
    agent.wait_drained(timeout=60)
    assert_same(through_agent, answers(mlflow_server.client(), experiment_id, names))
