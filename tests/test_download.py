"""The ESC-50 download command, against a small local archive (no internet here)."""

import hashlib
import zipfile

import pytest

from train.__main__ import main
from train.download import DownloadError, download_esc50


def make_archive(src, path, drop: int = 0):
    """Zip a dataset folder the way GitHub does: everything under ESC-50-master/."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(src / "meta" / "esc50.csv", "ESC-50-master/meta/esc50.csv")
        for p in sorted((src / "audio").iterdir())[drop:]:
            zf.write(p, f"ESC-50-master/audio/{p.name}")
        zf.writestr("ESC-50-master/README.md", "ESC-50")
    return path


def test_download_extracts_and_verifies(synthetic_esc50, tmp_path):
    archive = make_archive(synthetic_esc50, tmp_path / "a.zip")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    info = download_esc50(tmp_path / "out", archive.as_uri(), sha256=digest, expected_clips=12)
    assert info["clips"] == 12 and info["sha256"] == digest
    assert (tmp_path / "out" / "meta" / "esc50.csv").is_file()
    assert len(list((tmp_path / "out" / "audio").iterdir())) == 12


def test_download_rejects_bad_archives(synthetic_esc50, tmp_path):
    archive = make_archive(synthetic_esc50, tmp_path / "a.zip")
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download_esc50(tmp_path / "o1", archive.as_uri(), sha256="0" * 64, expected_clips=12)
    partial = make_archive(synthetic_esc50, tmp_path / "p.zip", drop=2)
    with pytest.raises(DownloadError, match="2 clips missing"):
        download_esc50(tmp_path / "o2", partial.as_uri(), expected_clips=12)
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(DownloadError, match="not a zip"):
        download_esc50(tmp_path / "o3", (tmp_path / "junk.zip").as_uri())
    corrupt = bytearray(archive.read_bytes())
    corrupt[200:260] = b"\x00" * 60  # inside the first member's data
    (tmp_path / "crc.zip").write_bytes(bytes(corrupt))
    with pytest.raises(DownloadError):
        download_esc50(tmp_path / "o4", (tmp_path / "crc.zip").as_uri(), expected_clips=12)


def test_download_cli_unreachable_url_is_one_line_error(tmp_path, capsys):
    rc = main(["download", "--dest", str(tmp_path), "--url", (tmp_path / "none.zip").as_uri()])
    assert rc == 2
    assert capsys.readouterr().err.startswith("error: cannot fetch")
