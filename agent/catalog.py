"""What the agent knows about runs and experiments, and how client ids map to upstream ids.

The client only ever sees the ids the agent gave it: the upstream's own id when the upstream
answered in time, else a provisional 32-hex id minted here. The catalog maps each to the upstream id
once known, keeps what ``runs/get`` must answer when the upstream cannot (info, params, tags, latest
metrics), and knows params so a changed value is refused at the door as MLflow would.

It lives on the event loop; every change that must survive a restart is returned as a
``CatalogWrite`` for the spool to commit together with the records it explains.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from agent.records import MetricValue
from agent.spool.store import CatalogWrite, ExperimentUpsert, Loaded, ModelUpsert, RunUpsert

RUN_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
TERMINAL_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})
# In a run's info while the spool keeps its delivered metrics (runs the agent created, until they end):
# everything the upstream holds of its history is then here too.
HISTORY_KEPT = "history_kept"


def new_id() -> str:
    """A provisional id: the same shape as MLflow's own run ids."""
    return uuid.uuid4().hex


def new_model_id() -> str:
    """A provisional logged model id: the same shape as MLflow's own (``m-`` and 32 hex)."""
    return f"m-{uuid.uuid4().hex}"


@dataclass(slots=True)
class RunEntry:
    run_id: str  # the id the client uses
    upstream_id: str | None  # None while provisional and not created upstream
    provisional: bool
    info: dict[str, Any]  # experiment_id (client-facing), run_name, user_id, status, times, artifact_uri, ...
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    # latest value per metric key, ordered as MLflow orders "latest": (step, timestamp, value)
    metrics: dict[str, tuple[int, int, float, MetricValue]] = field(default_factory=dict)
    # Whether the latest values of points still in the spool were read back after a restart.
    metrics_recalled: bool = False
    # True when params and tags are known in full (the agent created the run or read it upstream)
    complete: bool = False

    @property
    def deleted(self) -> bool:
        return self.info.get("lifecycle_stage") == "deleted"

    def upsert(self) -> RunUpsert:
        return RunUpsert(self.run_id, self.upstream_id, self.provisional, dict(self.info, complete=self.complete))

    def lineage(self, name: str) -> list[dict[str, Any]]:
        """What the client logged this lifetime of the run as ``dataset_inputs``, ``model_inputs`` or
        ``model_outputs`` (client ids), kept in ``info`` so it survives restarts with the run."""
        value = self.info.get(name)
        return value if isinstance(value, list) else []


@dataclass(slots=True)
class ModelEntry:
    """An MLflow 3 logged model created through this agent."""

    model_id: str  # the id the client uses
    upstream_id: str | None  # None while provisional and not created upstream
    provisional: bool
    # experiment_id and source_run_id as the client knows them, name, model_type, status,
    # creation_timestamp_ms, last_updated_timestamp_ms, artifact_uri
    info: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    def upsert(self) -> ModelUpsert:
        return ModelUpsert(self.model_id, self.upstream_id, self.provisional,
                           dict(self.info, tags=self.tags, params=self.params))


@dataclass(slots=True)
class ExperimentEntry:
    experiment_id: str  # the id the client uses
    upstream_id: str | None
    provisional: bool
    name: str
    info: dict[str, Any]  # artifact_location, lifecycle_stage, creation_time, last_update_time, tags

    def upsert(self) -> ExperimentUpsert:
        return ExperimentUpsert(self.experiment_id, self.upstream_id, self.provisional, self.name, self.info)


