"""The MLflow REST API, answered locally (aiohttp).

Writes are validated as the MLflow server would, made durable in the spool and answered; only then
does the client get its 200. Reads of runs and experiments go to the upstream when it answers in
time and fall back to what the agent knows. ``runs/create`` makes one bounded attempt upstream so
the client gets a real id when it can, and a provisional one when it cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from agent import validation
from agent.artifact_paths import client_artifact_uri, default_run_uri
from agent.catalog import HISTORY_KEPT, Catalog, RunEntry, generate_run_name, new_id
from agent.errors import MlflowApiError, invalid, run_not_active, run_not_found, unavailable
from agent.ops.metrics import AgentMetrics
from agent.records import PROVISIONAL_TAG, RUN_ID_TAGS, Kind, Record
from agent.sources import reads
from agent.sources.ingest import Ingest
from agent.spool.ledger import Ledger
from agent.spool.store import CatalogWrite, ParamPut, Spool, SpoolClosed, SpoolFull, TagPut
from agent.upload.resolver import Resolver
from agent.upstream.rest import MlflowRest, PermanentError, UpstreamError

log = logging.getLogger("agent.sources.mlflow_api")

PREFIX = "/api/2.0/mlflow/"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What the client asks before artifact uploads; "false" keeps it on plain PUTs the agent can see.
SERVER_INFO = {
    "store_type": "SqlStore",
    "workspaces_enabled": False,
    "multipart_uploads_enabled": False,
    "multipart_downloads_enabled": False,
    "artifacts_presigned_only": False,
}


def json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json",
                        headers=headers)


def error_response(error: MlflowApiError) -> web.Response:
    headers = {"Retry-After": str(int(error.retry_after))} if error.retry_after else None
    return json_response(error.body(), status=error.status, headers=headers)


def _positive_int(value: str) -> bool:
    return value.strip().isdigit() and int(value) > 0


_MAX_HISTORY_PAGES = 1000  # 25 million points at MLflow's page size; 1 million at Azure's
# Writes answered from the spool alone (runs/create and experiments/create may wait for the upstream).
_LOCAL_WRITES = frozenset({"runs/log-batch", "runs/log-metric", "runs/log-parameter", "runs/set-tag",
                           "runs/delete-tag", "runs/update"})


class MlflowApi:
    def __init__(
        self,
        *,
        catalog: Catalog,
        spool: Spool,
        ledger: Ledger,
        metrics: AgentMetrics,
        rest: MlflowRest | None,
        resolver: Resolver | None,
        create_run_timeout: float,
        overflow_retry_after: float = 5.0,
    ) -> None:
        self.catalog = catalog
        self.spool = spool
        self.ledger = ledger
        self.metrics = metrics
        self.rest = rest
        self.resolver = resolver
        self.create_run_timeout = create_run_timeout
        self.overflow_retry_after = overflow_retry_after
        self.ingest = Ingest(catalog, spool, ledger)
        # Set by the agent: where reads this API does not answer itself go (the proxy).
        self.forward: Handler | None = None
        # Set by the agent when azureml: the page size Azure accepts for metric history, and artifacts
        # that only the agent can reach (Azure's azureml:// URIs need a plugin the client lacks).
        self.history_page_size = 25_000
        self.azureml = False
        self.read_timeout = 60.0  # one page of an upstream read the client is waiting on
        # Set by the agent when datagrams are on: commit what was sent before a lifecycle operation.
        self.before_lifecycle: Callable[[], Awaitable[None]] | None = None
        self._discovering: dict[str, asyncio.Future[RunEntry]] = {}
        self._background: set[asyncio.Task[None]] = set()

    def add_routes(self, app: web.Application) -> None:
        post: dict[str, Handler] = {
            "runs/log-batch": self.log_batch,
            "runs/log-metric": self.log_metric,
            "runs/log-parameter": self.log_param,
            "runs/set-tag": self.set_tag,
            "runs/delete-tag": self.delete_tag,
            "runs/update": self.update_run,
            "runs/create": self.create_run,
            "experiments/create": self.create_experiment,
        }
        get: dict[str, Handler] = {
            "runs/get": self.get_run,
            "metrics/get-history": self.get_metric_history,
            "experiments/get-by-name": self.get_experiment_by_name,
            "experiments/get": self.get_experiment,
        }
        for prefix in ("/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/"):
            for path, handler in post.items():
                app.router.add_post(prefix + path, self.guard(path, handler))
            for path, handler in get.items():
                app.router.add_get(prefix + path, self.guard(path, handler), allow_head=False)
        app.router.add_get("/api/3.0/mlflow/server-info", self.server_info, allow_head=False)

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(BaseException):
                await task

    def guard(self, endpoint: str, handler: Handler) -> Handler:
        """Turns MlflowApiError into MLflow's error JSON, and storage trouble into a retryable 503."""

        timed = endpoint in _LOCAL_WRITES

        async def guarded(request: web.Request) -> web.StreamResponse:
            started = time.monotonic()
            try:
                response = await handler(request)
                if timed:
                    self.metrics.ingest_latency.labels(source="http").observe(time.monotonic() - started)
                return response
            except MlflowApiError as exc:
                self.metrics.rejected.labels(endpoint=endpoint, error_code=exc.error_code).inc()
                return error_response(exc)
            except SpoolFull as exc:
                self.metrics.rejected.labels(endpoint=endpoint, error_code="REQUEST_LIMIT_EXCEEDED").inc()
                err = MlflowApiError("REQUEST_LIMIT_EXCEEDED", f"mlflow-agent: spool is full ({exc}); retry later",
                                     retry_after=self.overflow_retry_after)
                return error_response(err)
            except (sqlite3.Error, SpoolClosed, OSError) as exc:
                self.metrics.rejected.labels(endpoint=endpoint, error_code="TEMPORARILY_UNAVAILABLE").inc()
                log.error("could not make %s durable: %s", endpoint, exc)
                return error_response(unavailable(f"mlflow-agent could not store the request: {exc}"))

        return guarded

    # --- writes -------------------------------------------------------------------------------

    async def read_body(self, request: web.Request) -> dict[str, Any]:
        validation.check_content_type(request.headers.get("Content-Type"))
        return validation.parse_json_object(await request.read())

    async def log_batch(self, request: web.Request) -> web.Response:
        return await self._log(validation.log_batch(await self.read_body(request)), batch=True)

    async def log_metric(self, request: web.Request) -> web.Response:
        return await self._log(validation.log_metric(await self.read_body(request)), batch=False)

    async def log_param(self, request: web.Request) -> web.Response:
        return await self._log(validation.log_param(await self.read_body(request)), batch=False)

    async def set_tag(self, request: web.Request) -> web.Response:
        return await self._log(validation.set_tag(await self.read_body(request)), batch=False)

    async def _log(self, lb: validation.LogBatch, *, batch: bool) -> web.Response:
        entry = await self.writable_run(lb.run_id)
        await self.ingest.log(entry, lb, source="http", batch=batch)
        return json_response({})

    async def delete_tag(self, request: web.Request) -> web.Response:
        run_id, key = validation.delete_tag(await self.read_body(request))
        entry = await self.writable_run(run_id)
        if self.before_lifecycle is not None:
            await self.before_lifecycle()
        if entry.complete and key not in entry.tags:
            raise MlflowApiError("RESOURCE_DOES_NOT_EXIST", f"No tag with name: {key} in run with id {run_id}")
        result = await self.spool.append([Record(entry.run_id, Kind.DELETE_TAG, {"key": key})],
                                         [TagPut(entry.run_id, key, None)], source="http")
        self.ledger.appended(result)
        entry.tags.pop(key, None)
        return json_response({})

    async def update_run(self, request: web.Request) -> web.Response:
        ur = validation.update_run(await self.read_body(request))
        entry = await self.writable_run(ur.run_id)
        if self.before_lifecycle is not None:
            await self.before_lifecycle()
        payload: dict[str, Any] = {}
        if ur.status is not None:
            payload["status"] = ur.status
        if ur.end_time is not None:
            payload["end_time"] = ur.end_time
        if ur.run_name is not None:
            payload["run_name"] = ur.run_name
        if payload:
            entry.info.update(payload)
            writes: list[CatalogWrite] = [entry.upsert()]
            if ur.run_name is not None:
                entry.tags["mlflow.runName"] = ur.run_name
                writes.append(TagPut(entry.run_id, "mlflow.runName", ur.run_name))
            result = await self.spool.append([Record(entry.run_id, Kind.UPDATE_RUN, payload)], writes, source="http")
            self.ledger.appended(result)
        return json_response({"run_info": self.catalog.run_info_json(entry)})

    async def writable_run(self, run_id: str) -> RunEntry:
        entry = self.catalog.run(run_id) or await self._discover(run_id)
        if entry.deleted:
            raise run_not_active(run_id)
        return entry

    async def _discover(self, run_id: str) -> RunEntry:
        """First write to a run id the agent has never seen: an upstream run (e.g. an Azure ML job's).

        While the upstream answers, ask it once, so a mistyped id gets MLflow's 404 as it would
        without the agent; otherwise take the id on trust (the upload dead-letters it if wrong).
        """
        pending = self._discovering.get(run_id)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[RunEntry] = asyncio.get_running_loop().create_future()
        self._discovering[run_id] = fut
        try:
            entry = await self._fetch_unknown_run(run_id)
            fut.set_result(entry)
            return entry
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: concurrent waiters see it too
            raise
        finally:
            self._discovering.pop(run_id, None)

    async def _fetch_unknown_run(self, run_id: str) -> RunEntry:
        answer: dict[str, Any] | None = None
        if self.rest is not None and not self.rest.health.known_down:
            try:
                answer = await self.rest.call("GET", "runs/get", params={"run_id": run_id},
                                              timeout=self.create_run_timeout)
            except PermanentError as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    raise run_not_found(run_id) from exc
            except UpstreamError:
                answer = None
        existing = self.catalog.run(run_id)  # learnt meanwhile by a concurrent request
        if existing is not None:
            return existing
        if answer is not None and isinstance(answer.get("run"), dict):
            entry = self._entry_from_upstream(run_id, answer["run"])
        else:
            entry = RunEntry(run_id, run_id, False, {"experiment_id": None}, complete=False)
        await self.spool.write_catalog(self.entry_writes(entry))
        self.catalog.add_run(entry)
        return entry

    def client_run_uri(self, uri: object, experiment: str | None, run_id: str) -> str | None:
        """The artifact URI the client is given for a run the upstream described: through the agent
        whenever the upstream proxies artifacts (or is Azure ML, whose store only the agent reaches)."""
        if self.azureml or not isinstance(uri, str) or not uri:
            return default_run_uri(experiment or "0", run_id)
        return client_artifact_uri(uri, self.catalog, self.rest.base_url if self.rest is not None else None)

    def _entry_from_upstream(self, run_id: str, run: dict[str, Any]) -> RunEntry:
        info = dict(run.get("info") or {})
        upstream_id = str(info.get("run_id") or run_id)
        exp = info.get("experiment_id")
        info["experiment_id"] = self.catalog.client_experiment_id(str(exp)) if exp is not None else None
        info["artifact_uri"] = self.client_run_uri(info.get("artifact_uri"), info["experiment_id"], run_id)
        for key in ("run_id", "run_uuid"):
            info.pop(key, None)
        data = run.get("data") or {}
        params = {p["key"]: p.get("value", "") for p in data.get("params") or [] if isinstance(p, dict)}
        tags = {t["key"]: t.get("value", "") for t in data.get("tags") or [] if isinstance(t, dict)}
        return RunEntry(run_id, upstream_id, False, info, params=params, tags=tags, complete=True)

    def entry_writes(self, entry: RunEntry) -> list[CatalogWrite]:
        writes: list[CatalogWrite] = [entry.upsert()]
        writes.extend(ParamPut(entry.run_id, k, v) for k, v in entry.params.items())
        writes.extend(TagPut(entry.run_id, k, v) for k, v in entry.tags.items())
        return writes

    # --- runs/create --------------------------------------------------------------------------

    async def create_run(self, request: web.Request) -> web.Response:
        cr = validation.create_run(await self.read_body(request))
        experiment = self.catalog.experiment(cr.experiment_id)
        if experiment is not None and experiment.info.get("lifecycle_stage") == "deleted":
            raise invalid(f"The experiment {cr.experiment_id} must be in the 'active' state. "
                          "Current state is deleted.")
        tags = [list(t) for t in cr.tags]
        start_time = cr.start_time if cr.start_time is not None else int(time.time() * 1000)
        provisional_id = new_id()
        # Named here, not by the server: if the upstream's answer is lost, the name the client was
        # given must still be the one the run has upstream.
        run_name = cr.run_name or _tag(tags, "mlflow.runName") or generate_run_name()
        answer = await self._create_upstream_now(provisional_id, cr, run_name, tags, start_time)
        if answer is not None:
            return await self._created_upstream(cr, answer)
        entry, record = self.provisional_run(provisional_id, cr.experiment_id, run_name, user_id=cr.user_id,
                                             tags=tags, start_time=start_time)
        result = await self.spool.append([record], self.entry_writes(entry), source="http")
        self.catalog.add_run(entry)
        self.ledger.appended(result)
        log.info("run %s created provisionally (upstream %s)", provisional_id,
                 "not configured" if self.rest is None else "did not answer in time")
        return json_response(self.catalog.run_json(entry))

    @staticmethod
    def provisional_run(run_id: str, experiment_id: str, run_name: str, *, user_id: str | None,
                        tags: list[list[str]], start_time: int) -> tuple[RunEntry, Record]:
        """A run the agent answers for until the uploader creates it upstream: its entry and its create row."""
        tags = [list(t) for t in tags]
        if _tag(tags, "mlflow.runName") is None:
            tags.append(["mlflow.runName", run_name])
        info: dict[str, Any] = {
            "experiment_id": experiment_id,
            "run_name": run_name,
            "user_id": user_id or "",
            "status": "RUNNING",
            "start_time": start_time,
            "artifact_uri": default_run_uri(experiment_id, run_id),
            "lifecycle_stage": "active",
            HISTORY_KEPT: True,
        }
        entry = RunEntry(run_id, None, True, info, tags={k: v for k, v in tags}, complete=True)
        payload = {"experiment_id": experiment_id, "user_id": user_id, "run_name": run_name,
                   "start_time": start_time, "tags": tags}
        return entry, Record(run_id, Kind.CREATE_RUN, payload)

    async def _create_upstream_now(self, provisional_id: str, cr: validation.CreateRun, run_name: str,
                                   tags: list[list[str]], start_time: int) -> dict[str, Any] | None:
        """The bounded attempt: the upstream's answer, or None to go provisional."""
        if self.rest is None or self.resolver is None or self.rest.health.known_down:
            return None
        experiment = self.catalog.upstream_experiment_id(cr.experiment_id)
        if experiment is None:
            return None
        upstream_tags = []
        for key, value in tags:
            upstream_value: str | None = value
            if key in RUN_ID_TAGS and self.catalog.run(value) is not None:
                upstream_value = self.catalog.upstream_run_id(value)
                if upstream_value is None:
                    return None  # the parent is not upstream yet
            upstream_tags.append({"key": key, "value": upstream_value})
        # The idempotency key: if this answer is lost, the uploader finds the run by it.
        upstream_tags.append({"key": PROVISIONAL_TAG, "value": provisional_id})
        body: dict[str, Any] = {"experiment_id": experiment, "start_time": start_time, "tags": upstream_tags,
                                "run_name": run_name}
        if cr.user_id is not None:
            body["user_id"] = cr.user_id
        task = self.resolver.attempt_create_now(provisional_id, body)
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.create_run_timeout)
        except PermanentError as exc:
            raise MlflowApiError(exc.error_code or "BAD_REQUEST", exc.message) from exc
        except asyncio.TimeoutError:
            self.track(self._late_create(provisional_id, task))
            return None

    async def _late_create(self, provisional_id: str, task: asyncio.Task[dict[str, Any] | None]) -> None:
        """The upstream answered after the client got the provisional id: map it now."""
        try:
            answer = await task
        except Exception:
            return
        if answer is None or self.resolver is None:
            return
        entry = self.catalog.run(provisional_id)
        if entry is not None and entry.upstream_id is None:
            info = answer["run"]["info"]
            await self.resolver.mapped(provisional_id, str(info["run_id"]), info.get("artifact_uri"))

    async def _created_upstream(self, cr: validation.CreateRun, answer: dict[str, Any]) -> web.Response:
        run = answer["run"]
        real_id = str(run["info"]["run_id"])
        entry = self._entry_from_upstream(real_id, run)
        entry.info["experiment_id"] = cr.experiment_id
        entry.info[HISTORY_KEPT] = True  # created here: every point it gets passes through the agent
        entry.info["artifact_uri"] = self.client_run_uri(run["info"].get("artifact_uri"), cr.experiment_id, real_id)
        await self.spool.write_catalog(self.entry_writes(entry))
        self.catalog.add_run(entry)
        run["info"]["experiment_id"] = cr.experiment_id
        run["info"]["artifact_uri"] = entry.info["artifact_uri"]
        return json_response(answer)

    def track(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- reads --------------------------------------------------------------------------------

    async def get_run(self, request: web.Request) -> web.Response:
        run_id = validation.get_run(request.query)
        if self.before_lifecycle is not None:
            await self.before_lifecycle()  # what this process sent as datagrams is part of what it reads
        entry = self.catalog.run(run_id)
        upstream_id = self.catalog.upstream_run_id(run_id)
        if self.rest is None or upstream_id is None or (entry is not None and self.rest.health.known_down):
            return await self._local_run(run_id, entry)
        answer = await self.ask_upstream("GET", "runs/get", params={"run_id": upstream_id})
        if answer is None:
            return await self._local_run(run_id, entry)
        run = answer.get("run")
        if not isinstance(run, dict) or not isinstance(run.get("info"), dict):
            return await self._local_run(run_id, entry)
        if entry is None:
            entry = self._entry_from_upstream(run_id, run)
            await self.spool.write_catalog(self.entry_writes(entry))
            self.catalog.add_run(entry)
        await self.merged_run(run, entry)
        return json_response(answer)

    async def merged_run(self, run: dict[str, Any], entry: RunEntry) -> None:
        """An upstream run (``{"info", "data", "inputs", "outputs"}``) in the client's ids, with the writes
        this agent holds for it and has not uploaded yet. In place."""
        run_id = entry.run_id
        info = run["info"]
        info["run_id"] = info["run_uuid"] = run_id
        if entry.info.get("experiment_id") is not None:
            info["experiment_id"] = entry.info["experiment_id"]
        info["artifact_uri"] = self.client_run_uri(info.get("artifact_uri"), info.get("experiment_id"), run_id)
        data: dict[str, Any] = run["data"] if isinstance(run.get("data"), dict) else {}
        for tag in data.get("tags") or []:
            if isinstance(tag, dict) and tag.get("key") in RUN_ID_TAGS and isinstance(tag.get("value"), str):
                tag["value"] = self.catalog.client_run_id(tag["value"])
        reads.merge_lineage(run, entry, self.catalog)
        if info.get("lifecycle_stage") == "deleted":
            entry.info["lifecycle_stage"] = "deleted"
        if self.ledger.run_items(run_id):
            await self._recall_metrics(entry)
            # Writes not uploaded yet: the run's own fields as the client last set them, and its data.
            for key in ("status", "end_time", "run_name"):
                if entry.info.get(key) is not None:
                    info[key] = entry.info[key]
            deleted = await self.spool.pending_tag_deletes(run_id) if self.ledger.run_breakdown(run_id).get(
                "tag") else []
            run["data"] = reads.merge_run_data(data, entry, deleted)

    async def local_run(self, entry: RunEntry) -> dict[str, Any]:
        """What the agent knows of a run, in ``runs/get``'s shape (latest metric values read back)."""
        await self._recall_metrics(entry)
        run: dict[str, Any] = self.catalog.run_json(entry)["run"]
        return run

    async def get_metric_history(self, request: web.Request) -> web.StreamResponse:
        """Read-your-writes for metric history: the upstream's points plus those still in the spool.

        Runs with nothing of that metric in the spool (and follow-up pages) go to the upstream as they
        are. Otherwise the whole history is answered in one page: the upstream's pages, fetched here,
        merged with the spooled points."""
        query = request.query
        run_id = query.get("run_id") or query.get("run_uuid") or ""
        key = query.get("metric_key") or ""
        if self.before_lifecycle is not None:
            await self.before_lifecycle()  # what this process sent as datagrams is part of what it reads
        entry = self.catalog.run(run_id) if validation.is_valid_run_id(run_id) else None
        upstream_id = self.catalog.upstream_run_id(run_id) if entry is not None else None
        # A provisional run not created upstream yet: every point it has is here.
        local_only = entry is not None and upstream_id is None
        # A run the agent created keeps its delivered points too (until it ends): while that history is
        # whole, the upstream holds nothing this agent does not, and is not needed to answer.
        kept = entry is not None and bool(entry.info.get(HISTORY_KEPT))
        points: list[list[Any]] = []
        whole = False
        ours = entry is not None and key and (local_only or kept or self.ledger.run_breakdown(run_id).get("metric"))
        if ours and (query.get("page_token") or not _positive_int(query.get("max_results", "1"))):
            # Never a token of ours (the agent answers in one page), or a page size MLflow refuses.
            raise MlflowApiError("INVALID_PARAMETER_VALUE", "Invalid value for parameter 'page_token' or "
                                 f"'max_results' in get-history of run {run_id}")
        if ours and kept:
            points, whole = await self.spool.metric_history(run_id, key)
        elif ours:
            points = await self.spool.buffered_metric_points(run_id, key)
        upstream_down = self.rest is None or self.rest.health.known_down
        if not points and not (local_only and key):
            if whole and upstream_down:
                return json_response({})  # the key was never logged: MLflow's answer
            # Anything else (malformed requests included) is the upstream's to answer, as before.
            if self.forward is None:
                raise unavailable("mlflow-agent runs offline and holds no such metric history")
            return await self.forward(request)
        upstream: list[dict[str, Any]] = []
        if upstream_id is not None and self.rest is not None and not (whole and upstream_down):
            fetched = await self._history_upstream(upstream_id, key)
            if fetched is None and not whole:
                raise unavailable(f"mlflow-agent: the upstream is unreachable; it holds part of the history of "
                                  f"{key!r} for run {run_id}")
            upstream = fetched or []
        # else: a run the upstream has not seen yet (provisional), a run whose whole history is here while the
        # upstream is away, or an offline agent: all points are here
        return json_response({"metrics": reads.merge_history(upstream, points)})

    async def _history_upstream(self, upstream_id: str, key: str) -> list[dict[str, Any]] | None:
        """Every page of the upstream's history of one metric, or None when it does not answer."""
        points: list[dict[str, Any]] = []
        token: str | None = None
        for _ in range(_MAX_HISTORY_PAGES):
            params = {"run_id": upstream_id, "metric_key": key, "max_results": str(self.history_page_size)}
            if token:
                params["page_token"] = token
            answer = await self.ask_upstream("GET", "metrics/get-history", params=params, timeout=self.read_timeout)
            if answer is None:
                return None
            page = answer.get("metrics")
            if isinstance(page, list):
                points.extend(p for p in page if isinstance(p, dict))
            token = answer.get("next_page_token") or None
            if token is None:
                return points
        raise unavailable(f"mlflow-agent: the history of {key!r} has more than {_MAX_HISTORY_PAGES} pages upstream")

    async def _local_run(self, run_id: str, entry: RunEntry | None) -> web.Response:
        if entry is None or entry.info.get("experiment_id") is None:
            if self.rest is None:
                raise run_not_found(run_id)
            raise unavailable(f"mlflow-agent: the upstream is unreachable and run {run_id} is not known locally")
        await self._recall_metrics(entry)
        return json_response(self.catalog.run_json(entry))

    async def _recall_metrics(self, entry: RunEntry) -> None:
        """Latest metric values live in memory; after a restart they are read back from the spool once (the
        delivered ones too, for a run whose history the spool keeps)."""
        kept = bool(entry.info.get(HISTORY_KEPT))
        if entry.metrics_recalled or not (kept or self.ledger.run_breakdown(entry.run_id).get("metric")):
            return
        if kept:
            points, _ = await self.spool.metric_history(entry.run_id, None)
        else:
            points = await self.spool.buffered_metric_points(entry.run_id, None)
        for key, value, timestamp, step, *_ in points:
            self.catalog.note_metric(entry, key, value, timestamp, step)
        entry.metrics_recalled = True

    async def get_experiment_by_name(self, request: web.Request) -> web.Response:
        name = validation.experiment_name(request.query)
        local = self.catalog.experiment_by_name(name)
        if local is not None and local.provisional:
            return json_response({"experiment": self.catalog.experiment_json(local)})
        if self.rest is not None and not self.rest.health.known_down:
            answer = await self.ask_upstream("GET", "experiments/get-by-name", params={"experiment_name": name})
            if answer is not None:
                await self._remember_experiment(answer.get("experiment"))
                return json_response(answer)
        if local is not None:
            return json_response({"experiment": self.catalog.experiment_json(local)})
        raise MlflowApiError("RESOURCE_DOES_NOT_EXIST", f"Could not find experiment with name '{name}'")

    async def create_experiment(self, request: web.Request) -> web.Response:
        ce = validation.create_experiment(await self.read_body(request))
        local = self.catalog.experiment_by_name(ce.name)
        if local is not None and local.provisional:
            raise MlflowApiError("RESOURCE_ALREADY_EXISTS", f"Experiment(name={ce.name}) already exists.")
        if self.rest is not None and not self.rest.health.known_down:
            body: dict[str, Any] = {"name": ce.name}
            if ce.artifact_location is not None:
                body["artifact_location"] = ce.artifact_location
            if ce.tags:
                body["tags"] = [{"key": k, "value": v} for k, v in ce.tags]
            # If this create reaches the upstream but its answer does not, the name resolves it later.
            answer = await self.ask_upstream("POST", "experiments/create", body=body)
            if answer is not None:
                await self._remember_experiment({"experiment_id": answer.get("experiment_id"), "name": ce.name,
                                                 "lifecycle_stage": "active"})
                return json_response(answer)
        if local is not None:
            raise MlflowApiError("RESOURCE_ALREADY_EXISTS", f"Experiment(name={ce.name}) already exists.")
        entry = self.catalog.add_provisional_experiment(ce.name, ce.artifact_location, ce.tags)
        await self.spool.write_catalog([entry.upsert()])
        log.info("experiment %r created provisionally as %s", ce.name, entry.experiment_id)
        return json_response({"experiment_id": entry.experiment_id})

    async def get_experiment(self, request: web.Request) -> web.Response:
        eid = validation.experiment_id(request.query)
        local = self.catalog.experiment(eid)
        upstream_id = self.catalog.upstream_experiment_id(eid)
        if self.rest is not None and upstream_id is not None and not self.rest.health.known_down:
            answer = await self.ask_upstream("GET", "experiments/get", params={"experiment_id": upstream_id})
            if answer is not None:
                experiment = answer.get("experiment")
                if isinstance(experiment, dict):
                    await self._remember_experiment(dict(experiment))
                    experiment["experiment_id"] = eid
                return json_response(answer)
        if local is not None:
            return json_response({"experiment": self.catalog.experiment_json(local)})
        if self.rest is None:
            raise MlflowApiError("RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={eid} exists")
        raise unavailable(f"mlflow-agent: the upstream is unreachable and experiment {eid} is not known locally")

    async def ask_upstream(self, method: str, endpoint: str, *, params: dict[str, str] | None = None,
                           body: dict[str, Any] | None = None, timeout: float | None = None,
                           label: str | None = None) -> dict[str, Any] | None:
        """One bounded read-through call: the upstream's answer; its refusal, passed on to the client as
        MLflow's error; or None when it cannot answer in time (the caller answers from what it knows)."""
        assert self.rest is not None
        try:
            return await self.rest.call(method, endpoint, params=params, body=body,
                                        timeout=timeout or self.create_run_timeout, label=label)
        except PermanentError as exc:
            raise MlflowApiError(exc.error_code or "BAD_REQUEST", exc.message) from exc
        except UpstreamError:
            return None

    async def _remember_experiment(self, experiment: object) -> None:
        if isinstance(experiment, dict):
            write = self.catalog.remember_experiment(experiment)
            if write is not None:
                await self.spool.write_catalog([write])

    async def lifecycle_changed(self, endpoint: str, body: dict[str, Any]) -> None:
        """The upstream deleted or restored a run or an experiment the client asked to: remember it, so
        writes to a deleted run are refused here as MLflow refuses them."""
        stage = "deleted" if endpoint.endswith("delete") else "active"
        entries: list[RunEntry] = []
        if endpoint.startswith("runs/"):
            entry = self.catalog.run(str(body.get("run_id") or body.get("run_uuid") or ""))
            if entry is not None:
                entries.append(entry)
        else:
            eid = str(body.get("experiment_id") or "")
            experiment = self.catalog.experiment(eid)
            if experiment is not None:
                experiment.info["lifecycle_stage"] = stage
                await self.spool.write_catalog([experiment.upsert()])
            # MLflow moves an experiment's runs with it.
            entries.extend(e for e in self.catalog.runs.values() if e.info.get("experiment_id") == eid)
        for entry in entries:
            entry.info["lifecycle_stage"] = stage
        if entries:
            await self.spool.write_catalog([e.upsert() for e in entries])

    async def server_info(self, request: web.Request) -> web.Response:
        del request
        return json_response(SERVER_INFO)


def _tag(tags: list[list[str]], key: str) -> str | None:
    for k, v in tags:
        if k == key:
            return v
    return None
