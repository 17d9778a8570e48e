"""Artifacts and logged models benchmark (issue 6): what the training process pays for ``log_artifact`` /
``log_artifacts`` / ``sklearn.log_model``, directly against the MLflow server and through the agent (upstream
+0 ms, +50 ms, down), and how fast the agent then delivers the files, against the direct client's own upload
time measured in the same run. Not a test; prints Markdown tables for the README.

    python -m bench.bench_artifacts          (from the repository root, in the venv of `make test`)
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.bench_core import FAST_UPLOAD, delay_proxy
from tests.support.agent_process import AgentProcess
from tests.support.mlflow_server import MlflowServer
from tests.support.ports import free_port
from tests.support.processes import stop_process, wait_until

MiB = 1 << 20
SMALL_FILES = 50  # of 1 MiB each, in one log_artifacts
BIG = 200 * MiB
REPEATS = 3


def make_files(base: Path) -> tuple[Path, Path]:
    small = base / "small"
    small.mkdir(parents=True)
    for i in range(SMALL_FILES):
        (small / f"part-{i:03d}.bin").write_bytes(os.urandom(MiB))
    big = base / "big.bin"
    with big.open("wb") as handle:
        block = hashlib.sha512(b"bench").digest() * (MiB // 64)
        for _ in range(BIG // MiB):
            handle.write(block)
    return small, big


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def client_costs(url: str, small: Path, big: Path, name: str) -> dict[str, float]:
    """Median seconds the client blocks: 50 x 1 MiB in one log_artifacts, one 200 MiB log_artifact, one
    sklearn log_model (a small model, with an input example)."""
    import mlflow
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    mlflow.set_tracking_uri(url)
    mlflow.set_experiment(name)
    features = np.random.default_rng(1).normal(size=(200, 8))
    model = LogisticRegression().fit(features, (features[:, 0] > 0).astype(int))
    out: dict[str, list[float]] = {"log_artifacts": [], "log_artifact": [], "log_model": []}
    for _ in range(REPEATS):
        with mlflow.start_run():
            out["log_artifacts"].append(timed(lambda: mlflow.log_artifacts(str(small), "small")))
            out["log_artifact"].append(timed(lambda: mlflow.log_artifact(str(big), "big")))
            out["log_model"].append(timed(lambda: mlflow.sklearn.log_model(model, name="model",
                                                                           input_example=features[:2])))
    return {k: statistics.median(v) for k, v in out.items()}


def drained(agent: AgentProcess, timeout: float = 600) -> float:
    started = time.perf_counter()
    wait_until(lambda: agent.status()["artifacts"]["waiting"] == 0 and agent.status()["buffered_records"] == 0,
               timeout, interval=0.05, message="artifacts uploaded", proc=agent.proc)
    return time.perf_counter() - started


def delivery(server: MlflowServer, base: Path, small: Path, big: Path) -> dict[str, float]:
    """Seconds until the upstream holds everything: the direct client's own uploads (it blocks until they
    are done), against an agent that took the same files while the upstream was down and then delivers
    them (counted from the upstream's return)."""
    import mlflow

    mlflow.set_tracking_uri(server.url)
    mlflow.set_experiment("bench-delivery-direct")
    with mlflow.start_run():
        direct_small = timed(lambda: mlflow.log_artifacts(str(small), "small"))
        direct_big = timed(lambda: mlflow.log_artifact(str(big), "big"))
    out = {"direct_small": direct_small, "direct_big": direct_big}
    for label, upload in (("small", lambda: mlflow.log_artifacts(str(small), "small")),
                          ("big", lambda: mlflow.log_artifact(str(big), "big"))):
        port = free_port()
        relay = MlflowServer(base / f"delivery-{label}", port=port)
        agent = AgentProcess(f"http://127.0.0.1:{port}", base / f"agent-delivery-{label}" / "spool",
                             (*FAST_UPLOAD, "--retry-max-backoff", "100ms")).start()
        try:
            mlflow.set_tracking_uri(agent.url)
            mlflow.set_experiment(f"bench-delivery-{label}")
            with mlflow.start_run():
                upload()
            relay.start()
            out[f"agent_{label}"] = drained(agent)
        finally:
            agent.stop()
            relay.stop()
    return out


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="mlflow-agent-bench-artifacts-"))
    small, big = make_files(base / "files")
    server = MlflowServer(base / "server").start()
    try:
        rows = [("direct to the MLflow server", client_costs(server.url, small, big, "bench-direct"))]
        proxy, target = delay_proxy(server.url, 50, base)
        try:
            rows.append(("direct, the server +50 ms away", client_costs(target, small, big, "bench-direct-50")))
        finally:
            stop_process(proxy)
        for delay in (0, 50):
            proxy, target = (None, server.url) if not delay else delay_proxy(server.url, delay, base)
            agent = AgentProcess(target, base / f"agent-{delay}" / "spool", FAST_UPLOAD).start()
            try:
                rows.append((f"through the agent, upstream +{delay} ms",
                             client_costs(agent.url, small, big, f"bench-agent-{delay}")))
                drained(agent)
            finally:
                agent.stop()
                if proxy is not None:
                    stop_process(proxy)
        agent = AgentProcess(f"http://127.0.0.1:{free_port()}", base / "agent-down" / "spool",
                             (*FAST_UPLOAD, "--drain-timeout", "0s")).start()
        try:
            rows.append(("through the agent, upstream down", client_costs(agent.url, small, big, "bench-down")))
        finally:
            agent.stop()
        direct = rows[0][1]
        print("| client blocks for (median of 3) | 50 x 1 MiB `log_artifacts` | 200 MiB `log_artifact` "
              "| sklearn `log_model` |")
        print("|---|---:|---:|---:|")
        for label, costs in rows:
            cells = [f"{costs[k] * 1000:,.0f} ms ({costs[k] / direct[k]:.2f}x)"
                     for k in ("log_artifacts", "log_artifact", "log_model")]
            print(f"| {label} | " + " | ".join(cells) + " |")
        d = delivery(server, base, small, big)
        print("\n| until the upstream holds the files | direct client | agent, after the upstream's return "
              "| agent / direct |")
        print("|---|---:|---:|---:|")
        for key, label in (("small", "50 x 1 MiB"), ("big", "200 MiB")):
            print(f"| {label} | {d['direct_' + key]:.2f} s | {d['agent_' + key]:.2f} s | "
                  f"{d['agent_' + key] / d['direct_' + key]:.2f} |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
