"""agent.validation: every rule, with the status, error_code and message the real MLflow 3.17.2 server
gave for the same request (messages below were copied from its answers)."""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import validation as V
from agent.errors import MlflowApiError

RID = "00340a0ea43d48319eea6518f6fca867"
HINT = "See the API docs for more information about request parameters."
BAD_CHARS = (
    "Names may only contain alphanumerics, underscores (_), dashes (-), periods (.), spaces ( ), "
    "colon(:) and slashes (/)."
)


def bad_path(norm: str) -> str:
    return (
        "Names may be treated as files in certain cases, and must not resolve to other names when "
        f"treated as such. This name would resolve to '{norm}'"
    )


def missing_msg(param: str) -> str:
    return f"Missing value for required parameter '{param}'. {HINT}"


def bad_value_msg(shown: str, param: str, type_name: str) -> str:
    return f"Invalid value {shown} for parameter '{param}' supplied:  Hint: Value was of type '{type_name}'. {HINT}"


@pytest.fixture(autouse=True)
def _cold_key_cache() -> Iterator[None]:
    V._valid_keys.clear()
    yield
    V._valid_keys.clear()


def fails(fn: Callable[..., Any], arg: Any) -> MlflowApiError:
    with pytest.raises(MlflowApiError) as info:
        fn(arg)
    return info.value


def assert_invalid(fn: Callable[..., Any], arg: Any, message: str | None = None) -> MlflowApiError:
    e = fails(fn, arg)
    assert (e.status, e.error_code) == (400, "INVALID_PARAMETER_VALUE"), e
    if message is not None:
        assert e.message == message
    return e


def assert_not_found(fn: Callable[..., Any], arg: Any, run_id: str) -> None:
    e = fails(fn, arg)
    assert (e.status, e.error_code) == (404, "RESOURCE_DOES_NOT_EXIST")
    assert e.message == f"Run with id={run_id} not found"


def metric(key: Any = "m", value: Any = 1, timestamp: Any = 1, **extra: Any) -> dict[str, Any]:
    return {"key": key, "value": value, "timestamp": timestamp, **extra}


# Bodies for each endpoint that takes a run id, minus the run id.
RUN_ENDPOINTS: dict[str, tuple[Callable[[Any], Any], dict[str, Any]]] = {
    "log_metric": (V.log_metric, {"key": "a", "value": 1, "timestamp": 1}),
    "log_param": (V.log_param, {"key": "a", "value": "1"}),
    "set_tag": (V.set_tag, {"key": "a", "value": "1"}),
    "delete_tag": (V.delete_tag, {"key": "a"}),
    "update_run": (V.update_run, {"status": "FINISHED"}),
    "log_batch": (V.log_batch, {"metrics": [metric()]}),
}


# ---------------------------------------------------------------------------------------------------
# Content-Type and body


@pytest.mark.parametrize(
    "header", ["application/json", "application/json; charset=utf-8", "application/json;", "  application/json\t"]
)
def test_content_type_accepted(header: str) -> None:
    V.check_content_type(header)


def test_content_type_missing() -> None:
    assert_invalid(V.check_content_type, None, "Bad Request. Content-Type header is missing.")


@pytest.mark.parametrize(
    "header",
    ["", " ", "text/plain", "APPLICATION/JSON", "Application/json", "application/json ;x=1", "application/json,x"],
)
def test_content_type_rejected(header: str) -> None:
    # The server compares the media type verbatim: case-sensitive, no trimming before ";".
    assert_invalid(V.check_content_type, header, "Bad Request. Content-Type must be one of ['application/json'].")


def test_parse_json_object() -> None:
    assert V.parse_json_object(b'{"a": [1, "x"]}') == {"a": [1, "x"]}
    # Flask answers an empty or null body as {}, and decodes double-encoded JSON once more.
    assert V.parse_json_object(b"") == {}
    assert V.parse_json_object(b" \n") == {}
    assert V.parse_json_object(b"null") == {}
    assert V.parse_json_object(json.dumps(json.dumps({"run_id": "x"})).encode()) == {"run_id": "x"}


def test_parse_json_falls_back_to_stdlib() -> None:
    body = V.parse_json_object(b'{"a": NaN, "b": 1e400, "c": -Infinity, "d": 1' + b"0" * 30 + b"}")
    assert math.isnan(body["a"])
    assert body["b"] == math.inf
    assert body["c"] == -math.inf
    assert body["d"] == 10**30


@pytest.mark.parametrize("raw", [b"{bad", b'{"a": 1,}', b"\xff\xfe{", b'"not json"', b"{'a': 1}"])
def test_parse_json_malformed(raw: bytes) -> None:
    e = assert_invalid(V.parse_json_object, raw)
    assert e.message.startswith("Malformed JSON request body: ")
    assert len(e.message) < 300


@pytest.mark.parametrize(("raw", "kind"), [(b"[1]", "array"), (b"5", "number"), (b"true", "boolean")])
def test_parse_json_not_an_object(raw: bytes, kind: str) -> None:
    assert_invalid(V.parse_json_object, raw, f"Request body must be a JSON object, got {kind}")


# ---------------------------------------------------------------------------------------------------
# Run ids


@pytest.mark.parametrize("name", RUN_ENDPOINTS)
@pytest.mark.parametrize(
    "ids", [{}, {"run_id": ""}, {"run_id": None}, {"run_uuid": ""}, {"run_id": "", "run_uuid": RID}]
)
def test_run_id_missing(name: str, ids: dict[str, Any]) -> None:
    fn, body = RUN_ENDPOINTS[name]
    assert_invalid(fn, {**body, **ids}, missing_msg("run_id"))


@pytest.mark.parametrize("name", RUN_ENDPOINTS)
@pytest.mark.parametrize(
    ("value", "shown", "type_name"), [(5, "5", "int"), (True, "true", "bool"), (["x"], '["x"]', "list")]
)
def test_run_id_not_a_string(name: str, value: Any, shown: str, type_name: str) -> None:
    fn, body = RUN_ENDPOINTS[name]
    assert_invalid(fn, {**body, "run_id": value}, bad_value_msg(shown, "run_id", type_name))


