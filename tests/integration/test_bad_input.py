"""Bad input, side by side: every request a real MLflow server refuses, the agent refuses the same way.

Each case sends one bad request, byte for byte the same, to (a) a real MLflow server directly and (b)
the agent in front of another real MLflow server, each against objects that exist on that side (a
live run, a deleted run, a deleted experiment, ...: made directly on server A, through the agent on
server B). The HTTP status and ``error_code`` must be equal, and the message too (with each side's
own run and experiment ids replaced by placeholders) unless the case documents a common prefix.

Cases where MLflow 3.17.2 crashes (500) or stores garbage are documented deviations of the agent
(see ``agent/validation.py``); they are not compared, only checked to be refused by the agent.

The last test proves the refusals left no trace: after every bad request and a few more valid
writes, server B's run holds exactly the valid data (the same as server A's run), no key or value of
any refused request reached server B, nothing was dead-lettered, and the agent counted exactly one
rejection per bad request.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from tests.integration.helpers import assert_accounting
from tests.support.agent_process import AgentProcess, sum_samples
from tests.support.mlflow_server import MlflowServer
from tests.support.snapshot import MetricRow, is_user_tag, metric_rows

pytestmark = pytest.mark.integration

API = "/api/2.0/mlflow/"
AGENT_ARGS = ("--upload-linger", "50ms", "--retry-max-backoff", "1s")
JSON = "application/json"
#: Every key, value or name a refused request carries contains this; none may ever reach server B.
MARK = "rej"
LONG_KEY = "rejk" + "k" * 247  # 251 characters
UNKNOWN_RUN = uuid.uuid4().hex  # a well-formed run id that exists on neither server

# The valid data, logged the same way on both sides, before and after the bad requests.
# fmt: off
BEFORE_BATCH = {
    "metrics": [
        {"key": "loss", "value": 0.5, "timestamp": 1000, "step": 0},
        {"key": "loss", "value": 0.4, "timestamp": 1001, "step": 1},
        {"key": "acc", "value": 0.9, "timestamp": 1000, "step": 0},
    ],
    "params": [{"key": "lr", "value": "0.01"}],
    "tags": [{"key": "present_tag", "value": "yes"}],
}
BEFORE_SINGLE: list[tuple[str, dict[str, Any]]] = [
    ("runs/log-metric", {"key": "loss", "value": 0.3, "timestamp": 1002, "step": 2}),
    ("runs/log-parameter", {"key": "fixed", "value": "v1"}),
    ("runs/set-tag", {"key": "team", "value": "ml"}),
]
AFTER_BATCH = {
    "metrics": [
        {"key": "acc", "value": 0.95, "timestamp": 1001, "step": 1},
        {"key": "lr_now", "value": 0.001, "timestamp": 1000, "step": 0},
    ],
    "params": [{"key": "batch_size", "value": "32"}],
    "tags": [{"key": "stage", "value": "after"}],
}
AFTER_SINGLE: list[tuple[str, dict[str, Any]]] = [
    ("runs/log-metric", {"key": "loss", "value": 0.2, "timestamp": 1003, "step": 3}),
    ("runs/log-parameter", {"key": "epochs", "value": "3"}),
    ("runs/set-tag", {"key": "owner", "value": "me"}),
]
EXPECTED_PARAMS = {"lr": "0.01", "fixed": "v1", "batch_size": "32", "epochs": "3"}
EXPECTED_TAGS = {"present_tag": "yes", "team": "ml", "stage": "after", "owner": "me"}
EXPECTED_METRICS: dict[str, list[MetricRow]] = {
    "loss": [("loss", 0.5, 0, 1000), ("loss", 0.4, 1, 1001), ("loss", 0.3, 2, 1002), ("loss", 0.2, 3, 1003)],
    "acc": [("acc", 0.9, 0, 1000), ("acc", 0.95, 1, 1001)],
    "lr_now": [("lr_now", 0.001, 0, 1000)],
}
# fmt: on


# ---------------------------------------------------------------------------------------------------
# The two sides


@dataclass
class Side:
    """One side of the comparison: where requests go and the objects that exist there."""

    label: str
    url: str
    http: requests.Session
    experiment_name: str = ""
    experiment_id: str = ""
    deleted_experiment_id: str = ""
    run_id: str = ""
    deleted_run_id: str = ""
    #: On server B this run was made and deleted behind the agent's back (the agent never saw it).
    foreign_deleted_run_id: str = ""

    def post(self, endpoint: str, body: Any, content_type: str | None = JSON) -> requests.Response:
        headers = {} if content_type is None else {"Content-Type": content_type}
        return self.http.post(self.url + API + endpoint, data=json.dumps(body).encode(), headers=headers,
                              timeout=60)

    def get(self, endpoint: str, query: dict[str, str]) -> requests.Response:
        return self.http.get(self.url + API + endpoint, params=query, timeout=60)

    def ok(self, endpoint: str, body: Any) -> dict[str, Any]:
        resp = self.post(endpoint, body)
        assert resp.status_code == 200, f"{self.label} {endpoint} {body}: {resp.status_code} {resp.text}"
        answer: dict[str, Any] = resp.json()
        return answer

    def placeholders(self) -> list[tuple[str, str]]:
        """This side's own ids, each with the placeholder that stands for it in compared messages."""
        return [
            (self.run_id, "<run>"),
            (self.deleted_run_id, "<deleted-run>"),
            (self.foreign_deleted_run_id, "<foreign-deleted-run>"),
            (self.experiment_name, "<experiment-name>"),
            (f"experiment {self.deleted_experiment_id} ", "experiment <deleted-experiment> "),
            (f"experiment {self.experiment_id} ", "experiment <experiment> "),
        ]


