"""Self-tests of tests/support/auth_gateway.py: the token scheme, the gateway process (against an
in-process aiohttp echo app and a real MLflow server), the token command scripts and the file rotator."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.auth_gateway import (
    REASONS,
    AuthGateway,
    TokenFileRotator,
    auth_gateways,
    bearer_token,
    check_token,
    mint_jwt,
    mint_token,
    read_issued,
    sign,
    token_expiry,
    token_fingerprint,
    token_signature,
    write_token_command,
)
from tests.support.mlflow_server import MlflowServer
from tests.support.ports import free_port
from tests.support.processes import REPO_ROOT, wait_until

SECRET = "gateway-self-test-secret"
GatewayFactory = Callable[..., AuthGateway]


# -- the token scheme ---------------------------------------------------------------------------------------


def test_mint_and_check_token() -> None:
    now = 1_700_000_000.0
    token = mint_token(SECRET, 60, now=now)
    exp, _, signature = token.partition(".")
    assert exp == str(int((now + 60) * 1000))
    assert signature == sign(SECRET, exp)
    assert len(signature) == 64
    assert token_expiry(token) == now + 60
    now_ms = int(now * 1000)
    assert check_token(SECRET, token, now_ms=now_ms) is None
    assert check_token(SECRET, token, now_ms=now_ms + 60_000) == "expired"
    assert check_token("another-secret", token, now_ms=now_ms) == "bad_signature"
    assert check_token(SECRET, token, now_ms=now_ms, revoke_before_ms=int(exp)) == "revoked"
    assert check_token(SECRET, token, now_ms=now_ms, revoke_before_ms=int(exp) - 1) is None
    for malformed in ("", "abc", f"{exp}.", f"{exp}.{signature[:-1]}", f"x{exp}.{signature}", signature):
        assert check_token(SECRET, malformed, now_ms=now_ms) == "bad_signature", malformed
    assert check_token(SECRET, mint_token(SECRET, -1)) == "expired"
    assert check_token(SECRET, mint_token(SECRET, 30)) is None
    assert token_fingerprint(token) != token_fingerprint(mint_token(SECRET, 61, now=now))
    assert token[-16:] not in token_fingerprint(token)


def test_jwt_tokens() -> None:
    now = 1_700_000_000.0
    token = mint_jwt(SECRET, 3600, now=now)
    header, payload, signature = token.split(".")
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {"alg": "HS256", "typ": "JWT"}
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["exp"] == int(now + 3600)
    assert token_expiry(token) == int(now + 3600)
    assert token_signature(token) == signature
    now_ms = int(now * 1000)
    assert check_token(SECRET, token, now_ms=now_ms) is None
    assert check_token(SECRET, token, now_ms=now_ms + 3_600_000) == "expired"
    assert check_token("another-secret", token, now_ms=now_ms) == "bad_signature"
    assert check_token(SECRET, token, now_ms=now_ms, revoke_before_ms=int(now + 3600) * 1000) == "revoked"
    tampered = f"{header}.{payload[:-2]}xy.{signature}"
    assert check_token(SECRET, tampered, now_ms=now_ms) == "bad_signature"
    assert check_token(SECRET, "a.b.c", now_ms=now_ms) == "bad_signature"
    assert check_token(SECRET, mint_jwt(SECRET, -5)) == "expired"


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    for value in (None, "", "Bearer", "Bearer ", "Basic dXNlcjpwdw==", "abc"):
        assert bearer_token(value) is None, value


# -- the gateway process --------------------------------------------------------------------------------------


@dataclass
class EchoApp:
    url: str
    seen: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
async def echo_app() -> AsyncIterator[EchoApp]:
    port = free_port()
    echo = EchoApp(url=f"http://127.0.0.1:{port}")

    async def handle(request: web.Request) -> web.Response:
        record = {
            "method": request.method,
            "raw_path": request.raw_path,
            "body": (await request.read()).decode(),
            "headers": dict(request.headers),
        }
        echo.seen.append(record)
        return web.json_response(record, status=int(request.headers.get("X-Status", "200")), headers={"X-Echo": "1"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield echo
    finally:
        await runner.cleanup()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayFactory]:
    """``factory(target, secret=SECRET, **opts) -> AuthGateway`` (started), stopped at teardown."""
    with auth_gateways(tmp_path) as make:

        def make_default(target: Any, secret: str = SECRET, **opts: Any) -> AuthGateway:
            return make(target, secret, **opts)

        yield make_default


async def _call(
    url: str,
    *,
    authorization: str | None = None,
    method: str = "POST",
    body: bytes = b'{"k": 1}',
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    headers = dict(headers or {})
    if authorization is not None:
        headers["Authorization"] = authorization
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.request(method, f"{url}/api/2.0/mlflow/runs/log-batch?a=1&b=x%20y", data=body, headers=headers) as r,
    ):
        return r.status, dict(r.headers), await r.json(content_type=None)


async def test_valid_tokens_are_forwarded(echo_app: EchoApp, gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(echo_app)
    token = gateway.mint(30)
    status, headers, seen = await _call(
        gateway.url, authorization=f"Bearer {token}", headers={"X-Status": "201", "Content-Type": "application/json"}
    )
    assert status == 201
    assert headers["X-Echo"] == "1"
    assert seen["method"] == "POST"
    assert seen["raw_path"] == "/api/2.0/mlflow/runs/log-batch?a=1&b=x%20y"
    assert seen["body"] == '{"k": 1}'
    assert "Authorization" not in seen["headers"], "the gateway consumes the credential"
    assert seen["headers"]["Content-Type"] == "application/json"

    await _call(gateway.url, authorization=f"bearer {token}", method="GET", body=b"")
    stats = gateway.stats()
    assert stats["forwarded"] == 2
    assert stats["distinct_tokens"] == 1
    await _call(gateway.url, authorization=f"Bearer {gateway.mint(31)}")
    status, _, _ = await _call(gateway.url, authorization=f"Bearer {mint_jwt(SECRET, 30)}")
    assert status == 200
    stats = gateway.stats()
    assert stats["requests"] == stats["forwarded"] == 4
    assert stats["distinct_tokens"] == 3
    assert stats["unauthorized_total"] == 0
    assert stats["last_forwarded_at"] == pytest.approx(time.time(), abs=30)
    log = gateway.request_log()
    assert [e["outcome"] for e in log] == ["forwarded"] * 4
    assert log[0]["token_id"] == token_fingerprint(token)
    assert log[0]["token_exp"] == token_expiry(token)
    assert token not in gateway.request_log_path.read_text(), "the gateway's own log never holds tokens"


def _assert_envelope(status: int, headers: dict[str, str], body: Any, expected_status: int, reason: str) -> None:
    assert status == expected_status, body
    assert set(body) == {"error", "correlation"}, body
    error = body["error"]
    assert error["code"] == {401: "Unauthorized", 403: "Forbidden"}[expected_status]
    assert isinstance(error["message"], str) and error["message"]
    assert error["innerError"]["code"] == reason
    correlation = body["correlation"]
    uuid.UUID(correlation["operation"])
    uuid.UUID(correlation["request"])
    assert headers["x-ms-request-id"] == correlation["request"] == error["innerError"]["request-id"]
    assert headers["WWW-Authenticate"].startswith("Bearer ")
    assert headers["Content-Type"].startswith("application/json")


async def test_refusals_carry_the_azure_envelope(echo_app: EchoApp, gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(echo_app)
    expired = mint_token(SECRET, -1)
    forged = mint_token("not-the-secret", 60)
    cases = [
        (None, "missing"),
        ("Basic dXNlcjpwYXNz", "missing"),
        ("Bearer", "missing"),
        (f"Bearer {expired}", "expired"),
        (f"Bearer {forged}", "bad_signature"),
        ("Bearer not-a-token", "bad_signature"),
        (f"Bearer {gateway.mint(60)[:-2]}", "bad_signature"),
        (f"Bearer {mint_jwt('not-the-secret', 60)}", "bad_signature"),
        (f"Bearer {mint_jwt(SECRET, -1)}", "expired"),
    ]
    request_ids = set()
    for authorization, reason in cases:
        status, headers, body = await _call(gateway.url, authorization=authorization)
        _assert_envelope(status, headers, body, 401, reason)
        request_ids.add(headers["x-ms-request-id"])
        if authorization is not None:
            credential = authorization.partition(" ")[2]
            assert not credential or credential not in json.dumps(body) + json.dumps(headers)
    assert len(request_ids) == len(cases), "every refusal has its own request id"
    assert echo_app.seen == [], "nothing unauthenticated reaches the target"
    stats = gateway.stats()
    assert stats["unauthorized"] == {"missing": 3, "expired": 2, "bad_signature": 4, "revoked": 0}
    assert set(stats["unauthorized"]) == set(REASONS)
    assert stats["unauthorized_total"] == len(cases)
    assert stats["forwarded"] == stats["throttled"] == stats["distinct_tokens"] == 0
    assert [e["reason"] for e in gateway.request_log()] == [reason for _, reason in cases]


async def test_revocation_and_403(echo_app: EchoApp, gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(echo_app, reject_status=403)
    old = gateway.mint(600)
    status, _, _ = await _call(gateway.url, authorization=f"Bearer {old}")
    assert status == 200
    gateway.revoke_issued(600)
    status, headers, body = await _call(gateway.url, authorization=f"Bearer {old}")
    _assert_envelope(status, headers, body, 403, "revoked")
    await asyncio.sleep(0.01)
    status, _, _ = await _call(gateway.url, authorization=f"Bearer {gateway.mint(600)}")
    assert status == 200
    gateway.set(reject_status=401)
    status, headers, body = await _call(gateway.url, authorization=f"Bearer {old}")
    _assert_envelope(status, headers, body, 401, "revoked")
    gateway.set(revoke_before_ms=0)  # from here on: the revocation list
    jwt = mint_jwt(SECRET, 600)
    status, _, _ = await _call(gateway.url, authorization=f"Bearer {jwt}")
    assert status == 200
    fresh = gateway.mint(600)  # minted before the revocation but not yet seen: stays valid
    assert gateway.revoke_seen() == 3
    for token in (jwt, old):
        status, headers, body = await _call(gateway.url, authorization=f"Bearer {token}")
        _assert_envelope(status, headers, body, 401, "revoked")
    status, _, _ = await _call(gateway.url, authorization=f"Bearer {fresh}")
    assert status == 200
    stats = gateway.stats()
    assert stats["unauthorized"]["revoked"] == 4
    assert stats["forwarded"] == 4
    assert stats["distinct_tokens"] == 4
    with pytest.raises(ValueError, match="unknown gateway settings"):
        gateway.set(p_bogus=1.0)
    with pytest.raises(ValueError, match="reject_status"):
        gateway.set(reject_status=500)


async def test_throttling_with_retry_after(echo_app: EchoApp, gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(echo_app, p_429=1.0, retry_after=3)
    token = gateway.mint(60)
    status, headers, body = await _call(gateway.url, authorization=f"Bearer {token}")
    assert status == 429
    assert headers["Retry-After"] == "3"
    assert body["error"]["code"] == "TooManyRequests"
    assert headers["x-ms-request-id"] == body["correlation"]["request"]
    status, _, _ = await _call(gateway.url)  # authentication comes first
    assert status == 401
    assert echo_app.seen == []
    assert gateway.set(p_429=0.0)["p_429"] == 0.0
    status, _, _ = await _call(gateway.url, authorization=f"Bearer {token}")
    assert status == 200
    stats = gateway.stats()
    assert (stats["throttled"], stats["forwarded"], stats["unauthorized"]["missing"]) == (1, 1, 1)


async def test_upstream_down_gives_502(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(f"http://127.0.0.1:{free_port()}")
    status, _, body = await _call(gateway.url, authorization=f"Bearer {gateway.mint(60)}")
    assert status == 502
    assert body["error"]["code"] == "BadGateway"
    assert gateway.stats()["upstream_error"] == 1


def test_real_mlflow_server_behind_the_gateway(
    mlflow_server: MlflowServer,
    gateway_factory: GatewayFactory,
    experiment_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    gateway = gateway_factory(mlflow_server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    with pytest.raises(MlflowException, match=r"401|Unauthorized"):
        MlflowClient(tracking_uri=gateway.url).create_experiment(experiment_name)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", gateway.mint(60))
    client = MlflowClient(tracking_uri=gateway.url)
    experiment_id = client.create_experiment(experiment_name)
    run = client.create_run(experiment_id, run_name="through-the-gateway")
    client.log_metric(run.info.run_id, "m", 1.5, step=3)
    direct = MlflowClient(tracking_uri=mlflow_server.url)
    assert [(m.value, m.step) for m in direct.get_metric_history(run.info.run_id, "m")] == [(1.5, 3)]
    stats = gateway.stats()
    assert stats["forwarded"] >= 3
    assert stats["unauthorized"]["missing"] >= 1
    assert stats["distinct_tokens"] == 1


def test_gateway_cli_rejects_bad_settings() -> None:
    base = [sys.executable, "-m", "tests.support.auth_gateway", "--listen", f"127.0.0.1:{free_port()}"]
    for extra, message in (
        (["--target", "http://127.0.0.1:1", "--secret", "s", "--p-429", "1.5"], "p_429"),
        (["--target", "http://127.0.0.1:1", "--secret", "", "--p-429", "0"], "secret"),
        (["--target", "http://127.0.0.1:1", "--secret", "s", "--reject-status", "500"], "reject_status"),
    ):
        result = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT)
        assert result.returncode == 2, result
        assert message in result.stderr


# -- token sources ---------------------------------------------------------------------------------------------


def _run_command(path: Path) -> subprocess.CompletedProcess[str]:
    # Run as the agent would: the file itself (its shebang names this interpreter), no shell.
    return subprocess.run([str(path)], capture_output=True, text=True, timeout=60, check=False, cwd=path.parent)


def test_token_command_outputs(tmp_path: Path) -> None:
    issued = tmp_path / "issued.txt"
    for output in ("expires_in", "expires_at", "text", "jwt"):
        script = write_token_command(tmp_path / f"token-{output}", SECRET, 5, output=output, issued_log=issued)
        assert os.access(script, os.X_OK)
        assert script.read_text().startswith(f"#!{sys.executable}\n")
        before = time.time()
        result = _run_command(script)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        if output == "jwt":
            [token] = lines
            assert token.count(".") == 2
        elif output == "text":
            assert len(lines) == 2
            token, expires_at = lines[0], int(lines[1])
            assert expires_at == int(token_expiry(token))
        else:
            [line] = lines
            payload = json.loads(line)
            token = payload["token"]
            if output == "expires_in":
                assert payload == {"token": token, "expires_in": 5}
            else:
                assert payload == {"token": token, "expires_at": int(token_expiry(token))}
                assert isinstance(payload["expires_at"], int)
        assert check_token(SECRET, token) is None
        assert int(before) + 5 <= token_expiry(token) <= time.time() + 5
        assert read_issued(issued)[-1] == token
    assert len(set(read_issued(issued))) == 4
    fractional = write_token_command(tmp_path / "fractional", SECRET, 2.5)
    assert json.loads(_run_command(fractional).stdout)["expires_in"] == 2.5


def test_token_command_fails_while_the_flag_exists(tmp_path: Path) -> None:
    issued, flag = tmp_path / "issued.txt", tmp_path / "down"
    script = write_token_command(tmp_path / "token-cmd", SECRET, 3, issued_log=issued, fail_flag=flag)
    flag.touch()
    result = _run_command(script)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "unavailable" in result.stderr
    assert read_issued(issued) == []
    flag.unlink()
    result = _run_command(script)
    assert result.returncode == 0
    assert read_issued(issued) == [json.loads(result.stdout)["token"]]


def test_token_file_rotator(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "token"
    rotator = TokenFileRotator(path, SECRET, ttl=4, every=0.2)
    with rotator:
        assert path.read_text() == rotator.tokens[0] + "\n", "the first token is there on entering"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while len(seen) < 4 and time.monotonic() < deadline:
            content = path.read_text()
            assert content.endswith("\n") and content.count("\n") == 1, repr(content)  # never torn
            token = content.strip()
            assert check_token(SECRET, token) is None
            assert token in rotator.tokens
            seen.add(token)
            time.sleep(0.01)
        assert len(seen) >= 4
    count = rotator.rotations
    time.sleep(0.5)
    assert rotator.rotations == count, "no rotation after the context exits"
    assert path.read_text().strip() == rotator.tokens[-1]
    assert sorted(p.name for p in path.parent.iterdir()) == ["token"], "no temp files left"
    assert len(set(rotator.tokens)) == len(rotator.tokens)
    expiries = [token_expiry(t) for t in rotator.tokens]
    assert expiries == sorted(expiries)


def test_token_file_rotator_cadence(tmp_path: Path) -> None:
    with TokenFileRotator(tmp_path / "token", SECRET, ttl=10, every=0.5) as rotator:
        wait_until(lambda: rotator.rotations >= 3, 30, message="two rotations")
    expiries = [token_expiry(t) for t in rotator.tokens]
    gaps = [b - a for a, b in itertools.pairwise(expiries)]
    assert all(0.3 < gap < 5 for gap in gaps), gaps
