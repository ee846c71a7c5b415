"""Render the model card (markdown) from the checkpoint and its cross-validation reports."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from contract.files import sha256_file

from .checkpoint import load_checkpoint, model_from_checkpoint
from .model import count_parameters

LICENCE = """\
## Data licence and attribution

Trained on clips of **ESC-50** by Karol J. Piczak, licensed **CC BY-NC 3.0**
(Creative Commons Attribution-NonCommercial 3.0); the clips come from freesound.org
recordings, attributed in github.com/karolpiczak/ESC-50. The weights are derived from that
data: **non-commercial use only**. The code is MIT (see LICENSE).

> K. J. Piczak. ESC: Dataset for Environmental Sound Classification.
> Proceedings of the 23rd ACM International Conference on Multimedia (ACM MM 2015).
> doi:10.1145/2733373.2806390
"""


RECIPE_KEYS = (
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_pct",
    "label_smoothing",
    "mix",
    "mix_prob",
    "crop_seconds",
    "shift_seconds",
    "stretch",
    "freq_masks",
    "freq_mask_width",
    "time_masks",
    "time_mask_width",
    "ema_decay",
    "seed",
)


def clip_counts(data_root: str | Path) -> str:
    """'the 10 ESC-10 classes have 32 clips each, the other 40 have 8', read from the data."""
    from collections import Counter

    from .data import select

    sel = select(data_root)
    by_group: dict[bool, Counter] = {True: Counter(), False: Counter()}
    for c in sel.clips:
        by_group[c.esc10][c.category] += 1

    def describe(counts: Counter) -> str:
        sizes = sorted(set(counts.values()))
        if not sizes:
            return "none"
        each = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        return f"{len(counts)} classes, {each} clips each"

    return f"ESC-10 subset: {describe(by_group[True])}; the others: {describe(by_group[False])}"


REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> subprocess.CompletedProcess[str] | None:
    """Run git in this repository; None where git or the repository is absent."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


def _in_history(sha: str) -> bool:
    """True when `sha` names a commit of this repository that HEAD descends from."""
    known = _git("rev-parse", "--verify", "--quiet", f"{sha}^{{commit}}")
    ancestor = known and known.returncode == 0 and _git("merge-base", "--is-ancestor", sha, "HEAD")
    return bool(ancestor and ancestor.returncode == 0)


def code_version_line(recorded: str, checkpoint: str | Path) -> str:
    """The card's code version, only as something a reader can check in this repository.

    A checkpoint records `git rev-parse HEAD` of the tree it was trained from; a copy trained on
    another machine may record a commit that never reached this history (the shipped one did).
    Such a hash is not written: the card names the commit that committed the checkpoint instead,
    or says the version is unknown."""
    sha = (recorded or "").split(" ")[0]
    if sha.removesuffix("-dirty") and _in_history(sha.removesuffix("-dirty")):
        changes = " plus uncommitted changes" if sha.endswith("-dirty") else ""
        return f"`{sha.removesuffix('-dirty')}`{changes} (the commit it was trained from)"
    path = Path(checkpoint).resolve()
    unchanged = _git("diff", "--quiet", "HEAD", "--", str(path))
    added = _git("log", "-1", "--format=%h", "--", str(path))
    if unchanged and unchanged.returncode == 0 and added and added.stdout.strip():
        commit, name = added.stdout.strip(), path.relative_to(REPO).as_posix()
        return (
            f"`{commit}`, the commit that added this checkpoint (`git log -1 -- {name}`): the "
            f"commit it recorded is not in this repository's history, so `train/` at `{commit}` "
            "is the training code to read"
        )
    return "unknown (the checkpoint records no commit of this repository's history)"


def group_rows(report: dict) -> list[str]:
    rows = []
    for kind, groups in report["weights"].items():
        for g, m in groups.items():
            rows.append(
                f"| {kind} | {g} | {m['clips']} | {m['classes']} | **{m['accuracy']:.3f}** "
                f"({m['ci95'][0]:.3f}-{m['ci95'][1]:.3f}) | {m['macro_f1']:.3f} |"
            )
    return rows


