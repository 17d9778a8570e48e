"""Validation of tracking writes, answering exactly like a real MLflow 3.17.2 server (SQL store).

The agent acknowledges writes before the real server sees them, so anything the server would reject
must be rejected here with the same HTTP status, ``error_code`` and, where the server's wording is
deterministic, the same message. Everything is pure (no I/O); the functions raise ``MlflowApiError``.

Probed against ``mlflow server`` 3.17.2 (sqlite backend). Status 400 INVALID_PARAMETER_VALUE unless
noted; <p> is the parameter path the server names in its message.

================================  ==========================================================================
request                           real server answer (and what this module does, where different)
================================  ==========================================================================
Content-Type absent               "Bad Request. Content-Type header is missing."
Content-Type "", "text/plain",    "Bad Request. Content-Type must be one of ['application/json']." (the media
"APPLICATION/JSON", ...           type before ";" is compared verbatim: "application/json ;x=1" is rejected)
run_id absent / "" / null         missing 'run_id' (run_uuid is the fallback only if run_id is absent/null)
run_id 5                          "Invalid value 5 for parameter 'run_id' supplied:  Hint: ..."
bad run id, log-batch             Invalid value "bad id!" for parameter 'run_id' supplied.
bad run id, other endpoints       404 RESOURCE_DOES_NOT_EXIST "Run with id=bad id! not found", after the
                                  field checks (a bad key is reported first)
only run_uuid: log-batch          Invalid value "" for parameter 'run_id' supplied.
only run_uuid: delete-tag         404 "Run with id= not found" (both ignore run_uuid)
key null / ""                     missing 'key' / 'metrics[i].key' / 'params[i].key' / 'tags[i].key'
key 5                             bad_value 'key'; in log-batch: path error on "" ('metrics[i].name', ...)
key "a#b" / "a//b" / "/a" / "."   char or path error; <p> = 'name' (log-metric), 'key' (log-parameter,
                                  set-tag), 'metrics[i].name', 'params[i].key', 'tags[i].key'
key of 251 chars                  "'Metric name' | 'Param key' | 'key' (set-tag) | 'tags[i].key' exceeds the
                                  maximum length of 250 characters" (after name chars and timestamp)
delete-tag key "a#b" / 251 chars  not checked by the server (404 "No tag with name"): not checked here
metric value null / "" / "abc"    missing 'value' ('metrics[i].value') / same / bad_value 'value'
metric value true, [1], 1e400     200 with garbage stored, or 500 (here: bad_value, bad_value, "Infinity")
timestamp null (batch: also "")   missing 'timestamp'; "abc" and, in log-metric, "" -> bad_value
timestamp/step "abc", "12.5", 1.5 log-batch: 200 with 0 stored (log-metric 12.5/1.5 likewise): bad_value here
timestamp -5                      "Invalid value -5 ... metric 'k' (value=1.0). Timestamp must be a ..."
1001 metrics, 101 params or tags  the limit messages, but only after every item passed its own checks
900 metrics+100 params+1 tag      "...at most 1000 metrics, params, and tags. Got 1001 ..."
duplicate param keys              "Duplicate parameter keys have been submitted: ['q', 'b', 'b']..." (each
                                  repeat in request order, not sorted); checked after the limits
param / tag value too long        truncated to 6000 / 8000; log-parameter value 5 -> bad_value 'value'
runs/update status                names, 1..5, "3", 3.0 accepted; "BOGUS" ignored; 0, 6, [..] -> bad_value
runs/update end_time              -5 accepted; "abc" or "" -> bad_value 'end_time'
runs/create experiment_id         absent -> 400 BAD_REQUEST (an SQL error); "bad id!" -> "Invalid experiment
                                  ID 'bad id!'. Experiment ID must be a valid integer."; 0 -> bad_value
runs/create run_name != tag       "Both 'run_name' argument and 'mlflow.runName' tag are specified, ..."
runs/create duplicate tag keys    400 BAD_REQUEST (an SQL unique-constraint error)
experiments/create                missing 'name'; 501 chars -> "'name' exceeds the maximum length of 500
                                  characters"; "   " accepted; tag keys checked with <p> = 'key'
body "{bad" / "" / "[1]"          handled as {} (so: missing 'run_id') / {} / 500 HTML page (here: "Malformed
                                  JSON request body: ..." / {} / "Request body must be a JSON object, ...")
================================  ==========================================================================

Quirks copied on purpose: names and run ids are matched with ``re.match`` and ``$``, so one trailing
newline passes; an empty body or ``null`` is an empty object; a double-encoded JSON string is decoded again.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from agent.errors import MlflowApiError, bad_value, invalid, missing, run_not_found

__all__ = [
    "MAX_ENTITIES_PER_BATCH",
    "MAX_KEY_LENGTH",
    "MAX_METRICS_PER_BATCH",
    "MAX_PARAMS_TAGS_PER_BATCH",
    "MAX_PARAM_VAL_LENGTH",
    "MAX_TAG_VAL_LENGTH",
    "RUN_ID_RE",
    "RUN_STATUSES",
    "CreateExperiment",
    "CreateRun",
    "LogBatch",
    "UpdateRun",
    "check_content_type",
    "create_experiment",
    "create_run",
    "delete_tag",
    "experiment_id",
    "experiment_name",
    "get_run",
    "is_valid_run_id",
    "log_batch",
    "log_metric",
    "log_param",
    "parse_json_object",
    "set_tag",
    "update_run",
]

MAX_METRICS_PER_BATCH: Final = 1000
MAX_PARAMS_TAGS_PER_BATCH: Final = 100
MAX_ENTITIES_PER_BATCH: Final = 1000
MAX_KEY_LENGTH: Final = 250
MAX_PARAM_VAL_LENGTH: Final = 6000
MAX_TAG_VAL_LENGTH: Final = 8000
MAX_EXPERIMENT_NAME_LENGTH: Final = 500
MAX_EXPERIMENT_TAG_VAL_LENGTH: Final = 20000

# RunStatus enum of service.proto, in number order (RUNNING = 1).
RUN_STATUSES: Final = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
_STATUS_BY_NUMBER: Final = {i + 1: name for i, name in enumerate(RUN_STATUSES)}
_STATUS_NAMES: Final = frozenset(RUN_STATUSES)

# The server uses re.match with "$", which also matches before one trailing newline: keep that.
RUN_ID_RE: Final = re.compile(r"^[a-zA-Z0-9][\w\-]{0,255}$")
_EXPERIMENT_ID_RE: Final = re.compile(r"^[a-zA-Z0-9][\w\-]{0,63}$")
_NAME_RE: Final = re.compile(r"^[/\w.\- :]*$")

_I64_MIN: Final = -(2**63)
_I64_MAX: Final = 2**63 - 1

_RUN_NAME_TAG: Final = "mlflow.runName"
_METRIC_EXTRAS: Final = ("model_id", "dataset_name", "dataset_digest")
_SPECIAL_FLOATS: Final = frozenset({"NaN", "Infinity", "-Infinity"})
_SPECIAL_SHOWN: Final = {"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}

_BAD_CHARS: Final = (
    "Names may only contain alphanumerics, underscores (_), dashes (-), periods (.), spaces ( ),"
    " colon(:) and slashes (/)."
)
_CT_MISSING: Final = "Bad Request. Content-Type header is missing."
_CT_WRONG: Final = "Bad Request. Content-Type must be one of ['application/json']."

# Keys (metric, param or tag: the rules are the same) already found valid. Bounded: cleared when full.
_KEY_CACHE_MAX = 65536
_valid_keys: set[str] = set()


@dataclass(slots=True)
class LogBatch:
    run_id: str
    metrics: list[list[Any]]
    params: list[list[str]]
    tags: list[list[str]]


@dataclass(slots=True)
class CreateRun:
    experiment_id: str
    user_id: str | None
    run_name: str | None
    start_time: int | None
    tags: list[list[str]]


@dataclass(slots=True)
class UpdateRun:
    run_id: str
    status: str | None
    end_time: int | None
    run_name: str | None


@dataclass(slots=True)
class CreateExperiment:
    name: str
    artifact_location: str | None
    tags: list[list[str]]


# ---------------------------------------------------------------------------------------------------
# Transport


def check_content_type(header: str | None) -> None:
    """Pass the raw ``Content-Type`` header (None when absent), as the server's check sees it."""
    if header is None:
        raise invalid(_CT_MISSING)
    # HTTP parsers strip the value's outer whitespace; the media type itself is compared verbatim.
    if header.strip(" \t").split(";", 1)[0] != "application/json":
        raise invalid(_CT_WRONG)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a request body. An empty body or ``null`` is ``{}``, as the server treats it."""
    if not raw or raw.isspace():
        return {}
    try:
        value: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # The stdlib parser, like Flask's, also takes bare NaN/Infinity tokens and 1e400.
        value = _stdlib_loads(raw)
    if isinstance(value, str):
        # "Older clients may post their JSON double-encoded as strings" (server handlers.py).
        value = _stdlib_loads(value)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"Request body must be a JSON object, got {_json_type(value)}")
    return value


def _stdlib_loads(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise invalid("Malformed JSON request body: not valid UTF-8") from None
    except ValueError as exc:
        raise invalid(f"Malformed JSON request body: {str(exc)[:200]}") from None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------------
# Shared pieces


def is_valid_run_id(s: str) -> bool:
    return RUN_ID_RE.match(s) is not None


def _invalid_value(path: str, value: object, message: str | None = None) -> MlflowApiError:
    """The server's ``invalid_value()`` wording (value rendered by ``json.dumps``)."""
    try:
        shown = json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        shown = repr(value)
    except RecursionError:  # absurdly nested input: name its type, do not recurse into it
        shown = f"<nested {type(value).__name__}>"
    if message:
        return invalid(f"Invalid value {shown} for parameter '{path}' supplied: {message}")
    return invalid(f"Invalid value {shown} for parameter '{path}' supplied.")


