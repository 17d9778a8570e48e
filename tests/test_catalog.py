"""The catalog: runs and experiments the agent knows, id mapping, and answers in MLflow's shapes."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.catalog import Catalog, RunEntry, generate_run_name, new_id
from agent.records import MetricValue
from agent.spool.store import ExperimentUpsert, Loaded, RunUpsert

HEX32 = re.compile(r"^[0-9a-f]{32}$")


def run_entry(run_id: str = "a" * 32, *, provisional: bool = False, upstream_id: str | None = None,
              **info: Any) -> RunEntry:
    return RunEntry(run_id, upstream_id if upstream_id is not None or provisional else run_id, provisional, info)


# --- runs ----------------------------------------------------------------------------------------


def test_run_info_json_fills_in_what_mlflow_always_answers() -> None:
    catalog = Catalog()
    entry = run_entry("r1", experiment_id="5", run_name="brisk-otter-1", user_id="ann", start_time=10,
                      end_time=None)
    info = catalog.run_info_json(entry)
    assert info == {
        "run_uuid": "r1",
        "run_id": "r1",
        "experiment_id": "5",
        "run_name": "brisk-otter-1",
        "user_id": "ann",
        "start_time": 10,
        "status": "RUNNING",
        "lifecycle_stage": "active",
        "artifact_uri": "mlflow-artifacts:/5/r1/artifacts",
    }


def test_run_info_json_keeps_what_is_known() -> None:
    catalog = Catalog()
    entry = run_entry("r1", experiment_id="5", status="FINISHED", end_time=99, lifecycle_stage="deleted",
                      artifact_uri="s3://bucket/5/r1/artifacts")
    info = catalog.run_info_json(entry)
    assert (info["status"], info["end_time"], info["lifecycle_stage"], info["artifact_uri"]) == (
        "FINISHED", 99, "deleted", "s3://bucket/5/r1/artifacts")
    assert entry.deleted
    assert catalog.run_info_json(run_entry("r2"))["experiment_id"] == "0"  # the default experiment


info_values = st.fixed_dictionaries({}, optional={
    "experiment_id": st.sampled_from(["0", "12", "e" * 32]),
    "run_name": st.text(max_size=10),
    "user_id": st.none() | st.text(max_size=5),
    "status": st.sampled_from(["RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"]),
    "start_time": st.integers(0, 2**41),
    "end_time": st.none() | st.integers(0, 2**41),
    "artifact_uri": st.none() | st.just("file:///x"),
    "lifecycle_stage": st.sampled_from(["active", "deleted"]),
    "abandoned": st.booleans(),  # the agent's own bookkeeping, never shown
})


@given(info=info_values, run_id=st.sampled_from(["r" * 32, "0123456789abcdef" * 2]))
def test_run_info_json_shape(info: dict[str, Any], run_id: str) -> None:
    out = Catalog().run_info_json(run_entry(run_id, **info))
    assert out["run_id"] == out["run_uuid"] == run_id
    for key in ("run_id", "run_uuid", "experiment_id", "artifact_uri", "status", "lifecycle_stage"):
        assert isinstance(out[key], str) and out[key], key
    assert None not in out.values()
    assert set(out) <= {"run_uuid", "run_id", "experiment_id", "run_name", "user_id", "status", "start_time",
                        "end_time", "artifact_uri", "lifecycle_stage"}
    assert out["experiment_id"] == info.get("experiment_id", "0")


def test_run_json_has_data_inputs_and_outputs() -> None:
    catalog = Catalog()
    entry = run_entry("r1", experiment_id="1")
    assert catalog.run_json(entry)["run"]["data"] == {}
    entry.params["lr"] = "0.1"
    entry.tags["mlflow.runName"] = "x"
    catalog.note_metric(entry, "loss", "NaN", 5, 1)
    catalog.note_metric(entry, "acc", 0.5, 6, 2)
    run = catalog.run_json(entry)["run"]
    assert run["info"] == catalog.run_info_json(entry)
    assert run["inputs"] == {} and run["outputs"] == {}
    assert run["data"] == {
        "metrics": [{"key": "loss", "value": "NaN", "timestamp": 5, "step": 1},
                    {"key": "acc", "value": 0.5, "timestamp": 6, "step": 2}],
        "params": [{"key": "lr", "value": "0.1"}],
        "tags": [{"key": "mlflow.runName", "value": "x"}],
    }


def test_provisional_runs_map_to_upstream_ids() -> None:
    catalog = Catalog()
    assert catalog.upstream_run_id("f" * 32) == "f" * 32  # not minted here: already an upstream id
    entry = RunEntry("p" * 32, None, True, {"experiment_id": "0"}, complete=True)
    upsert = catalog.add_run(entry)
    assert upsert == RunUpsert("p" * 32, None, True, {"experiment_id": "0", "complete": True})
    assert catalog.run("p" * 32) is entry
    assert catalog.upstream_run_id("p" * 32) is None  # not created upstream yet
    assert catalog.map_run("p" * 32, "u" * 32) == [RunUpsert("p" * 32, "u" * 32, True,
                                                             {"experiment_id": "0", "complete": True})]
    assert catalog.upstream_run_id("p" * 32) == "u" * 32
    catalog.add_run(RunEntry("q" * 32, "q" * 32, False, {}))
    assert catalog.upstream_run_id("q" * 32) == "q" * 32
    assert catalog.run("nope") is None


def test_load_restores_runs_and_experiments() -> None:
    loaded = Loaded(
        runs=[RunUpsert("p1", "u1", True, {"experiment_id": "e1", "complete": True, "status": "RUNNING"}),
              RunUpsert("r2", "r2", False, {"experiment_id": "0"})],
        params={"p1": {"lr": "0.1"}},
        tags={"p1": {"t": "v"}},
        experiments=[ExperimentUpsert("e1", "77", True, "exp", {"lifecycle_stage": "active"}),
                     ExperimentUpsert("88", "88", False, "other", {})],
    )
    catalog = Catalog()
    catalog.load(loaded)
    p1 = catalog.run("p1")
    assert p1 is not None
    assert (p1.upstream_id, p1.provisional, p1.complete) == ("u1", True, True)
    assert p1.info == {"experiment_id": "e1", "status": "RUNNING"}  # "complete" is not part of the info
    assert (p1.params, p1.tags) == ({"lr": "0.1"}, {"t": "v"})
    r2 = catalog.run("r2")
    assert r2 is not None and not r2.complete and r2.params == {}
    assert catalog.upstream_run_id("p1") == "u1"
    # the upsert round-trips: what is written is what is loaded
    assert p1.upsert() == loaded.runs[0]
    exp = catalog.experiment_by_name("exp")
    assert exp is not None and exp.experiment_id == "e1"
    assert catalog.upstream_experiment_id("e1") == "77"
    assert catalog.client_experiment_id("77") == "e1"
    assert catalog.client_experiment_id("88") == "88"
    assert catalog.pending_experiments() == []


# --- latest metric -------------------------------------------------------------------------------


finite = st.floats(allow_nan=False, min_value=-1e300, max_value=1e300)
points = st.lists(st.tuples(st.sampled_from([1.0, -1.0, 0.0, 2.5]) | finite, st.integers(0, 3), st.integers(0, 3)),
                  min_size=1, max_size=12)


@settings(max_examples=300)
@given(points=points)
def test_note_metric_keeps_the_latest_by_step_timestamp_value(points: list[tuple[float, int, int]]) -> None:
    catalog = Catalog()
    entry = run_entry("r")
    for value, timestamp, step in points:
        catalog.note_metric(entry, "m", value, timestamp, step)
    best = max((step, ts, v) for v, ts, step in points)
    # on a tie MLflow keeps the one it had (it replaces only on "strictly more recent")
    first_best = next(p for p in points if (p[2], p[1], p[0]) == best)
    latest = entry.metrics["m"]
    assert (latest[0], latest[1], latest[3]) == (first_best[2], first_best[1], first_best[0])
    assert catalog.run_json(entry)["run"]["data"]["metrics"] == [
        {"key": "m", "value": first_best[0], "timestamp": first_best[1], "step": first_best[2]}]


def test_note_metric_keys_are_independent() -> None:
    catalog = Catalog()
    entry = run_entry("r")
    catalog.note_metric(entry, "a", 1.0, 1, 5)
    catalog.note_metric(entry, "b", 2.0, 1, 1)
    catalog.note_metric(entry, "a", 9.0, 1, 4)  # an older step: not the latest
    assert {k: v[3] for k, v in entry.metrics.items()} == {"a": 1.0, "b": 2.0}


def test_note_metric_orders_infinities_as_numbers() -> None:
    catalog = Catalog()
    entry = run_entry("r")
    catalog.note_metric(entry, "m", "-Infinity", 1, 1)
    catalog.note_metric(entry, "m", 3.0, 1, 1)
    catalog.note_metric(entry, "m", "Infinity", 1, 1)
    catalog.note_metric(entry, "m", 1e300, 1, 1)
    assert entry.metrics["m"][3] == "Infinity"


def test_note_metric_compares_nan_as_mlflow_does() -> None:
    # MLflow's store compares (step, timestamp, value) with NaN stored as 0
    # (SqlAlchemyStore.sanitize_metric_value), so the latest value does not depend on arrival order.
    catalog = Catalog()
    orders: list[list[MetricValue]] = [["NaN", 5.0], [5.0, "NaN"]]
    for order in orders:
        entry = run_entry("r")
        for value in order:
            catalog.note_metric(entry, "m", value, 1, 1)
        assert entry.metrics["m"][3] == 5.0, order
    orders = [["NaN", -1.0], [-1.0, "NaN"]]
    for order in orders:
        entry = run_entry("r")
        for value in order:
            catalog.note_metric(entry, "m", value, 1, 1)
        assert entry.metrics["m"][3] == "NaN", order


# --- experiments ---------------------------------------------------------------------------------


def test_provisional_experiment_lifecycle() -> None:
    catalog = Catalog()
    entry = catalog.add_provisional_experiment("exp", None, [["team", "ml"]])
    assert HEX32.match(entry.experiment_id)
    assert entry.provisional and entry.upstream_id is None
    assert catalog.experiment(entry.experiment_id) is entry
    assert catalog.experiment_by_name("exp") is entry
    assert catalog.pending_experiments() == [entry]
    assert catalog.upstream_experiment_id(entry.experiment_id) is None
    shown = catalog.experiment_json(entry)
    assert shown["experiment_id"] == entry.experiment_id and shown["name"] == "exp"
    assert shown["lifecycle_stage"] == "active"
    assert shown["tags"] == [{"key": "team", "value": "ml"}]
    assert "artifact_location" not in shown  # empty: not answered
    assert isinstance(shown["creation_time"], int) and shown["creation_time"] == shown["last_update_time"]

    upsert = catalog.map_experiment(entry.experiment_id, "42")
    assert upsert == ExperimentUpsert(entry.experiment_id, "42", True, "exp", entry.info)
    assert catalog.upstream_experiment_id(entry.experiment_id) == "42"
    assert catalog.client_experiment_id("42") == entry.experiment_id
    assert catalog.pending_experiments() == []

    # The upstream describes its own experiment "42" named "exp": cached, but the name stays with
    # the provisional id the client was given.
    remembered = catalog.remember_experiment({"experiment_id": "42", "name": "exp", "artifact_location": "a"})
    assert remembered == ExperimentUpsert("42", "42", False, "exp", {"artifact_location": "a"})
    assert catalog.experiment_by_name("exp") is entry
    cached = catalog.experiment("42")
    assert cached is not None and not cached.provisional
    assert catalog.upstream_experiment_id("42") == "42"


def test_a_provisional_experiment_takes_the_name_from_a_cached_one() -> None:
    catalog = Catalog()
    catalog.remember_experiment({"experiment_id": "7", "name": "exp"})
    by_name = catalog.experiment_by_name("exp")
    assert by_name is not None and by_name.experiment_id == "7"
    entry = catalog.add_provisional_experiment("exp", "s3://b", [])
    assert catalog.experiment_by_name("exp") is entry
    assert catalog.experiment_json(entry)["artifact_location"] == "s3://b"
    assert "tags" not in catalog.experiment_json(entry)


def test_remember_experiment_ignores_malformed_and_provisional_ids() -> None:
    catalog = Catalog()
    assert catalog.remember_experiment({"experiment_id": 7, "name": "x"}) is None
    assert catalog.remember_experiment({"experiment_id": "7"}) is None
    entry = catalog.add_provisional_experiment("mine", None, [])
    assert catalog.remember_experiment({"experiment_id": entry.experiment_id, "name": "theirs"}) is None
    assert catalog.experiment(entry.experiment_id) is entry
    assert catalog.experiment_by_name("theirs") is None


def test_unknown_experiment_ids_are_upstream_ids() -> None:
    catalog = Catalog()
    assert catalog.experiment("9") is None
    assert catalog.upstream_experiment_id("9") == "9"
    assert catalog.client_experiment_id("9") == "9"
    assert catalog.experiment_by_name("nothing") is None


def test_experiment_json_defaults() -> None:
    catalog = Catalog()
    catalog.remember_experiment({"experiment_id": "3", "name": "e", "lifecycle_stage": None, "tags": []})
    entry = catalog.experiment("3")
    assert entry is not None
    assert catalog.experiment_json(entry) == {"experiment_id": "3", "name": "e", "lifecycle_stage": "active"}


names = st.sampled_from(["a", "b", "c"])
operations = st.lists(st.one_of(
    st.tuples(st.just("remember"), st.sampled_from(["1", "2", "3"]), names),
    st.tuples(st.just("provisional"), st.just(""), names),
), max_size=10)


@given(ops=operations)
def test_lookup_by_name_answers_an_experiment_of_that_name(ops: list[tuple[str, str, str]]) -> None:
    """Whatever the upstream told (renames included), a lookup by name never answers another name."""
    catalog = Catalog()
    for op, eid, name in ops:
        if op == "remember":
            catalog.remember_experiment({"experiment_id": eid, "name": name})
        else:
            catalog.add_provisional_experiment(name, None, [])
    for name in ("a", "b", "c"):
        found = catalog.experiment_by_name(name)
        assert found is None or found.name == name
        if found is None:
            assert all(e.name != name for e in catalog.experiments.values())


# --- ids and names -------------------------------------------------------------------------------


def test_new_ids_look_like_mlflow_run_ids() -> None:
    ids = {new_id() for _ in range(100)}
    assert len(ids) == 100 and all(HEX32.match(i) for i in ids)


def test_generated_run_names() -> None:
    pattern = re.compile(r"^[a-z]+-[a-z]+-\d{1,3}$")
    assert all(pattern.match(generate_run_name()) for _ in range(100))



# --- logged models -------------------------------------------------------------------------------


def test_models_round_trip_through_the_spools_rows_and_map_both_ways() -> None:
    from agent.catalog import ModelEntry, new_model_id
    from agent.spool.store import ModelUpsert

    model_id = new_model_id()
    assert re.fullmatch(r"m-[0-9a-f]{32}", model_id)
    catalog = Catalog()
    entry = ModelEntry(model_id, None, True, {"experiment_id": "1", "name": "model", "status": "LOGGED_MODEL_PENDING",
                                              "artifact_uri": f"mlflow-artifacts:/1/models/{model_id}/artifacts"},
                       tags={"t": "1"}, params={"p": "2"})
    upsert = catalog.add_model(entry)
    assert upsert == ModelUpsert(model_id, None, True, {**entry.info, "tags": {"t": "1"}, "params": {"p": "2"}})
    assert catalog.upstream_model_id(model_id) is None
    mapped = catalog.map_model(model_id, "m-up")
    assert catalog.upstream_model_id(model_id) == "m-up" and catalog.client_model_id("m-up") == model_id
    assert catalog.upstream_model_id("m-other") == "m-other"  # not ours: an upstream id

    again = Catalog()
    again.load(Loaded(models=[mapped]))
    restored = again.model(model_id)
    assert restored is not None and (restored.tags, restored.params) == ({"t": "1"}, {"p": "2"})
    assert again.client_model_id("m-up") == model_id
    assert again.model_json(restored) == {"model": {
        "info": {"model_id": model_id, "experiment_id": "1", "name": "model", "status": "LOGGED_MODEL_PENDING",
                 "artifact_uri": f"mlflow-artifacts:/1/models/{model_id}/artifacts", "model_type": "",
                 "source_run_id": "", "tags": [{"key": "t", "value": "1"}]},
        "data": {"params": [{"key": "p", "value": "2"}]}}}


def test_a_provisional_runs_upstream_id_maps_back_after_a_restart() -> None:
    catalog = Catalog()
    catalog.load(Loaded(runs=[RunUpsert("prov", "up", True, {"experiment_id": "1"})]))
    assert catalog.client_run_id("up") == "prov" and catalog.client_run_id("other") == "other"
