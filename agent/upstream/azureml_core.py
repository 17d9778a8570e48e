"""azureml-core (Azure ML SDK v1) as an optional credential source, kept out of the agent's process.

azureml-core's support ended on 2026-06-30; it weighs ~259 MB, imports in ~0.6 s, is synchronous, and
some of its auth classes fall back to an interactive login on any error. Some sites still configure
their machines for it (``AZUREML_SERVICE_PRINCIPAL_*``), so ``azure_credential = "azureml-core"``
offers it, but only like this:

* the agent never imports it: each renewal runs this module as a child process (``python -m
  agent.upstream.azureml_core``) that prints ``{"token", "expires_at"}`` and exits;
* the child has no stdin, no controlling terminal (its own session) and a deadline, after which its
  whole process group is killed, so it can neither prompt nor block the agent;
* only the non-interactive classes are used: ``ServicePrincipalAuthentication`` when a service
  principal is configured in the environment, else ``MsiAuthentication`` (managed identity).
  ``InteractiveLoginAuthentication`` and ``AzureCliAuthentication`` are never constructed.

Install it with ``pip install 'mlflow-agent[azureml-core]'``; azure-identity (the default) is the
better choice wherever it works.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from agent.upstream.renewing import mask_tokens
from agent.upstream.token_sources import TokenCommandSource

HELPER_TIMEOUT = 60.0  # import (~0.6 s) plus the SDK's own managed-identity retries
EXTRA_HINT = "azure_credential = \"azureml-core\" needs azureml-core: pip install 'mlflow-agent[azureml-core]'"
# (tenant, client id, secret): azureml-core's own variables first, then azure-identity's.
_SP_VARIABLES = (
    ("AZUREML_SERVICE_PRINCIPAL_TENANT_ID", "AZUREML_SERVICE_PRINCIPAL_ID", "AZUREML_SERVICE_PRINCIPAL_PASSWORD"),
    ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"),
)


def require_azureml_core() -> None:
    """Raise ValueError with the install hint when azureml-core is missing (without importing it)."""
    try:
        found = importlib.util.find_spec("azureml.core") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ValueError(EXTRA_HINT)


# azureml-core names clouds; without AZUREML_CURRENT_CLOUD it first asks management.azure.com for the
# list (a 30 s timeout where outbound traffic is dropped) and always takes public-cloud tokens.
_CLOUDS = {
    "management.azure.com": "AzureCloud",
    "management.chinacloudapi.cn": "AzureChinaCloud",
    "management.usgovcloudapi.net": "AzureUSGovernment",
}


def cloud_name(arm_endpoint: str) -> str:
    """azureml-core's cloud name for an ARM endpoint (the public cloud for anything unknown)."""
    host = urlsplit(arm_endpoint).hostname or ""
    return _CLOUDS.get(host.lower(), "AzureCloud")


class AzureMLCoreSource(TokenCommandSource):
    """Tokens from azureml-core, one child process per renewal (see the module's docstring)."""

    def __init__(self, *, arm_endpoint: str = "https://management.azure.com", python: str = sys.executable,
                 timeout: float = HELPER_TIMEOUT, env: Mapping[str, str] | None = None) -> None:
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("AZUREML_CURRENT_CLOUD", cloud_name(arm_endpoint))
        super().__init__([python, "-m", __name__], timeout=timeout, name="azureml_core", env=child_env)
        self.what = "the azureml-core helper"


def service_principal(env: Mapping[str, str]) -> tuple[str, str, str] | None:
    for names in _SP_VARIABLES:
        values = tuple(env.get(name, "").strip() for name in names)
        if all(values):
            return values[0], values[1], values[2]
    return None


def _fetch_token() -> tuple[str, float | None, str]:
    """(token, expiry, auth class) from azureml-core; runs only in the child."""
    from azureml.core.authentication import (  # type: ignore[import-not-found,unused-ignore]
        MsiAuthentication,
        ServicePrincipalAuthentication,
    )

    principal = service_principal(os.environ)
    auth: Any
    if principal is not None:
        tenant, client_id, secret = principal
        auth = ServicePrincipalAuthentication(tenant_id=tenant, service_principal_id=client_id,
                                              service_principal_password=secret)
    else:
        client_id = os.environ.get("AZURE_CLIENT_ID", "").strip()  # a user-assigned identity
        auth = MsiAuthentication(identity_config={"client_id": client_id}) if client_id else MsiAuthentication()
    access = auth.get_token()  # azureml-core ignores scopes: its cloud's ARM resource (AZUREML_CURRENT_CLOUD)
    expires = float(access.expires_on) if access.expires_on else None
    return access.token, expires, type(auth).__name__


def main() -> int:
    try:
        token, expires, auth_class = _fetch_token()
    except ImportError:
        print(EXTRA_HINT, file=sys.stderr)
        return 3
    except Exception as exc:
        message = mask_tokens(" ".join(str(exc).split()))[:300]
        print(f"azureml-core could not get a token: {type(exc).__name__}: {message}", file=sys.stderr)
        return 1
    print(f"azureml-core token from {auth_class}", file=sys.stderr)
    print(json.dumps({"token": token, "expires_at": expires}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
