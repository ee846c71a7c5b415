"""The class activation map lies over the event it explains, in time and in frequency.

The CAM is computed on the last stage's grid (14 x 4 cells of stride 32 for the shipped
ResNet-34 on a 431-frame, 128-mel window). The page used to stretch that grid over the log-mel,
which puts cell j over the middle of the j-th 431/14 slice, while the CNN centres it on frame
32 j: the cyan peak sat up to half a cell (0.19 s) after a dog bark. Here a CNN of the shipped
architecture whose weights are all positive box filters (a loudness detector, so its last-stage
maps peak on the event by construction) sees a log-mel with one event at a known frame and mel
band; the map the service sends must peak within a quarter of a cell of it. (Events stay off
the outermost cells, whose fields reach into the zero padding: a box filter weighs it as
silence and pulls their peak inward, a property of the detector, not of the drawing.)
"""

from __future__ import annotations

import base64
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from contract.metadata import OUTPUT_NAME, ExplainOutputs  # noqa: E402
from service.explain import cell_centres, explain_window, on_logmel_grid  # noqa: E402
from train.model import ModelConfig, ResNet  # noqa: E402

N_MELS, FRAMES = 128, 431  # the shipped front-end's window: 5 s at 44.1 kHz, hop 512
STRIDE = 32  # the stem (conv + max pool) and three stride-2 stages
TOLERANCE = STRIDE // 4  # frames (or mel bins): a quarter of a stage-4 cell


@pytest.fixture(scope="module")
def detector() -> ResNet:
    """The shipped depths and strides (ResNet-34, stages 1-4), narrow, every convolution a
    positive box filter and every BatchNorm the identity: each last-stage cell sums the input
    around its receptive field's centre, weighted symmetrically."""
    shipped = ModelConfig()
    cnn = ResNet(ModelConfig(n_classes=2, widths=(2, 4, 8, 16), depths=shipped.depths)).eval()
    with torch.no_grad():
        for m in cnn.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.0), m.bias.zero_(), m.running_mean.zero_()
                m.running_var.fill_(1.0 - m.eps)
        cnn.fc.weight.copy_(torch.tensor([[1.0] * 16, [-1.0] * 16]))
        cnn.fc.bias.zero_()
    return cnn


def logmel_with_event(frame: int, mel: int) -> np.ndarray:
    """(n_mels, frames): silence, and one short event 5 frames (58 ms) by 9 mel bins."""
    x = np.zeros((N_MELS, FRAMES), np.float32)
    x[max(mel - 4, 0) : mel + 5, max(frame - 2, 0) : frame + 3] = 1.0
    return x


