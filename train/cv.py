"""Grouped K-fold cross-validation of a recipe, pooled into one honest estimate.

`python -m train cv --k 4 --out-dir runs/cv [--variant NAME="ARGS" ...] [--final] -- ARGS`
trains one run per fold and variant (in parallel processes, `--parallel`), each validating on
clips from recordings it never saw, and pools their validation logits: every clip of the data is
scored exactly once by a model that did not train on it. The report gives accuracy and macro-F1
for the 10 well-covered ESC-10 classes and for the other classes separately, with 95 % intervals,
for the EMA and the raw weights, and the calibration (ECE) before and after a temperature that
is cross-fitted (fitted on the other folds' clips, applied to each fold's).

With `--final`, each variant also trains on all clips with the same settings: the model to ship.
With `--budget-seconds`, the epoch count is derived from a throughput measurement of all the
runs at once, so that they finish inside the budget (a GPU lease); the report records it, and
`--epochs N` reproduces it anywhere.

With `--epochs-list 306,600,1000`, each variant runs once per length, every one a fixed schedule
scored on its last weights: the report adds a curve (pooled CV at each length); no epoch is
picked on validation clips inside a run.

Distillation: a variant whose train args name `--teachers-dir DIR` (repeatable) distils each
fold's student from the runs under DIR that never trained on that fold's validation clips (the
same fold of CV runs of other seeds with the same `--split-seed`); the all-clip student from the
all-clip runs there. The report adds the teacher ensemble's own pooled out-of-fold score.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import data as D
from .calibration import (
    expected_calibration_error,
    fit_temperature,
    softmax,
    wilson_interval,
)
from .distill import TeacherError, data_records, eligible_teachers, ensemble_val_logits
from .evaluate import classification_metrics

log = logging.getLogger("train.cv")


def job_dir(out: Path, variant: str, fold: int | None) -> Path:
    return out / variant / ("final" if fold is None else f"fold{fold}")


def job_args(args: list[str], k: int, fold: int | None, out: Path) -> list[str]:
    split = (
        ["--val-fraction", "0"] if fold is None else ["--cv-folds", str(k), "--cv-index", str(fold)]
    )
    return [*args, *split, "--out-dir", str(out)]


def run_jobs(jobs: list[tuple[str, list[str]]], parallel: int, logs: Path) -> None:
    """Run `python -m train ARGS` jobs, `parallel` at a time; fail if any fails."""
    env = {**os.environ, "TRAIN_PROGRESS": "0"}
    pending, running, failed = list(jobs), [], []
    logs.mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < parallel:
            name, argv = pending.pop(0)
            f = open(logs / f"{name}.log", "w")  # noqa: SIM115 (closed when the run ends)
            p = subprocess.Popen(
                [sys.executable, "-m", "train", *argv], stdout=f, stderr=subprocess.STDOUT, env=env
            )
            log.info("started %s: %s", name, shlex.join(argv))
            running.append((name, p, f))
        for item in list(running):
            name, p, f = item
            if p.poll() is not None:
                f.close()
                running.remove(item)
                log.info("%s finished with exit code %d", name, p.returncode)
                if p.returncode:
                    failed.append(name)
        time.sleep(1)
    if failed:
        raise SystemExit(f"training runs failed: {failed} (logs in {logs})")


def measure_all(jobs: list[tuple[str, list[str]]], logs: Path, steps: int) -> dict[str, float]:
    """Clips/s of every job, measured with all of them running at once (as they will)."""
    env = {**os.environ, "TRAIN_PROGRESS": "0"}
    procs = []
    shutil.rmtree(logs / "barrier", ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    for name, argv in jobs:
        out = logs / f"{name}.throughput.json"
        cmd = [
            sys.executable,
            "-m",
            "train",
            "throughput",
            "--steps",
            str(steps),
            "--json-out",
            str(out),
            "--barrier",
            str(logs / "barrier"),
            "--barrier-count",
            str(len(jobs)),
            "--",
            *argv,
        ]
        with open(logs / f"{name}.throughput.log", "w") as f:
            procs.append(
                (name, out, subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT))
            )
    rates = {}
    for name, out, p in procs:
        if p.wait():
            raise SystemExit(f"throughput measurement of {name} failed (see {logs})")
        rates[name] = json.loads(out.read_text())["clips_per_s"]
    return rates


def pool(out: Path, variant: str, k: int, labels: list[str], esc10: set[str]) -> dict:
    """Pooled out-of-fold figures of one variant."""
    parts = [np.load(job_dir(out, variant, i) / "val_logits.npz") for i in range(k)]
    y = np.concatenate([p["targets"] for p in parts])
    kinds = [key[len("logits_") :] for key in parts[0].files if key.startswith("logits_")]
    report: dict = {"clips": int(len(y)), "weights": {}}
    for kind in kinds:
        logits = np.concatenate([p[f"logits_{kind}"] for p in parts])
        report["weights"][kind] = group_metrics(logits, y, labels, esc10)
    main = "ema" if "ema" in kinds else "raw"
    pooled = classification_metrics(
        y, np.concatenate([p[f"logits_{main}"] for p in parts]).argmax(1), labels
    )
    report["per_class"], report["confusion"] = pooled["per_class"], pooled["confusion"]
    # Cross-fitted temperature: each fold's probabilities use a T fitted on the other folds.
    ece_before, ece_after, temps = [], [], []
    for i, p in enumerate(parts):
        rest = [q for j, q in enumerate(parts) if j != i]
        t = fit_temperature(
            np.concatenate([q[f"logits_{main}"] for q in rest]),
            np.concatenate([q["targets"] for q in rest]),
        )
        temps.append(t)
        ece_before.append(softmax(p[f"logits_{main}"]))
        ece_after.append(softmax(p[f"logits_{main}"], t))
    logits = np.concatenate([p[f"logits_{main}"] for p in parts])
    report["calibration"] = {
        "weights": main,
        "temperature": fit_temperature(logits, y),  # on every clip: the one to ship
        "fold_temperatures": temps,
        "ece_before": expected_calibration_error(np.concatenate(ece_before), y),
        "ece_after_cross_fitted": expected_calibration_error(np.concatenate(ece_after), y),
    }
    return report


def group_metrics(logits: np.ndarray, y: np.ndarray, labels: list[str], esc10: set[str]) -> dict:
    pred = logits.argmax(1)
    out = {}
    in_esc10 = np.array([labels[t] in esc10 for t in y])
    for name, mask in (("all", np.ones_like(in_esc10)), ("esc10", in_esc10), ("other", ~in_esc10)):
        if not mask.any():
            continue
        m = classification_metrics(y[mask], pred[mask], labels)
        correct = int((pred[mask] == y[mask]).sum())
        lo, hi = wilson_interval(correct, int(mask.sum()))
        out[name] = {
            "clips": int(mask.sum()),
            "classes": len(m["per_class"]),
            "accuracy": m["accuracy"],
            "ci95": [lo, hi],
            "macro_f1": m["macro_f1"],
        }
    return out


def strip_option(args: list[str], name: str) -> tuple[list[str], list[str]]:
    """`args` without `name VALUE` / `name=VALUE`, and the values taken out of it."""
    kept, values, i = [], [], 0
    while i < len(args):
        if args[i] == name and i + 1 < len(args):
            values.append(args[i + 1])
            i += 2
            continue
        if args[i].startswith(name + "="):
            values.append(args[i].split("=", 1)[1])
        else:
            kept.append(args[i])
        i += 1
    return kept, values


def student_split(train_args: list[str], k: int, fold: int | None) -> tuple[list[str], list[str]]:
    """(validation stems, all selected stems) of the run `train_args` makes for `fold`: the
    options that decide the split, read as `python -m train` reads them."""
    from dataclasses import replace

    from .train import TrainConfig, prepare_data

    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    defaults = TrainConfig()
    p.add_argument("--data-root", default=defaults.data_root)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--split-seed", type=int, default=defaults.split_seed)
    p.add_argument("--folds", type=lambda s: [int(x) for x in s.split(",") if x.strip()])
    p.add_argument("--esc10", action="store_true")
    a, _ = p.parse_known_args(train_args)
    cfg = replace(
        defaults,
        data_root=a.data_root,
        seed=a.seed,
        split_seed=a.split_seed,
        folds=a.folds,
        esc10=a.esc10,
        **({"val_fraction": 0} if fold is None else {"cv_folds": k, "cv_index": fold}),
    )
    _, _, val_clips, _ = prepare_data(cfg)
    stems = [c.stem for c in D.select(cfg.data_root, cfg.folds, cfg.esc10).clips]
    return [c.stem for c in val_clips], stems


def fold_teachers(
    train_args: list[str], dirs: list[str], k: int, folds: list[int | None]
) -> dict[int | None, list[Path]]:
    """For each fold's student, the runs under `dirs` allowed to teach it (none: an error)."""
    from .distill import teacher_paths

    records = data_records(teacher_paths([], dirs))
    chosen = {}
    for f in folds:
        val_stems, all_stems = student_split(train_args, k, f)
        chosen[f] = eligible_teachers(records, val_stems, all_stems)
        if not chosen[f]:
            which = "all-clip runs" if f is None else f"runs that held out fold {f}'s clips"
            raise TeacherError(
                f"no teacher under {dirs} for the {'final' if f is None else f'fold {f}'} "
                f"student: it needs {which} (train them with the same --split-seed)"
            )
    return chosen


