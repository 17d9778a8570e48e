"""Artifacts held on disk until the upstream has them: crash-safe, bounded, never whole in memory.

Layout under ``<spool_dir>/artifacts/``::

    incoming/<id>.data          an upload being received (deleted at start: never acknowledged)
    ready/<id>.data             a received file, fsynced before the client got its 200
    ready/<id>.json             its manifest: {"path", "size", "content_type", "at", "seq"}; written last,
                                so a manifest always names a complete file

``path`` is the artifact path as the client sent it (``<experiment>/<run>/artifacts/<relative path>``,
provisional ids included); the uploader translates ids when it sends the file. A second PUT of the same
path supersedes the first (as on the server); both are kept until uploaded, in order.

All file I/O runs in worker threads; the event loop only awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson

log = logging.getLogger("agent.artifacts")

_CHUNK = 1 << 20


class ArtifactBudgetExceeded(Exception):
    """The upload does not fit in the artifact budget: nothing of it was kept."""


class ArtifactPathError(ValueError):
    """A path that could leave the run's directory or is not a file path: refused, nothing written."""


@dataclass(frozen=True, slots=True)
class Artifact:
    id: str
    path: str
    size: int
    content_type: str
    at: float
    seq: int


def check_artifact_path(path: str) -> str:
    """A relative, normalised path: no ``..``, no absolute path, no NUL or backslash, no empty part."""
    if not path or "\x00" in path or "\\" in path or path.startswith("/") or path.endswith("/"):
        raise ArtifactPathError(f"invalid artifact path {path[:200]!r}")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts) or any(ord(c) < 32 for c in path):
        raise ArtifactPathError(f"invalid artifact path {path[:200]!r}: it must not contain '.', '..' or empty parts")
    return path


