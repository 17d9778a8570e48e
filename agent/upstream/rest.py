"""The MLflow REST client the agent uses towards its upstream: one aiohttp session, a timeout on every
request, and every failure classified as transient (retry), auth (renew credentials, retry) or
permanent (dead-letter).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from agent import __version__
from agent.ops.metrics import AgentMetrics
from agent.upstream.base import UpstreamProvider

ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts/"
# Looked up (never created) to see whether the upstream answers; a 404 is the expected answer.
PROBE_EXPERIMENT = "mlflow-agent-reachability-probe"
log = logging.getLogger("agent.upstream")

API = "/api/2.0/mlflow/"
STORAGE_LABEL = "storage"  # requests to blob storage (SAS URLs), in the metrics
USER_AGENT = f"mlflow-agent/{__version__}"
_MAX_RETRY_AFTER = 600.0


class UpstreamError(Exception):
    """``str()`` says what failed, for logs; ``message`` is the upstream's own message, for clients."""

    def __init__(self, text: str, *, status: int | None = None, error_code: str | None = None,
                 retry_after: float | None = None, message: str | None = None) -> None:
        super().__init__(text)
        self.message = text if message is None else message
        self.status = status
        self.error_code = error_code
        self.retry_after = retry_after


class TransientError(UpstreamError):
    """Connection errors, timeouts, 408, 429 and 5xx (except 501): try again later."""


class AuthError(UpstreamError):
    """401/403: renew credentials, then try again."""


class PermanentError(UpstreamError):
    """Any other 4xx, and 501: the same request will never succeed."""


def history_base(mlflow_base_url: str) -> str:
    """Azure ML's run-history service for a workspace's MLflow base URL (``https://<host>/mlflow/v2.0<scope>``
    -> ``https://<host>/history/v1.0<scope>``)."""
    head, sep, scope = mlflow_base_url.partition("/mlflow/v2.0")
    return f"{head}/history/v1.0{scope}" if sep else mlflow_base_url


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # asctime dates carry no zone; HTTP dates are always GMT
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