def explained(cnn: ResNet, logmel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What /v1/explain sends for this log-mel: (CAM as the page gets it, stage-4 CAM)."""
    with torch.no_grad():
        logits, maps = cnn(torch.from_numpy(logmel)[None, None], return_features=True)
    names = ExplainOutputs(stages=tuple(maps))
    out = {
        OUTPUT_NAME: logits.numpy(),
        names.logmel: logmel[None, None],
        **{k: v.numpy() for k, v in maps.items()},
        names.classifier_weight: cnn.fc.weight.detach().numpy(),
        names.classifier_bias: cnn.fc.bias.detach().numpy(),
    }
    model = SimpleNamespace(outputs=names, meta=SimpleNamespace(labels=["event", "quiet"]))
    w = explain_window(out, model, 0, (0.0, 5.0))  # type: ignore[arg-type]
    assert w.cam_label == "event"
    stage4 = np.tensordot(cnn.fc.weight[0].detach().numpy(), out[names.cam_maps][0], axes=1)
    return decode(w.cam), stage4


def decode(m) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(m.data), np.uint8).reshape(m.shape)
    return m.min + (m.max - m.min) * raw / 255.0


def peak(cam: np.ndarray) -> tuple[int, int]:
    """(mel bin, frame) of the map's maximum; ties (8-bit plateaus) to their middle."""
    rows, cols = np.nonzero(cam >= cam.max() - 1e-9)
    return int(np.median(rows)), int(np.median(cols))


def stretched_position(cell: int, cells: int, n: int) -> float:
    """Where stretching `cells` over `n` columns (smoothly, as a browser scales a canvas) puts
    a cell's value: the middle of its n/cells slice. The old page drew the CAM this way."""
    return (cell + 0.5) * n / cells - 0.5


def test_a_cell_sits_over_its_receptive_fields_centre(detector) -> None:
    """An event on cell j's centre peaks cell j of stage 4, and cell_centres says j * 32."""
    assert list(cell_centres(FRAMES, 14)) == [STRIDE * j for j in range(14)]
    assert list(cell_centres(N_MELS, 4)) == [0, 32, 64, 96]
    for j in (1, 3, 7, 12):
        _, stage4 = explained(detector, logmel_with_event(STRIDE * j, 64))
        assert stage4.shape == (4, 14)
        assert np.unravel_index(stage4.argmax(), stage4.shape) == (2, j)


@pytest.mark.parametrize("mel", [32, 64])
@pytest.mark.parametrize("frame", [32, 64, 96, 224, 384])
def test_the_map_peaks_on_an_event_at_a_cell_centre(detector, frame: int, mel: int) -> None:
    cam, stage4 = explained(detector, logmel_with_event(frame, mel))
    assert cam.shape == (N_MELS, FRAMES)  # the log-mel's grid: the page overlays them 1:1
    got_mel, got_frame = peak(cam)
    assert abs(got_frame - frame) <= TOLERANCE, (got_frame, frame)
    assert abs(got_mel - mel) <= TOLERANCE, (got_mel, mel)
    # The cells themselves are untouched: the map at each cell's centre is that cell's value
    grid = cam[np.ix_(cell_centres(N_MELS, 4), cell_centres(FRAMES, 14))]
    step = (cam.max() - cam.min()) / 255
    np.testing.assert_allclose(grid, stage4, atol=0.51 * step + 1e-6)


@pytest.mark.parametrize("frame", [40, 150, 270, 333, 370])
def test_the_map_peaks_within_half_a_cell_of_any_event(detector, frame: int) -> None:
    """Between centres the peak is the nearest cell's: a stage-4 grid resolves no finer."""
    cam, _ = explained(detector, logmel_with_event(frame, 80))
    got_mel, got_frame = peak(cam)
    assert abs(got_frame - frame) <= STRIDE // 2, (got_frame, frame)
    assert abs(got_mel - 80) <= STRIDE // 2, (got_mel, 80)


def test_stretching_the_grid_would_miss_an_early_event(detector) -> None:
    """The check above can fail for the bug it is about: the stretched grid (the old drawing)
    puts an event on cell 2's centre (frame 64, 0.74 s) 12 frames (0.14 s) late, and a
    low-frequency one 16 mel bins high."""
    _, stage4 = explained(detector, logmel_with_event(64, 32))
    row, col = np.unravel_index(stage4.argmax(), stage4.shape)
    assert stretched_position(int(col), 14, FRAMES) - 64 > TOLERANCE
    assert stretched_position(int(row), 4, N_MELS) - 32 > TOLERANCE


def test_between_cells_the_map_is_linear_and_flat_past_the_outer_centres() -> None:
    cam = np.zeros((4, 14))
    cam[1, 5] = 1.0
    up = on_logmel_grid(cam, (N_MELS, FRAMES))
    assert up[32, 160] == 1.0 and up[32, 176] == pytest.approx(0.5)  # halfway to cell 6
    assert up[48, 160] == pytest.approx(0.5)  # halfway to mel cell 2
    edge = on_logmel_grid(np.arange(14.0)[None].repeat(4, 0), (N_MELS, FRAMES))
    assert edge[0, 0] == 0.0 and (edge[0, 416:] == 13.0).all()  # last centre 416, then flat
    with pytest.raises(ValueError, match="power-of-two stride"):
        cell_centres(431, 20)
