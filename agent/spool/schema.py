"""The spool's SQLite schema.

One file, ``spool.db``, in WAL mode. ``records`` is the durable queue (one row per client request
and kind, in arrival order); ``history`` keeps delivered metric rows of runs the agent created, so their
whole history can be read here during an outage (let go first when room is needed); the other tables
are what the agent knows about runs, experiments and logged models, written in the same transactions
as the records they explain, so a crash never leaves them apart.
"""

from __future__ import annotations

SCHEMA_VERSION = 3

# auto_vacuum must be chosen before the first table exists: INCREMENTAL lets the agent hand freed
# pages back to the file system in small steps instead of one long VACUUM.
CREATE = """
PRAGMA auto_vacuum = INCREMENTAL;
CREATE TABLE IF NOT EXISTS records (
    seq   INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order, never reused
    run   TEXT    NOT NULL,                   -- queue: a run id as the client knows it, or "model:<model id>"
    kind  INTEGER NOT NULL,                   -- agent.records.Kind
    n     INTEGER NOT NULL,                   -- items in body
    done  INTEGER NOT NULL DEFAULT 0,         -- items already delivered upstream
    size  INTEGER NOT NULL,                   -- bytes charged against the spool limit
    body  BLOB    NOT NULL,                   -- orjson payload
    source INTEGER NOT NULL DEFAULT 0,        -- SOURCES index: where the records came in
    at    REAL    NOT NULL DEFAULT 0          -- unix time they were made durable
);
CREATE INDEX IF NOT EXISTS records_by_run ON records (run, seq);
CREATE INDEX IF NOT EXISTS records_by_kind ON records (kind, seq);
CREATE TABLE IF NOT EXISTS runs (
    run         TEXT PRIMARY KEY,             -- id the client uses
    upstream_id TEXT,                         -- NULL while provisional and not yet created upstream
    provisional INTEGER NOT NULL DEFAULT 0,   -- 1 if the agent minted the id
    info        BLOB NOT NULL                 -- orjson: experiment_id, run_name, status, times, ...
);
CREATE TABLE IF NOT EXISTS run_params (
    run TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (run, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run_tags (
    run TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (run, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS experiments (
    id          TEXT PRIMARY KEY,             -- id the client uses
    upstream_id TEXT,                         -- NULL while provisional and not yet resolved
    provisional INTEGER NOT NULL DEFAULT 0,
    name        TEXT NOT NULL,
    info        BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    seq   INTEGER PRIMARY KEY,                -- the delivered metric row's own seq
    run   TEXT    NOT NULL,
    body  BLOB    NOT NULL,
    size  INTEGER NOT NULL,                   -- charged against the spool limit (and let go first)
    at    REAL    NOT NULL DEFAULT 0          -- unix time it was delivered (and kept)
);
CREATE INDEX IF NOT EXISTS history_by_run ON history (run, seq);
CREATE TABLE IF NOT EXISTS history_lost (
    run TEXT PRIMARY KEY                      -- a run whose kept history is no longer whole
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS models (
    id          TEXT PRIMARY KEY,             -- logged model id the client uses
    upstream_id TEXT,                         -- NULL while provisional and not yet created upstream
    provisional INTEGER NOT NULL DEFAULT 0,
    info        BLOB NOT NULL                 -- orjson: experiment_id, name, source_run_id, status, tags, params, ...
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    run        TEXT    NOT NULL,
    kind       INTEGER NOT NULL,
    n          INTEGER NOT NULL,
    body       BLOB    NOT NULL,
    status     INTEGER,                       -- upstream HTTP status, if any
    error_code TEXT,
    message    TEXT    NOT NULL,
    at         REAL    NOT NULL               -- unix time
);
"""

# Upgrades from an older user_version, in order: version N's script turns N into N + 1.
MIGRATIONS: dict[int, str] = {
    1: """
ALTER TABLE records ADD COLUMN source INTEGER NOT NULL DEFAULT 0;
ALTER TABLE records ADD COLUMN at REAL NOT NULL DEFAULT 0;
""",
    2: """
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY, upstream_id TEXT, provisional INTEGER NOT NULL DEFAULT 0, info BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY, run TEXT NOT NULL, body BLOB NOT NULL, size INTEGER NOT NULL,
    at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS history_by_run ON history (run, seq);
CREATE TABLE IF NOT EXISTS history_lost (run TEXT PRIMARY KEY) WITHOUT ROWID;
""",
}

# The ``source`` column's values; rows from before version 2 say "unknown".
SOURCES = ("unknown", "http", "udp", "uds")

# Charged per row on top of the payload: SQLite's own row and index overhead, roughly. It keeps a
# spool of many tiny rows from exceeding its byte limit on disk by much.
ROW_OVERHEAD = 48
