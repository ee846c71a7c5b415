"""Live classification of an audio stream over a WebSocket (`WS /v1/stream`).

The client's first message is a JSON config; then binary messages of interleaved PCM of any
length; `{"type": "end"}` flushes and closes. Protocol, close codes and limits:
docs/streams.md. Guarantees (tests/test_streams.py checks them):
  - audio is decoded, downmixed (channel mean) and resampled as it arrives with the one
    reader's stateful resampler (contract.audio.resampler): chunk sizes from one sample (even
    one byte) to the frame limit give identical windows and events;
  - every `hop_s` of new audio, once 5 s have arrived, the last 5 s are scored through the
    batcher that serves /v1/classify (stream windows and uploads share batches) and turned into
    probabilities by the classifier's own `respond`: an event equals /v1/classify's answer for
    the same 5 s posted as a WAV. Before the first full 5 s there is no window event;
  - events go out in order. Cut windows wait in a bounded per-stream queue: a client sending
    faster than real time is slowed (its messages are not read while the queue is full), never
    buffered without bound. Windows the batcher refuses (saturated) or that pass their deadline
    are skipped, and the next event says how many;
  - a refused stream (too many open, not ready, unauthorised, bad config) gets a close code and
    a reason; a client that disappears frees its slot, its tasks and its queued jobs;
  - on shutdown (`close_all`), open streams flush their queued windows, get a final event and
    close with 1012 (service restart): reconnect, to another replica.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import uvicorn
from fastapi import APIRouter, FastAPI, WebSocket
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from contract.audio import DecodedAudio, resampler
from service.classifier import Classifier, Prepared
from service.errors import ServiceError
from service.metrics import LATENCY_BUCKETS
from service.settings import Settings

log = logging.getLogger(__name__)

SUBPROTOCOL = "esc50-stream"  # offered by browsers that pass the token as a subprotocol
BEARER_PROTOCOL = "bearer."  # + base64url(token), unpadded: Kubernetes' trick for browsers
MAX_TEXT_BYTES = 4096  # a config or an end message; anything longer is not one
CLOSE_REASON_BYTES = 123  # RFC 6455: a close frame's reason fits in 123 bytes

# close codes (docs/streams.md): RFC 6455's where one fits, 44xx mirror HTTP statuses
NORMAL, UNSUPPORTED_DATA, INVALID_DATA, POLICY = 1000, 1003, 1007, 1008
TOO_BIG, INTERNAL, SERVICE_RESTART, TRY_AGAIN_LATER = 1009, 1011, 1012, 1013
MODEL_NOT_FOUND, IDLE_TIMEOUT, SESSION_LIMIT = 4404, 4408, 4413


class Close(Exception):
    """End the session with this close code and reason (also sent as an `error` event)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class StreamConfig(BaseModel):
    """The first message. Omitted fields take their defaults."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["config"] = "config"
    sample_rate: int | None = Field(default=None, ge=1000)  # Hz; None = the model's rate
    channels: Literal[1, 2] = 1  # interleaved when 2
    encoding: Literal["pcm_s16le", "pcm_f32le"] = "pcm_s16le"
    hop_s: float = Field(default=1.0, le=5.0)  # a window every hop_s of audio (>= the minimum)
    top_k: int | None = Field(default=None, ge=1, le=1000)  # None = ESC50_DEFAULT_TOP_K


# --- metrics -----------------------------------------------------------------------------------


class StreamMetrics:
    """The streams' series, on the app's registry (names in service/metrics.py's style)."""

    def __init__(self, registry: CollectorRegistry, ns: str = "esc50") -> None:
        self.open = Gauge("streams_open", "Open live streams", namespace=ns, registry=registry)
        self.closed = Counter(
            "streams_closed",
            "Live streams ended, by close code (1006: the client vanished)",
            ["code"],
            namespace=ns,
            registry=registry,
        )
        self.windows = Counter(
            "stream_windows",
            "Live-stream windows by outcome: scored, or skipped (service saturated, deadline)",
            ["outcome"],
            namespace=ns,
            registry=registry,
        )
        self.latency = Histogram(
            "stream_window_latency_seconds",
            "From the arrival of a window's last sample to its event being sent",
            namespace=ns,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


# --- audio in: bytes -> mono float32 at the model's rate -> 5 s windows every hop -------------


class PcmDecoder:
    """Interleaved PCM bytes of any length -> mono float32, carrying a partial frame over.

    Integers scale as libsndfile's reader does (x / 32768), so a stream's samples are those of
    the same audio posted as a 16-bit WAV."""

    def __init__(self, encoding: str, channels: int) -> None:
        self.dtype = np.dtype("<i2") if encoding == "pcm_s16le" else np.dtype("<f4")
        self.channels = channels
        self.frame_bytes = self.dtype.itemsize * channels
        self.carry = b""

    def decode(self, data: bytes) -> np.ndarray:
        data = self.carry + data
        whole = len(data) - len(data) % self.frame_bytes
        self.carry = data[whole:]
        x = np.frombuffer(data[:whole], self.dtype).reshape(-1, self.channels)  # (n, ch)
        if self.dtype.kind == "i":
            x = x.astype(np.float32) / np.float32(32768)
        elif not np.isfinite(x).all():
            raise Close(INVALID_DATA, "the PCM contains NaN or infinite samples")
        if self.channels == 1:
            return np.ascontiguousarray(x[:, 0], dtype=np.float32)
        return x.mean(axis=1, dtype=np.float32)  # the reader's downmix


class Ring:
    """The last `size` samples, in a fixed buffer."""

    def __init__(self, size: int) -> None:
        self.buf, self.size, self.total = np.zeros(size, np.float32), size, 0

    def write(self, x: np.ndarray) -> None:
        x = x[-self.size :]
        at = self.total % self.size
        first = min(len(x), self.size - at)
        self.buf[at : at + first] = x[:first]
        self.buf[: len(x) - first] = x[first:]
        self.total += len(x)

    def last(self) -> np.ndarray:
        """A copy of the last `size` samples in time order (zeros before the first write)."""
        at = self.total % self.size
        return np.concatenate([self.buf[at:], self.buf[:at]])


@dataclass(frozen=True)
class Window:
    start: int  # first sample, at the model's rate, from the stream's start
    samples: np.ndarray  # (clip_samples,) float32
    completed_at: float  # time.monotonic() when its last sample arrived


class Cutter:
    """Mono audio at the model's rate in, a Window out each time a window end is reached:
    the first when `clip` samples have arrived, then every `hop` samples."""

    def __init__(self, clip: int, hop: int) -> None:
        self.ring, self.clip, self.hop, self.next_end = Ring(clip), clip, hop, clip

    def push(self, x: np.ndarray) -> Iterator[Window]:
        while len(x):
            take = min(len(x), self.next_end - self.ring.total)
            self.ring.write(x[:take])
            x = x[take:]
            if self.ring.total == self.next_end:
                yield Window(self.next_end - self.clip, self.ring.last(), time.monotonic())
                self.next_end += self.hop


# --- one stream --------------------------------------------------------------------------------


class StreamSession:
    def __init__(
        self,
        ws: WebSocket,
        classifier: Classifier,
        settings: Settings,
        metrics: StreamMetrics,
        config: StreamConfig,
        lease: Callable[[], contextlib.AbstractContextManager[Classifier]] | None = None,
    ) -> None:
        """`lease`: the model version for each scoring, resolved again every time, so a stream
        on a model's default version moves to a new version at a window boundary when the
        repository swaps (the events' `model` says which answered); None: `classifier` always."""
        self.ws, self.classifier, self.settings, self.metrics = ws, classifier, settings, metrics
        self.lease = lease or (lambda: contextlib.nullcontext(classifier))
        meta = classifier.meta
        self.rate = meta.sample_rate
        self.source_rate = config.sample_rate or self.rate
        self.top_k = config.top_k or settings.default_top_k
        self.hop = max(1, round(config.hop_s * self.rate))
        self.pcm = PcmDecoder(config.encoding, config.channels)
        self.resampler = (
            resampler(self.source_rate, self.rate) if self.source_rate != self.rate else None
        )
        self.cutter = Cutter(meta.clip_samples, self.hop)
        self.queue: asyncio.Queue[Window | None] = asyncio.Queue(settings.stream_queue_windows)
        self.started = time.monotonic()
        self.audio_s = 0.0  # seconds of audio received
        self.scored = self.skipped = self.skipped_unreported = 0
        self.stop_reason: Close | None = None  # set by `stop` (shutdown)
        self.receiver: asyncio.Task[None] | None = None

    # the receiving side: messages -> windows -> the bounded queue

    async def receive_audio(self) -> None:
        """Read messages until `{"type": "end"}`; raises Close or WebSocketDisconnect."""
        s = self.settings
        while True:
            left = s.stream_max_session_s - (time.monotonic() - self.started)
            if left <= 0:
                raise Close(SESSION_LIMIT, f"session limit reached ({s.stream_max_session_s:g} s)")
            try:
                message = await asyncio.wait_for(
                    self.ws.receive(), min(left, s.stream_idle_timeout_s)
                )
            except TimeoutError:
                if left > s.stream_idle_timeout_s:
                    idle = s.stream_idle_timeout_s
                    raise Close(IDLE_TIMEOUT, f"no message for {idle:g} s") from None
                continue  # the session limit, said at the top of the loop
            data = _payload(message, s.stream_max_frame_bytes)
            if isinstance(data, str):
                if _is_end(data):
                    await self._flush_resampler()
                    return
                raise Close(UNSUPPORTED_DATA, 'text after the config must be {"type": "end"}')
            await self._push(self.pcm.decode(data))

    async def _push(self, mono: np.ndarray) -> None:
        self.audio_s += len(mono) / self.source_rate
        if self.audio_s > self.settings.stream_max_session_s:
            limit = self.settings.stream_max_session_s
            raise Close(SESSION_LIMIT, f"session limit reached ({limit:g} s of audio)")
        if self.resampler is not None:
            mono = self.resampler.resample_chunk(mono, last=False)
        for window in self.cutter.push(mono):
            await self.queue.put(window)  # full: stop reading; the client's sends wait

    async def _flush_resampler(self) -> None:
        if self.resampler is not None:
            tail = self.resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            self.resampler = None
            for window in self.cutter.push(tail):
                await self.queue.put(window)

    # the scoring side: the queue -> the batcher -> events, in order

    async def score_windows(self) -> None:
        """Score queued windows (all that wait, as one job) until the None that ends them."""
        while True:
            windows, last = await self._take_waiting()
            if windows:
                await self._score(windows)
            if last:
                return

    async def _take_waiting(self) -> tuple[list[Window], bool]:
        first = await self.queue.get()
        windows = [] if first is None else [first]
        while windows and not self.queue.empty():
            w = self.queue.get_nowait()
            if w is None:
                return windows, True
            windows.append(w)
        return windows, first is None

    async def _score(self, windows: list[Window]) -> None:
        batch = np.stack([w.samples for w in windows])  # (W, clip)
        deadline = time.monotonic() + self.settings.request_timeout_s
        try:
            with self.lease() as c:  # Close (4404 / 1013) when the version is gone
                self.classifier = c
                job = c.batcher.submit(batch, deadline)  # admission as /v1/classify's
                try:
                    logits = await asyncio.wrap_future(job.future)  # (W, C)
                except asyncio.CancelledError:
                    job.abandon()
                    raise
        except ServiceError as e:  # saturated, past the deadline, or a failed batch
            log.debug("stream windows skipped: %s", e.message)
            self.skipped += len(windows)
            self.skipped_unreported += len(windows)
            self.metrics.windows.labels("skipped").inc(len(windows))
            return
        for w, row in zip(windows, logits, strict=True):
            await self.ws.send_json(self._event(w, row[None, :]))
            self.metrics.latency.observe(time.monotonic() - w.completed_at)
        self.metrics.windows.labels("scored").inc(len(windows))

    def _event(self, w: Window, logits: np.ndarray) -> dict[str, Any]:
        """A window's event: the classifier's own answer for this one 5 s window."""
        n = len(w.samples)
        audio = DecodedAudio(w.samples, self.rate, 1, "PCM stream", n / self.rate)
        answer = self.classifier.respond(
            Prepared(audio, w.samples[None, :], [0]), logits, self.top_k
        )
        self.scored += 1
        event = {
            "type": "window",
            "start_s": w.start / self.rate,
            "end_s": (w.start + n) / self.rate,
            "predictions": [p.model_dump() for p in answer.predictions],
            "model": answer.model.model_dump(),
            "skipped": self.skipped_unreported,  # windows skipped since the previous event
        }
        self.skipped_unreported = 0
        return event

    def summary(self, kind: str) -> dict[str, Any]:
        return {
            "type": kind,
            "windows": self.scored,
            "skipped": self.skipped,
            "audio_s": round(self.audio_s, 6),
        }

    # the session: both sides, then the final event and the close

    async def run(self) -> int:
        """Serve until the end, an error, a shutdown or the client going; the close code.
        Raises WebSocketDisconnect when the client went away."""
        scorer = asyncio.create_task(self.score_windows())
        self.receiver = asyncio.create_task(self.receive_audio())
        try:
            await asyncio.wait({self.receiver, scorer}, return_when=asyncio.FIRST_COMPLETED)
            close = self._outcome(self.receiver, scorer)
            if close.code in (NORMAL, SERVICE_RESTART):
                await self._finish(scorer, close)
            else:
                await self._fail(close)
            return close.code
        finally:  # whatever happened: no task of this stream outlives it, no job stays queued
            for task in (self.receiver, scorer):
                task.cancel()
            await asyncio.gather(self.receiver, scorer, return_exceptions=True)

    def _outcome(self, receiver: asyncio.Task[None], scorer: asyncio.Task[None]) -> Close:
        """How the session ends, from whichever side finished first."""
        if not receiver.done():  # the scorer failed: sending to a vanished client, or a bug
            error = scorer.exception()
            if isinstance(error, Close):  # the model version went away mid-stream
                return error
            if isinstance(error, WebSocketDisconnect | OSError | RuntimeError):
                raise WebSocketDisconnect(1006)
            log.error("stream scoring failed", exc_info=error)
            return Close(INTERNAL, "internal error")
        if receiver.cancelled():
            return self.stop_reason or Close(SERVICE_RESTART, "service restart: reconnect")
        error = receiver.exception()
        if error is None:
            return Close(NORMAL, "end of stream")
        if isinstance(error, WebSocketDisconnect):
            raise error
        if isinstance(error, Close):
            return error
        log.error("stream failed", exc_info=error)
        return Close(INTERNAL, "internal error")

    async def _finish(self, scorer: asyncio.Task[None], close: Close) -> None:
        """Score what is queued, send the final event, close with `close`'s code. At the
        client's end every window is waited for (each job ends by its deadline at the latest);
        on shutdown, up to stream_drain_timeout_s."""

        async def drain() -> None:
            await self.queue.put(None)
            await scorer

        timeout = None if close.code == NORMAL else self.settings.stream_drain_timeout_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drain(), timeout)
        kind = "end" if close.code == NORMAL else "closing"
        await self.ws.send_json({**self.summary(kind), "reason": close.reason})
        await _close(self.ws, close)

    async def _fail(self, close: Close) -> None:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await self.ws.send_json({"type": "error", "code": close.code, "message": close.reason})
        await _close(self.ws, close)

    def stop(self, close: Close) -> None:
        """Shutdown: stop reading; `run` flushes, sends the final event and closes."""
        self.stop_reason = close
        if self.receiver is not None:
            self.receiver.cancel()


def _payload(message: Mapping[str, Any], max_frame_bytes: int) -> bytes | str:
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1006))
    data = message.get("bytes")
    if data is not None:
        if len(data) > max_frame_bytes:
            raise Close(TOO_BIG, f"a message of {len(data)} bytes; the limit is {max_frame_bytes}")
        return data
    text = message.get("text") or ""
    if len(text) > MAX_TEXT_BYTES:
        raise Close(TOO_BIG, f"a text message over {MAX_TEXT_BYTES} bytes")
    return text


