"""The durable queue: SQLite in WAL mode, owned by one writer thread, with group commit.

Every operation is a job run on the writer thread. The thread takes all jobs queued at that moment,
runs them in one transaction (each inside its own SAVEPOINT, so one failing job does not undo the
others) and commits once: concurrent requests share a commit. A job's future resolves only after the
commit, which is what lets the HTTP source answer "200" only for data that is on disk.

The event loop never touches SQLite; it awaits futures. Counters of what is buffered live on the
event-loop side (see ``agent.spool.ledger``); jobs return the changes they made.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson

from agent.records import Kind, Record
from agent.spool.schema import CREATE, MIGRATIONS, ROW_OVERHEAD, SCHEMA_VERSION, SOURCES

log = logging.getLogger("agent.spool")

T = TypeVar("T")

DB_NAME = "spool.db"
_MAX_JOBS_PER_COMMIT = 512


class SpoolFull(Exception):
    """Raised by ``append`` when the records cannot fit, even after the overflow policy ran."""


class SpoolClosed(Exception):
    """Raised for jobs submitted after ``close``."""


class SpoolUnavailable(Exception):
    """This process cannot use the spool directory; the start stops with the message (nothing is moved)."""


class SpoolLocked(SpoolUnavailable):
    """Another process (an agent or ``sync``) holds this spool directory."""


class SpoolTooNew(SpoolUnavailable):
    """The spool was written by a newer agent: kept as it is for that agent (never quarantined)."""


class SpoolUpgradeFailed(SpoolUnavailable):
    """Upgrading an older spool's schema failed (e.g. a full disk); the file is left as it was."""


# --- what jobs take and return ------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class RunUpsert:
    run: str
    upstream_id: str | None
    provisional: bool
    info: dict[str, Any]


@dataclass(slots=True, frozen=True)
class ExperimentUpsert:
    id: str
    upstream_id: str | None
    provisional: bool
    name: str
    info: dict[str, Any]


@dataclass(slots=True, frozen=True)
class ParamPut:
    run: str
    key: str
    value: str


@dataclass(slots=True, frozen=True)
class TagPut:
    run: str
    key: str
    value: str | None  # None deletes the tag


@dataclass(slots=True, frozen=True)
class ModelUpsert:
    id: str
    upstream_id: str | None
    provisional: bool
    info: dict[str, Any]


CatalogWrite = RunUpsert | ExperimentUpsert | ParamPut | TagPut | ModelUpsert


# Records found in the spool when it was opened are labelled with this source for the process's lifetime,
# so that each source's loss identity holds per lifetime (see agent.ops.metrics).
FOUND_AT_START = "spool"


@dataclass(slots=True, frozen=True)
class RowChange:
    """Records that left (or entered) the buffer: how many items and bytes, for which run and kind."""

    run: str
    kind: Kind
    items: int
    size: int
    source: str = "http"  # http, udp, uds, or FOUND_AT_START


@dataclass(slots=True)
class AppendResult:
    added: list[RowChange]
    evicted: list[RowChange]  # metric rows dropped by the drop_oldest policy to make room


@dataclass(slots=True, frozen=True)
class Row:
    seq: int
    run: str
    kind: Kind
    n: int
    done: int
    size: int
    payload: list[Any] | dict[str, Any]
    corrupt: str | None = None  # why the body could not be decoded; the uploader dead-letters it


@dataclass(slots=True, frozen=True)
class DeadLetter:
    row_seq: int
    items: list[Any] | dict[str, Any]
    count: int
    status: int | None
    error_code: str | None
    message: str


@dataclass(slots=True)
class AckResult:
    delivered: list[RowChange]  # items now gone from the buffer because upstream has them
    dead: list[RowChange]  # items moved to the dead-letter table
    freed: list[RowChange]  # rows deleted (bytes freed), for byte accounting
    # Seconds from each fully delivered row's commit to this acknowledgement (rows found at start
    # included: their wait spans the restart).
    delivery_seconds: list[float] = field(default_factory=list)


@dataclass(slots=True)
class PendingSummary:
    run: str
    kind: Kind
    rows: int
    items: int
    size: int


