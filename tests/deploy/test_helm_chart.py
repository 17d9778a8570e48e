"""The Helm chart (helm/mlflow-agent), rendered, validated and linted by Helm's own engine.

helm-python-sdk bundles Helm v4's library (no helm binary, no cluster): ``Chart.render`` is ``helm template``
(values.schema.json checked first, ``fail`` in templates surfaces as HelmRenderError) and ``lint`` is
``helm lint``. Manifests are parsed back with the same library's YAML reader. Each set of values is
rendered once per module.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

try:
    import helm_python as helm
except ImportError as exc:  # a missing test dependency is an error, never a skip
    raise ImportError("tests/deploy needs helm-python-sdk (in the project's test extra)") from exc

from agent.config import SETTINGS, Settings, load_settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "mlflow-agent"
RELEASE, NAMESPACE = "ml", "training"

Obj = dict[str, Any]

UPSTREAM: Obj = {"upstream": {"uri": "https://mlflow.example.com"}}
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
# Sidecar mode with the example Job and Azure workload identity.
SIDECAR: Obj = {
    **UPSTREAM,
    "exampleJob": {"enabled": True},
    "azure": {"workloadIdentity": {"enabled": True, "clientId": CLIENT_ID}},
}
# Daemonset mode with everything on: token, UDP (so allowUnauthenticatedBind), ServiceMonitor, annotations.
DAEMONSET: Obj = {
    **UPSTREAM,
    "mode": "daemonset",
    "ingestToken": {"existingSecret": "mlflow-agent-ingest"},
    "allowUnauthenticatedBind": True,
    "serviceMonitor": {"enabled": True},
    "metrics": {"podAnnotations": True},
    "exampleJob": {"enabled": True},
}
# The locked-down daemonset: an ingest token, no UDP, no unauthenticated bind.
DAEMONSET_TCP: Obj = {
    **UPSTREAM,
    "mode": "daemonset",
    "ingestToken": {"existingSecret": "mlflow-agent-ingest", "key": "tok"},
    "udp": {"enabled": False},
}


def merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> Obj:
    out: Obj = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def render(chart: helm.Chart, values: Obj, release: str = RELEASE) -> list[Obj]:
    """Every Kubernetes object the chart renders with ``values`` (NOTES.txt left out)."""
    manifests = chart.render(values, name=release, namespace=NAMESPACE)
    docs: list[Obj] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for part in re.split(r"(?m)^---\s*$", text):
            doc = helm.values_from_yaml(part)
            if doc:
                docs.append(doc)
    return docs


def of_kind(docs: list[Obj], kind: str) -> list[Obj]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Obj], kind: str) -> Obj:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['kind'] for d in docs]}"
    return found[0]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def container(spec: Obj, name: str, *, init: bool = False) -> Obj:
    found: list[Obj] = [c for c in spec.get("initContainers" if init else "containers", []) if c["name"] == name]
    assert len(found) == 1, f"no single container {name!r}"
    return found[0]


def env_of(c: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in c.get("env", [])}


def volumes_of(spec: Obj) -> dict[str, Obj]:
    return {v["name"]: v for v in spec.get("volumes", [])}


def agent_settings(c: Obj) -> Settings:
    """What the agent itself makes of the container's environment and arguments (secrets as stand-ins)."""
    env: dict[str, str] = {}
    for name, e in env_of(c).items():
        if "value" in e:
            env[name] = str(e["value"])
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[name] = "stand-in-" + e["valueFrom"]["secretKeyRef"]["key"]
    args = c.get("args", [])
    assert args[0] == "--log-format"
    return load_settings({"log_format": args[1]}, env=env)


