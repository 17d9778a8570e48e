"""A local stand-in for an Azure Machine Learning workspace's MLflow endpoint, on real sockets.

Run it as a process::

    GATEWAY_SECRET=... GATEWAY_IDENTITY_HEADER=... python -m tests.support.azure_gateway \\
        --port P --identity-port Q --target http://127.0.0.1:M --cert CERT --key KEY \\
        [--subscription S --resource-group G --workspace W --token-ttl 5 --p-429 0 --retry-after 1 \\
         --seed N --identity-down-mode refuse|500 --state-dir DIR]

or from a test with :class:`AzureGateway`, which also makes the self-signed certificate (openssl CLI,
``CN=127.0.0.1``, ``subjectAltName=IP:127.0.0.1``). Two listeners:

**HTTPS on ``--port``** (the workspace's regional API host, ``azureml://127.0.0.1:P/mlflow/v2.0/<scope>``):

* ``/mlflow/v2.0<scope>/api/2.0/mlflow/...`` (``v1.0`` is accepted too): the scope prefix is stripped
  and the request goes to the real MLflow server at ``--target``, but only with ``Authorization: Bearer
  <token>`` carrying a token this gateway minted and that has not expired. Anything else is answered 401
  with Azure's envelope ``{"error": {"code": "Unauthorized", "message", "innerError": {"code": <reason>}},
  "correlation": {"operation", "request"}}`` where the reason is ``missing``, ``malformed``,
  ``bad_signature`` or ``expired``. A path outside the workspace's scope gets 404, and so does MLflow's
  artifact proxy API ``.../api/2.0/mlflow-artifacts/...`` (Azure ML does not serve it: 404 ``NotFound``
  in Azure's envelope, nothing forwarded).
* Runs look like Azure's: in the answers of ``runs/create``, ``runs/get``, ``runs/search`` and
  ``runs/update`` every ``artifact_uri`` ``mlflow-artifacts:/<exp>/<run>/artifacts`` the real server
  gave becomes ``azureml://127.0.0.1:P/mlflow/v2.0<scope>/experiments/<exp>/runs/<run>/artifacts``
  (the JSON is written anew only when something changed; Content-Length follows).
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
* Run-history artifacts (Azure ML's artifact path: run history registers a path, Blob Storage holds the
  bytes), authenticated like the MLflow calls (the same 401 envelope), under
  ``/history/v1.0<scope>/experimentids/<exp>/runs/<run>/artifacts...`` and ``.../experiments/<name>/runs/
  <run>/artifacts...``. The run must exist on the real server in that experiment (by id, or by name),
  else 404 ``UserError``. Artifact = ``{"artifactId": "ExperimentRun/dcid.<run>/<path>", "origin":
  "ExperimentRun", "container": "dcid.<run>", "path", "createdTime": <ISO 8601 UTC>, "etag"}``; the
  records live in memory and in ``<state-dir>/artifacts.json`` (``{"runs": {<run>: {<path>: Artifact}}}``,
  written before the answer, read at start: a restart keeps them).

  * ``POST .../artifacts/batch/metadata`` ``{"paths": [{"path": p}, ...]}`` (at most 100, else 400
    ``UserError`` "Artifact batch size exceeded the limit of 100"; a body of another shape: 400) answers
    ``{"artifacts": {p: Artifact}, "artifactContentInformation": {p: {"contentUri": <write SAS URL>,
    "origin": "ExperimentRun", "container": "dcid.<run>", "path": p}}, "errors": {p: {"error": {"code":
    "UserError", "message"}}}}``. A path that is empty, absolute, has an empty, ``.`` or ``..`` segment, a
    backslash or NUL, or is longer than 5000 characters gets an error "invalid artifact path: ..."; a path
    the run already has gets "Resource Conflict: ArtifactId ExperimentRun/dcid.<run>/<p> already exists."
    and no SAS (as Azure, a second upload of one path is refused). A path named twice in one batch counts once.
  * ``GET .../artifacts/contentinfo?path=p``: ``{"contentUri": <read-only SAS URL>, "origin", "container",
    "path"}``; a path the run does not have: 404 ``UserError``.
  * ``GET .../artifacts/path?path=<dir>[&continuationToken=t]`` (the artifacts under ``<dir>/``) and
    ``GET .../artifacts[?continuationToken=t]`` (all of the run's): ``{"value": [Artifact, ...],
    "continuationToken": <opaque string, or null on the last page>, "nextLink": null}``, sorted by path,
    ``artifact_page_size`` per page; a token this gateway did not make: 400 ``UserError``.

* Azure Blob Storage under ``/blob/<container>/<blob>`` (container ``azureml``; an artifact's blob is
  ``ExperimentRun/dcid.<run>/<path>``; the SAS URLs above are ``https://127.0.0.1:P/blob/azureml/<blob,
  percent-encoded>?sv=2021-08-06&sr=b&sp=<rcw|r>&se=<expiry, e.g. 2026-12-03T10:00:00Z>&sig=<sig>``
  where sig is the base64 HMAC-SHA256 of ``"<sp>\\n<se>\\n/blob/<container>/<blob>"`` keyed with
  ``GATEWAY_SECRET``; write SAS ``sp=rcw``, read SAS ``sp=r``, lifetime ``sas_ttl`` rounded up to whole
  seconds). As Azure Storage: the SAS in the query is the only authentication; errors are XML
  ``<?xml version="1.0" encoding="utf-8"?><Error><Code>C</Code><Message>...</Message></Error>``
  (``application/xml``, also ``x-ms-error-code: C``; HEAD gets no body).

  * A request with an ``Authorization`` header (a bearer token sent to storage) is answered 400
    ``InvalidAuthenticationInfo`` and counted as ``bearer_seen`` (logged with the token's fingerprint only).
  * No/ill-formed SAS, a wrong signature or an expired ``se``: 403 ``AuthenticationFailed`` (with an
    ``<AuthenticationErrorDetail>``); a valid SAS without ``w`` (PUT) or ``r`` (GET, HEAD): 403
    ``AuthorizationPermissionMismatch``. Another container: 404 ``ContainerNotFound``; another method:
    405 ``UnsupportedHttpVerb``.
  * ``PUT`` (Put Blob) needs ``x-ms-blob-type: BlockBlob`` (missing: 400 ``MissingRequiredHeader``, another
    type: 400 ``InvalidHeaderValue``) and a Content-Length (else 411 ``MissingContentLengthHeader``; more
    than 5000 MiB: 413 ``RequestBodyTooLarge``). The body is streamed to ``<state-dir>/blobs/.tmp`` and
    renamed into place only once complete (an upload that breaks off leaves no blob, and an older
    version stays); a ``Content-MD5`` that does not match: 400 ``Md5Mismatch``. The content type is
    ``x-ms-blob-content-type``, else ``Content-Type``, else ``application/octet-stream``. 201 with
    ``ETag``, ``Last-Modified`` and ``Content-MD5``; it replaces an existing blob (and drops its staged
    blocks).
  * ``PUT ?comp=block&blockid=<base64, at most 64 bytes>`` (Put Block: staged, 201; a block id of another
    length than the blob's other staged ones: 400 ``InvalidBlobOrBlock``; at most 4000 MiB) and ``PUT
    ?comp=blocklist`` with ``<?xml ...?><BlockList><Latest>id</Latest>...</BlockList>`` (Put Block List:
    the named staged blocks, in order, become the blob, 201 with ``ETag``; content type from
    ``x-ms-blob-content-type``; an id that is not staged: 400 ``InvalidBlockList``, so are
    ``<Committed>`` ids, as committed blocks are not kept; bad XML: 400 ``InvalidXmlDocument``).
    Committing drops the blob's other staged blocks.
  * ``GET``: 200, the bytes streamed, with ``Content-Length``, ``Content-Type``, ``ETag``,
    ``Last-Modified``, ``Content-MD5`` (when known) and ``x-ms-blob-type``; ``Range``/``x-ms-range:
    bytes=a-[b]`` gives 206 with ``Content-Range`` (416 ``InvalidRange`` past the end). ``HEAD``: the same
    headers. A blob that does not exist: 404 ``BlobNotFound``.
  * Faults: with ``blob_p_503`` a seeded random share of Put Blob and Put Block requests (with a valid
    SAS) is answered 503 ``ServerBusy`` before the body is read; with ``blob_reset_after`` > 0 the next Put
    Blob or Put Block whose body is longer than that has its connection dropped once that many bytes
    were read, and the setting goes back to 0 (logged as a ``config`` event).
  * ``<state-dir>/blobs/<sha256 of "<container>/<blob>">.blob`` holds a blob's bytes
    (:meth:`AzureGateway.blob_file`), ``.json`` next to it its properties, ``.blocks/`` its staged blocks.

* Control (no authentication): ``GET /__stats`` (counts, below), ``GET``/``POST /__config`` (settings:
  ``token_ttl``, ``p_429``, ``retry_after``, ``identity_down``, ``identity_down_mode``, ``arm_down``,
  ``arm_down_mode``, ``arm_omit_tracking_uri``, ``artifact_page_size`` (50), ``sas_ttl`` (3600 s),
  ``blob_p_503``, ``blob_reset_after`` (bytes)), ``POST /__mint`` ``{"ttl": s, "kind": k}`` (a token
  minted by the gateway, as a job would be handed one), ``GET /__artifacts?run_id=R`` (``{"run_id",
  "paths": [registered paths, sorted]}``; without ``run_id``: ``{"runs": {run: [paths]}}``).

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
``discovery`` (``requests``), ``identity_by_api`` (``{"2019-08-01": n, "2017-09-01": n}``), ``artifacts``
(of requests for a run that exists: ``metadata_requests``, ``created``, ``conflicts``, ``invalid_paths``,
``contentinfo`` and ``listings`` served, ``not_found``) and ``blob`` (with a valid SAS: ``put``,
``put_block``, ``put_block_list``, ``get``, ``head``; ``stored`` (blobs written), ``sas_refused`` (403s),
``bearer_seen``, ``faults`` (503s and dropped connections), ``incomplete`` (bodies that broke off),
``bad_request``, ``not_found``).
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
import math
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from email.utils import formatdate
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote, urlencode
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import aiohttp
import requests
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
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

ARTIFACTS_PATH = "/__artifacts"
ARTIFACTS_STATE = "artifacts.json"  # in the state dir
BLOBS_DIR = "blobs"  # in the state dir
BLOB_PREFIX = "/blob"
BLOB_CONTAINER = "azureml"
ARTIFACT_ORIGIN = "ExperimentRun"
SAS_VERSION = "2021-08-06"
SAS_EXPIRY_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
ARTIFACT_BATCH_LIMIT = 100  # paths in one batch/metadata call
ARTIFACT_PATH_LIMIT = 5000  # characters of an artifact path
MAX_BLOB_BYTES = 5000 * 1024**2  # one Put Blob
MAX_BLOCK_BYTES = 4000 * 1024**2  # one Put Block
BLOCK_ID_LIMIT = 64  # bytes of a block id, decoded
_READ_CHUNK = 1024**2
_WRITE_CHUNK = 4 * 1024**2  # bodies go to disk (off the event loop) in pieces of about this size
_RUN_ANSWERS = frozenset({"runs/create", "runs/get", "runs/search", "runs/update"})
_MLFLOW_ARTIFACT_URI = re.compile(r"mlflow-artifacts:/(?P<experiment>[^/]+)/(?P<run>[^/]+)/artifacts")

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
    artifact_page_size: int = 50  # artifacts per page of a run-history listing
    sas_ttl: float = 3600.0  # seconds a SAS URL handed out stays valid
    blob_p_503: float = 0.0  # share of Put Blob / Put Block requests answered 503 ServerBusy
    blob_reset_after: int = 0  # > 0: drop the next longer blob upload after this many bytes (then 0 again)

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
        if self.artifact_page_size <= 0:
            raise ValueError("artifact_page_size must be > 0")
        if self.sas_ttl <= 0:
            raise ValueError("sas_ttl must be > 0")
        if not 0.0 <= self.blob_p_503 <= 1.0:
            raise ValueError(f"blob_p_503 must be within [0, 1], got {self.blob_p_503}")
        if self.blob_reset_after < 0:
            raise ValueError("blob_reset_after must be >= 0")

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
            artifact_page_size=int(merged["artifact_page_size"]),
            sas_ttl=float(merged["sas_ttl"]),
            blob_p_503=float(merged["blob_p_503"]),
            blob_reset_after=int(merged["blob_reset_after"]),
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


# -- artifacts: run history and blob storage -----------------------------------------------------------------


def artifact_container(run_id: str) -> str:
    """Run history's container of a run's artifacts: ``dcid.<run>``."""
    return f"dcid.{run_id}"


def artifact_blob_name(run_id: str, artifact_path: str) -> str:
    """The blob (in container :data:`BLOB_CONTAINER`) a run's artifact lives in."""
    return f"{ARTIFACT_ORIGIN}/{artifact_container(run_id)}/{artifact_path}"


