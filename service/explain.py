"""/v1/explain: the fp32 explain artifact, loaded on the first request, run on its own small
bounded pool with its own ORT threads, so explaining never takes the classify batcher's turn.

The network ends in global average pooling and one linear layer, so a class activation map is
the last stage's channels weighted by that class's classifier row: numpy, no gradients, no torch.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from contract.files import sha256_file
from contract.metadata import (
    INPUT_NAME,
    OUTPUT_NAME,
    ArtifactMetadata,
    ExplainOutputs,
    MetadataError,
)
from service.audio import decode, make_windows
from service.backends import BackendUnavailable
from service.classifier import Classifier, Prepared
from service.errors import DeadlineExceeded, NotReady, Overloaded
from service.schemas import EncodedMap, ExplainResponse, StageMaps, WindowExplanation
from service.settings import Settings

log = logging.getLogger(__name__)

SHOWN_CHANNELS = 4  # feature maps sent per stage, besides the channel mean
RUN_BATCH = 4  # windows per explain run: bounds the memory of full-resolution feature maps


class ExplainUnavailable(NotReady):
    """No usable explain artifact; /v1/classify is unaffected. (A NotReady, so it keeps its
    message and Retry-After: running `make export` fixes it without a restart.)"""

    code = "explain_unavailable"


def explain_path(settings: Settings) -> Path:
    """ESC50_EXPLAIN_MODEL_PATH; else <stem>.explain.onnx beside the served artifact."""
    if settings.explain_model_path is not None:
        return settings.explain_model_path
    if settings.model_path is None:
        return settings.model_dir / f"{settings.model_stem}.explain.onnx"
    stem = settings.model_path.with_suffix("")  # models/x.int8.onnx -> models/x.int8
    if stem.suffix in (".fp32", ".fp16", ".int8"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ".explain.onnx")


# --- numpy: maps -> compact images ------------------------------------------------------------


def encode_map(x: np.ndarray) -> EncodedMap:
    """(H, W) float -> 8-bit with its range (see EncodedMap)."""
    lo, hi = float(x.min()), float(x.max())
    scaled = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    data = base64.b64encode(np.round(scaled * 255).astype(np.uint8).tobytes()).decode()
    return EncodedMap(shape=list(x.shape), min=lo, max=hi, data=data)


def class_activation_map(maps: np.ndarray, weight: np.ndarray, index: int) -> np.ndarray:
    """(C, H, W) last-stage maps, (K, C) classifier weights -> (H, W) map of class `index`.
    Its mean plus the class's bias is the class's logit."""
    return np.tensordot(weight[index], maps, axes=1)


def cell_centres(n: int, cells: int) -> np.ndarray:
    """Where each of a stage's `cells` (along one axis) is centred on the `n` log-mel columns
    (or mel bins) the CNN saw. Every stride-2 layer (the 7x7 and 3x3 convolutions padded by half
    their kernel, the 3x3 max pool, the 1x1 shortcuts) centres output j on input 2j, so cell j of
    a stage of stride s sits over input j * s: not over the middle of the j-th n/cells slice,
    where stretching the grid over the log-mel put it (half a cell late: 0.19 s at stride 32)."""
    for stride in (2**k for k in range(16)):
        if -(-n // stride) == cells:  # each stride-2 layer gives ceil(n / 2) outputs
            return np.arange(cells) * stride
    raise ValueError(f"{cells} cells are not a power-of-two stride of {n} inputs")


@functools.lru_cache(maxsize=16)
def _interpolation(n: int, cells: int) -> np.ndarray:
    """(n, cells): row i weighs the cells for input i, linear between the two nearest centres."""
    centres, eye = cell_centres(n, cells), np.eye(cells)
    return np.stack([np.interp(np.arange(n), centres, eye[j]) for j in range(cells)], axis=1)


def on_logmel_grid(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) last-stage map -> (n_mels, frames): linear between the cells' centres, constant
    past the outer ones, so that the page overlays it 1:1 on the log-mel it explains."""
    return _interpolation(shape[0], cam.shape[0]) @ cam @ _interpolation(shape[1], cam.shape[1]).T