def render_error(chart: helm.Chart, values: Obj) -> str:
    with pytest.raises(helm.HelmError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return str(caught.value)


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def defaults(chart: helm.Chart) -> list[Obj]:
    return render(chart, {})


@pytest.fixture(scope="module")
def sidecar(chart: helm.Chart) -> list[Obj]:
    return render(chart, SIDECAR)


@pytest.fixture(scope="module")
def daemonset(chart: helm.Chart) -> list[Obj]:
    return render(chart, DAEMONSET)


@pytest.fixture(scope="module")
def daemonset_tcp(chart: helm.Chart) -> list[Obj]:
    return render(chart, DAEMONSET_TCP)


def ds_agent(docs: list[Obj]) -> Obj:
    return container(pod_spec(one(docs, "DaemonSet")), "mlflow-agent")


def job_sidecar(docs: list[Obj]) -> Obj:
    return container(pod_spec(one(docs, "Job")), "mlflow-agent", init=True)


# ---- lint and metadata ----


@pytest.mark.parametrize(
    "values",
    [None, SIDECAR, DAEMONSET, DAEMONSET_TCP],
    ids=["defaults", "sidecar", "daemonset", "daemonset-tcp"],
)
def test_lint_reports_no_errors_or_warnings(values: Obj | None) -> None:
    report = helm.lint(CHART, values, strict=True, kube_version="v1.29.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    assert report["total_charts_linted"] == 1


def test_lint_reports_a_schema_violation() -> None:
    report = helm.lint(CHART, {"mode": "both"})
    assert any("/mode" in e for e in report["errors"])


def test_chart_metadata(chart: helm.Chart) -> None:
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["kubeVersion"] == ">=1.29.0-0"  # native sidecars
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["appVersion"] == pyproject["project"]["version"]  # the default image tag
    assert chart.schema is not None and chart.schema["additionalProperties"] is False


# ---- what each mode renders ----


def test_defaults_are_sidecar_mode_and_render_only_the_service_account(defaults: list[Obj]) -> None:
    assert [d["kind"] for d in defaults] == ["ServiceAccount"]
    sa = defaults[0]
    assert sa["metadata"]["name"] == f"{RELEASE}-mlflow-agent"
    assert sa["automountServiceAccountToken"] is False
    assert "annotations" not in sa["metadata"]


def test_daemonset_mode_renders_daemonset_service_servicemonitor_job(daemonset: list[Obj]) -> None:
    assert sorted(d["kind"] for d in daemonset) == ["DaemonSet", "Job", "Service", "ServiceAccount",
                                                    "ServiceMonitor"]
    ds = one(daemonset, "DaemonSet")
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def test_service_monitor_only_when_enabled(daemonset: list[Obj], daemonset_tcp: list[Obj],
                                           chart: helm.Chart) -> None:
    assert of_kind(daemonset_tcp, "ServiceMonitor") == [] and of_kind(daemonset_tcp, "Service") == []
    sm = one(daemonset, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["endpoints"] == [{"port": "ops", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}]
    svc = one(daemonset, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["spec"]["ports"] == [{"name": "ops", "port": 9090, "targetPort": "ops", "protocol": "TCP"}]
    # The Service selects the agent pods, not the example Job's.
    job_labels = one(daemonset, "Job")["spec"]["template"]["metadata"]["labels"]
    assert not svc["spec"]["selector"].items() <= job_labels.items()
    # Sidecar agents live in other charts' pods: a ServiceMonitor there is refused.
    assert "serviceMonitor.enabled needs mode=daemonset" in render_error(
        chart, merged(SIDECAR, {"serviceMonitor": {"enabled": True}}))


def test_prometheus_pod_annotations_only_when_enabled(daemonset: list[Obj], daemonset_tcp: list[Obj]) -> None:
    annotations = one(daemonset, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "9090",
                           "prometheus.io/path": "/metrics"}
    assert "annotations" not in one(daemonset_tcp, "DaemonSet")["spec"]["template"]["metadata"]


# ---- ports and addresses ----


def test_daemonset_ports_use_host_ports(daemonset: list[Obj]) -> None:
    ports = {p["name"]: p for p in ds_agent(daemonset)["ports"]}
    assert ports["http"] == {"name": "http", "containerPort": 5050, "hostPort": 5050, "protocol": "TCP"}
    assert ports["udp"] == {"name": "udp", "containerPort": 5051, "hostPort": 5051, "protocol": "UDP"}
    assert ports["ops"] == {"name": "ops", "containerPort": 9090, "protocol": "TCP"}  # no hostPort
    assert "hostNetwork" not in pod_spec(one(daemonset, "DaemonSet"))


def test_daemonset_binds_all_interfaces_and_the_agent_accepts_it(daemonset: list[Obj]) -> None:
    c = ds_agent(daemonset)
    env = env_of(c)
    assert env["MLFLOW_AGENT_INGEST_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-agent-ingest",
                                                                            "key": "token"}
    settings = agent_settings(c)
    assert (str(settings.http), str(settings.udp), str(settings.ops_http)) == (
        "0.0.0.0:5050", "0.0.0.0:5051", "0.0.0.0:9090")
    assert settings.allow_unauthenticated_bind is True
    assert settings.upstream == "https://mlflow.example.com"
    assert settings.log_format == "json"


def test_daemonset_with_token_and_no_udp(daemonset_tcp: list[Obj]) -> None:
    c = ds_agent(daemonset_tcp)
    assert [p["name"] for p in c["ports"]] == ["http", "ops"]
    env = env_of(c)
    assert "MLFLOW_AGENT_ALLOW_UNAUTHENTICATED_BIND" not in env
    assert env["MLFLOW_AGENT_INGEST_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "tok"
    settings = agent_settings(c)
    assert settings.udp is None and settings.allow_unauthenticated_bind is False
    assert settings.ingest_token == "stand-in-tok"


def test_daemonset_host_network_option(chart: helm.Chart) -> None:
    spec = pod_spec(one(render(chart, merged(DAEMONSET_TCP, {"daemonset": {"hostNetwork": True}})), "DaemonSet"))
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"


def test_sidecar_binds_loopback_and_ops_for_probes(sidecar: list[Obj]) -> None:
    c = job_sidecar(sidecar)
    ports = {p["name"]: p for p in c["ports"]}
    assert {p["protocol"] for p in ports.values()} == {"TCP", "UDP"}
    assert all("hostPort" not in p for p in ports.values())
    settings = agent_settings(c)
    assert settings.http.is_loopback and settings.udp is not None and settings.udp.is_loopback
    assert str(settings.ops_http) == "0.0.0.0:9090"
    assert settings.ingest_token is None and settings.allow_unauthenticated_bind is False
    assert settings.drain_timeout == 20.0 and settings.spool_max_bytes == 1 << 30


# ---- probes, shutdown ----


@pytest.mark.parametrize("mode", ["daemonset", "sidecar"])
def test_probes_on_the_ops_port(mode: str, daemonset: list[Obj], sidecar: list[Obj]) -> None:
    c = ds_agent(daemonset) if mode == "daemonset" else job_sidecar(sidecar)
    ops = [p for p in c["ports"] if p["name"] == "ops"]
    assert ops == [{"name": "ops", "containerPort": 9090, "protocol": "TCP"}]
    assert env_of(c)["MLFLOW_AGENT_OPS_HTTP"]["value"] == "0.0.0.0:9090"
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 30


@pytest.mark.parametrize("drain", [0, 20, 300])
def test_grace_period_outlasts_prestop_and_drain(chart: helm.Chart, drain: int) -> None:
    docs = render(chart, merged(DAEMONSET, {"agent": {"drainTimeoutSeconds": drain}}))
    ds_spec = pod_spec(one(docs, "DaemonSet"))
    c = container(ds_spec, "mlflow-agent")
    assert env_of(c)["MLFLOW_AGENT_DRAIN_TIMEOUT"]["value"] == f"{drain}s"
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert ds_spec["terminationGracePeriodSeconds"] >= 5 + drain + 10
    job_spec = pod_spec(one(render(chart, merged(SIDECAR, {"agent": {"drainTimeoutSeconds": drain}})), "Job"))
    assert job_spec["terminationGracePeriodSeconds"] >= drain + 10
    # Kubernetes stops a native sidecar after the main containers: no preStop sleep by default.
    assert "lifecycle" not in container(job_spec, "mlflow-agent", init=True)


def test_grace_period_set_by_hand(chart: helm.Chart) -> None:
    spec = pod_spec(one(render(chart, merged(DAEMONSET, {"terminationGracePeriodSeconds": 90})), "DaemonSet"))
    assert spec["terminationGracePeriodSeconds"] == 90
    error = render_error(chart, merged(DAEMONSET, {"terminationGracePeriodSeconds": 25}))
    assert "terminationGracePeriodSeconds (25) must be larger" in error


# ---- security ----


@pytest.mark.parametrize("mode", ["daemonset", "sidecar"])
def test_security_context(mode: str, daemonset: list[Obj], sidecar: list[Obj]) -> None:
    workload = one(daemonset, "DaemonSet") if mode == "daemonset" else one(sidecar, "Job")
    spec = pod_spec(workload)
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert (pod_sc["runAsUser"], pod_sc["runAsGroup"], pod_sc["fsGroup"]) == (10001, 10001, 10001)
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(spec, "mlflow-agent", init=mode == "sidecar")
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    # The read-only root filesystem's /tmp: small and memory-backed.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes_of(spec)[mounts["/tmp"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Mi"}
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}


def test_only_the_permissions_init_container_runs_as_root_with_chown_only(daemonset: list[Obj],
                                                                          chart: helm.Chart) -> None:
    spec = pod_spec(one(daemonset, "DaemonSet"))
    init = container(spec, "spool-permissions", init=True)
    sc = init["securityContext"]
    assert sc["runAsUser"] == 0 and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER", "DAC_READ_SEARCH"]}
    assert "chown -R 10001:10001 /var/lib/mlflow-agent" in init["command"][-1]
    off = render(chart, merged(DAEMONSET, {"daemonset": {"spool": {"fixPermissions": False}}}))
    assert "initContainers" not in pod_spec(one(off, "DaemonSet"))


def test_credentials_only_by_reference(chart: helm.Chart) -> None:
    values = merged(DAEMONSET_TCP, {"upstream": {
        "uri": "", "existingSecret": "mlflow-upstream", "uriKey": "uri", "usernameKey": "user", "passwordKey": "pass",
    }})
    docs = render(chart, values)
    assert of_kind(docs, "Secret") == []
    env = env_of(ds_agent(docs))
    secret_env = [n for n in env if re.search("TOKEN|PASSWORD|USERNAME|UPSTREAM", n)]
    assert sorted(secret_env) == ["MLFLOW_AGENT_INGEST_TOKEN", "MLFLOW_AGENT_UPSTREAM", "MLFLOW_TRACKING_PASSWORD",
                                  "MLFLOW_TRACKING_USERNAME"]
    for name in secret_env:
        assert "value" not in env[name], name
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] in ("mlflow-upstream", "mlflow-agent-ingest")
    token = render(chart, merged(SIDECAR, {"upstream": {"existingSecret": "up", "tokenKey": "t"}}))
    assert env_of(job_sidecar(token))["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "up",
                                                                                               "key": "t"}


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"upstream": {"token": "s3cret"}}, "'token' not allowed"),
        ({"upstream": {"password": "s3cret"}}, "'password' not allowed"),
        ({"ingestToken": {"value": "s3cret"}}, "'value' not allowed"),
        ({"agent": {"extraSettings": {"ingest_token": "s3cret"}}}, "/agent/extraSettings/ingest_token"),
        ({"upstream": {"uri": "https://user:s3cret@mlflow.example.com"}}, "/upstream/uri"),
    ],
)
def test_schema_has_no_place_for_a_literal_secret(chart: helm.Chart, values: Obj, where: str) -> None:
    assert where in render_error(chart, merged(UPSTREAM, values))


