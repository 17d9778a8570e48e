"""agent/client.py against real sockets the tests own: exact datagram bytes, packing, an absent agent, a
full Unix socket queue, threads, fork, run id lookup, and a property test of the JSON encoding."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import pickle
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.client import DROP_REASONS, AgentClient

RUN = "0123456789abcdef0123456789abcdef"
TS = 1_700_000_000_123
MAX_CALL_NS = 5_000_000  # 5 ms: the calls take microseconds; a blocking send would take forever


def dumps(obj: Any) -> bytes:
    """The reference encoding the client promises."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def body(metrics: list[dict[str, Any]] | None = None, params: list[dict[str, Any]] | None = None,
         tags: list[dict[str, Any]] | None = None, run_id: str = RUN) -> dict[str, Any]:
    return {"run_id": run_id, "metrics": metrics or [], "params": params or [], "tags": tags or []}


def metric(key: str, value: Any, step: int = 0, timestamp: int = TS) -> dict[str, Any]:
    return {"key": key, "value": value, "timestamp": timestamp, "step": step}


def wire_value(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def recv_one(sock: socket.socket, timeout: float = 2.0) -> bytes:
    sock.settimeout(timeout)
    return sock.recv(65536)


def recv_records(sock: socket.socket, records: int) -> list[bytes]:
    """Datagrams until they hold ``records`` records in all."""
    out: list[bytes] = []
    seen = 0
    while seen < records:
        data = recv_one(sock)
        out.append(data)
        seen += sum(len(o["metrics"]) + len(o["params"]) + len(o["tags"]) for o in objects(data))
    assert seen == records
    return out


def objects(data: bytes) -> list[dict[str, Any]]:
    """Every JSON object of a datagram (newline-separated)."""
    return [json.loads(line) for line in data.split(b"\n") if line.strip()]


def assert_nothing_pending(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(65536)


def free_udp_port() -> int:
    """A port that was free a moment ago and is closed now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def timed(call: Callable[[], None]) -> int:
    t0 = time.perf_counter_ns()
    call()
    return time.perf_counter_ns() - t0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: Unix socket paths are limited to ~107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ac-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def udp_receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def uds_receiver(short_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(short_dir / "agent.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()


@pytest.fixture
def no_ambient_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """No $MLFLOW_RUN_ID and no mlflow module, so the run id comes only from what a test sets."""
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delitem(sys.modules, "mlflow", raising=False)


@pytest.fixture
def no_agent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_AGENT_UDS", raising=False)
    monkeypatch.delenv("MLFLOW_AGENT_UDP", raising=False)


# exact bytes ----------------------------------------------------------------------------------------


class Floaty:
    def __float__(self) -> float:
        return 2.5


def test_udp_metrics_are_log_batch_json_with_protobuf_spellings(udp_receiver: socket.socket) -> None:
    port = udp_receiver.getsockname()[1]
    with AgentClient(RUN, address=f"127.0.0.1:{port}") as client:
        client.log_metric("loss", 0.5, step=3, timestamp=TS)
        assert recv_one(udp_receiver) == dumps(body([metric("loss", 0.5, 3)]))

        values: dict[str, Any] = {
            "nan": math.nan, "inf": math.inf, "-inf": -math.inf, "zero": 0.0, "-zero": -0.0, "tiny": 5e-324,
            "huge": 1.7976931348623157e308, "third": 1 / 3, "int": 3, "bool": True, "fraction": Fraction(1, 4),
            "dunder": Floaty(), "big int": 10**20, "é/ü key": 1.0,
        }
        client.log_metrics(values, step=2**40, timestamp=TS)
        data = recv_one(udp_receiver)
        expected = [metric(k, wire_value(float(v)), 2**40) for k, v in values.items()]
        assert data == dumps(body(expected))
        assert data.isascii()
        got = json.loads(data)["metrics"]
        assert [m["value"] for m in got[:3]] == ["NaN", "Infinity", "-Infinity"]
        assert math.copysign(1.0, got[4]["value"]) == -1.0
        assert got[6]["value"] == 1.7976931348623157e308
        assert client.stats()["records_sent"] == 1 + len(values)
        assert client.stats()["datagrams_sent"] == 2


def test_numpy_scalars_are_plain_numbers(udp_receiver: socket.socket) -> None:
    np = pytest.importorskip("numpy")
    with AgentClient(RUN, address=f"127.0.0.1:{udp_receiver.getsockname()[1]}") as client:
        client.log_metrics({"f32": np.float32(0.5), "f64": np.float64(0.1), "i64": np.int64(7),
                            "nan": np.float32("nan")}, step=np.int64(4), timestamp=TS)
        expected = [metric("f32", 0.5, 4), metric("f64", 0.1, 4), metric("i64", 7.0, 4), metric("nan", "NaN", 4)]
        assert recv_one(udp_receiver) == dumps(body(expected))


@pytest.mark.parametrize("form", ["unix:{}", "{}"])
def test_uds_params_and_tags_are_strings(uds_receiver: tuple[socket.socket, str], form: str) -> None:
    sock, path = uds_receiver
    with AgentClient(RUN, address=form.format(path)) as client:
        assert client.address == f"unix:{path}"
        assert client.max_datagram == 8192
        client.log_param("lr", 0.001)
        assert recv_one(sock) == dumps(body(params=[{"key": "lr", "value": "0.001"}]))
        client.log_params({"layers": 3, "name": 'résumé "quoted"\n', "none": None})
        assert recv_one(sock) == dumps(body(params=[
            {"key": "layers", "value": "3"}, {"key": "name", "value": 'résumé "quoted"\n'},
            {"key": "none", "value": "None"}]))
        client.set_tag("mlflow.note.content", "hello")
        assert recv_one(sock) == dumps(body(tags=[{"key": "mlflow.note.content", "value": "hello"}]))
        client.set_tags({"a": 1, "b": [1, 2]})
        assert recv_one(sock) == dumps(body(tags=[{"key": "a", "value": "1"}, {"key": "b", "value": "[1, 2]"}]))
        client.log_metric("m", 1.0, step=1, timestamp=TS)
        assert recv_one(sock) == dumps(body([metric("m", 1.0, 1)]))
        assert client.stats() == {"datagrams_sent": 5, "records_sent": 8, "datagrams_dropped": 0,
                                  "records_dropped": 0, **{f"dropped_{r}": 0 for r in DROP_REASONS}}


def test_timestamp_is_taken_at_the_call_and_shared(udp_receiver: socket.socket) -> None:
    with AgentClient(RUN, address=f"127.0.0.1:{udp_receiver.getsockname()[1]}") as client:
        before = int(time.time() * 1000)
        client.log_metrics({"a": 1.0, "b": 2.0}, step=9)
        after = int(time.time() * 1000)
        got = json.loads(recv_one(udp_receiver))["metrics"]
        assert got[0]["timestamp"] == got[1]["timestamp"]
        assert before <= got[0]["timestamp"] <= after
        assert [m["step"] for m in got] == [9, 9]
        client.log_metric("c", 1.0, timestamp=1.5e12)  # type: ignore[arg-type]  # int()-ed
        assert json.loads(recv_one(udp_receiver))["metrics"][0]["timestamp"] == 1_500_000_000_000


def test_packing_is_greedy_under_max_datagram(udp_receiver: socket.socket) -> None:
    # UDP with a large receive buffer: a Unix socket queues only net.unix.max_dgram_qlen (often 10) datagrams.
    sock = udp_receiver
    values = {f"metric/{i:03d}/" + "x" * (i % 7): i / 7 for i in range(60)}
    with AgentClient(RUN, address=f"127.0.0.1:{sock.getsockname()[1]}", max_datagram=400) as client:
        client.log_metrics(values, step=5, timestamp=TS)
        datagrams = recv_records(sock, len(values))
        assert_nothing_pending(sock)
        items = [metric(k, v, 5) for k, v in values.items()]
        sizes = [len(dumps(item)) for item in items]
        got: list[dict[str, Any]] = []
        for data in datagrams:
            assert len(data) <= 400
            (obj,) = objects(data)
            assert data == dumps(body(obj["metrics"]))
            got.extend(obj["metrics"])
            if len(got) < len(items):  # greedy (fewest datagrams, order kept): the next item did not fit
                assert len(data) + 1 + sizes[len(got)] > 400
        assert got == items
        assert client.datagrams_sent == len(datagrams) > 1
        assert client.records_sent == len(values)
        assert client.records_dropped == 0


def test_an_item_too_large_alone_is_dropped_and_the_rest_sent(uds_receiver: tuple[socket.socket, str]) -> None:
    sock, path = uds_receiver
    with AgentClient(RUN, address=path, max_datagram=300) as client:
        client.log_metrics({"ok": 1.0, "k" * 400: 2.0, "ok2": 3.0}, timestamp=TS)
        assert recv_one(sock) == dumps(body([metric("ok", 1.0), metric("ok2", 3.0)]))
        client.log_params({"small": "v", "big": "v" * 1000})
        assert recv_one(sock) == dumps(body(params=[{"key": "small", "value": "v"}]))
        assert_nothing_pending(sock)
        assert client.dropped_by_reason == {**dict.fromkeys(DROP_REASONS, 0), "too_large": 2}
        assert (client.records_sent, client.records_dropped, client.datagrams_dropped) == (3, 2, 0)


def test_objects_respect_mlflow_batch_limits(uds_receiver: tuple[socket.socket, str]) -> None:
    sock, path = uds_receiver
    with AgentClient(RUN, address=path, max_datagram=65000) as client:
        client.log_params({f"p{i}": i for i in range(150)})
        counts = [len(objects(d)[0]["params"]) for d in recv_records(sock, 150)]
        assert counts == [100, 50]
        client.log_metrics({f"m{i}": 1.0 for i in range(1200)}, timestamp=TS)
        counts = [len(objects(d)[0]["metrics"]) for d in recv_records(sock, 1200)]
        assert counts == [1000, 200]


def test_several_objects_are_what_the_agent_parses(uds_receiver: tuple[socket.socket, str]) -> None:
    """The contract with the agent's own datagram parser: every object valid, nothing refused."""
    from agent.sources.datagram import parse_datagram

    sock, path = uds_receiver
    with AgentClient(RUN, address=path) as client:
        client.log_metrics({"loss": math.nan, "acc": math.inf, "lr": -math.inf, "x": 0.25}, step=4, timestamp=TS)
        client.log_params({"lr": 0.1, "opt": "adam"})
        client.set_tags({"team": "ml"})
        datagrams = [recv_one(sock) for _ in range(3)]
    parsed = parse_datagram(b"\n".join(datagrams), now_ms=1)  # several objects in one datagram
    assert parsed.errors == []
    assert len(parsed.batches) == 3
    assert all(batch.run_id == RUN for batch in parsed.batches)
    total = sum(len(b.metrics) + len(b.params) + len(b.tags) for b in parsed.batches)
    assert total == 7


# agent absent, buffer full ---------------------------------------------------------------------------


def calls_with_accounting(client: AgentClient, calls: int, per_call: int,
                          call: Callable[[int], None]) -> list[int]:
    """Run ``calls`` calls, each of ``per_call`` records, and check after each one that its records were
    all sent or all dropped, and that it took < 5 ms; the durations, in ns.

    On a loaded machine the scheduler can take the CPU away for a time slice (~4 ms) in the middle of
    any call. So a call may take longer only if it was preempted (an involuntary context switch) and
    never waited (no voluntary one): a send that blocked would show as a voluntary switch."""
    durations: list[int] = []
    gc.disable()
    try:
        for i in range(calls):
            before = client.stats()
            usage = resource.getrusage(resource.RUSAGE_THREAD)
            duration = timed(lambda i=i: call(i))  # type: ignore[misc]
            usage_after = resource.getrusage(resource.RUSAGE_THREAD)
            durations.append(duration)
            if duration >= MAX_CALL_NS:
                assert usage_after.ru_nvcsw == usage.ru_nvcsw, f"call {i} waited: {duration / 1e6:.1f} ms"
                assert usage_after.ru_nivcsw > usage.ru_nivcsw, f"call {i} took {duration / 1e6:.1f} ms"
                assert duration < 1_000_000_000
            after = client.stats()
            sent = after["records_sent"] - before["records_sent"]
            dropped = after["records_dropped"] - before["records_dropped"]
            assert (sent, dropped) in ((per_call, 0), (0, per_call))
            assert after["datagrams_sent"] - before["datagrams_sent"] == (1 if sent else 0)
            assert after["datagrams_dropped"] - before["datagrams_dropped"] == (1 if dropped else 0)
    finally:
        gc.enable()
    return durations


def report(label: str, durations: list[int]) -> None:
    preempted = sum(d >= MAX_CALL_NS for d in durations)
    print(f"\n{label}: median {statistics.median(durations) / 1000:.1f} us, "
          f"max {max(durations) / 1000:.1f} us over {len(durations)} calls ({preempted} preempted ≥ 5 ms)")
    assert statistics.median(durations) < MAX_CALL_NS / 10


def test_udp_agent_absent_calls_are_fast_and_counted() -> None:
    calls, per_call = 500, 3
    with AgentClient(RUN, address=f"127.0.0.1:{free_udp_port()}") as client:
        durations = calls_with_accounting(
            client, calls, per_call, lambda i: client.log_metrics({"a": i, "b": 1.0, "c": 2.0}, step=i))
        report("udp, closed port, log_metrics(3)", durations)
        stats = client.stats()
        assert stats["records_sent"] + stats["records_dropped"] == calls * per_call
        # The kernel reports the ICMP refusal at the next send on the connected socket: some are counted.
        assert stats["records_dropped"] > 0
        assert stats["records_dropped"] == stats["datagrams_dropped"] * per_call
        assert client.dropped_by_reason == {**dict.fromkeys(DROP_REASONS, 0), "agent_absent": stats["records_dropped"]}
        print(f"udp, closed port: {stats['datagrams_sent']} datagrams taken by the kernel, "
              f"{stats['datagrams_dropped']} refused")


@pytest.mark.parametrize("case", ["missing", "stale"])
def test_uds_agent_absent_every_record_dropped(short_dir: Path, case: str) -> None:
    path = short_dir / "agent.sock"
    if case == "stale":  # a socket file left behind by an agent that died: nobody reads it
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dead:
            dead.bind(str(path))
        assert path.exists()
    calls = 500
    with AgentClient(RUN, address=f"unix:{path}") as client:
        durations = calls_with_accounting(
            client, calls, 2, lambda i: client.log_metrics({"a": i, "b": 1.0}, step=i))
        client.log_params({"p": 1, "q": 2, "r": 3})
        client.set_tag("t", "v")
        report(f"uds, {case} socket, log_metrics(2)", durations)
        assert client.stats() == {
            "datagrams_sent": 0, "records_sent": 0, "datagrams_dropped": calls + 2,
            "records_dropped": calls * 2 + 4, **{f"dropped_{r}": 0 for r in DROP_REASONS},
            "dropped_agent_absent": calls * 2 + 4}


def test_uds_buffer_full_is_counted_and_never_blocks(uds_receiver: tuple[socket.socket, str]) -> None:
    sock, path = uds_receiver  # never read until the end
    attempted = 0
    with AgentClient(RUN, address=path) as client:
        for i in range(100_000):
            client.log_metrics({"a": i, "b": 1.0}, step=i)
            attempted += 2
            if client.records_dropped:
                break
        assert client.dropped_by_reason["buffer_full"] == 2, "the queue never filled"
        filled = client.datagrams_sent
        durations = calls_with_accounting(
            client, 500, 2, lambda i: client.log_metrics({"a": i, "b": 1.0}, step=i))
        attempted += 1000
        report("uds, receiver queue full, log_metrics(2)", durations)
        stats = client.stats()
        assert stats["datagrams_sent"] == filled  # nothing got through while the queue stayed full
        assert stats["records_sent"] + stats["records_dropped"] == attempted
        assert stats["records_dropped"] == stats["dropped_buffer_full"] == 2 * stats["datagrams_dropped"] == 1002
        # Everything the client counted as sent is in the queue, and nothing else.
        received = [o for _ in range(filled) for o in objects(recv_one(sock))]
        assert_nothing_pending(sock)
        assert sum(len(o["metrics"]) for o in received) == stats["records_sent"]
        assert [o["metrics"][0]["step"] for o in received] == list(range(filled))
        # Drained: sends succeed again.
        client.log_metric("after", 1.0)
        assert client.datagrams_sent == filled + 1
        assert objects(recv_one(sock))[0]["metrics"][0]["key"] == "after"


# threads and fork -----------------------------------------------------------------------------------------


def test_threads_share_one_client(uds_receiver: tuple[socket.socket, str]) -> None:
    sock, path = uds_receiver
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.settimeout(0.2)
    received: list[bytes] = []
    stop = threading.Event()

    def reader() -> None:
        while True:
            try:
                received.append(sock.recv(65536))
            except TimeoutError:
                if stop.is_set():
                    return

    threads_n, calls = 8, 1000
    with AgentClient(RUN, address=path) as client:
        barrier = threading.Barrier(threads_n)

        def writer(t: int) -> None:
            barrier.wait()
            for i in range(calls):
                client.log_metrics({f"t{t}.a": i, f"t{t}.b": -i}, step=i, timestamp=TS + t)

        read = threading.Thread(target=reader)
        read.start()
        writers = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        stop.set()
        read.join()
        stats = client.stats()
    assert stats["records_sent"] + stats["records_dropped"] == threads_n * calls * 2
    assert stats["records_dropped"] == stats["dropped_buffer_full"] == 2 * stats["datagrams_dropped"]
    assert len(received) == stats["datagrams_sent"] > 0
    seen = 0
    for data in received:
        (obj,) = objects(data)
        a, b = obj["metrics"]
        t = a["timestamp"] - TS
        assert (a["key"], b["key"]) == (f"t{t}.a", f"t{t}.b")
        assert a["value"] == -b["value"] == a["step"] == b["step"]
        seen += 2
    assert seen == stats["records_sent"]
    print(f"\nthreads: {stats['datagrams_sent']} datagrams delivered, "
          f"{stats['datagrams_dropped']} refused (queue full)")


def wait_child(pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the child hung")


@pytest.mark.parametrize("lock_held", [False, True], ids=["plain", "lock-held-at-fork"])
def test_fork_child_gets_its_own_socket(uds_receiver: tuple[socket.socket, str], lock_held: bool) -> None:
    sock, path = uds_receiver
    with AgentClient(RUN, address=path) as client:
        client.log_metric("parent", 1.0, timestamp=TS)
        assert objects(recv_one(sock))[0]["metrics"][0]["key"] == "parent"
        # With lock_held, the fork happens while (as another thread could) the parent holds the lock.
        with client._lock if lock_held else contextlib.nullcontext():
            pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                client.log_metric("child", 2.0, step=os.getpid(), timestamp=TS)
                stats = client.stats()
                code = 0 if (stats["records_sent"], stats["records_dropped"]) == (1, 0) else 2
            finally:
                os._exit(code)
        assert wait_child(pid) == 0  # sent, with counters that started from zero
        got = objects(recv_one(sock))[0]["metrics"]
        assert got == [metric("child", 2.0, pid)]
        assert client.stats()["records_sent"] == 1  # the parent's own counters are untouched
        client.log_metric("parent again", 3.0)
        assert objects(recv_one(sock))[0]["metrics"][0]["key"] == "parent again"


def test_a_pid_change_alone_reopens(uds_receiver: tuple[socket.socket, str]) -> None:
    """The per-call pid check, for a fork that ran no os.register_at_fork hooks."""
    sock, path = uds_receiver
    with AgentClient(RUN, address=path) as client:
        client.log_metric("a", 1.0)
        old = client._sock
        assert old is not None
        client._pid = -1
        client.log_metric("b", 1.0)
        assert client._sock is not old and old.fileno() == -1
        assert client.stats()["records_sent"] == 1  # counters start again
        assert [objects(recv_one(sock))[0]["metrics"][0]["key"] for _ in range(2)] == ["a", "b"]


# run id ---------------------------------------------------------------------------------------------------


def test_run_id_from_env_and_precedence(monkeypatch: pytest.MonkeyPatch, no_ambient_run: None,
                                        udp_receiver: socket.socket) -> None:
    address = f"127.0.0.1:{udp_receiver.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_RUN_ID", "envrun")
    with AgentClient(address=address) as client:
        client.log_metric("a", 1.0)
        assert json.loads(recv_one(udp_receiver))["run_id"] == "envrun"
        assert client.run_id == "envrun"
    with AgentClient("explicit", address=address) as client:
        client.log_metric("a", 1.0)
        assert json.loads(recv_one(udp_receiver))["run_id"] == "explicit"


def test_no_run_id_is_counted_then_found_lazily(monkeypatch: pytest.MonkeyPatch, no_ambient_run: None,
                                               udp_receiver: socket.socket) -> None:
    with AgentClient(address=f"127.0.0.1:{udp_receiver.getsockname()[1]}") as client:
        assert client.run_id is None
        client.log_metrics({"a": 1.0, "b": 2.0})
        client.log_params({"p": 1})
        client.set_tag("t", "v")
        assert client.dropped_by_reason == {**dict.fromkeys(DROP_REASONS, 0), "no_run_id": 4}
        assert (client.records_dropped, client.datagrams_dropped) == (4, 0)
        assert_nothing_pending(udp_receiver)

        monkeypatch.setenv("MLFLOW_RUN_ID", "late")  # looked up again while none was found
        client.log_metric("a", 1.0)
        assert json.loads(recv_one(udp_receiver))["run_id"] == "late"
        monkeypatch.setenv("MLFLOW_RUN_ID", "other")  # once found, kept
        client.log_metric("a", 1.0)
        assert json.loads(recv_one(udp_receiver))["run_id"] == "late"
        client.run_id = "switched"
        client.log_metric("a", 1.0)
        assert json.loads(recv_one(udp_receiver))["run_id"] == "switched"
        client.run_id = None  # look it up again
        client.log_metric("a", 1.0)
        assert json.loads(recv_one(udp_receiver))["run_id"] == "other"


def test_run_id_from_an_already_imported_mlflow(monkeypatch: pytest.MonkeyPatch, no_ambient_run: None,
                                                udp_receiver: socket.socket) -> None:
    active: list[Any] = [None]
    fake = types.ModuleType("mlflow")
    fake.active_run = lambda: active[0]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    with AgentClient(address=f"127.0.0.1:{udp_receiver.getsockname()[1]}") as client:
        client.log_metric("a", 1.0)
        assert client.dropped_by_reason["no_run_id"] == 1
        active[0] = types.SimpleNamespace(info=types.SimpleNamespace(run_id="fromMlflow"))
        client.log_metric("a", 1.0)
        assert json.loads(recv_one(udp_receiver))["run_id"] == "fromMlflow"

    def broken() -> None:
        raise RuntimeError("no tracking URI")

    fake.active_run = broken  # type: ignore[attr-defined]
    with AgentClient(address=f"127.0.0.1:{udp_receiver.getsockname()[1]}") as client:
        client.log_metric("a", 1.0)
        assert client.dropped_by_reason["no_run_id"] == 1


# addresses ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "canonical", "max_datagram"), [
    ("127.0.0.1:5051", "udp://127.0.0.1:5051", 8192),
    ("udp://127.0.0.2:6000", "udp://127.0.0.2:6000", 8192),
    ("localhost:5051", "udp://localhost:5051", 8192),
    ("[::1]:5051", "udp://[::1]:5051", 8192),
    ("192.0.2.1:5051", "udp://192.0.2.1:5051", 1432),
    ("/run/mlflow-agent/agent.sock", "unix:/run/mlflow-agent/agent.sock", 8192),
    ("unix:/run/mlflow-agent/agent.sock", "unix:/run/mlflow-agent/agent.sock", 8192),
    ("unix:///run/a.sock", "unix:/run/a.sock", 8192),
])
def test_address_forms(address: str, canonical: str, max_datagram: int) -> None:
    # Nothing is sent: some of these could reach a real agent on this machine, or the network.
    with AgentClient(RUN, address=address) as client:
        assert (client.address, client.max_datagram) == (canonical, max_datagram)
    with AgentClient(RUN, address=address, max_datagram=1000) as client:
        assert client.max_datagram == 1000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract Unix sockets are Linux-only")
