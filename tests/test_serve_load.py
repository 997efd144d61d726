"""A bounded load test of `omniseg serve` on 127.0.0.1: 200 requests from 8 concurrent clients, no errors,
every answer equal to the Predictor's for its image, batches formed, resident memory flat from the first
quarter to the last. (benchmarks/serve_load.py measures the same with the demo model for docs/results.md.)"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="omniseg[serve] is not installed")

from serving import get_json, server, tiny_weights  # noqa: E402


def test_200_requests_from_8_clients(tmp_path):
    from omniseg.serve.loadtest import reference_answers, run_load, synthetic_images

    weights = tiny_weights(tmp_path / "m2f.safetensors")
    images = synthetic_images(count=4, size=(96, 128))
    expected = reference_answers(weights, images, tasks=("semantic", "panoptic", "instance"))
    with server(weights, "--max-batch", "8") as (url, proc):
        report = run_load(url, proc.pid, images, expected, requests=200, clients=8,
                          tasks=("semantic", "panoptic", "instance"))
        stats = get_json(f"{url}/v1/stats")
    assert report["errors"] == [] and report["mismatches"] == [], report
    assert report["done"] == 200 and stats["requests"] == 200
    sizes = {int(k): v for k, v in stats["forward_passes_by_batch_size"].items()}
    assert sum(k * v for k, v in sizes.items()) == 200 and max(sizes) > 1  # requests were batched
    first, last = report["rss_mib_by_quarter"][0], report["rss_mib_by_quarter"][-1]
    assert last <= first * 1.05 + 32, report["rss_mib_by_quarter"]  # flat: no growth per request
