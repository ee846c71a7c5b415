"""Dynamic batching: requests' windows share batches; inference runs in one worker thread.

The event loop submits a Job (a request's windows) and awaits its future. The worker takes
windows from the head of the queue until `max_batch_size` or until `max_wait_s` has passed
since it started the batch, so one request's windows can span batches and one batch can hold
windows of many requests. Guarantees:
  - a full queue is an immediate `Overloaded` (503), never a hang;
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

import numpy as np

from service.errors import DeadlineExceeded, InferenceFailed, Overloaded
from service.metrics import Metrics

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

    @property
    def remaining(self) -> int:
        return len(self.windows) - self.taken

    def abandon(self) -> None:
        self.abandoned = True
        self.future.cancel()


Slice = tuple[Job, int, int]  # (job, first window, end window) inside one batch


class Batcher:
    def __init__(
        self,
        predict: Predict,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_size: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self.metrics = metrics or Metrics()
        self._pending: deque[Job] = deque()
        self._pending_windows = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self.metrics.queue_depth.set_function(lambda: len(self._pending))

    def start(self) -> None:
        self._thread.start()

    def submit(self, windows: np.ndarray, deadline: float) -> Job:
        """Queue a request's windows. Raises Overloaded at once if the queue is full."""
        job = Job(windows, deadline)
        with self._cond:
            if self._stopping:
                self.metrics.rejected.labels("shutting_down").inc()
                raise Overloaded("the service is shutting down")
            if len(self._pending) >= self.max_queue_size:
                self.metrics.rejected.labels("queue_full").inc()
                raise Overloaded(f"the inference queue is full ({self.max_queue_size} requests)")
            self._pending.append(job)
            self._pending_windows += len(windows)
            self._cond.notify()
        return job

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
            t0 = time.perf_counter()
            y = self.predict(x)  # (B, C)
            self.metrics.inference_latency.observe(time.perf_counter() - t0)
            if y.ndim != 2 or y.shape[0] != x.shape[0]:
                raise RuntimeError(f"backend returned {y.shape} for a batch of {x.shape[0]}")
        except Exception:
            log.exception("inference failed on a batch of %d requests", len(batch))
            self.metrics.batch_failures.inc()
            for job, _, _ in batch:  # a failed job's later windows are dropped by _take
                _fail(job, InferenceFailed("inference failed"))
            return
        self.metrics.batch_size.observe(len(x))
        self._scatter(batch, y)

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
