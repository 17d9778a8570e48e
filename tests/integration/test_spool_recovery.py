"""An unreadable spool never stops the agent: it is moved aside (kept for inspection), counted, logged
as an ERROR, and the agent starts on a fresh spool that accepts and uploads new data. Spool files are
private to the agent's user.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import AgentFactory
from tests.integration.helpers_faults import (
    DRAIN_TIMEOUT,
    FAST_AGENT_FLAGS,
    Training,
    assert_delivered_exactly_once,
    find_events,
    run_cli,
)
from tests.support.agent_process import AgentProcess
from tests.support.mlflow_server import MlflowServer

pytestmark = pytest.mark.integration

QUARANTINED = "mlflow_agent_spool_quarantined_total"
GARBAGE = b"this is not an SQLite database \x00\xff\xfe" * 200

#: Builds an unreadable spool.db in the given spool dir; returns a check that the moved-aside file
#: is still the one that was there (nothing of it destroyed).
Damage = Callable[[Path, AgentFactory], Callable[[Path], None]]


def _garbage(spool: Path, agent_factory: AgentFactory) -> Callable[[Path], None]:
    del agent_factory
    (spool / "spool.db").write_bytes(GARBAGE)
    return lambda moved: _assert_bytes(moved, GARBAGE)


def _truncated(spool: Path, agent_factory: AgentFactory) -> Callable[[Path], None]:
    """A real spool (made by an offline agent) cut to its first page: the schema survives, the tables not."""
    agent = agent_factory(None, spool_dir=spool)
    assert agent.stop() == 0
    db = spool / "spool.db"
    assert db.stat().st_size > 4096
    with open(db, "r+b") as f:
        f.truncate(4096)
    content = db.read_bytes()
    return lambda moved: _assert_bytes(moved, content)


def _assert_bytes(moved: Path, expected: bytes) -> None:
    assert moved.read_bytes() == expected, f"{moved} is not the unreadable file byte for byte"


DAMAGES: dict[str, Damage] = {"garbage": _garbage, "truncated": _truncated}


def _spool_dir(tmp_path: Path) -> Path:
    spool = tmp_path / "agent" / "spool"
    spool.mkdir(parents=True, mode=0o755)
    os.chmod(spool, 0o755)  # as loose as a user might leave it: the agent must tighten it
    return spool


def _quarantined_files(spool: Path) -> list[Path]:
    return sorted(p for p in spool.iterdir() if p.name.startswith("spool.db.corrupt-")
                  and not p.name.endswith(("-wal", "-shm")))


def _assert_private(spool: Path) -> None:
    mode = stat.S_IMODE(spool.stat().st_mode)
    assert mode == 0o700, f"spool dir {spool} has mode {mode:o}, expected 700"
    live = [p for p in spool.iterdir() if p.name == "lock" or p.name in ("spool.db", "spool.db-wal", "spool.db-shm")]
    assert any(p.name == "spool.db" for p in live), sorted(p.name for p in spool.iterdir())
    for path in live:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, f"{path.name} has mode {mode:o}, expected 600"


def _assert_quarantined_once(agent: AgentProcess, spool: Path) -> Path:
    """The agent is ready, moved exactly one file aside, counted it and logged an ERROR naming it."""
    assert agent.get("/readyz").status_code == 200
    moved = _quarantined_files(spool)
    assert len(moved) == 1, sorted(p.name for p in spool.iterdir())
    assert agent.metric_sum(QUARANTINED) == 1
    errors = [e for e in find_events(agent, str(moved[0])) if e.get("level") == "error"]
    assert len(errors) == 1, f"no ERROR log line naming {moved[0]}\n{agent.log_tail()}"
    assert errors[0]["quarantined"] == str(moved[0])
    assert "NOT uploaded" in errors[0]["msg"]
    return moved[0]


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_unreadable_spool_is_moved_aside_and_the_agent_starts(
    damage: str, mlflow_server: MlflowServer, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    spool = _spool_dir(tmp_path)
    same_as_before = DAMAGES[damage](spool, agent_factory)
    agent = agent_factory(mlflow_server, *FAST_AGENT_FLAGS, spool_dir=spool)

    moved = _assert_quarantined_once(agent, spool)
    same_as_before(moved)
    status = agent.status()
    assert status["buffered_records"] == 0
    _assert_private(spool)

    # The fresh spool is a good one: the next start finds nothing to quarantine and leaves the old file.
    agent.restart()
    assert agent.metric_sum(QUARANTINED) == 0
    assert _quarantined_files(spool) == [moved]
    assert not find_events(agent, "UNREADABLE")
    same_as_before(moved)


def test_after_quarantine_new_data_is_accepted_and_uploaded(
    mlflow_server: MlflowServer, agent_factory: AgentFactory, experiment_name: str, tmp_path: Path
) -> None:
    spool = _spool_dir(tmp_path)
    _garbage(spool, agent_factory)
    agent = agent_factory(mlflow_server, *FAST_AGENT_FLAGS, spool_dir=spool)
    _assert_quarantined_once(agent, spool)

    acked = Training(agent.url, tmp_path / "train", experiment=experiment_name, run_name="after-quarantine",
                     steps=100).run_to_end()
    agent.wait_drained(DRAIN_TIMEOUT)
    assert_delivered_exactly_once(mlflow_server.url, experiment_name, acked)
    assert agent.metric_sum("mlflow_agent_records_uploaded_total", kind="metric") == acked.metric_count
    _assert_private(spool)


def test_a_newer_agents_spool_stops_the_start_and_is_left_as_it_is(tmp_path: Path) -> None:
    """After a downgrade: the older agent must neither move a newer agent's spool aside (its records are
    not uploaded yet) nor change it; it refuses to start, saying why, and `sync` and `status` do the same."""
    spool = _spool_dir(tmp_path)
    conn = sqlite3.connect(spool / "spool.db")
    conn.execute("CREATE TABLE records (seq INTEGER PRIMARY KEY, body BLOB)")
    conn.execute("INSERT INTO records (body) VALUES (x'0102')")
    conn.execute("PRAGMA user_version = 999")
    conn.commit()
    conn.close()
    before = {p.name: p.read_bytes() for p in spool.iterdir()}
    for args in (("run", "--upstream", "none", "--http", "127.0.0.1:0", "--udp", "none"),
                 ("sync", "--upstream", "http://127.0.0.1:9"),
                 ("status",)):
        done = run_cli(*args, "--spool-dir", str(spool), timeout=60)
        assert done.returncode in (1, 2), (args, done.returncode, done.stdout, done.stderr)
        assert "schema version 999, written by a newer mlflow-agent" in done.stderr, (args, done.stderr)
        assert "ask it instead" not in done.stderr  # that hint is for a spool another agent holds
        after = {p.name: p.read_bytes() for p in spool.iterdir() if p.name != "lock"}
        assert after == {k: v for k, v in before.items() if k != "lock"}, args
        assert _quarantined_files(spool) == []