def _is_end(text: str) -> bool:
    try:
        return json.loads(text) == {"type": "end"}
    except ValueError:
        return False


async def _close(ws: WebSocket, close: Close) -> None:
    reason = close.reason.encode()[:CLOSE_REASON_BYTES].decode(errors="ignore")
    if ws.application_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close(close.code, reason)


# --- the open streams of one app -------------------------------------------------------------


class StreamRegistry:
    """`app.state.streams`: admission (max open streams) and the shutdown drain."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.metrics = StreamMetrics(registry)
        self.sessions: set[StreamSession] = set()
        self.tasks: set[asyncio.Task[Any]] = set()  # the handlers of open streams
        self.closing = False

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """A place among the open streams for the calling handler; Close(1013) when none."""
        limit = self.settings.stream_max_open
        if self.closing:
            raise Close(SERVICE_RESTART, "service restart: reconnect")
        if len(self.tasks) >= limit:
            raise Close(TRY_AGAIN_LATER, f"too many open streams ({limit}); retry later")
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.metrics.open.inc()
        try:
            yield
        finally:
            self.tasks.discard(task)
            self.metrics.open.dec()

    async def close_all(self) -> None:
        """Shutdown: every open stream flushes, gets a final event and closes with 1012."""
        self.closing = True
        for session in list(self.sessions):
            session.stop(Close(SERVICE_RESTART, "service restart: reconnect"))
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=self.settings.stream_drain_timeout_s + 5)


class DrainingServer(uvicorn.Server):
    """uvicorn closes open WebSockets (1012) before the app's lifespan hears of a shutdown, so
    `close_all` in the lifespan would find them gone: this server drains the streams first
    (final events, then 1012 from us), then shuts down as uvicorn does."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        streams = getattr(getattr(self.config.app, "state", None), "streams", None)
        if isinstance(streams, StreamRegistry):
            await streams.close_all()
        await super().shutdown(sockets)


