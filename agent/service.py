"""The agent: builds the pipeline from Settings and owns every component's start and stop.

    sources (HTTP API, proxy)  ->  spool (SQLite) + ledger + catalog  ->  upload (uploader)  ->  upstream

Start order is spool, upstream client, uploader, HTTP; stop is the reverse, with a bounded drain
of the spool in between so a SIGTERM leaves as little as possible behind (and loses nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent import __version__
from agent.catalog import HISTORY_KEPT, Catalog
from agent.config import Settings
from agent.errors import MlflowApiError
from agent.ops.health import OpsEndpoints
from agent.ops.metrics import AgentMetrics
from agent.ops.notify import NOTIFY_VARIABLES, SystemdNotifier
from agent.records import queued_model
from agent.sources.artifacts import ArtifactsApi
from agent.sources.datagram import DatagramSource
from agent.sources.mlflow_api import MlflowApi, error_response
from agent.sources.models import ModelsApi
from agent.sources.proxy import AZUREML_MAX_RESULTS, Proxy
from agent.sources.run_search import RunSearch
from agent.spool.artifacts import ArtifactStore
from agent.spool.ledger import Ledger
from agent.spool.store import Spool
from agent.upload.artifacts import ArtifactSink, ArtifactUploader, AzureArtifactSink, MlflowArtifactSink
from agent.upload.batcher import AZUREML_LIMITS, MLFLOW_LIMITS
from agent.upload.resolver import Resolver
from agent.upload.retry import RetryPolicy
from agent.upload.uploader import Uploader
from agent.upstream.azure_artifacts import AzureArtifacts
from agent.upstream.base import UpstreamProvider
from agent.upstream.renewing import RenewingUpstream, TokenSource
from agent.upstream.rest import AuthError, MlflowRest
from agent.upstream.static import StaticUpstream, tls_from_env
from agent.upstream.token_sources import TokenCommandSource, TokenFileSource
from agent.upstream.workspace import ArmResolvedUpstream

if TYPE_CHECKING:
    from agent.upstream.azureml import AzureWorkspace, WorkspaceRef

log = logging.getLogger("agent")

_OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_MAINTENANCE_INTERVAL = 30.0
# A run that got nothing delivered for this long (its process gone without ending it) stops keeping its
# delivered metrics as local history.
HISTORY_MAX_AGE = 24 * 3600.0
_PROBE_INTERVAL = 30.0  # an idle agent asks the upstream this often whether it answers
_STATUS_IDLE_RUNS = 100  # /status lists every run with records waiting, and this many idle ones


class Agent:
    def __init__(self, settings: Settings, *, env: Mapping[str, str] | None = None, ingest: bool = True) -> None:
        self.settings = settings
        self.env = dict(os.environ if env is None else env)
        self.ingest = ingest
        self.metrics = AgentMetrics()
        self.catalog = Catalog()
        self.spool = Spool(settings.spool_dir, max_bytes=settings.spool_max_bytes,
                           overflow_policy=settings.overflow_policy, sync_full=settings.spool_sync == "full")
        self.ledger = Ledger(self.metrics)
        self.artifacts = ArtifactStore(settings.spool_dir, max_bytes=settings.artifact_max_bytes)
        self.artifact_uploader: ArtifactUploader | None = None
        self.rest: MlflowRest | None = None
        self.uploader: Uploader | None = None
        self.resolver: Resolver | None = None
        self.api: MlflowApi | None = None
        self.proxy: Proxy | None = None
        self.datagrams: DatagramSource | None = None
        self._runner: web.AppRunner | None = None
        self._ops_runner: web.AppRunner | None = None
        self.bound_ops_port: int | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self.bound_port: int | None = None
        self.draining = False
        self.dead_letters_at_start = 0
        self._stopped = asyncio.Event()

    # lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self.metrics.spool_limit_bytes.set(s.spool_max_bytes)
        loaded = await self.spool.open()
        if loaded.quarantined is not None:
            self.metrics.spool_quarantined.inc()
        self.catalog.load(loaded)
        self.dead_letters_at_start = loaded.dead_letters
        if not s.offline:
            workspace: WorkspaceRef | None = None
            if s.azureml_config is not None:  # a small file, but file I/O: off the event loop
                from agent.upstream.workspace import read_workspace_config

                workspace = await asyncio.to_thread(read_workspace_config, s.azureml_config)
            self.rest = MlflowRest(self._provider(workspace), self.metrics, request_timeout=s.request_timeout)
            await self.rest.start()
            retry = RetryPolicy(self.metrics, initial=s.retry_initial_backoff, maximum=s.retry_max_backoff,
                                deadline=s.retry_deadline, on_auth_error=self._renew_credentials)
            self.resolver = Resolver(self.catalog, self.spool, self.rest, retry)
            self.uploader = Uploader(spool=self.spool, ledger=self.ledger, catalog=self.catalog, rest=self.rest,
                                     resolver=self.resolver, retry=retry, max_in_flight=s.upload_max_in_flight,
                                     linger=s.upload_linger, limits=AZUREML_LIMITS if self.azureml else MLFLOW_LIMITS,
                                     artifacts=self.artifacts, azureml=self.azureml, keep_history=self.ingest)
        self.ledger.loaded(loaded.pending)
        artifacts_waiting = await self.artifacts.open()
        if self.uploader is not None:
            await self.uploader.start()
        if self.rest is not None:
            sink: ArtifactSink = (AzureArtifactSink(AzureArtifacts(self.rest), self.catalog) if self.azureml
                                  else MlflowArtifactSink(self.rest, self.catalog))
            self.artifact_uploader = ArtifactUploader(store=self.artifacts, sink=sink, retry=retry,
                                                      metrics=self.metrics)
            if self.resolver is not None:
                self.resolver.on_mapped = self.artifact_uploader.nudge
            await self.artifact_uploader.start()
        if artifacts_waiting:
            log.info("%d artifact file(s) wait for upload", artifacts_waiting)
        pending = self.ledger.total_items()
        log.info("spool %s opened: %d record(s) pending in %d run(s)", self.spool.path, pending,
                 len(self.ledger.runs()), extra={"pending": pending})
        if self.ingest:
            await self._start_http()
        self._maintenance = asyncio.create_task(self._maintain(), name="spool-maintenance")
        if self.rest is not None:
            self._probe = asyncio.create_task(self._watch_upstream(self.rest), name="upstream-probe")

    @property
    def azureml(self) -> bool:
        return self.settings.azureml

    def _provider(self, workspace: WorkspaceRef | None = None) -> UpstreamProvider:
        """Where the upstream's credentials come from: a token file, a token command, Azure, or static ones."""
        s = self.settings
        source: TokenSource | None = None
        if s.token_file is not None:
            source = TokenFileSource(s.token_file)
        elif s.token_command is not None:
            source = TokenCommandSource(s.token_command)
        if workspace is not None:
            from agent.upstream.workspace import CACHE_NAME, ArmWorkspaceLocator

            # No run token here: it cannot call ARM. An explicit token file or command still wins.
            ssl_context = tls_from_env(self.env)
            locator = ArmWorkspaceLocator(workspace, arm_endpoint=s.azure_arm_endpoint,
                                          cache_path=s.spool_dir / CACHE_NAME, ssl=ssl_context)
            inner = RenewingUpstream("", source or self._azure_credential(), self.metrics, ssl_context=ssl_context)
            return ArmResolvedUpstream(inner, locator)
        assert s.upstream is not None
        base_url = s.upstream
        if self.azureml:
            from agent.upstream.azureml import parse_azureml_uri

            workspace = parse_azureml_uri(s.upstream)
            base_url = workspace.base_url  # https://<host>/mlflow/v2.0/subscriptions/.../workspaces/<ws>
            if source is None:  # inside a job, the job's own run token
                source = self._azure_credential(workspace)
        if source is None:
            return StaticUpstream(base_url, self.env)
        return RenewingUpstream(base_url, source, self.metrics, ssl_context=tls_from_env(self.env))

    def _azure_credential(self, job_workspace: AzureWorkspace | None = None) -> TokenSource:
        from agent.upstream.azureml import azure_token_source

        return azure_token_source(self.env, job_workspace=job_workspace, credential=self.settings.azure_credential,
                                  arm_endpoint=self.settings.azure_arm_endpoint)

    async def _start_http(self) -> None:
        s = self.settings
        app = web.Application(client_max_size=s.max_request_bytes, middlewares=[self._guard_middleware()])
        self.api = MlflowApi(catalog=self.catalog, spool=self.spool, ledger=self.ledger, metrics=self.metrics,
                             rest=self.rest, resolver=self.resolver, create_run_timeout=s.create_run_timeout)
        self.proxy = Proxy(self.rest, self.catalog, read_timeout=max(s.request_timeout, 60.0))
        self.proxy.lifecycle_hook = self.api.lifecycle_changed
        self.proxy.azureml = self.azureml
        self.api.forward = self.proxy.handle
        self.api.read_timeout = max(s.request_timeout, 60.0)
        if self.azureml:
            self.api.history_page_size = AZUREML_MAX_RESULTS
            self.api.azureml = True
        await self.proxy.start()
        ops = OpsEndpoints(self.metrics, self.status, self.readiness, self._refresh_gauges)
        ops.add_routes(app)
        self.api.add_routes(app)
        ModelsApi(self.api).add_routes(app)
        RunSearch(self.api).add_routes(app)
        azure = AzureArtifacts(self.rest) if self.azureml and self.rest is not None else None
        ArtifactsApi(store=self.artifacts, catalog=self.catalog, metrics=self.metrics, rest=self.rest,
                     forward=self.proxy.forward_to, read_timeout=s.create_run_timeout, azure=azure).add_routes(app)
        app.router.add_route("*", "/{tail:.*}", self.proxy.handle)
        if s.udp is not None or s.uds is not None:
            self.datagrams = DatagramSource(ingest=self.api.ingest, catalog=self.catalog, metrics=self.metrics,
                                            udp=s.udp, uds=s.uds, uds_mode=s.uds_mode, rcvbuf=s.udp_rcvbuf)
            await self.datagrams.start()
            self.api.before_lifecycle = self.datagrams.drain_now
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.http.host, s.http.port, reuse_address=True)
        await site.start()
        addresses = self._runner.addresses  # the real port when --http asked for port 0
        self.bound_port = int(addresses[0][1]) if addresses else s.http.port
        log.info("listening on http://%s:%s (upstream: %s)", s.http.host, self.bound_port, s.upstream_text)
        if s.ops_http is not None:
            # Probes and scrapers only: no ingest routes and no /status (it names runs), so no token and
            # no host check are needed.
            ops_app = web.Application(client_max_size=4096)
            ops.add_routes(ops_app, with_status=False)
            self._ops_runner = web.AppRunner(ops_app, access_log=None, handle_signals=False)
            await self._ops_runner.setup()
            await web.TCPSite(self._ops_runner, s.ops_http.host, s.ops_http.port, reuse_address=True).start()
            ops_addresses = self._ops_runner.addresses
            self.bound_ops_port = int(ops_addresses[0][1]) if ops_addresses else s.ops_http.port
            log.info("health and metrics also on http://%s:%s", s.ops_http.host, self.bound_ops_port)

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests, then upload what is spooled for up to ``timeout`` seconds."""
        self.draining = True
        if self.datagrams is not None:
            await self.datagrams.stop()  # commits what the sockets still hold
        if self._runner is not None:
            # Closing the listener refuses new connections; requests in flight finish first.
            for site in list(self._runner.sites):
                await site.stop()
        if self.uploader is None:
            return self.ledger.total_items() == 0 and not self.artifacts.pending()
        pending = self.ledger.total_items()
        if pending:
            log.info("draining %d record(s) to the upstream (up to %.0f s)", pending, timeout)
        deadline = time.monotonic() + timeout
        drained = await self.uploader.drain(timeout)
        if self.artifact_uploader is not None:  # it kept going meanwhile; give it what is left of the time
            await self.artifacts.wait_empty(deadline - time.monotonic())
        return drained and not self.artifacts.pending()

    async def stop(self) -> None:
        for task in (self._maintenance, self._probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.datagrams is not None:
            await self.datagrams.stop()
        if self.api is not None:
            await self.api.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._ops_runner is not None:  # last: probes and scrapes see the drain through
            await self._ops_runner.cleanup()
        if self.proxy is not None:
            await self.proxy.stop()
        if self.artifact_uploader is not None:
            await self.artifact_uploader.stop()
        if self.uploader is not None:
            await self.uploader.stop()
        if self.resolver is not None:
            await self.resolver.stop()
        if self.rest is not None:
            await self.rest.stop()
        left = self.ledger.total_items()
        await self.spool.close()
        if left:
            log.info("stopped with %d record(s) kept in the spool for the next start or `sync`", left,
                     extra={"pending": left})
        else:
            log.info("stopped; the spool is empty")
        self._stopped.set()

    async def run_until_signalled(self) -> int:
        """``python -m agent run``: serve until SIGTERM/SIGINT, drain, stop. Returns the exit code."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        notifier = SystemdNotifier()  # takes NOTIFY_SOCKET & co. out of os.environ: children must not see them
        for name in NOTIFY_VARIABLES:
            self.env.pop(name, None)
        try:
            await self.start()
            notifier.ready(f"listening on {self.settings.http.host}:{self.bound_port}")
            await stop.wait()
            log.info("signal received: shutting down")
            notifier.stopping(f"draining {self.ledger.total_items()} record(s) for up to "
                              f"{self.settings.drain_timeout:g}s")
            await self.drain(self.settings.drain_timeout)
            await self.stop()
        finally:
            await notifier.stop()
        return 0

    # security ---------------------------------------------------------------------------------

    def _guard_middleware(self) -> Callable[..., Any]:
        token = self.settings.ingest_token
        host = self.settings.http.host
        allowed = set(_LOOPBACK_NAMES) | {host.strip("[]")}
        # Only a loopback listener can be reached by DNS rebinding alone; on other addresses clients
        # use whatever name the host has, and the ingest token is the guard.
        check_host = self.settings.http.is_loopback

        @web.middleware
        async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
            if request.path in _OPEN_PATHS:
                return await handler(request)
            if token is not None:
                given = request.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                    return error_response(MlflowApiError(
                        "UNAUTHENTICATED", "mlflow-agent needs 'Authorization: Bearer <ingest token>' "
                        "(set MLFLOW_TRACKING_TOKEN in the training environment)"))
            elif check_host:
                # DNS rebinding guard: a web page must not reach a loopback service by a foreign name.
                name = (request.host or "").rsplit(":", 1)[0].strip("[]") if request.host else ""
                if name not in allowed:
                    return error_response(MlflowApiError(
                        "PERMISSION_DENIED", f"mlflow-agent: host {name!r} not allowed"))
            return await handler(request)

        return guard

    async def _renew_credentials(self, error: AuthError) -> None:
        if self.rest is not None:
            await self.rest.provider.refresh(error.message)

    # operations -------------------------------------------------------------------------------

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(_MAINTENANCE_INTERVAL)
            try:
                expired = await self.spool.expire_history(HISTORY_MAX_AGE)
                entries = [e for e in map(self.catalog.run, expired) if e is not None]
                for entry in entries:
                    entry.info.pop(HISTORY_KEPT, None)
                if entries:
                    await self.spool.write_catalog([e.upsert() for e in entries])
                if expired:
                    log.info("let go the kept metric history of %d run(s) idle for %.0f h", len(expired),
                             HISTORY_MAX_AGE / 3600)
                await self.spool.maintenance()
            except Exception:
                log.exception("spool maintenance failed")
            await asyncio.to_thread(self._refresh_gauges)

    async def _watch_upstream(self, rest: MlflowRest) -> None:
        """Ask the upstream now and then when nothing else does, so ``upstream_up`` is current when idle."""
        while True:
            last = rest.health.last_seen
            if last is None or time.monotonic() - last >= _PROBE_INTERVAL:
                await rest.probe(timeout=min(self.settings.request_timeout, 10.0))
            await asyncio.sleep(_PROBE_INTERVAL / 3)

    def _refresh_gauges(self) -> None:
        """Gauges read from the file system at scrape time (called in a worker thread)."""
        self.metrics.spool_file_bytes.set(self.spool.file_bytes())
        with contextlib.suppress(OSError):  # the directory vanished: keep the last value, readiness says why
            st = os.statvfs(self.spool.directory)
            self.metrics.spool_disk_free_bytes.set(st.f_bavail * st.f_frsize)
        self.metrics.oldest_buffered_age.set(self._oldest_age())
        self.metrics.artifacts_buffered_bytes.set(self.artifacts.charged_bytes)
        self.metrics.spool_history_bytes.set(self.spool.history_bytes)

    def _oldest_age(self) -> float:
        oldest = self.spool.oldest_at
        return max(time.time() - oldest, 0.0) if oldest and self.ledger.total_items() > 0 else 0.0

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready = taking writes and keeping them. Each failed check adds a reason a person can act on.

        A missing credential or an unreachable upstream is reported, not a failure: writes are still
        accepted and kept, which is what readiness promises to the training job."""
        s = self.settings
        checks = {
            "listening": self.bound_port is not None and not self.draining,
            "spool_writable": self.spool.last_commit_error is None,
            "spool_under_limit": self.ledger.bytes < s.spool_max_bytes,
        }
        reasons: list[str] = []
        if self.draining:
            reasons.append("draining: shutting down, no longer taking writes")
        elif self.bound_port is None:
            reasons.append("not listening yet")
        if self.spool.last_commit_error:
            reasons.append(f"spool not writable: {self.spool.last_commit_error}")
        if not checks["spool_under_limit"]:
            policy = "dropping the oldest metrics" if s.overflow_policy == "drop_oldest" else "refusing writes"
            reasons.append(f"spool full ({self.ledger.bytes} of {s.spool_max_bytes} bytes): {policy}")
        detail: dict[str, Any] = {"checks": checks, "reasons": reasons}
        provider = self.rest.provider if self.rest is not None else None
        if isinstance(provider, RenewingUpstream | ArmResolvedUpstream):
            detail["credential"] = provider.state()
        if self.rest is not None:
            detail["upstream"] = {"up": self.rest.health.up, "last_error": self.rest.health.last_error}
        if self.spool.last_commit_error:
            detail["spool_error"] = self.spool.last_commit_error
        if self.draining:
            detail["reason"] = "draining"
        return all(checks.values()), detail

    async def status(self) -> dict[str, Any]:
        waiting = set(self.ledger.runs())
        known = self.ledger.known_runs()  # least recently changed first
        idle = [run for run in known if run not in waiting]
        shown_idle = idle[-_STATUS_IDLE_RUNS:]
        runs = []
        models = []
        for key in sorted(waiting):
            model_id = queued_model(key)
            model = self.catalog.model(model_id) if model_id is not None else None
            if model_id is not None:
                models.append({
                    "model_id": model_id,
                    "upstream_id": model.upstream_id if model else None,
                    "provisional": bool(model and model.provisional),
                    "name": model.info.get("name") if model else None,
                    "pending": self.ledger.run_breakdown(key),
                })
        for run in [k for k in sorted(waiting) if queued_model(k) is None] + [
                k for k in shown_idle[::-1] if queued_model(k) is None]:
            entry = self.catalog.run(run)
            runs.append({
                "run_id": run,
                "upstream_id": entry.upstream_id if entry else run,
                "provisional": bool(entry and entry.provisional),
                "run_name": entry.info.get("run_name") if entry else None,
                "pending": self.ledger.run_breakdown(run),
                "records": self.ledger.run_stats(run),
            })
        dead = await self.spool.dead_letters(20)
        totals = _totals(self.metrics)
        s = self.settings
        upstream: dict[str, Any] = {"url": s.upstream if s.azureml_config is None else s.upstream_text,
                                    "offline": self.rest is None}
        if self.rest is not None:
            upstream.update(up=self.rest.health.up, last_error=self.rest.health.last_error)
            if isinstance(self.rest.provider, RenewingUpstream | ArmResolvedUpstream):
                upstream["credential"] = self.rest.provider.state()
        return {
            "version": __version__,
            "time": time.time(),
            "draining": self.draining,
            "upstream": upstream,
            "spool": {
                "path": str(self.spool.path),
                "charged_bytes": self.ledger.bytes,
                "history_bytes": self.spool.history_bytes,
                "limit_bytes": self.settings.spool_max_bytes,
                "file_bytes": await asyncio.to_thread(self.spool.file_bytes),
                "overflow_policy": self.settings.overflow_policy,
            },
            "artifacts": {"waiting": len(self.artifacts.pending()), "bytes": self.artifacts.charged_bytes,
                          "limit_bytes": self.settings.artifact_max_bytes},
            "buffered_records": self.ledger.total_items(),
            "oldest_buffered_age_seconds": self._oldest_age(),
            "buffered_by_kind": self.ledger.by_kind(),
            "runs": runs,
            "models": models,  # logged models with operations waiting for upload
            "runs_omitted": len(idle) - len(shown_idle),  # idle runs beyond the most recent ones shown
            "experiments_pending": [e.name for e in self.catalog.pending_experiments()],
            "dead_letters": {"total": self.dead_letters_at_start + int(totals.get("dead_lettered", 0)), "recent": dead},
            "totals": totals,
        }


def _totals(metrics: AgentMetrics) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in metrics.registry.collect():
        if family.type != "counter" or not family.name.startswith("mlflow_agent_records_"):
            continue
        name = family.name.removeprefix("mlflow_agent_records_")
        out[name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return out