def stage_maps(name: str, maps: np.ndarray) -> StageMaps:
    """(C, H, W) -> the channel mean and the SHOWN_CHANNELS most active channels."""
    means = maps.mean(axis=(1, 2))  # (C,)
    top = np.argsort(-means, kind="stable")[:SHOWN_CHANNELS]
    return StageMaps(
        name=name,
        channels=maps.shape[0],
        mean=encode_map(maps.mean(axis=0)),
        top_channels=[int(c) for c in top],
        maps=[encode_map(maps[c]) for c in top],
    )


def explain_window(
    out: dict[str, np.ndarray], model: ExplainModel, w: int, span_s: tuple[float, float]
) -> WindowExplanation:
    """Window `w` of a run's outputs: its log-mel, its top label's CAM, each stage's maps."""
    k = int(out[OUTPUT_NAME][w].argmax())
    names, labels = model.outputs, model.meta.labels
    cam = class_activation_map(out[names.cam_maps][w], out[names.classifier_weight], k)
    logmel = out[names.logmel][w, 0]  # (n_mels, frames)
    return WindowExplanation(
        start_s=span_s[0],
        end_s=span_s[1],
        cam_label=labels[k],
        cam_index=k,
        logmel=encode_map(logmel),
        cam=encode_map(on_logmel_grid(cam, logmel.shape)),
        stages=[stage_maps(name, out[name][w]) for name in names.stages],
    )


# --- the loaded artifact -----------------------------------------------------------------------


class ExplainModel:
    """An ONNX Runtime session on the explain artifact, checked against the served model."""

    def __init__(self, path: Path, settings: Settings, served: ArtifactMetadata) -> None:
        try:  # lazily: a TensorRT-only install serves classify without onnxruntime
            from service.backends.ort import OrtBackend
        except ImportError:
            raise ExplainUnavailable("explaining needs onnxruntime: pip install .[serve]") from None
        own = settings.model_copy(update={"intra_op_threads": settings.explain_threads})
        self.backend = OrtBackend(path, own)
        self.meta = self.backend.metadata
        self.outputs = ExplainOutputs.from_metadata(self.meta)
        have = {o.name for o in self.backend.session.get_outputs()}
        if missing := set(self.outputs.names()) - have:
            raise MetadataError(f"{path.name} lacks outputs {sorted(missing)}")
        _check_same_model(self.meta, served, path)
        self.sha256 = sha256_file(path)[:12]

    def run(self, windows: np.ndarray) -> dict[str, np.ndarray]:
        """(W, clip) -> every named output, windows first (weights as they are)."""
        names = self.outputs.names()
        runs = [
            self.backend.session.run(names, {INPUT_NAME: windows[i : i + RUN_BATCH]})
            for i in range(0, len(windows), RUN_BATCH)
        ]
        shared = {self.outputs.classifier_weight, self.outputs.classifier_bias}
        return {
            n: runs[0][j] if n in shared else np.concatenate([r[j] for r in runs])
            for j, n in enumerate(names)
        }

    def close(self) -> None:
        self.backend.close()


def _check_same_model(meta: ArtifactMetadata, served: ArtifactMetadata, path: Path) -> None:
    """A CAM of another checkpoint would explain a decision the served model did not make."""

    def key(m: ArtifactMetadata) -> tuple:
        return m.labels, m.sample_rate, m.clip_samples

    sha, served_sha = meta.checkpoint_sha256, served.checkpoint_sha256
    if key(meta) != key(served) or (sha and served_sha and sha != served_sha):
        raise ExplainUnavailable(
            f"{path.name} was exported from another checkpoint than the served model: "
            "run `make export` again"
        )


# --- the per-app explainer --------------------------------------------------------------------


class ExplainAdmission:
    """A place among the explain requests (running or waiting), taken before the upload is
    read, as /v1/classify's Admission is. The route releases it if the request never reaches the
    pool (a bad upload, a missing artifact); once handed to the pool, the pool's end does."""

    def __init__(self, explainer: Explainer) -> None:
        self._explainer, self._held, self.in_pool = explainer, True, False

    def release(self) -> None:
        """Give the place back, once (the event loop only); a no-op once the pool has it."""
        if self._held and not self.in_pool:
            self.pool_done()

    def pool_done(self) -> None:
        self._held = False
        self._explainer.pending -= 1


