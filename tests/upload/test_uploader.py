"""The uploader against a real MLflow server, in-process: damaged rows, refused items, refused runs."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from agent.config import HostPort, Settings
from agent.records import Kind, Record
from agent.service import Agent
from tests.support.mlflow_server import MlflowServer

pytestmark = pytest.mark.integration


def _settings(upstream: str, spool: Path) -> Settings:
    return Settings(upstream=upstream, http=HostPort("127.0.0.1", 0), spool_dir=spool, upload_linger=0.0,
                    retry_initial_backoff=0.05, retry_max_backoff=0.2, request_timeout=5.0)


async def _drained(agent: Agent, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while agent.ledger.total_items() > 0:
        assert time.monotonic() < deadline, agent.ledger.by_kind()
        await asyncio.sleep(0.05)


async def test_damaged_row_is_dead_lettered_and_the_rest_of_the_run_arrives(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server.url)
    exp = client.create_experiment(f"damaged-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(exp).info.run_id
    spool = tmp_path / "spool"
    # Fill a spool offline with three metric rows for an existing upstream run, then damage the middle one.
    offline = Agent(Settings(upstream=None, spool_dir=spool), env={}, ingest=False)
    await offline.start()
    for step in range(3):
        result = await offline.spool.append([Record(run_id, Kind.METRICS, [["m", float(step), 1000 + step, step]])])
        offline.ledger.appended(result)
    await offline.stop()
    with sqlite3.connect(spool / "spool.db") as db:
        seqs = [r[0] for r in db.execute("SELECT seq FROM records ORDER BY seq")]
        db.execute("UPDATE records SET body = ? WHERE seq = ?", (b"{not json", seqs[1]))

    agent = Agent(_settings(mlflow_server.url, spool), env={}, ingest=False)
    await agent.start()
    try:
        await _drained(agent)
        dead = await agent.spool.dead_letters()
    finally:
        await agent.stop()
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "m"))
    assert history == [(0, 0.0), (2, 2.0)]
    assert len(dead) == 1 and "unreadable record" in dead[0]["message"]


async def test_refused_items_are_isolated_and_the_run_is_not_blocked(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """A param that conflicts upstream (set there by someone else) is dead-lettered alone; the metrics
    and tags sent in the same batches still arrive."""
    client = MlflowClient(mlflow_server.url)
    exp = client.create_experiment(f"refused-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(exp).info.run_id
    client.log_param(run_id, "p", "upstream-value")
    agent = Agent(_settings(mlflow_server.url, tmp_path / "spool"), env={}, ingest=False)
    await agent.start()
    try:
        records = [
            Record(run_id, Kind.PARAMS, [["p", "agent-value"], ["q", "fine"]]),
            Record(run_id, Kind.METRICS, [["m", float(i), 5000 + i, i] for i in range(10)]),
            Record(run_id, Kind.TAGS, [["t", "v"]]),
        ]
        agent.ledger.appended(await agent.spool.append(records))
        await _drained(agent)
        dead = await agent.spool.dead_letters()
        totals = (await agent.status())["totals"]
    finally:
        await agent.stop()
    run = client.get_run(run_id)
    assert run.data.params == {"p": "upstream-value", "q": "fine"}
    assert run.data.tags["t"] == "v"
    assert len(client.get_metric_history(run_id, "m")) == 10
    assert [(d["kind"], d["records"]) for d in dead] == [("param", 1)]
    assert "Changing param values is not allowed" in dead[0]["message"]
    assert totals["dead_lettered"] == 1 and totals["uploaded"] == 12


async def test_a_run_the_upstream_does_not_know_is_dead_lettered_whole(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    ghost = uuid.uuid4().hex
    agent = Agent(_settings(mlflow_server.url, tmp_path / "spool"), env={}, ingest=False)
    await agent.start()
    try:
        records = [Record(ghost, Kind.METRICS, [["m", 1.0, 1, 0]]), Record(ghost, Kind.TAGS, [["t", "v"]])]
        agent.ledger.appended(await agent.spool.append(records))
        await _drained(agent)
        status = await agent.status()
    finally:
        await agent.stop()
    assert status["totals"]["dead_lettered"] == 2
    assert status["dead_letters"]["total"] == 2
    assert {d["kind"] for d in status["dead_letters"]["recent"]} == {"metric", "tag"}


async def test_azure_limits_cap_values_per_key_and_params_per_run(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """With Azure ML's limits: 1,000 values of one key go up in batches of at most 250 for that key, and of
    250 params the first 200 are uploaded, the other 50 dead-lettered with the reason."""
    from agent.upload.batcher import AZUREML_LIMITS

    client = MlflowClient(mlflow_server.url)
    exp = client.create_experiment(f"azure-limits-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(exp).info.run_id
    agent = Agent(_settings(mlflow_server.url, tmp_path / "spool"), env={}, ingest=False)
    await agent.start()
    assert agent.uploader is not None
    agent.uploader.limits = AZUREML_LIMITS
    try:
        records = [Record(run_id, Kind.METRICS, [["loss", float(i), 10_000 + i, i] for i in range(j, j + 500)])
                   for j in (0, 500)]
        records += [Record(run_id, Kind.PARAMS, [[f"p{i:03d}", str(i)] for i in range(j, j + 50)])
                    for j in range(0, 250, 50)]
        agent.ledger.appended(await agent.spool.append(records))
        await _drained(agent)
        dead = await agent.spool.dead_letters(100)
        requests = agent.metrics.registry.get_sample_value(
            "mlflow_agent_upstream_requests_total", {"endpoint": "runs/log-batch", "result": "ok"})
    finally:
        await agent.stop()
    assert len(client.get_metric_history(run_id, "loss")) == 1000
    assert requests is not None and requests >= 4  # 1,000 values of one key: at least 4 batches of <= 250
    params = client.get_run(run_id).data.params
    assert len(params) == 200 and set(params) == {f"p{i:03d}" for i in range(200)}
    assert sum(d["records"] for d in dead) == 50
    assert {d["error_code"] for d in dead} == {"PARAMS_LIMIT"}
    assert all("at most 200 params" in d["message"] for d in dead)
