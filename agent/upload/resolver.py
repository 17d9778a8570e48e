"""Provisional ids -> upstream ids: resolving experiments by name and creating runs exactly once.

MLflow has no idempotency key for ``runs/create``. The agent makes its own: every run it creates
upstream carries the tag ``mlflow_agent.provisional_run_id``; before creating a run again (after a
lost answer, a crash or a restart) it looks for that tag, so a retry finds the run instead of
creating a twin. Experiments have unique names, which makes them idempotent by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from agent.catalog import Catalog
from agent.records import PROVISIONAL_TAG, RUN_ID_TAGS
from agent.spool.store import Spool
from agent.upload.retry import RetryPolicy
from agent.upstream.rest import MlflowRest, PermanentError, UpstreamError

log = logging.getLogger("agent.upload")


class RunRefNotReady(Exception):
    """A record names a provisional run that is not created upstream yet."""


class Resolver:
    def __init__(self, catalog: Catalog, spool: Spool, rest: MlflowRest, retry: RetryPolicy) -> None:
        self.catalog = catalog
        self.spool = spool
        self.rest = rest
        self.retry = retry
        # provisional run id -> the create attempt ingest started (it may still answer late)
        self._attempts: dict[str, asyncio.Task[dict[str, Any] | None]] = {}
        self._experiment_locks: dict[str, asyncio.Lock] = {}
        self._mapped = asyncio.Condition()

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

    def attempt_create_now(self, run_id: str, body: dict[str, Any]) -> asyncio.Task[dict[str, Any] | None]:
        """Start the bounded create-run attempt that ingest makes while the client waits.

        The task outlives the client's wait: if the upstream answers late, the run is mapped then,
        and the uploader (which awaits this task before its own attempt) does not create a twin.
        """
        task = asyncio.create_task(self._attempt(run_id, body), name=f"create-run-{run_id}")
        self._attempts[run_id] = task
        task.add_done_callback(lambda t: self._forget_attempt(run_id, t))
        return task

    def _forget_attempt(self, run_id: str, task: asyncio.Task[dict[str, Any] | None]) -> None:
        self._attempts.pop(run_id, None)
        if not task.cancelled():
            task.exception()  # retrieved here; whoever awaits it sees it too

    async def _attempt(self, run_id: str, body: dict[str, Any]) -> dict[str, Any] | None:
        # A late answer may still arrive after the client was given the provisional id: the request
        # gets its full upstream timeout; only the client's wait is bounded (by the caller).
        try:
            return await self.rest.call("POST", "runs/create", body=body)
        except PermanentError:
            raise
        except UpstreamError as exc:
            log.debug("create-run attempt for %s failed: %s", run_id, exc)
            return None

    async def settle_attempt(self, run_id: str) -> None:
        task = self._attempts.get(run_id)
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
        return await self.retry.run(f"create run {run_id}", lambda: self._find_or_create_run(run_id, experiment, body))

    async def _find_or_create_run(self, run_id: str, experiment: str, body: dict[str, Any]) -> str:
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
            return str(runs[0]["info"]["run_id"])
        created = await self.rest.call("POST", "runs/create", body=body)
        return str(created["run"]["info"]["run_id"])

    async def mapped(self, run_id: str, upstream_id: str) -> None:
        await self.spool.write_catalog(self.catalog.map_run(run_id, upstream_id))
        async with self._mapped:
            self._mapped.notify_all()

    async def translate_tag(self, key: str, value: str) -> str:
        """Tags whose value is a run id (``mlflow.parentRunId``) must name the upstream run."""
        if key not in RUN_ID_TAGS:
            return value
        entry = self.catalog.run(value)
        if entry is None or not entry.provisional:
            return value
        async with self._mapped:
            await self._mapped.wait_for(lambda: entry.upstream_id is not None or entry.info.get("abandoned", False))
        return entry.upstream_id or value

    async def wake_waiters(self) -> None:
        async with self._mapped:
            self._mapped.notify_all()

    async def stop(self) -> None:
        for task in list(self._attempts.values()):
            task.cancel()
        for task in list(self._attempts.values()):
            with contextlib.suppress(BaseException):
                await task
