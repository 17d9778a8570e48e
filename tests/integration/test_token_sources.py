"""Upstream credentials that expire: the agent's ``--token-file`` and ``--token-command``.

agent -> auth gateway (tests/support/auth_gateway.py: forwards only requests with a valid, unexpired
HMAC bearer token, else 401/403 with Azure's error envelope) -> real MLflow server. A training script
(scripts/token_train.py, plain MLflow client, ~20 steps a second) runs against the agent while the
tokens it needs expire every few seconds. Whatever happens to the tokens, the script sees no error,
and once the agent has drained the server holds every run, param, tag and metric row exactly once.
After each run no token the test minted may appear in the agent's logs, /metrics, /status, /readyz,
``python -m agent status`` or its spool files.
"""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

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
from tests.support.auth_gateway import (
    AuthGateway,
    TokenFileRotator,
    auth_gateways,
    read_issued,
    token_expiry,
    token_fingerprint,
    token_signature,
    write_token_command,
)
from tests.support.mlflow_server import MlflowServer
from tests.support.processes import REPO_ROOT, python_env, stop_process, wait_until
from tests.support.snapshot import duplicate_rows, is_user_tag, metric_rows

pytestmark = pytest.mark.integration

SCRIPT = "token_train.py"
SECRET = "integration-gateway-secret-4f1c"
REFRESHES = "mlflow_agent_credential_refreshes_total"
EXPIRY = "mlflow_agent_credential_expiry_timestamp_seconds"
AGENT_ARGS = (
    "--retry-initial-backoff", "100ms",
    "--retry-max-backoff", "1s",
    "--request-timeout", "5s",
    "--create-run-timeout", "1s",
    "--upload-linger", "50ms",
    "--drain-timeout", "5s",
    "--log-level", "debug",  # later than AgentProcess's own --log-level: the most a log could leak
)  # fmt: skip
SCRIPT_TIMEOUT = 180.0
DRAIN_TIMEOUT = 90.0


@pytest.fixture
def make_gateway(tmp_path: Path, mlflow_server: MlflowServer) -> Iterator[Any]:
    """``make_gateway(**opts) -> AuthGateway`` in front of the session MLflow server, checking SECRET."""
    with auth_gateways(tmp_path / "gateways") as make:

        def gateway(**opts: Any) -> AuthGateway:
            return make(mlflow_server, SECRET, **opts)

        yield gateway


# -- checks ---------------------------------------------------------------------------------------------------


def check_upstream(url: str, experiment: str, out: dict[str, Any]) -> None:
    """The server holds exactly the two runs the script logged: names, parent link, params, user tags,
    FINISHED, and every metric row once."""
    logged_runs: dict[str, dict[str, Any]] = out["runs"]
    runs = all_runs(url, experiment)
    assert len(runs) == len(logged_runs), [(r.info.run_id, r.info.run_name) for r in runs]
    upstream = match_client_runs(runs, {label: r["run_id"] for label, r in logged_runs.items()})
    for label, logged in logged_runs.items():
        run = upstream[label]
        assert run.info.run_name == logged["name"], label
        assert run.info.status == "FINISHED", (label, run.info.status)
        assert run.data.params == logged["params"], label
        assert {k: v for k, v in run.data.tags.items() if is_user_tag(k)} == logged["tags"], label
        expected = expected_rows(logged["metrics"])
        assert sorted(run.data.metrics) == sorted(expected), label
        for key, rows in expected.items():
            stored = metric_rows(url, run.info.run_id, key)
            assert duplicate_rows(stored) == {}, (label, key, len(stored))
            assert stored == rows, f"{label}/{key}: {len(stored)} rows upstream, {len(rows)} logged"
    assert upstream["parent"].data.tags.get(PARENT_TAG) is None
    assert upstream["child"].data.tags.get(PARENT_TAG) == upstream["parent"].info.run_id


def refresh_samples(agent: AgentProcess) -> dict[str, float]:
    """Every sample of the refresh counter, keyed as printed."""
    return {k: v for k, v in agent.metrics().items() if k.startswith(REFRESHES)}


def gateway_tokens_used(gateway: AuthGateway) -> list[str]:
    """Fingerprints of the tokens of forwarded requests, in order of first use."""
    seen: dict[str, None] = {}
    for event in gateway.request_log():
        if event.get("outcome") == "forwarded":
            seen.setdefault(event["token_id"], None)
    return list(seen)