# ---- volumes ----


def test_daemonset_spool_on_host_path(daemonset: list[Obj], chart: helm.Chart) -> None:
    spec = pod_spec(one(daemonset, "DaemonSet"))
    c = container(spec, "mlflow-agent")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    spool = volumes_of(spec)[mounts["/var/lib/mlflow-agent"]]
    assert spool["hostPath"] == {"path": f"/var/lib/mlflow-agent/{RELEASE}", "type": "DirectoryOrCreate"}
    assert agent_settings(c).spool_dir == Path("/var/lib/mlflow-agent/spool")
    custom = render(chart, merged(DAEMONSET, {"daemonset": {"spool": {"hostPath": "/data/agent"}}}))
    assert volumes_of(pod_spec(one(custom, "DaemonSet")))[spool["name"]]["hostPath"]["path"] == "/data/agent"


def test_sidecar_spool_is_an_empty_dir_with_a_size_limit_or_a_claim(sidecar: list[Obj], chart: helm.Chart) -> None:
    spec = pod_spec(one(sidecar, "Job"))
    mounts = {m["mountPath"]: m["name"] for m in container(spec, "mlflow-agent", init=True)["volumeMounts"]}
    name = mounts["/var/lib/mlflow-agent"]
    assert volumes_of(spec)[name] == {"name": name, "emptyDir": {"sizeLimit": "2Gi"}}
    pvc = render(chart, merged(SIDECAR, {"sidecar": {"spool": {"existingClaim": "agent-spool"}}}))
    assert volumes_of(pod_spec(one(pvc, "Job")))[name] == {"name": name,
                                                           "persistentVolumeClaim": {"claimName": "agent-spool"}}


