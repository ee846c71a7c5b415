"""The log-mel front-end against torch.stft, librosa and the old conv-STFT formulation, in torch
and inside every exported artifact (fp32, fp16, int8), and its batch independence."""

import math

import librosa
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from synth import tone

from contract.metadata import INPUT_NAME
from export.graph import normalisation_index
from train.frontend import CLIP_SAMPLES, FrontendConfig, LogMel, PowerSpectrum, mel_filterbank

CFG = FrontendConfig()


def reference_logmel(wave: torch.Tensor, cfg: FrontendConfig = CFG) -> torch.Tensor:
    """Same maths through torch.stft (float64) and librosa's HTK mel filters."""
    spec = torch.stft(
        wave.double(),
        cfg.n_fft,
        cfg.hop_length,
        window=torch.hann_window(cfg.n_fft, dtype=torch.float64),
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    power = spec.abs() ** 2  # B, F, T
    fb = librosa.filters.mel(
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        n_mels=cfg.n_mels,
        fmin=cfg.f_min,
        fmax=cfg.f_max,
        htk=True,
        norm=None,
    )
    mel = torch.from_numpy(fb).double() @ power
    return normalise(10 * torch.log10(torch.clamp(mel, min=cfg.amin)), cfg)


def conv_stft_logmel(wave: torch.Tensor, cfg: FrontendConfig = CFG) -> torch.Tensor:
    """The previous front-end, FP32: a Conv1d with the dense windowed DFT basis (2F, 1, n_fft)."""
    n = torch.arange(cfg.n_fft, dtype=torch.float64)
    k = torch.arange(cfg.n_freqs, dtype=torch.float64).unsqueeze(1)
    window = torch.hann_window(cfg.n_fft, periodic=True, dtype=torch.float64)
    angle = 2.0 * math.pi * k * n / cfg.n_fft
    basis = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window]).unsqueeze(1)
    x = F.pad(wave.float().unsqueeze(1), (cfg.n_fft // 2, cfg.n_fft // 2), mode="reflect")
    spec = F.conv1d(x, basis.float(), stride=cfg.hop_length)  # B, 2F, T
    power = spec[:, : cfg.n_freqs] ** 2 + spec[:, cfg.n_freqs :] ** 2
    mel = torch.matmul(mel_filterbank(cfg).T, power)
    return normalise(10.0 * torch.log10(torch.clamp(mel, min=cfg.amin)), cfg)


def normalise(db: torch.Tensor, cfg: FrontendConfig) -> torch.Tensor:
    mean = db.mean(dim=(1, 2), keepdim=True)
    std = torch.sqrt(((db - mean) ** 2).mean(dim=(1, 2), keepdim=True) + cfg.norm_eps)
    return ((db - mean) / std).unsqueeze(1)


def signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "noise": (0.1 * rng.standard_normal(CLIP_SAMPLES)).astype(np.float32),
        "tone_440": tone(440.0),
        "tone_9k_loud": tone(9000.0, amp=1.0),
        "silence": np.zeros(CLIP_SAMPLES, np.float32),
    }


def test_mel_filterbank_matches_librosa_htk():
    ours = mel_filterbank(CFG).numpy()  # F, M
    ref = librosa.filters.mel(
        sr=44100, n_fft=1024, n_mels=128, fmin=0.0, fmax=22050.0, htk=True, norm=None
    ).T
    assert ours.shape == (513, 128)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("name", list(signals()))
def test_matches_stft_reference(name):
    x = torch.from_numpy(signals()[name]).unsqueeze(0)
    ours = LogMel()(x)
    ref = reference_logmel(x).float()
    assert ours.shape == (1, 1, 128, 431)
    assert torch.isfinite(ours).all()
    # FP32 factored STFT vs float64 FFT: normalised log-mel agrees to 2e-3 (tens of mdB).
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)


