"""Publication into the model repository: `<repository>/<name>/<version>/`, Triton's layout.

A version is written whole into a hidden staging folder `<repository>/<name>/.tmp-XXXX/` beside
the versions, then renamed to the next number (the highest numeric version + 1, or 1). A rename
within one file system is atomic: a service polling the repository sees no version folder, or a
complete one, never a half-written one. The staging folder is removed when anything fails, and
a name that is not a number is never taken for a version, so a crashed publisher leaves nothing
a service would load.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .folder_data import NAME_RE, NAME_RULE

STAGING_PREFIX = ".tmp-"
# what a version folder holds (common.md; the service reads model.onnx, explain.onnx)
VERSION_FILES = ("model.onnx", "explain.onnx", "verify.json", "MODEL_CARD.md")


class PublishError(ValueError):
    """The repository or the model name cannot take a new version."""


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise PublishError(f"model name {name!r} is not valid: {NAME_RULE}")
    return name


def versions(model_dir: Path) -> list[int]:
    """The numeric version folders of a model, ascending (staging and other names ignored):
    the service's rule (service/repository.py), so "01" counts as 1 here too."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name)
    )


def next_version(model_dir: Path) -> int:
    return (versions(model_dir) or [0])[-1] + 1


@contextlib.contextmanager
def staging(repository: str | Path, name: str) -> Iterator[Path]:
    """A hidden folder beside the model's versions to write a version into; removed when the
    block fails or when it ends without `publish` having renamed it."""
    model_dir = Path(repository) / check_name(name)
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PublishError(f"cannot create {model_dir}: {e.strerror}") from None
    folder = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=model_dir))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # gone already once published


def publish(folder: Path, attempts: int = 100) -> Path:
    """Rename a complete staging folder to its model's next version; the version's path.

    Another publisher may take a number first: the rename then fails (the target exists and
    is not empty) and the next number is tried."""
    missing = [f for f in ("model.onnx",) if not (folder / f).is_file()]
    if missing:
        raise PublishError(f"{folder} lacks {', '.join(missing)}: nothing to publish")
    _sync(folder)
    model_dir = folder.parent
    for _ in range(attempts):
        target = model_dir / str(next_version(model_dir))
        try:
            os.rename(folder, target)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue
            raise PublishError(f"cannot publish {target}: {e.strerror}") from None
        _sync_dir(model_dir)
        return target
    raise PublishError(f"no free version number in {model_dir} after {attempts} attempts")


def _sync(folder: Path) -> None:
    """Files on disk before the rename makes them visible (a crash leaves no empty model)."""
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _sync_dir(folder)


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
