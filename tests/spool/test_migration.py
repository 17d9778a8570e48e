"""Spool schema upgrades against real SQLite files (agent/spool/schema.py MIGRATIONS, Spool._migrate).

A version-1 spool (``user_version`` 1, ``records`` without ``source`` and ``at``) is written by a separate
process exactly as the version-1 agent wrote it: WAL mode, private files, the v1 CREATE. Then the
current Spool opens it:

* it is upgraded in place, nothing is quarantined, every row reads back as written (half-delivered rows
  included), the catalog and dead letters come back, the files stay private; also when the v1 writer
  was killed with its last commits still in the WAL;
* the legacy rows count as found at start (``source="spool"``) whatever happens to them (delivered,
  dead-lettered, evicted), new rows by their real source, and the loss identity holds; the upgrade runs
  once (a second start leaves the rows' times alone);
* failures: a spool written by a NEWER agent is refused and left exactly as it is; an upgrade that fails
  half-way (the disk fills up) destroys nothing and moves nothing: the start stops with a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.ops.metrics import AgentMetrics
from agent.records import Kind, Record
from agent.spool.ledger import Ledger
from agent.spool.schema import ROW_OVERHEAD, SCHEMA_VERSION
from agent.spool.store import (
    FOUND_AT_START,
    ExperimentUpsert,
    PendingSummary,
    RowChange,
    RunUpsert,
    Spool,
    SpoolTooNew,
    SpoolUpgradeFailed,
)
from tests.spool.accounting import DEAD_LETTERED, DROPPED, RECEIVED, UPLOADED, assert_conserved, by_kind

# The schema the version-1 agent created (git history of agent/spool/schema.py), verbatim.
V1_CREATE = """
PRAGMA auto_vacuum = INCREMENTAL;
CREATE TABLE IF NOT EXISTS records (
    seq   INTEGER PRIMARY KEY AUTOINCREMENT,
    run   TEXT    NOT NULL,
    kind  INTEGER NOT NULL,
    n     INTEGER NOT NULL,
    done  INTEGER NOT NULL DEFAULT 0,
    size  INTEGER NOT NULL,
    body  BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_run ON records (run, seq);
CREATE INDEX IF NOT EXISTS records_by_kind ON records (kind, seq);
CREATE TABLE IF NOT EXISTS runs (
    run         TEXT PRIMARY KEY,
    upstream_id TEXT,
    provisional INTEGER NOT NULL DEFAULT 0,
    info        BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS run_params (
    run TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (run, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run_tags (
    run TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (run, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS experiments (
    id          TEXT PRIMARY KEY,
    upstream_id TEXT,
    provisional INTEGER NOT NULL DEFAULT 0,
    name        TEXT NOT NULL,
    info        BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    run        TEXT    NOT NULL,
    kind       INTEGER NOT NULL,
    n          INTEGER NOT NULL,
    body       BLOB    NOT NULL,
    status     INTEGER,
    error_code TEXT,
    message    TEXT    NOT NULL,
    at         REAL    NOT NULL
);
"""

# The v1 writer, as its own process: the v1 agent's pragmas and umask, then the given rows in one
# commit. With "crash" it exits without closing, so its commit is only in the WAL (a SIGKILLed agent).
V1_WRITER = r"""
import os, sqlite3, sys, orjson
path, mode = sys.argv[1], sys.argv[2]
data = orjson.loads(sys.stdin.buffer.read())
os.umask(0o077)
conn = sqlite3.connect(path, isolation_level=None)
conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
conn.execute("PRAGMA journal_mode = WAL")
conn.executescript(data["create"])
conn.execute("PRAGMA user_version = 1")
conn.execute("BEGIN IMMEDIATE")
for run, kind, n, done, body in data["records"]:
    body = body.encode()
    conn.execute("INSERT INTO records (run, kind, n, done, size, body) VALUES (?, ?, ?, ?, ?, ?)",
                 (run, kind, n, done, len(body) + data["overhead"], body))
for run, upstream_id, provisional, info in data["runs"]:
    conn.execute("INSERT INTO runs VALUES (?, ?, ?, ?)", (run, upstream_id, provisional, info.encode()))
for run, key, value in data["params"]:
    conn.execute("INSERT INTO run_params VALUES (?, ?, ?)", (run, key, value))
for run, key, value in data["tags"]:
    conn.execute("INSERT INTO run_tags VALUES (?, ?, ?)", (run, key, value))
for eid, upstream_id, provisional, name, info in data["experiments"]:
    conn.execute("INSERT INTO experiments VALUES (?, ?, ?, ?, ?)", (eid, upstream_id, provisional, name,
                                                                    info.encode()))
for run, kind, n, body, status, code, message, at in data["dead_letters"]:
    conn.execute("INSERT INTO dead_letters (run, kind, n, body, status, error_code, message, at)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (run, kind, n, body.encode(), status, code, message, at))
conn.execute("COMMIT")
if mode == "crash":
    os._exit(0)
conn.close()
"""


def metric_items(key: str, n: int, start: int = 0) -> list[list[Any]]:
    return [[key, float(i) / 4, 1_700_000_000_000 + i, i] for i in range(start, start + n)]


# (run, kind, n, done, payload): run-a is a real upstream run, run-b a provisional one still to create.
LEGACY: list[tuple[str, Kind, int, int, Any]] = [
    ("run-b", Kind.CREATE_RUN, 1, 0, {"experiment_id": "e-prov", "run_name": "b", "start_time": 1, "tags": []}),
    ("run-a", Kind.METRICS, 3, 0, metric_items("loss", 3)),
    ("run-a", Kind.PARAMS, 2, 0, [["lr", "0.1"], ["batch", "32"]]),
    ("run-a", Kind.TAGS, 1, 0, [["stage", "warmup"]]),
    ("run-a", Kind.METRICS, 4, 1, metric_items("acc", 4)),  # one item already delivered
    ("run-b", Kind.METRICS, 2, 0, metric_items("loss", 2)),
    ("run-b", Kind.UPDATE_RUN, 1, 0, {"status": "FINISHED", "end_time": 2}),
]
LEGACY_DEAD = 5


def legacy_payload() -> dict[str, Any]:
    return {
        "create": V1_CREATE,
        "overhead": ROW_OVERHEAD,
        "records": [[run, int(kind), n, done, orjson.dumps(body).decode()] for run, kind, n, done, body in LEGACY],
        "runs": [["run-a", "up-a", 0, '{"experiment_id": "0", "status": "RUNNING"}'],
                 ["run-b", None, 1, '{"experiment_id": "e-prov", "run_name": "b"}']],
        "params": [["run-a", "lr", "0.1"], ["run-a", "batch", "32"]],
        "tags": [["run-a", "stage", "warmup"]],
        "experiments": [["e-prov", None, 1, "provisional-exp", '{"lifecycle_stage": "active"}']],
        "dead_letters": [["run-c", int(Kind.METRICS), LEGACY_DEAD, orjson.dumps(metric_items("x", 5)).decode(), 404,
                          "RESOURCE_DOES_NOT_EXIST", "run gone", 1_600_000_000.0]],
    }


def write_v1_spool(directory: Path, mode: str = "clean") -> None:
    """A v1 spool as the v1 agent left it, written by a separate process (killed with ``mode="crash"``)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    result = subprocess.run([sys.executable, "-c", V1_WRITER, str(directory / "spool.db"), mode],
                            input=orjson.dumps(legacy_payload()), capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert user_version(directory / "spool.db") == 1
    if mode == "crash":
        wal = directory / "spool.db-wal"
        assert wal.exists() and wal.stat().st_size > 0, "the v1 writer's commit should be in its WAL only"


def read_db(path: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def user_version(path: Path) -> int:
    return int(read_db(path, "PRAGMA user_version")[0][0])


def expected_pending() -> Counter[tuple[str, Kind, int, int, int]]:
    """(run, kind, rows, items, bytes) as the spool summarises the legacy rows."""
    totals: dict[tuple[str, Kind], list[int]] = {}
    for run, kind, n, done, body in LEGACY:
        t = totals.setdefault((run, kind), [0, 0, 0])
        t[0] += 1
        t[1] += n - done
        t[2] += len(orjson.dumps(body)) + ROW_OVERHEAD
    return Counter((run, kind, *t) for (run, kind), t in totals.items())  # type: ignore[misc]


def summary(pending: list[PendingSummary]) -> Counter[tuple[str, Kind, int, int, int]]:
    return Counter((p.run, p.kind, p.rows, p.items, p.size) for p in pending)


def quarantined(directory: Path) -> list[Path]:
    return sorted(directory.glob("spool.db.corrupt-*"))


# --- the upgrade -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["clean", "crash"])
async def test_a_v1_spool_is_upgraded_in_place(tmp_path: Path, mode: str) -> None:
    directory = tmp_path / "spool"
    write_v1_spool(directory, mode)
    before = time.time()
    spool = Spool(directory, max_bytes=10**6)
    loaded = await spool.open()
    after = time.time()
    try:
        assert loaded.quarantined is None
        assert quarantined(directory) == []
        assert summary(loaded.pending) == expected_pending()
        assert spool.charged_bytes == sum(key[4] for key in expected_pending())
        assert sorted(loaded.runs, key=lambda r: r.run) == [
            RunUpsert("run-a", "up-a", False, {"experiment_id": "0", "status": "RUNNING"}),
            RunUpsert("run-b", None, True, {"experiment_id": "e-prov", "run_name": "b"}),
        ]
        assert loaded.params == {"run-a": {"lr": "0.1", "batch": "32"}}
        assert loaded.tags == {"run-a": {"stage": "warmup"}}
        assert loaded.experiments == [ExperimentUpsert("e-prov", None, True, "provisional-exp",
                                                       {"lifecycle_stage": "active"})]
        assert loaded.dead_letters == LEGACY_DEAD
        (dead,) = await spool.dead_letters()
        assert (dead["run_id"], dead["kind"], dead["records"], dead["status"]) == ("run-c", "metric", 5, 404)
        # Every row reads back as written, in order, with what was already delivered remembered.
        rows = [*(await spool.read_run("run-a", 100)), *(await spool.read_run("run-b", 100))]
        assert [(r.run, r.kind, r.n, r.done, r.payload, r.corrupt) for r in rows] == [
            (run, kind, n, done, body, None) for run in ("run-a", "run-b")
            for r_, kind, n, done, body in LEGACY if r_ == run
        ]
        # Legacy rows have no arrival time: their age counts from the upgrade.
        assert spool.oldest_at is not None
        assert before - 1 <= spool.oldest_at <= after + 1
    finally:
        await spool.close()
    path = directory / "spool.db"
    assert user_version(path) == SCHEMA_VERSION == 3
    assert read_db(path, "SELECT COUNT(*) FROM models") == [(0,)]  # version 3's table, made by the upgrade
    columns = {name: (decl, notnull, default) for _, name, decl, notnull, default, _ in
               read_db(path, "PRAGMA table_info(records)")}
    assert columns["source"] == ("INTEGER", 1, "0")
    assert columns["at"] == ("REAL", 1, "0")
    rows_db = read_db(path, "SELECT source, at FROM records")
    assert len(rows_db) == len(LEGACY)
    assert all(source == 0 and before - 1 <= at <= after + 1 for source, at in rows_db), rows_db
    for p in directory.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


async def test_legacy_rows_count_as_found_at_start(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    write_v1_spool(directory)
    legacy_bytes = sum(key[4] for key in expected_pending())
    new_metrics = Record("run-a", Kind.METRICS, metric_items("new", 3, start=100))
    # Room for the legacy rows and the new one only if the oldest metric row (run-a's "loss") goes.
    limit = legacy_bytes + len(new_metrics.encode()) + ROW_OVERHEAD - 1
    spool = Spool(directory, max_bytes=limit, overflow_policy="drop_oldest")
    metrics = AgentMetrics()
    ledger = Ledger(metrics)
    loaded = await spool.open()
    try:
        ledger.loaded(loaded.pending)
        legacy_items = sum(n - done for _, _, n, done, _ in LEGACY)
        assert by_kind(metrics, RECEIVED) == {"metric": 3 + 3 + 2, "param": 2, "tag": 1, "run_op": 2}
        assert received_by_source(metrics) == {FOUND_AT_START: legacy_items}

        # drop_oldest evicts a legacy metric row: dropped as "spool"
        result = await spool.append([new_metrics], source="udp")
        assert result.added == [RowChange("run-a", Kind.METRICS, 3, len(new_metrics.encode()) + ROW_OVERHEAD, "udp")]
        assert [(c.run, c.kind, c.items, c.source) for c in result.evicted] == [("run-a", Kind.METRICS, 3, "spool")]
        ledger.appended(result)

        # deliver run-a: the half-delivered legacy row and its params/tags as "spool", the new row as "udp"
        rows = await spool.read_run("run-a", 100)
        assert [(r.kind, r.n, r.done) for r in rows] == [(Kind.PARAMS, 2, 0), (Kind.TAGS, 1, 0),
                                                          (Kind.METRICS, 4, 1), (Kind.METRICS, 3, 0)]
        acked = await spool.ack({r.seq: r.n for r in rows})
        assert Counter(acked.delivered) == Counter([
            RowChange("run-a", Kind.PARAMS, 2, 0, "spool"), RowChange("run-a", Kind.TAGS, 1, 0, "spool"),
            RowChange("run-a", Kind.METRICS, 3, 0, "spool"), RowChange("run-a", Kind.METRICS, 3, 0, "udp"),
        ])
        assert len(acked.delivery_seconds) == 4
        assert all(0 <= s < 60 for s in acked.delivery_seconds)
        ledger.acked(acked)

        # the provisional run is refused upstream: its legacy rows are dead-lettered as "spool"
        dead = await spool.dead_letter_run("run-b", 400, "INVALID_PARAMETER_VALUE", "refused")
        assert {c.source for c in dead.dead} == {"spool"}
        assert sum(c.items for c in dead.dead) == 4
        ledger.acked(dead)

        assert_conserved(metrics)
        assert ledger.total_items() == 0 and spool.charged_bytes == 0 and ledger.bytes == 0
        assert by_source(metrics, DROPPED) == {"spool": 3}
        assert by_source(metrics, DEAD_LETTERED) == {"spool": 4}
        assert by_source(metrics, UPLOADED) == {"spool": 6, "udp": 3}
        assert spool.oldest_at is None
    finally:
        await spool.close()


async def test_the_upgrade_runs_once(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    write_v1_spool(directory)
    first = Spool(directory, max_bytes=10**6)
    await first.open()
    upgraded_at = first.oldest_at
    await first.append([Record("run-a", Kind.METRICS, metric_items("later", 2))], source="http")
    await first.close()
    await asyncio.sleep(0.05)  # a second upgrade would stamp a later time
    second = Spool(directory, max_bytes=10**6)
    loaded = await second.open()
    try:
        assert loaded.quarantined is None
        assert second.oldest_at == upgraded_at
        rows = await second.read_run("run-a", 100)
        assert len(rows) == 5
        # In a new lifetime every row found is the spool's, the one written over HTTP included.
        result = await second.ack({rows[-1].seq: rows[-1].n})
        assert result.delivered == [RowChange("run-a", Kind.METRICS, 2, 0, "spool")]
    finally:
        await second.close()
    sources = read_db(directory / "spool.db", "SELECT source FROM records ORDER BY seq")
    assert [s for (s,) in sources] == [0] * len(LEGACY)


# --- failures ------------------------------------------------------------------------------------


def fill_disk_during_upgrade(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """SQLite's own "database or disk is full": the spool may not grow by a page (the upgrade has to,
    it writes an arrival time into every legacy row)."""
    pages = int(read_db(path, "PRAGMA page_count")[0][0])
    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = real_connect(*args, **kwargs)
        conn.execute(f"PRAGMA max_page_count = {pages}")
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)


def write_big_v1_spool(directory: Path) -> None:
    """A v1 spool of many small rows: adding ``at`` to each of them needs new pages."""
    write_v1_spool(directory)
    conn = sqlite3.connect(directory / "spool.db", isolation_level=None)
    try:
        body = orjson.dumps([["p", "v"]])
        conn.executemany("INSERT INTO records (run, kind, n, size, body) VALUES ('run-a', 3, 1, ?, ?)",
                         [(len(body) + ROW_OVERHEAD, body)] * 3000)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


async def test_a_failed_upgrade_destroys_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the agent does about it, the legacy rows are still on disk, readable, as v1."""
    directory = tmp_path / "spool"
    write_big_v1_spool(directory)
    fill_disk_during_upgrade(monkeypatch, directory / "spool.db")
    spool = Spool(directory, max_bytes=10**8)
    with contextlib.suppress(SpoolUpgradeFailed):
        await spool.open()
    await spool.close()
    monkeypatch.undo()
    candidates = [directory / "spool.db", *quarantined(directory)]
    legacy = [p for p in candidates if p.exists() and user_version(p) == 1]
    assert len(legacy) == 1, [(p.name, user_version(p)) for p in candidates if p.exists()]
    assert read_db(legacy[0], "SELECT COUNT(*) FROM records")[0][0] == len(LEGACY) + 3000


async def test_a_failed_upgrade_leaves_the_v1_spool_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "spool"
    write_big_v1_spool(directory)
    fill_disk_during_upgrade(monkeypatch, directory / "spool.db")
    spool = Spool(directory, max_bytes=10**8)
    loaded = None
    error: SpoolUpgradeFailed | None = None
    try:
        loaded = await spool.open()
    except SpoolUpgradeFailed as exc:  # the start stops with a message; the file is kept
        error = exc
    finally:
        await spool.close()
    monkeypatch.undo()
    # the disk did fill up during the upgrade (refused with that error, or logged when moving the file)
    assert error is not None and "database or disk is full" in str(error), caplog.text
    assert "free some space" in str(error)
    if quarantined(directory) or (loaded is not None and loaded.quarantined is not None):
        raise AssertionError(f"a healthy v1 spool was moved aside: {[p.name for p in quarantined(directory)]}")
    assert user_version(directory / "spool.db") == 1  # the upgrade was one transaction: rolled back whole
    # and it works once there is room again
    spool = Spool(directory, max_bytes=10**8)
    loaded = await spool.open()
    await spool.close()
    assert sum(p.items for p in loaded.pending) == sum(n - d for _, _, n, d, _ in LEGACY) + 3000


def write_newer_spool(directory: Path) -> None:
    """What a future agent (schema 99) might leave: the v2 tables plus something new, one pending row."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    conn = sqlite3.connect(directory / "spool.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(V1_CREATE)
        conn.execute("ALTER TABLE records ADD COLUMN source INTEGER NOT NULL DEFAULT 0")
        conn.execute("ALTER TABLE records ADD COLUMN at REAL NOT NULL DEFAULT 0")
        conn.execute("CREATE TABLE future_feature (x)")
        body = orjson.dumps(metric_items("loss", 3))
        conn.execute("INSERT INTO records (run, kind, n, size, body, source, at) VALUES ('r', 2, 3, ?, ?, 1, 1.0)",
                     (len(body) + ROW_OVERHEAD, body))
        conn.execute("PRAGMA user_version = 99")
    finally:
        conn.close()


async def test_a_newer_agents_spool_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    """After a downgrade the older agent must not start on a newer agent's spool, nor move it aside (its
    records are not uploaded yet), nor change it: it stays, byte for byte, for that newer agent."""
    directory = tmp_path / "spool"
    write_newer_spool(directory)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    spool = Spool(directory, max_bytes=10**6)
    with pytest.raises(SpoolTooNew, match="schema version 99"):
        await spool.open()
    await spool.close()
    assert quarantined(directory) == []
    after = {p.name: p.read_bytes() for p in directory.iterdir() if p.name != "lock"}
    assert after == before
    assert read_db(directory / "spool.db", "SELECT run, n FROM records") == [("r", 3)]
    # The refusal released the directory: the right agent (here: a retry) is not locked out.
    again = Spool(directory, max_bytes=10**6)
    with pytest.raises(SpoolTooNew):
        await again.open()
    await again.close()


# --- helpers over the ledger's counters ------------------------------------------------------------


def by_source(metrics: AgentMetrics, family: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in metrics.registry.collect():
        if fam.name != family:
            continue
        for sample in fam.samples:
            if sample.name == f"{family}_total" and sample.value:
                out[sample.labels["source"]] = out.get(sample.labels["source"], 0.0) + sample.value
    return out


received_by_source = functools.partial(by_source, family=RECEIVED)


async def test_a_v2_spool_gains_the_models_table_and_keeps_its_rows(tmp_path: Path) -> None:
    """Version 3 adds the logged-models catalog: a version-2 spool (no such table) is upgraded in place
    and its rows read back; a model written after the upgrade survives a restart."""
    from agent.spool.store import ModelUpsert

    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=1 << 20)
    await spool.open()
    await spool.append([Record("run-a", Kind.METRICS, metric_items("loss", 3))])
    await spool.close()
    path = directory / "spool.db"
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE models")  # what a version-2 agent left
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()

    spool = Spool(directory, max_bytes=1 << 20)
    try:
        loaded = await spool.open()
        assert quarantined(directory) == []
        assert summary(loaded.pending) == Counter({("run-a", Kind.METRICS, 1, 3, loaded.pending[0].size): 1})
        assert loaded.models == []
        model = ModelUpsert("m-" + "1" * 32, None, True, {"experiment_id": "1", "name": "model", "tags": {"a": "b"}})
        await spool.write_catalog([model])
    finally:
        await spool.close()
    assert user_version(path) == SCHEMA_VERSION == 3
    spool = Spool(directory, max_bytes=1 << 20)
    try:
        assert (await spool.open()).models == [model]
    finally:
        await spool.close()
