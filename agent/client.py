"""A fire-and-forget datagram client for mlflow-agent, for hot training loops. Standard library only.

Usage::

    from agent.client import AgentClient

    client = AgentClient()  # run id from $MLFLOW_RUN_ID or mlflow's active run, address from the environment
    client.log_params({"lr": 3e-4, "batch_size": 64})
    for step in range(num_steps):
        loss, acc = train_step()
        client.log_metrics({"loss": loss, "acc": acc}, step=step)
    print(client.stats())  # {"datagrams_sent": ..., "records_dropped": ..., "dropped_buffer_full": ..., ...}
    client.close()

Every method returns within microseconds and never raises: a record that cannot be sent is counted
(``records_dropped``, by reason) and forgotten. This file imports nothing outside the standard library
and can be copied alone into another project.

Where datagrams go (``address``):

* ``"unix:/path"``, ``"/path"`` (or ``"unix:@name"``, Linux abstract namespace): a Unix datagram socket;
* ``"host:port"``, ``"udp://host:port"``, ``"[::1]:port"``: UDP;
* default: ``$MLFLOW_AGENT_UDS`` if set and the path exists when the client is made, else
  ``$MLFLOW_AGENT_UDP`` if set, else UDP ``127.0.0.1:5051`` (the agent's default). A malformed variable is
  warned about and skipped. A host name is resolved once, in the constructor (IPv4 preferred).

Delivery:

* **UDP is best effort.** The kernel takes the datagram and may drop it silently when the agent's receive
  buffer is full or nobody listens. The socket is connected, so after the kernel has learnt that the
  port is closed (an ICMP reply to an earlier datagram), the next send fails and is counted as
  ``agent_absent``; the datagrams in between are counted as sent.
* **A Unix socket gives back-pressure.** When the agent's queue is full the kernel refuses the datagram
  at once (EAGAIN, the socket never blocks): it is counted as a ``buffer_full`` drop on the client. A
  missing socket file, or one nobody reads, counts as ``agent_absent``. What the kernel refuses is always
  counted. Linux queues at most ``net.unix.max_dgram_qlen`` datagrams (often only 10) per Unix socket,
  whatever its buffer size, so a burst of many datagrams faster than the agent reads is partly refused.

Cost, on a 2-core VM: about 8.5 µs per ``log_metrics`` of 10 metrics and 5 µs per ``log_metric``, of which
about 3 µs is the send system call; when the send has to wake an idle agent, the kernel adds its wake-up
to the send (10-20 µs on that VM). The client itself never waits.

Datagram grammar (a promise: the agent parses exactly this; bytes are ASCII, non-ASCII characters in keys
and values are ``\\uXXXX`` escapes)::

    datagram = object *( "\\n" object )          ; this client sends one object per datagram
    object   = {"run_id":STRING,"metrics":[metric,...],"params":[kv,...],"tags":[kv,...]}
    metric   = {"key":STRING,"value":VALUE,"timestamp":INT,"step":INT}
    kv       = {"key":STRING,"value":STRING}
    VALUE    = finite JSON number | "NaN" | "Infinity" | "-Infinity"

An object is MLflow's ``runs/log-batch`` body; its bytes are those of ``json.dumps(body,
separators=(",", ":"), allow_nan=False)`` with non-finite values replaced by the strings above (the
encoder writes them by hand, with the same float and string spelling, because ``json.dumps`` alone costs
more than the whole call's budget). One call's records share one timestamp (milliseconds, taken at the
call unless given) and step, and are packed greedily into as few datagrams as fit in ``max_datagram``
bytes (default 8192 for a Unix socket and loopback UDP, 1432 otherwise, so that a datagram is not
fragmented), at most 1000 metrics or 100 params or tags per object (MLflow's batch limits). A record
that alone does not fit is dropped as ``too_large``. Keys are sent as given (non-strings are ``str()``-ed);
the agent validates them, and it refuses a whole object if one of its records is invalid. Param and tag
values are ``str()``-ed; metric values are ``float()``-ed, steps and timestamps ``int()``-ed, and a record
where that fails is dropped as ``error``.

Run id: the ``run_id`` argument, else ``$MLFLOW_RUN_ID``, else ``mlflow.active_run()`` if ``mlflow`` is
already imported (this module never imports it). It is looked up at the first call and again at every
call while none is found (those calls are dropped as ``no_run_id``); once found it is kept. Set
``client.run_id`` to switch runs (``None`` looks it up again).

Counters: ``datagrams_sent``, ``records_sent``, ``datagrams_dropped`` (datagrams built whose send failed),
``records_dropped`` (records = metric points + params + tags) and ``dropped_by_reason`` (records per reason:
``buffer_full``, ``agent_absent``, ``too_large``, ``no_run_id``, ``error``); ``stats()`` gives them all as
one flat dict. ``records_sent + records_dropped`` is the number of records passed in.

Threads and processes: the client is thread-safe (encoding needs no lock; one short lock covers each send
and its counting). After ``os.fork()`` the child gets its own socket and lock (at the fork, through
``os.register_at_fork``, or else at its first call, when it sees a new pid); **its counters start again
from zero**, the parent's are unaffected. A pickled client (``multiprocessing`` with ``spawn``) arrives as
a new client with the same run id, address and ``max_datagram``, and zero counters.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import math
import os
import socket
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Final, SupportsFloat

__all__ = ["DEFAULT_UDP_ADDRESS", "DROP_REASONS", "AgentClient"]

DEFAULT_UDP_ADDRESS: Final = "127.0.0.1:5051"
DROP_REASONS: Final = ("buffer_full", "agent_absent", "too_large", "no_run_id", "error")
_ENV_RUN_ID: Final = "MLFLOW_RUN_ID"
_ENV_UDS: Final = "MLFLOW_AGENT_UDS"
_ENV_UDP: Final = "MLFLOW_AGENT_UDP"
_LOCAL_MAX_DATAGRAM: Final = 8192
_REMOTE_MAX_DATAGRAM: Final = 1432  # 1500-byte MTU minus IPv6 and UDP headers, with some room
_MAX_KEY_CACHE: Final = 4096
# MLflow's log-batch limits: more in one object and the agent refuses the whole object.
_MAX_METRICS_PER_OBJECT: Final = 1000
_MAX_KV_PER_OBJECT: Final = 100

_BUFFER_FULL_ERRNOS: Final = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})
_ABSENT_ERRNOS: Final = frozenset(
    {errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN, errno.ECONNRESET, errno.EHOSTUNREACH,
     errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN, errno.EDESTADDRREQ}
)

# (prefix, suffix, room for the items and their commas, most items per object)
_Frame = tuple[str, str, int, int]


def _parse_address(text: str) -> tuple[str, str, int]:
    """``(kind, host_or_path, port)`` with kind ``"unix"`` or ``"udp"``; ValueError if malformed."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[5:]
        if path.startswith("//"):
            path = path[2:]  # unix:///run/x.sock
        if not path:
            raise ValueError(f"no socket path in {text!r}")
        return "unix", path, 0
    if text.startswith("/"):
        return "unix", text, 0
    rest = text[6:] if text.startswith("udp://") else text
    host, colon, port_text = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, as [::1]:5051, not {text!r}")
    if not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"expected unix:/path, /path, host:port or udp://host:port, not {text!r}")
    return "udp", host, int(port_text)


