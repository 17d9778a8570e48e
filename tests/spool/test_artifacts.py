"""The artifact store against real files: what lands on disk, what a crash leaves and how it is
cleaned up at open, the budget, path checks, and the done/dead moves."""

from __future__ import annotations

import logging
import stat
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import orjson
import pytest

from agent.spool.artifacts import (
    Artifact,
    ArtifactBudgetExceeded,
    ArtifactPathError,
    ArtifactStore,
    check_artifact_path,
)

MiB = 1 << 20
RUN_PATH = "0/0123456789abcdef0123456789abcdef/artifacts"


async def chunks(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


async def opened(tmp_path: Path, max_bytes: int = 64 * MiB) -> ArtifactStore:
    store = ArtifactStore(tmp_path, max_bytes=max_bytes)
    await store.open()
    return store


async def put(store: ArtifactStore, path: str, data: bytes, *, declare: bool = True,
              content_type: str = "text/plain") -> Artifact:
    parts = [data[i:i + 4096] for i in range(0, len(data), 4096)] or [b""]
    return await store.receive(path, content_type, chunks(parts), len(data) if declare else None)


# -- receiving ----------------------------------------------------------------------------------------------


async def test_receive_writes_a_private_file_and_its_manifest(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    data = bytes(range(256)) * 10_000  # 2.5 MB: several rechunked writes
    artifact = await put(store, f"{RUN_PATH}/model/weights.bin", data, declare=False,
                         content_type="application/octet-stream")

    ready = tmp_path / "artifacts" / "ready"
    assert files(ready) == sorted([f"{artifact.id}.data", f"{artifact.id}.json"])
    assert files(tmp_path / "artifacts" / "incoming") == []
    assert (ready / f"{artifact.id}.data").read_bytes() == data
    for name in files(ready):
        assert stat.S_IMODE((ready / name).stat().st_mode) == 0o600, name
    manifest = orjson.loads((ready / f"{artifact.id}.json").read_bytes())
    assert manifest == {"path": f"{RUN_PATH}/model/weights.bin", "size": len(data),
                        "content_type": "application/octet-stream", "at": artifact.at, "seq": artifact.seq}
    assert store.pending() == [artifact]
    assert store.charged_bytes == len(data)
    assert store.changed.is_set()
    assert store.data_path(artifact) == ready / f"{artifact.id}.data"


async def test_empty_file_and_default_content_type(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    artifact = await put(store, f"{RUN_PATH}/empty.txt", b"", content_type="")
    assert artifact.size == 0
    assert artifact.content_type == "application/octet-stream"
    assert store.data_path(artifact).read_bytes() == b""


async def test_latest_is_the_newest_put_of_a_path(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    first = await put(store, f"{RUN_PATH}/a.txt", b"first")
    other = await put(store, f"{RUN_PATH}/b.txt", b"other")
    second = await put(store, f"{RUN_PATH}/a.txt", b"second")
    assert store.latest(f"{RUN_PATH}/a.txt") == second
    assert store.latest(f"{RUN_PATH}/b.txt") == other
    assert store.latest(f"{RUN_PATH}/c.txt") is None
    assert store.pending() == [first, other, second]  # both copies kept, in order
    assert store.data_path(store.latest(f"{RUN_PATH}/a.txt") or first).read_bytes() == b"second"


async def test_children_of_nested_paths(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    top = await put(store, f"{RUN_PATH}/top.txt", b"1")
    await put(store, f"{RUN_PATH}/dir/a.txt", b"22")
    deep = await put(store, f"{RUN_PATH}/dir/sub/b.bin", b"333")
    again = await put(store, f"{RUN_PATH}/top.txt", b"4444")
    assert store.children(RUN_PATH) == {"top.txt": again, "dir": None}
    assert store.children(RUN_PATH + "/") == {"top.txt": again, "dir": None}
    assert set(store.children(f"{RUN_PATH}/dir")) == {"a.txt", "sub"}
    assert store.children(f"{RUN_PATH}/dir")["sub"] is None
    assert store.children(f"{RUN_PATH}/dir/sub") == {"b.bin": deep}
    assert store.children(f"{RUN_PATH}/di") == {}  # a prefix of a name is not a folder
    assert store.children(f"{RUN_PATH}/top.txt") == {}
    assert store.children("") == {"0": None}
    assert top in store.pending()


# -- crash leftovers ----------------------------------------------------------------------------------------


def write_manifest(ready: Path, artifact_id: str, path: str, size: int, seq: int) -> None:
    ready.mkdir(parents=True, exist_ok=True)
    (ready / f"{artifact_id}.json").write_bytes(orjson.dumps(
        {"path": path, "size": size, "content_type": "text/plain", "at": 1.0 + seq, "seq": seq}))


async def test_open_cleans_up_what_a_crash_left(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = tmp_path / "artifacts"
    incoming, ready = base / "incoming", base / "ready"
    incoming.mkdir(parents=True)
    ready.mkdir(parents=True)
    (incoming / "stray.data").write_bytes(b"never acknowledged")
    (ready / "nomanifest.data").write_bytes(b"manifest never written")
    write_manifest(ready, "nodata", f"{RUN_PATH}/gone.txt", 3, 1)
    (ready / "garbled.json").write_bytes(b"{not json")
    (ready / "garbled.data").write_bytes(b"kept with its unreadable manifest")
    (ready / "escape.json").write_bytes(orjson.dumps(
        {"path": "../../etc/passwd", "size": 1, "content_type": "x", "at": 1.0, "seq": 9}))
    for seq, artifact_id in ((3, "c"), (1, "a"), (2, "b")):
        write_manifest(ready, artifact_id, f"{RUN_PATH}/{artifact_id}.txt", 1, seq + 10)
        (ready / f"{artifact_id}.data").write_bytes(artifact_id.encode())

    caplog.set_level(logging.ERROR, logger="agent.artifacts")
    store = ArtifactStore(tmp_path, max_bytes=MiB)
    assert await store.open() == 3

    assert files(incoming) == []
    assert [a.id for a in store.pending()] == ["a", "b", "c"]  # by seq, not by name or listing order
    assert [a.seq for a in store.pending()] == [11, 12, 13]
    assert files(ready) == sorted(["a.data", "a.json", "b.data", "b.json", "c.data", "c.json",
                                   "garbled.data", "garbled.json", "escape.json"])
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("gone.txt" in m and "no data file" in m for m in messages), messages
    assert any("garbled.json" in m and "unreadable" in m for m in messages), messages
    assert any("escape.json" in m and "unreadable" in m for m in messages), messages
    assert store.charged_bytes == 3
    assert not await store.wait_empty(0.05)

    # New artifacts continue the sequence after what was loaded.
    new = await put(store, f"{RUN_PATH}/d.txt", b"d")
    assert new.seq == 14
    assert store.pending()[-1] == new


async def test_reopen_reloads_what_was_received(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    received = [await put(store, f"{RUN_PATH}/f{i}.txt", f"file {i}".encode()) for i in range(5)]
    await store.done(received[1])

    again = ArtifactStore(tmp_path, max_bytes=64 * MiB)
    assert await again.open() == 4
    assert again.pending() == [received[i] for i in (0, 2, 3, 4)]
    assert again.data_path(received[4]).read_bytes() == b"file 4"
    assert again.charged_bytes == sum(a.size for a in again.pending())


# -- the budget ---------------------------------------------------------------------------------------------


async def test_declared_length_over_budget_is_refused_before_writing(tmp_path: Path) -> None:
    store = await opened(tmp_path, max_bytes=MiB)
    await put(store, f"{RUN_PATH}/small.bin", b"x" * 1000)
    consumed = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal consumed
        consumed = True
        yield b"y" * MiB

    with pytest.raises(ArtifactBudgetExceeded, match="do not fit"):
        await store.receive(f"{RUN_PATH}/big.bin", "x", body(), MiB)
    assert not consumed
    assert files(tmp_path / "artifacts" / "incoming") == []
    assert len(files(tmp_path / "artifacts" / "ready")) == 2
    assert store.charged_bytes == 1000
    # Exactly filling the budget is allowed.
    fits = await put(store, f"{RUN_PATH}/fits.bin", b"z" * (MiB - 1000))
    assert store.charged_bytes == MiB
    assert fits.size == MiB - 1000


async def test_stream_crossing_the_budget_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    store = await opened(tmp_path, max_bytes=3 * MiB)
    kept = await put(store, f"{RUN_PATH}/kept.bin", b"k" * MiB)
    before = store.charged_bytes
    sent = 0

    async def body() -> AsyncIterator[bytes]:  # no Content-Length: 4 MiB in 64 KiB pieces
        nonlocal sent
        for _ in range(64):
            sent += 64 * 1024
            yield b"s" * (64 * 1024)

    with pytest.raises(ArtifactBudgetExceeded, match="passed the artifact budget"):
        await store.receive(f"{RUN_PATH}/stream.bin", "x", body(), None)
    assert sent < 4 * MiB  # stopped reading once over
    assert store.charged_bytes == before
    assert files(tmp_path / "artifacts" / "incoming") == []
    assert files(tmp_path / "artifacts" / "ready") == sorted([f"{kept.id}.data", f"{kept.id}.json"])
    assert store.pending() == [kept]
    # The budget freed by the failure is usable again.
    await put(store, f"{RUN_PATH}/after.bin", b"a" * (2 * MiB), declare=False)
    assert store.charged_bytes == 3 * MiB


async def test_a_failing_client_stream_leaves_nothing(tmp_path: Path) -> None:
    store = await opened(tmp_path)

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * (2 * MiB)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.receive(f"{RUN_PATH}/cut.bin", "x", body(), 4 * MiB)
    assert store.charged_bytes == 0
    assert files(tmp_path / "artifacts" / "incoming") == []
    assert files(tmp_path / "artifacts" / "ready") == []
    assert await store.wait_empty(0.05)


# -- paths --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "a.txt", "1/run/artifacts/dir/sub/file.bin", "x/..y/z", "x/y../z", "a b/ü.txt", "..a", ".hidden",
])
def test_valid_paths(path: str) -> None:
    assert check_artifact_path(path) == path


@pytest.mark.parametrize("path", [
    "", "/abs", "//double", "a/../b", "../a", "a/..", "a/./b", "./a", ".", "..", "a//b", "a/", "a\\b",
    "a\x00b", "a\nb", "a\tb", "a\x1fb",
])
async def test_invalid_paths_are_refused_and_nothing_is_written(tmp_path: Path, path: str) -> None:
    with pytest.raises(ArtifactPathError):
        check_artifact_path(path)
    store = await opened(tmp_path)
    with pytest.raises(ArtifactPathError):
        await put(store, path, b"data")
    assert files(tmp_path / "artifacts" / "incoming") == []
    assert files(tmp_path / "artifacts" / "ready") == []
    assert store.charged_bytes == 0


# -- leaving: done and dead ---------------------------------------------------------------------------------


async def test_done_and_dead_move_the_right_files(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    a = await put(store, f"{RUN_PATH}/a.txt", b"aaa")
    b = await put(store, f"{RUN_PATH}/b.txt", b"bbbb")
    c = await put(store, f"{RUN_PATH}/c.txt", b"ccccc")
    ready, dead = tmp_path / "artifacts" / "ready", tmp_path / "artifacts" / "dead"
    assert not await store.wait_empty(0.05)

    await store.done(b)
    assert files(ready) == sorted(f"{x.id}.{ext}" for x in (a, c) for ext in ("data", "json"))
    assert store.pending() == [a, c]
    assert store.charged_bytes == 8

    await store.dead(a, "INVALID_PARAMETER_VALUE: refused upstream")
    assert files(ready) == sorted([f"{c.id}.data", f"{c.id}.json"])
    assert files(dead) == sorted([f"{a.id}.data", f"{a.id}.json"])
    assert (dead / f"{a.id}.data").read_bytes() == b"aaa"
    buried = orjson.loads((dead / f"{a.id}.json").read_bytes())
    assert buried["path"] == a.path
    assert buried["reason"] == "INVALID_PARAMETER_VALUE: refused upstream"
    assert buried["size"] == 3
    assert stat.S_IMODE((dead / f"{a.id}.json").stat().st_mode) == 0o600
    assert store.pending() == [c]
    assert not await store.wait_empty(0.05)

    await store.done(c)
    assert await store.wait_empty(0.05)
    assert files(ready) == []
    assert store.charged_bytes == 0

    # A restart loads nothing from dead/.
    again = ArtifactStore(tmp_path, max_bytes=MiB)
    assert await again.open() == 0
    assert files(dead) == sorted([f"{a.id}.data", f"{a.id}.json"])


async def test_wait_empty_wakes_when_the_last_one_is_done(tmp_path: Path) -> None:
    import asyncio

    store = await opened(tmp_path)
    assert await store.wait_empty(0.05)
    a = await put(store, f"{RUN_PATH}/a.txt", b"a")
    waiter = asyncio.create_task(store.wait_empty(30))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await store.done(a)
    assert await asyncio.wait_for(waiter, 5)


async def test_wait_empty_with_no_time_left_on_an_empty_store(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    assert store.pending() == []
    assert await store.wait_empty(0)


async def test_open_removes_a_half_written_manifest(tmp_path: Path) -> None:
    ready = tmp_path / "artifacts" / "ready"
    ready.mkdir(parents=True)
    (ready / "torn.data").write_bytes(b"complete data, manifest not renamed yet")
    (ready / "torn.json.tmp").write_bytes(b'{"path": "0/r/artifacts/a.txt", "si')
    store = ArtifactStore(tmp_path, max_bytes=MiB)
    assert await store.open() == 0
    assert files(ready) == []
