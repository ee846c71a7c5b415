"""The ResNet-34 architecture, its size, and the waveform -> logits wrapper."""

import pytest
import torch

from train.frontend import CLIP_SAMPLES
from train.model import AudioClassifier, BasicBlock, ModelConfig, ResNet, count_parameters

TINY = ModelConfig(n_classes=5, widths=(8, 16), depths=(1, 1))


def test_resnet34_shape_and_parameter_count():
    cnn = ResNet(ModelConfig())
    assert count_parameters(cnn) == 21_304_050  # ~21.3 M, as in the seed
    blocks = [sum(isinstance(m, BasicBlock) for m in s.modules()) for s in cnn.stages]
    assert blocks == [3, 4, 6, 3]
    stem_conv = cnn.stem[0]
    assert (
        stem_conv.in_channels,
        stem_conv.out_channels,
        stem_conv.kernel_size,
        stem_conv.stride,
        stem_conv.bias,
    ) == (1, 64, (7, 7), (2, 2), None)
    assert cnn.fc.in_features == 512 and cnn.fc.out_features == 50
    with torch.no_grad():
        assert cnn.eval()(torch.randn(2, 1, 128, 431)).shape == (2, 50)


def test_shortcuts_only_where_shape_changes():
    cnn = ResNet(ModelConfig())
    first = [stage[0] for stage in cnn.stages]
    assert isinstance(first[0].shortcut, torch.nn.Identity)
    assert all(isinstance(b.shortcut, torch.nn.Sequential) for b in first[1:])
    assert [b.conv1.stride for b in first] == [(1, 1), (2, 2), (2, 2), (2, 2)]


def test_classifier_maps_waveform_to_logits_and_features():
    model = AudioClassifier(TINY).eval()
    x = torch.randn(3, CLIP_SAMPLES) * 0.1
    with torch.no_grad():
        logits = model(x)
        logits2, feats = model(x, return_features=True)
    assert logits.shape == (3, 5) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, logits2)
    assert feats["logmel"].shape == (3, 1, 128, 431)
    assert set(feats) == {"logmel", "stem", "stage1", "stage2"}


def test_eval_mode_is_batch_independent():
    torch.manual_seed(0)
    model = AudioClassifier(TINY).eval()
    x = torch.randn(8, CLIP_SAMPLES) * 0.1
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(8)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_fp16_cnn_keeps_fp32_frontend_and_output():
    model = AudioClassifier(TINY).eval()
    model.cnn.half()
    with torch.no_grad():
        out, feats = model(torch.randn(2, CLIP_SAMPLES), return_features=True)
    assert out.dtype == torch.float32
    assert feats["logmel"].dtype == torch.float32
    assert feats["stage2"].dtype == torch.float16


def test_config_round_trip():
    assert ModelConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(TypeError):
        ModelConfig.from_dict({**TINY.to_dict(), "bogus": 1})