def ensemble_score(
    out: Path, variant: str, k: int, teachers: dict, labels: list[str], esc10: set[str]
) -> dict:
    """Pooled out-of-fold figures of the teacher ensemble itself (mean of the teachers' logits
    on each fold's validation clips): what the costly model reaches, beside its student."""
    parts = [np.load(job_dir(out, variant, i) / "val_logits.npz") for i in range(k)]
    logits = np.concatenate(
        [ensemble_val_logits(teachers[i], p["stems"]) for i, p in enumerate(parts)]
    )
    y = np.concatenate([p["targets"] for p in parts])
    return {
        "members_per_fold": [[str(t) for t in teachers[i]] for i in range(k)],
        "weights": {"ensemble": group_metrics(logits, y, labels, esc10)},
    }


def curve(report: dict, lengths: list[int]) -> dict[str, list[dict]]:
    """Per base variant, pooled accuracy at each schedule length (`--epochs-list`)."""
    out: dict[str, list[dict]] = {}
    for name, r in report["variants"].items():
        base, _, e = name.rpartition("@")
        if not base or not e.endswith("ep") or int(e[:-2]) not in lengths:
            continue
        w = r["calibration"]["weights"]
        point = {"epochs": int(e[:-2])}
        for g, m in r["weights"][w].items():
            point[g] = {"accuracy": m["accuracy"], "ci95": m["ci95"]}
        out.setdefault(base, []).append(point)
    return out


