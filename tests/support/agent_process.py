"""The agent under test, run as a real subprocess (``python -m agent run ...``).

The ``agent`` package is never imported here: tests see it only through its command line and its
HTTP endpoints (/healthz, /readyz, /metrics, /status) on the same port as the MLflow REST API.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import requests

from tests.support.ports import LOOPBACK, free_port, free_udp_port
from tests.support.processes import (
    REPO_ROOT,
    HasUrl,
    ProcessDiedError,
    kill_process,
    log_tail,
    python_env,
    spawn,
    stop_process,
    url_of,
    wait_http_ok,
)

START_TIMEOUT = 60.0

_LABEL_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[str, float]:
    """Parse Prometheus text exposition into ``{'name{labels}': value}`` with keys exactly as printed."""
    samples: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            end = line.rindex("}") + 1
            key, rest = line[:end], line[end:].split()
        else:
            key, *rest = line.split()
        if not rest:
            raise ValueError(f"malformed Prometheus sample line: {raw!r}")
        samples[key] = float(rest[0])
    return samples


def split_sample_key(key: str) -> tuple[str, dict[str, str]]:
    """``'m{a="1",b="x"}'`` -> ``('m', {'a': '1', 'b': 'x'})``."""
    if "{" not in key:
        return key, {}
    name, _, labels = key.partition("{")
    return name, {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL_RE.findall(labels)}


def sum_samples(samples: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of every sample of metric ``name`` whose labels include ``labels`` (0.0 if there is none)."""
    total = 0.0
    for key, value in samples.items():
        sample_name, sample_labels = split_sample_key(key)
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items()):
            total += value
    return total


def _upstream_arg(upstream: str | HasUrl | None) -> str:
    return "none" if upstream is None else url_of(upstream)


def _claim_log_path(directory: Path) -> Path:
    """Create and return the first unused ``directory/agent-<n>.log``."""
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        path = directory / f"agent-{n}.log"
        try:
            with open(path, "x"):
                pass
        except FileExistsError:
            n += 1
            continue
        return path


