"""ResNet-34-style CNN over log-mels, and the waveform -> logits classifier that wraps it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .frontend import FrontendConfig, LogMel


@dataclass(frozen=True)
class ModelConfig:
    n_classes: int = 50  # output logits
    in_channels: int = 1  # log-mel "image" channels
    widths: tuple[int, ...] = (64, 128, 256, 512)  # channels per residual stage
    depths: tuple[int, ...] = (3, 4, 6, 3)  # basic blocks per stage (ResNet-34)
    dropout: float = 0.5  # before the classifier

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"], d["depths"] = list(self.widths), list(self.depths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        # "name" and "extra" were fields once, never read: checkpoints that carry them still load
        d = {k: v for k, v in d.items() if k not in ("name", "extra")}
        d["widths"], d["depths"] = tuple(d["widths"]), tuple(d["depths"])
        return cls(**d)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """(B, 1, n_mels, T) -> logits (B, n_classes)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, cfg.widths[0], 7, 2, 3, bias=False),
            nn.BatchNorm2d(cfg.widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, c_in = [], cfg.widths[0]
        for width, depth in zip(cfg.widths, cfg.depths, strict=True):
            stride = 1 if width == c_in else 2
            blocks = [BasicBlock(c_in, width, stride)]
            blocks += [BasicBlock(width, width, 1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = width
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(c_in, cfg.n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: starts as identity
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = {}
        x = self.stem(x)
        features["stem"] = x
        for i, stage in enumerate(self.stages):
            x = stage(x)
            features[f"stage{i + 1}"] = x
        logits = self.fc(self.dropout(torch.flatten(self.pool(x), 1)))
        return (logits, features) if return_features else logits


class AudioClassifier(nn.Module):
    """waveform (B, N) float32 at 44.1 kHz -> logits (B, n_classes) float32.

    The front-end always runs in FP32; its output is cast to the CNN's dtype (FP16 in the
    mixed-precision export) after normalisation, and logits come back as FP32.
    """

    def __init__(self, model_cfg: ModelConfig, frontend_cfg: FrontendConfig | None = None):
        super().__init__()
        self.frontend = LogMel(frontend_cfg)
        self.cnn = ResNet(model_cfg)

    def forward(self, waveform: torch.Tensor, return_features: bool = False):
        feats = self.frontend(waveform)
        dtype = self.cnn.fc.weight.dtype
        if return_features:
            logits, maps = self.cnn(feats.to(dtype), return_features=True)
            return logits.float(), {"logmel": feats, **maps}
        return self.cnn(feats.to(dtype)).float()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