def _too_long(label: str, limit: int) -> MlflowApiError:
    return invalid(f"'{label}' exceeds the maximum length of {limit} characters")


def _not_object(container: str, index: int, value: object) -> MlflowApiError:
    return _invalid_value(
        f"{container}[{index}]",
        value,
        f"each element of '{container}' must be a JSON object, got {_json_type(value)}.",
    )


def _check_name(key: str, path: str) -> None:
    """Character and path rules for metric, param and tag keys (not the length)."""
    if _NAME_RE.match(key) is None:
        raise _invalid_value(path, key, _BAD_CHARS)
    norm = posixpath.normpath(key)
    if norm != key or norm == "." or norm.startswith(("..", "/")):
        raise _invalid_value(
            path,
            key,
            "Names may be treated as files in certain cases, and must not resolve to other names"
            f" when treated as such. This name would resolve to {norm!r}",
        )


def _remember_key(key: str) -> None:
    if len(_valid_keys) >= _KEY_CACHE_MAX:
        _valid_keys.clear()
    _valid_keys.add(key)


def _check_key(key: str, path: str, label: str) -> None:
    """Name rules then length, cached for keys that passed."""
    if key in _valid_keys:
        return
    _check_name(key, path)
    if len(key) > MAX_KEY_LENGTH:
        raise _too_long(label, MAX_KEY_LENGTH)
    _remember_key(key)