def _default_address() -> str:
    uds = os.environ.get(_ENV_UDS, "").strip()
    if uds and uds.lower() != "none":
        try:
            kind, path, _ = _parse_address(uds if uds.startswith(("unix:", "/")) else "unix:" + uds)
        except ValueError as exc:
            warnings.warn(f"AgentClient: ignoring ${_ENV_UDS}: {exc}", RuntimeWarning, stacklevel=3)
        else:
            if kind == "unix" and (path.startswith("@") or os.path.exists(path)):
                return "unix:" + path
    udp = os.environ.get(_ENV_UDP, "").strip()
    if udp and udp.lower() != "none":
        try:
            _parse_address(udp)
        except ValueError as exc:
            warnings.warn(f"AgentClient: ignoring ${_ENV_UDP}: {exc}", RuntimeWarning, stacklevel=3)
        else:
            return udp
    return DEFAULT_UDP_ADDRESS


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


def _resolve_udp(host: str, port: int) -> tuple[int, tuple[str, int] | tuple[str, int, int, int]]:
    """``(family, sockaddr)``: numeric hosts without a lookup, names through getaddrinfo (IPv4 first)."""
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)  # stable: keeps the resolver's order otherwise
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr  # type: ignore[return-value]


def _frame(run_id: str, kind: str, max_datagram: int) -> _Frame:
    head = '{"run_id":' + json.dumps(run_id) + ","
    if kind == "metrics":
        prefix, suffix, most = head + '"metrics":[', '],"params":[],"tags":[]}', _MAX_METRICS_PER_OBJECT
    elif kind == "params":
        prefix, suffix, most = head + '"metrics":[],"params":[', '],"tags":[]}', _MAX_KV_PER_OBJECT
    else:
        prefix, suffix, most = head + '"metrics":[],"params":[],"tags":[', "]}", _MAX_KV_PER_OBJECT
    return prefix, suffix, max_datagram - len(prefix) - len(suffix), most


