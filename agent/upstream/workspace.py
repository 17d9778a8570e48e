"""An Azure ML workspace named by a ``config.json``, its regional host found through Azure Resource Manager.

``config.json`` is the file ``Workspace.write_config`` (SDK v1) and the portal's "download config.json"
write: ``{"subscription_id", "resource_group", "workspace_name"}`` (azure-ai-ml also accepts an ARM
``"Scope"``). It does not say which regional host serves the workspace's MLflow API, so the agent asks
ARM once, ``GET <arm>/subscriptions/…/workspaces/<ws>?api-version=…``, and reads the host from the
workspace's ``mlFlowTrackingUri`` (or, for older answers, from its ``discoveryUrl`` document). The host
is cached in the spool directory, so restarts, ``sync`` and an ARM outage after the first start never
need ARM again.

``ArmResolvedUpstream`` wraps the token-renewing provider: tokens are renewed as for any Azure upstream;
the base URL comes from the lookup. Until the lookup succeeds, uploads wait (as they wait for a
credential): writes are taken and spooled, nothing fails, and ``/readyz`` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import orjson

from agent.logs import warn_every
from agent.upstream.azureml import PROVIDER, WorkspaceRef, parse_azure_error, parse_azureml_uri
from agent.upstream.base import Credentials
from agent.upstream.renewing import RenewingUpstream

log = logging.getLogger("agent.upstream")

PUBLIC_ARM_ENDPOINT = "https://management.azure.com"
ARM_API_VERSION = "2024-10-01"
CACHE_NAME = "azureml-workspace.json"
LOOKUP_TIMEOUT = 30.0  # one ARM or discovery request
_RETRY_MIN, _RETRY_MAX = 1.0, 60.0
_MAX_ANSWER = 1 << 20  # an ARM workspace resource is a few KiB
_KEYS = ("subscription_id", "resource_group", "workspace_name")


class WorkspaceLookupError(Exception):
    """The workspace's host could not be found (yet); the message says why and never holds a token."""

    def __init__(self, message: str, *, unauthorized: bool = False) -> None:
        super().__init__(message)
        self.unauthorized = unauthorized  # ARM refused the token: renew it before the next try


def find_config_file(path: Path) -> Path:
    """A directory is searched the way the SDKs search: ``config.json``, then ``.azureml/config.json``."""
    if not path.is_dir():
        return path
    for candidate in (path / "config.json", path / ".azureml" / "config.json"):
        if candidate.is_file():
            return candidate
    raise ValueError(f"no config.json or .azureml/config.json in {path}")


def read_workspace_config(path: Path) -> WorkspaceRef:
    """Read a workspace ``config.json``. Raises ValueError naming the file and what is wrong."""
    path = find_config_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object with {', '.join(_KEYS)}")
    scope = data.get("Scope") or data.get("scope")
    if isinstance(scope, str) and scope.strip() and not all(isinstance(data.get(k), str) for k in _KEYS):
        return _ref_from_scope(path, scope)
    values: list[str] = []
    for key in _KEYS:
        value = data.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{path}: {key!r} is missing or not a non-empty string (expected {', '.join(_KEYS)})")
        value = value.strip()
        if "/" in value or any(c.isspace() or ord(c) < 32 for c in value):
            raise ValueError(f"{path}: {key!r} must not contain '/', spaces or control characters")
        values.append(value)
    return WorkspaceRef(*values)


def _ref_from_scope(path: Path, scope: str) -> WorkspaceRef:
    parts = scope.strip().strip("/").split("/")
    expected = ["subscriptions", "resourcegroups", "providers", "workspaces"]
    if len(parts) != 8 or [p.lower() for p in parts[0::2]] != expected or parts[5].lower() != PROVIDER.lower() \
            or not all(parts[1::2]):
        raise ValueError(f"{path}: \"Scope\" must be /subscriptions/<sub>/resourceGroups/<rg>/providers/{PROVIDER}"
                         "/workspaces/<ws>")
    return WorkspaceRef(parts[1], parts[3], parts[7])


# --- the cache ------------------------------------------------------------------------------------


