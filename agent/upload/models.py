"""Logged models and a run's lineage leave: the rows of a model's queue (create, finalize, tags, params)
and a run's ``runs/log-inputs`` / ``runs/outputs`` rows, each sent as the call the client made, with
provisional ids replaced by the upstream's.

Calls MLflow does not make idempotent are made so: a model is created once (found again by its
``mlflow_agent.provisional_model_id`` tag); ``runs/outputs`` and model params, which the SQL store refuses
when repeated, are checked against the upstream when it refuses them (an earlier attempt whose answer was
lost is then done, not failed). A model is finalized upstream only once the files the client uploaded for
it before finalizing are upstream too, so nobody sees a READY model with files missing.

Azure ML has no logged models (see ``agent.sources.models``): a model's description goes into two tags of
the run that holds its files, and is set again after each change (a tag write is an upsert):

* ``mlflow.log-model.history``: MLflow 2's list of a run's stored models (``run_id``, ``artifact_path``,
  ``utc_time_created``, ``model_uuid``, ``flavors``), which MLflow 2 tooling and Azure ML studio read;
* ``mlflow_agent.logged_model.<model id>``: the rest of it (name, status, type, tags, params).

``runs/outputs`` is then carried by those tags, and metrics lose their ``model_id`` (see the uploader).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable
from typing import Any, Protocol
from urllib.parse import quote

import orjson

from agent.artifact_paths import UPSTREAM_ROOT, proxied_root
from agent.catalog import Catalog, ModelEntry
from agent.records import Kind, queued_model
from agent.spool.artifacts import ArtifactStore
from agent.spool.store import CatalogWrite, Row
from agent.upload.resolver import Resolver
from agent.upstream.rest import PermanentError
from agent.validation import MAX_TAG_VAL_LENGTH

log = logging.getLogger("agent.upload")



class Call(Protocol):
    """One upstream call, retried by the uploader like every upload; ``label`` names it in the metrics."""

    def __call__(self, what: str, method: str, endpoint: str, body: dict[str, Any] | None, label: str, *,
                 params: dict[str, str] | None = None) -> Awaitable[dict[str, Any]]: ...


HISTORY_TAG = "mlflow.log-model.history"
MODEL_TAG_PREFIX = "mlflow_agent.logged_model."
LINEAGE_KINDS = frozenset({Kind.LOG_INPUTS, Kind.LOG_OUTPUTS})


class ModelUploads:
    def __init__(self, *, catalog: Catalog, resolver: Resolver, call: Call, artifacts: ArtifactStore | None,
                 azureml: bool) -> None:
        self.catalog = catalog
        self.resolver = resolver
        self.call = call
        self.artifacts = artifacts
        self.azureml = azureml

    async def send(self, key: str, row: Row) -> list[CatalogWrite]:
        """Deliver one row; the catalog facts to commit with its acknowledgement. Raises UpstreamError."""
        payload = row.payload
        assert isinstance(payload, dict)
        if row.kind in LINEAGE_KINDS:
            await self._lineage(key, row.kind, payload)
            return []
        model_id = queued_model(key)
        entry = self.catalog.model(model_id) if model_id is not None else None
        if entry is None:
            raise PermanentError(f"no logged model is known for queue {key}")
        if self.azureml:
            return await self._azure(entry, row.kind)
        if row.kind is Kind.CREATE_MODEL:
            upstream_id, root = await self.resolver.create_model(entry.model_id, payload)
            if root is not None:
                entry.info[UPSTREAM_ROOT] = root
            log.info("logged model %s created upstream as %s", entry.model_id, upstream_id)
            return [self.catalog.map_model(entry.model_id, upstream_id)]
        upstream = await self._upstream_model(entry.model_id)
        path = f"logged-models/{upstream}"
        if row.kind is Kind.FINALIZE_MODEL:
            await self._artifacts_settled(entry)
            await self.call(f"finalize model {entry.model_id}", "PATCH", path,
                            {"model_id": upstream, "status": payload["status"]}, "logged-models/finalize")
        elif row.kind is Kind.MODEL_TAGS:
            tags = [{"key": k, "value": v} for k, v in payload["tags"]]
            await self.call(f"tags of model {entry.model_id}", "PATCH", f"{path}/tags",
                            {"model_id": upstream, "tags": tags}, "logged-models/tags")
        elif row.kind is Kind.DELETE_MODEL_TAG:
            try:
                await self.call(f"delete tag of model {entry.model_id}", "DELETE",
                                f"{path}/tags/{quote(payload['key'], safe='')}", None, "logged-models/delete-tag")
            except PermanentError as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST" or "No tag" not in exc.message:
                    raise  # else: gone already (an earlier answer was lost)
        elif row.kind is Kind.MODEL_PARAMS:
            params = [[str(k), str(v)] for k, v in payload["params"]]
            try:
                await self.call(f"params of model {entry.model_id}", "POST", f"{path}/params",
                                {"model_id": upstream, "params": [{"key": k, "value": v} for k, v in params]},
                                "logged-models/params")
            except PermanentError:
                answer = await self.call(f"check params of model {entry.model_id}", "GET", path, None,
                                         "logged-models/get")
                data = answer.get("model", {}).get("data", {})
                held = {p.get("key"): p.get("value") for p in data.get("params") or [] if isinstance(p, dict)}
                if any(held.get(k) != v for k, v in params):
                    raise
        return []

    async def _upstream_model(self, model_id: str) -> str:
        upstream = await self.resolver.upstream_model(model_id)
        entry = self.catalog.model(model_id)
        if entry is not None and entry.provisional and entry.upstream_id is None:
            raise PermanentError(f"logged model {model_id} could not be created upstream")
        return upstream

    async def _artifacts_settled(self, entry: ModelEntry) -> None:
        """Wait until no file of this model waits for upload (uploaded, or dead-lettered with its reason)."""
        root = proxied_root(entry.info.get("artifact_uri"))
        if self.artifacts is None or root is None:
            return
        await self.artifacts.wait_settled(root + "/")

    async def _lineage(self, run: str, kind: Kind, payload: dict[str, Any]) -> None:
        upstream_run = await self.resolver.upstream_run(run)
        if kind is Kind.LOG_OUTPUTS:
            if self.azureml:
                return  # carried by the holder run's model tags, set when each model was created
            models = [{"model_id": await self._upstream_model(m["model_id"]), "step": m.get("step", 0)}
                      for m in payload["models"]]
            try:
                await self.call(f"outputs of run {run}", "POST", "runs/outputs",
                                {"run_id": upstream_run, "models": models}, "runs/outputs")
            except PermanentError:
                # MLflow's SQL store refuses an output it holds already: an earlier answer was lost?
                answer = await self.call(f"check outputs of run {run}", "GET", "runs/get", None, "runs/get",
                                         params={"run_id": upstream_run})
                held = {(o.get("model_id"), int(o.get("step") or 0))
                        for o in answer.get("run", {}).get("outputs", {}).get("model_outputs") or []}
                if any((m["model_id"], int(m["step"] or 0)) not in held for m in models):
                    raise
            return
        body: dict[str, Any] = {"run_id": upstream_run, "datasets": payload.get("datasets") or []}
        if payload.get("models") and not self.azureml:
            body["models"] = [{"model_id": await self._upstream_model(m["model_id"])} for m in payload["models"]]
        if body["datasets"] or body.get("models"):
            await self.call(f"inputs of run {run}", "POST", "runs/log-inputs", body, "runs/log-inputs")

    # --- Azure ML ------------------------------------------------------------------------------

    async def _azure(self, entry: ModelEntry, kind: Kind) -> list[CatalogWrite]:
        """Any change of a model: set the holder run's tags to what the agent knows of it now."""
        holder = str(entry.info["azure_run"])
        upstream_run = await self.resolver.upstream_run(holder)
        run = self.catalog.run(holder)
        if run is not None and run.provisional and run.upstream_id is None:
            raise PermanentError(f"run {holder}, which holds logged model {entry.model_id}, could not be created")
        models = sorted((m for m in self.catalog.models.values() if m.info.get("azure_run") == holder),
                        key=lambda m: (m.info.get("creation_timestamp_ms") or 0, m.model_id))
        tags = [{"key": HISTORY_TAG, "value": _history(models, upstream_run)},
                {"key": MODEL_TAG_PREFIX + entry.model_id, "value": _description(entry)}]
        await self.call(f"model tags of run {holder}", "POST", "runs/log-batch",
                        {"run_id": upstream_run, "tags": tags}, "runs/log-batch")
        if kind is Kind.CREATE_MODEL:
            log.info("logged model %s kept in run %s under %s/ (Azure ML has no logged models)", entry.model_id,
                     upstream_run, entry.info.get("azure_dir"))
            return [self.catalog.map_model(entry.model_id, entry.model_id)]
        return []