@pytest.mark.parametrize("name", ["log_metric", "log_param", "set_tag", "delete_tag", "update_run"])
@pytest.mark.parametrize("rid", ["bad id!", "x" * 300, "-abc", "aé!"])
def test_bad_run_id_is_not_found(name: str, rid: str) -> None:
    fn, body = RUN_ENDPOINTS[name]
    assert_not_found(fn, {**body, "run_id": rid}, rid)


@pytest.mark.parametrize(
    ("rid", "shown"), [("bad id!", '"bad id!"'), ('aé"x', '"a\\u00e9\\"x"'), ("x" * 300, f'"{"x" * 300}"')]
)
def test_bad_run_id_in_log_batch(rid: str, shown: str) -> None:
    assert_invalid(V.log_batch, {"run_id": rid}, f"Invalid value {shown} for parameter 'run_id' supplied.")


def test_get_run() -> None:
    assert V.get_run({"run_id": RID}) == RID
    assert V.get_run({"run_uuid": RID}) == RID
    assert V.get_run({"run_id": RID, "run_uuid": "other"}) == RID
    for q in ({}, {"run_id": ""}, {"run_id": "", "run_uuid": RID}):
        assert_invalid(V.get_run, q, missing_msg("run_id"))
    assert_not_found(V.get_run, {"run_id": "bad id!"}, "bad id!")
    assert_not_found(V.get_run, {"run_uuid": "bad id!"}, "bad id!")


@pytest.mark.parametrize("name", ["log_metric", "log_param", "set_tag", "update_run"])
def test_run_uuid_fallback(name: str) -> None:
    fn, body = RUN_ENDPOINTS[name]
    result = fn({**body, "run_uuid": RID})
    assert result.run_id == RID
    assert fn({**body, "run_id": RID, "run_uuid": "zzz"}).run_id == RID
    assert fn({**body, "run_id": None, "run_uuid": RID}).run_id == RID
    assert_not_found(fn, {**body, "run_uuid": "bad id!"}, "bad id!")
    assert_invalid(fn, {**body, "run_id": RID, "run_uuid": 5}, bad_value_msg("5", "run_uuid", "int"))


def test_run_uuid_ignored_by_log_batch_and_delete_tag() -> None:
    # LogBatch and DeleteTag have no run_uuid field: it passes the presence check, then the run id is "".
    for uuid in (RID, "bad id!", 5):
        assert_invalid(V.log_batch, {"run_uuid": uuid}, "Invalid value \"\" for parameter 'run_id' supplied.")
        assert_not_found(V.delete_tag, {"run_uuid": uuid, "key": "a"}, "")
    assert V.log_batch({"run_id": RID, "run_uuid": 5}).run_id == RID
    assert V.delete_tag({"run_id": RID, "run_uuid": "zzz", "key": "k"}) == (RID, "k")


def test_run_id_regex() -> None:
    assert V.is_valid_run_id(RID)
    assert V.is_valid_run_id("a")
    assert V.is_valid_run_id("A-b_c" + "x" * 251)
    assert not V.is_valid_run_id("A-b_c" + "x" * 252)
    assert not V.is_valid_run_id("")
    assert not V.is_valid_run_id("_abc")
    assert not V.is_valid_run_id("a b")
    # The server matches with re.match and "$": one trailing newline passes (then: run not found).
    assert V.is_valid_run_id("abc\n")
    assert V.log_batch({"run_id": "abc\n"}).run_id == "abc\n"


# ---------------------------------------------------------------------------------------------------
# Keys


def key_body(endpoint: str, key: Any) -> tuple[Callable[[Any], Any], dict[str, Any]]:
    """A request carrying ``key`` in the place each endpoint reads it, index 1 inside batches."""
    fn, base = {
        "log_metric": (V.log_metric, {"run_id": RID, "value": 1, "timestamp": 1}),
        "log_param": (V.log_param, {"run_id": RID, "value": "v"}),
        "set_tag": (V.set_tag, {"run_id": RID, "value": "v"}),
        "batch_metrics": (V.log_batch, {}),
        "batch_params": (V.log_batch, {}),
        "batch_tags": (V.log_batch, {}),
    }[endpoint]
    if endpoint.startswith("batch_"):
        kind = endpoint[len("batch_") :]
        item: dict[str, Any] = metric(key) if kind == "metrics" else {"key": key, "value": "v"}
        ok: dict[str, Any] = metric("ok") if kind == "metrics" else {"key": "ok", "value": "v"}
        return fn, {"run_id": RID, kind: [ok, item]}
    return fn, {**base, "key": key}


KEY_PATHS = {  # the parameter name the server uses in character and path errors
    "log_metric": "name",
    "log_param": "key",
    "set_tag": "key",
    "batch_metrics": "metrics[1].name",
    "batch_params": "params[1].key",
    "batch_tags": "tags[1].key",
}
LENGTH_LABELS = {
    "log_metric": "Metric name",
    "log_param": "Param key",
    "set_tag": "key",
    "batch_metrics": "Metric name",
    "batch_params": "Param key",
    "batch_tags": "tags[1].key",
}
MISSING_KEY = {
    "log_metric": "key",
    "log_param": "key",
    "set_tag": "key",
    "batch_metrics": "metrics[1].key",
    "batch_params": "params[1].key",
    "batch_tags": "tags[1].key",
}


@pytest.mark.parametrize("endpoint", KEY_PATHS)
@pytest.mark.parametrize("key", [None, ""])
def test_key_missing(endpoint: str, key: Any) -> None:
    fn, body = key_body(endpoint, key)
    assert_invalid(fn, body, missing_msg(MISSING_KEY[endpoint]))


@pytest.mark.parametrize("endpoint", KEY_PATHS)
@pytest.mark.parametrize(
    ("key", "shown", "type_name"), [(5, "5", "int"), (True, "true", "bool"), (1.5, "1.5", "float")]
)
def test_key_not_a_string(endpoint: str, key: Any, shown: str, type_name: str) -> None:
    fn, body = key_body(endpoint, key)
    if endpoint.startswith("batch_"):
        # The server's proto parsing turns it into "", which then fails the path rule.
        message = f"Invalid value \"\" for parameter '{KEY_PATHS[endpoint]}' supplied: {bad_path('.')}"
    else:
        message = bad_value_msg(shown, "key", type_name)
    assert_invalid(fn, body, message)


