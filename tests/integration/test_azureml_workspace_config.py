"""An Azure ML workspace named by ``config.json`` (``--azureml-config``), its host found through ARM.

agent -> tests/support/azure_gateway.py, which is here also Azure Resource Manager (``--azure-arm-endpoint
https://127.0.0.1:<port>``: the workspace resource, authenticated with the managed-identity token the
agent gets from the gateway's identity endpoint) and the workspace's discovery service, over TLS the
agent trusts through MLFLOW_TRACKING_SERVER_CERT_PATH -> a real MLflow server. Training scripts use the
plain MLflow client against the agent's http URL. The agent asks ARM once, caches the host in its spool
directory and never needs ARM again; while ARM cannot be asked, writes are taken and kept and /readyz
says why nothing leaves.

After every test no token the gateway minted (nor the identity header) may appear in the agent's logs,
/metrics, /status, /readyz or spool files.
"""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import AgentFactory
from tests.integration.azure_helpers import (
    AGENT_ARGS,
    DRAIN_TIMEOUT,
    SCRIPT,
    SCRIPT_TIMEOUT,
    GatewayFactory,
    assert_no_secrets,
    auth_failures,
    check_upstream,
    identity_env,
    report,
)
from tests.integration.helpers import assert_accounting, finish_script, read_json, run_script, start_script
from tests.integration.helpers_faults import run_cli
from tests.support.agent_process import AgentProcess
from tests.support.azure_gateway import AzureGateway
from tests.support.mlflow_server import MlflowServer
from tests.support.processes import stop_process, wait_until

pytestmark = pytest.mark.integration

CACHE_NAME = "azureml-workspace.json"
NO_AUTH_FAILURES = dict.fromkeys(("missing", "malformed", "bad_signature"), 0)


def start_agent(agent_factory: AgentFactory, gateway: AzureGateway, config: Path, no_tools: Path,
                *extra: str) -> AgentProcess:
    """An agent for the workspace ``config`` names, with the gateway as ARM and as its identity endpoint."""
    return agent_factory(None, "--azureml-config", str(config), "--azure-arm-endpoint", gateway.arm_endpoint,
                         *AGENT_ARGS, *extra, env=identity_env(gateway, no_tools))


def train(agent: AgentProcess, experiment: str, tmp_path: Path, label: str, seconds: float = 1.5,
          *extra: str) -> dict[str, Any]:
    """The training script against the agent; returns what it logged."""
    out = tmp_path / f"{label}.json"
    run_script(SCRIPT, experiment, str(out), "--seconds", str(seconds), "--interval", "0.1", *extra,
               tracking_uri=agent.url, log_path=tmp_path / f"{label}.log", timeout=SCRIPT_TIMEOUT)
    data: dict[str, Any] = read_json(out)
    return data


def workspace_state(agent: AgentProcess) -> dict[str, Any]:
    """``credential.workspace`` of /readyz (which stays 200: writes are still taken)."""
    ready = agent.get("/readyz")
    assert ready.status_code == 200, ready.text
    workspace: dict[str, Any] = ready.json()["credential"]["workspace"]
    return workspace


# -- a config.json the agent cannot use ----------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "problem"), [
    ('{"subscription_id": "s", "workspace_name": "w"}', "'resource_group' is missing or not a non-empty string"),
    ('[{"subscription_id": "s"}]', "must hold a JSON object"),
    ('{"Scope": "/subscriptions/s/resourceGroups/g"}', '"Scope" must be /subscriptions/'),
    ('{"subscription_id": ', "is not valid JSON"),
], ids=["missing-key", "array", "bad-scope", "broken"])
def test_an_unusable_config_json_stops_the_start_with_one_line(tmp_path: Path, no_tools: Path, content: str,
                                                               problem: str) -> None:
    config = tmp_path / "config.json"
    config.write_text(content)
    spool = tmp_path / "spool"
    result = run_cli("run", "--azureml-config", str(config), "--upstream", "none", "--http", "127.0.0.1:0",
                     "--udp", "none", "--spool-dir", str(spool), timeout=60)
    assert result.returncode == 2, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "'azureml_config' (from --azureml-config)" in lines[0] and str(config) in lines[0], lines[0]
    assert problem in lines[0], lines[0]
    assert not spool.exists(), "a refused configuration must not touch the spool"


