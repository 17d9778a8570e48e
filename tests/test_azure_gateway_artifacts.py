"""The Azure ML stand-in's artifact path (tests/support/azure_gateway.py): run history registers a run's
artifact paths and hands out SAS URLs; Blob Storage, on the same HTTPS listener, takes and serves the bytes
under Azure Storage's rules. Also: runs' ``artifact_uri`` look like Azure's and MLflow's artifact proxy API
is not served.

Driven with plain ``requests`` (trusting the gateway's certificate) and a token from ``POST /__mint``; one
gateway for the module, in front of the session's MLflow server. Settings changed by a test are put back
after it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit
from xml.etree import ElementTree

import pytest
import requests

from tests.integration.azure_helpers import gateways
from tests.support.azure_gateway import SAS_EXPIRY_FORMAT, AzureGateway, mint_token, token_fingerprint
from tests.support.mlflow_server import MlflowServer

pytestmark = pytest.mark.integration

TIMEOUT = 30


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, mlflow_server: MlflowServer) -> Iterator[AzureGateway]:
    with gateways(tmp_path_factory.mktemp("azure-artifacts"), mlflow_server) as make:
        yield make()


@pytest.fixture(autouse=True)
def default_settings(gateway: AzureGateway) -> Iterator[None]:
    yield
    gateway.set(**asdict(gateway.initial_config))


@dataclass(frozen=True)
class Run:
    experiment_id: str
    experiment_name: str
    run_id: str
    info: dict[str, Any]


class Workspace:
    """The gateway as a client sees it: ``api`` carries the workspace token, ``storage`` never does."""

    def __init__(self, gateway: AzureGateway) -> None:
        self.gateway = gateway
        self.token = gateway.mint(ttl=600)
        self.api = self._session()
        self.api.headers["Authorization"] = f"Bearer {self.token}"
        self.storage = self._session()

    def _session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False
        session.verify = str(self.gateway.cert_path)
        return session

    def close(self) -> None:
        self.api.close()
        self.storage.close()

    def mlflow(self, endpoint: str, body: dict[str, Any] | None = None, *, version: str = "v2.0",
               params: dict[str, str] | None = None) -> requests.Response:
        """POST (with ``body``) or GET an MLflow endpoint of the workspace."""
        url = f"{self.gateway.url}/mlflow/{version}{self.gateway.scope}/api/2.0/mlflow/{endpoint}"
        if body is None:
            return self.api.get(url, params=params, timeout=TIMEOUT)
        return self.api.post(url, json=body, timeout=TIMEOUT)

    def mlflow_ok(self, endpoint: str, body: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        resp = self.mlflow(endpoint, body, **kwargs)
        assert resp.status_code == 200, (endpoint, resp.status_code, resp.text)
        assert int(resp.headers["Content-Length"]) == len(resp.content)
        data: dict[str, Any] = resp.json()
        return data

    def artifacts_url(self, run: Run, *, by_name: bool = False) -> str:
        experiment = f"experiments/{run.experiment_name}" if by_name else f"experimentids/{run.experiment_id}"
        return f"{self.gateway.url}/history/v1.0{self.gateway.scope}/{experiment}/runs/{run.run_id}/artifacts"

    def register_response(self, run: Run, paths: list[str], *, by_name: bool = False) -> requests.Response:
        return self.api.post(self.artifacts_url(run, by_name=by_name) + "/batch/metadata",
                             json={"paths": [{"path": p} for p in paths]}, timeout=TIMEOUT)

    def register(self, run: Run, *paths: str, by_name: bool = False) -> dict[str, Any]:
        resp = self.register_response(run, list(paths), by_name=by_name)
        assert resp.status_code == 200, resp.text
        data: dict[str, Any] = resp.json()
        return data

    def write_url(self, run: Run, path: str) -> str:
        data = self.register(run, path)
        assert data["errors"] == {}, data["errors"]
        url: str = data["artifactContentInformation"][path]["contentUri"]
        return url

    def content_info(self, run: Run, path: str, *, by_name: bool = False) -> requests.Response:
        return self.api.get(self.artifacts_url(run, by_name=by_name) + "/contentinfo", params={"path": path},
                            timeout=TIMEOUT)

    def read_url(self, run: Run, path: str) -> str:
        resp = self.content_info(run, path)
        assert resp.status_code == 200, resp.text
        url: str = resp.json()["contentUri"]
        return url

    def put(self, url: str, data: Any, **headers: str) -> requests.Response:
        """Put Blob: ``x-ms-blob-type: BlockBlob`` unless ``headers`` says otherwise (a header given as ``"-"`` is
        left out)."""
        sent = {"x-ms-blob-type": "BlockBlob", **headers}
        return self.storage.put(url, data=data, headers={k: v for k, v in sent.items() if v != "-"},
                                timeout=TIMEOUT)


@pytest.fixture
def ws(gateway: AzureGateway) -> Iterator[Workspace]:
    workspace = Workspace(gateway)
    try:
        yield workspace
    finally:
        workspace.close()


@pytest.fixture
def run(ws: Workspace, experiment_name: str) -> Run:
    """A run created through the gateway's MLflow API, in an experiment of its own."""
    experiment_id = ws.mlflow_ok("experiments/create", {"name": experiment_name})["experiment_id"]
    info = ws.mlflow_ok("runs/create", {"experiment_id": experiment_id,
                                        "start_time": int(time.time() * 1000)})["run"]["info"]
    return Run(str(experiment_id), experiment_name, info["run_id"], info)


