"""azureml-core as a credential source, always in a child process that can neither block nor prompt.

The child (``python -m agent.upstream.azureml_core``) is run for real. Its azureml-core is a stand-in
package written to ``tmp_path`` and put first on ``PYTHONPATH``: it records how it was built and in
which session it runs, and its ``get_token`` returns a token, sleeps forever (after starting a
grandchild), reads stdin, opens ``/dev/tty`` or raises, as the test asks. The last test runs the real
azureml-core (opt-in: ``MLFLOW_AGENT_TEST_AZUREML_CORE_PYTHON`` names a python that has it, with this
project installed) against the Azure stand-in's App Service managed-identity endpoint.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import os
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from agent.upstream.azureml_core import (
    EXTRA_HINT,
    AzureMLCoreSource,
    cloud_name,
    require_azureml_core,
    service_principal,
)
from agent.upstream.renewing import CredentialError, Token
from tests.integration.helpers_faults import run_cli
from tests.support.azure_gateway import AzureGateway, check_token
from tests.support.ports import free_port
from tests.support.processes import REPO_ROOT

REAL_PYTHON_ENV = "MLFLOW_AGENT_TEST_AZUREML_CORE_PYTHON"
_CREDENTIAL_VARIABLES = ("AZURE_", "AZUREML_", "IDENTITY_", "MSI_", "IMDS_", "APPSETTING_", "MSAL_")
EXPIRES_AT = 1_900_000_000
SP = {"tenant_id": "tenant-1111", "service_principal_id": "client-2222", "service_principal_password": "pw-3333"}

STAND_IN = '''
"""A stand-in for azureml.core.authentication, driven by STANDIN_* variables."""
import json
import os
import subprocess
import time
from collections import namedtuple

AccessToken = namedtuple("AccessToken", ["token", "expires_on"])


def _record(**fields):
    with open(os.environ["STANDIN_RECORD"], "a") as out:
        out.write(json.dumps(fields) + "\\n")


def _stdin_is_dev_null():
    return os.path.samestat(os.fstat(0), os.stat("/dev/null"))


class _Auth:
    def _built(self, **kwargs):
        _record(event="built", cls=type(self).__name__, kwargs=kwargs, pid=os.getpid(), sid=os.getsid(0),
                pgid=os.getpgid(0), stdin_dev_null=_stdin_is_dev_null())

    def get_token(self, *scopes, **kwargs):
        _record(event="get_token", scopes=list(scopes))
        behaviour = os.environ.get("STANDIN_BEHAVIOUR", "token")
        if behaviour == "token":
            return AccessToken(os.environ["STANDIN_TOKEN"], int(os.environ.get("STANDIN_EXPIRES_ON", "0")))
        if behaviour == "sleep":
            grandchild = subprocess.Popen(["sleep", "1000"])
            _record(event="pids", child=os.getpid(), grandchild=grandchild.pid)
            time.sleep(1000)
        if behaviour == "input":
            return AccessToken(input("Password: "), 0)
        if behaviour == "tty":
            with open("/dev/tty", "r+") as tty:
                tty.write("Password: ")
                return AccessToken(tty.readline().strip(), 0)
        if behaviour == "raise":
            raise RuntimeError(os.environ["STANDIN_MESSAGE"])
        raise AssertionError("unknown STANDIN_BEHAVIOUR " + behaviour)


class ServicePrincipalAuthentication(_Auth):
    def __init__(self, tenant_id, service_principal_id, service_principal_password, cloud="AzureCloud",
                 _enable_caching=True):
        self._built(tenant_id=tenant_id, service_principal_id=service_principal_id,
                    service_principal_password=service_principal_password)


class MsiAuthentication(_Auth):
    def __init__(self, cloud=None, **kwargs):
        self._built(**kwargs)


class InteractiveLoginAuthentication(_Auth):
    def __init__(self, *args, **kwargs):
        _record(event="built", cls="InteractiveLoginAuthentication")
        raise SystemExit("an interactive login was attempted")


class AzureCliAuthentication(_Auth):
    def __init__(self, *args, **kwargs):
        _record(event="built", cls="AzureCliAuthentication")
        raise SystemExit("the Azure CLI was used")
'''


def _azureml_core_importable() -> bool:
    try:
        return importlib.util.find_spec("azureml.core") is not None
    except ModuleNotFoundError:  # no "azureml" package at all
        return False


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No credential variable of this machine reaches the helper."""
    for name in list(os.environ):
        if name.startswith(_CREDENTIAL_VARIABLES):
            monkeypatch.delenv(name)


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None) -> Iterator[Path]:
    """The stand-in azureml package first on the helper's PYTHONPATH; yields the record file."""
    root = tmp_path / "stand-in"
    (root / "azureml" / "core").mkdir(parents=True)
    (root / "azureml" / "__init__.py").write_text("")
    (root / "azureml" / "core" / "__init__.py").write_text("")
    (root / "azureml" / "core" / "authentication.py").write_text(textwrap.dedent(STAND_IN))
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), str(REPO_ROOT)]))
    monkeypatch.setenv("STANDIN_RECORD", str(record))
    monkeypatch.setenv("STANDIN_TOKEN", "stand-in-token-4f1c9a")
    monkeypatch.setenv("STANDIN_EXPIRES_ON", str(EXPIRES_AT))
    yield record


