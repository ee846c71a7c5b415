"""Training throughput on this machine by crop length, threads and memory format, and what the
shipped schedule costs here: `python -m train throughput-report` (= `make train-throughput`).

Each configuration runs in its own process (thread settings are per process) with real training
steps of the full ResNet-34 on real clips, one after the other: run it on an otherwise idle
machine, the figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from .data import DEFAULT_DATA_ROOT


def measure(args: list[str], steps: int) -> dict:
    cmd = [sys.executable, "-m", "train", "throughput", "--steps", str(steps), "--", *args]
    r = subprocess.run(
        cmd, capture_output=True, text=True, check=True, env={**os.environ, "TRAIN_PROGRESS": "0"}
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m train throughput-report", description=__doc__)
    p.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    p.add_argument("--crops", default="0,2.5,1.5", help="crop seconds (0: whole 5-s clip)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--channels-last", default="0,1")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument(
        "--cv-report",
        default="models/training/cv-shipped-recipe.json",
        help="the shipped recipe's epochs and clip counts, to cost it here",
    )
    p.add_argument("--out", default="models/training/cpu-throughput")
    args = p.parse_args(argv)
    rows = []
    grid = itertools.product(
        args.crops.split(","), args.threads.split(","), args.channels_last.split(",")
    )
    for crop, threads, cl in grid:
        train_args = [
            "--data-root",
            args.data_root,
            "--folds",
            "1",
            "--batch-size",
            str(args.batch_size),
            "--crop-seconds",
            crop,
            "--threads",
            threads,
            "--device",
            "cpu",
            "--out-dir",
            "/tmp/throughput",
        ]
        if cl == "0":
            train_args.append("--no-channels-last")
        result = measure(train_args, args.steps)
        result.update(threads=int(threads), channels_last=cl == "1")
        rows.append(result)
        print(json.dumps(result), flush=True)
    best_full = max((r for r in rows if r["crop_seconds"] == 0), key=lambda r: r["clips_per_s"])
    cost = {}
    if Path(args.cv_report).is_file():
        rep = json.loads(Path(args.cv_report).read_text())
        epochs = rep["epochs"]
        clips = next(iter(rep["variants"].values()))["clips"]
        k = rep["k"]
        # k fold runs on (k-1)/k of the clips each, plus the final run on all of them
        clip_steps = epochs * clips * ((k - 1) + 1)
        cost = {
            "epochs": epochs,
            "clip_steps": clip_steps,
            "hours_at_best_full_clip_rate": clip_steps / best_full["clips_per_s"] / 3600,
            "final_run_only_hours": epochs * clips / best_full["clips_per_s"] / 3600,
        }
    report = {
        "cpu": rows[0]["device"],
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m train throughput-report " + " ".join(argv),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "rows": rows,
        "shipped_schedule_cost": cost,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# Training throughput: {report['cpu']}",
        "",
        f"- command: `{report['command']}` ({report['date']}, batch {args.batch_size}, "
        f"{args.steps} timed steps after 3 warm-up steps, full ResNet-34, real clips)",
        "",
        "| crop s (0: whole clip) | threads | channels_last | clips/s | s/step |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['crop_seconds']} | {r['threads']} | {r['channels_last']} | "
        f"{r['clips_per_s']:.2f} | {r['step_s']:.2f} |"
        for r in rows
    ]
    if cost:
        lines += [
            "",
            f"The shipped schedule ({cost['epochs']} epochs, 4 folds + the final run, "
            f"{cost['clip_steps']:,} clip-steps) at the best whole-clip rate: "
            f"**{cost['hours_at_best_full_clip_rate']:.0f} hours** here; the final run "
            f"alone {cost['final_run_only_hours']:.0f} hours.",
        ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