def test_abstract_unix_socket() -> None:
    name = f"mlflow-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        with AgentClient(RUN, address=f"unix:@{name}") as client:
            assert client.address == f"unix:@{name}"
            client.log_metric("a", 1.0, timestamp=TS)
            assert recv_one(sock) == dumps(body([metric("a", 1.0)]))


@pytest.mark.parametrize("address", ["nohost", "h:0", "h:65536", "h:x", "::1:5051", "unix:", ":5051"])
def test_malformed_address_is_refused_at_construction(address: str) -> None:
    with pytest.raises(ValueError, match=r"address|IPv6|path|expected"):
        AgentClient(RUN, address=address)


@pytest.mark.parametrize("size", [0, -1, 65536])
def test_bad_max_datagram_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="max_datagram"):
        AgentClient(RUN, address="127.0.0.1:5051", max_datagram=size)


def test_default_address_from_env(monkeypatch: pytest.MonkeyPatch, no_agent_env: None,
                                  uds_receiver: tuple[socket.socket, str]) -> None:
    _, path = uds_receiver
    assert AgentClient(RUN).address == "udp://127.0.0.1:5051"
    monkeypatch.setenv("MLFLOW_AGENT_UDP", "127.0.0.1:7000")
    assert AgentClient(RUN).address == "udp://127.0.0.1:7000"
    monkeypatch.setenv("MLFLOW_AGENT_UDS", path)
    assert AgentClient(RUN).address == f"unix:{path}"
    monkeypatch.setenv("MLFLOW_AGENT_UDS", f"unix:{path}")
    assert AgentClient(RUN).address == f"unix:{path}"
    monkeypatch.setenv("MLFLOW_AGENT_UDS", path + ".missing")  # not there (yet): UDP
    assert AgentClient(RUN).address == "udp://127.0.0.1:7000"
    monkeypatch.setenv("MLFLOW_AGENT_UDP", "not an address")
    with pytest.warns(RuntimeWarning, match="MLFLOW_AGENT_UDP"):
        assert AgentClient(RUN).address == "udp://127.0.0.1:5051"
    monkeypatch.setenv("MLFLOW_AGENT_UDP", "none")  # the agent's own spelling of "no UDP"
    assert AgentClient(RUN).address == "udp://127.0.0.1:5051"


