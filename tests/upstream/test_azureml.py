"""Azure ML upstreams: azureml:// URIs, azure-identity tokens from a local managed-identity endpoint, and
run tokens renewed against a local run-history endpoint over real TLS (no HTTP mocks)."""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.upstream.azureml import (
    AZURE_EXTRA_HINT,
    AzureIdentitySource,
    AzureMLRunTokenSource,
    AzureWorkspace,
    azure_token_source,
    parse_azure_error,
    parse_azureml_uri,
    parse_iso_time,
    require_azure_identity,
)
from agent.upstream.azureml_core import AzureMLCoreSource
from agent.upstream.renewing import CredentialError

SUB = "00000000-1111-2222-3333-444444444444"
SCOPE = f"/subscriptions/{SUB}/resourceGroups/rg-ml/providers/Microsoft.MachineLearningServices/workspaces/ws1"
EXPERIMENT_ID = "6f2b1d5e-0000-4000-8000-000000000001"
RUN_ID = "brave_lamp_x1y2z3"


def _has_azure_identity() -> bool:
    try:
        return importlib.util.find_spec("azure.identity") is not None
    except ModuleNotFoundError:
        return False


needs_azure_identity = pytest.mark.skipif(not _has_azure_identity(),
                                          reason="azure-identity is not installed (pip install 'mlflow-agent[azure]')")


def _jwt(claims: dict[str, object]) -> str:
    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