@dataclass
class Bench:
    server: Side  # server A, directly
    agent: Side  # the agent in front of server B
    server_b: MlflowServer
    agent_process: AgentProcess
    #: case id -> bad requests of that case sent to the agent so far
    sent_to_agent: dict[str, int] = field(default_factory=dict)

    def sent(self, case_id: str) -> None:
        self.sent_to_agent[case_id] = self.sent_to_agent.get(case_id, 0) + 1


def _prepare(side: Side, experiment_name: str) -> None:
    """The objects every case refers to, made through ``side`` (so through the agent on side B)."""
    side.experiment_name = experiment_name
    side.experiment_id = side.ok("experiments/create", {"name": experiment_name})["experiment_id"]
    side.deleted_experiment_id = side.ok("experiments/create", {"name": experiment_name + "-deleted"})[
        "experiment_id"
    ]
    side.ok("experiments/delete", {"experiment_id": side.deleted_experiment_id})
    run = side.ok("runs/create", {"experiment_id": side.experiment_id, "run_name": "main", "start_time": 1000})
    side.run_id = run["run"]["info"]["run_id"]
    doomed = side.ok("runs/create", {"experiment_id": side.experiment_id, "run_name": "doomed", "start_time": 1000})
    side.deleted_run_id = doomed["run"]["info"]["run_id"]
    side.ok("runs/delete", {"run_id": side.deleted_run_id})
    _log_valid(side, BEFORE_BATCH, BEFORE_SINGLE)


def _log_valid(side: Side, batch: dict[str, Any], singles: list[tuple[str, dict[str, Any]]]) -> None:
    side.ok("runs/log-batch", {"run_id": side.run_id, **batch})
    for endpoint, body in singles:
        side.ok(endpoint, {"run_id": side.run_id, **body})


def _direct_deleted_run(server: MlflowServer, experiment_id: str) -> str:
    """A run made and deleted directly on ``server``."""
    client = server.client()
    run_id = str(client.create_run(experiment_id, run_name="foreign-doomed").info.run_id)
    client.delete_run(run_id)
    return run_id


