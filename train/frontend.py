"""Log-mel front-end as a torch module: waveform (B, N) at 44.1 kHz -> (B, 1, n_mels, T).

The STFT is a Conv1d with a fixed Hann-windowed DFT basis, so the whole front-end exports to
plain ONNX ops (Pad, Conv, Mul, Add, MatMul, Log, ReduceMean) that ONNX Runtime and TensorRT
both run. Every statistic is computed per example: batching never changes a result.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 44100
CLIP_SECONDS = 5
CLIP_SAMPLES = SAMPLE_RATE * CLIP_SECONDS  # 220500 samples


@dataclass(frozen=True)
class FrontendConfig:
    sample_rate: int = SAMPLE_RATE  # Hz; the waveform the graph expects
    clip_samples: int = CLIP_SAMPLES  # samples per example fed to the exported graph
    n_fft: int = 1024  # STFT window and FFT size
    hop_length: int = 512  # STFT hop; 5 s -> 431 frames with centring
    n_mels: int = 128  # mel bands
    f_min: float = 0.0  # lowest mel edge, Hz
    f_max: float = 22050.0  # highest mel edge, Hz
    mel_scale: str = "htk"  # HTK mel formula, filters without area normalisation
    window: str = "hann"  # periodic Hann
    center: str = "reflect"  # pad n_fft // 2 on each side by reflection
    power: float = 2.0  # |X|^2
    amin: float = 1e-10  # dB floor: 10 * log10(max(mel, amin)) >= -100 dB
    normalize: str = "per_example"  # (x - mean) / std over (mel, time) of each example
    norm_eps: float = 1e-5  # added to the variance

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def n_frames(self) -> int:
        return 1 + self.clip_samples // self.hop_length

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FrontendConfig:
        return cls(**d)


def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(cfg: FrontendConfig) -> torch.Tensor:
    """Triangular HTK mel filters, (n_freqs, n_mels), no norm (torchaudio's defaults)."""
    all_freqs = torch.linspace(0, cfg.sample_rate // 2, cfg.n_freqs, dtype=torch.float64)
    m_pts = torch.linspace(
        hz_to_mel(torch.tensor(cfg.f_min, dtype=torch.float64)).item(),
        hz_to_mel(torch.tensor(cfg.f_max, dtype=torch.float64)).item(),
        cfg.n_mels + 2,
        dtype=torch.float64,
    )
    f_pts = mel_to_hz(m_pts)
    f_diff = f_pts[1:] - f_pts[:-1]  # (n_mels + 1,)
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0).float()


def dft_basis(cfg: FrontendConfig) -> torch.Tensor:
    """Hann-windowed real/imaginary DFT rows as Conv1d weights, (2 * n_freqs, 1, n_fft)."""
    n = torch.arange(cfg.n_fft, dtype=torch.float64)
    k = torch.arange(cfg.n_freqs, dtype=torch.float64).unsqueeze(1)
    window = torch.hann_window(cfg.n_fft, periodic=True, dtype=torch.float64)
    angle = 2.0 * math.pi * k * n / cfg.n_fft  # (n_freqs, n_fft)
    real = torch.cos(angle) * window
    imag = -torch.sin(angle) * window
    return torch.cat([real, imag], dim=0).unsqueeze(1).float()


class LogMel(nn.Module):
    """waveform (B, N) -> normalised log-mel (B, 1, n_mels, 1 + N // hop). Always FP32."""

    def __init__(self, cfg: FrontendConfig | None = None):
        super().__init__()
        self.cfg = cfg or FrontendConfig()
        if self.cfg.mel_scale != "htk" or self.cfg.window != "hann" or self.cfg.power != 2.0:
            raise ValueError(f"unsupported front-end config: {self.cfg}")
        self.register_buffer("basis", dft_basis(self.cfg), persistent=False)
        self.register_buffer("mel_fb_t", mel_filterbank(self.cfg).T.contiguous(), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = waveform.float().unsqueeze(1)  # B, 1, N
        pad = cfg.n_fft // 2
        x = F.pad(x, (pad, pad), mode="reflect")
        spec = F.conv1d(x, self.basis, stride=cfg.hop_length)  # B, 2F, T
        real, imag = spec[:, : cfg.n_freqs], spec[:, cfg.n_freqs :]
        power = real * real + imag * imag  # B, F, T
        mel = torch.matmul(self.mel_fb_t, power)  # B, M, T
        db = 10.0 * torch.log10(torch.clamp(mel, min=cfg.amin))
        mean = db.mean(dim=(1, 2), keepdim=True)  # per example
        var = ((db - mean) ** 2).mean(dim=(1, 2), keepdim=True)
        return ((db - mean) / torch.sqrt(var + cfg.norm_eps)).unsqueeze(1)  # B, 1, M, T
