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
        offline.ledger.appended(result, "test")
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
        agent.ledger.appended(await agent.spool.append(records), "test")
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
        agent.ledger.appended(await agent.spool.append(records), "test")
        await _drained(agent)
        status = await agent.status()
    finally:
        await agent.stop()
    assert status["totals"]["dead_lettered"] == 2
    assert status["dead_letters"]["total"] == 2
    assert {d["kind"] for d in status["dead_letters"]["recent"]} == {"metric", "tag"}
