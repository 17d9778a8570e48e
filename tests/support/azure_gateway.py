"""A local stand-in for an Azure Machine Learning workspace's MLflow endpoint, on real sockets.

Run it as a process::

    GATEWAY_SECRET=... GATEWAY_IDENTITY_HEADER=... python -m tests.support.azure_gateway \\
        --port P --identity-port Q --target http://127.0.0.1:M --cert CERT --key KEY \\
        [--subscription S --resource-group G --workspace W --token-ttl 5 --p-429 0 --retry-after 1 \\
         --seed N --identity-down-mode refuse|500 --state-dir DIR]

or from a test with :class:`AzureGateway`, which also makes the self-signed certificate (openssl CLI,
``CN=127.0.0.1``, ``subjectAltName=IP:127.0.0.1``). Two listeners:

**HTTPS on ``--port``** (the workspace's regional API host, ``azureml://127.0.0.1:P/mlflow/v2.0/<scope>``):

* ``/mlflow/v2.0<scope>/api/2.0/mlflow/...`` and ``.../api/2.0/mlflow-artifacts/...`` (``v1.0`` is
  accepted too): the scope prefix is stripped and the request goes to the real MLflow server at
  ``--target``, but only with ``Authorization: Bearer <token>`` carrying a token this gateway minted and
  that has not expired. Anything else is answered 401 with Azure's envelope ``{"error": {"code":
  "Unauthorized", "message", "innerError": {"code": <reason>}}, "correlation": {"operation", "request"}}``
  where the reason is ``missing``, ``malformed``, ``bad_signature`` or ``expired``. A path outside the
  workspace's scope gets 404.
* Azure's limits: a ``runs/log-batch`` with more than 250 values of one metric key is refused (400,
  code ``UserError``, ``FieldName=MetricV2Dto.Value/Count, Limit=250, Size=N``); a ``runs/log-batch``
  or ``runs/log-parameter`` that would give a run more than 200 params in total (those already stored
  are read from the real server's ``runs/get``) is refused (400 ``FieldName=Parameters, Limit=200,
  Size=N``); ``metrics/get-history`` with ``max_results >= 1000`` is refused (400 ``MaxResults must be
  less than 1000``); anything under ``logged-models`` answers 404 (Azure has no MLflow 3 logged models).
* With ``p_429`` a seeded random share of authenticated MLflow requests is answered 429
  (``TooManyRequests``, ``Retry-After: <retry_after>``) instead.
* ``GET /history/v1.0<scope>/experimentids/<exp>/runs/<run>/token`` (and ``.../experiments/<name>/...``):
  the run-history token renewal an Azure ML job's run token uses. Authenticated like the MLflow calls;
  the run must exist in that experiment on the real server; answers ``{"token", "expiryTimeUtc"}``
  with a fresh token.
* Azure Resource Manager (``--azure-arm-endpoint https://127.0.0.1:P``):
  ``GET /subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.MachineLearningServices/workspaces/<ws>
  ?api-version=...``, authenticated like the MLflow calls (the same 401 envelope). For the gateway's own
  workspace (names compared case-insensitively, as ARM does) it answers 200 ``{"id": <scope>, "name",
  "type", "location": "eastus", "sku", "properties": {"mlFlowTrackingUri":
  "azureml://127.0.0.1:P/mlflow/v1.0<scope>", "discoveryUrl": "https://127.0.0.1:P/discovery", ...}}``;
  another subscription, resource group or workspace gets 404 with ARM's own envelope ``{"error":
  {"code": "SubscriptionNotFound" | "ResourceGroupNotFound" | "ResourceNotFound", "message"}}``; no
  ``api-version`` gets 400 ``MissingApiVersionParameter``. With ``arm_down`` ARM answers 503
  ``ServiceUnavailable`` (``arm_down_mode=503``) or drops the connection without an answer
  (``arm_down_mode=reset``: the port is shared with the MLflow API, so it cannot refuse connections);
  with ``arm_omit_tracking_uri`` the answer has no ``mlFlowTrackingUri`` (as older API versions), so
  a client must follow ``discoveryUrl``.
* ``GET /discovery`` (no authentication, as the real discovery service): the region's service
  endpoints ``{"api": "https://127.0.0.1:P", "history", "experimentation", ..., "studio"}``.
* Control (no authentication): ``GET /__stats`` (counts, below), ``GET``/``POST /__config`` (settings:
  ``token_ttl``, ``p_429``, ``retry_after``, ``identity_down``, ``identity_down_mode``, ``arm_down``,
  ``arm_down_mode``, ``arm_omit_tracking_uri``), ``POST /__mint`` ``{"ttl": s, "kind": k}`` (a token
  minted by the gateway, as a job would be handed one).

**Plain HTTP on ``--identity-port``**: an App Service style managed-identity endpoint (what
``IDENTITY_ENDPOINT`` + ``IDENTITY_HEADER`` point azure-identity at): ``GET /msi/token?resource=...&
api-version=2019-08-01`` with ``X-IDENTITY-HEADER: <identity header>`` answers ``{"access_token",
"expires_on": "<unix seconds>", "resource": <as asked>, "token_type": "Bearer", "client_id"}``; tokens
live ``token_ttl`` seconds. The same listener serves the older App Service API (2017-09-01) that
azureml-core's msrestazure calls when ``MSI_ENDPOINT``, ``MSI_SECRET`` and ``APPSETTING_WEBSITE_SITE_NAME``
are set (:meth:`AzureGateway.msi_env`): ``GET /msi2017/?resource=...&api-version=2017-09-01[&clientid=...]``
(``/msi2017`` too) with ``secret: <identity header>`` answers ``{"access_token", "expires_on":
"MM/DD/YYYY HH:MM:SS +00:00", "resource", "token_type": "Bearer", "client_id": <clientid or the
system identity's>}``. Both mint tokens of kind ``identity``. With ``identity_down`` the listener is
closed (``identity_down_mode=refuse``: connection refused, and connections kept alive are reset) or
answers 500 (``identity_down_mode=500``).

Tokens are HS256 JWTs signed with ``GATEWAY_SECRET`` (as Entra ID and run tokens are JWTs, the agent
can read their ``exp``); the gateway accepts a token while ``now < exp``. Every token minted is
appended to ``<state-dir>/minted-tokens.jsonl`` (``{"time", "kind", "exp", "token"}``) before it is
handed out, so a test knows every secret the agent may have seen; ``<state-dir>/requests.jsonl`` gets
one line per request (time, method, path, endpoint, outcome, reason, status, the token's expiry and a
fingerprint, the ``client_id`` asked of the 2017 identity API; never a token). ``/__stats`` also counts
``arm`` (``requests``, ``served``, ``not_found``, ``unauthorized``, ``bad_request``, ``down``),
``discovery`` (``requests``) and ``identity_by_api`` (``{"2019-08-01": n, "2017-09-01": n}``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
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
    ProcessDiedError,
    kill_process,
    log_tail,
    python_env,
    spawn,
    stop_process,
    url_of,
)

SUBSCRIPTION_ID = "0b5e6c1d-7a2f-4e3b-9c8d-1f2e3d4c5b6a"
RESOURCE_GROUP = "rg-mlflow-agent-tests"
WORKSPACE = "ws-agent-tests"
PROVIDER = "Microsoft.MachineLearningServices"
ARM_RESOURCE = "https://management.azure.com"

STATS_PATH = "/__stats"
CONFIG_PATH = "/__config"
MINT_PATH = "/__mint"
IDENTITY_PATH = "/msi/token"
IDENTITY_API_VERSION = "2019-08-01"
IDENTITY_2017_PATH = "/msi2017"  # MSI_ENDPOINT; msrestazure appends "/?resource=..."
IDENTITY_2017_API_VERSION = "2017-09-01"
SYSTEM_IDENTITY_CLIENT_ID = "6a0c3e1f-0000-4000-8000-00000000a11d"
DISCOVERY_PATH = "/discovery"
WORKSPACE_LOCATION = "eastus"
WORKSPACE_ID = "5d3f1b2a-7c9e-4e1f-8a2b-3c4d5e6f7a8b"
APP_SERVICE_SITE = "mlflow-agent-tests"

METRIC_VALUES_LIMIT = 250  # values of one metric key in one log-batch
PARAMS_LIMIT = 200  # params of one run, in total
MAX_RESULTS_LIMIT = 1000  # get-history pages must ask for fewer

#: Why a request was refused.
REASONS = ("missing", "malformed", "bad_signature", "expired")
LIMITS = ("metric_values", "params", "max_results")
START_TIMEOUT = 60.0
SECRET_ENV = "GATEWAY_SECRET"
IDENTITY_HEADER_ENV = "GATEWAY_IDENTITY_HEADER"

_SKIP_REQUEST_HEADERS = frozenset({
    "host", "connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "accept-encoding", "expect", "authorization",
})  # fmt: skip
_SKIP_RESPONSE_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "trailer", "transfer-encoding", "upgrade",
    "content-length", "content-encoding", "date", "server",
})  # fmt: skip
_MESSAGES = {
    "missing": "Authorization header is missing or is not a Bearer token.",
    "malformed": "The access token is malformed.",
    "bad_signature": "The access token's signature is invalid.",
    "expired": "The access token has expired. Acquire a new token and retry.",
}


def scope_of(subscription_id: str, resource_group: str, workspace: str) -> str:
    """``/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.MachineLearningServices/workspaces/<ws>``."""
    return (f"/subscriptions/{subscription_id}/resourceGroups/{resource_group}"
            f"/providers/{PROVIDER}/workspaces/{workspace}")


# -- tokens ---------------------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(obj: Mapping[str, Any]) -> str:
    return _b64url(json.dumps(obj, separators=(",", ":")).encode())


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(secret: str, signing_input: str) -> str:
    return _b64url(hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest())


def mint_token(secret: str, ttl_seconds: float, *, kind: str = "identity", now: float | None = None) -> tuple[str, int]:
    """An HS256 JWT the gateway accepts until ``exp = int(now + ttl)`` (unix seconds); returns (token, exp)."""
    issued = time.time() if now is None else now
    exp = int(issued + ttl_seconds)
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {"aud": ARM_RESOURCE + "/", "iss": "https://sts.windows.net/mlflow-agent-tests/", "iat": int(issued),
              "nbf": int(issued), "exp": exp, "kind": kind, "jti": uuid.uuid4().hex}
    signing_input = f"{_segment(header)}.{_segment(claims)}"
    return f"{signing_input}.{_signature(secret, signing_input)}", exp


def check_token(secret: str, token: str, *, now: float | None = None) -> tuple[str | None, int | None]:
    """(None, exp) if the gateway accepts ``token`` now, else (reason, exp or None); see :data:`REASONS`."""
    parts = token.split(".")
    if len(parts) != 3:
        return "malformed", None
    try:
        claims = json.loads(_b64url_decode(parts[1]))
        exp = claims["exp"]
    except (ValueError, KeyError, TypeError):
        return "malformed", None
    if not isinstance(exp, int):
        return "malformed", None
    if not hmac.compare_digest(parts[2].encode(), _signature(secret, f"{parts[0]}.{parts[1]}").encode()):
        return "bad_signature", exp
    if exp <= (time.time() if now is None else now):
        return "expired", exp
    return None, exp


def token_fingerprint(token: str) -> str:
    """A short, non-reversible name for a token (safe to log)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def iso_utc(unix_seconds: float) -> str:
    """.NET's round-trip format, as run history writes ``expiryTimeUtc``: 7 fractional digits and Z."""
    return datetime.fromtimestamp(unix_seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


# -- settings ---------------------------------------------------------------------------------------------------


@dataclass
class GatewayConfig:
    token_ttl: float = 5.0
    p_429: float = 0.0
    retry_after: int = 1
    identity_down: bool = False
    identity_down_mode: str = "refuse"  # or "500"
    arm_down: bool = False
    arm_down_mode: str = "503"  # or "reset"
    arm_omit_tracking_uri: bool = False

    def __post_init__(self) -> None:
        if self.token_ttl <= 1:
            raise ValueError("token_ttl must be > 1 s (expiries are whole seconds)")
        if not 0.0 <= self.p_429 <= 1.0:
            raise ValueError(f"p_429 must be within [0, 1], got {self.p_429}")
        if self.retry_after < 0:
            raise ValueError("retry_after must be >= 0")
        if self.identity_down_mode not in ("refuse", "500"):
            raise ValueError("identity_down_mode must be 'refuse' or '500'")
        if self.arm_down_mode not in ("503", "reset"):
            raise ValueError("arm_down_mode must be '503' or 'reset'")

    def updated(self, changes: Mapping[str, Any]) -> GatewayConfig:
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown gateway settings {sorted(unknown)}; known: {sorted(known)}")
        merged = {**asdict(self), **changes}
        return GatewayConfig(
            token_ttl=float(merged["token_ttl"]),
            p_429=float(merged["p_429"]),
            retry_after=int(merged["retry_after"]),
            identity_down=bool(merged["identity_down"]),
            identity_down_mode=str(merged["identity_down_mode"]),
            arm_down=bool(merged["arm_down"]),
            arm_down_mode=str(merged["arm_down_mode"]),
            arm_omit_tracking_uri=bool(merged["arm_omit_tracking_uri"]),
        )


def _json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(payload), content_type="application/json", headers=headers)


