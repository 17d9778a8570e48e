"""The records that flow through the pipeline: sources produce them, the spool keeps them, the
uploader turns them into upstream calls.

Items are kept in MLflow's wire form so that a retried upload is byte-identical to the first try:
a metric is ``[key, value, timestamp, step]`` (plus an optional dict of MLflow 3 extras such as
``model_id``), where ``value`` is a float or one of the strings ``"NaN"``, ``"Infinity"``,
``"-Infinity"`` (protobuf-JSON's spelling, which JSON numbers cannot express). Params and tags are
``[key, value]``. Run lifecycle records carry one dict.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson


class Kind(enum.IntEnum):
    """What a spooled row holds. Stored as an integer in the spool: never renumber."""

    CREATE_RUN = 1
    METRICS = 2
    PARAMS = 3
    TAGS = 4
    DELETE_TAG = 5
    UPDATE_RUN = 6
    # MLflow 3 logged models: rows in the model's own queue, in the order the client sent them.
    CREATE_MODEL = 7
    FINALIZE_MODEL = 8
    MODEL_TAGS = 9
    DELETE_MODEL_TAG = 10
    MODEL_PARAMS = 11
    # A run's lineage (datasets and models it read, models it produced): queued under the run.
    LOG_INPUTS = 12
    LOG_OUTPUTS = 13

    @property
    def batchable(self) -> bool:
        """Rows of these kinds are merged into ``log-batch`` calls; the others are barriers."""
        return self in (Kind.METRICS, Kind.PARAMS, Kind.TAGS)

    @property
    def of_model(self) -> bool:
        """Rows of these kinds belong to a logged model's queue (see ``model_queue``), not a run's."""
        return Kind.CREATE_MODEL <= self <= Kind.MODEL_PARAMS

    @property
    def label(self) -> str:
        """The value of the ``kind`` label in the agent's own metrics."""
        return _LABELS[self]


_LABELS = {
    Kind.CREATE_RUN: "run_op",
    Kind.METRICS: "metric",
    Kind.PARAMS: "param",
    Kind.TAGS: "tag",
    Kind.DELETE_TAG: "tag",
    Kind.UPDATE_RUN: "run_op",
    Kind.CREATE_MODEL: "model_op",
    Kind.FINALIZE_MODEL: "model_op",
    Kind.MODEL_TAGS: "model_op",
    Kind.DELETE_MODEL_TAG: "model_op",
    Kind.MODEL_PARAMS: "model_op",
    Kind.LOG_INPUTS: "run_op",
    Kind.LOG_OUTPUTS: "run_op",
}

KIND_LABELS = ("metric", "param", "tag", "run_op", "model_op")

MetricValue = float | str
# [key, value, timestamp_ms, step] or [key, value, timestamp_ms, step, extras]
MetricItem = list[Any]
KeyValue = list[str]


@dataclass(slots=True)
class Record:
    """One spool row: items of one kind for one run, in the order the client sent them."""

    run: str
    kind: Kind
    # Batchable kinds: a list of items. Barrier kinds: a dict (the operation's fields).
    payload: list[Any] | dict[str, Any]

    @property
    def count(self) -> int:
        """How many records (metric points, params, tags or run operations) the row holds."""
        return len(self.payload) if isinstance(self.payload, list) else 1

    def encode(self) -> bytes:
        return orjson.dumps(self.payload)


def decode_payload(body: bytes) -> list[Any] | dict[str, Any]:
    value = orjson.loads(body)
    if not isinstance(value, list | dict):
        raise ValueError("spooled payload is neither a list nor an object")
    return value


# Tags whose value is a run id, so a provisional id there must be translated before upload.
RUN_ID_TAGS = frozenset({"mlflow.parentRunId"})

# Set on every run the agent creates upstream: the idempotency key that lets a lost
# runs/create answer be found again instead of creating a twin run.
PROVISIONAL_TAG = "mlflow_agent.provisional_run_id"
# The same for logged models (MLflow's logged-models create has no idempotency key either).
PROVISIONAL_MODEL_TAG = "mlflow_agent.provisional_model_id"
# A logged model's rows are queued under "model:<model id>": a colon is never part of a run id
# (MLflow's run id syntax), so the two kinds of queue cannot collide in the spool.
_MODEL_QUEUE = "model:"


def model_queue(model_id: str) -> str:
    """The spool queue key (the ``run`` column) of a logged model's rows."""
    return _MODEL_QUEUE + model_id


def queued_model(key: str) -> str | None:
    """The model id if this queue key is a logged model's, else None (a run's)."""
    return key[len(_MODEL_QUEUE):] if key.startswith(_MODEL_QUEUE) else None
