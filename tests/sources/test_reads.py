"""Read-your-writes merges (agent.sources.reads), pure functions: the upstream's answer plus what the
agent still holds.

The upstream side is written as MLflow 3.17.2's server writes it (checked against a real server's
``GET /api/2.0/mlflow/metrics/get-history`` and ``runs/get``): numbers for finite values and ints for
timestamp and step, the string ``"NaN"`` for NaN, and +/-Infinity as +/-1.7976931348623157e308 (the SQL
store clamps them). The spooled side is the agent's wire form: ``[key, value, timestamp, step]`` with
``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` as strings.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.catalog import Catalog, ModelEntry, RunEntry
from agent.records import MetricValue
from agent.sources.reads import merge_history, merge_lineage, merge_run_data

FLOAT_MAX = 1.7976931348623157e308
Point = dict[str, Any]


def up(value: float | str, timestamp: int, step: int, key: str = "loss") -> Point:
    """A point as MLflow's server answers it."""
    return {"key": key, "value": value, "timestamp": timestamp, "step": step}


def spooled(value: MetricValue, timestamp: int, step: int, key: str = "loss") -> list[Any]:
    """A point as the agent spools it."""
    return [key, value, timestamp, step]


def triples(points: list[Point]) -> list[tuple[Any, int, int]]:
    """(value, timestamp, step), NaN as the string "NaN" so lists compare."""
    out: list[tuple[Any, int, int]] = []
    for p in points:
        value = p["value"]
        if isinstance(value, float) and math.isnan(value):
            value = "NaN"
        out.append((value, p["timestamp"], p["step"]))
    return out


# -- merge_history ----------------------------------------------------------------------------------


def test_upstream_only_is_returned_as_is() -> None:
    upstream = [up(0.5, 1000, 0), up("NaN", 1001, 1), up(FLOAT_MAX, 1002, 2), up(-FLOAT_MAX, 1003, -3)]
    merged = merge_history(upstream, [])
    assert merged == upstream
    assert merged is not upstream and all(a is not b for a, b in zip(merged, upstream, strict=True))


def test_buffered_only_in_mlflows_shape_and_order() -> None:
    buffered = [spooled(2.0, 1002, 2), spooled("NaN", 1001, 1), spooled(0.5, 1000, 0), spooled("Infinity", 999, -1)]
    assert merge_history([], buffered) == [
        up("Infinity", 999, -1), up(0.5, 1000, 0), up("NaN", 1001, 1), up(2.0, 1002, 2)]


def test_nothing_on_either_side() -> None:
    assert merge_history([], []) == []


def test_a_point_both_upstream_and_buffered_appears_once() -> None:
    # Delivered, not acknowledged yet: the same point on both sides.
    upstream = [up(0.1, 1000, 0), up(0.2, 1010, 1)]
    buffered = [spooled(0.2, 1010, 1), spooled(0.3, 1020, 2)]
    assert triples(merge_history(upstream, buffered)) == [(0.1, 1000, 0), (0.2, 1010, 1), (0.3, 1020, 2)]


def test_an_int_valued_upstream_point_is_the_buffered_float() -> None:
    assert triples(merge_history([up(3, 1000, 0)], [spooled(3.0, 1000, 0)])) == [(3, 1000, 0)]


def test_points_differing_in_one_field_are_all_kept() -> None:
    upstream = [up(1.0, 1000, 5)]
    buffered = [spooled(1.0, 1001, 5), spooled(1.0, 1000, 6), spooled(1.5, 1000, 5)]
    assert triples(merge_history(upstream, buffered)) == [
        (1.0, 1000, 5), (1.5, 1000, 5), (1.0, 1000, 6), (1.0, 1001, 5)]


def test_repeats_on_one_side_appear_once() -> None:
    # A page boundary seen twice while uploads shift the offsets; a client that logged a point twice.
    upstream = [up(0.1, 1000, 0), up(0.1, 1000, 0)]
    buffered = [spooled(0.2, 1010, 1), spooled(0.2, 1010, 1)]
    assert triples(merge_history(upstream, buffered)) == [(0.1, 1000, 0), (0.2, 1010, 1)]


@pytest.mark.parametrize(("buffered", "stored"), [("Infinity", FLOAT_MAX), ("-Infinity", -FLOAT_MAX)])
def test_infinity_is_the_clamped_max_double_upstream(buffered: str, stored: float) -> None:
    merged = merge_history([up(stored, 1000, 7)], [spooled(buffered, 1000, 7)])
    assert triples(merged) == [(stored, 1000, 7)]


