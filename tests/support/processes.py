"""Start, watch and stop the real processes that tests run.

Every child is started in its own session (``start_new_session=True``) so that its pid is also the id
of a process group holding everything it forks (uvicorn workers, ...). Stopping a child signals that
whole group: SIGTERM, wait, then SIGKILL for whatever is left.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import requests

T = TypeVar("T")

#: The project checkout (the directory holding ``agent/`` and ``tests/``).
REPO_ROOT = Path(__file__).resolve().parents[2]

_lock = threading.Lock()
#: pid -> (process, log file) for every child started by :func:`spawn` and not yet stopped.
_children: dict[int, tuple[subprocess.Popen[bytes], Path | None]] = {}
#: pids of children known to lead their own process group.
_group_leaders: set[int] = set()


class HasUrl(Protocol):
    """Anything with a base URL: MlflowServer, AgentProcess, FaultyProxy."""

    @property
    def url(self) -> str: ...


def url_of(target: str | HasUrl) -> str:
    """``target`` itself if it is a string, else ``target.url``; without a trailing slash."""
    return (target if isinstance(target, str) else target.url).rstrip("/")


class ProcessDiedError(RuntimeError):
    """A child process exited while a test was waiting for it."""


def log_tail(path: Path | None, lines: int = 60) -> str:
    """Return the last ``lines`` lines of a log file ("" if there is none)."""
    if path is None:
        return ""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    text = data[-65536:].decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment plus the repository on PYTHONPATH, unbuffered output, no MLflow telemetry."""
    env = dict(os.environ)
    pythonpath = [str(REPO_ROOT)]
    if env.get("PYTHONPATH"):
        pythonpath.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    env["PYTHONUNBUFFERED"] = "1"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["DO_NOT_TRACK"] = "true"
    if extra:
        env.update(extra)
    return env


def spawn(
    cmd: Sequence[str],
    log_path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session with stdout+stderr appended to ``log_path`` (or discarded)."""
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
    else:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    with _lock:
        _children[proc.pid] = (proc, log_path)
        _group_leaders.add(proc.pid)
    return proc


def log_path_of(proc: subprocess.Popen[bytes]) -> Path | None:
    """The log file a child started by :func:`spawn` writes to."""
    with _lock:
        entry = _children.get(proc.pid)
    return entry[1] if entry is not None else None


def _own_group(proc: subprocess.Popen[bytes]) -> int | None:
    """The id of the process group ``proc`` leads, or None if it shares the group of its parent."""
    with _lock:
        if proc.pid in _group_leaders:
            return proc.pid
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            if os.getpgid(proc.pid) == proc.pid:
                return proc.pid
    return None


def _group_alive(pgid: int) -> bool:
    """True while some process of group ``pgid`` is alive (zombies left to a non-reaping init don't count)."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _signal_group(proc: subprocess.Popen[bytes], pgid: int | None, sig: signal.Signals) -> None:
    if pgid is not None and pgid != os.getpgrp():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    elif proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _forget(proc: subprocess.Popen[bytes]) -> None:
    with _lock:
        _children.pop(proc.pid, None)
        _group_leaders.discard(proc.pid)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> int | None:
    """SIGTERM the process group of ``proc``, wait up to ``timeout`` s, then SIGKILL what is left.

    Returns the exit code of ``proc`` (None only if it could not be reaped even after SIGKILL).
    """
    pgid = _own_group(proc)
    deadline = time.monotonic() + timeout
    _signal_group(proc, pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    if pgid is not None:
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
    if proc.poll() is None or (pgid is not None and _group_alive(pgid)):
        _signal_group(proc, pgid, signal.SIGKILL)
    return _reap_after_kill(proc, pgid)


def kill_process(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGKILL the whole process group of ``proc`` at once (a crash) and reap it."""
    pgid = _own_group(proc)
    _signal_group(proc, pgid, signal.SIGKILL)
    return _reap_after_kill(proc, pgid)


def _reap_after_kill(proc: subprocess.Popen[bytes], pgid: int | None) -> int | None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    if pgid is not None:
        deadline = time.monotonic() + 10
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
    if proc.poll() is not None:
        _forget(proc)
    return proc.returncode


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    *,
    interval: float = 0.1,
    message: str = "condition",
    proc: subprocess.Popen[bytes] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; raise TimeoutError after
    ``timeout`` s, or ProcessDiedError as soon as ``proc`` (if given) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            raise ProcessDiedError(
                f"process {proc.pid} exited with {proc.returncode} while waiting for {message}\n"
                f"--- log tail ---\n{log_tail(log_path_of(proc))}"
            )
        if time.monotonic() >= deadline:
            tail = log_tail(log_path_of(proc)) if proc is not None else ""
            raise TimeoutError(
                f"timed out after {timeout:.0f}s waiting for {message}"
                + (f"\n--- log tail ---\n{tail}" if tail else "")
            )
        time.sleep(interval)


def wait_http_ok(
    url: str,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    *,
    log_path: Path | None = None,
    interval: float = 0.1,
) -> None:
    """Poll GET ``url`` until it answers 200. If ``proc`` exits first, raise ProcessDiedError with the
    tail of its log (``log_path``, or the log :func:`spawn` gave it); TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with requests.Session() as session:
        session.trust_env = False  # never go through an HTTP(S)_PROXY for loopback checks
        while True:
            try:
                resp = session.get(url, timeout=5)
                if resp.status_code == 200:
                    return
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}: {exc}"
            if proc is not None and proc.poll() is not None:
                tail = log_tail(log_path or log_path_of(proc))
                raise ProcessDiedError(
                    f"process {proc.pid} exited with {proc.returncode} before {url} answered 200 "
                    f"(last: {last})\n--- log tail ---\n{tail}"
                )
            if time.monotonic() >= deadline:
                tail = log_tail(log_path or (log_path_of(proc) if proc is not None else None))
                raise TimeoutError(
                    f"{url} did not answer 200 within {timeout:.0f}s (last: {last})"
                    + (f"\n--- log tail ---\n{tail}" if tail else "")
                )
            time.sleep(interval)


@atexit.register
def _kill_leftovers() -> None:
    """Last resort: never leave children of a crashed or interrupted test session running."""
    with _lock:
        leftovers = [proc for proc, _ in _children.values()]
    for proc in leftovers:
        try:
            kill_process(proc)
        except Exception as exc:  # pragma: no cover - best effort at interpreter exit
            print(f"could not kill leftover process {proc.pid}: {exc}", file=sys.stderr)