@dataclass(slots=True)
class Loaded:
    """What a spool held when it was opened."""

    pending: list[PendingSummary] = field(default_factory=list)
    runs: list[RunUpsert] = field(default_factory=list)
    params: dict[str, dict[str, str]] = field(default_factory=dict)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    experiments: list[ExperimentUpsert] = field(default_factory=list)
    models: list[ModelUpsert] = field(default_factory=list)
    dead_letters: int = 0
    quarantined: Path | None = None


@dataclass(slots=True, frozen=True)
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    fut: asyncio.Future[Any]
    in_transaction: bool


# --- the spool ----------------------------------------------------------------------------------


class Spool:
    """Async facade over the writer thread. One instance per spool directory."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        overflow_policy: str = "drop_oldest",
        sync_full: bool = False,
    ) -> None:
        self.directory = directory
        self.path = directory / DB_NAME
        self.max_bytes = max_bytes
        self.overflow_policy = overflow_policy
        self.sync_full = sync_full
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._lock_fd: int | None = None
        # Owned by the writer thread: the bytes charged against max_bytes, the last row seq found at
        # open (rows up to it are FOUND_AT_START), and when the oldest row still held was written.
        self._bytes = 0
        # Bytes of delivered metric rows kept as their runs' local history (see ``ack(keep=...)``): they
        # share max_bytes with what waits, and go first when room is needed.
        self._kept_bytes = 0
        self._seq_at_open = 0
        self.oldest_at: float | None = None
        # Rows whose items are being sent upstream right now: drop_oldest must not evict them (their
        # points may already be upstream, and would be counted as dropped). Shared with the writer thread.
        self._in_flight: Counter[int] = Counter()
        self._in_flight_lock = threading.Lock()
        self.last_commit_error: str | None = None

    # lifecycle --------------------------------------------------------------------------------

    async def open(self) -> Loaded:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()
        try:
            return await self._submit(self._open_db)
        except BaseException:
            self._closed = True
            self._jobs.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            raise

    async def close(self) -> None:
        if self._closed or self._thread is None:
            return
        self._closed = True
        self._jobs.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    @property
    def charged_bytes(self) -> int:
        return self._bytes

    @property
    def history_bytes(self) -> int:
        """Bytes of delivered metrics kept as local history (read by the metrics scrape)."""
        return self._kept_bytes

    # public jobs ------------------------------------------------------------------------------

    async def append(self, records: list[Record], catalog: Iterable[CatalogWrite] = (), *,
                     source: str = "http") -> AppendResult:
        """Make records (and the catalog facts that go with them) durable. Raises SpoolFull.

        ``source`` is where they came in: http, udp or uds."""
        encoded = [(r, r.encode()) for r in records]
        writes = list(catalog)
        source_id = SOURCES.index(source)
        return await self._submit(lambda conn: self._append(conn, encoded, writes, source_id))

    @contextlib.contextmanager
    def in_flight(self, seqs: Iterable[int]) -> Iterator[None]:
        """Keep these rows from eviction while their items are being delivered (held until acked)."""
        held = list(seqs)
        with self._in_flight_lock:
            self._in_flight.update(held)
        try:
            yield
        finally:
            with self._in_flight_lock:
                self._in_flight.subtract(held)
                for seq in held:
                    if self._in_flight[seq] <= 0:
                        del self._in_flight[seq]

    async def write_catalog(self, catalog: Iterable[CatalogWrite]) -> None:
        writes = list(catalog)
        await self._submit(lambda conn: _apply_catalog(conn, writes))

    async def read_run(self, run: str, limit: int) -> list[Row]:
        return await self._submit(lambda conn: _read_run(conn, run, limit))

    async def ack(
        self,
        progress: dict[int, int],
        dead: list[DeadLetter] = (),  # type: ignore[assignment]
        catalog: Iterable[CatalogWrite] = (),
        *,
        keep: bool = False,
    ) -> AckResult:
        """Record delivery: ``progress`` maps row seq -> items of that row now delivered (or dead).

        ``keep``: fully delivered metric rows move to the ``history`` table instead of being deleted,
        so the run's whole metric history stays readable here while the upstream is away (see
        ``metric_history``); kept rows give way first whenever room is needed."""
        writes = list(catalog)
        dead_list = list(dead)
        return await self._submit(lambda conn: self._ack(conn, progress, dead_list, writes, keep))

    async def dead_letter_run(self, run: str, status: int | None, error_code: str | None, message: str) -> AckResult:
        """Move everything pending for a run to the dead-letter table (the upstream refuses the run)."""
        return await self._submit(lambda conn: self._dead_letter_run(conn, run, status, error_code, message))

    async def buffered_metric_points(self, run: str, key: str | None) -> list[list[Any]]:
        """The ``[key, value, timestamp, step]`` items of one metric (or of all: ``key=None``) still
        waiting for upload, in order."""
        return await self._submit(lambda conn: _buffered_points(conn, run, key), in_transaction=False)

    async def metric_history(self, run: str, key: str | None) -> tuple[list[list[Any]], bool]:
        """The points of one metric (or all) this spool holds for a run, delivered ones kept as history
        included, and whether that is all the run ever had through this spool (no kept row was let go)."""
        return await self._submit(lambda conn: _history_points(conn, run, key), in_transaction=False)

    async def forget_history(self, run: str, catalog: Iterable[CatalogWrite] = ()) -> None:
        """The run ended: its delivered metrics need not be kept any longer."""
        writes = list(catalog)
        await self._submit(lambda conn: self._forget_history(conn, run, writes))

    async def expire_history(self, max_age: float) -> list[str]:
        """Let go the history of runs that got nothing delivered for ``max_age`` seconds (a run that never
        ended, its process gone); returns those runs."""
        return await self._submit(lambda conn: self._expire_history(conn, time.time() - max_age))

    async def pending_tag_deletes(self, run: str, kind: Kind = Kind.DELETE_TAG) -> list[str]:
        """Keys of a run's (or, with ``Kind.DELETE_MODEL_TAG``, a model queue's) tag deletions still
        waiting for upload."""
        return await self._submit(lambda conn: _pending_tag_deletes(conn, run, kind), in_transaction=False)

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        return await self._submit(lambda conn: _list_dead_letters(conn, limit))

    async def maintenance(self) -> dict[str, int]:
        """Give freed pages back to the file system and keep the WAL short."""
        return await self._submit(_maintenance, in_transaction=False)

    def file_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += os.stat(str(self.path) + suffix).st_size
        return total

    # writer thread ----------------------------------------------------------------------------

    async def _submit(self, fn: Callable[[sqlite3.Connection], T], *, in_transaction: bool = True) -> T:
        if self._closed:
            raise SpoolClosed("spool is closed")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put(_Job(fn, fut, in_transaction))
        return await fut

    def _run(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                break
            batch = [first]
            stop = False
            while len(batch) < _MAX_JOBS_PER_COMMIT:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._run_batch(batch)
            if stop:
                break
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        self._release_lock()

    def _run_batch(self, jobs: list[_Job]) -> None:
        conn = self._conn
        # The open job runs before there is a connection; maintenance (checkpoints, vacuum) must
        # run outside a transaction. Both run alone.
        alone = [j for j in jobs if conn is None or not j.in_transaction]
        batch = [(j.fn, j.fut) for j in jobs if conn is not None and j.in_transaction]
        if batch:
            assert conn is not None
            self._run_transaction(conn, batch)
        for job in alone:
            try:
                self._deliver([(job.fut, job.fn(self._conn), None)])  # type: ignore[arg-type]
            except BaseException as exc:  # delivered to the awaiting coroutine
                self._deliver([(job.fut, None, exc)])

    def _run_transaction(
        self, conn: sqlite3.Connection, batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]]
    ) -> None:
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        bytes_before = self._bytes, self._kept_bytes
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._deliver([(fut, None, exc) for _, fut in batch])
            return
        for fn, fut in batch:
            job_bytes = self._bytes, self._kept_bytes
            conn.execute("SAVEPOINT job")
            try:
                result = fn(conn)
            except BaseException as exc:
                self._bytes, self._kept_bytes = job_bytes
                try:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                except sqlite3.Error:
                    log.exception("spool: could not roll back a failed job")
                outcomes.append((fut, None, exc))
            else:
                conn.execute("RELEASE job")
                outcomes.append((fut, result, None))
        try:
            conn.execute("COMMIT")
            self.last_commit_error = None
        except sqlite3.Error as exc:
            # Disk full or I/O error: nothing of this batch is durable, so nobody gets a success.
            self._bytes, self._kept_bytes = bytes_before
            self.last_commit_error = str(exc)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            log.error("spool commit failed: %s", exc)
            outcomes = [(fut, None, exc) for fut, _, _ in outcomes]
        self._deliver(outcomes)

    def _deliver(self, outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
            self._loop.call_soon_threadsafe(_resolve_all, outcomes)

    # jobs (run on the writer thread) ----------------------------------------------------------

    def _open_db(self, _: sqlite3.Connection | None) -> Loaded:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(OSError):
            os.chmod(self.directory, 0o700)
        self._take_lock()
        quarantined: Path | None = None
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            loaded = _load(conn)
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            if _is_busy(exc):
                # A healthy file someone else holds open: not ours to move aside.
                raise SpoolLocked(f"spool {self.path} is locked by another process: {exc}") from exc
            quarantined = self._quarantine(exc)
            conn = self._connect()
            loaded = _load(conn)
        loaded.quarantined = quarantined
        self._conn = conn
        self._bytes = sum(p.size for p in loaded.pending)
        self._kept_bytes = int(conn.execute("SELECT COALESCE(SUM(size), 0) FROM history").fetchone()[0])
        self._seq_at_open = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0])
        self._note_oldest(conn)
        return loaded

    def _take_lock(self) -> None:
        """One process per spool: two writers would upload the same records twice."""
        path = self.directory / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpoolLocked(f"spool directory {self.directory} is in use by another mlflow-agent "
                              f"(pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _connect(self) -> sqlite3.Connection:
        old_umask = os.umask(0o077)  # spool files readable by the agent's user only
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        finally:
            os.umask(old_umask)
        try:
            # Read before anything changes the file: a newer agent's spool must stay exactly as it is.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SpoolTooNew(f"spool {self.path} has schema version {version}, written by a newer "
                                  f"mlflow-agent (this one knows up to {SCHEMA_VERSION}): upload it with that "
                                  "version's `sync`, or point --spool-dir elsewhere")
            # Must come before anything else touches a new file, or it has no effect.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {'FULL' if self.sync_full else 'NORMAL'}")
            conn.execute("PRAGMA journal_size_limit = 67108864")
            conn.execute("PRAGMA cache_size = -8192")  # 8 MiB page cache: enough, and bounded
            if version == 0:
                conn.executescript(CREATE)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                self._migrate(conn, version)
        except BaseException:
            conn.close()
            raise
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.chmod(str(self.path) + suffix, 0o600)
        return conn

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        """Upgrade a spool written by an older agent in one transaction (nothing is lost or rewritten)."""
        if version not in MIGRATIONS:
            raise sqlite3.DatabaseError(f"unknown spool schema version {version}")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                while version < SCHEMA_VERSION:
                    for statement in filter(str.strip, MIGRATIONS[version].split(";")):
                        conn.execute(statement)
                    version += 1
                # Rows written before arrival times were kept: count their age from now.
                conn.execute("UPDATE records SET at = ? WHERE at = 0", (time.time(),))
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            if isinstance(exc, sqlite3.DatabaseError) and _is_busy(exc):
                raise
            # The rollback left the old file whole: never quarantine a readable spool over a full disk.
            raise SpoolUpgradeFailed(f"spool {self.path} could not be upgraded to schema version {SCHEMA_VERSION} "
                                     f"({exc}); it is unchanged: free some space and start again") from exc
        log.info("spool %s upgraded to schema version %d", self.path, SCHEMA_VERSION)

    def _quarantine(self, exc: BaseException) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.directory / f"{DB_NAME}.corrupt-{stamp}"
        n = 1
        while any(Path(str(target) + s).exists() for s in ("", "-wal", "-shm")):
            n += 1  # never overwrite an earlier quarantined file
            target = self.directory / f"{DB_NAME}.corrupt-{stamp}-{n}"
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                src.rename(Path(str(target) + suffix))
        log.error(
            "SPOOL UNREADABLE: %s: moved aside to %s and started an empty spool; "
            "its records were NOT uploaded (inspect or delete the file)",
            exc,
            target,
            extra={"quarantined": str(target)},
        )
        return target

    def _label(self, seq: int, source: int) -> str:
        return FOUND_AT_START if seq <= self._seq_at_open else SOURCES[source] if 0 <= source < len(SOURCES) \
            else SOURCES[0]

    def _note_oldest(self, conn: sqlite3.Connection) -> None:
        """After rows left: when the oldest row still held was written (rows are in seq order)."""
        row = conn.execute("SELECT at FROM records ORDER BY seq LIMIT 1").fetchone()
        self.oldest_at = float(row[0]) if row is not None else None

    def _append(
        self, conn: sqlite3.Connection, encoded: list[tuple[Record, bytes]], writes: list[CatalogWrite], source: int
    ) -> AppendResult:
        incoming = sum(len(body) + ROW_OVERHEAD for _, body in encoded)
        evicted: list[RowChange] = []
        if self._bytes + self._kept_bytes + incoming > self.max_bytes:
            self._let_history_go(conn, self._bytes + self._kept_bytes + incoming - self.max_bytes)
        if self._bytes + incoming > self.max_bytes:
            if self.overflow_policy != "drop_oldest":
                raise SpoolFull(f"spool holds {self._bytes} of {self.max_bytes} bytes")
            evicted = self._evict_metrics(conn, self._bytes + incoming - self.max_bytes)
            if self._bytes + incoming > self.max_bytes:
                raise SpoolFull(f"spool holds {self._bytes} of {self.max_bytes} bytes and no metric is left to drop")
        _apply_catalog(conn, writes)
        added: list[RowChange] = []
        insert = "INSERT INTO records (run, kind, n, size, body, source, at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        now = time.time()
        for record, body in encoded:
            size = len(body) + ROW_OVERHEAD
            conn.execute(insert, (record.run, int(record.kind), record.count, size, body, source, now))
            added.append(RowChange(record.run, record.kind, record.count, size, SOURCES[source]))
        self._bytes += incoming
        if self.oldest_at is None or evicted:
            self._note_oldest(conn)
        return AppendResult(added=added, evicted=evicted)

    def _let_history_go(self, conn: sqlite3.Connection, need: int) -> None:
        """Free ``need`` bytes (or all there are) of kept history, oldest first; those runs' local history
        is incomplete from now on. Nothing is lost: the upstream has those points."""
        freed = 0
        while freed < need:
            rows = conn.execute("SELECT seq, run, size FROM history ORDER BY seq LIMIT 256").fetchall()
            if not rows:
                break
            victims = []
            for seq, run, size in rows:
                victims.append((seq,))
                conn.execute("INSERT OR IGNORE INTO history_lost (run) VALUES (?)", (run,))
                freed += size
                if freed >= need:
                    break
            conn.executemany("DELETE FROM history WHERE seq = ?", victims)
        self._kept_bytes -= freed

    def _forget_history(self, conn: sqlite3.Connection, run: str, writes: list[CatalogWrite]) -> None:
        freed = conn.execute("SELECT COALESCE(SUM(size), 0) FROM history WHERE run = ?", (run,)).fetchone()[0]
        conn.execute("DELETE FROM history WHERE run = ?", (run,))
        conn.execute("INSERT OR IGNORE INTO history_lost (run) VALUES (?)", (run,))
        self._kept_bytes -= int(freed)
        _apply_catalog(conn, writes)

    def _expire_history(self, conn: sqlite3.Connection, before: float) -> list[str]:
        runs = [run for (run,) in conn.execute("SELECT run FROM history GROUP BY run HAVING MAX(at) < ?", (before,))]
        for run in runs:
            self._forget_history(conn, run, [])
        return runs

    def _evict_metrics(self, conn: sqlite3.Connection, need: int) -> list[RowChange]:
        """Drop the oldest metric rows until ``need`` bytes are free (the drop_oldest policy)."""
        evicted: list[RowChange] = []
        freed = 0
        after = 0
        with self._in_flight_lock:
            busy = set(self._in_flight)
        while freed < need:
            rows = conn.execute(
                "SELECT seq, run, n, done, size, source FROM records WHERE kind = ? AND seq > ? ORDER BY seq LIMIT 256",
                (int(Kind.METRICS), after),
            ).fetchall()
            if not rows:
                break
            after = rows[-1][0]
            victims = []
            for seq, run, n, done, size, source in rows:
                if seq in busy:
                    continue
                victims.append((seq,))
                evicted.append(RowChange(run, Kind.METRICS, n - done, size, self._label(seq, source)))
                freed += size
                if freed >= need:
                    break
            conn.executemany("DELETE FROM records WHERE seq = ?", victims)
        self._bytes -= freed
        return evicted

    def _ack(
        self,
        conn: sqlite3.Connection,
        progress: dict[int, int],
        dead: list[DeadLetter],
        writes: list[CatalogWrite],
        keep: bool = False,
    ) -> AckResult:
        result = AckResult(delivered=[], dead=[], freed=[])
        dead_by_seq: dict[int, int] = {}
        now = time.time()
        for letter in dead:
            row = conn.execute("SELECT run, kind, source FROM records WHERE seq = ?", (letter.row_seq,)).fetchone()
            if row is None:
                continue  # the row was evicted meanwhile; its items were counted as dropped
            conn.execute(
                "INSERT INTO dead_letters (run, kind, n, body, status, error_code, message, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (row[0], row[1], letter.count, orjson.dumps(letter.items), letter.status,
                 letter.error_code, letter.message, now),
            )
            dead_by_seq[letter.row_seq] = dead_by_seq.get(letter.row_seq, 0) + letter.count
            result.dead.append(RowChange(row[0], Kind(row[1]), letter.count, 0, self._label(letter.row_seq, row[2])))
        for seq, new_done in progress.items():
            row = conn.execute("SELECT run, kind, n, done, size, source, at FROM records WHERE seq = ?",
                               (seq,)).fetchone()
            if row is None:
                continue  # evicted meanwhile (already counted as dropped)
            run, kind, n, done, size, source, at = row
            label = self._label(seq, source)
            moved = min(new_done, n) - done
            moved = max(moved, 0)
            delivered = moved - dead_by_seq.get(seq, 0)
            if delivered > 0:
                result.delivered.append(RowChange(run, Kind(kind), delivered, 0, label))
            if new_done >= n:
                if keep and kind == Kind.METRICS:
                    if dead_by_seq.get(seq):  # some of it is not upstream: the local copy would differ
                        conn.execute("INSERT OR IGNORE INTO history_lost (run) VALUES (?)", (run,))
                    else:
                        conn.execute("INSERT INTO history (seq, run, body, size, at) SELECT seq, run, body, size, ?"
                                     " FROM records WHERE seq = ?", (now, seq))
                        self._kept_bytes += size
                conn.execute("DELETE FROM records WHERE seq = ?", (seq,))
                self._bytes -= size
                result.freed.append(RowChange(run, Kind(kind), 0, size, label))
                if delivered > 0:
                    result.delivery_seconds.append(max(now - at, 0.0))
            elif moved > 0:
                conn.execute("UPDATE records SET done = ? WHERE seq = ?", (new_done, seq))
        _apply_catalog(conn, writes)
        if result.freed:
            self._note_oldest(conn)
        return result

    def _dead_letter_run(
        self, conn: sqlite3.Connection, run: str, status: int | None, error_code: str | None, message: str
    ) -> AckResult:
        result = AckResult(delivered=[], dead=[], freed=[])
        now = time.time()
        rows = conn.execute(
            "SELECT seq, kind, n, done, size, body, source FROM records WHERE run = ? ORDER BY seq", (run,)
        ).fetchall()
        self._forget_history(conn, run, [])
        for seq, kind, n, done, size, body, source in rows:
            label = self._label(seq, source)
            conn.execute(
                "INSERT INTO dead_letters (run, kind, n, body, status, error_code, message, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (run, kind, n - done, _undelivered(body, done), status, error_code, message, now),
            )
            conn.execute("DELETE FROM records WHERE seq = ?", (seq,))
            self._bytes -= size
            result.dead.append(RowChange(run, Kind(kind), n - done, 0, label))
            result.freed.append(RowChange(run, Kind(kind), 0, size, label))
        self._note_oldest(conn)
        return result


# --- helpers run on the writer thread ------------------------------------------------------------


def _resolve_all(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, result, exc in outcomes:
        if fut.cancelled():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


def _apply_catalog(conn: sqlite3.Connection, writes: list[CatalogWrite]) -> None:
    for w in writes:
        if isinstance(w, ParamPut):
            conn.execute(
                "INSERT OR IGNORE INTO run_params (run, key, value) VALUES (?, ?, ?)", (w.run, w.key, w.value)
            )
        elif isinstance(w, TagPut):
            if w.value is None:
                conn.execute("DELETE FROM run_tags WHERE run = ? AND key = ?", (w.run, w.key))
            else:
                conn.execute(
                    "INSERT OR REPLACE INTO run_tags (run, key, value) VALUES (?, ?, ?)", (w.run, w.key, w.value)
                )
        elif isinstance(w, RunUpsert):
            conn.execute(
                "INSERT OR REPLACE INTO runs (run, upstream_id, provisional, info) VALUES (?, ?, ?, ?)",
                (w.run, w.upstream_id, int(w.provisional), orjson.dumps(w.info)),
            )
        elif isinstance(w, ModelUpsert):
            conn.execute(
                "INSERT OR REPLACE INTO models (id, upstream_id, provisional, info) VALUES (?, ?, ?, ?)",
                (w.id, w.upstream_id, int(w.provisional), orjson.dumps(w.info)),
            )
        else:
            conn.execute(
                "INSERT OR REPLACE INTO experiments (id, upstream_id, provisional, name, info) VALUES (?, ?, ?, ?, ?)",
                (w.id, w.upstream_id, int(w.provisional), w.name, orjson.dumps(w.info)),
            )


def _is_busy(exc: sqlite3.DatabaseError) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and any(w in str(exc).lower() for w in ("locked", "busy"))


def _undelivered(body: bytes, done: int) -> bytes:
    """The part of a row's payload not yet delivered (the whole body if it cannot be read)."""
    if done == 0:
        return body
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    return orjson.dumps(payload[done:]) if isinstance(payload, list) else body


