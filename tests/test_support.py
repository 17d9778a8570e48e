"""Self-tests of the test-support layer (tests/support and the fixtures in tests/conftest.py)."""

from __future__ import annotations

import asyncio
import math
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import AgentFactory, FaultyProxyFactory
from tests.support.agent_process import AgentProcess, parse_prometheus, split_sample_key, sum_samples
from tests.support.mlflow_server import MlflowServer
from tests.support.ports import free_port
from tests.support.processes import ProcessDiedError, _group_alive, spawn, stop_process, wait_until
from tests.support.snapshot import NAN, duplicate_rows, metric_rows, snapshot

# -- ports and processes ----------------------------------------------------------------------------------


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_stop_process_kills_grandchildren(tmp_path: Path) -> None:
    # A parent that ignores SIGTERM and has a child: both must be gone after stop_process.
    script = textwrap.dedent(
        """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print("CHILD" + "-PID", child.pid, flush=True)
        time.sleep(600)
        """
    )
    log = tmp_path / "parent.log"
    proc = spawn([sys.executable, "-c", script], log)
    wait_until(lambda: "CHILD-PID" in log.read_text(), 30, message="child started", proc=proc)
    child_pid = int(log.read_text().split("CHILD-PID")[1].split()[0])
    returncode = stop_process(proc, timeout=1)
    assert returncode is not None
    assert not _group_alive(proc.pid)
    assert not Path(f"/proc/{child_pid}").exists() or "Z" in _proc_state(child_pid)


def _proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "Z"
    return stat[stat.rfind(")") + 2 :].split()[0]


def test_parse_prometheus() -> None:
    text = textwrap.dedent(
        """
        # HELP mlflow_agent_records_uploaded_total Records uploaded.
        # TYPE mlflow_agent_records_uploaded_total counter
        mlflow_agent_records_uploaded_total{kind="metric"} 12.0
        mlflow_agent_records_uploaded_total{kind="param",note="a b}c"} 3.0
        mlflow_agent_up 1
        mlflow_agent_lag_seconds NaN
        mlflow_agent_big +Inf 1700000000000
        """
    )
    samples = parse_prometheus(text)
    assert samples['mlflow_agent_records_uploaded_total{kind="metric"}'] == 12.0
    assert samples["mlflow_agent_up"] == 1.0
    assert math.isnan(samples["mlflow_agent_lag_seconds"])
    assert samples["mlflow_agent_big"] == math.inf
    assert split_sample_key('m{kind="param",note="a b}c"}') == ("m", {"kind": "param", "note": "a b}c"})
    assert sum_samples(samples, "mlflow_agent_records_uploaded_total") == 15.0
    assert sum_samples(samples, "mlflow_agent_records_uploaded_total", kind="param") == 3.0
    assert sum_samples(samples, "mlflow_agent_missing") == 0.0


# -- AgentProcess against a stand-in agent (the real one is exercised by the integration tests) ----------

FAKE_AGENT = textwrap.dedent(
    """
    import json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    args = sys.argv[1:]
    host, port = args[args.index("--http") + 1].rsplit(":", 1)
    polls = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path in ("/healthz", "/readyz"):
                body, ctype = b"ok", "text/plain"
            elif self.path == "/metrics":
                body = (
                    b'# TYPE mlflow_agent_records_uploaded_total counter\\n'
                    b'mlflow_agent_records_uploaded_total{kind="metric"} 5.0\\n'
                    b'mlflow_agent_records_uploaded_total{kind="param"} 2.0\\n'
                )
                ctype = "text/plain; version=0.0.4"
            elif self.path == "/status":
                polls["n"] += 1
                body = json.dumps({"buffered_records": max(0, 3 - polls["n"]), "args": args}).encode()
                ctype = "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    print("fake agent up", flush=True)
    ThreadingHTTPServer((host, int(port)), Handler).serve_forever()
    """
)


class FakeAgentProcess(AgentProcess):
    script: Path

    def command(self) -> list[str]:
        return [sys.executable, str(self.script), *super().command()[3:]]


def test_agent_process_helpers(tmp_path: Path) -> None:
    FakeAgentProcess.script = tmp_path / "fake_agent.py"
    FakeAgentProcess.script.write_text(FAKE_AGENT)
    agent = FakeAgentProcess("http://127.0.0.1:1", tmp_path / "a" / "spool", ["--batch-size", "7"])
    try:
        agent.start()
        assert agent.running
        assert agent.url == f"http://127.0.0.1:{agent.port}"
        assert agent.log_path == tmp_path / "a" / "agent-0.log"
        assert agent.metrics()['mlflow_agent_records_uploaded_total{kind="metric"}'] == 5.0
        assert agent.metric_sum("mlflow_agent_records_uploaded_total") == 7.0
        status = agent.wait_drained(timeout=30, interval=0.05)
        assert status["buffered_records"] == 0
        assert status["args"][-2:] == ["--batch-size", "7"]
        assert "--log-format" in status["args"]
        first_pid = agent.pid
        agent.sigkill()
        assert not agent.running
        agent.start()  # restart: same port, new log file
        assert agent.pid != first_pid
        assert agent.log_path == tmp_path / "a" / "agent-1.log"
        agent.sigterm()
        assert agent.wait(timeout=30) == -15
    finally:
        agent.close()
    assert not agent.running


