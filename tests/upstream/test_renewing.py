"""Renewal of expiring credentials, and the token-file / token-command sources (real files, real commands)."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from pathlib import Path

import pytest

from agent.ops.metrics import AgentMetrics
from agent.upstream.renewing import CredentialError, RenewingUpstream, Token, jwt_expiry, renew_at
from agent.upstream.token_sources import TokenCommandSource, TokenFileSource, parse_command_output


def _jwt(claims: dict[str, object]) -> str:
    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


@pytest.mark.parametrize(("lifetime", "expected_offset"), [
    (3600.0, 2880.0),   # 80 % comes first
    (1000.0, 700.0),    # 5 minutes before expiry comes first
    (5.0, 4.0),         # too short for 5 minutes of lead: 80 %
])
def test_renew_at(lifetime: float, expected_offset: float) -> None:
    token = Token("t", 1000.0 + lifetime, 1000.0)
    assert renew_at(token) == pytest.approx(1000.0 + expected_offset)
    assert renew_at(Token("t", None, 1000.0)) is None


def test_jwt_expiry_is_read_without_verifying() -> None:
    assert jwt_expiry(_jwt({"exp": 1_900_000_000, "aud": "x"})) == 1_900_000_000
    assert jwt_expiry(_jwt({"aud": "x"})) is None
    assert jwt_expiry("opaque-token") is None
    assert jwt_expiry("a.!!!.c") is None


def test_command_output_forms() -> None:
    assert parse_command_output(b'{"token": "abc", "expires_at": 2000}', now=1000) == Token("abc", 2000.0, 1000)
    assert parse_command_output(b'{"token": "abc", "expires_in": 60}\n', now=1000) == Token("abc", 1060.0, 1000)
    assert parse_command_output(b"abc\n1500\n", now=1000) == Token("abc", 1500.0, 1000)
    assert parse_command_output(b"abc", now=1000) == Token("abc", None, 1000)
    jwt = _jwt({"exp": 1234})
    assert parse_command_output(jwt.encode(), now=1000).expires_at == 1234
    for bad in (b"", b"{", b'{"token": 5}', b"a b", b"abc\nsoon", b"\xff"):
        with pytest.raises(CredentialError) as info:
            parse_command_output(bad, now=1000)
        assert "abc" not in str(info.value)  # errors never carry the token


async def test_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    source = TokenFileSource(path)
    assert (await source.fetch()).value == "first"
    assert not source.changed()
    path.write_text("second-and-longer\n")
    assert source.changed()
    assert (await source.fetch()).value == "second-and-longer"
    path.unlink()
    with pytest.raises(CredentialError, match="cannot read"):
        await source.fetch()


async def test_token_command_runs_without_a_shell_and_reports_failures(tmp_path: Path) -> None:
    ok = TokenCommandSource(f'{sys.executable} -c "print(\'tok-1\'); print(9999999999)"')
    assert await ok.fetch() == Token("tok-1", 9999999999.0, pytest.approx(time.time(), abs=5))  # type: ignore[arg-type]
    failing = TokenCommandSource(f'{sys.executable} -c "import sys; sys.exit(3)"')
    with pytest.raises(CredentialError, match="exited 3"):
        await failing.fetch()
    with pytest.raises(CredentialError, match="cannot start"):
        await TokenCommandSource(str(tmp_path / "missing")).fetch()


class ScriptedSource:
    """Hands out t1, t2, ... each valid for ``ttl`` seconds; fails while ``failing`` is set."""

    name = "scripted"

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.issued = 0
        self.failing = False

    def changed(self) -> bool:
        return False

    async def fetch(self) -> Token:
        if self.failing:
            raise CredentialError("token service down")
        self.issued += 1
        now = time.time()
        return Token(f"t{self.issued}", now + self.ttl, now)


async def test_tokens_are_renewed_before_they_expire() -> None:
    metrics = AgentMetrics()
    source = ScriptedSource(ttl=0.5)
    provider = RenewingUpstream("http://upstream", source, metrics, ssl_context=True)
    await provider.start()
    try:
        seen = set()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            creds = await asyncio.wait_for(provider.credentials(), 1.0)
            assert creds.expires_at is not None and creds.expires_at > time.time()
            seen.add(creds.headers["Authorization"])
            await asyncio.sleep(0.05)
        assert len(seen) >= 3  # renewed every ~0.4 s, never handing out an expired token
        ok = metrics.registry.get_sample_value("mlflow_agent_credential_refreshes_total",
                                               {"source": "scripted", "result": "ok"})
        assert ok is not None and ok >= 3
    finally:
        await provider.stop()


async def test_without_a_valid_token_credentials_wait_and_resume() -> None:
    metrics = AgentMetrics()
    source = ScriptedSource(ttl=0.3)
    provider = RenewingUpstream("http://upstream", source, metrics, ssl_context=True)
    await provider.start()
    try:
        source.failing = True
        await asyncio.sleep(0.5)  # the token expired and renewals fail
        assert provider.state()["valid"] is False
        assert provider.state()["last_error"] == "token service down"
        waiting = asyncio.ensure_future(provider.credentials())
        await asyncio.sleep(0.2)
        assert not waiting.done()  # uploads pause here
        source.failing = False
        creds = await asyncio.wait_for(waiting, 5.0)
        assert creds.headers["Authorization"].startswith("Bearer t")
        errors = metrics.registry.get_sample_value("mlflow_agent_credential_refreshes_total",
                                                   {"source": "scripted", "result": "error"})
        assert errors is not None and errors >= 1
    finally:
        await provider.stop()


async def test_concurrent_refreshes_share_one_fetch() -> None:
    source = ScriptedSource(ttl=60)
    offset = [0.0]
    provider = RenewingUpstream("http://upstream", source, AgentMetrics(), ssl_context=True,
                                clock=lambda: time.time() + offset[0])
    await provider.start()
    try:
        issued = source.issued
        # A burst of 401s right after a renewal: the fresh token is reused, the source is not asked again.
        await asyncio.gather(*(provider.refresh("401") for _ in range(10)))
        assert source.issued == issued
        offset[0] = 2.0  # a while later: one renewal, shared by all concurrent callers
        await asyncio.gather(*(provider.refresh("401") for _ in range(10)))
        assert source.issued == issued + 1
    finally:
        await provider.stop()
