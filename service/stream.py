"""Stream an audio file to `WS /v1/stream` and print the events (docs/streams.md).

    python -m service.stream clip.wav --url ws://127.0.0.1:8000/v1/stream [--fast] [--hop 1.0]

Decodes with libsndfile (any format the service reads), sends 16-bit PCM at the file's own
rate and channels in 0.1 s messages, at real time (default) or as fast as the service takes
it (`--fast`), then `{"type": "end"}`. One line per window: its span and top labels. Exit
status: 0 after a normal end, 1 when the service closed with another code. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

import numpy as np
import soundfile as sf
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

CHUNK_S = 0.1  # seconds of audio per message


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    x, rate = sf.read(args.file, dtype="int16", always_2d=True)  # (n, channels)
    config = {"sample_rate": rate, "channels": x.shape[1], "encoding": "pcm_s16le"}
    config |= {"hop_s": args.hop, "top_k": args.top_k}
    if x.shape[1] > 2:
        x, config["channels"] = x[:, :2], 2  # the protocol takes mono or stereo
    token = args.token or os.environ.get("ESC50_API_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with connect(args.url, additional_headers=headers, max_size=None) as ws:
        ws.send(json.dumps(config))
        printer = threading.Thread(target=print_events, args=(ws, args.json), daemon=True)
        printer.start()
        send_audio(ws, np.ascontiguousarray(x), rate, realtime=not args.fast)
        printer.join()
    print(f"closed: {ws.close_code} {ws.close_reason}", file=sys.stderr)
    return 0 if ws.close_code == 1000 else 1


def send_audio(ws: ClientConnection, x: np.ndarray, rate: int, realtime: bool) -> None:
    step, t0 = max(1, round(CHUNK_S * rate)), time.monotonic()
    try:
        for i in range(0, len(x), step):
            if realtime:  # the message leaves when its last sample would have been recorded
                time.sleep(max(0.0, t0 + (i + step) / rate - time.monotonic()))
            ws.send(x[i : i + step].astype("<i2").tobytes())
        ws.send(json.dumps({"type": "end"}))
    except ConnectionClosed:
        pass  # the service closed early: the printer shows why


def print_events(ws: ClientConnection, raw: bool) -> None:
    try:
        for message in ws:
            event = json.loads(message)
            print(json.dumps(event) if raw else describe(event), flush=True)
    except ConnectionClosed:
        pass


def describe(e: dict[str, Any]) -> str:
    kind = e.get("type")
    if kind == "start":
        m = e["model"]
        return (
            f"model {m['name']} version {m['version']} ({m['variant']}), "
            f"{e['window_s']:g} s windows every {e['hop_s']:g} s"
        )
    if kind == "window":
        top = ", ".join(f"{p['label']} {p['probability']:.2f}" for p in e["predictions"])
        skipped = f"  ({e['skipped']} skipped)" if e.get("skipped") else ""
        return f"{e['start_s']:7.2f}-{e['end_s']:7.2f} s  {top}{skipped}"
    if kind in ("end", "closing"):
        return f"{kind}: {e['windows']} windows, {e['skipped']} skipped, {e['audio_s']:g} s"
    if kind == "error":
        return f"error {e['code']}: {e['message']}"
    return json.dumps(e)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service.stream", description=__doc__.split("\n")[0])
    p.add_argument("file", help="an audio file (WAV, FLAC, Ogg, MP3 where libsndfile has it)")
    p.add_argument("--url", default="ws://127.0.0.1:8000/v1/stream")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--realtime", action="store_true", help="at the audio's pace (default)")
    pace.add_argument("--fast", action="store_true", help="as fast as the service takes it")
    p.add_argument("--hop", type=float, default=1.0, help="seconds between windows")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--token", help="bearer token (default: $ESC50_API_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the events as JSON lines")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
