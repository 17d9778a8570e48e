"""Datagram benchmark (issue 3): receive rates against a bare asyncio receive loop measured in the same run,
the stdlib client's cost per step, and the plugin's cost per ``mlflow.log_metric`` beside the HTTP URI
and direct logging to a local MLflow server. Not a test; prints lines for the README.

    python -m bench.bench_datagrams      (from the repository root, in the venv of `make test`)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

from agent.client import AgentClient
from bench.bench_core import cpu_seconds
from tests.support.agent_process import AgentProcess
from tests.support.mlflow_server import MlflowServer
from tests.support.ports import free_udp_port
from tests.support.processes import python_env

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = "0123456789abcdef0123456789abcdef"
SECONDS = 5.0

BARE_RECEIVER = r"""
import asyncio, sys, time, orjson
port, seconds, use_uvloop = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1"
if use_uvloop:
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
class P(asyncio.DatagramProtocol):
    n = 0
    def datagram_received(self, data, addr):
        orjson.loads(data)
        P.n += 1
async def main():
    loop = asyncio.get_running_loop()
    t, _ = await loop.create_datagram_endpoint(P, local_addr=("127.0.0.1", port))
    print("ready", flush=True)
    await asyncio.sleep(1.0)  # the sender warms up
    n0, t0 = P.n, time.perf_counter()
    await asyncio.sleep(seconds)
    print(f"{(P.n - n0) / (time.perf_counter() - t0):.0f}", flush=True)
    t.close()
asyncio.run(main())
"""

SENDER = r"""
import socket, sys, time, json
port, seconds, per = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
bodies = []
for b in range(64):
    metrics = [{"key": f"m{i}", "value": i * 0.5, "timestamp": 1_700_000_000_000 + b, "step": b} for i in range(per)]
    bodies.append(json.dumps({"run_id": sys.argv[4], "metrics": metrics}, separators=(",", ":")).encode())
end = time.perf_counter() + seconds
sent = 0
while time.perf_counter() < end:
    for body in bodies:
        try:
            s.sendto(body, ("127.0.0.1", port))
            sent += 1
        except OSError:
            pass
print(sent, flush=True)
"""


def _py(code: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True,
                            env=python_env())


def bare_rate(use_uvloop: bool) -> float:
    port = free_udp_port()
    receiver = _py(BARE_RECEIVER, port, SECONDS, int(use_uvloop))
    assert receiver.stdout is not None
    receiver.stdout.readline()
    sender = _py(SENDER, port, SECONDS + 2, 1, RUN_ID)
    rate = float(receiver.stdout.readline())
    receiver.wait()
    sender.wait()
    return rate


def agent_rate(base: Path, per_datagram: int) -> dict[str, float]:
    agent = AgentProcess(None, base / f"agent-udp-{per_datagram}" / "spool", ("--udp-rcvbuf", "32MiB")).start()
    try:
        sender = _py(SENDER, agent.udp_port, SECONDS + 2, per_datagram, RUN_ID)
        time.sleep(1.0)
        r0 = agent.metric_sum("mlflow_agent_records_received_total", source="udp")
        d0 = agent.metric_sum("mlflow_agent_datagrams_received_total")
        c0, t0 = cpu_seconds(agent.pid), time.perf_counter()
        time.sleep(SECONDS)
        r1 = agent.metric_sum("mlflow_agent_records_received_total", source="udp")
        d1 = agent.metric_sum("mlflow_agent_datagrams_received_total")
        c1, t1 = cpu_seconds(agent.pid), time.perf_counter()
        sender.wait()
        return {"datagrams_per_s": (d1 - d0) / (t1 - t0), "metrics_per_s": (r1 - r0) / (t1 - t0),
                "metrics_per_cpu_s": (r1 - r0) / max(c1 - c0, 1e-9), "cpu": (c1 - c0) / (t1 - t0),
                "kernel_drops": agent.metric_sum("mlflow_agent_udp_kernel_drops_total")}
    finally:
        agent.stop()


def client_cost(base: Path) -> dict[str, float]:
    agent = AgentProcess(None, base / "agent-client" / "spool").start()
    try:
        client = AgentClient(RUN_ID, address=f"127.0.0.1:{agent.udp_port}")
        values = {f"m{i}": i * 0.5 for i in range(10)}
        n = 20000
        per_step = min(timeit.repeat(lambda: client.log_metrics(values, step=1), number=n, repeat=5)) / n
        raw = json.dumps({"run_id": RUN_ID, "metrics": [{"key": k, "value": v, "timestamp": 1, "step": 1}
                                                         for k, v in values.items()]}).encode()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        address = ("127.0.0.1", agent.udp_port)

        def send() -> None:
            with contextlib.suppress(OSError):  # the same never-raise contract as the client
                sock.sendto(raw, address)

        per_sendto = min(timeit.repeat(send, number=n, repeat=5)) / n
        return {"client_us": per_step * 1e6, "sendto_us": per_sendto * 1e6, **client.stats()}
    finally:
        agent.stop()


PLUGIN_LOOP = r"""
import json, sys, time, mlflow
n = int(sys.argv[1])
mlflow.set_experiment("bench-plugin")
with mlflow.start_run() as run:
    client = mlflow.MlflowClient()
    for i in range(50):
        mlflow.log_metric("warmup", i, step=i)
    t0 = time.perf_counter()
    for i in range(n):
        mlflow.log_metric("loss", 1.0 / (i + 1), step=i)
    fluent = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for i in range(n):
        client.log_metric(run.info.run_id, "acc", 1.0 / (i + 1), step=i)
    direct_client = (time.perf_counter() - t0) / n * 1e6