def azure_error(status: int, code: str, message: str, inner: str | None = None,
                headers: Mapping[str, str] | None = None) -> web.Response:
    """Azure's error envelope, with the correlation ids also in ``x-ms-request-id``."""
    request_id, operation_id = str(uuid.uuid4()), str(uuid.uuid4())
    error: dict[str, Any] = {"code": code, "message": message}
    if inner is not None:
        error["innerError"] = {"code": inner}
    body = {"error": error, "correlation": {"operation": operation_id, "request": request_id},
            "environment": "local", "location": "local", "time": datetime.now(timezone.utc).isoformat()}
    return _json(status, body, {"x-ms-request-id": request_id, **(headers or {})})


def arm_error(status: int, code: str, message: str) -> web.Response:
    """Azure Resource Manager's envelope: ``{"error": {"code", "message"}}``, the ids only in headers."""
    return _json(status, {"error": {"code": code, "message": message}},
                 {"x-ms-request-id": str(uuid.uuid4()), "x-ms-correlation-request-id": str(uuid.uuid4())})


def app_service_expiry(unix_seconds: int) -> str:
    """The 2017-09-01 managed-identity API's ``expires_on``: ``"MM/DD/YYYY HH:MM:SS +00:00"`` (UTC)."""
    return datetime.fromtimestamp(unix_seconds, timezone.utc).strftime("%m/%d/%Y %H:%M:%S +00:00")


