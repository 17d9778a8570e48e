"""systemd's notify protocol (agent/ops/notify.py): unit tests, then a real agent under a notify socket.

The unit tests talk to real AF_UNIX datagram sockets (a path in a temp dir, or an abstract name). The
integration tests play systemd's part: they bind the socket, start ``python -m agent run`` with
``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` set, and check what a ``Type=notify`` unit relies on: READY=1 only
once every listener answers, watchdog pings at half the interval, STOPPING=1 when the drain begins and
pings on through it, and no child of the agent inheriting the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from agent.ops import notify
from agent.ops.notify import SystemdNotifier
from tests.conftest import AgentFactory
from tests.support.agent_process import AgentProcess
from tests.support.ports import LOOPBACK, free_port

#: Longest usable AF_UNIX path (sun_path is 108 bytes including the terminating NUL).
_MAX_SUN_PATH = 107


class NotifyListener:
    """The systemd side: a bound AF_UNIX datagram socket that collects what is sent to it."""

    def __init__(self, address: str | bytes) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(address)

    @property
    def env_value(self) -> str:
        """What NOTIFY_SOCKET holds for this socket."""
        if isinstance(self.address, bytes):
            return "@" + self.address[1:].decode()
        return self.address

    def recv(self, timeout: float) -> str | None:
        """The next message, or None if none arrives within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode()
        except TimeoutError:
            return None

    def drain(self) -> list[str]:
        """Every message queued right now (never waits: pings may keep coming)."""
        self.sock.setblocking(False)
        out: list[str] = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out

    def wait_for(
        self, prefix: str, timeout: float, proc: subprocess.Popen[bytes] | None = None
    ) -> tuple[str, list[str]]:
        """The first message starting with ``prefix`` and every message before it; raises after
        ``timeout`` s, or once ``proc`` has exited and everything it sent has been read."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        exited = False
        while time.monotonic() < deadline:
            message = self.recv(0.2)
            if message is None:
                if exited:
                    break
                exited = proc is not None and proc.poll() is not None
                continue
            if message.startswith(prefix):
                return message, seen
            seen.append(message)
        raise AssertionError(f"no {prefix!r} within {timeout:.0f}s (process exited: {exited}); got {seen}")

    def close(self) -> None:
        self.sock.close()
        if isinstance(self.address, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)


def _fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.splitlines())


@pytest.fixture
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, or a short temp dir when ``tmp_path`` is too long for an AF_UNIX address."""
    if len(str(tmp_path / "notify.sock")) <= _MAX_SUN_PATH:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="notify-") as short:
        yield Path(short)


@pytest.fixture
def listener(socket_dir: Path) -> Iterator[NotifyListener]:
    sock = NotifyListener(str(socket_dir / "notify.sock"))
    try:
        yield sock
    finally:
        sock.close()


# -- parsing the environment -----------------------------------------------------------------------


def test_address_is_a_path_or_an_abstract_name(caplog: pytest.LogCaptureFixture) -> None:
    assert notify._address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify._address("@abstract/name") == b"\0abstract/name"
    assert notify._address("") is None
    with caplog.at_level(logging.WARNING, logger="agent.notify"):
        assert notify._address("relative/notify.sock") is None
    assert "ignoring NOTIFY_SOCKET='relative/notify.sock'" in caplog.text


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}, 0.2),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_only_when_meant_for_this_process(env: dict[str, str], interval: float | None) -> None:
    assert notify._watchdog_interval(env) == interval
    assert SystemdNotifier({"NOTIFY_SOCKET": "/x", **env}).watchdog_interval == interval


def test_variables_are_removed_from_the_environment_mapping() -> None:
    env = {"NOTIFY_SOCKET": "@n", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    notifier = SystemdNotifier(env)
    assert env == {"PATH": "/bin"}, "children would inherit the socket and the watchdog"
    assert notifier.address == b"\0n"
    assert notifier.watchdog_interval == 1.0
    assert notifier.enabled


# -- sending -----------------------------------------------------------------------------------------


def test_messages_reach_a_path_socket(listener: NotifyListener) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.env_value})
    notifier.ready("listening on 127.0.0.1:5050")
    notifier.status("2 runs pending")
    notifier.stopping("draining 3 record(s)")
    assert _fields(listener.recv(5) or "") == {
        "READY": "1", "STATUS": "listening on 127.0.0.1:5050", "MAINPID": str(os.getpid())}
    assert listener.recv(5) == "STATUS=2 runs pending"
    assert listener.recv(5) == "STOPPING=1\nSTATUS=draining 3 record(s)"
    assert notifier.send("X=1") is True