def test_extra_volumes_env_and_settings(chart: helm.Chart) -> None:
    values = merged(SIDECAR, {
        "extraVolumes": [{"name": "certs", "secret": {"secretName": "client-cert"}}],
        "extraVolumeMounts": [{"name": "certs", "mountPath": "/certs", "readOnly": True}],
        "extraEnv": [{"name": "MLFLOW_TRACKING_CLIENT_CERT_PATH", "value": "/certs/tls.pem"}],
        "agent": {"spoolMaxBytes": 1073741824,
                  "extraSettings": {"overflow_policy": "reject", "upload_max_in_flight": 16, "upload_linger": 0.5}},
    })
    spec = pod_spec(one(render(chart, values), "Job"))
    c = container(spec, "mlflow-agent", init=True)
    assert volumes_of(spec)["certs"]["secret"] == {"secretName": "client-cert"}
    assert {"name": "certs", "mountPath": "/certs", "readOnly": True} in c["volumeMounts"]
    assert env_of(c)["MLFLOW_TRACKING_CLIENT_CERT_PATH"]["value"] == "/certs/tls.pem"
    # Numbers reach the agent as it parses them (not as 1.073741824e+09).
    assert env_of(c)["MLFLOW_AGENT_SPOOL_MAX_BYTES"]["value"] == "1073741824"
    assert env_of(c)["MLFLOW_AGENT_ARTIFACT_MAX_BYTES"]["value"] == "512MiB"  # the chart's default
    settings = agent_settings(c)
    assert (settings.overflow_policy, settings.upload_max_in_flight, settings.upload_linger) == ("reject", 16, 0.5)


