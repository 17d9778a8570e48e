"""Validation of MLflow 3 logged-model writes and of a run's inputs and outputs, as a real MLflow 3.17.2
server answers them (SQL store), for the requests the agent answers itself. Pure; raises ``MlflowApiError``.

Probed against ``mlflow server`` 3.17.2 (sqlite backend):

=====================================  ======================================================================
request                                real server answer (and what this module does, where different)
=====================================  ======================================================================
logged-models: no experiment_id        missing 'experiment_id'; a number -> bad_value; "abc" -> "Invalid
                                       experiment ID 'abc'. Experiment ID must be a valid integer."
logged-models: name "a/b"              "Invalid model name ('a/b') provided. Model name must be a non-empty
                                       string and cannot contain the following characters: (...)"
logged-models: tags / params not list  bad_value 'tags' / 'params'
logged-models: a param key twice       400 BAD_REQUEST (an SQL unique-constraint error): BAD_REQUEST here too
tags / params without key or value     200, a row with key "" stored: refused here (missing '<path>.key')
finalize without status                missing 'status'; "BOGUS" -> 200 and status UNSPECIFIED stored:
                                       refused here (bad_value 'status')
runs/outputs without models            missing 'models'
runs/log-inputs dataset without name,  200 with "" stored: refused here (MLflow's own client-side messages,
digest, source_type or source          "Dataset name cannot be None" and the like); over-long fields ->
                                       "'name' exceeds the maximum length of 500 characters" and the like
=====================================  ======================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from agent.errors import MlflowApiError, bad_value, invalid, missing
from agent.validation import check_experiment_id, int64_field, is_valid_run_id, key_values, list_field, optional_str

# LoggedModelStatus of service.proto, by number.
MODEL_STATUSES: Final = ("LOGGED_MODEL_STATUS_UNSPECIFIED", "LOGGED_MODEL_PENDING", "LOGGED_MODEL_READY",
                         "LOGGED_MODEL_UPLOAD_FAILED")
PENDING: Final = "LOGGED_MODEL_PENDING"
_BAD_NAME_CHARS: Final = ("/", ":", ".", "%", '"', "'")
_MODEL_ID_MAX: Final = 256
# mlflow/utils/validation.py
_DATASET_LIMITS: Final = {"name": 500, "digest": 36, "source": 65535, "schema": 1048575, "profile": 16777215}
_DATASET_REQUIRED: Final = ("name", "digest", "source_type", "source")
MAX_DATASETS_PER_BATCH: Final = 1000


@dataclass(frozen=True, slots=True)
class CreateModel:
    experiment_id: str
    name: str | None
    model_type: str | None
    source_run_id: str | None
    tags: list[list[str]]
    params: list[list[str]]


@dataclass(frozen=True, slots=True)
class LogInputs:
    run_id: str
    datasets: list[dict[str, Any]]  # as MLflow's JSON has them: {"tags": [...], "dataset": {...}}
    models: list[str]  # model ids


@dataclass(frozen=True, slots=True)
class LogOutputs:
    run_id: str
    models: list[tuple[str, int]]  # (model id, step)


def check_model_name(name: str | None) -> None:
    if name is not None and any(c in name for c in _BAD_NAME_CHARS):
        raise invalid(f"Invalid model name ({name!r}) provided. Model name must be a non-empty string and cannot "
                      f"contain the following characters: {_BAD_NAME_CHARS}")


def check_model_id(model_id: str) -> str:
    """A model id from a path or a body: a non-empty string without '/' (ids are ``m-`` + 32 hex)."""
    if not model_id or "/" in model_id or len(model_id) > _MODEL_ID_MAX or any(ord(c) < 32 for c in model_id):
        raise MlflowApiError("RESOURCE_DOES_NOT_EXIST", f"Logged model with ID '{model_id[:300]}' not found.")
    return model_id


def create_model(body: Mapping[str, Any]) -> CreateModel:
    exp = body.get("experiment_id")
    if exp is not None and not isinstance(exp, str):
        raise bad_value(exp, "experiment_id")
    if not exp:
        raise missing("experiment_id")
    name = optional_str(body, "name")
    model_type = optional_str(body, "model_type")
    source_run_id = optional_str(body, "source_run_id")
    tags = key_values(body, "tags")
    params = key_values(body, "params")
    check_experiment_id(exp)
    check_model_name(name)
    seen: set[str] = set()
    for key, _ in params:
        if key in seen:
            raise MlflowApiError("BAD_REQUEST", "UNIQUE constraint failed: logged_model_params.model_id, "
                                 f"logged_model_params.param_key (param {key!r} given twice)")
        seen.add(key)
    return CreateModel(exp, name, model_type, source_run_id, tags, params)


def finalize_model(body: Mapping[str, Any]) -> str:
    """``PATCH logged-models/<id>``: the new status, by name."""
    status = body.get("status")
    if status is None or status == "":
        raise missing("status")
    if isinstance(status, str) and status in MODEL_STATUSES[1:]:
        return status
    if isinstance(status, int | str) and not isinstance(status, bool):
        try:
            number = int(status)
        except ValueError:
            number = -1
        if 1 <= number < len(MODEL_STATUSES):
            return MODEL_STATUSES[number]
    raise bad_value(status, "status")


def model_tags(body: Mapping[str, Any]) -> list[list[str]]:
    return key_values(body, "tags")


def model_params(body: Mapping[str, Any]) -> list[list[str]]:
    params = key_values(body, "params")
    if len({k for k, _ in params}) != len(params):
        raise MlflowApiError("BAD_REQUEST", "UNIQUE constraint failed: logged_model_params.model_id, "
                             "logged_model_params.param_key (a param key given twice)")
    return params


def _run_id(body: Mapping[str, Any]) -> str:
    run_id = body.get("run_id")
    if run_id is None or run_id == "":
        raise missing("run_id")
    if not isinstance(run_id, str):
        raise bad_value(run_id, "run_id")
    if not is_valid_run_id(run_id):
        raise MlflowApiError("RESOURCE_DOES_NOT_EXIST", f"Run with id={run_id} not found")
    return run_id


def _model_refs(items: list[Any], name: str) -> list[tuple[str, int]]:
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise invalid(f"Invalid value {item!r} for parameter '{name}[{i}]': it must be an object")
        model_id = item.get("model_id")
        if model_id is None or model_id == "":
            raise missing(f"{name}[{i}].model_id")
        if not isinstance(model_id, str):
            raise bad_value(model_id, f"{name}[{i}].model_id")
        step = item.get("step")
        out.append((check_model_id(model_id), 0 if step is None else int64_field(step, f"{name}[{i}].step")))
    return out


def log_outputs(body: Mapping[str, Any]) -> LogOutputs:
    run_id = _run_id(body)
    if body.get("models") is None:
        raise missing("models")
    return LogOutputs(run_id, _model_refs(list_field(body, "models"), "models"))


def log_inputs(body: Mapping[str, Any]) -> LogInputs:
    run_id = _run_id(body)
    raw = list_field(body, "datasets")
    if len(raw) > MAX_DATASETS_PER_BATCH:
        raise invalid(f"A batch of dataset inputs can hold at most {MAX_DATASETS_PER_BATCH} datasets; got {len(raw)}")
    datasets = [_dataset_input(item, i) for i, item in enumerate(raw)]
    models = [model_id for model_id, _ in _model_refs(list_field(body, "models"), "models")]
    return LogInputs(run_id, datasets, models)


def _dataset_input(item: object, i: int) -> dict[str, Any]:
    if not isinstance(item, dict) or not isinstance(item.get("dataset"), dict):
        raise invalid("Dataset cannot be None")
    dataset = item["dataset"]
    out: dict[str, Any] = {}
    for field in (*_DATASET_REQUIRED, "schema", "profile"):
        value = dataset.get(field)
        if value is None or value == "":
            if field in _DATASET_REQUIRED:
                raise invalid(f"Dataset {field} cannot be None")
            continue
        if not isinstance(value, str):
            raise bad_value(value, f"datasets[{i}].dataset.{field}")
        limit = _DATASET_LIMITS.get(field)
        if limit is not None and len(value) > limit:
            raise invalid(f"'{field}' exceeds the maximum length of {limit} characters")
        out[field] = value
    tags = key_values(item, "tags")
    result: dict[str, Any] = {"dataset": out}
    if tags:
        result["tags"] = [{"key": k, "value": v} for k, v in tags]
    return result