def test_messages_reach_an_abstract_socket() -> None:
    sock = NotifyListener(b"\0mlflow-agent-test-" + uuid.uuid4().hex.encode())
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": sock.env_value})
        assert notifier.send("READY=1") is True
        assert sock.recv(5) == "READY=1"
    finally:
        sock.close()


async def test_no_notify_socket_means_no_op() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False
    notifier.ready("x")
    notifier.stopping("y")
    notifier.status("z")
    await notifier.stop()
    assert notifier._socket is None, "a socket was opened with nowhere to send"


async def test_a_vanished_socket_warns_once_and_never_raises(
    listener: NotifyListener, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.env_value})
    assert notifier.send("READY=1") is True
    listener.close()  # systemd went away: the socket file is gone
    with caplog.at_level(logging.WARNING, logger="agent.notify"):
        assert notifier.send("WATCHDOG=1") is False
        notifier.stopping("draining")
        assert notifier.send("WATCHDOG=1") is False
    warnings = [r for r in caplog.records if r.name == "agent.notify"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "cannot notify systemd" in warnings[0].getMessage()
    await notifier.stop()


# -- the watchdog task -------------------------------------------------------------------------------


async def test_watchdog_pings_every_half_interval_until_stopped(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "3000000"})
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(delay: float) -> None:
        delays.append(delay)
        await real_sleep(0)  # a ping per turn of the loop: no wall-clock time in this test

    with monkeypatch.context() as patch:  # asyncio.sleep itself, for the span of this block only
        patch.setattr(asyncio, "sleep", recorded_sleep)
        notifier.ready("up")
        for _ in range(20):
            await real_sleep(0)
        await notifier.stop()
    messages = listener.drain()
    assert messages[0].startswith("READY=1\n"), messages
    pings = messages[1:]
    assert len(pings) >= 3 and set(pings) == {"WATCHDOG=1"}, messages
    assert delays and set(delays) == {1.5}, f"WATCHDOG_USEC=3 s must give a ping every 1.5 s, slept {delays}"
    for _ in range(20):
        await asyncio.sleep(0)
    assert listener.drain() == [], "pings went on after stop()"


async def test_no_watchdog_pings_when_watchdog_pid_is_another_process(listener: NotifyListener) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "20000",
                                "WATCHDOG_PID": str(os.getpid() + 1)})
    notifier.ready("up")
    await asyncio.sleep(0.3)  # 30 ping intervals, had the watchdog been ours
    await notifier.stop()
    messages = listener.drain()
    assert len(messages) == 1 and messages[0].startswith("READY=1"), messages


# -- a real agent under a notify socket ----------------------------------------------------------------

#: What systemd would set for WatchdogSec=200ms: the agent should ping every 0.1 s.
WATCHDOG_USEC = "200000"


