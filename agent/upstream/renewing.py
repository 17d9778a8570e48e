"""A provider whose bearer token expires: renewed before it does, and on demand after a 401/403.

The token comes from a ``TokenSource`` (a file, a command; Azure's come later). Renewal is proactive:
at 80 % of the token's lifetime, and at the latest 5 minutes before it expires when the lifetime
allows. A failed renewal is retried with backoff while the current token is still valid. Once no
valid token can be had, ``credentials()`` waits: uploads pause, nothing fails and nothing is dropped.
Tokens are registered with the log redactor and never printed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent.logs import register_secret
from agent.ops.metrics import AgentMetrics
from agent.upstream.base import Credentials

log = logging.getLogger("agent.upstream")

RENEW_AT_FRACTION = 0.8
RENEW_LEAD_SECONDS = 300.0
_RETRY_MIN, _RETRY_MAX = 1.0, 10.0  # a recovered token service is used within 10 s
# A burst of 401/403 answers (one per in-flight request) renews once, not once per answer.
_MIN_FORCED_INTERVAL = 1.0


class CredentialError(Exception):
    """A token source could not produce a token (its message never contains a token)."""


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_at: float | None  # unix time; None when unknown (renewed on change or on 401/403 only)
    obtained_at: float


class TokenSource(Protocol):
    name: str

    async def fetch(self) -> Token: ...

    def changed(self) -> bool:
        """Cheap check whether the source holds a new token (a rewritten file); False if unknown."""
        ...


_JWT_LIKE = re.compile(r"\beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*")
# Opaque tokens have no shape to recognise; 40+ characters of a token's alphabet is the best guess
# (GUIDs, 36 characters, stay readable: correlation ids are worth keeping).
_OPAQUE_LIKE = re.compile(r"[A-Za-z0-9._~+/=-]{40,}")


def mask_tokens(text: str) -> str:
    """Error text from a token source, with anything shaped like a token replaced by ``***``."""
    return _OPAQUE_LIKE.sub("***", _JWT_LIKE.sub("***", text))


def renew_at(token: Token) -> float | None:
    """When to renew: 80 % into the lifetime, or 5 minutes before expiry if that comes first."""
    if token.expires_at is None:
        return None
    lifetime = token.expires_at - token.obtained_at
    at = min(token.obtained_at + RENEW_AT_FRACTION * lifetime, token.expires_at - RENEW_LEAD_SECONDS)
    if at <= token.obtained_at:  # a short-lived token: 5 minutes of lead do not fit, 80 % does
        at = token.obtained_at + RENEW_AT_FRACTION * max(lifetime, 0.0)
    return at


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying (the upstream verifies); None if not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


class RenewingUpstream:
    """An UpstreamProvider around a TokenSource."""

    def __init__(self, base_url: str, source: TokenSource, metrics: AgentMetrics, *, ssl_context: ssl.SSLContext | bool,
                 clock: Callable[[], float] = time.time) -> None:
        self.name = source.name
        self._base_url = base_url.rstrip("/")
        self._source = source
        self._metrics = metrics
        self._ssl = ssl_context
        self._clock = clock
        self._token: Token | None = None
        self._valid = asyncio.Event()
        self._refreshing: asyncio.Task[Token | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None

    @property
    def ssl(self) -> ssl.SSLContext | bool:
        return self._ssl

    async def start(self) -> None:
        await self._renew("start")
        self._task = asyncio.create_task(self._keep_fresh(), name=f"credentials-{self.name}")

    async def stop(self) -> None:
        for task in (self._task, self._refreshing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        close = getattr(self._source, "close", None)
        if close is not None:  # e.g. azure-identity's credential owns an HTTP session
            await close()

    def state(self) -> dict[str, object]:
        """For /readyz and /status: whether a valid credential is held, and why not."""
        token = self._current()
        return {
            "source": self.name,
            "valid": token is not None,
            "expires_at": token.expires_at if token is not None else None,
            "last_error": self.last_error,
        }

    async def credentials(self) -> Credentials:
        while True:
            token = self._current()
            if token is not None:
                return Credentials(self._base_url, {"Authorization": f"Bearer {token.value}"}, token.expires_at)
            self._valid.clear()
            await self._valid.wait()  # uploads pause here until a renewal succeeds

    async def refresh(self, reason: str) -> Credentials:
        token = self._token
        if token is None or self._clock() - token.obtained_at >= _MIN_FORCED_INTERVAL:
            await self._renew(reason)
        return await self.credentials()

    # --- internals ---------------------------------------------------------------------------

    def _current(self) -> Token | None:
        token = self._token
        if token is None or (token.expires_at is not None and token.expires_at <= self._clock()):
            return None
        return token

    async def _renew(self, reason: str) -> Token | None:
        """One renewal at a time; concurrent callers share it."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._fetch(reason))
        return await asyncio.shield(self._refreshing)

    async def _fetch(self, reason: str) -> Token | None:
        try:
            token = await self._source.fetch()
        except CredentialError as exc:
            self.last_error = str(exc)
            self._metrics.credential_refreshes.labels(source=self.name, result="error").inc()
            log.warning("credential renewal (%s) failed: %s", reason, exc)
            return None
        current = self._token
        if current is not None and token.value == current.value and token.expires_at == current.expires_at:
            # The source answered from its cache (azure-identity does within 30 s of its last request,
            # and after a swallowed error): nothing was renewed. Keep the old token's age, so the
            # schedule does not slide, and try again after a backoff.
            self._metrics.credential_refreshes.labels(source=self.name, result="unchanged").inc()
            log.debug("credential renewal (%s): %s returned the current token again", reason, self.name)
            return None
        register_secret(token.value)
        self._token = token
        self.last_error = None
        self._valid.set()
        self._metrics.credential_refreshes.labels(source=self.name, result="ok").inc()
        if token.expires_at is not None:
            self._metrics.credential_expiry.set(token.expires_at)
        log.info("credential renewed (%s) from %s; expires %s", reason, self.name,
                 "never stated" if token.expires_at is None else time.strftime(
                     "%Y-%m-%dT%H:%M:%SZ", time.gmtime(token.expires_at)))
        return token

    async def _keep_fresh(self) -> None:
        backoff = _RETRY_MIN
        while True:
            token = self._token
            due = renew_at(token) if token is not None else self._clock()
            wait = 1.0 if due is None else min(max(due - self._clock(), 0.0), 1.0)
            await asyncio.sleep(wait)
            token = self._token
            due = renew_at(token) if token is not None else self._clock()
            changed = await asyncio.to_thread(self._source.changed)  # a stat() of a token file
            if due is not None and due > self._clock() and not changed:
                continue
            if due is None and not changed:
                continue
            if await self._renew("scheduled" if token is not None else "retry") is None:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RETRY_MAX)
            else:
                backoff = _RETRY_MIN
