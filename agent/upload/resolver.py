"""Provisional ids -> upstream ids: resolving experiments by name, creating runs and logged models
exactly once.

MLflow has no idempotency key for ``runs/create`` or ``logged-models`` create. The agent makes its own:
every run it creates upstream carries the tag ``mlflow_agent.provisional_run_id`` (a model,
``mlflow_agent.provisional_model_id``); before creating one again (after a lost answer, a crash or a
restart) it searches for that tag, so a retry finds the run or model instead of creating a twin.
Experiments have unique names, which makes them idempotent by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from agent.artifact_paths import UPSTREAM_ROOT, proxied_root
from agent.catalog import Catalog, ModelEntry, RunEntry
from agent.records import PROVISIONAL_MODEL_TAG, PROVISIONAL_TAG, RUN_ID_TAGS
from agent.spool.store import Spool
from agent.upload.retry import RetryPolicy
from agent.upstream.rest import MlflowRest, PermanentError, UpstreamError

log = logging.getLogger("agent.upload")


class Resolver:
    def __init__(self, catalog: Catalog, spool: Spool, rest: MlflowRest, retry: RetryPolicy) -> None:
        self.catalog = catalog
        self.spool = spool
        self.rest = rest
        self.retry = retry
        # provisional run or model id -> the create attempt ingest started (it may still answer late)
        self._attempts: dict[str, asyncio.Task[dict[str, Any] | None]] = {}
        self._experiment_locks: dict[str, asyncio.Lock] = {}
        self._mapped = asyncio.Condition()
        # Called whenever provisional ids may have been mapped (the artifact uploader looks again at once).
        self.on_mapped: Callable[[], None] | None = None

    # experiments ------------------------------------------------------------------------------

    async def experiment(self, client_id: str) -> str:
        """The upstream id of an experiment, resolving a provisional one by name (with retries)."""
        upstream = self.catalog.upstream_experiment_id(client_id)
        if upstream is not None:
            return upstream
        lock = self._experiment_locks.setdefault(client_id, asyncio.Lock())
        async with lock:
            upstream = self.catalog.upstream_experiment_id(client_id)
            if upstream is not None:
                return upstream
            entry = self.catalog.experiments[client_id]
            upstream = await self.retry.run(f"resolve experiment {entry.name!r}",
                                            lambda: self._find_or_create_experiment(client_id))
            await self.spool.write_catalog([self.catalog.map_experiment(client_id, upstream)])
            log.info("experiment %r resolved: %s -> %s", entry.name, client_id, upstream)
            return upstream

    async def _find_or_create_experiment(self, client_id: str) -> str:
        entry = self.catalog.experiments[client_id]
        found = await self._get_experiment_by_name(entry.name)
        if found is not None:
            return found
        body: dict[str, Any] = {"name": entry.name}
        if entry.info.get("artifact_location"):
            body["artifact_location"] = entry.info["artifact_location"]
        if entry.info.get("tags"):
            body["tags"] = entry.info["tags"]
        try:
            created = await self.rest.call("POST", "experiments/create", body=body)
        except PermanentError as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            # Created meanwhile (or our earlier answer was lost): the name identifies it.
            found = await self._get_experiment_by_name(entry.name)
            if found is None:
                raise
            return found
        return str(created["experiment_id"])

    async def _get_experiment_by_name(self, name: str) -> str | None:
        try:
            answer = await self.rest.call("GET", "experiments/get-by-name", params={"experiment_name": name})
        except PermanentError as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return str(answer["experiment"]["experiment_id"])

    # runs -------------------------------------------------------------------------------------

    def attempt_create_now(self, client_id: str, body: dict[str, Any], endpoint: str = "runs/create"
                           ) -> asyncio.Task[dict[str, Any] | None]:
        """Start the bounded create attempt (of a run, or a logged model) that ingest makes while the
        client waits.

        The task outlives the client's wait: if the upstream answers late, the id is mapped then, and
        the uploader (which awaits this task before its own attempt) does not create a twin.
        """
        task = asyncio.create_task(self._attempt(client_id, endpoint, body), name=f"create-{client_id}")
        self._attempts[client_id] = task
        task.add_done_callback(lambda t: self._forget_attempt(client_id, t))
        return task

    def _forget_attempt(self, run_id: str, task: asyncio.Task[dict[str, Any] | None]) -> None:
        self._attempts.pop(run_id, None)
        if not task.cancelled():
            task.exception()  # retrieved here; whoever awaits it sees it too

    async def _attempt(self, client_id: str, endpoint: str, body: dict[str, Any]) -> dict[str, Any] | None:
        # A late answer may still arrive after the client was given the provisional id: the request
        # gets its full upstream timeout; only the client's wait is bounded (by the caller).
        try:
            return await self.rest.call("POST", endpoint, body=body)
        except PermanentError:
            raise
        except UpstreamError as exc:
            log.debug("create attempt for %s failed: %s", client_id, exc)
            return None

    async def settle_attempt(self, client_id: str) -> None:
        task = self._attempts.get(client_id)
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    async def create_run(self, run_id: str, payload: dict[str, Any]) -> str:
        """Create a provisional run upstream (or find it, if an earlier attempt got there)."""
        await self.settle_attempt(run_id)
        entry = self.catalog.runs[run_id]
        if entry.upstream_id is not None:
            return entry.upstream_id
        experiment = await self.experiment(str(payload["experiment_id"]))
        tags = [[k, await self.translate_tag(k, v)] for k, v in payload.get("tags", [])]
        body: dict[str, Any] = {"experiment_id": experiment, "tags": [{"key": k, "value": v} for k, v in tags]}
        for key in ("user_id", "run_name", "start_time"):
            if payload.get(key) is not None:
                body[key] = payload[key]
        if not any(k == PROVISIONAL_TAG for k, _ in tags):
            body["tags"].append({"key": PROVISIONAL_TAG, "value": run_id})
        info = await self.retry.run(f"create run {run_id}", lambda: self._find_or_create_run(run_id, experiment, body))
        # Where its files go (the experiment may keep artifacts elsewhere than <experiment>/<run>/artifacts).
        root = proxied_root(info.get("artifact_uri"), self.rest.base_url)
        if root is not None:
            entry.info[UPSTREAM_ROOT] = root
        return str(info["run_id"])

    async def _find_or_create_run(self, run_id: str, experiment: str, body: dict[str, Any]) -> dict[str, Any]:
        """The upstream run's info: the one an earlier attempt created (found by its tag), or a new one."""
        found = await self.rest.call("POST", "runs/search", body={
            "experiment_ids": [experiment],
            "filter": f"tags.`{PROVISIONAL_TAG}` = '{run_id}'",
            "run_view_type": "ALL",
            "max_results": 1,
        })
        runs = found.get("runs") or []
        if runs:
            log.info("run %s already exists upstream as %s (an earlier answer was lost)", run_id,
                     runs[0]["info"]["run_id"])
            info: dict[str, Any] = runs[0]["info"]
            return info
        created = await self.rest.call("POST", "runs/create", body=body)
        created_info: dict[str, Any] = created["run"]["info"]
        return created_info

    async def mapped(self, run_id: str, upstream_id: str, artifact_uri: object = None) -> None:
        entry = self.catalog.runs[run_id]
        root = proxied_root(artifact_uri if isinstance(artifact_uri, str) else None, self.rest.base_url)
        if root is not None:
            entry.info[UPSTREAM_ROOT] = root
        await self.spool.write_catalog(self.catalog.map_run(run_id, upstream_id))
        await self.wake_waiters()

    async def model_mapped(self, model_id: str, upstream_id: str, artifact_uri: object = None) -> None:
        """A create attempt answered late: the provisional model is the upstream's ``upstream_id``."""
        entry = self.catalog.models[model_id]
        root = proxied_root(artifact_uri if isinstance(artifact_uri, str) else None, self.rest.base_url)
        if root is not None:
            entry.info[UPSTREAM_ROOT] = root
        await self.spool.write_catalog([self.catalog.map_model(model_id, upstream_id)])
        await self.wake_waiters()

    # logged models ----------------------------------------------------------------------------

    async def create_model(self, model_id: str, payload: dict[str, Any]) -> tuple[str, str | None]:
        """Create a provisional logged model upstream (or find the one an earlier attempt made): its
        upstream id and its artifact root under the upstream's artifact proxy (None if not proxied)."""
        await self.settle_attempt(model_id)
        entry = self.catalog.models[model_id]
        if entry.upstream_id is not None:
            root = entry.info.get(UPSTREAM_ROOT)
            return entry.upstream_id, root if isinstance(root, str) else None
        experiment = await self.experiment(str(payload["experiment_id"]))
        body: dict[str, Any] = {"experiment_id": experiment, "name": payload["name"],
                                "tags": [{"key": k, "value": v} for k, v in payload.get("tags", [])]}
        source = payload.get("source_run_id")
        if source:
            body["source_run_id"] = await self.upstream_run(str(source))
        if payload.get("model_type"):
            body["model_type"] = payload["model_type"]
        if payload.get("params"):
            body["params"] = [{"key": k, "value": v} for k, v in payload["params"]]
        if not any(t["key"] == PROVISIONAL_MODEL_TAG for t in body["tags"]):
            body["tags"].append({"key": PROVISIONAL_MODEL_TAG, "value": model_id})
        info = await self.retry.run(f"create logged model {model_id}",
                                    lambda: self._find_or_create_model(model_id, experiment, body))
        return str(info["model_id"]), proxied_root(info.get("artifact_uri"), self.rest.base_url)

    async def _find_or_create_model(self, model_id: str, experiment: str, body: dict[str, Any]) -> dict[str, Any]:
        found = await self.rest.call("POST", "logged-models/search", body={
            "experiment_ids": [experiment],
            "filter": f"tags.`{PROVISIONAL_MODEL_TAG}` = '{model_id}'",
            "max_results": 1,
        })
        models = found.get("models") or []
        if models and isinstance(models[0], dict) and isinstance(models[0].get("info"), dict):
            log.info("logged model %s already exists upstream as %s (an earlier answer was lost)", model_id,
                     models[0]["info"].get("model_id"))
            info: dict[str, Any] = models[0]["info"]
            return info
        created = await self.rest.call("POST", "logged-models", body=body)
        created_info: dict[str, Any] = created["model"]["info"]
        return created_info

    async def upstream_run(self, run_id: str) -> str:
        """The upstream id of a run, waiting while it is provisional and not created yet (a run whose
        creation was refused keeps its own id, which the upstream then refuses in turn)."""
        return await self._upstream_id(self.catalog.run(run_id), run_id)

    async def upstream_model(self, model_id: str) -> str:
        """The upstream id of a logged model, waiting while it is provisional and not created yet."""
        return await self._upstream_id(self.catalog.model(model_id), model_id)

    async def _upstream_id(self, entry: RunEntry | ModelEntry | None, client_id: str) -> str:
        if entry is None or not entry.provisional:
            return client_id
        async with self._mapped:
            await self._mapped.wait_for(lambda: entry.upstream_id is not None or entry.info.get("abandoned", False))
        return entry.upstream_id or client_id

    async def translate_tag(self, key: str, value: str) -> str:
        """Tags whose value is a run id (``mlflow.parentRunId``) must name the upstream run."""
        if key not in RUN_ID_TAGS:
            return value
        return await self.upstream_run(value)

    async def wake_waiters(self) -> None:
        """Ids were mapped (or given up on): whoever waits for an upstream id looks again."""
        async with self._mapped:
            self._mapped.notify_all()
        if self.on_mapped is not None:
            self.on_mapped()

    async def stop(self) -> None:
        for task in list(self._attempts.values()):
            task.cancel()
        for task in list(self._attempts.values()):
            with contextlib.suppress(BaseException):
                await task