def _count(items: object) -> int:
    """How many records a bad argument stood for: its length if it has one, else 1."""
    try:
        return max(len(items), 1)  # type: ignore[arg-type]
    except Exception:
        return 1


def _rebuild(run_id: str | None, address: str, max_datagram: int) -> AgentClient:
    """Unpickling: a new client, with its own socket and zero counters."""
    return AgentClient(run_id, address=address, max_datagram=max_datagram)


_LIVE: weakref.WeakSet[AgentClient] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Runs in the child right after os.fork(), before any other thread exists there."""
    try:
        clients = list(_LIVE)
    except Exception:  # the set was being changed by another thread at the fork
        return  # each client still notices the new pid at its next call
    for client in clients:
        client._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class AgentClient:
    """Sends metrics, params and tags to mlflow-agent as datagrams; see the module docstring."""

    __slots__ = (
        "__weakref__", "_address", "_agent_absent", "_buffer_full", "_closed", "_datagrams_dropped",
        "_datagrams_sent", "_dest", "_error", "_family", "_frames", "_keys", "_kind", "_lock",
        "_max_datagram", "_no_run_id", "_pid", "_records_dropped", "_records_sent", "_run_id", "_sendto",
        "_sock", "_too_large",
    )

    def __init__(self, run_id: str | None = None, *, address: str | None = None,
                 max_datagram: int | None = None) -> None:
        """ValueError for a malformed ``address`` or a ``max_datagram`` outside 1..65535; nothing else raises."""
        text = address if address is not None else _default_address()
        kind, host, port = _parse_address(text)
        if max_datagram is not None and not 0 < max_datagram <= 65535:
            raise ValueError(f"max_datagram must be between 1 and 65535, not {max_datagram}")
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._sock: socket.socket | None = None
        self._closed = False
        self._kind = kind
        self._sendto = True  # sendto(dest) per datagram; False once a UDP socket is connected
        self._keys: dict[str, str] = {}
        self._reset_counters()
        self._dest: str | bytes | tuple[str, int] | tuple[str, int, int, int] | None
        if kind == "unix":
            self._family: int = getattr(socket, "AF_UNIX", -1)
            self._dest = "\0" + host[1:] if host.startswith("@") else host
            self._address = "unix:" + host
            local = True
        else:
            self._address = f"udp://[{host}]:{port}" if ":" in host else f"udp://{host}:{port}"
            try:
                self._family, self._dest = _resolve_udp(host, port)
            except (OSError, UnicodeError) as exc:  # every call will be dropped as "error"
                warnings.warn(f"AgentClient: cannot resolve {host!r}: {exc}", RuntimeWarning, stacklevel=2)
                self._family, self._dest = -1, None
            local = _is_loopback(host) or (self._dest is not None and _is_loopback(str(self._dest[0])))
        self._max_datagram = max_datagram or (_LOCAL_MAX_DATAGRAM if local else _REMOTE_MAX_DATAGRAM)
        self._run_id: str | None = None
        self._frames: tuple[_Frame, _Frame, _Frame] | None = None
        if run_id:
            self._set_run_id(str(run_id))
        self._open()
        _LIVE.add(self)

    # public API -----------------------------------------------------------------------------------

    def log_metric(self, key: str, value: SupportsFloat, step: int = 0, timestamp: int | None = None) -> None:
        """One metric point. Never raises."""
        self._metrics(((key, value),), 1, step, timestamp)

    def log_metrics(self, metrics: Mapping[str, SupportsFloat], step: int = 0, timestamp: int | None = None) -> None:
        """Several metric points with one step and timestamp, in as few datagrams as fit. Never raises."""
        try:
            items = metrics.items()
            n = len(metrics)
        except Exception:
            self._drop("error", _count(metrics))
            return
        self._metrics(items, n, step, timestamp)

    def log_param(self, key: str, value: object) -> None:
        """One param; the value is ``str()``-ed. Never raises."""
        self._key_values(1, ((key, value),), 1)

    def log_params(self, params: Mapping[str, object]) -> None:
        """Several params. Never raises."""
        try:
            items = params.items()
            n = len(params)
        except Exception:
            self._drop("error", _count(params))
            return
        self._key_values(1, items, n)

    def set_tag(self, key: str, value: object) -> None:
        """One run tag; the value is ``str()``-ed. Never raises."""
        self._key_values(2, ((key, value),), 1)

    def set_tags(self, tags: Mapping[str, object]) -> None:
        """Several run tags. Never raises."""
        try:
            items = tags.items()
            n = len(tags)
        except Exception:
            self._drop("error", _count(tags))
            return
        self._key_values(2, items, n)

    @property
    def run_id(self) -> str | None:
        """The run id in use, looked up now if none was found yet; None if there is none."""
        if self._frames is None:
            self._find_run_id()
        return self._run_id

    @run_id.setter
    def run_id(self, value: str | None) -> None:
        """Send to another run from now on; None looks the run id up again at the next call."""
        if not value:
            self._frames = None
            self._run_id = None
        else:
            self._set_run_id(str(value))

    @property
    def address(self) -> str:
        """Where datagrams go: ``unix:/path`` or ``udp://host:port``."""
        return self._address

    @property
    def max_datagram(self) -> int:
        return self._max_datagram

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def datagrams_sent(self) -> int:
        return self._datagrams_sent

    @property
    def records_sent(self) -> int:
        return self._records_sent

    @property
    def datagrams_dropped(self) -> int:
        return self._datagrams_dropped

    @property
    def records_dropped(self) -> int:
        return self._records_dropped

    @property
    def dropped_by_reason(self) -> dict[str, int]:
        """Records dropped, per reason of DROP_REASONS (every reason present)."""
        with self._lock:
            return self._by_reason_locked()

    def stats(self) -> dict[str, int]:
        """All counters at one instant: the four totals, then ``dropped_<reason>`` for every reason."""
        with self._lock:
            out = {"datagrams_sent": self._datagrams_sent, "records_sent": self._records_sent,
                   "datagrams_dropped": self._datagrams_dropped, "records_dropped": self._records_dropped}
            for reason, n in self._by_reason_locked().items():
                out["dropped_" + reason] = n
        return out

    def _by_reason_locked(self) -> dict[str, int]:
        return {"buffer_full": self._buffer_full, "agent_absent": self._agent_absent,
                "too_large": self._too_large, "no_run_id": self._no_run_id, "error": self._error}

    def close(self) -> None:
        """Close the socket; later calls are dropped as ``error``. Idempotent."""
        with self._lock:
            self._closed = True
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()

    def __reduce__(self) -> tuple[object, tuple[str | None, str, int]]:
        return _rebuild, (self._run_id, self._address, self._max_datagram)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"AgentClient(run_id={self._run_id!r}, address={self._address!r}, "
                f"max_datagram={self._max_datagram}, {state}, records_sent={self._records_sent}, "
                f"records_dropped={self._records_dropped})")

    # encoding ------------------------------------------------------------------------------------------

    def _metrics(self, items: Iterable[tuple[str, SupportsFloat]], n: int, step: int, timestamp: int | None) -> None:
        frames = self._frames
        if frames is None:
            frames = self._find_run_id()
            if frames is None:
                self._drop("no_run_id", n)
                return
        try:
            ts = int(time.time() * 1000) if timestamp is None else int(timestamp)
            tail = f',"timestamp":{ts},"step":{int(step)}}}'
        except Exception:
            self._drop("error", n)
            return
        keys = self._keys
        frags: list[str] = []
        bad = 0
        try:
            for key, value in items:
                try:  # per record: one bad key or value costs only its own record
                    try:
                        head = keys[key]
                    except KeyError:
                        head = self._key_head(key)
                    f = value if type(value) is float else float(value)  # an exact float, numpy's too
                    if f - f == 0.0:  # finite; float.__repr__ is json's own spelling
                        frags.append(f"{head}{f!r}{tail}")
                    elif math.isnan(f):
                        frags.append(f'{head}"NaN"{tail}')
                    elif f > 0.0:
                        frags.append(f'{head}"Infinity"{tail}')
                    else:
                        frags.append(f'{head}"-Infinity"{tail}')
                except Exception:
                    bad += 1
        except Exception:  # the mapping changed while iterated, ...: the rest counts as bad too
            bad = n - len(frags)
        if bad > 0:
            self._drop("error", bad)
        if frags:
            self._pack(frames[0], frags)

    def _key_values(self, which: int, items: Iterable[tuple[str, object]], n: int) -> None:
        frames = self._frames
        if frames is None:
            frames = self._find_run_id()
            if frames is None:
                self._drop("no_run_id", n)
                return
        keys = self._keys
        frags: list[str] = []
        bad = 0
        try:
            for key, value in items:
                try:
                    try:
                        head = keys[key]
                    except KeyError:
                        head = self._key_head(key)
                    frags.append(head + json.dumps(value if type(value) is str else str(value)) + "}")
                except Exception:
                    bad += 1
        except Exception:
            bad = n - len(frags)
        if bad > 0:
            self._drop("error", bad)
        if frags:
            self._pack(frames[which], frags)

    def _key_head(self, key: object) -> str:
        """``{"key":<key>,"value":`` -- cached for str keys (bounded: cleared when full)."""
        if type(key) is not str:
            return '{"key":' + json.dumps(str(key)) + ',"value":'
        head = '{"key":' + json.dumps(key) + ',"value":'
        if len(self._keys) >= _MAX_KEY_CACHE:
            self._keys.clear()
        self._keys[key] = head
        return head

    def _pack(self, frame: _Frame, frags: list[str]) -> None:
        prefix, suffix, room, most = frame
        n = len(frags)
        body = ",".join(frags)
        if len(body) <= room and n <= most:  # the usual case: one datagram
            self._send(f"{prefix}{body}{suffix}".encode("ascii"), n)
            return
        too_large = 0
        batch: list[str] = []
        used = -1  # bytes the batch takes, commas included
        for frag in frags:
            size = len(frag)
            if size > room:
                too_large += 1
                continue
            if used + 1 + size > room or len(batch) == most:
                self._send((prefix + ",".join(batch) + suffix).encode("ascii"), len(batch))
                batch, used = [], -1
            batch.append(frag)
            used += 1 + size
        if batch:
            self._send((prefix + ",".join(batch) + suffix).encode("ascii"), len(batch))
        if too_large:
            self._drop("too_large", too_large)

    # run id ----------------------------------------------------------------------------------------

    def _set_run_id(self, run_id: str) -> tuple[_Frame, _Frame, _Frame]:
        size = self._max_datagram
        frames = (_frame(run_id, "metrics", size), _frame(run_id, "params", size), _frame(run_id, "tags", size))
        self._run_id = run_id
        self._frames = frames  # one assignment: other threads see the old frames or the new ones
        return frames

    def _find_run_id(self) -> tuple[_Frame, _Frame, _Frame] | None:
        run_id: object = os.environ.get(_ENV_RUN_ID) or None
        if run_id is None:
            mlflow = sys.modules.get("mlflow")
            if mlflow is not None:
                try:
                    run = mlflow.active_run()
                    run_id = run.info.run_id if run is not None else None
                except Exception:
                    run_id = None
        if not run_id:
            return None
        return self._set_run_id(str(run_id))

    # sending ---------------------------------------------------------------------------------------

    def _send(self, data: bytes, records: int) -> None:
        if self._pid != os.getpid():
            self._after_fork()
        with self._lock:
            sock = self._sock
            if sock is None:
                sock = self._open_locked()
                if sock is None:
                    self._count_drop_locked("error", records, 1)
                    return
            try:
                if self._sendto:
                    sock.sendto(data, self._dest)  # type: ignore[arg-type]
                else:
                    sock.send(data)
            except BlockingIOError:
                reason = "buffer_full"
            except (ConnectionRefusedError, FileNotFoundError):
                reason = "agent_absent"
            except OSError as exc:
                if exc.errno in _BUFFER_FULL_ERRNOS:
                    reason = "buffer_full"
                elif exc.errno in _ABSENT_ERRNOS:
                    reason = "agent_absent"
                elif exc.errno == errno.EMSGSIZE:
                    reason = "too_large"
                else:
                    reason = "error"
            except Exception:
                reason = "error"
            else:
                self._datagrams_sent += 1
                self._records_sent += records
                return
            self._count_drop_locked(reason, records, 1)

    def _drop(self, reason: str, records: int) -> None:
        if self._pid != os.getpid():
            self._after_fork()
        with self._lock:
            self._count_drop_locked(reason, records, 0)

    def _count_drop_locked(self, reason: str, records: int, datagrams: int) -> None:
        self._datagrams_dropped += datagrams
        self._records_dropped += records
        if reason == "buffer_full":
            self._buffer_full += records
        elif reason == "agent_absent":
            self._agent_absent += records
        elif reason == "too_large":
            self._too_large += records
        elif reason == "no_run_id":
            self._no_run_id += records
        else:
            self._error += records

    def _reset_counters(self) -> None:
        self._datagrams_sent = self._records_sent = self._datagrams_dropped = self._records_dropped = 0
        self._buffer_full = self._agent_absent = self._too_large = self._no_run_id = self._error = 0

    def _open(self) -> None:
        with self._lock:
            self._open_locked()

    def _open_locked(self) -> socket.socket | None:
        """A non-blocking socket (UDP: connected), or None if the address is unusable; never raises."""
        if self._closed or self._dest is None or self._family < 0:
            return None
        try:
            sock = socket.socket(self._family, socket.SOCK_DGRAM)
        except OSError:
            return None
        try:
            sock.setblocking(False)
        except OSError:
            sock.close()
            return None
        self._sendto = True
        if self._kind == "udp":
            try:
                sock.connect(self._dest)  # no packet, no lookup; lets the kernel report ICMP refusals
                self._sendto = False
            except OSError:  # no route yet: send unconnected (each send's outcome is counted anyway)
                pass
        self._sock = sock
        return sock

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's may have been held at the fork), a fresh socket,
        counters from zero."""
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._reset_counters()
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._open()
