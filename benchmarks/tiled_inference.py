"""Tiled against whole-image inference on large images: wall time and peak resident memory, each row in a
fresh process.

    python benchmarks/tiled_inference.py --weights runs/demo/model_final.safetensors \
        [--images runs/data/synthetic/val/images] [--sizes 1024,2048,4096,10000] [--whole-sizes 1024,2048,4096] \
        [--tile 512] [--overlap 64] [--tasks panoptic] [--threads 2] [--memory-limit-gib 20] \
        [--out docs/benchmarks/tiled_inference.md]

The test image of side S is a mosaic of the folder's images (in name order, repeated) at their own
resolution, so a tile sees objects of the size the model was trained on. Whole-image rows run the Predictor
at the image's own resolution (no resize) and are skipped above `--whole-sizes`; a row whose process runs out
of memory under `--memory-limit-gib` (RLIMIT_AS) is reported as such. Peak RSS is the whole process's
(`getrusage`), imports and weights included; "after load" is the RSS before the image is made.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _runs import command_line, machine_line, write_report  # benchmarks/_runs.py


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mosaic(folder: Path, side: int):
    """uint8 [3, side, side]: the folder's images pasted row by row in name order, repeated as needed."""
    import torch

    from omniseg.api import read_image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not files:
        raise SystemExit(f"{folder}: no .png/.jpg images to build the test image from")
    out = torch.zeros((3, side, side), dtype=torch.uint8)
    y = k = 0
    while y < side:
        x, row_height = 0, 0
        while x < side:
            image = read_image(files[k % len(files)])
            k += 1
            h, w = min(image.shape[1], side - y), min(image.shape[2], side - x)
            out[:, y:y + h, x:x + w] = image[:, :h, :w]
            x += w
            row_height = max(row_height, h)
        y += row_height
    return out


def child(args) -> None:
    """One row: load the weights, build the image, predict once, print a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from omniseg.api import Predictor

    tasks = args.tasks.split(",")
    if args.mode == "tiled":
        predictor = Predictor(args.weights, device="cpu", tasks=tasks, tile=args.tile, overlap=args.overlap)
    else:
        predictor = Predictor(args.weights, device="cpu", tasks=tasks, min_size_test=args.size)
    loaded = _rss_mib()
    image = mosaic(args.images, args.size)
    start = time.perf_counter()
    try:
        pred = predictor(image)
    except (MemoryError, RuntimeError) as error:  # RLIMIT_AS reached: torch raises RuntimeError
        print(json.dumps({"error": f"out of memory ({str(error).splitlines()[0][:120]})", "loaded": loaded}))
        return
    seconds = time.perf_counter() - start
    record = {"seconds": seconds, "peak": _rss_mib(), "loaded": loaded}
    if "panoptic" in pred:
        record["segments"] = len(pred["panoptic"]["segments_info"])
        record["things"] = sum(s["isthing"] for s in pred["panoptic"]["segments_info"])
    if "instances" in pred:
        record["instances"] = len(pred["instances"]["labels"])
    print(json.dumps(record), flush=True)


def run_row(args, mode: str, size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--size", str(size), "--weights", str(args.weights),
           "--images", str(args.images), "--tile", str(args.tile), "--overlap", str(args.overlap),
           "--tasks", args.tasks, "--threads", str(args.threads)]
    limit = int(args.memory_limit_gib * 2 ** 30)

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"process ended with {done.returncode}: {tail[:160]}"}
    return json.loads(lines[-1])


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--images", type=Path, default=Path("runs/data/synthetic/val/images"))
    ap.add_argument("--sizes", default="1024,2048,4096,10000")
    ap.add_argument("--whole-sizes", default="1024,2048,4096")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--tasks", default="panoptic")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-limit-gib", type=float, default=20.0)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/tiled_inference.md"))
    ap.add_argument("--child", choices=["tiled", "whole"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.mode = args.child
        child(args)
        return ""
    if not args.weights.exists():
        raise SystemExit(f"{args.weights}: no such weights file (make demo writes runs/demo/model_final.safetensors)")
    whole = {int(s) for s in args.whole_sizes.split(",") if s}
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for mode in ("whole", "tiled"):
            if mode == "whole" and size not in whole:
                continue
            record = run_row(args, mode, size)
            print(f"[bench] {mode} {size}: {record}", file=sys.stderr, flush=True)
            rows.append((size, mode, record))
    from omniseg.tiling import TileSettings, tile_starts

    lines = [
        "# Tiled inference on large images",
        "",
        f"Command: `{command_line(__file__, argv)}`",
        "",
        f"{machine_line(args.threads)}. Weights: `{args.weights}`; tasks: {args.tasks}; tiles {args.tile} px "
        f"overlapping by at least {args.overlap} px, {TileSettings().batch} per forward pass; test images: mosaics of "
        f"`{args.images}`. Each row is a fresh process limited to {args.memory_limit_gib:g} GiB of address space.",
        "",
        "| image | mode | tiles | time (s) | peak RSS (MiB) | RSS after load (MiB) | segments (things) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for size, mode, r in rows:
        side = min(args.tile, size)
        tiles = len(tile_starts(size, side, args.overlap)) ** 2 if mode == "tiled" else 1
        if "error" in r:
            lines.append(f"| {size} x {size} | {mode} | {tiles} | - | - | {r.get('loaded', float('nan')):.0f} | "
                         f"{r['error']} |")
            continue
        segments = f"{r['segments']} ({r['things']})" if "segments" in r else str(r.get("instances", "-"))
        lines.append(f"| {size} x {size} | {mode} | {tiles} | {r['seconds']:.1f} | {r['peak']:.0f} | "
                     f"{r['loaded']:.0f} | {segments} |")
    return write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
