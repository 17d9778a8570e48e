"""The Azure ML upstream end to end: ``--upstream azureml://...`` against a local stand-in of a workspace.

agent -> tests/support/azure_gateway.py (HTTPS with a self-signed certificate the agent trusts through
MLFLOW_TRACKING_SERVER_CERT_PATH; the workspace's ``/mlflow/v2.0/<scope>`` prefix; bearer tokens that
expire; Azure's limits and error envelope; an App Service style managed-identity endpoint that
azure-identity's DefaultAzureCredential finds through IDENTITY_ENDPOINT/IDENTITY_HEADER; the run-history
token renewal of Azure ML jobs) -> a real MLflow server. Training scripts use the plain MLflow client
against the agent's http URL. Nothing Azure is reachable: every token comes from the gateway, and the
agent inherits no AZURE_*/IDENTITY_*/MSI_* variables and no az/azd/pwsh on its PATH.

After every test no token the gateway minted (nor the identity header) may appear in the agent's logs,
/metrics, /status, /readyz or spool files. The short tests come first, the minute-long one last.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import AgentFactory
from tests.integration.helpers import (
    PARENT_TAG,
    all_runs,
    assert_accounting,
    expected_rows,
    finish_script,
    match_client_runs,
    read_json,
    run_script,
    start_script,
)
from tests.support.agent_process import AgentProcess
from tests.support.azure_gateway import AzureGateway, token_fingerprint
from tests.support.mlflow_server import MlflowServer
from tests.support.processes import stop_process, wait_until
from tests.support.snapshot import duplicate_rows, is_user_tag, metric_rows

pytestmark = pytest.mark.integration

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


@pytest.fixture
def no_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Strip Azure/job variables from what child processes inherit; return an empty directory to use as
    the agent's PATH (no az, azd or pwsh for DefaultAzureCredential to fall back on)."""
    for name in list(os.environ):
        if name.startswith(_INHERITED_PREFIXES) or name in _INHERITED_NAMES:
            monkeypatch.delenv(name)
    empty = tmp_path / "no-tools"
    empty.mkdir()
    return empty


@pytest.fixture
def make_gateway(tmp_path: Path, mlflow_server: MlflowServer, no_tools: Path) -> Iterator[GatewayFactory]:
    """``make_gateway(**opts) -> AzureGateway`` (started) in front of the session MLflow server."""
    gateways: list[AzureGateway] = []

    def make(**opts: Any) -> AzureGateway:
        gateway = AzureGateway(mlflow_server, tmp_path / f"azure-gateway-{len(gateways)}", start=False, **opts)
        gateways.append(gateway)
        return gateway.start()

    try:
        yield make
    finally:
        for gateway in reversed(gateways):
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


def _report(label: str, capsys: pytest.CaptureFixture[str], **facts: Any) -> None:
    with capsys.disabled():
        print(f"\n[{label}] " + "; ".join(f"{k}: {v}" for k, v in facts.items()))


def _auth_failures(stats: dict[str, Any]) -> dict[str, int]:
    """401s the agent caused by sending no token or a token the gateway never minted."""
    return {k: stats["unauthorized"][k] for k in ("missing", "malformed", "bad_signature")}


# -- Azure's limits ----------------------------------------------------------------------------------------------------


