"""Datagrams end to end: a real MLflow server, the agent as a process, metrics sent over UDP and a Unix
datagram socket straight from the test.

* Property: whatever valid metric batches are sent (JSON over UDP, JSON over the Unix socket, DogStatsD
  lines over UDP), to a run created upstream directly (the agent has never seen it), the upstream metric
  history ends up exactly equal to what was sent, each point once.
* Overload: with a tiny receive buffer and a sender far faster than the agent, the kernel drops
  datagrams; every datagram sent is still accounted for: uploaded upstream, counted as a kernel drop,
  refused by the agent, or counted as invalid.
"""

from __future__ import annotations

import json
import math
import posixpath
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import AgentFactory
from tests.integration.helpers import FLOAT_MAX, expected_rows
from tests.support.agent_process import AgentProcess, sum_samples
from tests.support.mlflow_server import MlflowServer
from tests.support.ports import LOOPBACK
from tests.support.snapshot import duplicate_rows, metric_rows

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration

AGENT_ARGS = ("--upload-linger", "50ms", "--retry-max-backoff", "1s")
RECEIVED = "mlflow_agent_records_received_total"
DATAGRAMS = "mlflow_agent_datagrams_received_total"
ERRORS = "mlflow_agent_datagram_errors_total"
REFUSED = "mlflow_agent_ingest_refused_records_total"
KERNEL_DROPS = "mlflow_agent_udp_kernel_drops_total"
MAX_UDP_PAYLOAD = 65507

PROPERTY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the stack: one server, one agent for the whole module -------------------------------------------


@dataclass
class Stack:
    server: MlflowServer
    agent: AgentProcess
    uds_path: Path
    experiment_id: str
    client: MlflowClient
    udp: socket.socket
    uds: socket.socket

    def new_run(self) -> str:
        run_id: str = self.client.create_run(self.experiment_id).info.run_id
        return run_id

    def send(self, transport: str, datagrams: Sequence[bytes]) -> None:
        for data in datagrams:
            if transport == "udp":
                assert len(data) <= MAX_UDP_PAYLOAD
                assert self.udp.sendto(data, (LOOPBACK, self.agent.udp_port)) == len(data)
            else:
                assert self.uds.sendto(data, str(self.uds_path)) == len(data)