# never raises --------------------------------------------------------------------------------------------


class BadStr:
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_bad_input_is_dropped_as_error_never_raised(udp_receiver: socket.socket) -> None:
    with AgentClient(RUN, address=f"127.0.0.1:{udp_receiver.getsockname()[1]}") as client:
        mixed: dict[str, Any] = {"good": 1.0, "text": "abc", "none": None, "obj": object(), "good2": 2.0}
        client.log_metrics(mixed, timestamp=TS)
        assert recv_one(udp_receiver) == dumps(body([metric("good", 1.0), metric("good2", 2.0)]))
        assert client.dropped_by_reason["error"] == 3
        client.log_metric("a", 1.0, step="x")  # type: ignore[arg-type]
        client.log_metric("a", 1.0, step=math.nan)  # type: ignore[arg-type]
        client.log_metric("a", 1.0, timestamp="soon")  # type: ignore[arg-type]
        client.log_metrics(None)  # type: ignore[arg-type]
        client.log_metrics([1, 2, 3])  # type: ignore[arg-type]
        client.log_params(42)  # type: ignore[arg-type]
        client.set_tags({"ok": "v", "bad": BadStr()})
        assert recv_one(udp_receiver) == dumps(body(tags=[{"key": "ok", "value": "v"}]))
        client.log_metric(BadStr(), 1.0)  # type: ignore[arg-type]
        client.log_metrics({BadStr(): 1.0, "fine": 2.0}, timestamp=TS)  # type: ignore[dict-item]
        assert recv_one(udp_receiver) == dumps(body([metric("fine", 2.0)]))
        client.log_metrics({5: 1.0}, timestamp=TS)  # type: ignore[dict-item]  # non-str keys are str()-ed
        assert recv_one(udp_receiver) == dumps(body([metric("5", 1.0)]))
        assert client.dropped_by_reason == {**dict.fromkeys(DROP_REASONS, 0), "error": 3 + 3 + 1 + 3 + 1 + 1 + 1 + 1}
        assert client.records_dropped == 14
        assert client.records_sent == 5
        client.close()
        client.close()
        assert client.closed
        client.log_metric("after close", 1.0)
        client.log_params({"a": 1, "b": 2})
        assert client.dropped_by_reason["error"] == 17
        assert client.datagrams_dropped == 2
        assert_nothing_pending(udp_receiver)