def _records(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if event is None or r["event"] == event]


def _process_gone(pid: int) -> bool:
    """No such process, or only its zombie (left for a non-reaping init to collect)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


async def _wait_gone(*pids: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(_process_gone(pid) for pid in pids):
        if time.monotonic() > deadline:
            alive = [pid for pid in pids if not _process_gone(pid)]
            raise AssertionError(f"processes still running: {alive}")
        await asyncio.sleep(0.05)


# --- azureml-core missing -------------------------------------------------------------------------


def test_without_azureml_core_the_hint_says_how_to_install_it() -> None:
    assert not _azureml_core_importable(), "azureml-core is installed in the test environment"
    with pytest.raises(ValueError) as info:
        require_azureml_core()
    assert str(info.value) == EXTRA_HINT
    assert "pip install 'mlflow-agent[azureml-core]'" in EXTRA_HINT


def test_the_stand_in_counts_as_installed(stand_in: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(stand_in.parent / "stand-in"))
    for name in [m for m in sys.modules if m == "azureml" or m.startswith("azureml.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        require_azureml_core()  # found without importing azureml.core itself
        assert "azureml.core.authentication" not in sys.modules
    finally:
        for name in [m for m in sys.modules if m == "azureml" or m.startswith("azureml.")]:
            del sys.modules[name]  # find_spec imported the stand-in's parent package


@pytest.mark.parametrize("how", ["config", "uri"])
def test_agent_refuses_to_start_without_azureml_core(tmp_path: Path, clean_env: None, how: str) -> None:
    assert not _azureml_core_importable(), "azureml-core is installed in the test environment"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"subscription_id": "s", "resource_group": "g", "workspace_name": "w"}))
    upstream = (["--azureml-config", str(config), "--upstream", "none"] if how == "config" else
                ["--upstream", "azureml://eastus.api.azureml.ms/mlflow/v2.0/subscriptions/s/resourceGroups/g"
                               "/providers/Microsoft.MachineLearningServices/workspaces/w"])
    spool = tmp_path / "spool"
    result = run_cli("run", *upstream, "--azure-credential", "azureml-core", "--spool-dir", str(spool),
                     "--http", f"127.0.0.1:{free_port()}", "--udp", "none", timeout=60)
    assert result.returncode == 2, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "'azure_credential'" in lines[0] and "--azure-credential" in lines[0], lines[0]
    assert "pip install 'mlflow-agent[azureml-core]'" in lines[0], lines[0]
    assert not spool.exists()


# --- the helper cannot block or prompt ------------------------------------------------------------


async def test_a_helper_that_hangs_is_killed_with_its_children_and_the_loop_keeps_running(
        stand_in: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANDIN_BEHAVIOUR", "sleep")
    ticks: list[float] = []

    async def tick() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.05)

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    try:
        with pytest.raises(CredentialError) as info:
            await AzureMLCoreSource(timeout=3.0).fetch()
    finally:
        ticker.cancel()
    took = time.monotonic() - started
    assert str(info.value) == "the azureml-core helper did not finish in 3s"
    assert 2.9 <= took < 10.0, took
    [pids] = _records(stand_in, "pids")  # written before it slept: the stand-in really ran
    await _wait_gone(pids["child"], pids["grandchild"])
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert len(ticks) >= 20 and max(gaps) < 1.0, f"the loop stalled: {len(ticks)} ticks, max gap {max(gaps):.2f}s"


async def test_cancelling_a_renewal_kills_the_helper_group(stand_in: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANDIN_BEHAVIOUR", "sleep")
    fetch = asyncio.create_task(AzureMLCoreSource(timeout=60.0).fetch())
    deadline = time.monotonic() + 30
    while not _records(stand_in, "pids"):
        assert time.monotonic() < deadline, "the stand-in never started"
        assert not fetch.done(), fetch
        await asyncio.sleep(0.05)
    fetch.cancel()  # the agent stopping mid-renewal
    with pytest.raises(asyncio.CancelledError):
        await fetch
    [pids] = _records(stand_in, "pids")
    await _wait_gone(pids["child"], pids["grandchild"])


@pytest.mark.parametrize(("behaviour", "expected"), [
    ("input", "EOFError: EOF when reading a line"),  # stdin is /dev/null
    ("tty", "No such device or address"),  # its own session: no controlling terminal (ENXIO)
])
async def test_a_helper_that_prompts_fails_at_once(stand_in: Path, monkeypatch: pytest.MonkeyPatch,
                                                   behaviour: str, expected: str) -> None:
    monkeypatch.setenv("STANDIN_BEHAVIOUR", behaviour)
    started = time.monotonic()
    with pytest.raises(CredentialError) as info:
        await AzureMLCoreSource(timeout=60.0).fetch()
    took = time.monotonic() - started
    message = str(info.value)
    assert message.startswith("the azureml-core helper exited 1: azureml-core could not get a token: "), message
    assert expected in message, message
    assert took < 20.0, f"took {took:.1f}s: it waited for input"
    [built] = _records(stand_in, "built")
    assert built["sid"] == built["pid"] == built["pgid"], built  # a session (and group) of its own
    assert built["stdin_dev_null"] is True


# --- which azureml-core class, from which variables ------------------------------------------------


@pytest.mark.parametrize(("env", "cls", "kwargs"), [
    ({}, "MsiAuthentication", {}),
    ({"AZURE_CLIENT_ID": "uami-5555"}, "MsiAuthentication", {"identity_config": {"client_id": "uami-5555"}}),
    ({"AZUREML_SERVICE_PRINCIPAL_TENANT_ID": SP["tenant_id"],
      "AZUREML_SERVICE_PRINCIPAL_ID": SP["service_principal_id"],
      "AZUREML_SERVICE_PRINCIPAL_PASSWORD": SP["service_principal_password"]}, "ServicePrincipalAuthentication", SP),
    ({"AZURE_TENANT_ID": SP["tenant_id"], "AZURE_CLIENT_ID": SP["service_principal_id"],
      "AZURE_CLIENT_SECRET": SP["service_principal_password"]}, "ServicePrincipalAuthentication", SP),
    # azureml-core's own variables come first.
    ({"AZUREML_SERVICE_PRINCIPAL_TENANT_ID": "t-aml", "AZUREML_SERVICE_PRINCIPAL_ID": "c-aml",
      "AZUREML_SERVICE_PRINCIPAL_PASSWORD": "p-aml", "AZURE_TENANT_ID": "t-az", "AZURE_CLIENT_ID": "c-az",
      "AZURE_CLIENT_SECRET": "p-az"}, "ServicePrincipalAuthentication",
     {"tenant_id": "t-aml", "service_principal_id": "c-aml", "service_principal_password": "p-aml"}),
    # An incomplete service principal is not one: a user-assigned managed identity.
    ({"AZURE_TENANT_ID": "t-az", "AZURE_CLIENT_ID": "c-az"}, "MsiAuthentication",
     {"identity_config": {"client_id": "c-az"}}),
    ({"AZUREML_SERVICE_PRINCIPAL_TENANT_ID": "t", "AZUREML_SERVICE_PRINCIPAL_ID": "c",
      "AZUREML_SERVICE_PRINCIPAL_PASSWORD": " "}, "MsiAuthentication", {}),
], ids=["msi", "user-assigned", "aml-sp", "azure-sp", "aml-sp-first", "partial-sp", "blank-secret"])
async def test_the_auth_class_follows_the_environment(stand_in: Path, monkeypatch: pytest.MonkeyPatch,
                                                      env: dict[str, str], cls: str, kwargs: dict[str, Any]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    token = await AzureMLCoreSource(timeout=60.0).fetch()
    assert token.value == "stand-in-token-4f1c9a"
    built = _records(stand_in, "built")
    assert [(b["cls"], b["kwargs"]) for b in built] == [(cls, kwargs)]
    assert len(_records(stand_in, "get_token")) == 1


def test_service_principal_needs_all_three_values() -> None:
    assert service_principal({}) is None
    assert service_principal({"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_CLIENT_SECRET": "s"}) == (
        "t", "c", "s")
    assert service_principal({"AZURE_TENANT_ID": " t ", "AZURE_CLIENT_ID": "c", "AZURE_CLIENT_SECRET": " s"}) == (
        "t", "c", "s")
    assert service_principal({"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c"}) is None


# --- what the helper hands back -------------------------------------------------------------------


def _jwt_with_exp(exp: int) -> str:
    import base64

    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part({'exp': exp, 'aud': 'https://management.azure.com/'})}.c2ln"


async def test_a_token_with_its_expiry(stand_in: Path) -> None:
    before = time.time()
    token = await AzureMLCoreSource(timeout=60.0).fetch()
    assert isinstance(token, Token)
    assert token.value == "stand-in-token-4f1c9a"
    assert token.expires_at == float(EXPIRES_AT)
    assert before <= token.obtained_at <= time.time()


async def test_without_an_expiry_the_jwt_exp_is_used(stand_in: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jwt = _jwt_with_exp(EXPIRES_AT + 60)
    monkeypatch.setenv("STANDIN_TOKEN", jwt)
    monkeypatch.setenv("STANDIN_EXPIRES_ON", "0")
    token = await AzureMLCoreSource(timeout=60.0).fetch()
    assert token.value == jwt and token.expires_at == float(EXPIRES_AT + 60)


async def test_an_error_is_one_line_from_the_helper(stand_in: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANDIN_BEHAVIOUR", "raise")
    monkeypatch.setenv("STANDIN_MESSAGE", "AADSTS7000215: Invalid client secret provided.\nTrace ID: 1234")
    with pytest.raises(CredentialError) as info:
        await AzureMLCoreSource(timeout=60.0).fetch()
    assert str(info.value) == ("the azureml-core helper exited 1: azureml-core could not get a token: "
                               "RuntimeError: AADSTS7000215: Invalid client secret provided. Trace ID: 1234")


@pytest.mark.parametrize("secret", [_jwt_with_exp(EXPIRES_AT), "9f8e7d6c5b4a3928" * 4], ids=["jwt", "opaque"])
async def test_a_token_in_the_sdks_error_message_does_not_reach_the_agent(
        stand_in: Path, monkeypatch: pytest.MonkeyPatch, secret: str) -> None:
    """The helper's last stderr line becomes the CredentialError, hence last_error in /readyz and
    /status and a warning in the log: anything shaped like a token is masked there."""
    monkeypatch.setenv("STANDIN_BEHAVIOUR", "raise")
    monkeypatch.setenv("STANDIN_MESSAGE", f"{secret} was rejected by the resource (trace 0f4c)")
    with pytest.raises(CredentialError) as info:
        await AzureMLCoreSource(timeout=60.0).fetch()
    message = str(info.value)
    assert message == ("the azureml-core helper exited 1: azureml-core could not get a token: RuntimeError: *** was "
                       "rejected by the resource (trace 0f4c)"), message


# --- the real azureml-core (opt-in) ---------------------------------------------------------------


@pytest.fixture
def real_python() -> str:
    python = os.environ.get(REAL_PYTHON_ENV, "")
    if not python:
        pytest.skip(f"set {REAL_PYTHON_ENV} to a python with azureml-core and this project installed")
    return python


def test_real_azureml_core_gets_a_managed_identity_token_from_app_service(
        real_python: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    """azureml-core's MsiAuthentication, on App Service's 2017-09-01 API (MSI_ENDPOINT + MSI_SECRET):
    the token is one the stand-in minted, accepted by it, with its expiry; a user-assigned identity
    (AZURE_CLIENT_ID) is asked for by its client id."""
    # Only tokens and ARM are used: no MLflow server behind the stand-in.
    with AzureGateway(f"http://127.0.0.1:{free_port()}", tmp_path / "gateway", token_ttl=600) as gateway:
        monkeypatch.delenv("PYTHONPATH", raising=False)
        for name, value in gateway.msi_env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AZUREML_CURRENT_CLOUD", "AzureCloud")  # no cloud-metadata request to management.azure.com
        started = time.monotonic()
        token = asyncio.run(AzureMLCoreSource(python=real_python, timeout=120.0).fetch())
        took = time.monotonic() - started

        minted = {m["token"]: m for m in gateway.minted()}
        assert token.value in minted, "not a token the stand-in minted"
        assert minted[token.value]["kind"] == "identity"
        assert token.expires_at == float(minted[token.value]["exp"])
        assert check_token(gateway.secret, token.value) == (None, minted[token.value]["exp"])
        answer = requests.get(gateway.arm_resource_url(), headers={"Authorization": f"Bearer {token.value}"},
                              verify=str(gateway.cert_path), timeout=30)
        assert answer.status_code == 200, answer.text  # the stand-in's ARM takes it
        stats = gateway.stats()
        assert stats["identity_by_api"]["2017-09-01"] >= 1 and stats["identity_by_api"]["2019-08-01"] == 0, stats
        assert stats["identity"]["bad_header"] == 0
        asked = [e for e in gateway.request_log() if e.get("endpoint") == "msi/2017"]
        assert asked and all(e["client_id"] == "6a0c3e1f-0000-4000-8000-00000000a11d" for e in asked), asked

        monkeypatch.setenv("AZURE_CLIENT_ID", "7b1d2e3f-0000-4000-8000-0000000000ua")
        user_assigned = asyncio.run(AzureMLCoreSource(python=real_python, timeout=120.0).fetch())
        assert user_assigned.value in {m["token"] for m in gateway.minted()}
        asked = [e for e in gateway.request_log() if e.get("endpoint") == "msi/2017"][len(asked):]
        assert asked and all(e["client_id"] == "7b1d2e3f-0000-4000-8000-0000000000ua" for e in asked), asked
    with capsys.disabled():
        print(f"\n[real azureml-core] first token in {took:.1f}s; identity requests: {stats['identity_by_api']}")


def test_the_helper_is_told_its_cloud_so_it_never_asks_arm_for_the_list() -> None:
    assert cloud_name("https://management.azure.com") == "AzureCloud"
    assert cloud_name("https://management.chinacloudapi.cn/") == "AzureChinaCloud"
    assert cloud_name("https://MANAGEMENT.usgovcloudapi.net") == "AzureUSGovernment"
    assert cloud_name("https://127.0.0.1:8443") == "AzureCloud"
    china = AzureMLCoreSource(arm_endpoint="https://management.chinacloudapi.cn", env={"PATH": "/usr/bin"})
    assert china.env == {"PATH": "/usr/bin", "AZUREML_CURRENT_CLOUD": "AzureChinaCloud"}
    # an operator's own choice stands
    own = AzureMLCoreSource(env={"AZUREML_CURRENT_CLOUD": "AzureGermanCloud"})
    assert own.env == {"AZUREML_CURRENT_CLOUD": "AzureGermanCloud"}