# -- helpers ---------------------------------------------------------------------------------------------------


def storage_code(resp: requests.Response) -> str:
    """The code of Azure Storage's XML error (checked against ``x-ms-error-code``)."""
    assert resp.headers["Content-Type"] == "application/xml", resp.headers
    root = ElementTree.fromstring(resp.content)
    assert root.tag == "Error", resp.text
    code = root.findtext("Code")
    assert code is not None and resp.headers["x-ms-error-code"] == code, resp.text
    assert root.findtext("Message"), resp.text
    return code


def azure_code(resp: requests.Response) -> str:
    code: str = resp.json()["error"]["code"]
    return code


def sas_params(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def with_sas(url: str, **changes: str | None) -> str:
    """``url`` with SAS parameters changed (None: left out); the path stays as encoded."""
    base, _, query = url.partition("?")
    params: dict[str, str | None] = {**{k: v[0] for k, v in parse_qs(query).items()}, **changes}
    return f"{base}?{urlencode({k: v for k, v in params.items() if v is not None})}"


def sas_expiry(url: str) -> float:
    return datetime.strptime(sas_params(url)["se"], SAS_EXPIRY_FORMAT).replace(tzinfo=timezone.utc).timestamp()


def delta(gateway: AzureGateway, group: str) -> Callable[[], dict[str, int]]:
    """``since()`` -> how much each count of ``/__stats[group]`` grew since this call (non-zero ones)."""
    before: dict[str, int] = gateway.stats()[group]

    def since() -> dict[str, int]:
        now: dict[str, int] = gateway.stats()[group]
        return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}

    return since


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def block_id(n: int, width: int = 6) -> str:
    return base64.b64encode(f"block-{n:0{width}d}".encode()).decode()


def pages(ws: Workspace, url: str, params: dict[str, str] | None = None) -> list[list[str]]:
    """The paths of every page of a listing, following continuation tokens."""
    out: list[list[str]] = []
    query = dict(params or {})
    while True:
        resp = ws.api.get(url, params=query, timeout=TIMEOUT)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body) == {"value", "continuationToken", "nextLink"} and body["nextLink"] is None, body
        out.append([a["path"] for a in body["value"]])
        if body["continuationToken"] is None:
            return out
        query["continuationToken"] = body["continuationToken"]
        assert len(out) < 20, "the listing never ends"


