"""The Makefile's outputs: following the README (`make export`, `make verify`, `make bench`) writes
only git-ignored paths; RELEASE=1 is what replaces the committed artifacts and reports. Read from
`make -n` (the commands make would run), so nothing is exported or measured here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    not (shutil.which("make") and shutil.which("git") and (REPO / ".git").exists()),
    reason="needs make, git and a git checkout",
)


def dry_run(*args: str) -> str:
    # the Makefile's own defaults, whatever this shell exports (ESC50_*, PORT, RELEASE, ...)
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    done = subprocess.run(
        ["make", "-n", *args], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.replace("\\\n", " ")


def written(commands: str) -> list[str]:
    """Every path the export / verify / bench commands write, as the CLIs name them."""
    prefixes = re.findall(r"--(?:out-prefix|artifacts|out) (\S+)", commands)
    return [f"{p}{suffix}" for p in prefixes for suffix in (".int8.onnx", ".verify.json", ".md")]


def ignored(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0


def test_export_verify_and_bench_write_ignored_paths_only() -> None:
    commands = dry_run("export", "verify", "bench")
    paths = written(commands)
    assert len(paths) == 9, commands  # export's prefix, verify's artifacts, bench's report
    assert all(p.startswith("build/") for p in paths), paths
    assert all(ignored(p) for p in paths), [p for p in paths if not ignored(p)]


def test_release_replaces_the_committed_artifacts_and_report() -> None:
    commands = dry_run("export", "verify", "bench", "RELEASE=1")
    assert "--out-prefix models/esc50-resnet34" in commands
    assert "--artifacts models/esc50-resnet34" in commands
    assert "--out loadtests/reports/bench" in commands


def test_serve_and_loadtest_share_one_port() -> None:
    commands = dry_run("serve", "loadtest", "PORT=9123")
    assert "ESC50_PORT=9123" in commands and "HOST=http://127.0.0.1:9123" in commands
    assert "ESC50_EXPLAIN_MODEL_PATH=build/esc50-resnet34.explain.onnx" in commands


def test_evaluate_defaults_to_fold_5() -> None:
    assert "--folds 5" in dry_run("evaluate")
    assert "--folds" not in dry_run("evaluate", "FOLDS=")
