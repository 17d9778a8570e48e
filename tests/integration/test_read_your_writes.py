"""Read-your-writes: what the MLflow client reads back through the agent includes everything it logged,
whether it is still in the spool, upstream, or (just delivered, not yet acknowledged) both.

Real processes: an MLflow server (the session one), agent processes, the fault-injecting proxy between
them; the client under test is the real ``MlflowClient`` in this process, pointed at the agent, as in
test_azureml.py. Exact requests (the agent's 503, malformed queries) go out with ``requests``.

The shapes compared were taken from MLflow 3.17.2's server: ``metrics/get-history`` orders by
timestamp, step, value; NaN comes back as ``"NaN"`` and +/-Infinity as +/-1.7976931348623157e308 (its SQL
store clamps them); an unknown key answers ``{}``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pytest
import requests

from tests.conftest import AgentFactory, FaultyProxyFactory
from tests.integration.helpers import FLOAT_MAX, all_runs, match_client_runs
from tests.integration.helpers_faults import FAST_AGENT_FLAGS
from tests.support.agent_process import AgentProcess
from tests.support.faulty_proxy import FaultyProxy
from tests.support.mlflow_server import MlflowServer
from tests.support.ports import free_port
from tests.support.processes import wait_until
from tests.support.snapshot import is_user_tag

if TYPE_CHECKING:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration

API = "/api/2.0/mlflow/"
BASE_TS = 1_760_000_000_000
#: Seconds the proxy's 429 tells the uploader to wait (Retry-After is honoured as given): the window in
#: which the upstream answers reads while the spooled points are not uploaded yet.
HOLD = 6
#: An agent that cannot upload must not spend its default 20 s trying to drain at teardown.
OFFLINE_FLAGS = (*FAST_AGENT_FLAGS, "--drain-timeout", "0s")
Point = tuple[str, float, int, int]  # key, value, timestamp (ms), step
Row = tuple[float | str, int, int]  # value (NaN as "NaN"), timestamp, step


# -- what is logged -------------------------------------------------------------------------------------


def history(offset: int = 0, steps: int = 60) -> list[Point]:
    """``loss`` over ``steps`` steps plus the awkward points, ``acc`` whose latest value is NaN, ``tie``
    whose latest needs both tie-breaks, ``nan_tie`` whose latest is NaN over -1 (NaN compares as 0), and
    ``lo``/``hi`` whose latest are -inf and +inf, and ``val/loss 1`` (escaped in a query string).
    ``offset`` shifts timestamps and steps (a later phase)."""
    t, s = BASE_TS + offset * 100_000, offset
    points: list[Point] = [("loss", 1.0 / (i + 1), t + 10 * i, s + i) for i in range(steps)]
    points += [
        ("loss", 0.25, t - 500, s - 5),  # negative step, earliest timestamp: first in the history
        ("loss", 0.75, t + 5, s - 1),  # negative step between two others
        ("loss", 9.0, t + 101, s + 10),  # step 10 again, a later timestamp
        ("loss", math.nan, t + 10 * steps + 1, s + steps),
        ("loss", math.inf, t + 10 * steps + 2, s + steps + 1),
        ("loss", -math.inf, t + 10 * steps + 3, s + steps + 2),
        ("loss", 2.0, t + 10 * steps + 4, s + steps + 4),  # one timestamp, two steps: by step
        ("loss", 2.5, t + 10 * steps + 4, s + steps + 3),
        ("loss", 3.0, t + 10 * steps + 5, s + steps + 5),  # one timestamp and step, two values: by value
        ("loss", -3.0, t + 10 * steps + 5, s + steps + 5),
        ("acc", 0.5, t + 1, s + 1),
        ("acc", 0.6, t + 2, s + 2),
        ("acc", math.nan, t + 3, s + 3),
        ("tie", 1.0, t + 100, s + 5),
        ("tie", 0.5, t + 200, s + 5),
        ("tie", 0.7, t + 200, s + 5),
        ("tie", 9.0, t + 300, s + 4),
        ("nan_tie", -1.0, t + 100, s + 3),
        ("nan_tie", math.nan, t + 100, s + 3),
        ("lo", 5.0, t + 1, s),
        ("lo", -math.inf, t + 2, s + 1),
        ("hi", -5.0, t + 1, s),
        ("hi", math.inf, t + 1, s + 1),
        ("val/loss 1", 0.9, t + 7, s),  # a key that needs escaping in the query string
        ("val/loss 1", 0.8, t + 8, s + 1),
    ]
    return points


def log_points(client: MlflowClient, run_id: str, points: Sequence[Point], *,
               params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
    """Through both endpoints: every fourth of the first 200 points by ``log_metric``, the others by
    ``log_batch`` (at most 250 at a time; the params and tags go with the first batch)."""
    from mlflow.entities import Metric, Param, RunTag

    batch: list[Metric] = []
    first = True
    for i, (key, value, timestamp, step) in enumerate(points):
        if i % 4 == 3 and i < 200:
            client.log_metric(run_id, key, value, timestamp=timestamp, step=step)
            continue
        batch.append(Metric(key, value, timestamp, step))
        if len(batch) == (25 if i < 200 else 250) or i == len(points) - 1:
            extra: dict[str, Any] = {}
            if first:
                extra = {"params": [Param(k, v) for k, v in (params or {}).items()],
                         "tags": [RunTag(k, v) for k, v in (tags or {}).items()]}
                first = False
            client.log_batch(run_id, metrics=batch, **extra)
            batch = []


def shown(value: float | str, *, clamp: bool) -> float | str:
    """A value as compared here: NaN as "NaN"; with ``clamp``, +/-inf as the server stores them."""
    if isinstance(value, str):
        return value
    if math.isnan(value):
        return "NaN"
    if clamp and math.isinf(value):
        return math.copysign(FLOAT_MAX, value)
    return float(value)


def _sortable(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def expected_history(points: Iterable[Point], key: str, *, clamp: bool) -> list[Row]:
    """The history of ``key`` as MLflow answers it: each point once, by timestamp, step, value."""
    unique: dict[tuple[int, int, float | str], Point] = {}
    for p in points:
        if p[0] == key:
            stored = shown(p[1], clamp=True)
            unique.setdefault((p[2], p[3], stored), p)
    ordered = sorted(unique.values(), key=lambda p: (p[2], p[3], _sortable(p[1])))
    return [(shown(p[1], clamp=clamp), p[2], p[3]) for p in ordered]


def expected_latest(points: Iterable[Point]) -> dict[str, Row]:
    """Each key's latest point as MLflow picks it: highest step, then timestamp, then value (NaN as 0)."""
    latest: dict[str, Point] = {}
    for p in points:
        current = latest.get(p[0])
        if current is None or (p[3], p[2], _sortable(p[1])) > (current[3], current[2], _sortable(current[1])):
            latest[p[0]] = p
    return {k: (shown(p[1], clamp=False), p[2], p[3]) for k, p in latest.items()}