# -- the ARM stand-in itself ---------------------------------------------------------------------------------------


def test_the_arm_stand_in_answers_as_arm_does(make_gateway: GatewayFactory) -> None:
    gateway = make_gateway(token_ttl=60.0)
    http = requests.Session()
    http.verify = str(gateway.cert_path)
    http.trust_env = False
    auth = {"Authorization": f"Bearer {gateway.mint(kind='test')}"}

    ok = http.get(gateway.arm_resource_url(), headers=auth, timeout=10)
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["id"] == gateway.scope and body["name"] == gateway.workspace and body["location"] == "eastus"
    assert body["properties"]["mlFlowTrackingUri"] == f"azureml://{gateway.host}/mlflow/v1.0{gateway.scope}"
    assert body["properties"]["discoveryUrl"] == gateway.discovery_url
    # ARM compares names without regard to case.
    assert http.get(gateway.arm_resource_url().replace(gateway.workspace, gateway.workspace.upper()),
                    headers=auth, timeout=10).status_code == 200

    assert http.get(gateway.arm_resource_url(), timeout=10).status_code == 401
    missing = http.get(gateway.arm_resource_url("ws-nowhere"), headers=auth, timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "ResourceNotFound" and "ws-nowhere" in missing.json()["error"]["message"]
    group = http.get(gateway.arm_resource_url().replace(gateway.resource_group, "rg-other"), headers=auth, timeout=10)
    assert (group.status_code, group.json()["error"]["code"]) == (404, "ResourceGroupNotFound")
    no_version = http.get(gateway.arm_resource_url().partition("?")[0], headers=auth, timeout=10)
    assert (no_version.status_code, no_version.json()["error"]["code"]) == (400, "MissingApiVersionParameter")

    gateway.set(arm_omit_tracking_uri=True)
    older = http.get(gateway.arm_resource_url(), headers=auth, timeout=10).json()["properties"]
    assert "mlFlowTrackingUri" not in older and older["discoveryUrl"] == gateway.discovery_url
    discovery = http.get(gateway.discovery_url, timeout=10)  # no token: the discovery service asks for none
    assert discovery.status_code == 200 and discovery.json()["api"] == gateway.url

    gateway.set(arm_down=True)
    down = http.get(gateway.arm_resource_url(), headers=auth, timeout=10)
    assert (down.status_code, down.json()["error"]["code"]) == (503, "ServiceUnavailable")
    gateway.set(arm_down_mode="reset")
    with pytest.raises(requests.ConnectionError):
        http.get(gateway.arm_resource_url(), headers=auth, timeout=10)
    assert http.get(f"{gateway.base_url}/api/2.0/mlflow/experiments/search?max_results=1", headers=auth,
                    timeout=10).status_code == 200, "ARM being down took the MLflow API down too"

    stats = gateway.stats()
    assert stats["arm"] == {"requests": 9, "served": 3, "not_found": 2, "unauthorized": 1, "bad_request": 1,
                            "down": 2}, stats["arm"]
    assert stats["discovery"] == {"requests": 1}
    http.close()


# -- the happy path, and a restart that needs no ARM ---------------------------------------------------------------


def test_config_json_finds_the_host_once_and_restarts_use_the_cache(
    *,
    make_gateway: GatewayFactory,
    no_tools: Path,
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A config.json with the workspace's names; the agent asks ARM once, caches the host (0600) and
    uploads everything exactly once. Restarted on the same spool with ARM down, it still uploads."""
    gateway = make_gateway(token_ttl=60.0)
    config = gateway.write_workspace_config(tmp_path / "project" / ".azureml" / "config.json")
    agent = start_agent(agent_factory, gateway, tmp_path / "project", no_tools)  # the directory is searched
    first, second = unique_name("exp-first"), unique_name("exp-second")

    out = train(agent, first, tmp_path, "first", 1.5, "--child-at-seconds", "0.5")
    status = agent.wait_drained(timeout=DRAIN_TIMEOUT)
    stats = gateway.stats()
    workspace = workspace_state(agent)
    cache = agent.spool_dir / CACHE_NAME

    assert_accounting(status)
    check_upstream(mlflow_server.url, first, out)
    assert stats["arm"]["requests"] == 1 and stats["arm"]["served"] == 1, stats["arm"]
    assert stats["discovery"]["requests"] == 0
    assert workspace == {"scope": gateway.scope, "resolved": True, "base_url": gateway.base_url, "last_error": None}
    assert status["upstream"]["url"] == f"Azure ML workspace from {tmp_path / 'project'}", status["upstream"]
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    cached = json.loads(cache.read_text())
    assert (cached["host"], cached["scope"], cached["arm_endpoint"]) == (gateway.host, gateway.scope,
                                                                         gateway.arm_endpoint)
    assert config.is_file()

    # A restart on the same spool while ARM is down: the cached host is used, ARM is not asked.
    agent.stop()
    gateway.set(arm_down=True)
    agent.start()
    assert workspace_state(agent)["resolved"] is True
    out2 = train(agent, second, tmp_path, "second", 1.0)
    status2 = agent.wait_drained(timeout=DRAIN_TIMEOUT)
    stats2 = gateway.stats()
    report("config.json", capsys, arm=stats2["arm"], identity=stats2["identity"], forwarded=stats2["forwarded"])

    assert_accounting(status2)
    check_upstream(mlflow_server.url, second, out2)
    assert stats2["arm"]["requests"] == 1, f"ARM asked again after the restart: {stats2['arm']}"
    assert auth_failures(stats2) == NO_AUTH_FAILURES, stats2
    assert_no_secrets(agent, gateway, min_tokens=2)


def test_without_a_tracking_uri_the_discovery_document_names_the_host(
    *,
    make_gateway: GatewayFactory,
    no_tools: Path,
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    gateway = make_gateway(token_ttl=60.0)
    gateway.set(arm_omit_tracking_uri=True)
    config = gateway.write_workspace_config(tmp_path / "config.json")
    agent = start_agent(agent_factory, gateway, config, no_tools)
    out = train(agent, experiment_name, tmp_path, "train", 1.0)
    status = agent.wait_drained(timeout=DRAIN_TIMEOUT)
    stats = gateway.stats()

    assert_accounting(status)
    check_upstream(mlflow_server.url, experiment_name, out)
    assert stats["arm"]["served"] == 1 and stats["discovery"]["requests"] == 1, (stats["arm"], stats["discovery"])
    assert json.loads((agent.spool_dir / CACHE_NAME).read_text())["host"] == gateway.host
    assert_no_secrets(agent, gateway, min_tokens=1)


# -- ARM down at the first start -----------------------------------------------------------------------------------


def test_arm_down_at_first_start_holds_uploads_then_everything_arrives_once(
    *,
    make_gateway: GatewayFactory,
    no_tools: Path,
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """ARM answers 503 when the agent first starts. The client's writes are taken at once, nothing is
    forwarded, /readyz says the workspace is not resolved and why; ARM back, everything arrives once."""
    gateway = make_gateway(token_ttl=60.0)
    gateway.set(arm_down=True)
    config = gateway.write_workspace_config(tmp_path / "config.json")
    agent = start_agent(agent_factory, gateway, config, no_tools)
    out_path, log_path = tmp_path / "out.json", tmp_path / "script.log"
    proc = start_script(SCRIPT, experiment_name, str(out_path), "--seconds", "4", "--interval", "0.1",
                        "--child-at-seconds", "1", tracking_uri=agent.url, log_path=log_path)
    try:
        # The lookup's retries come after 1 s, 2 s, 4 s, ...: give ARM back after the third failure,
        # once writes are being taken, and the fourth attempt (about 7 s after start) finds it.
        wait_until(lambda: gateway.stats()["arm"]["down"] >= 3 and agent.status()["buffered_records"] > 0, 60,
                   message="failed ARM lookups and writes taken meanwhile")
        held = workspace_state(agent)
        held_stats = gateway.stats()
        held_status = agent.status()
        gateway.set(arm_down=False)
        up_at = time.time()
        finish_script(proc, log_path, timeout=SCRIPT_TIMEOUT)
    finally:
        stop_process(proc, timeout=5)  # a no-op unless something above failed
    status = agent.wait_drained(timeout=DRAIN_TIMEOUT)
    drained_after = time.time() - up_at
    stats = gateway.stats()
    out = read_json(out_path)
    report("ARM down at start", capsys, held=held, arm=stats["arm"], drained_after_arm_back=f"{drained_after:.1f}s",
           slowest_client_call=out["slowest"], buffered_while_held=held_status["buffered_records"])

    # While ARM was down: writes taken, nothing sent, readiness says why.
    assert held["resolved"] is False and held["base_url"] is None, held
    assert held["last_error"].startswith("ARM answered HTTP 503 ServiceUnavailable"), held
    assert held_stats["forwarded"] == 0 and held_stats["requests"] == 0, held_stats
    assert held_status["buffered_records"] > 0
    assert held_status["upstream"]["credential"]["workspace"]["resolved"] is False
    assert out["slowest"][1] < 10.0, f"a client call waited for the upstream: {out['slowest']}"
    # ARM back: resolved once, everything arrives exactly once.
    assert stats["arm"]["served"] == 1, stats["arm"]
    assert workspace_state(agent) == {"scope": gateway.scope, "resolved": True, "base_url": gateway.base_url,
                                      "last_error": None}
    assert_accounting(status)
    check_upstream(mlflow_server.url, experiment_name, out)
    assert auth_failures(stats) == NO_AUTH_FAILURES, stats
    assert_no_secrets(agent, gateway, min_tokens=1)


# -- a config.json naming a workspace ARM does not know ----------------------------------------------------------------


def test_a_wrong_workspace_name_is_reported_and_writes_are_kept(
    *,
    make_gateway: GatewayFactory,
    no_tools: Path,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    gateway = make_gateway(token_ttl=60.0)
    config = gateway.write_workspace_config(tmp_path / "config.json", workspace_name="ws-typo")
    agent = start_agent(agent_factory, gateway, config, no_tools, "--drain-timeout", "1s")  # nothing can drain
    wait_until(lambda: workspace_state(agent)["last_error"] is not None, 30, message="the failed lookup in /readyz")
    out = train(agent, experiment_name, tmp_path, "train", 1.0)
    status = agent.status()
    workspace = workspace_state(agent)
    stats = gateway.stats()

    assert workspace["resolved"] is False, workspace
    error = workspace["last_error"]
    assert error.startswith("ARM answered HTTP 404 ResourceNotFound"), error
    assert "ws-typo" in error and "check subscription_id, resource_group, workspace_name in the config file" in error
    assert stats["arm"]["not_found"] >= 1 and stats["arm"]["served"] == 0, stats["arm"]
    assert stats["forwarded"] == 0 and stats["requests"] == 0, stats
    # Everything the client logged is kept for when the file is fixed.
    assert out["steps"] > 0 and status["buffered_records"] > 0, status
    assert status["totals"].get("dropped", 0) == 0, status["totals"]
    assert agent.running and agent.get("/healthz").status_code == 200
    assert not (agent.spool_dir / CACHE_NAME).exists()
    assert_no_secrets(agent, gateway, min_tokens=1)
    # It stops cleanly with the lookup still retrying, and keeps the records for the next start.
    assert agent.stop() == 0, agent.log_tail()
    errors = [line for line in agent.log_text().splitlines() if line.startswith("{")
              and json.loads(line).get("level") in ("error", "critical")]
    assert errors == [], errors