def _read_run(conn: sqlite3.Connection, run: str, limit: int) -> list[Row]:
    rows = conn.execute(
        "SELECT seq, kind, n, done, size, body FROM records WHERE run = ? ORDER BY seq LIMIT ?", (run, limit)
    ).fetchall()
    out = []
    for seq, kind, n, done, size, body in rows:
        try:
            out.append(Row(seq, run, Kind(kind), n, done, size, orjson.loads(body)))
        except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
            # One damaged row must not stall its run forever: hand it over to be dead-lettered,
            # with its bytes kept for inspection.
            out.append(Row(seq, run, Kind(kind), n, done, size, {"unreadable_body": bytes(body).hex()},
                           corrupt=f"{type(exc).__name__}: {exc}"))
    return out


def _buffered_points(conn: sqlite3.Connection, run: str, key: str | None) -> list[list[Any]]:
    out: list[list[Any]] = []
    for done, body in conn.execute(
        "SELECT done, body FROM records WHERE run = ? AND kind = ? ORDER BY seq", (run, int(Kind.METRICS))
    ):
        try:
            items = orjson.loads(body)
        except orjson.JSONDecodeError:
            continue  # a damaged row: the uploader dead-letters it
        if isinstance(items, list):
            # [key, value, timestamp, step] plus, for points logged with a model or dataset, a dict of those
            out.extend(item for item in items[done:]
                       if isinstance(item, list) and len(item) >= 4 and (key is None or item[0] == key))
    return out


