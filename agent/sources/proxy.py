"""Everything the agent does not answer itself goes to the upstream as an authenticated pass-through.

Bodies and answers are streamed (artifact uploads can be large). Provisional ids the client holds
are translated wherever they appear in the path, the query string or a JSON body's top level; a
provisional id with no upstream run yet gets a 503 with Retry-After, which the client retries.
The client's own Authorization is never forwarded: the agent's credentials are used.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, MultiDict
from yarl import URL

from agent.catalog import Catalog
from agent.errors import MlflowApiError, unavailable
from agent.sources.mlflow_api import error_response
from agent.upstream.rest import USER_AGENT, MlflowRest

log = logging.getLogger("agent.sources.proxy")

_HOP_BY_HOP = frozenset(
    h.lower() for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Host", "Authorization", "Content-Length",
    )
)
_JSON_TRANSLATE_LIMIT = 8 * 1024 * 1024
_CHUNK = 64 * 1024
# Forwarded calls that change what the agent must know (a deleted run refuses writes, as in MLflow).
LIFECYCLE_ENDPOINTS = frozenset({"runs/delete", "runs/restore", "experiments/delete", "experiments/restore"})
LifecycleHook = Callable[[str, dict[str, Any]], Awaitable[None]]


class NotYetUpstream(Exception):
    def __init__(self, client_id: str) -> None:
        super().__init__(client_id)
        self.client_id = client_id


class Proxy:
    def __init__(self, rest: MlflowRest | None, catalog: Catalog, *, read_timeout: float) -> None:
        self.rest = rest
        self.catalog = catalog
        self.read_timeout = read_timeout
        self.lifecycle_hook: LifecycleHook | None = None
        # Azure ML's endpoint: metric history pages must stay under 1000, logged models do not exist.
        self.azureml = False
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self.rest is not None:
            connector = aiohttp.TCPConnector(limit=32, ssl=self.rest.provider.ssl)
            # No decompression: bytes pass through as the upstream sent them, with their encoding.
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        return await self.forward_to(request, None)

    async def forward_to(self, request: web.Request, upstream_path: str | None,
                         upstream_query: dict[str, str] | None = None) -> web.StreamResponse:
        """Forward ``request``; to ``upstream_path`` (already in the upstream's ids, unquoted) with
        ``upstream_query`` if given, else to its own path and query with provisional ids translated."""
        if self.rest is None or self._session is None:
            return error_response(MlflowApiError(
                "TEMPORARILY_UNAVAILABLE",
                f"mlflow-agent runs offline (--upstream none): {request.method} {request.path} needs an upstream",
            ))
        try:
            if upstream_path is not None:
                path = quote(upstream_path, safe="/")
            else:
                path = "/".join(quote(self._translate_str(seg), safe="") for seg in request.path.split("/"))
            if upstream_query is not None:
                query = MultiDict(upstream_query)
            else:
                query = MultiDict((k, self._translate_str(v)) for k, v in request.query.items())
            if self.azureml and request.path.endswith("/metrics/get-history"):
                _cap_page_size(query, AZUREML_MAX_RESULTS)
            data: Any = None
            original: Any = None
            if request.body_exists:
                data, original = await self._body(request)
        except NotYetUpstream as exc:
            return error_response(unavailable(
                f"mlflow-agent: {exc.client_id} is not created upstream yet; retry shortly", retry_after=5))
        try:
            creds = await asyncio.wait_for(self.rest.provider.credentials(), self.read_timeout)
        except asyncio.TimeoutError:
            return error_response(unavailable("mlflow-agent holds no valid upstream credential right now"))
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP)
        headers.update(creds.headers)
        headers.setdefault("User-Agent", USER_AGENT)
        if request.content_length is not None and not isinstance(data, bytes):
            headers["Content-Length"] = str(request.content_length)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.read_timeout)
        url = URL(creds.base_url + path, encoded=True)  # each segment quoted above
        try:
            async with self._session.request(request.method, url, params=query, data=data, headers=headers,
                                             timeout=timeout, allow_redirects=False) as upstream:
                if self.azureml and upstream.status == 404 and "/logged-models" in request.path:
                    return error_response(MlflowApiError(
                        "ENDPOINT_NOT_FOUND",
                        "Azure ML's MLflow endpoint does not implement MLflow 3 logged models (/api/2.0/mlflow/"
                        "logged-models answers 404), and this model was not logged through this mlflow-agent (the "
                        "models logged through it are answered by it and kept in their runs' artifacts).",
                    ))
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for key, value in upstream.headers.items():
                    if key.lower() not in _HOP_BY_HOP:
                        response.headers.add(key, value)
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(_CHUNK):
                    await response.write(chunk)
                await response.write_eof()
                endpoint = request.path.rsplit("/mlflow/", 1)[-1]
                if upstream.status == 200 and endpoint in LIFECYCLE_ENDPOINTS and self.lifecycle_hook is not None:
                    await self.lifecycle_hook(endpoint, original if isinstance(original, dict) else {})
                return response
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.rest.health.failed(f"{type(exc).__name__}: {exc}")
            return error_response(unavailable(f"mlflow-agent: upstream unreachable: {type(exc).__name__}"))

    async def _body(self, request: web.Request) -> tuple[Any, Any]:
        """What to send upstream, and the client's JSON body if it is one (else None)."""
        is_json = request.content_type == "application/json"
        small = request.content_length is not None and request.content_length <= _JSON_TRANSLATE_LIMIT
        if not (is_json and small):
            return _stream(request), None
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw, None  # not ours to judge: the upstream answers it
        if isinstance(body, dict):
            translated = {k: self._translate_value(v) for k, v in body.items()}
            if translated != body:
                return orjson.dumps(translated), body
        return raw, body

    def _translate_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._translate_str(value)
        if isinstance(value, list):
            return [self._translate_str(v) if isinstance(v, str) else v for v in value]
        return value

    def _translate_str(self, value: str) -> str:
        return _translate(value, self.catalog)


def _translate(value: str, catalog: Catalog) -> str:
    lookups: tuple[tuple[dict[str, Any], Callable[[str], str | None]], ...] = (
        (catalog.runs, catalog.upstream_run_id),
        (catalog.experiments, catalog.upstream_experiment_id),
        (catalog.models, catalog.upstream_model_id),
    )
    for table, to_upstream in lookups:
        entry = table.get(value)
        if entry is not None and getattr(entry, "provisional", False):
            upstream = to_upstream(value)
            if upstream is None:
                raise NotYetUpstream(value)
            return upstream
    return value


AZUREML_MAX_RESULTS = 999


def _cap_page_size(query: MultiDict[str], cap: int) -> None:
    """The mlflow client asks for 25,000 rows a page and follows next_page_token; Azure refuses >= 1000."""
    value = query.get("max_results")
    try:
        too_big = value is None or int(value) > cap
    except ValueError:
        too_big = False
    if too_big:
        query["max_results"] = str(cap)


async def _stream(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(_CHUNK):
        yield chunk
