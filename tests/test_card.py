"""The model card names only a code version a reader can check in this repository."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from train.card import REPO, code_version_line

pytestmark = pytest.mark.skipif(
    not (REPO / ".git").exists(), reason="not a git checkout: no history to check against"
)


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_a_commit_of_this_history_is_named() -> None:
    head = git("rev-parse", "--short", "HEAD")
    assert code_version_line(head, "nowhere.pt").startswith(f"`{head}`")
    assert "uncommitted changes" in code_version_line(f"{head}-dirty", "nowhere.pt")


def test_a_commit_outside_this_history_is_never_written(tmp_path: Path) -> None:
    foreign = "1bed915"  # what the shipped checkpoint recorded: not a commit of this repository
    line = code_version_line(f"{foreign} (copied checkout)", tmp_path / "x.pt")
    assert foreign not in line and line.startswith("unknown")
    assert code_version_line("unknown", tmp_path / "x.pt").startswith("unknown")


def test_a_committed_checkpoint_falls_back_to_the_commit_that_added_it() -> None:
    shipped = REPO / "models" / "esc50-resnet34.pt"
    added = git("log", "-1", "--format=%h", "--", str(shipped))
    line = code_version_line("1bed915 (copied checkout)", shipped)
    if git("status", "--porcelain", "--", str(shipped)):  # replaced here, not yet committed
        assert line.startswith("unknown")
        return
    assert line.startswith(f"`{added}`") and "1bed915" not in line
    assert (
        subprocess.run(["git", "merge-base", "--is-ancestor", added, "HEAD"], cwd=REPO).returncode
        == 0
    )
