"""systemd's notify protocol (``Type=notify``): READY=1, STOPPING=1 and watchdog pings.

The protocol is one datagram per message to the Unix socket named by ``$NOTIFY_SOCKET`` (a path, or an
abstract socket when it starts with ``@``). systemd sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) when
the unit has ``WatchdogSec=``; the agent then pings at half that interval from its event loop, so a
wedged loop stops the pings and systemd restarts the service. Without ``$NOTIFY_SOCKET`` every call is
a no-op. Sending never blocks (``MSG_DONTWAIT``); a failed send is logged, never raised: the agent's
data path does not depend on its supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger("agent.notify")

NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class SystemdNotifier:
    """Owned by the agent's ``run``; ``start``/``stop`` like every other component."""

    def __init__(self, env: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env)
        # Children (a --token-command, the azureml-core helper) must not talk to systemd in our name.
        for name in NOTIFY_VARIABLES:
            env.pop(name, None)
        self._socket: socket.socket | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str) -> None:
        """The agent listens on every address it was given: ``systemctl start`` may return."""
        self.send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")
        if self.enabled and self.watchdog_interval is not None and self._watchdog is None:
            self._watchdog = asyncio.create_task(self._ping(self.watchdog_interval / 2), name="systemd-watchdog")

    def stopping(self, status: str) -> None:
        self.send(f"STOPPING=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def send(self, message: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message.encode(), socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            if not self._warned:  # systemd gone or the socket full: say it once, keep running
                self._warned = True
                log.warning("cannot notify systemd at %r: %s", self.address, exc.strerror or exc)
            return False
        return True

    async def stop(self) -> None:
        task, self._watchdog = self._watchdog, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def _ping(self, every: float) -> None:
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(every)


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):  # abstract namespace: a leading NUL byte instead of the "@"
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("ignoring NOTIFY_SOCKET=%r: expected an absolute path or @abstract name", value)
    return None


def _watchdog_interval(env: MutableMapping[str, str]) -> float | None:
    """``$WATCHDOG_USEC`` in seconds, if it is meant for this process (``$WATCHDOG_PID`` unset or ours)."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None