def test_azure_limits_250_values_per_key_200_params_history_pages_logged_models(
    *,
    make_gateway: GatewayFactory,
    no_tools: Path,
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    experiment_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """1,000 values of one key in ten log_batch calls go up in batches of at most 250 values per key
    (the gateway never refuses one); of 250 params the first 200 go up and 50 are dead-lettered with
    the reason; reading the 1,000 values back pages under Azure's 1000; logged models get a clear 404."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    gateway = make_gateway(token_ttl=60.0)
    agent = agent_factory(gateway.uri, *AGENT_ARGS, env=identity_env(gateway, no_tools))
    client = MlflowClient(tracking_uri=agent.url)
    experiment_id = client.create_experiment(experiment_name)
    run_id = client.create_run(experiment_id, run_name="limits").info.run_id
    ts = 1_750_000_000_000
    for chunk in range(10):
        client.log_batch(run_id, metrics=[Metric("loss", 1.0 / (i + 1), ts + i, i)
                                          for i in range(chunk * 100, chunk * 100 + 100)])
    keys = [f"p{i:03d}" for i in range(250)]
    for start in range(0, 250, 100):
        client.log_batch(run_id, params=[Param(k, f"v-{k}") for k in keys[start:start + 100]])
    client.set_terminated(run_id)
    status = agent.wait_drained(timeout=DRAIN_TIMEOUT)

    read_back = client.get_metric_history(run_id, "loss")  # through the agent: pages of at most 999
    not_found = requests.get(f"{agent.url}/api/2.0/mlflow/logged-models/m-0123456789", timeout=30)
    stats = gateway.stats()
    upstream = match_client_runs(all_runs(mlflow_server.url, experiment_name), {"limits": run_id})["limits"]
    stored = metric_rows(mlflow_server.url, upstream.info.run_id, "loss")
    letters = status["dead_letters"]
    _report("limits", capsys, log_batches=stats["forwarded_by_endpoint"].get("runs/log-batch"),
            limit_refusals=stats["limit_refusals"], dead_letters=letters["total"],
            dead_letter_sample=letters["recent"][:1], logged_models=not_found.status_code)

    # 250 values per key per request.
    assert stats["limit_refusals"]["metric_values"] == 0, stats
    assert stats["forwarded_by_endpoint"].get("runs/log-batch", 0) >= 4 + 2, stats["forwarded_by_endpoint"]
    assert len(stored) == 1000 and duplicate_rows(stored) == {}, len(stored)
    assert [row[2] for row in stored] == list(range(1000))
    # 200 params per run: the rest dead-lettered here, with the reason, and never sent.
    params = upstream.data.params
    assert len(params) == 200, len(params)
    assert set(params) == set(keys[:200]), sorted(set(keys) - set(params))[:10]
    assert stats["limit_refusals"]["params"] == 0, "the agent sent params past the limit"
    assert status["totals"].get("dead_lettered") == 50, status["totals"]
    assert letters["total"] == 50, letters
    assert letters["recent"] and all("200" in d["message"] and d["kind"] == "param" for d in letters["recent"]), (
        letters["recent"][:3])
    log = agent.log_text()
    assert any("WARNING" in line.upper() and "200 params" in line for line in log.splitlines()), (
        "no warning about the param limit in the agent log")
    totals = status["totals"]
    assert totals["received"] == totals["uploaded"] + 50 and totals.get("dropped", 0) == 0, totals
    # Reading back through the agent: paged under Azure's 1000, complete.
    assert len(read_back) == 1000, len(read_back)
    assert stats["limit_refusals"]["max_results"] == 0, stats
    # Logged models: Azure's 404, explained.
    assert not_found.status_code == 404, not_found.text
    body = not_found.json()
    assert body.get("error_code") == "ENDPOINT_NOT_FOUND", body
    assert "logged models" in body.get("message", ""), body
    assert upstream.info.status == "FINISHED"
    assert_no_secrets(agent, gateway, min_tokens=1)


# -- inside an Azure ML job: the run token -----------------------------------------------------------------------------


def test_inside_a_job_the_run_token_is_renewed_through_run_history(
    *,
    make_gateway: GatewayFactory,
    no_tools: Path,
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The agent gets the job's environment: a run token valid for 6 s, the job's run id (a run that
    exists upstream) and its experiment; no identity endpoint. The script logs to the job's run for 15 s;
    the token is renewed again and again through run history, and nothing is lost."""
    from mlflow.tracking import MlflowClient

    gateway = make_gateway(token_ttl=5.0)
    server = MlflowClient(tracking_uri=mlflow_server.url)
    experiment_id = server.create_experiment(experiment_name)
    job_tags = {"azureml.runsource": "azureml.scriptrun"}
    job_run = server.create_run(experiment_id, run_name="job-run-bright-lamp", tags=job_tags).info.run_id
    run_token = gateway.mint(ttl=6.0, kind="job")
    agent_env = {
        "MLFLOW_TRACKING_TOKEN": run_token,
        "AZUREML_RUN_ID": job_run,
        "MLFLOW_EXPERIMENT_ID": experiment_id,
        "MLFLOW_TRACKING_SERVER_CERT_PATH": str(gateway.cert_path),
        "PATH": str(no_tools),
    }
    agent = agent_factory(gateway.uri, *AGENT_ARGS, env=agent_env)
    out_path, log_path = tmp_path / "out.json", tmp_path / "script.log"
    job_env = {"MLFLOW_RUN_ID": job_run, "MLFLOW_EXPERIMENT_ID": experiment_id, "MLFLOW_TRACKING_TOKEN": run_token}
    proc = start_script(SCRIPT, "-", str(out_path), "--job", "--seconds", "15", "--interval", "0.1",
                        "--read-every", "5", tracking_uri=agent.url, log_path=log_path, env=job_env)
    try:
        finish_script(proc, log_path, timeout=SCRIPT_TIMEOUT)
    finally:
        stop_process(proc, timeout=5)
    status = agent.wait_drained(timeout=DRAIN_TIMEOUT)
    stats = gateway.stats()
    refreshes = refresh_samples(agent)
    out = read_json(out_path)
    _report("job run token", capsys, steps=out["steps"], history=stats["history"], identity=stats["identity"],
            minted=stats["minted_by_kind"], refreshes=refreshes, unauthorized=stats["unauthorized"])

    assert out["runs"]["parent"]["run_id"] == job_run, "the script did not log to the job's run"
    assert stats["history"]["renewals"] >= 3, stats["history"]
    assert stats["history"]["refused"] == 0, stats["history"]
    assert stats["identity"]["requests"] == 0, "the identity endpoint was used inside a job"
    assert agent.metric_sum(REFRESHES, source="azureml_run_token", result="ok") >= 3, refreshes
    assert agent.metric_sum(REFRESHES, result="error") == 0, refreshes
    assert _auth_failures(stats) == dict.fromkeys(("missing", "malformed", "bad_signature"), 0), stats
    assert_accounting(status)
    assert [r.info.run_id for r in all_runs(mlflow_server.url, experiment_name)] == [job_run], "a run was added"
    check_run(mlflow_server.url, job_run, out["runs"]["parent"], "job", extra_tags=job_tags)
    assert_no_secrets(agent, gateway, min_tokens=4)


# -- the token service down for 30 s -----------------------------------------------------------------------------------

GRACE = 1.5  # after the last token's expiry, for requests already in flight
OUTAGE = 30.0


def test_token_service_down_for_30s_pauses_uploads_then_everything_arrives_once(
    *,
    make_gateway: GatewayFactory,
    no_tools: Path,
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The identity endpoint refuses connections for 30 s in the middle of a 45 s script; its last
    token expires. Writes are still taken, nothing goes out without a valid token, readiness says why;
    once it is back everything arrives exactly once."""
    gateway = make_gateway(token_ttl=5.0)
    agent = agent_factory(gateway.uri, *AGENT_ARGS, env=identity_env(gateway, no_tools))
    out_path, log_path = tmp_path / "out.json", tmp_path / "script.log"
    proc = start_script(
        SCRIPT, experiment_name, str(out_path), "--seconds", "45", "--interval", "0.1", "--child-at-seconds", "25",
        tracking_uri=agent.url, log_path=log_path,
    )  # fmt: skip
    samples: list[tuple[float, bool | None, int]] = []  # (time, credential valid, buffered records)
    try:
        wait_until(lambda: (s := gateway.stats())["forwarded"] >= 20 and s["tokens_minted"] >= 2, 60,
                   message="uploads through the gateway with a renewed token", proc=proc)
        gateway.set(identity_down=True)
        down_at = time.time()
        while time.time() < down_at + OUTAGE:
            ready = agent.get("/readyz").json()
            samples.append((time.time(), ready.get("credential", {}).get("valid"), agent.status()["buffered_records"]))
            time.sleep(0.5)
        paused_stats = gateway.stats()
        gateway.set(identity_down=False)
        up_at = time.time()
        finish_script(proc, log_path, timeout=SCRIPT_TIMEOUT)
    finally:
        stop_process(proc, timeout=5)  # a no-op unless something above failed
    status = agent.wait_drained(timeout=DRAIN_TIMEOUT)
    drained_at = time.time()
    stats = gateway.stats()
    minted = gateway.minted()
    last_exp = max(m["exp"] for m in minted if m["time"] < down_at)
    paused_from = last_exp + GRACE
    log = [e for e in gateway.request_log() if "outcome" in e]
    forwarded = [e["time"] for e in log if e["outcome"] == "forwarded"]
    while_paused = [e for e in log if paused_from <= e["time"] <= up_at and e.get("endpoint") != "msi/token"]
    resumed = [t for t in forwarded if t > up_at]
    invalid_seen = [t for t, valid, _ in samples if valid is False]
    buffered = [(round(t - down_at, 1), n) for t, _, n in samples if t >= paused_from]
    _report("token service down", capsys, outage=f"{up_at - down_at:.1f}s",
            last_token_expired_after=f"{last_exp - down_at:.1f}s",
            first_upload_after_recovery=f"{resumed[0] - up_at:.1f}s" if resumed else None,
            drained_after_recovery=f"{drained_at - up_at:.1f}s", buffered_while_paused=buffered[::6],
            refreshes=refresh_samples(agent), identity=stats["identity"], gateway_while_down=paused_stats)

    # While the token service was down: nothing sent once no valid token was held, writes kept, readiness says so.
    assert up_at - paused_from >= 15, "the last token expired too late for a pause to be seen"
    assert while_paused == [], f"requests went out with no valid token to send: {while_paused[:5]}"
    assert buffered and buffered[-1][1] > buffered[0][1], f"the agent's buffer did not grow: {buffered}"
    assert invalid_seen, "/readyz never showed credential.valid == false"
    assert agent.metric_sum(REFRESHES, result="error") > 0, refresh_samples(agent)
    assert paused_stats["unauthorized"]["missing"] == 0, "requests went out without a token"

    # After it came back: everything arrives, exactly once.
    assert resumed, "nothing was forwarded after the token service came back"
    assert any(m["time"] > up_at for m in minted), "no token was fetched after the outage"
    assert_accounting(status)
    check_upstream(mlflow_server.url, experiment_name, read_json(out_path))
    assert _auth_failures(stats) == dict.fromkeys(("missing", "malformed", "bad_signature"), 0), stats
    assert_no_secrets(agent, gateway, min_tokens=3)


# -- tokens expiring every 5 s during a minute of training -------------------------------------------------------------


def test_a_minute_of_training_with_tokens_expiring_every_5s(
    *,
    make_gateway: GatewayFactory,
    no_tools: Path,
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Managed-identity tokens live 5 s; 3 % of MLflow calls are throttled. The client sees no error,
    every row arrives once, every renewal is a new token from the identity endpoint."""
    gateway = make_gateway(token_ttl=5.0, p_429=0.03, retry_after=1)
    agent = agent_factory(gateway.uri, *AGENT_ARGS, env=identity_env(gateway, no_tools))
    out_path = tmp_path / "out.json"
    wall = run_script(
        SCRIPT, experiment_name, str(out_path), "--seconds", "60", "--interval", "0.1",
        "--child-at-seconds", "20", "--read-every", "5",
        tracking_uri=agent.url, log_path=tmp_path / "script.log", timeout=SCRIPT_TIMEOUT,
    )  # fmt: skip
    status = agent.wait_drained(timeout=DRAIN_TIMEOUT)
    refreshes = refresh_samples(agent)
    ok = agent.metric_sum(REFRESHES, result="ok")
    stats = gateway.stats()
    out = read_json(out_path)
    minted = stats["minted_by_kind"].get("identity", 0)
    _report("tokens every 5 s", capsys, script=f"{wall:.1f}s", steps=out["steps"], reads=out["reads"],
            slowest=out["slowest"], minted=minted, refreshes=refreshes, gateway=stats)

    assert_accounting(status)
    check_upstream(mlflow_server.url, experiment_name, out)
    assert out["reads"] >= 10, out["reads"]
    assert _auth_failures(stats) == dict.fromkeys(("missing", "malformed", "bad_signature"), 0), stats
    assert stats["limit_refusals_total"] == 0, stats["limit_refusals"]
    assert stats["throttled"] > 0, "no 429 was injected: that part proved nothing"
    assert stats["identity"]["bad_header"] == 0, stats["identity"]
    # Renewed all along (a 5 s token over ~65 s of uploads), each renewal a token the agent then used.
    assert ok >= 10, refreshes
    assert minted >= 10, stats
    assert stats["distinct_tokens"] >= 10, stats
    assert agent.metric_sum(REFRESHES, result="error") == 0, refreshes
    assert_no_secrets(agent, gateway, min_tokens=10)
    # Each renewal counted is a token the identity endpoint minted (not azure-identity's cached one again).
    assert abs(ok - minted) <= max(2.0, 0.2 * minted), (
        f"{ok:.0f} renewals counted for {minted} tokens minted by the identity endpoint")