class ArtifactStore:
    """One per agent. ``open()`` before use; ``receive`` durably, ``pending`` to upload, ``done`` after."""

    def __init__(self, spool_dir: Path, *, max_bytes: int) -> None:
        self.directory = spool_dir / "artifacts"
        self.max_bytes = max_bytes
        self._ready: dict[str, Artifact] = {}
        self._receiving = 0  # bytes of uploads being received, charged against max_bytes
        self._seq = itertools.count(1)
        self.changed = asyncio.Event()  # set when a new artifact is ready (the uploader waits on it)
        self._empty = asyncio.Event()  # set while nothing waits for upload
        self._empty.set()
        self._left = asyncio.Event()  # set whenever a file stops waiting (uploaded, superseded or dead)

    @property
    def charged_bytes(self) -> int:
        return sum(a.size for a in self._ready.values()) + self._receiving

    async def open(self) -> int:
        """Load what a previous process left; returns how many artifacts wait for upload."""
        loaded = await asyncio.to_thread(self._load)
        for artifact in sorted(loaded, key=lambda a: (a.seq, a.at)):
            self._ready[artifact.id] = artifact
        if self._ready:
            self._empty.clear()
        self._seq = itertools.count(max((a.seq for a in loaded), default=0) + 1)
        return len(loaded)

    def _load(self) -> list[Artifact]:
        incoming, ready = self.directory / "incoming", self.directory / "ready"
        for folder in (incoming, ready):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in incoming.iterdir():  # never acknowledged to a client
            leftover.unlink(missing_ok=True)
        out = []
        for manifest in ready.glob("*.json"):
            try:
                data = orjson.loads(manifest.read_bytes())
                artifact = Artifact(manifest.stem, check_artifact_path(data["path"]), int(data["size"]),
                                    str(data.get("content_type") or "application/octet-stream"), float(data["at"]),
                                    int(data["seq"]))
            except (OSError, ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
                log.error("artifact manifest %s is unreadable (%s); left in place, not uploaded", manifest, exc)
                continue
            if not self.data_path(artifact).is_file():
                log.error("artifact %s has no data file; its manifest is removed", artifact.path)
                manifest.unlink(missing_ok=True)
                continue
            out.append(artifact)
        for half_written in ready.glob("*.json.tmp"):  # a manifest the crash interrupted: its data goes below
            half_written.unlink(missing_ok=True)
        for data_file in ready.glob("*.data"):  # a data file whose manifest never got written
            if not data_file.with_suffix(".json").exists():
                data_file.unlink(missing_ok=True)
        return out

    def data_path(self, artifact: Artifact) -> Path:
        return self.directory / "ready" / f"{artifact.id}.data"

    async def receive(self, path: str, content_type: str, chunks: AsyncIterator[bytes],
                      length: int | None) -> Artifact:
        """Stream a client's upload to disk; durable when this returns. Raises ArtifactBudgetExceeded."""
        check_artifact_path(path)
        if length is not None and self.charged_bytes + length > self.max_bytes:
            raise ArtifactBudgetExceeded(f"{length} bytes do not fit: {self.charged_bytes} of {self.max_bytes} "
                                         "bytes of the artifact budget are in use")
        artifact_id = uuid.uuid4().hex
        part = self.directory / "incoming" / f"{artifact_id}.data"
        handle = await asyncio.to_thread(_create_private, part)
        size = 0
        try:
            async for chunk in _rechunk(chunks):
                if self.charged_bytes + len(chunk) > self.max_bytes:
                    raise ArtifactBudgetExceeded(f"the upload passed the artifact budget of {self.max_bytes} bytes")
                self._receiving += len(chunk)
                size += len(chunk)
                await asyncio.to_thread(handle.write, chunk)
            await asyncio.to_thread(_sync_close, handle)
        except BaseException:
            with contextlib.suppress(OSError):
                handle.close()
            part.unlink(missing_ok=True)
            self._receiving -= size
            raise
        artifact = Artifact(artifact_id, path, size, content_type or "application/octet-stream", time.time(),
                            next(self._seq))
        try:
            await asyncio.to_thread(self._commit, part, artifact)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        finally:
            self._receiving -= size
        self._ready[artifact.id] = artifact
        self._empty.clear()
        self.changed.set()
        return artifact

    def _commit(self, part: Path, artifact: Artifact) -> None:
        ready = self.directory / "ready"
        os.replace(part, self.data_path(artifact))
        manifest = ready / f"{artifact.id}.json"
        body = orjson.dumps({"path": artifact.path, "size": artifact.size, "content_type": artifact.content_type,
                             "at": artifact.at, "seq": artifact.seq})
        tmp = ready / f"{artifact.id}.json.tmp"
        handle = _create_private(tmp)
        handle.write(body)
        _sync_close(handle)
        os.replace(tmp, manifest)
        _sync_dir(ready)

    def pending(self) -> list[Artifact]:
        """Waiting for upload, oldest first."""
        return sorted(self._ready.values(), key=lambda a: a.seq)

    def pending_under(self, prefix: str) -> bool:
        """Whether any file whose path starts with ``prefix`` waits for upload."""
        return any(a.path.startswith(prefix) for a in self._ready.values())

    async def wait_settled(self, prefix: str) -> None:
        """Until no file whose path starts with ``prefix`` waits for upload (each uploaded or dead)."""
        while self.pending_under(prefix):
            self._left.clear()
            await self._left.wait()

    def latest(self, path: str) -> Artifact | None:
        """The newest local copy of ``path`` (what a download must return until it is uploaded)."""
        found = [a for a in self._ready.values() if a.path == path]
        return max(found, key=lambda a: a.seq) if found else None

    def children(self, directory: str) -> dict[str, Artifact | None]:
        """Direct children of ``directory`` held locally: name -> newest artifact, or None for a folder."""
        prefix = directory.rstrip("/") + "/" if directory else ""
        out: dict[str, Artifact | None] = {}
        for artifact in self.pending():
            if not artifact.path.startswith(prefix):
                continue
            name, _, rest = artifact.path[len(prefix):].partition("/")
            out[name] = None if rest else artifact
        return out

    @property
    def dead_dir(self) -> Path:
        return self.directory / "dead"

    async def wait_empty(self, timeout: float) -> bool:
        """Wait until nothing waits for upload, for up to ``timeout`` seconds; whether that happened."""
        if self._empty.is_set():
            return True
        try:
            await asyncio.wait_for(self._empty.wait(), max(timeout, 0.0))
        except asyncio.TimeoutError:
            return False
        return True

    def _forget(self, artifact: Artifact) -> None:
        self._ready.pop(artifact.id, None)
        self._left.set()
        if not self._ready:
            self._empty.set()

    async def dead(self, artifact: Artifact, reason: str) -> None:
        """The upstream refuses it for good: keep the file and the reason in ``dead/``, out of the queue.
        Forgotten only once the files moved: whoever waits for the queue to empty (the drain) waits for
        that too, and a stop in between leaves it queued, never half-moved and forgotten."""
        await asyncio.to_thread(self._bury, artifact, reason)
        self._forget(artifact)

    def _bury(self, artifact: Artifact, reason: str) -> None:
        self.dead_dir.mkdir(exist_ok=True, mode=0o700)
        os.replace(self.data_path(artifact), self.dead_dir / f"{artifact.id}.data")
        body = orjson.dumps({"path": artifact.path, "size": artifact.size, "content_type": artifact.content_type,
                             "at": artifact.at, "seq": artifact.seq, "reason": reason, "dead_at": time.time()})
        handle = _create_private(self.dead_dir / f"{artifact.id}.json")
        handle.write(body)
        _sync_close(handle)
        (self.directory / "ready" / f"{artifact.id}.json").unlink(missing_ok=True)

    async def done(self, artifact: Artifact) -> None:
        """The upstream has it: delete the local copy, then forget it (see ``dead``)."""
        await asyncio.to_thread(self._delete, artifact)
        self._forget(artifact)

    def _delete(self, artifact: Artifact) -> None:
        (self.directory / "ready" / f"{artifact.id}.json").unlink(missing_ok=True)
        self.data_path(artifact).unlink(missing_ok=True)


async def _rechunk(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Fewer, larger writes: one thread hop per MiB, not per network read."""
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        if len(buffer) >= _CHUNK:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


def _create_private(path: Path) -> io.BufferedWriter:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    return os.fdopen(fd, "wb")


def _sync_close(handle: io.BufferedWriter) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