@pytest.mark.parametrize("endpoint", KEY_PATHS)
@pytest.mark.parametrize(("key", "shown"), [("a#b", '"a#b"'), ("lö#", '"l\\u00f6#"'), ("#" * 300, f'"{"#" * 300}"')])
def test_key_bad_characters(endpoint: str, key: str, shown: str) -> None:
    fn, body = key_body(endpoint, key)
    assert_invalid(fn, body, f"Invalid value {shown} for parameter '{KEY_PATHS[endpoint]}' supplied: {BAD_CHARS}")


@pytest.mark.parametrize("endpoint", KEY_PATHS)
@pytest.mark.parametrize("key", ["a//b", "../x", "./a", "a/", "/a", ".", "..", "..x", "a/./b", "/" + "a" * 300])
def test_key_path_rule(endpoint: str, key: str) -> None:
    fn, body = key_body(endpoint, key)
    message = (
        f"Invalid value \"{key}\" for parameter '{KEY_PATHS[endpoint]}' supplied: {bad_path(posixpath.normpath(key))}"
    )
    assert_invalid(fn, body, message)


@pytest.mark.parametrize("endpoint", KEY_PATHS)
def test_key_length(endpoint: str) -> None:
    fn, body = key_body(endpoint, "k" * 250)
    fn(body)
    fn, body = key_body(endpoint, "k" * 251)
    assert_invalid(fn, body, f"'{LENGTH_LABELS[endpoint]}' exceeds the maximum length of 250 characters")
    fn, body = key_body(endpoint, "é" * 251)
    assert_invalid(fn, body, f"'{LENGTH_LABELS[endpoint]}' exceeds the maximum length of 250 characters")


@pytest.mark.parametrize("endpoint", KEY_PATHS)
@pytest.mark.parametrize("key", ["lösung/ü:1 x-y.z", " ", "a b", "x:y", "a.b/c-d_e", "a\n", "日本語/ключ", "k" * 250])
def test_key_accepted(endpoint: str, key: str) -> None:
    fn, body = key_body(endpoint, key)
    fn(body)
    fn(body)  # second time from the cache


def test_key_cache_is_bounded_and_only_holds_valid_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(V, "_KEY_CACHE_MAX", 10)
    for i in range(25):
        V.log_param({"run_id": RID, "key": f"p{i}", "value": "v"})
        assert len(V._valid_keys) <= 10
    with pytest.raises(MlflowApiError):
        V.log_param({"run_id": RID, "key": "a#", "value": "v"})
    assert "a#" not in V._valid_keys
    # A key cached as a param is still checked the same way as a metric name.
    V.log_param({"run_id": RID, "key": "shared", "value": "v"})
    assert V.log_metric({"run_id": RID, "key": "shared", "value": 1, "timestamp": 1}).metrics


def test_delete_tag_checks_no_key_rules() -> None:
    # The server answers 404 "No tag with name" for these: only presence and type are checked.
    assert V.delete_tag({"run_id": RID, "key": "a#b"}) == (RID, "a#b")
    assert V.delete_tag({"run_id": RID, "key": "k" * 300}) == (RID, "k" * 300)
    assert_invalid(V.delete_tag, {"run_id": RID}, missing_msg("key"))
    assert_invalid(V.delete_tag, {"run_id": RID, "key": ""}, missing_msg("key"))
    assert_invalid(V.delete_tag, {"run_id": RID, "key": 5}, bad_value_msg("5", "key", "int"))


def test_key_errors_come_before_the_run_lookup() -> None:
    for fn, body in (key_body("log_metric", "a#"), key_body("log_param", "a#"), key_body("set_tag", "a#")):
        e = assert_invalid(fn, {**body, "run_id": "bad id!"})
        assert BAD_CHARS in e.message


# ---------------------------------------------------------------------------------------------------
# Metric values, timestamps and steps


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1.0),
        (0, 0.0),
        (-3, -3.0),
        (2.5, 2.5),
        (-0.0, -0.0),
        (10**400, "Infinity"),
        (-(10**400), "-Infinity"),
        (math.inf, "Infinity"),
        (-math.inf, "-Infinity"),
        (math.nan, "NaN"),
        ("NaN", "NaN"),
        ("Infinity", "Infinity"),
        ("-Infinity", "-Infinity"),
        ("nan", "NaN"),
        (" NaN ", "NaN"),
        ("inf", "Infinity"),
        ("-inf", "-Infinity"),
        ("1e400", "Infinity"),
        ("3", 3.0),
        (" 1.5 ", 1.5),
        ("1_0", 10.0),
        ("-2.5e-3", -0.0025),
    ],
)
def test_metric_value_normalised(value: Any, expected: float | str) -> None:
    for fn, body in (
        (V.log_metric, {"run_id": RID, "key": "m", "value": value, "timestamp": 1}),
        (V.log_batch, {"run_id": RID, "metrics": [metric("m", value)]}),
    ):
        got = fn(body).metrics[0][1]
        assert type(got) is type(expected)
        assert got == expected
        if isinstance(expected, float):
            assert math.copysign(1, got) == math.copysign(1, expected)


@pytest.mark.parametrize("value", [None, ""])
def test_metric_value_missing(value: Any) -> None:
    assert_invalid(V.log_metric, {"run_id": RID, "key": "m", "value": value, "timestamp": 1}, missing_msg("value"))
    assert_invalid(V.log_batch, {"run_id": RID, "metrics": [metric("m", value)]}, missing_msg("metrics[0].value"))
    assert_invalid(V.log_metric, {"run_id": RID, "key": "m", "timestamp": 1}, missing_msg("value"))


