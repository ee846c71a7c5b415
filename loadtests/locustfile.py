"""Locust traffic for the ESC-50 service: real clips of several formats and lengths.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000          (web UI)
    bash loadtests/run.sh                                                     (headless + SLO gate)

The clip pool: real ESC-50 clips (flac/ogg, 5 s, 44.1 kHz) from $ESC50_AUDIO_DIR or
../shared/esc50/audio when present, the small bundled clips in loadtests/clips (1-12 s,
8-32 kHz, mono/stereo, flac/ogg), and WAVs made here at start (stdlib only, so the file also
runs in the stock locustio/locust image). In headless mode the run exits non-zero when the SLO
(--slo-max-fail-ratio, --slo-p95-ms) is missed.
"""

from __future__ import annotations

import logging
import random

from locust import FastHttpUser, between, events, task
from traffic import Clip, check_prediction, describe_failure, load_clips, multipart_body

CLIPS = load_clips()
log = logging.getLogger("esc50.locust")


class ServiceUser(FastHttpUser):
    """One client: mostly single real clips, some uploads, long clips, metadata and probes."""

    wait_time = between(0.05, 0.5)

    def _classify(self, clip: Clip, top_k: int, multipart: bool = False) -> None:
        name = f"/classify [{clip.name}{' multipart' if multipart else ''}]"
        body, content_type = clip.body, clip.content_type
        if multipart:
            suffix = clip.name.split("-")[0]
            body, content_type = multipart_body("file", f"clip.{suffix}", body, content_type)
        url = f"/classify?top_k={top_k}"
        headers = {"Content-Type": content_type}
        with self.client.post(
            url, data=body, headers=headers, name=name, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(describe_failure(resp))
            elif problem := check_prediction(resp, top_k):
                resp.failure(problem)

    @task(12)
    def classify_real(self) -> None:
        self._classify(random.choice(CLIPS["real"]), top_k=5)

    @task(3)
    def classify_other(self) -> None:
        self._classify(random.choice(CLIPS["other"]), top_k=3)

    @task(2)
    def classify_multipart(self) -> None:
        self._classify(random.choice(CLIPS["real"]), top_k=1, multipart=True)

    @task(2)
    def classify_long(self) -> None:
        self._classify(random.choice(CLIPS["long"]), top_k=5)

    @task(1)
    def classify_garbage(self) -> None:
        """A client bug: not audio. The answer must be a 4xx with the JSON error shape."""
        headers = {"Content-Type": "application/octet-stream"}
        with self.client.post(
            "/classify",
            data=b"not audio" * 100,
            headers=headers,
            name="/classify [invalid]",
            catch_response=True,
        ) as resp:
            if resp.status_code not in (400, 415, 422):
                resp.failure(f"expected a 4xx for non-audio, got {resp.status_code}")
            elif "error" not in (resp.json() or {}):
                resp.failure("4xx without the error shape")
            else:
                resp.success()

    @task(1)
    def models(self) -> None:
        with self.client.get("/v1/models", catch_response=True) as resp:
            if resp.status_code != 200 or not resp.json():
                resp.failure(f"HTTP {resp.status_code}")

    @task(1)
    def ready(self) -> None:
        self.client.get("/readyz")


@events.init_command_line_parser.add_listener
def _slo_args(parser) -> None:
    slo = parser.add_argument_group("SLO gate (headless runs exit 1 when missed)")
    slo.add_argument(
        "--slo-max-fail-ratio",
        type=float,
        default=0.01,
        env_var="LOCUST_SLO_MAX_FAIL_RATIO",
        help="largest acceptable share of failed requests",
    )
    slo.add_argument(
        "--slo-p95-ms",
        type=float,
        default=2000.0,
        env_var="LOCUST_SLO_P95_MS",
        help="largest acceptable p95 latency over all requests, ms",
    )


@events.quitting.add_listener
def _slo_gate(environment, **_kwargs) -> None:
    """Set the exit code from the SLO, which Locust alone knows nothing about (latency)."""
    opts = environment.parsed_options
    if opts is None or not opts.headless:
        return
    total = environment.stats.total
    p95 = total.get_response_time_percentile(0.95) or 0.0
    verdicts = [
        (total.num_requests > 0, f"requests {total.num_requests} > 0"),
        (
            total.fail_ratio <= opts.slo_max_fail_ratio,
            f"failure ratio {total.fail_ratio:.4f} <= {opts.slo_max_fail_ratio}",
        ),
        (p95 <= opts.slo_p95_ms, f"p95 {p95:.0f} ms <= {opts.slo_p95_ms:.0f} ms"),
    ]
    exceptions = len(environment.runner.exceptions) if environment.runner else 0
    verdicts.append((exceptions == 0, f"locustfile exceptions {exceptions} == 0"))
    for ok, what in verdicts:
        log.info("SLO %s: %s", "ok  " if ok else "MISS", what)
    # Failures within the SLO are not an error here (Locust alone would exit 1 on any failure).
    environment.process_exit_code = 0 if all(ok for ok, _ in verdicts) else 1
