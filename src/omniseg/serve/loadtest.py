"""A small load generator for `omniseg serve`: N requests from C concurrent clients against a running
server, each answer checked against the Predictor's for the same image, with latency, throughput and
the server's resident memory by quarter. Used by tests/test_serve_load.py and benchmarks/serve_load.py."""

from __future__ import annotations

import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def reference_answers(weights: str | Path, images: Sequence[bytes], tasks: Sequence[str]) -> list[dict]:
    """What /v1/predict must answer for each encoded image: the Predictor's result, encoded the same way."""
    from omniseg.api import Predictor
    from omniseg.data.formats.files import decode_rgb_image
    from omniseg.serve.encode import encode_prediction

    predictor = Predictor(weights, device="cpu")
    return [encode_prediction(predictor.predict_batch([decode_rgb_image(data, "image")], tasks=list(tasks))[0],
                              predictor.meta) for data in images]


def difference(answer: dict, expected: dict, score_tolerance: float = 1e-4) -> str | None:
    """The first way `answer` differs from `expected` (None when equal). Maps, ids, areas, boxes and masks
    must be identical; scores agree to `score_tolerance` (a batched forward rounds differently)."""
    for key in ("width", "height"):
        if answer.get(key) != expected.get(key):
            return f"{key}: {answer.get(key)} != {expected.get(key)}"
    if "semantic" in expected and answer.get("semantic", {}).get("png") != expected["semantic"]["png"]:
        return "semantic PNG differs"
    if "panoptic" in expected:
        got, want = answer.get("panoptic", {}), expected["panoptic"]
        if got.get("png") != want["png"]:
            return "panoptic PNG differs"
        for a, b in zip(got.get("segments_info", []), want["segments_info"]):
            if {k: v for k, v in a.items() if k != "score"} != {k: v for k, v in b.items() if k != "score"} \
                    or abs(a.get("score", 0) - b.get("score", 0)) > score_tolerance:
                return f"panoptic segment {b['id']} differs"
        if len(got.get("segments_info", [])) != len(want["segments_info"]):
            return "panoptic segment count differs"
    if "instances" in expected:
        got, want = answer.get("instances", []), expected["instances"]
        if len(got) != len(want):
            return f"{len(got)} instances != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            if a["category_id"] != b["category_id"] or a["segmentation"] != b["segmentation"] or a["bbox"] != b["bbox"]:
                return f"instance {i} differs"
            if abs(a["score"] - b["score"]) > score_tolerance:
                return f"instance {i} score {a['score']} != {b['score']}"
    return None


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def run_load(url: str, pid: int, images: Sequence[bytes], expected: Sequence[dict], *, requests: int = 200,
             clients: int = 8, tasks: Sequence[str] = ("semantic", "panoptic", "instance")) -> dict:
    """`requests` POSTs of `images` (round robin) from `clients` threads; the server's RSS is read after
    each quarter of the requests has been answered."""
    import json

    query = f"{url}/v1/predict?tasks={','.join(tasks)}"
    lock = threading.Lock()
    state = {"next": 0, "done": 0}
    latencies: list[float] = []
    errors: list[str] = []
    mismatches: list[str] = []
    quarters: list[float] = []

    def client() -> None:
        while True:
            with lock:
                i = state["next"]
                if i >= requests:
                    return
                state["next"] += 1
            k = i % len(images)
            request = urllib.request.Request(query, data=images[k], method="POST",
                                             headers={"Content-Type": "application/octet-stream"})
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    answer = json.loads(response.read())
            except (urllib.error.URLError, OSError, ValueError) as e:
                with lock:
                    errors.append(f"request {i}: {e}")
                continue
            elapsed = time.perf_counter() - start
            problem = difference(answer, expected[k])
            with lock:
                latencies.append(elapsed)
                if problem:
                    mismatches.append(f"request {i} (image {k}): {problem}")
                state["done"] += 1
                if state["done"] % max(1, requests // 4) == 0 and len(quarters) < 4:
                    quarters.append(_rss_mib(pid))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return {"done": state["done"], "errors": errors, "mismatches": mismatches, "seconds": seconds,
            "throughput": state["done"] / seconds if seconds else math.nan,
            "p50_ms": 1000 * _percentile(latencies, 50) if latencies else math.nan,
            "p95_ms": 1000 * _percentile(latencies, 95) if latencies else math.nan,
            "rss_mib_by_quarter": quarters}


def synthetic_images(count: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """`count` PNG-encoded test images of `size` (h, w): noise with a few flat rectangles."""
    import numpy as np

    from omniseg.outputs import png_bytes

    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for _ in range(count):
        picture = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        for _ in range(3):
            y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            picture[y:y + h // 3, x:x + w // 3] = rng.integers(0, 255, 3, dtype=np.uint8)
        out.append(png_bytes(picture))
    return out