@pytest.mark.parametrize(
    ("value", "shown", "type_name"),
    [
        ("abc", '"abc"', "str"),
        ("0x10", '"0x10"', "str"),
        (True, "true", "bool"),
        (False, "false", "bool"),
        ([1], "[1]", "list"),
        ({"a": 1}, '{"a":1}', "dict"),
    ],
)
def test_metric_value_rejected(value: Any, shown: str, type_name: str) -> None:
    assert_invalid(
        V.log_metric,
        {"run_id": RID, "key": "m", "value": value, "timestamp": 1},
        bad_value_msg(shown, "value", type_name),
    )
    assert_invalid(
        V.log_batch,
        {"run_id": RID, "metrics": [metric("m", value)]},
        bad_value_msg(shown, "metrics[0].value", type_name),
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (0, 0),
        (5, 5),
        (2**63 - 1, 2**63 - 1),
        ("1700000000001", 1700000000001),
        (" 17 ", 17),
        ("+5", 5),
        ("1_0", 10),
        ("1e3", 1000),
        ("5.0", 5),
        (5.0, 5),
        (1e3, 1000),
        (str(2**63 - 1), 2**63 - 1),
    ],
)
def test_int64_accepted(raw: Any, expected: int) -> None:
    item = V.log_metric({"run_id": RID, "key": "m", "value": 1, "timestamp": raw, "step": raw}).metrics[0]
    assert item[2:] == [expected, expected]
    assert type(item[2]) is int
    item = V.log_batch({"run_id": RID, "metrics": [metric(timestamp=raw, step=raw)]}).metrics[0]
    assert item[2:] == [expected, expected]
    run = V.create_run({"experiment_id": "0", "start_time": raw})
    assert run.start_time == expected
    assert V.update_run({"run_id": RID, "end_time": raw}).end_time == expected


@pytest.mark.parametrize(
    ("raw", "shown", "type_name"),
    [
        ("abc", '"abc"', "str"),
        ("5.5", '"5.5"', "str"),
        ("inf", '"inf"', "str"),
        (5.5, "5.5", "float"),
        (True, "true", "bool"),
        ([1], "[1]", "list"),
        (2**63, str(2**63), "int"),
        (-(2**63) - 1, str(-(2**63) - 1), "int"),
        (str(2**63), f'"{2**63}"', "str"),
        (1e19, "1e+19", "float"),
    ],
)
def test_int64_rejected(raw: Any, shown: str, type_name: str) -> None:
    for field, build in (
        ("timestamp", lambda v: {"run_id": RID, "key": "m", "value": 1, "timestamp": v}),
        ("step", lambda v: {"run_id": RID, "key": "m", "value": 1, "timestamp": 1, "step": v}),
    ):
        assert_invalid(V.log_metric, build(raw), bad_value_msg(shown, field, type_name))
    assert_invalid(
        V.log_batch,
        {"run_id": RID, "metrics": [metric(timestamp=raw)]},
        bad_value_msg(shown, "metrics[0].timestamp", type_name),
    )
    assert_invalid(
        V.log_batch, {"run_id": RID, "metrics": [metric(step=raw)]}, bad_value_msg(shown, "metrics[0].step", type_name)
    )
    assert_invalid(
        V.create_run, {"experiment_id": "0", "start_time": raw}, bad_value_msg(shown, "start_time", type_name)
    )
    assert_invalid(V.update_run, {"run_id": RID, "end_time": raw}, bad_value_msg(shown, "end_time", type_name))


def test_timestamp_missing() -> None:
    assert_invalid(V.log_metric, {"run_id": RID, "key": "m", "value": 1}, missing_msg("timestamp"))
    assert_invalid(V.log_metric, {"run_id": RID, "key": "m", "value": 1, "timestamp": None}, missing_msg("timestamp"))
    # log-metric checks the type before presence, so "" is a bad value there; log-batch calls it missing.
    assert_invalid(
        V.log_metric, {"run_id": RID, "key": "m", "value": 1, "timestamp": ""}, bad_value_msg('""', "timestamp", "str")
    )
    assert_invalid(V.log_batch, {"run_id": RID, "metrics": [metric(timestamp="")]}, missing_msg("metrics[0].timestamp"))
    assert_invalid(
        V.log_batch, {"run_id": RID, "metrics": [{"key": "m", "value": 1}]}, missing_msg("metrics[0].timestamp")
    )


@pytest.mark.parametrize(
    ("value", "ts", "shown_ts", "shown_value"),
    [
        (1, -5, "-5", "1.0"),
        (1, "-5", "-5", "1.0"),
        (3, -1, "-1", "3.0"),
        (2.5, -1, "-1", "2.5"),
        (1e20, -1, "-1", "1e+20"),
        ("NaN", -1, "-1", "nan"),
        ("Infinity", -1, "-1", "inf"),
        ("-Infinity", -1, "-1", "-inf"),
        (1, -(2**63), str(-(2**63)), "1.0"),
    ],
)
def test_negative_timestamp(value: Any, ts: Any, shown_ts: str, shown_value: str) -> None:
    tail = f"metric 'lö' (value={shown_value}). Timestamp must be a nonnegative long (64-bit integer) "
    assert_invalid(
        V.log_metric,
        {"run_id": RID, "key": "lö", "value": value, "timestamp": ts},
        f"Invalid value {shown_ts} for parameter 'timestamp' supplied: {tail}",
    )
    assert_invalid(
        V.log_batch,
        {"run_id": RID, "metrics": [metric("lö", value, ts)]},
        f"Invalid value {shown_ts} for parameter 'metrics[0].timestamp' supplied: {tail}",
    )


def test_negative_timestamp_reported_before_key_length() -> None:
    e = assert_invalid(V.log_metric, {"run_id": RID, "key": "k" * 251, "value": 1, "timestamp": -1})
    assert "Timestamp must be a nonnegative long" in e.message
    e = assert_invalid(V.log_batch, {"run_id": RID, "metrics": [metric("k" * 251, 1, -1)]})
    assert "Timestamp must be a nonnegative long" in e.message


def test_step_default_and_negative() -> None:
    assert V.log_metric({"run_id": RID, "key": "m", "value": 1, "timestamp": 7}).metrics == [["m", 1.0, 7, 0]]
    assert V.log_metric({"run_id": RID, "key": "m", "value": 1, "timestamp": 7, "step": None}).metrics[0][3] == 0
    assert V.log_batch({"run_id": RID, "metrics": [metric(step=-(2**63))]}).metrics[0][3] == -(2**63)
    assert_invalid(
        V.log_metric,
        {"run_id": RID, "key": "m", "value": 1, "timestamp": 1, "step": ""},
        bad_value_msg('""', "step", "str"),
    )


