"""`omniseg serve` under load, beside in-process prediction: throughput, p50 / p95 latency, the batch sizes
the server formed, its resident memory by quarter of the requests, and whether every answer equals the
Predictor's for the same image.

    python benchmarks/serve_load.py [--weights runs/demo/model_final.safetensors] [--images DIR]
        [--requests 200] [--clients 8] [--out docs/benchmarks/serve_load.md]

Rows: the Predictor called in-process one image at a time, its result encoded as the API encodes it
(the peer: no HTTP, no queue), the server with
--max-batch 1 (no batching), and the server with --max-batch 8 under the same concurrent clients.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _runs import command_line, machine_line, write_report  # benchmarks/_runs.py


@contextlib.contextmanager
def server(weights: str, port: int, *args: str):
    proc = subprocess.Popen([sys.executable, "-m", "omniseg.cli", "serve", "-w", weights, "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=5).read()
                break
            except OSError:
                time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="runs/demo/model_final.safetensors")
    ap.add_argument("--images", default="runs/data/synthetic/val/images", help="folder of test images")
    ap.add_argument("--count", type=int, default=8, help="distinct images, sent round robin")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4, help="consecutive rounds on one batched server, for its "
                    "resident memory over time")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from omniseg.api import Predictor
    from omniseg.data.formats.files import decode_rgb_image
    from omniseg.serve.encode import encode_prediction
    from omniseg.serve.loadtest import reference_answers, run_load

    tasks = ("semantic", "panoptic", "instance")
    files = sorted(Path(args.images).iterdir())[: args.count]
    images = [f.read_bytes() for f in files]
    expected = reference_answers(args.weights, images, tasks)

    predictor = Predictor(args.weights, device="cpu")
    decoded = [decode_rgb_image(data, f.name) for data, f in zip(images, files)]
    predictor.predict_batch(decoded[:1], tasks=list(tasks))  # warm-up
    latencies = []
    start = time.perf_counter()
    for i in range(args.requests):
        t = time.perf_counter()
        pred = predictor.predict_batch([decoded[i % len(decoded)]], tasks=list(tasks))[0]
        json.dumps(encode_prediction(pred, predictor.meta))  # the same answer the server sends
        latencies.append(1000 * (time.perf_counter() - t))
    seconds = time.perf_counter() - start
    latencies.sort()
    rows = [("Predictor in-process, one image per call, answer encoded as the API's", args.requests / seconds, latencies[len(latencies) // 2],
             latencies[int(0.95 * len(latencies)) - 1], "-", "-", "-")]
    memory = []
    for max_batch in (1, 8):
        with server(args.weights, args.port, "--max-batch", str(max_batch)) as (url, proc):
            run_load(url, proc.pid, images[:1], expected[:1], requests=8, clients=2, tasks=tasks)  # warm-up
            before = json.loads(urllib.request.urlopen(f"{url}/v1/stats").read())["forward_passes_by_batch_size"]
            report = run_load(url, proc.pid, images, expected, requests=args.requests, clients=args.clients,
                              tasks=tasks)
            after = json.loads(urllib.request.urlopen(f"{url}/v1/stats").read())["forward_passes_by_batch_size"]
            if max_batch > 1:  # more rounds on the same server: does its memory level off?
                memory.append(report)
                for _ in range(args.rounds - 1):
                    memory.append(run_load(url, proc.pid, images, expected, requests=args.requests,
                                           clients=args.clients, tasks=tasks))
        batches = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
        checks = f"{len(report['errors'])} errors, {len(report['mismatches'])} answers differing from the Predictor"
        rows.append((f"server --max-batch {max_batch}, {args.clients} clients", report["throughput"], report["p50_ms"],
                     report["p95_ms"], ", ".join(f"{k}: {v}" for k, v in sorted(batches.items())),
                     " / ".join(f"{m:.0f}" for m in report["rss_mib_by_quarter"]), checks))

    lines = [
        "# `omniseg serve` under load",
        "",
        f"Command: `{command_line(__file__)}`",
        "",
        f"{machine_line(torch.get_num_threads())}. Weights `{args.weights}`; {len(images)} images "
        f"({'x'.join(map(str, decoded[0].shape[1:]))} px) sent round robin; {args.requests} requests per row, "
        f"tasks {', '.join(tasks)}; answers are the API's JSON (PNG / RLE encoding included).",
        "",
        "| setting | requests/s | p50 ms | p95 ms | forward passes by batch size | server RSS MiB by quarter | checks |",
        "|---|---|---|---|---|---|---|",
        *(f"| {r[0]} | {r[1]:.1f} | {r[2]:.0f} | {r[3]:.0f} | {r[4]} | {r[5]} | {r[6]} |" for r in rows),
    ]
    if len(memory) > 1:
        lines += ["", f"The `--max-batch 8` server's resident memory over {len(memory)} consecutive rounds of "
                  f"{args.requests} requests (MiB after each quarter of a round):", "",
                  "| round | RSS MiB by quarter | errors | answers differing |", "|---|---|---|---|",
                  *(f"| {i + 1} | {' / '.join(f'{m:.0f}' for m in r['rss_mib_by_quarter'])} | {len(r['errors'])} | "
                    f"{len(r['mismatches'])} |" for i, r in enumerate(memory))]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_report(text, args.out)


if __name__ == "__main__":
    main()
