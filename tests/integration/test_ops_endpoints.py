"""``ops_http``: a second listener for probes and scrapers (/healthz, /readyz, /metrics) only: no API, and no
/status (it names runs and experiments, and the ops address is often reachable from the whole cluster).

Against real agent processes: the ops port answers the four endpoints with the same state as the main
port, takes no data (MLflow API paths are 404 there and leave nothing in the spool), needs no ingest
token while the main port does, stays up through a drain (reporting not-ready, reason "draining") after
the main listener has closed, and may bind every address without allow_unauthenticated_bind.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AgentFactory
from tests.integration.helpers_faults import find_events, run_cli
from tests.support.ports import LOOPBACK, free_port
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration

INGEST_TOKEN = "ops-test-ingest-token-5d2e"
SPOOL_LIMIT = 64 * 1024 * 1024  # --spool-max-bytes 64MiB: a value /metrics must report back
API = "/api/2.0/mlflow"

#: MLflow API calls a client could aim at the ops port by mistake: (method, path, JSON body).
API_CALLS: tuple[tuple[str, str, dict[str, Any] | None], ...] = (
    ("POST", f"{API}/experiments/create", {"name": "ops-port-experiment"}),
    ("POST", f"{API}/runs/create", {"experiment_id": "0", "run_name": "ops-port-run"}),
    ("POST", f"{API}/runs/log-batch", {"run_id": "0" * 32, "metrics": [{"key": "m", "value": 1.0,
                                                                        "timestamp": 1, "step": 0}]}),
    ("POST", f"{API}/runs/log-metric", {"run_id": "0" * 32, "key": "m", "value": 1.0, "timestamp": 1}),
    ("GET", f"{API}/experiments/get-by-name?experiment_name=Default", None),
    ("GET", f"{API}/experiments/search?max_results=1", None),  # proxied to the upstream on the main port
    ("GET", "/api/3.0/mlflow/server-info", None),
)


class Ops:
    """HTTP to an agent's ops port (never through a proxy from the environment)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://{LOOPBACK}:{port}"
        self.http = requests.Session()
        self.http.trust_env = False

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.get(self.url + path, timeout=10, **kwargs)

    def request(self, method: str, path: str, body: dict[str, Any] | None, **kwargs: Any) -> requests.Response:
        return self.http.request(method, self.url + path, json=body, timeout=10, **kwargs)

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def ops_port() -> int:
    return free_port()


@pytest.fixture
def ops(ops_port: int) -> Iterator[Ops]:
    client = Ops(ops_port)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def dead_upstream() -> Iterator[str]:
    """An upstream URL whose port this test holds bound but never listens on: connections are refused
    at once, so everything the agent takes stays buffered and a drain lasts its whole timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind((LOOPBACK, 0))
        yield f"http://{LOOPBACK}:{held.getsockname()[1]}"


def _families(text: str) -> dict[str, Any]:
    """/metrics parsed by prometheus_client's own parser (so malformed exposition fails here)."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def _sample(families: dict[str, Any], family: str, name: str | None = None, **labels: str) -> float:
    total = 0.0
    for sample in families[family].samples:
        if sample.name == (name or family) and all(sample.labels.get(k) == v for k, v in labels.items()):
            total += sample.value
    return total


