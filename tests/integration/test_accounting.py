"""Loss accounting end to end (the metrics issue's acceptance test), with real processes only: an MLflow
server, the fault-injecting proxy in front of it, and the agent as a process with a 1 MiB spool.

The workload comes in over HTTP (the REST API, as the mlflow client sends it) and UDP (agent.client's
AgentClient) and has, on purpose:

* retried batches: the proxy answers 503 or resets the connection on a share of requests;
* a dead-lettered batch: datagrams for a run id the server does not know (the agent takes them, the
  server answers RESOURCE_DOES_NOT_EXIST, the uploader dead-letters the run's records);
* dropped records: a burst while every upstream request fails, into a spool too small for it, with the
  drop_oldest policy.

Once the upstream is healthy and everything settled, /metrics must parse with prometheus-client's own
parser, hold every documented family (the kernel-drops counter included: a UDP socket is open), and
satisfy ``received = uploaded + buffered + dead_lettered + dropped`` per kind, per source and in total;
the MLflow server must hold exactly the uploaded metric points and params; the latency and batch
histograms must have samples; /status must split the same totals by run, and ``python -m agent status``
must show them. Then the agent is stopped with a backlog (upstream failing, short drain) and started
again on the same spool: what it finds is counted as ``source="spool"``, and the identity holds for the
new lifetime.

A second test checks that points in a log-batch being retried are never evicted by drop_oldest (they
may already be upstream: counting them as dropped would be wrong); later rows are evicted instead.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from agent.client import AgentClient
from tests.conftest import AgentFactory, FaultyProxyFactory
from tests.integration.helpers_faults import FAST_AGENT_FLAGS
from tests.ops.test_metrics import FAMILIES, exposed_name
from tests.support.agent_process import AgentProcess
from tests.support.faulty_proxy import FaultyProxy
from tests.support.mlflow_server import MlflowServer
from tests.support.ports import LOOPBACK
from tests.support.processes import REPO_ROOT, python_env, wait_until

pytestmark = pytest.mark.integration

AGENT_ARGS = (*FAST_AGENT_FLAGS, "--spool-max-bytes", "1MiB", "--overflow-policy", "drop_oldest",
              "--drain-timeout", "1s")
KINDS = ("metric", "param", "tag", "run_op", "model_op")
LOSS = ("received", "uploaded", "dead_lettered", "dropped")
API = "/api/2.0/mlflow/"
SETTLE = 60.0  # generous: each wait returns as soon as its condition holds

# Metric keys of the burst: long, so that a few thousand points fill the 1 MiB spool.
BURST_KEYS = [f"burst/{'k' * 200}/{i}" for i in range(4)]
BURST_REQUESTS = 10
BURST_PER_REQUEST = 1000


# -- reading /metrics --------------------------------------------------------------------------------


class Scrape:
    """One GET /metrics, parsed by prometheus-client's parser, families by their exposed names."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families: dict[str, Metric] = {exposed_name(f): f for f in text_string_to_metric_families(text)}

    def samples(self, name: str, suffix: str = "") -> list[tuple[dict[str, str], float]]:
        family = self.families[name]
        sample_name = name + suffix
        return [(s.labels, s.value) for s in family.samples if s.name == sample_name]

    def total(self, name: str, suffix: str = "", **labels: str) -> float:
        return sum(v for lab, v in self.samples(name, suffix) if all(lab.get(k) == x for k, x in labels.items()))

    def loss(self, what: str) -> dict[tuple[str, str], float]:
        """(kind, source) -> value of ``mlflow_agent_records_<what>_total`` (summed over reasons)."""
        out: dict[tuple[str, str], float] = defaultdict(float)
        for labels, value in self.samples(f"mlflow_agent_records_{what}_total"):
            out[(labels["kind"], labels["source"])] += value
        return dict(out)

    def by_kind(self, what: str) -> dict[str, float]:
        out = dict.fromkeys(KINDS, 0.0)
        for (kind, _), value in self.loss(what).items():
            out[kind] += value
        return out

    def by_source(self, what: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for (_, source), value in self.loss(what).items():
            out[source] += value
        return dict(out)

    def buffered(self) -> dict[str, float]:
        return {labels["kind"]: value for labels, value in self.samples("mlflow_agent_buffered_records")}


def scrape(agent: AgentProcess) -> Scrape:
    return Scrape(agent.metrics_text())


def assert_conserved(m: Scrape, *, settled: bool) -> None:
    """received = uploaded + buffered + dead_lettered + dropped: per kind, in total, and per source
    (``buffered`` has no source label: per source only once nothing is buffered)."""
    received, uploaded, dead, dropped = (m.by_kind(w) for w in LOSS)
    buffered = m.buffered()
    for kind in KINDS:
        accounted = uploaded[kind] + buffered.get(kind, 0.0) + dead[kind] + dropped[kind]
        assert received[kind] == accounted, (kind, received, uploaded, buffered, dead, dropped)
    assert sum(received.values()) == sum(uploaded.values()) + sum(buffered.values()) + sum(dead.values()) \
        + sum(dropped.values())
    per_source = {w: m.by_source(w) for w in LOSS}
    sources = set().union(*per_source.values())
    outgoing = {s: sum(per_source[w].get(s, 0.0) for w in LOSS[1:]) for s in sources}
    if settled:
        assert sum(buffered.values()) == 0, buffered
        for source in sources:
            assert per_source["received"].get(source, 0.0) == outgoing[source], (source, per_source)
    else:
        assert sum(per_source["received"].values()) == sum(outgoing.values()) + sum(buffered.values())
        for source in sources:  # what left can never exceed what came in
            assert outgoing[source] <= per_source["received"].get(source, 0.0), (source, per_source)


def assert_every_family(m: Scrape) -> None:
    missing = set(FAMILIES) - set(m.families)
    assert not missing, f"families missing from /metrics: {sorted(missing)}"
    for name, (kind, labels) in FAMILIES.items():
        family = m.families[name]
        assert family.type == kind, name
        assert family.documentation, name
        structural = {"le"} if kind == "histogram" else set()
        for sample in family.samples:
            assert set(sample.labels) - structural == labels, (name, sample)
    # The kernel's drop counter of the open UDP socket: one sample, a count.
    (drops,) = m.samples("mlflow_agent_udp_kernel_drops_total")
    assert drops[1] >= 0


# -- the upstream, seen through its REST API ------------------------------------------------------------


def upstream_holdings(server: MlflowServer, experiment_id: str) -> tuple[int, int]:
    """(metric points, params) the MLflow server holds for the experiment's runs."""
    http = requests.Session()
    http.trust_env = False
    runs: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        body: dict[str, Any] = {"experiment_ids": [experiment_id], "max_results": 1000, "run_view_type": "ALL"}
        if token:
            body["page_token"] = token
        page = http.post(f"{server.url}{API}runs/search", json=body, timeout=30)
        page.raise_for_status()
        runs.extend(page.json().get("runs", []))
        token = page.json().get("next_page_token")
        if not token:
            break
    points = params = 0
    for run in runs:
        run_id = run["info"]["run_id"]
        params += len(run["data"].get("params", []))
        for metric in run["data"].get("metrics", []):
            token = None
            while True:
                query = {"run_id": run_id, "metric_key": metric["key"], **({"page_token": token} if token else {})}
                history = http.get(f"{server.url}{API}metrics/get-history", params=query, timeout=30)
                history.raise_for_status()
                points += len(history.json().get("metrics", []))
                token = history.json().get("next_page_token")
                if not token:
                    break
    http.close()
    return points, params


# -- the workload ---------------------------------------------------------------------------------------


class Workload:
    """Sends over HTTP and UDP and remembers how many records of each kind went by which way."""

    def __init__(self, agent: AgentProcess, experiment_id: str) -> None:
        self.agent = agent
        self.experiment_id = experiment_id
        self.http = requests.Session()
        self.http.trust_env = False
        self.sent: dict[tuple[str, str], int] = defaultdict(int)  # (kind, source) -> records
        self.step = 0

    def post(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = self.http.post(f"{self.agent.url}{API}{endpoint}", json=body, timeout=30)
        assert resp.status_code == 200, (endpoint, resp.status_code, resp.text)
        answer: dict[str, Any] = resp.json()
        return answer

    def create_run(self, name: str) -> str:
        run = self.post("runs/create", {"experiment_id": self.experiment_id, "run_name": name,
                                        "start_time": int(time.time() * 1000)})
        run_id: str = run["run"]["info"]["run_id"]
        return run_id

    def metrics(self, n: int, keys: list[str]) -> list[dict[str, Any]]:
        out = []
        now = int(time.time() * 1000)
        for i in range(n):
            self.step += 1  # unique (key, step, timestamp): the server keeps each point once
            out.append({"key": keys[i % len(keys)], "value": i * 0.5, "timestamp": now, "step": self.step})
        return out

    def http_batch(self, run_id: str, metrics: int, keys: list[str], params: int = 0, tags: int = 0) -> None:
        body: dict[str, Any] = {"run_id": run_id, "metrics": self.metrics(metrics, keys)}
        body["params"] = [{"key": f"p{self.step}-{i}", "value": str(i)} for i in range(params)]
        body["tags"] = [{"key": f"t{i}", "value": f"v{self.step}"} for i in range(tags)]
        self.post("runs/log-batch", body)
        self.sent[("metric", "http")] += metrics
        self.sent[("param", "http")] += params
        self.sent[("tag", "http")] += tags

    def finish(self, run_id: str) -> None:
        self.post("runs/update", {"run_id": run_id, "status": "FINISHED", "end_time": int(time.time() * 1000)})

    def udp(self, run_id: str, steps: int, params: int = 0) -> None:
        client = AgentClient(run_id, address=f"{LOOPBACK}:{self.agent.udp_port}")
        try:
            if params:
                client.log_params({f"u{self.step}-{i}": i for i in range(params)})
            for _ in range(steps):
                self.step += 1
                client.log_metrics({"udp/x": self.step * 0.25, "udp/y": -self.step}, step=self.step)
            assert client.records_dropped == 0, client.stats()
        finally:
            client.close()
        self.sent[("metric", "udp")] += 2 * steps
        self.sent[("param", "udp")] += params

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def experiment_id(mlflow_server: MlflowServer, experiment_name: str) -> Iterator[str]:
    resp = requests.post(f"{mlflow_server.url}{API}experiments/create", json={"name": experiment_name}, timeout=30)
    resp.raise_for_status()
    yield str(resp.json()["experiment_id"])


def wait_for(agent: AgentProcess, what: str, check: Callable[[Scrape], bool], timeout: float = SETTLE) -> Scrape:
    """Scrape until ``check`` holds; that scrape."""
    def probe() -> Scrape | None:
        m = scrape(agent)
        return m if check(m) else None

    result = wait_until(probe, timeout, interval=0.1, message=what, proc=agent.proc)
    assert result is not None
    return result


# -- the tests -----------------------------------------------------------------------------------------


def test_every_record_is_accounted_for(
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    faulty_proxy_factory: FaultyProxyFactory,
    experiment_id: str,
) -> None:
    proxy = faulty_proxy_factory(mlflow_server, seed=11)
    agent = agent_factory(proxy, *AGENT_ARGS)
    load = Workload(agent, experiment_id)
    try:
        lifetime_one = first_lifetime(agent, proxy, load, mlflow_server)
        second_lifetime(agent, proxy, load, mlflow_server, lifetime_one)
    finally:
        load.close()


def first_lifetime(agent: AgentProcess, proxy: FaultyProxy, load: Workload, server: MlflowServer) -> dict[str, float]:
    # A: ordinary traffic through a flaky upstream, and datagrams for a run the server does not know.
    # The runs are created while the upstream answers, so they have real ids (no create-run records).
    runs = {name: load.create_run(name) for name in ("http-a", "http-b", "udp-a")}
    proxy.set_faults(p_503=0.25, p_reset_before=0.1)
    for _ in range(3):
        load.http_batch(runs["http-a"], 150, ["loss", "acc"], params=2, tags=1)
        load.http_batch(runs["http-b"], 40, ["loss"], params=1)
    load.udp(runs["udp-a"], steps=60, params=3)
    stranger = uuid.uuid4().hex  # a well-formed run id the server has never seen
    load.udp(stranger, steps=5, params=1)
    # One log-batch certainly refused with a 503 (and so retried), whatever the random draws did.
    proxy.set_faults(p_503=1.0, p_reset_before=0.0)
    load.http_batch(runs["http-a"], 10, ["loss"])
    wait_for(agent, "a log-batch answered 503", lambda m: m.total(
        "mlflow_agent_upstream_requests_total", endpoint="runs/log-batch", result="503") > 0)
    proxy.set_faults(p_503=0.25, p_reset_before=0.1)
    for name in ("http-a", "http-b"):
        load.finish(runs[name])
    udp_sent = sum(n for (_, source), n in load.sent.items() if source == "udp")
    wait_for(agent, "every datagram stored", lambda m: m.by_source("received").get("udp") == udp_sent)
    wait_for(agent, "phase A settled (uploaded or dead-lettered)", lambda m: sum(m.buffered().values()) == 0)

    # B: the upstream fails every request; a burst into a provisional run overflows the 1 MiB spool.
    # (Its create-run barrier keeps the burst's metric rows out of any upload attempt, so every point
    # the agent drops is one the server never gets.)
    proxy.set_faults(p_503=1.0, p_reset_before=0.0)
    burst_run = load.create_run("burst")
    for _ in range(BURST_REQUESTS):
        load.http_batch(burst_run, BURST_PER_REQUEST, BURST_KEYS)
    during = scrape(agent)
    assert during.total("mlflow_agent_records_dropped_total", reason="spool_full") > 0
    assert during.total("mlflow_agent_buffered_bytes") <= 1024 * 1024
    assert during.total("mlflow_agent_oldest_buffered_record_age_seconds") > 0
    assert_conserved(during, settled=False)
    ready = agent.get("/readyz").json()
    assert set(ready["checks"]) == {"listening", "spool_writable", "spool_under_limit"}, ready
    assert ready["checks"]["listening"] and ready["checks"]["spool_writable"], ready
    assert ready["upstream"]["up"] is False and ready["upstream"]["last_error"], ready

    # C: healthy again; everything settles.
    proxy.clear_faults()
    load.finish(burst_run)
    # Every write above was answered 200, so it is counted as received already: wait for the uploads.
    m = wait_for(agent, "everything settled", lambda m: sum(m.buffered().values()) == 0)
    assert_every_family(m)
    assert_conserved(m, settled=True)

    received = m.loss("received")
    for (kind, source), n in load.sent.items():
        assert received[(kind, source)] == n, (kind, source, received)
    # Run operations: 3 runs/update, and the burst run's runs/create (the only provisional one).
    assert received[("run_op", "http")] == m.by_kind("received")["run_op"] == 4
    dead = m.by_source("dead_lettered")
    assert dead.get("udp") == 5 * 2 + 1, dead  # the stranger's points and param, nothing else
    assert m.by_source("dropped").get("http", 0) > 0
    assert m.total("mlflow_agent_records_dropped_total") == m.total(
        "mlflow_agent_records_dropped_total", reason="spool_full", kind="metric", source="http")
    assert m.total("mlflow_agent_upload_retries_total", reason="503") > 0
    assert proxy.counts()["http_503"] > 0

    # Histograms have samples.
    for source in ("http", "udp"):
        assert m.total("mlflow_agent_ingest_latency_seconds", "_count", source=source) > 0, source
    assert m.total("mlflow_agent_ingest_latency_seconds", "_count", source="uds") == 0
    assert m.total("mlflow_agent_upstream_request_duration_seconds", "_count", endpoint="runs/log-batch") > 0
    assert m.total("mlflow_agent_delivery_latency_seconds", "_count") > 0
    batches = m.total("mlflow_agent_upload_batch_records", "_count")
    assert batches > 0
    # Every acknowledged log-batch record is in exactly one observed batch (dead-lettered ones are in
    # none; no param is repeated here, so every record acknowledged was also sent).
    batched = m.total("mlflow_agent_upload_batch_records", "_sum")
    logged = sum(v for k, v in m.by_kind("uploaded").items() if k != "run_op")
    assert batched == logged, (batched, logged)
    assert m.total("mlflow_agent_oldest_buffered_record_age_seconds") == 0
    assert m.total("mlflow_agent_upstream_up") == 1

    # The server holds exactly what was counted as uploaded.
    uploaded = m.by_kind("uploaded")
    assert upstream_holdings(server, load.experiment_id) == (uploaded["metric"], uploaded["param"])

    # /status splits this lifetime's totals by run; `python -m agent status` shows them.
    status = agent.status()
    by_run = {run["run_id"]: run["records"] for run in status["runs"]}
    assert set(runs.values()) | {stranger, burst_run} <= set(by_run)
    for what in LOSS:
        assert sum(r[what] for r in by_run.values()) == status["totals"][what] == m.total(
            f"mlflow_agent_records_{what}_total"), what
    assert by_run[stranger] == {"received": 11, "uploaded": 0, "dead_lettered": 11, "dropped": 0, "buffered": 0}
    letters = status["dead_letters"]["recent"]
    assert {(d["run_id"], d["error_code"]) for d in letters} == {(stranger, "RESOURCE_DOES_NOT_EXIST")}, letters
    assert sum(d["records"] for d in letters) == status["dead_letters"]["total"] == 11
    assert by_run[burst_run]["dropped"] > 0
    assert status["oldest_buffered_age_seconds"] == 0 and status["runs_omitted"] == 0
    text = status_command(agent)
    http_a = by_run[runs["http-a"]]
    assert f"run {runs['http-a']}" in text
    line = next(ln for ln in text.splitlines() if f"run {runs['http-a']}" in ln)
    assert f"uploaded {http_a['uploaded']}, dead-lettered 0, dropped 0" in line, text
    line = next(ln for ln in text.splitlines() if f"run {stranger}" in ln)
    assert "dead-lettered 11" in line, text
    return {"uploaded_metrics": uploaded["metric"], "uploaded_params": uploaded["param"]}


def second_lifetime(agent: AgentProcess, proxy: FaultyProxy, load: Workload, server: MlflowServer,
                    before: dict[str, float]) -> None:
    # D: a backlog the upstream cannot take, then SIGTERM with a 1 s drain.
    proxy.set_faults(p_503=1.0)
    run_id = load.create_run("after-restart")  # provisional (upstream known down): a run_op kept too
    load.http_batch(run_id, 80, ["late"], params=2, tags=1)
    load.udp(run_id, steps=10)
    backlog_total = 1 + 80 + 2 + 1 + 20
    m = wait_for(agent, "the backlog stored", lambda m: sum(m.buffered().values()) == backlog_total)
    backlog = m.buffered()
    lifetime_one = {w: m.total(f"mlflow_agent_records_{w}_total") for w in LOSS}
    agent.sigterm()
    assert agent.wait(timeout=30) == 0

    agent.start()
    m = scrape(agent)
    # Found at start: counted as the spool's, by kind; nothing else yet.
    assert m.loss("received") == {**{k: 0.0 for k in m.loss("received")},
                                  **{(k, "spool"): v for k, v in backlog.items() if v}}
    assert m.buffered() == backlog
    assert m.total("mlflow_agent_oldest_buffered_record_age_seconds") > 0
    assert_conserved(m, settled=False)

    proxy.clear_faults()
    m = wait_for(agent, "the backlog uploaded", lambda m: sum(m.buffered().values()) == 0)
    assert_conserved(m, settled=True)
    assert_every_family(m)
    assert m.by_source("received") == m.by_source("uploaded") == {"http": 0, "udp": 0, "uds": 0,
                                                                 "spool": backlog_total}
    assert m.total("mlflow_agent_records_dead_lettered_total") == 0
    assert m.total("mlflow_agent_records_dropped_total") == 0
    assert m.total("mlflow_agent_delivery_latency_seconds", "_count") > 0
    uploaded = m.by_kind("uploaded")
    assert upstream_holdings(server, load.experiment_id) == (
        before["uploaded_metrics"] + uploaded["metric"], before["uploaded_params"] + uploaded["param"])
    assert lifetime_one["received"] == sum(
        lifetime_one[w] for w in LOSS[1:]) + backlog_total  # the first lifetime left exactly the backlog
    status = agent.status()
    assert status["totals"]["received"] == backlog_total
    assert {run["run_id"]: run["records"]["uploaded"] for run in status["runs"]} == {run_id: backlog_total}


def status_command(agent: AgentProcess) -> str:
    result = subprocess.run([sys.executable, "-m", "agent", "status", "--http", f"{LOOPBACK}:{agent.port}"],
                            capture_output=True, timeout=60, env=python_env(), cwd=REPO_ROOT, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def test_points_the_server_got_are_not_counted_as_dropped(
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    faulty_proxy_factory: FaultyProxyFactory,
    experiment_id: str,
) -> None:
    proxy = faulty_proxy_factory(mlflow_server)
    agent = agent_factory(proxy, *AGENT_ARGS)
    load = Workload(agent, experiment_id)
    try:
        run_id = load.create_run("in-flight")
        proxy.set_faults(p_503=1.0)
        load.http_batch(run_id, BURST_PER_REQUEST, BURST_KEYS)
        # That row is now in a log-batch the uploader retries; the next ones push it out of the spool.
        wait_for(agent, "a log-batch answered 503", lambda m: m.total(
            "mlflow_agent_upstream_requests_total", endpoint="runs/log-batch", result="503") > 0)
        for _ in range(5):
            load.http_batch(run_id, BURST_PER_REQUEST, BURST_KEYS)
        assert scrape(agent).total("mlflow_agent_records_dropped_total") > 0
        proxy.clear_faults()
        m = wait_for(agent, "everything settled", lambda m: sum(m.buffered().values()) == 0)
        assert_conserved(m, settled=True)  # the identity holds either way
        held, _ = upstream_holdings(mlflow_server, experiment_id)
        uploaded = m.by_kind("uploaded")["metric"]
        dropped = m.by_kind("dropped")["metric"]
        assert held == uploaded, (f"the server holds {held} points; the agent says uploaded {uploaded:.0f}, "
                                  f"dropped {dropped:.0f} (of {load.sent[('metric', 'http')]} received)")
    finally:
        load.close()
