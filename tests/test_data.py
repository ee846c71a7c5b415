"""Loading ESC-50 clips: real ones when present, generated ones always; errors name the problem."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from synth import tone

from train import data as D
from train.frontend import CLIP_SAMPLES

ESC10_TARGETS = {0, 1, 10, 11, 12, 20, 21, 38, 40, 41}  # dog, rooster, rain, sea waves, ...


def test_real_clips_load_in_every_format(esc50_root):
    """One clip of each format on disk (the official download: WAV; the local copy: FLAC and
    Ogg) decodes to a 5-s float32 clip."""
    sel = D.select(esc50_root)
    first = {}
    for clip in sel.clips:
        first.setdefault(clip.path.suffix, clip)
    on_disk = {p.suffix for p in D.index_audio(esc50_root / "audio").values()}
    assert set(first) == on_disk
    for suffix in sorted(first):
        x = D.load_clip(first[suffix].path)
        assert x.shape == (CLIP_SAMPLES,) and x.dtype == np.float32
        assert np.isfinite(x).all() and np.abs(x).max() > 0


def test_real_copy_counts_clips_on_disk_and_missing(esc50_root):
    """Full download or partial copy: the clips are the CSV's rows found on disk, the rest are
    counted missing, and ESC-10 is the CSV's esc10 rows among them (counts from the CSV and
    the folder, not from one copy)."""
    rows = D.read_metadata(esc50_root)
    on_disk = set(D.index_audio(esc50_root / "audio"))
    stems = {Path(r["filename"]).stem: r for r in rows}
    sel = D.select(esc50_root)
    assert len(rows) == 2000 and len(sel.labels) == 50  # the metadata lists all of ESC-50
    assert {c.stem for c in sel.clips} == set(stems) & on_disk
    assert sorted(sel.missing) == sorted(set(stems) - on_disk)
    folds = sorted({c.fold for c in sel.clips})
    esc10 = D.select(esc50_root, folds=folds, esc10=True)
    want = {s for s, r in stems.items() if r["esc10"] == "True" and s in on_disk}
    assert {c.stem for c in esc10.clips} == want
    assert {c.target for c in esc10.clips} == ESC10_TARGETS


def test_synthetic_selection_and_labels(synthetic_esc50):
    sel = D.select(synthetic_esc50)
    assert len(sel.clips) == 12 and sel.labels == ["dog", "rain", "siren"]
    assert {c.path.suffix for c in sel.clips} == {".wav", ".flac", ".ogg"}
    assert len(D.select(synthetic_esc50, folds=[1]).clips) == 6


def test_clips_are_cut_and_padded(tmp_path):
    """Decoding is contract.audio's (test_audio_reader.py); a clip is cut or zero-padded to 5 s."""
    sf.write(tmp_path / "long.wav", tone(440, 7.0, sr=48000), 48000)
    sf.write(tmp_path / "short.flac", tone(440, 1.0, sr=8000), 8000)
    long_ = D.load_clip(tmp_path / "long.wav")
    short = D.load_clip(tmp_path / "short.flac")
    assert long_.shape == short.shape == (CLIP_SAMPLES,)
    assert np.abs(long_[-100:]).max() > 0  # cut from 7 s: audio to the end
    assert np.abs(short[44100 + 100 :]).max() == 0  # 1 s of audio, then zero padding


def test_missing_clips_are_counted_not_fatal(synthetic_esc50, tmp_path):
    root = tmp_path / "partial"
    shutil.copytree(synthetic_esc50, root)
    victims = sorted((root / "audio").iterdir())[:3]
    for p in victims:
        p.unlink()
    sel = D.select(root)
    assert len(sel.clips) == 9
    assert sorted(sel.missing) == sorted(p.stem for p in victims)


def test_clear_errors(synthetic_esc50, tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.select(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="esc50.csv not found"):
        D.select(tmp_path / "empty")
    with pytest.raises(D.DataError, match="no clips of folds 5 .* the folds there are 1, 2"):
        D.select(synthetic_esc50, folds=[5])
    bad = tmp_path / "1-1-A-0.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(D.DataError, match="1-1-A-0.wav"):
        D.load_clip(bad)


def test_holdout_split_keeps_sources_together_and_covers_classes(synthetic_esc50):
    clips = D.select(synthetic_esc50).clips
    train, val = D.split_holdout(clips, 0.25, seed=0)
    assert len(train) + len(val) == len(clips)
    assert {c.src_file for c in train}.isdisjoint({c.src_file for c in val})
    assert {c.target for c in val} == {0, 1, 2}
    assert D.split_holdout(clips, 0.25, seed=0) == (train, val)  # deterministic


def test_real_holdout_has_no_source_leakage(esc50_root):
    train, val = D.split_holdout(D.select(esc50_root).clips, 0.2, seed=0)
    assert {c.src_file for c in train}.isdisjoint({c.src_file for c in val})
    assert 0.15 < len(val) / (len(train) + len(val)) < 0.25
