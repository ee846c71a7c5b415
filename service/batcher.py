"""Dynamic batching: requests' windows share batches; inference runs in one worker thread.

The event loop submits a Job (a request's windows) and awaits its future. The worker takes
windows from the head of the queue until `max_batch_size` or until `max_wait_s` has passed
since it started the batch, so one request's windows can span batches and one batch can hold
windows of many requests. Guarantees:
  - a full queue is an immediate `Overloaded` (503), never a hang. Full means `max_queue_size`
    requests, or an expected wait over `max_queue_wait_s` (the windows ahead times the measured
    inference time per window), so accepted requests finish well inside their deadline;
  - `admit()` takes a place in the queue before the upload is read and decoded: a request
    that would be refused costs no body read, no decode and no resample;
  - jobs whose client went away, or whose deadline passed while queued, are dropped unrun;
  - a backend exception fails exactly the jobs in that batch and the loop carries on;
  - `stop()` stops taking new work and drains what is queued.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import DeadlineExceeded, InferenceFailed, Overloaded
from service.metrics import Metrics, VersionMetrics
from service.observability import tracing

log = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], np.ndarray]  # (B, clip) float32 -> (B, C) float32


@dataclass(eq=False)
class Job:
    windows: np.ndarray  # (W, clip_samples) float32
    deadline: float  # time.monotonic() after which nobody wants the answer
    future: Future[np.ndarray] = field(default_factory=Future)  # -> (W, C) logits
    enqueued_at: float = field(default_factory=time.monotonic)
    taken: int = 0  # windows handed to batches (worker only, under the lock)
    done: int = 0  # windows with logits (worker only)
    logits: np.ndarray | None = None
    abandoned: bool = False  # set by the event loop when the client goes away
    trace: Any = None  # tracing.JobTrace while tracing is on: its spans, after each batch

    @property
    def remaining(self) -> int:
        return len(self.windows) - self.taken

    def abandon(self) -> None:
        self.abandoned = True
        self.future.cancel()


Slice = tuple[Job, int, int]  # (job, first window, end window) inside one batch


class Admission:
    """A place in the queue held while the request's upload is read and decoded."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher: Batcher | None = batcher

    def release(self) -> None:
        """Give the place back (submitted, or failed before it). Idempotent."""
        if self._batcher is not None:
            self._batcher._release()
            self._batcher = None


