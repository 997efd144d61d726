"""Mask2Former training step: time and peak memory under omniseg's allocator modes, with and without
activation checkpointing, and HF transformers' step as the peer, each in a fresh process.

    python benchmarks/training_memory.py [--preset mask2former_swin_t] [--size 512] [--batch 2] [--threads 2]
                                         [--dtype fp32] [--steps 3] [--out docs/benchmarks/training_memory.md]

Allocator modes (omniseg/allocator.py, OMNISEG_MALLOC_TUNING): `speed` (the default: freed memory is
kept and reused), `lean` (blocks above 1 MiB mapped and returned on free: resident memory follows
the live tensors) and `off` (glibc's defaults). Peak RSS is the whole process's, imports included.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _runs import command_line, machine_line, write_report  # benchmarks/_runs.py

from omniseg.bench import (BenchSettings, build_hf_checkpoint, build_omniseg_checkpoint,
                           train_step_in_subprocess)

MODES = {"speed": "1", "lean": "lean", "off": "0"}


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mask2former_swin_t")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-hf", dest="hf", action="store_false", help="skip HF transformers' step")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/training_memory.md"))
    args = ap.parse_args(argv)
    settings = dict(preset=args.preset, size=args.size, train_batch=args.batch, threads=args.threads,
                    dtype=args.dtype, train_steps=args.steps)
    rows = []
    with tempfile.TemporaryDirectory(prefix="omniseg_training_memory_") as tmp:
        folder = Path(tmp)
        hf = args.hf
        if hf:
            try:
                build_hf_checkpoint(BenchSettings(**settings), folder)  # same weights on both sides
                checkpoint = folder
            except ImportError:
                hf = False
        if not hf:
            checkpoint = build_omniseg_checkpoint(BenchSettings(**settings, hf=False), folder)
        for mode, value in MODES.items():
            for checkpointing in (False, True):
                step, rss = train_step_in_subprocess("omniseg", checkpoint, BenchSettings(
                    **settings, activation_checkpointing=checkpointing), {"OMNISEG_MALLOC_TUNING": value})
                rows.append(("omniseg", mode, "yes" if checkpointing else "no", step, rss))
                print(rows[-1], file=sys.stderr, flush=True)
        if hf:
            step, rss = train_step_in_subprocess("hf", folder, BenchSettings(**settings), {"OMNISEG_MALLOC_TUNING": "1"})
            rows.append(("HF transformers", "speed", "no", step, rss))
    text = "\n".join([
        "# Training step: time and peak memory",
        "",
        f"Command: `{command_line(__file__, argv)}`",
        "",
        machine_line(args.threads) + f". {args.preset}, {args.size}x{args.size}, batch {args.batch}, {args.dtype}, "
        "133 classes, 100 queries, random weights, fused AdamW; median of "
        f"{args.steps} steps after one warm-up step, each configuration in a fresh process.",
        "",
        "| model | allocator (OMNISEG_MALLOC_TUNING) | activation checkpointing | step | peak RSS |",
        "|---|---|---|---|---|",
        *[f"| {who} | {mode} | {ckpt} | {step:.2f} s | {rss:.0f} MiB |" for who, mode, ckpt, step, rss in rows],
        "",
    ])
    return write_report(text, args.out)


if __name__ == "__main__":
    main()