def render(report: dict) -> str:
    lines = [
        "# Cross-validated estimate of the training recipe",
        "",
        f"- command: `{report['command']}`",
        f"- device: {report['device']}; epochs: {report['epochs']}; folds: {report['k']} "
        "(grouped by source recording, stratified by class)",
        "- every clip is scored once, by the fold model that did not train on it; the figures "
        "pool those scores. No epoch or checkpoint was picked on them: each run trains a fixed "
        "schedule and its last weights (EMA) are scored.",
        "",
    ]
    for variant, r in report["variants"].items():
        lines += [
            f"## Variant `{variant}`: `{r['args']}`",
            "",
            "| weights | group | clips | classes | accuracy (95 % CI) | macro-F1 |",
            "|---|---|---|---|---|---|",
        ]
        for kind, groups in r["weights"].items():
            for g, m in groups.items():
                lines.append(
                    f"| {kind} | {g} | {m['clips']} | {m['classes']} | {m['accuracy']:.3f} "
                    f"({m['ci95'][0]:.3f}–{m['ci95'][1]:.3f}) | {m['macro_f1']:.3f} |"
                )
        if "teacher_ensemble" in r:
            for g, m in r["teacher_ensemble"]["weights"]["ensemble"].items():
                lines.append(
                    f"| teacher ensemble | {g} | {m['clips']} | {m['classes']} | "
                    f"{m['accuracy']:.3f} ({m['ci95'][0]:.3f}–{m['ci95'][1]:.3f}) | "
                    f"{m['macro_f1']:.3f} |"
                )
            n = [len(t) for t in r["teacher_ensemble"]["members_per_fold"]]
            lines += [
                "",
                "Distilled: each fold's student learned from the mean logits of "
                f"{', '.join(map(str, n))} teacher runs (per fold) that never trained on its "
                "validation clips; the ensemble's row scores those teachers themselves on the "
                "same clips.",
            ]
        c = r["calibration"]
        lines += [
            "",
            f"Calibration ({c['weights']} weights): ECE {c['ece_before']:.3f} before, "
            f"{c['ece_after_cross_fitted']:.3f} after a cross-fitted temperature; "
            f"temperature on all clips T = {c['temperature']:.3f} (per fold: "
            f"{', '.join(f'{t:.2f}' for t in c['fold_temperatures'])}).",
            "",
        ]
    for base, points in report.get("curve", {}).items():
        lines += [
            f"## Schedule curve of `{base}` (fixed schedules, last weights; none picked on "
            "validation clips)",
            "",
            "| epochs | all | ESC-10 | other 40 |",
            "|---|---|---|---|",
        ]
        for pt in points:
            cells = [
                f"{pt[g]['accuracy']:.3f} ({pt[g]['ci95'][0]:.3f}–{pt[g]['ci95'][1]:.3f})"
                if g in pt
                else "–"
                for g in ("all", "esc10", "other")
            ]
            lines.append(f"| {pt['epochs']} | " + " | ".join(cells) + " |")
        lines.append("")
    if "chosen" in report:
        lines += [f"Chosen variant: `{report['chosen']}` ({report['choice_rule']}).", ""]
    return "\n".join(lines)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        i = argv.index("--")
        argv, common = argv[:i], argv[i + 1 :]
    else:
        common = []
    p = argparse.ArgumentParser(prog="python -m train cv", description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=4, help="folds")
    p.add_argument("--out-dir", default="runs/cv")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help='NAME="extra train args" (repeatable; default one variant "recipe")',
    )
    p.add_argument("--final", action="store_true", help="also train each variant on all clips")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (a GPU takes several)")
    p.add_argument(
        "--budget-seconds",
        type=float,
        default=0,
        help="derive --epochs from measured throughput to fit this budget",
    )
    p.add_argument(
        "--epochs-list",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        default=[],
        help="e.g. 306,600,1000: every variant once per schedule length; the report adds a curve",
    )
    p.add_argument(
        "--pool-only",
        action="store_true",
        help="train nothing: pool the runs already in --out-dir again",
    )
    p.add_argument("--data-root", default=D.DEFAULT_DATA_ROOT)
    return p.parse_args(argv), common


