"""A fault-injecting HTTP reverse proxy on real sockets.

Run it as a process::

    python -m tests.support.faulty_proxy --listen 127.0.0.1:PORT --target http://127.0.0.1:P --seed N \\
        --p-503 0.1 --p-429 0.1 --retry-after 1 --p-reset-before 0.05 --p-reset-after 0.05 \\
        --p-hang 0.02 --hang-seconds 30 --log FILE

or from a test with :class:`FaultyProxy`. For each request one random draw (seeded) picks at most one
fault:

* ``http_503``: answer 503 ``{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected"}``;
* ``http_429``: answer 429 with ``Retry-After: <retry_after>``;
* ``reset_before``: read the request, then reset the connection without forwarding it;
* ``reset_after``: forward the request, read the upstream's answer, then reset the connection: the
  upstream applied the request but the client never learns it (the idempotency case);
* ``hang``: read the request and answer nothing for ``hang_seconds``, then reset.

With ``only_paths`` (comma-separated path endings) only the requests whose path ends with one of them
can get a fault.

Otherwise the request (method, path, query, body, headers but Host and hop-by-hop ones) goes to the
target and its status, body and headers (content-type, retry-after, ...) come back. An unreachable
target gives 502. ``GET /__faults`` returns the counts per kind, ``GET /__faults/config`` the current
settings, ``POST /__faults`` with a JSON object (``{"p_503": 0, "p_hang": 0, ...}``) changes them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any

import aiohttp
import requests
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from tests.support.ports import LOOPBACK, free_port
from tests.support.processes import (
    REPO_ROOT,
    HasUrl,
    kill_process,
    log_tail,
    python_env,
    spawn,
    stop_process,
    url_of,
    wait_http_ok,
)

CONTROL_PATH = "/__faults"
FAULT_KINDS = ("http_503", "http_429", "reset_before", "reset_after", "hang")
COUNT_KINDS = ("requests", "forwarded", *FAULT_KINDS, "upstream_error")
START_TIMEOUT = 60.0

# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy recomputes itself.
_SKIP_REQUEST_HEADERS = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "accept-encoding",
        "expect",
    }
)
_SKIP_RESPONSE_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "date",
        "server",
    }
)


@dataclass
class FaultConfig:
    """Fault probabilities (each in [0, 1], summing to at most 1) and their parameters."""

    p_503: float = 0.0
    p_429: float = 0.0
    p_reset_before: float = 0.0
    p_reset_after: float = 0.0
    p_hang: float = 0.0
    retry_after: int = 1
    hang_seconds: float = 30.0
    #: If set, comma-separated path endings: only requests whose path ends with one of them get faults
    #: (e.g. "runs/log-batch,runs/update" holds uploads back while reads pass).
    only_paths: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError unless the settings make sense."""
        probabilities = self.probabilities()
        for name, value in probabilities.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if sum(probabilities.values()) > 1.0 + 1e-9:
            raise ValueError(f"fault probabilities sum to more than 1: {probabilities}")
        if self.retry_after < 0 or self.hang_seconds < 0:
            raise ValueError("retry_after and hang_seconds must be >= 0")

    def probabilities(self) -> dict[str, float]:
        """``{"p_503": ..., ...}``."""
        return {
            "p_503": self.p_503,
            "p_429": self.p_429,
            "p_reset_before": self.p_reset_before,
            "p_reset_after": self.p_reset_after,
            "p_hang": self.p_hang,
        }

    def choose(self, draw: float) -> str | None:
        """The fault kind for a uniform draw in [0, 1), or None to forward normally."""
        edge = 0.0
        for kind, p in zip(FAULT_KINDS, self.probabilities().values(), strict=True):
            edge += p
            if draw < edge:
                return kind
        return None

    def updated(self, changes: Mapping[str, Any]) -> FaultConfig:
        """A validated copy with ``changes`` applied (ValueError on unknown keys or bad values)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown fault settings {sorted(unknown)}; known: {sorted(known)}")
        merged = {**asdict(self), **changes}
        return FaultConfig(
            p_503=float(merged["p_503"]),
            p_429=float(merged["p_429"]),
            p_reset_before=float(merged["p_reset_before"]),
            p_reset_after=float(merged["p_reset_after"]),
            p_hang=float(merged["p_hang"]),
            retry_after=int(merged["retry_after"]),
            hang_seconds=float(merged["hang_seconds"]),
            only_paths=str(merged["only_paths"]),
        )

    def applies_to(self, path: str) -> bool:
        return not self.only_paths or any(path.endswith(p.strip()) for p in self.only_paths.split(",") if p.strip())


def _reset(request: web.BaseRequest) -> None:
    """Drop the client's connection with a TCP RST (SO_LINGER 0), without an HTTP answer."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _json_response(
    status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(payload), content_type="application/json", headers=headers
    )