def test_infinity_and_the_clamped_double_from_either_side_in_any_spelling() -> None:
    # A float inf (not the wire string) on the spooled side is the same point too.
    assert len(merge_history([up(FLOAT_MAX, 1000, 7)], [spooled(math.inf, 1000, 7)])) == 1
    assert len(merge_history([up("Infinity", 1000, 7)], [spooled("Infinity", 1000, 7)])) == 1
    assert len(merge_history([up("-Infinity", 1000, 7)], [spooled("-Infinity", 1000, 7)])) == 1


def test_infinity_is_not_a_large_finite_value_nor_its_opposite() -> None:
    upstream = [up(1e308, 1000, 7), up(-FLOAT_MAX, 1000, 7)]
    merged = merge_history(upstream, [spooled("Infinity", 1000, 7)])
    assert triples(merged) == [(-FLOAT_MAX, 1000, 7), (1e308, 1000, 7), ("Infinity", 1000, 7)]


def test_nan_equals_nan_across_sides() -> None:
    # The server answers NaN as the string "NaN"; the spool holds the same string.
    assert triples(merge_history([up("NaN", 1000, 3)], [spooled("NaN", 1000, 3)])) == [("NaN", 1000, 3)]
    # A float NaN on either side (a JSON parser that turns "NaN" into a float) is the same point too.
    assert len(merge_history([up(math.nan, 1000, 3)], [spooled("NaN", 1000, 3)])) == 1
    assert len(merge_history([up("NaN", 1000, 3)], [spooled(math.nan, 1000, 3)])) == 1


def test_nan_is_not_zero() -> None:
    # MLflow stores NaN as 0 flagged is_nan: two different points.
    merged = merge_history([up(0.0, 1000, 3)], [spooled("NaN", 1000, 3)])
    assert sorted(map(str, triples(merged))) == sorted(map(str, [(0.0, 1000, 3), ("NaN", 1000, 3)]))


def test_order_is_timestamp_then_step_then_value() -> None:
    buffered = [
        spooled(9.0, 2000, 0),
        spooled(3.0, 1000, 2),
        spooled(-3.0, 1000, 2),
        spooled(5.0, 1000, -4),
        spooled(1.0, 1000, 1),
    ]
    upstream = [up(7.0, 500, 99), up(2.0, 1000, 2)]
    assert triples(merge_history(upstream, buffered)) == [
        (7.0, 500, 99), (5.0, 1000, -4), (1.0, 1000, 1), (-3.0, 1000, 2), (2.0, 1000, 2), (3.0, 1000, 2),
        (9.0, 2000, 0)]


def test_order_sorts_nan_as_zero_and_infinities_at_the_ends() -> None:
    buffered = [spooled(0.5, 1000, 1), spooled("NaN", 1000, 1), spooled("-Infinity", 1000, 1),
                spooled(-0.5, 1000, 1), spooled("Infinity", 1000, 1)]
    upstream = [up(1e300, 1000, 1)]
    assert triples(merge_history(upstream, buffered)) == [
        ("-Infinity", 1000, 1), (-0.5, 1000, 1), ("NaN", 1000, 1), (0.5, 1000, 1), (1e300, 1000, 1),
        ("Infinity", 1000, 1)]


def test_upstream_int64_fields_as_strings() -> None:
    # Proto3 JSON writes int64 as strings; such an upstream's points still match and sort by number.
    upstream = [{"key": "loss", "value": 0.5, "timestamp": "1000", "step": "10"}]
    merged = merge_history(upstream, [spooled(0.5, 1000, 10), spooled(0.1, 999, 2)])
    assert triples(merged) == [(0.1, 999, 2), (0.5, "1000", "10")]


def test_upstream_points_missing_timestamp_or_step_take_protos_zero() -> None:
    upstream = [{"key": "loss", "value": 0.5}, {"key": "loss", "value": 0.25, "step": 4}]
    merged = merge_history(upstream, [spooled(0.5, 0, 0), spooled(0.25, 0, 4), spooled(1.0, 5, 0)])
    assert len(merged) == 3
    assert [(p["value"], p.get("timestamp", 0), p.get("step", 0)) for p in merged] == [
        (0.5, 0, 0), (0.25, 0, 4), (1.0, 5, 0)]