def _history_points(conn: sqlite3.Connection, run: str, key: str | None) -> tuple[list[list[Any]], bool]:
    out: list[list[Any]] = []
    # Kept rows and rows still waiting, whole and in arrival order: a waiting row's first ``done`` items are
    # delivered, and part of the history too.
    for (body,) in conn.execute(
        "SELECT body FROM (SELECT seq, body FROM history WHERE run = ?"
        " UNION ALL SELECT seq, body FROM records WHERE run = ? AND kind = ?) ORDER BY seq",
        (run, run, int(Kind.METRICS)),
    ):
        try:
            items = orjson.loads(body)
        except orjson.JSONDecodeError:
            continue  # a damaged row: the uploader dead-letters it
        if isinstance(items, list):
            out.extend(item for item in items
                       if isinstance(item, list) and len(item) >= 4 and (key is None or item[0] == key))
    lost = conn.execute("SELECT 1 FROM history_lost WHERE run = ?", (run,)).fetchone() is not None
    return out, not lost


def _pending_tag_deletes(conn: sqlite3.Connection, run: str, kind: Kind) -> list[str]:
    keys: list[str] = []
    for (body,) in conn.execute("SELECT body FROM records WHERE run = ? AND kind = ? ORDER BY seq",
                                (run, int(kind))):
        with contextlib.suppress(orjson.JSONDecodeError):
            payload = orjson.loads(body)
            if isinstance(payload, dict) and isinstance(payload.get("key"), str):
                keys.append(payload["key"])
    return keys


