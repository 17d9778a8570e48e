"""Logged-model writes and a run's inputs and outputs, checked at the door (agent/validation_models.py).

The side-by-side comparison with a real server is in tests/integration/test_bad_input.py; here, the
cases the server stores garbage for (refused here) and the shapes the agent keeps."""

from __future__ import annotations

from typing import Any

import pytest

from agent import validation_models as vm
from agent.errors import MlflowApiError

MODEL = "m-" + "a" * 32
RUN = "b" * 32


def refused(fn: Any, body: Any) -> MlflowApiError:
    with pytest.raises(MlflowApiError) as caught:
        fn(body)
    return caught.value


def test_create_keeps_what_mlflow_keeps() -> None:
    cm = vm.create_model({"experiment_id": "3", "name": "model", "source_run_id": RUN, "model_type": "",
                          "tags": [{"key": "t", "value": None}], "params": [{"key": "p", "value": "1"}]})
    assert cm == vm.CreateModel("3", "model", None, RUN, [["t", ""]], [["p", "1"]])
    assert vm.create_model({"experiment_id": "3"}).name is None  # the agent names it, as the server would


@pytest.mark.parametrize(("body", "code", "message"), [
    ({}, "INVALID_PARAMETER_VALUE", "Missing value for required parameter 'experiment_id'"),
    ({"experiment_id": 3}, "INVALID_PARAMETER_VALUE", "Invalid value 3 for parameter 'experiment_id'"),
    ({"experiment_id": "x y"}, "INVALID_PARAMETER_VALUE", "Invalid experiment ID 'x y'"),
    ({"experiment_id": "3", "name": "a.b"}, "INVALID_PARAMETER_VALUE", "Invalid model name ('a.b')"),
    ({"experiment_id": "3", "tags": {"k": "v"}}, "INVALID_PARAMETER_VALUE", "parameter 'tags'"),
    ({"experiment_id": "3", "tags": [{"value": "v"}]}, "INVALID_PARAMETER_VALUE", "'tags[0].key'"),
    ({"experiment_id": "3", "tags": ["k"]}, "INVALID_PARAMETER_VALUE", "'tags[0]'"),
    ({"experiment_id": "3", "params": [{"key": "p", "value": 1}]}, "INVALID_PARAMETER_VALUE", "'params[0].value'"),
    ({"experiment_id": "3", "params": [{"key": "p", "value": "1"}, {"key": "p", "value": "1"}]}, "BAD_REQUEST",
     "UNIQUE constraint failed"),
])
def test_create_refuses(body: dict[str, Any], code: str, message: str) -> None:
    error = refused(vm.create_model, body)
    assert error.error_code == code and message in error.message, error


@pytest.mark.parametrize(("status", "name"), [
    ("LOGGED_MODEL_READY", "LOGGED_MODEL_READY"), (2, "LOGGED_MODEL_READY"), ("3", "LOGGED_MODEL_UPLOAD_FAILED"),
    ("LOGGED_MODEL_PENDING", "LOGGED_MODEL_PENDING"),
])
def test_finalize_statuses(status: object, name: str) -> None:
    assert vm.finalize_model({"status": status}) == name


@pytest.mark.parametrize("status", ["BOGUS", 0, 4, "LOGGED_MODEL_STATUS_UNSPECIFIED", True, 1.5, [2]])
def test_finalize_refuses_what_the_server_would_store_as_unspecified(status: object) -> None:
    assert refused(vm.finalize_model, {"status": status}).error_code == "INVALID_PARAMETER_VALUE"


def test_finalize_needs_a_status() -> None:
    assert "'status'" in refused(vm.finalize_model, {"model_id": MODEL}).message


@pytest.mark.parametrize("model_id", ["", "a/b", "m-x\n", "m-" + "1" * 300])
def test_model_ids_that_cannot_be_are_not_found(model_id: str) -> None:
    with pytest.raises(MlflowApiError) as caught:
        vm.check_model_id(model_id)
    assert caught.value.error_code == "RESOURCE_DOES_NOT_EXIST"


def test_outputs() -> None:
    assert vm.log_outputs({"run_id": RUN, "models": [{"model_id": MODEL, "step": "3"}, {"model_id": MODEL}]}) == \
        vm.LogOutputs(RUN, [(MODEL, 3), (MODEL, 0)])
    assert "'models'" in refused(vm.log_outputs, {"run_id": RUN}).message
    assert "'models[0].model_id'" in refused(vm.log_outputs, {"run_id": RUN, "models": [{"step": 1}]}).message
    assert refused(vm.log_outputs, {"run_id": "bad id!", "models": []}).error_code == "RESOURCE_DOES_NOT_EXIST"


def test_inputs_keep_the_dataset_as_mlflow_has_it() -> None:
    dataset = {"name": "train", "digest": "abc", "source_type": "code", "source": "{}", "schema": "s", "profile": ""}
    li = vm.log_inputs({"run_id": RUN, "datasets": [{"tags": [{"key": "mlflow.data.context", "value": "training"}],
                                                     "dataset": dataset}], "models": [{"model_id": MODEL}]})
    assert li.datasets == [{"dataset": {"name": "train", "digest": "abc", "source_type": "code", "source": "{}",
                                        "schema": "s"},
                            "tags": [{"key": "mlflow.data.context", "value": "training"}]}]
    assert li.models == [MODEL]


@pytest.mark.parametrize(("dataset", "message"), [
    ({"digest": "d", "source_type": "code", "source": "{}"}, "Dataset name cannot be None"),
    ({"name": "n", "source_type": "code", "source": "{}"}, "Dataset digest cannot be None"),
    ({"name": "n", "digest": "d" * 37, "source_type": "code", "source": "{}"}, "'digest' exceeds the maximum length"),
    ({"name": "n", "digest": "d", "source_type": 5, "source": "{}"}, "datasets[0].dataset.source_type"),
])
def test_inputs_refuse_datasets_the_server_would_store_empty(dataset: dict[str, Any], message: str) -> None:
    assert message in refused(vm.log_inputs, {"run_id": RUN, "datasets": [{"dataset": dataset}]}).message