def _canonical(f: float) -> float | str:
    if f - f == 0.0:
        return f
    if math.isnan(f):
        return "NaN"
    return "Infinity" if f > 0 else "-Infinity"


def _metric_value(value: object, path: str) -> float | str:
    """A metric value as stored in items: a finite float or "NaN" / "Infinity" / "-Infinity"."""
    if isinstance(value, bool):
        raise bad_value(value, path)
    if isinstance(value, float):
        return _canonical(value)
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, str):
        if value in _SPECIAL_FLOATS:
            return value
        try:
            return _canonical(float(value))
        except ValueError:
            raise bad_value(value, path) from None
    raise bad_value(value, path)


def int64_field(value: object, path: str) -> int:
    """An int64 field as protobuf-JSON accepts it: number or string, integral, in range."""
    n: int
    if isinstance(value, bool):
        raise bad_value(value, path)
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise bad_value(value, path)
        n = int(value)
    elif isinstance(value, str):
        try:
            n = int(value)  # strips whitespace, takes "+5" and "1_0" like protobuf does
        except ValueError:
            try:
                f = float(value)  # "1e3", "5.0": integral floats, as protobuf also takes
            except ValueError:
                raise bad_value(value, path) from None
            if not f.is_integer():
                raise bad_value(value, path) from None
            n = int(f)
    else:
        raise bad_value(value, path)
    if not _I64_MIN <= n <= _I64_MAX:
        raise bad_value(value, path)
    return n


