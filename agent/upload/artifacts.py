"""Artifacts leave: each file the ArtifactStore holds is PUT to the upstream's mlflow-artifacts endpoint,
oldest first, retried like every upload, and forgotten locally only once the upstream answered 200.

A file of a run not created upstream yet (a provisional id in its path) waits for the run. A file the
upstream refuses for good (a 4xx other than 401/403/408/429) is moved to ``artifacts/dead/`` with the reason
and counted: never dropped silently, never retried forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from agent.catalog import Catalog
from agent.ops.metrics import AgentMetrics
from agent.spool.artifacts import Artifact, ArtifactStore
from agent.upload.retry import RetryPolicy
from agent.upstream.rest import MlflowRest, PermanentError, UpstreamError

log = logging.getLogger("agent.artifacts")

_RECHECK = 1.0  # how often files waiting for their run's creation are looked at again


def upstream_artifact_path(path: str, catalog: Catalog) -> str | None:
    """The path with provisional experiment and run ids replaced by the upstream's; None while one of
    them is not created upstream yet."""
    out = []
    for segment in path.split("/"):
        run = catalog.runs.get(segment)
        experiment = catalog.experiments.get(segment)
        if run is not None and run.provisional:
            upstream = catalog.upstream_run_id(segment)
        elif experiment is not None and experiment.provisional:
            upstream = catalog.upstream_experiment_id(segment)
        else:
            upstream = segment
        if upstream is None:
            return None
        out.append(upstream)
    return "/".join(out)


class ArtifactUploader:
    def __init__(self, *, store: ArtifactStore, rest: MlflowRest, catalog: Catalog, retry: RetryPolicy,
                 metrics: AgentMetrics) -> None:
        self.store = store
        self.rest = rest
        self.catalog = catalog
        self.retry = retry
        self.metrics = metrics
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="artifact-uploader")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            self.store.changed.clear()
            for artifact in self.store.pending():
                target = upstream_artifact_path(artifact.path, self.catalog)
                if target is None:
                    continue  # its run or experiment is not created upstream yet
                await self._upload(artifact, target)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.store.changed.wait(), _RECHECK)

    async def _upload(self, artifact: Artifact, target: str) -> None:
        data = self.store.data_path(artifact)

        async def once() -> None:
            await self.rest.put_artifact(target, data, artifact.content_type, artifact.size)

        try:
            await self.retry.run(f"artifact upload {artifact.path}", once)
        except PermanentError as exc:
            await self.store.dead(artifact, str(exc))
            self.metrics.artifacts.labels(result="dead_lettered").inc()
            log.error("upstream refused artifact %s: %s; kept in %s", artifact.path, exc, self.store.dead_dir)
            return
        except UpstreamError as exc:  # the retry deadline passed
            await self.store.dead(artifact, f"gave up retrying: {exc}")
            self.metrics.artifacts.labels(result="dead_lettered").inc()
            log.error("gave up uploading artifact %s: %s; kept in %s", artifact.path, exc, self.store.dead_dir)
            return
        await self.store.done(artifact)
        self.metrics.artifacts.labels(result="uploaded").inc()
        self.metrics.artifact_bytes.labels(result="uploaded").inc(artifact.size)
