"""`python -m service`: starts from ESC50_* env vars, serves, stops cleanly on SIGTERM; the
lifespan refuses an artifact it cannot honour before serving anything."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from servers import clean_env, free_port, wait_ready

from contract.metadata import MetadataError
from service.app import create_app
from service.artifacts import ModelNotFound
from service.settings import Settings


def test_python_m_service_serves_and_stops_on_sigterm(tiny_onnx: Path, repo_root: Path) -> None:
    port = free_port()
    env = clean_env(
        ESC50_MODEL_PATH=str(tiny_onnx),
        ESC50_PORT=str(port),
        ESC50_INTRA_OP_THREADS="1",
        ESC50_LOG_LEVEL="info",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"], env=env, cwd=repo_root, stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, timeout_s=60)  # fails the test if it dies or never gets ready
        (card,) = httpx.get(f"{base}/v1/models").json()["models"]
        assert card["name"] == "tiny"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal: exit status -SIGTERM
    assert proc.returncode in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log and "service: stopped" in log


async def _start(settings: Settings) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        pass


def test_startup_refuses_unsupported_frontend(tiny_onnx: Path, tmp_path: Path) -> None:
    import onnx

    model = onnx.load(str(tiny_onnx))
    for p in model.metadata_props:
        if p.key == "frontend":
            p.value = json.dumps({**json.loads(p.value), "normalize": "batch"})
    onnx.save(model, str(tmp_path / "batchnorm.onnx"))
    with pytest.raises(MetadataError, match="normalize='batch' is not supported"):
        asyncio.run(_start(Settings(model_path=tmp_path / "batchnorm.onnx")))


def test_startup_without_any_model_says_run_make_export(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="Run `make export`"):
        asyncio.run(_start(Settings(model_dir=tmp_path)))
