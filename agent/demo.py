"""``python -m agent demo``: a local MLflow server as upstream, the agent in front of it, and a training
loop using the unmodified mlflow client; halfway through, the upstream is stopped, so the second half
is logged during an outage. Then the upstream comes back, the agent delivers, and the demo prints
what arrived upstream.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import orjson

_TIMEOUT = 120.0


def run_demo(*, keep: bool = False, steps: int = 300) -> int:
    try:
        import mlflow  # noqa: F401  (the demo's server and training loop need it)
    except ImportError:
        print("the demo needs mlflow: pip install 'mlflow-agent[demo]' (or run `make demo`)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-agent-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    server_port, agent_port = _free_port(), _free_port()
    upstream = f"http://127.0.0.1:{server_port}"
    agent_url = f"http://127.0.0.1:{agent_port}"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    try:
        print(f"demo: starting an MLflow server (SQLite in {workdir}) on {upstream} ...", flush=True)
        server = _start_server(workdir, server_port, env)
        procs.append(server)
        print(f"demo: starting mlflow-agent on {agent_url} in front of it", flush=True)
        agent = _spawn([sys.executable, "-m", "agent", "run", "--upstream", upstream,
                        "--http", f"127.0.0.1:{agent_port}", "--udp", "none", "--spool-dir", str(workdir / "spool"),
                        "--log-format", "text", "--log-level", "warning", "--retry-max-backoff", "2s"],
                       workdir / "agent.log", env)
        procs.append(agent)
        _wait_http(f"{agent_url}/readyz", agent, workdir / "agent.log")

        print(f"demo: training for {steps} steps with MLFLOW_TRACKING_URI={agent_url} ...", flush=True)
        train = subprocess.Popen(
            [sys.executable, "-m", "agent.demo_train", str(steps)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=dict(env, MLFLOW_TRACKING_URI=agent_url), cwd=workdir,
        )
        procs.append(train)
        assert train.stdout is not None and train.stdin is not None
        report: list[str] = []
        output: list[str] = []  # shown if the loop fails
        for raw in train.stdout:
            line = raw.decode(errors="replace").rstrip()
            output = [*output[-40:], line]
            if line == "DEMO-HALFWAY":
                print("demo: halfway: stopping the MLflow server; training goes on", flush=True)
                _stop(server)
                train.stdin.write(b"go\n")
                train.stdin.flush()
            elif line.startswith("DEMO-"):
                report.append(line)
        if train.wait() != 0:
            print("demo: the training loop failed:\n" + "\n".join(output), file=sys.stderr)
            return 1
        for line in report:
            if line.startswith("DEMO-TIMING"):
                print("demo: " + line.removeprefix("DEMO-TIMING "), flush=True)
        status = _get_json(f"{agent_url}/status")
        print(f"demo: training finished with the upstream down; the agent holds {status['buffered_records']} "
              f"record(s) and {status['artifacts']['waiting']} artifact file(s)", flush=True)

        print("demo: restarting the MLflow server ...", flush=True)
        server = _start_server(workdir, server_port, env)
        procs.append(server)
        started = time.monotonic()
        while not _delivered(_get_json(f"{agent_url}/status")):
            if time.monotonic() - started > _TIMEOUT:
                print("demo: the agent did not drain in time; see agent.log", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print(f"demo: the agent delivered everything {time.monotonic() - started:.1f}s after the server came back",
              flush=True)
        print(_summary(upstream, _get_json(f"{agent_url}/status")["totals"]), flush=True)
        print(f"demo: MLflow UI: {upstream}  (also through the agent: {agent_url})", flush=True)
        _stop(agent)
        if keep:
            print("demo: the MLflow server keeps running; Ctrl-C to stop", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                server.wait()
        return 0
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _delivered(status: dict[str, Any]) -> bool:
    return bool(status["buffered_records"] == 0 and status["artifacts"]["waiting"] == 0)


def _files(upstream: str, path: str) -> int:
    """How many artifact files the upstream holds under ``path`` (recursively)."""
    listing = _get_json(f"{upstream}/api/2.0/mlflow-artifacts/artifacts?" + urllib.parse.urlencode({"path": path}))
    return sum(_files(upstream, f"{path}/{f['path']}") if f.get("is_dir") else 1 for f in listing.get("files", []))


def _summary(upstream: str, totals: dict[str, float]) -> str:
    api = f"{upstream}/api/2.0/mlflow"
    experiment = _get_json(f"{api}/experiments/get-by-name?experiment_name=mlflow-agent-demo")["experiment"]
    runs = _post_json(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                             "max_results": 100}).get("runs", [])
    lines = [f"demo: upstream experiment {experiment['name']!r} (id {experiment['experiment_id']}) holds:"]
    for run in sorted(runs, key=lambda r: r["info"].get("run_name", "")):
        info, data = run["info"], run.get("data", {})
        points = 0
        for metric in data.get("metrics", []):
            query = urllib.parse.urlencode({"run_id": info["run_id"], "metric_key": metric["key"],
                                            "max_results": 25000})
            points += len(_get_json(f"{api}/metrics/get-history?{query}").get("metrics", []))
        tags = {t["key"]: t["value"] for t in data.get("tags", [])}
        parent = f", child of {tags['mlflow.parentRunId'][:8]}" if "mlflow.parentRunId" in tags else ""
        root = info["artifact_uri"].removeprefix("mlflow-artifacts:/")
        lines.append(f"  run {info.get('run_name')!r} {info['status']}{parent}: {len(data.get('params', []))} "
                     f"params, {len(data.get('metrics', []))} metric keys, {points} metric points, "
                     f"{_files(upstream, root)} artifact file(s)")
    models = _post_json(f"{api}/logged-models/search", {"experiment_ids": [experiment["experiment_id"]]})
    for model in models.get("models", []):
        info = model["info"]
        files = _files(upstream, info["artifact_uri"].removeprefix("mlflow-artifacts:/"))
        lines.append(f"  logged model {info['name']!r} {info['status'].removeprefix('LOGGED_MODEL_')}: {files} files")
    lines.append("demo: agent totals: " + ", ".join(f"{k} {int(v)}" for k, v in sorted(totals.items())))
    return "\n".join(lines)


def _start_server(workdir: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = _spawn([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
                   "--artifacts-destination", str(workdir / "artifacts")], workdir / "mlflow-server.log", env)
    _wait_http(f"http://127.0.0.1:{port}/health", proc, workdir / "mlflow-server.log")
    return proc


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + _TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(urllib.error.URLError, OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {_TIMEOUT:.0f}s; see {log}")


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        value = orjson.loads(resp.read())
    return value if isinstance(value, dict) else {}


def _post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        value = orjson.loads(resp.read())
    return value if isinstance(value, dict) else {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
