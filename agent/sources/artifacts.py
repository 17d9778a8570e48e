"""Artifacts enter: ``PUT /api/2.0/mlflow-artifacts/artifacts/<path>`` is streamed to disk and answered
once durable; downloads and listings are served from the local copy until it is uploaded, then read from
the upstream: an MLflow server's artifact proxy (forwarded, in its ids), or Azure ML's run history and
blob storage (``agent.upstream.azure_artifacts``), which a stock mlflow client cannot reach by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

from agent.artifact_paths import (
    AzureArtifactTarget,
    NotAnArtifactPath,
    azure_artifact_target,
    owner_of,
    proxied_root,
    upstream_artifact_path,
)
from agent.catalog import Catalog
from agent.errors import MlflowApiError, unavailable
from agent.ops.metrics import AgentMetrics
from agent.sources.mlflow_api import error_response, json_response
from agent.spool.artifacts import (
    Artifact,
    ArtifactBudgetExceeded,
    ArtifactPathError,
    ArtifactStore,
    check_artifact_path,
)
from agent.upstream.azure_artifacts import AzureArtifacts
from agent.upstream.rest import MlflowRest, PermanentError, UpstreamError

log = logging.getLogger("agent.artifacts")

# (request, upstream path, upstream query): to the upstream's artifact proxy, in its ids
Forward = Callable[[web.Request, str, "dict[str, str] | None"], Awaitable[web.StreamResponse]]
_PREFIXES = ("/api/2.0/mlflow-artifacts/artifacts", "/ajax-api/2.0/mlflow-artifacts/artifacts")
_READ_CHUNK = 256 * 1024


class ArtifactsApi:
    def __init__(self, *, store: ArtifactStore, catalog: Catalog, metrics: AgentMetrics, rest: MlflowRest | None,
                 forward: Forward, read_timeout: float, azure: AzureArtifacts | None = None) -> None:
        self.store = store
        self.catalog = catalog
        self.metrics = metrics
        self.rest = rest
        self.forward = forward
        self.read_timeout = read_timeout
        self.azure = azure

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
        artifact = self.store.latest(path) or self.store.latest(self._model_alias(path) or path)
        if artifact is not None:
            name = path.rsplit("/", 1)[-1].replace('"', "'")  # control characters never get this far
            return web.FileResponse(self.store.data_path(artifact), headers={
                "Content-Type": artifact.content_type,
                "Content-Disposition": f'attachment; filename="{name}"',
            })
        if self.azure is not None:
            return await self._download_azure(request, path)
        target = upstream_artifact_path(path, self.catalog)
        if target is None:  # its run or model is not upstream yet, so neither is the file
            return error_response(_no_such_artifact(path))
        return await self.forward(request, _ARTIFACTS_API + target, None)

    async def _download_azure(self, request: web.Request, path: str) -> web.StreamResponse:
        assert self.azure is not None and self.rest is not None
        target = self._azure_target(path)
        if target is None:
            return error_response(_no_such_artifact(path))
        try:
            url = await self.azure.download_url(target, self.read_timeout)
            async with self.rest.open_storage(url, f"GET artifact {path}") as upstream:
                name = path.rsplit("/", 1)[-1].replace('"', "'")
                response = web.StreamResponse(headers={
                    "Content-Type": upstream.headers.get("Content-Type", "application/octet-stream"),
                    "Content-Disposition": f'attachment; filename="{name}"',
                })
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(_READ_CHUNK):
                    await response.write(chunk)
                await response.write_eof()
                return response
        except PermanentError as exc:
            if exc.status == 404:
                return error_response(_no_such_artifact(path))
            return error_response(MlflowApiError(exc.error_code or "BAD_REQUEST", exc.message))
        except UpstreamError as exc:
            return error_response(unavailable(f"mlflow-agent: Azure ML did not answer for artifact {path}: {exc}"))

    def _azure_target(self, path: str) -> AzureArtifactTarget | None:
        try:
            return azure_artifact_target(path, self.catalog)
        except NotAnArtifactPath as exc:
            raise MlflowApiError("RESOURCE_DOES_NOT_EXIST", f"mlflow-agent: {exc}") from exc

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
        alias = self._model_alias(directory) if directory else None
        if alias is not None:
            local.update(self.store.children(alias))
        local.update(self._model_folders(directory))
        if not local and self.azure is None:
            target = upstream_artifact_path(directory, self.catalog)
            if target is None:
                return json_response({})  # nothing upstream yet: MLflow's answer for an empty folder
            return await self.forward(request, _ARTIFACTS_API.rstrip("/"), {"path": target})
        files: dict[str, dict[str, Any]] = {}
        if self.azure is not None:
            try:
                azure_target = self._azure_target(directory)
            except MlflowApiError:
                if not local:
                    raise
                azure_target = None
            if azure_target is not None:
                files.update(await self._azure_listing(azure_target, complete=not local))
        elif self.rest is not None:
            target = upstream_artifact_path(directory, self.catalog) if directory else ""
            if target is not None:
                files.update(await self._upstream_listing(target))
        for name, artifact in local.items():
            if artifact is None:
                files.setdefault(name, {"path": name, "is_dir": True})
            else:
                files[name] = {"path": name, "is_dir": False}
                if artifact.size:  # proto2 as the server writes it: a zero size is left out
                    files[name]["file_size"] = artifact.size
        return json_response({"files": sorted(files.values(), key=lambda f: f["path"])})

    def _run_models(self, path: str) -> tuple[str, list[tuple[str, str]]]:
        """Azure ML keeps a logged model's files in its run, under the model's folder: for a run's path, the
        path below the run's root and (folder, the model's own local root) for each model it holds."""
        owner = owner_of(path) if self.azure is not None else None
        if owner is None or owner.kind != "run":
            return "", []
        models = []
        for model in self.catalog.models.values():
            root = proxied_root(model.info.get("artifact_uri"))
            if model.info.get("azure_run") == owner.id and model.info.get("azure_dir") and root:
                models.append((str(model.info["azure_dir"]), root))
        return owner.relative, models

    def _model_alias(self, path: str) -> str | None:
        """The local path of a model's file addressed through its run (Azure ML), else None."""
        relative, models = self._run_models(path)
        for folder, root in models:
            if relative == folder or relative.startswith(folder + "/"):
                below = relative[len(folder):].lstrip("/")
                return f"{root}/{below}" if below else root
        return None

    def _model_folders(self, directory: str) -> dict[str, Artifact | None]:
        """A run's root lists the folders of the models it holds whose files are still here (Azure ML)."""
        relative, models = self._run_models(directory)
        if relative:
            return {}
        return {folder: None for folder, root in models if self.store.children(root)}

    async def _azure_listing(self, target: AzureArtifactTarget, *, complete: bool) -> dict[str, dict[str, Any]]:
        """Azure's entries by name. Without local files to show the listing is all Azure's: its failure is
        the client's (503, retried); with them, the local files still show."""
        assert self.azure is not None
        try:
            return await self.azure.children(target, self.read_timeout)
        except UpstreamError as exc:
            if complete:
                if isinstance(exc, PermanentError) and exc.status == 404:
                    return {}
                raise unavailable(f"mlflow-agent: Azure ML did not list {target.path or 'the run'}: {exc}") from exc
            log.debug("artifact listing of %s from Azure ML failed: %s", target, exc)
            return {}

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


_ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts/"


def _no_such_artifact(path: str) -> MlflowApiError:
    return MlflowApiError("RESOURCE_DOES_NOT_EXIST", f"No such artifact: '{path}'")


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