def main(argv: list[str]) -> int:
    args, common = parse(argv)
    out = Path(args.out_dir)
    variants = dict(v.split("=", 1) for v in args.variant) or {"recipe": ""}
    if args.epochs_list:
        if args.budget_seconds:
            raise SystemExit("--epochs-list and --budget-seconds exclude each other")
        variants = {
            f"{v}@{e}ep": f"{extra} --epochs {e}"
            for v, extra in variants.items()
            for e in args.epochs_list
        }
    sel = D.select(args.data_root)
    base = ["--data-root", args.data_root, *common]
    folds: list[int | None] = [*range(args.k), *([None] if args.final else [])]
    train_args, teachers = {}, {}
    for v, extra in variants.items():
        train_args[v], dirs = strip_option([*base, *shlex.split(extra)], "--teachers-dir")
        if dirs:  # chosen per fold, so that no student meets a teacher of its validation clips
            teachers[v] = fold_teachers(train_args[v], dirs, args.k, folds)
            log.info("teachers of %s: %s", v, {f: len(t) for f, t in teachers[v].items()})

    def teacher_flags(v: str, f: int | None) -> list[str]:
        return [a for t in teachers.get(v, {}).get(f, []) for a in ("--teacher", str(t))]

    def jobs_for(epochs_args: dict[str, list[str]]):
        return [
            (
                f"{v}-{'final' if f is None else f'fold{f}'}",
                job_args(
                    [*train_args[v], *epochs_args.get(v, []), *teacher_flags(v, f)],
                    args.k,
                    f,
                    job_dir(out, v, f),
                ),
            )
            for v in variants
            for f in folds
        ]

    epochs: dict[str, list[str]] = {}
    budget_info = {}
    previous = out / "cv_report.json"
    if args.pool_only and previous.is_file():  # keep what the training run recorded
        old = json.loads(previous.read_text())
        budget_info = old.get("budget", {})
        epochs = {v: ["--epochs", str(b["epochs"])] for v, b in budget_info.items()}
    elif args.budget_seconds:
        rates = measure_all(jobs_for({}), out / "logs", steps=30)
        for v in variants:
            rate = min(r for name, r in rates.items() if name.startswith(f"{v}-"))
            n = len(sel.clips)  # the final run's epoch is the longest
            # 90 %: process start, decoding and the final evaluation also take time
            e = max(1, math.floor(0.9 * args.budget_seconds * rate / n))
            epochs[v] = ["--epochs", str(e)]
            budget_info[v] = {"clips_per_s_each_concurrent": rate, "epochs": e}
        log.info("budget %.0fs -> %s", args.budget_seconds, budget_info)
    t0 = time.time()
    if not args.pool_only:
        run_jobs(jobs_for(epochs), args.parallel, out / "logs")
    labels = sel.labels
    esc10 = {c.category for c in sel.clips if c.esc10}
    command = "python -m train cv " + shlex.join(argv)
    if args.pool_only and previous.is_file():
        command = json.loads(previous.read_text())["command"]
    report: dict = {
        "command": command,
        "k": args.k,
        "wall_seconds": round(time.time() - t0, 1),
        "budget": budget_info,
        "variants": {},
    }
    for v, extra in variants.items():
        r = pool(out, v, args.k, labels, esc10)
        r["args"] = shlex.join([*common, *shlex.split(extra), *epochs.get(v, [])])
        if args.pool_only and previous.is_file():
            r["args"] = json.loads(previous.read_text())["variants"][v]["args"]
        if v in teachers:
            r["teacher_ensemble"] = ensemble_score(out, v, args.k, teachers[v], labels, esc10)
        report["variants"][v] = r
    if args.epochs_list:
        report["curve"] = curve(report, args.epochs_list)
    first = json.loads(
        (job_dir(out, next(iter(variants)), 0) / "metrics.jsonl").read_text().splitlines()[-1]
    )
    report["epochs"] = first["epoch"]
    if args.pool_only and previous.is_file():
        old = json.loads(previous.read_text())
        report["device"], report["wall_seconds"] = old["device"], old["wall_seconds"]
    else:
        from .checkpoint import load_checkpoint

        first_run = load_checkpoint(job_dir(out, next(iter(variants)), 0) / "final.pt")
        report["device"] = first_run["metrics"]["device"]
    if len(variants) > 1:
        main_w = report["variants"][next(iter(variants))]["calibration"]["weights"]
        report["chosen"] = max(
            variants, key=lambda v: report["variants"][v]["weights"][main_w]["all"]["accuracy"]
        )
        report["choice_rule"] = (
            "highest pooled accuracy over all clips; the first listed "
            "variant on a tie, decided before the runs"
        )
    (out / "cv_report.json").write_text(json.dumps(report, indent=2))
    (out / "cv_report.md").write_text(render(report))
    print(render(report))
    return 0


