"""An authenticating HTTP reverse proxy on real sockets, in the manner of an Azure API gateway.

Run it as a process::

    python -m tests.support.auth_gateway --listen 127.0.0.1:PORT --target http://127.0.0.1:P \\
        --secret S [--p-429 0.0 --retry-after 1 --seed N --reject-status 401 --log FILE]

or from a test with :class:`AuthGateway`. A request goes to the target (method, path, query, body and
headers but Host, hop-by-hop ones and Authorization) only if it carries ``Authorization: Bearer
<token>`` with a valid, unexpired token (see :func:`mint_token`)::

    token = f"{exp_ms}.{hmac_sha256_hex(secret, str(exp_ms))}"

where ``exp_ms`` (unix milliseconds) is in the future, or an HS256 JWT keyed with the same secret whose
``exp`` claim is in the future (:func:`mint_jwt`). Anything else is refused with ``--reject-status``
(401 by default) and an Azure-style JSON envelope::

    {"error": {"code": "Unauthorized", "message": "...", "innerError": {"code": "<reason>", ...}},
     "correlation": {"operation": "<uuid>", "request": "<uuid>"}}

plus the headers ``x-ms-request-id`` (= ``correlation.request``) and ``WWW-Authenticate``. The reason is
one of ``missing`` (no Authorization header, or not a Bearer one), ``bad_signature`` (malformed, or
signed with another secret), ``expired`` or ``revoked`` (``exp_ms <= revoke_before_ms``, a setting that
lets a test invalidate every token issued so far, or the token was revoked by ``POST /__revoke``: every
valid token seen so far). Error messages never echo the token.

With ``p_429`` a seeded random share of authenticated requests is answered 429 (``TooManyRequests``
envelope, ``Retry-After: <retry_after>``) instead of being forwarded. An unreachable target gives 502.

``GET /__stats`` returns the counts (requests, forwarded, unauthorized by reason, throttled,
upstream_error, distinct_tokens: how many different valid tokens were seen), ``GET /__config`` the
settings, ``POST /__config`` with a JSON object changes them. ``--log`` gets one JSON line per request
(time it was judged, method, path, outcome, reason, status, ``done`` for forwarded ones, the token's
expiry and a short fingerprint of it; never the token itself). ``POST /__revoke`` revokes every valid
token seen so far.

The module also holds what the token sources under test need: :func:`mint_token`,
:func:`write_token_command` (an executable script that prints a fresh token, optionally failing while a
flag file exists) and :class:`TokenFileRotator` (a thread that rewrites a token file atomically).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import random
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

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

STATS_PATH = "/__stats"
CONFIG_PATH = "/__config"
REVOKE_PATH = "/__revoke"
#: Why a request was refused.
REASONS = ("missing", "bad_signature", "expired", "revoked")
START_TIMEOUT = 60.0

# Hop-by-hop headers (RFC 9110 7.6.1), those the gateway recomputes, and the credential it consumes.
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
        "authorization",
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

_MESSAGES = {
    "missing": "The request does not carry a bearer token. Send 'Authorization: Bearer <token>'.",
    "bad_signature": "The access token is malformed or its signature is invalid.",
    "expired": "The access token has expired. Acquire a new token and retry.",
    "revoked": "The access token has been revoked. Acquire a new token and retry.",
}
_STATUS_CODES = {401: "Unauthorized", 403: "Forbidden"}


# -- tokens -----------------------------------------------------------------------------------------------


def sign(secret: str, message: str) -> str:
    """``hmac_sha256_hex(secret, message)``."""
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def mint_token(secret: str, ttl_seconds: float, *, now: float | None = None) -> str:
    """A token the gateway accepts until ``now + ttl_seconds`` (unix seconds; negative ttl: expired)."""
    exp_ms = int(((time.time() if now is None else now) + ttl_seconds) * 1000)
    return f"{exp_ms}.{sign(secret, str(exp_ms))}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint_jwt(secret: str, ttl_seconds: float, *, now: float | None = None) -> str:
    """The other token form the gateway accepts: an HS256 JWT (keyed with ``secret``) whose ``exp``
    claim (whole unix seconds) is ``now + ttl_seconds``."""
    issued = time.time() if now is None else now
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = {"sub": "mlflow-agent-tests", "iat": int(issued), "exp": int(issued + ttl_seconds)}
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def _jwt_exp_ms(secret: str, token: str) -> int | None:
    """The ``exp`` (unix ms) of a well-signed HS256 JWT, else None."""
    header, payload, signature = token.split(".")
    try:
        alg = json.loads(_b64url_decode(header)).get("alg")
        claims = json.loads(_b64url_decode(payload))
        given = _b64url_decode(signature)
    except (ValueError, AttributeError, binascii.Error):
        return None
    expected = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    if alg != "HS256" or not hmac.compare_digest(given, expected) or not isinstance(claims, dict):
        return None
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return None
    return int(exp * 1000)


def token_expiry(token: str) -> float:
    """The expiry (unix seconds) written in a token (either form); ValueError if it has none."""
    if token.count(".") == 2:
        try:
            exp = json.loads(_b64url_decode(token.split(".")[1]))["exp"]
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise ValueError("not a JWT with an exp claim") from None
        return float(exp)
    exp_text, sep, _ = token.partition(".")
    if not sep or not exp_text.isdigit():
        raise ValueError("not a gateway token")
    return int(exp_text) / 1000


def token_signature(token: str) -> str:
    """The part of a token (either form) that only the secret's holder can produce."""
    return token.rpartition(".")[2]


