"""service.batcher with a fake backend: packing, isolation of failures, drops, overload, drain."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from service.batcher import Batcher
from service.errors import DeadlineExceeded, InferenceFailed, Overloaded
from service.metrics import Metrics

MV = {"model": "m", "version": "1"}  # the labels of the batcher's metrics here

CLIP = 4  # fake windows of 4 samples; the fake model's "logits" are the window sums


class FakeModel:
    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay = delay
        self.fail_on: set[int] = set()  # call numbers that raise
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.gate.wait(5)
        call = len(self.batches)
        self.batches.append(len(x))
        time.sleep(self.delay)
        if call in self.fail_on:
            raise RuntimeError("boom")
        return np.stack([x.sum(axis=1), -x.sum(axis=1)], axis=1)  # (B, 2)


def windows(n: int, value: float) -> np.ndarray:
    return np.full((n, CLIP), value, dtype=np.float32)


def make(model: FakeModel, **kw) -> Batcher:
    opts = {"max_batch_size": 4, "max_wait_s": 0.05, "max_queue_size": 16, **kw}
    b = Batcher(model, metrics=Metrics().for_version("m", "1"), **opts)
    b.start()
    return b


def far() -> float:
    return time.monotonic() + 10


def test_windows_of_several_requests_share_batches_and_split_across_them() -> None:
    model = FakeModel()
    model.gate.clear()  # hold the worker until everything is queued
    b = make(model)
    jobs = [b.submit(windows(n, v), far()) for n, v in [(1, 1.0), (3, 2.0), (6, 3.0)]]
    model.gate.set()
    results = [j.future.result(5) for j in jobs]
    b.stop(5)
    assert sum(model.batches) == 10 and max(model.batches) == 4
    assert len(model.batches) <= 4  # 10 windows in batches of up to 4 (first may be short)
    for r, (n, v) in zip(results, [(1, 1.0), (3, 2.0), (6, 3.0)], strict=True):
        np.testing.assert_array_equal(r, np.tile([[4 * v, -4 * v]], (n, 1)))


def test_a_failing_batch_fails_exactly_its_jobs_and_the_loop_goes_on() -> None:
    model = FakeModel()
    model.gate.clear()
    model.fail_on = {0}
    b = make(model, max_batch_size=2)
    first = [b.submit(windows(1, 1.0), far()) for _ in range(2)]  # batch 0: fails
    second = [b.submit(windows(1, 2.0), far()) for _ in range(2)]  # batch 1: fine
    model.gate.set()
    for j in first:
        with pytest.raises(InferenceFailed):
            j.future.result(5)
    for j in second:
        np.testing.assert_array_equal(j.future.result(5), [[8.0, -8.0]])
    assert b.submit(windows(1, 1.0), far()).future.result(5).shape == (1, 2)  # still alive
    assert b.metrics.registry.get_sample_value("esc50_batch_failures_total", MV) == 1
    b.stop(5)


def test_abandoned_and_expired_jobs_are_dropped_unrun() -> None:
    model = FakeModel()
    model.gate.clear()
    b = make(model, max_batch_size=8)
    blocker = b.submit(windows(1, 1.0), far())
    time.sleep(0.1)  # the worker is now inside the model with the blocker
    gone = b.submit(windows(1, 2.0), far())
    expired = b.submit(windows(1, 3.0), time.monotonic() + 0.01)
    kept = b.submit(windows(1, 4.0), far())
    gone.abandon()
    time.sleep(0.05)
    model.gate.set()
    blocker.future.result(5)
    np.testing.assert_array_equal(kept.future.result(5), [[16.0, -16.0]])
    with pytest.raises(CancelledError):
        gone.future.result(5)
    with pytest.raises(DeadlineExceeded):
        expired.future.result(5)
    assert model.batches == [1, 1]  # only the blocker and `kept` ran
    dropped = [
        b.metrics.registry.get_sample_value("esc50_requests_dropped_total", {**MV, "reason": r})
        for r in ("client_gone", "deadline")
    ]
    assert dropped == [1, 1]
    b.stop(5)


def test_full_queue_is_an_immediate_overload() -> None:
    model = FakeModel()
    model.gate.clear()
    b = make(model, max_queue_size=2)
    b.submit(windows(1, 1.0), far())
    time.sleep(0.1)  # taken by the worker: no longer queued
    queued = [b.submit(windows(1, 1.0), far()) for _ in range(2)]
    t0 = time.perf_counter()
    with pytest.raises(Overloaded, match="queue is full"):
        b.submit(windows(1, 1.0), far())
    assert time.perf_counter() - t0 < 0.01
    model.gate.set()
    assert all(j.future.result(5).shape == (1, 2) for j in queued)
    b.stop(5)


def test_stop_drains_queued_work_then_refuses() -> None:
    model = FakeModel(delay=0.02)
    b = make(model, max_batch_size=2)
    jobs = [b.submit(windows(1, float(i)), far()) for i in range(8)]
    b.stop(5)
    assert [j.future.result(0)[0, 0] for j in jobs] == [4.0 * i for i in range(8)]
    with pytest.raises(Overloaded, match="shutting down"):
        b.submit(windows(1, 1.0), far())


def test_wrong_output_count_fails_the_batch() -> None:
    b = make(lambda x: np.zeros((len(x) + 1, 2), np.float32))
    with pytest.raises(InferenceFailed):
        b.submit(windows(2, 1.0), far()).future.result(5)
    b.stop(5)


def test_admission_holds_a_place_before_the_upload_is_read() -> None:
    """Admitted requests (body not read yet) count against the queue; a refusal is at once."""
    model = FakeModel()
    model.gate.clear()
    b = make(model, max_queue_size=2)
    first, second = b.admit(), b.admit()
    with pytest.raises(Overloaded, match="queue is full"):
        b.admit()
    second.release()
    second.release()  # idempotent: gives back one place, not two
    job = b.submit(windows(1, 1.0), far(), first)  # the place becomes a queued job
    time.sleep(0.1)  # taken by the worker: no longer queued
    later = [b.admit(), b.admit()]
    with pytest.raises(Overloaded, match="queue is full"):
        b.admit()
    for admission in later:
        admission.release()
    model.gate.set()
    assert job.future.result(5).shape == (1, 2)
    b.stop(5)


def test_queue_is_bounded_by_expected_wait() -> None:
    """After timing batches, the admission refuses once the windows ahead would take longer
    than max_queue_wait_s, whatever the count; and lets requests in again as the queue drains."""
    model = FakeModel(delay=0.05)  # 4-window batches: ~12 ms per window
    metrics = Metrics().for_version("m", "1")
    opts = {"max_batch_size": 4, "max_wait_s": 0.0, "max_queue_size": 100}
    b = Batcher(model, max_queue_wait_s=0.2, metrics=metrics, **opts)
    b.start()
    b.submit(windows(4, 1.0), far()).future.result(5)  # one timed batch
    model.gate.clear()
    jobs, refused = [], 0
    for _ in range(40):
        try:
            jobs.append(b.submit(windows(4, 1.0), far()))
        except Overloaded as e:
            assert "expected wait" in str(e)
            refused += 1
    assert 2 <= len(jobs) <= 6 and refused == 40 - len(jobs)  # ~0.2 s of 50 ms batches
    assert metrics.rejected.labels("queue_wait")._value.get() == refused
    model.gate.set()
    assert all(j.future.result(5).shape == (4, 2) for j in jobs)
    b.admit().release()  # drained: admitted again
    b.stop(5)


def test_expected_wait_uses_the_cost_of_full_batches() -> None:
    """A queue drains in full batches: one slow single-window batch (light load) does not make
    the admission overestimate the wait once full batches have been timed."""
    model = FakeModel(delay=0.04)  # 40 ms a call: 40 ms per window alone, 10 ms in fours
    b = make(model, max_wait_s=0.0)
    b.submit(windows(1, 1.0), far()).future.result(5)
    assert b.expected_wait_s(extra_jobs=4) == pytest.approx(4 * 0.04, rel=0.5)
    b.submit(windows(4, 1.0), far()).future.result(5)
    assert b.expected_wait_s(extra_jobs=4) == pytest.approx(4 * 0.01, rel=0.5)
    b.stop(5)