@pytest.fixture(scope="module")
def bench(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    """Server A (the session server), server B and an agent in front of B, with the same objects made on
    both sides. Module-scoped: one agent must see every bad request, so its counters can be checked."""
    base = tmp_path_factory.mktemp("bad-input")
    server_b = MlflowServer(base / "server-b")
    agent = AgentProcess(server_b, base / "agent" / "spool", AGENT_ARGS)
    sessions = [requests.Session(), requests.Session()]
    for session in sessions:
        session.trust_env = False
    try:
        server_b.start()
        agent.start()
        name = f"bad-input-{uuid.uuid4().hex[:8]}"
        server = Side("server A", mlflow_server.url, sessions[0])
        via_agent = Side("agent", agent.url, sessions[1])
        _prepare(server, name)
        _prepare(via_agent, name)
        # The premise: the agent answered with server B's own run ids, not provisional ones.
        for run_id, stage in [(via_agent.run_id, "active"), (via_agent.deleted_run_id, "deleted")]:
            resp = sessions[1].get(f"{server_b.url}{API}runs/get", params={"run_id": run_id}, timeout=60)
            assert resp.status_code == 200, f"run {run_id} is not on server B (provisional id?): {resp.text}"
            assert resp.json()["run"]["info"]["lifecycle_stage"] == stage, resp.text
        server.foreign_deleted_run_id = _direct_deleted_run(mlflow_server, server.experiment_id)
        via_agent.foreign_deleted_run_id = _direct_deleted_run(server_b, via_agent.experiment_id)
        yield Bench(server, via_agent, server_b, agent)
    finally:
        for session in sessions:
            session.close()
        try:
            agent.close()
        finally:
            server_b.stop()


# ---------------------------------------------------------------------------------------------------
# The cases


Body = Callable[[Side], Any]


@dataclass(frozen=True)
class Case:
    id: str
    endpoint: str
    body: Body | None = None  # POST body, sent as json.dumps(...)
    query: Callable[[Side], dict[str, str]] | None = None  # GET query instead of a body
    content_type: str | None = JSON
    #: None: messages must be equal; else both must start with this (documented) prefix.
    message_prefix: str | None = None


def _metric(key: str = "rej_metric", value: Any = 1.0, timestamp: Any = 1000, step: Any = 0) -> dict[str, Any]:
    return {"key": key, "value": value, "timestamp": timestamp, "step": step}


def _batch(s: Side, **containers: list[Any]) -> dict[str, Any]:
    return {"run_id": s.run_id, **containers}


def _metrics(n: int) -> list[dict[str, Any]]:
    return [_metric("rej_limit_metric", float(i), 1000 + i, i) for i in range(n)]


def _kv(prefix: str, n: int) -> list[dict[str, str]]:
    return [{"key": f"{prefix}_{i}", "value": f"{MARK}-value-{i}"} for i in range(n)]


# fmt: off
CASES: list[Case] = [
    # --- transport ---
    Case("content-type-missing", "runs/log-metric", lambda s: {"run_id": s.run_id, **_metric("rej_ct_missing")},
         content_type=None),
    Case("content-type-wrong", "runs/log-metric", lambda s: {"run_id": s.run_id, **_metric("rej_ct_wrong")},
         content_type="text/plain"),
    Case("content-type-upper-case", "runs/log-parameter",
         lambda s: {"run_id": s.run_id, "key": "rej_ct_upper", "value": "x"}, content_type="APPLICATION/JSON"),
    # --- run id ---
    Case("run-id-missing-log-metric", "runs/log-metric", lambda s: _metric("rej_no_run")),
    Case("run-id-missing-log-batch", "runs/log-batch", lambda s: {"metrics": [_metric("rej_no_run")]}),
    Case("run-id-format-log-batch", "runs/log-batch", lambda s: {"run_id": "bad id!",
                                                                 "metrics": [_metric("rej_bad_run")]}),
    Case("run-id-format-log-metric", "runs/log-metric", lambda s: {"run_id": "bad id!", **_metric("rej_bad_run")}),
    Case("run-id-format-log-parameter", "runs/log-parameter",
         lambda s: {"run_id": "bad id!", "key": "rej_bad_run", "value": "x"}),
    Case("run-id-format-set-tag", "runs/set-tag", lambda s: {"run_id": "bad id!", "key": "rej_bad_run", "value": "x"}),
    Case("run-id-format-delete-tag", "runs/delete-tag", lambda s: {"run_id": "bad id!", "key": "team"}),
    Case("run-id-format-update", "runs/update", lambda s: {"run_id": "bad id!", "status": "FINISHED"}),
    # --- keys ---
    Case("key-missing-log-metric", "runs/log-metric",
         lambda s: {"run_id": s.run_id, "value": 1.0, "timestamp": 1000}),
    Case("key-empty-set-tag", "runs/set-tag", lambda s: {"run_id": s.run_id, "key": "", "value": "rej"}),
    Case("key-missing-log-batch-param", "runs/log-batch", lambda s: _batch(s, params=[{"value": "rej"}])),
    Case("key-too-long-metric", "runs/log-metric", lambda s: {"run_id": s.run_id, **_metric(LONG_KEY)}),
    Case("key-too-long-param", "runs/log-parameter", lambda s: {"run_id": s.run_id, "key": LONG_KEY, "value": "x"}),
    Case("key-too-long-tag", "runs/set-tag", lambda s: {"run_id": s.run_id, "key": LONG_KEY, "value": "x"}),
    Case("key-too-long-log-batch-tag", "runs/log-batch",
         lambda s: _batch(s, tags=[{"key": LONG_KEY, "value": "x"}])),
    Case("key-bad-characters-log-metric", "runs/log-metric", lambda s: {"run_id": s.run_id, **_metric("rej#key")}),
    Case("key-bad-characters-log-batch-param", "runs/log-batch",
         lambda s: _batch(s, params=[{"key": "rej key!", "value": "x"}])),
    Case("key-path-double-slash-log-metric", "runs/log-metric", lambda s: {"run_id": s.run_id, **_metric("rej//b")}),
    Case("key-path-dot-slash-log-parameter", "runs/log-parameter",
         lambda s: {"run_id": s.run_id, "key": "./rej", "value": "x"}),
    Case("key-path-dot-dot-set-tag", "runs/set-tag", lambda s: {"run_id": s.run_id, "key": "../rej", "value": "x"}),
    Case("key-path-leading-slash-log-batch-metric", "runs/log-batch",
         lambda s: _batch(s, metrics=[_metric("/rej")])),
    Case("key-path-trailing-slash-log-batch-param", "runs/log-batch",
         lambda s: _batch(s, params=[{"key": "rej/", "value": "x"}])),
    # --- metric values, timestamps, steps ---
    Case("metric-value-not-a-number-log-metric", "runs/log-metric",
         lambda s: {"run_id": s.run_id, **_metric(value="rej-abc")}),
    Case("metric-value-missing-log-metric", "runs/log-metric",
         lambda s: {"run_id": s.run_id, "key": "rej_no_value", "timestamp": 1000}),
    Case("metric-value-missing-log-batch", "runs/log-batch",
         lambda s: _batch(s, metrics=[{"key": "rej_no_value", "timestamp": 1000}])),
    Case("timestamp-missing-log-metric", "runs/log-metric",
         lambda s: {"run_id": s.run_id, "key": "rej_no_ts", "value": 1.0}),
    Case("timestamp-missing-log-batch", "runs/log-batch",
         lambda s: _batch(s, metrics=[{"key": "rej_no_ts", "value": 1.0}])),
    Case("timestamp-negative-log-metric", "runs/log-metric",
         lambda s: {"run_id": s.run_id, **_metric("rej_neg_ts", timestamp=-5)}),
    Case("timestamp-negative-log-batch", "runs/log-batch",
         lambda s: _batch(s, metrics=[_metric("rej_neg_ts", timestamp=-5)])),
    Case("timestamp-not-an-int-log-metric", "runs/log-metric",
         lambda s: {"run_id": s.run_id, **_metric("rej_bad_ts", timestamp="abc")}),
    Case("step-not-an-int-log-metric", "runs/log-metric",
         lambda s: {"run_id": s.run_id, **_metric("rej_bad_step", step="abc")}),
    # --- batch limits and duplicates ---
    Case("too-many-metrics", "runs/log-batch", lambda s: _batch(s, metrics=_metrics(1001))),
    Case("too-many-params", "runs/log-batch", lambda s: _batch(s, params=_kv("rej_param", 101))),
    Case("too-many-tags", "runs/log-batch", lambda s: _batch(s, tags=_kv("rej_tag", 101))),
    Case("too-many-entities", "runs/log-batch",
         lambda s: _batch(s, metrics=_metrics(900), params=_kv("rej_param", 100), tags=_kv("rej_tag", 1))),
    Case("duplicate-param-keys", "runs/log-batch",
         lambda s: _batch(s, params=[{"key": "rej_dup", "value": "a"}, {"key": "rej_ok", "value": "b"},
                                     {"key": "rej_dup", "value": "c"}])),
    # --- value types ---
    Case("param-value-not-a-string", "runs/log-parameter",
         lambda s: {"run_id": s.run_id, "key": "rej_int_param", "value": 5}),
    Case("tag-value-not-a-string", "runs/set-tag", lambda s: {"run_id": s.run_id, "key": "rej_int_tag", "value": 5}),
    # --- stateful: what is already there ---
    Case("changed-param-value-log-parameter", "runs/log-parameter",
         lambda s: {"run_id": s.run_id, "key": "fixed", "value": "rej-changed"}),
    Case("changed-param-value-log-batch", "runs/log-batch",
         lambda s: _batch(s, params=[{"key": "rej_new_in_batch", "value": "x"},
                                     {"key": "fixed", "value": "rej-changed"}])),
    Case("deleted-run-log-metric", "runs/log-metric",
         lambda s: {"run_id": s.deleted_run_id, **_metric("rej_deleted")}),
    Case("deleted-run-log-batch", "runs/log-batch",
         lambda s: {"run_id": s.deleted_run_id, "params": [{"key": "rej_deleted", "value": "x"}]}),
    Case("deleted-run-set-tag", "runs/set-tag",
         lambda s: {"run_id": s.deleted_run_id, "key": "rej_deleted", "value": "x"}),
    Case("deleted-run-update", "runs/update",
         lambda s: {"run_id": s.deleted_run_id, "status": "FINISHED", "run_name": "rej-renamed"}),
    Case("deleted-run-delete-tag", "runs/delete-tag", lambda s: {"run_id": s.deleted_run_id, "key": "mlflow.runName"}),
    Case("deleted-run-unknown-to-agent-log-metric", "runs/log-metric",
         lambda s: {"run_id": s.foreign_deleted_run_id, **_metric("rej_deleted")}),
    Case("delete-tag-not-set", "runs/delete-tag", lambda s: {"run_id": s.run_id, "key": "rej_never_set"}),
    # --- experiments ---
    # The rest of the server's message is an SQL error with the creation time in it.
    Case("experiment-create-duplicate-name", "experiments/create", lambda s: {"name": s.experiment_name},
         message_prefix="Experiment(name=<experiment-name>) already exists."),
    Case("experiment-create-empty-name", "experiments/create", lambda s: {"name": ""}),
    Case("experiment-create-name-too-long", "experiments/create", lambda s: {"name": MARK + "n" * 498}),
    Case("experiment-get-by-name-missing-parameter", "experiments/get-by-name", query=lambda s: {}),
    Case("experiment-get-by-name-unknown", "experiments/get-by-name",
         query=lambda s: {"experiment_name": f"{MARK}-no-such-experiment-{UNKNOWN_RUN}"}),
    # --- runs ---
    Case("run-get-unknown-id", "runs/get", query=lambda s: {"run_id": UNKNOWN_RUN}),
    Case("run-create-name-conflicts-with-tag", "runs/create",
         lambda s: {"experiment_id": s.experiment_id, "run_name": "rej-a",
                    "tags": [{"key": "mlflow.runName", "value": "rej-b"}]}),
    Case("run-create-in-deleted-experiment", "runs/create",
         lambda s: {"experiment_id": s.deleted_experiment_id, "run_name": "rej-in-deleted-experiment"}),
    # --- logged models, a run's inputs and outputs ---
    Case("model-create-no-experiment", "logged-models", lambda s: {"name": "rej-model"}),
    Case("model-create-experiment-a-number", "logged-models", lambda s: {"experiment_id": 1, "name": "rej-m"}),
    Case("model-create-experiment-id-format", "logged-models", lambda s: {"experiment_id": "rej id", "name": "rej-m"}),
    Case("model-create-name-with-slash", "logged-models", lambda s: {"experiment_id": s.experiment_id,
                                                                      "name": "rej/model"}),
    Case("model-create-tags-not-a-list", "logged-models", lambda s: {"experiment_id": s.experiment_id,
                                                                      "name": "rej-m", "tags": "rej"}),
    Case("outputs-without-models", "runs/outputs", lambda s: {"run_id": s.run_id}),
    Case("outputs-of-an-unknown-run", "runs/outputs",
         lambda s: {"run_id": UNKNOWN_RUN, "models": [{"model_id": "m-" + "0" * 32, "step": 0}]}),
    Case("inputs-without-run-id", "runs/log-inputs", lambda s: {"datasets": []}),
    Case("inputs-to-a-deleted-run", "runs/log-inputs", lambda s: {"run_id": s.deleted_run_id, "datasets": []}),
]
# fmt: on

#: Bad requests MLflow 3.17.2 answers with a 500 or by storing garbage: only the agent is asked. Observed on
#: the real server: ``metrics: [5]`` crashes it (500, an HTML page); a bool value is stored as 1.0; in
#: log-batch a metric field it cannot parse is silently left at its default, so a value [1] or "abc" is
#: stored as 0.0 (with timestamp 0), a timestamp "12.5" as 0 and a step 1.5 as 0, each with a 200.
# fmt: off
DEVIATIONS: list[Case] = [
    Case("metrics-not-objects", "runs/log-batch", lambda s: _batch(s, metrics=[5])),
    Case("metric-value-bool-log-metric", "runs/log-metric", lambda s: {"run_id": s.run_id, **_metric(value=True)}),
    Case("metric-value-list-log-batch", "runs/log-batch", lambda s: _batch(s, metrics=[_metric(value=[1])])),
    Case("metric-value-not-a-number-log-batch", "runs/log-batch",
         lambda s: _batch(s, metrics=[_metric("rej_bad_value", value="rej-abc")])),
    Case("timestamp-not-an-int-log-batch", "runs/log-batch",
         lambda s: _batch(s, metrics=[_metric("rej_bad_ts", timestamp="12.5")])),
    Case("step-not-an-int-log-batch", "runs/log-batch",
         lambda s: _batch(s, metrics=[_metric("rej_bad_step", step=1.5)])),
    # The server stores a dataset without a digest (or source) as "": MLflow's own client refuses it.
    Case("dataset-without-digest", "runs/log-inputs",
         lambda s: {"run_id": s.run_id, "datasets": [{"dataset": {"name": "rej-data", "source_type": "code",
                                                                  "source": "{}"}}]}),
    # A model tag without a key is stored with key "".
    Case("model-create-tag-without-key", "logged-models",
         lambda s: {"experiment_id": s.experiment_id, "name": "rej-m", "tags": [{"value": "rej"}]}),
]
# fmt: on


# ---------------------------------------------------------------------------------------------------
# Sending and comparing


def _send(side: Side, case: Case) -> requests.Response:
    if case.query is not None:
        return side.get(case.endpoint, case.query(side))
    assert case.body is not None, case.id
    return side.post(case.endpoint, case.body(side), case.content_type)


def _send_to_agent(bench: Bench, case: Case) -> requests.Response:
    bench.sent(case.id)
    return _send(bench.agent, case)


@dataclass(frozen=True)
class Answer:
    status: int
    error_code: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.status} {self.error_code}: {self.message[:300]}"