def _negative_timestamp(ts: int, path: str, key: str, value: float | str) -> MlflowApiError:
    shown = _SPECIAL_SHOWN[value] if isinstance(value, str) else repr(value)
    return invalid(
        f"Invalid value {ts} for parameter '{path}' supplied: metric '{key}' (value={shown}). "
        "Timestamp must be a nonnegative long (64-bit integer) "
    )


def _metric_extras(m: Mapping[str, Any], prefix: str) -> dict[str, str] | None:
    extras: dict[str, str] | None = None
    for name in _METRIC_EXTRAS:
        v = m.get(name)
        if v is None or v == "":
            continue
        if not isinstance(v, str):
            raise bad_value(v, prefix + name)
        if extras is None:
            extras = {}
        extras[name] = v
    return extras


def _run_id_field(body: Mapping[str, Any], *, uuid_is_field: bool = True) -> str:
    """The server's required-``run_id`` check, with ``run_uuid`` as fallback when run_id is absent.

    ``uuid_is_field`` is False for LogBatch and DeleteTag, whose messages have no ``run_uuid``: there
    it only satisfies the presence check, of any type, and the run id stays "".
    """
    v = body.get("run_id")
    from_uuid = v is None and "run_uuid" in body
    if from_uuid:
        v = body.get("run_uuid")
    if v is None or v == "":
        raise missing("run_id")
    if not isinstance(v, str):
        if from_uuid and not uuid_is_field:
            return ""
        raise bad_value(v, "run_id")
    if uuid_is_field:
        uuid = body.get("run_uuid")
        if uuid is not None and not isinstance(uuid, str):
            raise bad_value(uuid, "run_uuid")
        return v
    return v if not from_uuid else ""


def optional_str(body: Mapping[str, Any], name: str) -> str | None:
    """An optional string field; "" means unset, as for the server's proto2 defaults."""
    v = body.get(name)
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise bad_value(v, name)
    return v


def list_field(body: Mapping[str, Any], name: str) -> list[Any]:
    v = body.get(name)
    if v is None:
        return []
    if not isinstance(v, list):
        raise bad_value(v, name)
    return v


