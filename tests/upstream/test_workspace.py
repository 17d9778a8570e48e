"""An Azure ML workspace named by a ``config.json``: reading the file, the host cache in the spool
directory, the ARM lookup against a real local HTTP server (no HTTP mocks), and the provider that
holds uploads until the workspace's host is known."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.ops.metrics import AgentMetrics
from agent.upstream.azureml import WorkspaceRef
from agent.upstream.renewing import RenewingUpstream, Token
from agent.upstream.workspace import (
    ARM_API_VERSION,
    CACHE_NAME,
    ArmResolvedUpstream,
    ArmWorkspaceLocator,
    WorkspaceLookupError,
    _valid_host,
    discovery_url,
    host_from_discovery,
    host_from_workspace_resource,
    load_cached_host,
    read_workspace_config,
    store_cached_host,
)

SUB = "0b5e6c1d-7a2f-4e3b-9c8d-1f2e3d4c5b6a"
RG = "rg-ml"
WS = "ws-one"
REF = WorkspaceRef(SUB, RG, WS)
SCOPE = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.MachineLearningServices/workspaces/{WS}"
HOST = "eastus.api.azureml.ms"
ARM = "https://management.azure.com"
KEYS = ("subscription_id", "resource_group", "workspace_name")
GOOD = {"subscription_id": SUB, "resource_group": RG, "workspace_name": WS}


def _write(path: Path, content: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


# --- config.json ----------------------------------------------------------------------------------


def test_config_file_names_the_workspace(tmp_path: Path) -> None:
    # As Workspace.write_config writes it (with extra keys), values trimmed.
    path = _write(tmp_path / "config.json", {**GOOD, "workspace_name": f"  {WS} ", "friendlyName": "x"})
    ref = read_workspace_config(path)
    assert ref == REF
    assert ref.scope == SCOPE
    assert ref.at(HOST).base_url == f"https://{HOST}/mlflow/v2.0{SCOPE}"


def test_config_file_in_scope_form(tmp_path: Path) -> None:
    assert read_workspace_config(_write(tmp_path / "a.json", {"Scope": SCOPE})) == REF
    assert read_workspace_config(_write(tmp_path / "b.json", {"Scope": SCOPE.lower() + "/"})) == WorkspaceRef(
        SUB.lower(), RG.lower(), WS.lower())
    # Explicit keys win over a Scope.
    assert read_workspace_config(_write(tmp_path / "c.json", {**GOOD, "Scope": SCOPE.replace(WS, "other")})) == REF
    for bad in (f"/subscriptions/{SUB}/resourceGroups/{RG}", SCOPE.replace("Microsoft.MachineLearningServices", "X"),
                SCOPE.replace(f"/workspaces/{WS}", "/workspaces/"), SCOPE + "/extra/segment"):
        path = _write(tmp_path / "bad.json", {"Scope": bad})
        with pytest.raises(ValueError) as info:
            read_workspace_config(path)
        assert str(path) in str(info.value) and '"Scope"' in str(info.value), info.value


def test_a_directory_is_searched_like_the_sdks_do(tmp_path: Path) -> None:
    nested = _write(tmp_path / "project" / ".azureml" / "config.json", GOOD)
    assert read_workspace_config(tmp_path / "project") == REF
    # config.json next to it comes first.
    _write(tmp_path / "project" / "config.json", {**GOOD, "workspace_name": "top"})
    assert read_workspace_config(tmp_path / "project").workspace_name == "top"
    assert read_workspace_config(nested) == REF
    empty = tmp_path / "empty"
    (empty / "config.json").mkdir(parents=True)  # a directory named config.json is not the file
    with pytest.raises(ValueError) as info:
        read_workspace_config(empty)
    assert str(info.value) == f"no config.json or .azureml/config.json in {empty}"


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("value", ["<missing>", "", "   ", None, 42, ["x"]])
def test_each_key_must_be_a_non_empty_string(tmp_path: Path, key: str, value: object) -> None:
    data: dict[str, object] = dict(GOOD)
    if value == "<missing>":
        del data[key]
    else:
        data[key] = value
    path = _write(tmp_path / "config.json", data)
    with pytest.raises(ValueError) as info:
        read_workspace_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key!r}"), message
    assert "missing or not a non-empty string" in message


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("value", ["a/b", "a b", "a\tb", "x\x01"])
def test_keys_must_not_hold_slashes_spaces_or_control_characters(tmp_path: Path, key: str, value: str) -> None:
    path = _write(tmp_path / "config.json", {**GOOD, key: value})
    with pytest.raises(ValueError) as info:
        read_workspace_config(path)
    assert str(info.value) == f"{path}: {key!r} must not contain '/', spaces or control characters"


def test_unusable_files_are_named_with_the_problem(tmp_path: Path) -> None:
    cases: dict[str, tuple[Path, str]] = {
        "invalid JSON": (_write(tmp_path / "broken.json", '{"subscription_id": '), "is not valid JSON"),
        "not UTF-8": (tmp_path / "latin1.json", "is not valid JSON"),
        "an array": (_write(tmp_path / "array.json", [GOOD]), "must hold a JSON object with subscription_id, "
                                                              "resource_group, workspace_name"),
        "a string": (_write(tmp_path / "string.json", '"config"'), "must hold a JSON object"),
        "missing": (tmp_path / "nowhere" / "config.json", "cannot read"),
        "under a file": (tmp_path / "array.json" / "config.json", "cannot read"),  # ENOTDIR: unreadable as root too
    }
    (tmp_path / "latin1.json").write_bytes(b'{"subscription_id": "\xe9"}')
    for what, (path, problem) in cases.items():
        with pytest.raises(ValueError) as info:
            read_workspace_config(path)
        message = str(info.value)
        assert str(path) in message and problem in message, (what, message)
        assert "\n" not in message, (what, message)


# --- the cache ------------------------------------------------------------------------------------


def test_cache_round_trip_is_private_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / CACHE_NAME
    assert load_cached_host(path, REF, ARM) is None  # absent
    path.write_text("{}")
    path.chmod(0o644)
    before = path.stat().st_ino
    old_umask = os.umask(0)  # the file's mode must not depend on the umask
    try:
        store_cached_host(path, REF, ARM, HOST)
    finally:
        os.umask(old_umask)
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_ino != before, "rewritten in place, not replaced by a complete new file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_NAME], "a temporary file was left behind"
    data = json.loads(path.read_text())
    assert data["scope"] == SCOPE and data["arm_endpoint"] == ARM and data["host"] == HOST
    assert abs(data["resolved_at"] - time.time()) < 60
    assert load_cached_host(path, REF, ARM) == HOST
    # The scope is matched as ARM matches names: without regard to case.
    assert load_cached_host(path, WorkspaceRef(SUB.upper(), RG.upper(), WS.upper()), ARM) == HOST


def test_cache_of_another_workspace_or_cloud_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / CACHE_NAME
    store_cached_host(path, REF, ARM, HOST)
    assert load_cached_host(path, WorkspaceRef(SUB, RG, "ws-two"), ARM) is None
    assert load_cached_host(path, WorkspaceRef(SUB, "rg-other", WS), ARM) is None
    assert load_cached_host(path, REF, "https://management.chinacloudapi.cn") is None


@pytest.mark.parametrize("content", [
    b"", b"not json", b"\xff\xfe", b"[1, 2]", b'"host"', b"{}",
    json.dumps({"scope": SCOPE, "arm_endpoint": ARM}).encode(),  # no host
])
def test_cache_garbage_is_ignored(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / CACHE_NAME
    path.write_bytes(content)
    assert load_cached_host(path, REF, ARM) is None


@pytest.mark.parametrize("scope", [None, 5, ["x"]])
def test_cache_with_a_scope_that_is_not_a_string_is_ignored(tmp_path: Path, scope: object) -> None:
    # A cache that is not ours must never stop the agent from starting (it once raised AttributeError).
    path = tmp_path / CACHE_NAME
    path.write_text(json.dumps({"scope": scope, "arm_endpoint": ARM, "host": HOST}))
    assert load_cached_host(path, REF, ARM) is None


@pytest.mark.parametrize("host", ["", "evil.example/path", "user@evil.example", "h.example?x=1", "h.example#f",
                                  "h.example:99999", "h.example:port", "line\nbreak", 42, None, ["h.example"]])
def test_cache_with_a_bad_host_is_ignored(tmp_path: Path, host: object) -> None:
    path = tmp_path / CACHE_NAME
    path.write_text(json.dumps({"scope": SCOPE, "arm_endpoint": ARM, "host": host}))
    assert load_cached_host(path, REF, ARM) is None


# --- reading ARM's and the discovery service's answers --------------------------------------------


def test_host_from_the_workspace_resource() -> None:
    uri = f"azureml://{HOST}/mlflow/v1.0{SCOPE}"
    assert host_from_workspace_resource({"properties": {"mlFlowTrackingUri": uri}}) == HOST
    other = uri.replace(HOST, "EastUS.API.azureml.ms:8443")
    assert host_from_workspace_resource({"properties": {"mlFlowTrackingUri": other}}) == "eastus.api.azureml.ms:8443"
    answer: dict[str, Any]
    for answer in ({}, {"properties": None}, {"properties": {}}, {"properties": {"mlFlowTrackingUri": ""}},
                   {"properties": {"mlFlowTrackingUri": 5}}, {"properties": "x"}):
        assert host_from_workspace_resource(answer) is None, answer
    for bad in (f"https://{HOST}/mlflow/v1.0{SCOPE}", f"azureml://{HOST}/history/v1.0{SCOPE}", "azureml://"):
        with pytest.raises(WorkspaceLookupError, match="unusable mlFlowTrackingUri") as info:
            host_from_workspace_resource({"properties": {"mlFlowTrackingUri": bad}})
        assert info.value.unauthorized is False


def test_discovery_url_and_document() -> None:
    url = f"https://{HOST}/discovery"
    assert discovery_url({"properties": {"discoveryUrl": url}}) == url
    answer: dict[str, Any]
    for answer in ({}, {"properties": {}}, {"properties": {"discoveryUrl": "ftp://x/discovery"}},
                   {"properties": {"discoveryUrl": 7}}):
        assert discovery_url(answer) is None, answer
    assert host_from_discovery({"api": f"https://{HOST}", "history": "https://other"}) == HOST
    assert host_from_discovery({"api": " https://EastUS.api.azureml.ms/ "}) == HOST
    assert host_from_discovery({"api": "https://127.0.0.1:8443"}) == "127.0.0.1:8443"
    with pytest.raises(WorkspaceLookupError, match='no "api" endpoint'):
        host_from_discovery({"history": f"https://{HOST}"})
    with pytest.raises(WorkspaceLookupError, match='no "api" endpoint'):
        host_from_discovery({"api": None})
    # Plain http would hand the workspace's bearer token to anyone on the path: refused.
    for bad in (f"http://{HOST}", "https://", "https://user:pw@evil.example", "https://h.example:99999", "eastus"):
        with pytest.raises(WorkspaceLookupError, match="unusable api endpoint"):
            host_from_discovery({"api": bad})


# --- ArmWorkspaceLocator against a real local server ----------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeArm:
    """A local HTTP server answering ARM's workspace GET and a discovery document, as ``mode`` says.

    Modes: ``ok`` (with mlFlowTrackingUri), ``discovery`` (only discoveryUrl), ``neither``, ``status``
    (``status`` with ARM's envelope), ``notjson``, ``array``, ``redirect``, ``hang`` (until ``release``),
    ``gate`` (answers ``ok`` once ``release`` is set). ``tokens_ok`` limits the bearer tokens accepted
    (401 otherwise); every request is recorded.
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.status = 404
        self.code = "ResourceNotFound"
        self.api = f"https://{HOST}"
        self.tokens_ok: set[str] | None = None
        self.release = asyncio.Event()
        self.requests: list[dict[str, Any]] = []
        self.port = 0
        app = web.Application()
        app.router.add_get("/discovery", self._discovery)
        app.router.add_get("/{tail:.*}", self._arm)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] != "/discovery"]

    def discovery_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == "/discovery"]

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        self.release.set()
        await self._runner.cleanup()

    def _record(self, request: web.Request) -> None:
        self.requests.append({"path": request.path, "query": dict(request.query),
                              "authorization": request.headers.get("Authorization"),
                              "accept": request.headers.get("Accept")})

    async def _discovery(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.json_response({"api": self.api, "history": self.api, "studio": "https://ml.azure.com"})

    async def _arm(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        if self.mode == "hang":
            await self.release.wait()
        if self.mode == "gate":
            await self.release.wait()
        token = (request.headers.get("Authorization") or "").removeprefix("Bearer ")
        if self.tokens_ok is not None and token not in self.tokens_ok:
            return web.json_response({"error": {"code": "InvalidAuthenticationToken",
                                                "message": "The access token is invalid."}}, status=401)
        properties: dict[str, Any] = {"discoveryUrl": f"{self.endpoint}/discovery",
                                      "mlFlowTrackingUri": f"azureml://{HOST}/mlflow/v1.0{SCOPE}"}
        if self.mode == "status":
            return web.json_response({"error": {"code": self.code, "message": f"answer {self.status}"}},
                                     status=self.status)
        if self.mode == "notjson":
            return web.Response(text="<html>gateway</html>", content_type="text/html")
        if self.mode == "array":
            return web.json_response([properties])
        if self.mode == "redirect":
            raise web.HTTPFound(f"{self.endpoint}/elsewhere")
        if self.mode == "discovery":
            del properties["mlFlowTrackingUri"]
        if self.mode == "neither":
            properties = {}
        return web.json_response({"id": SCOPE, "name": WS, "location": "eastus", "properties": properties})


@pytest.fixture
async def arm() -> AsyncIterator[FakeArm]:
    server = FakeArm()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _locator(arm: FakeArm | str, tmp_path: Path, timeout: float = 10.0) -> ArmWorkspaceLocator:
    endpoint = arm if isinstance(arm, str) else arm.endpoint + "/"
    return ArmWorkspaceLocator(REF, arm_endpoint=endpoint, cache_path=tmp_path / CACHE_NAME, timeout=timeout)


TOKEN = "arm-token-0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


async def test_lookup_reads_the_tracking_uri_and_caches_the_host(arm: FakeArm, tmp_path: Path) -> None:
    locator = _locator(arm, tmp_path)
    assert locator.resource_url == f"{arm.endpoint}{SCOPE}?api-version={ARM_API_VERSION}"
    assert await locator.cached() is None
    assert await locator.resolve(HEADERS) == HOST
    [request] = arm.requests
    assert request == {"path": SCOPE, "query": {"api-version": ARM_API_VERSION},
                       "authorization": f"Bearer {TOKEN}", "accept": "application/json"}
    assert await locator.cached() == HOST
    assert stat.S_IMODE((tmp_path / CACHE_NAME).stat().st_mode) == 0o600
    assert json.loads((tmp_path / CACHE_NAME).read_text())["arm_endpoint"] == arm.endpoint  # without the "/"


async def test_lookup_falls_back_to_the_discovery_document_without_sending_the_token(
        arm: FakeArm, tmp_path: Path) -> None:
    arm.mode = "discovery"
    arm.api = "https://westeurope.api.azureml.ms"
    assert await _locator(arm, tmp_path).resolve(HEADERS) == "westeurope.api.azureml.ms"
    assert len(arm.arm_requests()) == 1
    [discovery] = arm.discovery_requests()
    assert discovery["authorization"] is None, "the ARM token went to the discovery service"
    assert load_cached_host(tmp_path / CACHE_NAME, REF, arm.endpoint) == "westeurope.api.azureml.ms"


async def test_discovery_naming_a_plain_http_api_is_refused(arm: FakeArm, tmp_path: Path) -> None:
    arm.mode = "discovery"
    arm.api = "http://westeurope.api.azureml.ms"
    with pytest.raises(WorkspaceLookupError, match="unusable api endpoint"):
        await _locator(arm, tmp_path).resolve(HEADERS)
    assert not (tmp_path / CACHE_NAME).exists()


async def _failure(arm: FakeArm, tmp_path: Path, timeout: float = 10.0) -> WorkspaceLookupError:
    with pytest.raises(WorkspaceLookupError) as info:
        await _locator(arm, tmp_path, timeout).resolve(HEADERS)
    assert TOKEN not in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / CACHE_NAME).exists(), "a failed lookup wrote the cache"
    return info.value


async def test_arm_404_names_the_config_keys(arm: FakeArm, tmp_path: Path) -> None:
    arm.mode, arm.status, arm.code = "status", 404, "ResourceNotFound"
    error = await _failure(arm, tmp_path)
    message = str(error)
    assert message.startswith("ARM answered HTTP 404 ResourceNotFound answer 404"), message
    assert "check subscription_id, resource_group, workspace_name in the config file" in message
    assert error.unauthorized is False


async def test_arm_403_says_read_access_is_needed(arm: FakeArm, tmp_path: Path) -> None:
    arm.mode, arm.status, arm.code = "status", 403, "AuthorizationFailed"
    error = await _failure(arm, tmp_path)
    assert "HTTP 403 AuthorizationFailed" in str(error)
    assert "needs read access to the workspace" in str(error)
    assert error.unauthorized is False  # a new token would not help


async def test_arm_401_asks_for_a_new_token(arm: FakeArm, tmp_path: Path) -> None:
    arm.tokens_ok = {"some-other-token"}
    error = await _failure(arm, tmp_path)
    assert "HTTP 401 InvalidAuthenticationToken" in str(error)
    assert error.unauthorized is True


@pytest.mark.parametrize(("mode", "problem"), [
    ("notjson", "ARM's answer is not JSON"),
    ("array", "ARM's answer is not a JSON object"),
    ("neither", "has neither mlFlowTrackingUri nor an https discoveryUrl"),
    ("redirect", "ARM answered HTTP 302"),  # not followed: the token stays with ARM
])
async def test_unusable_answers(arm: FakeArm, tmp_path: Path, mode: str, problem: str) -> None:
    arm.mode = mode
    error = await _failure(arm, tmp_path)
    assert problem in str(error), error
    assert not any(r["path"] == "/elsewhere" for r in arm.requests)


async def test_a_hanging_arm_times_out(arm: FakeArm, tmp_path: Path) -> None:
    arm.mode = "hang"
    started = time.monotonic()
    error = await _failure(arm, tmp_path, timeout=0.5)
    took = time.monotonic() - started
    assert "ARM did not answer within" in str(error), error
    assert 0.4 <= took < 5.0, took


async def test_an_unreachable_arm(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceLookupError, match="cannot reach ARM: ClientConnectorError"):
        await _locator(f"http://127.0.0.1:{_closed_port()}", tmp_path).resolve(HEADERS)


# --- ArmResolvedUpstream --------------------------------------------------------------------------


class CountingSource:
    """A TokenSource handing out ``tok-1``, ``tok-2``, ... each valid for an hour."""

    name = "counting"

    def __init__(self) -> None:
        self.issued = 0

    def changed(self) -> bool:
        return False

    async def fetch(self) -> Token:
        self.issued += 1
        now = time.time()
        return Token(f"tok-{self.issued}", now + 3600, now)


@contextlib.contextmanager
def _no_task_left() -> Iterator[None]:
    before = asyncio.all_tasks()
    yield
    left = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()
            and not getattr(t.get_coro(), "__qualname__", "").startswith("RequestHandler.")]  # FakeArm's own
    assert not left, f"tasks left running: {left}"