# -- the gateway -----------------------------------------------------------------------------------------------


class GatewayApp:
    def __init__(self, *, target: str, secret: str, identity_header: str, scope: str, config: GatewayConfig,
                 seed: int, state_dir: Path, identity_host: str, identity_port: int, api_host: str) -> None:
        self.target = target.rstrip("/")
        self.api_host = api_host  # "127.0.0.1:P": what ARM and discovery name as the workspace's host
        self.secret = secret
        self.identity_header = identity_header
        self.scope = scope
        self.config = config
        self.rng = random.Random(seed)
        self.state_dir = state_dir
        self.identity_host, self.identity_port = identity_host, identity_port
        self.counts: Counter[str] = Counter(dict.fromkeys(
            ("requests", "forwarded", "throttled", "upstream_error", "not_found"), 0))
        self.forwarded_by_endpoint: Counter[str] = Counter()
        self.unauthorized: Counter[str] = Counter(dict.fromkeys(REASONS, 0))
        self.limit_refusals: Counter[str] = Counter(dict.fromkeys(LIMITS, 0))
        self.minted: Counter[str] = Counter()
        self.identity: Counter[str] = Counter(dict.fromkeys(("requests", "served", "bad_header", "down"), 0))
        self.history: Counter[str] = Counter(dict.fromkeys(("renewals", "refused"), 0))
        self.identity_by_api: Counter[str] = Counter(
            dict.fromkeys((IDENTITY_API_VERSION, IDENTITY_2017_API_VERSION), 0))
        self.arm: Counter[str] = Counter(dict.fromkeys(
            ("requests", "served", "not_found", "unauthorized", "bad_request", "down"), 0))
        self.discovery: Counter[str] = Counter(dict.fromkeys(("requests",), 0))
        self.valid_tokens: set[str] = set()  # fingerprints
        self.last_forwarded_at: float | None = None
        self._run_locks: dict[str, asyncio.Lock] = {}
        self.session: aiohttp.ClientSession | None = None
        self.identity_runner: web.AppRunner | None = None
        self.identity_site: web.TCPSite | None = None
        self._minted_file: IO[str] = open(state_dir / "minted-tokens.jsonl", "a")  # noqa: SIM115
        self._log_file: IO[str] = open(state_dir / "requests.jsonl", "a")  # noqa: SIM115

        history = f"/history/v1.0{scope}"
        self.app = web.Application(client_max_size=1024**3)
        self.app.router.add_get(STATS_PATH, self.get_stats)
        self.app.router.add_get(CONFIG_PATH, self.get_config)
        self.app.router.add_post(CONFIG_PATH, self.post_config)
        self.app.router.add_post(MINT_PATH, self.post_mint)
        self.app.router.add_get(history + "/experimentids/{experiment}/runs/{run}/token", self.run_token)
        self.app.router.add_get(history + "/experiments/{experiment_name}/runs/{run}/token", self.run_token)
        self.app.router.add_get("/subscriptions/{tail:.*}", self.arm_resource)
        self.app.router.add_get(DISCOVERY_PATH, self.discovery_document)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self.app.on_startup.append(self._open_session)
        self.app.on_cleanup.append(self._close)

        self.identity_app = web.Application()
        self.identity_app.router.add_get(IDENTITY_PATH, self.msi_token)
        self.identity_app.router.add_get(IDENTITY_2017_PATH, self.msi_token_2017)
        self.identity_app.router.add_get(IDENTITY_2017_PATH + "/", self.msi_token_2017)

    async def _open_session(self, _app: web.Application) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
        )

    async def _close(self, _app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()
        self._minted_file.close()
        self._log_file.close()

    # -- bookkeeping --------------------------------------------------------------------------------------

    def _log(self, **event: Any) -> None:
        event.setdefault("time", round(time.time(), 3))
        self._log_file.write(json.dumps(event) + "\n")
        self._log_file.flush()

    def mint(self, ttl: float, kind: str) -> tuple[str, int]:
        token, exp = mint_token(self.secret, ttl, kind=kind)
        # Written before it is handed out: the file always lists every token anyone may hold.
        self._minted_file.write(json.dumps({"time": round(time.time(), 3), "kind": kind, "exp": exp,
                                            "token": token}) + "\n")
        self._minted_file.flush()
        self.minted[kind] += 1
        return token, exp

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            "forwarded_by_endpoint": dict(self.forwarded_by_endpoint),
            "unauthorized": dict(self.unauthorized),
            "unauthorized_total": sum(self.unauthorized.values()),
            "tokens_minted": sum(self.minted.values()),
            "minted_by_kind": dict(self.minted),
            "distinct_tokens": len(self.valid_tokens),
            "limit_refusals": dict(self.limit_refusals),
            "limit_refusals_total": sum(self.limit_refusals.values()),
            "identity": dict(self.identity),
            "history": dict(self.history),
            "identity_by_api": dict(self.identity_by_api),
            "arm": dict(self.arm),
            "discovery": dict(self.discovery),
            "last_forwarded_at": self.last_forwarded_at,
            "config": asdict(self.config),
        }

    # -- control ------------------------------------------------------------------------------------------

    async def get_stats(self, _request: web.Request) -> web.Response:
        return _json(200, self.stats())

    async def get_config(self, _request: web.Request) -> web.Response:
        return _json(200, asdict(self.config))

    async def post_config(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object")
            config = self.config.updated(changes)
        except (ValueError, TypeError) as exc:
            return _json(400, {"error": {"code": "BadRequest", "message": str(exc)}})
        self.config = config
        await self._apply_identity_state()
        self._log(event="config", config=asdict(config))
        return _json(200, asdict(config))

    async def post_mint(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            ttl = float(body.get("ttl", self.config.token_ttl))
            kind = str(body.get("kind", "test"))
        except (ValueError, TypeError, AttributeError) as exc:
            return _json(400, {"error": {"code": "BadRequest", "message": str(exc)}})
        token, exp = self.mint(ttl, kind)
        return _json(200, {"token": token, "exp": exp})

    # -- the managed-identity endpoint ---------------------------------------------------------------------

    async def start_identity(self) -> None:
        self.identity_runner = web.AppRunner(self.identity_app, access_log=None, shutdown_timeout=0.5,
                                             handle_signals=False)
        await self.identity_runner.setup()
        await self._apply_identity_state()

    async def _apply_identity_state(self) -> None:
        closed = self.config.identity_down and self.config.identity_down_mode == "refuse"
        if closed and self.identity_site is not None:
            await self.identity_site.stop()
            self.identity_site = None
        elif not closed and self.identity_site is None and self.identity_runner is not None:
            site = web.TCPSite(self.identity_runner, self.identity_host, self.identity_port, reuse_address=True)
            await site.start()
            self.identity_site = site

    def _identity_down(self, request: web.Request, event: dict[str, Any]) -> web.Response | None:
        """The answer while ``identity_down`` (None while it is up)."""
        if not self.config.identity_down:
            return None
        self.identity["down"] += 1
        self._log(**event, outcome="identity_down", mode=self.config.identity_down_mode)
        if self.config.identity_down_mode == "refuse" and request.transport is not None:
            request.transport.abort()  # a connection kept alive from before: reset it
            return web.Response(status=499)
        return _json(500, {"statusCode": 500, "message": "An unexpected error occured while fetching the AAD "
                                                         "Token.", "correlationId": str(uuid.uuid4())})

    async def msi_token(self, request: web.Request) -> web.StreamResponse:
        self.identity["requests"] += 1
        self.identity_by_api[IDENTITY_API_VERSION] += 1
        event: dict[str, Any] = {"method": request.method, "path": request.path, "endpoint": "msi/token"}
        down = self._identity_down(request, event)
        if down is not None:
            return down
        if request.headers.get("X-IDENTITY-HEADER") != self.identity_header:
            self.identity["bad_header"] += 1
            self._log(**event, outcome="identity_refused", status=401)
            return _json(401, {"statusCode": 401, "message": "X-IDENTITY-HEADER is missing or wrong."})
        resource = request.query.get("resource")
        if not resource or request.query.get("api-version") != IDENTITY_API_VERSION:
            self._log(**event, outcome="identity_refused", status=400)
            return _json(400, {"statusCode": 400, "message": "resource and api-version=2019-08-01 are required."})
        token, exp = self.mint(self.config.token_ttl, "identity")
        self.identity["served"] += 1
        self._log(**event, outcome="identity_token", status=200, token_id=token_fingerprint(token), token_exp=exp)
        return _json(200, {"access_token": token, "expires_on": str(exp), "resource": resource,
                           "token_type": "Bearer", "client_id": SYSTEM_IDENTITY_CLIENT_ID})

    async def msi_token_2017(self, request: web.Request) -> web.StreamResponse:
        """App Service's 2017-09-01 API, as msrestazure's ``get_msi_token_webapp`` calls it."""
        self.identity["requests"] += 1
        self.identity_by_api[IDENTITY_2017_API_VERSION] += 1
        event: dict[str, Any] = {"method": request.method, "path": request.path, "endpoint": "msi/2017"}
        down = self._identity_down(request, event)
        if down is not None:
            return down
        if request.headers.get("secret") != self.identity_header:
            self.identity["bad_header"] += 1
            self._log(**event, outcome="identity_refused", status=401)
            return _json(401, {"statusCode": 401, "message": "The secret header is missing or wrong."})
        resource = request.query.get("resource")
        if not resource or request.query.get("api-version") != IDENTITY_2017_API_VERSION:
            self._log(**event, outcome="identity_refused", status=400)
            return _json(400, {"statusCode": 400, "message": "resource and api-version=2017-09-01 are required."})
        client_id = request.query.get("clientid") or SYSTEM_IDENTITY_CLIENT_ID
        token, exp = self.mint(self.config.token_ttl, "identity")
        self.identity["served"] += 1
        self._log(**event, outcome="identity_token", status=200, token_id=token_fingerprint(token), token_exp=exp,
                  resource=resource, client_id=client_id)
        return _json(200, {"access_token": token, "expires_on": app_service_expiry(exp), "resource": resource,
                           "token_type": "Bearer", "client_id": client_id})

    # -- Azure Resource Manager and the discovery service ------------------------------------------------------

    async def arm_resource(self, request: web.Request) -> web.StreamResponse:
        self.arm["requests"] += 1
        event: dict[str, Any] = {"method": request.method, "path": request.path, "endpoint": "arm/workspace"}
        if self.config.arm_down:
            self.arm["down"] += 1
            self._log(**event, outcome="arm_down", mode=self.config.arm_down_mode)
            if self.config.arm_down_mode == "reset" and request.transport is not None:
                request.transport.abort()
                return web.Response(status=499)
            return arm_error(503, "ServiceUnavailable", "The server (leader) is currently unable to handle the "
                                                        "request. Please retry later.")
        refused = self._authenticate(request, event)
        if refused is not None:
            self.arm["unauthorized"] += 1
            return refused
        if not request.query.get("api-version"):
            self.arm["bad_request"] += 1
            self._log(**event, outcome="arm_bad_request", status=400)
            return arm_error(400, "MissingApiVersionParameter",
                             "The api-version query parameter (?api-version=) is required for all requests.")
        parts = request.path.strip("/").split("/")
        words = [p.lower() for p in parts[0::2]]
        if len(parts) != 8 or words != ["subscriptions", "resourcegroups", "providers", "workspaces"] \
                or parts[5].lower() != PROVIDER.lower():
            self.arm["not_found"] += 1
            self._log(**event, outcome="arm_not_found", status=404)
            return arm_error(404, "NotFound", f"No route to {request.path} in this stand-in of ARM.")
        own = self.scope.strip("/").split("/")
        subscription, group, workspace = parts[1], parts[3], parts[7]
        if subscription.lower() != own[1].lower():
            code, message = "SubscriptionNotFound", f"The subscription '{subscription}' could not be found."
        elif group.lower() != own[3].lower():
            code, message = "ResourceGroupNotFound", f"Resource group '{group}' could not be found."
        elif workspace.lower() != own[7].lower():
            code, message = "ResourceNotFound", (
                f"The Resource '{PROVIDER}/workspaces/{workspace}' under resource group '{group}' was not found. "
                "For more details please go to https://aka.ms/ARMResourceNotFoundFix")
        else:
            code = message = ""
        if code:
            self.arm["not_found"] += 1
            self._log(**event, outcome="arm_not_found", status=404, code=code)
            return arm_error(404, code, message)
        properties: dict[str, Any] = {
            "friendlyName": own[7], "workspaceId": WORKSPACE_ID, "provisioningState": "Succeeded",
            "discoveryUrl": f"https://{self.api_host}{DISCOVERY_PATH}",
            "mlFlowTrackingUri": f"azureml://{self.api_host}/mlflow/v1.0{self.scope}",
            "hbiWorkspace": False, "publicNetworkAccess": "Enabled",
        }
        if self.config.arm_omit_tracking_uri:
            del properties["mlFlowTrackingUri"]
        self.arm["served"] += 1
        self._log(**event, outcome="arm_workspace", status=200)
        return _json(200, {"id": self.scope, "name": own[7], "type": f"{PROVIDER}/workspaces",
                           "location": WORKSPACE_LOCATION, "kind": "Default",
                           "sku": {"name": "Basic", "tier": "Basic"}, "properties": properties})

    async def discovery_document(self, request: web.Request) -> web.Response:
        self.discovery["requests"] += 1
        self._log(method=request.method, path=request.path, endpoint="discovery", outcome="discovery", status=200)
        base = f"https://{self.api_host}"
        return _json(200, {"api": base, "catalog": base, "experimentation": base, "gallery": f"{base}/gallery/v1.0",
                           "history": base, "hyperdrive": base, "labeling": base, "modelmanagement": base,
                           "pipelines": base, "studio": "https://ml.azure.com"})

    # -- authentication --------------------------------------------------------------------------------------

    def _authenticate(self, request: web.Request, event: dict[str, Any]) -> web.Response | None:
        """None if the request carries a valid token, else the 401 to answer."""
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            reason: str | None = "missing"
        else:
            reason, exp = check_token(self.secret, token)
            event["token_id"] = token_fingerprint(token)
            event["token_exp"] = exp
        if reason is None:
            assert token is not None
            self.valid_tokens.add(token_fingerprint(token))
            return None
        self.unauthorized[reason] += 1
        self._log(**event, outcome="unauthorized", reason=reason, status=401)
        return azure_error(401, "Unauthorized", _MESSAGES[reason], reason,
                           {"WWW-Authenticate": f'Bearer authorization_uri="https://login.microsoftonline.com/", '
                                                f'error="invalid_token", error_description="{reason}"'})

    # -- run-history token renewal ------------------------------------------------------------------------------

    async def run_token(self, request: web.Request) -> web.Response:
        event: dict[str, Any] = {"method": request.method, "path": request.path, "endpoint": "history/token"}
        refused = self._authenticate(request, event)
        if refused is not None:
            self.history["refused"] += 1
            return refused
        run_id = request.match_info["run"]
        run = await self._get_run(run_id)
        experiment_id = run.get("info", {}).get("experiment_id") if run else None
        wanted_id = request.match_info.get("experiment")
        ok = run is not None and (wanted_id is None or wanted_id == experiment_id)
        if ok and wanted_id is None:
            name = request.match_info["experiment_name"]
            ok = await self._experiment_name(str(experiment_id)) == name
        if not ok:
            self.history["refused"] += 1
            self._log(**event, outcome="not_found", status=404)
            return azure_error(404, "UserError", f"Run {run_id} was not found in this experiment.", "NotFound")
        token, exp = self.mint(self.config.token_ttl, "run")
        self.history["renewals"] += 1
        self._log(**event, outcome="run_token", status=200, new_token_id=token_fingerprint(token), new_token_exp=exp)
        return _json(200, {"token": token, "expiryTimeUtc": iso_utc(exp)})

    async def _get_run(self, run_id: str) -> dict[str, Any] | None:
        assert self.session is not None
        async with self.session.get(f"{self.target}/api/2.0/mlflow/runs/get", params={"run_id": run_id}) as resp:
            if resp.status != 200:
                return None
            data = await resp.json()
        run = data.get("run") if isinstance(data, dict) else None
        return run if isinstance(run, dict) else None

    async def _experiment_name(self, experiment_id: str) -> str | None:
        assert self.session is not None
        async with self.session.get(f"{self.target}/api/2.0/mlflow/experiments/get",
                                    params={"experiment_id": experiment_id}) as resp:
            if resp.status != 200:
                return None
            data = await resp.json()
        name = data.get("experiment", {}).get("name") if isinstance(data, dict) else None
        return name if isinstance(name, str) else None

    # -- the MLflow endpoint ---------------------------------------------------------------------------------------

    def _mlflow_path(self, raw_path: str) -> str | None:
        """``/api/2.0/mlflow/...`` (with the query) from a workspace URL, or None if it is not one."""
        path, sep, query = raw_path.partition("?")
        for version in ("v2.0", "v1.0"):
            prefix = f"/mlflow/{version}{self.scope}"
            if path.lower().startswith(prefix.lower() + "/"):
                rest = path[len(prefix):]
                if rest.startswith(("/api/2.0/mlflow/", "/api/2.0/mlflow-artifacts/")):
                    return rest + sep + query
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.counts["requests"] += 1
        target_path = self._mlflow_path(request.raw_path)
        endpoint = (target_path or request.path).partition("?")[0].split("/api/2.0/", 1)[-1]
        endpoint = endpoint.removeprefix("mlflow/")
        event: dict[str, Any] = {"method": request.method, "path": request.path, "endpoint": endpoint}
        refused = self._authenticate(request, event)
        if refused is not None:
            return refused
        if target_path is None:
            self.counts["not_found"] += 1
            self._log(**event, outcome="not_found", status=404)
            return azure_error(404, "NotFound", f"No workspace API at {request.path}", "NotFound")
        if endpoint.startswith("logged-models"):
            self.counts["not_found"] += 1
            self._log(**event, outcome="not_found", status=404)
            return azure_error(404, "NotFound", "The requested resource was not found.", "NotFound")
        if self.config.p_429 > 0 and self.rng.random() < self.config.p_429:
            self.counts["throttled"] += 1
            self._log(**event, outcome="throttled", status=429)
            return azure_error(429, "TooManyRequests",
                               f"Rate limit is exceeded. Try again in {self.config.retry_after} seconds.",
                               "RateLimited", {"Retry-After": str(self.config.retry_after)})
        refusal = self._history_page_refusal(request, endpoint)
        if refusal is not None:
            self._log(**event, outcome="limit", reason="max_results", status=400)
            return refusal
        parsed = _json_body(body) if request.method == "POST" else None
        if endpoint == "runs/log-batch" and parsed is not None:
            refusal = self._metric_values_refusal(parsed)
            if refusal is not None:
                self._log(**event, outcome="limit", reason="metric_values", status=400)
                return refusal
        keys = _param_keys(endpoint, parsed)
        if keys:
            run_id = str(parsed.get("run_id") or parsed.get("run_uuid") or "") if parsed else ""
            lock = self._run_locks.setdefault(run_id, asyncio.Lock())
            async with lock:  # count and write atomically: concurrent batches of one run see each other
                refusal = await self._params_refusal(run_id, keys)
                if refusal is not None:
                    self._log(**event, outcome="limit", reason="params", status=400)
                    return refusal
                return await self._forward_and_answer(request, body, target_path, endpoint, event)
        return await self._forward_and_answer(request, body, target_path, endpoint, event)

    def _history_page_refusal(self, request: web.Request, endpoint: str) -> web.Response | None:
        if endpoint != "metrics/get-history":
            return None
        try:
            asked = int(request.query.get("max_results", "0"))
        except ValueError:
            return None
        if asked < MAX_RESULTS_LIMIT:
            return None
        self.limit_refusals["max_results"] += 1
        return azure_error(400, "UserError", f"MaxResults must be less than {MAX_RESULTS_LIMIT}", "BadArgument")

    def _metric_values_refusal(self, body: dict[str, Any]) -> web.Response | None:
        metrics = body.get("metrics")
        if not isinstance(metrics, list):
            return None
        per_key = Counter(m.get("key") for m in metrics if isinstance(m, dict))
        worst = max(per_key.values(), default=0)
        if worst <= METRIC_VALUES_LIMIT:
            return None
        self.limit_refusals["metric_values"] += 1
        return azure_error(400, "UserError", "The request is invalid. FieldName=MetricV2Dto.Value/Count, "
                                             f"Limit={METRIC_VALUES_LIMIT}, Size={worst}", "BadArgument")

    async def _params_refusal(self, run_id: str, keys: set[str]) -> web.Response | None:
        run = await self._get_run(run_id)
        if run is None:
            return None  # the real server answers for a missing run
        params = run.get("data", {}).get("params") or []
        stored = {p.get("key") for p in params if isinstance(p, dict)}
        size = len(stored | keys)
        if size <= PARAMS_LIMIT:
            return None
        self.limit_refusals["params"] += 1
        return azure_error(400, "UserError", f"The request is invalid. FieldName=Parameters, Limit={PARAMS_LIMIT}, "
                                             f"Size={size}", "BadArgument")

    async def _forward_and_answer(self, request: web.Request, body: bytes, target_path: str, endpoint: str,
                                  event: dict[str, Any]) -> web.Response:
        assert self.session is not None
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _SKIP_REQUEST_HEADERS)
        url = URL(self.target + target_path, encoded=True)
        try:
            async with self.session.request(request.method, url, data=body or None, headers=headers,
                                            allow_redirects=False) as resp:
                payload = await resp.read()
                out: CIMultiDict[str] = CIMultiDict(
                    (k, v) for k, v in resp.headers.items() if k.lower() not in _SKIP_RESPONSE_HEADERS)
                status, reason = resp.status, resp.reason
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.counts["upstream_error"] += 1
            self._log(**event, outcome="upstream_error", status=502, error=f"{type(exc).__name__}: {exc}")
            return azure_error(502, "ServiceError", f"upstream unreachable: {type(exc).__name__}", "BadGateway")
        self.counts["forwarded"] += 1
        self.forwarded_by_endpoint[endpoint] += 1
        self.last_forwarded_at = time.time()
        self._log(**event, outcome="forwarded", status=status, done=round(time.time(), 3))
        return web.Response(status=status, reason=reason, headers=out, body=payload)


def _json_body(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _param_keys(endpoint: str, body: dict[str, Any] | None) -> set[str]:
    if body is None:
        return set()
    if endpoint == "runs/log-parameter":
        return {str(body["key"])} if "key" in body else set()
    if endpoint == "runs/log-batch" and isinstance(body.get("params"), list):
        return {str(p["key"]) for p in body["params"] if isinstance(p, dict) and "key" in p}
    return set()


async def serve(gateway: GatewayApp, port: int, cert: Path, key: Path) -> None:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(gateway.app, access_log=None, shutdown_timeout=1.0, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, port, ssl_context=context, reuse_address=True)
    await site.start()
    await gateway.start_identity()
    print(f"azure gateway: https://{LOOPBACK}:{port}{gateway.scope} -> {gateway.target}; identity "
          f"http://{gateway.identity_host}:{gateway.identity_port}{IDENTITY_PATH}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        if gateway.identity_runner is not None:
            await gateway.identity_runner.cleanup()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.azure_gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="HTTPS port (the workspace host)")
    parser.add_argument("--identity-port", type=int, required=True, help="HTTP port of the identity endpoint")
    parser.add_argument("--target", required=True, help="base URL of the real MLflow server")
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--subscription", default=SUBSCRIPTION_ID)
    parser.add_argument("--resource-group", default=RESOURCE_GROUP)
    parser.add_argument("--workspace", default=WORKSPACE)
    parser.add_argument("--token-ttl", type=float, default=5.0)
    parser.add_argument("--p-429", type=float, default=0.0)
    parser.add_argument("--retry-after", type=int, default=1)
    parser.add_argument("--identity-down-mode", default="refuse", choices=("refuse", "500"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state-dir", type=Path, required=True, help="where minted-tokens.jsonl and "
                                                                       "requests.jsonl go")
    args = parser.parse_args(argv)
    secret, identity_header = os.environ.get(SECRET_ENV, ""), os.environ.get(IDENTITY_HEADER_ENV, "")
    if not secret or not identity_header:
        parser.error(f"{SECRET_ENV} and {IDENTITY_HEADER_ENV} must be set")
    try:
        config = GatewayConfig(token_ttl=args.token_ttl, p_429=args.p_429, retry_after=args.retry_after,
                               identity_down_mode=args.identity_down_mode)
    except ValueError as exc:
        parser.error(str(exc))
    args.state_dir.mkdir(parents=True, exist_ok=True)
    gateway = GatewayApp(target=args.target, secret=secret, identity_header=identity_header,
                         scope=scope_of(args.subscription, args.resource_group, args.workspace), config=config,
                         seed=args.seed, state_dir=args.state_dir, identity_host=LOOPBACK,
                         identity_port=args.identity_port, api_host=f"{LOOPBACK}:{args.port}")
    asyncio.run(serve(gateway, args.port, args.cert, args.key))
    return 0


# -- the test-side handle ----------------------------------------------------------------------------------------


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl CLI): (cert.pem, key.pem)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl CLI is needed to make the gateway's certificate")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


class AzureGateway:
    """The stand-in as a subprocess on free loopback ports, in front of the MLflow server ``target_mlflow_url``.

    Starts on construction (unless ``start=False``); stop it with :meth:`stop` / :meth:`close` or use it as
    a context manager. Give the agent ``--upstream gateway.uri`` and ``gateway.agent_env()``, or a
    ``config.json`` (:meth:`write_workspace_config`) with ``--azureml-config`` and ``--azure-arm-endpoint
    gateway.arm_endpoint``. ``target_mlflow_url`` may name a closed port when only tokens and ARM are used.
    """

    def __init__(
        self,
        target_mlflow_url: str | HasUrl,
        base_dir: Path,
        token_ttl: float = 5.0,
        p_429: float = 0.0,
        retry_after: int = 1,
        *,
        identity_down_mode: str = "refuse",
        seed: int = 0,
        subscription_id: str = SUBSCRIPTION_ID,
        resource_group: str = RESOURCE_GROUP,
        workspace: str = WORKSPACE,
        port: int | None = None,
        identity_port: int | None = None,
        start: bool = True,
    ) -> None:
        self.target_url = url_of(target_mlflow_url)
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.initial_config = GatewayConfig(token_ttl=token_ttl, p_429=p_429, retry_after=retry_after,
                                            identity_down_mode=identity_down_mode)
        self.seed = seed
        self.subscription_id, self.resource_group, self.workspace = subscription_id, resource_group, workspace
        self.port = port if port is not None else free_port()
        self.identity_port = identity_port if identity_port is not None else free_port()
        self.secret = secrets.token_hex(32)
        #: What IDENTITY_HEADER must hold (App Service hands each app a random one).
        self.identity_header = secrets.token_hex(16)
        self.cert_path, self.key_path = make_certificate(self.base_dir / "tls")
        self.state_dir = self.base_dir / "state"
        self.log_path = self.base_dir / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._http = requests.Session()
        self._http.trust_env = False
        self._http.verify = str(self.cert_path)
        if start:
            self.start()

    # -- addresses --------------------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``: the workspace's API host."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def scope(self) -> str:
        return scope_of(self.subscription_id, self.resource_group, self.workspace)

    @property
    def uri(self) -> str:
        """The workspace's ``azureml://`` tracking URI (what ``az ml workspace show`` prints)."""
        return f"azureml://{self.host}/mlflow/v2.0{self.scope}"

    @property
    def url(self) -> str:
        """``https://127.0.0.1:<port>`` (control endpoints live here)."""
        return f"https://{self.host}"

    @property
    def base_url(self) -> str:
        """Where the MLflow REST API of the workspace lives: ``https://<host>/mlflow/v2.0<scope>``."""
        return f"{self.url}/mlflow/v2.0{self.scope}"

    @property
    def identity_endpoint(self) -> str:
        """What ``IDENTITY_ENDPOINT`` holds."""
        return f"http://{LOOPBACK}:{self.identity_port}{IDENTITY_PATH}"

    @property
    def msi_endpoint(self) -> str:
        """What ``MSI_ENDPOINT`` holds for the 2017-09-01 App Service API."""
        return f"http://{LOOPBACK}:{self.identity_port}{IDENTITY_2017_PATH}"

    @property
    def arm_endpoint(self) -> str:
        """The ARM stand-in: give the agent ``--azure-arm-endpoint`` this (``https://127.0.0.1:<port>``)."""
        return self.url

    def arm_resource_url(self, workspace: str | None = None) -> str:
        """The ARM URL of a workspace (default: the gateway's own) in this gateway's subscription and group."""
        scope = scope_of(self.subscription_id, self.resource_group, workspace or self.workspace)
        return f"{self.arm_endpoint}{scope}?api-version=2024-10-01"

    @property
    def discovery_url(self) -> str:
        return f"{self.url}{DISCOVERY_PATH}"

    def workspace_config(self, **overrides: str) -> dict[str, str]:
        """A ``config.json`` naming the gateway's workspace (``workspace_name="other"`` etc. to change a key)."""
        return {"subscription_id": self.subscription_id, "resource_group": self.resource_group,
                "workspace_name": self.workspace, **overrides}

    def write_workspace_config(self, path: Path, **overrides: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.workspace_config(**overrides)))
        return path

    def agent_env(self) -> dict[str, str]:
        """The environment an agent outside a job needs: managed identity and trust in the certificate."""
        return {"IDENTITY_ENDPOINT": self.identity_endpoint, "IDENTITY_HEADER": self.identity_header,
                "MLFLOW_TRACKING_SERVER_CERT_PATH": str(self.cert_path)}

    def msi_env(self) -> dict[str, str]:
        """What App Service sets for the 2017-09-01 managed-identity API that azureml-core (msrestazure)
        uses: without ``APPSETTING_WEBSITE_SITE_NAME`` msrestazure would POST to ``MSI_ENDPOINT`` instead."""
        return {"MSI_ENDPOINT": self.msi_endpoint, "MSI_SECRET": self.identity_header,
                "APPSETTING_WEBSITE_SITE_NAME": APP_SERVICE_SITE}

    # -- lifecycle ---------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        c = self.initial_config
        return [
            sys.executable, "-m", "tests.support.azure_gateway",
            "--port", str(self.port), "--identity-port", str(self.identity_port),
            "--target", self.target_url, "--cert", str(self.cert_path), "--key", str(self.key_path),
            "--subscription", self.subscription_id, "--resource-group", self.resource_group,
            "--workspace", self.workspace, "--token-ttl", repr(c.token_ttl), "--p-429", repr(c.p_429),
            "--retry-after", str(c.retry_after), "--identity-down-mode", c.identity_down_mode,
            "--seed", str(self.seed), "--state-dir", str(self.state_dir),
        ]  # fmt: skip

    def start(self, timeout: float = START_TIMEOUT) -> AzureGateway:
        if self.running:
            raise RuntimeError(f"gateway {self.url} is already running")
        env = python_env({SECRET_ENV: self.secret, IDENTITY_HEADER_ENV: self.identity_header})
        self.proc = spawn(self.command(), self.log_path, env=env, cwd=REPO_ROOT)
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            try:
                if self._http.get(f"{self.url}{STATS_PATH}", timeout=5).status_code == 200:
                    return self
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}: {exc}"
            if self.proc.poll() is not None:
                raise ProcessDiedError(f"azure gateway exited with {self.proc.returncode} ({last})\n"
                                       f"--- log tail ---\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                kill_process(self.proc)
                raise TimeoutError(f"azure gateway did not answer within {timeout:.0f}s ({last})\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 10) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=timeout)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self._http.close()

    def __enter__(self) -> AzureGateway:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- control -------------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """``{"requests", "forwarded", "forwarded_by_endpoint", "throttled", "upstream_error", "not_found",
        "unauthorized": {reason: n}, "unauthorized_total", "tokens_minted", "minted_by_kind",
        "distinct_tokens", "limit_refusals": {"metric_values", "params", "max_results"},
        "limit_refusals_total", "identity": {"requests", "served", "bad_header", "down"},
        "history": {"renewals", "refused"}, "identity_by_api": {version: n}, "arm": {"requests", "served",
        "not_found", "unauthorized", "bad_request", "down"}, "discovery": {"requests"}, "last_forwarded_at",
        "config"}``."""
        resp = self._http.get(f"{self.url}{STATS_PATH}", timeout=10)
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data

    def config(self) -> dict[str, Any]:
        resp = self._http.get(f"{self.url}{CONFIG_PATH}", timeout=10)
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data

    def set(self, **settings: Any) -> dict[str, Any]:
        """Change settings at run time (``identity_down=True``, ``token_ttl=3``, ``p_429=0.1``, ``arm_down=True``,
        ``arm_omit_tracking_uri=True``, ...)."""
        resp = self._http.post(f"{self.url}{CONFIG_PATH}", json=settings, timeout=10)
        if resp.status_code != 200:
            raise ValueError(f"gateway refused {settings}: {resp.text}")
        data: dict[str, Any] = resp.json()
        return data

    def mint(self, ttl: float | None = None, kind: str = "test") -> str:
        """A token minted (and recorded) by the gateway, valid for ``ttl`` seconds (default: token_ttl)."""
        body: dict[str, Any] = {"kind": kind}
        if ttl is not None:
            body["ttl"] = ttl
        resp = self._http.post(f"{self.url}{MINT_PATH}", json=body, timeout=10)
        resp.raise_for_status()
        token: str = resp.json()["token"]
        return token

    def minted(self) -> list[dict[str, Any]]:
        """Every token minted so far: ``{"time", "kind", "exp", "token"}``, oldest first."""
        path = self.state_dir / "minted-tokens.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def minted_tokens(self) -> list[str]:
        return [entry["token"] for entry in self.minted()]

    def request_log(self) -> list[dict[str, Any]]:
        """One entry per request (and ``event: "config"`` lines for setting changes)."""
        path = self.state_dir / "requests.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)

    def __repr__(self) -> str:
        return f"AzureGateway(uri={self.uri!r}, target={self.target_url!r}, running={self.running})"


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