class ProxyApp:
    """The aiohttp application: fault injection in front of ``target``."""

    def __init__(self, target: str, seed: int, config: FaultConfig, log_file: IO[str] | None = None) -> None:
        self.target = target.rstrip("/")
        self.rng = random.Random(seed)
        self.config = config
        self.counts: Counter[str] = Counter({kind: 0 for kind in COUNT_KINDS})
        self.log_file = log_file
        self.session: aiohttp.ClientSession | None = None
        self.app = web.Application(client_max_size=1024**3)
        self.app.router.add_get(CONTROL_PATH, self.get_counts)
        self.app.router.add_get(f"{CONTROL_PATH}/config", self.get_config)
        self.app.router.add_post(CONTROL_PATH, self.post_config)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self.app.on_startup.append(self._open_session)
        self.app.on_cleanup.append(self._close_session)

    async def _open_session(self, _app: web.Application) -> None:
        self.session = aiohttp.ClientSession(
            # A fresh upstream connection per request: nothing stale survives an upstream restart.
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
        )

    async def _close_session(self, _app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    def _log(self, **event: Any) -> None:
        if self.log_file is not None:
            self.log_file.write(json.dumps({"time": round(time.time(), 3), **event}) + "\n")
            self.log_file.flush()

    # -- control endpoint ------------------------------------------------------------------------------

    async def get_counts(self, _request: web.Request) -> web.Response:
        return _json_response(200, dict(self.counts))

    async def get_config(self, _request: web.Request) -> web.Response:
        return _json_response(200, asdict(self.config))

    async def post_config(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object")
            self.config = self.config.updated(changes)
        except (ValueError, TypeError) as exc:
            return _json_response(400, {"error_code": "INVALID_PARAMETER_VALUE", "message": str(exc)})
        self._log(event="config", config=asdict(self.config))
        return _json_response(200, asdict(self.config))

    # -- proxying ---------------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        draw = self.rng.random()  # drawn for every request, so a seed gives the same faults whatever only_paths is
        fault = self.config.choose(draw) if self.config.applies_to(request.path) else None
        self.counts["requests"] += 1
        if fault is not None:
            self.counts[fault] += 1
        event: dict[str, Any] = {"method": request.method, "path": request.raw_path, "fault": fault}

        if fault == "http_503":
            self._log(**event, status=503)
            return _json_response(503, {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected"})
        if fault == "http_429":
            self._log(**event, status=429)
            return _json_response(
                429,
                {"error_code": "RESOURCE_EXHAUSTED", "message": "injected"},
                headers={"Retry-After": str(self.config.retry_after)},
            )
        if fault == "reset_before":
            self._log(**event, status=None)
            _reset(request)
            return web.Response(status=499)  # never sent: the connection is gone
        if fault == "hang":
            self._log(**event, status=None, hang_seconds=self.config.hang_seconds)
            await asyncio.sleep(self.config.hang_seconds)
            _reset(request)
            return web.Response(status=499)

        try:
            status, reason, headers, payload = await self._forward(request, body)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.counts["upstream_error"] += 1
            self._log(**event, status=502, upstream_error=f"{type(exc).__name__}: {exc}")
            if fault == "reset_after":
                _reset(request)
                return web.Response(status=499)
            return _json_response(
                502, {"error_code": "BAD_GATEWAY", "message": f"upstream unreachable: {type(exc).__name__}"}
            )
        if fault == "reset_after":
            self._log(**event, status=None, upstream_status=status)
            _reset(request)
            return web.Response(status=499)
        self.counts["forwarded"] += 1
        self._log(**event, status=status)
        return web.Response(status=status, reason=reason, headers=headers, body=payload)

    async def _forward(
        self, request: web.Request, body: bytes
    ) -> tuple[int, str | None, CIMultiDict[str], bytes]:
        assert self.session is not None
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _SKIP_REQUEST_HEADERS
        )
        url = URL(self.target + request.raw_path, encoded=True)
        async with self.session.request(
            request.method, url, data=body if body else None, headers=headers, allow_redirects=False
        ) as resp:
            payload = await resp.read()
            out: CIMultiDict[str] = CIMultiDict(
                (k, v) for k, v in resp.headers.items() if k.lower() not in _SKIP_RESPONSE_HEADERS
            )
            return resp.status, resp.reason, out, payload


async def serve(host: str, port: int, proxy: ProxyApp) -> None:
    """Serve ``proxy`` on host:port until SIGTERM or SIGINT."""
    runner = web.AppRunner(proxy.app, access_log=None, shutdown_timeout=1.0, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    print(f"faulty proxy listening on http://{host}:{port} -> {proxy.target}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host or LOOPBACK, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.faulty_proxy", description=__doc__)
    parser.add_argument("--listen", type=_parse_listen, required=True, help="HOST:PORT to listen on")
    parser.add_argument("--target", required=True, help="base URL of the real server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--p-503", type=float, default=0.0)
    parser.add_argument("--p-429", type=float, default=0.0)
    parser.add_argument("--retry-after", type=int, default=1, help="Retry-After seconds of injected 429s")
    parser.add_argument("--p-reset-before", type=float, default=0.0)
    parser.add_argument("--p-reset-after", type=float, default=0.0)
    parser.add_argument("--p-hang", type=float, default=0.0)
    parser.add_argument("--hang-seconds", type=float, default=30.0)
    parser.add_argument("--log", type=Path, default=None, help="file for one JSON line per request")
    args = parser.parse_args(argv)
    try:
        config = FaultConfig(
            p_503=args.p_503,
            p_429=args.p_429,
            p_reset_before=args.p_reset_before,
            p_reset_after=args.p_reset_after,
            p_hang=args.p_hang,
            retry_after=args.retry_after,
            hang_seconds=args.hang_seconds,
        )
    except ValueError as exc:
        parser.error(str(exc))
    host, port = args.listen
    with contextlib.ExitStack() as stack:
        log_file = stack.enter_context(open(args.log, "a")) if args.log is not None else None
        asyncio.run(serve(host, port, ProxyApp(args.target, args.seed, config, log_file)))
    return 0


class FaultyProxy:
    """The proxy as a subprocess on a free loopback port, in front of ``target_url``.

    Starts on construction (unless ``start=False``) and waits until it answers; stop it with
    :meth:`stop` (the ``faulty_proxy_factory`` fixture does that at teardown).
    """

    def __init__(
        self,
        target_url: str | HasUrl,
        seed: int = 0,
        *,
        p_503: float = 0.0,
        p_429: float = 0.0,
        p_reset_before: float = 0.0,
        p_reset_after: float = 0.0,
        p_hang: float = 0.0,
        retry_after: int = 1,
        hang_seconds: float = 30.0,
        port: int | None = None,
        base_dir: Path | None = None,
        start: bool = True,
    ) -> None:
        self.target_url = url_of(target_url)
        self.seed = seed
        self.initial_config = FaultConfig(
            p_503=p_503,
            p_429=p_429,
            p_reset_before=p_reset_before,
            p_reset_after=p_reset_after,
            p_hang=p_hang,
            retry_after=retry_after,
            hang_seconds=hang_seconds,
        )
        self.port = port if port is not None else free_port()
        self.base_dir = (
            Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="faulty-proxy-"))
        )
        self.base_dir.mkdir(parents=True, exist_ok=True)
        #: One JSON line per proxied request (``--log``).
        self.request_log_path = self.base_dir / f"proxy-{self.port}-requests.jsonl"
        #: The process's own stdout/stderr.
        self.log_path = self.base_dir / f"proxy-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._http = requests.Session()
        self._http.trust_env = False
        if start:
            self.start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        """Pid of the proxy process."""
        if self.proc is None:
            raise RuntimeError("proxy not started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        """True while the proxy process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        """The command line that starts the proxy with the initial settings."""
        c = self.initial_config
        return [
            sys.executable, "-m", "tests.support.faulty_proxy",
            "--listen", f"{LOOPBACK}:{self.port}",
            "--target", self.target_url,
            "--seed", str(self.seed),
            "--p-503", repr(c.p_503),
            "--p-429", repr(c.p_429),
            "--retry-after", str(c.retry_after),
            "--p-reset-before", repr(c.p_reset_before),
            "--p-reset-after", repr(c.p_reset_after),
            "--p-hang", repr(c.p_hang),
            "--hang-seconds", repr(c.hang_seconds),
            "--log", str(self.request_log_path),
        ]  # fmt: skip

    def start(self, timeout: float = START_TIMEOUT) -> FaultyProxy:
        """Start the process (initial settings, fresh counts) and wait until /__faults answers."""
        if self.running:
            raise RuntimeError(f"proxy {self.url} is already running")
        self.proc = spawn(self.command(), self.log_path, env=python_env(), cwd=REPO_ROOT)
        try:
            wait_http_ok(f"{self.url}{CONTROL_PATH}", timeout, self.proc, log_path=self.log_path)
        except BaseException:
            kill_process(self.proc)
            raise
        return self

    def counts(self) -> dict[str, int]:
        """Requests seen per kind: requests, forwarded, http_503, http_429, reset_before, reset_after,
        hang, upstream_error."""
        resp = self._http.get(f"{self.url}{CONTROL_PATH}", timeout=10)
        resp.raise_for_status()
        data: dict[str, int] = resp.json()
        return data

    def config(self) -> dict[str, float]:
        """The current fault settings."""
        resp = self._http.get(f"{self.url}{CONTROL_PATH}/config", timeout=10)
        resp.raise_for_status()
        data: dict[str, float] = resp.json()
        return data

    def set_faults(self, **settings: float | str) -> dict[str, float]:
        """Change settings at run time (``p_503=0, p_hang=0, retry_after=2, only_paths="runs/log-batch"``);
        returns the new ones."""
        resp = self._http.post(f"{self.url}{CONTROL_PATH}", json=settings, timeout=10)
        if resp.status_code != 200:
            raise ValueError(f"proxy refused {settings}: {resp.text}")
        data: dict[str, float] = resp.json()
        return data

    def clear_faults(self) -> dict[str, float]:
        """Set every fault probability to 0 so the system can settle."""
        return self.set_faults(**dict.fromkeys(FaultConfig().probabilities(), 0.0))

    def stop(self, timeout: float = 10) -> None:
        """Stop the proxy process (its group: SIGTERM, then SIGKILL)."""
        if self.proc is not None:
            stop_process(self.proc, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the proxy process."""
        if self.proc is not None:
            kill_process(self.proc)

    def close(self) -> None:
        """Stop the proxy and release the HTTP session."""
        try:
            self.stop()
        finally:
            self._http.close()

    def request_log(self) -> list[dict[str, Any]]:
        """The per-request JSON lines written so far."""
        if not self.request_log_path.exists():
            return []
        return [json.loads(line) for line in self.request_log_path.read_text().splitlines() if line.strip()]

    def log_tail(self, lines: int = 60) -> str:
        """Last lines of the process's own output."""
        return log_tail(self.log_path, lines)

    def __enter__(self) -> FaultyProxy:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FaultyProxy(url={self.url!r}, target={self.target_url!r}, running={self.running})"


if __name__ == "__main__":
    sys.exit(main())
