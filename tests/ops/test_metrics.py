"""The agent's own Prometheus exposition (agent/ops/metrics.py), in process: a fresh ``AgentMetrics``
renders text that prometheus-client's own parser reads back line for line; every family the agent
documents is there, typed, with HELP text; names and labels follow Prometheus' naming rules.

``FAMILIES`` is the list of families the agent promises, by their names as exposed; the end-to-end
test (tests/integration/test_accounting.py) checks a live agent's /metrics against the same list.
"""

from __future__ import annotations

import platform
import re

import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.ops.metrics import AgentMetrics

PREFIX = "mlflow_agent_"

# Exposed name -> (TYPE, label names). Counters by their sample name (``..._total``).
FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    "mlflow_agent_records_received_total": ("counter", frozenset({"kind", "source"})),
    "mlflow_agent_records_uploaded_total": ("counter", frozenset({"kind", "source"})),
    "mlflow_agent_records_dead_lettered_total": ("counter", frozenset({"kind", "source"})),
    "mlflow_agent_records_dropped_total": ("counter", frozenset({"kind", "source", "reason"})),
    "mlflow_agent_buffered_records": ("gauge", frozenset({"kind"})),
    "mlflow_agent_buffered_bytes": ("gauge", frozenset()),
    "mlflow_agent_spool_limit_bytes": ("gauge", frozenset()),
    "mlflow_agent_spool_file_bytes": ("gauge", frozenset()),
    "mlflow_agent_spool_history_bytes": ("gauge", frozenset()),
    "mlflow_agent_spool_disk_free_bytes": ("gauge", frozenset()),
    "mlflow_agent_oldest_buffered_record_age_seconds": ("gauge", frozenset()),
    "mlflow_agent_spool_quarantined_total": ("counter", frozenset()),
    "mlflow_agent_ingest_latency_seconds": ("histogram", frozenset({"source"})),
    "mlflow_agent_upstream_request_duration_seconds": ("histogram", frozenset({"endpoint"})),
    "mlflow_agent_delivery_latency_seconds": ("histogram", frozenset()),
    "mlflow_agent_upload_batch_records": ("histogram", frozenset()),
    "mlflow_agent_upstream_up": ("gauge", frozenset()),
    "mlflow_agent_upstream_requests_total": ("counter", frozenset({"endpoint", "result"})),
    "mlflow_agent_upload_retries_total": ("counter", frozenset({"reason"})),
    "mlflow_agent_requests_rejected_total": ("counter", frozenset({"endpoint", "error_code"})),
    "mlflow_agent_datagrams_received_total": ("counter", frozenset({"transport"})),
    "mlflow_agent_datagram_errors_total": ("counter", frozenset({"transport", "reason"})),
    "mlflow_agent_ingest_refused_records_total": ("counter", frozenset({"source", "reason"})),
    "mlflow_agent_credential_refreshes_total": ("counter", frozenset({"source", "result"})),
    "mlflow_agent_credential_expiry_timestamp_seconds": ("gauge", frozenset()),
    "mlflow_agent_build_info": ("gauge", frozenset({"version", "python", "implementation"})),
    "mlflow_agent_artifacts_total": ("counter", frozenset({"result"})),
    "mlflow_agent_artifact_bytes_total": ("counter", frozenset({"result"})),
    "mlflow_agent_artifacts_buffered_bytes": ("gauge", frozenset()),
    # Registered by the datagram source, with a sample only while a UDP socket is open.
    "mlflow_agent_udp_kernel_drops_total": ("counter", frozenset()),
}
NEEDS_UDP_SOCKET = frozenset({"mlflow_agent_udp_kernel_drops_total"})

KINDS = ("metric", "param", "tag", "run_op", "model_op")
INGEST_SOURCES = ("http", "udp", "uds")

_SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
_LABEL = re.compile(r"^[a-z][a-z0-9_]*$")  # no camelCase, no leading "__" (reserved for Prometheus)
# Words that make a family a time or a size: it must then carry the base unit as its suffix.
_TIME_WORDS = ("latency", "duration", "age", "timestamp", "expiry", "time", "seconds")
_SIZE_WORDS = ("bytes", "size", "free")
# Units Prometheus says not to use (base units only: seconds, bytes).
_NON_BASE_UNITS = ("_ms", "_milliseconds", "_microseconds", "_minutes", "_hours", "_kb", "_kib", "_mb", "_mib",
                   "_gb", "_gib", "_bits")
_HISTOGRAM_UNITS = ("_seconds", "_bytes", "_records")


def exposed_name(family: Metric) -> str:
    """The family's name as scraped: the parser strips a counter's ``_total``; put it back."""
    return f"{family.name}_total" if family.type == "counter" else family.name


def scrape(metrics: AgentMetrics) -> tuple[str, dict[str, Metric]]:
    text = generate_latest(metrics.registry).decode()
    families = {exposed_name(f): f for f in text_string_to_metric_families(text)}
    return text, families


@pytest.fixture
def exposition() -> tuple[str, dict[str, Metric]]:
    return scrape(AgentMetrics())