def _upstream(arm: FakeArm, tmp_path: Path, source: CountingSource | None = None) -> ArmResolvedUpstream:
    inner = RenewingUpstream("", source or CountingSource(), AgentMetrics(), ssl_context=True)
    return ArmResolvedUpstream(inner, _locator(arm, tmp_path))


async def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_uploads_wait_for_the_lookup_then_use_the_workspace_host(arm: FakeArm, tmp_path: Path) -> None:
    arm.mode = "gate"
    upstream = _upstream(arm, tmp_path)
    with _no_task_left():
        await upstream.start()
        try:
            waiting = asyncio.ensure_future(upstream.credentials())
            await _wait_for(lambda: len(arm.requests) == 1, 5, "the ARM request")
            await asyncio.sleep(0.2)
            assert not waiting.done(), "credentials were handed out before the host was known"
            workspace = upstream.state()["workspace"]
            assert workspace == {"scope": SCOPE, "resolved": False, "base_url": None, "last_error": None}
            arm.release.set()
            credentials = await asyncio.wait_for(waiting, 5)
            assert credentials.base_url == f"https://{HOST}/mlflow/v2.0{SCOPE}"
            assert credentials.headers == {"Authorization": "Bearer tok-1"}
            assert arm.requests[0]["authorization"] == "Bearer tok-1"  # ARM got the same (ARM-scoped) token
            state = upstream.state()
            assert state["source"] == "counting" and state["valid"] is True
            assert state["workspace"] == {"scope": SCOPE, "resolved": True,
                                          "base_url": f"https://{HOST}/mlflow/v2.0{SCOPE}", "last_error": None}
            refreshed = await asyncio.wait_for(upstream.refresh("test"), 5)
            assert refreshed.base_url == credentials.base_url
        finally:
            await upstream.stop()
    assert (tmp_path / CACHE_NAME).exists()

    # A second start (a restart, or `sync`) uses the cache: no ARM request, credentials at once.
    arm.mode = "status"
    again = _upstream(arm, tmp_path)
    await again.start()
    try:
        credentials = await asyncio.wait_for(again.credentials(), 1)
        assert credentials.base_url == f"https://{HOST}/mlflow/v2.0{SCOPE}"
        assert again.state()["workspace"] == {"scope": SCOPE, "resolved": True, "base_url": credentials.base_url,
                                              "last_error": None}
    finally:
        await again.stop()
    assert len(arm.arm_requests()) == 1, "ARM was asked again although the cache held the host"


