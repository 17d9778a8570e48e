"""Shared by the Azure ML integration tests: the environment the agent must not inherit, the Azure
stand-ins in front of the session's MLflow server, and the checks every Azure test makes (everything
arrived once; no token anywhere it should not be).

Tests keep two small fixtures that call :func:`strip_azure_environment` and :func:`gateways`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import PARENT_TAG, all_runs, expected_rows, match_client_runs
from tests.support.agent_process import AgentProcess
from tests.support.azure_gateway import AzureGateway, token_fingerprint
from tests.support.processes import HasUrl
from tests.support.snapshot import duplicate_rows, is_user_tag, metric_rows

SCRIPT = "azure_train.py"
REFRESHES = "mlflow_agent_credential_refreshes_total"
AGENT_ARGS = (
    "--retry-initial-backoff", "100ms",
    "--retry-max-backoff", "1s",
    "--request-timeout", "5s",
    "--create-run-timeout", "1s",
    "--upload-linger", "50ms",
    "--drain-timeout", "5s",
    "--log-level", "debug",  # after AgentProcess's own --log-level: the most a log could leak
)  # fmt: skip
SCRIPT_TIMEOUT = 180.0
DRAIN_TIMEOUT = 90.0
# Nothing of the machine's own Azure or job configuration may reach the agent.
_INHERITED_PREFIXES = ("AZURE_", "AZUREML_", "IDENTITY_", "MSI_", "IMDS_", "MLFLOW_AGENT_")
_INHERITED_NAMES = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS",
                    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")

GatewayFactory = Callable[..., AzureGateway]


def strip_azure_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Strip Azure/job variables from what child processes inherit; return an empty directory to use as
    the agent's PATH (no az, azd or pwsh for DefaultAzureCredential to fall back on)."""
    for name in list(os.environ):
        if name.startswith(_INHERITED_PREFIXES) or name in _INHERITED_NAMES:
            monkeypatch.delenv(name)
    empty = tmp_path / "no-tools"
    empty.mkdir(exist_ok=True)
    return empty


@contextlib.contextmanager
def gateways(tmp_path: Path, target: str | HasUrl) -> Iterator[GatewayFactory]:
    """``make(**opts) -> AzureGateway`` (started) in front of ``target``; all stopped on exit."""
    made: list[AzureGateway] = []

    def make(**opts: Any) -> AzureGateway:
        gateway = AzureGateway(target, tmp_path / f"azure-gateway-{len(made)}", start=False, **opts)
        made.append(gateway)
        return gateway.start()

    try:
        yield make
    finally:
        for gateway in reversed(made):
            gateway.close()


def identity_env(gateway: AzureGateway, no_tools: Path) -> dict[str, str]:
    return {**gateway.agent_env(), "PATH": str(no_tools)}


# -- checks ------------------------------------------------------------------------------------------------------


def check_upstream(url: str, experiment: str, out: dict[str, Any]) -> None:
    """The server holds exactly the runs the script logged: names, parent link, params, user tags,
    FINISHED, and every metric row once."""
    logged_runs: dict[str, dict[str, Any]] = out["runs"]
    runs = all_runs(url, experiment)
    assert len(runs) == len(logged_runs), [(r.info.run_id, r.info.run_name) for r in runs]
    upstream = match_client_runs(runs, {label: r["run_id"] for label, r in logged_runs.items()})
    for label, logged in logged_runs.items():
        check_run(url, upstream[label].info.run_id, logged, label)
    if "child" in upstream:
        assert upstream["parent"].data.tags.get(PARENT_TAG) is None
        assert upstream["child"].data.tags.get(PARENT_TAG) == upstream["parent"].info.run_id


def check_run(url: str, run_id: str, logged: dict[str, Any], label: str, *,
              extra_params: dict[str, str] | None = None, extra_tags: dict[str, str] | None = None) -> None:
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=url).get_run(run_id)
    assert run.info.run_name == logged["name"], label
    assert run.info.status == "FINISHED", (label, run.info.status)
    assert run.data.params == {**logged["params"], **(extra_params or {})}, label
    assert {k: v for k, v in run.data.tags.items() if is_user_tag(k)} == {**logged["tags"], **(extra_tags or {})}
    expected = expected_rows(logged["metrics"])
    assert sorted(run.data.metrics) == sorted(expected), label
    for key, rows in expected.items():
        stored = metric_rows(url, run_id, key)
        assert duplicate_rows(stored) == {}, f"{label}/{key}: rows stored twice"
        assert stored == rows, f"{label}/{key}: {len(stored)} rows upstream, {len(rows)} logged"


def refresh_samples(agent: AgentProcess) -> dict[str, float]:
    return {k: v for k, v in agent.metrics().items() if k.startswith(REFRESHES)}


def assert_no_secrets(agent: AgentProcess, gateway: AzureGateway, *, min_tokens: int) -> None:
    """No token the gateway minted (nor its signature, nor its claims segment) and not the identity
    header appear in the agent's logs, /metrics, /status, /readyz or spool files."""
    tokens = gateway.minted_tokens()
    assert len(tokens) >= min_tokens, f"only {len(tokens)} tokens minted: the check would prove little"
    places: dict[str, str] = {}
    for path in agent.log_paths:
        places[f"log {path.name}"] = path.read_text(errors="replace")
    for endpoint in ("/metrics", "/status", "/readyz"):
        places[endpoint] = agent.get(endpoint).text
    for path in sorted(agent.spool_dir.rglob("*")):
        if path.is_file():
            places[f"spool {path.relative_to(agent.spool_dir)}"] = path.read_bytes().decode("latin-1")
    leaks: list[str] = []
    for token in tokens:
        _header, claims, signature = token.split(".")
        for needle in (token, claims, signature):
            where = [name for name, text in places.items() if needle in text]
            if where:
                leaks.append(f"token {token_fingerprint(token)} ({len(needle)} chars of it) in {where}")
                break
    where = [name for name, text in places.items() if gateway.identity_header in text]
    if where:
        leaks.append(f"the identity header in {where}")
    assert not leaks, "secrets leaked:\n  " + "\n  ".join(leaks)


def report(label: str, capsys: pytest.CaptureFixture[str], **facts: Any) -> None:
    with capsys.disabled():
        print(f"\n[{label}] " + "; ".join(f"{k}: {v}" for k, v in facts.items()))


def auth_failures(stats: dict[str, Any]) -> dict[str, int]:
    """401s the agent caused by sending no token or a token the gateway never minted."""
    return {k: stats["unauthorized"][k] for k in ("missing", "malformed", "bad_signature")}