def render(
    checkpoint: str | Path, cv_reports: list[str | Path], data_root: str | Path, notes: str = ""
) -> str:
    """The model card: the checkpoint describes the model and its training; the first
    cross-validation report is the shipped recipe's, any others are the variants compared."""
    ckpt = load_checkpoint(checkpoint)
    reports = [json.loads(Path(r).read_text()) for r in cv_reports]
    shipped = reports[0]
    variant = next(iter(shipped["variants"]))
    rep = shipped["variants"][variant]
    m, tc, data, fe = ckpt["metrics"], ckpt["train_config"], ckpt["data"], ckpt["frontend_config"]
    n_params = count_parameters(model_from_checkpoint(ckpt).cnn)
    name = Path(checkpoint).stem
    cal = ckpt.get("calibration") or {}
    recipe = {k: tc[k] for k in RECIPE_KEYS if k in tc}
    lines = [
        f"# Model card: {name}",
        "",
        f"ResNet-style CNN (stages {tc['model']['depths']} x widths {tc['model']['widths']}) "
        f"over a {fe['n_mels']}-band log-mel front-end that is part of the model: **waveform "
        f"(B, {fe['clip_samples']}) float32 at {fe['sample_rate']} Hz in, "
        f"{len(ckpt['labels'])} logits out**.",
        "",
        f"- parameters: {n_params:,} (CNN; the front-end has none)",
        f"- file: `{Path(checkpoint).name}`, weights ({ckpt.get('weights', 'raw')}) stored as "
        f"{ckpt.get('weights_dtype', 'float32')}, sha256 `{sha256_file(checkpoint)[:16]}...`",
        f"- saved {ckpt['saved_at']}; code version: "
        f"{code_version_line(ckpt['code_version'], checkpoint)}",
        f"- front-end: {json.dumps(fe)}",
        "",
        "## Training",
        "",
        f"- recipe: AdamW + one-cycle, between-class mixing, time stretch, SpecAugment, weight "
        f"EMA (shipped): {json.dumps(recipe)}",
        f"- trained on: {m.get('device')}; {m.get('wall_seconds', 0) / 60:.1f} min for this "
        f"run of {ckpt['epoch']} epochs (it ran beside the cross-validation runs)",
        f"- data: `{data['root']}`; folds {data['folds']}, {data['train_clips']} clips, all "
        f"trained on ({data['missing']} of the official 2000 absent here); "
        f"{clip_counts(data_root)}",
        f"- command: `{shipped['command']}` (the final all-clip run is the `--final` job)",
        "- the weights are the last EMA of a fixed schedule: no epoch or checkpoint was picked "
        "on any validation clip",
        "",
        "## How good is it: grouped 4-fold cross-validation of the recipe",
        "",
        f"The shipped model trained on every clip, so no clip here is unseen by it. The recipe "
        f"was estimated by {shipped['k']}-fold cross-validation (folds grouped by source "
        "recording, stratified by class): each fold's model trained on the other folds with the "
        "same settings and epochs, and every clip was scored once by a model that never heard "
        "its recording. Intervals are 95 % Wilson intervals on the pooled clips.",
        "",
        "| weights | group | clips | classes | accuracy (95 % CI) | macro-F1 |",
        "|---|---|---|---|---|---|",
        *group_rows(rep),
        "",
        "### Recipe variants compared (same folds)",
        "",
        "| variant | training args | epochs | accuracy | ESC-10 | other classes |",
        "|---|---|---|---|---|---|",
    ]
    for r in reports:
        for v, vr in r["variants"].items():
            w = vr["weights"]["ema" if "ema" in vr["weights"] else "raw"]
            epochs = (r.get("budget", {}).get(v) or {}).get("epochs", r["epochs"])
            acc = [f"{w[g]['accuracy']:.3f}" if g in w else "-" for g in ("all", "esc10", "other")]
            lines.append(f"| {v} | `{vr['args']}` | {epochs} | {' | '.join(acc)} |")
    lines += [
        "",
        "The first row is the shipped recipe. The rows share these folds and the shipped one "
        "was picked among them on these figures, so its estimate leans slightly optimistic.",
        "",
        "## Calibration",
        "",
        f"- temperature **T = {cal.get('temperature', 1.0):.3f}**, stored in the checkpoint and "
        "the ONNX metadata; the service reports softmax(logits / T)",
        f"- fitted on: {cal.get('fitted_on', 'not calibrated')}",
        f"- expected calibration error (15 bins) {cal.get('ece_before', float('nan')):.3f} "
        f"before, {cal.get('ece_after_cross_fitted', float('nan')):.3f} after a temperature "
        "fitted on the other folds (cross-fitted, so the figure is not fitted to itself)",
        "",
        notes,
        "",
        "## Per class (pooled cross-validation, EMA weights)",
        "",
        "| class | precision | recall | F1 | clips |",
        "|---|---|---|---|---|",
        *(
            f"| {r['label']} | {r['precision']:.2f} | {r['recall']:.2f} | {r['f1']:.2f} | "
            f"{r['support']} |"
            for r in rep["per_class"]
        ),
        "",
        LICENCE,
    ]
    return "\n".join(lines)
