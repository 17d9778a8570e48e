"""Artifacts through the agent: logged during an outage and after it, served back while the upstream is
down, delivered byte-identical after recovery, across kill -9, in bounded memory, within a budget, and
never written outside the spool whatever the path says.

Real processes: MLflow servers, agent processes; the client under test is the real ``MlflowClient`` in
this process, pointed at the agent. Raw requests (path escapes) go out through ``http.client`` so that
no client library normalises the path before the agent sees it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
import requests

from tests.conftest import AgentFactory, FaultyProxyFactory, MlflowServerFactory
from tests.integration.helpers import PROVISIONAL_TAG, all_runs, match_client_runs
from tests.integration.helpers_faults import FAST_AGENT_FLAGS, run_cli
from tests.support.agent_process import AgentProcess
from tests.support.mlflow_server import MlflowServer
from tests.support.ports import LOOPBACK, free_port
from tests.support.processes import wait_until

if TYPE_CHECKING:
    from mlflow.entities import FileInfo
    from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration

MiB = 1 << 20
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
#: An agent that cannot upload must not spend its default 20 s trying to drain at teardown.
OFFLINE_FLAGS = (*FAST_AGENT_FLAGS, "--drain-timeout", "0s")
BIG_SIZE = 200 * MiB
UPLOAD_RATE = 80e6  # bytes/s towards the upstream in the large-artifact test
Listing = list[tuple[str, bool, int | None]]


# -- helpers ----------------------------------------------------------------------------------------------


def client_for(url: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    """``relative posix path -> sha256`` of every file under ``root``."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def listing(client: MlflowClient, run_id: str, path: str | None = None) -> Listing:
    """Every entry under ``path``, recursively, as (path, is_dir, file_size), through the run's
    mlflow-artifacts repository (what ``download_artifacts`` walks). ``MlflowClient.list_artifacts`` with a
    path also searches logged models (``logged-models/search``): see
    test_client_list_artifacts_with_a_path_during_an_outage."""
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    repo = MlflowArtifactsRepository(client.get_run(run_id).info.artifact_uri, tracking_uri=client.tracking_uri)
    list_artifacts = cast("Callable[[str | None], list[FileInfo]]", repo.list_artifacts)

    def walk(where: str | None) -> Listing:
        out: Listing = []
        for info in list_artifacts(where):
            out.append((info.path, info.is_dir, None if info.is_dir else info.file_size))
            if info.is_dir:
                out.extend(walk(info.path))
        return out

    return walk(path)


def download_digests(client: MlflowClient, run_id: str, dst: Path, path: str = "") -> dict[str, str]:
    dst.mkdir(parents=True)
    local = Path(client.download_artifacts(run_id, path, str(dst)))
    return tree_digests(local) if local.is_dir() else {local.name: sha256_file(local)}


def artifacts_status(agent: AgentProcess) -> dict[str, Any]:
    status: dict[str, Any] = agent.status()["artifacts"]
    return status


def wait_artifacts_uploaded(agent: AgentProcess, timeout: float) -> dict[str, Any]:
    def done() -> dict[str, Any]:
        status = agent.status()
        return status if status["artifacts"]["waiting"] == 0 and status["buffered_records"] == 0 else {}

    return wait_until(done, timeout, interval=0.2, message="artifacts uploaded", proc=agent.proc)


def artifact_root(client: MlflowClient, run_id: str) -> str:
    """``<experiment>/<run>/artifacts``: the run's place under the mlflow-artifacts API."""
    uri: str = client.get_run(run_id).info.artifact_uri
    assert uri.startswith("mlflow-artifacts:/"), uri
    return uri.removeprefix("mlflow-artifacts:").strip("/")


def raw_get(base_url: str, path: str) -> requests.Response:
    return requests.get(f"{base_url}{ARTIFACTS_API}/{path}", timeout=10)


def metric(agent: AgentProcess, name: str, **labels: str) -> float:
    return agent.metric_sum(name, **labels)