def test_upstream_point_missing_value_is_protos_zero() -> None:
    # An upstream writing proto3 JSON leaves value 0.0 out; the MLflow client reads that point as 0.0.
    missing = {"key": "loss", "timestamp": 1000, "step": 1}
    assert len(merge_history([missing], [spooled(0.0, 1000, 1)])) == 1  # the same point
    assert len(merge_history([missing], [spooled("NaN", 1000, 1)])) == 2  # NaN is not 0


def test_negative_zero_is_zero() -> None:
    # MLflow's primary key compares values as numbers: -0.0 logged is 0.0 stored (and answered "0.0").
    assert len(merge_history([up(0.0, 1000, 1)], [spooled(-0.0, 1000, 1)])) == 1


def test_inputs_are_not_modified() -> None:
    upstream = [up(0.1, 1000, 0)]
    buffered = [spooled(0.2, 1010, 1)]
    before = copy.deepcopy((upstream, buffered))
    merged = merge_history(upstream, buffered)
    merged[0]["value"] = 42.0
    assert (upstream, buffered) == before


# A property: upload any part of a history (in the server's stored form), keep any overlapping part in
# the spool; the merge is the history, each point once, in MLflow's order.

_VALUES = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1.0]),
)
_POINTS = st.lists(
    st.tuples(_VALUES, st.integers(0, 5), st.integers(-3, 3)),  # small ranges: many collisions
    max_size=30,
)