def attach_streams(app: FastAPI) -> StreamRegistry:
    """Route /v1/stream and keep the open streams at `app.state.streams` (the lifespan calls
    its `close_all` on shutdown)."""
    app.state.streams = StreamRegistry(app.state.settings, app.state.metrics.registry)
    app.include_router(stream_router)
    return app.state.streams


# --- the routes --------------------------------------------------------------------------------

stream_router = APIRouter()


@stream_router.websocket("/v1/stream")
async def stream(websocket: WebSocket) -> None:
    await serve_stream(websocket, None, None)


@stream_router.websocket("/v1/models/{name}/stream")
async def model_stream(websocket: WebSocket, name: str) -> None:
    await serve_stream(websocket, name, None)


@stream_router.websocket("/v1/models/{name}/versions/{version}/stream")
async def version_stream(websocket: WebSocket, name: str, version: str) -> None:
    await serve_stream(websocket, name, version)


async def serve_stream(ws: WebSocket, name: str | None, version: str | None) -> None:
    """Accept, check, admit, configure, run; every refusal is a close code with a reason."""
    streams: StreamRegistry = ws.app.state.streams
    offered = ws.scope.get("subprotocols") or []
    await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    code = 1006  # the connection dropped, unless something below says otherwise
    try:
        _check_token(ws, streams.settings)
        with streams.slot():
            with _leased(ws.app, name, version) as classifier:  # 4404 / 1013 at once
                config = await _read_config(ws, streams.settings)
                session = StreamSession(
                    ws,
                    classifier,
                    streams.settings,
                    streams.metrics,
                    config,
                    lambda: _leased(ws.app, name, version),
                )
                await ws.send_json(_start_event(session, config))
            streams.sessions.add(session)
            try:
                code = await session.run()
            finally:
                streams.sessions.discard(session)
    except Close as close:
        code = close.code
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.send_json({"type": "error", "code": close.code, "message": close.reason})
        await _close(ws, close)
    except WebSocketDisconnect as gone:
        code = gone.code  # the client's close code; 1006 when it vanished without one
    finally:
        streams.metrics.closed.labels(str(code)).inc()