# --------------------------------------------------------------------------- paired comparison


def oof_predictions(variant_dir: Path, k: int, weights: str = "ema") -> dict[str, tuple[int, int]]:
    """stem -> (target, predicted class) from the pooled out-of-fold logits of one CV variant."""
    out = {}
    for i in range(k):
        z = np.load(variant_dir / f"fold{i}" / "val_logits.npz")
        key = f"logits_{weights}" if f"logits_{weights}" in z.files else "logits_raw"
        for s, t, p in zip(z["stems"], z["targets"], z[key].argmax(1), strict=True):
            out[str(s)] = (int(t), int(p))
    return out


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (only A right), c (only B)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(
    base: dict[str, tuple[int, int]], new: dict[str, tuple[int, int]], stems: list[str]
) -> dict:
    """New vs base on the same clips: accuracies, the exact McNemar test, and a paired bootstrap
    95 % interval of the accuracy difference (10,000 resamples of clips, seeded)."""
    if missing := [s for s in stems if s not in base or s not in new]:
        raise SystemExit(f"{len(missing)} clips lack an out-of-fold score in one run")
    a = np.array([base[s][0] == base[s][1] for s in stems])
    b = np.array([new[s][0] == new[s][1] for s in stems])
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(stems), size=(10_000, len(stems)))
    diffs = b[idx].mean(1) - a[idx].mean(1)
    return {
        "clips": len(stems),
        "base_accuracy": float(a.mean()),
        "new_accuracy": float(b.mean()),
        "difference": float(b.mean() - a.mean()),
        "only_base_right": int((a & ~b).sum()),
        "only_new_right": int((b & ~a).sum()),
        "mcnemar_exact_p": mcnemar_exact(int((a & ~b).sum()), int((b & ~a).sum())),
        "bootstrap_ci95": [float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))],
    }


def compare_main(argv: list[str]) -> int:
    """`python -m train compare --base RUN/VARIANT --new RUN/VARIANT`: the ship rule's test."""
    p = argparse.ArgumentParser(
        prog="python -m train compare",
        description="Paired test of two CV variants on the same out-of-fold clips.",
    )
    p.add_argument("--base", type=Path, required=True, help="CV_DIR/VARIANT of the current recipe")
    p.add_argument("--new", type=Path, required=True, help="CV_DIR/VARIANT of the candidate")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--data-root", default=D.DEFAULT_DATA_ROOT)
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of McNemar's test")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    sel = D.select(args.data_root)
    base, new = oof_predictions(args.base, args.k), oof_predictions(args.new, args.k)
    groups = {
        "esc10": [c.stem for c in sel.clips if c.esc10],
        "other": [c.stem for c in sel.clips if not c.esc10],
        "all": [c.stem for c in sel.clips],
    }
    result: dict = {"base": str(args.base), "new": str(args.new), "alpha": args.alpha}
    for g, stems in groups.items():
        if stems:
            result[g] = paired_comparison(base, new, stems)
    e = result.get("esc10", {})
    result["new_beats_base_on_esc10"] = bool(
        e and e["difference"] > 0 and e["mcnemar_exact_p"] < args.alpha
    )
    text = json.dumps(result, indent=2)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    print(text)
    return 0
