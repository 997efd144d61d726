"""omniseg vs HF transformers Mask2Former on this machine: forward, post-processing, predict, training step, memory.

    python benchmarks/speed_vs_hf.py [--preset mask2former_swin_t] [--size 512] [--threads 2] [--dtypes fp32 [bf16]] [--compile]
                                     [--out docs/benchmarks/speed_vs_hf.md]

One table per dtype (same weights on both sides, outputs checked first), written to --out with the
command and machine. `omniseg bench` runs one configuration of the same code.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

from omniseg.runtime import tune_process
from omniseg.bench import BenchSettings, cpu_model, native_bf16_matmul, run_bench


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mask2former_swin_t")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=None,
                    help="default: fp32, plus bf16 when the CPU has bf16 matmul instructions")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--train-rounds", type=int, default=2, help="fresh training processes per side, in turn")
    ap.add_argument("--compile", action="store_true",
                    help="one more table: the last dtype with omniseg's network torch.compile'd (no training rows)")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/speed_vs_hf.md"))
    args = ap.parse_args(argv)
    tune_process()  # as the `omniseg` command does
    parts = [
        "# omniseg vs HF transformers: Mask2Former speed and memory",
        "",
        f"Command: `{('python benchmarks/speed_vs_hf.py ' + ' '.join(argv if argv is not None else sys.argv[1:])).strip()}`",
        "",
        f"Machine: {cpu_model()} ({platform.machine()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"bf16 matmul instructions: {'yes' if native_bf16_matmul() else 'no'}), {os.cpu_count()} cores, "
        f"torch {torch.__version__}, no GPU; % of peak is against the GEMM throughput measured in the same run.",
        "",
    ]
    dtypes = args.dtypes or (["fp32", "bf16"] if native_bf16_matmul() else ["fp32"])
    runs = [(dtype, False) for dtype in dtypes] + ([(dtypes[-1], True)] if args.compile else [])
    for dtype, compiled in runs:
        settings = BenchSettings(preset=args.preset, size=args.size, threads=args.threads, dtype=dtype,
                                 repeats=args.repeats, train_steps=args.train_steps, train_rounds=args.train_rounds,
                                 compile=compiled,
                                 train=not compiled)
        table = run_bench(settings, progress=lambda msg: print(msg, file=sys.stderr)).table()
        print(table)
        parts += [f"## {dtype}{' + torch.compile' if compiled else ''}", "", table]
    text = "\n".join(parts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
