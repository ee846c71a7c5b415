"""Log-mel front-end as a torch module: waveform (B, N) at 44.1 kHz -> (B, 1, n_mels, T).

The STFT is a windowed DFT factored into a grouped Conv1d and a MatMul (`PowerSpectrum`), so the
whole front-end exports to plain ONNX ops (Pad, Reshape, Transpose, Conv, MatMul, Mul, Add, Log,
ReduceMean) that ONNX Runtime and TensorRT both run. Every statistic is computed per example:
batching never changes a result.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from contract.audio import CLIP_SAMPLES, SAMPLE_RATE


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


def fft_split(cfg: FrontendConfig) -> tuple[int, int]:
    """(n1, n2) with n_fft = n1 * n2, n1 dividing the hop: 32 x 32 for n_fft 1024, hop 512.

    Frame sample j = c + n1 * r sits in column c of row r of the waveform cut into rows of n1
    samples, so every frame starts on a row. Of the n1 that allow this, the one nearest
    sqrt(n_fft) needs the fewest multiply-adds.
    """
    step = math.gcd(cfg.n_fft, cfg.hop_length)
    divisors = [d for d in range(1, step + 1) if step % d == 0]
    n1 = min(divisors, key=lambda d: abs(math.log(d * d / cfg.n_fft)))
    return n1, cfg.n_fft // n1


class PowerSpectrum(nn.Module):
    """|STFT|^2 with a Hann window and reflect centring: waveform (B, N) -> (B, rows, T), FP32.

    The windowed n_fft-point DFT is factored (Cooley-Tukey, n_fft = n1 * n2, frame sample
    j = c + n1 * r, bin k = n2 * q + p):

        X[n2 q + p] = sum_c exp(-2 pi i q c / n1) * sum_r w[j] x[j] exp(-2 pi i p j / n_fft)

    Stage 1, the inner sum, is a grouped Conv1d over the rows of each column c (window and
    twiddle factors folded into its weights); stage 2, the outer sum, is one MatMul over the
    columns. x is real, so |X[k]| = |X[n_fft - k]| and stage 1 needs only p <= n2 / 2: for
    1024 = 32 x 32 that is 35k + 70k multiply-adds per frame instead of the dense DFT's 1.05M.
    Rows come out in (q, p) order; `row_of_bin[k]` is the row that holds bin k (0..n_fft / 2).
    """

    def __init__(self, cfg: FrontendConfig):
        super().__init__()
        self.cfg = cfg
        self.n1, self.n2 = fft_split(cfg)
        self.n_p = self.n2 // 2 + 1  # stage-1 outputs p = 0 .. n2 / 2
        self.n_rows = self.n1 * self.n_p
        self.register_buffer("stage1", self._stage1(), persistent=False)
        self.register_buffer("stage2", self._stage2(), persistent=False)
        self.row_of_bin = [self._row(k) for k in range(cfg.n_freqs)]

    def _stage1(self) -> torch.Tensor:
        """Grouped Conv1d weights (n1 * 2 * n_p, 1, n2): group c, outputs (re/im, p), taps r."""
        n1, n2, n_fft = self.n1, self.n2, self.cfg.n_fft
        j = torch.arange(n1, dtype=torch.float64)[:, None] + n1 * torch.arange(n2)[None, :]
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)[j.long()]  # c, r
        p = torch.arange(self.n_p, dtype=torch.float64)[None, :, None]
        angle = 2.0 * math.pi * p * j[:, None, :] / n_fft  # c, p, r
        w = torch.stack([torch.cos(angle), -torch.sin(angle)], dim=1) * window[:, None, None, :]
        return w.reshape(n1 * 2 * self.n_p, 1, n2).float()

    def _stage2(self) -> torch.Tensor:
        """MatMul weights (2 * n1, 2 * n1): outputs (re/im, q) from inputs (c, re/im)."""
        n1 = self.n1
        q = torch.arange(n1, dtype=torch.float64)
        angle = 2.0 * math.pi * q[:, None] * q[None, :] / n1  # q, c
        cos, sin = torch.cos(angle), torch.sin(angle)
        # (cos - i sin) (a + i b) = (cos a + sin b) + i (cos b - sin a)
        w = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)])  # 2,q,c,2
        return w.reshape(2 * n1, 2 * n1).float()

    def _row(self, k: int) -> int:
        if k % self.n2 > self.n2 // 2:  # not computed: its mirror bin has the same power
            k = self.cfg.n_fft - k
        return (k // self.n2) * self.n_p + k % self.n2

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        cfg, n1, n2 = self.cfg, self.n1, self.n2
        batch, n = waveform.shape
        frames = 1 + n // cfg.hop_length
        rows = (frames - 1) * cfg.hop_length // n1 + n2  # rows of n1 samples the frames cover
        x = centre_pad(waveform.float().unsqueeze(1), cfg.n_fft // 2, rows * n1)  # B, 1, L
        x = x.reshape(batch, rows, n1).transpose(1, 2)  # B, n1 columns, rows
        a = F.conv1d(x, self.stage1, stride=cfg.hop_length // n1, groups=n1)  # B, c*2*P, T
        y = torch.matmul(self.stage2, a.reshape(batch, 2 * n1, self.n_p * frames))  # B, 2*q, P*T
        y = y.reshape(batch, 2, self.n_rows, frames)  # B, re/im, (q, p), T
        real, imag = y[:, 0], y[:, 1]
        return real * real + imag * imag  # B, rows, T


def centre_pad(x: torch.Tensor, pad: int, length: int) -> torch.Tensor:
    """Reflect-pad (B, 1, N) by `pad` on the left and to `length` samples on the right."""
    right = length - x.shape[-1] - pad
    if right >= 0:  # the usual case (hop <= n_fft / 2): no samples padded only to be cut
        return F.pad(x, (pad, right), mode="reflect")
    return F.pad(x, (pad, pad), mode="reflect")[..., :length]


class LogMel(nn.Module):
    """waveform (B, N) -> normalised log-mel (B, 1, n_mels, 1 + N // hop). Always FP32."""

    def __init__(self, cfg: FrontendConfig | None = None):
        super().__init__()
        self.cfg = cfg or FrontendConfig()
        if self.cfg.mel_scale != "htk" or self.cfg.window != "hann" or self.cfg.power != 2.0:
            raise ValueError(f"unsupported front-end config: {self.cfg}")
        self.spectrum = PowerSpectrum(self.cfg)
        fb = mel_filterbank(self.cfg)  # F, M, read by the spectrum's rows (zero for duplicates)
        fb_rows = fb.new_zeros(self.spectrum.n_rows, self.cfg.n_mels)
        fb_rows[self.spectrum.row_of_bin] = fb
        self.register_buffer("mel_fb_t", fb_rows.T.contiguous(), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        power = self.spectrum(waveform)  # B, rows, T
        mel = torch.matmul(self.mel_fb_t, power)  # B, M, T
        db = 10.0 * torch.log10(torch.clamp(mel, min=cfg.amin))
        mean = db.mean(dim=(1, 2), keepdim=True)  # per example
        var = ((db - mean) ** 2).mean(dim=(1, 2), keepdim=True)
        return ((db - mean) / torch.sqrt(var + cfg.norm_eps)).unsqueeze(1)  # B, 1, M, T
