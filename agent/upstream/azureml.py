"""Azure Machine Learning workspaces as the upstream: ``azureml://`` tracking URIs and their credentials.

An Azure ML workspace speaks plain MLflow REST 2.0 under
``https://<host>/mlflow/v2.0/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.MachineLearningServices/workspaces/<ws>``
with ``Authorization: Bearer <token>``. The URI carries no credential (plugins before 1.10 put an ARM
token in its query; that query is ignored and never echoed). Only the bearer token expires, and one of
two token sources renews it:

* ``AzureMLRunTokenSource`` inside an Azure ML job: the job's run token (``MLFLOW_TRACKING_TOKEN``, a JWT
  valid for weeks), renewed with the run-history ``…/runs/<run id>/token`` endpoint, authenticated with
  the current run token.
* ``AzureIdentitySource`` everywhere else: an Entra ID access token for Azure Resource Manager from
  azure-identity's ``DefaultAzureCredential`` (environment service principal, workload identity,
  managed identity, Azure CLI, …) without anything that could prompt. azure-identity is an optional
  dependency (``mlflow-agent[azure]``), imported only when this source is used.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

import aiohttp
import orjson

from agent.upstream.renewing import CredentialError, Token, TokenSource, jwt_expiry, mask_tokens
from agent.upstream.static import tls_from_env

if TYPE_CHECKING:
    from azure.identity.aio import DefaultAzureCredential

log = logging.getLogger("agent.upstream")

ARM_SCOPE = "https://management.azure.com/.default"
AZURE_EXTRA_HINT = "azureml:// upstreams need azure-identity: pip install 'mlflow-agent[azure]'"
PROVIDER = "Microsoft.MachineLearningServices"
RENEW_TIMEOUT = 30.0  # one run-token renewal request
IDENTITY_TIMEOUT = 60.0  # one azure-identity get_token (the CLI alone may take 10 s, managed identity retries)
ENV_TOKEN_MIN_VALIDITY = 600.0  # the job's own token is used at start only if valid for longer than this
_MAX_BODY = 256 * 1024  # a run-token answer or an error envelope
_MAX_DETAIL = 400
_TROUBLESHOOT = re.compile(r"\s*See the troubleshooting guide for more information: https://\S+")
_VERSIONS = ("v1.0", "v2.0")
_EXAMPLE = ("azureml://<region>.api.azureml.ms/mlflow/v2.0/subscriptions/<sub>/resourceGroups/<rg>"
            f"/providers/{PROVIDER}/workspaces/<ws>")


# --- the URI --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkspaceRef:
    """A workspace by its ARM names (what a config.json holds), before its regional host is known."""

    subscription_id: str
    resource_group: str
    workspace_name: str

    @property
    def scope(self) -> str:
        """``/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.MachineLearningServices/workspaces/<ws>``."""
        return (f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
                f"/providers/{PROVIDER}/workspaces/{self.workspace_name}")

    def at(self, host: str) -> AzureWorkspace:
        return AzureWorkspace(self.subscription_id, self.resource_group, self.workspace_name, host)


@dataclass(frozen=True, slots=True)
class AzureWorkspace(WorkspaceRef):
    host: str  # the regional (or private-link) API host, with ":port" when the URI gave one

    @property
    def base_url(self) -> str:
        """Where MLflow's ``/api/2.0/mlflow/...`` endpoints live for this workspace (always v2.0)."""
        return f"https://{self.host}/mlflow/v2.0{self.scope}"

    @property
    def history_url(self) -> str:
        """The run-history service's scope URL (where run tokens are renewed)."""
        return f"https://{self.host}/history/v1.0{self.scope}"


