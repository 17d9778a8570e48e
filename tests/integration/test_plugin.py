"""The tracking-store plugin: the equivalence script run with ``MLFLOW_TRACKING_URI=mlflow-agent://…``
(metrics as datagrams, the rest over HTTP) leaves the upstream holding exactly what the same script
leaves through the plain HTTP URI, and what it logged."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import AgentFactory, MlflowServerFactory
from tests.integration.helpers import read_json, run_script, snapshot_by_tag
from tests.integration.test_equivalence import AGENT_ARGS, SCRIPT, _expected, _without_generated_names

pytestmark = pytest.mark.integration


def test_plugin_uri_and_http_uri_leave_the_same_upstream(
    mlflow_server_factory: MlflowServerFactory, agent_factory: AgentFactory, experiment_name: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server_http, server_plugin = mlflow_server_factory(), mlflow_server_factory()
    agent_http = agent_factory(server_http, *AGENT_ARGS)
    agent_plugin = agent_factory(server_plugin, *AGENT_ARGS)
    http_out, plugin_out = tmp_path / "http.json", tmp_path / "plugin.json"
    http_wall = run_script(SCRIPT, experiment_name, str(http_out), tracking_uri=agent_http.url,
                           log_path=tmp_path / "http.log", timeout=300)
    plugin_uri = f"mlflow-agent://127.0.0.1:{agent_plugin.port}?udp=127.0.0.1:{agent_plugin.udp_port}"
    plugin_wall = run_script(SCRIPT, experiment_name, str(plugin_out), tracking_uri=plugin_uri,
                             log_path=tmp_path / "plugin.log", timeout=300)
    agent_http.wait_drained(timeout=120)
    status = agent_plugin.wait_drained(timeout=120)
    with capsys.disabled():
        print(f"\n[plugin] script wall time: http {http_wall:.2f}s, mlflow-agent:// {plugin_wall:.2f}s "
              f"(in-script {read_json(http_out)['elapsed']:.2f}s vs {read_json(plugin_out)['elapsed']:.2f}s)")

    cases = read_json(plugin_out)["cases"]
    snap_http = _without_generated_names(snapshot_by_tag(server_http.url, [experiment_name]), cases)
    snap_plugin = _without_generated_names(snapshot_by_tag(server_plugin.url, [experiment_name]), cases)
    assert snap_plugin == snap_http
    assert snap_plugin[experiment_name] == _expected(cases)
    # The metrics really took the datagram path, and none was lost on the way.
    metrics = agent_plugin.metrics()
    assert agent_plugin.metric_sum("mlflow_agent_records_received_total", source="udp") > 1000, metrics
    assert agent_plugin.metric_sum("mlflow_agent_udp_kernel_drops_total") == 0
    assert agent_plugin.metric_sum("mlflow_agent_datagram_errors_total") == 0
    assert status["totals"]["dropped"] == 0 and status["totals"]["dead_lettered"] == 0