@pytest.mark.parametrize("name", list(signals()))
def test_matches_the_conv_stft_front_end(name):
    """The factored DFT gives what the dense conv-STFT gave, so models trained on the old
    front-end keep their accuracy. Both are FP32: they differ by rounding in the quietest bins
    (up to 4e-4 measured, the loud 9 kHz tone's leakage floor), each within 5e-4 of float64."""
    x = torch.from_numpy(signals()[name]).unsqueeze(0)
    torch.testing.assert_close(LogMel()(x), conv_stft_logmel(x), atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "n_fft, hop, split",
    [
        (1024, 512, (32, 32)),
        (512, 128, (16, 32)),
        (400, 160, (20, 20)),
        (256, 256, (16, 16)),
        (1024, 441, (1, 1024)),
    ],
)
@pytest.mark.parametrize("samples", [CLIP_SAMPLES, 66150, 3001])
def test_power_spectrum_matches_torch_stft(n_fft, hop, split, samples):
    """Any n_fft / hop (the split falls back to one stage when they share no factor), any length
    (training crops), every bin 0..n_fft/2 found at its row."""
    cfg = FrontendConfig(n_fft=n_fft, hop_length=hop)
    spectrum = PowerSpectrum(cfg)
    assert (spectrum.n1, spectrum.n2) == split
    x = 0.1 * torch.randn(2, samples, generator=torch.Generator().manual_seed(samples))
    ours = spectrum(x)[:, spectrum.row_of_bin].double()
    window = torch.hann_window(n_fft, dtype=torch.float64)
    ref = (
        torch.stft(
            x.double(),
            n_fft,
            hop,
            window=window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        ).abs()
        ** 2
    )
    assert ours.shape == ref.shape == (2, n_fft // 2 + 1, 1 + samples // hop)
    assert (ours - ref).abs().max() <= 1e-5 * ref.max()


def test_any_length_matches_the_conv_stft_front_end():
    x = 0.1 * torch.randn(3, 44100 + 17, generator=torch.Generator().manual_seed(1))
    ours = LogMel()(x)
    assert ours.shape == (3, 1, 128, 1 + x.shape[1] // 512)
    torch.testing.assert_close(ours, conv_stft_logmel(x), atol=1e-3, rtol=0)


def test_silence_is_finite_and_zero():
    out = LogMel()(torch.zeros(2, CLIP_SAMPLES))
    assert torch.isfinite(out).all()
    assert out.abs().max() == 0  # every bin at the floor -> normalises to 0


def test_batch_does_not_change_result():
    sig = signals()
    alone = LogMel()(torch.from_numpy(sig["tone_440"]).unsqueeze(0))
    batch = torch.from_numpy(
        np.stack([sig["noise"], sig["tone_440"], sig["silence"], sig["tone_9k_loud"]])
    )
    together = LogMel()(batch)
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=0)


def test_rejects_unsupported_config():
    with pytest.raises(ValueError, match="unsupported"):
        LogMel(FrontendConfig(mel_scale="slaney"))


# --------------------------------------------------------------------------- exported artifacts


@pytest.fixture(scope="module")
def artifacts(tiny_onnx, tmp_path_factory) -> dict[str, str]:
    """The tiny model as fp32, fp16 and int8 ONNX (the real exporter and quantiser)."""
    from contract.metadata import read_onnx_metadata
    from export.onnx_export import export_onnx
    from export.quantize import quantize_int8
    from train.checkpoint import load_checkpoint, model_from_checkpoint

    meta = read_onnx_metadata(tiny_onnx)
    out = tmp_path_factory.mktemp("frontend")
    ckpt = load_checkpoint(tiny_onnx.with_name("tiny.pt"))
    fp16 = export_onnx(model_from_checkpoint(ckpt), out / "tiny.fp16.onnx", meta, "fp16")
    calib = np.stack(list(signals().values()))
    int8 = quantize_int8(tiny_onnx, out / "tiny.int8.onnx", calib, meta)
    return {"fp32": str(tiny_onnx), "fp16": str(fp16), "int8": str(int8)}


def run_frontend(path: str, x: np.ndarray) -> np.ndarray:
    """The graph's front-end output (the normalisation Div), made a graph output and run."""
    model = onnx.load(path)
    feats = model.graph.node[normalisation_index(model.graph)].output[0]
    model.graph.output.append(helper.make_tensor_value_info(feats, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([feats], {INPUT_NAME: x})[0]


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8"])
def test_every_artifact_runs_the_same_front_end(artifacts, variant):
    x = np.stack(list(signals().values()))
    got = run_frontend(artifacts[variant], x)  # B, M, T (FP32 in every variant)
    assert got.dtype == np.float32 and got.shape == (4, 128, 431)
    wave = torch.from_numpy(x)
    np.testing.assert_allclose(got, conv_stft_logmel(wave)[:, 0].numpy(), atol=1e-3, rtol=0)
    np.testing.assert_allclose(got, reference_logmel(wave)[:, 0].numpy(), atol=2e-3, rtol=0)
