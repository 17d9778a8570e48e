"""Scrape benchmark (the metrics issue): what GET /metrics, /status and /readyz cost on an agent holding
records for 1,000 runs, against GET /healthz (the cheapest endpoint) measured in the same run on the same
connection. Target: /metrics answers in < 10 ms with 1,000 active runs. Not a test; prints a Markdown
table for the README.

    python -m bench.bench_scrape          (from the repository root, in the venv of `make test`)

The agent runs offline (``--upstream none``), so every run keeps its records buffered. Each endpoint is
asked ``REQUESTS`` times over one persistent HTTP/1.1 connection (``http.client``), after a warm-up;
a request's time is from sending it to having read the whole body. The same is measured first on the
same agent before any run exists, to show what the runs add.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from bench.bench_core import cpu_seconds
from tests.support.agent_process import AgentProcess
from tests.support.ports import LOOPBACK

RUNS = 1000
METRICS_PER_RUN = 20
PARAMS_PER_RUN = 3
REQUESTS = 1000
WARMUP = 50
ENDPOINTS = ("/healthz", "/metrics", "/readyz", "/status")
API = "/api/2.0/mlflow/"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered)) - 1))]


def time_endpoint(port: int, pid: int, path: str, n: int = REQUESTS) -> dict[str, float]:
    """Median and p99 in ms, agent CPU ms per request, body bytes, over ``n`` GETs on one connection."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        size = 0
        for _ in range(WARMUP):
            conn.request("GET", path)
            resp = conn.getresponse()
            size = len(resp.read())
            if resp.status not in (200, 503):  # /readyz may say 503 (e.g. spool full): still an answer
                raise RuntimeError(f"GET {path} answered {resp.status}")
        times = []
        cpu0 = cpu_seconds(pid)
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            times.append((time.perf_counter() - t0) * 1000)
        cpu = (cpu_seconds(pid) - cpu0) * 1000 / n
    finally:
        conn.close()
    return {"median": statistics.median(times), "p99": percentile(times, 0.99), "cpu_ms": cpu, "bytes": size}


async def _fill(url: str, runs: int) -> list[str]:
    """``runs`` runs created through runs/create, each with metrics and params waiting for upload."""
    async with aiohttp.ClientSession() as session:
        async def post(endpoint: str, body: dict[str, object]) -> dict[str, object]:
            async with session.post(f"{url}{API}{endpoint}", data=orjson.dumps(body),
                                    headers={"Content-Type": "application/json"}) as resp:
                payload = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{endpoint} answered {resp.status}: {payload[:200]!r}")
                answer: dict[str, object] = orjson.loads(payload)
                return answer

        experiment = await post("experiments/create", {"name": "scrape-bench"})
        gate = asyncio.Semaphore(16)

        async def one(i: int) -> str:
            async with gate:
                created = await post("runs/create", {"experiment_id": experiment["experiment_id"],
                                                     "run_name": f"run-{i:04d}"})
                run = created["run"]
                assert isinstance(run, dict)
                run_id = str(run["info"]["run_id"])
                metrics = [{"key": f"m{j % 5}", "value": j * 0.5, "timestamp": 1_700_000_000_000 + j, "step": j}
                           for j in range(METRICS_PER_RUN)]
                params = [{"key": f"p{j}", "value": str(j)} for j in range(PARAMS_PER_RUN)]
                await post("runs/log-batch", {"run_id": run_id, "metrics": metrics, "params": params})
                return run_id

        return list(await asyncio.gather(*(one(i) for i in range(runs))))


def measure(agent: AgentProcess) -> dict[str, dict[str, float]]:
    return {path: time_endpoint(agent.port, agent.pid, path) for path in ENDPOINTS}


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="mlflow-agent-bench-scrape-"))
    agent = AgentProcess(None, base / "agent" / "spool").start()
    try:
        empty = measure(agent)
        t0 = time.monotonic()
        asyncio.run(_fill(agent.url, RUNS))
        filled_in = time.monotonic() - t0
        status = agent.status()
        waiting = sum(1 for run in status["runs"] if run["pending"])
        if waiting != RUNS:
            raise RuntimeError(f"expected {RUNS} runs with records waiting, /status shows {waiting}")
        full = measure(agent)
    finally:
        agent.stop()
    print(f"agent offline, {RUNS:,} runs with {status['buffered_records']:,} records buffered "
          f"({METRICS_PER_RUN} metrics, {PARAMS_PER_RUN} params and the run's create each; filled in "
          f"{filled_in:.1f}s); {REQUESTS} GETs per endpoint on one keep-alive connection; cores: {os.cpu_count()}",
          flush=True)
    base_median = full["/healthz"]["median"]
    lines = [f"| endpoint, {RUNS:,} active runs | median | p99 | median / `/healthz` | agent CPU per request "
             "| body | median with no runs |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for path in ENDPOINTS:
        r = full[path]
        name = f"`GET {path}`" + (" (baseline)" if path == "/healthz" else "")
        lines.append(f"| {name} | {r['median']:.2f} ms | {r['p99']:.2f} ms | {r['median'] / base_median:.1f} "
                     f"| {r['cpu_ms']:.2f} ms | {r['bytes']:,.0f} B | {empty[path]['median']:.2f} ms |")
    print("\n".join(lines), flush=True)
    m = full["/metrics"]
    verdict = "met" if m["p99"] < 10 else ("met at the median only" if m["median"] < 10 else "NOT met")
    print(f"/metrics with {RUNS:,} runs: median {m['median']:.2f} ms, p99 {m['p99']:.2f} ms "
          f"(target < 10 ms: {verdict}); {m['median'] / base_median:.1f}x /healthz, "
          f"{m['median'] / empty['/metrics']['median']:.2f}x /metrics with no runs; exposition "
          f"{m['bytes']:,.0f} bytes ({empty['/metrics']['bytes']:,.0f} with no runs)", flush=True)


if __name__ == "__main__":
    main()
