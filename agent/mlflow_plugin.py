"""An mlflow tracking-store plugin: ``MLFLOW_TRACKING_URI=mlflow-agent://127.0.0.1:5050``.

Unmodified training scripts then pay microseconds per ``mlflow.log_metric``: metric logging goes to
the agent as a datagram (``agent.client``), everything else (runs, params, tags, artifacts, reads)
over HTTP to the agent's MLflow API as usual. Registered through the ``mlflow.tracking_store`` entry
point, so ``pip install mlflow-agent`` next to mlflow is all it takes.

The datagram address: ``?uds=/path/agent.sock`` or ``?udp=HOST:PORT`` on the URI, else the client's
defaults (``$MLFLOW_AGENT_UDS``, ``$MLFLOW_AGENT_UDP``, else UDP on the URI's host, port 5051).

Datagrams are best effort (a full kernel buffer drops them, counted on both sides); an ``end_run``
over HTTP makes the agent commit what the process sent before it, so a run never ends before its
metrics. Metrics tied to an MLflow 3 model or dataset go over HTTP, as do params and tags (their
errors, such as a changed param value, must reach the caller).

This module imports nothing mlflow does not already bring: mlflow itself and the stdlib-only client.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import threading
import urllib.parse
from collections import OrderedDict
from typing import Any

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.store.tracking.rest_store import RestStore
from mlflow.utils.credentials import get_default_host_creds

from agent.client import AgentClient

SCHEME = "mlflow-agent"
DEFAULT_UDP_PORT = 5051
_CLIENTS_KEPT = 64
_ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"


class AgentTrackingStore(RestStore):
    def __init__(self, store_uri: str, artifact_uri: str | None = None) -> None:
        del artifact_uri
        parts = urllib.parse.urlsplit(store_uri)
        if parts.scheme != SCHEME or not parts.netloc:
            raise ValueError(f"expected {SCHEME}://HOST:PORT[/prefix][?uds=PATH|udp=HOST:PORT], got {store_uri!r}")
        self.http_uri = urllib.parse.urlunsplit(("http", parts.netloc, parts.path.rstrip("/"), "", ""))
        super().__init__(functools.partial(get_default_host_creds, self.http_uri))
        query = urllib.parse.parse_qs(parts.query)
        if "uds" in query:
            self._address: str | None = query["uds"][-1]
        elif "udp" in query:
            self._address = query["udp"][-1]
        else:
            self._address = None if _env_address() else f"{parts.hostname}:{DEFAULT_UDP_PORT}"
        self._clients: OrderedDict[str, AgentClient] = OrderedDict()
        self._lock = threading.Lock()
        _fail_fast_absent_spark()

    # metrics go as datagrams ------------------------------------------------------------------

    def log_metric(self, run_id: str, metric: Metric) -> None:
        if metric.model_id or metric.dataset_name or metric.dataset_digest:
            super().log_metric(run_id, metric)
            return
        self._client(run_id).log_metric(metric.key, metric.value, step=metric.step, timestamp=metric.timestamp)

    def log_batch(self, run_id: str, metrics: list[Metric], params: list[Param], tags: list[RunTag]) -> None:
        if params or tags or any(m.model_id or m.dataset_name or m.dataset_digest for m in metrics):
            super().log_batch(run_id, metrics, params, tags)
            return
        client = self._client(run_id)
        # One call per (step, timestamp): the client packs each into as few datagrams as fit.
        groups: dict[tuple[int, int], dict[str, float]] = {}
        for m in metrics:
            group = groups.setdefault((m.step, m.timestamp), {})
            if m.key in group:  # the same key twice at one step and time: keep both points
                client.log_metric(m.key, m.value, step=m.step, timestamp=m.timestamp)
            else:
                group[m.key] = m.value
        for (step, timestamp), values in groups.items():
            client.log_metrics(values, step=step, timestamp=timestamp)

    def _client(self, run_id: str) -> AgentClient:
        with self._lock:
            client = self._clients.get(run_id)
            if client is None:
                client = AgentClient(run_id, address=self._address)
                self._clients[run_id] = client
                if len(self._clients) > _CLIENTS_KEPT:
                    _, oldest = self._clients.popitem(last=False)
                    oldest.close()
            else:
                self._clients.move_to_end(run_id)
            return client

    def datagram_stats(self) -> dict[str, int]:
        """What the datagram clients of this store sent and dropped, summed."""
        total: dict[str, int] = {}
        with self._lock:
            for client in self._clients.values():
                for key, value in client.stats().items():
                    total[key] = total.get(key, 0) + value
        return total

    # artifacts: mlflow-artifacts URIs resolve against an http(s) tracking URI only -----------

    def create_run(self, *args: Any, **kwargs: Any) -> Run:
        return self._artifacts_over_http(super().create_run(*args, **kwargs))

    def get_run(self, run_id: str) -> Run:
        return self._artifacts_over_http(super().get_run(run_id))

    def _artifacts_over_http(self, run: Run) -> Run:
        uri = run.info.artifact_uri
        if isinstance(uri, str) and uri.startswith("mlflow-artifacts:"):
            path = urllib.parse.urlsplit(uri).path
            run.info._artifact_uri = f"{self.http_uri}{_ARTIFACTS}/{path.lstrip('/')}"
        return run


def _fail_fast_absent_spark() -> None:
    """Every fluent ``mlflow.log_metric`` builds two MlflowClients, each of which tries to import
    pyspark to look for a Spark session. Without pyspark installed, each failed import rescans
    sys.path: ~130 us per call, most of the cost of a logged metric. Recording the absence in
    sys.modules (Python's own marker for "known missing") makes that import fail at once, exactly as
    it would anyway. Nothing changes where pyspark is installed."""
    if "pyspark" not in sys.modules and importlib.util.find_spec("pyspark") is None:
        sys.modules["pyspark"] = None  # type: ignore[assignment]


def _env_address() -> bool:
    return bool(os.environ.get("MLFLOW_AGENT_UDS") or os.environ.get("MLFLOW_AGENT_UDP"))