async def test_a_failed_lookup_is_reported_and_retried(arm: FakeArm, tmp_path: Path) -> None:
    arm.mode, arm.status, arm.code = "status", 503, "ServiceUnavailable"
    upstream = _upstream(arm, tmp_path)
    await upstream.start()
    try:
        await _wait_for(lambda: upstream.last_error is not None, 5, "the first failure")
        workspace = upstream.state()["workspace"]
        assert isinstance(workspace, dict) and workspace["resolved"] is False
        assert workspace["last_error"].startswith("ARM answered HTTP 503 ServiceUnavailable"), workspace
        arm.mode = "ok"  # retried after 1 s, then 2 s, ...
        credentials = await asyncio.wait_for(upstream.credentials(), 10)
        assert credentials.base_url.startswith(f"https://{HOST}/")
        assert upstream.state()["workspace"] == {"scope": SCOPE, "resolved": True, "base_url": credentials.base_url,
                                                 "last_error": None}
    finally:
        await upstream.stop()


async def test_arm_401_renews_the_token_before_the_next_try(arm: FakeArm, tmp_path: Path) -> None:
    arm.tokens_ok = {"tok-2"}  # the token held at start is refused
    source = CountingSource()
    upstream = _upstream(arm, tmp_path, source)
    await upstream.start()
    try:
        credentials = await asyncio.wait_for(upstream.credentials(), 15)
        assert credentials.headers == {"Authorization": "Bearer tok-2"}
    finally:
        await upstream.stop()
    seen = [r["authorization"] for r in arm.arm_requests()]
    assert seen[0] == "Bearer tok-1" and seen[-1] == "Bearer tok-2", seen
    assert source.issued == 2, "renewed more than once"


