"""Fetch the official ESC-50 archive, verify it and lay it out as `meta/esc50.csv` + `audio/`."""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from .data import DataError, read_metadata

DEFAULT_URL = "https://github.com/karolpiczak/ESC-50/archive/master.zip"
EXPECTED_CLIPS = 2000


class DownloadError(RuntimeError):
    """The archive could not be fetched, did not verify, or is not ESC-50."""


def fetch(url: str, dest: Path, chunk: int = 1 << 20) -> str:
    """Stream `url` to `dest`; returns the sha256 of what was written."""
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
            total, done = int(r.headers.get("Content-Length") or 0), 0
            while block := r.read(chunk):
                f.write(block)
                h.update(block)
                done += len(block)
                if total and sys.stderr.isatty():
                    print(f"\r{done / 2**20:.0f}/{total / 2**20:.0f} MiB", end="", file=sys.stderr)
    except OSError as e:  # URLError is an OSError
        raise DownloadError(f"cannot fetch {url}: {e}") from None
    return h.hexdigest()


def extract(archive: Path, dest: Path) -> int:
    """Copy `*/meta/esc50.csv` and `*/audio/*` out of the zip into dest; returns clip count."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise DownloadError(f"{archive} is not a zip archive") from None
    with zf:
        bad = zf.testzip()
        if bad is not None:
            raise DownloadError(f"archive member {bad} is corrupt (CRC mismatch)")
        names = zf.namelist()
        csvs = [n for n in names if n.endswith("meta/esc50.csv")]
        if not csvs:
            raise DownloadError("archive has no meta/esc50.csv: not an ESC-50 archive")
        prefix = csvs[0][: -len("meta/esc50.csv")]
        audio = [n for n in names if n.startswith(prefix + "audio/") and not n.endswith("/")]
        (dest / "meta").mkdir(parents=True, exist_ok=True)
        (dest / "audio").mkdir(parents=True, exist_ok=True)
        for name, target in [(csvs[0], dest / "meta" / "esc50.csv")] + [
            (n, dest / "audio" / Path(n).name) for n in audio
        ]:
            with zf.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    return len(audio)


def download_esc50(
    dest: str | Path,
    url: str = DEFAULT_URL,
    sha256: str | None = None,
    expected_clips: int = EXPECTED_CLIPS,
) -> dict:
    """Download, verify (sha256 when given, zip CRCs, every CSV row present) and extract."""
    dest = Path(dest)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "esc50.zip"
        digest = fetch(url, archive)
        if sha256 and digest != sha256.lower():
            raise DownloadError(f"sha256 mismatch: got {digest}, expected {sha256}")
        n_audio = extract(archive, dest)
    try:
        rows = read_metadata(dest)
    except DataError as e:
        raise DownloadError(str(e)) from None
    on_disk = {p.stem for p in (dest / "audio").iterdir()}
    missing = [r["filename"] for r in rows if Path(r["filename"]).stem not in on_disk]
    if missing or len(rows) != expected_clips:
        raise DownloadError(
            f"incomplete archive: {len(rows)} rows in esc50.csv (expected {expected_clips}), "
            f"{len(missing)} clips missing (first: {missing[:3]})"
        )
    return {"dest": str(dest), "sha256": digest, "clips": n_audio, "rows": len(rows)}