def artifact_id(run_id: str, artifact_path: str) -> str:
    return artifact_blob_name(run_id, artifact_path)


def artifact_path_error(path: str) -> str | None:
    """Why run history refuses ``path`` as an artifact path, or None."""
    if not path:
        return "the path is empty"
    if len(path) > ARTIFACT_PATH_LIMIT:
        return f"the path is longer than {ARTIFACT_PATH_LIMIT} characters"
    if "\\" in path or "\x00" in path:
        return "the path has a backslash or a NUL character"
    if path.startswith("/"):
        return "the path is absolute"
    if any(segment in ("", ".", "..") for segment in path.split("/")):
        return "the path has an empty, '.' or '..' segment"
    return None


def sas_string_to_sign(permissions: str, expiry: str, container: str, blob: str) -> str:
    return f"{permissions}\n{expiry}\n{BLOB_PREFIX}/{container}/{blob}"


def sas_signature(secret: str, permissions: str, expiry: str, container: str, blob: str) -> str:
    """The ``sig`` of a SAS: base64 HMAC-SHA256 of :func:`sas_string_to_sign`."""
    message = sas_string_to_sign(permissions, expiry, container, blob).encode()
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()


def sas_expiry(ttl_seconds: float, *, now: float | None = None) -> str:
    """``se``: ``now + ttl`` rounded up to whole seconds, as ``2026-12-03T10:00:00Z``."""
    at = math.ceil((time.time() if now is None else now) + ttl_seconds)
    return datetime.fromtimestamp(at, timezone.utc).strftime(SAS_EXPIRY_FORMAT)