def test_the_exposition_parses_line_for_line(exposition: tuple[str, dict[str, Metric]]) -> None:
    text, families = exposition
    sample_lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    parsed = [s for f in families.values() for s in f.samples]
    # Nothing the parser skipped or merged: one sample per sample line, one family per TYPE line.
    assert len(parsed) == len(sample_lines)
    type_lines = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(type_lines) == len(families)
    assert len({line.split()[2] for line in type_lines}) == len(type_lines), "a family is declared twice"


def test_every_documented_family_is_present_with_its_type(exposition: tuple[str, dict[str, Metric]]) -> None:
    _, families = exposition
    expected = set(FAMILIES) - NEEDS_UDP_SOCKET
    assert expected <= set(families), f"missing: {sorted(expected - set(families))}"
    assert set(families) <= set(FAMILIES), f"undocumented families: {sorted(set(families) - set(FAMILIES))}"
    for name in expected:
        assert families[name].type == FAMILIES[name][0], name


def test_labels_are_the_documented_ones(exposition: tuple[str, dict[str, Metric]]) -> None:
    _, families = exposition
    for name, family in families.items():
        structural = {"le"} if family.type == "histogram" else set()
        for sample in family.samples:
            assert set(sample.labels) - structural == FAMILIES[name][1], (name, sample)


def test_families_are_there_before_anything_happened(exposition: tuple[str, dict[str, Metric]]) -> None:
    """Dashboards and alerts need no absent() guards for the loss accounting and ingest latency."""
    _, families = exposition
    for name in ("mlflow_agent_records_received_total", "mlflow_agent_records_uploaded_total",
                 "mlflow_agent_records_dead_lettered_total"):
        series = {(s.labels["kind"], s.labels["source"]): s.value for s in families[name].samples}
        assert series == {(k, src): 0.0 for k in KINDS for src in INGEST_SOURCES}, name
    buffered = {s.labels["kind"]: s.value for s in families["mlflow_agent_buffered_records"].samples}
    assert buffered == dict.fromkeys(KINDS, 0.0)
    counts = {s.labels["source"]: s.value for s in families["mlflow_agent_ingest_latency_seconds"].samples
              if s.name.endswith("_count")}
    assert counts == dict.fromkeys(INGEST_SOURCES, 0.0)
    assert [s.value for s in families["mlflow_agent_oldest_buffered_record_age_seconds"].samples] == [0.0]


def test_build_info_says_what_runs(exposition: tuple[str, dict[str, Metric]]) -> None:
    _, families = exposition
    (sample,) = families["mlflow_agent_build_info"].samples
    assert sample.value == 1.0
    assert sample.labels == {"version": __version__, "python": platform.python_version(),
                             "implementation": platform.python_implementation()}


def test_names_follow_prometheus_rules(exposition: tuple[str, dict[str, Metric]]) -> None:
    text, families = exposition
    for name, family in families.items():
        assert name.startswith(PREFIX), name
        assert _SNAKE.match(name), f"{name}: not snake_case"
        assert "__" not in name, name
        if family.type == "counter":
            assert name.endswith("_total") and not name.endswith("_total_total"), name
            assert all(s.name == name for s in family.samples), (name, {s.name for s in family.samples})
        else:
            assert not name.endswith("_total"), f"{name}: only counters end in _total"
        assert not name.endswith(("_count", "_sum", "_bucket")), f"{name}: clashes with histogram series"
        stem = name.removesuffix("_total")
        words = stem.removeprefix(PREFIX).split("_")
        if any(w in _TIME_WORDS for w in words):
            assert stem.endswith("_seconds"), f"{name}: a time must be in seconds"
        if any(w in _SIZE_WORDS for w in words):
            assert stem.endswith("_bytes"), f"{name}: a size must be in bytes"
        assert not any(u in stem for u in _NON_BASE_UNITS), f"{name}: use base units (seconds, bytes)"
        if family.type == "histogram":
            assert stem.endswith(_HISTOGRAM_UNITS), f"{name}: a histogram names its unit"
        if family.type == "gauge" and name.endswith("_info"):
            assert all(s.value == 1.0 for s in family.samples), name
        for sample in family.samples:
            for label in sample.labels:
                assert _LABEL.match(label), f"{name}: label {label!r}"
    # The raw TYPE lines, too: a counter is declared by its _total name in the 0.0.4 text format.
    for line in text.splitlines():
        if line.startswith("# TYPE ") and line.endswith(" counter"):
            assert line.split()[2].endswith("_total"), line


def test_every_family_has_help_text(exposition: tuple[str, dict[str, Metric]]) -> None:
    _, families = exposition
    for name, family in families.items():
        doc = family.documentation.strip()
        assert len(doc) >= 10, f"{name}: HELP {doc!r}"
        assert doc not in (name, family.name), f"{name}: HELP only repeats the name"


def test_two_agents_in_one_process_keep_separate_registries() -> None:
    first, second = AgentMetrics(), AgentMetrics()
    first.received.labels(kind="metric", source="http").inc(5)
    received = "mlflow_agent_records_received_total"
    _, a = scrape(first)
    _, b = scrape(second)
    value_a = {(s.labels["kind"], s.labels["source"]): s.value for s in a[received].samples}
    value_b = {(s.labels["kind"], s.labels["source"]): s.value for s in b[received].samples}
    assert value_a[("metric", "http")] == 5.0
    assert value_b[("metric", "http")] == 0.0