def parse_azureml_uri(uri: str) -> AzureWorkspace:
    """Read an ``azureml://`` tracking URI (as the portal, ``az ml`` and the SDKs give it).

    ``/mlflow/v1.0`` is accepted and upgraded to v2.0, as the current azureml-mlflow plugin does; the
    query (a bare ``?`` today, an ARM token in plugins before 1.10) and any fragment are ignored.
    Raises ValueError naming what is wrong; the message never repeats the query.
    """
    try:
        parts = urlsplit(uri.strip())
    except ValueError:
        raise ValueError(f"not a valid azureml:// URI; expected {_EXAMPLE}") from None
    if parts.scheme.lower() != "azureml":
        raise ValueError(f"not an azureml:// URI (scheme {parts.scheme or 'missing'!r}); expected {_EXAMPLE}")
    if "@" in parts.netloc:
        raise ValueError("azureml:// URIs carry no credentials; remove the user:password@ part")
    if not parts.hostname:
        raise ValueError(f"the azureml:// URI has no host; expected {_EXAMPLE}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("the azureml:// URI has an invalid port (expected 1..65535)") from None
    host = parts.netloc.lower()

    segments = parts.path.strip("/").split("/") if parts.path.strip("/") else []
    if segments[:1] and segments[0].lower() == "history":
        raise ValueError("this is an old-style azureml://…/history/v1.0/… URI (azureml-mlflow < 1.10); get the "
                         "current one with `az ml workspace show --query mlflow_tracking_uri`")
    if not segments or segments[0].lower() != "mlflow":
        raise ValueError(f"the azureml:// URI's path must start with /mlflow/v1.0 or /mlflow/v2.0; expected {_EXAMPLE}")
    if len(segments) < 2 or segments[1].lower() not in _VERSIONS:
        raise ValueError("the azureml:// URI names no supported MLflow API version (expected /mlflow/v1.0 or "
                         "/mlflow/v2.0)")
    values: list[str] = []
    rest = segments[2:]
    for index, (word, what) in enumerate((("subscriptions", "subscription id"),
                                          ("resourceGroups", "resource group"),
                                          ("providers", "provider"),
                                          ("workspaces", "workspace name"))):
        pair = rest[2 * index: 2 * index + 2]
        if len(pair) < 2 or pair[0].lower() != word.lower() or not pair[1]:
            raise ValueError(f"the azureml:// URI has no {what} (expected …/{word}/<{what}>/… as in {_EXAMPLE})")
        values.append(pair[1])
    if values[2].lower() != PROVIDER.lower():
        raise ValueError(f"the azureml:// URI names provider {values[2]!r}; expected {PROVIDER}")
    if len(rest) > 8:
        raise ValueError("the azureml:// URI has more path after the workspace name; it must end with "
                         "/workspaces/<workspace name>")
    return AzureWorkspace(host=host, subscription_id=values[0], resource_group=values[1], workspace_name=values[3])


# --- Azure's error envelope -----------------------------------------------------------------------


def parse_azure_error(body: bytes) -> tuple[str | None, str | None, dict[str, str]]:
    """``{"error": {"code", "message", "innerError"?}, "correlation": {...}}`` → (code, message, correlation).

    Anything else (not JSON, MLflow's own ``error_code`` bodies, an HTML page) gives (None, None, {}).
    """
    try:
        data = orjson.loads(body)
    except (orjson.JSONDecodeError, TypeError):
        return None, None, {}
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None, None, {}
    code = error.get("code") if isinstance(error.get("code"), str) and error.get("code") else None
    message = error.get("message") if isinstance(error.get("message"), str) and error.get("message") else None
    if code is None and message is None:
        return None, None, {}
    raw = data.get("correlation")
    correlation = {str(k): v for k, v in raw.items() if isinstance(v, str)} if isinstance(raw, dict) else {}
    return code, message, correlation


def _scrub(text: str, *secrets: str, limit: int = _MAX_DETAIL) -> str:
    """One line, bounded, with known secrets and anything shaped like a JWT masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = mask_tokens(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _identity_detail(exc: BaseException) -> str:
    """azure-identity's multi-line account of each credential tried, without its troubleshooting links."""
    text = str(getattr(exc, "message", None) or exc or type(exc).__name__)
    lines = [line for line in text.splitlines() if not line.strip().startswith(("Visit https://", "To mitigate"))]
    return _TROUBLESHOOT.sub("", " ".join(lines))


# --- outside jobs: azure-identity -----------------------------------------------------------------


def require_azure_identity() -> None:
    """Raise ValueError with one line saying how to install azure-identity when it is missing."""
    try:
        import azure.identity.aio  # noqa: F401
    except ImportError:
        raise ValueError(AZURE_EXTRA_HINT) from None


class AzureIdentitySource:
    """Entra ID access tokens for Azure Resource Manager from ``DefaultAzureCredential`` (aio).

    The chain keeps the environment service principal, workload identity, managed identity (IMDS, App
    Service ``IDENTITY_ENDPOINT``/``IDENTITY_HEADER``, Azure ML compute, Arc, …), the Azure CLI, Azure
    PowerShell and the Azure Developer CLI; the shared token cache and VS Code are left out, and the aio
    chain has no interactive browser or device-code credential, so nothing ever prompts. azure-identity
    caches the token and renews it within 5 minutes of expiry, so ``fetch`` is cheap when called early.
    """

    name = "azure_identity"

    def __init__(self, scope: str = ARM_SCOPE) -> None:
        require_azure_identity()
        from azure.identity.aio import DefaultAzureCredential

        self.scope = scope
        try:
            self._credential: DefaultAzureCredential | None = DefaultAzureCredential(
                exclude_shared_token_cache_credential=True,
                exclude_visual_studio_code_credential=True,
            )
        except ValueError as exc:  # e.g. AZURE_TOKEN_CREDENTIALS names no credential
            raise ValueError(f"Azure identity configuration: {_scrub(str(exc))}") from None

    def changed(self) -> bool:
        return False

    async def fetch(self) -> Token:
        from azure.core.exceptions import AzureError

        credential = self._credential
        if credential is None:
            raise CredentialError("Azure identity: the credential was closed")
        try:
            access = await asyncio.wait_for(credential.get_token(self.scope), IDENTITY_TIMEOUT)
        except asyncio.TimeoutError:
            raise CredentialError(f"Azure identity: no token for {self.scope} within {IDENTITY_TIMEOUT:.0f}s"
                                  ) from None
        except (AzureError, ValueError, OSError, aiohttp.ClientError) as exc:
            raise CredentialError(f"Azure identity: no token for {self.scope}: {type(exc).__name__}: "
                                  f"{_scrub(_identity_detail(exc), limit=1000)}") from None
        if not access.token:
            raise CredentialError(f"Azure identity: an empty token for {self.scope}")
        return Token(access.token, float(access.expires_on), time.time())

    async def close(self) -> None:
        credential, self._credential = self._credential, None
        if credential is not None:
            await credential.close()


# --- inside jobs: the run token -------------------------------------------------------------------


_ISO = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:[.,](\d+))?\s*(Z|z|[+-]\d{2}:?\d{2})?")