def blob_url(base_url: str, secret: str, container: str, blob: str, *, permissions: str, ttl_seconds: float) -> str:
    """``<base_url>/blob/<container>/<blob, percent-encoded>?sv=...&sr=b&sp=...&se=...&sig=...``."""
    expiry = sas_expiry(ttl_seconds)
    query = urlencode({"sv": SAS_VERSION, "sr": "b", "sp": permissions, "se": expiry,
                       "sig": sas_signature(secret, permissions, expiry, container, blob)})
    return f"{base_url}{BLOB_PREFIX}/{quote(container, safe='')}/{quote(blob, safe='/')}?{query}"


def blob_data_path(blobs_dir: Path, container: str, blob: str) -> Path:
    """Where a blob's bytes are kept (whether or not it exists)."""
    return blobs_dir / f"{_blob_key(container, blob)}.blob"


def _blob_key(container: str, blob: str) -> str:
    # Hashed: blob names may be 5000 characters long, and "a" and "a/b" may both be blobs.
    return hashlib.sha256(f"{container}/{blob}".encode()).hexdigest()


def http_date(unix_seconds: float) -> str:
    return formatdate(unix_seconds, usegmt=True)


def new_etag() -> str:
    """An ETag shaped as Azure Storage's: ``"0x8D..."``."""
    return f'"0x8D{secrets.token_hex(6).upper()}"'


def storage_error(status: int, code: str, message: str, *, detail: str | None = None,
                  extra: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None) -> web.Response:
    """Azure Storage's XML error (``x-ms-error-code`` too); ``extra`` adds elements (``HeaderName`` etc.)."""
    request_id = str(uuid.uuid4())
    text = f"{message}\nRequestId:{request_id}\nTime:{iso_utc(time.time())}"
    elements = [f"<Code>{escape(code)}</Code>", f"<Message>{escape(text)}</Message>"]
    if detail is not None:
        elements.append(f"<AuthenticationErrorDetail>{escape(detail)}</AuthenticationErrorDetail>")
    for name, value in (extra or {}).items():
        elements.append(f"<{name}>{escape(value)}</{name}>")
    body = '<?xml version="1.0" encoding="utf-8"?><Error>' + "".join(elements) + "</Error>"
    return web.Response(status=status, body=body.encode(), content_type="application/xml",
                        headers={"x-ms-request-id": request_id, "x-ms-error-code": code, "x-ms-version": SAS_VERSION,
                                 **(headers or {})})


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_chunk(out: IO[bytes], digest: Any, data: bytearray) -> None:
    out.write(data)
    digest.update(data)


def _encode_continuation(after: str) -> str:
    return _b64url(json.dumps({"after": after}).encode())


def _decode_continuation(token: str) -> str:
    """The path a page ended with; ValueError for a token this gateway did not make."""
    try:
        data = json.loads(_b64url_decode(token))
    except (ValueError, binascii.Error) as exc:
        raise ValueError("malformed continuation token") from exc
    after = data.get("after") if isinstance(data, dict) else None
    if not isinstance(after, str):
        raise ValueError("malformed continuation token")
    return after


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of ``bytes=a-[b]`` (None: the whole blob); ValueError if past the end."""
    match = re.fullmatch(r"\s*bytes=(\d+)-(\d*)\s*", header or "")
    if match is None:
        return None  # no or an unsupported range: the whole blob, as HTTP servers do
    first = int(match[1])
    last = min(int(match[2]), size - 1) if match[2] else size - 1
    if first >= size or last < first:
        raise ValueError(f"range {header!r} is not within {size} bytes")
    return first, last


class ArtifactRegistry:
    """Run history's artifact records, per run; persisted to ``artifacts.json`` (read back at start)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: dict[str, dict[str, dict[str, Any]]] = {}
        if path.exists():
            data = json.loads(path.read_text())
            self.runs = {str(run): dict(records) for run, records in data["runs"].items()}
        self._lock = asyncio.Lock()

    def get(self, run_id: str, path: str) -> dict[str, Any] | None:
        return self.runs.get(run_id, {}).get(path)

    def register(self, run_id: str, path: str) -> dict[str, Any] | None:
        """The new record, or None if the run already has ``path`` (no await: check and insert are atomic)."""
        records = self.runs.setdefault(run_id, {})
        if path in records:
            return None
        record = {"artifactId": artifact_id(run_id, path), "origin": ARTIFACT_ORIGIN,
                  "container": artifact_container(run_id), "path": path, "createdTime": iso_utc(time.time()),
                  "etag": str(uuid.uuid4())}
        records[path] = record
        return record

    def under(self, run_id: str, prefix: str) -> list[dict[str, Any]]:
        """The run's records whose path starts with ``prefix``, sorted by path."""
        records = self.runs.get(run_id, {})
        return [records[p] for p in sorted(records) if p.startswith(prefix)]

    def paths(self, run_id: str) -> list[str]:
        return sorted(self.runs.get(run_id, {}))

    async def save(self) -> None:
        async with self._lock:  # each write holds everything registered before it: the last one wins
            text = json.dumps({"runs": self.runs})
            await asyncio.to_thread(_write_atomic, self.path, text)