def _load(conn: sqlite3.Connection) -> Loaded:
    loaded = Loaded()
    known = ", ".join(str(int(k)) for k in Kind)
    # Rows this version cannot interpret (a damaged kind) go to the dead-letter table, not in the way.
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(
        "INSERT INTO dead_letters (run, kind, n, body, status, error_code, message, at)"
        " SELECT run, kind, n - done, body, NULL, NULL, 'unknown record kind', ? FROM records"
        f" WHERE kind NOT IN ({known})",
        (time.time(),),
    )
    conn.execute(f"DELETE FROM records WHERE kind NOT IN ({known})")
    conn.execute("COMMIT")
    # A cheap structural check: reading every table end to end surfaces a damaged file now, at
    # start, where it can be moved aside, rather than in the middle of an upload.
    for run, kind, rows, items, size in conn.execute(
        "SELECT run, kind, COUNT(*), SUM(n - done), SUM(size) FROM records GROUP BY run, kind"
    ):
        loaded.pending.append(PendingSummary(run, Kind(kind), rows, items, size))
    for run, upstream_id, provisional, info in conn.execute("SELECT run, upstream_id, provisional, info FROM runs"):
        loaded.runs.append(RunUpsert(run, upstream_id, bool(provisional), orjson.loads(info)))
    for run, key, value in conn.execute("SELECT run, key, value FROM run_params"):
        loaded.params.setdefault(run, {})[key] = value
    for run, key, value in conn.execute("SELECT run, key, value FROM run_tags"):
        loaded.tags.setdefault(run, {})[key] = value
    for eid, upstream_id, provisional, name, info in conn.execute(
        "SELECT id, upstream_id, provisional, name, info FROM experiments"
    ):
        loaded.experiments.append(ExperimentUpsert(eid, upstream_id, bool(provisional), name, orjson.loads(info)))
    for mid, upstream_id, provisional, info in conn.execute("SELECT id, upstream_id, provisional, info FROM models"):
        loaded.models.append(ModelUpsert(mid, upstream_id, bool(provisional), orjson.loads(info)))
    loaded.dead_letters = conn.execute("SELECT COALESCE(SUM(n), 0) FROM dead_letters").fetchone()[0]
    return loaded


def _list_dead_letters(conn: sqlite3.Connection, limit: int) -> list[dict[str, Any]]:
    out = []
    for id_, run, kind, n, status, code, message, at in conn.execute(
        "SELECT id, run, kind, n, status, error_code, message, at FROM dead_letters ORDER BY id DESC LIMIT ?",
        (limit,),
    ):
        label = Kind(kind).label if kind in Kind._value2member_map_ else f"unknown({kind})"
        out.append({"id": id_, "run_id": run, "kind": label, "records": n, "status": status,
                    "error_code": code, "message": message, "at": at})
    return out


def _maintenance(conn: sqlite3.Connection) -> dict[str, int]:
    free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    if free > 256:
        # executescript steps the pragma to completion; a plain execute frees one page per step.
        conn.executescript("PRAGMA incremental_vacuum(4096);")
    # PASSIVE never waits for readers; with journal_size_limit it also shrinks the WAL file.
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    return {"freelist_pages": free}