def test_upstream_service_account_token_and_ca_bundle(chart: helm.Chart) -> None:
    values = merged(SIDECAR, {"upstream": {
        "serviceAccountToken": {"enabled": True, "audience": "mlflow"},
        "tls": {"caBundle": {"secretName": "mlflow-ca"}},
    }})
    spec = pod_spec(one(render(chart, values), "Job"))
    c = container(spec, "mlflow-agent", init=True)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = volumes_of(spec)
    projected = volumes["mlflow-agent-upstream-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert projected == {"path": "token", "audience": "mlflow", "expirationSeconds": 3600}
    settings = agent_settings(c)
    assert settings.token_file == Path(mounts["mlflow-agent-upstream-token"]) / "token"
    assert volumes["mlflow-agent-upstream-ca"]["secret"]["secretName"] == "mlflow-ca"
    assert env_of(c)["MLFLOW_TRACKING_SERVER_CERT_PATH"]["value"] == mounts["mlflow-agent-upstream-ca"] + "/ca.crt"


# ---- the sidecar and the example Job ----


def test_sidecar_is_a_native_sidecar_in_the_example_job(sidecar: list[Obj]) -> None:
    job = one(sidecar, "Job")
    spec = pod_spec(job)
    assert [c["name"] for c in spec["initContainers"]] == ["mlflow-agent"]
    assert spec["initContainers"][0]["restartPolicy"] == "Always"
    assert spec["restartPolicy"] == "Never"
    train = container(spec, "train")
    assert "restartPolicy" not in train
    assert env_of(train)["MLFLOW_TRACKING_URI"] == {"name": "MLFLOW_TRACKING_URI", "value": "http://127.0.0.1:5050"}
    assert "MLFLOW_TRACKING_TOKEN" not in env_of(train)
    assert spec["initContainers"][0]["image"] == train["image"] == "mlflow-agent:0.1.0"
    assert of_kind(sidecar, "DaemonSet") == []


def test_daemonset_example_job_reaches_the_node_agent(daemonset: list[Obj]) -> None:
    spec = pod_spec(one(daemonset, "Job"))
    assert "initContainers" not in spec
    env = env_of(container(spec, "train"))
    assert env["HOST_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://$(HOST_IP):5050"
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-agent-ingest"


def test_example_job_only_when_enabled(chart: helm.Chart, daemonset_tcp: list[Obj]) -> None:
    assert of_kind(daemonset_tcp, "Job") == []
    assert of_kind(render(chart, UPSTREAM), "Job") == []


def test_workload_identity(sidecar: list[Obj], daemonset: list[Obj], chart: helm.Chart) -> None:
    sa = one(sidecar, "ServiceAccount")
    assert sa["metadata"]["annotations"] == {"azure.workload.identity/client-id": CLIENT_ID}
    job = one(sidecar, "Job")
    assert job["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert pod_spec(job)["serviceAccountName"] == sa["metadata"]["name"]
    # Off: neither the annotation nor the label.
    assert "annotations" not in one(daemonset, "ServiceAccount")["metadata"]
    assert "azure.workload.identity/use" not in one(daemonset, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    on = render(chart, merged(DAEMONSET_TCP, {"azure": {"workloadIdentity": {
        "enabled": True, "clientId": CLIENT_ID, "tenantId": "99999999-8888-7777-6666-555555555555"}}}))
    assert one(on, "DaemonSet")["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert one(on, "ServiceAccount")["metadata"]["annotations"]["azure.workload.identity/tenant-id"].startswith("9999")


def test_existing_service_account(chart: helm.Chart) -> None:
    docs = render(chart, merged(DAEMONSET_TCP, {"serviceAccount": {"create": False, "name": "trainer"}}))
    assert of_kind(docs, "ServiceAccount") == []
    assert pod_spec(one(docs, "DaemonSet"))["serviceAccountName"] == "trainer"


def test_image_digest_pull_secrets_and_scheduling(chart: helm.Chart) -> None:
    digest = "sha256:" + "ab" * 32
    values = merged(DAEMONSET_TCP, {
        "image": {"repository": "registry.example.com/mlflow-agent", "digest": digest, "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "system-node-critical",
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "nodeSelector": {"accelerator": "gpu"},
        "podLabels": {"team": "ml"},
    })
    ds = one(render(chart, values), "DaemonSet")
    spec = pod_spec(ds)
    c = container(spec, "mlflow-agent")
    assert c["image"] == f"registry.example.com/mlflow-agent@{digest}" and c["imagePullPolicy"] == "Always"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert spec["nodeSelector"] == {"accelerator": "gpu"}
    assert ds["spec"]["template"]["metadata"]["labels"]["team"] == "ml"


def make_parent(root: Path, dependency: str, alias: str | None, template: str) -> Path:
    """A chart that depends on this one (copied into its charts/) with ``template`` as its only template."""
    parent = root / "trainer"
    shutil.copytree(CHART, parent / "charts" / "mlflow-agent")
    (parent / "templates").mkdir()
    with helm.Chart.load(CHART) as sub:
        version = sub.version
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: trainer\nversion: 3.0.0\nappVersion: '7.7.7'\n"
        f"dependencies:\n  - name: {dependency}\n    version: {version}\n"
        + (f"    alias: {alias}\n" if alias else "")
    )
    (parent / "values.yaml").write_text(json.dumps({alias or dependency: UPSTREAM}))
    (parent / "templates" / "workload.yaml").write_text(template)
    return parent


def test_notes_snippet_works_in_a_parent_chart(chart: helm.Chart, tmp_path: Path) -> None:
    """The include lines NOTES.txt prints in sidecar mode, pasted into a parent chart's Pod, render the sidecar."""
    notes = chart.render(UPSTREAM, name=RELEASE, namespace=NAMESPACE)["mlflow-agent/templates/NOTES.txt"]
    lines = notes.splitlines()
    first = next(i for i, line in enumerate(lines) if "index .Subcharts" in line)
    snippet = []
    for line in lines[first:]:
        if not line.strip():
            break
        snippet.append(line.removeprefix("  "))
    assert snippet[0] == '{{- $agent := index .Subcharts "mlflow-agent" }}'
    pod = "\n".join([snippet[0], "apiVersion: v1", "kind: Pod", "metadata:", "  name: train", *snippet[1:]]) + "\n"
    with helm.Chart.load(make_parent(tmp_path, "mlflow-agent", None, pod)) as parent:
        docs = render(parent, {})
    spec = one(docs, "Pod")["spec"]
    assert container(spec, "mlflow-agent", init=True)["restartPolicy"] == "Always"
    assert env_of(container(spec, "train"))["MLFLOW_TRACKING_URI"]["value"] == "http://127.0.0.1:5050"
    assert spec["terminationGracePeriodSeconds"] == 35 and spec["securityContext"]["runAsNonRoot"] is True
    assert {"mlflow-agent-spool", "mlflow-agent-tmp"} <= volumes_of(spec).keys()


def test_parent_chart_with_an_alias(chart: helm.Chart, tmp_path: Path) -> None:
    job = """\
{{- $agent := .Subcharts.mlflowAgent }}
apiVersion: batch/v1
kind: Job
metadata:
  name: train
spec:
  template:
    metadata:
      labels:
        app: train
        {{- include "mlflow-agent.sidecar.podLabels" $agent | nindent 8 }}
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "mlflow-agent.serviceAccountName" $agent }}
      terminationGracePeriodSeconds: {{ include "mlflow-agent.terminationGracePeriodSeconds" $agent }}
      initContainers:
        {{- include "mlflow-agent.sidecar" $agent | nindent 8 }}
      containers:
        - name: train
          image: trainer:7.7.7
          env:
            {{- include "mlflow-agent.sidecar.clientEnv" $agent | nindent 12 }}
      volumes:
        {{- include "mlflow-agent.sidecar.volumes" $agent | nindent 8 }}
"""
    wi = {"mlflowAgent": {"azure": {"workloadIdentity": {"enabled": True, "clientId": CLIENT_ID}},
                          "agent": {"drainTimeoutSeconds": 60}}}
    with helm.Chart.load(make_parent(tmp_path, "mlflow-agent", "mlflowAgent", job)) as parent:
        docs = render(parent, wi)
        error = render_error(parent, {"mlflowAgent": {"upstream": {"uri": ""}}})
    job_doc = one(docs, "Job")
    spec = pod_spec(job_doc)
    agent_container = container(spec, "mlflow-agent", init=True)
    assert agent_container["restartPolicy"] == "Always"
    # The subchart's appVersion (not the parent's 7.7.7) and its values (with the parent's overrides).
    assert agent_container["image"] == f"mlflow-agent:{chart.metadata['appVersion']}"
    assert agent_settings(agent_container).upstream == "https://mlflow.example.com"
    assert spec["terminationGracePeriodSeconds"] == 60 + 15
    assert job_doc["spec"]["template"]["metadata"]["labels"] == {"app": "train", "azure.workload.identity/use": "true"}
    sa = one(docs, "ServiceAccount")
    assert sa["metadata"]["name"] == spec["serviceAccountName"] == f"{RELEASE}-mlflowagent"  # DNS-safe
    assert sa["metadata"]["annotations"] == {"azure.workload.identity/client-id": CLIENT_ID}
    assert "no upstream" in error


# ---- what the schema and the templates refuse ----


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"mode": "deployment"}, "/mode"),
        ({"modee": "sidecar"}, "'modee' not allowed"),
        ({"ports": {"http": 0}}, "/ports/http"),
        ({"ports": {"ops": 65536}}, "/ports/ops"),
        ({"ports": {"udp": "5051"}}, "/ports/udp"),
        ({"agent": {"drainTimeoutSeconds": -1}}, "/agent/drainTimeoutSeconds"),
        ({"agent": {"drainTimeout": "20s"}}, "'drainTimeout' not allowed"),
        ({"agent": {"spoolMaxBytes": "1 gigabyte"}}, "/agent/spoolMaxBytes"),
        ({"agent": {"artifactMaxBytes": 1024}}, "/agent/artifactMaxBytes"),
        ({"agent": {"logFormat": "xml"}}, "/agent/logFormat"),
        ({"agent": {"extraSettings": {"http": "0.0.0.0:5050"}}}, "/agent/extraSettings/http"),
        ({"agent": {"extraSettings": {"Bad-Name": "1"}}}, "invalid propertyName 'Bad-Name'"),
        ({"agent": {"extraSettings": {"retry_deadline": ["6h"]}}}, "/agent/extraSettings/retry_deadline"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"sidecar": {"spool": {"sizeLimit": "2 GB"}}}, "/sidecar/spool/sizeLimit"),
        ({"serviceMonitor": {"interval": "30"}}, "/serviceMonitor/interval"),
        ({"probes": {"liveness": {"periodSeconds": 0}}}, "/probes/liveness/periodSeconds"),
        ({"upstream": {"uri": "ftp://mlflow.example.com"}}, "/upstream/uri"),
        ({"azure": {"workloadIdentity": {"enabled": True, "clientId": "not-a-guid"}}}, "/azure/workloadIdentity"),
        ({"udp": {"enabled": "yes"}}, "/udp/enabled"),
    ],
)
def test_schema_rejects(chart: helm.Chart, values: Obj, where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema(merged(chart.values, merged(UPSTREAM, values)))
    assert where in str(caught.value)
    assert where in render_error(chart, merged(UPSTREAM, values))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mode": "daemonset", "udp": {"enabled": False}}, "set ingestToken.existingSecret"),
        ({"mode": "daemonset", "ingestToken": {"existingSecret": "t"}}, "datagrams carry no token"),
        ({"upstream": {"uri": ""}, "exampleJob": {"enabled": True}}, "no upstream"),
        ({"upstream": {"tokenKey": "t"}, "exampleJob": {"enabled": True}}, "set upstream.existingSecret"),
        ({"upstream": {"existingSecret": "s", "usernameKey": "u"}, "exampleJob": {"enabled": True}},
         "needs both upstream.usernameKey and upstream.passwordKey"),
        ({"azure": {"workloadIdentity": {"enabled": True}}, "exampleJob": {"enabled": True}},
         "needs azure.workloadIdentity.clientId"),
        ({"ports": {"ops": 5050}, "exampleJob": {"enabled": True}}, "ports.http and ports.ops must differ"),
    ],
)
def test_templates_refuse_unsafe_or_inconsistent_values(chart: helm.Chart, values: Obj, message: str) -> None:
    error = render_error(chart, merged(UPSTREAM, values))
    assert message in error


