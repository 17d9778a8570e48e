"""Core benchmark (issue 2): training-loop cost, HTTP ingest rate and upload rate, each against a baseline
measured in the same run. Not a test; prints a Markdown table for the README.

    python -m bench.bench_core            (from the repository root, in the venv of `make test`)
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import requests

from tests.support.agent_process import AgentProcess
from tests.support.mlflow_server import MlflowServer
from tests.support.ports import free_port
from tests.support.processes import python_env, spawn, stop_process, wait_http_ok

ROOT = Path(__file__).resolve().parent.parent
FAST_UPLOAD = ("--retry-max-backoff", "1s", "--retry-initial-backoff", "100ms")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def train(tracking_uri: str, steps: int, mode: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_loop.py"), str(steps), mode],
                         env=python_env({"MLFLOW_TRACKING_URI": tracking_uri}), capture_output=True, check=True,
                         timeout=900)
    result: dict[str, float] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


def delay_proxy(target: str, delay_ms: int, base: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = spawn([sys.executable, "-m", "bench.delay_proxy", "--listen", f"127.0.0.1:{port}", "--target", target,
                  "--delay-ms", str(delay_ms)], base / f"delay-{delay_ms}.log", env=python_env())
    wait_http_ok(f"http://127.0.0.1:{port}/health", 60, proc)
    return proc, f"http://127.0.0.1:{port}"


# --- A: training loop --------------------------------------------------------------------------


def bench_training_loop(server: MlflowServer, base: Path, mode: str) -> list[tuple[str, float, float]]:
    rows = []
    direct = train(server.url, 60, mode)
    rows.append(("direct to MLflow server", direct["median_ms"], direct["p99_ms"]))
    for delay in (0, 50, 200):
        proxy = None
        target = server.url
        if delay:
            proxy, target = delay_proxy(server.url, delay, base)
        agent = AgentProcess(target, base / f"agent-{mode}-{delay}" / "spool", FAST_UPLOAD).start()
        try:
            r = train(agent.url, 300, mode)
            rows.append((f"through agent, upstream +{delay} ms", r["median_ms"], r["p99_ms"]))
        finally:
            agent.stop()
            if proxy is not None:
                stop_process(proxy)
    agent = AgentProcess(f"http://127.0.0.1:{free_port()}", base / f"agent-{mode}-down" / "spool",
                         FAST_UPLOAD).start()
    try:
        r = train(agent.url, 300, mode)
        rows.append(("through agent, upstream down", r["median_ms"], r["p99_ms"]))
    finally:
        agent.stop()
    return rows


# --- B: HTTP log-batch ingest ----------------------------------------------------------------


async def _load(url: str, run_ids: list[str], seconds: float, concurrency: int) -> int:
    sent = 0
    stop_at = time.monotonic() + seconds
    bodies = []
    for run_id in run_ids:
        metrics = [{"key": f"m{i % 20}", "value": i * 0.5, "timestamp": 1_700_000_000_000 + i, "step": i}
                   for i in range(1000)]
        bodies.append(orjson.dumps({"run_id": run_id, "metrics": metrics}))

    async def worker(n: int) -> None:
        nonlocal sent
        async with aiohttp.ClientSession() as session:
            i = n
            while time.monotonic() < stop_at:
                async with session.post(f"{url}/api/2.0/mlflow/runs/log-batch", data=bodies[i % len(bodies)],
                                        headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"log-batch answered {resp.status}")
                sent += 1000
                i += 1

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return sent


def bench_ingest(base: Path) -> dict[str, float]:
    agent = AgentProcess(None, base / "agent-ingest" / "spool").start()
    try:
        exp = requests.post(f"{agent.url}/api/2.0/mlflow/experiments/create", json={"name": "ingest"}).json()
        runs = [requests.post(f"{agent.url}/api/2.0/mlflow/runs/create",
                              json={"experiment_id": exp["experiment_id"]}).json()["run"]["info"]["run_id"]
                for _ in range(4)]
        cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
        sent = asyncio.run(_load(agent.url, runs, 8.0, 4))
        cpu1, t1 = cpu_seconds(agent.pid), time.monotonic()
        status = agent.status()
        return {
            "metrics": sent,
            "wall_rate": sent / (t1 - t0),
            "per_cpu_second": sent / (cpu1 - cpu0),
            "agent_cpu_share": (cpu1 - cpu0) / (t1 - t0),
            "spool_file_bytes_per_metric": status["spool"]["file_bytes"] / status["buffered_records"],
            "charged_bytes_per_metric": status["spool"]["charged_bytes"] / status["buffered_records"],
        }
    finally:
        agent.stop()


# --- C: upload ---------------------------------------------------------------------------------


def _bulk_bodies(run_id: str, per_run: int, offset: int) -> list[bytes]:
    bodies = []
    for start in range(0, per_run, 1000):
        metrics = [{"key": f"m{i % 10}", "value": float(i), "timestamp": offset + i, "step": i}
                   for i in range(start, min(start + 1000, per_run))]
        bodies.append(orjson.dumps({"run_id": run_id, "metrics": metrics}))
    return bodies


async def _post_all(url: str, per_run_bodies: list[list[bytes]]) -> None:
    async with aiohttp.ClientSession() as session:
        async def one_run(bodies: list[bytes]) -> None:
            for body in bodies:
                async with session.post(f"{url}/api/2.0/mlflow/runs/log-batch", data=body,
                                        headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"log-batch answered {resp.status}: {await resp.text()}")
        await asyncio.gather(*(one_run(b) for b in per_run_bodies))


def _create_runs(url: str, name: str, n: int) -> list[str]:
    exp = requests.post(f"{url}/api/2.0/mlflow/experiments/create", json={"name": name}).json()["experiment_id"]
    return [requests.post(f"{url}/api/2.0/mlflow/runs/create", json={"experiment_id": exp}).json()
            ["run"]["info"]["run_id"] for _ in range(n)]


def bench_upload(server: MlflowServer, base: Path, runs: int = 4, per_run: int = 50_000) -> dict[str, float]:
    total = runs * per_run
    direct_runs = _create_runs(server.url, "upload-direct", runs)
    t0 = time.monotonic()
    asyncio.run(_post_all(server.url, [_bulk_bodies(r, per_run, 1_700_000_000_000) for r in direct_runs]))
    direct_rate = total / (time.monotonic() - t0)

    spool = base / "agent-upload" / "spool"
    offline = AgentProcess(None, spool).start()
    agent_runs = _create_runs(offline.url, "upload-agent", runs)
    asyncio.run(_post_all(offline.url, [_bulk_bodies(r, per_run, 1_800_000_000_000) for r in agent_runs]))
    offline.stop()
    # The same spool, now with the upstream: time from start until everything is acknowledged.
    t0 = time.monotonic()
    agent = AgentProcess(server.url, spool, ("--upload-linger", "0s")).start()
    try:
        agent.wait_drained(timeout=900, interval=0.05)
        agent_rate = total / (time.monotonic() - t0)
    finally:
        agent.stop()
    return {"metrics": total, "direct_rate": direct_rate, "agent_rate": agent_rate,
            "ratio": agent_rate / direct_rate}


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="mlflow-agent-bench-"))
    server = MlflowServer(base / "server").start()
    try:
        lines = ["| training loop, 10 metrics/step | per step, median | p99 |", "|---|---:|---:|"]
        results: dict[str, Any] = {}
        for mode in ("log_metric", "log_metrics"):
            rows = bench_training_loop(server, base, mode)
            results[mode] = rows
            for name, median, p99 in rows:
                lines.append(f"| `{mode}` {name} | {median:.2f} ms | {p99:.2f} ms |")
        print("\n".join(lines), flush=True)
        for mode, rows in results.items():
            direct = rows[0][1]
            agent = [r[1] for r in rows[1:]]
            print(f"{mode}: agent/direct at 0 ms = {rows[1][1] / direct:.3f}; "
                  f"max/min across 0, 50, 200 ms and outage = {max(agent) / min(agent):.2f}", flush=True)
        ingest = bench_ingest(base)
        print(f"ingest (HTTP log-batch, 1000 metrics each, 4 connections, spool on, offline): "
              f"{ingest['wall_rate']:,.0f} metrics/s wall, {ingest['per_cpu_second']:,.0f} metrics per agent "
              f"CPU-second (agent used {ingest['agent_cpu_share']:.2f} cores); spool file "
              f"{ingest['spool_file_bytes_per_metric']:.1f} B/metric, charged {ingest['charged_bytes_per_metric']:.1f}"
              f" B/metric", flush=True)
        upload = bench_upload(server, base)
        print(f"upload of {upload['metrics']:,} metrics in 4 runs: MLflow server bulk log-batch direct "
              f"{upload['direct_rate']:,.0f}/s, agent from its spool {upload['agent_rate']:,.0f}/s "
              f"(ratio {upload['ratio']:.2f})", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