def test_agent_process_reports_early_exit(tmp_path: Path) -> None:
    class Crashing(AgentProcess):
        def command(self) -> list[str]:
            return [sys.executable, "-c", "import sys; print('boom: bad config', flush=True); sys.exit(3)"]

    agent = Crashing(None, tmp_path / "spool")
    with pytest.raises(ProcessDiedError, match="boom: bad config"):
        agent.start()
    assert agent.returncode == 3


def test_agent_factory_spawns_real_agent_command(tmp_path: Path, agent_factory: AgentFactory) -> None:
    agent = agent_factory(None, "--foo", start=False)
    cmd = agent.command()
    assert cmd[1:4] == ["-m", "agent", "run"]
    assert cmd[cmd.index("--upstream") + 1] == "none"
    assert cmd[cmd.index("--http") + 1] == f"127.0.0.1:{agent.port}"
    assert cmd[-1] == "--foo"
    assert agent.spool_dir == tmp_path / "agent-0" / "spool"


# -- FaultyProxy against an in-process aiohttp echo app ------------------------------------------------


@dataclass
class EchoApp:
    url: str
    seen: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
async def echo_app() -> AsyncIterator[EchoApp]:
    port = free_port()
    echo = EchoApp(url=f"http://127.0.0.1:{port}")

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        record = {
            "method": request.method,
            "path": request.path,
            "raw_path": request.raw_path,
            "body": body.decode(),
            "headers": dict(request.headers),
        }
        echo.seen.append(record)
        status = int(request.headers.get("X-Status", "200"))
        return web.json_response(record, status=status, headers={"X-Echo": "yes"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield echo
    finally:
        await runner.cleanup()


async def _requests(
    url: str, n: int, timeout: float = 30
) -> Sequence[tuple[int, dict[str, str], Any] | BaseException]:
    async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, dict[str, str], Any]:
        async with session.post(f"{url}/api/2.0/mlflow/runs/log-metric?i={i}", json={"i": i}) as resp:
            return resp.status, dict(resp.headers), await resp.json(content_type=None)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        return [await _swallow(one(session, i)) for i in range(n)]


async def _swallow(coro: Any) -> Any:
    try:
        return await coro
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return exc


async def test_proxy_forwards(echo_app: EchoApp, faulty_proxy_factory: FaultyProxyFactory) -> None:
    proxy = faulty_proxy_factory(echo_app, seed=1)
    async with (
        aiohttp.ClientSession() as session,
        session.patch(
            f"{proxy.url}/some/path?a=1&b=x%20y",
            data=b'{"k": [1, 2]}',
            headers={"Content-Type": "application/json", "X-Status": "201", "Authorization": "Bearer t"},
        ) as resp,
    ):
        assert resp.status == 201
        assert resp.headers["Content-Type"].startswith("application/json")
        assert resp.headers["X-Echo"] == "yes"
        seen = await resp.json()
    assert seen["method"] == "PATCH"
    assert seen["path"] == "/some/path"
    assert seen["raw_path"] == "/some/path?a=1&b=x%20y"
    assert seen["body"] == '{"k": [1, 2]}'
    assert seen["headers"]["Authorization"] == "Bearer t"
    assert seen["headers"]["Host"] == echo_app.url.removeprefix("http://")
    counts = proxy.counts()
    assert counts["requests"] == 1
    assert counts["forwarded"] == 1
    assert proxy.request_log()[-1]["status"] == 201


async def test_proxy_always_503_then_cleared(
    echo_app: EchoApp, faulty_proxy_factory: FaultyProxyFactory
) -> None:
    proxy = faulty_proxy_factory(echo_app.url, seed=2, p_503=1.0)
    results = await _requests(proxy.url, 5)
    for result in results:
        assert not isinstance(result, BaseException)
        status, _, body = result
        assert status == 503
        assert body == {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected"}
    assert echo_app.seen == []
    counts = proxy.counts()
    assert counts["http_503"] == 5
    assert counts["requests"] == 5
    assert counts["forwarded"] == 0

    assert proxy.clear_faults()["p_503"] == 0.0
    results = await _requests(proxy.url, 2)
    assert [r[0] for r in results if not isinstance(r, BaseException)] == [200, 200]
    assert proxy.counts()["forwarded"] == 2
    with pytest.raises(ValueError, match="unknown fault settings"):
        proxy.set_faults(p_bogus=1.0)


async def test_proxy_429_with_retry_after(
    echo_app: EchoApp, faulty_proxy_factory: FaultyProxyFactory
) -> None:
    proxy = faulty_proxy_factory(echo_app, p_429=1.0, retry_after=7)
    [result] = await _requests(proxy.url, 1)
    assert not isinstance(result, BaseException)
    status, headers, _ = result
    assert status == 429
    assert headers["Retry-After"] == "7"
    assert proxy.counts()["http_429"] == 1


async def test_proxy_resets(echo_app: EchoApp, faulty_proxy_factory: FaultyProxyFactory) -> None:
    proxy = faulty_proxy_factory(echo_app, p_reset_before=1.0)
    [result] = await _requests(proxy.url, 1)
    assert isinstance(result, aiohttp.ClientError)
    assert echo_app.seen == []  # never forwarded

    proxy.set_faults(p_reset_before=0.0, p_reset_after=1.0)
    [result] = await _requests(proxy.url, 1)
    assert isinstance(result, aiohttp.ClientError)
    assert len(echo_app.seen) == 1  # the upstream applied it, the client got no answer
    assert echo_app.seen[0]["body"] == '{"i": 0}'

    counts = proxy.counts()
    assert counts["reset_before"] == 1
    assert counts["reset_after"] == 1


async def test_proxy_hang(echo_app: EchoApp, faulty_proxy_factory: FaultyProxyFactory) -> None:
    proxy = faulty_proxy_factory(echo_app, p_hang=1.0, hang_seconds=30)
    [result] = await _requests(proxy.url, 1, timeout=1.0)
    assert isinstance(result, asyncio.TimeoutError)
    assert echo_app.seen == []
    assert proxy.counts()["hang"] == 1


async def test_proxy_mixed_faults_are_seeded(
    echo_app: EchoApp, faulty_proxy_factory: FaultyProxyFactory
) -> None:
    kinds = ("http_503", "http_429", "reset_before", "reset_after")
    settings = {"p_503": 0.2, "p_429": 0.2, "p_reset_before": 0.2, "p_reset_after": 0.2}
    first = faulty_proxy_factory(echo_app, seed=42, **settings)
    second = faulty_proxy_factory(echo_app, seed=42, **settings)
    await _requests(first.url, 40)
    await _requests(second.url, 40)
    a, b = first.counts(), second.counts()
    assert a == b
    assert a["requests"] == 40
    assert sum(a[k] for k in kinds) + a["forwarded"] == 40
    assert all(a[k] > 0 for k in (*kinds, "forwarded"))


async def test_proxy_upstream_down_gives_502(faulty_proxy_factory: FaultyProxyFactory) -> None:
    proxy = faulty_proxy_factory(f"http://127.0.0.1:{free_port()}")
    [result] = await _requests(proxy.url, 1)
    assert not isinstance(result, BaseException)
    assert result[0] == 502
    assert proxy.counts()["upstream_error"] == 1


def test_faulty_proxy_cli_rejects_bad_probabilities(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.faulty_proxy", "--listen", f"127.0.0.1:{free_port()}",
         "--target", "http://127.0.0.1:1", "--p-503", "0.7", "--p-429", "0.7"],
        capture_output=True, text=True, timeout=60, check=False,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert result.returncode == 2
    assert "sum to more than 1" in result.stderr


# -- MLflow server and snapshots ----------------------------------------------------------------------------


def test_mlflow_server_and_snapshot(mlflow_server: MlflowServer, experiment_name: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment_id = client.create_experiment(experiment_name)
    parent = client.create_run(experiment_id, run_name="parent", tags={"team": "a"})
    child = client.create_run(
        experiment_id, run_name="child", tags={"mlflow.parentRunId": parent.info.run_id}
    )
    client.log_metric(child.info.run_id, "loss", 0.5, timestamp=1000, step=1)
    client.log_metric(child.info.run_id, "loss", float("nan"), timestamp=1001, step=2)
    client.log_param(child.info.run_id, "lr", "0.1")
    client.set_terminated(parent.info.run_id)

    snap = snapshot(mlflow_server.url, [experiment_name, "no-such-experiment"])
    assert snap["no-such-experiment"] is None
    runs = snap[experiment_name]
    assert set(runs) == {"parent", "child"}
    assert runs["parent"]["status"] == "FINISHED"
    assert runs["parent"]["parent"] is None
    assert runs["parent"]["tags"] == {"team": "a"}
    assert runs["child"]["status"] == "RUNNING"
    assert runs["child"]["parent"] == "parent"
    assert runs["child"]["params"] == {"lr": "0.1"}
    assert runs["child"]["tags"] == {}
    assert runs["child"]["metrics"] == {"loss": [("loss", 0.5, 1, 1000), ("loss", NAN, 2, 1001)]}
    assert snap == snapshot(mlflow_server.url, [experiment_name, "no-such-experiment"])

    rows = metric_rows(mlflow_server.url, child.info.run_id, "loss")
    assert rows == [("loss", 0.5, 1, 1000), ("loss", NAN, 2, 1001)]
    assert duplicate_rows(rows) == {}
    assert duplicate_rows([*rows, rows[0]]) == {rows[0]: 2}