@contextlib.asynccontextmanager
async def _serve(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """``app`` on a free loopback port (TLS when a context is given); yields the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- azureml:// URIs -----------------------------------------------------------------------------


def test_the_portal_uri_is_upgraded_to_v2() -> None:
    ws = parse_azureml_uri(f"azureml://eastus.api.azureml.ms/mlflow/v1.0{SCOPE}?")
    assert ws == AzureWorkspace(SUB, "rg-ml", "ws1", host="eastus.api.azureml.ms")
    assert ws.scope == SCOPE
    assert ws.base_url == f"https://eastus.api.azureml.ms/mlflow/v2.0{SCOPE}"
    assert parse_azureml_uri(f"azureml://eastus.api.azureml.ms/mlflow/v2.0{SCOPE}") == ws


def test_path_words_are_case_insensitive_ports_kept_and_the_query_ignored() -> None:
    ws = parse_azureml_uri(f"AzureML://Guid-1.Workspace.EastUS.api.azureml.ms:8443/MLflow/V2.0/SUBSCRIPTIONS/{SUB}"
                           "/resourcegroups/My.RG(1)/providers/microsoft.machinelearningservices/Workspaces/W-2/"
                           "?auth-type=ArmTokenAuthentication&auth=eyJsecret.eyJsecret.sig#frag")
    assert ws.host == "guid-1.workspace.eastus.api.azureml.ms:8443"
    assert (ws.subscription_id, ws.resource_group, ws.workspace_name) == (SUB, "My.RG(1)", "W-2")
    assert ws.scope == (f"/subscriptions/{SUB}/resourceGroups/My.RG(1)/providers/"
                        "Microsoft.MachineLearningServices/workspaces/W-2")
    assert ws.base_url == f"https://guid-1.workspace.eastus.api.azureml.ms:8443/mlflow/v2.0{ws.scope}"


@pytest.mark.parametrize(("uri", "match"), [
    ("https://eastus.api.azureml.ms/mlflow/v2.0" + SCOPE, "not an azureml:// URI"),
    ("azureml:///mlflow/v2.0" + SCOPE, "no host"),
    ("azureml://host:99999/mlflow/v2.0" + SCOPE, "invalid port"),
    ("azureml://user:pw@host/mlflow/v2.0" + SCOPE, "carry no credentials"),
    ("azureml://host/api/v2.0" + SCOPE, "must start with /mlflow"),
    ("azureml://host/mlflow/v3.0" + SCOPE, "no supported MLflow API version"),
    ("azureml://host/mlflow/v2.0", "no subscription id"),
    ("azureml://host/mlflow/v2.0/subscriptions/", "no subscription id"),
    (f"azureml://host/mlflow/v2.0/subscriptions/{SUB}/workspaces/ws", "no resource group"),
    (f"azureml://host/mlflow/v2.0/subscriptions/{SUB}/resourceGroups/rg", "no provider"),
    (f"azureml://host/mlflow/v2.0/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Storage/workspaces/w",
     "names provider 'Microsoft.Storage'"),
    (f"azureml://host/mlflow/v2.0/subscriptions/{SUB}/resourceGroups/rg/providers/"
     "Microsoft.MachineLearningServices", "no workspace name"),
    ("azureml://host/mlflow/v2.0" + SCOPE + "/experiments/1", "more path after the workspace name"),
    ("azureml://host/history/v1.0" + SCOPE, "old-style"),
])
def test_bad_uris_say_what_is_missing_and_never_echo_the_query(uri: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        parse_azureml_uri(uri + "?auth-type=ArmTokenAuthentication&auth=SECRET-ARM-TOKEN")
    assert "SECRET-ARM-TOKEN" not in str(info.value)
    assert "auth-type" not in str(info.value)


# --- small parsers -------------------------------------------------------------------------------


def test_parse_azure_error() -> None:
    body = json.dumps({
        "error": {"code": "UserError", "message": "Run not found", "innerError": {"code": "NotFound"}},
        "correlation": {"operation": "op-1", "request": "req-2"},
        "environment": "eastus",
    }).encode()
    assert parse_azure_error(body) == ("UserError", "Run not found", {"operation": "op-1", "request": "req-2"})
    assert parse_azure_error(b'{"error": {"code": "AuthenticationFailed"}}') == ("AuthenticationFailed", None, {})
    for other in (b"", b"<html>502</html>", b"[1]", b'{"error_code": "INVALID_PARAMETER_VALUE", "message": "x"}',
                  b'{"error": "nope"}', b'{"error": {"code": 5}}', b"\xff\xfe"):
        assert parse_azure_error(other) == (None, None, {})


def test_parse_iso_time() -> None:
    base = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc).timestamp()
    assert parse_iso_time("2026-12-01T12:00:00Z") == base
    assert parse_iso_time("2026-12-01T12:00:00") == base  # "Utc" by name: no zone means UTC
    assert parse_iso_time("2026-12-01T12:00:00.1234567Z") == pytest.approx(base + 0.1234567)
    assert parse_iso_time("2026-12-01T14:00:00.5+02:00") == pytest.approx(base + 0.5)
    assert parse_iso_time("2026-12-01T07:00:00-0500") == base
    with pytest.raises(ValueError):
        parse_iso_time("tomorrow")


# --- azure-identity against a local App Service style managed-identity endpoint ------------------


@pytest.fixture
def azure_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No ambient Azure configuration, and no az/pwsh/azd to run: only what the test sets is used."""
    for name in list(os.environ):
        if name.startswith(("AZURE_", "MSI_", "IDENTITY_", "IMDS_")):
            monkeypatch.delenv(name)
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    yield


def _identity_app(secret: str, token: str, expires_on: int, seen: list[dict[str, Any]]) -> web.Application:
    async def msi_token(request: web.Request) -> web.Response:
        seen.append({"query": dict(request.query), "header": request.headers.get("X-IDENTITY-HEADER")})
        if request.headers.get("X-IDENTITY-HEADER") != secret:
            return web.json_response({"error": "invalid_request"}, status=401)
        return web.json_response({"access_token": token, "expires_on": str(expires_on),
                                  "resource": "https://management.azure.com/", "token_type": "Bearer"})

    app = web.Application()
    app.router.add_get("/msi/token", msi_token)
    return app


@needs_azure_identity
async def test_identity_token_from_a_managed_identity_endpoint(azure_env: None, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    secret = "identity-header-secret"
    token = _jwt({"aud": "https://management.azure.com/", "exp": 2_000_000_000})
    expires_on = int(time.time()) + 3600
    seen: list[dict[str, Any]] = []
    async with _serve(_identity_app(secret, token, expires_on, seen)) as port:
        monkeypatch.setenv("IDENTITY_ENDPOINT", f"http://127.0.0.1:{port}/msi/token")
        monkeypatch.setenv("IDENTITY_HEADER", secret)
        source = AzureIdentitySource()
        try:
            chain = [type(c).__name__ for c in source._credential.credentials]  # type: ignore[union-attr]
            assert not {"SharedTokenCacheCredential", "VisualStudioCodeCredential", "InteractiveBrowserCredential",
                        "DeviceCodeCredential"} & set(chain)
            got = await source.fetch()
            assert got.value == token
            assert got.expires_at == expires_on
            assert got.obtained_at == pytest.approx(time.time(), abs=10)
            assert seen[0]["query"]["resource"] == "https://management.azure.com"
            assert seen[0]["query"]["api-version"] == "2019-08-01"
            assert seen[0]["header"] == secret
            # A renewal asks again (azure-identity's cache misses here: it is keyed by the "resource" the
            # endpoint echoes, with a trailing slash, and searched without one). Same token, same expiry.
            again = await source.fetch()
            assert (again.value, again.expires_at) == (token, expires_on)
        finally:
            await source.close()
    with pytest.raises(CredentialError, match="closed"):
        await source.fetch()


@needs_azure_identity
async def test_identity_endpoint_down_is_a_credential_error(azure_env: None, monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setenv("IDENTITY_ENDPOINT", f"http://127.0.0.1:{_closed_port()}/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", "identity-header-secret")
    source = AzureIdentitySource()
    try:
        with pytest.raises(CredentialError, match="ManagedIdentityCredential") as info:
            await source.fetch()
    finally:
        await source.close()
    message = str(info.value)
    assert "identity-header-secret" not in message
    assert "\n" not in message and "aka.ms" not in message


def test_azure_identity_missing_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "azure.identity.aio", None)  # what an install without the extra looks like
    with pytest.raises(ValueError, match=r"^azureml:// upstreams need azure-identity") as info:
        require_azure_identity()
    assert str(info.value) == AZURE_EXTRA_HINT
    with pytest.raises(ValueError, match="need azure-identity"):
        AzureIdentitySource()
    # Inside a job the run token is used: azure-identity is not needed.
    job = {"MLFLOW_TRACKING_TOKEN": _jwt({"exp": 2_000_000_000}), "AZUREML_RUN_ID": RUN_ID}
    ws = parse_azureml_uri(f"azureml://eastus.api.azureml.ms/mlflow/v1.0{SCOPE}?")
    assert isinstance(azure_token_source(job, job_workspace=ws), AzureMLRunTokenSource)
    with pytest.raises(ValueError, match="need azure-identity"):
        azure_token_source({}, job_workspace=ws)


@needs_azure_identity
async def test_source_choice(azure_env: None) -> None:
    ws = parse_azureml_uri(f"azureml://eastus.api.azureml.ms/mlflow/v1.0{SCOPE}")
    token = _jwt({"exp": 2_000_000_000})
    assert isinstance(azure_token_source({"MLFLOW_TRACKING_TOKEN": token, "AZUREML_RUN_ID": RUN_ID},
                                         job_workspace=ws), AzureMLRunTokenSource)
    assert isinstance(azure_token_source({"MLFLOW_TRACKING_TOKEN": token, "MLFLOW_RUN_ID": RUN_ID},
                                         job_workspace=ws), AzureMLRunTokenSource)
    for env in ({}, {"MLFLOW_TRACKING_TOKEN": token}, {"AZUREML_RUN_ID": RUN_ID}):
        source = azure_token_source(env, job_workspace=ws)
        assert isinstance(source, AzureIdentitySource)
        assert source.scope == "https://management.azure.com/.default"
        await source.close()
    # Without a job workspace (a config.json upstream) the run token is never used: it cannot call ARM.
    job = {"MLFLOW_TRACKING_TOKEN": token, "AZUREML_RUN_ID": RUN_ID}
    source = azure_token_source(job, arm_endpoint="https://management.chinacloudapi.cn/")
    assert isinstance(source, AzureIdentitySource)
    assert source.scope == "https://management.chinacloudapi.cn/.default"
    await source.close()
    assert isinstance(azure_token_source(job, credential="azureml-core"), AzureMLCoreSource)


# --- run tokens against a local run-history endpoint over TLS ------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl CLI is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


class History:
    """A run-history service that hands out numbered run tokens to whoever holds the current one."""

    def __init__(self) -> None:
        self.valid = {_jwt({"exp": int(time.time()) + 86400, "n": 0})}
        self.requests: list[tuple[str, str]] = []
        self.issued: list[str] = []

    async def token(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        self.requests.append((request.path, auth))
        current = auth.removeprefix("Bearer ")
        if current not in self.valid:
            return web.json_response({
                "error": {"code": "AuthenticationFailed", "message": f"token {current} is not valid",
                          "innerError": {"code": "InvalidToken"}},
                "correlation": {"operation": "op-9", "request": "req-9"},
            }, status=401)
        issued = _jwt({"exp": 2_000_000_000, "n": len(self.issued) + 1})
        self.issued.append(issued)
        self.valid.add(issued)
        return web.json_response({"token": issued, "expiryTimeUtc": "2027-01-02T03:04:05.1234567Z"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/history/v1.0" + SCOPE + "/experimentids/{experiment}/runs/{run}/token", self.token)
        app.router.add_get("/history/v1.0" + SCOPE + "/experiments/{experiment}/runs/{run}/token", self.token)
        return app


@pytest.fixture
async def history(tls_files: tuple[Path, Path]) -> AsyncIterator[tuple[History, AzureWorkspace, Path]]:
    cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    service = History()
    async with _serve(service.app(), context) as port:
        yield service, parse_azureml_uri(f"azureml://127.0.0.1:{port}/mlflow/v1.0{SCOPE}?"), cert


EXPIRY_2027 = datetime(2027, 1, 2, 3, 4, 5, tzinfo=timezone.utc).timestamp() + 0.1234567


async def test_run_token_is_used_while_valid_then_renewed_with_itself(
        history: tuple[History, AzureWorkspace, Path]) -> None:
    service, ws, cert = history
    env_token = next(iter(service.valid))
    source = AzureMLRunTokenSource(ws, {
        "MLFLOW_TRACKING_TOKEN": env_token, "MLFLOW_RUN_ID": RUN_ID, "MLFLOW_EXPERIMENT_ID": EXPERIMENT_ID,
        "MLFLOW_TRACKING_SERVER_CERT_PATH": str(cert)})
    first = await source.fetch()
    assert first.value == env_token
    assert first.expires_at == pytest.approx(time.time() + 86400, abs=10)
    assert service.requests == []  # still valid for a day: no renewal

    second = await source.fetch()  # what RenewingUpstream does when renewal is due or after a 401/403
    assert second.value == service.issued[0]
    assert second.expires_at == pytest.approx(EXPIRY_2027)
    assert second.obtained_at == pytest.approx(time.time(), abs=10)
    assert service.requests == [(f"/history/v1.0{SCOPE}/experimentids/{EXPERIMENT_ID}/runs/{RUN_ID}/token",
                                 f"Bearer {env_token}")]

    third = await source.fetch()
    assert third.value == service.issued[1]
    assert service.requests[-1][1] == f"Bearer {service.issued[0]}"  # renewed with the current token
    await source.close()


async def test_a_nearly_expired_env_token_is_renewed_at_once_by_experiment_name(
        history: tuple[History, AzureWorkspace, Path]) -> None:
    service, ws, cert = history
    soon = _jwt({"exp": int(time.time()) + 300})  # 5 minutes left: less than the 10 the source asks for
    service.valid.add(soon)
    source = AzureMLRunTokenSource(ws, {
        "MLFLOW_TRACKING_TOKEN": soon, "AZUREML_RUN_ID": RUN_ID, "AZUREML_ARM_PROJECT_NAME": "my experiment",
        "MLFLOW_TRACKING_SERVER_CERT_PATH": str(cert)})
    got = await source.fetch()
    assert got.value == service.issued[0]
    assert got.expires_at == pytest.approx(EXPIRY_2027)
    assert service.requests == [(f"/history/v1.0{SCOPE}/experiments/my experiment/runs/{RUN_ID}/token",
                                 f"Bearer {soon}")]


async def test_a_refused_renewal_is_a_credential_error_without_the_token(
        history: tuple[History, AzureWorkspace, Path]) -> None:
    _service, ws, cert = history
    revoked = _jwt({"exp": int(time.time()) + 60, "revoked": True})
    source = AzureMLRunTokenSource(ws, {
        "MLFLOW_TRACKING_TOKEN": revoked, "MLFLOW_RUN_ID": RUN_ID, "AZUREML_EXPERIMENT_ID": EXPERIMENT_ID,
        "MLFLOW_TRACKING_SERVER_CERT_PATH": str(cert)})
    with pytest.raises(CredentialError, match=r"HTTP 401 AuthenticationFailed: token \*\*\* is not valid") as info:
        await source.fetch()
    assert revoked not in str(info.value)
    assert "req-9" in str(info.value)


async def test_renewal_verifies_tls_and_needs_an_experiment(history: tuple[History, AzureWorkspace, Path]) -> None:
    service, ws, _cert = history
    token = _jwt({"exp": int(time.time()) + 60})
    untrusting = AzureMLRunTokenSource(ws, {"MLFLOW_TRACKING_TOKEN": token, "MLFLOW_RUN_ID": RUN_ID,
                                            "MLFLOW_EXPERIMENT_ID": EXPERIMENT_ID})
    with pytest.raises(CredentialError, match=r"cannot reach 127\.0\.0\.1:") as info:
        await untrusting.fetch()  # the self-signed certificate is not trusted without the CA path
    assert token not in str(info.value)
    assert service.requests == []
    lost = AzureMLRunTokenSource(ws, {"MLFLOW_TRACKING_TOKEN": token, "MLFLOW_RUN_ID": RUN_ID})
    with pytest.raises(CredentialError, match="MLFLOW_EXPERIMENT_ID"):
        await lost.fetch()


async def test_an_unreachable_history_service_is_a_credential_error() -> None:
    ws = parse_azureml_uri(f"azureml://127.0.0.1:{_closed_port()}/mlflow/v2.0{SCOPE}")
    token = _jwt({"exp": int(time.time()) + 60})
    source = AzureMLRunTokenSource(ws, {"MLFLOW_TRACKING_TOKEN": token, "MLFLOW_RUN_ID": RUN_ID,
                                        "MLFLOW_EXPERIMENT_ID": EXPERIMENT_ID})
    with pytest.raises(CredentialError, match="cannot reach") as info:
        await source.fetch()
    assert token not in str(info.value)