def classify(status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
    error_code: str | None = None
    message = body[:500].decode("utf-8", "replace")
    correlation = ""
    try:
        parsed = orjson.loads(body)
        if isinstance(parsed, dict):
            error_code = parsed.get("error_code") if isinstance(parsed.get("error_code"), str) else None
            if isinstance(parsed.get("message"), str):
                message = parsed["message"]
            envelope = parsed.get("error")
            if error_code is None and isinstance(envelope, dict):
                # Azure's envelope: {"error": {"code", "message"}, "correlation": {"operation", "request"}}
                code, text = envelope.get("code"), envelope.get("message")
                error_code = code if isinstance(code, str) else None
                message = text if isinstance(text, str) else message
                ids = parsed.get("correlation")
                if isinstance(ids, dict):
                    correlation = " (correlation " + ", ".join(f"{k}={v}" for k, v in ids.items()) + ")"
    except orjson.JSONDecodeError:
        pass
    request_id = headers.get("x-ms-request-id")
    if request_id and not correlation:
        correlation = f" (x-ms-request-id={request_id})"
    retry_after = parse_retry_after(headers.get("Retry-After"))
    text = f"HTTP {status}" + (f" {error_code}" if error_code else "") + f": {message}{correlation}"
    if status in (401, 403):
        return AuthError(text, status=status, error_code=error_code, message=message)
    if status in (408, 429) or (status >= 500 and status != 501):
        return TransientError(text, status=status, error_code=error_code, retry_after=retry_after, message=message)
    return PermanentError(text, status=status, error_code=error_code, retry_after=retry_after, message=message)


class UpstreamHealth:
    """Whether the upstream answered lately. Ingest skips its bounded create-run attempt while down."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self._metrics = metrics
        self.up: bool | None = None  # None: not asked yet
        self.changed_at = time.monotonic()
        self.last_error: str | None = None
        self.last_seen: float | None = None  # monotonic time of the last answer or failure; None = never asked

    def answered(self) -> None:
        self.last_seen = time.monotonic()
        if self.up is not True:
            if self.up is False:
                log.info("upstream is reachable again")
            self.up = True
            self.changed_at = time.monotonic()
            self._metrics.upstream_up.set(1)
        self.last_error = None

    def failed(self, error: str) -> None:
        self.last_seen = time.monotonic()
        if self.up is not False:
            log.warning("upstream unreachable: %s", error)
            self.up = False
            self.changed_at = time.monotonic()
            self._metrics.upstream_up.set(0)
        self.last_error = error

    @property
    def known_down(self) -> bool:
        return self.up is False


class MlflowRest:
    """Calls the upstream MLflow REST API. One instance per agent; start() before use."""

    def __init__(self, provider: UpstreamProvider, metrics: AgentMetrics, *, request_timeout: float) -> None:
        self.provider = provider
        self.health = UpstreamHealth(metrics)
        self._metrics = self.metrics = metrics
        self._timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None
        # The upstream's base URL as its credentials last named it (None before the first request):
        # tells an artifact URI that points at the upstream itself from one that points elsewhere.
        self.base_url: str | None = None

    async def start(self) -> None:
        await self.provider.start()
        connector = aiohttp.TCPConnector(limit=64, ssl=self.provider.ssl, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": USER_AGENT},
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
            auto_decompress=True,
        )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.provider.stop()

    async def put_artifact(self, path: str, data: Path, content_type: str, size: int) -> None:
        """Stream one file to ``/api/2.0/mlflow-artifacts/artifacts/<path>``. Raises an UpstreamError subclass."""
        creds = await self.provider.credentials()
        self.base_url = creds.base_url
        url = f"{creds.base_url}{ARTIFACTS_API}{quote(path, safe='/')}"
        headers = {**creds.headers, "Content-Type": content_type, "Content-Length": str(size)}
        # No total limit: a large file takes as long as it takes; a stalled connection does not.
        limit = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=self._timeout)
        body = await asyncio.to_thread(data.open, "rb")
        try:
            await self._request("PUT", url, "mlflow-artifacts/artifacts", f"PUT artifact {path}", data=body,
                                headers=headers, timeout=limit)
        finally:
            await asyncio.to_thread(body.close)

    async def storage(self, method: str, url: str, what: str, *, data: Any = None,
                      headers: Mapping[str, str] | None = None) -> tuple[int, Mapping[str, str], bytes]:
        """One request to a storage URL that carries its own authorization (an Azure Blob SAS URL): the
        agent's credentials are never sent with it. Returns any HTTP answer as it is (storage answers in
        XML, the caller judges it); raises TransientError when there is no answer."""
        started = time.monotonic()
        limit = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=self._timeout)
        try:
            async with self.session.request(method, URL(url, encoded=True), data=data, headers=headers,
                                            timeout=limit, allow_redirects=False) as resp:
                payload = await resp.read()
                status, resp_headers = resp.status, resp.headers
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self._metrics.upstream_requests.labels(endpoint=STORAGE_LABEL, result="network_error").inc()
            raise TransientError(f"{what}: {type(exc).__name__}: {exc}".strip().rstrip(":")) from exc
        finally:
            self._metrics.upstream_latency.labels(endpoint=STORAGE_LABEL).observe(time.monotonic() - started)
        self._metrics.upstream_requests.labels(endpoint=STORAGE_LABEL,
                                               result="ok" if status < 300 else str(status)).inc()
        return status, resp_headers, payload

    @contextlib.asynccontextmanager
    async def open_storage(self, url: str, what: str) -> AsyncIterator[aiohttp.ClientResponse]:
        """A streamed GET of a storage URL (a SAS URL: no credentials sent); raises an UpstreamError
        subclass unless it answers 200."""
        limit = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=self._timeout)
        try:
            async with self.session.get(URL(url, encoded=True), timeout=limit, allow_redirects=False) as resp:
                self._metrics.upstream_requests.labels(endpoint=STORAGE_LABEL, result=str(resp.status)
                                                       if resp.status != 200 else "ok").inc()
                if resp.status != 200:
                    raise classify(resp.status, await resp.read(), resp.headers)
                yield resp
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self._metrics.upstream_requests.labels(endpoint=STORAGE_LABEL, result="network_error").inc()
            raise TransientError(f"{what}: {type(exc).__name__}: {exc}".strip().rstrip(":")) from exc

    async def probe(self, timeout: float) -> None:
        """One cheap read, so that ``upstream_up`` is true for an idle agent too: any HTTP answer (a 404
        included) means reachable. Errors only update the health; nothing is raised."""
        with contextlib.suppress(UpstreamError):
            await self.call("GET", "experiments/get-by-name", params={"experiment_name": PROBE_EXPERIMENT},
                            timeout=timeout)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("MlflowRest used before start()")
        return self._session

    async def call(
        self,
        method: str,
        endpoint: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,
        api: str = API,
        label: str | None = None,
        history: bool = False,
    ) -> dict[str, Any]:
        """One JSON call to ``<api><endpoint>`` (``/api/2.0/mlflow/`` unless told). Raises an UpstreamError subclass.

        Without ``timeout`` (uploads) the call waits for a valid credential as long as it takes; with
        one (calls a client is waiting on) the wait counts against it. ``label`` names the endpoint in
        the agent's metrics when the path holds ids (``logged-models/<id>``): one series per route.
        ``history``: an Azure ML workspace's run-history service (``/history/v1.0<scope>/<endpoint>``),
        next to its MLflow endpoint and with the same credential."""
        try:
            creds = await asyncio.wait_for(self.provider.credentials(), timeout)
        except asyncio.TimeoutError:
            raise TransientError(f"{method} {endpoint}: no valid upstream credential yet") from None
        self.base_url = creds.base_url
        url = f"{history_base(creds.base_url)}/{endpoint}" if history else f"{creds.base_url}{api}{endpoint}"
        headers = dict(creds.headers)
        data: bytes | None = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        limit = aiohttp.ClientTimeout(total=timeout or self._timeout, sock_connect=min(10.0, timeout or 10.0))
        payload = await self._request(method, url, label or endpoint, f"{method} {endpoint}", data=data,
                                      params=params, headers=headers, timeout=limit)
        if not payload.strip():
            return {}
        try:
            parsed = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise TransientError(f"{method} {endpoint}: answer is not JSON") from exc
        return parsed if isinstance(parsed, dict) else {}

    async def _request(self, method: str, url: str, endpoint: str, what: str, *, data: Any,
                       headers: Mapping[str, str], timeout: aiohttp.ClientTimeout,
                       params: Mapping[str, str] | None = None) -> bytes:
        """One request: the body of a 200, else the classified error; health and metrics kept either way."""
        started = time.monotonic()
        try:
            async with self.session.request(method, url, data=data, params=params, headers=headers,
                                            timeout=timeout, allow_redirects=False) as resp:
                payload = await resp.read()
                status = resp.status
                resp_headers = resp.headers
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self._metrics.upstream_latency.labels(endpoint=endpoint).observe(time.monotonic() - started)
            reason = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
            self.health.failed(reason)
            self._metrics.upstream_requests.labels(endpoint=endpoint, result="network_error").inc()
            raise TransientError(f"{what}: {reason}") from exc
        self._metrics.upstream_latency.labels(endpoint=endpoint).observe(time.monotonic() - started)
        if status == 200:
            self.health.answered()
            self._metrics.upstream_requests.labels(endpoint=endpoint, result="ok").inc()
            return payload
        error = classify(status, payload, resp_headers)
        if status >= 500:
            self.health.failed(str(error))
        else:
            self.health.answered()
        self._metrics.upstream_requests.labels(endpoint=endpoint, result=str(status)).inc()
        raise error