class AgentProcess:
    """One agent process: ``python -m agent run --upstream ... --http 127.0.0.1:<port> --spool-dir ...``.

    ``start()`` may be called again after ``stop()``/``sigkill()`` to restart on the same port and spool
    dir; every start writes a new ``agent-<n>.log`` next to (never inside) the spool dir.
    """

    def __init__(
        self,
        upstream: str | HasUrl | None,
        spool_dir: Path,
        extra_args: Sequence[str] = (),
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        log_level: str = "info",
    ) -> None:
        self.upstream = _upstream_arg(upstream)
        self.spool_dir = Path(spool_dir)
        self.extra_args = list(extra_args)
        self.port = port if port is not None else free_port()
        # Its own UDP port too (kept across restarts), so agents in one test run never collide on 5051.
        self.udp_port = free_udp_port()
        self.env = dict(env or {})
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.log_paths: list[Path] = []
        self._http = requests.Session()
        self._http.trust_env = False

    # -- identity -------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: point MLFLOW_TRACKING_URI here."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def tracking_uri(self) -> str:
        """Same as :attr:`url`."""
        return self.url

    @property
    def pid(self) -> int:
        """Pid of the current agent process."""
        if self.proc is None:
            raise RuntimeError("agent not started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        """True while the current agent process is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit code of the current process (None while it runs or if it never started)."""
        return None if self.proc is None else self.proc.poll()

    def command(self) -> list[str]:
        """The command line that starts the agent."""
        return [
            sys.executable, "-m", "agent", "run",
            "--upstream", self.upstream,
            "--http", f"{LOOPBACK}:{self.port}",
            "--spool-dir", str(self.spool_dir),
            "--log-format", "json",
            "--log-level", self.log_level,
            *(() if "--udp" in self.extra_args else ("--udp", f"{LOOPBACK}:{self.udp_port}")),
            *self.extra_args,
        ]  # fmt: skip

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self, wait_ready: bool = True, timeout: float = START_TIMEOUT) -> AgentProcess:
        """Start the agent; with ``wait_ready`` wait until GET /readyz answers 200."""
        if self.running:
            raise RuntimeError(f"agent {self.url} is already running (pid {self.pid})")
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = _claim_log_path(self.spool_dir.resolve().parent)
        self.log_paths.append(self.log_path)
        self.proc = spawn(self.command(), self.log_path, env=python_env(self.env), cwd=REPO_ROOT)
        if wait_ready:
            try:
                self.wait_ready(timeout)
            except BaseException:
                kill_process(self.proc)
                raise
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until GET /readyz answers 200 (raises early with the log tail if the agent exits)."""
        wait_http_ok(f"{self.url}/readyz", timeout, self._require_proc(), log_path=self.log_path)

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until GET /healthz answers 200."""
        wait_http_ok(f"{self.url}/healthz", timeout, self._require_proc(), log_path=self.log_path)

    def sigterm(self) -> None:
        """Send SIGTERM to the agent process (a graceful shutdown request); does not wait."""
        proc = self._require_proc()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)

    def sigkill(self) -> int | None:
        """SIGKILL the agent's whole process group (a crash) and reap it; returns the exit code."""
        return kill_process(self._require_proc())

    def wait(self, timeout: float = 60) -> int:
        """Wait for the agent to exit and return its exit code (TimeoutError with the log tail if not)."""
        proc = self._require_proc()
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"agent pid {proc.pid} still running after {timeout:.0f}s\n"
                f"--- log tail ---\n{self.log_tail()}"
            ) from None

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM the process group, wait up to ``timeout`` s, then SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        return stop_process(self.proc, timeout=timeout)

    def restart(self, wait_ready: bool = True, timeout: float = START_TIMEOUT) -> AgentProcess:
        """Graceful stop, then start again on the same port and spool dir."""
        self.stop()
        return self.start(wait_ready=wait_ready, timeout=timeout)

    def close(self) -> None:
        """Stop the agent and release the HTTP session."""
        try:
            self.stop()
        finally:
            self._http.close()

    # -- observation ----------------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 10) -> requests.Response:
        """GET ``path`` on the agent's port."""
        return self._http.get(f"{self.url}{path}", timeout=timeout)

    def metrics_text(self) -> str:
        """Raw GET /metrics body."""
        resp = self.get("/metrics")
        resp.raise_for_status()
        return resp.text

    def metrics(self) -> dict[str, float]:
        """GET /metrics parsed: ``{'mlflow_agent_records_uploaded_total{kind="metric"}': 12.0, ...}``."""
        return parse_prometheus(self.metrics_text())

    def metric_sum(self, name: str, **labels: str) -> float:
        """Sum over all label sets of metric ``name`` (optionally only those matching ``labels``)."""
        return sum_samples(self.metrics(), name, **labels)

    def status(self) -> dict[str, Any]:
        """GET /status as JSON."""
        resp = self.get("/status")
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data

    def wait_drained(self, timeout: float = 60, interval: float = 0.2) -> dict[str, Any]:
        """Poll /status until ``buffered_records == 0``; return that status.

        Raises ProcessDiedError if the agent exits, TimeoutError (with the last status) after ``timeout``.
        """
        proc = self._require_proc()
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | str = "no answer yet"
        while True:
            try:
                status = self.status()
                last = status
                if status.get("buffered_records") == 0:
                    return status
            except (requests.RequestException, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if proc.poll() is not None:
                raise ProcessDiedError(
                    f"agent pid {proc.pid} exited with {proc.returncode} before draining "
                    f"(last status: {last})\n--- log tail ---\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"agent did not drain within {timeout:.0f}s (last status: {last})\n"
                    f"--- log tail ---\n{self.log_tail()}"
                )
            time.sleep(interval)

    def log_text(self) -> str:
        """The whole log of the current (or last) run."""
        return self.log_path.read_text(errors="replace") if self.log_path is not None else ""

    def log_tail(self, lines: int = 60) -> str:
        """Last lines of the current (or last) run's log."""
        return log_tail(self.log_path, lines)

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError("agent not started")
        return self.proc

    def __enter__(self) -> AgentProcess:
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AgentProcess(url={self.url!r}, spool_dir={str(self.spool_dir)!r}, running={self.running})"