def _value_str(value: object, path: str, limit: int) -> str:
    """Param or tag value: null means "", longer values are truncated like the server does."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise bad_value(value, path)
    return value if len(value) <= limit else value[:limit]


def _required_key(body: Mapping[str, Any]) -> str:
    key = body.get("key")
    if key is None or key == "":
        raise missing("key")
    if not isinstance(key, str):
        raise bad_value(key, "key")
    return key


# ---------------------------------------------------------------------------------------------------
# Run writes


def log_batch(body: Mapping[str, Any]) -> LogBatch:
    """``runs/log-batch``, checked in the server's order.

    1. run_id present and a string;
    2. per container: a list, every element an object with its required fields present;
    3. the run id's syntax;
    4. every metric, then param, then tag on its own (names, values, lengths);
    5. the batch limits; 6. duplicate param keys.
    """
    run_id = _run_id_field(body, uuid_is_field=False)

    deferred: MlflowApiError | None = None
    metrics_in = list_field(body, "metrics")
    metrics, deferred = _batch_metrics(metrics_in, deferred)
    params_in = list_field(body, "params")
    params, deferred = _batch_key_values(params_in, "params", deferred)
    tags_in = list_field(body, "tags")
    tags, deferred = _batch_key_values(tags_in, "tags", deferred)

    if RUN_ID_RE.match(run_id) is None:
        raise _invalid_value("run_id", run_id)
    if deferred is not None:
        raise deferred

    _check_batch_limits(len(metrics), len(params), len(tags))
    if len(params) > 1:
        seen: set[str] = set()
        dupes: list[str] = []
        for p in params:
            if p[0] in seen:
                dupes.append(p[0])
            seen.add(p[0])
        if dupes:
            raise invalid(
                f"Duplicate parameter keys have been submitted: {dupes}. Please ensure the request "
                "contains only one param value per param key."
            )
    return LogBatch(run_id, metrics, params, tags)


def _check_batch_limits(n_metrics: int, n_params: int, n_tags: int) -> None:
    for what, limit, n in (
        ("metrics", MAX_METRICS_PER_BATCH, n_metrics),
        ("params", MAX_PARAMS_TAGS_PER_BATCH, n_params),
        ("tags", MAX_PARAMS_TAGS_PER_BATCH, n_tags),
        ("metrics, params, and tags", MAX_ENTITIES_PER_BATCH, n_metrics + n_params + n_tags),
    ):
        if n > limit:
            raise invalid(
                f"A batch logging request can contain at most {limit} {what}. Got {n} {what}. "
                f"Please split up {what} across multiple requests and try again."
            )


def _batch_metrics(
    metrics: list[Any], deferred: MlflowApiError | None
) -> tuple[list[list[Any]], MlflowApiError | None]:
    """Missing fields are raised at once; the first other problem is returned, to be raised later."""
    items: list[list[Any]] = []
    append = items.append
    for i, m in enumerate(metrics):
        if not isinstance(m, dict):
            raise _not_object("metrics", i, m)
        key = m.get("key")
        value = m.get("value")
        ts = m.get("timestamp")
        if key is None or key == "":
            raise missing(f"metrics[{i}].key")
        if value is None or value == "":
            raise missing(f"metrics[{i}].value")
        if ts is None or ts == "":
            raise missing(f"metrics[{i}].timestamp")
        if deferred is None:
            try:
                append(_batch_metric(m, key, value, ts, i))
            except MlflowApiError as exc:
                deferred = exc
    return items, deferred


def _batch_metric(m: dict[str, Any], key: Any, value: Any, ts: Any, i: int) -> list[Any]:
    """One log-batch metric in the server's order: name, value, timestamp, step, length."""
    known = key.__class__ is str and key in _valid_keys
    if not known:
        # A non-string key fails the server's proto parsing and becomes "".
        _check_name(key if isinstance(key, str) else "", f"metrics[{i}].name")
    v: float | str = value
    if value.__class__ is not float or value - value != 0.0:  # fast path: a finite float
        v = _metric_value(value, f"metrics[{i}].value")
    t: int
    if ts.__class__ is int and 0 <= ts <= _I64_MAX:
        t = ts
    else:
        t = int64_field(ts, f"metrics[{i}].timestamp")
        if t < 0:
            raise _negative_timestamp(t, f"metrics[{i}].timestamp", key, v)
    step = m.get("step")
    s: int
    if step is None:
        s = 0
    elif step.__class__ is int and _I64_MIN <= step <= _I64_MAX:
        s = step
    else:
        s = int64_field(step, f"metrics[{i}].step")
    n = len(m)
    extras = _metric_extras(m, f"metrics[{i}].") if n > 4 or (n == 4 and "step" not in m) else None
    if not known:
        if len(key) > MAX_KEY_LENGTH:
            raise _too_long("Metric name", MAX_KEY_LENGTH)
        _remember_key(key)
    if extras:
        return [key, v, t, s, extras]
    return [key, v, t, s]


def _batch_key_values(
    entries: list[Any], what: str, deferred: MlflowApiError | None
) -> tuple[list[list[str]], MlflowApiError | None]:
    is_param = what == "params"
    limit = MAX_PARAM_VAL_LENGTH if is_param else MAX_TAG_VAL_LENGTH
    items: list[list[str]] = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise _not_object(what, i, e)
        key = e.get("key")
        if key is None or key == "":
            raise missing(f"{what}[{i}].key")
        if deferred is not None:
            continue
        try:
            if not isinstance(key, str):
                key = ""  # the server's proto parsing turns it into "", which fails the path rule
            label = "Param key" if is_param else f"tags[{i}].key"
            _check_key(key, f"{what}[{i}].key", label)
            items.append([key, _value_str(e.get("value"), f"{what}[{i}].value", limit)])
        except MlflowApiError as exc:
            deferred = exc
    return items, deferred


