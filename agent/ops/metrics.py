"""The agent's own Prometheus metrics (prefix ``mlflow_agent_``, units in the names).

Loss accounting is one identity, kept by construction and tested::

    received_total = uploaded_total + buffered_records + dead_lettered_total + dropped_total

It holds for every ``kind`` and every ``source`` separately, and so summed over all labels.
``received`` counts each metric point, param, tag, run operation (create, update, tag deletion, inputs,
outputs) and logged-model operation (create, finalize, tags, params) once when it becomes durable;
``source`` says where it came in (http, udp, uds), and records found in the spool when the agent
started count as ``source="spool"`` (for all four counters), so the identity holds for one process
lifetime. ``buffered_records`` is by kind only: add its kinds up to compare with the sums of the
others.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics

from agent import __version__

# The *_created series double the exposition for no use here (the process start time says as much).
disable_created_metrics()  # type: ignore[no-untyped-call]

KINDS = ("metric", "param", "tag", "run_op", "model_op")
INGEST_SOURCES = ("http", "udp", "uds")
# Local work: sub-millisecond for a datagram batch, a few ms for an HTTP write with its fsync.
_INGEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# An upstream round trip, including Azure's slow answers.
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# From durable to acknowledged upstream: seconds when healthy, hours through an outage.
_DELIVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000)


class AgentMetrics:
    """One registry per agent instance, so several agents can live in one test process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.received = Counter(
            "mlflow_agent_records_received",
            "Records made durable in the spool, by kind and source (spool: found at start).",
            ["kind", "source"], registry=r,
        )
        self.uploaded = Counter(
            "mlflow_agent_records_uploaded", "Records the upstream acknowledged.", ["kind", "source"], registry=r
        )
        self.dropped = Counter(
            "mlflow_agent_records_dropped", "Records the agent discarded after accepting them, by reason.",
            ["kind", "source", "reason"], registry=r,
        )
        self.dead_lettered = Counter(
            "mlflow_agent_records_dead_lettered",
            "Records the upstream refused permanently; kept in the dead-letter table.", ["kind", "source"], registry=r,
        )
        self.rejected = Counter(
            "mlflow_agent_requests_rejected",
            "Client requests answered with an error (nothing of them was kept).", ["endpoint", "error_code"],
            registry=r,
        )
        self.ingest_latency = Histogram(
            "mlflow_agent_ingest_latency_seconds",
            "From a write's arrival to its commit in the spool (HTTP: per request; datagrams: per commit).",
            ["source"], buckets=_INGEST_BUCKETS, registry=r,
        )
        self.buffered_records = Gauge(
            "mlflow_agent_buffered_records", "Records in the spool waiting for upload.", ["kind"], registry=r
        )
        self.buffered_bytes = Gauge(
            "mlflow_agent_buffered_bytes", "Bytes charged against the spool limit.", registry=r
        )
        self.spool_limit_bytes = Gauge("mlflow_agent_spool_limit_bytes", "The spool's byte limit.", registry=r)
        self.spool_history_bytes = Gauge(
            "mlflow_agent_spool_history_bytes",
            "Bytes of delivered metrics kept as the local history of runs the agent created (until they end; "
            "let go first when the spool needs room).", registry=r,
        )
        self.spool_file_bytes = Gauge(
            "mlflow_agent_spool_file_bytes", "Size of the spool's SQLite files on disk.", registry=r
        )
        self.spool_disk_free_bytes = Gauge(
            "mlflow_agent_spool_disk_free_bytes", "Free bytes (for the agent's user) on the spool's file system.",
            registry=r,
        )
        self.oldest_buffered_age = Gauge(
            "mlflow_agent_oldest_buffered_record_age_seconds",
            "Age of the oldest record waiting for upload (0 when nothing waits).", registry=r,
        )
        self.spool_quarantined = Counter(
            "mlflow_agent_spool_quarantined", "Unreadable spool files moved aside at start.", registry=r
        )
        self.upstream_up = Gauge(
            "mlflow_agent_upstream_up", "1 if the last upstream request got an answer, else 0.", registry=r
        )
        self.upstream_requests = Counter(
            "mlflow_agent_upstream_requests", "Requests to the upstream by endpoint and result.",
            ["endpoint", "result"], registry=r,
        )
        self.upstream_latency = Histogram(
            "mlflow_agent_upstream_request_duration_seconds", "Duration of upstream requests, by endpoint.",
            ["endpoint"], buckets=_REQUEST_BUCKETS, registry=r,
        )
        self.delivery_latency = Histogram(
            "mlflow_agent_delivery_latency_seconds",
            "From a record's commit in the spool to the upstream's acknowledgement (one sample per spool row).",
            buckets=_DELIVERY_BUCKETS, registry=r,
        )
        self.upload_batch_records = Histogram(
            "mlflow_agent_upload_batch_records", "Records in one upstream log-batch request.",
            buckets=_BATCH_BUCKETS, registry=r,
        )
        self.artifacts = Counter(
            "mlflow_agent_artifacts",
            "Artifact files by outcome: received (durable), uploaded, superseded (a later upload of the same path "
            "came first, so this one was never sent), dead_lettered.",
            ["result"], registry=r,
        )
        self.artifact_bytes = Counter(
            "mlflow_agent_artifact_bytes", "Artifact bytes received and uploaded.", ["result"], registry=r,
        )
        self.artifacts_buffered_bytes = Gauge(
            "mlflow_agent_artifacts_buffered_bytes", "Bytes of artifacts held on disk for upload.", registry=r,
        )
        self.upload_retries = Counter(
            "mlflow_agent_upload_retries", "Upload attempts that will be retried, by reason.", ["reason"], registry=r
        )
        self.datagrams = Counter(
            "mlflow_agent_datagrams_received", "Datagrams read from the UDP or Unix socket.", ["transport"], registry=r
        )
        self.datagram_errors = Counter(
            "mlflow_agent_datagram_errors",
            "Parts of datagrams refused (one per bad JSON object or StatsD line), by reason.",
            ["transport", "reason"], registry=r,
        )
        self.ingest_refused = Counter(
            "mlflow_agent_ingest_refused_records",
            "Valid datagram records that could not be stored (spool full, storage error, backlog).",
            ["source", "reason"], registry=r,
        )
        self.credential_refreshes = Counter(
            "mlflow_agent_credential_refreshes", "Renewals of the upstream credential, by source and result.",
            ["source", "result"], registry=r,
        )
        self.credential_expiry = Gauge(
            "mlflow_agent_credential_expiry_timestamp_seconds",
            "When the current upstream credential expires (unix time; 0 if it does not say).", registry=r,
        )
        self.build = Info("mlflow_agent_build", "Build information.", registry=r)
        self.build.info({"version": __version__, "python": platform.python_version(),
                         "implementation": platform.python_implementation()})
        # Every family present from the first scrape, so dashboards and alerts need no absent() guards.
        for kind in KINDS:
            self.buffered_records.labels(kind=kind).set(0)
            for source in INGEST_SOURCES:
                self.received.labels(kind=kind, source=source)
                self.uploaded.labels(kind=kind, source=source)
                self.dead_lettered.labels(kind=kind, source=source)
        for result in ("received", "uploaded", "superseded", "dead_lettered"):
            self.artifacts.labels(result=result)
        for result in ("received", "uploaded"):
            self.artifact_bytes.labels(result=result)
        for source in INGEST_SOURCES:
            self.ingest_latency.labels(source=source)
            self.dropped.labels(kind="metric", source=source, reason="spool_full")  # only metrics are dropped