def test_metric_extras() -> None:
    extras = {"model_id": "m-1", "dataset_name": "train", "dataset_digest": "abc"}
    got = V.log_metric({"run_id": RID, "key": "m", "value": 1, "timestamp": 1, **extras}).metrics[0]
    assert got == ["m", 1.0, 1, 0, extras]
    got = V.log_batch({"run_id": RID, "metrics": [metric(step=2, model_id="m-1", run_id=RID)]}).metrics[0]
    assert got == ["m", 1.0, 1, 2, {"model_id": "m-1"}]
    # Empty or null extras are what the server treats as unset.
    got = V.log_batch({"run_id": RID, "metrics": [metric(model_id="", dataset_name=None)]}).metrics[0]
    assert got == ["m", 1.0, 1, 0]
    assert V.log_batch({"run_id": RID, "metrics": [metric(run_id=RID)]}).metrics[0] == ["m", 1.0, 1, 0]
    assert_invalid(
        V.log_metric,
        {"run_id": RID, "key": "m", "value": 1, "timestamp": 1, "model_id": 5},
        bad_value_msg("5", "model_id", "int"),
    )
    assert_invalid(
        V.log_batch,
        {"run_id": RID, "metrics": [metric(dataset_digest=5)]},
        bad_value_msg("5", "metrics[0].dataset_digest", "int"),
    )
    # With a model_id the server looks the run up before it checks the name.
    assert_not_found(
        V.log_metric, {"run_id": "bad id!", "key": "a#", "value": 1, "timestamp": 1, "model_id": "m-1"}, "bad id!"
    )


def test_log_metric_field_types_before_name_rules() -> None:
    e = assert_invalid(V.log_metric, {"run_id": RID, "key": "a#", "value": 1, "timestamp": "abc"})
    assert e.message == bad_value_msg('"abc"', "timestamp", "str")


# ---------------------------------------------------------------------------------------------------
# Params and tags


def test_param_and_tag_values() -> None:
    assert V.log_param({"run_id": RID, "key": "p"}).params == [["p", ""]]
    assert V.log_param({"run_id": RID, "key": "p", "value": None}).params == [["p", ""]]
    assert V.set_tag({"run_id": RID, "key": "t"}).tags == [["t", ""]]
    assert V.log_param({"run_id": RID, "key": "p", "value": "x" * 6000}).params[0][1] == "x" * 6000
    assert V.log_param({"run_id": RID, "key": "p", "value": "x" * 6001}).params[0][1] == "x" * 6000
    assert V.set_tag({"run_id": RID, "key": "t", "value": "x" * 8000}).tags[0][1] == "x" * 8000
    assert V.set_tag({"run_id": RID, "key": "t", "value": "x" * 8001}).tags[0][1] == "x" * 8000
    batch = V.log_batch(
        {
            "run_id": RID,
            "params": [{"key": "a"}, {"key": "b", "value": None}, {"key": "c", "value": "y" * 7000}],
            "tags": [{"key": "a"}, {"key": "b", "value": "z" * 9000}],
        }
    )
    assert batch.params == [["a", ""], ["b", ""], ["c", "y" * 6000]]
    assert batch.tags == [["a", ""], ["b", "z" * 8000]]
    assert_invalid(V.log_param, {"run_id": RID, "key": "p", "value": 5}, bad_value_msg("5", "value", "int"))
    assert_invalid(V.set_tag, {"run_id": RID, "key": "t", "value": 5}, bad_value_msg("5", "value", "int"))
    assert_invalid(
        V.log_batch, {"run_id": RID, "params": [{"key": "p", "value": 5}]}, bad_value_msg("5", "params[0].value", "int")
    )
    assert_invalid(
        V.log_batch,
        {"run_id": RID, "tags": [{"key": "t", "value": [1]}]},
        bad_value_msg("[1]", "tags[0].value", "list"),
    )


# ---------------------------------------------------------------------------------------------------
# log-batch containers, order of checks, limits, duplicates


def test_log_batch_normalises() -> None:
    batch = V.log_batch(
        {
            "run_id": RID,
            "metrics": [metric("a", "NaN", "5", step=3), metric("b", 2, 6)],
            "params": [{"key": "p", "value": "1"}],
            "tags": [{"key": "t", "value": "x"}],
        }
    )
    assert batch == V.LogBatch(RID, [["a", "NaN", 5, 3], ["b", 2.0, 6, 0]], [["p", "1"]], [["t", "x"]])
    assert V.log_batch({"run_id": RID}) == V.LogBatch(RID, [], [], [])
    assert V.log_batch({"run_id": RID, "metrics": None, "params": None, "tags": None}) == V.LogBatch(RID, [], [], [])


@pytest.mark.parametrize("kind", ["metrics", "params", "tags"])
@pytest.mark.parametrize(
    ("value", "shown", "type_name"), [("abc", '"abc"', "str"), ({"a": 1}, '{"a":1}', "dict"), (5, "5", "int")]
)
def test_log_batch_container_not_a_list(kind: str, value: Any, shown: str, type_name: str) -> None:
    assert_invalid(V.log_batch, {"run_id": RID, kind: value}, bad_value_msg(shown, kind, type_name))


@pytest.mark.parametrize("kind", ["metrics", "params", "tags"])
@pytest.mark.parametrize("element", [5, None, ["a", "b"], "x"])
def test_log_batch_element_not_an_object(kind: str, element: Any) -> None:
    e = assert_invalid(V.log_batch, {"run_id": RID, kind: [element]})
    assert f"for parameter '{kind}[0]' supplied" in e.message
    assert "must be a JSON object" in e.message


def many(kind: str, n: int) -> list[dict[str, Any]]:
    if kind == "metrics":
        return [metric(f"m{i}", i) for i in range(n)]
    return [{"key": f"{kind[0]}{i}", "value": "v"} for i in range(n)]


def limit_msg(limit: int, what: str, n: int) -> str:
    return (
        f"A batch logging request can contain at most {limit} {what}. Got {n} {what}. "
        f"Please split up {what} across multiple requests and try again."
    )


