"""File helpers without torch (the TensorRT builder and runtime run where torch may be absent)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import ExportError


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def writable_path(path: str | Path) -> Path:
    """`path` with its folder created; ExportError when it cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(path.name + ".probe")
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from None
    return path