def test_repr_and_context_manager(udp_receiver: socket.socket) -> None:
    address = f"127.0.0.1:{udp_receiver.getsockname()[1]}"
    with AgentClient(RUN, address=address) as client:
        client.log_metric("a", 1.0)
        text = repr(client)
        assert text.startswith("AgentClient(") and "open" in text and f"udp://{address}" in text
        assert "records_sent=1" in text
    assert client.closed and "closed" in repr(client)


def test_pickled_client_is_a_fresh_client(uds_receiver: tuple[socket.socket, str]) -> None:
    sock, path = uds_receiver
    with AgentClient(RUN, address=path, max_datagram=2000) as client:
        client.log_metric("a", 1.0)
        with pickle.loads(pickle.dumps(client)) as copy:
            assert (copy.run_id, copy.address, copy.max_datagram) == (RUN, f"unix:{path}", 2000)
            assert copy.records_sent == 0
            copy.log_metric("b", 1.0)
            assert copy.records_sent == 1
    assert [objects(recv_one(sock))[0]["metrics"][0]["key"] for _ in range(2)] == ["a", "b"]


def test_stdlib_only_and_works_copied_alone(tmp_path: Path, uds_receiver: tuple[socket.socket, str]) -> None:
    sock, path = uds_receiver
    shutil.copy(Path(__file__).parent.parent / "agent" / "client.py", tmp_path / "agent_client.py")
    code = f"""
import sys
sys.path.insert(0, {str(tmp_path)!r})
before = set(sys.modules)
import agent_client
new = {{m.partition(".")[0] for m in set(sys.modules) - before}} - {{"agent_client"}}
assert new <= set(sys.stdlib_module_names), new - set(sys.stdlib_module_names)
import os
os.environ["MLFLOW_RUN_ID"] = "standalone"
c = agent_client.AgentClient(address={path!r})
c.log_metric("x", 1.0)
assert c.records_sent == 1, c.stats()
assert "mlflow" not in sys.modules
"""
    subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, check=True, timeout=30)
    assert json.loads(recv_one(sock))["run_id"] == "standalone"
    # And as agent.client: the package's __init__ pulls nothing else in either.
    code = ("import sys; before = set(sys.modules); import agent.client; "
            "new = {m.partition('.')[0] for m in set(sys.modules) - before} - {'agent'}; "
            "assert new <= set(sys.stdlib_module_names), new")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, check=True, timeout=30)