@pytest.mark.parametrize(("kind", "limit"), [("metrics", 1000), ("params", 100), ("tags", 100)])
def test_log_batch_limits(kind: str, limit: int) -> None:
    assert len(getattr(V.log_batch({"run_id": RID, kind: many(kind, limit)}), kind)) == limit
    assert_invalid(V.log_batch, {"run_id": RID, kind: many(kind, limit + 1)}, limit_msg(limit, kind, limit + 1))


def test_log_batch_total_limit() -> None:
    ok = {"run_id": RID, "metrics": many("metrics", 900), "params": many("params", 100)}
    V.log_batch(ok)
    assert_invalid(V.log_batch, {**ok, "tags": many("tags", 1)}, limit_msg(1000, "metrics, params, and tags", 1001))
    # The per-kind limits are checked first.
    body = {"run_id": RID, "metrics": many("metrics", 1001), "params": many("params", 101)}
    assert_invalid(V.log_batch, body, limit_msg(1000, "metrics", 1001))


def test_log_batch_duplicate_params() -> None:
    params = [
        {"key": k, "value": v}
        for k, v in [("q", "1"), ("q", "1"), ("b", "1"), ("b", "2"), ("b", "3"), ("a", "3"), ("a", "3")]
    ]
    assert_invalid(
        V.log_batch,
        {"run_id": RID, "params": params},
        "Duplicate parameter keys have been submitted: ['q', 'b', 'b', 'a']. Please ensure the request "
        "contains only one param value per param key.",
    )
    # The limit comes first.
    body = {"run_id": RID, "params": [{"key": "q", "value": "1"}] * 101}
    assert_invalid(V.log_batch, body, limit_msg(100, "params", 101))
    # Equal tag keys are not an error here.
    V.log_batch({"run_id": RID, "tags": [{"key": "t", "value": "1"}, {"key": "t", "value": "2"}]})


def test_log_batch_order_of_checks() -> None:
    bad_name = metric("a#")
    # Item checks come before the limits (as the server does)...
    e = assert_invalid(V.log_batch, {"run_id": RID, "metrics": [bad_name, *many("metrics", 1000)]})
    assert e.message.startswith("Invalid value \"a#\" for parameter 'metrics[0].name'")
    # ...but after every presence check, in any container...
    e = assert_invalid(V.log_batch, {"run_id": RID, "metrics": [bad_name], "tags": [{"value": "x"}]})
    assert e.message == missing_msg("tags[0].key")
    e = assert_invalid(V.log_batch, {"run_id": RID, "metrics": [bad_name, {"key": "b", "value": 1}]})
    assert e.message == missing_msg("metrics[1].timestamp")
    e = assert_invalid(V.log_batch, {"run_id": RID, "metrics": [bad_name], "params": "x"})
    assert e.message == bad_value_msg('"x"', "params", "str")
    # ...and after the run id's syntax.
    e = assert_invalid(V.log_batch, {"run_id": "bad id!", "metrics": [bad_name]})
    assert e.message == "Invalid value \"bad id!\" for parameter 'run_id' supplied."
    e = assert_invalid(V.log_batch, {"run_id": "bad id!", "tags": [{"value": "x"}]})
    assert e.message == missing_msg("tags[0].key")
    # Metrics are checked before params, whatever the JSON order.
    e = assert_invalid(V.log_batch, {"run_id": RID, "params": [{"key": "a#", "value": "1"}], "metrics": [metric("b#")]})
    assert "'metrics[0].name'" in e.message
    e = assert_invalid(
        V.log_batch,
        {"run_id": RID, "tags": [{"key": "k" * 251, "value": "1"}], "params": [{"key": "k" * 251, "value": "1"}]},
    )
    assert e.message == "'Param key' exceeds the maximum length of 250 characters"


# ---------------------------------------------------------------------------------------------------
# runs/create, runs/update


def test_create_run() -> None:
    run = V.create_run(
        {
            "experiment_id": "0",
            "user_id": "me",
            "run_name": "r",
            "start_time": 17,
            "tags": [
                {"key": "mlflow.runName", "value": "r"},
                {"key": "a#b", "value": None},
                {"key": "k" * 300, "value": "v"},
            ],
        }
    )
    assert run == V.CreateRun("0", "me", "r", 17, [["mlflow.runName", "r"], ["a#b", ""], ["k" * 300, "v"]])
    assert V.create_run({"experiment_id": "12"}) == V.CreateRun("12", None, None, None, [])
    assert V.create_run({"experiment_id": "0", "run_name": "", "user_id": ""}).run_name is None
    assert V.create_run({"experiment_id": "0", "start_time": -5}).start_time == -5
    assert V.create_run({"experiment_id": "0a1b2c3d-e4f5-4a6b-8c7d-9e0f1a2b3c4d"}).experiment_id.startswith("0a1b")


@pytest.mark.parametrize("body", [{}, {"experiment_id": None}, {"experiment_id": ""}])
def test_create_run_without_experiment_is_bad_request(body: dict[str, Any]) -> None:
    e = fails(V.create_run, body)
    assert (e.status, e.error_code) == (400, "BAD_REQUEST")
    assert "experiment_id" in e.message


def test_create_run_rejects() -> None:
    assert_invalid(V.create_run, {"experiment_id": 0}, bad_value_msg("0", "experiment_id", "int"))
    for exp in ("bad id!", "-1x", "x" * 65):
        assert_invalid(
            V.create_run,
            {"experiment_id": exp},
            f"Invalid experiment ID '{exp}'. Experiment ID must be a valid integer.",
        )
    assert_invalid(V.create_run, {"experiment_id": "0", "run_name": 5}, bad_value_msg("5", "run_name", "int"))
    assert_invalid(V.create_run, {"experiment_id": "0", "user_id": 5}, bad_value_msg("5", "user_id", "int"))
    assert_invalid(V.create_run, {"experiment_id": "0", "tags": "x"}, bad_value_msg('"x"', "tags", "str"))
    assert_invalid(V.create_run, {"experiment_id": "0", "tags": [{"value": "v"}]}, missing_msg("tags[0].key"))
    assert_invalid(V.create_run, {"experiment_id": "0", "tags": [{"key": 5}]}, bad_value_msg("5", "tags[0].key", "int"))
    assert_invalid(
        V.create_run,
        {"experiment_id": "0", "tags": [{"key": "a", "value": 5}]},
        bad_value_msg("5", "tags[0].value", "int"),
    )
    e = assert_invalid(V.create_run, {"experiment_id": "0", "tags": [5]})
    assert "'tags[0]'" in e.message


