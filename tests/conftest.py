"""Shared fixtures: real MLflow servers, agent processes and fault-injecting proxies on loopback ports.

Every process a fixture starts is stopped (by its pid, whole process group) at teardown.
"""

from __future__ import annotations

import itertools
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.support.agent_process import AgentProcess
from tests.support.faulty_proxy import FaultyProxy
from tests.support.mlflow_server import MlflowServer
from tests.support.processes import HasUrl

# The test process itself uses the MLflow client: no telemetry from it either.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


class MlflowServerFactory(Protocol):
    def __call__(self, port: int | None = None, *, start: bool = True) -> MlflowServer: ...


class AgentFactory(Protocol):
    def __call__(
        self,
        upstream: str | HasUrl | None,
        *extra_args: str,
        spool_dir: Path | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        start: bool = True,
        wait_ready: bool = True,
    ) -> AgentProcess: ...


class FaultyProxyFactory(Protocol):
    def __call__(self, target: str | HasUrl, seed: int = 0, **settings: Any) -> FaultyProxy: ...


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One MLflow server for the whole session; give each test its own experiment names."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-session"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server_factory(tmp_path: Path) -> Iterator[MlflowServerFactory]:
    """``factory(port=None, start=True) -> MlflowServer``: fresh servers in tmp dirs, stopped at teardown."""
    servers: list[MlflowServer] = []
    counter = itertools.count()

    def make(port: int | None = None, *, start: bool = True) -> MlflowServer:
        server = MlflowServer(tmp_path / f"mlflow-{next(counter)}", port=port)
        servers.append(server)
        if start:
            server.start()
        return server

    try:
        yield make
    finally:
        _stop_all(servers, lambda s: s.stop())


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[AgentFactory]:
    """``factory(upstream, *extra_args, spool_dir=None, port=None, env=None, start=True, wait_ready=True)``.

    ``upstream`` is a URL, anything with ``.url`` (MlflowServer, FaultyProxy) or None (``--upstream
    none``). Without ``spool_dir`` each agent gets ``tmp_path/agent-<i>/spool`` (its logs go to
    ``tmp_path/agent-<i>/agent-<n>.log``). Pass the spool dir of an earlier agent to simulate a restart
    by a new process. All agents are stopped at teardown.
    """
    agents: list[AgentProcess] = []
    counter = itertools.count()

    def make(
        upstream: str | HasUrl | None,
        *extra_args: str,
        spool_dir: Path | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        start: bool = True,
        wait_ready: bool = True,
    ) -> AgentProcess:
        if spool_dir is None:
            spool_dir = tmp_path / f"agent-{next(counter)}" / "spool"
        agent = AgentProcess(upstream, spool_dir, extra_args, port=port, env=env)
        agents.append(agent)
        if start:
            agent.start(wait_ready=wait_ready)
        return agent

    try:
        yield make
    finally:
        _stop_all(agents, lambda a: a.close())


@pytest.fixture
def faulty_proxy_factory(tmp_path: Path) -> Iterator[FaultyProxyFactory]:
    """``factory(target, seed=0, p_503=..., p_429=..., p_reset_before=..., p_reset_after=..., p_hang=...,
    retry_after=..., hang_seconds=..., port=...) -> FaultyProxy`` (started), stopped at teardown."""
    proxies: list[FaultyProxy] = []
    counter = itertools.count()

    def make(target: str | HasUrl, seed: int = 0, **settings: Any) -> FaultyProxy:
        settings.setdefault("base_dir", tmp_path / f"proxy-{next(counter)}")
        proxy = FaultyProxy(target, seed, start=False, **settings)
        proxies.append(proxy)
        proxy.start()
        return proxy

    try:
        yield make
    finally:
        _stop_all(proxies, lambda p: p.close())


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """``unique_name("exp") -> "exp-<test name>-<random>"``: names that never clash on a shared server."""
    test = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60]

    def make(prefix: str = "exp") -> str:
        return f"{prefix}-{test}-{uuid.uuid4().hex[:8]}"

    return make


@pytest.fixture
def experiment_name(unique_name: Callable[[str], str]) -> str:
    """An experiment name unique to this test."""
    return unique_name("exp")


def _stop_all(items: list[Any], stop: Callable[[Any], None]) -> None:
    """Stop every item (newest first, so agents go before the servers they talk to); re-raise the
    first error only after all were tried."""
    errors: list[BaseException] = []
    for item in reversed(items):
        try:
            stop(item)
        except BaseException as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
