"""The agent's own Prometheus metrics.

Loss accounting is one identity, kept by construction and tested::

    received_total = uploaded_total + buffered + dead_lettered_total + dropped_total

summed over every label. ``received`` counts each metric point, param, tag and run operation once
when it becomes durable; records found in the spool at start count as ``source="spool"``, so the
identity holds for one process lifetime.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, disable_created_metrics

from agent import __version__

# The *_created series double the exposition for no use here (the process start time says as much).
disable_created_metrics()  # type: ignore[no-untyped-call]


class AgentMetrics:
    """One registry per agent instance, so several agents can live in one test process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.received = Counter(
            "mlflow_agent_records_received", "Records made durable in the spool (source=spool: found at start).",
            ["kind", "source"], registry=r,
        )
        self.uploaded = Counter(
            "mlflow_agent_records_uploaded", "Records the upstream acknowledged.", ["kind"], registry=r
        )
        self.dropped = Counter(
            "mlflow_agent_records_dropped", "Records the agent discarded, by reason.", ["kind", "reason"], registry=r
        )
        self.dead_lettered = Counter(
            "mlflow_agent_records_dead_lettered",
            "Records the upstream refused permanently; kept in the dead-letter table.", ["kind"], registry=r,
        )
        self.rejected = Counter(
            "mlflow_agent_requests_rejected",
            "Client requests answered with an error (nothing of them was kept).", ["endpoint", "error_code"],
            registry=r,
        )
        self.buffered_records = Gauge(
            "mlflow_agent_buffered_records", "Records in the spool waiting for upload.", ["kind"], registry=r
        )
        self.buffered_bytes = Gauge(
            "mlflow_agent_buffered_bytes", "Bytes charged against the spool limit.", registry=r
        )
        self.spool_limit_bytes = Gauge("mlflow_agent_spool_limit_bytes", "The spool's byte limit.", registry=r)
        self.spool_file_bytes = Gauge(
            "mlflow_agent_spool_file_bytes", "Size of the spool's SQLite files on disk.", registry=r
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
        self.build.info({"version": __version__})
        for kind in ("metric", "param", "tag", "run_op"):
            self.buffered_records.labels(kind=kind).set(0)
            self.uploaded.labels(kind=kind)
            self.dead_lettered.labels(kind=kind)