def test_create_run_name_conflict() -> None:
    message = (
        "Both 'run_name' argument and 'mlflow.runName' tag are specified, but with different values "
        "(run_name='x', mlflow.runName='y')."
    )
    tag_y = {"key": "mlflow.runName", "value": "y"}
    assert_invalid(V.create_run, {"experiment_id": "0", "run_name": "x", "tags": [tag_y]}, message)
    # The first runName tag is the one compared.
    tag_x = {"key": "mlflow.runName", "value": "x"}
    assert_invalid(V.create_run, {"experiment_id": "0", "run_name": "x", "tags": [tag_y, tag_x]}, message)
    assert V.create_run({"experiment_id": "0", "run_name": "", "tags": [tag_y]}).tags == [["mlflow.runName", "y"]]


@pytest.mark.parametrize(
    "tags",
    [
        [{"key": "a", "value": "1"}, {"key": "a", "value": "2"}],
        [{"key": "mlflow.runName", "value": ""}],  # the server adds its own runName tag beside it
    ],
)
def test_create_run_duplicate_tags_are_bad_request(tags: list[dict[str, Any]]) -> None:
    e = fails(V.create_run, {"experiment_id": "0", "run_name": "x", "tags": tags})
    assert (e.status, e.error_code) == (400, "BAD_REQUEST")


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("RUNNING", "RUNNING"),
        ("SCHEDULED", "SCHEDULED"),
        ("FINISHED", "FINISHED"),
        ("FAILED", "FAILED"),
        ("KILLED", "KILLED"),
        (1, "RUNNING"),
        (3, "FINISHED"),
        (5, "KILLED"),
        (3.0, "FINISHED"),
        ("3", "FINISHED"),
        (True, "RUNNING"),
        ("BOGUS", None),
        ("finished", None),
        ("", None),
        ("0", None),
        (None, None),
        (math.nan, None),
    ],
)
def test_update_run_status(status: Any, expected: str | None) -> None:
    assert V.update_run({"run_id": RID, "status": status}).status == expected


@pytest.mark.parametrize(
    ("status", "shown", "type_name"),
    [(0, "0", "int"), (6, "6", "int"), (False, "false", "bool"), (["FINISHED"], '["FINISHED"]', "list")],
)
def test_update_run_status_rejected(status: Any, shown: str, type_name: str) -> None:
    assert_invalid(V.update_run, {"run_id": RID, "status": status}, bad_value_msg(shown, "status", type_name))


def test_update_run() -> None:
    assert V.update_run({"run_id": RID}) == V.UpdateRun(RID, None, None, None)
    assert V.update_run({"run_uuid": RID, "status": "FINISHED", "end_time": "-5", "run_name": "n"}) == V.UpdateRun(
        RID, "FINISHED", -5, "n"
    )
    assert V.update_run({"run_id": RID, "run_name": ""}).run_name is None
    assert_invalid(V.update_run, {"run_id": RID, "run_name": 5}, bad_value_msg("5", "run_name", "int"))
    assert_invalid(V.update_run, {"run_id": RID, "end_time": ""}, bad_value_msg('""', "end_time", "str"))
    # Field types are checked before the run is looked up.
    assert_invalid(V.update_run, {"run_id": "bad id!", "end_time": "abc"}, bad_value_msg('"abc"', "end_time", "str"))


# ---------------------------------------------------------------------------------------------------
# Experiments


def test_create_experiment() -> None:
    assert V.create_experiment({"name": "e"}) == V.CreateExperiment("e", None, [])
    assert V.create_experiment({"name": "   "}).name == "   "
    assert V.create_experiment({"name": "n" * 500}).name == "n" * 500
    got = V.create_experiment({"name": "e", "artifact_location": "s3://b/p", "tags": [{"key": "k", "value": None}]})
    assert got == V.CreateExperiment("e", "s3://b/p", [["k", ""]])
    assert V.create_experiment({"name": "e", "artifact_location": ""}).artifact_location is None


def test_create_experiment_rejects() -> None:
    for body in ({}, {"name": ""}, {"name": None}):
        assert_invalid(V.create_experiment, body, missing_msg("name"))
    assert_invalid(V.create_experiment, {"name": 5}, bad_value_msg("5", "name", "int"))
    assert_invalid(V.create_experiment, {"name": "n" * 501}, "'name' exceeds the maximum length of 500 characters")
    assert_invalid(
        V.create_experiment, {"name": "e", "artifact_location": 5}, bad_value_msg("5", "artifact_location", "int")
    )
    assert_invalid(V.create_experiment, {"name": "e", "tags": "x"}, bad_value_msg('"x"', "tags", "str"))
    assert_invalid(
        V.create_experiment,
        {"name": "e", "tags": [{"key": "a#b", "value": "v"}]},
        f"Invalid value \"a#b\" for parameter 'key' supplied: {BAD_CHARS}",
    )
    # A missing, non-string or non-object tag key reaches the store as "".
    for tag in ({"value": "v"}, {"key": 5}, 5):
        assert_invalid(
            V.create_experiment,
            {"name": "e", "tags": [tag]},
            f"Invalid value \"\" for parameter 'key' supplied: {bad_path('.')}",
        )
    assert_invalid(
        V.create_experiment,
        {"name": "e", "tags": [{"key": "k" * 251}]},
        "'key' exceeds the maximum length of 250 characters",
    )
    assert_invalid(
        V.create_experiment,
        {"name": "e", "tags": [{"key": "k", "value": "v" * 20001}]},
        "'value' exceeds the maximum length of 20000 characters",
    )


