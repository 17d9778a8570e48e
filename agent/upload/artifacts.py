"""Artifacts leave: each file the ArtifactStore holds goes to the upstream, oldest first, a few at a time,
retried like every upload, and is forgotten locally only once the upstream has it.

Where it goes depends on the upstream: an MLflow server's own artifact proxy (``PUT /api/2.0/mlflow-
artifacts/artifacts/<path>``), or Azure ML's run history and blob storage (``agent.upstream.azure_artifacts``).
A file of a run or model not created upstream yet waits for it, without holding up the others. Two
uploads of one path keep their order; when a newer one is already held, the older one is never sent
(it would be overwritten, and Azure ML refuses a second upload of a path). A file the upstream refuses
for good is moved to ``artifacts/dead/`` with the reason and counted: never dropped silently, never
retried forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from pathlib import Path
from typing import Protocol

from agent.artifact_paths import (
    AzureArtifactTarget,
    NotAnArtifactPath,
    azure_artifact_target,
    given_up_owner,
    upstream_artifact_path,
)
from agent.catalog import Catalog
from agent.ops.metrics import AgentMetrics
from agent.spool.artifacts import Artifact, ArtifactStore
from agent.upload.retry import RetryPolicy
from agent.upstream.azure_artifacts import AzureArtifacts
from agent.upstream.rest import MlflowRest, PermanentError, UpstreamError

log = logging.getLogger("agent.artifacts")

_RECHECK = 1.0  # how often waiting files are looked at again without a nudge
UPLOADS_IN_FLIGHT = 4  # files sent at once: small files are round trips, large ones share the link


class ArtifactSink(Protocol):
    """Where files go: ``target`` names the upstream place (None: not yet; raises PermanentError when there
    is none), ``put`` sends one file there once (the uploader retries)."""

    def target(self, path: str) -> object | None: ...

    async def put(self, target: object, data: Path, size: int, content_type: str) -> None: ...


def _refuse_given_up(path: str, catalog: Catalog) -> None:
    owner = given_up_owner(path, catalog)
    if owner is not None:
        raise PermanentError(f"{owner} could not be created upstream (see the dead-letter table)")


class MlflowArtifactSink:
    """An MLflow server's artifact proxy, the same layout with the upstream's ids."""

    def __init__(self, rest: MlflowRest, catalog: Catalog) -> None:
        self.rest = rest
        self.catalog = catalog

    def target(self, path: str) -> object | None:
        _refuse_given_up(path, self.catalog)
        return upstream_artifact_path(path, self.catalog)

    async def put(self, target: object, data: Path, size: int, content_type: str) -> None:
        assert isinstance(target, str)
        await self.rest.put_artifact(target, data, content_type, size)


class AzureArtifactSink:
    """Azure ML: run history and blob storage."""

    def __init__(self, azure: AzureArtifacts, catalog: Catalog) -> None:
        self.azure = azure
        self.catalog = catalog

    def target(self, path: str) -> object | None:
        _refuse_given_up(path, self.catalog)
        try:
            return azure_artifact_target(path, self.catalog)
        except NotAnArtifactPath as exc:
            raise PermanentError(f"Azure ML keeps artifacts per run only: {exc}") from exc

    async def put(self, target: object, data: Path, size: int, content_type: str) -> None:
        assert isinstance(target, AzureArtifactTarget)
        await self.azure.upload(target, data, size, content_type)


class ArtifactUploader:
    def __init__(self, *, store: ArtifactStore, sink: ArtifactSink, retry: RetryPolicy, metrics: AgentMetrics,
                 in_flight: int = UPLOADS_IN_FLIGHT) -> None:
        self.store = store
        self.sink = sink
        self.retry = retry
        self.metrics = metrics
        self.in_flight = in_flight
        self._task: asyncio.Task[None] | None = None
        self._uploads: dict[str, asyncio.Task[None]] = {}  # artifact id -> its upload
        self._busy_paths: set[str] = set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="artifact-uploader")

    def nudge(self) -> None:
        """Something files may wait for happened (a run or model was created upstream): look again now."""
        self.store.changed.set()

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._uploads.values()) if t is not None]
        self._task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._uploads.clear()

    async def _run(self) -> None:
        while True:
            self.store.changed.clear()
            for artifact in self.store.pending():
                if len(self._uploads) >= self.in_flight:
                    break
                if artifact.id in self._uploads or artifact.path in self._busy_paths:
                    continue  # one upload of a path at a time, in the order they came
                newest = self.store.latest(artifact.path)
                if newest is not None and newest.id != artifact.id:
                    await self.store.done(artifact)
                    self.metrics.artifacts.labels(result="superseded").inc()
                    continue
                try:
                    target = self.sink.target(artifact.path)
                except PermanentError as exc:
                    await self._bury(artifact, str(exc))
                    continue
                if target is None:
                    continue  # its run or model is not created upstream yet
                self._busy_paths.add(artifact.path)
                task = asyncio.create_task(self._upload(artifact, target), name=f"artifact-{artifact.id}")
                self._uploads[artifact.id] = task
                task.add_done_callback(functools.partial(self._finished, artifact))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.store.changed.wait(), _RECHECK)

    def _finished(self, artifact: Artifact, _: asyncio.Task[None]) -> None:
        self._uploads.pop(artifact.id, None)
        self._busy_paths.discard(artifact.path)
        self.store.changed.set()  # a slot is free: look again at once

    async def _upload(self, artifact: Artifact, target: object) -> None:
        data = self.store.data_path(artifact)

        async def once() -> None:
            await self.sink.put(target, data, artifact.size, artifact.content_type)

        try:
            await self.retry.run(f"artifact upload {artifact.path}", once)
        except PermanentError as exc:
            await self._bury(artifact, str(exc))
            return
        except UpstreamError as exc:  # the retry deadline passed
            await self._bury(artifact, f"gave up retrying: {exc}")
            return
        await self.store.done(artifact)
        self.metrics.artifacts.labels(result="uploaded").inc()
        self.metrics.artifact_bytes.labels(result="uploaded").inc(artifact.size)

    async def _bury(self, artifact: Artifact, reason: str) -> None:
        await self.store.dead(artifact, reason)
        self.metrics.artifacts.labels(result="dead_lettered").inc()
        log.error("artifact %s not uploaded: %s; kept in %s", artifact.path, reason, self.store.dead_dir)
