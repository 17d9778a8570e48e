"""Fire-and-forget ingest: a UDP socket and an optional Unix datagram socket.

Two formats per datagram, told apart by the first byte:

* JSON (first byte ``{``): one or more objects, newline-separated, each shaped like MLflow's
  ``log-batch`` body: ``{"run_id": "...", "metrics": [{"key", "value", "timestamp"?, "step"?}],
  "params": [...], "tags": [...]}``. A missing ``timestamp`` is the agent's receive time; ``step``
  defaults to 0.
* DogStatsD lines, so any StatsD library can send: ``<key>:<value>|g|#run_id:<id>,step:<n>[,ts:<ms>]``,
  one metric per line, several lines per datagram. The key may itself contain ``:`` (the value is
  after the last one). Only the gauge type ``g`` is accepted. ``|T<unix seconds>`` (DogStatsD's own
  timestamp field) is honoured when no ``ts`` tag is given; other fields (``|@rate``, ``|c:...``) are
  ignored.

Records go through the same validation as HTTP and into the same spool; what was read during one
short interval is committed together. Nothing a datagram holds can crash the endpoint: bad input is
counted by reason and sampled into the log at a bounded rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from agent import validation
from agent.catalog import Catalog, RunEntry
from agent.config import HostPort
from agent.errors import MlflowApiError
from agent.logs import RateLimiter
from agent.ops.metrics import AgentMetrics
from agent.sources.ingest import Ingest
from agent.spool.store import SpoolClosed, SpoolFull

log = logging.getLogger("agent.sources.datagram")

MAX_DATAGRAM = 65535
_COMMIT_INTERVAL = 0.005  # what arrives within this long shares one spool commit
_READS_PER_WAKEUP = 1024  # drain the socket in one go: far fewer wake-ups than one read per datagram
_MAX_BACKLOG = 200_000  # records read but not yet committed; beyond this, newest are refused


@dataclass(slots=True)
class Parsed:
    batches: list[validation.LogBatch]
    errors: list[str]  # one reason per refused object or line


def parse_datagram(data: bytes, now_ms: int) -> Parsed:
    """Every LogBatch a datagram holds, and a reason for every part that is not valid."""
    out = Parsed([], [])
    if data[:1] == b"{" or data.lstrip()[:1] == b"{":
        for line in data.split(b"\n"):
            if line.strip():
                _parse_json_object(line, now_ms, out)
    else:
        _parse_statsd(data, now_ms, out)
    return out


def _parse_json_object(line: bytes, now_ms: int, out: Parsed) -> None:
    try:
        body = orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            # Python's json module writes NaN and Infinity as bare tokens, which orjson refuses.
            body = json.loads(line)
        except (ValueError, RecursionError):
            out.errors.append("malformed")
            return
    if not isinstance(body, dict):
        out.errors.append("malformed")
        return
    metrics = body.get("metrics")
    if isinstance(metrics, list):
        for m in metrics:
            if isinstance(m, dict) and m.get("timestamp") is None:
                m["timestamp"] = now_ms  # fixed at receipt: a retried upload stays identical
    try:
        out.batches.append(validation.log_batch(body))
    except MlflowApiError as exc:
        out.errors.append(error_reason(exc))


def _parse_statsd(data: bytes, now_ms: int, out: Parsed) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        out.errors.append("malformed")
        return
    by_run: dict[str, list[dict[str, Any]]] = {}
    for raw in text.split("\n"):
        line = raw.rstrip()  # not lstrip: "  loss" is a valid MLflow key, distinct from "loss"
        if not line.strip():
            continue
        head, sep, rest = line.partition("|")
        key, colon, value = head.rpartition(":")
        if not sep or not colon or not key:
            out.errors.append("malformed")
            continue
        fields = rest.split("|")
        if fields[0] != "g":
            out.errors.append("unsupported_type")
            continue
        tags: dict[str, str] = {}
        seconds: str | None = None
        for field_ in fields[1:]:
            if field_.startswith("#"):
                for tag in field_[1:].split(","):
                    name, _, tag_value = tag.partition(":")
                    tags[name] = tag_value
            elif field_.startswith("T"):
                seconds = field_[1:]
        run_id = tags.get("run_id")
        if not run_id:
            out.errors.append("no_run_id")
            continue
        timestamp: object = tags.get("ts")
        if timestamp is None:
            timestamp = _seconds_to_ms(seconds) if seconds is not None else now_ms
        by_run.setdefault(run_id, []).append(
            {"key": key, "value": value, "timestamp": timestamp, "step": tags.get("step", "0")})
    for run_id, metrics in by_run.items():
        # Validated one by one, so one bad line does not take the good ones of its run with it.
        for metric in metrics:
            try:
                out.batches.append(validation.log_batch({"run_id": run_id, "metrics": [metric]}))
            except MlflowApiError as exc:
                out.errors.append(error_reason(exc))


def _seconds_to_ms(text: str) -> object:
    try:
        return int(text) * 1000
    except ValueError:
        return text  # validation names it


_MISSING = re.compile(r"Missing value for required parameter '([^']*)'")
_NEGATIVE_TIMESTAMP = re.compile(r"Invalid value -?\d+ for parameter 'timestamp' supplied: metric ")
_PARAMETER = re.compile(r"for parameter '([^']*)' supplied")


def error_reason(exc: MlflowApiError) -> str:
    """A short label for a validation failure, for the ``reason`` of the invalid-input counter.

    Only the fixed parts of MLflow's wording are read: the messages also quote the client's own keys
    and values, which must not change the label."""
    message = exc.message
    if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
        return "invalid_run_id"
    if message.startswith("Changing param values"):
        return "param_conflict"
    if message.startswith("The run ") and message.endswith("Current state is deleted."):
        return "run_deleted"
    if message.startswith("A batch logging request can contain at most"):
        return "too_large"
    if message.startswith("Duplicate parameter keys"):
        return "duplicate_param"
    if message.startswith("'") and " exceeds the maximum length of " in message:
        return "invalid_key"  # the quoted label is ours ('Metric name', 'tags[0].key', ...), not the client's
    if _NEGATIVE_TIMESTAMP.match(message):
        return "invalid_value"
    missing = _MISSING.match(message)
    if missing is not None:
        path = missing.group(1)
    else:
        # "Invalid value <client text> for parameter '<path>' supplied...": the last match is ours.
        found = _PARAMETER.findall(message)
        path = found[-1] if found else ""
    if path.endswith("run_id"):
        return "invalid_run_id"
    if path in ("key", "name") or path.endswith((".key", ".name")):
        return "invalid_key"
    return "invalid_value"


class DatagramSource:
    """Owns the datagram sockets, reads them without a wake-up per datagram, commits in groups."""

    def __init__(self, *, ingest: Ingest, catalog: Catalog, metrics: AgentMetrics, udp: HostPort | None,
                 uds: Path | None, uds_mode: int, rcvbuf: int) -> None:
        self.ingest = ingest
        self.catalog = catalog
        self.metrics = metrics
        self.udp_address = udp
        self.uds_path = uds
        self.uds_mode = uds_mode
        self.rcvbuf = rcvbuf
        self._sockets: list[tuple[socket.socket, str]] = []
        self._pending: list[tuple[validation.LogBatch, str]] = []
        self._pending_records = 0
        self._pending_since = 0.0  # when the oldest datagram still waiting for a commit was read
        self._flush_task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._limiter = RateLimiter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.udp_port: int | None = None
        self._uds_inode: int | None = None
        self.granted_rcvbuf: dict[str, int] = {}
        metrics.registry.register(_KernelDrops(self))

    # lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.udp_address is not None:
            family = socket.AF_INET6 if ":" in self.udp_address.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            self._configure(sock, "udp")
            sock.bind((self.udp_address.host, self.udp_address.port))
            self.udp_port = sock.getsockname()[1]
            self._add(sock, "udp")
            log.info("datagrams: listening on udp %s:%s (receive buffer %d bytes granted)",
                     self.udp_address.host, self.udp_port, self.granted_rcvbuf["udp"])
        if self.uds_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._configure(sock, "uds")
            _remove_stale_socket(self.uds_path)
            self.uds_path.parent.mkdir(parents=True, exist_ok=True)
            old = os.umask(0o177)
            try:
                sock.bind(str(self.uds_path))
            finally:
                os.umask(old)
            os.chmod(self.uds_path, self.uds_mode)
            self._uds_inode = os.stat(self.uds_path).st_ino
            self._add(sock, "uds")
            log.info("datagrams: listening on unix %s (mode %o, receive buffer %d bytes granted)",
                     self.uds_path, self.uds_mode, self.granted_rcvbuf["uds"])

    def _configure(self, sock: socket.socket, transport: str) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        self.granted_rcvbuf[transport] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if self.granted_rcvbuf[transport] < self.rcvbuf:
            log.warning("datagrams: asked for a %d-byte receive buffer on %s, the kernel granted %d "
                        "(raise net.core.rmem_max)", self.rcvbuf, transport, self.granted_rcvbuf[transport])

    def _add(self, sock: socket.socket, transport: str) -> None:
        assert self._loop is not None
        self._sockets.append((sock, transport))
        self._loop.add_reader(sock.fileno(), self._readable, sock, transport)

    async def stop(self) -> None:
        assert self._loop is not None or not self._sockets
        for sock, transport in self._sockets:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            self._read(sock, transport)  # what the kernel still holds
        if self._flush_task is not None:
            self._flush_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush_task
        with contextlib.suppress(SpoolClosed):
            await self._flush()
        for sock, _ in self._sockets:
            sock.close()
        self._sockets.clear()
        if self.uds_path is not None and self._uds_inode is not None:
            # Only our own socket file: another agent may have taken the path since.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.uds_path).st_ino == self._uds_inode:
                    self.uds_path.unlink()
            self._uds_inode = None

    async def drain_now(self) -> None:
        """Commit what was sent before now. HTTP calls this before a run's lifecycle operations, so an
        end_run over HTTP cannot overtake metrics the same process sent as datagrams just before."""
        for sock, transport in self._sockets:
            self._read(sock, transport)
        await self._flush()

    # reading ----------------------------------------------------------------------------------

    def _readable(self, sock: socket.socket, transport: str) -> None:
        self._read(sock, transport)
        if self._pending and (self._flush_task is None or self._flush_task.done()):
            self._flush_task = asyncio.ensure_future(self._flush_soon())

    def _read(self, sock: socket.socket, transport: str) -> None:
        now_ms = int(time.time() * 1000)
        received = self.metrics.datagrams.labels(transport=transport)
        # A UDP payload always fits in 64 KiB; a Unix datagram can be larger, and a cut one must be
        # refused whole, never parsed (its tail would be misread), so there recvmsg tells us.
        stream_is_unix = transport == "uds"
        for _ in range(_READS_PER_WAKEUP):
            try:
                if stream_is_unix:
                    data, _, flags, _ = sock.recvmsg(MAX_DATAGRAM)
                    if flags & socket.MSG_TRUNC:
                        received.inc()
                        self._invalid(transport, "too_large", f"a datagram over {MAX_DATAGRAM} bytes")
                        continue
                else:
                    data = sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._invalid(transport, "socket_error", str(exc))
                return
            received.inc()
            try:
                parsed = parse_datagram(data, now_ms)
            except Exception as exc:  # a parser bug must not stop the endpoint; count and sample it
                self._invalid(transport, "internal_error", f"{type(exc).__name__}: {exc}")
                continue
            for reason in parsed.errors:
                self._invalid(transport, reason, data[:200])
            for batch in parsed.batches:
                n = len(batch.metrics) + len(batch.params) + len(batch.tags)
                if self._pending_records + n > _MAX_BACKLOG:
                    self.metrics.ingest_refused.labels(source=transport, reason="backlog").inc(n)
                    continue
                if not self._pending:
                    self._pending_since = time.monotonic()
                self._pending.append((batch, transport))
                self._pending_records += n

    def _invalid(self, transport: str, reason: str, sample: object) -> None:
        self.metrics.datagram_errors.labels(transport=transport, reason=reason).inc()
        self._limiter.log(log, ("invalid", transport, reason), 10.0,
                          "datagrams: refused input on %s (%s): %r", transport, reason, sample)

    # committing -------------------------------------------------------------------------------

    async def _flush_soon(self) -> None:
        await asyncio.sleep(_COMMIT_INTERVAL)
        await self._flush()

    async def _flush(self) -> None:
        async with self._flush_lock:
            while self._pending:
                pending, self._pending, self._pending_records = self._pending, [], 0
                since = self._pending_since
                for transport, group in _by_transport(pending):
                    await self._commit(transport, group, since)

    async def _commit(self, transport: str, batches: list[validation.LogBatch], since: float) -> None:
        writes: list[tuple[RunEntry, validation.LogBatch]] = []
        for batch in batches:
            entry = self.catalog.run(batch.run_id)
            if entry is None:
                # A run the agent has not seen: an upstream id (the uploader dead-letters it if wrong).
                entry = RunEntry(batch.run_id, batch.run_id, False, {"experiment_id": None}, complete=False)
                self.catalog.add_run(entry)
                await self.ingest.spool.write_catalog([entry.upsert()])
            writes.append((entry, batch))
        try:
            errors = await self.ingest.log_many(writes, source=transport)
            self.metrics.ingest_latency.labels(source=transport).observe(time.monotonic() - since)
        except SpoolFull:
            self._refused(transport, "spool_full", writes)
            return
        except (SpoolClosed, OSError, Exception) as exc:  # storage trouble: count, never crash the endpoint
            log.error("datagrams: could not store %d write(s): %s", len(writes), exc)
            self._refused(transport, "spool_error", writes)
            return
        for error in errors:
            if error is not None:
                self._invalid(transport, error_reason(error), error.message)

    def _refused(self, transport: str, reason: str, writes: Iterable[tuple[RunEntry, validation.LogBatch]]) -> None:
        n = sum(len(b.metrics) + len(b.params) + len(b.tags) for _, b in writes)
        self.metrics.ingest_refused.labels(source=transport, reason=reason).inc(n)

    # kernel drops -----------------------------------------------------------------------------

    def kernel_drops(self) -> int | None:
        """Datagrams the kernel dropped on our UDP socket (its receive buffer was full)."""
        for sock, transport in self._sockets:
            if transport == "udp":
                return udp_socket_drops(sock)
        return None


def _by_transport(pending: list[tuple[validation.LogBatch, str]]) -> Iterator[tuple[str, list[validation.LogBatch]]]:
    groups: dict[str, list[validation.LogBatch]] = {}
    for batch, transport in pending:
        groups.setdefault(transport, []).append(batch)
    yield from groups.items()


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead process; refuse to take one a live process listens on."""
    if not path.exists():
        return
    if not path.is_socket():
        raise OSError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()  # nobody listens: stale
        return
    finally:
        probe.close()
    raise OSError(f"{path} is in use by another process (another mlflow-agent?)")


def udp_socket_drops(sock: socket.socket, proc: Path = Path("/proc/net")) -> int | None:
    """The ``drops`` column of /proc/net/udp{,6} for this socket (found by its inode), on Linux."""
    inode = os.fstat(sock.fileno()).st_ino
    for name in ("udp", "udp6"):
        try:
            lines = (proc / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) >= 13 and fields[9] == str(inode):
                return int(fields[12])
    return None


class _KernelDrops(Collector):
    def __init__(self, source: DatagramSource) -> None:
        self._source = source

    def collect(self) -> Iterable[CounterMetricFamily]:
        drops = self._source.kernel_drops()
        family = CounterMetricFamily("mlflow_agent_udp_kernel_drops",
                                     "Datagrams the kernel dropped on the UDP socket (receive buffer full).")
        if drops is not None:
            family.add_metric([], drops)
        yield family