def _answer(side: Side, resp: requests.Response) -> Answer:
    """Status, error_code and message, the side's own ids replaced by placeholders."""
    try:
        payload = resp.json()
    except ValueError:
        return Answer(resp.status_code, None, resp.text[:500])
    if not isinstance(payload, dict):
        return Answer(resp.status_code, None, resp.text[:500])
    message = str(payload.get("message", ""))
    for value, placeholder in side.placeholders():
        if value.strip():
            message = message.replace(value, placeholder)
    return Answer(resp.status_code, payload.get("error_code"), message)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_agent_refuses_like_the_server(bench: Bench, case: Case) -> None:
    server = _answer(bench.server, _send(bench.server, case))
    agent = _answer(bench.agent, _send_to_agent(bench, case))
    report = f"{case.id}\n  server A: {server}\n  agent:    {agent}"

    # The premise: the real server refuses this request cleanly.
    assert 400 <= server.status < 500 and server.error_code, report
    assert (agent.status, agent.error_code) == (server.status, server.error_code), report
    if case.message_prefix is None:
        assert agent.message == server.message, report
    else:
        assert server.message.startswith(case.message_prefix), report
        assert agent.message.startswith(case.message_prefix), report


@pytest.mark.parametrize("case", DEVIATIONS, ids=[c.id for c in DEVIATIONS])
def test_agent_refuses_what_the_server_mishandles(bench: Bench, case: Case) -> None:
    agent = _answer(bench.agent, _send_to_agent(bench, case))
    assert (agent.status, agent.error_code) == (400, "INVALID_PARAMETER_VALUE"), f"{case.id}: {agent}"