class Catalog:
    def __init__(self) -> None:
        self.runs: dict[str, RunEntry] = {}
        self.experiments: dict[str, ExperimentEntry] = {}
        self.models: dict[str, ModelEntry] = {}
        self._experiment_by_name: dict[str, str] = {}
        self._experiment_by_upstream: dict[str, str] = {}
        # upstream id -> client id, for provisional runs and models once created upstream
        self._run_by_upstream: dict[str, str] = {}
        self._model_by_upstream: dict[str, str] = {}

    def load(self, loaded: Loaded) -> None:
        for r in loaded.runs:
            info = dict(r.info)
            complete = bool(info.pop("complete", False))
            self.runs[r.run] = RunEntry(
                r.run, r.upstream_id, r.provisional, info,
                params=dict(loaded.params.get(r.run, {})), tags=dict(loaded.tags.get(r.run, {})), complete=complete,
            )
        for e in loaded.experiments:
            self._put_experiment(ExperimentEntry(e.id, e.upstream_id, e.provisional, e.name, dict(e.info)))
        for r in loaded.runs:
            if r.provisional and r.upstream_id is not None:
                self._run_by_upstream[r.upstream_id] = r.run
        for m in loaded.models:
            info = dict(m.info)
            tags, params = info.pop("tags", {}), info.pop("params", {})
            self.add_model(ModelEntry(m.id, m.upstream_id, m.provisional, info,
                                      tags=dict(tags) if isinstance(tags, dict) else {},
                                      params=dict(params) if isinstance(params, dict) else {}))

    # runs -------------------------------------------------------------------------------------

    def run(self, run_id: str) -> RunEntry | None:
        return self.runs.get(run_id)

    def upstream_run_id(self, run_id: str) -> str | None:
        """The upstream id for a client run id; ids the agent never minted are upstream ids."""
        entry = self.runs.get(run_id)
        if entry is None or not entry.provisional:
            return run_id
        return entry.upstream_id

    def client_run_id(self, upstream_id: str) -> str:
        """The id the client knows for an upstream run id (its provisional id if it has one)."""
        return self._run_by_upstream.get(upstream_id, upstream_id)

    def add_run(self, entry: RunEntry) -> RunUpsert:
        self.runs[entry.run_id] = entry
        return entry.upsert()

    def map_run(self, run_id: str, upstream_id: str) -> list[CatalogWrite]:
        entry = self.runs[run_id]
        entry.upstream_id = upstream_id
        if entry.provisional:
            self._run_by_upstream[upstream_id] = run_id
        return [entry.upsert()]

    def note_metric(self, entry: RunEntry, key: str, value: MetricValue, timestamp: int, step: int) -> None:
        numeric = _sortable(value)
        current = entry.metrics.get(key)
        if current is None or (step, timestamp, numeric) > current[:3]:
            entry.metrics[key] = (step, timestamp, numeric, value)

    # logged models ----------------------------------------------------------------------------

    def model(self, model_id: str) -> ModelEntry | None:
        return self.models.get(model_id)

    def upstream_model_id(self, model_id: str) -> str | None:
        """The upstream id for a client model id; ids the agent never minted are upstream ids."""
        entry = self.models.get(model_id)
        if entry is None or not entry.provisional:
            return model_id
        return entry.upstream_id

    def client_model_id(self, upstream_id: str) -> str:
        return self._model_by_upstream.get(upstream_id, upstream_id)

    def add_model(self, entry: ModelEntry) -> ModelUpsert:
        self.models[entry.model_id] = entry
        if entry.provisional and entry.upstream_id is not None:
            self._model_by_upstream[entry.upstream_id] = entry.model_id
        return entry.upsert()

    def map_model(self, model_id: str, upstream_id: str) -> ModelUpsert:
        entry = self.models[model_id]
        entry.upstream_id = upstream_id
        if entry.provisional:
            self._model_by_upstream[upstream_id] = model_id
        return entry.upsert()

    # experiments ------------------------------------------------------------------------------

    def experiment(self, experiment_id: str) -> ExperimentEntry | None:
        return self.experiments.get(experiment_id)

    def experiment_by_name(self, name: str) -> ExperimentEntry | None:
        eid = self._experiment_by_name.get(name)
        return self.experiments.get(eid) if eid is not None else None

    def upstream_experiment_id(self, experiment_id: str) -> str | None:
        entry = self.experiments.get(experiment_id)
        if entry is None or not entry.provisional:
            return experiment_id
        return entry.upstream_id

    def client_experiment_id(self, upstream_id: str) -> str:
        """The id the client knows for an upstream experiment id (a provisional one if it has one)."""
        return self._experiment_by_upstream.get(upstream_id, upstream_id)

    def remember_experiment(self, payload: dict[str, Any]) -> ExperimentUpsert | None:
        """Cache an experiment the upstream described, so it can be answered during an outage."""
        eid = payload.get("experiment_id")
        name = payload.get("name")
        if not isinstance(eid, str) or not isinstance(name, str):
            return None
        existing = self.experiments.get(eid)
        info = {k: v for k, v in payload.items() if k not in ("experiment_id", "name")}
        if existing is not None and existing.provisional:
            return None
        entry = ExperimentEntry(eid, eid, False, name, info)
        self._put_experiment(entry)
        return entry.upsert()

    def add_provisional_experiment(self, name: str, artifact_location: str | None,
                                   tags: list[list[str]]) -> ExperimentEntry:
        now = int(time.time() * 1000)
        eid = new_id()
        info: dict[str, Any] = {
            "artifact_location": artifact_location or "",
            "lifecycle_stage": "active",
            "creation_time": now,
            "last_update_time": now,
            "tags": [{"key": k, "value": v} for k, v in tags],
        }
        entry = ExperimentEntry(eid, None, True, name, info)
        self._put_experiment(entry)
        return entry

    def map_experiment(self, experiment_id: str, upstream_id: str) -> ExperimentUpsert:
        entry = self.experiments[experiment_id]
        entry.upstream_id = upstream_id
        self._experiment_by_upstream[upstream_id] = experiment_id
        return entry.upsert()

    def _put_experiment(self, entry: ExperimentEntry) -> None:
        old = self.experiments.get(entry.experiment_id)
        if old is not None and old.name != entry.name and self._experiment_by_name.get(old.name) == old.experiment_id:
            # Renamed upstream: the old name now belongs to whichever other experiment has it, if any.
            del self._experiment_by_name[old.name]
            other = next((e for e in self.experiments.values()
                          if e.name == old.name and e.experiment_id != old.experiment_id), None)
            if other is not None:
                self._experiment_by_name[old.name] = other.experiment_id
        previous = self._experiment_by_name.get(entry.name)
        # A provisional experiment keeps its name: it is what the client was given.
        if previous is None or not self.experiments[previous].provisional or entry.provisional:
            self._experiment_by_name[entry.name] = entry.experiment_id
        self.experiments[entry.experiment_id] = entry
        if entry.provisional and entry.upstream_id is not None:
            self._experiment_by_upstream[entry.upstream_id] = entry.experiment_id

    def pending_experiments(self) -> list[ExperimentEntry]:
        return [e for e in self.experiments.values() if e.provisional and e.upstream_id is None]

    # answers in MLflow's shapes ---------------------------------------------------------------

    def experiment_json(self, entry: ExperimentEntry) -> dict[str, Any]:
        out: dict[str, Any] = {"experiment_id": entry.experiment_id, "name": entry.name}
        for key in ("artifact_location", "lifecycle_stage", "last_update_time", "creation_time", "tags"):
            if key in entry.info and entry.info[key] not in (None, [], ""):
                out[key] = entry.info[key]
        out.setdefault("lifecycle_stage", "active")
        return out

    def run_info_json(self, entry: RunEntry) -> dict[str, Any]:
        info = entry.info
        out: dict[str, Any] = {"run_uuid": entry.run_id, "experiment_id": info.get("experiment_id", "0")}
        for key in ("run_name", "user_id", "status", "start_time", "end_time", "artifact_uri", "lifecycle_stage"):
            value = info.get(key)
            if value is not None:
                out[key] = value
        out.setdefault("status", "RUNNING")
        out.setdefault("lifecycle_stage", "active")
        out.setdefault("artifact_uri", f"mlflow-artifacts:/{out['experiment_id']}/{entry.run_id}/artifacts")
        out["run_id"] = entry.run_id
        return out

    def run_json(self, entry: RunEntry) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if entry.metrics:
            data["metrics"] = [
                {"key": k, "value": v[3], "timestamp": v[1], "step": v[0]} for k, v in entry.metrics.items()
            ]
        if entry.params:
            data["params"] = [{"key": k, "value": v} for k, v in entry.params.items()]
        if entry.tags:
            data["tags"] = [{"key": k, "value": v} for k, v in entry.tags.items()]
        inputs: dict[str, Any] = {}
        for name in ("dataset_inputs", "model_inputs"):
            if entry.lineage(name):
                inputs[name] = entry.lineage(name)
        outputs = {"model_outputs": entry.lineage("model_outputs")} if entry.lineage("model_outputs") else {}
        return {"run": {"info": self.run_info_json(entry), "data": data, "inputs": inputs, "outputs": outputs}}

    def model_json(self, entry: ModelEntry) -> dict[str, Any]:
        """``{"model": {"info", "data"}}`` as MLflow's logged-models endpoints answer it."""
        info: dict[str, Any] = {"model_id": entry.model_id}
        for key in ("experiment_id", "name", "creation_timestamp_ms", "last_updated_timestamp_ms", "artifact_uri",
                    "status", "model_type", "source_run_id"):
            value = entry.info.get(key)
            if value is not None:
                info[key] = value
        info.setdefault("model_type", "")
        info.setdefault("source_run_id", "")
        if entry.tags:
            info["tags"] = [{"key": k, "value": v} for k, v in sorted(entry.tags.items())]
        data: dict[str, Any] = {}
        if entry.params:
            data["params"] = [{"key": k, "value": v} for k, v in entry.params.items()]
        return {"model": {"info": info, "data": data}}


def _sortable(value: MetricValue) -> float:
    if isinstance(value, float):
        return value
    # MLflow stores NaN as 0 (flagged) and compares it as 0 when it picks the latest value.
    return {"Infinity": float("inf"), "-Infinity": float("-inf")}.get(value, 0.0)


# Names for runs the user did not name, in MLflow's "adjective-animal-number" style, so provisional
# runs look like every other run in the UI. Our own short lists.
_ADJECTIVES = (
    "amber", "brisk", "calm", "daring", "eager", "fleet", "gentle", "hardy", "keen", "lively",
    "merry", "nimble", "proud", "quiet", "rapid", "steady", "sunny", "tidy", "vivid", "witty",
)
_ANIMALS = (
    "badger", "crane", "dolphin", "falcon", "gecko", "heron", "ibis", "jackal", "koala", "lynx",
    "marten", "newt", "otter", "panda", "quail", "raven", "seal", "tapir", "vole", "wren",
)


def generate_run_name() -> str:
    return f"{random.choice(_ADJECTIVES)}-{random.choice(_ANIMALS)}-{random.randint(0, 999)}"