def test_daemonset_accepts_udp_with_allow_unauthenticated_bind(chart: helm.Chart) -> None:
    values = merged(UPSTREAM, {"mode": "daemonset", "allowUnauthenticatedBind": True})
    env = env_of(ds_agent(render(chart, values)))
    assert env["MLFLOW_AGENT_UDP"]["value"] == "0.0.0.0:5051"
    assert "MLFLOW_AGENT_INGEST_TOKEN" not in env


def test_managed_settings_refused_in_extra_settings_are_real_settings(chart: helm.Chart) -> None:
    assert chart.schema is not None
    extra = chart.schema["properties"]["agent"]["properties"]["extraSettings"]
    refused = {name for name, rule in extra["properties"].items() if rule is False}
    names = {d.name for d in SETTINGS}
    assert refused <= names
    assert {"http", "udp", "ops_http", "spool_dir", "ingest_token", "drain_timeout"} <= refused


# ---- the image the chart runs ----


def test_dockerfile_matches_the_chart(chart: helm.Chart) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim|^ARG PYTHON_IMAGE=python:3\.11-slim$", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["python", "-m", "agent", "run"\]$', dockerfile, re.M)
    assert re.search(r'^CMD \["--log-format", "json"\]$', dockerfile, re.M)  # the chart's args replace it
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert user is not None
    defaults = chart.values
    assert (int(user[1]), int(user[2])) == (defaults["securityContext"]["runAsUser"],
                                            defaults["securityContext"]["runAsGroup"])
    exposed = re.search(r"^EXPOSE (.+)$", dockerfile, re.M)
    assert exposed is not None
    ports = defaults["ports"]
    assert exposed[1].split() == [str(ports["http"]), f"{ports['udp']}/udp", str(ports["ops"])]
    assert "STOPSIGNAL SIGTERM" in dockerfile
    assert ".[azure]" in dockerfile
