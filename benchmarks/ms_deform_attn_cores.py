"""The two pure-PyTorch multi-scale deformable attention cores side by side, inference and training.

    python benchmarks/ms_deform_attn_cores.py [--size 512] [--threads 2] [--out docs/benchmarks/ms_deform_attn_cores.md]

Shapes are those of Mask2Former's pixel decoder at --size (levels 1/8, 1/16, 1/32; 8 heads of 32
channels; 4 points): one call per encoder layer, 6 per forward. `grid_sample` is HF transformers'
way; `gather` is omniseg's inference core (`ms_deform_attn_core` picks it when no gradient is needed).
Outputs and gradients are checked equal before timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

from omniseg.bench import cpu_model, median_ms
from omniseg.models.layers.ms_deform_attn import ms_deform_attn_core_gather, ms_deform_attn_core_grid_sample

CORES = {"grid_sample (HF's way)": ms_deform_attn_core_grid_sample, "gather (omniseg inference)": ms_deform_attn_core_gather}


def _inputs(size: int, batch: int, generator: torch.Generator, requires_grad: bool):
    shapes = [(size // s, size // s) for s in (8, 16, 32)]
    length = sum(h * w for h, w in shapes)
    tensors = [torch.randn(batch, length, 8, 32, generator=generator),
               torch.rand(batch, length, 8, 3, 4, 2, generator=generator) * 1.2 - 0.1,
               torch.rand(batch, length, 8, 3, 4, generator=generator).softmax(-1)]
    return shapes, [t.requires_grad_(requires_grad) for t in tensors]


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/ms_deform_attn_cores.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shapes, (value, locations, weights) = _inputs(args.size, 1, g, requires_grad=False)
    outputs = {name: core(value, shapes, locations, weights) for name, core in CORES.items()}
    torch.testing.assert_close(*outputs.values(), atol=1e-4, rtol=1e-4)
    train_shapes, train_inputs = _inputs(args.size, 2, g, requires_grad=True)
    grads = []
    for core in CORES.values():
        core(*train_inputs[:1], train_shapes, *train_inputs[1:]).sum().backward()
        grads.append([t.grad.clone() for t in train_inputs])
        for t in train_inputs:
            t.grad = None
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-3)

    def step(core):
        core(*train_inputs[:1], train_shapes, *train_inputs[1:]).sum().backward()

    rows = []
    for name, core in CORES.items():
        with torch.no_grad():
            fp32 = median_ms(lambda: core(value, shapes, locations, weights), 2, args.repeats)
            bf16_value = value.bfloat16()
            with torch.autocast("cpu", dtype=torch.bfloat16):  # as inside the model under bf16 autocast
                bf16 = median_ms(lambda: core(bf16_value, shapes, locations, weights), 2, args.repeats)
        train = median_ms(lambda: step(core), 1, max(3, args.repeats // 2))
        rows.append(f"| {name} | {fp32:.1f} ms | {bf16:.1f} ms | {train:.1f} ms |")
    levels = ", ".join(f"{h}x{w}" for h, w in shapes)
    text = "\n".join([
        "# Multi-scale deformable attention cores",
        "",
        f"Command: `{('python benchmarks/ms_deform_attn_cores.py ' + ' '.join(argv if argv is not None else sys.argv[1:])).strip()}`",
        "",
        f"Machine: {cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, {args.threads} threads, "
        f"torch {torch.__version__}. Levels {levels}, 8 heads x 32 channels, 4 points, every pixel a query; "
        f"median of {args.repeats} after warm-up. Outputs and gradients checked equal first.",
        "",
        "| core | inference, batch 1, fp32 | inference, batch 1, bf16 values | forward + backward, batch 2, fp32 |",
        "|---|---|---|---|",
        *rows,
        "",
    ])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
