"""Your own sounds: a labelled folder -> checked data -> fine-tuned, estimated, exported and
published version, in miniature (generated classes, a tiny base CNN, one epoch)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from synth import SR, tone

from train.data import DataError
from train.folder_data import (
    FolderSelection,
    mean_by_clip,
    select_folder,
    split_groups,
    split_holdout_groups,
    window_starts,
)
from train.publish import PublishError, next_version, publish, staging, versions

CLASSES = {"low_hum": 220.0, "mid-beep": 880.0, "high.whistle": 3520.0}


def make_folder(root: Path, per_class: int = 4, seconds=(5.0,)) -> Path:
    """DATA/<label>/<clip> with a tone per class; lengths cycle through `seconds`; formats and
    rates vary (the reader resamples and downmixes)."""
    formats = [("wav", "PCM_16", SR), ("flac", "PCM_24", 48000), ("ogg", "VORBIS", 22050)]
    for c, (label, freq) in enumerate(CLASSES.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext, subtype, rate = formats[(c + i) % len(formats)]
            secs = seconds[i % len(seconds)]
            x = tone(freq * (1 + 0.03 * i), secs, sr=rate, seed=10 * c + i)
            if i % 2:  # stereo: the reader downmixes
                x = np.stack([x, x], axis=1)
            sf.write(root / label / f"clip{i}.{ext}", x, rate, subtype=subtype)
    return root


# --------------------------------------------------------------------------- data


def test_windows_are_the_services(tmp_path):
    """Clips up to 5.1 s are one window (padded); longer ones get the service's windows."""
    from service.audio import SINGLE_WINDOW_SLACK_S
    from service.audio import window_starts as service_windows
    from service.settings import Settings

    hop = round(Settings().window_hop_s * SR)
    for seconds in (0.3, 4.0, 5.0, 5.05, 5.2, 7.5, 12.0, 31.3):
        n = int(seconds * SR)
        assert window_starts(n) == service_windows(
            n, 5 * SR, hop, int(SINGLE_WINDOW_SLACK_S * SR)
        ), seconds