def assert_no_token_leaks(agent: AgentProcess, tokens: Sequence[str]) -> None:
    """No token (nor its signature, nor the first 16 characters of it) appears in what the agent
    exposes or writes: its logs, /metrics, /status, /readyz, /healthz, ``status`` (text and --json)
    and the files of its spool."""
    assert len(tokens) >= 2, "no tokens to look for: the check would prove nothing"
    places: dict[str, str] = {}
    for path in agent.log_paths:
        places[f"log {path.name}"] = path.read_text(errors="replace")
    for endpoint in ("/metrics", "/status", "/readyz", "/healthz"):
        places[endpoint] = agent.get(endpoint).text
    for extra in ((), ("--json",)):
        result = subprocess.run(
            [sys.executable, "-m", "agent", "status", "--http", f"127.0.0.1:{agent.port}", *extra],
            capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT, env=python_env(),
        )  # fmt: skip
        assert result.returncode == 0, result
        places[f"agent status {' '.join(extra)}".strip()] = result.stdout + result.stderr
    for path in sorted(agent.spool_dir.rglob("*")):
        if path.is_file():
            places[f"spool {path.relative_to(agent.spool_dir)}"] = path.read_bytes().decode("latin-1")
    assert json.loads(places["agent status --json"])["buffered_records"] == 0
    leaks: list[str] = []
    for token in tokens:
        signature = token_signature(token)
        for needle in (token, signature, signature[:16]):
            where = [name for name, text in places.items() if needle in text]
            if where:
                leaks.append(f"token {token_fingerprint(token)} ({len(needle)} chars of it) in {where}")
                break
    assert not leaks, "tokens leaked:\n  " + "\n  ".join(leaks)


def _report(label: str, capsys: pytest.CaptureFixture[str], **facts: Any) -> None:
    with capsys.disabled():
        print(f"\n[{label}] " + "; ".join(f"{k}: {v}" for k, v in facts.items()))


# -- the tests ----------------------------------------------------------------------------------------------


def test_token_file_rotated_during_a_run(
    *,
    make_gateway: Any,
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Tokens live 4 s; a new one is written (atomically) every 2 s. The agent must follow the file."""
    gateway = make_gateway()
    token_file = tmp_path / "secrets" / "upstream-token"
    out_path = tmp_path / "out.json"
    with TokenFileRotator(token_file, SECRET, ttl=4, every=2) as rotator:
        agent = agent_factory(gateway, "--token-file", str(token_file), *AGENT_ARGS)
        wall = run_script(
            SCRIPT, experiment_name, str(out_path), "--steps", "350", "--sleep", "0.05", "--child-at", "150",
            tracking_uri=agent.url, log_path=tmp_path / "script.log", timeout=SCRIPT_TIMEOUT,
        )  # fmt: skip
        status = agent.wait_drained(timeout=DRAIN_TIMEOUT)
        refreshes = refresh_samples(agent)
        refreshes_ok = agent.metric_sum(REFRESHES, result="ok")
    stats = gateway.stats()
    used = gateway_tokens_used(gateway)
    _report(
        "token file",
        capsys,
        script=f"{wall:.1f}s",
        tokens_written=rotator.rotations,
        tokens_used=len(used),
        gateway=stats,
        refreshes=refreshes,
    )

    assert_accounting(status)
    check_upstream(mlflow_server.url, experiment_name, read_json(out_path))
    written = {token_fingerprint(t) for t in rotator.tokens}
    assert set(used) <= written, "the agent sent a token that was never in the file"
    assert stats["distinct_tokens"] >= 3, stats
    assert stats["unauthorized"]["missing"] == 0, "the agent sent requests without a token"
    assert stats["unauthorized"]["bad_signature"] == 0, "the agent sent a mangled token"
    assert refreshes_ok >= 2, refreshes
    assert_no_token_leaks(agent, rotator.tokens)


def test_token_command_with_short_expiry(
    *,
    make_gateway: Any,
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The command prints ``{"token": ..., "expires_in": 3}``: the agent must run it again and again."""
    gateway = make_gateway()
    issued = tmp_path / "issued-tokens.txt"
    command = write_token_command(tmp_path / "bin" / "get-token", SECRET, 3, issued_log=issued)
    agent = agent_factory(gateway, "--token-command", str(command), *AGENT_ARGS)
    out_path = tmp_path / "out.json"
    wall = run_script(
        SCRIPT, experiment_name, str(out_path), "--steps", "240", "--sleep", "0.05", "--child-at", "100",
        tracking_uri=agent.url, log_path=tmp_path / "script.log", timeout=SCRIPT_TIMEOUT,
    )  # fmt: skip
    status = agent.wait_drained(timeout=DRAIN_TIMEOUT)
    refreshes = refresh_samples(agent)
    refreshes_ok = agent.metric_sum(REFRESHES, result="ok")
    expiry_gauge = agent.metric_sum(EXPIRY)
    tokens = read_issued(issued)
    stats = gateway.stats()
    expiries = [token_expiry(t) for t in tokens]
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(expiries)]
    _report(
        "token command",
        capsys,
        script=f"{wall:.1f}s",
        tokens_issued=len(tokens),
        median_gap_between_tokens=f"{statistics.median(gaps):.2f}s" if gaps else None,
        gateway=stats,
        refreshes=refreshes,
    )

    assert_accounting(status)
    check_upstream(mlflow_server.url, experiment_name, read_json(out_path))
    assert set(gateway_tokens_used(gateway)) <= {token_fingerprint(t) for t in tokens}
    assert stats["distinct_tokens"] >= 3, stats
    assert stats["unauthorized"]["missing"] == 0, "the agent sent requests without a token"
    assert stats["unauthorized"]["bad_signature"] == 0, "the agent sent a mangled token"
    assert refreshes_ok >= 3, refreshes
    # The gauge names the expiry of a token the command printed (to the rounding of "now + 3 s").
    assert any(abs(expiry_gauge - e) < 2.0 for e in expiries[-3:]), (expiry_gauge, expiries[-3:])
    assert_no_token_leaks(agent, tokens)


