"""Closed-loop load for the replica smoke (docker/smoke-replicas.sh): real clips through the load
balancer until a stop file appears, every answer recorded. Standard library only, so the
machine's python3 runs it.

    python3 docker/lbload.py --url http://127.0.0.1:18100 --clips ../shared/esc50/audio \
        --concurrency 4 --stop /tmp/stop --out /tmp/load.json

The JSON: totals by outcome ("200", "503", "error: ConnectionResetError", ...) and every request
that did not get a 200, with its start and end time (Unix seconds), so the smoke can tell which
failures fall around a kill.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path

CONTENT_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg"}
MAX_CLIPS = 24  # enough variety for the LB; small enough to hold in memory


def load_clips(folder: Path) -> list[tuple[str, bytes, str]]:
    paths = sorted(p for p in folder.iterdir() if p.suffix in CONTENT_TYPES)[:MAX_CLIPS]
    if not paths:
        raise SystemExit(f"no .wav/.flac/.ogg clips in {folder}")
    return [(p.name, p.read_bytes(), CONTENT_TYPES[p.suffix]) for p in paths]


def classify(url: urllib.parse.SplitResult, body: bytes, content_type: str) -> str:
    """One request on a fresh connection (each one goes through the LB's balancing)."""
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request("POST", "/classify?top_k=1", body, {"Content-Type": content_type})
        resp = conn.getresponse()
        answer = resp.read()
        if resp.status == 200 and b'"predictions"' not in answer:
            return "200 without predictions"
        return str(resp.status)
    except (OSError, http.client.HTTPException) as e:
        return f"error: {type(e).__name__}"
    finally:
        conn.close()


def worker(url, clips, stop: Path, results: list, lock: threading.Lock, offset: int) -> None:
    for name, body, content_type in itertools.islice(itertools.cycle(clips), offset, None):
        if stop.exists():
            return
        t0 = time.time()
        outcome = classify(url, body, content_type)
        with lock:
            results.append((outcome, t0, time.time(), name))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the load balancer, e.g. http://127.0.0.1:18100")
    p.add_argument("--clips", type=Path, required=True, help="folder of real clips")
    p.add_argument("--concurrency", type=int, default=4, help="clients, one request each at a time")
    p.add_argument("--stop", type=Path, required=True, help="the run ends when this file exists")
    p.add_argument("--out", type=Path, required=True, help="JSON summary")
    args = p.parse_args()
    url, clips = urllib.parse.urlsplit(args.url), load_clips(args.clips)
    results: list = []
    lock = threading.Lock()
    threads = [
        threading.Thread(target=worker, args=(url, clips, args.stop, results, lock, i * 5))
        for i in range(args.concurrency)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = Counter(r[0] for r in results)
    failed = [
        {"outcome": o, "start": t0, "end": t1, "clip": n} for o, t0, t1, n in results if o != "200"
    ]
    summary = {"requests": len(results), "outcomes": dict(counts), "failed": failed}
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"load: {len(results)} requests, outcomes {dict(counts)}")


if __name__ == "__main__":
    main()