class Explainer:
    """Loads the artifact on first use and runs explain requests on `explain_concurrency`
    threads; more than `explain_max_queue` waiting ones get 503 instead of piling up."""

    def __init__(self, settings: Settings, path: Path | None = None) -> None:
        """`path`: the version folder's explain artifact; None = the legacy settings' one."""
        self.settings, self.path = settings, path or explain_path(settings)
        self.model: ExplainModel | None = None
        self.pool = ThreadPoolExecutor(settings.explain_concurrency, thread_name_prefix="explain")
        self.pending = 0  # places held: admitted and not finished (touched on the event loop only)
        self._loading = asyncio.Lock()

    def admit(self) -> ExplainAdmission:
        """A place before the upload is read: Overloaded (503) at once if there is none, so a
        refused request costs no body read and no decode."""
        s = self.settings
        if self.pending >= s.explain_concurrency + s.explain_max_queue:
            raise Overloaded("too many explain requests; /v1/classify is not affected")
        self.pending += 1
        return ExplainAdmission(self)

    async def explain(
        self,
        classifier: Classifier,
        data: bytes,
        top_k: int,
        deadline: float,
        admission: ExplainAdmission | None = None,
    ) -> ExplainResponse:
        """Explain on the pool, in the place `admission` holds (taken here if None). The place is
        the pool's from submission until the job ends, even past this request's deadline."""
        place = admission or self.admit()
        try:
            model = await self._load(classifier.meta)
            job = self.pool.submit(self._explain, model, classifier, data, top_k)
        except BaseException:
            place.release()
            raise
        place.in_pool = True
        loop = asyncio.get_running_loop()
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(place.pool_done))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job), deadline - time.monotonic())
        except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
            raise DeadlineExceeded("no explanation before the request's deadline") from None

    async def _load(self, served: ArtifactMetadata) -> ExplainModel:
        async with self._loading:  # concurrent first requests load it once
            if self.model is None:
                if not self.path.is_file():
                    raise ExplainUnavailable(
                        f"no explain artifact at {self.path.name}: run `make export` "
                        "(or set ESC50_EXPLAIN_MODEL_PATH); /v1/classify still works"
                    )
                t0 = time.perf_counter()
                try:
                    self.model = await asyncio.to_thread(
                        ExplainModel, self.path, self.settings, served
                    )
                except (MetadataError, BackendUnavailable) as e:
                    raise ExplainUnavailable(f"cannot explain with {self.path.name}: {e}") from None
                log.info("loaded %s in %.2f s", self.path.name, time.perf_counter() - t0)
            return self.model

    def _explain(
        self, model: ExplainModel, classifier: Classifier, data: bytes, top_k: int
    ) -> ExplainResponse:
        """Blocking, on the explain pool: decode, run the graph, classify, encode the maps."""
        meta, s = model.meta, self.settings
        max_duration_s = min(s.max_duration_s, s.explain_max_duration_s)
        audio = decode(data, meta.sample_rate, max_duration_s, s.max_channels, s.max_source_rate)
        windows, starts = make_windows(
            audio.waveform, meta.clip_samples, classifier.hop, classifier.slack
        )
        out = model.run(windows)  # the same windows /v1/classify scores
        result = classifier.respond(Prepared(audio, windows, starts), out[OUTPUT_NAME], top_k)
        # the served version's name and number, this artifact's precision and bytes
        ref = classifier.ref.model_copy(update={"variant": meta.variant, "sha256": model.sha256})
        sr, clip, n = meta.sample_rate, meta.clip_samples, len(audio.waveform)
        return ExplainResponse(
            classification=result.model_copy(update={"model": ref}),
            frame_hop_s=meta.frontend["hop_length"] / sr,
            windows=[
                explain_window(out, model, w, (a / sr, min(a + clip, n) / sr))
                for w, a in enumerate(starts)
            ],
        )

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.model is not None:
            self.model.close()