def test_token_refused_early_is_renewed_on_403(
    *,
    make_gateway: Any,
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The command prints a bare one-hour JWT (its ``exp`` claim the only statement of its expiry). The
    gateway revokes it in the middle of the run and answers 403. Nothing is due for renewal, so only the
    403 can make the agent run the command again."""
    gateway = make_gateway(reject_status=403)
    issued = tmp_path / "issued-tokens.txt"
    command = write_token_command(tmp_path / "bin" / "get-token", SECRET, 3600, output="jwt", issued_log=issued)
    agent = agent_factory(gateway, "--token-command", str(command), *AGENT_ARGS)
    out_path, log_path = tmp_path / "out.json", tmp_path / "script.log"
    proc = start_script(
        SCRIPT, experiment_name, str(out_path), "--steps", "120", "--sleep", "0.05", "--child-at", "90",
        tracking_uri=agent.url, log_path=log_path,
    )  # fmt: skip
    try:
        wait_until(lambda: gateway.stats()["forwarded"] >= 10, 120, message="uploads through the gateway", proc=proc)
        assert len(read_issued(issued)) == 1, "a one-hour token was renewed early"
        gateway.revoke_seen()
        revoked_at = time.time()
        finish_script(proc, log_path, timeout=SCRIPT_TIMEOUT)
    finally:
        stop_process(proc, timeout=5)  # a no-op unless something above failed
    status = agent.wait_drained(timeout=DRAIN_TIMEOUT)
    expiry_gauge = agent.metric_sum(EXPIRY)
    stats = gateway.stats()
    tokens = read_issued(issued)
    log = gateway.request_log()
    after = [e for e in log if e.get("time", 0) >= revoked_at and e.get("outcome") == "forwarded"]
    _report("403 renewal", capsys, tokens_issued=len(tokens), gateway=stats, refreshes=refresh_samples(agent))

    assert_accounting(status)
    check_upstream(mlflow_server.url, experiment_name, read_json(out_path))
    assert stats["unauthorized"]["revoked"] >= 1, "the revocation was never noticed: nothing tested"
    assert len(tokens) >= 2, "the agent never ran the token command after the 403"
    assert after, "nothing was forwarded after the revocation"
    assert {e["token_id"] for e in after} <= {token_fingerprint(t) for t in tokens[1:]}
    assert agent.metric_sum(REFRESHES, result="ok") >= 2
    assert stats["unauthorized"]["missing"] == stats["unauthorized"]["bad_signature"] == 0, stats
    assert expiry_gauge == token_expiry(tokens[-1]), "the JWT's exp claim was not taken as its expiry"
    assert_no_token_leaks(agent, tokens)


GRACE = 2.0  # after the last token's expiry, for requests already in flight
OBSERVE = 3.0  # how long the paused state is watched


def test_token_service_down_pauses_uploads_then_recovers(
    *,
    make_gateway: Any,
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The token command (plain text, 3 s tokens) starts failing (exit 1) while the script runs; the
    last token expires. Client writes must still be taken, nothing may go out without a valid token,
    nothing may be dropped; once the command works again everything arrives exactly once."""
    gateway = make_gateway()
    issued, down_flag = tmp_path / "issued-tokens.txt", tmp_path / "token-service-down"
    command = write_token_command(
        tmp_path / "bin" / "get-token", SECRET, 3, output="text", issued_log=issued, fail_flag=down_flag
    )
    agent = agent_factory(gateway, "--token-command", str(command), *AGENT_ARGS)
    out_path, log_path = tmp_path / "out.json", tmp_path / "script.log"
    proc = start_script(
        SCRIPT, experiment_name, str(out_path), "--steps", "240", "--sleep", "0.05", "--child-at", "80",
        tracking_uri=agent.url, log_path=log_path,
    )  # fmt: skip
    try:
        wait_until(lambda: gateway.stats()["forwarded"] >= 5, 120, message="uploads through the gateway", proc=proc)
        down_flag.touch()
        went_down = time.time()

        def last_token_long_expired() -> bool:
            expiries = [token_expiry(t) for t in read_issued(issued)]
            return time.time() > max(expiries) + GRACE and agent.metric_sum(REFRESHES, result="error") > 0

        wait_until(last_token_long_expired, 60, interval=0.2, message="the last token to expire", proc=proc)
        paused_from = max(token_expiry(t) for t in read_issued(issued)) + GRACE
        received_before = agent.status()["totals"]["received"]
        time.sleep(OBSERVE)
        paused = agent.status()
        paused_stats = gateway.stats()
        came_back = time.time()
        down_flag.unlink()
        finish_script(proc, log_path, timeout=SCRIPT_TIMEOUT)
    finally:
        stop_process(proc, timeout=5)  # a no-op unless something above failed
    status = agent.wait_drained(timeout=DRAIN_TIMEOUT)
    drained = time.time()
    stats = gateway.stats()
    log = [e for e in gateway.request_log() if "outcome" in e]
    while_paused = [e for e in log if paused_from <= e["time"] <= came_back]
    resumed = [e["time"] for e in log if e["time"] > came_back and e["outcome"] == "forwarded"]
    tokens = read_issued(issued)
    out = read_json(out_path)
    calls_while_paused = [(name, secs) for name, secs, started in out["calls"] if paused_from <= started <= came_back]
    slowest = max(calls_while_paused, key=lambda c: c[1], default=None)
    _report(
        "token service down",
        capsys,
        down_for=f"{came_back - went_down:.1f}s",
        first_upload_after_recovery=f"{resumed[0] - came_back:.1f}s" if resumed else None,
        drained_after_recovery=f"{drained - came_back:.1f}s",
        buffered_while_paused=paused["buffered_records"],
        client_calls_while_paused=len(calls_while_paused),
        slowest_call_while_paused=slowest,
        requests_while_paused=len(while_paused),
        gateway=stats,
        refreshes=refresh_samples(agent),
    )

    # While the token service was down: writes taken (at once: the nested start_run waits for at most
    # --create-run-timeout 1s) and kept, nothing sent without a valid token.
    assert len(calls_while_paused) >= 10, "the script made (almost) no calls while uploads were paused"
    assert slowest is not None and slowest[1] < 2.5, f"a client call blocked while uploads were paused: {slowest}"
    assert paused["totals"]["received"] > received_before, "the agent stopped taking client writes"
    assert paused["buffered_records"] > 0, paused
    assert paused["totals"].get("dropped", 0) == 0, paused["totals"]
    assert paused["totals"].get("dead_lettered", 0) == 0, paused["totals"]
    assert paused_stats["unauthorized"]["missing"] == 0, "requests went out without a token"
    assert while_paused == [], f"the agent sent requests with no valid token to send: {while_paused[:5]}"
    assert agent.metric_sum(REFRESHES, result="error") > 0

    # After it came back: everything arrives, exactly once.
    assert resumed, "nothing was forwarded after the token service came back"
    assert_accounting(status)
    check_upstream(mlflow_server.url, experiment_name, out)
    assert len(tokens) >= 2
    assert agent.metric_sum(REFRESHES, result="ok") >= 2
    assert stats["unauthorized"]["bad_signature"] == 0, stats
    assert_no_token_leaks(agent, tokens)
