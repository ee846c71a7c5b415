"""The classify pipeline: decode (thread pool) -> windows -> batcher -> mean probability."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.audio import SINGLE_WINDOW_SLACK_S, DecodedAudio, decode, make_windows
from service.backends import Backend
from service.batcher import Admission, Batcher, Job
from service.errors import ClientGone, DeadlineExceeded
from service.metrics import VersionMetrics
from service.observability import tracing
from service.observability.request_ids import note_audio
from service.schemas import ClassifyResponse, ModelCard, ModelRef, Prediction, TimelineEntry
from service.settings import Settings

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]  # the ASGI receive


@dataclass(frozen=True)
class Prepared:
    audio: DecodedAudio
    windows: np.ndarray  # (W, clip_samples) float32
    starts: list[int]  # window start offsets, in model-rate samples


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(W, C) -> (W, C) float64 probabilities, per row (nothing depends on the batch).
    `temperature` is the artifact's calibration: softmax(logits / T)."""
    z = logits.astype(np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Classifier:
    """One loaded model version: its backend, its own batcher and its answers' model reference."""

    def __init__(
        self, backend: Backend, settings: Settings, metrics: VersionMetrics, ref: ModelRef
    ) -> None:
        self.backend, self.settings, self.metrics, self.ref = backend, settings, metrics, ref
        self.meta = meta = backend.metadata
        self.max_batch_size = min(settings.max_batch_size, backend.max_batch_size or 1 << 30)
        self.hop = max(1, round(settings.window_hop_s * meta.sample_rate))
        self.slack = round(SINGLE_WINDOW_SLACK_S * meta.sample_rate)
        self.batcher = Batcher(
            backend.predict,
            max_batch_size=self.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue_size=settings.max_queue_size,
            max_queue_wait_s=settings.max_queue_wait_s,
            metrics=metrics,
        )
        self.decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")

    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop(self.settings.drain_timeout_s)
        self.decode_pool.shutdown(wait=True, cancel_futures=True)

    def prepare(self, data: bytes) -> Prepared:
        """Blocking: decode + resample + cut. Runs in the decode pool."""
        t0 = time.perf_counter()
        s = self.settings
        audio = decode(
            data, self.meta.sample_rate, s.max_duration_s, s.max_channels, s.max_source_rate
        )
        windows, starts = make_windows(audio.waveform, self.meta.clip_samples, self.hop, self.slack)
        self.metrics.decode_latency.observe(time.perf_counter() - t0)
        return Prepared(audio, windows, starts)

    def admit(self) -> Admission:
        """A place in the inference queue, taken before the upload is read (503 if none)."""
        return self.batcher.admit()

    async def classify(
        self,
        data: bytes,
        top_k: int,
        deadline: float,
        receive: Receive,
        admission: Admission | None = None,
    ) -> ClassifyResponse:
        loop = asyncio.get_running_loop()
        with tracing.span("decode"):  # a shared no-op while tracing is off
            prepared = await loop.run_in_executor(self.decode_pool, self.prepare, data)
        note_audio(prepared.audio.duration_s, len(prepared.starts))  # for the access log line
        if time.monotonic() >= deadline:
            raise DeadlineExceeded("the request ran past its deadline while decoding")
        trace = tracing.job_trace(self.backend.name)  # None while tracing is off
        job = self.batcher.submit(prepared.windows, deadline, admission, trace)
        logits = await wait_for_logits(job, deadline, receive)  # (W, C)
        with tracing.span("respond"):
            return self.respond(prepared, logits, top_k)

    def respond(self, prepared: Prepared, logits: np.ndarray, top_k: int) -> ClassifyResponse:
        labels = self.meta.labels
        per_window = softmax(logits, self.meta.temperature)  # (W, C), calibrated
        mean = per_window.mean(axis=0)  # (C,)
        top = np.argsort(-mean, kind="stable")[: min(top_k, len(labels))]
        audio, n = prepared.audio, len(prepared.audio.waveform)
        return ClassifyResponse(
            model=self.ref,
            predictions=[
                Prediction(label=labels[i], index=int(i), probability=float(mean[i])) for i in top
            ],
            duration_s=audio.duration_s,
            sample_rate=audio.sample_rate,
            channels=audio.channels,
            format=audio.format,
            windows=len(prepared.starts),
            timeline=self._timeline(prepared.starts, per_window, n)
            if len(prepared.starts) > 1
            else None,
        )

    def _timeline(self, starts: list[int], probs: np.ndarray, n: int) -> list[TimelineEntry]:
        sr, clip, labels = self.meta.sample_rate, self.meta.clip_samples, self.meta.labels
        best = probs.argmax(axis=1)  # (W,)
        return [
            TimelineEntry(
                start_s=s / sr,
                end_s=min(s + clip, n) / sr,
                label=labels[b],
                index=int(b),
                probability=float(probs[w, b]),
            )
            for w, (s, b) in enumerate(zip(starts, best, strict=True))
        ]

    def card(self, state: str, default: bool, memory_bytes: int | None = None) -> ModelCard:
        m = self.meta
        return ModelCard(
            **self.ref.model_dump(),
            state=state,
            default=default,
            memory_bytes=memory_bytes,
            labels=m.labels,
            sample_rate=m.sample_rate,
            clip_samples=m.clip_samples,
            frontend=m.frontend,
            backend=self.backend.name,
            provider=self.backend.provider,
            max_batch_size=self.max_batch_size,
            metrics=m.metrics,
        )


async def wait_for_logits(job: Job, deadline: float, receive: Receive) -> np.ndarray:
    """The job's logits; ClientGone if the client disconnects first, 504 past the deadline."""
    result: asyncio.Future[Any] = asyncio.wrap_future(job.future)
    watch: asyncio.Future[Any] = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait(
            {result, watch},
            timeout=max(0.0, deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
    except asyncio.CancelledError:
        job.abandon()
        raise
    finally:
        watch.cancel()
    if result in done:
        return result.result()  # or the batch's exception (500 / 504 / 503)
    job.abandon()
    result.cancel()
    if watch in done:
        raise ClientGone
    raise DeadlineExceeded("no answer before the request's deadline")


async def _disconnected(receive: Receive) -> None:
    """Return when the ASGI server reports the client gone (the body is already read)."""
    for _ in range(10_000):
        message = await receive()
        if message["type"] == "http.disconnect":
            return
    await asyncio.Event().wait()  # a server that never says: the deadline decides
