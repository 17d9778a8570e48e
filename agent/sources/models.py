"""MLflow 3 logged models, and a run's inputs and outputs, answered locally.

``log_model`` is, on the wire: ``POST logged-models`` (create, status PENDING), ``runs/outputs`` (the run
produced it), PUTs of its files under ``<experiment>/models/<model>/artifacts/``, and ``PATCH
logged-models/<model>`` (finalize: READY). The create works like ``runs/create``: one bounded attempt
upstream, so the client gets the real id when it can, else a provisional ``m-<32 hex>`` id, created upstream
later (tagged ``mlflow_agent.provisional_model_id``, the idempotency key) and translated everywhere: in
``runs/outputs`` and ``runs/log-inputs``, in metrics' ``model_id``, in artifact paths. Every later write
(finalize, tags, params) is made durable in the model's own spool queue and answered at once; reads of
the models this agent created merge what is not uploaded yet into the upstream's answer, or are answered
from what the agent knows while the upstream is away.

Azure ML has no logged-models API. There every model stays the agent's own (answered from its catalog,
kept in the spool directory) and is stored upstream as MLflow 2 stored models were: its files under its
source run's artifacts, in a folder named after the model (``runs:/<run>/<name>`` loads it from Azure
directly), its description in two run tags (``mlflow.log-model.history`` and
``mlflow_agent.logged_model.<model id>``; see ``agent.upload.models``). A model logged outside a run gets
a run of its own, named after it, to hold it.

Models created by other processes are not the agent's: requests about them are forwarded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from agent import validation_models as vm
from agent.artifact_paths import client_artifact_uri, default_model_uri
from agent.catalog import ModelEntry, RunEntry, generate_run_name, new_id, new_model_id
from agent.errors import MlflowApiError, invalid, unavailable
from agent.records import PROVISIONAL_MODEL_TAG, Kind, Record, model_queue
from agent.sources import reads
from agent.sources.mlflow_api import Handler, MlflowApi, json_response
from agent.sources.search_filter import SearchFilterError, parse_model_filter, sort_models
from agent.spool.store import CatalogWrite
from agent.upstream.rest import PermanentError

log = logging.getLogger("agent.sources.models")

# On a run made to hold a model logged outside any run (Azure ML only): which model it holds.
HOLDER_TAG = "mlflow_agent.logged_model_id"
_TERMINAL = {"LOGGED_MODEL_READY": "FINISHED", "LOGGED_MODEL_UPLOAD_FAILED": "FAILED"}


def _now_ms() -> int:
    return int(time.time() * 1000)


class ModelsApi:
    def __init__(self, api: MlflowApi) -> None:
        self.api = api
        self.catalog = api.catalog
        self.spool = api.spool
        self.ledger = api.ledger

    def add_routes(self, app: web.Application) -> None:
        routes: list[tuple[str, str, Handler]] = [
            ("POST", "logged-models", self.create),
            ("POST", "logged-models/search", self.search),
            ("GET", "logged-models/{model_id}", self.get),
            ("PATCH", "logged-models/{model_id}", self.finalize),
            ("PATCH", "logged-models/{model_id}/tags", self.set_tags),
            ("DELETE", "logged-models/{model_id}/tags/{key:.+}", self.delete_tag),
            ("POST", "logged-models/{model_id}/params", self.log_params),
            ("POST", "runs/outputs", self.log_outputs),
            ("POST", "runs/log-inputs", self.log_inputs),
        ]
        for prefix in ("/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/"):
            for method, path, handler in routes:
                app.router.add_route(method, prefix + path, self.api.guard(path, handler))

    async def _forward(self, request: web.Request, why: str) -> web.StreamResponse:
        if self.api.forward is None:
            raise unavailable(f"mlflow-agent runs offline: {why}")
        return await self.api.forward(request)

    async def _append(self, records: list[Record], writes: list[CatalogWrite]) -> None:
        self.ledger.appended(await self.spool.append(records, writes, source="http"))

    # --- create --------------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        cm = vm.create_model(await self.api.read_body(request))
        experiment = self.catalog.experiment(cm.experiment_id)
        if experiment is not None and experiment.info.get("lifecycle_stage") == "deleted":
            raise invalid(f"The experiment {cm.experiment_id} must be in the 'active' state. Current state is deleted.")
        model_id = new_model_id()
        # Named here, not by the server: a lost answer must not leave the client with another name.
        name = cm.name or generate_run_name()
        if not self.api.azureml:
            answer = await self._create_upstream_now(model_id, cm, name)
            if answer is not None:
                return await self._created_upstream(cm, answer)
        now = _now_ms()
        info: dict[str, Any] = {
            "experiment_id": cm.experiment_id, "name": name, "model_type": cm.model_type or "",
            "source_run_id": cm.source_run_id or "", "status": vm.PENDING, "creation_timestamp_ms": now,
            "last_updated_timestamp_ms": now, "artifact_uri": default_model_uri(cm.experiment_id, model_id),
        }
        entry = ModelEntry(model_id, None, True, info, tags=dict(cm.tags), params=dict(cm.params))
        payload = {"experiment_id": cm.experiment_id, "name": name, "model_type": cm.model_type,
                   "source_run_id": cm.source_run_id, "tags": cm.tags, "params": cm.params}
        records = [Record(model_queue(model_id), Kind.CREATE_MODEL, payload)]
        writes: list[CatalogWrite] = []
        holder: RunEntry | None = None
        if self.api.azureml:
            holder = await self._azure_holder(entry, records)
            if holder.provisional and holder.upstream_id is None and holder.run_id not in self.catalog.runs:
                writes.extend(self.api.entry_writes(holder))
        writes.append(entry.upsert())
        await self._append(records, writes)
        if holder is not None and holder.run_id not in self.catalog.runs:
            self.catalog.add_run(holder)
        self.catalog.add_model(entry)
        log.info("logged model %s created provisionally (%s)", model_id,
                 "Azure ML keeps models as run artifacts" if self.api.azureml else
                 "upstream not configured" if self.api.rest is None else "upstream did not answer in time")
        return json_response(self.catalog.model_json(entry))

    async def _azure_holder(self, entry: ModelEntry, records: list[Record]) -> RunEntry:
        """Azure ML: the run whose artifacts will hold the model (its source run, or a new one named after
        it), and the model's folder there (its name; its name and id if the run holds that name already)."""
        source = entry.info["source_run_id"]
        if source:
            holder = await self.api.writable_run(source)
        else:
            experiment, name = entry.info["experiment_id"], entry.info["name"]
            holder, record = self.api.provisional_run(new_id(), experiment, name, user_id=None,
                                                      tags=[[HOLDER_TAG, entry.model_id]], start_time=_now_ms())
            holder.info["holds_model"] = entry.model_id
            records.insert(0, record)
        taken = {m.info.get("azure_dir") for m in self.catalog.models.values()
                 if m.info.get("azure_run") == holder.run_id}
        name = entry.info["name"]
        entry.info["azure_run"] = holder.run_id
        entry.info["azure_dir"] = name if name not in taken else f"{name}-{entry.model_id.removeprefix('m-')[:8]}"
        return holder

    async def _create_upstream_now(self, model_id: str, cm: vm.CreateModel, name: str) -> dict[str, Any] | None:
        """The bounded attempt: the upstream's answer, or None to go provisional."""
        rest, resolver = self.api.rest, self.api.resolver
        if rest is None or resolver is None or rest.health.known_down:
            return None
        experiment = self.catalog.upstream_experiment_id(cm.experiment_id)
        if experiment is None:
            return None
        body: dict[str, Any] = {"experiment_id": experiment, "name": name,
                                "tags": [{"key": k, "value": v} for k, v in cm.tags]}
        # The idempotency key: if this answer is lost, the uploader finds the model by it.
        body["tags"].append({"key": PROVISIONAL_MODEL_TAG, "value": model_id})
        if cm.source_run_id:
            source = self.catalog.upstream_run_id(cm.source_run_id)
            if source is None:
                return None  # the run is not upstream yet
            body["source_run_id"] = source
        if cm.model_type:
            body["model_type"] = cm.model_type
        if cm.params:
            body["params"] = [{"key": k, "value": v} for k, v in cm.params]
        task = resolver.attempt_create_now(model_id, body, "logged-models")
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.api.create_run_timeout)
        except PermanentError as exc:
            raise MlflowApiError(exc.error_code or "BAD_REQUEST", exc.message) from exc
        except asyncio.TimeoutError:
            self.api.track(self._late_create(model_id, task))
            return None

    async def _late_create(self, model_id: str, task: asyncio.Task[dict[str, Any] | None]) -> None:
        """The upstream answered after the client got the provisional id: map it now."""
        try:
            answer = await task
        except Exception:
            return  # the uploader creates it (or finds it by its tag)
        entry = self.catalog.model(model_id)
        if answer is None or self.api.resolver is None or entry is None or entry.upstream_id is not None:
            return
        info = answer["model"]["info"]
        await self.api.resolver.model_mapped(model_id, str(info["model_id"]), info.get("artifact_uri"))

    async def _created_upstream(self, cm: vm.CreateModel, answer: dict[str, Any]) -> web.Response:
        info = answer["model"]["info"]
        model_id = str(info["model_id"])
        uri = self._client_uri(info.get("artifact_uri"), cm.experiment_id, model_id)
        local = {"experiment_id": cm.experiment_id, "name": info.get("name"), "model_type": cm.model_type or "",
                 "source_run_id": cm.source_run_id or "", "status": info.get("status", vm.PENDING),
                 "creation_timestamp_ms": info.get("creation_timestamp_ms"),
                 "last_updated_timestamp_ms": info.get("last_updated_timestamp_ms"), "artifact_uri": uri}
        tags = {t["key"]: t.get("value", "") for t in info.get("tags") or [] if isinstance(t, dict) and "key" in t}
        entry = ModelEntry(model_id, model_id, False, local, tags=tags, params=dict(cm.params))
        await self.spool.write_catalog([entry.upsert()])
        self.catalog.add_model(entry)
        info.update(experiment_id=cm.experiment_id, source_run_id=cm.source_run_id or "", artifact_uri=uri)
        return json_response(answer)

    def _client_uri(self, uri: object, experiment: str, model_id: str) -> str:
        rest = self.api.rest
        if isinstance(uri, str) and uri:
            translated = client_artifact_uri(uri, self.catalog, rest.base_url if rest is not None else None)
            if translated is not None:
                return translated
        return default_model_uri(experiment, model_id)

    # --- reads ---------------------------------------------------------------------------------

    async def get(self, request: web.Request) -> web.StreamResponse:
        model_id = vm.check_model_id(request.match_info["model_id"])
        entry = self.catalog.model(model_id)
        if entry is None:
            return await self._forward(request, "logged models need an upstream")
        upstream_id = self.catalog.upstream_model_id(model_id)
        rest = self.api.rest
        if (not self.api.azureml and rest is not None and upstream_id is not None and not rest.health.known_down
                and "allow_deleted" not in request.query):
            answer = await self.api.ask_upstream("GET", f"logged-models/{upstream_id}", label="logged-models/get")
            if answer is not None and isinstance(answer.get("model"), dict):
                return json_response({"model": await self._merged(answer["model"], entry)})
        return json_response(self.catalog.model_json(entry))

    async def _merged(self, model: dict[str, Any], entry: ModelEntry) -> dict[str, Any]:
        """An upstream model in the client's ids, with this agent's writes not uploaded yet."""
        info = model.get("info") if isinstance(model.get("info"), dict) else {}
        data = model.get("data") if isinstance(model.get("data"), dict) else {}
        assert isinstance(info, dict) and isinstance(data, dict)
        for key in ("experiment_id", "source_run_id", "artifact_uri"):
            if entry.info.get(key) is not None:
                info[key] = entry.info[key]
        info["model_id"] = entry.model_id
        for metric in data.get("metrics") or []:
            if isinstance(metric, dict):
                if isinstance(metric.get("model_id"), str):
                    metric["model_id"] = self.catalog.client_model_id(metric["model_id"])
                if isinstance(metric.get("run_id"), str):
                    metric["run_id"] = self.catalog.client_run_id(metric["run_id"])
        queue = model_queue(entry.model_id)
        if self.ledger.run_items(queue):
            for key in ("status", "last_updated_timestamp_ms"):
                info[key] = entry.info.get(key, info.get(key))
            deleted = set(await self.spool.pending_tag_deletes(queue, Kind.DELETE_MODEL_TAG))
            tags = {t["key"]: t for t in info.get("tags") or [] if isinstance(t, dict) and "key" in t}
            for key in deleted - set(entry.tags):
                tags.pop(key, None)
            tags.update({k: {"key": k, "value": v} for k, v in entry.tags.items()})
            info["tags"] = [tags[k] for k in sorted(tags)]
            params = {p["key"]: p for p in data.get("params") or [] if isinstance(p, dict) and "key" in p}
            params.update({k: {"key": k, "value": v} for k, v in entry.params.items() if k not in params})
            if params:
                data["params"] = list(params.values())
        return {"info": info, "data": data}

    async def search(self, request: web.Request) -> web.StreamResponse:
        """Models of this agent not uploaded yet (or with writes waiting) are part of the answer: the
        upstream's first page, with those merged in, filtered and ordered as MLflow would."""
        parsed = reads.search_request(await request.read())
        if parsed is None:
            return await self._forward(request, "logged models need an upstream")  # the upstream's to refuse
        body, ids = parsed
        wanted = set(ids)
        local_only = self.api.azureml or self.api.rest is None or all(
            self.catalog.upstream_experiment_id(i) is None for i in ids)
        held = [m for m in self.catalog.models.values() if m.info.get("experiment_id") in wanted and (
            local_only or m.upstream_id is None or self.ledger.run_items(model_queue(m.model_id)))]
        if not held and not local_only:
            return await self._forward(request, "logged models need an upstream")
        try:
            datasets = body.get("datasets") if isinstance(body.get("datasets"), list) else None
            matcher = parse_model_filter(body.get("filter") if isinstance(body.get("filter"), str) else None,
                                         datasets)
            order_by = body.get("order_by") if isinstance(body.get("order_by"), list) else None
            views = {m.model_id: self.catalog.model_json(m)["model"] for m in held}
            upstream: list[dict[str, Any]] = []
            token: str | None = None
            if not local_only:
                upstream, token = await self._search_upstream(body, ids)
                for model in upstream:
                    entry = self.catalog.model(str(model.get("info", {}).get("model_id")))
                    if entry is not None and entry.model_id in views:
                        views[entry.model_id] = await self._merged(model, entry)
            held_ids = {m.model_id for m in held}
            models: list[Mapping[str, Any]]
            if body.get("page_token"):  # held models are all on the first page
                models = [m for m in upstream if m.get("info", {}).get("model_id") not in held_ids]
            else:
                others = [m for m in upstream if m.get("info", {}).get("model_id") not in held_ids]
                models = sort_models(others + [v for v in views.values() if matcher.matches(v)], order_by)
        except SearchFilterError as exc:
            raise invalid(str(exc)) from exc
        answer: dict[str, Any] = {"models": models}
        if token:
            answer["next_page_token"] = token
        return json_response(answer)

    async def _search_upstream(self, body: dict[str, Any], ids: list[str]) -> tuple[list[dict[str, Any]], str | None]:
        upstream_ids = [u for u in (self.catalog.upstream_experiment_id(i) for i in ids) if u is not None]
        answer = await self.api.ask_upstream("POST", "logged-models/search",
                                             body=dict(body, experiment_ids=upstream_ids),
                                             timeout=self.api.read_timeout)
        if answer is None:
            raise unavailable("mlflow-agent: the upstream is unreachable and holds part of this search's answer")
        models = [m for m in answer.get("models") or [] if isinstance(m, dict) and isinstance(m.get("info"), dict)]
        for model in models:
            info = model["info"]
            if isinstance(info.get("model_id"), str):
                info["model_id"] = self.catalog.client_model_id(info["model_id"])
            if isinstance(info.get("experiment_id"), str):
                info["experiment_id"] = self.catalog.client_experiment_id(info["experiment_id"])
            if isinstance(info.get("source_run_id"), str) and info["source_run_id"]:
                info["source_run_id"] = self.catalog.client_run_id(info["source_run_id"])
            info["artifact_uri"] = self._client_uri(info.get("artifact_uri"), str(info.get("experiment_id")),
                                                    str(info.get("model_id")))
        token = answer.get("next_page_token")
        return models, token if isinstance(token, str) and token else None

    # --- model writes --------------------------------------------------------------------------

    def _known(self, request: web.Request) -> ModelEntry | None:
        return self.catalog.model(vm.check_model_id(request.match_info["model_id"]))

    async def _model_write(self, entry: ModelEntry, kind: Kind, payload: dict[str, Any], changed: ModelEntry, *,
                           extra: Sequence[Record] = (), extra_writes: Sequence[CatalogWrite] = ()) -> None:
        """One durable write to a model's queue; the entry changes only once it is committed."""
        changed.info["last_updated_timestamp_ms"] = _now_ms()
        records = [Record(model_queue(entry.model_id), kind, payload), *extra]
        await self._append(records, [changed.upsert(), *extra_writes])
        entry.info, entry.tags, entry.params = changed.info, changed.tags, changed.params

    @staticmethod
    def _copy(entry: ModelEntry) -> ModelEntry:
        return dataclasses.replace(entry, info=dict(entry.info), tags=dict(entry.tags), params=dict(entry.params))

    async def finalize(self, request: web.Request) -> web.StreamResponse:
        body = await self.api.read_body(request)
        entry = self._known(request)
        if entry is None:
            return await self._forward(request, "logged models need an upstream")
        status = vm.finalize_model(body)
        changed = self._copy(entry)
        changed.info["status"] = status
        holder = self.catalog.run(str(entry.info.get("azure_run") or ""))
        run_status = _TERMINAL.get(status)
        if holder is None or holder.info.get("holds_model") != entry.model_id or run_status is None:
            await self._model_write(entry, Kind.FINALIZE_MODEL, {"status": status}, changed)
            return json_response(self.catalog.model_json(entry))
        # The run made to hold this model ends with it.
        update = {"status": run_status, "end_time": _now_ms()}
        holder_info = dict(holder.info, **update)
        await self._model_write(entry, Kind.FINALIZE_MODEL, {"status": status}, changed,
                                extra=[Record(holder.run_id, Kind.UPDATE_RUN, update)],
                                extra_writes=[dataclasses.replace(holder, info=holder_info).upsert()])
        holder.info = holder_info
        return json_response(self.catalog.model_json(entry))

    async def set_tags(self, request: web.Request) -> web.StreamResponse:
        body = await self.api.read_body(request)
        entry = self._known(request)
        if entry is None:
            return await self._forward(request, "logged models need an upstream")
        tags = vm.model_tags(body)
        changed = self._copy(entry)
        changed.tags.update(dict(tags))
        await self._model_write(entry, Kind.MODEL_TAGS, {"tags": tags}, changed)
        return json_response({})

    async def delete_tag(self, request: web.Request) -> web.StreamResponse:
        entry = self._known(request)
        if entry is None:
            return await self._forward(request, "logged models need an upstream")
        key = request.match_info["key"]
        if key not in entry.tags:
            raise MlflowApiError("RESOURCE_DOES_NOT_EXIST",
                                 f"No tag with key {key!r} found for model with ID {entry.model_id!r}.")
        changed = self._copy(entry)
        del changed.tags[key]
        await self._model_write(entry, Kind.DELETE_MODEL_TAG, {"key": key}, changed)
        return json_response({})

    async def log_params(self, request: web.Request) -> web.StreamResponse:
        body = await self.api.read_body(request)
        entry = self._known(request)
        if entry is None:
            return await self._forward(request, "logged models need an upstream")
        params = vm.model_params(body)
        again = [k for k, _ in params if k in entry.params]
        if again:
            raise MlflowApiError("BAD_REQUEST", "UNIQUE constraint failed: logged_model_params.model_id, "
                                 f"logged_model_params.param_key (already logged: {again})")
        changed = self._copy(entry)
        changed.params.update(dict(params))
        await self._model_write(entry, Kind.MODEL_PARAMS, {"params": params}, changed)
        return json_response({})

    # --- a run's lineage -----------------------------------------------------------------------

    async def _lineage_write(self, run: RunEntry, kind: Kind, payload: dict[str, Any],
                             lineage: dict[str, list[dict[str, Any]]]) -> None:
        info = dict(run.info, **lineage)
        upsert = dataclasses.replace(run, info=info).upsert()
        await self._append([Record(run.run_id, kind, payload)], [upsert])
        run.info = info

    async def log_outputs(self, request: web.Request) -> web.Response:
        lo = vm.log_outputs(await self.api.read_body(request))
        run = await self.api.writable_run(lo.run_id)
        known = {(o.get("model_id"), int(o.get("step") or 0)) for o in run.lineage("model_outputs")}
        if any(ref in known for ref in lo.models) or len(set(lo.models)) != len(lo.models):
            # What MLflow's SQL store answers for an output logged twice.
            raise MlflowApiError("BAD_REQUEST", "UNIQUE constraint failed: inputs.source_type, inputs.source_id, "
                                 "inputs.destination_type, inputs.destination_id")
        models = [{"model_id": m, "step": step} for m, step in lo.models]
        await self._lineage_write(run, Kind.LOG_OUTPUTS, {"models": models},
                                  {"model_outputs": run.lineage("model_outputs") + models})
        return json_response({})

    async def log_inputs(self, request: web.Request) -> web.Response:
        li = vm.log_inputs(await self.api.read_body(request))
        run = await self.api.writable_run(li.run_id)

        def dataset_key(item: dict[str, Any]) -> tuple[Any, Any]:
            return item["dataset"].get("name"), item["dataset"].get("digest")

        datasets = run.lineage("dataset_inputs")
        seen = {dataset_key(d) for d in datasets}
        datasets = datasets + [d for d in li.datasets if dataset_key(d) not in seen]
        model_inputs = run.lineage("model_inputs")
        known = {m.get("model_id") for m in model_inputs}
        model_inputs = model_inputs + [{"model_id": m} for m in dict.fromkeys(li.models) if m not in known]
        payload = {"datasets": li.datasets, "models": [{"model_id": m} for m in li.models]}
        await self._lineage_write(run, Kind.LOG_INPUTS, payload,
                                  {"dataset_inputs": datasets, "model_inputs": model_inputs})
        return json_response({})