def parse_iso_time(text: str) -> float:
    """ISO 8601 (.NET style: up to 7 fractional digits, ``Z``, an offset or none = UTC) → unix seconds."""
    m = _ISO.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not an ISO 8601 time: {text[:40]!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    fraction = float("0." + m[7]) if m[7] else 0.0
    zone = timezone.utc
    if m[8] and m[8] not in ("Z", "z"):
        sign = -1 if m[8][0] == "-" else 1
        digits = m[8][1:].replace(":", "")
        zone = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    return datetime(year, month, day, hour, minute, second, tzinfo=zone).timestamp() + fraction


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or its first ``limit`` bytes (enough for a token answer or an error envelope)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def _run_id(env: Mapping[str, str]) -> str | None:
    return env.get("MLFLOW_RUN_ID") or env.get("AZUREML_RUN_ID") or None


class AzureMLRunTokenSource:
    """The run token of the Azure ML job the agent runs in, renewed through the run-history service."""

    name = "azureml_run_token"

    def __init__(self, workspace: AzureWorkspace, env: Mapping[str, str], *,
                 clock: Callable[[], float] = time.time) -> None:
        token = (env.get("MLFLOW_TRACKING_TOKEN") or "").strip()
        run_id = _run_id(env)
        if not token or not run_id:
            raise ValueError("the Azure ML run token needs MLFLOW_TRACKING_TOKEN and MLFLOW_RUN_ID (or AZUREML_RUN_ID)")
        self.workspace = workspace
        self._token = token
        self._clock = clock
        self._ssl = tls_from_env(env)
        self._env_token_used = False
        experiment_id = env.get("MLFLOW_EXPERIMENT_ID") or env.get("AZUREML_EXPERIMENT_ID")
        experiment_name = env.get("MLFLOW_EXPERIMENT_NAME") or env.get("AZUREML_ARM_PROJECT_NAME")
        run = f"runs/{quote(run_id, safe='')}/token"
        self.renew_url: str | None
        if experiment_id:
            self.renew_url = f"{workspace.history_url}/experimentids/{quote(experiment_id, safe='')}/{run}"
        elif experiment_name:
            self.renew_url = f"{workspace.history_url}/experiments/{quote(experiment_name, safe='')}/{run}"
        else:
            self.renew_url = None
            log.warning("the Azure ML run token cannot be renewed: neither MLFLOW_EXPERIMENT_ID/AZUREML_EXPERIMENT_ID "
                        "nor MLFLOW_EXPERIMENT_NAME/AZUREML_ARM_PROJECT_NAME is set; it is used until it expires")

    def changed(self) -> bool:
        return False

    async def fetch(self) -> Token:
        if not self._env_token_used:
            self._env_token_used = True
            now = self._clock()
            expires = jwt_expiry(self._token)
            if expires is None or expires - now > ENV_TOKEN_MIN_VALIDITY:
                return Token(self._token, expires, now)
        return await self._renew()

    async def close(self) -> None:
        return None

    async def _renew(self) -> Token:
        url = self.renew_url
        if url is None:
            raise CredentialError("cannot renew the Azure ML run token: set MLFLOW_EXPERIMENT_ID or "
                                  "AZUREML_EXPERIMENT_ID (or the experiment's name in MLFLOW_EXPERIMENT_NAME or "
                                  "AZUREML_ARM_PROJECT_NAME)")
        current = self._token
        headers = {"Authorization": f"Bearer {current}", "Accept": "application/json"}
        try:
            async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=RENEW_TIMEOUT)) as session,
                        session.get(url, headers=headers, ssl=self._ssl, allow_redirects=False) as response):
                status = response.status
                body = await _read_bounded(response, _MAX_BODY)
        except asyncio.TimeoutError:
            raise CredentialError(f"Azure ML run token renewal: no answer from {self.workspace.host} within "
                                  f"{RENEW_TIMEOUT:.0f}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise CredentialError(f"Azure ML run token renewal: cannot reach {self.workspace.host}: "
                                  f"{type(exc).__name__}: {_scrub(str(exc), current)}") from None
        now = self._clock()
        if status != 200:
            code, message, correlation = parse_azure_error(body)
            detail = "".join((f" {code}" if code else "", f": {message}" if message else ""))
            request = correlation.get("request")
            raise CredentialError(_scrub(f"Azure ML run token renewal refused: HTTP {status}{detail}"
                                         + (f" (request {request})" if request else ""), current))
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise CredentialError("Azure ML run token renewal: the answer is not JSON") from None
        value = data.get("token") if isinstance(data, dict) else None
        if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value.strip()):
            raise CredentialError("Azure ML run token renewal: the answer has no \"token\" string")
        value = value.strip()
        expires: float | None = None
        raw_expiry = data.get("expiryTimeUtc")
        if isinstance(raw_expiry, str) and raw_expiry.strip():
            try:
                expires = parse_iso_time(raw_expiry)
            except ValueError:
                log.warning("Azure ML run token renewal: unreadable expiryTimeUtc; using the token's own expiry")
        if expires is None:
            expires = jwt_expiry(value)
        self._token = value
        return Token(value, expires, now)


# --- choosing ------------------------------------------------------------------------------------


def in_azureml_job(env: Mapping[str, str]) -> bool:
    """Whether the environment holds an Azure ML job's run token (then azure-identity is not needed)."""
    return bool((env.get("MLFLOW_TRACKING_TOKEN") or "").strip() and (env.get("AZUREML_RUN_ID") or
                                                                        env.get("MLFLOW_RUN_ID")))


def azure_token_source(env: Mapping[str, str], *, job_workspace: AzureWorkspace | None = None,
                       credential: str = "default", arm_endpoint: str = "https://management.azure.com") -> TokenSource:
    """The job's run token when ``job_workspace`` is given and ``env`` is an Azure ML job's; otherwise
    azure-identity (``credential="default"``) or azureml-core in a helper process, for ARM's scope."""
    if job_workspace is not None and in_azureml_job(env):
        return AzureMLRunTokenSource(job_workspace, env)
    if credential == "azureml-core":
        from agent.upstream.azureml_core import AzureMLCoreSource

        return AzureMLCoreSource(arm_endpoint=arm_endpoint)
    return AzureIdentitySource(scope=f"{arm_endpoint.rstrip('/')}/.default")