def log_metric(body: Mapping[str, Any]) -> LogBatch:
    """``runs/log-metric``: the handler's field checks, then the store's metric checks, then the run."""
    run_id = _run_id_field(body)
    key = _required_key(body)
    value = body.get("value")
    if value is None or value == "":
        raise missing("value")
    v = _metric_value(value, "value")
    ts = body.get("timestamp")
    if ts is None:
        raise missing("timestamp")
    t = int64_field(ts, "timestamp")
    step = body.get("step")
    s = 0 if step is None else int64_field(step, "step")
    extras = _metric_extras(body, "")
    if extras and "model_id" in extras and not is_valid_run_id(run_id):
        raise run_not_found(run_id)  # with a model_id the store looks the run up first
    known = key in _valid_keys
    if not known:
        _check_name(key, "name")
    if t < 0:
        raise _negative_timestamp(t, "timestamp", key, v)
    if not known:
        if len(key) > MAX_KEY_LENGTH:
            raise _too_long("Metric name", MAX_KEY_LENGTH)
        _remember_key(key)
    if not is_valid_run_id(run_id):
        raise run_not_found(run_id)
    item: list[Any] = [key, v, t, s, extras] if extras else [key, v, t, s]
    return LogBatch(run_id, [item], [], [])


def log_param(body: Mapping[str, Any]) -> LogBatch:
    run_id = _run_id_field(body)
    key = _required_key(body)
    value = _value_str(body.get("value"), "value", MAX_PARAM_VAL_LENGTH)
    _check_key(key, "key", "Param key")
    if not is_valid_run_id(run_id):
        raise run_not_found(run_id)
    return LogBatch(run_id, [], [[key, value]], [])


def set_tag(body: Mapping[str, Any]) -> LogBatch:
    run_id = _run_id_field(body)
    key = _required_key(body)
    value = _value_str(body.get("value"), "value", MAX_TAG_VAL_LENGTH)
    _check_key(key, "key", "key")
    if not is_valid_run_id(run_id):
        raise run_not_found(run_id)
    return LogBatch(run_id, [], [], [[key, value]])


def delete_tag(body: Mapping[str, Any]) -> tuple[str, str]:
    """``runs/delete-tag``. The server checks no key rules here, and ignores ``run_uuid``."""
    run_id = _run_id_field(body, uuid_is_field=False)
    key = _required_key(body)
    if not is_valid_run_id(run_id):
        raise run_not_found(run_id)
    return run_id, key


def update_run(body: Mapping[str, Any]) -> UpdateRun:
    run_id = _run_id_field(body)
    end = body.get("end_time")
    end_time = None if end is None else int64_field(end, "end_time")
    status = _run_status(body.get("status"))
    run_name = optional_str(body, "run_name")
    if not is_valid_run_id(run_id):
        raise run_not_found(run_id)
    return UpdateRun(run_id, status, end_time, run_name)


def _run_status(value: object) -> str | None:
    """A RunStatus as protobuf-JSON parses it; unknown names are silently ignored like the server."""
    if value is None:
        return None
    if isinstance(value, str):
        if value in _STATUS_NAMES:
            return value
        try:
            return _STATUS_BY_NUMBER.get(int(value))
        except ValueError:
            return None
    if isinstance(value, int | float):  # bool too: True is 1, as protobuf sees it
        try:
            number = int(value)
        except ValueError:  # NaN: ignored by the server
            return None
        except OverflowError:
            raise bad_value(value, "status") from None
        name = _STATUS_BY_NUMBER.get(number)
        if name is None:
            raise bad_value(value, "status")
        return name
    raise bad_value(value, "status")


def get_run(query: Mapping[str, str]) -> str:
    run_id = _run_id_field(query)
    if not is_valid_run_id(run_id):
        raise run_not_found(run_id)
    return run_id