@pytest.mark.parametrize("mode", ["status", "hang"])
async def test_stop_cancels_the_lookup(arm: FakeArm, tmp_path: Path, mode: str) -> None:
    arm.mode, arm.status = mode, 503
    upstream = _upstream(arm, tmp_path)
    with _no_task_left():
        await upstream.start()
        await _wait_for(lambda: len(arm.requests) >= 1, 5, "the ARM request")
        if mode == "status":
            await _wait_for(lambda: upstream.last_error is not None, 5, "the failure")
        started = time.monotonic()
        await asyncio.wait_for(upstream.stop(), 5)
        assert time.monotonic() - started < 2.0
    assert upstream.state()["workspace"]["resolved"] is False  # type: ignore[index]
    assert not (tmp_path / CACHE_NAME).exists()


@pytest.mark.parametrize("host", ["eastus.api.azureml.ms", "127.0.0.1:8443",
                                  "ws-1.workspace.westeurope.api.azureml.ms"])
def test_hosts_that_make_a_clean_url(host: str) -> None:
    assert _valid_host(host)


@pytest.mark.parametrize("host", ["a b", "a.b\\x", "a.b:", "a.b:0", "a.b:70000", "a.b/c", "user@a.b", "-a.b", "a..b",
                                  "", "a.b?x", "[::1]:443"])
def test_hosts_that_could_change_the_url_are_refused(host: str) -> None:
    assert not _valid_host(host)


def test_an_http_discovery_url_is_used_only_when_arm_itself_is_http() -> None:
    answer = {"properties": {"discoveryUrl": "http://eastus.api.azureml.ms/discovery"}}
    assert discovery_url(answer) is None  # it decides where the token goes: never over plain http
    assert discovery_url(answer, allow_http=True) == "http://eastus.api.azureml.ms/discovery"
    assert discovery_url({"properties": {"discoveryUrl": "https://h/discovery"}}) == "https://h/discovery"