def test_folder_layout_pads_short_clips_and_windows_long_ones(tmp_path):
    root = make_folder(tmp_path / "data", per_class=3, seconds=(2.0, 5.0, 12.0))
    (root / "low_hum" / "notes.txt").write_text("not audio")
    (root / ".DS_Store").write_text("")
    sel = select_folder(root)
    assert isinstance(sel, FolderSelection)
    assert sel.labels == sorted(CLASSES)
    assert sel.files == 9 and sel.padded == 3 and sel.windowed == 3
    # 12 s -> windows at 0, 2.5, 5 s and one at the end (7 s): 4 windows of the 3 long files
    assert len(sel.clips) == 3 * (1 + 1 + 4)
    last = [c for c in sel.clips if c.stem.endswith("#3")]  # resampled: within 10 ms of 7 s
    assert len(last) == 3 and all(abs(c.offset - 7 * SR) < SR // 100 for c in last)
    assert all(c.src_file == c.stem.split("#")[0] for c in sel.clips)  # a file is its group
    assert any("1 .txt" in n for n in sel.notes)

    from train.data import load_waveforms

    waves = load_waveforms(sel.clips[:6])
    assert waves.shape == (6, 5 * SR)
    short = next(i for i, c in enumerate(sel.clips[:6]) if c.path.stem == "clip0")
    assert np.abs(waves[short, int(2.1 * SR) :]).max() == 0  # 2-s clip zero-padded


def test_every_problem_is_listed_at_once(tmp_path):
    root = make_folder(tmp_path / "data", per_class=2)
    (root / "lonely").mkdir()
    sf.write(root / "lonely" / "only.wav", tone(440, 1.0), SR)
    (root / "bad label!").mkdir()
    for i in range(2):
        sf.write(root / "bad label!" / f"x{i}.wav", tone(300, 1.0), SR)
    (root / "low_hum" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    (root / "mid-beep" / "empty.flac").write_bytes(b"")
    with pytest.raises(DataError) as e:
        select_folder(root)
    msg = str(e.value)
    assert "classes with fewer than 2 readable clips: lonely (1)" in msg
    assert "label names that are not valid names" in msg and "'bad label!'" in msg
    assert "unreadable files" in msg
    assert "low_hum/broken.wav" in msg and "mid-beep/empty.flac" in msg


def test_labels_csv_groups_stay_whole_across_classes(tmp_path):
    """A group (one speaker saying several words) never straddles a split, whatever class."""
    root = tmp_path / "data"
    root.mkdir()
    rows = []
    for speaker in range(6):
        for label, freq in CLASSES.items():
            name = f"s{speaker}_{label}.wav"
            sf.write(root / name, tone(freq, 1.0, seed=speaker), SR)
            rows.append({"filename": name, "label": label, "group": f"speaker{speaker}"})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filename", "label", "group"])
        w.writeheader()
        w.writerows(rows)
    sf.write(root / "unlisted.wav", tone(100, 1.0), SR)  # labels.csv is the list: ignored
    sel = select_folder(root)
    assert sel.layout == "labels.csv" and sel.files == 18
    seen = []
    for i in range(3):
        train, val = split_groups(sel.clips, 3, i, seed=0)
        assert {c.src_file for c in train}.isdisjoint({c.src_file for c in val})
        assert {c.category for c in val} == set(CLASSES)
        seen += [c.stem for c in val]
    assert sorted(seen) == sorted(c.stem for c in sel.clips)
    train, val = split_holdout_groups(sel.clips, 0.2, seed=0)
    assert {c.src_file for c in train}.isdisjoint({c.src_file for c in val})
    assert 1 <= len({c.src_file for c in val}) <= 2  # 6 speakers in 5 parts: part 0 has 1-2


def test_labels_csv_fold_column_and_its_errors(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rows = []
    for i in range(4):
        for label, freq in CLASSES.items():
            sf.write(root / f"{label}{i}.wav", tone(freq, 1.0, seed=i), SR)
            rows.append({"filename": f"{label}{i}.wav", "label": label, "fold": i % 2 + 1})
    rows.append({"filename": "missing.wav", "label": "low_hum", "fold": 1})
    path = root / "labels.csv"

    def write(rows):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["filename", "label", "fold"])
            w.writeheader()
            w.writerows(rows)

    write(rows)
    with pytest.raises(DataError, match=r"unreadable files: .*missing.wav: no such file"):
        select_folder(root)
    write(rows[:-1])
    sel = select_folder(root)
    assert sel.fixed_folds
    train, val = split_groups(sel.clips, 2, 1, seed=0)
    assert {c.fold for c in val} == {2} and {c.fold for c in train} == {1}
    with pytest.raises(DataError, match="pass --folds 2"):
        split_groups(sel.clips, 3, 0, seed=0)


def test_windows_are_scored_as_the_mean_of_their_probabilities():
    stems = ["a.wav#0", "a.wav#1", "b.wav"]
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    names, mean, y = mean_by_clip(stems, probs, np.array([0, 0, 1]))
    assert names == ["a.wav", "b.wav"]
    np.testing.assert_allclose(mean, [[0.55, 0.45], [0.3, 0.7]])
    assert y.tolist() == [0, 1]


# --------------------------------------------------------------------------- publication


def stage_version(repo: Path, name: str, text: str) -> Path:
    with staging(repo, name) as folder:
        (folder / "model.onnx").write_text(text)
        return publish(folder)


def test_versions_increment_and_staging_is_never_a_version(tmp_path):
    repo = tmp_path / "repo"
    assert stage_version(repo, "mine", "a") == repo / "mine" / "1"
    half = repo / "mine" / ".tmp-crashed"  # a publisher that died half-way
    half.mkdir()
    (half / "model.onnx").write_text("half")
    assert stage_version(repo, "mine", "b") == repo / "mine" / "2"
    assert versions(repo / "mine") == [1, 2] and next_version(repo / "mine") == 3
    assert (repo / "mine" / "2" / "model.onnx").read_text() == "b"
    # a failure while the version is written leaves neither a version nor its staging folder
    with pytest.raises(RuntimeError), staging(repo, "mine") as folder:
        (folder / "model.onnx").write_text("c")
        raise RuntimeError("export failed")
    assert versions(repo / "mine") == [1, 2]
    assert sorted(p.name for p in (repo / "mine").iterdir()) == [".tmp-crashed", "1", "2"]
    with pytest.raises(PublishError, match="not valid"):
        stage_version(repo, "../escape", "x")


def test_publish_skips_a_number_taken_meanwhile(tmp_path, monkeypatch):
    """Two publishers at once: the one that loses the race takes the next number."""
    import train.publish as P

    repo = tmp_path / "repo"
    with staging(repo, "mine") as folder:
        (folder / "model.onnx").write_text("mine")
        real = P.next_version
        calls = []

        def racing(model_dir):
            n = real(model_dir)
            if not calls:  # another publisher renames into this number first
                (model_dir / str(n)).mkdir()
                (model_dir / str(n) / "model.onnx").write_text("theirs")
            calls.append(n)
            return n

        monkeypatch.setattr(P, "next_version", racing)
        assert publish(folder) == repo / "mine" / "2"
    assert (repo / "mine" / "1" / "model.onnx").read_text() == "theirs"


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_finetune_publishes_a_version_a_running_service_serves(
    tmp_path, tiny_checkpoint, tiny_onnx, capsys
):
    """The whole command on generated classes with a tiny base CNN: estimate, calibration,
    final fit, int8 + explain export, verification, card, publication; a service already
    running on the repository (polling, as compose and Kubernetes run it) serves the new
    version without a restart, through /v1/models/<name>/classify and the v2 protocol; then the
    evaluation of the final checkpoint on a labelled folder."""
    import shutil

    import httpx
    import tritonclient.http as triton_http
    from servers import serve

    from contract.metadata import ExplainOutputs, read_onnx_metadata
    from service.settings import Settings
    from train.finetune import main

    data = make_folder(tmp_path / "data", per_class=5, seconds=(3.0, 5.0, 9.0))
    repo = tmp_path / "repo"
    (repo / "mine" / "1").mkdir(parents=True)  # an earlier version (another model): this is 2
    shutil.copy(tiny_onnx, repo / "mine" / "1" / "model.onnx")
    args = ["--data", str(data), "--name", "mine", "--repository", str(repo)]
    args += ["--base", str(tiny_checkpoint), "--epochs", "2", "--batch-size", "8"]
    args += ["--work-dir", str(tmp_path / "work"), "--device", "cpu", "--threads", "2"]
    args += ["--freeze-stages", "1", "--report", str(tmp_path / "report.md")]
    served = Settings(model_repository=repo, repository_poll_s=0.2, intra_op_threads=1)
    clip = next((data / "mid-beep").iterdir()).read_bytes()
    with serve(served) as base:
        assert main(args) == 0
        for _ in range(300):  # the poller loads the new folder and retires version 1
            listing = httpx.get(f"{base}/v1/models").json()
            if [m["version"] for m in listing["models"]] == ["2"]:
                break
            time.sleep(0.2)
        r = httpx.post(f"{base}/v1/models/mine/classify", content=clip, timeout=60)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["model"]["name"] == "mine" and answer["model"]["version"] == "2"
        assert {p["label"] for p in answer["predictions"]} <= set(CLASSES)
        client = triton_http.InferenceServerClient(base.removeprefix("http://"))
        audio = triton_http.InferInput("audio", [1], "BYTES")
        audio.set_data_from_numpy(np.array([clip], dtype=object))
        v2 = client.infer("mine", [audio]).as_numpy("probabilities")[0]
        top = answer["predictions"][0]
        assert int(v2.argmax()) == top["index"]
        assert v2[top["index"]] == pytest.approx(top["probability"], abs=1e-6)
    out = capsys.readouterr().out
    assert f"published {repo / 'mine' / '2'}" in out and "estimate (grouped held-out" in out

    version = repo / "mine" / "2"
    assert sorted(p.name for p in version.iterdir()) == [
        "MODEL_CARD.md",
        "explain.onnx",
        "model.onnx",
        "verify.json",
    ]
    assert not [p for p in (repo / "mine").iterdir() if p.name.startswith(".tmp-")]
    meta = read_onnx_metadata(version / "model.onnx")  # validates, as the service does
    assert meta.model_name == "mine" and meta.variant == "int8"
    assert meta.labels == sorted(CLASSES)
    summary = json.loads((tmp_path / "work" / "finetune.json").read_text())
    assert meta.temperature == pytest.approx(summary["estimate"]["temperature"])
    assert meta.temperature != 1.0
    explain = read_onnx_metadata(version / "explain.onnx")
    assert explain.labels == sorted(CLASSES) and ExplainOutputs.from_metadata(explain).stages
    verify = json.loads((version / "verify.json").read_text())
    assert verify["passed"] and verify["variants"]["int8"]["path"] == "model.onnx"
    assert summary["estimate"]["clips"] == 3  # one file per class held out (1 part of 5)
    assert summary["data"]["windowed_files"] == 3 and summary["data"]["padded_files"] == 6
    card = (version / "MODEL_CARD.md").read_text()
    assert "grouped held-out split" in card and f"T = {meta.temperature:.3f}" in card
    assert "| true \\ predicted |" in card and "CC BY-NC 3.0" in card
    assert "amp: **" in card and "windows/s" in card and "frozen: stem, stage1" in card
    report = (tmp_path / "report.md").read_text()
    assert (
        "load average" in report and summary["device"] in report and "## The model card" in report
    )

    from train.__main__ import main as train_main

    final = tmp_path / "work" / "final" / "final.pt"
    reports = tmp_path / "reports"
    assert (
        train_main(["evaluate", str(final), "--data-root", str(data), "--out-dir", str(reports)])
        == 0
    )
    report = json.loads((reports / "evaluation.json").read_text())
    assert report["n"] == 15  # clips, not windows
    assert [r["label"] for r in report["per_class"]] == sorted(CLASSES)
    assert "| true \\ predicted |" in (reports / "evaluation.md").read_text()


def test_finetune_refuses_bad_data_before_training(tmp_path, tiny_checkpoint, capsys):
    from train.finetune import main

    data = make_folder(tmp_path / "data", per_class=2)
    (data / "lonely").mkdir()
    sf.write(data / "lonely" / "one.wav", tone(440, 1.0), SR)
    args = ["--data", str(data), "--name", "mine", "--repository", str(tmp_path / "repo")]
    assert main([*args, "--base", str(tiny_checkpoint)]) == 2
    assert "lonely (1)" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()
    assert main([*args[:2], "--name", "no spaces", *args[4:]]) == 2
    assert "model name 'no spaces' is not valid" in capsys.readouterr().err


def test_start_from_loads_the_base_freezes_early_stages_and_a_2_step_run_trains(
    tmp_path, tiny_checkpoint, synthetic_esc50
):
    """`init_from` + `freeze_stages` through train.train itself, on a run of exactly 2 steps
    (OneCycleLR once divided by a 0-step warm-up there)."""
    import torch

    from train.checkpoint import load_checkpoint
    from train.finetune import base_model_config
    from train.train import TrainConfig, train

    cfg = TrainConfig(
        data_root=str(synthetic_esc50),
        val_fraction=0,
        epochs=1,
        batch_size=6,  # 12 clips: 2 steps
        device="cpu",
        ema_decay=0,
        init_from=str(tiny_checkpoint),
        freeze_stages=1,
        model=base_model_config(str(tiny_checkpoint)),
        out_dir=str(tmp_path / "run"),
    )
    final = load_checkpoint(train(cfg))
    base = load_checkpoint(tiny_checkpoint)
    assert final["init_from"]["frozen"] == ["stem", "stage1"]
    assert final["init_from"]["head"] == "new" and final["labels"] == ["dog", "rain", "siren"]
    new, old = final["state_dict"], base["state_dict"]
    for key in old:
        if key.startswith(("cnn.stem.0.", "cnn.stages.0.")) and key.endswith("weight"):
            assert torch.equal(new[key], old[key].float()), key  # frozen: not moved
    assert not torch.equal(new["cnn.stages.1.0.conv1.weight"], old["cnn.stages.1.0.conv1.weight"])
    assert new["cnn.fc.weight"].shape == (3, 16)


def test_a_temperature_that_runs_to_its_bound_is_not_published():
    """Perfectly separated held-out logits: the likelihood rises as T falls, the fit stops at
    the grid's edge; T = 1 is kept rather than a claim of certainty about everything."""
    from train.calibration import fit_temperature
    from train.finetune import identifiable_temperature

    y = np.arange(40) % 4
    separated = np.eye(4)[y] * 6.0
    assert fit_temperature(separated, y) < 0.06  # what the bare fit says
    assert identifiable_temperature(separated, y) == 1.0
    rng = np.random.default_rng(0)
    noisy = separated * 2 + rng.normal(size=separated.shape) * 6  # over-confident, some wrong
    t = identifiable_temperature(noisy, y)
    assert t == pytest.approx(fit_temperature(noisy, y)) and 0.05 < t < 20 and t != 1.0


def test_clips_the_base_trained_on_are_counted(tmp_path):
    """ESC-10 laid out as a folder links to the base's own training clips: the card says so."""
    from train.finetune import heard_by_base

    data = make_folder(tmp_path / "esc", per_class=2)
    linked = make_folder(tmp_path / "linked", per_class=0)
    clips = sorted(f for f in data.rglob("*") if f.is_file())
    for f in clips[:4]:
        (linked / f.parent.name / f.name).symlink_to(f)
    for label, freq in CLASSES.items():  # and two clips of the user's own per class
        for i in range(2):
            sf.write(linked / label / f"own{i}.wav", tone(freq, 1.0, seed=i), SR)
    sel = select_folder(linked)
    held_out = clips[0].stem
    base = {"data": {"root": str(data), "val_stems": [held_out]}}
    # 4 linked: {high.whistle,low_hum}/{clip0,clip1}; the base held out stem "clip0" (2 of them)
    assert heard_by_base(sel, base) == 2
    assert heard_by_base(sel, {"data": {"root": str(data), "val_stems": []}}) == 4
    assert heard_by_base(sel, {"data": {"clips": 0}}) == 0