@pytest.fixture
def dead_upstream() -> Iterator[str]:
    """An upstream URL whose port is held (bound, never listening) by this test: every connection is
    refused at once, so what the agent takes stays buffered and a drain lasts its whole timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind((LOOPBACK, 0))
        yield f"http://{LOOPBACK}:{held.getsockname()[1]}"


def _notify_env(listener: NotifyListener) -> dict[str, str]:
    # WATCHDOG_PID empty (counts as unset): the child's pid is not known before it starts, and a
    # WATCHDOG_PID the test runner itself may have inherited from a systemd unit must not leak in.
    return {"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": WATCHDOG_USEC, "WATCHDOG_PID": ""}


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


@pytest.mark.integration
def test_a_real_agent_reports_ready_pings_and_stopping(
    agent_factory: AgentFactory, listener: NotifyListener, dead_upstream: str
) -> None:
    ops_port = free_port()
    agent = agent_factory(
        dead_upstream, "--ops-http", f"{LOOPBACK}:{ops_port}", "--drain-timeout", "3s",
        "--create-run-timeout", "200ms", "--retry-initial-backoff", "100ms", "--retry-max-backoff", "500ms",
        env=_notify_env(listener), wait_ready=False,
    )  # fmt: skip
    assert agent.proc is not None

    # (a) READY=1, and at that moment every listener already works: one try each, no retry loop.
    ready, before = listener.wait_for("READY=1", 60, agent.proc)
    with _session() as http, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        main = http.get(f"{agent.url}/healthz", timeout=5)
        ops = http.get(f"http://{LOOPBACK}:{ops_port}/healthz", timeout=5)
        ops_ready = http.get(f"http://{LOOPBACK}:{ops_port}/readyz", timeout=5)
        # Lost, not queued, if nothing were bound yet: the counter below shows it was read.
        udp.sendto(f"loss:1|g|#run_id:{uuid.uuid4().hex},step:0".encode(), (LOOPBACK, agent.udp_port))
    assert main.status_code == 200 and main.json()["status"] == "alive", main.text
    assert ops.status_code == 200 and ops.json()["status"] == "alive", ops.text
    assert ops_ready.status_code == 200 and ops_ready.json()["ready"] is True, ops_ready.text
    assert before == [], f"messages before READY=1: {before}"
    fields = _fields(ready)
    assert fields["MAINPID"] == str(agent.pid), fields
    assert fields["STATUS"] == f"listening on {LOOPBACK}:{agent.port}", fields
    _wait_datagram_read(agent)

    # (b) Pings at half of WATCHDOG_USEC (0.1 s): about 20 in 2 s; wide bounds for a loaded machine.
    pings = _pings_during(listener, 2.0)
    assert 5 <= pings <= 60, f"{pings} WATCHDOG=1 in 2 s, expected about 20"

    # A backlog the drain cannot deliver: the run is created provisionally and stays buffered.
    with _session() as http:
        created = http.post(f"{agent.url}/api/2.0/mlflow/runs/create", json={"experiment_id": "0"}, timeout=30)
    assert created.status_code == 200, created.text
    backlog = agent.status()["buffered_records"]  # the run's create, and the datagram's metric
    assert backlog >= 1

    # (c) STOPPING=1 as the drain begins (the process is still running 3 s of drain away from its
    # exit), pings through the drain, and silence once the process is gone.
    listener.drain()
    agent.sigterm()
    stopping, _ = listener.wait_for("STOPPING=1", 30, agent.proc)
    assert agent.running, "STOPPING=1 came only when the process had already exited"
    assert _fields(stopping)["STATUS"] == f"draining {backlog} record(s) for up to 3s", stopping
    during: list[str] = []
    deadline = time.monotonic() + 30
    while agent.running and time.monotonic() < deadline:
        message = listener.recv(0.2)
        if message is not None:
            during.append(message)
    assert agent.wait(30) == 0, agent.log_tail()
    during += listener.drain()
    assert during.count("WATCHDOG=1") >= 3, f"pings stopped during a 3 s drain: {during}"
    assert listener.recv(0.5) is None, "a message after the agent exited"


@pytest.mark.integration
def test_a_token_command_does_not_inherit_the_notify_socket(
    agent_factory: AgentFactory, listener: NotifyListener, dead_upstream: str, tmp_path: Path
) -> None:
    seen_env = tmp_path / "token-command-env.json"
    script = tmp_path / "token_command.py"
    script.write_text(
        "import json, os, sys\n"
        "with open(sys.argv[1], 'w') as f:\n"
        "    json.dump(dict(os.environ), f)\n"
        "print(json.dumps({'token': 'test-token', 'expires_in': 3600}))\n"
    )
    command = shlex.join([sys.executable, str(script), str(seen_env)])
    agent = agent_factory(dead_upstream, "--token-command", command,
                          env={**_notify_env(listener), "NOTIFY_TEST_MARKER": "inherited"}, wait_ready=False)
    assert agent.proc is not None
    listener.wait_for("READY=1", 60, agent.proc)  # the command runs while the agent starts
    env = json.loads(seen_env.read_text())
    assert env.get("NOTIFY_TEST_MARKER") == "inherited", "not the environment the agent passes on"
    leaked = {k: v for k, v in env.items() if k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    assert leaked == {}, f"the token command could talk to systemd in the agent's name: {leaked}"


def _wait_datagram_read(agent: AgentProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while agent.metric_sum("mlflow_agent_datagrams_received_total", transport="udp") < 1:
        assert time.monotonic() < deadline, f"the datagram sent at READY=1 was never read\n{agent.log_tail()}"
        time.sleep(0.05)


def _pings_during(listener: NotifyListener, seconds: float) -> int:
    listener.drain()
    pings = 0
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        message = listener.recv(left)
        if message == "WATCHDOG=1":
            pings += 1
    return pings