@dataclass
class BlobProperties:
    name: str  # "<container>/<blob>"
    size: int
    content_type: str
    etag: str
    last_modified: float
    content_md5: str | None  # base64


class BlobStore:
    """Blobs on disk: ``<root>/<key>.blob`` (the bytes), ``<key>.json`` (properties, written last: a blob
    exists once it is there), ``<key>.blocks/<hex of the block id>`` (staged blocks); uploads in progress
    go to ``<root>/.tmp`` (emptied at start). Called off the event loop where the files are large."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / ".tmp"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)  # uploads a killed gateway never finished: no blobs
        self.tmp.mkdir(parents=True)

    def data_path(self, container: str, blob: str) -> Path:
        return blob_data_path(self.root, container, blob)

    def meta_path(self, container: str, blob: str) -> Path:
        return self.root / f"{_blob_key(container, blob)}.json"

    def blocks_dir(self, container: str, blob: str) -> Path:
        return self.root / f"{_blob_key(container, blob)}.blocks"

    def temp_path(self) -> Path:
        return self.tmp / uuid.uuid4().hex

    def properties(self, container: str, blob: str) -> BlobProperties | None:
        meta = self.meta_path(container, blob)
        if not meta.exists():
            return None
        return BlobProperties(**json.loads(meta.read_text()))

    def commit(self, container: str, blob: str, data: Path, props: BlobProperties) -> None:
        """Move a complete upload into place (bytes first, then properties) and drop staged blocks."""
        meta = self.temp_path()
        meta.write_text(json.dumps(asdict(props)))
        os.replace(data, self.data_path(container, blob))
        os.replace(meta, self.meta_path(container, blob))
        blocks = self.blocks_dir(container, blob)
        if blocks.exists():
            shutil.rmtree(blocks)

    def staged(self, container: str, blob: str) -> dict[str, Path]:
        """Staged block id -> its file."""
        blocks = self.blocks_dir(container, blob)
        if not blocks.exists():
            return {}
        return {bytes.fromhex(f.name).decode(): f for f in blocks.iterdir()}

    def stage(self, container: str, blob: str, block_id: str, data: Path) -> None:
        blocks = self.blocks_dir(container, blob)
        blocks.mkdir(exist_ok=True)
        os.replace(data, blocks / block_id.encode().hex())

    def assemble(self, container: str, blob: str, parts: list[Path], props: BlobProperties) -> BlobProperties:
        """Concatenate staged blocks into the blob; returns its properties (with the size)."""
        data = self.temp_path()
        try:
            with open(data, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, _WRITE_CHUNK)
            props = replace(props, size=data.stat().st_size)
            self.commit(container, blob, data, props)
        finally:
            data.unlink(missing_ok=True)
        return props


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
        self.artifact_counts: Counter[str] = Counter(dict.fromkeys(
            ("metadata_requests", "created", "conflicts", "invalid_paths", "contentinfo", "listings", "not_found"),
            0))
        self.blob_counts: Counter[str] = Counter(dict.fromkeys(
            ("put", "put_block", "put_block_list", "get", "head", "stored", "sas_refused", "bearer_seen", "faults",
             "incomplete", "bad_request", "not_found"), 0))
        self.registry = ArtifactRegistry(state_dir / ARTIFACTS_STATE)
        self.blobs = BlobStore(state_dir / BLOBS_DIR)
        self._blob_locks: dict[str, asyncio.Lock] = {}
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
        for experiment in ("/experimentids/{experiment}", "/experiments/{experiment_name}"):
            artifacts = f"{history}{experiment}/runs/{{run}}/artifacts"
            self.app.router.add_post(artifacts + "/batch/metadata", self.artifact_batch_metadata)
            self.app.router.add_get(artifacts + "/contentinfo", self.artifact_content_info)
            self.app.router.add_get(artifacts + "/path", self.artifact_list_in_path)
            self.app.router.add_get(artifacts, self.artifact_list)
        self.app.router.add_get(ARTIFACTS_PATH, self.get_artifacts)
        self.app.router.add_route("*", BLOB_PREFIX + "/{tail:.*}", self.blob)
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
            "artifacts": dict(self.artifact_counts),
            "blob": dict(self.blob_counts),
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

    async def get_artifacts(self, request: web.Request) -> web.Response:
        run_id = request.query.get("run_id")
        if run_id is not None:
            return _json(200, {"run_id": run_id, "paths": self.registry.paths(run_id)})
        return _json(200, {"runs": {run: self.registry.paths(run) for run in sorted(self.registry.runs)}})

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
        if not await self._run_in_experiment(request):
            self.history["refused"] += 1
            self._log(**event, outcome="not_found", status=404)
            return azure_error(404, "UserError", f"Run {run_id} was not found in this experiment.", "NotFound")
        token, exp = self.mint(self.config.token_ttl, "run")
        self.history["renewals"] += 1
        self._log(**event, outcome="run_token", status=200, new_token_id=token_fingerprint(token), new_token_exp=exp)
        return _json(200, {"token": token, "expiryTimeUtc": iso_utc(exp)})

    async def _run_in_experiment(self, request: web.Request) -> bool:
        """Whether the URL's run exists on the real server in the URL's experiment (``{experiment}``: by
        id, ``{experiment_name}``: by name)."""
        run = await self._get_run(request.match_info["run"])
        if run is None:
            return False
        experiment_id = str(run.get("info", {}).get("experiment_id"))
        wanted_id = request.match_info.get("experiment")
        if wanted_id is not None:
            return wanted_id == experiment_id
        return await self._experiment_name(experiment_id) == request.match_info["experiment_name"]

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

    # -- run-history artifacts ---------------------------------------------------------------------------------

    async def _artifact_run(self, request: web.Request, endpoint: str) -> tuple[str, dict[str, Any]] | web.Response:
        """(run id, log event) for an authenticated request about a run that exists, else the answer."""
        event: dict[str, Any] = {"method": request.method, "path": request.path, "endpoint": endpoint}
        refused = self._authenticate(request, event)
        if refused is not None:
            return refused
        run_id = request.match_info["run"]
        if not await self._run_in_experiment(request):
            self.artifact_counts["not_found"] += 1
            self._log(**event, outcome="not_found", status=404)
            return azure_error(404, "UserError", f"Run {run_id} was not found in this experiment.", "NotFound")
        return run_id, event

    def _content_information(self, run_id: str, path: str, permissions: str) -> dict[str, Any]:
        url = blob_url(f"https://{self.api_host}", self.secret, BLOB_CONTAINER, artifact_blob_name(run_id, path),
                       permissions=permissions, ttl_seconds=self.config.sas_ttl)
        return {"contentUri": url, "origin": ARTIFACT_ORIGIN, "container": artifact_container(run_id), "path": path}

    async def artifact_batch_metadata(self, request: web.Request) -> web.Response:
        found = await self._artifact_run(request, "history/artifacts/batch/metadata")
        if isinstance(found, web.Response):
            return found
        run_id, event = found
        self.artifact_counts["metadata_requests"] += 1
        body = _json_body(await request.read())
        entries = body.get("paths") if body is not None else None
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("path"), str) for e in entries):
            self._log(**event, outcome="bad_request", status=400)
            return azure_error(400, "UserError", 'The request body must be {"paths": [{"path": "<artifact path>"}, '
                                                 '...]}.', "BadArgument")
        if len(entries) > ARTIFACT_BATCH_LIMIT:
            self._log(**event, outcome="limit", reason="artifact_batch", status=400, size=len(entries))
            return azure_error(400, "UserError", f"Artifact batch size exceeded the limit of {ARTIFACT_BATCH_LIMIT}",
                               "BadArgument")
        artifacts: dict[str, Any] = {}
        content: dict[str, Any] = {}
        errors: dict[str, Any] = {}
        for entry in entries:
            path: str = entry["path"]
            if path in artifacts or path in errors:
                continue
            why = artifact_path_error(path)
            if why is not None:
                self.artifact_counts["invalid_paths"] += 1
                errors[path] = {"error": {"code": "UserError", "message": f"invalid artifact path: {why}"}}
                continue
            record = self.registry.register(run_id, path)
            if record is None:
                self.artifact_counts["conflicts"] += 1
                message = f"Resource Conflict: ArtifactId {artifact_id(run_id, path)} already exists."
                errors[path] = {"error": {"code": "UserError", "message": message}}
                continue
            self.artifact_counts["created"] += 1
            artifacts[path] = record
            content[path] = self._content_information(run_id, path, "rcw")
        if artifacts:
            await self.registry.save()  # before the answer: a restart keeps what a client was told
        self._log(**event, outcome="artifacts_registered", status=200, run_id=run_id, created=len(artifacts),
                  errors=len(errors))
        return _json(200, {"artifacts": artifacts, "artifactContentInformation": content, "errors": errors})

    async def artifact_content_info(self, request: web.Request) -> web.Response:
        found = await self._artifact_run(request, "history/artifacts/contentinfo")
        if isinstance(found, web.Response):
            return found
        run_id, event = found
        path = request.query.get("path", "")
        if self.registry.get(run_id, path) is None:
            self.artifact_counts["not_found"] += 1
            self._log(**event, outcome="not_found", status=404)
            return azure_error(404, "UserError", f"Artifact {path!r} was not found in run {run_id}.", "NotFound")
        self.artifact_counts["contentinfo"] += 1
        self._log(**event, outcome="artifact_contentinfo", status=200, run_id=run_id)
        return _json(200, self._content_information(run_id, path, "r"))

    async def artifact_list(self, request: web.Request) -> web.Response:
        return await self._list_artifacts(request, in_path=False)

    async def artifact_list_in_path(self, request: web.Request) -> web.Response:
        return await self._list_artifacts(request, in_path=True)

    async def _list_artifacts(self, request: web.Request, *, in_path: bool) -> web.Response:
        found = await self._artifact_run(request, "history/artifacts/path" if in_path else "history/artifacts")
        if isinstance(found, web.Response):
            return found
        run_id, event = found
        directory = request.query.get("path", "").strip("/") if in_path else ""
        records = self.registry.under(run_id, directory + "/" if directory else "")
        token = request.query.get("continuationToken")
        if token:
            try:
                after = _decode_continuation(token)
            except ValueError as exc:
                self._log(**event, outcome="bad_request", status=400)
                return azure_error(400, "UserError", f"The continuation token is invalid: {exc}", "BadArgument")
            records = [r for r in records if r["path"] > after]
        size = self.config.artifact_page_size
        page = records[:size]
        next_token = _encode_continuation(page[-1]["path"]) if len(records) > size else None
        self.artifact_counts["listings"] += 1
        self._log(**event, outcome="artifact_list", status=200, run_id=run_id, count=len(page))
        return _json(200, {"value": page, "continuationToken": next_token, "nextLink": None})

    # -- blob storage ----------------------------------------------------------------------------------------

    async def blob(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.raw_path.partition("?")[0]
        container, _, name = unquote(raw_path[len(BLOB_PREFIX) + 1:]).partition("/")
        comp = request.query.get("comp")
        operation = {("PUT", None): "put", ("PUT", "block"): "put_block", ("PUT", "blocklist"): "put_block_list",
                     ("GET", None): "get", ("HEAD", None): "head"}.get((request.method, comp))
        event: dict[str, Any] = {"method": request.method, "path": request.path,
                                 "endpoint": f"blob/{operation or 'unsupported'}"}
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            self.blob_counts["bearer_seen"] += 1
            token = bearer_token(authorization)
            self._log(**event, outcome="blob_bearer", status=400, scheme=authorization.strip().partition(" ")[0],
                      token_id=token_fingerprint(token) if token else None)
            return storage_error(400, "InvalidAuthenticationInfo", "Authentication information is not given in the "
                                                                   "correct format. Check the value of Authorization "
                                                                   "header.")
        needed = "w" if request.method == "PUT" else "r"
        refusal = self._sas_refusal(request, container, name, needed)
        if refusal is not None:
            self.blob_counts["sas_refused"] += 1
            code, detail = refusal
            self._log(**event, outcome="sas_refused", status=403, code=code)
            if code == "AuthorizationPermissionMismatch":
                return storage_error(403, code, "This request is not authorized to perform this operation using "
                                                "this permission.")
            return storage_error(403, code, "Server failed to authenticate the request. Make sure the value of "
                                            "Authorization header is formed correctly including the signature.",
                                 detail=detail)
        if operation is None:
            self.blob_counts["bad_request"] += 1
            self._log(**event, outcome="blob_bad_request", status=405 if comp is None else 400)
            if comp is None:
                return storage_error(405, "UnsupportedHttpVerb", "The resource doesn't support specified Http Verb.")
            return storage_error(400, "InvalidQueryParameterValue", "Value for one of the query parameters specified "
                                                                    "in the request URI is invalid.",
                                 extra={"QueryParameterName": "comp", "QueryParameterValue": comp})
        if container != BLOB_CONTAINER:
            self.blob_counts["not_found"] += 1
            self._log(**event, outcome="blob_not_found", status=404)
            return storage_error(404, "ContainerNotFound", "The specified container does not exist.")
        self.blob_counts[operation] += 1
        if operation in ("put", "put_block") and self.config.blob_p_503 > 0 \
                and self.rng.random() < self.config.blob_p_503:
            self.blob_counts["faults"] += 1
            self._log(**event, outcome="blob_busy", status=503)
            return storage_error(503, "ServerBusy", "The server is busy.")
        if operation == "put":
            return await self._put_blob(request, container, name, event)
        if operation == "put_block":
            return await self._put_block(request, container, name, event)
        if operation == "put_block_list":
            return await self._put_block_list(request, container, name, event)
        return await self._get_blob(request, container, name, event)

    def _sas_refusal(self, request: web.Request, container: str, name: str, needed: str) -> tuple[str, str] | None:
        """None if the query's SAS allows ``needed`` on the blob now, else (error code, detail)."""
        query = request.query
        permissions, expiry, signature = query.get("sp", ""), query.get("se", ""), query.get("sig", "")
        if not (permissions and expiry and signature and query.get("sv")) or query.get("sr") != "b":
            return "AuthenticationFailed", "Signature fields not well formed."
        expected = sas_signature(self.secret, permissions, expiry, container, name)
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            string_to_sign = sas_string_to_sign(permissions, expiry, container, name)
            return "AuthenticationFailed", f"Signature did not match. String to sign used was {string_to_sign}"
        try:
            expires = datetime.strptime(expiry, SAS_EXPIRY_FORMAT).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            return "AuthenticationFailed", "Signature fields not well formed."
        now = time.time()
        if now >= expires:
            return "AuthenticationFailed", (f"Signed expiry time [{http_date(expires)}] must be after signed start "
                                            f"time [{http_date(now)}]")
        if needed not in permissions:
            return "AuthorizationPermissionMismatch", "The SAS does not allow this operation."
        return None

    def _body_length_refusal(self, request: web.Request, limit: int, event: dict[str, Any]) -> web.Response | None:
        length = request.content_length
        if length is None:
            self.blob_counts["bad_request"] += 1
            self._log(**event, outcome="blob_bad_request", status=411, reason="no_content_length")
            return storage_error(411, "MissingContentLengthHeader", "Content-Length HTTP header is missing.")
        if length > limit:
            self.blob_counts["bad_request"] += 1
            self._log(**event, outcome="blob_bad_request", status=413, size=length)
            return storage_error(413, "RequestBodyTooLarge", "The request body is too large and exceeds the maximum "
                                                             "permissible limit.", extra={"MaxLimit": str(limit)})
        return None

    def _md5_refusal(self, request: web.Request, md5: str, event: dict[str, Any]) -> web.Response | None:
        sent = request.headers.get("Content-MD5")
        if sent is None or sent == md5:
            return None
        self.blob_counts["bad_request"] += 1
        self._log(**event, outcome="blob_bad_request", status=400, reason="md5_mismatch")
        return storage_error(400, "Md5Mismatch", "The MD5 value specified in the request did not match with the MD5 "
                                                 "value calculated by the server.",
                             extra={"UserSpecifiedMd5": sent, "ServerCalculatedMd5": md5})

    async def _receive(self, request: web.Request, event: dict[str, Any]) -> tuple[Path, str] | web.StreamResponse:
        """Stream the body to a new temp file, off the event loop in large pieces: (file, base64 MD5), or
        the answer when the body did not arrive whole (then no file is left)."""
        length = request.content_length
        assert length is not None
        reset_after = self.config.blob_reset_after
        drop = 0 < reset_after < length
        if drop:  # once: the setting goes back to 0
            self.config = replace(self.config, blob_reset_after=0)
            self._log(event="config", config=asdict(self.config), reason="blob_reset_after used")
        limit = reset_after if drop else length
        tmp = self.blobs.temp_path()
        digest = hashlib.md5()  # Content-MD5 is MD5
        received = 0
        complete = False
        out = await asyncio.to_thread(open, tmp, "wb")
        try:
            buffer = bytearray()
            while received < limit:
                try:
                    chunk = await request.content.read(min(_READ_CHUNK, limit - received))
                except (ConnectionResetError, HttpProcessingError) as exc:
                    event["error"] = f"{type(exc).__name__}: {exc}"
                    break
                if not chunk:
                    break
                buffer += chunk
                received += len(chunk)
                if len(buffer) >= _WRITE_CHUNK:
                    await asyncio.to_thread(_write_chunk, out, digest, buffer)
                    buffer.clear()
            if buffer:
                await asyncio.to_thread(_write_chunk, out, digest, buffer)
            complete = received == length
        finally:
            out.close()
            if not complete:
                tmp.unlink(missing_ok=True)
        if complete:
            return tmp, base64.b64encode(digest.digest()).decode()
        if drop and received == limit:
            self.blob_counts["faults"] += 1
            self._log(**event, outcome="blob_reset", received=received, length=length)
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=499)
        self.blob_counts["incomplete"] += 1
        self._log(**event, outcome="blob_incomplete", status=400, received=received, length=length)
        return storage_error(400, "InvalidInput", "The request body ended before Content-Length bytes arrived.")

    def _blob_lock(self, container: str, name: str) -> asyncio.Lock:
        return self._blob_locks.setdefault(f"{container}/{name}", asyncio.Lock())

    def _created(self, props: BlobProperties | None, md5: str | None = None) -> web.Response:
        headers = {"x-ms-request-id": str(uuid.uuid4()), "x-ms-version": SAS_VERSION,
                   "x-ms-request-server-encrypted": "true"}
        if props is not None:
            headers.update({"ETag": props.etag, "Last-Modified": http_date(props.last_modified)})
        if md5 is not None:
            headers["Content-MD5"] = md5
        return web.Response(status=201, headers=headers)

    async def _put_blob(self, request: web.Request, container: str, name: str,
                        event: dict[str, Any]) -> web.StreamResponse:
        blob_type = request.headers.get("x-ms-blob-type")
        if blob_type != "BlockBlob":
            self.blob_counts["bad_request"] += 1
            self._log(**event, outcome="blob_bad_request", status=400, reason="blob_type", blob_type=blob_type)
            if blob_type is None:
                return storage_error(400, "MissingRequiredHeader", "An HTTP header that's mandatory for this "
                                                                   "request is not specified.",
                                     extra={"HeaderName": "x-ms-blob-type"})
            return storage_error(400, "InvalidHeaderValue", "The value for one of the HTTP headers is not in the "
                                                            "correct format.",
                                 extra={"HeaderName": "x-ms-blob-type", "HeaderValue": blob_type})
        refusal = self._body_length_refusal(request, MAX_BLOB_BYTES, event)
        if refusal is not None:
            return refusal
        received = await self._receive(request, event)
        if isinstance(received, web.StreamResponse):
            return received
        tmp, md5 = received
        try:
            refusal = self._md5_refusal(request, md5, event)
            if refusal is not None:
                return refusal
            content_type = (request.headers.get("x-ms-blob-content-type") or request.headers.get("Content-Type")
                            or "application/octet-stream")
            props = BlobProperties(name=f"{container}/{name}", size=request.content_length or 0,
                                   content_type=content_type, etag=new_etag(), last_modified=time.time(),
                                   content_md5=md5)
            async with self._blob_lock(container, name):
                await asyncio.to_thread(self.blobs.commit, container, name, tmp, props)
        finally:
            tmp.unlink(missing_ok=True)  # gone once committed
        self.blob_counts["stored"] += 1
        self._log(**event, outcome="blob_stored", status=201, size=props.size)
        return self._created(props, md5)

    async def _put_block(self, request: web.Request, container: str, name: str,
                         event: dict[str, Any]) -> web.StreamResponse:
        block_id = request.query.get("blockid", "")
        try:
            raw = base64.b64decode(block_id, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if not raw or len(raw) > BLOCK_ID_LIMIT:
            self.blob_counts["bad_request"] += 1
            self._log(**event, outcome="blob_bad_request", status=400, reason="block_id")
            return storage_error(400, "InvalidQueryParameterValue", "Value for one of the query parameters specified "
                                                                    "in the request URI is invalid.",
                                 extra={"QueryParameterName": "blockid", "QueryParameterValue": block_id})
        staged = self.blobs.staged(container, name)
        if any(len(other) != len(block_id) for other in staged):
            self.blob_counts["bad_request"] += 1
            self._log(**event, outcome="blob_bad_request", status=400, reason="block_id_length")
            return storage_error(400, "InvalidBlobOrBlock", "The specified blob or block content is invalid.")
        refusal = self._body_length_refusal(request, MAX_BLOCK_BYTES, event)
        if refusal is not None:
            return refusal
        received = await self._receive(request, event)
        if isinstance(received, web.StreamResponse):
            return received
        tmp, md5 = received
        try:
            refusal = self._md5_refusal(request, md5, event)
            if refusal is not None:
                return refusal
            async with self._blob_lock(container, name):
                self.blobs.stage(container, name, block_id, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        self._log(**event, outcome="block_staged", status=201, size=request.content_length)
        return self._created(None, md5)

    async def _put_block_list(self, request: web.Request, container: str, name: str,
                              event: dict[str, Any]) -> web.StreamResponse:
        body = await request.read()
        try:
            root = ElementTree.fromstring(body)
        except ElementTree.ParseError:
            root = None
        ids = [(child.tag, (child.text or "").strip()) for child in root] if root is not None else []
        if root is None or root.tag != "BlockList" or any(
                tag not in ("Latest", "Uncommitted", "Committed") for tag, _ in ids):
            self.blob_counts["bad_request"] += 1
            self._log(**event, outcome="blob_bad_request", status=400, reason="xml")
            return storage_error(400, "InvalidXmlDocument", "XML specified is not syntactically valid.")
        async with self._blob_lock(container, name):
            staged = self.blobs.staged(container, name)
            # Committed blocks of an earlier version are not kept: only staged blocks can be named.
            unknown = [block for tag, block in ids if tag == "Committed" or block not in staged]
            if unknown:
                self.blob_counts["bad_request"] += 1
                self._log(**event, outcome="blob_bad_request", status=400, reason="block_list", unknown=len(unknown))
                return storage_error(400, "InvalidBlockList", "The specified block list is invalid.")
            props = BlobProperties(name=f"{container}/{name}", size=0,
                                   content_type=request.headers.get("x-ms-blob-content-type")
                                   or "application/octet-stream",
                                   etag=new_etag(), last_modified=time.time(),
                                   content_md5=request.headers.get("x-ms-blob-content-md5"))
            props = await asyncio.to_thread(self.blobs.assemble, container, name,
                                            [staged[block] for _, block in ids], props)
        self.blob_counts["stored"] += 1
        self._log(**event, outcome="blob_stored", status=201, size=props.size, blocks=len(ids))
        return self._created(props)

    async def _get_blob(self, request: web.Request, container: str, name: str,
                        event: dict[str, Any]) -> web.StreamResponse:
        props = self.blobs.properties(container, name)
        if props is None:
            self.blob_counts["not_found"] += 1
            self._log(**event, outcome="blob_not_found", status=404)
            return storage_error(404, "BlobNotFound", "The specified blob does not exist.")
        source = await asyncio.to_thread(open, self.blobs.data_path(container, name), "rb")
        try:
            size = os.fstat(source.fileno()).st_size
            headers = {"Content-Type": props.content_type, "ETag": props.etag,
                       "Last-Modified": http_date(props.last_modified), "Accept-Ranges": "bytes",
                       "x-ms-blob-type": "BlockBlob", "x-ms-request-id": str(uuid.uuid4()),
                       "x-ms-version": SAS_VERSION}
            try:
                span = _byte_range(request.headers.get("x-ms-range") or request.headers.get("Range"), size)
            except ValueError:
                self._log(**event, outcome="blob_bad_range", status=416)
                return storage_error(416, "InvalidRange", "The range specified is invalid for the current size of "
                                                          "the resource.", headers={"Content-Range": f"bytes */{size}"})
            first, last = span if span is not None else (0, size - 1)
            if span is not None:
                headers["Content-Range"] = f"bytes {first}-{last}/{size}"
                if props.content_md5:
                    headers["x-ms-blob-content-md5"] = props.content_md5
            elif props.content_md5:
                headers["Content-MD5"] = props.content_md5
            response = web.StreamResponse(status=206 if span is not None else 200, headers=headers)
            response.content_length = last - first + 1
            await response.prepare(request)
            if request.method == "GET":
                source.seek(first)
                left = last - first + 1
                while left > 0:
                    chunk = await asyncio.to_thread(source.read, min(_WRITE_CHUNK, left))
                    if not chunk:
                        raise RuntimeError(f"blob {props.name} ended {left} bytes early")
                    await response.write(chunk)
                    left -= len(chunk)
            await response.write_eof()
        finally:
            source.close()
        self._log(**event, outcome="blob_read", status=response.status, size=response.content_length)
        return response

    # -- the MLflow endpoint ---------------------------------------------------------------------------------------

    def _mlflow_path(self, raw_path: str) -> str | None:
        """``/api/2.0/mlflow/...`` (with the query) from a workspace URL, or None if it is not one."""
        path, sep, query = raw_path.partition("?")
        for version in ("v2.0", "v1.0"):
            prefix = f"/mlflow/{version}{self.scope}"
            if path.lower().startswith(prefix.lower() + "/"):
                rest = path[len(prefix):]
                if rest.startswith("/api/2.0/mlflow/"):  # not mlflow-artifacts: Azure ML has no artifact proxy
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
            if "/api/2.0/mlflow-artifacts/" in request.path:
                return azure_error(404, "NotFound", "The MLflow artifact API (mlflow-artifacts) is not served by an "
                                                    "Azure ML workspace: artifacts go through run history.", "NotFound")
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
        if status == 200 and endpoint in _RUN_ANSWERS:
            payload = self._azure_artifact_uris(endpoint, payload)
        self._log(**event, outcome="forwarded", status=status, done=round(time.time(), 3))
        return web.Response(status=status, reason=reason, headers=out, body=payload)

    def artifact_uri(self, experiment_id: str, run_id: str) -> str:
        """A run's ``artifact_uri`` as Azure ML gives it."""
        return f"azureml://{self.api_host}/mlflow/v2.0{self.scope}/experiments/{experiment_id}/runs/{run_id}/artifacts"

    def _azure_artifact_uris(self, endpoint: str, payload: bytes) -> bytes:
        """The answer with ``mlflow-artifacts:/<exp>/<run>/artifacts`` URIs made Azure's (the same bytes when
        there are none)."""
        data = _json_body(payload)
        if data is None:
            return payload
        infos: list[Any]
        if endpoint == "runs/search":
            runs = data.get("runs")
            infos = [r.get("info") for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []
        elif endpoint == "runs/update":
            infos = [data.get("run_info")]
        else:
            run = data.get("run")
            infos = [run.get("info")] if isinstance(run, dict) else []
        changed = False
        for info in infos:
            uri = info.get("artifact_uri") if isinstance(info, dict) else None
            match = _MLFLOW_ARTIFACT_URI.fullmatch(uri) if isinstance(uri, str) else None
            if match is not None:
                assert isinstance(info, dict)
                info["artifact_uri"] = self.artifact_uri(match["experiment"], match["run"])
                changed = True
        return json.dumps(data).encode() if changed else payload


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
        "not_found", "unauthorized", "bad_request", "down"}, "discovery": {"requests"}, "artifacts":
        {"metadata_requests", "created", "conflicts", "invalid_paths", "contentinfo", "listings", "not_found"},
        "blob": {"put", "put_block", "put_block_list", "get", "head", "stored", "sas_refused", "bearer_seen",
        "faults", "incomplete", "bad_request", "not_found"}, "last_forwarded_at", "config"}``."""
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
        ``arm_omit_tracking_uri=True``, ``artifact_page_size=2``, ``sas_ttl=1``, ``blob_p_503=0.5``,
        ``blob_reset_after=4096``, ...; every :class:`GatewayConfig` field). A restart starts from the
        constructor's settings again."""
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

    @property
    def blobs_dir(self) -> Path:
        return self.state_dir / BLOBS_DIR

    def blob_file(self, run_id: str, artifact_path: str) -> Path:
        """Where the bytes of a run's artifact blob are on disk (whether or not it was uploaded)."""
        return blob_data_path(self.blobs_dir, BLOB_CONTAINER, artifact_blob_name(run_id, artifact_path))

    def artifact_paths(self, run_id: str) -> list[str]:
        """The artifact paths registered for a run, sorted: from ``GET /__artifacts`` while the gateway runs,
        else from ``<state-dir>/artifacts.json`` (written before each registration is answered)."""
        if self.running:
            resp = self._http.get(f"{self.url}{ARTIFACTS_PATH}", params={"run_id": run_id}, timeout=10)
            resp.raise_for_status()
            paths: list[str] = resp.json()["paths"]
            return paths
        state = self.state_dir / ARTIFACTS_STATE
        if not state.exists():
            return []
        return sorted(json.loads(state.read_text())["runs"].get(run_id, {}))

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)

    def __repr__(self) -> str:
        return f"AzureGateway(uri={self.uri!r}, target={self.target_url!r}, running={self.running})"


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