def peak_rss(pid: int) -> int:
    """VmHWM of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


# -- the MLflow endpoint ------------------------------------------------------------------------------------------


def test_run_artifact_uris_are_azure_shaped(gateway: AzureGateway, ws: Workspace, run: Run,
                                            mlflow_server: MlflowServer) -> None:
    expected = (f"azureml://{gateway.host}/mlflow/v2.0{gateway.scope}/experiments/{run.experiment_id}/runs/"
                f"{run.run_id}/artifacts")
    assert run.info["artifact_uri"] == expected  # runs/create
    for version in ("v2.0", "v1.0"):
        got = ws.mlflow_ok("runs/get", params={"run_id": run.run_id}, version=version)
        assert got["run"]["info"]["artifact_uri"] == expected, version
    found = ws.mlflow_ok("runs/search", {"experiment_ids": [run.experiment_id]})
    assert [r["info"]["artifact_uri"] for r in found["runs"]] == [expected]
    updated = ws.mlflow_ok("runs/update", {"run_id": run.run_id, "status": "FINISHED"})
    assert updated["run_info"]["artifact_uri"] == expected
    # The real server still has MLflow's own URI: the gateway rewrote it.
    direct = requests.get(f"{mlflow_server.url}/api/2.0/mlflow/runs/get", params={"run_id": run.run_id},
                          timeout=TIMEOUT)
    assert direct.json()["run"]["info"]["artifact_uri"] == (
        f"mlflow-artifacts:/{run.experiment_id}/{run.run_id}/artifacts")
    # Answers without a run are passed on byte for byte.
    params = {"experiment_id": run.experiment_id}
    via = ws.mlflow("experiments/get", params=params)
    assert via.status_code == 200
    assert via.content == requests.get(f"{mlflow_server.url}/api/2.0/mlflow/experiments/get", params=params,
                                       timeout=TIMEOUT).content


def test_mlflow_artifact_api_is_not_served(gateway: AzureGateway, ws: Workspace, run: Run,
                                           mlflow_server: MlflowServer) -> None:
    forwarded = gateway.stats()["forwarded"]
    name = f"proxied-{uuid.uuid4().hex}.txt"
    for version in ("v2.0", "v1.0"):
        url = (f"{gateway.url}/mlflow/{version}{gateway.scope}/api/2.0/mlflow-artifacts/artifacts/"
               f"{run.experiment_id}/{run.run_id}/artifacts/{name}")
        for resp in (ws.api.put(url, data=b"bytes", timeout=TIMEOUT), ws.api.get(url, timeout=TIMEOUT)):
            assert resp.status_code == 404, (version, resp.text)
            assert azure_code(resp) == "NotFound"
    stats = gateway.stats()
    assert stats["forwarded"] == forwarded
    assert not [e for e in stats["forwarded_by_endpoint"] if e.startswith("mlflow-artifacts")]
    assert not list(mlflow_server.artifacts_dir.rglob(name))


# -- run history ----------------------------------------------------------------------------------------------------


def test_upload_then_download(gateway: AzureGateway, ws: Workspace, run: Run) -> None:
    artifacts, blob = delta(gateway, "artifacts"), delta(gateway, "blob")
    files = {"model/weights.bin": os.urandom(300_000), "notes/a b+c ü%.txt": b"hello, Azure\n"}
    registered = ws.register(run, *files, by_name=True)
    assert registered["errors"] == {}
    container = f"dcid.{run.run_id}"
    for path in files:
        artifact = registered["artifacts"][path]
        assert set(artifact) == {"artifactId", "origin", "container", "path", "createdTime", "etag"}
        assert (artifact["artifactId"], artifact["origin"], artifact["container"], artifact["path"]) == (
            f"ExperimentRun/{container}/{path}", "ExperimentRun", container, path)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z", artifact["createdTime"]), artifact
        info = registered["artifactContentInformation"][path]
        assert {k: info[k] for k in ("origin", "container", "path")} == {
            "origin": "ExperimentRun", "container": container, "path": path}
        assert info["contentUri"].startswith(f"https://{gateway.host}/blob/azureml/ExperimentRun/{container}/")
        sas = sas_params(info["contentUri"])
        assert (sas["sv"], sas["sr"], sas["sp"]) == ("2021-08-06", "b", "rcw")
        assert 3590 < sas_expiry(info["contentUri"]) - time.time() <= 3601

    etags = {}
    for path, data in files.items():
        content_type = "text/plain" if path.endswith(".txt") else "-"
        put = ws.put(registered["artifactContentInformation"][path]["contentUri"], data, **{
            "Content-Type": content_type})
        assert put.status_code == 201, put.text
        assert put.headers["Content-MD5"] == md5_b64(data)
        etags[path] = put.headers["ETag"]
        assert gateway.blob_file(run.run_id, path).read_bytes() == data

    for path, data in files.items():
        info = ws.content_info(run, path)
        assert info.status_code == 200, info.text
        assert set(info.json()) == {"contentUri", "origin", "container", "path"}
        url = info.json()["contentUri"]
        assert sas_params(url)["sp"] == "r"
        got = ws.storage.get(url, timeout=TIMEOUT)
        assert got.status_code == 200 and got.content == data
        assert got.headers["Content-Length"] == str(len(data))
        assert got.headers["Content-Type"] == ("text/plain" if path.endswith(".txt") else "application/octet-stream")
        assert got.headers["ETag"] == etags[path]
        assert got.headers["Content-MD5"] == md5_b64(data)
        head = ws.storage.head(url, timeout=TIMEOUT)
        assert head.status_code == 200 and head.content == b""
        assert {k: head.headers[k] for k in ("Content-Length", "Content-Type", "ETag")} == {
            k: got.headers[k] for k in ("Content-Length", "Content-Type", "ETag")}
    weights = files["model/weights.bin"]
    part = ws.storage.get(ws.read_url(run, "model/weights.bin"), headers={"x-ms-range": "bytes=10-19"},
                          timeout=TIMEOUT)
    assert part.status_code == 206 and part.content == weights[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(weights)}"

    # A second Put Blob replaces the bytes.
    replaced = ws.put(registered["artifactContentInformation"]["model/weights.bin"]["contentUri"], b"v2")
    assert replaced.status_code == 201 and replaced.headers["ETag"] != etags["model/weights.bin"]
    assert ws.storage.get(ws.read_url(run, "model/weights.bin"), timeout=TIMEOUT).content == b"v2"

    assert gateway.artifact_paths(run.run_id) == sorted(files)
    unknown = ws.content_info(run, "not/registered.txt")
    assert unknown.status_code == 404 and azure_code(unknown) == "UserError"
    never = ws.write_url(run, "never-uploaded.txt")
    missing = ws.storage.get(never, timeout=TIMEOUT)
    assert missing.status_code == 404 and storage_code(missing) == "BlobNotFound"
    assert artifacts() == {"metadata_requests": 2, "created": 3, "contentinfo": 4, "not_found": 1}
    assert blob() == {"put": 3, "stored": 3, "get": 5, "head": 2, "not_found": 1}


def test_a_path_is_registered_once(gateway: AzureGateway, ws: Workspace, run: Run) -> None:
    conflicts = delta(gateway, "artifacts")
    first = ws.register(run, "a.txt")
    assert set(first["artifacts"]) == {"a.txt"} and first["errors"] == {}
    conflict = {"error": {"code": "UserError",
                          "message": f"Resource Conflict: ArtifactId ExperimentRun/dcid.{run.run_id}/a.txt already "
                                     "exists."}}
    second = ws.register(run, "a.txt", "b.txt")
    assert second["errors"] == {"a.txt": conflict}
    assert set(second["artifacts"]) == set(second["artifactContentInformation"]) == {"b.txt"}
    by_name = ws.register(run, "b.txt", by_name=True)  # the same run, named through its experiment's name
    assert set(by_name["errors"]) == {"b.txt"} and by_name["artifacts"] == by_name["artifactContentInformation"] == {}
    assert gateway.artifact_paths(run.run_id) == ["a.txt", "b.txt"]
    assert conflicts() == {"metadata_requests": 3, "created": 2, "conflicts": 2}


def test_bad_paths_and_batch_size(gateway: AzureGateway, ws: Workspace, run: Run) -> None:
    bad = ["", "/abs.txt", "a//b.txt", "./a.txt", "a/../b.txt", "dir/", "a\\b.txt", "nul\x00.txt", "x" * 5001]
    longest = "y" * 5000
    answer = ws.register(run, *bad, "ok.txt", longest)
    assert set(answer["errors"]) == set(bad)
    for path, error in answer["errors"].items():
        assert error["error"]["code"] == "UserError", path
        assert "invalid artifact path" in error["error"]["message"], path
    assert set(answer["artifacts"]) == {"ok.txt", longest}
    put = ws.put(answer["artifactContentInformation"][longest]["contentUri"], b"long name")
    assert put.status_code == 201, put.text
    assert ws.storage.get(ws.read_url(run, longest), timeout=TIMEOUT).content == b"long name"

    too_many = ws.register_response(run, [f"many/{i}.txt" for i in range(101)])
    assert too_many.status_code == 400 and azure_code(too_many) == "UserError"
    assert too_many.json()["error"]["message"] == "Artifact batch size exceeded the limit of 100"
    assert gateway.artifact_paths(run.run_id) == sorted(["ok.txt", longest])
    most = ws.register(run, *(f"many/{i:03d}.txt" for i in range(100)))
    assert len(most["artifacts"]) == 100 and most["errors"] == {}
    shapeless = ws.api.post(ws.artifacts_url(run) + "/batch/metadata", json={"paths": "a.txt"}, timeout=TIMEOUT)
    assert shapeless.status_code == 400 and azure_code(shapeless) == "UserError"


def test_listing_pages(gateway: AzureGateway, ws: Workspace, run: Run) -> None:
    gateway.set(artifact_page_size=2)
    listings = delta(gateway, "artifacts")
    files = ["d1/sub/d.txt", "a.txt", "d1x/e.txt", "d1/b.txt", "d1/sub/c.txt"]
    records = ws.register(run, *files)["artifacts"]
    whole = ws.artifacts_url(run)
    assert pages(ws, whole) == [["a.txt", "d1/b.txt"], ["d1/sub/c.txt", "d1/sub/d.txt"], ["d1x/e.txt"]]
    first = ws.api.get(whole, timeout=TIMEOUT).json()
    assert first["value"] == [records["a.txt"], records["d1/b.txt"]]
    in_path = ws.artifacts_url(run, by_name=True) + "/path"
    assert pages(ws, in_path, {"path": "d1"}) == [["d1/b.txt", "d1/sub/c.txt"], ["d1/sub/d.txt"]]
    assert pages(ws, in_path, {"path": "d1/sub/"}) == [["d1/sub/c.txt", "d1/sub/d.txt"]]
    assert pages(ws, in_path, {"path": "nothing"}) == [[]]
    bogus = ws.api.get(whole, params={"continuationToken": "not-a-token"}, timeout=TIMEOUT)
    assert bogus.status_code == 400 and azure_code(bogus) == "UserError"
    assert listings() == {"metadata_requests": 1, "created": 5, "listings": 8}


# -- blob storage -----------------------------------------------------------------------------------------------------


def test_sas_is_checked(gateway: AzureGateway, ws: Workspace, run: Run) -> None:
    write = ws.write_url(run, "f.bin")
    assert ws.put(write, b"original").status_code == 201
    read = ws.read_url(run, "f.bin")
    refused = delta(gateway, "blob")

    denied = ws.put(read, b"overwritten")
    assert denied.status_code == 403 and storage_code(denied) == "AuthorizationPermissionMismatch"
    other = write.replace("/f.bin?", "/g.bin?")  # the SAS of another blob
    assert other != write
    signature = sas_params(write)["sig"]
    forged = [
        with_sas(write, sig=("A" if signature[0] != "A" else "B") + signature[1:]),
        with_sas(write, se="2099-01-01T00:00:00Z"),
        with_sas(read, sp="rcw"),
        with_sas(write, sig=None),
        write.partition("?")[0],
        other,
    ]
    for url in forged:
        for resp in (ws.put(url, b"forged"), ws.storage.get(url, timeout=TIMEOUT)):
            assert resp.status_code == 403, (url, resp.text)
            assert storage_code(resp) == "AuthenticationFailed", url
    assert ws.storage.get(read, timeout=TIMEOUT).content == b"original"
    assert refused() == {"sas_refused": 1 + 2 * len(forged), "get": 1}


def test_expired_sas(gateway: AzureGateway, ws: Workspace, run: Run) -> None:
    gateway.set(sas_ttl=1)
    write = ws.write_url(run, "late.bin")
    assert sas_expiry(write) - time.time() <= 2
    time.sleep(max(0.0, sas_expiry(write) - time.time()) + 0.2)
    late = ws.put(write, b"too late")
    assert late.status_code == 403 and storage_code(late) == "AuthenticationFailed"
    assert "Signed expiry time" in (ElementTree.fromstring(late.content).findtext("AuthenticationErrorDetail") or "")
    assert not gateway.blob_file(run.run_id, "late.bin").exists()


def test_storage_refuses_a_bearer_token(gateway: AzureGateway, ws: Workspace, run: Run) -> None:
    seen = delta(gateway, "blob")
    write = ws.write_url(run, "secret.bin")
    auth = f"Bearer {ws.token}"
    put = ws.put(write, b"data", Authorization=auth)
    got = ws.storage.get(write, headers={"Authorization": auth}, timeout=TIMEOUT)
    for resp in (put, got):
        assert resp.status_code == 400 and storage_code(resp) == "InvalidAuthenticationInfo"
    assert seen() == {"bearer_seen": 2}
    assert not gateway.blob_file(run.run_id, "secret.bin").exists()
    events = [e for e in gateway.request_log() if e.get("outcome") == "blob_bearer"]
    assert [e["token_id"] for e in events[-2:]] == [token_fingerprint(ws.token)] * 2
    log_text = (gateway.state_dir / "requests.jsonl").read_text()
    assert ws.token not in log_text and ws.token.split(".")[2] not in log_text


def test_put_blob_rules(gateway: AzureGateway, ws: Workspace, run: Run) -> None:
    write = ws.write_url(run, "rules.bin")
    untyped = ws.put(write, b"data", **{"x-ms-blob-type": "-"})
    assert untyped.status_code == 400 and storage_code(untyped) == "MissingRequiredHeader"
    assert ElementTree.fromstring(untyped.content).findtext("HeaderName") == "x-ms-blob-type"
    append = ws.put(write, b"data", **{"x-ms-blob-type": "AppendBlob"})
    assert append.status_code == 400 and storage_code(append) == "InvalidHeaderValue"
    chunked = ws.put(write, iter([b"da", b"ta"]))  # no Content-Length: Transfer-Encoding: chunked
    assert chunked.status_code == 411 and storage_code(chunked) == "MissingContentLengthHeader"
    wrong_md5 = ws.put(write, b"data", **{"Content-MD5": md5_b64(b"other")})
    assert wrong_md5.status_code == 400 and storage_code(wrong_md5) == "Md5Mismatch"
    assert not gateway.blob_file(run.run_id, "rules.bin").exists()
    assert ws.put(write, b"data", **{"Content-MD5": md5_b64(b"data")}).status_code == 201
    assert gateway.blob_file(run.run_id, "rules.bin").read_bytes() == b"data"


def test_blocks_make_a_blob(gateway: AzureGateway, ws: Workspace, run: Run) -> None:
    counts = delta(gateway, "blob")
    write = ws.write_url(run, "blocks/model.bin")
    blocks = {block_id(n): os.urandom(1000 + n) for n in range(4)}  # the last one is staged, never committed
    for bid, data in blocks.items():
        staged = ws.storage.put(f"{write}&{urlencode({'comp': 'block', 'blockid': bid})}", data=data,
                                timeout=TIMEOUT)
        assert staged.status_code == 201, staged.text
        assert staged.headers["Content-MD5"] == md5_b64(data)
    odd = ws.storage.put(f"{write}&{urlencode({'comp': 'block', 'blockid': block_id(9, width=8)})}", data=b"x",
                         timeout=TIMEOUT)
    assert odd.status_code == 400 and storage_code(odd) == "InvalidBlobOrBlock"
    assert ws.storage.get(write, timeout=TIMEOUT).status_code == 404  # nothing committed yet

    def commit(ids: list[str], **headers: str) -> requests.Response:
        body = '<?xml version="1.0" encoding="utf-8"?><BlockList>' + "".join(
            f"<Latest>{i}</Latest>" for i in ids) + "</BlockList>"
        return ws.storage.put(f"{write}&comp=blocklist", data=body.encode(), headers=headers, timeout=TIMEOUT)

    unknown = commit([block_id(0), block_id(7)])
    assert unknown.status_code == 400 and storage_code(unknown) == "InvalidBlockList"
    bad_xml = ws.storage.put(f"{write}&comp=blocklist", data=b"<BlockList><Latest>", timeout=TIMEOUT)
    assert bad_xml.status_code == 400 and storage_code(bad_xml) == "InvalidXmlDocument"
    order = [block_id(2), block_id(0), block_id(1)]
    done = commit(order, **{"x-ms-blob-content-type": "application/x-model"})
    assert done.status_code == 201, done.text
    got = ws.storage.get(ws.read_url(run, "blocks/model.bin"), timeout=TIMEOUT)
    assert got.status_code == 200 and got.content == b"".join(blocks[i] for i in order)
    assert got.headers["Content-Type"] == "application/x-model" and got.headers["ETag"] == done.headers["ETag"]
    again = commit([block_id(3)])  # committing dropped the blocks it did not name
    assert again.status_code == 400 and storage_code(again) == "InvalidBlockList"
    assert counts() == {"put_block": 5, "put_block_list": 4, "stored": 1, "get": 2, "bad_request": 4,
                        "not_found": 1}


def test_busy_storage(gateway: AzureGateway, ws: Workspace, run: Run) -> None:
    write = ws.write_url(run, "busy.bin")
    gateway.set(blob_p_503=1.0)
    faults = delta(gateway, "blob")
    busy = ws.put(write, os.urandom(100_000))
    assert busy.status_code == 503 and storage_code(busy) == "ServerBusy"
    block = ws.storage.put(f"{write}&{urlencode({'comp': 'block', 'blockid': block_id(0)})}", data=b"x",
                           timeout=TIMEOUT)
    assert block.status_code == 503 and storage_code(block) == "ServerBusy"
    assert faults() == {"put": 1, "put_block": 1, "faults": 2}
    assert ws.storage.get(write, timeout=TIMEOUT).status_code == 404
    gateway.set(blob_p_503=0.0)
    assert ws.put(write, b"at last").status_code == 201


def test_upload_broken_off_leaves_no_blob(gateway: AzureGateway, ws: Workspace, run: Run) -> None:
    fresh, old = ws.write_url(run, "fresh.bin"), ws.write_url(run, "old.bin")
    assert ws.put(old, b"version 1").status_code == 201
    body = os.urandom(4 * 1024**2)
    faults = delta(gateway, "blob")

    gateway.set(blob_reset_after=64 * 1024)
    assert ws.put(fresh, b"small enough").status_code == 201  # not longer than the threshold: untouched
    assert gateway.config()["blob_reset_after"] == 64 * 1024
    with pytest.raises(requests.ConnectionError):
        ws.put(fresh, body)
    assert gateway.config()["blob_reset_after"] == 0  # once
    assert gateway.blob_file(run.run_id, "fresh.bin").read_bytes() == b"small enough"

    gateway.set(blob_reset_after=64 * 1024)
    with pytest.raises(requests.ConnectionError):
        ws.put(old, body)
    assert ws.storage.get(ws.read_url(run, "old.bin"), timeout=TIMEOUT).content == b"version 1"
    assert list((gateway.blobs_dir / ".tmp").iterdir()) == []
    assert faults() == {"put": 3, "stored": 1, "faults": 2, "get": 1}
    assert [e["received"] for e in gateway.request_log() if e.get("outcome") == "blob_reset"][-2:] == [65536] * 2

    first_try = ws.write_url(run, "first-try.bin")
    gateway.set(blob_reset_after=1000)
    with pytest.raises(requests.ConnectionError):
        ws.put(first_try, body)
    assert not gateway.blob_file(run.run_id, "first-try.bin").exists()
    assert ws.storage.get(first_try, timeout=TIMEOUT).status_code == 404
    assert ws.put(first_try, body).status_code == 201  # the retry goes through
    assert gateway.blob_file(run.run_id, "first-try.bin").read_bytes() == body


def test_large_upload_is_streamed(gateway: AzureGateway, ws: Workspace, run: Run, tmp_path: Path) -> None:
    size = 64 * 1024**2
    source = tmp_path / "large.bin"
    digest = hashlib.sha256()
    with source.open("wb") as out:
        for _ in range(size // 1024**2):
            chunk = os.urandom(1024**2)
            digest.update(chunk)
            out.write(chunk)
    assert gateway.proc is not None
    before = peak_rss(gateway.proc.pid)
    write = ws.write_url(run, "large.bin")
    with source.open("rb") as body:
        assert ws.put(write, body).status_code == 201
    with ws.storage.get(ws.read_url(run, "large.bin"), stream=True, timeout=TIMEOUT) as got:
        assert got.status_code == 200 and got.headers["Content-Length"] == str(size)
        back = hashlib.sha256()
        for chunk in got.iter_content(1024**2):
            back.update(chunk)
    assert back.hexdigest() == digest.hexdigest()
    grew = peak_rss(gateway.proc.pid) - before
    assert grew < 32 * 1024**2, f"the gateway's peak RSS grew by {grew / 1024**2:.0f} MiB for a 64 MiB blob"


# -- access -----------------------------------------------------------------------------------------------------------


def test_unknown_runs_and_missing_tokens(gateway: AzureGateway, ws: Workspace, run: Run) -> None:
    not_found = delta(gateway, "artifacts")
    ghost = Run(run.experiment_id, run.experiment_name, uuid.uuid4().hex, {})
    elsewhere = Run("0", "Default", run.run_id, {})  # the run, but in another experiment
    misnamed = Run(run.experiment_id, run.experiment_name + "-other", run.run_id, {})
    for who, by_name in ((ghost, False), (ghost, True), (elsewhere, False), (elsewhere, True), (misnamed, True)):
        resp = ws.register_response(who, ["a.txt"], by_name=by_name)
        assert resp.status_code == 404 and azure_code(resp) == "UserError", (who, by_name, resp.text)
    base = ws.artifacts_url(ghost)
    for resp in (ws.api.get(base + "/contentinfo", params={"path": "a.txt"}, timeout=TIMEOUT),
                 ws.api.get(base, timeout=TIMEOUT), ws.api.get(base + "/path", params={"path": "d"}, timeout=TIMEOUT)):
        assert resp.status_code == 404 and azure_code(resp) == "UserError"
    assert not_found() == {"not_found": 8}
    assert gateway.artifact_paths(ghost.run_id) == [] and gateway.artifact_paths(run.run_id) == []

    url = ws.artifacts_url(run) + "/batch/metadata"
    foreign, _exp = mint_token("not-the-gateway-secret", 60)
    for headers, reason in (({}, "missing"), ({"Authorization": f"Bearer {foreign}"}, "bad_signature"),
                            ({"Authorization": "Bearer garbage"}, "malformed")):
        resp = ws.storage.post(url, json={"paths": [{"path": "a.txt"}]}, headers=headers, timeout=TIMEOUT)
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["code"] == "Unauthorized"
        assert resp.json()["error"]["innerError"]["code"] == reason
    assert gateway.artifact_paths(run.run_id) == []


def test_state_survives_a_restart(gateway: AzureGateway, ws: Workspace, run: Run) -> None:
    registered = ws.register(run, "kept/uploaded.txt", "kept/later.txt")
    write = {p: info["contentUri"] for p, info in registered["artifactContentInformation"].items()}
    assert ws.put(write["kept/uploaded.txt"], b"before the restart").status_code == 201
    gateway.stop()
    try:
        assert gateway.artifact_paths(run.run_id) == ["kept/later.txt", "kept/uploaded.txt"]  # from the state file
        assert gateway.blob_file(run.run_id, "kept/uploaded.txt").read_bytes() == b"before the restart"
    finally:
        gateway.start()  # the module's other tests need it
    assert gateway.artifact_paths(run.run_id) == ["kept/later.txt", "kept/uploaded.txt"]  # from /__artifacts
    everything = ws.storage.get(f"{gateway.url}/__artifacts", timeout=TIMEOUT).json()["runs"]
    assert everything[run.run_id] == ["kept/later.txt", "kept/uploaded.txt"]
    assert ws.storage.get(ws.read_url(run, "kept/uploaded.txt"), timeout=TIMEOUT).content == b"before the restart"
    again = ws.register(run, "kept/uploaded.txt")
    assert set(again["errors"]) == {"kept/uploaded.txt"} and again["artifacts"] == {}
    assert ws.put(write["kept/later.txt"], b"after").status_code == 201  # a SAS from before still holds
    assert pages(ws, ws.artifacts_url(run)) == [["kept/later.txt", "kept/uploaded.txt"]]
