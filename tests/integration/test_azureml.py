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

import time
from pathlib import Path

import pytest
import requests

from tests.conftest import AgentFactory
from tests.integration.azure_helpers import (
    AGENT_ARGS,
    DRAIN_TIMEOUT,
    REFRESHES,
    SCRIPT,
    SCRIPT_TIMEOUT,
    GatewayFactory,
    assert_no_secrets,
    auth_failures,
    check_run,
    check_upstream,
    identity_env,
    refresh_samples,
    report,
)
from tests.integration.helpers import (
    all_runs,
    assert_accounting,
    finish_script,
    match_client_runs,
    read_json,
    run_script,
    start_script,
)
from tests.support.mlflow_server import MlflowServer
from tests.support.processes import stop_process, wait_until
from tests.support.snapshot import duplicate_rows, metric_rows

pytestmark = pytest.mark.integration


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
    report("limits", capsys, log_batches=stats["forwarded_by_endpoint"].get("runs/log-batch"),
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
    report("job run token", capsys, steps=out["steps"], history=stats["history"], identity=stats["identity"],
            minted=stats["minted_by_kind"], refreshes=refreshes, unauthorized=stats["unauthorized"])

    assert out["runs"]["parent"]["run_id"] == job_run, "the script did not log to the job's run"
    assert stats["history"]["renewals"] >= 3, stats["history"]
    assert stats["history"]["refused"] == 0, stats["history"]
    assert stats["identity"]["requests"] == 0, "the identity endpoint was used inside a job"
    assert agent.metric_sum(REFRESHES, source="azureml_run_token", result="ok") >= 3, refreshes
    assert agent.metric_sum(REFRESHES, result="error") == 0, refreshes
    assert auth_failures(stats) == dict.fromkeys(("missing", "malformed", "bad_signature"), 0), stats
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
    report("token service down", capsys, outage=f"{up_at - down_at:.1f}s",
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
    assert auth_failures(stats) == dict.fromkeys(("missing", "malformed", "bad_signature"), 0), stats
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
    report("tokens every 5 s", capsys, script=f"{wall:.1f}s", steps=out["steps"], reads=out["reads"],
            slowest=out["slowest"], minted=minted, refreshes=refreshes, gateway=stats)

    assert_accounting(status)
    check_upstream(mlflow_server.url, experiment_name, out)
    assert out["reads"] >= 10, out["reads"]
    assert auth_failures(stats) == dict.fromkeys(("missing", "malformed", "bad_signature"), 0), stats
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
