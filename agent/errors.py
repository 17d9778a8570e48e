"""MLflow's error vocabulary: the JSON body, ``error_code`` and HTTP status the real server uses.

The mlflow client keys its behaviour on ``error_code`` (``RESOURCE_DOES_NOT_EXIST`` means "absent",
``RESOURCE_ALREADY_EXISTS`` triggers its race handler), so the agent must answer with the same codes.
"""

from __future__ import annotations

import json
from typing import Any

# error_code -> (HTTP status, error_class), as MLflow 3.x maps them.
_CODES: dict[str, tuple[int, str]] = {
    "INVALID_PARAMETER_VALUE": (400, "INVALID_PARAMETER_VALUE"),
    "BAD_REQUEST": (400, "BAD_REQUEST"),
    "RESOURCE_ALREADY_EXISTS": (400, "RESOURCE_ALREADY_EXISTS"),
    "RESOURCE_DOES_NOT_EXIST": (404, "RESOURCE_NOT_FOUND"),
    "ENDPOINT_NOT_FOUND": (404, "ENDPOINT_NOT_FOUND"),
    "PERMISSION_DENIED": (403, "PERMISSION_DENIED"),
    "UNAUTHENTICATED": (401, "UNAUTHENTICATED"),
    "REQUEST_LIMIT_EXCEEDED": (429, "REQUEST_LIMIT_EXCEEDED"),
    "RESOURCE_EXHAUSTED": (429, "RESOURCE_EXHAUSTED"),
    "TEMPORARILY_UNAVAILABLE": (503, "TEMPORARILY_UNAVAILABLE"),
    "INTERNAL_ERROR": (500, "INTERNAL_ERROR"),
    "NOT_IMPLEMENTED": (501, "NOT_IMPLEMENTED"),
}

_HINT = "See the API docs for more information about request parameters."


class MlflowApiError(Exception):
    """An error answered to the client in MLflow's own JSON shape."""

    def __init__(self, error_code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.message = message
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return _CODES.get(self.error_code, (500, self.error_code))[0]

    def body(self) -> dict[str, Any]:
        error_class = _CODES.get(self.error_code, (500, self.error_code))[1]
        return {
            "error_code": self.error_code,
            "message": self.message,
            "sqlstate": "KAM00",
            "error_class": error_class,
        }

    def __repr__(self) -> str:
        return f"MlflowApiError({self.error_code!r}, {self.message!r})"


def invalid(message: str) -> MlflowApiError:
    return MlflowApiError("INVALID_PARAMETER_VALUE", message)


def missing(param: str) -> MlflowApiError:
    """The server's wording for an absent required field."""
    return invalid(f"Missing value for required parameter '{param}'. {_HINT}")


def bad_value(value: object, param: str) -> MlflowApiError:
    """The server's wording when a field has the wrong JSON type or an unparsable value."""
    shown = _compact(value)
    return invalid(
        f"Invalid value {shown} for parameter '{param}' supplied:  Hint: Value was of type "
        f"'{_py_type_name(value)}'. {_HINT}"
    )


def run_not_found(run_id: str) -> MlflowApiError:
    return MlflowApiError("RESOURCE_DOES_NOT_EXIST", f"Run with id={run_id} not found")


def run_not_active(run_id: str) -> MlflowApiError:
    return invalid(f"The run {run_id} must be in the 'active' state. Current state is deleted.")


def unavailable(message: str, retry_after: float = 5.0) -> MlflowApiError:
    return MlflowApiError("TEMPORARILY_UNAVAILABLE", message, retry_after=retry_after)


def _py_type_name(value: object) -> str:
    return type(value).__name__


def _compact(value: object) -> str:
    # The server prints values with json.dumps(sort_keys=True, compact separators).
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return repr(value)
    except RecursionError:  # absurdly nested input: name its type, do not recurse into it
        return f"<nested {type(value).__name__}>"