def _history(models: list[ModelEntry], upstream_run: str) -> str:
    """MLflow 2's ``mlflow.log-model.history``: newest entries kept if they do not all fit in a tag."""
    entries: list[dict[str, Any]] = [{
        "run_id": upstream_run,
        "artifact_path": m.info.get("azure_dir"),
        "utc_time_created": datetime.datetime.fromtimestamp(
            (m.info.get("creation_timestamp_ms") or 0) / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f"),
        "model_uuid": m.model_id,
        "flavors": {},
    } for m in models]
    while True:
        text = orjson.dumps(entries).decode()
        if len(text) <= MAX_TAG_VAL_LENGTH or len(entries) <= 1:
            return text[:MAX_TAG_VAL_LENGTH]
        entries = entries[1:]


def _description(entry: ModelEntry) -> str:
    """The model as the agent knows it, in one tag value; params and tags shortened to fit if need be."""
    description: dict[str, Any] = {
        "model_id": entry.model_id,
        "name": entry.info.get("name"),
        "artifact_path": entry.info.get("azure_dir"),
        "status": entry.info.get("status"),
        "model_type": entry.info.get("model_type") or "",
        "creation_timestamp_ms": entry.info.get("creation_timestamp_ms"),
        "tags": entry.tags,
        "params": entry.params,
    }
    text = orjson.dumps(description).decode()
    if len(text) > MAX_TAG_VAL_LENGTH:
        log.warning("logged model %s: its tags and params do not fit in a run tag on Azure ML; they are kept by "
                    "the agent only", entry.model_id)
        description.update(tags={}, params={}, truncated=True)
        text = orjson.dumps(description).decode()
    return text
