"""The MLflow API as the agent answers it with no upstream (offline): provisional ids, local reads,
stateful validation, the proxy's offline answer, and the security guards. In-process agent, real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.config import HostPort, Settings
from agent.service import Agent

API = "/api/2.0/mlflow/"


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    settings = Settings(upstream=None, http=HostPort("127.0.0.1", 0), udp=None, spool_dir=tmp_path / "spool")
    a = Agent(settings, env={})
    await a.start()
    try:
        yield a
    finally:
        await a.drain(0)
        await a.stop()


@pytest.fixture
async def http(agent: Agent) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as session:
        yield Client(session, f"http://127.0.0.1:{agent.bound_port}")


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def post(self, path: str, body: dict[str, Any], **headers: str) -> tuple[int, dict[str, Any]]:
        async with self.session.post(self.base + API + path, json=body, headers=headers or None) as r:
            return r.status, await r.json(content_type=None)

    async def get(self, path: str, **params: str) -> tuple[int, dict[str, Any]]:
        async with self.session.get(self.base + API + path, params=params) as r:
            return r.status, await r.json(content_type=None)

    async def new_run(self, name: str = "r1") -> tuple[str, str]:
        status, exp = await self.post("experiments/create", {"name": f"exp-{name}"})
        assert status == 200, exp
        status, created = await self.post("runs/create", {"experiment_id": exp["experiment_id"], "run_name": name,
                                                         "start_time": 1000})
        assert status == 200, created
        return exp["experiment_id"], created["run"]["info"]["run_id"]


async def test_offline_create_and_get_serve_provisional_ids(http: Client, agent: Agent) -> None:
    exp_id, run_id = await http.new_run("train")
    assert len(run_id) == 32 and all(c in "0123456789abcdef" for c in run_id)
    status, by_name = await http.get("experiments/get-by-name", experiment_name="exp-train")
    assert status == 200 and by_name["experiment"]["experiment_id"] == exp_id
    assert by_name["experiment"]["lifecycle_stage"] == "active"
    status, run = await http.get("runs/get", run_id=run_id)
    assert status == 200
    info = run["run"]["info"]
    assert info["run_id"] == info["run_uuid"] == run_id
    assert info["experiment_id"] == exp_id and info["status"] == "RUNNING"
    assert info["artifact_uri"] == f"mlflow-artifacts:/{exp_id}/{run_id}/artifacts"
    assert {"key": "mlflow.runName", "value": "train"} in run["run"]["data"]["tags"]
    assert agent.ledger.run_breakdown(run_id) == {"run_op": 1}


async def test_local_run_answers_params_tags_latest_metrics_and_status(http: Client) -> None:
    _, run_id = await http.new_run()
    body = {"run_id": run_id, "params": [{"key": "lr", "value": "0.1"}], "tags": [{"key": "t", "value": "v"}],
            "metrics": [{"key": "loss", "value": v, "timestamp": 10 + s, "step": s} for s, v in enumerate([3, 2, 1])]}
    assert (await http.post("runs/log-batch", body))[0] == 200
    assert (await http.post("runs/log-metric", {"run_id": run_id, "key": "loss", "value": "NaN",
                                                 "timestamp": 5, "step": 1}))[0] == 200
    status, answer = await http.post("runs/update", {"run_id": run_id, "status": "FINISHED", "end_time": 99})
    assert status == 200 and answer["run_info"]["status"] == "FINISHED" and answer["run_info"]["end_time"] == 99
    _, run = await http.get("runs/get", run_id=run_id)
    data = run["run"]["data"]
    assert data["params"] == [{"key": "lr", "value": "0.1"}]
    assert {"key": "t", "value": "v"} in data["tags"]
    assert data["metrics"] == [{"key": "loss", "value": 1.0, "timestamp": 12, "step": 2}]
    assert run["run"]["info"]["status"] == "FINISHED"


async def test_changed_param_is_refused_and_nothing_is_written(http: Client, agent: Agent) -> None:
    _, run_id = await http.new_run()
    assert (await http.post("runs/log-parameter", {"run_id": run_id, "key": "p", "value": "1"}))[0] == 200
    before = agent.ledger.total_items()
    status, err = await http.post("runs/log-batch", {"run_id": run_id, "params": [{"key": "p", "value": "2"}],
                                                      "metrics": [{"key": "m", "value": 1, "timestamp": 1}]})
    assert status == 400 and err["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "Changing param values is not allowed" in err["message"]
    assert agent.ledger.total_items() == before
    # the same value again is fine (MLflow treats it as a no-op)
    assert (await http.post("runs/log-parameter", {"run_id": run_id, "key": "p", "value": "1"}))[0] == 200


async def test_delete_of_unknown_tag_is_404_like_mlflow(http: Client) -> None:
    _, run_id = await http.new_run()
    status, err = await http.post("runs/delete-tag", {"run_id": run_id, "key": "nope"})
    assert status == 404 and err["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    assert (await http.post("runs/set-tag", {"run_id": run_id, "key": "t", "value": "v"}))[0] == 200
    assert (await http.post("runs/delete-tag", {"run_id": run_id, "key": "t"}))[0] == 200
    _, run = await http.get("runs/get", run_id=run_id)
    assert all(t["key"] != "t" for t in run["run"]["data"]["tags"])


async def test_duplicate_experiment_and_unknown_reads(http: Client) -> None:
    await http.new_run("dup")
    status, err = await http.post("experiments/create", {"name": "exp-dup"})
    assert status == 400 and err["error_code"] == "RESOURCE_ALREADY_EXISTS"
    status, err = await http.get("experiments/get-by-name", experiment_name="never")
    assert status == 404 and err["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    status, err = await http.get("runs/get", run_id="0123456789abcdef0123456789abcdef")
    assert status == 404 and err["error_code"] == "RESOURCE_DOES_NOT_EXIST"


async def test_conflicting_run_name_and_tag_is_refused(http: Client) -> None:
    _, exp = await http.post("experiments/create", {"name": "named"})
    status, err = await http.post("runs/create", {"experiment_id": exp["experiment_id"], "run_name": "a",
                                                  "tags": [{"key": "mlflow.runName", "value": "b"}]})
    assert status == 400 and err["error_code"] == "INVALID_PARAMETER_VALUE"


async def test_proxied_paths_say_offline_and_server_info_keeps_multipart_off(http: Client) -> None:
    async with http.session.post(http.base + API + "experiments/search", json={"max_results": 10}) as r:
        assert r.status == 503
        assert (await r.json())["error_code"] == "TEMPORARILY_UNAVAILABLE"
    async with http.session.get(http.base + "/api/3.0/mlflow/server-info") as r:
        info = await r.json()
        assert r.status == 200 and info["multipart_uploads_enabled"] is False


async def test_foreign_host_header_is_refused(http: Client) -> None:
    async with http.session.get(http.base + API + "experiments/get-by-name", params={"experiment_name": "x"},
                                headers={"Host": "evil.example:5050"}) as r:
        assert r.status == 403
        assert (await r.json())["error_code"] == "PERMISSION_DENIED"
    async with http.session.get(http.base + "/healthz", headers={"Host": "evil.example"}) as r:
        assert r.status == 200


async def test_ingest_token_is_required_when_configured(tmp_path: Path) -> None:
    settings = Settings(upstream=None, http=HostPort("127.0.0.1", 0), udp=None, spool_dir=tmp_path / "spool",
                        ingest_token="s3cret")
    agent = Agent(settings, env={})
    await agent.start()
    try:
        base = f"http://127.0.0.1:{agent.bound_port}{API}experiments/create"
        async with aiohttp.ClientSession() as session:
            async with session.post(base, json={"name": "x"}) as r:
                assert r.status == 401
                assert (await r.json())["error_code"] == "UNAUTHENTICATED"
            async with session.post(base, json={"name": "x"}, headers={"Authorization": "Bearer s3cret"}) as r:
                assert r.status == 200
    finally:
        await agent.stop()


async def test_spool_full_with_reject_policy_answers_429_with_retry_after(tmp_path: Path) -> None:
    settings = Settings(upstream=None, http=HostPort("127.0.0.1", 0), udp=None, spool_dir=tmp_path / "spool",
                        spool_max_bytes=1 << 20, overflow_policy="reject")
    agent = Agent(settings, env={})
    await agent.start()
    try:
        async with aiohttp.ClientSession() as session:
            http = Client(session, f"http://127.0.0.1:{agent.bound_port}")
            _, run_id = await http.new_run()
            big = {"run_id": run_id, "tags": [{"key": f"t{i}", "value": "x" * 8000} for i in range(100)]}
            statuses = []
            for _ in range(3):
                async with session.post(http.base + API + "runs/log-batch", json=big) as r:
                    statuses.append((r.status, r.headers.get("Retry-After")))
            assert statuses[0][0] == 200
            assert (429, "5") in statuses
            assert agent.ledger.bytes <= settings.spool_max_bytes
    finally:
        await agent.stop()


async def test_offline_search_finds_the_runs_held_here(http: Client) -> None:
    exp_id, run_id = await http.new_run("a")
    _, other = await http.post("runs/create", {"experiment_id": exp_id, "run_name": "b", "start_time": 2000})
    await http.post("runs/log-batch", {"run_id": run_id, "metrics": [{"key": "loss", "value": 0.1, "timestamp": 1,
                                                                       "step": 0}]})
    status, found = await http.post("runs/search", {"experiment_ids": [exp_id]})
    assert status == 200
    assert [r["info"]["run_name"] for r in found["runs"]] == ["b", "a"]  # MLflow's default: newest first
    status, found = await http.post("runs/search", {"experiment_ids": [exp_id], "filter": "metrics.loss < 1"})
    assert [r["info"]["run_id"] for r in found["runs"]] == [run_id]
    status, found = await http.post("runs/search", {"experiment_ids": [exp_id], "filter": "metrics.loss < 0.01"})
    assert status == 200 and found == {}
    status, error = await http.post("runs/search", {"experiment_ids": [exp_id], "filter": "metrics.loss <<< 1"})
    assert status == 400 and error["error_code"] == "INVALID_PARAMETER_VALUE"
    assert other["run"]["info"]["run_id"] != run_id


async def test_offline_logged_models_are_answered_and_kept(http: Client, agent: Agent) -> None:
    exp_id, run_id = await http.new_run("m")
    status, created = await http.post("logged-models", {"experiment_id": exp_id, "name": "model",
                                                        "source_run_id": run_id,
                                                        "tags": [{"key": "k", "value": "v"}]})
    assert status == 200, created
    info = created["model"]["info"]
    model_id = info["model_id"]
    assert info["status"] == "LOGGED_MODEL_PENDING" and info["source_run_id"] == run_id
    assert info["artifact_uri"] == f"mlflow-artifacts:/{exp_id}/models/{model_id}/artifacts"
    async with http.session.patch(f"{http.base}{API}logged-models/{model_id}",
                                  json={"model_id": model_id, "status": "LOGGED_MODEL_READY"}) as r:
        assert r.status == 200 and (await r.json())["model"]["info"]["status"] == "LOGGED_MODEL_READY"
    async with http.session.patch(f"{http.base}{API}logged-models/{model_id}/tags",
                                  json={"tags": [{"key": "k2", "value": "v2"}]}) as r:
        assert r.status == 200
    async with http.session.delete(f"{http.base}{API}logged-models/{model_id}/tags/k") as r:
        assert r.status == 200
    async with http.session.delete(f"{http.base}{API}logged-models/{model_id}/tags/nope") as r:
        assert r.status == 404 and (await r.json())["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    assert (await http.post(f"logged-models/{model_id}/params", {"params": [{"key": "p", "value": "1"}]}))[0] == 200
    status, error = await http.post(f"logged-models/{model_id}/params", {"params": [{"key": "p", "value": "1"}]})
    assert status == 400 and error["error_code"] == "BAD_REQUEST"  # as MLflow's SQL store answers a repeat
    assert (await http.post("runs/outputs", {"run_id": run_id, "models": [{"model_id": model_id, "step": 3}]}))[0] \
        == 200
    status, got = await http.get(f"logged-models/{model_id}")
    assert status == 200
    assert got["model"]["info"]["tags"] == [{"key": "k2", "value": "v2"}]
    assert got["model"]["data"]["params"] == [{"key": "p", "value": "1"}]
    status, found = await http.post("logged-models/search", {"experiment_ids": [exp_id], "filter": "name = 'model'"})
    assert [m["info"]["model_id"] for m in found["models"]] == [model_id]
    status, run = await http.get("runs/get", run_id=run_id)
    assert run["run"]["outputs"] == {"model_outputs": [{"model_id": model_id, "step": 3}]}
    # A create, a finalize, tags, a tag deletion, params: all in the model's own queue.
    assert agent.ledger.run_breakdown(f"model:{model_id}") == {"model_op": 5}
    assert agent.ledger.run_breakdown(run_id) == {"run_op": 2}  # its create and its outputs
