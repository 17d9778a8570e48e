"""Fixtures shared by the integration tests: the Azure ML gateway stand-in and a clean environment, and
the mlflow fluent API's global state put back after a test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.azure_helpers import GatewayFactory, gateways, strip_azure_environment
from tests.support.mlflow_server import MlflowServer


@pytest.fixture
def no_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No Azure/job variables for child processes; an empty directory to use as the agent's PATH."""
    return strip_azure_environment(tmp_path, monkeypatch)


@pytest.fixture
def make_gateway(tmp_path: Path, mlflow_server: MlflowServer, no_tools: Path) -> Iterator[GatewayFactory]:
    """``make_gateway(**opts) -> AzureGateway`` (started) in front of the session MLflow server."""
    with gateways(tmp_path, mlflow_server) as make:
        yield make


@pytest.fixture
def fluent() -> Iterator[None]:
    """For tests that use mlflow's fluent API (``mlflow.set_tracking_uri``, ``start_run``, ``log_model``):
    its global tracking URI and active runs, put back after the test."""
    import mlflow

    before = mlflow.get_tracking_uri()
    try:
        yield
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(before)
