"""Delivers the spool upstream: one worker per run with pending records, runs in parallel, one request
in flight per run (order), a bounded number of requests in flight overall.

Per run: create (if provisional) -> params/tags/metrics as log-batch -> runs/update, in arrival
order; a barrier row is sent only after everything before it landed. A logged model has a queue of
its own, worked the same way (its rows are all barriers; see ``agent.upload.models``). A permanent
refusal isolates the offending items by splitting the batch and dead-letters only those; a refusal of
the run itself (gone, deleted) dead-letters what is pending for that run. Nothing else ever blocks a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from typing import Any

from agent.catalog import HISTORY_KEPT, TERMINAL_STATUSES, Catalog
from agent.records import Kind, queued_model
from agent.spool.artifacts import ArtifactStore
from agent.spool.ledger import Ledger
from agent.spool.store import DeadLetter, Row, Spool, SpoolClosed
from agent.upload.batcher import MLFLOW_LIMITS, Barrier, Limits, LogBatch, Piece, next_operation
from agent.upload.models import LINEAGE_KINDS, ModelUploads
from agent.upload.resolver import Resolver
from agent.upload.retry import RetryPolicy
from agent.upstream.rest import MlflowRest, PermanentError, UpstreamError

log = logging.getLogger("agent.upload")

_ROWS_PER_READ = 1000


class Uploader:
    def __init__(
        self,
        *,
        spool: Spool,
        ledger: Ledger,
        catalog: Catalog,
        rest: MlflowRest,
        resolver: Resolver,
        retry: RetryPolicy,
        max_in_flight: int,
        linger: float,
        limits: Limits = MLFLOW_LIMITS,
        artifacts: ArtifactStore | None = None,
        azureml: bool = False,
        keep_history: bool = True,
    ) -> None:
        self.spool = spool
        self.ledger = ledger
        self.catalog = catalog
        self.rest = rest
        self.resolver = resolver
        self.retry = retry
        self.limits = limits
        self.linger = linger
        self._slots = asyncio.Semaphore(max_in_flight)
        self._dirty: set[str] = set()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._flush = asyncio.Event()  # set by drain(): stop lingering
        self._scheduler: asyncio.Task[None] | None = None
        self._experiments_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_send: dict[str, float] = {}
        self._params_sent: dict[str, int] = {}  # per run, for upstreams with a per-run cap
        self._param_cap_warned: set[str] = set()
        # Azure ML: no logged models, so metrics go without their model_id (and dataset) fields.
        self.azureml = azureml
        # Off for `sync`: nobody reads through it, so delivered metrics need not be kept.
        self.keep_history = keep_history
        self.models = ModelUploads(catalog=catalog, resolver=resolver, call=self._call, artifacts=artifacts,
                                   azureml=azureml)
        ledger.subscribe(self.notify)

    # lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        for run in self.ledger.runs():
            self._dirty.add(run)
        self._scheduler = asyncio.create_task(self._schedule(), name="upload-scheduler")
        self._experiments_task = asyncio.create_task(self._resolve_experiments(), name="upload-experiments")
        self._wake.set()

    def notify(self, run: str) -> None:
        """New records for ``run`` are durable."""
        self._dirty.add(run)
        self._wake.set()

    async def drain(self, timeout: float) -> bool:
        """Flush without lingering until nothing is pending or ``timeout`` passes. True if empty."""
        self.linger = 0.0
        self._flush.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ledger.total_items() == 0 and not self.catalog.pending_experiments():
                return True
            await asyncio.sleep(0.05)
        return self.ledger.total_items() == 0

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._scheduler, self._experiments_task) if t is not None]
        tasks.extend(self._workers.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, SpoolClosed):
                await t
        self._workers.clear()

    @property
    def active_runs(self) -> int:
        return len(self._workers)

    # scheduling -------------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            for run in list(self._dirty):
                if run not in self._workers:
                    self._workers[run] = asyncio.create_task(self._work(run), name=f"upload-{run}")

    async def _resolve_experiments(self) -> None:
        """Experiments created during an outage are resolved even if no run uses them."""
        while not self._stopping:
            for entry in self.catalog.pending_experiments():
                try:
                    await self.resolver.experiment(entry.experiment_id)
                except PermanentError as exc:
                    log.error("experiment %r cannot be created upstream: %s", entry.name, exc)
            await asyncio.sleep(1.0)

    async def _work(self, run: str) -> None:
        try:
            while not self._stopping:
                await self._linger(run)
                self._dirty.discard(run)
                rows = await self.spool.read_run(run, _ROWS_PER_READ)
                if not rows:
                    break
                if rows[0].corrupt is not None:
                    await self._dead_letter_row(run, rows[0], f"unreadable record in the spool: {rows[0].corrupt}")
                    continue
                rows = list(itertools.takewhile(lambda r: r.corrupt is None, rows))
                op = next_operation(rows, self.limits)
                if op is None:
                    break
                self._last_send[run] = time.monotonic()
                if isinstance(op, Barrier):
                    await self._barrier(run, op.row)
                else:
                    await self._log_batch(run, op)
        except asyncio.CancelledError:
            raise
        except SpoolClosed:
            return
        except Exception:
            # A bug must not stop the run's delivery for good: log it and try again later.
            log.exception("upload of run %s failed unexpectedly; retrying in 5 s", run)
            await asyncio.sleep(5.0)
            self._dirty.add(run)
        finally:
            self._workers.pop(run, None)
            if run in self._dirty and not self._stopping:
                self._wake.set()

    async def _linger(self, run: str) -> None:
        """Let small writes accumulate into one request, unless a full batch is already waiting."""
        if self.linger <= 0 or self.ledger.run_items(run) >= self.limits.max_items:
            return
        since = time.monotonic() - self._last_send.get(run, 0.0)
        if since < self.linger:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._flush.wait(), self.linger - since)

    async def _call(self, what: str, method: str, endpoint: str, body: dict[str, Any] | None,
                    label: str | None = None, *, params: dict[str, str] | None = None) -> dict[str, Any]:
        async def once() -> dict[str, Any]:
            async with self._slots:
                return await self.rest.call(method, endpoint, body=body, params=params, label=label)

        return await self.retry.run(what, once)

    # operations -------------------------------------------------------------------------------

    async def _upstream_run(self, run: str) -> str | None:
        upstream = self.catalog.upstream_run_id(run)
        if upstream is None:
            # Provisional, and its create row is gone without a mapping: it was dead-lettered.
            await self._dead_letter_run(run, None, None, "the run could not be created upstream")
        return upstream

    async def _barrier(self, run: str, row: Row) -> None:
        payload = row.payload
        assert isinstance(payload, dict)
        try:
            if row.kind.of_model or row.kind in LINEAGE_KINDS:
                writes = await self.models.send(run, row)
                self.ledger.acked(await self.spool.ack({row.seq: 1}, catalog=writes))
                if row.kind is Kind.CREATE_MODEL:
                    await self.resolver.wake_waiters()
                return
            if row.kind is Kind.CREATE_RUN:
                upstream_id = await self.resolver.create_run(run, payload)
                entry = self.catalog.runs[run]
                writes = self.catalog.map_run(run, upstream_id) if entry.upstream_id != upstream_id else []
                self.ledger.acked(await self.spool.ack({row.seq: 1}, catalog=writes))
                await self.resolver.wake_waiters()
                log.info("run %s created upstream as %s", run, upstream_id)
                return
            upstream = await self._upstream_run(run)
            if upstream is None:
                return
            if row.kind is Kind.UPDATE_RUN:
                body = {"run_id": upstream, **payload}
                await self._call(f"update run {run}", "POST", "runs/update", body)
                if payload.get("status") in TERMINAL_STATUSES and self._keeps_history(run):
                    self.ledger.acked(await self.spool.ack({row.seq: 1}))
                    entry = self.catalog.runs[run]
                    entry.info.pop(HISTORY_KEPT, None)  # it ended: its history is the upstream's to keep
                    await self.spool.forget_history(run, [entry.upsert()])
                    return
            elif row.kind is Kind.DELETE_TAG:
                try:
                    await self._call(f"delete tag of {run}", "POST", "runs/delete-tag",
                                     {"run_id": upstream, "key": payload["key"]})
                except PermanentError as exc:
                    # Already gone (an earlier answer was lost, or it never reached upstream).
                    if exc.error_code != "RESOURCE_DOES_NOT_EXIST" or "No tag" not in exc.message:
                        raise
            self.ledger.acked(await self.spool.ack({row.seq: 1}))
        except PermanentError as exc:
            if row.kind in (Kind.CREATE_RUN, Kind.CREATE_MODEL) or _run_refused(exc):
                await self._dead_letter_run(run, exc.status, exc.error_code, exc.message)
            else:
                letter = DeadLetter(row.seq, payload, 1, exc.status, exc.error_code, exc.message)
                self.ledger.acked(await self.spool.ack({row.seq: 1}, dead=[letter]))
                log.error("upstream refused %s of run %s: %s", row.kind.name.lower(), run, exc)
        except UpstreamError as exc:  # retry deadline exceeded
            await self._dead_letter_run(run, exc.status, exc.error_code, f"gave up retrying: {exc.message}")

    async def _log_batch(self, run: str, batch: LogBatch) -> None:
        upstream = await self._upstream_run(run)
        if upstream is None:
            return
        dead: list[DeadLetter] = []
        progress = batch.progress()
        with self.spool.in_flight(progress):  # drop_oldest must not evict what may already be upstream
            translated = await self._translate(self._within_param_cap(run, batch, dead))
            try:
                await self._deliver(run, upstream, translated, dead)
            except PermanentError as exc:  # the run itself is refused
                await self._dead_letter_run(run, exc.status, exc.error_code, exc.message)
                return
            except UpstreamError as exc:  # retry deadline exceeded
                await self._dead_letter_run(run, exc.status, exc.error_code, f"gave up retrying: {exc.message}")
                return
            self.ledger.acked(await self.spool.ack(progress, dead=dead, keep=self._keeps_history(run)))
        self._params_sent[run] = self._params_sent.get(run, 0) + sum(
            1 for p in translated.pieces if p.kind is Kind.PARAMS and p.send)
        if dead:
            log.error("upstream refused %d record(s) of run %s; see the dead-letter table", len(dead), run)

    def _within_param_cap(self, run: str, batch: LogBatch, dead: list[DeadLetter]) -> LogBatch:
        """Params past the upstream's per-run cap go to the dead-letter table with the reason, not upstream."""
        cap = self.limits.max_params_per_run
        if cap is None:
            return batch
        sent = self._params_sent.get(run, 0)
        kept = []
        for piece in batch.pieces:
            if piece.kind is Kind.PARAMS and piece.send:
                if sent >= cap:
                    if run not in self._param_cap_warned:
                        self._param_cap_warned.add(run)
                        log.warning("run %s crossed the upstream's limit of %d params; further params are "
                                    "dead-lettered", run, cap)
                    dead.append(DeadLetter(piece.seq, [piece.item], 1, None, "PARAMS_LIMIT",
                                           f"the upstream keeps at most {cap} params per run"))
                    continue
                sent += 1
            kept.append(piece)
        return LogBatch(kept)

    async def _translate(self, batch: LogBatch) -> LogBatch:
        pieces = []
        for piece in batch.pieces:
            if piece.kind is Kind.TAGS:
                value = await self.resolver.translate_tag(piece.item[0], piece.item[1])
                if value != piece.item[1]:
                    piece = dataclasses.replace(piece, item=[piece.item[0], value])  # noqa: PLW2901
            elif piece.kind is Kind.METRICS and len(piece.item) > 4 and isinstance(piece.item[4], dict):
                piece = await self._translate_extras(piece)  # noqa: PLW2901
            pieces.append(piece)
        return LogBatch(pieces)

    async def _translate_extras(self, piece: Piece) -> Piece:
        """A metric logged for a model names the upstream's model id (Azure ML: no model fields at all)."""
        extras = piece.item[4]
        if self.azureml:
            return dataclasses.replace(piece, item=piece.item[:4])
        model_id = extras.get("model_id")
        if not isinstance(model_id, str):
            return piece
        upstream = await self.resolver.upstream_model(model_id)
        if upstream == model_id:
            return piece
        return dataclasses.replace(piece, item=[*piece.item[:4], dict(extras, model_id=upstream)])

    async def _deliver(self, run: str, upstream: str, batch: LogBatch, dead: list[DeadLetter]) -> None:
        """Send a batch; on a permanent refusal, bisect to dead-letter exactly the refused items."""
        if batch.sent_count == 0:
            return
        try:
            await self._call(f"log-batch for run {run}", "POST", "runs/log-batch", batch.body(upstream))
            self.rest.metrics.upload_batch_records.observe(batch.sent_count)
        except PermanentError as exc:
            if _run_refused(exc):
                raise
            if batch.sent_count == 1:
                for p in batch.pieces:
                    if p.send:
                        dead.append(DeadLetter(p.seq, [p.item], 1, exc.status, exc.error_code, exc.message))
                return
            first, second = batch.split()
            await self._deliver(run, upstream, first, dead)
            await self._deliver(run, upstream, second, dead)

    def _keeps_history(self, run: str) -> bool:
        """Runs the agent created keep their delivered metrics until they end: their whole history can
        then be read through the agent while the upstream is away (``log_model`` reads it)."""
        entry = self.catalog.run(run)
        return self.keep_history and bool(entry is not None and entry.info.get(HISTORY_KEPT))

    async def _dead_letter_row(self, run: str, row: Row, message: str) -> None:
        letter = DeadLetter(row.seq, row.payload, row.n - row.done, None, None, message)
        self.ledger.acked(await self.spool.ack({row.seq: row.n}, dead=[letter], keep=self._keeps_history(run)))
        log.error("run %s: %s; moved to the dead-letter table", run, message)

    async def _dead_letter_run(self, run: str, status: int | None, code: str | None, message: str) -> None:
        result = await self.spool.dead_letter_run(run, status, code, message)
        self.ledger.acked(result)
        model_id = queued_model(run)
        entry = self.catalog.model(model_id) if model_id is not None else self.catalog.run(run)
        if entry is not None and entry.upstream_id is None:
            entry.info["abandoned"] = True  # whoever waits for its upstream id stops waiting
            await self.resolver.wake_waiters()
        count = sum(c.items for c in result.dead)
        log.error("upstream refused run %s: %s; %d record(s) moved to the dead-letter table", run, message, count)


def _run_refused(exc: PermanentError) -> bool:
    """The refusal is about the run (missing or deleted), not about the items in the request."""
    if exc.error_code == "RESOURCE_DOES_NOT_EXIST" and "No tag" not in exc.message:
        return True
    return "must be in the 'active' state" in exc.message
