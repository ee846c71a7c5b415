"""Which real clips an export uses: training clips calibrate, held-out clips verify."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from train.data import Clip, select


def spread(clips: list[Clip], n: int) -> list[Clip]:
    """Up to n clips taken round-robin over classes (stable order): every class early on."""
    by_class: dict[int, list[Clip]] = defaultdict(list)
    for c in sorted(clips, key=lambda c: (c.target, c.stem)):
        by_class[c.target].append(c)
    out: list[Clip] = []
    queues = [by_class[t] for t in sorted(by_class)]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def calibration_clips(data_root: str | Path, val_stems: list[str], n: int) -> list[Clip]:
    """n training clips (never a validation clip of the checkpoint), spread over classes."""
    held_out = set(val_stems)
    return spread([c for c in select(data_root).clips if c.stem not in held_out], n)


def verification_clips(
    data_root: str | Path, val_stems: list[str], n: int
) -> tuple[list[Clip], str]:
    """Up to n held-out clips when the checkpoint names them, else clips it may have trained on.

    Returns the clips and a sentence saying which they are (it goes into the report).
    """
    clips = select(data_root).clips
    held_out = set(val_stems)
    val = [c for c in clips if c.stem in held_out]
    if val:
        chosen = spread(val, n)
        return (
            chosen,
            f"{len(chosen)} of the checkpoint's {len(val)} held-out validation clips present",
        )
    chosen = spread(clips, n)
    return chosen, (
        f"{len(chosen)} clips spread over classes; the checkpoint names no held-out clips, so "
        "these may be training clips (accuracy is optimistic; parity figures are unaffected)"
    )
