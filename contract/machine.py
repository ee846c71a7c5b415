"""The CPU a figure was measured on, named the way reports write it (`lscpu | grep 'Model name'`).
Shared by training (its device name), the benchmark and the soak report; torch-free."""

from __future__ import annotations

import os
import platform
import subprocess
from functools import cache
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_field(name: str) -> str | None:
    """The first `name : value` of /proc/cpuinfo (Linux), None where there is none."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


@cache
def cpu_model() -> str:
    """'AMD EPYC 7B13', 'Intel(R) Xeon(R) Processor', ...: /proc/cpuinfo's model name on x86,
    lscpu's Model name where cpuinfo has none (Arm), else what the platform module says."""
    found = _cpuinfo_field("model name")
    if found:
        return found
    try:
        out = subprocess.run(
            ["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}
        ).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The instruction-set flags /proc/cpuinfo lists (x86: 'flags', Arm: 'Features')."""
    return set((_cpuinfo_field("flags") or _cpuinfo_field("Features") or "").split())
