"""`python -m export.bench`: ONNX Runtime CPU latency of each variant at a few batch sizes.

Median of `--repeats` timed runs after one warm-up, on random waveforms (timing does not depend
on the content). Prints one JSON object per (variant, batch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .metadata import INPUT_NAME, read_onnx_metadata


def time_session(path: Path, batch: int, repeats: int, threads: int) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    n = read_onnx_metadata(path).clip_samples
    x = np.random.default_rng(0).standard_normal((batch, n), dtype=np.float32) * 0.1
    sess.run(None, {INPUT_NAME: x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {INPUT_NAME: x})
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.bench", description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path, help="ONNX files")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: all cores)")
    args = p.parse_args(argv)
    for path in args.models:
        for b in (int(s) for s in args.batches.split(",")):
            sec = time_session(path, b, args.repeats, args.threads)
            print(
                json.dumps(
                    {
                        "model": path.name,
                        "batch": b,
                        "median_ms": round(sec * 1e3, 1),
                        "clips_per_s": round(b / sec, 1),
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
