"""The pure-PyTorch multi-scale deformable attention cores side by side, inference and training.

    python benchmarks/ms_deform_attn_cores.py [--size 512] [--threads 2] [--out docs/benchmarks/ms_deform_attn_cores.md]

Shapes are those of Mask2Former's pixel decoder at --size (levels 1/8, 1/16, 1/32; 8 heads of 32
channels; 4 points): one call per encoder layer, 6 per forward. The peer is HF transformers'
`multi_scale_deformable_attention` (when transformers is installed); `gather` is omniseg's core
(`ms_deform_attn_core`, with its hand-written backward pass when a gradient is needed).
"stored for backward" counts the bytes autograd keeps between forward and backward. Outputs and
gradients are checked equal before timing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _runs import command_line, machine_line, write_report  # benchmarks/_runs.py

from omniseg.runtime import describe, tune_process
from omniseg.bench import median_ms, stored_for_backward_bytes
from omniseg.models.layers.ms_deform_attn import ms_deform_attn_core, ms_deform_attn_core_grid_sample

CORES = {"grid_sample + autograd (omniseg reference)": ms_deform_attn_core_grid_sample,
         "gather, hand-written backward (omniseg)": ms_deform_attn_core}
try:
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    CORES = {"HF transformers `multi_scale_deformable_attention`": multi_scale_deformable_attention, **CORES}
except ImportError:
    pass


def _inputs(size: int, batch: int, generator: torch.Generator, requires_grad: bool):
    shapes = [(size // s, size // s) for s in (8, 16, 32)]
    length = sum(h * w for h, w in shapes)
    # as in the encoder: every pixel of every level is a query whose points lie around its own position
    # (here up to 8 pixels of each level away, some beyond the border)
    reference = torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h,
                                                      indexing="xy"), -1).view(-1, 2) for h, w in shapes])
    level_sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32).view(3, 1, 2)
    offsets = (torch.rand(batch, length, 8, 3, 4, 2, generator=generator) * 16 - 8) / level_sizes
    tensors = [torch.randn(batch, length, 8, 32, generator=generator),
               reference.view(1, length, 1, 1, 1, 2) + offsets,
               torch.rand(batch, length, 8, 3, 4, generator=generator).softmax(-1)]
    return shapes, [t.requires_grad_(requires_grad) for t in tensors]


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/ms_deform_attn_cores.md"))
    args = ap.parse_args(argv)
    applied = tune_process()  # as the `omniseg` command does
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shapes, (value, locations, weights) = _inputs(args.size, 1, g, requires_grad=False)
    outputs = [core(value, shapes, locations, weights) for core in CORES.values()]
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], atol=1e-4, rtol=1e-4)
    train_shapes, train_inputs = _inputs(args.size, 2, g, requires_grad=True)
    grads = []
    for core in CORES.values():
        core(*train_inputs[:1], train_shapes, *train_inputs[1:]).sum().backward()
        grads.append([t.grad.clone() for t in train_inputs])
        for t in train_inputs:
            t.grad = None
    for other in grads[1:]:
        for ours, theirs in zip(other, grads[0]):
            torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-3)

    def step(core, autocast=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = train_inputs[0].to(torch.bfloat16) if autocast else train_inputs[0]  # a bf16 value projection
            out = core(value, train_shapes, *train_inputs[1:])
        out.float().sum().backward()

    rows = []
    for name, core in CORES.items():
        with torch.no_grad():
            fp32 = median_ms(lambda: core(value, shapes, locations, weights), 2, args.repeats)
            bf16_value = value.bfloat16()
            with torch.autocast("cpu", dtype=torch.bfloat16):  # as inside the model under bf16 autocast
                bf16 = median_ms(lambda: core(bf16_value, shapes, locations, weights), 2, args.repeats)
        train = median_ms(lambda: step(core), 1, max(3, args.repeats // 2))
        train_bf16 = median_ms(lambda: step(core, autocast=True), 1, max(3, args.repeats // 2))
        stored = stored_for_backward_bytes(lambda: core(train_inputs[0], train_shapes, *train_inputs[1:])) / 2**20
        rows.append(f"| {name} | {fp32:.1f} ms | {bf16:.1f} ms | {train:.1f} ms | {train_bf16:.1f} ms | {stored:.0f} MiB |")
    levels = ", ".join(f"{h}x{w}" for h, w in shapes)
    text = "\n".join([
        "# Multi-scale deformable attention cores",
        "",
        f"Command: `{command_line(__file__, argv)}`",
        "",
        machine_line(args.threads) + f". Levels {levels}, 8 heads x 32 channels, 4 points, every pixel a query, "
        f"its points up to 8 pixels of each level around it; "
        f"median of {args.repeats} after warm-up. Outputs and gradients checked equal first. "
        f"Process settings (omniseg/runtime.py): {describe(applied)}.",
        "",
        "| core | inference, batch 1, fp32 | inference, batch 1, bf16 values | forward + backward, batch 2, fp32 "
        "| the same, bf16 autocast | stored for backward, batch 2, fp32 |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    return write_report(text, args.out)


if __name__ == "__main__":
    main()