@pytest.fixture(scope="module")
def stack(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("datagrams")
    uds_path = base / "agent.sock"
    agent = AgentProcess(mlflow_server, base / "spool", (*AGENT_ARGS, "--uds", str(uds_path)))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    uds = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # blocking: the agent is another process
    try:
        agent.start()
        client = mlflow_server.client()
        experiment_id = client.create_experiment(f"datagrams-{uuid.uuid4().hex[:8]}")
        yield Stack(mlflow_server, agent, uds_path, experiment_id, client, udp, uds)
    finally:
        udp.close()
        uds.close()
        agent.close()


# -- what is sent ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    key: str
    value: float
    step: int
    timestamp: int


def valid_key(key: str) -> bool:
    """MLflow's rules for a metric name: the character class, no path tricks, at most 250 characters."""
    norm = posixpath.normpath(key)
    return norm == key and norm != "." and not norm.startswith(("..", "/")) and len(key) <= 250


# MLflow allows \\w (unicode letters and digits, '_'), '/', '.', '-', ' ' and ':'.
_SEGMENT = st.text(st.characters(categories=("L", "Nd"), include_characters="_.- :"), min_size=1, max_size=12)
KEYS = st.lists(_SEGMENT, min_size=1, max_size=3).map("/".join).filter(valid_key)
STATSD_KEYS = KEYS  # leading blanks included: "  loss" is a key of its own, kept as sent
VALUES = st.floats(allow_nan=True, allow_infinity=True)
STEPS = st.integers(-(2**63), 2**63 - 1)
TIMESTAMPS = st.integers(0, 2**63 - 1)


@st.composite
def points(draw: st.DrawFn, keys: st.SearchStrategy[str]) -> list[Point]:
    """A few keys, and points on them with unique (key, step, timestamp): MLflow keeps identical rows once."""
    pool = draw(st.lists(keys, min_size=1, max_size=4, unique=True))
    return draw(st.lists(st.builds(Point, st.sampled_from(pool), VALUES, STEPS, TIMESTAMPS), min_size=1,
                         max_size=40, unique_by=lambda p: (p.key, p.step, p.timestamp)))  # fmt: skip


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def protobuf_json_value(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


@st.composite
def json_datagrams(draw: st.DrawFn, run_id: str, pts: list[Point]) -> list[bytes]:
    """The points as log-batch objects, several objects per datagram, newline-separated. Some objects are
    written by orjson (NaN and infinities as protobuf-JSON strings), some by Python's json module (bare
    NaN / Infinity tokens); a step of 0 is sometimes left out (it is the default)."""
    objects: list[bytes] = []
    for group in chunks(pts, draw(st.integers(1, 12))):
        metrics: list[dict[str, Any]] = []
        for p in group:
            m: dict[str, Any] = {"key": p.key, "timestamp": p.timestamp}
            if p.step != 0 or draw(st.booleans()):
                m["step"] = p.step
            metrics.append(m)
        if draw(st.booleans()):
            for m, p in zip(metrics, group, strict=True):
                m["value"] = p.value
            objects.append(json.dumps({"run_id": run_id, "metrics": metrics}).encode())
        else:
            for m, p in zip(metrics, group, strict=True):
                m["value"] = protobuf_json_value(p.value)
            objects.append(orjson.dumps({"run_id": run_id, "metrics": metrics}))
    lead = draw(st.sampled_from([b"", b" ", b"\n", b" \t\n"]))
    return [lead + b"\n".join(group) + b"\n" for group in chunks(objects, draw(st.integers(1, 3)))]


@st.composite
def statsd_datagrams(draw: st.DrawFn, run_id: str, pts: list[Point]) -> list[bytes]:
    """One DogStatsD line per point, several lines per datagram. The timestamp is the ``ts`` tag, or
    DogStatsD's ``|T<seconds>`` field when it is whole seconds; a step of 0 is sometimes left out."""
    lines: list[str] = []
    for p in pts:
        tags = [f"run_id:{run_id}"]
        if p.step != 0 or draw(st.booleans()):
            tags.append(f"step:{p.step}")
        fields = ["g"]
        if p.timestamp % 1000 == 0 and draw(st.booleans()):
            fields.append(f"T{p.timestamp // 1000}")
        else:
            tags.append(f"ts:{p.timestamp}")
        draw(st.randoms()).shuffle(tags)
        lines.append(f"{p.key}:{p.value!r}|{'|'.join(fields)}|#{','.join(tags)}")
    return ["\n".join(group).encode() for group in chunks(lines, draw(st.integers(1, 10)))]


# -- waiting for the agent ------------------------------------------------------------------------------


def wait_received(agent: AgentProcess, source: str, target: float, timeout: float = 30) -> dict[str, float]:
    """Until the agent has made ``target`` metric points from ``source`` durable; returns /metrics."""
    deadline = time.monotonic() + timeout
    while True:
        samples = agent.metrics()
        got = agent_sum(samples, RECEIVED, kind="metric", source=source)
        if got >= target:
            return samples
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"agent holds {got} of {target} points from {source}; datagram errors "
                f"{agent_sum(samples, ERRORS)}, kernel drops {agent_sum(samples, KERNEL_DROPS)}\n"
                f"--- log tail ---\n{agent.log_tail()}"
            )
        time.sleep(0.05)


def agent_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    return sum_samples(samples, name, **labels)


def assert_upstream_holds_exactly(stack: Stack, run_id: str, pts: list[Point]) -> None:
    expected = expected_rows((p.key, p.value, p.step, p.timestamp) for p in pts)
    run = stack.client.get_run(run_id)
    assert sorted(run.data.metrics) == sorted(expected)
    for key, rows in expected.items():
        stored = metric_rows(stack.server.url, run_id, key)
        assert duplicate_rows(stored) == {}, key
        assert stored == rows, key


def check_transport(stack: Stack, transport: str, run_id: str, pts: list[Point], datagrams: list[bytes]) -> None:
    agent = stack.agent
    before = agent.metrics()
    base = agent_sum(before, RECEIVED, kind="metric", source=transport)
    errors_before = agent_sum(before, ERRORS)
    stack.send(transport, datagrams)
    after = wait_received(agent, transport, base + len(pts))
    assert agent_sum(after, ERRORS) == errors_before, after
    assert agent_sum(after, RECEIVED, kind="metric", source=transport) == base + len(pts)
    status = agent.wait_drained()
    assert status["totals"].get("dead_lettered", 0) == 0, status["dead_letters"]
    assert status["totals"].get("dropped", 0) == 0, status["totals"]
    assert_upstream_holds_exactly(stack, run_id, pts)


# -- the properties ---------------------------------------------------------------------------------------


@PROPERTY
@given(data=st.data())
def test_json_over_udp_arrives_upstream_exactly(stack: Stack, data: st.DataObject) -> None:
    run_id = stack.new_run()
    pts = data.draw(points(KEYS))
    check_transport(stack, "udp", run_id, pts, data.draw(json_datagrams(run_id, pts)))


@PROPERTY
@given(data=st.data())
def test_json_over_unix_socket_arrives_upstream_exactly(stack: Stack, data: st.DataObject) -> None:
    run_id = stack.new_run()
    pts = data.draw(points(KEYS))
    check_transport(stack, "uds", run_id, pts, data.draw(json_datagrams(run_id, pts)))


@PROPERTY
@given(data=st.data())
def test_dogstatsd_over_udp_arrives_upstream_exactly(stack: Stack, data: st.DataObject) -> None:
    run_id = stack.new_run()
    pts = data.draw(points(STATSD_KEYS))
    check_transport(stack, "udp", run_id, pts, data.draw(statsd_datagrams(run_id, pts)))


@PROPERTY
@given(data=st.data())
def test_the_plugin_sends_metrics_that_arrive_upstream_exactly(stack: Stack, data: st.DataObject) -> None:
    """The mlflow-agent:// store, as mlflow calls it (log_metric and metric-only log_batch)."""
    from mlflow.entities import Metric

    from agent.mlflow_plugin import AgentTrackingStore

    run_id = stack.new_run()
    pts = data.draw(points(KEYS))
    store = AgentTrackingStore(f"mlflow-agent://{LOOPBACK}:{stack.agent.port}?udp={LOOPBACK}:{stack.agent.udp_port}")
    before = agent_sum(stack.agent.metrics(), RECEIVED, kind="metric", source="udp")
    metrics = [Metric(p.key, p.value, p.timestamp, p.step) for p in pts]
    split = data.draw(st.integers(0, len(metrics)))
    for metric in metrics[:split]:
        store.log_metric(run_id, metric)
    store.log_batch(run_id, metrics[split:], [], [])
    assert store.datagram_stats()["records_dropped"] == 0
    wait_received(stack.agent, "udp", before + len(pts))
    stack.agent.wait_drained()
    assert_upstream_holds_exactly(stack, run_id, pts)


def test_infinities_are_stored_clamped_and_nan_as_nan(stack: Stack) -> None:
    """The comparison above relies on MLflow's SQL store clamping +/-inf: pin it with a fixed example."""
    run_id = stack.new_run()
    pts = [Point("edge", math.inf, 0, 1), Point("edge", -math.inf, 1, 1), Point("edge", math.nan, 2, 1),
           Point("edge", -0.0, 3, 1), Point("edge", 5e-324, 4, 1)]  # fmt: skip
    check_transport(stack, "uds", run_id, pts, [f"edge:{p.value!r}|g|#run_id:{run_id},step:{p.step},ts:1".encode()
                                                for p in pts])  # fmt: skip
    assert [r[1] for r in metric_rows(stack.server.url, run_id, "edge")] == [FLOAT_MAX, -FLOAT_MAX, "NaN", 0.0, 5e-324]


# -- overload --------------------------------------------------------------------------------------------


def softnet_drops() -> int:
    """Packets the kernel dropped before any socket saw them (per-CPU backlog full), all CPUs."""
    try:
        lines = Path("/proc/net/softnet_stat").read_text().split("\n")
    except OSError:
        return 0
    return sum(int(line.split()[1], 16) for line in lines if line.strip())


def blast(sock: socket.socket, address: tuple[str, int], run_id: str, first_step: int, n: int) -> int:
    """Send ``n`` single-metric JSON datagrams as fast as one thread can; return how many sendto() took."""
    payloads = [
        orjson.dumps({"run_id": run_id, "metrics": [{"key": "blast", "value": s * 0.5, "timestamp": 1_000_000 + s,
                                                     "step": s}]})
        for s in range(first_step, first_step + n)
    ]  # fmt: skip
    sent = 0
    for payload in payloads:
        try:
            sock.sendto(payload, address)
        except OSError:  # ENOBUFS / EAGAIN: not sent, so not owed
            continue
        sent += 1
    return sent


def test_accounting_is_truthful_under_sustained_udp_overload(
    mlflow_server: MlflowServer, agent_factory: AgentFactory, experiment_name: str
) -> None:
    agent = agent_factory(mlflow_server, *AGENT_ARGS, "--udp-rcvbuf", "4KiB")
    client = mlflow_server.client()
    run_id: str = client.create_run(client.create_experiment(experiment_name)).info.run_id
    address = (LOOPBACK, agent.udp_port)
    per_round, max_rounds = 20_000, 5
    softnet_before = softnet_drops()
    sent = attempted = 0
    started = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(max_rounds):
            sent += blast(sock, address, run_id, attempted, per_round)
            attempted += per_round
            if agent_sum(agent.metrics(), KERNEL_DROPS) > 0:
                break
    blast_seconds = time.monotonic() - started

    # Every datagram sent is read by the agent or counted as dropped by the kernel ...
    deadline = time.monotonic() + 30
    while True:
        samples = agent.metrics()
        read = agent_sum(samples, DATAGRAMS, transport="udp")
        kernel_drops = agent_sum(samples, KERNEL_DROPS)
        if read + kernel_drops >= sent or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    # ... and every datagram read becomes a durable point, a refusal or an error.
    deadline = time.monotonic() + 30
    while True:
        samples = agent.metrics()
        received = agent_sum(samples, RECEIVED, kind="metric", source="udp")
        refused = agent_sum(samples, REFUSED)
        invalid = agent_sum(samples, ERRORS)
        if received + refused + invalid >= read or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    status = agent.wait_drained(timeout=60)
    upstream = metric_rows(mlflow_server.url, run_id, "blast")
    softnet = softnet_drops() - softnet_before

    report = (
        f"attempted {attempted}, sent {sent} in {blast_seconds:.2f}s; agent read {read:.0f}, kernel drops "
        f"{kernel_drops:.0f}, received {received:.0f}, refused {refused:.0f}, invalid {invalid:.0f}; "
        f"upstream points {len(upstream)}; softnet backlog drops {softnet}; totals {status['totals']}"
    )
    print(report)
    assert kernel_drops > 0, f"no kernel drops: the overload did not happen ({report})"
    assert invalid == 0, report
    assert read + kernel_drops == sent, report
    assert len(upstream) + kernel_drops + refused + invalid == sent, report
    assert duplicate_rows(upstream) == {}, report
    steps = [row[2] for row in upstream]
    assert len(set(steps)) == len(steps) and all(0 <= s < attempted for s in steps), report
    assert all(row == ("blast", row[2] * 0.5, row[2], 1_000_000 + row[2]) for row in upstream), report
    assert status["totals"]["received"] == status["totals"]["uploaded"] == len(upstream), report
    assert status["totals"].get("dropped", 0) == 0 and status["totals"].get("dead_lettered", 0) == 0, report