def token_fingerprint(token: str) -> str:
    """A short, non-reversible name for a token (safe to log)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def check_token(secret: str, token: str, *, now_ms: int | None = None, revoke_before_ms: int = 0) -> str | None:
    """None if the gateway accepts ``token`` at ``now_ms``, else the reason (see :data:`REASONS`)."""
    if token.count(".") == 2:
        jwt_exp = _jwt_exp_ms(secret, token)
        if jwt_exp is None:
            return "bad_signature"
        exp_ms = jwt_exp
    else:
        exp, sep, signature = token.partition(".")
        if not sep or not exp.isdigit() or len(exp) > 16:
            return "bad_signature"
        if not hmac.compare_digest(signature.encode(), sign(secret, exp).encode()):
            return "bad_signature"
        exp_ms = int(exp)
    if exp_ms <= (int(time.time() * 1000) if now_ms is None else now_ms):
        return "expired"
    if exp_ms <= revoke_before_ms:
        return "revoked"
    return None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value, or None if there is none."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


# -- the gateway --------------------------------------------------------------------------------------------


@dataclass
class GatewayConfig:
    """Run-time settings of the gateway."""

    p_429: float = 0.0
    retry_after: int = 1
    reject_status: int = 401
    #: Tokens whose expiry (unix ms) is at or before this are refused as ``revoked``.
    revoke_before_ms: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_429 <= 1.0:
            raise ValueError(f"p_429 must be within [0, 1], got {self.p_429}")
        if self.retry_after < 0:
            raise ValueError("retry_after must be >= 0")
        if self.reject_status not in _STATUS_CODES:
            raise ValueError(f"reject_status must be one of {sorted(_STATUS_CODES)}, got {self.reject_status}")
        if self.revoke_before_ms < 0:
            raise ValueError("revoke_before_ms must be >= 0")

    def updated(self, changes: Mapping[str, Any]) -> GatewayConfig:
        """A validated copy with ``changes`` applied (ValueError on unknown keys or bad values)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown gateway settings {sorted(unknown)}; known: {sorted(known)}")
        merged = {**asdict(self), **changes}
        return GatewayConfig(
            p_429=float(merged["p_429"]),
            retry_after=int(merged["retry_after"]),
            reject_status=int(merged["reject_status"]),
            revoke_before_ms=int(merged["revoke_before_ms"]),
        )


def _json_response(status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(payload), content_type="application/json", headers=headers)


def error_envelope(code: str, message: str, inner_code: str, request_id: str, operation_id: str) -> dict[str, Any]:
    """The JSON body of a refused request, shaped like Azure's."""
    return {
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "code": inner_code,
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
                "request-id": request_id,
                "client-request-id": operation_id,
            },
        },
        "correlation": {"operation": operation_id, "request": request_id},
    }