class Batcher:
    def __init__(
        self,
        predict: Predict,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_size: int,
        max_queue_wait_s: float = float("inf"),
        metrics: VersionMetrics | None = None,
    ) -> None:
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self.max_queue_wait_s = max_queue_wait_s
        self.metrics = metrics or Metrics().for_version("model", "1")
        self._pending: deque[Job] = deque()
        self._pending_windows = 0
        self._admitted = 0  # requests holding an Admission: upload still being read/decoded
        self._running = 0  # windows in the batch being inferred now (worker only)
        # moving averages of inference seconds per window (0: unmeasured), over all batches and
        # over batches at least half full: a queue drains in full batches, which cost less
        self._window_s = {"any": 0.0, "full": 0.0}
        self._windows_per_job = 1.0  # moving average of windows per request
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self.metrics.queue_depth.set_function(lambda: len(self._pending))

    def start(self) -> None:
        self._thread.start()

    def admit(self) -> Admission:
        """Hold a place for a request not read yet; Overloaded (503) at once if the queue is
        full by count or by expected wait. Release it, or pass it to `submit`."""
        with self._cond:
            self._refuse_if_full(1)
            self._admitted += 1
        return Admission(self)

    def expected_wait_s(self, extra_jobs: int = 0) -> float:
        """Seconds until a request queued now would start: windows ahead x time per window
        (lock held). 0 until the first batch has been timed."""
        ahead = self._pending_windows + self._running
        unread = (self._admitted + extra_jobs) * self._windows_per_job
        return (ahead + unread) * (self._window_s["full"] or self._window_s["any"])

    def submit(
        self,
        windows: np.ndarray,
        deadline: float,
        admission: Admission | None = None,
        trace: Any = None,
    ) -> Job:
        """Queue a request's windows. Without an `admission`, raises Overloaded at once if the
        queue is full; with one, the place it holds is used."""
        job = Job(windows, deadline, trace=trace)
        with self._cond:
            if admission is None:
                self._refuse_if_full(1)
            elif self._stopping:
                self._refuse("shutting_down", "the service is shutting down")
            self._pending.append(job)
            self._pending_windows += len(windows)
            self._windows_per_job += 0.1 * (len(windows) - self._windows_per_job)
            if admission is not None:  # the place becomes the job (the Condition's lock is an
                admission.release()  # RLock): never counted twice
            self._cond.notify()
        return job

    def _refuse_if_full(self, newcomers: int) -> None:
        """Raise Overloaded if `newcomers` more requests would overfill the queue (lock held)."""
        if self._stopping:
            self._refuse("shutting_down", "the service is shutting down")
        if len(self._pending) + self._admitted + newcomers > self.max_queue_size:
            self._refuse(
                "queue_full", f"the inference queue is full ({self.max_queue_size} requests)"
            )
        wait = self.expected_wait_s(newcomers - 1)
        if wait > self.max_queue_wait_s:
            self._refuse(
                "queue_wait",
                f"the inference queue is full (expected wait {wait:.1f} s, limit "
                f"{self.max_queue_wait_s:g} s)",
            )

    def _refuse(self, reason: str, message: str) -> None:
        self.metrics.rejected.labels(reason).inc()
        raise Overloaded(message)

    def _release(self) -> None:
        with self._cond:
            self._admitted -= 1

    def stop(self, timeout: float) -> None:
        """Refuse new work, finish what is queued (up to `timeout` seconds), stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:  # whatever the drain did not reach
            for job in self._pending:
                _fail(job, Overloaded("the service shut down before this request ran"))
            self._pending.clear()

    # --- worker thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _collect(self) -> list[Slice] | None:
        """Block for work; None means stopped and drained."""
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            batch_until = time.monotonic() + self.max_wait_s
            while self._pending_windows < self.max_batch_size and not self._stopping:
                left = batch_until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._take()

    def _take(self) -> list[Slice]:
        """Pop up to max_batch_size windows from the head, dropping dead jobs (lock held)."""
        batch: list[Slice] = []
        room, now = self.max_batch_size, time.monotonic()
        while self._pending and room > 0:
            job = self._pending[0]
            if job.abandoned or job.future.done() or (job.taken == 0 and now > job.deadline):
                self._drop(job, now)
                continue
            if job.taken == 0:
                if not job.future.set_running_or_notify_cancel():
                    self._drop(job, now)
                    continue
                self.metrics.queue_latency.observe(now - job.enqueued_at)
            n = min(room, job.remaining)
            batch.append((job, job.taken, job.taken + n))
            job.taken += n
            room -= n
            self._pending_windows -= n
            if job.remaining == 0:
                self._pending.popleft()
        return batch

    def _drop(self, job: Job, now: float) -> None:
        self._pending.popleft()
        self._pending_windows -= job.remaining
        if job.future.cancelled() or (job.abandoned and not job.future.done()):
            self.metrics.dropped.labels("client_gone").inc()
        elif not job.future.done():  # (failed jobs are done: their other windows just go)
            self.metrics.dropped.labels("deadline").inc()
            _fail(job, DeadlineExceeded("the request waited past its deadline"))

    def _run(self, batch: list[Slice]) -> None:
        try:
            x = np.concatenate([job.windows[a:b] for job, a, b in batch])  # (B, clip)
            self._running = len(x)
            t0 = time.perf_counter()
            y = self.predict(x)  # (B, C)
            took = time.perf_counter() - t0
            self.metrics.inference_latency.observe(took)
            if y.ndim != 2 or y.shape[0] != x.shape[0]:
                raise RuntimeError(f"backend returned {y.shape} for a batch of {x.shape[0]}")
            self._timed(took / len(x), len(x))
        except Exception:
            log.exception("inference failed on a batch of %d requests", len(batch))
            self.metrics.batch_failures.inc()
            for job, _, _ in batch:  # a failed job's later windows are dropped by _take
                _fail(job, InferenceFailed("inference failed"))
            return
        finally:
            self._running = 0
        self.metrics.batch_size.observe(len(x))
        self._scatter(batch, y)
        tracing.record_batch(batch, len(x), took)  # after the answers: delays none of them

    def _timed(self, window_s: float, windows: int) -> None:
        """Fold one batch's seconds per window into the averages the admission uses."""
        kinds = ["any", "full"] if 2 * windows >= self.max_batch_size else ["any"]
        for kind in kinds:
            old = self._window_s[kind]
            self._window_s[kind] = old + 0.2 * (window_s - old) if old else window_s

    def _scatter(self, batch: list[Slice], y: np.ndarray) -> None:
        row = 0
        for job, a, b in batch:
            if job.logits is None:
                job.logits = np.empty((len(job.windows), y.shape[1]), dtype=np.float32)
            job.logits[a:b] = y[row : row + b - a]
            row += b - a
            job.done += b - a
            if job.done == len(job.windows):
                _resolve(job, job.logits)


def _resolve(job: Job, logits: np.ndarray) -> None:
    with contextlib.suppress(InvalidStateError):  # cancelled meanwhile: the client went away
        job.future.set_result(logits)


def _fail(job: Job, exc: Exception) -> None:
    try:
        if not job.future.done():
            job.future.set_exception(exc)
    except InvalidStateError:
        pass