def key_values(body: Mapping[str, Any], name: str) -> list[list[str]]:
    """A list of ``{"key", "value"}`` objects (tags of a new run, a logged model's tags or params), each
    key present and a string, a null value read as ""; as the server checks them."""
    out: list[list[str]] = []
    for i, item in enumerate(list_field(body, name)):
        if not isinstance(item, dict):
            raise _not_object(name, i, item)
        key = item.get("key")
        if key is None or key == "":
            raise missing(f"{name}[{i}].key")
        if not isinstance(key, str):
            raise bad_value(key, f"{name}[{i}].key")
        value = item.get("value")
        if value is None:
            value = ""
        elif not isinstance(value, str):
            raise bad_value(value, f"{name}[{i}].value")
        out.append([key, value])
    return out


def create_run(body: Mapping[str, Any]) -> CreateRun:
    exp = body.get("experiment_id")
    if exp is not None and not isinstance(exp, str):
        raise bad_value(exp, "experiment_id")
    start = body.get("start_time")
    start_time = None if start is None else int64_field(start, "start_time")
    run_name = optional_str(body, "run_name")
    user_id = optional_str(body, "user_id")
    tags = key_values(body, "tags")

    if exp:
        check_experiment_id(exp)
    name_tag = next((v for k, v in tags if k == _RUN_NAME_TAG), None)
    if run_name and name_tag and run_name != name_tag:
        raise invalid(
            "Both 'run_name' argument and 'mlflow.runName' tag are specified, but with different "
            f"values (run_name='{run_name}', mlflow.runName='{name_tag}')."
        )
    if not exp:
        raise MlflowApiError("BAD_REQUEST", missing("experiment_id").message)
    keys = [k for k, _ in tags]
    if name_tag == "":
        keys.append(_RUN_NAME_TAG)  # the server adds its own runName tag next to the empty one
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dupes: list[str] = []
        for k in keys:
            if k in seen:
                dupes.append(k)
            seen.add(k)
        raise MlflowApiError(
            "BAD_REQUEST",
            f"UNIQUE constraint failed: tags.key, tags.run_uuid (duplicate tag keys {dupes})",
        )
    return CreateRun(exp, user_id, run_name, start_time, tags)


def check_experiment_id(exp: str) -> None:
    if _EXPERIMENT_ID_RE.match(exp) is None:
        raise invalid(f"Invalid experiment ID '{exp}'. Experiment ID must be a valid integer.")


# ---------------------------------------------------------------------------------------------------
# Experiments


def create_experiment(body: Mapping[str, Any]) -> CreateExperiment:
    name = body.get("name")
    if name is None or name == "":
        raise missing("name")
    if not isinstance(name, str):
        raise bad_value(name, "name")
    artifact_location = optional_str(body, "artifact_location")
    raw_tags = list_field(body, "tags")
    if len(name) > MAX_EXPERIMENT_NAME_LENGTH:
        raise _too_long("name", MAX_EXPERIMENT_NAME_LENGTH)
    tags: list[list[str]] = []
    for t in raw_tags:
        # A non-object element or a missing / non-string key reaches the store as key "".
        key = t.get("key") if isinstance(t, dict) else None
        if not isinstance(key, str):
            key = ""
        _check_name(key, "key")
        if len(key) > MAX_KEY_LENGTH:
            raise _too_long("key", MAX_KEY_LENGTH)
        value = t.get("value") if isinstance(t, dict) else None
        if value is None:
            value = ""
        elif not isinstance(value, str):
            raise bad_value(value, "value")
        if len(value) > MAX_EXPERIMENT_TAG_VAL_LENGTH:
            raise _too_long("value", MAX_EXPERIMENT_TAG_VAL_LENGTH)
        tags.append([key, value])
    return CreateExperiment(name, artifact_location, tags)


def experiment_name(query: Mapping[str, str]) -> str:
    """``experiments/get-by-name?experiment_name=``; whitespace-only names are legal."""
    name = query.get("experiment_name")
    if not name:
        raise missing("experiment_name")
    return name


def experiment_id(query: Mapping[str, str]) -> str:
    """``experiments/get?experiment_id=``."""
    exp = query.get("experiment_id")
    if not exp:
        raise missing("experiment_id")
    check_experiment_id(exp)
    return exp