def rows(metrics: Iterable[Metric], *, clamp: bool) -> list[Row]:
    return [(shown(m.value, clamp=clamp), int(m.timestamp), int(m.step)) for m in metrics]


def read_history(client: MlflowClient, run_id: str, key: str, *, clamp: bool) -> list[Row]:
    return rows(client.get_metric_history(run_id, key), clamp=clamp)


def keys_of(points: Iterable[Point]) -> list[str]:
    return sorted({p[0] for p in points})


def get(url: str, endpoint: str, params: dict[str, str], prefix: str = API) -> requests.Response:
    return requests.get(f"{url}{prefix}{endpoint}", params=params, timeout=30)


def latest_rows(url: str, run_id: str, *, clamp: bool) -> dict[str, Row]:
    """runs/get's ``data.metrics`` (value, timestamp, step), read as JSON: the client keeps only values."""
    resp = get(url, "runs/get", {"run_id": run_id})
    assert resp.status_code == 200, resp.text
    return {m["key"]: (shown(float(m["value"]), clamp=clamp), int(m["timestamp"]), int(m["step"]))
            for m in resp.json()["run"]["data"].get("metrics", [])}


def user_tags(tags: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if is_user_tag(k)}


def buffered(agent: AgentProcess) -> int:
    value = agent.status()["buffered_records"]
    assert isinstance(value, int)
    return value


