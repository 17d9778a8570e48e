"""Azure ML's artifact path (agent/upstream/azure_artifacts.py) against the workspace stand-in: run history
registers each file and hands out a SAS URL, blob storage takes the bytes. One attempt at a time here (the
uploader's retries are tested end to end elsewhere): what each attempt does after a broken-off upload, a
busy storage, a second upload of one path, a large file in blocks; never a workspace token to storage.

Real processes: the session's MLflow server and one gateway; the agent's REST client runs in this process.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from agent.artifact_paths import AzureArtifactTarget
from agent.ops.metrics import AgentMetrics
from agent.upstream import azure_artifacts
from agent.upstream.azure_artifacts import AzureArtifacts
from agent.upstream.rest import MlflowRest, PermanentError, TransientError
from agent.upstream.static import StaticUpstream
from tests.integration.azure_helpers import gateways
from tests.support.azure_gateway import AzureGateway
from tests.support.mlflow_server import MlflowServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, mlflow_server: MlflowServer) -> Iterator[AzureGateway]:
    with gateways(tmp_path_factory.mktemp("azure-artifacts-client"), mlflow_server) as make:
        yield make(token_ttl=3600)


@pytest.fixture(autouse=True)
def default_settings(gateway: AzureGateway) -> Iterator[None]:
    yield
    gateway.set(**asdict(gateway.initial_config))


@pytest.fixture
async def rest(gateway: AzureGateway) -> AsyncIterator[MlflowRest]:
    env = {"MLFLOW_TRACKING_TOKEN": gateway.mint(3600), "MLFLOW_TRACKING_SERVER_CERT_PATH": str(gateway.cert_path)}
    client = MlflowRest(StaticUpstream(gateway.base_url, env), AgentMetrics(), request_timeout=30)
    await client.start()
    try:
        yield client
    finally:
        await client.stop()


async def new_run(rest: MlflowRest) -> tuple[str, str]:
    experiment = (await rest.call("POST", "experiments/create", body={"name": f"azure-art-{uuid.uuid4().hex}"}))
    experiment_id = str(experiment["experiment_id"])
    run = await rest.call("POST", "runs/create", body={"experiment_id": experiment_id})
    return experiment_id, str(run["run"]["info"]["run_id"])


def write(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def stored(gateway: AzureGateway, target: AzureArtifactTarget) -> str | None:
    blob = gateway.blob_file(target.run_id, target.path)
    return hashlib.sha256(blob.read_bytes()).hexdigest() if blob.exists() else None


async def test_upload_list_and_download(rest: MlflowRest, gateway: AzureGateway, tmp_path: Path) -> None:
    azure = AzureArtifacts(rest)
    experiment, run = await new_run(rest)
    digests = {}
    for path in ("a.txt", "dir/b.bin", "dir/sub/c.bin"):
        local = tmp_path / path.replace("/", "_")
        digests[path] = write(local, 10_000)
        target = AzureArtifactTarget(experiment, run, path)
        await azure.upload(target, local, 10_000, "application/octet-stream")
        assert stored(gateway, target) == digests[path]
    root = await azure.children(AzureArtifactTarget(experiment, run, ""), 30)
    assert root == {"a.txt": {"path": "a.txt", "is_dir": False}, "dir": {"path": "dir", "is_dir": True}}
    assert await azure.children(AzureArtifactTarget(experiment, run, "dir"), 30) == {
        "b.bin": {"path": "b.bin", "is_dir": False}, "sub": {"path": "sub", "is_dir": True}}
    url = await azure.download_url(AzureArtifactTarget(experiment, run, "dir/sub/c.bin"), 30)
    async with rest.open_storage(url, "download") as answer:
        assert hashlib.sha256(await answer.read()).hexdigest() == digests["dir/sub/c.bin"]
    assert gateway.stats()["blob"]["bearer_seen"] == 0


async def test_listing_follows_continuation_tokens(rest: MlflowRest, gateway: AzureGateway, tmp_path: Path) -> None:
    gateway.set(artifact_page_size=2)
    azure = AzureArtifacts(rest)
    experiment, run = await new_run(rest)
    local = tmp_path / "f"
    write(local, 10)
    names = [f"many/f{i}.txt" for i in range(7)]
    for name in names:
        await azure.upload(AzureArtifactTarget(experiment, run, name), local, 10, "text/plain")
    listed = await azure.children(AzureArtifactTarget(experiment, run, "many"), 30)
    assert sorted(listed) == sorted(n.rsplit("/", 1)[1] for n in names)


async def test_an_upload_that_broke_off_arrives_whole(rest: MlflowRest, gateway: AzureGateway,
                                                      tmp_path: Path) -> None:
    """The connection drops a third into the blob: whichever retries it (aiohttp retries a PUT on a reused
    connection once; else the next attempt), the blob ends byte-identical and no half blob is ever kept."""
    azure = AzureArtifacts(rest)
    experiment, run = await new_run(rest)
    local = tmp_path / "big"
    digest = write(local, 300_000)
    target = AzureArtifactTarget(experiment, run, "ckpt/weights.bin")
    gateway.set(blob_reset_after=100_000)
    try:
        await azure.upload(target, local, 300_000, "application/octet-stream")
    except TransientError:
        assert stored(gateway, target) is None  # nothing half-written
        await azure.upload(target, local, 300_000, "application/octet-stream")
    assert gateway.stats()["blob"]["faults"] >= 1
    assert stored(gateway, target) == digest


async def test_a_retry_after_registration_writes_to_the_url_granted_before(
        rest: MlflowRest, gateway: AzureGateway, tmp_path: Path) -> None:
    """The first attempt registered the path, then storage failed: Azure refuses a second registration,
    and the retry writes to the URL the first one was granted."""
    azure = AzureArtifacts(rest)
    experiment, run = await new_run(rest)
    local = tmp_path / "f"
    digest = write(local, 1000)
    target = AzureArtifactTarget(experiment, run, "f.bin")
    gateway.set(blob_p_503=1.0)
    with pytest.raises(TransientError):
        await azure.upload(target, local, 1000, "application/octet-stream")
    assert stored(gateway, target) is None
    gateway.set(blob_p_503=0.0)
    conflicts = gateway.stats()["artifacts"]["conflicts"]
    await azure.upload(target, local, 1000, "application/octet-stream")
    assert gateway.stats()["artifacts"]["conflicts"] == conflicts + 1
    assert stored(gateway, target) == digest


async def test_a_repeated_upload_is_done_and_a_second_version_is_refused(
        rest: MlflowRest, gateway: AzureGateway, tmp_path: Path) -> None:
    azure = AzureArtifacts(rest)
    experiment, run = await new_run(rest)
    first, second = tmp_path / "v1", tmp_path / "v2"
    digest = write(first, 2000)
    write(second, 3000)
    target = AzureArtifactTarget(experiment, run, "notes/readme.md")
    await azure.upload(target, first, 2000, "text/plain")
    # The same file again (an acknowledgement lost after the upload): it is upstream, nothing to do.
    await azure.upload(target, first, 2000, "text/plain")
    # Another version of the path: Azure keeps the first upload, and the agent says so.
    with pytest.raises(PermanentError, match="keeps the first upload"):
        await azure.upload(target, second, 3000, "text/plain")
    assert stored(gateway, target) == digest


async def test_a_large_file_goes_in_blocks(rest: MlflowRest, gateway: AzureGateway, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(azure_artifacts, "SINGLE_PUT_MAX", 256 * 1024)
    monkeypatch.setattr(azure_artifacts, "BLOCK_SIZE", 200 * 1024)
    azure = AzureArtifacts(rest)
    experiment, run = await new_run(rest)
    local = tmp_path / "big"
    size = 1_000_000
    digest = write(local, size)
    before = gateway.stats()["blob"]
    await azure.upload(AzureArtifactTarget(experiment, run, "big.bin"), local, size, "application/octet-stream")
    after = gateway.stats()["blob"]
    assert after["put_block"] - before["put_block"] == 5
    assert after["put_block_list"] - before["put_block_list"] == 1
    assert stored(gateway, AzureArtifactTarget(experiment, run, "big.bin")) == digest


async def test_an_expired_grant_with_no_write_access_left_is_refused_with_the_reason(
        rest: MlflowRest, gateway: AzureGateway, tmp_path: Path) -> None:
    """The limit of what can be done: the SAS URL registration granted expired before the upload got
    through, and the URL run history gives now only reads (as the stand-in's does). Documented in the
    README; the file is dead-lettered by the uploader with this reason."""
    azure = AzureArtifacts(rest)
    experiment, run = await new_run(rest)
    local = tmp_path / "f"
    write(local, 200_000)
    target = AzureArtifactTarget(experiment, run, "late.bin")
    gateway.set(sas_ttl=1, blob_p_503=1.0)
    with pytest.raises(TransientError):
        await azure.upload(target, local, 200_000, "application/octet-stream")
    gateway.set(blob_p_503=0.0)
    await asyncio.sleep(2.1)  # the granted URL expires
    with pytest.raises(TransientError, match="no longer accepted"):
        await azure.upload(target, local, 200_000, "application/octet-stream")
    with pytest.raises(PermanentError, match="grants no write access"):
        await azure.upload(target, local, 200_000, "application/octet-stream")
