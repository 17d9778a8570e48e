"""Artifacts enter: ``PUT /api/2.0/mlflow-artifacts/artifacts/<path>`` is streamed to disk and answered
once durable; downloads and listings are served from the local copy until it is uploaded, then forwarded.

Only for upstreams that proxy artifacts through MLflow's own ``mlflow-artifacts`` API (a plain MLflow
server). Azure ML stores artifacts through run history and blob SAS URLs: there, these requests are still
forwarded as they are (an open part of the artifacts issue).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

from agent.catalog import Catalog
from agent.errors import MlflowApiError
from agent.ops.metrics import AgentMetrics
from agent.sources.mlflow_api import error_response, json_response
from agent.spool.artifacts import ArtifactBudgetExceeded, ArtifactPathError, ArtifactStore, check_artifact_path
from agent.upload.artifacts import upstream_artifact_path
from agent.upstream.rest import MlflowRest, UpstreamError

log = logging.getLogger("agent.artifacts")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_PREFIXES = ("/api/2.0/mlflow-artifacts/artifacts", "/ajax-api/2.0/mlflow-artifacts/artifacts")
_READ_CHUNK = 256 * 1024


class ArtifactsApi:
    def __init__(self, *, store: ArtifactStore, catalog: Catalog, metrics: AgentMetrics, rest: MlflowRest | None,
                 forward: Handler, read_timeout: float) -> None:
        self.store = store
        self.catalog = catalog
        self.metrics = metrics
        self.rest = rest
        self.forward = forward
        self.read_timeout = read_timeout

    def add_routes(self, app: web.Application) -> None:
        for prefix in _PREFIXES:
            app.router.add_put(prefix + "/{path:.+}", self.put)
            app.router.add_get(prefix + "/{path:.+}", self.download, allow_head=False)
            app.router.add_get(prefix, self.listing, allow_head=False)

    async def put(self, request: web.Request) -> web.StreamResponse:
        try:
            path = _requested_path(request)
        except ArtifactPathError as exc:
            return error_response(MlflowApiError("INVALID_PARAMETER_VALUE", f"mlflow-agent: {exc}"))
        try:
            artifact = await self.store.receive(path, request.content_type, request.content.iter_chunked(_READ_CHUNK),
                                                request.content_length)
        except ArtifactBudgetExceeded as exc:
            # 413, not 429/503: the client must not retry into a full disk; it gets the reason at once.
            body = MlflowApiError("RESOURCE_EXHAUSTED", f"mlflow-agent: artifact refused: {exc} "
                                  "(raise artifact_max_bytes, or wait for the backlog to upload)").body()
            return web.Response(body=orjson.dumps(body), status=413, content_type="application/json")
        except OSError as exc:
            log.error("could not store artifact %s: %s", path, exc)
            return error_response(MlflowApiError("TEMPORARILY_UNAVAILABLE",
                                                 f"mlflow-agent could not store the artifact: {exc}"))
        self.metrics.artifacts.labels(result="received").inc()
        self.metrics.artifact_bytes.labels(result="received").inc(artifact.size)
        return web.Response(status=200)

    async def download(self, request: web.Request) -> web.StreamResponse:
        try:
            path = _requested_path(request)
        except ArtifactPathError as exc:
            return error_response(MlflowApiError("INVALID_PARAMETER_VALUE", f"mlflow-agent: {exc}"))
        artifact = self.store.latest(path)
        if artifact is None:
            return await self.forward(request)
        name = path.rsplit("/", 1)[-1].replace('"', "'")  # control characters never get this far
        return web.FileResponse(self.store.data_path(artifact), headers={
            "Content-Type": artifact.content_type,
            "Content-Disposition": f'attachment; filename="{name}"',
        })

    async def listing(self, request: web.Request) -> web.StreamResponse:
        directory = request.query.get("path", "").strip("/")  # aiohttp has decoded it already
        if directory:
            try:
                check_artifact_path(directory)
            except ArtifactPathError as exc:
                return error_response(MlflowApiError("INVALID_PARAMETER_VALUE", f"mlflow-agent: {exc}"))
        if directory and self.store.latest(directory) is not None:
            return json_response({})  # a file, not a folder: what MLflow answers (the client asks before downloads)
        local = self.store.children(directory)
        if not local:
            return await self.forward(request)
        files: dict[str, dict[str, Any]] = {}
        target = upstream_artifact_path(directory, self.catalog) if directory else ""
        if self.rest is not None and target is not None:
            files.update(await self._upstream_listing(target))
        for name, artifact in local.items():
            if artifact is None:
                files.setdefault(name, {"path": name, "is_dir": True})
            else:
                files[name] = {"path": name, "is_dir": False}
                if artifact.size:  # proto2 as the server writes it: a zero size is left out
                    files[name]["file_size"] = artifact.size
        return json_response({"files": sorted(files.values(), key=lambda f: f["path"])})

    async def _upstream_listing(self, target: str) -> dict[str, dict[str, Any]]:
        """The upstream's entries by name (the server lists basenames); none when it does not answer (the
        local copies still show)."""
        assert self.rest is not None
        try:
            answer = await self.rest.call("GET", "artifacts", params={"path": target}, timeout=self.read_timeout,
                                          api="/api/2.0/mlflow-artifacts/")
        except UpstreamError as exc:
            log.debug("artifact listing of %s from the upstream failed: %s", target, exc)
            return {}
        out: dict[str, dict[str, Any]] = {}
        for entry in answer.get("files", []):
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                name = entry["path"].rstrip("/").rsplit("/", 1)[-1]
                out[name] = entry
        return out


def _requested_path(request: web.Request) -> str:
    """The artifact path as the client sent it. The raw path is checked too: the URL library folds
    ``a/../b`` into ``b`` before routing, which would quietly move a file out of its run's directory."""
    raw = unquote(request.raw_path.split("?", 1)[0])
    for prefix in _PREFIXES:
        if raw.startswith(prefix + "/"):
            check_artifact_path(raw[len(prefix) + 1:])
            break
    else:
        raise ArtifactPathError(f"invalid artifact path {raw[:200]!r}")
    return check_artifact_path(request.match_info["path"])