# property ------------------------------------------------------------------------------------------------

KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./ ", min_size=1,
               max_size=60)


@pytest.fixture(scope="module")
def module_udp() -> Iterator[socket.socket]:
    """UDP on loopback with a large receive buffer: nothing is lost while the test reads after each call
    (a Unix socket would refuse more than net.unix.max_dgram_qlen datagrams in a row)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.dictionaries(KEYS, st.floats(), min_size=1, max_size=40),
       step=st.integers(min_value=-(2**63), max_value=2**63 - 1),
       timestamp=st.integers(min_value=0, max_value=2**53),
       max_datagram=st.integers(min_value=400, max_value=8192))
def test_any_float_dict_round_trips(module_udp: socket.socket, values: dict[str, float], step: int,
                                    timestamp: int, max_datagram: int) -> None:
    sock = module_udp
    with AgentClient(RUN, address=f"127.0.0.1:{sock.getsockname()[1]}", max_datagram=max_datagram) as client:
        client.log_metrics(values, step=step, timestamp=timestamp)
        assert client.records_sent == len(values), client.stats()
    got: list[dict[str, Any]] = []
    for data in recv_records(sock, len(values)):
        assert len(data) <= max_datagram
        (obj,) = objects(data)
        assert data == dumps(body(obj["metrics"]))  # the bytes json.dumps would write
        got.extend(obj["metrics"])
    assert_nothing_pending(sock)
    assert [m["key"] for m in got] == list(values)
    for m, value in zip(got, values.values(), strict=True):
        assert (m["timestamp"], m["step"]) == (timestamp, step)
        wire = m["value"]
        if math.isnan(value):
            assert wire == "NaN"
        elif math.isinf(value):
            assert wire == ("Infinity" if value > 0 else "-Infinity")
        else:
            assert repr(wire) == repr(value)  # exact, -0.0 included
