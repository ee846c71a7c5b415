"""`python -m train evaluate` (= `make evaluate`): on a partial copy that lacks the requested fold
(the local copy holds folds 1-4, the README evaluates fold 5), it says which folds there are."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from train.__main__ import evaluate_main
from train.data import DataError, select


def partial_copy(synthetic_esc50: Path, tmp_path: Path) -> Path:
    """The synthetic dataset (folds 1-2 on disk) with metadata rows for fold 5 whose audio is
    absent, as in a partial copy of the official download."""
    root = tmp_path / "esc50"
    shutil.copytree(synthetic_esc50, root)
    csv_path = root / "meta" / "esc50.csv"
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    extra = [
        {**r, "filename": f"5-9{i:03d}-A-{r['target']}.wav", "fold": "5"}
        for i, r in enumerate(rows[:3])
    ]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows + extra)
    return root


def test_a_fold_absent_from_disk_names_the_folds_there(synthetic_esc50, tmp_path) -> None:
    root = partial_copy(synthetic_esc50, tmp_path)
    with pytest.raises(DataError) as e:
        select(root, [5])
    message = str(e.value)
    assert "folds 5" in message
    assert "the folds there are 1, 2" in message
    assert "--folds 1,2" in message and "make evaluate FOLDS=" in message


def test_evaluate_cli_exits_2_with_the_folds_and_evaluates_one_that_is_there(
    synthetic_esc50, tiny_checkpoint, tmp_path, capsys
) -> None:
    root = partial_copy(synthetic_esc50, tmp_path)
    out = tmp_path / "reports"
    argv = [str(tiny_checkpoint), "--data-root", str(root), "--out-dir", str(out)]

    assert evaluate_main([*argv, "--folds", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no clips of folds 5") and "1, 2" in err
    assert not out.exists()  # nothing written for a selection that does not exist

    assert evaluate_main([*argv, "--folds", "2"]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["folds"] == [2] and report["n"] == 6


def test_an_esc10_selection_counts_only_esc10_clips(synthetic_esc50, tmp_path) -> None:
    """The folds named are those holding clips of the subset asked for, not of any subset."""
    root = partial_copy(synthetic_esc50, tmp_path)
    csv_path = root / "meta" / "esc50.csv"
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # only fold 2's clips are ESC-10 now
        r["esc10"] = "True" if r["fold"] == "2" else "False"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(DataError, match=r"no ESC-10 clips of folds 1 .* the folds there are 2\."):
        select(root, [1], esc10=True)