def log_batch_statuses(proxy: FaultyProxy) -> list[int | None]:
    """The status of each log-batch request through the proxy, in order."""
    return [e.get("status") for e in proxy.request_log() if str(e.get("path", "")).endswith("runs/log-batch")]


def offline_agent(agent_factory: AgentFactory, **kwargs: Any) -> AgentProcess:
    """An agent whose upstream is a closed port: an outage from the start."""
    return agent_factory(f"http://127.0.0.1:{free_port()}", *OFFLINE_FLAGS, **kwargs)


def client_of(url: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


# -- a. an outage from the start --------------------------------------------------------------------------


PARAMS = {"optimizer": "adam", "lr": "0.001", "layers": "4"}


def test_outage_from_the_start_reads_return_exactly_what_was_logged(
        agent_factory: AgentFactory, experiment_name: str) -> None:
    agent = offline_agent(agent_factory)
    client = client_of(agent.url)
    experiment_id = client.create_experiment(experiment_name)
    run_id = client.create_run(experiment_id, run_name="offline").info.run_id
    points = history()
    log_points(client, run_id, points, params=PARAMS, tags={"stage": "warmup", "team": "infra", "tmp": "x"})
    client.set_tag(run_id, "stage", "train")
    client.delete_tag(run_id, "tmp")

    status = agent.status()
    assert [(r["run_id"], r["provisional"]) for r in status["runs"]] == [(run_id, True)], status["runs"]
    assert status["upstream"]["up"] is False, status["upstream"]

    for key in keys_of(points):
        assert read_history(client, run_id, key, clamp=False) == expected_history(points, key, clamp=False), key
    assert len(read_history(client, run_id, "loss", clamp=False)) == 70
    assert read_history(client, run_id, "never-logged", clamp=False) == []
    # The UI's path answers the same.
    body = get(agent.url, "metrics/get-history", {"run_id": run_id, "metric_key": "loss"}).json()
    assert get(agent.url, "metrics/get-history", {"run_id": run_id, "metric_key": "loss"},
               prefix="/ajax-api/2.0/mlflow/").json() == body

    run = client.get_run(run_id)
    assert run.data.params == PARAMS
    assert user_tags(run.data.tags) == {"stage": "train", "team": "infra"}
    assert run.data.tags["mlflow.runName"] == "offline"
    latest = expected_latest(points)
    assert {k: shown(v, clamp=False) for k, v in run.data.metrics.items()} == {k: r[0] for k, r in latest.items()}
    assert latest_rows(agent.url, run_id, clamp=False) == latest
    assert agent.status()["totals"].get("uploaded", 0) == 0, "nothing can have gone upstream"


def test_points_logged_with_a_dataset_are_in_the_history(agent_factory: AgentFactory, experiment_name: str) -> None:
    agent = offline_agent(agent_factory)
    client = client_of(agent.url)
    run_id = client.create_run(client.create_experiment(experiment_name)).info.run_id
    client.log_metric(run_id, "val_loss", 0.5, timestamp=BASE_TS, step=0)
    client.log_metric(run_id, "val_loss", 0.4, timestamp=BASE_TS + 1, step=1, dataset_name="val",
                      dataset_digest="d1g35t")
    # The MLflow server keeps both in the history (it leaves the dataset out of get-history's answer).
    assert read_history(client, run_id, "val_loss", clamp=False) == [(0.5, BASE_TS, 0), (0.4, BASE_TS + 1, 1)]


def test_metrics_logged_through_the_plugin_are_read_back_at_once(
        agent_factory: AgentFactory, experiment_name: str) -> None:
    """``MLFLOW_TRACKING_URI=mlflow-agent://…``: log_metric goes as a datagram, reads over HTTP. A read
    right after the log must see it, as it would without the agent."""
    agent = offline_agent(agent_factory)
    client = client_of(f"mlflow-agent://127.0.0.1:{agent.port}?udp=127.0.0.1:{agent.udp_port}")
    run_id = client.create_run(client.create_experiment(experiment_name)).info.run_id
    seen: list[tuple[int, float | None]] = []
    for trial in range(10):
        key = f"loss{trial}"
        for step in range(20):
            client.log_metric(run_id, key, float(step), timestamp=BASE_TS + step, step=step)
        seen.append((len(client.get_metric_history(run_id, key)), client.get_run(run_id).data.metrics.get(key)))
    assert seen == [(20, 19.0)] * 10, seen


# -- b. the upstream answers, uploads are held back --------------------------------------------------------


def test_held_back_uploads_are_merged_and_then_match_the_server(
        mlflow_server: MlflowServer, faulty_proxy_factory: FaultyProxyFactory, agent_factory: AgentFactory,
        experiment_name: str) -> None:
    """Phase 1 is uploaded; phase 2 is held back by the proxy (429 with Retry-After on every request,
    then on none, while the uploader waits out the Retry-After). Some of phase 2 is also written to the
    server directly, as a delivered-but-unacknowledged batch would be. Reads through the agent then
    merge upstream and spool; while the upload finishes every read is the full history, each point
    once; and afterwards the agent answers as the server does."""
    from mlflow.entities import Metric

    proxy = faulty_proxy_factory(mlflow_server)
    agent = agent_factory(proxy, *FAST_AGENT_FLAGS, "--create-run-timeout", "10s")
    client, direct = client_of(agent.url), mlflow_server.client()
    run_id = client.create_run(client.create_experiment(experiment_name), run_name="held").info.run_id
    assert direct.get_run(run_id).info.run_name == "held", "the run was created upstream with the id the client got"

    phase1 = history(0)
    log_points(client, run_id, phase1, params={"p1": "1"}, tags={"stage": "one", "team": "infra"})
    agent.wait_drained(timeout=60)
    phase1_batches = log_batch_statuses(proxy).count(200)
    for key in keys_of(phase1):  # nothing spooled: forwarded, the server's answer as is
        assert read_history(client, run_id, key, clamp=False) == read_history(direct, run_id, key, clamp=False)

    proxy.set_faults(p_429=1.0, retry_after=HOLD)
    # Phase 2: more loss (a long history: the upload takes several requests), a key only in the spool.
    phase2 = [*history(1, steps=2500), ("lr", 0.1, BASE_TS + 1, 0), ("lr", 0.01, BASE_TS + 2, 1)]
    log_points(client, run_id, phase2, params={"p2": "2"}, tags={"stage": "two", "extra": "yes"})
    everything = phase1 + phase2
    # Delivered but not yet acknowledged: these points are upstream and in the spool.
    overlap = [p for p in phase2 if p[0] in ("loss", "lo", "hi") and (p[3] % 100 == 0 or not math.isfinite(p[1]))]
    assert any(math.isnan(p[1]) for p in overlap) and any(math.isinf(p[1]) for p in overlap)
    direct.log_batch(run_id, metrics=[Metric(*p) for p in overlap])
    direct.set_tag(run_id, "from_server", "1")  # only an upstream answer has it

    # The upstream does not answer: the run was created through the agent, which kept its delivered points,
    # so its whole history still reads (each point once), without the upstream.
    assert read_history(client, run_id, "loss", clamp=False) == expected_history(everything, "loss", clamp=False)
    # runs/get meanwhile comes from the agent's catalog, with everything logged.
    run = client.get_run(run_id)
    assert run.data.params == {"p1": "1", "p2": "2"}
    assert user_tags(run.data.tags) == {"stage": "two", "team": "infra", "extra": "yes"}
    assert latest_rows(agent.url, run_id, clamp=True) == {
        k: (shown(r[0], clamp=True), r[1], r[2]) for k, r in expected_latest(everything).items()}

    proxy.clear_faults()
    assert buffered(agent) > 0
    expected = {key: expected_history(everything, key, clamp=True) for key in keys_of(everything)}
    direct_loss = read_history(direct, run_id, "loss", clamp=True)
    assert len(direct_loss) < len(expected["loss"]), "phase 2 must not be upstream yet"

    # The merged answers while phase 2 waits in the spool: every key, each point once.
    for key in keys_of(everything):
        assert read_history(client, run_id, key, clamp=True) == expected[key], key
    merged_run = client.get_run(run_id)
    assert merged_run.data.params == {"p1": "1", "p2": "2"}
    assert user_tags(merged_run.data.tags) == {"stage": "two", "team": "infra", "extra": "yes", "from_server": "1"}
    latest = {k: (shown(r[0], clamp=True), r[1], r[2]) for k, r in expected_latest(everything).items()}
    assert latest_rows(agent.url, run_id, clamp=True) == latest
    assert log_batch_statuses(proxy).count(200) == phase1_batches, "uploaded during the merged reads; raise HOLD"
    assert buffered(agent) > 0

    # Then the uploader wakes: read on while it delivers; every answer is the whole history.
    reads = {"held": 0, "partly_uploaded": 0, "drained": 0}
    deadline = time.monotonic() + HOLD + 60
    while reads["drained"] < 3:
        assert time.monotonic() < deadline, f"not drained; reads so far {reads}: {agent.log_tail()}"
        pending, uploaded = buffered(agent), log_batch_statuses(proxy).count(200) - phase1_batches
        assert read_history(client, run_id, "loss", clamp=True) == expected["loss"], f"{reads}, {pending} buffered"
        assert latest_rows(agent.url, run_id, clamp=True) == latest
        reads["drained" if not pending else "partly_uploaded" if uploaded else "held"] += 1
    assert reads["held"] >= 1

    # Everything uploaded: the agent answers what the server answers, and that is what was logged.
    for key in keys_of(everything):
        through = get(agent.url, "metrics/get-history", {"run_id": run_id, "metric_key": key})
        assert through.status_code == 200
        assert through.json() == get(mlflow_server.url, "metrics/get-history",
                                     {"run_id": run_id, "metric_key": key}).json(), key
        assert read_history(client, run_id, key, clamp=True) == read_history(direct, run_id, key, clamp=True)
        assert read_history(direct, run_id, key, clamp=True) == expected[key], key
    via_agent, on_server = client.get_run(run_id).data, direct.get_run(run_id).data
    assert via_agent.params == on_server.params
    assert via_agent.tags == on_server.tags
    assert {k: shown(v, clamp=True) for k, v in via_agent.metrics.items()} == {
        k: shown(v, clamp=True) for k, v in on_server.metrics.items()}
    assert latest_rows(agent.url, run_id, clamp=True) == latest_rows(mlflow_server.url, run_id, clamp=True) == latest
    statuses = log_batch_statuses(proxy)
    assert 429 in statuses and statuses[-1] == 200, statuses
    print(f"reads while uploading: {reads}; log-batch statuses: {statuses}")


def test_a_provisional_run_reads_whole_while_it_is_created_and_uploaded(
        mlflow_server: MlflowServer, faulty_proxy_factory: FaultyProxyFactory, agent_factory: AgentFactory,
        experiment_name: str) -> None:
    """Logged during an outage (the proxy answers 503 to everything), read while the upstream comes back:
    the run is local only, then created upstream under another id with its points on their way, then
    all upstream. Every read in between is the whole history, each point once."""
    proxy = faulty_proxy_factory(mlflow_server, p_503=1.0)
    agent = agent_factory(proxy, *FAST_AGENT_FLAGS)
    client = client_of(agent.url)
    run_id = client.create_run(client.create_experiment(experiment_name), run_name="recovering").info.run_id
    points = history(0, steps=3000)
    log_points(client, run_id, points, params=PARAMS, tags={"stage": "train"})
    expected = expected_history(points, "loss", clamp=True)
    latest = {k: (shown(r[0], clamp=True), r[1], r[2]) for k, r in expected_latest(points).items()}
    assert read_history(client, run_id, "loss", clamp=True) == expected

    proxy.clear_faults()
    reads = {"local": 0, "merged": 0, "drained": 0}
    deadline = time.monotonic() + 60
    while reads["drained"] < 3:
        assert time.monotonic() < deadline, f"not drained; reads so far {reads}: {agent.log_tail()}"
        status = agent.status()
        mine = [r for r in status["runs"] if r["run_id"] == run_id]
        assert read_history(client, run_id, "loss", clamp=True) == expected, (reads, mine)
        assert latest_rows(agent.url, run_id, clamp=True) == latest, (reads, mine)
        if not status["buffered_records"]:
            reads["drained"] += 1
        else:
            reads["local" if mine and mine[0]["upstream_id"] is None else "merged"] += 1
    print(f"reads while recovering: {reads}")

    upstream_id = match_client_runs(all_runs(mlflow_server.url, experiment_name), {"r": run_id})["r"].info.run_id
    assert upstream_id != run_id
    direct = mlflow_server.client()
    for key in keys_of(points):
        assert read_history(direct, upstream_id, key, clamp=True) == expected_history(points, key, clamp=True), key
        assert read_history(client, run_id, key, clamp=True) == read_history(direct, upstream_id, key, clamp=True)
    assert client.get_run(run_id).data.params == direct.get_run(upstream_id).data.params == PARAMS


def test_history_of_a_run_known_upstream_waits_for_the_upstream(
        mlflow_server: MlflowServer, faulty_proxy_factory: FaultyProxyFactory, agent_factory: AgentFactory,
        experiment_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run created upstream by someone else, written to through the agent: the upstream holds part of its
    history and is gone (nothing listens), so get-history answers 503 TEMPORARILY_UNAVAILABLE, which the
    MLflow client retries; a read in flight when the upstream comes back gets the whole history. A run the
    agent created reads whole meanwhile: the agent kept what it delivered."""
    from concurrent.futures import ThreadPoolExecutor

    # The client retries sooner than by default (backoff factor 2; read at each call).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.1")

    proxy = faulty_proxy_factory(mlflow_server)
    agent = agent_factory(proxy, *FAST_AGENT_FLAGS, "--create-run-timeout", "10s")
    client = client_of(agent.url)
    experiment_id = client.create_experiment(experiment_name)
    run_id = mlflow_server.client().create_run(experiment_id).info.run_id  # not through the agent
    ours = client.create_run(experiment_id).info.run_id
    first, second = history(0, steps=20), history(1, steps=20)
    log_points(client, run_id, first)
    log_points(client, ours, first)
    agent.wait_drained(timeout=60)
    proxy.stop()
    log_points(client, run_id, second)
    log_points(client, ours, second)
    assert buffered(agent) > 0

    answer = get(agent.url, "metrics/get-history", {"run_id": run_id, "metric_key": "loss"})
    assert (answer.status_code, answer.json()["error_code"]) == (503, "TEMPORARILY_UNAVAILABLE"), answer.text
    assert read_history(client, ours, "loss", clamp=False) == expected_history(first + second, "loss", clamp=False)
    latest = {k: (shown(r[0], clamp=True), r[1], r[2]) for k, r in expected_latest(first + second).items()}
    assert latest_rows(agent.url, run_id, clamp=True) == latest  # runs/get: from the agent's catalog
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read_history, client, run_id, "loss", clamp=True)
        time.sleep(0.5)  # the client's first try gets the 503
        assert not reading.done()
        proxy.start()
        assert reading.result(timeout=60) == expected_history(first + second, "loss", clamp=True)
    agent.wait_drained(timeout=60)
    direct = mlflow_server.client()
    for key in keys_of(first + second):
        assert read_history(client, run_id, key, clamp=True) == read_history(direct, run_id, key, clamp=True), key


def test_a_deleted_tag_is_gone_while_its_deletion_waits(
        mlflow_server: MlflowServer, faulty_proxy_factory: FaultyProxyFactory, agent_factory: AgentFactory,
        experiment_name: str) -> None:
    proxy = faulty_proxy_factory(mlflow_server)
    # The deletion is never uploaded here: no drain at teardown.
    agent = agent_factory(proxy, *FAST_AGENT_FLAGS, "--create-run-timeout", "10s", "--drain-timeout", "0s")
    client, direct = client_of(agent.url), mlflow_server.client()
    run_id = client.create_run(client.create_experiment(experiment_name)).info.run_id
    client.set_tag(run_id, "tmp", "x")
    client.set_tag(run_id, "keep", "y")
    agent.wait_drained(timeout=60)
    proxy.set_faults(p_429=1.0, retry_after=HOLD)
    client.delete_tag(run_id, "tmp")
    # Only once the deletion was refused (and waits out its Retry-After) may the upstream answer reads.
    wait_until(lambda: agent.metric_sum("mlflow_agent_upstream_requests_total", endpoint="runs/delete-tag",
                                        result="429") > 0, 30, message="the deletion refused once")
    proxy.clear_faults()
    assert direct.get_run(run_id).data.tags.get("tmp") == "x", "the deletion must still be in the spool"
    tags = user_tags(client.get_run(run_id).data.tags)
    assert buffered(agent) > 0, "read after the deletion went up; raise HOLD"
    assert tags == {"keep": "y"}


# -- c. what the agent forwards ------------------------------------------------------------------------


@pytest.fixture
def direct_run(mlflow_server: MlflowServer, experiment_name: str) -> str:
    """A run created on the server directly (the agent has never heard of it), with a history."""
    from mlflow.entities import Metric

    direct = mlflow_server.client()
    run_id: str = direct.create_run(direct.create_experiment(experiment_name)).info.run_id
    direct.log_batch(run_id, metrics=[Metric(*p) for p in history(0, steps=30)])
    return run_id


def test_a_run_the_agent_does_not_know_is_forwarded(
        mlflow_server: MlflowServer, agent_factory: AgentFactory, direct_run: str) -> None:
    agent = agent_factory(mlflow_server, *FAST_AGENT_FLAGS)
    client, direct = client_of(agent.url), mlflow_server.client()
    for key in ("loss", "acc", "lo", "hi", "nan_tie", "absent"):
        assert read_history(client, direct_run, key, clamp=False) == read_history(direct, direct_run, key, clamp=False)
        query = {"run_id": direct_run, "metric_key": key}
        through, straight = get(agent.url, "metrics/get-history", query), get(mlflow_server.url, "metrics/get-history",
                                                                              query)
        assert (through.status_code, through.json()) == (straight.status_code, straight.json()), key
    paged = {"run_id": direct_run, "metric_key": "loss", "max_results": "7"}
    first = get(agent.url, "metrics/get-history", paged).json()
    assert first == get(mlflow_server.url, "metrics/get-history", paged).json()
    follow = {**paged, "page_token": first["next_page_token"]}
    assert get(agent.url, "metrics/get-history", follow).json() == get(
        mlflow_server.url, "metrics/get-history", follow).json()
    assert agent.status()["runs"] == [], "reading a run does not make the agent hold it"


MALFORMED: list[dict[str, str]] = [
    {"metric_key": "loss"},  # no run id
    {"run_id": "{run}"},  # no metric key
    {"run_id": "{run}", "metric_key": ""},
    {"run_id": "not-a-run-id", "metric_key": "loss"},
    {"run_id": "0" * 32, "metric_key": "loss"},
    {"run_id": "{run}", "metric_key": "loss", "page_token": "not base64"},
    {"run_id": "{run}", "metric_key": "loss", "max_results": "0"},
]


def _fill(query: dict[str, str], run_id: str) -> dict[str, str]:
    return {k: v.replace("{run}", run_id) for k, v in query.items()}


def _outcome(resp: requests.Response) -> tuple[int, Any]:
    body = resp.json()
    return resp.status_code, body.get("error_code") if resp.status_code != 200 else body


def test_malformed_history_requests_answer_as_mlflow_answers_them(
        mlflow_server: MlflowServer, agent_factory: AgentFactory, direct_run: str) -> None:
    agent = agent_factory(mlflow_server, *FAST_AGENT_FLAGS)
    for query in MALFORMED:
        q = _fill(query, direct_run)
        through, straight = get(agent.url, "metrics/get-history", q), get(mlflow_server.url, "metrics/get-history", q)
        assert _outcome(through) == _outcome(straight), q


@pytest.mark.parametrize("bad", [{"max_results": "0"}, {"max_results": "-1"}, {"page_token": "not base64"}],
                         ids=["zero", "negative", "token"])
def test_malformed_history_request_for_a_run_with_spooled_points_is_refused_as_mlflow_does(
        mlflow_server: MlflowServer, agent_factory: AgentFactory, direct_run: str, experiment_name: str,
        bad: dict[str, str]) -> None:
    straight = get(mlflow_server.url, "metrics/get-history", {"run_id": direct_run, "metric_key": "loss", **bad})
    assert _outcome(straight) == (400, "INVALID_PARAMETER_VALUE")
    agent = offline_agent(agent_factory)
    client = client_of(agent.url)
    run_id = client.create_run(client.create_experiment(experiment_name + "-offline")).info.run_id
    client.log_metric(run_id, "loss", 0.5, timestamp=BASE_TS, step=0)
    through = get(agent.url, "metrics/get-history", {"run_id": run_id, "metric_key": "loss", **bad})
    assert _outcome(through) == _outcome(straight)


# -- d. a restart on the spool, still offline ----------------------------------------------------------


def _crash_with_points_spooled(agent_factory: AgentFactory, experiment_name: str,
                               ) -> tuple[AgentProcess, str, list[Point]]:
    """An offline agent that took a provisional run and its points, SIGKILLed; then a new agent process
    on the same spool, still offline."""
    port = free_port()
    first = agent_factory(f"http://127.0.0.1:{port}", *OFFLINE_FLAGS)
    client = client_of(first.url)
    run_id = client.create_run(client.create_experiment(experiment_name), run_name="crashed").info.run_id
    points = history()
    log_points(client, run_id, points, params=PARAMS, tags={"stage": "train"})
    assert first.sigkill() == -9
    second = agent_factory(f"http://127.0.0.1:{port}", *OFFLINE_FLAGS, spool_dir=first.spool_dir)
    status = second.status()
    assert [(r["run_id"], r["provisional"]) for r in status["runs"]] == [(run_id, True)], status["runs"]
    assert status["buffered_records"] > 0 and status["upstream"]["up"] is False, status
    return second, run_id, points


def test_history_of_a_provisional_run_survives_sigkill(agent_factory: AgentFactory, experiment_name: str) -> None:
    agent, run_id, points = _crash_with_points_spooled(agent_factory, experiment_name)
    client = client_of(agent.url)
    for key in keys_of(points):
        assert read_history(client, run_id, key, clamp=False) == expected_history(points, key, clamp=False), key
    run = client.get_run(run_id)
    assert run.data.params == PARAMS
    assert user_tags(run.data.tags) == {"stage": "train"}


def test_latest_metrics_of_a_provisional_run_survive_sigkill(agent_factory: AgentFactory,
                                                            experiment_name: str) -> None:
    agent, run_id, points = _crash_with_points_spooled(agent_factory, experiment_name)
    assert latest_rows(agent.url, run_id, clamp=False) == expected_latest(points)