def load_cached_host(path: Path, ref: WorkspaceRef, arm_endpoint: str) -> str | None:
    """The host cached for this workspace and ARM endpoint, or None (absent, unreadable or another's)."""
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        log.warning("ignoring the workspace cache %s: %s", path, exc)
        return None
    scope = data.get("scope") if isinstance(data, dict) else None
    if not isinstance(scope, str) or scope.lower() != ref.scope.lower() or data.get("arm_endpoint") != arm_endpoint:
        return None
    host = data.get("host")
    return host if isinstance(host, str) and _valid_host(host) else None


def store_cached_host(path: Path, ref: WorkspaceRef, arm_endpoint: str, host: str) -> None:
    """Atomically, readable by the agent's user only (the spool directory's rule)."""
    body = orjson.dumps({"scope": ref.scope, "arm_endpoint": arm_endpoint, "host": host,
                         "resolved_at": time.time()}, option=orjson.OPT_INDENT_2)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                   r"(?::[0-9]{1,5})?")


def _valid_host(host: str) -> bool:
    """A DNS name or IPv4 address, with an optional port: nothing that could change the URL built from it."""
    if not _HOST.fullmatch(host):
        return False
    _, _, port = host.partition(":")
    return not port or 0 < int(port) <= 65535


# --- the lookup -----------------------------------------------------------------------------------


def host_from_workspace_resource(answer: Mapping[str, Any]) -> str | None:
    """``properties.mlFlowTrackingUri`` (``azureml://<host>/mlflow/…``) → host, or None when absent."""
    properties = answer.get("properties")
    uri = properties.get("mlFlowTrackingUri") if isinstance(properties, dict) else None
    if not isinstance(uri, str) or not uri.strip():
        return None
    try:
        return parse_azureml_uri(uri).host
    except ValueError as exc:
        raise WorkspaceLookupError(f"ARM gave an unusable mlFlowTrackingUri: {exc}") from None


def discovery_url(answer: Mapping[str, Any], *, allow_http: bool = False) -> str | None:
    """The discovery document's URL; https only (it decides where the token goes) unless ARM itself is http."""
    properties = answer.get("properties")
    url = properties.get("discoveryUrl") if isinstance(properties, dict) else None
    schemes = ("https://", "http://") if allow_http else ("https://",)
    return url if isinstance(url, str) and url.lower().startswith(schemes) else None


def host_from_discovery(document: Mapping[str, Any]) -> str:
    """The discovery document's ``api`` endpoint (``https://<region>.api.azureml.ms``) → host."""
    api = document.get("api")
    if not isinstance(api, str):
        raise WorkspaceLookupError("the workspace's discovery document has no \"api\" endpoint")
    parts = urlsplit(api.strip())
    if parts.scheme.lower() != "https" or not _valid_host(parts.netloc.lower()):
        raise WorkspaceLookupError(f"the workspace's discovery document names an unusable api endpoint {api[:100]!r}")
    return parts.netloc.lower()