def test_experiment_queries() -> None:
    assert V.experiment_name({"experiment_name": "  "}) == "  "
    for q in ({}, {"experiment_name": ""}):
        assert_invalid(V.experiment_name, q, missing_msg("experiment_name"))
    assert V.experiment_id({"experiment_id": "0"}) == "0"
    for q in ({}, {"experiment_id": ""}):
        assert_invalid(V.experiment_id, q, missing_msg("experiment_id"))
    assert_invalid(
        V.experiment_id,
        {"experiment_id": "bad id!"},
        "Invalid experiment ID 'bad id!'. Experiment ID must be a valid integer.",
    )


# ---------------------------------------------------------------------------------------------------
# Properties

SEGMENT = st.text(alphabet=st.sampled_from("abcXYZ019_- :é日"), min_size=1, max_size=12).filter(
    lambda s: not s.startswith("..")
)
KEYS = st.lists(SEGMENT, min_size=1, max_size=4).map("/".join).filter(lambda k: len(k) <= 250)
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
TIMESTAMPS = st.integers(min_value=0, max_value=2**63 - 1)
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(["NaN", "Infinity", "-Infinity"]),
)


def canonical(v: float | int | str) -> float | str:
    if isinstance(v, str):
        return v
    try:
        f = float(v)
    except OverflowError:
        return "Infinity" if v > 0 else "-Infinity"
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "Infinity" if f > 0 else "-Infinity"
    return f


@st.composite
def batches(draw: st.DrawFn) -> tuple[dict[str, Any], V.LogBatch]:
    metrics = draw(
        st.lists(st.tuples(KEYS, VALUES, TIMESTAMPS, st.one_of(st.none(), INT64), st.booleans()), max_size=60)
    )
    param_keys = draw(st.lists(KEYS, unique=True, max_size=20))
    params = [(k, draw(st.text(max_size=30))) for k in param_keys]
    tags = draw(st.lists(st.tuples(KEYS, st.one_of(st.none(), st.text(max_size=30))), max_size=20))
    body_metrics: list[dict[str, Any]] = []
    expected_metrics: list[list[Any]] = []
    for key, value, ts, step, as_string in metrics:
        m: dict[str, Any] = {"key": key, "value": value, "timestamp": str(ts) if as_string else ts}
        if step is not None:
            m["step"] = step
        body_metrics.append(m)
        expected_metrics.append([key, canonical(value), ts, step or 0])
    body = {
        "run_id": RID,
        "metrics": body_metrics,
        "params": [{"key": k, "value": v} for k, v in params],
        "tags": [{"key": k, "value": v} for k, v in tags],
    }
    expected = V.LogBatch(RID, expected_metrics, [[k, v] for k, v in params], [[k, v or ""] for k, v in tags])
    return body, expected


def same_items(a: list[list[Any]], b: list[list[Any]]) -> bool:
    return orjson.dumps(a) == orjson.dumps(b) and all(
        type(x) is type(y) for ia, ib in zip(a, b, strict=True) for x, y in zip(ia, ib, strict=True)
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_valid_batches_round_trip(case: tuple[dict[str, Any], V.LogBatch]) -> None:
    body, expected = case
    for attempt in range(2):  # cold, then with every key cached
        got = V.log_batch(body)
        assert got.run_id == expected.run_id
        assert same_items(got.metrics, expected.metrics), attempt
        assert got.params == expected.params
        assert got.tags == expected.tags
    # Through the wire too: json.dumps writes bare NaN/Infinity tokens, which take the stdlib fallback.
    got = V.log_batch(V.parse_json_object(json.dumps(body).encode()))
    assert same_items(got.metrics, expected.metrics)
    assert (got.params, got.tags) == (expected.params, expected.tags)


ANY_KEY = st.one_of(
    st.text(alphabet=st.sampled_from("ab/._- :#\n\tüé日$"), max_size=8),
    st.sampled_from(["k" * 250, "k" * 251, "#" * 251, "/" + "a" * 250, "a" * 249 + "/", "..", "a/..", "\n"]),
)


def mlflow_message(check: Callable[[], object]) -> str | None:
    exceptions = pytest.importorskip("mlflow.exceptions")
    try:
        check()
    except exceptions.MlflowException as e:
        return str(e.message)
    return None


def our_message(call: Callable[[], object]) -> str | None:
    try:
        call()
    except MlflowApiError as e:
        return e.message
    return None


@settings(max_examples=400, deadline=None)
@given(key=ANY_KEY, value=st.floats(allow_nan=True, allow_infinity=True), ts=st.integers(min_value=-3, max_value=3))
def test_key_and_timestamp_rules_match_mlflow_itself(key: str, value: float, ts: int) -> None:
    """Our messages equal the ones MLflow 3.17.2's own validation code raises (empty keys aside)."""
    mlflow_validation = pytest.importorskip("mlflow.utils.validation")
    if key == "":
        return  # the server's handler answers "missing" before its store sees an empty key
    V._valid_keys.clear()
    wire_value: float | str = canonical(value)
    expected = mlflow_message(lambda: mlflow_validation._validate_metric(key, value, ts, 0, path="metrics[0]"))
    assert our_message(lambda: V.log_batch({"run_id": RID, "metrics": [metric(key, wire_value, ts)]})) == expected
    expected = mlflow_message(lambda: mlflow_validation._validate_metric(key, value, ts, 0))
    body = {"run_id": RID, "key": key, "value": wire_value, "timestamp": ts}
    assert our_message(lambda: V.log_metric(body)) == expected
    expected = mlflow_message(lambda: mlflow_validation._validate_param(key, "v"))
    assert our_message(lambda: V.log_param({"run_id": RID, "key": key, "value": "v"})) == expected
    expected = mlflow_message(lambda: mlflow_validation._validate_param(key, "v", path="params[0]"))
    assert our_message(lambda: V.log_batch({"run_id": RID, "params": [{"key": key}]})) == expected
    expected = mlflow_message(lambda: mlflow_validation._validate_tag(key, "v", path="tags[0]"))
    assert our_message(lambda: V.log_batch({"run_id": RID, "tags": [{"key": key}]})) == expected
    # And a second time, answered from the key cache, the same.
    assert our_message(lambda: V.log_param({"run_id": RID, "key": key, "value": "v"})) == mlflow_message(
        lambda: mlflow_validation._validate_param(key, "v")
    )
