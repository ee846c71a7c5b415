"""Batch augmentation on whatever device the waveforms live on (GPU when training there).

Everything works on (B, N) waveforms before the front-end, except SpecAugment on its output:
- crops placed where the clip's energy is (a short random crop of a sparse event, a bark or a
  sneeze, would otherwise often hold only silence and train on a wrong label);
- time stretch / pitch shift by resampling with a random factor (linear interpolation);
- between-class mixing (Tokozume et al., BC learning): two clips mixed with a ratio that accounts
  for their loudness, the soft label being the ratio. With per-example normalisation a plain gain
  change is almost invisible, so the mix is where level matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ENERGY_BLOCK = 512  # samples per energy block (one STFT hop): crop starts lie on this grid
LOUDNESS_BLOCK = 2048  # ~46 ms windows for the BC loudness estimate


@dataclass(frozen=True)
class AugmentConfig:
    crop_samples: int  # training crop; >= clip length means the whole clip, randomly shifted
    shift_samples: int  # max time shift of whole-clip crops (zeros enter at the edge)
    crop_energy: float  # a crop must hold this fraction of the best window's energy (0: any)
    stretch: float  # resampling factor drawn from [1 - stretch, 1 + stretch] (0: off)
    mix: str  # "bc" (between-class), "mixup" (Beta(alpha) on waveforms) or "none"
    mix_prob: float  # fraction of examples that are mixed
    mixup_alpha: float  # Beta(a, a) for "mixup"
    freq_masks: int  # SpecAugment frequency masks per example
    freq_mask_width: int  # max mel bins per mask
    time_masks: int  # SpecAugment time masks per example
    time_mask_width: int  # max frames per mask (scaled to the crop's length)


class Augmenter:
    """Holds the training waveforms on one device and makes augmented batches from them."""

    def __init__(
        self,
        waves: torch.Tensor,
        targets: torch.Tensor,
        n_classes: int,
        cfg: AugmentConfig,
        gen: torch.Generator,
    ):
        self.cfg = cfg
        self.gen = gen
        self.device = waves.device
        self.n_classes = n_classes
        self.clip = waves.shape[1]
        # Zero margin on both sides: shifted or stretched reads past the clip read silence.
        self.margin = int(cfg.shift_samples + cfg.stretch * self.clip) + 2
        self.waves = F.pad(waves, (self.margin, self.margin))
        self.targets = targets.to(self.device)
        blocks = waves[:, : self.clip // ENERGY_BLOCK * ENERGY_BLOCK]
        energy = blocks.reshape(len(waves), -1, ENERGY_BLOCK).pow(2).sum(-1)  # (N, n_blocks)
        self.energy_cumsum = F.pad(energy.double().cumsum(1), (1, 0))  # (N, n_blocks + 1)

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen, device=self.device)

    def _starts(self, idx: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        """Start sample (in the unpadded clip) of a read of `span` samples for each example."""
        cfg, B = self.cfg, len(idx)
        if cfg.crop_samples >= self.clip:  # whole clip, random shift
            return ((self._rand(B) * 2 - 1) * cfg.shift_samples).round().long()
        n_blocks = self.energy_cumsum.shape[1] - 1
        width = (span // ENERGY_BLOCK).clamp(1, n_blocks)  # (B,)
        starts = torch.arange(n_blocks, device=self.device).unsqueeze(0)  # (1, S)
        ends = starts + width.unsqueeze(1)
        valid = ends <= n_blocks
        cs = self.energy_cumsum[idx]
        energy = cs.gather(1, ends.clamp(max=n_blocks)) - cs.gather(1, starts.expand_as(ends))
        energy = torch.where(valid, energy, torch.full_like(energy, -1.0))
        best = energy.max(1, keepdim=True).values
        ok = valid & (energy >= cfg.crop_energy * best)
        # Uniform choice among the acceptable starts: random scores, masked, argmax.
        choice = torch.where(ok, self._rand(*ok.shape), torch.full_like(energy, -1.0)).argmax(1)
        return choice * ENERGY_BLOCK

    def waveforms(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, crop) crops of the clips `idx`, stretched and shifted."""
        cfg, B = self.cfg, len(idx)
        n = min(cfg.crop_samples, self.clip)
        factor = 1.0 + (self._rand(B) * 2 - 1) * cfg.stretch  # >1 reads faster: higher pitch
        starts = self._starts(idx, (factor * n).long())
        pos = (starts + self.margin).unsqueeze(1).double() + factor.double().unsqueeze(
            1
        ) * torch.arange(n, device=self.device, dtype=torch.float64)  # (B, n) fractional
        pos = pos.clamp(0, self.waves.shape[1] - 2)
        left = pos.floor().long()
        frac = (pos - left).float()
        rows = self.waves[idx]
        a, b = rows.gather(1, left), rows.gather(1, left + 1)
        return a + (b - a) * frac

    def mix(self, wave: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed waveforms and soft targets (B, n_classes)."""
        cfg, B = self.cfg, len(y)
        target = F.one_hot(y, self.n_classes).float()
        if cfg.mix == "none" or cfg.mix_prob <= 0 or B < 2:
            return wave, target
        perm = torch.randperm(B, generator=self.gen, device=self.device)
        mixed = self._rand(B) < cfg.mix_prob
        if cfg.mix == "bc":
            r = self._rand(B).clamp(1e-3, 1 - 1e-3)
            g1, g2 = loudness_db(wave), loudness_db(wave[perm])
            # Ratio of the two waveforms such that the perceived share of the first is r.
            p = 1.0 / (1.0 + 10 ** ((g1 - g2) / 20.0) * (1 - r) / r)
            out = (p[:, None] * wave + (1 - p[:, None]) * wave[perm]) / torch.sqrt(
                p**2 + (1 - p) ** 2
            )[:, None]
        elif cfg.mix == "mixup":
            beta = torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha)
            r = beta.sample((B,)).to(self.device)
            r = torch.maximum(r, 1 - r)  # the first clip dominates
            out = r[:, None] * wave + (1 - r[:, None]) * wave[perm]
        else:
            raise ValueError(f"unknown mix mode {cfg.mix!r}")
        r = torch.where(mixed, r, torch.ones_like(r))
        out = torch.where(mixed[:, None], out, wave)
        return out, r[:, None] * target + (1 - r[:, None]) * target[perm]

    def spec_augment(self, x: torch.Tensor) -> torch.Tensor:
        """Zero random mel bands and frame spans, independently per example. x: (B, 1, M, T)."""
        cfg = self.cfg
        B, _, M, T = x.shape
        keep = torch.ones(B, 1, M, T, dtype=torch.bool, device=x.device)
        time_width = max(1, round(cfg.time_mask_width * T / 431))  # scaled from a 5-s clip
        for n_masks, width, size, axis in (
            (cfg.freq_masks, cfg.freq_mask_width, M, 2),
            (cfg.time_masks, time_width, T, 3),
        ):
            pos = torch.arange(size, device=x.device).unsqueeze(0)  # 1, size
            for _ in range(n_masks):
                w = (self._rand(B) * (width + 1)).long()
                start = (self._rand(B) * (size - w)).long()
                band = (pos >= start.unsqueeze(1)) & (pos < (start + w).unsqueeze(1))  # B, size
                shape = (B, 1, size, 1) if axis == 2 else (B, 1, 1, size)
                keep &= ~band.view(shape)
        return x * keep


def loudness_db(wave: torch.Tensor) -> torch.Tensor:
    """Loudest ~46-ms RMS of each waveform in dB (BC learning's sound pressure level)."""
    n = wave.shape[1] // LOUDNESS_BLOCK * LOUDNESS_BLOCK
    rms = wave[:, :n].reshape(len(wave), -1, LOUDNESS_BLOCK).pow(2).mean(-1).sqrt()
    return 20 * torch.log10(rms.max(1).values.clamp(min=1e-5))