def _call(method: str, url: str, body: dict[str, Any] | None = None, token: str | None = None) -> requests.Response:
    """One request to the agent's main port (no proxy from the environment)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    with requests.Session() as http:
        http.trust_env = False
        return http.request(method, url, json=body, headers=headers, timeout=30)


def _refused(url: str) -> bool:
    """Whether a connection to ``url`` is refused (nothing listens there any more)."""
    with requests.Session() as http:
        http.trust_env = False
        try:
            http.get(url, timeout=2)
        except requests.ConnectionError:
            return True
    return False


def test_ops_port_answers_probes_metrics_and_status(agent_factory: AgentFactory, ops: Ops, ops_port: int) -> None:
    agent = agent_factory(None, "--ops-http", f"{LOOPBACK}:{ops_port}", "--spool-max-bytes", "64MiB")

    health = ops.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "alive", health.text

    ready = ops.get("/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["ready"] is True, body
    assert body["checks"]["listening"] is True and body["checks"]["spool_writable"] is True, body
    assert all(body["checks"].values()), body

    metrics = ops.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["Content-Type"].startswith("text/plain"), metrics.headers
    families = _families(metrics.text)
    assert _sample(families, "mlflow_agent_spool_limit_bytes") == SPOOL_LIMIT
    assert set(families) == set(_families(agent.metrics_text())), "the ops port scrapes another registry"

    assert ops.get("/status").status_code == 404  # run and experiment names stay on the main port

    # Same state as the main port: a record taken there shows on the ops port at once.
    created = _call("POST", f"{agent.url}{API}/runs/create", {"experiment_id": "0"})
    assert created.status_code == 200, created.text
    assert _sample(_families(ops.get("/metrics").text), "mlflow_agent_buffered_records", kind="run_op") == 1
    received = _sample(_families(ops.get("/metrics").text), "mlflow_agent_records_received",
                       "mlflow_agent_records_received_total", kind="run_op", source="http")
    assert received == 1, ops.get("/metrics").text


def test_ops_port_takes_no_data(agent_factory: AgentFactory, ops: Ops, ops_port: int) -> None:
    agent = agent_factory(None, "--ops-http", f"{LOOPBACK}:{ops_port}")
    for method, path, body in API_CALLS:
        resp = ops.request(method, path, body)
        assert resp.status_code == 404, f"{method} {path} on the ops port: {resp.status_code} {resp.text[:200]}"
    status = agent.status()
    assert status["buffered_records"] == 0, status
    assert status["runs"] == [] and status["experiments_pending"] == [], status
    assert status["totals"].get("received", 0) == 0, status["totals"]
    # The same calls are not malformed: the main port takes them.
    method, path, body = API_CALLS[1]
    taken = _call(method, agent.url + path, body)
    assert taken.status_code == 200, taken.text
    assert agent.status()["buffered_records"] == 1


def test_ingest_token_guards_the_main_port_not_the_ops_port(
    agent_factory: AgentFactory, ops: Ops, ops_port: int
) -> None:
    agent = agent_factory(None, "--ops-http", f"{LOOPBACK}:{ops_port}", env={"MLFLOW_AGENT_INGEST_TOKEN": INGEST_TOKEN})
    for path in ("/healthz", "/readyz", "/metrics"):
        resp = ops.get(path)
        assert resp.status_code == 200, f"{path} on the ops port without a token: {resp.status_code} {resp.text}"
    # The main port refuses API calls (and /status) without the token, takes them with it.
    for method, path, body in API_CALLS[:2]:
        refused = _call(method, agent.url + path, body)
        assert refused.status_code == 401, f"{method} {path} without a token: {refused.status_code} {refused.text}"
        assert refused.json()["error_code"] == "UNAUTHENTICATED"
    assert agent.get("/status").status_code == 401
    taken = _call("POST", f"{agent.url}{API}/runs/create", {"experiment_id": "0"}, token=INGEST_TOKEN)
    assert taken.status_code == 200, taken.text
    # A token does not open the API on the ops port either.
    bearer = {"Authorization": f"Bearer {INGEST_TOKEN}"}
    assert ops.request("POST", f"{API}/runs/create", {"experiment_id": "0"}, headers=bearer).status_code == 404
    assert requests.get(f"{agent.url}/status", headers=bearer, timeout=10).json()["buffered_records"] == 1


def test_during_a_drain_the_ops_port_reports_draining_after_the_main_port_closed(
    agent_factory: AgentFactory, ops: Ops, ops_port: int, dead_upstream: str
) -> None:
    drain_timeout = 4.0
    agent = agent_factory(dead_upstream, "--ops-http", f"{LOOPBACK}:{ops_port}",
                          "--drain-timeout", f"{drain_timeout:g}s", "--create-run-timeout", "200ms",
                          "--retry-initial-backoff", "100ms", "--retry-max-backoff", "500ms")
    created = _call("POST", f"{agent.url}{API}/runs/create", {"experiment_id": "0"})
    assert created.status_code == 200, created.text
    assert agent.status()["buffered_records"] == 1  # nothing can leave: the drain will use all its time

    agent.sigterm()
    readyz = wait_until(lambda: _draining_answer(ops), 10, interval=0.02, message="ops /readyz 503",
                        proc=agent.proc)
    assert readyz is not None
    assert readyz["ready"] is False and readyz["reason"] == "draining", readyz
    assert readyz["checks"]["listening"] is False, readyz
    wait_until(lambda: _refused(f"{agent.url}/healthz"), 10, interval=0.02,
               message="the main listener to close", proc=agent.proc)

    # The main port is closed, the drain goes on (nothing can be delivered), and the ops port, which
    # closes only when the agent exits, still tells the story.
    again = ops.get("/readyz")
    assert again.status_code == 503 and again.json()["reason"] == "draining", again.text
    assert ops.get("/healthz").status_code == 200
    assert _sample(_families(ops.get("/metrics").text), "mlflow_agent_buffered_records", kind="run_op") == 1
    assert _sample(_families(ops.get("/metrics").text), "mlflow_agent_buffered_records") == 1

    assert agent.wait(drain_timeout + 30) == 0, agent.log_tail()
    assert _refused(f"{ops.url}/healthz"), "the ops port outlived the agent"


def _draining_answer(ops: Ops) -> dict[str, Any] | None:
    resp = ops.get("/readyz")
    if resp.status_code != 503:
        return None
    data: dict[str, Any] = resp.json()
    return data


def test_ops_port_may_bind_every_address_without_a_token(agent_factory: AgentFactory, ops_port: int) -> None:
    # The guard exists: the main port on every address without a token is refused at start ...
    http_port = free_port()
    refused = run_cli("run", "--upstream", "none", "--http", f"0.0.0.0:{http_port}", "--udp", "none",
                      "--spool-dir", "/nonexistent/never-created", timeout=60)
    assert refused.returncode == 2 and "invalid setting 'http'" in refused.stderr, refused.stderr
    # ... and does not apply to the ops port, which takes no data.
    agent = agent_factory(None, "--ops-http", f"0.0.0.0:{ops_port}")
    settings = find_events(agent, "starting")[0]["settings"]
    assert settings["ops_http"] == f"0.0.0.0:{ops_port}", settings
    assert settings["ingest_token"] is None and settings["allow_unauthenticated_bind"] is False, settings
    ops = Ops(ops_port)
    try:
        ready = ops.get("/readyz")  # reached through 127.0.0.1: bound to every address
        assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text
    finally:
        ops.close()