# ---------------------------------------------------------------------------------------------------
# Nothing of it was kept


def _run_data(server: MlflowServer, run_id: str) -> tuple[dict[str, str], dict[str, str], dict[str, list[MetricRow]]]:
    """Params, user tags and full metric histories of one run, read directly from ``server``."""
    run = server.client().get_run(run_id)
    tags = {k: v for k, v in run.data.tags.items() if is_user_tag(k)}
    histories = {key: metric_rows(server.url, run_id, key) for key in sorted(run.data.metrics)}
    return dict(run.data.params), tags, histories


def _marked(server: MlflowServer, run_id: str) -> list[str]:
    """Keys and values of a run on ``server`` that carry the mark of a refused request."""
    data = server.client().get_run(run_id).data
    texts = [*data.params, *data.params.values(), *data.tags, *data.tags.values(), *data.metrics]
    return sorted(t for t in texts if MARK in t)


def test_refused_requests_left_no_trace(bench: Bench, mlflow_server: MlflowServer) -> None:
    # Self-contained when run alone: every bad request reaches the agent at least once (whether it was
    # refused is judged below, by what reached server B and by the agent's rejection counter).
    for case in [*CASES, *DEVIATIONS]:
        if case.id not in bench.sent_to_agent:
            _send_to_agent(bench, case)

    for side in (bench.server, bench.agent):
        _log_valid(side, AFTER_BATCH, AFTER_SINGLE)
    status = bench.agent_process.wait_drained(timeout=60)
    samples = bench.agent_process.metrics()

    from mlflow.entities import ViewType

    client_b = bench.server_b.client()
    b = bench.agent
    name = b.experiment_name
    run_b = _run_data(bench.server_b, b.run_id)
    observed = {
        "run on B: params": run_b[0],
        "run on B: user tags": run_b[1],
        "run on B: metric histories": run_b[2],
        # Server A got the very same valid and bad requests directly (the deviations excepted).
        "run on B equals run on A": run_b == _run_data(mlflow_server, bench.server.run_id),
        "marked keys/values on B": {label: _marked(bench.server_b, run_id) for label, run_id in
                                    [("run", b.run_id), ("deleted run", b.deleted_run_id),
                                     ("foreign deleted run", b.foreign_deleted_run_id)]},
        "deleted runs on B: data": [_run_data(bench.server_b, b.deleted_run_id),
                                    _run_data(bench.server_b, b.foreign_deleted_run_id)],
        "experiments on B": sorted(e.name for e in client_b.search_experiments(view_type=ViewType.ALL)),
        "runs on B": sorted(r.info.run_name for r in client_b.search_runs(
            [b.experiment_id, b.deleted_experiment_id], run_view_type=ViewType.ALL)),
        "dead-lettered": sum_samples(samples, "mlflow_agent_records_dead_lettered_total"),
        "rejected": sum_samples(samples, "mlflow_agent_requests_rejected_total"),
    }
    expected = {
        "run on B: params": EXPECTED_PARAMS,
        "run on B: user tags": EXPECTED_TAGS,
        "run on B: metric histories": EXPECTED_METRICS,
        "run on B equals run on A": True,
        "marked keys/values on B": {"run": [], "deleted run": [], "foreign deleted run": []},
        "deleted runs on B: data": [({}, {}, {}), ({}, {}, {})],
        "experiments on B": sorted(["Default", name, name + "-deleted"]),
        "runs on B": ["doomed", "foreign-doomed", "main"],
        "dead-lettered": 0,
        # One rejection per bad request the agent was sent.
        "rejected": sum(bench.sent_to_agent.values()),
    }
    assert observed == expected, (f"bad requests sent to the agent: {bench.sent_to_agent}\n"
                                  f"dead letters: {bench.agent_process.status().get('dead_letters')}")
    assert_accounting(status)