def _check_token(ws: WebSocket, settings: Settings) -> None:
    """The classify routes' bearer token: the Authorization header on the upgrade, or (for
    browsers, which cannot set headers on a WebSocket) a subprotocol bearer.<base64url>."""
    if settings.api_token is None:
        return
    given = b""
    header = ws.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        given = header[7:].strip().encode()
    for p in ws.scope.get("subprotocols") or []:
        if p.startswith(BEARER_PROTOCOL):
            encoded = p[len(BEARER_PROTOCOL) :]
            with contextlib.suppress(binascii.Error, ValueError):
                given = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    if not hmac.compare_digest(given, settings.api_token.get_secret_value().encode()):
        raise Close(POLICY, "unauthorized: missing or wrong bearer token")


@contextlib.contextmanager
def _leased(app: FastAPI, name: str | None, version: str | None) -> Iterator[Classifier]:
    """The classifier that answers, its version kept loaded while the stream is open (as a
    classify request's lease); Close(4404) for an unknown model, 1013 while not ready."""
    repository = getattr(app.state, "repository", None)
    if not getattr(app.state, "accepting", False) or repository is None:
        raise Close(TRY_AGAIN_LATER, "the service is starting or draining; retry later")
    with contextlib.ExitStack() as stack:
        try:  # only resolving the version is a close; errors inside (a full queue) are not
            mv = stack.enter_context(repository.lease(name, version))
        except ServiceError as e:
            code = MODEL_NOT_FOUND if e.status == 404 else TRY_AGAIN_LATER
            raise Close(code, e.message) from None
        assert mv.classifier is not None
        yield mv.classifier


