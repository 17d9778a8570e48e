"""Artifact paths and URIs between the client's ids and the upstream's (agent/artifact_paths.py)."""

from __future__ import annotations

import pytest

from agent.artifact_paths import (
    UPSTREAM_ROOT,
    ArtifactOwner,
    AzureArtifactTarget,
    NotAnArtifactPath,
    azure_artifact_target,
    client_artifact_uri,
    owner_of,
    proxied_root,
    upstream_artifact_path,
)
from agent.catalog import Catalog, ExperimentEntry, ModelEntry, RunEntry

EXP, RUN, MODEL = "e" * 32, "r" * 32, "m-" + "1" * 32  # provisional ids


def catalog(*, created: bool, root: str | None = None) -> Catalog:
    """A provisional experiment, run (of it) and model (of that run), created upstream or not."""
    c = Catalog()
    c._put_experiment(ExperimentEntry(EXP, "7" if created else None, True, "exp", {}))
    run_info = {"experiment_id": EXP, **({UPSTREAM_ROOT: root} if root else {})}
    c.add_run(RunEntry(RUN, "up-run" if created else None, True, run_info))
    if created:
        c.map_run(RUN, "up-run")
    model = ModelEntry(MODEL, None, True, {"experiment_id": EXP, "source_run_id": RUN, "name": "model",
                                            "artifact_uri": f"mlflow-artifacts:/{EXP}/models/{MODEL}/artifacts",
                                            "azure_run": RUN, "azure_dir": "model"})
    c.add_model(model)
    if created:
        c.map_model(MODEL, "m-up")
    return c


@pytest.mark.parametrize(("path", "owner"), [
    (f"{EXP}/{RUN}/artifacts", ArtifactOwner("run", RUN, EXP, "")),
    (f"{EXP}/{RUN}/artifacts/a/b.txt", ArtifactOwner("run", RUN, EXP, "a/b.txt")),
    (f"{EXP}/models/{MODEL}/artifacts/MLmodel", ArtifactOwner("model", MODEL, EXP, "MLmodel")),
    (f"team/x/{RUN}/artifacts/f", ArtifactOwner("run", RUN, None, "f")),  # an experiment with its own location
    (f"{EXP}/{RUN}/artifacts/artifacts/f", ArtifactOwner("run", RUN, EXP, "artifacts/f")),  # the first one counts
    ("artifacts/x", None),
    ("a/b/c", None),
])
def test_the_owner_is_before_the_first_artifacts_segment(path: str, owner: ArtifactOwner | None) -> None:
    assert owner_of(path) == owner


def test_ids_not_created_upstream_yet_make_the_caller_wait() -> None:
    c = catalog(created=False)
    assert upstream_artifact_path(f"{EXP}/{RUN}/artifacts/a.txt", c) is None
    assert upstream_artifact_path(f"{EXP}/models/{MODEL}/artifacts/MLmodel", c) is None


def test_provisional_ids_become_the_upstreams_but_file_names_never_do() -> None:
    c = catalog(created=True)
    assert upstream_artifact_path(f"{EXP}/{RUN}/artifacts/{RUN}/{EXP}.txt", c) == f"7/up-run/artifacts/{RUN}/{EXP}.txt"
    assert upstream_artifact_path(f"{EXP}/models/{MODEL}/artifacts/MLmodel", c) == "7/models/m-up/artifacts/MLmodel"
    assert upstream_artifact_path("1/unknown-run/artifacts/x", c) == "1/unknown-run/artifacts/x"  # upstream ids


def test_a_provisional_owner_goes_where_the_upstream_put_its_root() -> None:
    c = catalog(created=True, root="team/x/up-run/artifacts")
    assert upstream_artifact_path(f"{EXP}/{RUN}/artifacts/sub/f.bin", c) == "team/x/up-run/artifacts/sub/f.bin"
    assert upstream_artifact_path(f"{EXP}/{RUN}/artifacts", c) == "team/x/up-run/artifacts"


@pytest.mark.parametrize(("uri", "root"), [
    ("mlflow-artifacts:/1/r/artifacts", "1/r/artifacts"),
    ("mlflow-artifacts://mlflow.internal:5000/1/r/artifacts", "1/r/artifacts"),  # never the server's own host
    ("http://up:5000/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts", "1/r/artifacts"),
    ("http://elsewhere/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts", None),
    ("s3://bucket/1/r/artifacts", None),
    ("", None),
    (None, None),
])
def test_proxied_roots(uri: str | None, root: str | None) -> None:
    assert proxied_root(uri, "http://up:5000") == root


def test_client_uris_go_through_the_agent_in_the_clients_ids() -> None:
    c = catalog(created=True)
    assert client_artifact_uri("mlflow-artifacts://host:1/7/up-run/artifacts", c) == \
        f"mlflow-artifacts:/{EXP}/{RUN}/artifacts"
    assert client_artifact_uri("mlflow-artifacts:/7/models/m-up/artifacts", c) == \
        f"mlflow-artifacts:/{EXP}/models/{MODEL}/artifacts"
    # Where the client writes itself (an object store), nothing changes.
    assert client_artifact_uri("s3://bucket/7/up-run/artifacts", c) == "s3://bucket/7/up-run/artifacts"


def test_azure_targets() -> None:
    c = catalog(created=False)
    assert azure_artifact_target(f"{EXP}/{RUN}/artifacts/a.txt", c) is None  # the run is not upstream yet
    c = catalog(created=True)
    assert azure_artifact_target(f"{EXP}/{RUN}/artifacts/a/b.txt", c) == AzureArtifactTarget("7", "up-run", "a/b.txt")
    # A model's files live in its run, under its folder.
    assert azure_artifact_target(f"{EXP}/models/{MODEL}/artifacts/MLmodel", c) == \
        AzureArtifactTarget("7", "up-run", "model/MLmodel")
    assert azure_artifact_target(f"{EXP}/models/{MODEL}/artifacts", c) == AzureArtifactTarget("7", "up-run", "model")
    with pytest.raises(NotAnArtifactPath):
        azure_artifact_target("loose/file.txt", c)
    with pytest.raises(NotAnArtifactPath, match="did not create"):
        azure_artifact_target(f"{EXP}/models/m-{'9' * 32}/artifacts/MLmodel", c)


def test_files_of_a_run_or_model_whose_creation_was_refused_have_nowhere_to_go() -> None:
    from agent.artifact_paths import given_up_owner

    c = catalog(created=False)
    assert given_up_owner(f"{EXP}/{RUN}/artifacts/a.txt", c) is None  # waiting, not given up
    c.runs[RUN].info["abandoned"] = True
    assert given_up_owner(f"{EXP}/{RUN}/artifacts/a.txt", c) == RUN
    # On Azure ML a model's files live in its run: they go nowhere when the run cannot be created.
    assert given_up_owner(f"{EXP}/models/{MODEL}/artifacts/MLmodel", c) == MODEL
    assert given_up_owner("loose/file", c) is None