def write_random(path: Path, size: int, seed: int) -> str:
    """A file of ``size`` pseudo-random bytes (cheap to make: a hash chain), its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = hashlib.sha512(str(seed).encode()).digest() * (MiB // 64)
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        written = 0
        counter = 0
        while written < size:
            counter += 1
            piece = (counter.to_bytes(8, "little") + block)[: min(MiB, size - written)]
            handle.write(piece)
            digest.update(piece)
            written += len(piece)
    return digest.hexdigest()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@contextmanager
def rss_peak(pid: int, interval: float = 0.01) -> Iterator[dict[str, int]]:
    """Sample the RSS of ``pid`` in a thread; ``out["peak"]`` (KiB) when the block ends."""
    out = {"start": rss_kib(pid), "peak": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                out["peak"] = max(out["peak"], rss_kib(pid))
            except (OSError, AssertionError):
                return
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join(5)


class SlowRelay:
    """A TCP relay on a free loopback port that passes client->target bytes at ``rate`` bytes/s (the
    answers unthrottled): an upstream whose uploads take long enough to be interrupted. Threads in
    this process; ``close()`` stops it and every connection."""

    def __init__(self, target_port: int, rate: float) -> None:
        self.target_port = target_port
        self.rate = rate
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port: int = self.listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self.sent = 0  # bytes passed client -> target so far
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, throttle: bool) -> None:
        try:
            while not self._closed.is_set():
                data = source.recv(64 * 1024)
                if not data:
                    break
                sink.sendall(data)
                if throttle:
                    self.sent += len(data)
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.fixture
def slow_relay() -> Iterator[Callable[[int, float], SlowRelay]]:
    relays: list[SlowRelay] = []

    def make(target_port: int, rate: float) -> SlowRelay:
        relay = SlowRelay(target_port, rate)
        relays.append(relay)
        return relay

    try:
        yield make
    finally:
        for relay in relays:
            relay.close()


def spool_artifact_files(spool: Path) -> list[str]:
    base = spool / "artifacts"
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()) if base.exists() else []


# -- a. outage, recovery, read-your-writes, equivalence with a direct upload -----------------------------


def make_tree(root: Path) -> None:
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "empty.bin").write_bytes(b"")
    (root / "sub" / "b.bin").write_bytes(os.urandom(150_000))
    (root / "sub" / "deep" / "c.bin").write_bytes(bytes(range(256)) * 1000)
    (root / "sub" / "deep" / "name with space.dat").write_bytes(b"\x00\xff" * 5000)


def log_everything(client: MlflowClient, run_id: str, src: Path, phase: str) -> None:
    """The same calls against the agent and, for the comparison, directly against a server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client.log_artifact(run_id, str(src / "hello.txt"))
    client.log_artifact(run_id, str(src / "blob.bin"), artifact_path=f"{phase}/bin")
    client.log_artifacts(run_id, str(src / "tree"), artifact_path=f"{phase}/tree")
    client.log_text(run_id, "first version", f"{phase}/notes/readme.md")
    client.log_text(run_id, f"second version, {phase} ✓", f"{phase}/notes/readme.md")  # supersedes the first
    client.log_dict(run_id, {"lr": 0.1, "layers": [64, 32], "phase": phase}, f"{phase}/config/params.json")
    figure, axes = plt.subplots(figsize=(2, 2))
    axes.plot([0, 1, 2], [2, 0, 1])
    client.log_figure(run_id, figure, f"{phase}/plots/curve.png")
    plt.close(figure)


def expected_digests(src: Path, phases: tuple[str, ...]) -> dict[str, str]:
    tree = tree_digests(src / "tree")
    out = {"hello.txt": sha256_file(src / "hello.txt")}
    for phase in phases:
        out[f"{phase}/bin/blob.bin"] = sha256_file(src / "blob.bin")
        out.update({f"{phase}/tree/{k}": v for k, v in tree.items()})
        out[f"{phase}/notes/readme.md"] = hashlib.sha256(f"second version, {phase} ✓".encode()).hexdigest()
    return out


def check_generated(root: Path, phase: str) -> dict[str, str]:
    """The files log_dict and log_figure wrote are what was asked for; their digests (made by the client)."""
    assert json.loads((root / phase / "config" / "params.json").read_text()) == {
        "lr": 0.1, "layers": [64, 32], "phase": phase}
    png = (root / phase / "plots" / "curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    return {f"{phase}/config/params.json": sha256_file(root / phase / "config" / "params.json"),
            f"{phase}/plots/curve.png": sha256_file(root / phase / "plots" / "curve.png")}