class ArmWorkspaceLocator:
    """Finds a workspace's regional host through ARM; one request at a time, by its owner."""

    def __init__(self, ref: WorkspaceRef, *, arm_endpoint: str, cache_path: Path,
                 ssl: Any = True, timeout: float = LOOKUP_TIMEOUT) -> None:
        self.ref = ref
        self.arm_endpoint = arm_endpoint.rstrip("/")
        self.cache_path = cache_path
        self._ssl = ssl
        self._timeout = timeout

    @property
    def resource_url(self) -> str:
        return f"{self.arm_endpoint}{quote(self.ref.scope)}?api-version={ARM_API_VERSION}"

    async def cached(self) -> str | None:
        return await asyncio.to_thread(load_cached_host, self.cache_path, self.ref, self.arm_endpoint)

    async def resolve(self, headers: Mapping[str, str]) -> str:
        """Ask ARM (and the discovery service if need be); cache and return the host."""
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            answer = await self._get_json(session, self.resource_url, headers, "ARM")
            host = host_from_workspace_resource(answer)
            if host is None:
                url = discovery_url(answer, allow_http=self.arm_endpoint.lower().startswith("http://"))
                if url is None:
                    raise WorkspaceLookupError("ARM's workspace answer has neither mlFlowTrackingUri nor an https "
                                               "discoveryUrl")
                host = host_from_discovery(await self._get_json(session, url, {}, "the discovery service"))
        await asyncio.to_thread(store_cached_host, self.cache_path, self.ref, self.arm_endpoint, host)
        return host

    async def _get_json(self, session: aiohttp.ClientSession, url: str, headers: Mapping[str, str],
                        what: str) -> dict[str, Any]:
        try:
            async with session.get(url, headers={**headers, "Accept": "application/json"}, ssl=self._ssl,
                                   allow_redirects=False) as response:
                status = response.status
                body = await response.content.read(_MAX_ANSWER)
        except asyncio.TimeoutError:
            raise WorkspaceLookupError(f"{what} did not answer within {self._timeout:.0f}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise WorkspaceLookupError(f"cannot reach {what}: {type(exc).__name__}: {exc}") from None
        if status != 200:
            code, message, correlation = parse_azure_error(body)
            hint = ""
            if status in (401, 403):
                hint = " (the identity needs read access to the workspace, e.g. the Reader role)"
            elif status == 404:
                hint = f" (check {', '.join(_KEYS)} in the config file)"
            request = correlation.get("request") or correlation.get("operation")
            raise WorkspaceLookupError(" ".join(part for part in (
                f"{what} answered HTTP {status}", code or "", f"{message[:300]}" if message else "",
                f"(request {request})" if request else "") if part) + hint, unauthorized=status == 401)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise WorkspaceLookupError(f"{what}'s answer is not JSON") from None
        if not isinstance(data, dict):
            raise WorkspaceLookupError(f"{what}'s answer is not a JSON object")
        return data


# --- the provider ---------------------------------------------------------------------------------


class ArmResolvedUpstream:
    """An UpstreamProvider whose base URL comes from an ARM lookup (once, then cached)."""

    def __init__(self, inner: RenewingUpstream, locator: ArmWorkspaceLocator) -> None:
        self.name = inner.name
        self._inner = inner
        self._locator = locator
        self._base_url: str | None = None
        self._resolved = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None

    @property
    def ssl(self) -> Any:
        return self._inner.ssl

    @property
    def inner(self) -> RenewingUpstream:
        return self._inner

    async def start(self) -> None:
        await self._inner.start()
        try:
            host = await self._locator.cached()
        except BaseException:
            await self._inner.stop()
            raise
        if host is not None:
            self._use(host, "cache")
        else:
            self._task = asyncio.create_task(self._resolve_until_done(), name="azureml-workspace-lookup")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._inner.stop()

    def state(self) -> dict[str, object]:
        return {**self._inner.state(), "workspace": {
            "scope": self._locator.ref.scope,
            "resolved": self._base_url is not None,
            "base_url": self._base_url,
            "last_error": self.last_error,
        }}

    async def credentials(self) -> Credentials:
        await self._resolved.wait()  # uploads pause until the workspace's host is known
        return self._located(await self._inner.credentials())

    async def refresh(self, reason: str) -> Credentials:
        credentials = await self._inner.refresh(reason)
        await self._resolved.wait()
        return self._located(credentials)

    def _located(self, credentials: Credentials) -> Credentials:
        assert self._base_url is not None
        return Credentials(self._base_url, credentials.headers, credentials.expires_at)

    def _use(self, host: str, origin: str) -> None:
        self._base_url = self._locator.ref.at(host).base_url
        self.last_error = None
        self._resolved.set()
        log.info("Azure ML workspace %s is served by %s (from %s)", self._locator.ref.workspace_name, host, origin)

    async def _resolve_until_done(self) -> None:
        backoff = _RETRY_MIN
        while True:
            headers = (await self._inner.credentials()).headers  # an ARM token: waits while there is none
            try:
                host = await self._locator.resolve(headers)
            except WorkspaceLookupError as exc:
                self.last_error = str(exc)
                warn_every(log, "azureml-workspace-lookup", 60.0, "cannot find the Azure ML workspace's host "
                           "yet (retrying in %.0fs): %s", backoff, exc)
                if exc.unauthorized:
                    await self._inner.refresh("ARM answered 401")
            else:
                self._use(host, "ARM")
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RETRY_MAX)
