"""The traffic the load test sends: a pool of clips and the checks on answers. No Locust import,
so the tests can use it without gevent's monkey-patching."""

from __future__ import annotations

import io
import logging
import math
import os
import random
import struct
import uuid
import wave
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_AUDIO_DIR = HERE.parent.parent / "shared" / "esc50" / "audio"
MAX_REAL_CLIPS = 60  # enough variety; keeps the pool's memory small
CONTENT_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg"}
log = logging.getLogger("esc50.loadtest")


@dataclass(frozen=True)
class Clip:
    name: str  # the stats group, e.g. "flac" or "wav-long"
    body: bytes
    content_type: str


def make_wav(seconds: float, sr: int, channels: int = 1, freq: float = 330.0) -> bytes:
    """16-bit PCM WAV of a tone, built with the standard library."""
    n = int(seconds * sr)
    frame = [int(8000 * math.sin(2 * math.pi * freq * i / sr)) for i in range(n)]
    samples = [s for s in frame for _ in range(channels)]
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(struct.pack(f"<{len(samples)}h", *samples))
    return buf.getvalue()


def multipart_body(field: str, filename: str, body: bytes, content_type: str) -> tuple[bytes, str]:
    """A one-file multipart/form-data body and its Content-Type (FastHttpUser has no files=)."""
    boundary = "esc50-locust-" + uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"'
        f"\r\nContent-Type: {content_type}\r\n\r\n"
    )
    data = head.encode() + body + f"\r\n--{boundary}--\r\n".encode()
    return data, f"multipart/form-data; boundary={boundary}"


def _file_clip(path: Path, group: str) -> Clip:
    return Clip(group, path.read_bytes(), CONTENT_TYPES[path.suffix])


def load_clips() -> dict[str, list[Clip]]:
    """Clips by kind: `real` (ESC-50), `other` (other rates/lengths/formats), `long` (> 5 s)."""
    audio_dir = Path(os.environ.get("ESC50_AUDIO_DIR", DEFAULT_AUDIO_DIR))
    real = sorted(p for p in audio_dir.glob("*") if p.suffix in CONTENT_TYPES)
    real = random.Random(0).sample(real, min(MAX_REAL_CLIPS, len(real)))
    bundled = sorted((HERE / "clips").glob("*.*"))
    clips: dict[str, list[Clip]] = {"real": [], "other": [], "long": []}
    for p in real:
        clips["real"].append(_file_clip(p, p.suffix[1:]))
    for p in bundled:
        long = "-8s-" in p.name or "-12s-" in p.name
        clips["long" if long else "other"].append(_file_clip(p, f"{p.suffix[1:]}-bundled"))
    clips["other"].append(Clip("wav", make_wav(2.0, 16000), "audio/wav"))
    clips["long"].append(Clip("wav-long", make_wav(15.0, 22050, channels=2), "audio/wav"))
    if not clips["real"]:
        log.warning("no ESC-50 clips under %s: real-clip traffic uses bundled clips", audio_dir)
        clips["real"] = clips["other"]
    return clips


def describe_failure(resp) -> str:
    """The status and the service's error code; the connection error when there was no answer."""
    if not resp.status_code:
        return f"no response: {resp.error!r}"
    return f"HTTP {resp.status_code}: {(resp.text or '')[:120]}"


def check_prediction(resp, top_k: int) -> str | None:
    """None when a 200 /classify answer has the documented shape, else what is wrong."""
    try:
        doc = resp.json()
    except ValueError:
        return "body is not JSON"
    preds = doc.get("predictions") if isinstance(doc, dict) else None
    if not isinstance(preds, list) or not 1 <= len(preds) <= top_k:
        return f"expected 1..{top_k} predictions, got {str(doc)[:200]}"
    if not all(isinstance(p.get("label"), str) for p in preds):
        return "a prediction has no label"
    probs = [p.get("probability") for p in preds]
    if not all(isinstance(x, float | int) and 0.0 <= x <= 1.0 for x in probs):
        return f"probabilities outside [0, 1]: {probs}"
    if probs != sorted(probs, reverse=True):
        return f"predictions not most probable first: {probs}"
    windows = doc.get("windows")
    if not isinstance(windows, int) or windows < 1:
        return f"bad window count {windows!r}"
    if windows > 1 and len(doc.get("timeline") or []) != windows:
        return "a multi-window answer without one timeline entry per window"
    return None