def test_artifacts_logged_during_an_outage_and_after_it(
    *,
    mlflow_server_factory: MlflowServerFactory,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    pytest.importorskip("matplotlib", reason="log_figure needs matplotlib")
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.txt").write_text("hello, artifacts\n")
    (src / "blob.bin").write_bytes(os.urandom(300_000))
    make_tree(src / "tree")

    port = free_port()  # nothing listens here until the server is started below
    agent = agent_factory(f"http://{LOOPBACK}:{port}", *FAST_AGENT_FLAGS, "--drain-timeout", "5s")
    client = client_for(agent.url)
    experiment_id = client.create_experiment(experiment_name)
    run_id = client.create_run(experiment_id).info.run_id
    assert agent.status()["runs"][0]["provisional"] is True

    # -- while the upstream is down: nothing fails, everything reads back from the spool ------------------
    log_everything(client, run_id, src, "down")
    status = agent.status()
    assert status["upstream"]["up"] is False, status["upstream"]
    files_down = 1 + 1 + 5 + 2 + 1 + 1  # hello, blob, tree, readme twice, dict, figure
    # The first readme is superseded by the second before anything could be sent: it never will be.
    assert status["artifacts"]["waiting"] == files_down - 1, status["artifacts"]
    assert metric(agent, "mlflow_agent_artifacts_total", result="received") == files_down
    assert metric(agent, "mlflow_agent_artifacts_total", result="superseded") == 1
    assert metric(agent, "mlflow_agent_artifacts_total", result="uploaded") == 0
    buffered = metric(agent, "mlflow_agent_artifacts_buffered_bytes")
    assert buffered == status["artifacts"]["bytes"] > 450_000
    assert metric(agent, "mlflow_agent_artifact_bytes_total", result="received") == buffered + len(b"first version")

    root = [(p, d) for p, d, _ in listing(client, run_id) if "/" not in p]
    assert root == [("down", True), ("hello.txt", False)]
    fetched = download_digests(client, run_id, tmp_path / "through-agent-down")
    expected = expected_digests(src, ("down",))
    expected.update(check_generated(tmp_path / "through-agent-down", "down"))
    assert fetched == expected
    nested = listing(client, run_id, "down/tree/sub")
    assert nested == [("down/tree/sub/b.bin", False, 150_000), ("down/tree/sub/deep", True, None),
                      ("down/tree/sub/deep/c.bin", False, 256_000),
                      ("down/tree/sub/deep/name with space.dat", False, 10_000)]
    one = raw_get(agent.url, f"{artifact_root(client, run_id)}/down/tree/sub/deep/c.bin")
    assert one.status_code == 200 and one.content == (src / "tree" / "sub" / "deep" / "c.bin").read_bytes()
    listed_down = listing(client, run_id)

    # -- the upstream comes back: everything arrives byte-identical -----------------------------------------
    server = mlflow_server_factory(port=port)
    wait_artifacts_uploaded(agent, 60)
    assert metric(agent, "mlflow_agent_artifacts_total", result="uploaded") == files_down - 1
    assert metric(agent, "mlflow_agent_artifact_bytes_total", result="uploaded") == buffered
    assert metric(agent, "mlflow_agent_artifacts_buffered_bytes") == 0
    assert metric(agent, "mlflow_agent_artifacts_total", result="dead_lettered") == 0

    # -- and more artifacts once it is back (the client still holds the provisional id) ---------------------
    log_everything(client, run_id, src, "up")
    fetched_up = download_digests(client, run_id, tmp_path / "through-agent-up", "up")
    expected.update(expected_digests(src, ("up",)))
    expected.update(check_generated(tmp_path / "through-agent-up", "up"))
    assert {f"up/{k}": v for k, v in fetched_up.items()} == {k: v for k, v in expected.items() if k.startswith("up/")}
    wait_artifacts_uploaded(agent, 60)
    assert metric(agent, "mlflow_agent_artifacts_total", result="received") == 2 * files_down
    # With the upstream up the first readme may have been sent before the second arrived, or not.
    assert metric(agent, "mlflow_agent_artifacts_total", result="uploaded") + metric(
        agent, "mlflow_agent_artifacts_total", result="superseded") == 2 * files_down

    upstream_run = match_client_runs(all_runs(server.url, experiment_name), {"run": run_id})["run"]
    assert upstream_run.data.tags.get(PROVISIONAL_TAG) == run_id
    direct = client_for(server.url)
    upstream_digests = download_digests(direct, upstream_run.info.run_id, tmp_path / "upstream")
    assert upstream_digests == expected

    # The same calls made directly against the server give the same listing.
    reference_run = direct.create_run(upstream_run.info.experiment_id).info.run_id
    log_everything(direct, reference_run, src, "down")
    log_everything(direct, reference_run, src, "up")
    reference = listing(direct, reference_run)
    assert listing(direct, upstream_run.info.run_id) == reference
    # Zero sizes are left out by both (the client reads None).
    assert listed_down == [e for e in reference if e[0] != "up" and not e[0].startswith("up/")]
    assert download_digests(direct, reference_run, tmp_path / "reference") == expected

    # `python -m agent status --json` carries the artifact figures.
    cli = run_cli("status", "--http", f"{LOOPBACK}:{agent.port}", "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["artifacts"] == {"waiting": 0, "bytes": 0, "limit_bytes": 10 * (1 << 30)}


def test_reading_through_the_agent_after_upload_with_the_provisional_id(
    *,
    mlflow_server_factory: MlflowServerFactory,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    """Once uploaded the local copies are gone: reads are forwarded, the provisional ids translated."""
    port = free_port()
    agent = agent_factory(f"http://{LOOPBACK}:{port}", *FAST_AGENT_FLAGS)
    client = client_for(agent.url)
    run_id = client.create_run(client.create_experiment(experiment_name)).info.run_id
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "top.txt").write_text("top")
    (tmp_path / "dir" / "sub" / "inner.txt").write_text("inner")
    client.log_artifacts(run_id, str(tmp_path / "dir"), "d")
    mlflow_server_factory(port=port)
    wait_artifacts_uploaded(agent, 60)

    # A file: the path segments are translated by the proxy.
    assert download_digests(client, run_id, tmp_path / "file", "d/top.txt") == {
        "top.txt": hashlib.sha256(b"top").hexdigest()}
    # A listing: the provisional ids are inside the ?path= value.
    assert listing(client, run_id) == [("d", True, None), ("d/sub", True, None), ("d/sub/inner.txt", False, 5),
                                       ("d/top.txt", False, 3)]


def test_listing_a_locally_held_file_during_an_outage(*, agent_factory: AgentFactory, experiment_name: str,
                                                      tmp_path: Path) -> None:
    agent = agent_factory(f"http://{LOOPBACK}:{free_port()}", *OFFLINE_FLAGS)
    client = client_for(agent.url)
    run_id = client.create_run(client.create_experiment(experiment_name)).info.run_id
    (tmp_path / "f.txt").write_text("held locally")
    client.log_artifact(run_id, str(tmp_path / "f.txt"), "d")
    root = artifact_root(client, run_id)
    assert requests.get(f"{agent.url}{ARTIFACTS_API}", params={"path": f"{root}/d"}, timeout=10).json() == {
        "files": [{"path": "f.txt", "is_dir": False, "file_size": 12}]}
    answer = requests.get(f"{agent.url}{ARTIFACTS_API}", params={"path": f"{root}/d/f.txt"}, timeout=10)
    assert answer.status_code == 200, answer.text  # what MLflow's server answers for a file: {}
    assert answer.json().get("files", []) == []


def test_client_list_artifacts_with_a_path_during_an_outage(*, agent_factory: AgentFactory, experiment_name: str,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once instead of after ~35 s
    agent = agent_factory(f"http://{LOOPBACK}:{free_port()}", *OFFLINE_FLAGS)
    client = client_for(agent.url)
    run_id = client.create_run(client.create_experiment(experiment_name)).info.run_id
    (tmp_path / "f.txt").write_text("x")
    client.log_artifact(run_id, str(tmp_path / "f.txt"), "d")
    assert [(f.path, f.is_dir) for f in client.list_artifacts(run_id, "d")] == [("d/f.txt", False)]


# -- b. kill -9 right after the client got its 200, upstream down ------------------------------------------


def test_kill_9_after_log_artifact_loses_nothing(
    *,
    mlflow_server_factory: MlflowServerFactory,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    port = free_port()
    agent = agent_factory(f"http://{LOOPBACK}:{port}", *OFFLINE_FLAGS)
    client = client_for(agent.url)
    run_id = client.create_run(client.create_experiment(experiment_name)).info.run_id
    digest = write_random(tmp_path / "weights.bin", 8 * MiB, seed=1)
    client.log_artifact(run_id, str(tmp_path / "weights.bin"), "ckpt")
    agent.sigkill()
    assert len(spool_artifact_files(agent.spool_dir)) == 2  # ready/<id>.data and its manifest

    server = mlflow_server_factory(port=port)
    agent.start()
    wait_artifacts_uploaded(agent, 60)
    upstream_run = match_client_runs(all_runs(server.url, experiment_name), {"run": run_id})["run"]
    assert download_digests(client_for(server.url), upstream_run.info.run_id, tmp_path / "got", "ckpt") == {
        "weights.bin": digest}
    assert spool_artifact_files(agent.spool_dir) == []


# -- c. a large artifact: bounded memory, and kill -9 in the middle of its upload --------------------------


def test_large_artifact_in_bounded_memory_survives_kill_9_during_upload(
    *,
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    slow_relay: Callable[[int, float], SlowRelay],
    experiment_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The upload goes through a relay limited to ~80 MB/s (~2.5 s for the file): time to kill it midway.
    relay = slow_relay(mlflow_server.port, UPLOAD_RATE)
    agent = agent_factory(relay, *FAST_AGENT_FLAGS)
    client = client_for(agent.url)
    run = client.create_run(client.create_experiment(experiment_name))
    run_id = run.info.run_id
    assert mlflow_server.client().get_run(run_id).info.run_id == run_id  # created upstream in time
    big = tmp_path / "big.bin"
    digest = write_random(big, BIG_SIZE, seed=2)
    target = mlflow_server.artifacts_dir / run.info.experiment_id / run_id / "artifacts" / "big" / "big.bin"

    started = time.monotonic()
    with rss_peak(agent.pid) as during_put:
        client.log_artifact(run_id, str(big), "big")
    put_seconds = time.monotonic() - started
    with rss_peak(agent.pid) as during_upload:
        # Kill once a third of the file went upstream (MLflow's server writes the file only once it has
        # read the whole body, so the relay's count tells how far the upload is).
        sent_before = relay.sent
        try:
            wait_until(lambda: relay.sent - sent_before > BIG_SIZE // 3, 30, interval=0.01,
                       message="the upload to be a third through")
        finally:
            partial = relay.sent - sent_before
            agent.sigkill()
    assert not target.exists()  # the upstream never got the whole file

    restarted = time.monotonic()
    agent.start()
    with rss_peak(agent.pid) as after_restart:
        wait_artifacts_uploaded(agent, 120)
    upload_seconds = time.monotonic() - restarted
    assert sha256_file(target) == digest  # the upstream's own file, byte-identical
    assert spool_artifact_files(agent.spool_dir) == []

    put_rise = (during_put["peak"] - during_put["start"]) / 1024
    upload_rise = (during_upload["peak"] - during_put["start"]) / 1024
    restart_rise = (after_restart["peak"] - after_restart["start"]) / 1024
    with capsys.disabled():
        print(f"\n[artifacts] {BIG_SIZE // MiB} MiB: PUT {put_seconds:.1f}s (RSS +{put_rise:.1f} MiB), "
              f"upload killed after {partial / MiB:.0f} MiB (RSS +{upload_rise:.1f} MiB), re-upload after restart "
              f"{upload_seconds:.1f}s (RSS +{restart_rise:.1f} MiB)")
    assert 0 < partial < BIG_SIZE, partial  # the kill did land in the middle of the upload
    assert put_rise < 20, during_put
    assert upload_rise < 20, during_upload
    assert restart_rise < 20, after_restart


# -- d. paths that try to leave the run's directory -----------------------------------------------------


def raw_put(agent: AgentProcess, raw_path: str, body: bytes = b"evil") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(LOOPBACK, agent.port, timeout=10)
    try:
        connection.putrequest("PUT", raw_path, skip_accept_encoding=True)
        connection.putheader("Content-Length", str(len(body)))
        connection.putheader("Content-Type", "application/octet-stream")
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def tree_snapshot(*roots: Path) -> set[str]:
    """Every file and directory under the roots, but the agent's own logs and SQLite files."""
    out: set[str] = set()
    for root in roots:
        for p in root.rglob("*"):
            if p.suffix == ".log" or "spool.db" in p.name or p.name.startswith("spool"):
                continue
            out.add(str(p))
    return out


ESCAPES = {
    "dotdot": "/1/{run}/artifacts/../../x",
    "encoded_dotdot": "/1/{run}/artifacts/%2e%2e/%2E%2E/x",
    "encoded_slash_dotdot": "/1/{run}/artifacts/..%2f..%2fx",
    "nul": "/1/{run}/artifacts/a%00b",
    "backslash": "/1/{run}/artifacts/..%5C..%5Cx",
    "leading_double_slash": "//tmp/x",
    "encoded_leading_slash": "/%2Ftmp%2Fx",
    "dot": "/1/{run}/artifacts/./x",
    "empty_part": "/1/{run}/artifacts//x",
    "control": "/1/{run}/artifacts/a%0Ab",
}


def test_path_escapes_are_refused_and_write_nothing(
    *,
    agent_factory: AgentFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    agent = agent_factory(f"http://{LOOPBACK}:{free_port()}", *OFFLINE_FLAGS)
    run = "0" * 32
    before = tree_snapshot(tmp_path)
    answers: dict[str, tuple[int, str]] = {}
    for name, template in ESCAPES.items():
        for prefix in (ARTIFACTS_API, "/ajax-api/2.0/mlflow-artifacts/artifacts"):
            code, raw = raw_put(agent, prefix + template.format(run=run))
            answers[f"{name}{'' if prefix == ARTIFACTS_API else ' (ajax)'}"] = (code, raw.decode(errors="replace"))
    with capsys.disabled():
        print("\n[artifacts] path escapes:", {k: v[0] for k, v in answers.items()})
    for name, (status, body) in answers.items():
        assert status in (400, 404), (name, status, body)
        if status == 400:
            assert json.loads(body)["error_code"] == "INVALID_PARAMETER_VALUE", (name, body)
    assert tree_snapshot(tmp_path) == before
    assert spool_artifact_files(agent.spool_dir) == []
    assert not any(Path(p).name in ("x", "a\x00b") for p in tree_snapshot(tmp_path))
    assert not Path("/tmp/x").exists() or Path("/tmp/x").stat().st_mtime < time.time() - 600
    assert metric(agent, "mlflow_agent_artifacts_total", result="received") == 0
    assert artifacts_status(agent)["waiting"] == 0
    # A well-formed path on the same agent is accepted (the refusals are not the agent refusing all).
    assert raw_put(agent, f"{ARTIFACTS_API}/1/{run}/artifacts/ok/..ok.txt")[0] == 200
    assert metric(agent, "mlflow_agent_artifacts_total", result="received") == 1


# -- e. the budget ------------------------------------------------------------------------------------------


def test_artifact_budget_refuses_fast_and_keeps_what_fits(
    *,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    from mlflow.exceptions import MlflowException

    agent = agent_factory(f"http://{LOOPBACK}:{free_port()}", *OFFLINE_FLAGS, "--artifact-max-bytes", "2MiB")
    client = client_for(agent.url)
    run_id = client.create_run(client.create_experiment(experiment_name)).info.run_id
    write_random(tmp_path / "too-big.bin", 3_000_000, seed=3)
    fits = write_random(tmp_path / "fits.bin", 1_000_000, seed=4)

    started = time.monotonic()
    # The mlflow client raises requests' HTTPError (with the agent's answer) for a failed artifact PUT.
    with pytest.raises((MlflowException, requests.HTTPError)) as refused:
        client.log_artifact(run_id, str(tmp_path / "too-big.bin"))
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"a refusal over budget took {elapsed:.1f}s (retried?)"
    message = str(refused.value)
    assert "413" in message or "RESOURCE_EXHAUSTED" in message, message
    assert "budget" in message, message

    client.log_artifact(run_id, str(tmp_path / "fits.bin"))
    status = artifacts_status(agent)
    assert status == {"waiting": 1, "bytes": 1_000_000, "limit_bytes": 2 * MiB}
    assert metric(agent, "mlflow_agent_artifacts_total", result="received") == 1
    assert metric(agent, "mlflow_agent_artifact_bytes_total", result="received") == 1_000_000
    assert metric(agent, "mlflow_agent_artifacts_buffered_bytes") == 1_000_000
    assert len(spool_artifact_files(agent.spool_dir)) == 2
    got = raw_get(agent.url, f"{artifact_root(client, run_id)}/fits.bin")
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == fits

    # A second 1.5 MB file no longer fits next to the first: refused too, the first kept.
    write_random(tmp_path / "second.bin", 1_500_000, seed=5)
    with pytest.raises((MlflowException, requests.HTTPError), match="budget"):
        client.log_artifact(run_id, str(tmp_path / "second.bin"))
    assert artifacts_status(agent)["waiting"] == 1
    raw = requests.put(f"{agent.url}{ARTIFACTS_API}/0/{run_id}/artifacts/raw.bin", data=b"x" * 3_000_000,
                       timeout=10)
    assert raw.status_code == 413 and raw.json()["error_code"] == "RESOURCE_EXHAUSTED", raw.text


# -- f. what is left at shutdown: the drain and `sync` ------------------------------------------------------


def test_sigterm_drains_waiting_artifacts_before_exit(
    *,
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    faulty_proxy_factory: FaultyProxyFactory,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    """Files held while the upstream refused everything: it comes back, SIGTERM follows at once, and the
    drain delivers the files before the agent exits."""
    proxy = faulty_proxy_factory(mlflow_server, p_503=1.0)
    agent = agent_factory(proxy, *FAST_AGENT_FLAGS, "--retry-max-backoff", "200ms", "--drain-timeout", "30s")
    client = client_for(agent.url)
    run_id = client.create_run(client.create_experiment(experiment_name)).info.run_id
    digests = {}
    for i in range(5):
        digests[f"ckpt/part{i}.bin"] = write_random(tmp_path / f"part{i}.bin", 2 * MiB, seed=10 + i)
        client.log_artifact(run_id, str(tmp_path / f"part{i}.bin"), "ckpt")
    assert artifacts_status(agent)["waiting"] == 5
    proxy.clear_faults()
    assert agent.stop() == 0  # SIGTERM, then the drain
    assert spool_artifact_files(agent.spool_dir) == []
    upstream = match_client_runs(all_runs(mlflow_server.url, experiment_name), {"run": run_id})["run"]
    got = download_digests(client_for(mlflow_server.url), upstream.info.run_id, tmp_path / "got", "ckpt")
    assert {f"ckpt/{k}": v for k, v in got.items()} == digests


def test_sync_uploads_the_artifacts_and_models_an_offline_agent_kept(
    *,
    mlflow_server: MlflowServer,
    agent_factory: AgentFactory,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    offline = agent_factory(None, *OFFLINE_FLAGS)
    client = client_for(offline.url)
    experiment_id = client.create_experiment(experiment_name)
    run_id = client.create_run(experiment_id).info.run_id
    digest = write_random(tmp_path / "weights.bin", 3 * MiB, seed=21)
    client.log_artifact(run_id, str(tmp_path / "weights.bin"), "ckpt")
    model = client.create_logged_model(experiment_id, name="kept", source_run_id=run_id)
    model_file = tmp_path / "MLmodel"
    model_file.write_text("artifact_path: kept\n")
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    MlflowArtifactsRepository(model.artifact_location, tracking_uri=offline.url).log_artifact(str(model_file))
    client.finalize_logged_model(model.model_id, "READY")
    offline_status = run_cli("status", "--http", f"{LOOPBACK}:{offline.port}", "--json")
    models = json.loads(offline_status.stdout)["models"]
    assert [(m["model_id"], m["provisional"]) for m in models] == [(model.model_id, True)], models
    assert offline.stop() == 0
    assert len(spool_artifact_files(offline.spool_dir)) == 4  # two files, each with its manifest

    synced = run_cli("sync", "--spool-dir", str(offline.spool_dir), "--upstream", mlflow_server.url, "--timeout",
                     "90", "--retry-max-backoff", "1s", timeout=150)
    assert synced.returncode == 0, f"stdout:\n{synced.stdout}\nstderr:\n{synced.stderr}"
    assert synced.stdout.splitlines()[-1].endswith("dead-lettered 0, left in spool 0"), synced.stdout
    assert spool_artifact_files(offline.spool_dir) == []
    direct = client_for(mlflow_server.url)
    upstream = match_client_runs(all_runs(mlflow_server.url, experiment_name), {"run": run_id})["run"]
    assert download_digests(direct, upstream.info.run_id, tmp_path / "got", "ckpt") == {"weights.bin": digest}
    (stored,) = [m for m in direct.search_logged_models([upstream.info.experiment_id])
                 if m.tags.get("mlflow_agent.provisional_model_id") == model.model_id]
    assert stored.status.to_proto() == 2 and stored.source_run_id == upstream.info.run_id
    repo = MlflowArtifactsRepository(stored.artifact_location, tracking_uri=mlflow_server.url)
    assert [f.path for f in repo.list_artifacts()] == ["MLmodel"]
