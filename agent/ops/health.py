"""Operational endpoints: /healthz (alive), /readyz (ready to accept), /metrics (Prometheus), /status (JSON)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.ops.metrics import AgentMetrics

StatusSource = Callable[[], Awaitable[dict[str, Any]]]
ReadySource = Callable[[], tuple[bool, dict[str, Any]]]


class OpsEndpoints:
    def __init__(self, metrics: AgentMetrics, status: StatusSource, ready: ReadySource,
                 refresh: Callable[[], None]) -> None:
        self.metrics = metrics
        self._status = status
        self._ready = ready
        self._refresh = refresh
        self.started = time.time()

    def add_routes(self, app: web.Application, *, with_status: bool = True) -> None:
        """``with_status=False`` for a listener others can reach: /status names runs and experiments."""
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.prometheus)
        if with_status:
            app.router.add_get("/status", self.status)

    async def healthz(self, request: web.Request) -> web.Response:
        del request
        return _json({"status": "alive", "uptime_seconds": round(time.time() - self.started, 3)})

    async def readyz(self, request: web.Request) -> web.Response:
        del request
        ready, detail = self._ready()
        return _json({"ready": ready, **detail}, status=200 if ready else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        del request
        # Both touch files (the spool's size, /proc/net/udp): off the event loop.
        await asyncio.to_thread(self._refresh)
        body = await asyncio.to_thread(generate_latest, self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, request: web.Request) -> web.Response:
        del request
        return _json(await self._status())


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload, option=orjson.OPT_INDENT_2), status=status,
                        content_type="application/json")
