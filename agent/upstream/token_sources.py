"""Generic token sources for MLflow servers behind OAuth2 proxies and the like.

* ``--token-file PATH``: the file's content (stripped) is the bearer token. It is re-read whenever it
  changes (projected Kubernetes service-account tokens are rewritten in place) and after a 401/403.
* ``--token-command CMD``: an exec helper. Its stdout is either JSON, ``{"token": "...",
  "expires_at": <unix seconds>}`` or ``{"token": "...", "expires_in": <seconds>}``, or plain text: the
  token on the first line and, optionally, its expiry (unix seconds) on the second. It runs with a
  30 s timeout, never through a shell, and its stderr is logged (not its stdout).

A token that is a JWT has its ``exp`` read when no expiry is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from agent.upstream.renewing import CredentialError, Token, jwt_expiry, mask_tokens

COMMAND_TIMEOUT = 30.0
_MAX_TOKEN_BYTES = 64 * 1024


class TokenFileSource:
    name = "token_file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def changed(self) -> bool:
        signature = self._signature()
        return signature is not None and signature != self._seen

    async def fetch(self) -> Token:
        signature = self._signature()
        try:
            text = await asyncio.to_thread(self.path.read_text, encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CredentialError(f"cannot read token file {self.path}: {type(exc).__name__}") from None
        value = text.strip()
        if not value or any(c.isspace() for c in value):
            raise CredentialError(f"token file {self.path} is empty or holds more than one token")
        self._seen = signature
        return Token(value, jwt_expiry(value), time.time())


class TokenCommandSource:
    name = "token_command"

    def __init__(self, command: str | Sequence[str], *, timeout: float = COMMAND_TIMEOUT,
                 name: str | None = None, env: Mapping[str, str] | None = None) -> None:
        self.env = dict(env) if env is not None else None  # None: the agent's own environment
        self.argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not self.argv:
            raise ValueError("token command is empty")
        self.timeout = timeout
        self.what = f"token command {self.argv[0]!r}"
        if name is not None:
            self.name = name

    def changed(self) -> bool:
        return False

    async def fetch(self) -> Token:
        try:
            # Its own session: no controlling terminal to prompt on, and a timeout kills the whole group.
            proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True, env=self.env)
        except OSError as exc:
            raise CredentialError(f"{self.what} cannot start: {exc.strerror or exc}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except BaseException as exc:  # a timeout, or the agent stopping: never leave the helper behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            if isinstance(exc, asyncio.TimeoutError):
                raise CredentialError(f"{self.what} did not finish in {self.timeout:g}s") from None
            raise
        if proc.returncode != 0:
            detail = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise CredentialError(f"{self.what} exited {proc.returncode}: {mask_tokens(detail[0])[:200]}")
        return parse_command_output(out[:_MAX_TOKEN_BYTES], now=time.time())


def parse_command_output(out: bytes, *, now: float) -> Token:
    try:
        text = out.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CredentialError("token command printed something that is not UTF-8") from None
    if not text:
        raise CredentialError("token command printed nothing")
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            raise CredentialError("token command printed malformed JSON") from None
        value = data.get("token") if isinstance(data, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise CredentialError("token command's JSON has no \"token\" string")
        expires: float | None = None
        if isinstance(data.get("expires_at"), int | float):
            expires = float(data["expires_at"])
        elif isinstance(data.get("expires_in"), int | float):
            expires = now + float(data["expires_in"])
        value = value.strip()
    else:
        lines = text.splitlines()
        value = lines[0].strip()
        expires = None
        if len(lines) > 1 and lines[1].strip():
            try:
                expires = float(lines[1].strip())
            except ValueError:
                raise CredentialError("token command's second line is not an expiry in unix seconds") from None
    if any(c.isspace() for c in value):
        raise CredentialError("token command printed a token containing whitespace")
    return Token(value, expires if expires is not None else jwt_expiry(value), now)