class GatewayApp:
    """The aiohttp application: bearer-token checks in front of ``target``."""

    def __init__(
        self, target: str, secret: str, seed: int, config: GatewayConfig, log_file: IO[str] | None = None
    ) -> None:
        self.target = target.rstrip("/")
        self.secret = secret
        self.rng = random.Random(seed)
        self.config = config
        self.counts: Counter[str] = Counter({"requests": 0, "forwarded": 0, "throttled": 0, "upstream_error": 0})
        self.unauthorized: Counter[str] = Counter(dict.fromkeys(REASONS, 0))
        self.valid_tokens: set[str] = set()  # fingerprints only
        self.revoked_tokens: set[str] = set()
        self.last_forwarded_at: float | None = None
        self.log_file = log_file
        self.session: aiohttp.ClientSession | None = None
        self.app = web.Application(client_max_size=1024**3)
        self.app.router.add_get(STATS_PATH, self.get_stats)
        self.app.router.add_get(CONFIG_PATH, self.get_config)
        self.app.router.add_post(CONFIG_PATH, self.post_config)
        self.app.router.add_post(REVOKE_PATH, self.post_revoke)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self.app.on_startup.append(self._open_session)
        self.app.on_cleanup.append(self._close_session)

    async def _open_session(self, _app: web.Application) -> None:
        self.session = aiohttp.ClientSession(
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
            event.setdefault("time", round(time.time(), 3))
            self.log_file.write(json.dumps(event) + "\n")
            self.log_file.flush()

    # -- control endpoints -------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            "unauthorized": dict(self.unauthorized),
            "unauthorized_total": sum(self.unauthorized.values()),
            "distinct_tokens": len(self.valid_tokens),
            "last_forwarded_at": self.last_forwarded_at,
        }

    async def get_stats(self, _request: web.Request) -> web.Response:
        return _json_response(200, self.stats())

    async def get_config(self, _request: web.Request) -> web.Response:
        return _json_response(200, asdict(self.config))

    async def post_config(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object")
            self.config = self.config.updated(changes)
        except (ValueError, TypeError) as exc:
            return _json_response(400, {"error": {"code": "BadRequest", "message": str(exc)}})
        self._log(event="config", config=asdict(self.config))
        return _json_response(200, asdict(self.config))

    async def post_revoke(self, _request: web.Request) -> web.Response:
        """Revoke every valid token seen so far (a revocation list, independent of expiry)."""
        self.revoked_tokens |= self.valid_tokens
        self._log(event="revoke", tokens=len(self.revoked_tokens))
        return _json_response(200, {"revoked": len(self.revoked_tokens)})

    # -- gatekeeping and forwarding ------------------------------------------------------------------------

    def _refuse(self, reason: str) -> web.Response:
        status = self.config.reject_status
        request_id, operation_id = str(uuid.uuid4()), str(uuid.uuid4())
        body = error_envelope(_STATUS_CODES[status], _MESSAGES[reason], reason, request_id, operation_id)
        challenge = 'Bearer realm="auth-gateway"'
        if reason != "missing":
            challenge += f', error="invalid_token", error_description="{reason}"'
        headers = {
            "x-ms-request-id": request_id,
            "x-ms-correlation-request-id": operation_id,
            "WWW-Authenticate": challenge,
        }
        return _json_response(status, body, headers)

    def _throttle(self) -> web.Response:
        request_id, operation_id = str(uuid.uuid4()), str(uuid.uuid4())
        retry_after = self.config.retry_after
        body = error_envelope(
            "TooManyRequests",
            f"Rate limit is exceeded. Try again in {retry_after} seconds.",
            "RateLimited",
            request_id,
            operation_id,
        )
        headers = {"Retry-After": str(retry_after), "x-ms-request-id": request_id}
        return _json_response(429, body, headers)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.counts["requests"] += 1
        # "time": when the request was judged (its token checked); forwarded ones add "done".
        event: dict[str, Any] = {"time": round(time.time(), 3), "method": request.method, "path": request.raw_path}
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            reason: str | None = "missing"
        else:
            reason = check_token(self.secret, token, revoke_before_ms=self.config.revoke_before_ms)
            event["token_id"] = token_fingerprint(token)
            if reason is None and event["token_id"] in self.revoked_tokens:
                reason = "revoked"
            with contextlib.suppress(ValueError):
                event["token_exp"] = token_expiry(token)
        if reason is not None:
            self.unauthorized[reason] += 1
            response = self._refuse(reason)
            self._log(**event, outcome="unauthorized", reason=reason, status=response.status)
            return response
        assert token is not None
        self.valid_tokens.add(token_fingerprint(token))

        if self.config.p_429 > 0 and self.rng.random() < self.config.p_429:
            self.counts["throttled"] += 1
            self._log(**event, outcome="throttled", status=429)
            return self._throttle()

        try:
            status, reason_phrase, headers, payload = await self._forward(request, body)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.counts["upstream_error"] += 1
            self._log(**event, outcome="upstream_error", status=502, error=f"{type(exc).__name__}: {exc}")
            return _json_response(
                502, {"error": {"code": "BadGateway", "message": f"upstream unreachable: {type(exc).__name__}"}}
            )
        self.counts["forwarded"] += 1
        self.last_forwarded_at = time.time()
        self._log(**event, outcome="forwarded", status=status, done=round(time.time(), 3))
        return web.Response(status=status, reason=reason_phrase, headers=headers, body=payload)

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, str | None, CIMultiDict[str], bytes]:
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


