"""The conv-STFT log-mel front-end against torch.stft and librosa, and its batch independence."""

import librosa
import numpy as np
import pytest
import torch
from synth import tone

from train.frontend import CLIP_SAMPLES, FrontendConfig, LogMel, mel_filterbank

CFG = FrontendConfig()


def reference_logmel(wave: torch.Tensor, cfg: FrontendConfig = CFG) -> torch.Tensor:
    """Same maths through torch.stft (float64) and librosa's HTK mel filters."""
    spec = torch.stft(wave.double(), cfg.n_fft, cfg.hop_length,
                      window=torch.hann_window(cfg.n_fft, dtype=torch.float64),
                      center=True, pad_mode="reflect", return_complex=True)  # fmt: skip
    power = spec.abs() ** 2  # B, F, T
    fb = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels,
                             fmin=cfg.f_min, fmax=cfg.f_max, htk=True, norm=None)  # fmt: skip
    mel = torch.from_numpy(fb).double() @ power
    db = 10 * torch.log10(torch.clamp(mel, min=cfg.amin))
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
    ref = librosa.filters.mel(sr=44100, n_fft=1024, n_mels=128, fmin=0.0, fmax=22050.0,
                              htk=True, norm=None).T  # fmt: skip
    assert ours.shape == (513, 128)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("name", list(signals()))
def test_matches_stft_reference(name):
    x = torch.from_numpy(signals()[name]).unsqueeze(0)
    ours = LogMel()(x)
    ref = reference_logmel(x).float()
    assert ours.shape == (1, 1, 128, 431)
    assert torch.isfinite(ours).all()
    # FP32 conv-STFT vs float64 FFT: normalised log-mel agrees to 2e-3 (tens of mdB).
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)


def test_silence_is_finite_and_zero():
    out = LogMel()(torch.zeros(2, CLIP_SAMPLES))
    assert torch.isfinite(out).all()
    assert out.abs().max() == 0  # every bin at the floor -> normalises to 0


def test_batch_does_not_change_result():
    sig = signals()
    alone = LogMel()(torch.from_numpy(sig["tone_440"]).unsqueeze(0))
    batch = torch.from_numpy(np.stack([sig["noise"], sig["tone_440"], sig["silence"],
                                       sig["tone_9k_loud"]]))  # fmt: skip
    together = LogMel()(batch)
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=0)


def test_rejects_unsupported_config():
    with pytest.raises(ValueError, match="unsupported"):
        LogMel(FrontendConfig(mel_scale="slaney"))
