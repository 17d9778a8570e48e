"""Where the agent sends data and with which credentials.

A provider yields ``Credentials`` (base URL, auth headers, expiry) and can ``refresh()`` them: the
uploader asks before each request and calls ``refresh`` on 401/403. Static credentials (this
module's sibling ``static``) never change; other providers (Azure ML, token files) renew themselves.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Credentials:
    base_url: str  # e.g. "http://mlflow:5000" or "https://host/prefix"; no trailing slash
    headers: Mapping[str, str] = field(default_factory=dict)
    expires_at: float | None = None  # unix time; None = does not expire

    def __repr__(self) -> str:  # never print header values: they are secrets
        names = ", ".join(self.headers)
        return f"Credentials(base_url={self.base_url!r}, headers=[{names}], expires_at={self.expires_at})"


class UpstreamProvider(Protocol):
    """The lifecycle every upstream provider shares."""

    name: str

    @property
    def ssl(self) -> ssl.SSLContext | bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def credentials(self) -> Credentials: ...

    async def refresh(self, reason: str) -> Credentials: ...