print(json.dumps({"fluent": fluent, "client": direct_client}))
"""


def plugin_cost(base: Path) -> dict[str, dict[str, float]]:
    server = MlflowServer(base / "server").start()
    agent = AgentProcess(server.url, base / "agent-plugin" / "spool").start()
    try:
        out = {}
        for name, uri, n in (
            ("direct to the MLflow server", server.url, 300),
            ("through the agent, http:// URI", agent.url, 2000),
            ("through the agent, mlflow-agent:// URI",
             f"mlflow-agent://127.0.0.1:{agent.port}?udp=127.0.0.1:{agent.udp_port}", 5000),
        ):
            done = subprocess.run([sys.executable, "-c", PLUGIN_LOOP, str(n)], capture_output=True, text=True,
                                  env=python_env({"MLFLOW_TRACKING_URI": uri}), check=True, timeout=600)
            out[name] = json.loads(done.stdout.strip().splitlines()[-1])
        return out
    finally:
        agent.stop()
        server.stop()


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="mlflow-agent-bench-dgram-"))
    try:
        import uvloop  # noqa: F401

        has_uvloop = True
    except ImportError:
        has_uvloop = False
    print(f"uvloop installed (the agent uses it): {has_uvloop}; cores: {os.cpu_count()}", flush=True)
    bare = bare_rate(False)
    print(f"bare asyncio receive loop (default loop, orjson): {bare:,.0f} datagrams/s", flush=True)
    if has_uvloop:
        print(f"bare asyncio receive loop (uvloop, orjson): {bare_rate(True):,.0f} datagrams/s", flush=True)
    one = agent_rate(base, 1)
    print(f"agent, 1 metric/datagram, spool on: {one['datagrams_per_s']:,.0f} datagrams/s "
          f"({one['datagrams_per_s'] / bare:.2f} of the bare default loop), agent CPU {one['cpu']:.2f} cores, "
          f"kernel drops {one['kernel_drops']:.0f}", flush=True)
    fifty = agent_rate(base, 50)
    print(f"agent, 50 metrics/datagram, spool on: {fifty['metrics_per_s']:,.0f} metrics/s wall, "
          f"{fifty['metrics_per_cpu_s']:,.0f} metrics per agent CPU-second (CPU {fifty['cpu']:.2f} cores), "
          f"kernel drops {fifty['kernel_drops']:.0f}", flush=True)
    cost = client_cost(base)
    print(f"client: log_metrics(10 metrics) {cost['client_us']:.1f} us per step; a raw sendto of the same "
          f"datagram {cost['sendto_us']:.1f} us", flush=True)
    for name, us in plugin_cost(base).items():
        print(f"{name}: mlflow.log_metric {us['fluent']:,.1f} us, MlflowClient().log_metric {us['client']:,.1f} us "
              "per call", flush=True)


if __name__ == "__main__":
    main()