async def serve(host: str, port: int, gateway: GatewayApp) -> None:
    """Serve ``gateway`` on host:port until SIGTERM or SIGINT."""
    runner = web.AppRunner(gateway.app, access_log=None, shutdown_timeout=1.0, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    print(f"auth gateway listening on http://{host}:{port} -> {gateway.target}", flush=True)
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
    parser = argparse.ArgumentParser(prog="python -m tests.support.auth_gateway", description=__doc__)
    parser.add_argument("--listen", type=_parse_listen, required=True, help="HOST:PORT to listen on")
    parser.add_argument("--target", required=True, help="base URL of the real server")
    parser.add_argument("--secret", required=True, help="HMAC key of the tokens")
    parser.add_argument("--p-429", type=float, default=0.0)
    parser.add_argument("--retry-after", type=int, default=1, help="Retry-After seconds of the 429s")
    parser.add_argument("--reject-status", type=int, default=401, help="401 or 403")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", type=Path, default=None, help="file for one JSON line per request")
    args = parser.parse_args(argv)
    if not args.secret:
        parser.error("--secret must not be empty")
    try:
        config = GatewayConfig(p_429=args.p_429, retry_after=args.retry_after, reject_status=args.reject_status)
    except ValueError as exc:
        parser.error(str(exc))
    host, port = args.listen
    with contextlib.ExitStack() as stack:
        log_file = stack.enter_context(open(args.log, "a")) if args.log is not None else None
        asyncio.run(serve(host, port, GatewayApp(args.target, args.secret, args.seed, config, log_file)))
    return 0


class AuthGateway:
    """The gateway as a subprocess on a free loopback port, in front of ``target_url``.

    Starts on construction (unless ``start=False``) and waits until it answers; stop it with
    :meth:`stop` or :meth:`close` (or use it as a context manager).
    """

    def __init__(
        self,
        target_url: str | HasUrl,
        secret: str,
        *,
        p_429: float = 0.0,
        retry_after: int = 1,
        reject_status: int = 401,
        seed: int = 0,
        port: int | None = None,
        base_dir: Path | None = None,
        start: bool = True,
    ) -> None:
        if not secret:
            raise ValueError("secret must not be empty")
        self.target_url = url_of(target_url)
        self.secret = secret
        self.seed = seed
        self.initial_config = GatewayConfig(p_429=p_429, retry_after=retry_after, reject_status=reject_status)
        self.port = port if port is not None else free_port()
        self.base_dir = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="auth-gateway-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        #: One JSON line per request (``--log``).
        self.request_log_path = self.base_dir / f"gateway-{self.port}-requests.jsonl"
        #: The process's own stdout/stderr.
        self.log_path = self.base_dir / f"gateway-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._http = requests.Session()
        self._http.trust_env = False
        if start:
            self.start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: the agent's ``--upstream``."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("gateway not started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        """The command line that starts the gateway with the initial settings."""
        c = self.initial_config
        return [
            sys.executable, "-m", "tests.support.auth_gateway",
            "--listen", f"{LOOPBACK}:{self.port}",
            "--target", self.target_url,
            "--secret", self.secret,
            "--p-429", repr(c.p_429),
            "--retry-after", str(c.retry_after),
            "--reject-status", str(c.reject_status),
            "--seed", str(self.seed),
            "--log", str(self.request_log_path),
        ]  # fmt: skip

    def start(self, timeout: float = START_TIMEOUT) -> AuthGateway:
        """Start the process (initial settings, fresh counts) and wait until /__stats answers."""
        if self.running:
            raise RuntimeError(f"gateway {self.url} is already running")
        self.proc = spawn(self.command(), self.log_path, env=python_env(), cwd=REPO_ROOT)
        try:
            wait_http_ok(f"{self.url}{STATS_PATH}", timeout, self.proc, log_path=self.log_path)
        except BaseException:
            kill_process(self.proc)
            raise
        return self

    def mint(self, ttl_seconds: float) -> str:
        """A token this gateway accepts for ``ttl_seconds``."""
        return mint_token(self.secret, ttl_seconds)

    def stats(self) -> dict[str, Any]:
        """``{"requests", "forwarded", "throttled", "upstream_error", "unauthorized": {reason: n},
        "unauthorized_total", "distinct_tokens", "last_forwarded_at"}``."""
        resp = self._http.get(f"{self.url}{STATS_PATH}", timeout=10)
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data

    def config(self) -> dict[str, Any]:
        resp = self._http.get(f"{self.url}{CONFIG_PATH}", timeout=10)
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data

    def set(self, **settings: float) -> dict[str, Any]:
        """Change settings at run time (``p_429=0.2, retry_after=2, reject_status=403,
        revoke_before_ms=...``); returns the new ones. ValueError if the gateway refuses them."""
        resp = self._http.post(f"{self.url}{CONFIG_PATH}", json=settings, timeout=10)
        if resp.status_code != 200:
            raise ValueError(f"gateway refused {settings}: {resp.text}")
        data: dict[str, Any] = resp.json()
        return data

    def revoke_seen(self) -> int:
        """Revoke every valid token the gateway has seen so far, whatever its expiry; returns how many
        tokens are revoked in all."""
        resp = self._http.post(f"{self.url}{REVOKE_PATH}", timeout=10)
        resp.raise_for_status()
        return int(resp.json()["revoked"])

    def revoke_issued(self, max_ttl_seconds: float) -> int:
        """Revoke every token minted so far with a ttl up to ``max_ttl_seconds``; tokens minted from the
        next millisecond on with that ttl are accepted (JWTs, whose ``exp`` is in whole seconds: from
        the next second on). Returns the ``revoke_before_ms`` set."""
        cutoff = int((time.time() + max_ttl_seconds) * 1000)
        self.set(revoke_before_ms=cutoff)
        return cutoff

    def request_log(self) -> list[dict[str, Any]]:
        """The per-request JSON lines written so far (config changes carry ``event: "config"``)."""
        if not self.request_log_path.exists():
            return []
        lines = self.request_log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def stop(self, timeout: float = 10) -> None:
        """Stop the gateway process (its group: SIGTERM, then SIGKILL)."""
        if self.proc is not None:
            stop_process(self.proc, timeout=timeout)

    def close(self) -> None:
        """Stop the gateway and release the HTTP session."""
        try:
            self.stop()
        finally:
            self._http.close()

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)

    def __enter__(self) -> AuthGateway:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AuthGateway(url={self.url!r}, target={self.target_url!r}, running={self.running})"


