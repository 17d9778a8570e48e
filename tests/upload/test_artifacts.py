"""upstream_artifact_path: the provisional experiment and run ids in an artifact path become the
upstream's, or None while one of them is not created upstream yet (a real Catalog)."""

from __future__ import annotations

from agent.catalog import Catalog, RunEntry, new_id
from agent.upload.artifacts import upstream_artifact_path


def catalog_with(*, run_upstream: str | None, experiment_upstream: str | None) -> tuple[Catalog, str, str]:
    catalog = Catalog()
    experiment = catalog.add_provisional_experiment("exp", None, [])
    if experiment_upstream is not None:
        catalog.map_experiment(experiment.experiment_id, experiment_upstream)
    run_id = new_id()
    catalog.add_run(RunEntry(run_id, run_upstream, True, {"experiment_id": experiment.experiment_id}))
    return catalog, experiment.experiment_id, run_id


def test_known_ids_are_kept_as_they_are() -> None:
    catalog = Catalog()
    catalog.add_run(RunEntry("a" * 32, "a" * 32, False, {"experiment_id": "7"}))
    for path in (f"7/{'a' * 32}/artifacts/model/w.bin", "1/unknownrun/artifacts/x.txt", "x.txt"):
        assert upstream_artifact_path(path, catalog) == path


def test_provisional_run_and_experiment_waiting_for_creation() -> None:
    catalog, eid, rid = catalog_with(run_upstream=None, experiment_upstream=None)
    assert upstream_artifact_path(f"{eid}/{rid}/artifacts/a.txt", catalog) is None
    assert upstream_artifact_path(f"0/{rid}/artifacts/a.txt", catalog) is None  # the run alone
    assert upstream_artifact_path(f"{eid}/other/artifacts/a.txt", catalog) is None  # the experiment alone
    assert upstream_artifact_path("0/other/artifacts/a.txt", catalog) == "0/other/artifacts/a.txt"


def test_run_created_but_experiment_not_yet() -> None:
    catalog, eid, rid = catalog_with(run_upstream="f" * 32, experiment_upstream=None)
    assert upstream_artifact_path(f"{eid}/{rid}/artifacts/a.txt", catalog) is None
    assert upstream_artifact_path(f"3/{rid}/artifacts/a.txt", catalog) == f"3/{'f' * 32}/artifacts/a.txt"


def test_both_created_upstream_are_translated() -> None:
    catalog, eid, rid = catalog_with(run_upstream="f" * 32, experiment_upstream="42")
    assert upstream_artifact_path(f"{eid}/{rid}/artifacts/dir/sub/a.bin", catalog) == \
        f"42/{'f' * 32}/artifacts/dir/sub/a.bin"
    # The run's directory itself (a listing) is translated too.
    assert upstream_artifact_path(f"{eid}/{rid}/artifacts", catalog) == f"42/{'f' * 32}/artifacts"


def test_a_non_provisional_run_with_an_upstream_id_is_not_rewritten() -> None:
    catalog = Catalog()
    catalog.add_run(RunEntry("b" * 32, "b" * 32, False, {"experiment_id": "1"}))
    assert upstream_artifact_path(f"1/{'b' * 32}/artifacts/x", catalog) == f"1/{'b' * 32}/artifacts/x"
