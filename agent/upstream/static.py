"""Static credentials for an MLflow server, read from the agent's own environment.

The same variables the mlflow client reads: ``MLFLOW_TRACKING_TOKEN`` (Bearer) or
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (Basic), ``MLFLOW_TRACKING_INSECURE_TLS``,
``MLFLOW_TRACKING_SERVER_CERT_PATH`` and ``MLFLOW_TRACKING_CLIENT_CERT_PATH``.
"""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import Mapping

from agent.logs import register_secret
from agent.upstream.base import Credentials

log = logging.getLogger("agent.upstream")

_TRUE = {"1", "true", "yes", "on"}


def tls_from_env(env: Mapping[str, str]) -> ssl.SSLContext | bool:
    """TLS towards the upstream, from the variables the mlflow client reads."""
    if env.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in _TRUE:
        return False
    ca = env.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    client_cert = env.get("MLFLOW_TRACKING_CLIENT_CERT_PATH")
    if not (ca or client_cert):
        return True
    context = ssl.create_default_context(cafile=ca or None)
    if client_cert:
        context.load_cert_chain(client_cert)
    return context


class StaticUpstream:
    name = "static"

    def __init__(self, base_url: str, env: Mapping[str, str]) -> None:
        headers: dict[str, str] = {}
        token = env.get("MLFLOW_TRACKING_TOKEN")
        user = env.get("MLFLOW_TRACKING_USERNAME")
        password = env.get("MLFLOW_TRACKING_PASSWORD")
        if token:
            register_secret(token)
            headers["Authorization"] = f"Bearer {token}"
        elif user is not None and password is not None:
            register_secret(password)
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            register_secret(basic)
            headers["Authorization"] = f"Basic {basic}"
        self._credentials = Credentials(base_url.rstrip("/"), headers, None)
        self._ssl = tls_from_env(env)

    @property
    def ssl(self) -> ssl.SSLContext | bool:
        return self._ssl

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def credentials(self) -> Credentials:
        return self._credentials

    async def refresh(self, reason: str) -> Credentials:
        # Nothing to renew: a static token that the upstream refuses stays refused. Say so once in
        # a while; the uploader keeps retrying with backoff (the operator may fix the server side).
        log.warning("upstream refused the static credentials (%s); retrying with the same ones", reason)
        return self._credentials
