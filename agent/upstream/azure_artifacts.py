"""Azure ML run artifacts: run history names a blob for each file, Azure Blob Storage holds its bytes.

Azure ML does not serve MLflow's artifact proxy; azureml-mlflow talks to run history instead
(research/azureml.md §2.6), and so does the agent, with the workspace's credential:

* upload: ``POST <history>/experimentids/<exp>/runs/<run>/artifacts/batch/metadata {"paths": [{"path"}]}``
  registers the file and answers a SAS URL for its blob (``artifactContentInformation[path].contentUri``);
  the bytes go there with ``PUT`` (``x-ms-blob-type: BlockBlob``), or for files over 256 MiB as blocks of
  64 MiB and a block list, so a large file never travels in one request;
* listing: ``GET .../artifacts/path?path=<dir>`` (paged by ``continuationToken``): every file below the
  folder, from which the direct children are made (Azure reports no sizes);
* download: ``GET .../artifacts/contentinfo?path=<file>`` answers a read SAS URL, which is streamed.

A SAS URL carries its own authorization: the workspace token is never sent to storage. Azure refuses to
register one path twice ("Resource Conflict ... already exists"). When the metadata call says so, the
upload goes to the SAS URL registration gave this process earlier (a retry after a broken-off upload),
else to the one ``contentinfo`` gives; if storage grants no write there, a blob that already has the
file's exact size is the earlier attempt's, done; anything else is refused for good, with the reason
(Azure ML keeps the first upload of a path: a second version of one file cannot be stored there).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

from agent.artifact_paths import AzureArtifactTarget
from agent.upstream.rest import MlflowRest, PermanentError, TransientError, classify

log = logging.getLogger("agent.artifacts")

SINGLE_PUT_MAX = 256 << 20  # larger files go as blocks
BLOCK_SIZE = 64 << 20
_READ = 1 << 20
_STORAGE_VERSION = "2021-08-06"
_PAGES_MAX = 10_000  # listing pages of one folder; far beyond Azure's 10 M artifacts per run


def _run_path(target: AzureArtifactTarget) -> str:
    return f"experimentids/{quote(target.experiment_id, safe='')}/runs/{quote(target.run_id, safe='')}/artifacts"


def _sas_url(info: object, what: str) -> str:
    url = info.get("contentUri") if isinstance(info, dict) else None
    if not isinstance(url, str) or urlsplit(url).scheme != "https":
        raise TransientError(f"{what}: run history answered no https content URI")
    return url


def _with_query(url: str, extra: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{extra}"


class AzureArtifacts:
    def __init__(self, rest: MlflowRest) -> None:
        self.rest = rest
        # Write SAS URLs run history gave this process, by (experiment, run, path): a retry of a broken-off
        # upload cannot register the path again, but may still write there.
        self._granted: dict[tuple[str, str, str], str] = {}

    # --- upload --------------------------------------------------------------------------------

    async def upload(self, target: AzureArtifactTarget, data: Path, size: int, content_type: str) -> None:
        """One attempt (the caller retries): register the path and write the blob. Raises UpstreamError."""
        key = (target.experiment_id, target.run_id, target.path)
        what = f"artifact {target.path} of run {target.run_id}"
        answer = await self.rest.call("POST", f"{_run_path(target)}/batch/metadata",
                                      body={"paths": [{"path": target.path}]}, history=True,
                                      label="history/artifacts/batch/metadata")
        granted = (answer.get("artifactContentInformation") or {}).get(target.path)
        if granted is not None:
            url = self._granted[key] = _sas_url(granted, what)
            await self._write(url, data, size, content_type, what, fresh=True)
            self._granted.pop(key, None)
            return
        error = (answer.get("errors") or {}).get(target.path)
        message = str((error or {}).get("error", {}).get("message") or error) if isinstance(error, dict) else ""
        if "already exists" not in message.lower():
            raise PermanentError(f"run history refused {what}: {message or answer}")
        earlier = self._granted.get(key)
        if earlier is not None:
            try:
                await self._write(earlier, data, size, content_type, what, fresh=False)
            except PermanentError:
                self._granted.pop(key, None)  # expired or revoked: the next attempt asks contentinfo
                raise TransientError(f"{what}: the SAS URL granted earlier is no longer accepted") from None
            self._granted.pop(key, None)
            return
        url = await self._content_url(target, what)
        try:
            await self._write(url, data, size, content_type, what, fresh=False)
        except PermanentError as exc:
            if await self._blob_size(url, what) == size:
                log.info("%s is upstream already (an earlier attempt finished it)", what)
                return
            raise PermanentError(f"Azure ML already holds {what} and grants no write access to it (it keeps the "
                                 f"first upload of a path: {exc})") from None

    async def _content_url(self, target: AzureArtifactTarget, what: str) -> str:
        answer = await self.rest.call("GET", f"{_run_path(target)}/contentinfo", params={"path": target.path},
                                      history=True, label="history/artifacts/contentinfo")
        return _sas_url(answer, what)

    async def _write(self, url: str, data: Path, size: int, content_type: str, what: str, *, fresh: bool) -> None:
        """The blob's bytes. A 403 on a SAS just granted is transient (a fresh one is asked next time); on an
        older one it means no write access: PermanentError."""
        base = {"x-ms-version": _STORAGE_VERSION}
        if size <= SINGLE_PUT_MAX:
            headers = {**base, "x-ms-blob-type": "BlockBlob", "Content-Type": content_type,
                       "Content-Length": str(size)}
            handle = await asyncio.to_thread(data.open, "rb")
            try:
                await self._check(await self.rest.storage("PUT", url, f"PUT {what}", data=handle, headers=headers),
                                  what, fresh)
            finally:
                await asyncio.to_thread(handle.close)
            return
        ids = []
        for index, offset in enumerate(range(0, size, BLOCK_SIZE)):
            block_id = base64.b64encode(f"{index:08d}".encode()).decode()
            length = min(BLOCK_SIZE, size - offset)
            block_url = _with_query(url, f"comp=block&blockid={quote(block_id, safe='')}")
            await self._check(await self.rest.storage(
                "PUT", block_url, f"PUT block {index} of {what}", data=_read_range(data, offset, length),
                headers={**base, "Content-Length": str(length)}), what, fresh)
            ids.append(block_id)
        body = ("<?xml version=\"1.0\" encoding=\"utf-8\"?><BlockList>"
                + "".join(f"<Latest>{i}</Latest>" for i in ids) + "</BlockList>").encode()
        await self._check(await self.rest.storage(
            "PUT", _with_query(url, "comp=blocklist"), f"PUT block list of {what}", data=body,
            headers={**base, "x-ms-blob-content-type": content_type, "Content-Type": "application/xml"}), what, fresh)

    @staticmethod
    async def _check(answer: tuple[int, Mapping[str, str], bytes], what: str, fresh: bool) -> None:
        status, headers, body = answer
        if status in (200, 201):
            return
        code = headers.get("x-ms-error-code") or ""
        if status == 403 and fresh:
            raise TransientError(f"storage refused the SAS URL for {what} ({code or status}); asking again",
                                 status=status)
        error = classify(status, body, headers)
        if status == 403:
            raise PermanentError(f"storage refused to write {what}: {code or status}", status=status)
        if isinstance(error, PermanentError):
            raise PermanentError(f"storage refused {what}: HTTP {status} {code}".strip(), status=status)
        raise error

    async def _blob_size(self, url: str, what: str) -> int | None:
        status, headers, _ = await self.rest.storage("HEAD", url, f"HEAD {what}")
        if status != 200:
            return None
        try:
            return int(headers.get("Content-Length", ""))
        except ValueError:
            return None

    # --- reads ---------------------------------------------------------------------------------

    async def children(self, target: AzureArtifactTarget, timeout: float) -> dict[str, dict[str, Any]]:
        """The direct children of a folder (``target.path``, "" for the run's root) as MLflow lists them:
        name -> {"path": name, "is_dir"}; Azure reports no sizes."""
        prefix = f"{target.path}/" if target.path else ""
        out: dict[str, dict[str, Any]] = {}
        token: str | None = None
        for _ in range(_PAGES_MAX):
            params = {"path": target.path} if target.path else {}
            if token:
                params["continuationToken"] = token
            endpoint = f"{_run_path(target)}/path" if target.path else _run_path(target)
            answer = await self.rest.call("GET", endpoint, params=params, history=True, timeout=timeout,
                                          label="history/artifacts/list")
            for artifact in answer.get("value") or []:
                path = artifact.get("path") if isinstance(artifact, dict) else None
                if not isinstance(path, str) or not path.startswith(prefix) or path == prefix:
                    continue
                name, _, below = path[len(prefix):].partition("/")
                if below:
                    out[name] = {"path": name, "is_dir": True}
                else:
                    out.setdefault(name, {"path": name, "is_dir": False})
            token = answer.get("continuationToken") or None
            if token is None:
                break
        return out

    async def download_url(self, target: AzureArtifactTarget, timeout: float) -> str:
        answer = await self.rest.call("GET", f"{_run_path(target)}/contentinfo", params={"path": target.path},
                                      history=True, timeout=timeout, label="history/artifacts/contentinfo")
        return _sas_url(answer, f"artifact {target.path}")


async def _read_range(data: Path, offset: int, length: int) -> AsyncIterator[bytes]:
    """``length`` bytes of a file from ``offset``, a MiB per read, each read in a worker thread."""
    handle: BinaryIO = await asyncio.to_thread(data.open, "rb")
    try:
        await asyncio.to_thread(handle.seek, offset)
        left = length
        while left > 0:
            chunk = await asyncio.to_thread(handle.read, min(_READ, left))
            if not chunk:
                raise TransientError(f"{data} ended {left} bytes early")
            left -= len(chunk)
            yield chunk
    finally:
        await asyncio.to_thread(handle.close)