async def _read_config(ws: WebSocket, settings: Settings) -> StreamConfig:
    try:
        message = await asyncio.wait_for(ws.receive(), settings.stream_idle_timeout_s)
    except TimeoutError:
        raise Close(IDLE_TIMEOUT, "no config message") from None
    text = _payload(message, settings.stream_max_frame_bytes)
    if not isinstance(text, str):
        raise Close(UNSUPPORTED_DATA, "the first message must be the JSON config, as text")
    try:
        config = StreamConfig.model_validate_json(text)
    except ValidationError as e:
        parts = [
            f"{'.'.join(str(x) for x in err['loc']) or 'config'}: {err['msg']}"
            for err in e.errors()
        ]
        raise Close(INVALID_DATA, "bad config: " + "; ".join(parts)) from None
    if config.sample_rate is not None and config.sample_rate > settings.max_source_rate:
        raise Close(
            INVALID_DATA, f"bad config: sample_rate over the limit ({settings.max_source_rate} Hz)"
        )
    if config.hop_s < settings.stream_min_hop_s:
        raise Close(
            INVALID_DATA, f"bad config: hop_s under the minimum ({settings.stream_min_hop_s:g} s)"
        )
    return config


def _start_event(session: StreamSession, config: StreamConfig) -> dict[str, Any]:
    c = session.classifier
    return {
        "type": "start",
        "model": c.ref.model_dump(),
        "labels": list(c.meta.labels),
        "sample_rate": session.source_rate,
        "channels": config.channels,
        "encoding": config.encoding,
        "hop_s": session.hop / session.rate,
        "window_s": c.meta.clip_samples / session.rate,
        "top_k": session.top_k,
    }