@contextlib.contextmanager
def auth_gateways(base_dir: Path) -> Iterator[Callable[..., AuthGateway]]:
    """``with auth_gateways(tmp_path) as make: make(target, secret, **opts) -> AuthGateway`` (started);
    every gateway made is stopped when the block exits (for fixtures)."""
    gateways: list[AuthGateway] = []

    def make(target: str | HasUrl, secret: str, **opts: Any) -> AuthGateway:
        opts.setdefault("base_dir", Path(base_dir) / f"gateway-{len(gateways)}")
        gateway = AuthGateway(target, secret, start=False, **opts)
        gateways.append(gateway)
        return gateway.start()

    try:
        yield make
    finally:
        errors: list[BaseException] = []
        for gateway in reversed(gateways):
            try:
                gateway.close()
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


# -- token sources for the agent ----------------------------------------------------------------------------

TokenOutput = Literal["expires_in", "expires_at", "text", "jwt"]

_COMMAND_TEMPLATE = '''\
#!{python}
"""Token command for tests: prints a fresh auth-gateway token (generated by tests.support.auth_gateway)."""
import base64
import hashlib
import hmac
import json
import os
import sys
import time

SECRET = {secret!r}
TTL = {ttl!r}
OUTPUT = {output!r}
ISSUED_LOG = {issued_log!r}
FAIL_FLAG = {fail_flag!r}

if FAIL_FLAG is not None and os.path.exists(FAIL_FLAG):
    print("token service unavailable: HTTP 503 from the identity endpoint", file=sys.stderr)
    sys.exit(1)
now = time.time()
exp_ms = int((now + TTL) * 1000)
if OUTPUT == "jwt":
    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({{"alg": "HS256", "typ": "JWT"}}, separators=(",", ":")).encode())
    claims = {{"sub": "mlflow-agent-tests", "iat": int(now), "exp": int(now + TTL)}}
    payload = b64(json.dumps(claims, separators=(",", ":")).encode())
    mac = hmac.new(SECRET.encode(), (header + "." + payload).encode(), hashlib.sha256).digest()
    token = header + "." + payload + "." + b64(mac)
else:
    token = "%d.%s" % (exp_ms, hmac.new(SECRET.encode(), str(exp_ms).encode(), hashlib.sha256).hexdigest())
if ISSUED_LOG is not None:
    # Before printing it: whoever reads this file knows every token the caller may have seen.
    with open(ISSUED_LOG, "a") as issued:
        issued.write(token + "\\n")
if OUTPUT == "expires_in":
    print(json.dumps({{"token": token, "expires_in": TTL}}))
elif OUTPUT == "expires_at":
    print(json.dumps({{"token": token, "expires_at": exp_ms // 1000}}))
elif OUTPUT == "jwt":
    print(token)
else:
    print(token)
    print(exp_ms // 1000)
'''