def _stored(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return math.copysign(FLOAT_MAX, value)
    return value


def _wire(value: float) -> MetricValue:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _identity(value: float, timestamp: int, step: int) -> tuple[int, int, str]:
    stored = _stored(value)
    return timestamp, step, repr(stored if isinstance(stored, str) else float(stored) + 0.0)  # -0.0 is 0.0


@given(points=_POINTS, data=st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_merge_of_any_split_is_the_history_once_in_order(
        points: list[tuple[float, int, int]], data: st.DataObject) -> None:
    # One point per identity (as MLflow's primary key keeps them), then each either uploaded, buffered
    # or both.
    unique: dict[tuple[int, int, str], tuple[float, int, int]] = {}
    for value, timestamp, step in points:
        unique.setdefault(_identity(value, timestamp, step), (value, timestamp, step))
    upstream: list[Point] = []
    buffered: list[list[Any]] = []
    for value, timestamp, step in unique.values():
        where = data.draw(st.sampled_from(["up", "buffered", "both"]))
        if where in ("up", "both"):
            upstream.append(up(_stored(value), timestamp, step))
        if where in ("buffered", "both"):
            buffered.append(spooled(_wire(value), timestamp, step))
    upstream.sort(key=lambda p: (p["timestamp"], p["step"], 0.0 if p["value"] == "NaN" else p["value"]))
    merged = merge_history(upstream, data.draw(st.permutations(buffered)))

    got = [_identity(_as_float(p["value"]), p["timestamp"], p["step"]) for p in merged]
    assert sorted(got) == sorted(unique), "each point exactly once"
    order = [(p["timestamp"], p["step"], _sort_value(p["value"])) for p in merged]
    assert order == sorted(order)


def _as_float(value: Any) -> float:
    if isinstance(value, str):
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[value]
    return float(value)


def _sort_value(value: Any) -> float:
    number = _as_float(value)
    return 0.0 if math.isnan(number) else number


# -- merge_run_data ---------------------------------------------------------------------------------


def entry(params: dict[str, str] | None = None, tags: dict[str, str] | None = None,
          metrics: Sequence[tuple[str, MetricValue, int, int]] = ()) -> RunEntry:
    """A run entry as the agent builds it; metrics noted in logging order (key, value, timestamp, step)."""
    e = RunEntry("a" * 32, "a" * 32, False, {"experiment_id": "1"}, params=dict(params or {}),
                 tags=dict(tags or {}), complete=True)
    catalog = Catalog()
    for key, value, timestamp, step in metrics:
        catalog.note_metric(e, key, value, timestamp, step)
    return e


def by_key(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {i["key"]: i for i in items}


def test_params_are_the_union() -> None:
    data = {"params": [{"key": "lr", "value": "0.1"}, {"key": "epochs", "value": "3"}]}
    merged = merge_run_data(data, entry(params={"lr": "0.1", "batch": "32"}))
    assert {p["key"]: p["value"] for p in merged["params"]} == {"lr": "0.1", "epochs": "3", "batch": "32"}
    assert len(merged["params"]) == 3


def test_tags_take_the_clients_latest_values() -> None:
    data = {"tags": [{"key": "stage", "value": "warmup"}, {"key": "mlflow.runName", "value": "r"},
                     {"key": "team", "value": "infra"}]}
    merged = merge_run_data(data, entry(tags={"stage": "train", "new": "yes", "mlflow.runName": "r"}))
    assert {t["key"]: t["value"] for t in merged["tags"]} == {
        "stage": "train", "mlflow.runName": "r", "team": "infra", "new": "yes"}
    assert len(merged["tags"]) == 4


def test_metrics_missing_upstream_are_added_and_upstream_only_kept() -> None:
    data = {"metrics": [up(0.5, 1000, 3, key="acc")]}
    merged = merge_run_data(data, entry(metrics=[("loss", 0.1, 2000, 1), ("loss", 0.2, 1500, 2)]))
    assert by_key(merged["metrics"]) == {"acc": up(0.5, 1000, 3, key="acc"), "loss": up(0.2, 1500, 2)}


@pytest.mark.parametrize(
    ("upstream", "held", "winner"),
    [
        # The higher step wins, whatever the timestamps.
        (up(0.1, 5000, 4), (0.9, 1000, 5), "held"),
        (up(0.1, 1000, 5), (0.9, 5000, 4), "upstream"),
        (up(0.1, 1000, -1), (0.9, 0, 0), "held"),
        # A tie on step: the later timestamp.
        (up(0.1, 1000, 5), (0.9, 1001, 5), "held"),
        (up(0.9, 1001, 5), (0.1, 1000, 5), "upstream"),
        # A tie on step and timestamp: the larger value.
        (up(0.1, 1000, 5), (0.2, 1000, 5), "held"),
        (up(0.2, 1000, 5), (-0.2, 1000, 5), "upstream"),
        # The very same point: MLflow keeps what it had (strictly greater replaces).
        (up(0.2, 1000, 5), (0.2, 1000, 5), "upstream"),
        # NaN compares as 0 (MLflow stores it as 0 flagged).
        (up(0.5, 1000, 5), ("NaN", 1000, 5), "upstream"),
        (up(-0.5, 1000, 5), ("NaN", 1000, 5), "held"),
        (up("NaN", 1000, 5), (0.5, 1000, 5), "held"),
        (up("NaN", 1000, 5), (-0.5, 1000, 5), "upstream"),
        # Infinities against finite values.
        (up(1e308, 1000, 5), ("Infinity", 1000, 5), "held"),
        (up(-1.0, 1000, 5), ("-Infinity", 1000, 5), "upstream"),
    ],
)
def test_latest_metric_is_step_then_timestamp_then_value(
        upstream: Point, held: tuple[MetricValue, int, int], winner: str) -> None:
    value, timestamp, step = held
    merged = merge_run_data({"metrics": [upstream]}, entry(metrics=[("loss", value, timestamp, step)]))
    assert len(merged["metrics"]) == 1
    expected = upstream if winner == "upstream" else up(value, timestamp, step)
    assert triples(merged["metrics"]) == triples([expected])


def test_latest_of_many_held_points_ties_broken_by_timestamp_then_value() -> None:
    held = [("loss", 1.0, 1000, 5), ("loss", 0.5, 2000, 5), ("loss", 0.7, 2000, 5), ("loss", 9.0, 3000, 4),
            ("loss", 0.6, 2000, 5)]
    merged = merge_run_data({"metrics": [up(0.1, 9999, 3)]}, entry(metrics=held))
    assert triples(merged["metrics"]) == [(0.7, 2000, 5)]


def test_infinity_held_is_the_same_point_as_the_clamped_upstream_one() -> None:
    merged = merge_run_data({"metrics": [up(FLOAT_MAX, 1000, 5)]}, entry(metrics=[("loss", "Infinity", 1000, 5)]))
    assert len(merged["metrics"]) == 1
    (metric,) = merged["metrics"]
    assert (metric["timestamp"], metric["step"]) == (1000, 5)
    assert _as_float(metric["value"]) in (FLOAT_MAX, math.inf)


def test_nan_held_as_latest_keeps_the_wire_string() -> None:
    merged = merge_run_data({}, entry(metrics=[("loss", 1.0, 1000, 1), ("loss", "NaN", 1000, 2)]))
    assert merged["metrics"] == [up("NaN", 1000, 2)]


def test_data_missing_everything() -> None:
    merged = merge_run_data({}, entry(params={"p": "1"}, tags={"t": "x"}, metrics=[("m", 1.0, 10, 0)]))
    assert merged == {"params": [{"key": "p", "value": "1"}], "tags": [{"key": "t", "value": "x"}],
                      "metrics": [up(1.0, 10, 0, key="m")]}


def test_nothing_held_and_nothing_upstream_adds_no_empty_lists() -> None:
    # MLflow's JSON leaves empty repeated fields out.
    assert merge_run_data({}, entry()) == {}
    assert merge_run_data({"tags": [{"key": "t", "value": "x"}]}, entry()) == {"tags": [{"key": "t", "value": "x"}]}


def test_other_fields_of_data_pass_through() -> None:
    data = {"params": [], "extra": {"kept": True}}
    merged = merge_run_data(data, entry(params={"p": "1"}))
    assert merged["extra"] == {"kept": True}
    assert merged["params"] == [{"key": "p", "value": "1"}]


def test_upstream_items_without_key_or_not_objects_are_ignored() -> None:
    data = {
        "params": [{"value": "orphan"}, "junk", {"key": "p", "value": "1"}],
        "tags": [None, {"key": "t"}],
        "metrics": [{"value": 1.0}, 7, {"key": "m", "value": 0.5}],
    }
    merged = merge_run_data(data, entry())
    assert merged["params"] == [{"key": "p", "value": "1"}]
    assert merged["tags"] == [{"key": "t"}]
    assert merged["metrics"] == [{"key": "m", "value": 0.5}]


def test_upstream_metric_missing_step_timestamp_or_value_compares_as_zero() -> None:
    # Proto defaults: a missing step/timestamp/value is 0.
    merged = merge_run_data({"metrics": [{"key": "m", "value": 0.5}]}, entry(metrics=[("m", 0.1, 0, 1)]))
    assert triples(merged["metrics"]) == [(0.1, 0, 1)]
    merged = merge_run_data({"metrics": [{"key": "m", "value": 0.5}]}, entry(metrics=[("m", 0.4, 0, 0)]))
    assert merged["metrics"] == [{"key": "m", "value": 0.5}]
    merged = merge_run_data({"metrics": [{"key": "m", "step": 2, "timestamp": 5}]},
                            entry(metrics=[("m", -0.1, 5, 2)]))
    assert merged["metrics"] == [{"key": "m", "step": 2, "timestamp": 5}]
    merged = merge_run_data({"metrics": [{"key": "m", "step": 2, "timestamp": 5}]}, entry(metrics=[("m", 0.1, 5, 2)]))
    assert triples(merged["metrics"]) == [(0.1, 5, 2)]


def test_data_is_not_modified() -> None:
    data = {"params": [{"key": "p", "value": "1"}], "tags": [{"key": "t", "value": "old"}],
            "metrics": [up(0.1, 1, 1, key="m")]}
    before = copy.deepcopy(data)
    merge_run_data(data, entry(params={"q": "2"}, tags={"t": "new"}, metrics=[("m", 0.5, 2, 2)]))
    assert data == before


# --- a run's inputs and outputs --------------------------------------------------------------------


def test_lineage_in_the_clients_ids_with_what_waits_added_once() -> None:
    catalog = Catalog()
    catalog.add_model(ModelEntry("m-client", None, True, {}))
    catalog.map_model("m-client", "m-upstream")
    dataset = {"dataset": {"name": "train", "digest": "d1", "source_type": "code", "source": "{}"}}
    entry = RunEntry("r", "r", False, {
        "dataset_inputs": [dataset, {"dataset": {"name": "eval", "digest": "d2", "source_type": "code",
                                                 "source": "{}"}}],
        "model_outputs": [{"model_id": "m-client", "step": 0}, {"model_id": "m-client", "step": 5}],
    })
    run: dict[str, Any] = {"info": {}, "inputs": {"dataset_inputs": [dataset]},
                           "outputs": {"model_outputs": [{"model_id": "m-upstream", "step": 0}]}}
    merge_lineage(run, entry, catalog)
    assert [d["dataset"]["name"] for d in run["inputs"]["dataset_inputs"]] == ["train", "eval"]
    assert run["outputs"]["model_outputs"] == [{"model_id": "m-client", "step": 0}, {"model_id": "m-client", "step": 5}]
    assert "model_inputs" not in run["inputs"]  # nothing to say: left out, as proto2 leaves it out