def write_token_command(
    path: Path,
    secret: str,
    ttl_seconds: float,
    *,
    output: TokenOutput = "expires_in",
    issued_log: Path | None = None,
    fail_flag: Path | None = None,
) -> Path:
    """Write an executable Python script (``#!sys.executable``) that prints a fresh gateway token.

    ``output``: ``"expires_in"`` -> ``{"token": ..., "expires_in": ttl}``; ``"expires_at"`` ->
    ``{"token": ..., "expires_at": <unix seconds, rounded down>}``; ``"text"`` -> the token on the first
    line, the expiry (unix seconds, rounded down) on the second; ``"jwt"`` -> only an HS256 JWT (see
    :func:`mint_jwt`), whose ``exp`` claim is the sole statement of its expiry. With ``issued_log`` every token is
    appended to that file (one a line) before it is printed; while ``fail_flag`` exists the script
    prints an error on stderr and exits 1. Returns ``path``.
    """
    ttl: float = int(ttl_seconds) if float(ttl_seconds).is_integer() else float(ttl_seconds)
    script = _COMMAND_TEMPLATE.format(
        python=sys.executable,
        secret=secret,
        ttl=ttl,
        output=output,
        issued_log=str(issued_log) if issued_log is not None else None,
        fail_flag=str(fail_flag) if fail_flag is not None else None,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def read_issued(path: Path) -> list[str]:
    """The tokens a token command appended to its ``issued_log`` ([] if none yet)."""
    if not path.exists():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class TokenFileRotator:
    """Keeps ``path`` holding a fresh gateway token: one is written (atomically: temp file + rename) on
    entering, then a new one every ``every`` seconds by a thread, until the context exits.

    Each token lives ``ttl`` seconds; the file holds ``<token>\\n``. :attr:`tokens` lists every token
    written, oldest first.
    """

    def __init__(self, path: Path, secret: str, ttl: float, every: float) -> None:
        if every <= 0 or ttl <= 0:
            raise ValueError("ttl and every must be > 0")
        self.path = Path(path)
        self.secret = secret
        self.ttl = ttl
        self.every = every
        self._tokens: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def tokens(self) -> list[str]:
        with self._lock:
            return list(self._tokens)

    @property
    def rotations(self) -> int:
        """How many tokens were written so far."""
        with self._lock:
            return len(self._tokens)

    def rotate(self) -> str:
        """Write a fresh token now; return it."""
        token = mint_token(self.secret, self.ttl)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            with self._lock:  # recorded before it is visible: the list always holds what readers can see
                self._tokens.append(token)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return token

    def _run(self) -> None:
        started = time.monotonic()
        n = 1
        try:
            while not self._stop.wait(max(0.0, started + n * self.every - time.monotonic())):
                self.rotate()
                n += 1
        except BaseException as exc:  # surfaced by __exit__
            self.error = exc

    def start(self) -> TokenFileRotator:
        if self._thread is not None:
            raise RuntimeError("rotator already started")
        self.rotate()
        self._thread = threading.Thread(target=self._run, name=f"token-rotator-{self.path.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.error is not None:
            raise RuntimeError(f"token rotation failed: {self.error!r}") from self.error

    def __enter__(self) -> TokenFileRotator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
