"""FastFCN's claim, measured: Joint Pyramid Upsampling on a plain stride-32 ResNet vs a dilated
(output stride 8) ResNet, under the same head, at 512x512.

    python benchmarks/jpu_vs_dilated.py --out docs/benchmarks/jpu_vs_dilated

For each head (FCN, PSPNet, DeepLabV3/ASPP, DANet) and backbone variant (dilated OS8, dilated OS16,
JPU), builds the ResNet-50 preset network with random weights (the cost does not depend on the
weights) and reports FLOPs (torch.utils.flop_counter: 2 x multiply-adds of convs and matmuls), the
parameter count, and the median CPU forward time over --repeats runs after a warm-up, side by side
with the dilated OS8 network as the reference. Writes RESULTS.md and results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from omniseg.bench import median_ms

HEADS = {"fcn": "FCN", "pspnet": "PSPNet", "deeplabv3": "DeepLabV3 (ASPP)", "danet": "DANet"}
VARIANTS = {  # key -> (label, overrides)
    "os8": ("dilated ResNet-50, output stride 8", ["model.output_stride=8"]),
    "os16": ("dilated ResNet-50, output stride 16", ["model.output_stride=16"]),
    "jpu": ("ResNet-50 (stride 32) + JPU", ["model.neck=jpu"]),
}


def build(head: str, overrides: list[str], backbone: str) -> torch.nn.Module:
    from omegaconf import OmegaConf

    from omniseg.config import load_config
    from omniseg.models.registry import build_model

    cfg = load_config("pspnet_r50", [f"model.arch={head}", f"model.backbone={backbone}", *overrides])
    return build_model(OmegaConf.to_container(cfg.model, resolve=True), num_classes=150).eval()


def measure(model: torch.nn.Module, size: int, repeats: int, latency: bool) -> dict:
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model.forward_raw(x)
        result = {"gflops": counter.get_total_flops() / 1e9,
                  "params_m": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("aux_head")) / 1e6}
        if latency:
            result["ms"] = median_ms(lambda: model.forward_raw(x), 1, repeats)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--no-latency", action="store_true", help="FLOPs and parameters only")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from omniseg.bench import cpu_model

    rows = []
    for head in args.heads:
        for key, (label, overrides) in VARIANTS.items():
            model = build(head, overrides, args.backbone)
            m = measure(model, args.size, args.repeats, not args.no_latency)
            rows.append({"head": head, "variant": key, **m})
            print(f"{HEADS[head]:<18} {label:<38} {m['gflops']:8.1f} GFLOP  {m['params_m']:6.1f} M"
                  + (f"  {m['ms']:8.1f} ms" if "ms" in m else ""), flush=True)
    machine = f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}, Python {platform.python_version()}"
    command = "python benchmarks/jpu_vs_dilated.py " + " ".join(sys.argv[1:])
    lines = [
        "# JPU vs dilated backbone at equal head (FastFCN's claim)", "",
        f"Command: `{command}`", "", f"Machine: {machine}", "",
        f"{args.backbone}, {args.size}x{args.size}, batch 1, 150 classes, random weights, fp32, inference "
        "(the auxiliary head is not run). FLOPs from torch.utils.flop_counter (2 x multiply-adds); "
        f"time: median of {args.repeats} forwards after a warm-up. Ratios are against the dilated OS8 network.", "",
        "| head | backbone | GFLOPs | x OS8 | params (M) | forward (ms) | x OS8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for head in args.heads:
        ref = next(r for r in rows if r["head"] == head and r["variant"] == "os8")
        for r in (r for r in rows if r["head"] == head):
            ms = f"{r['ms']:.0f} | {r['ms'] / ref['ms']:.2f}" if "ms" in r else "- | -"
            lines.append(f"| {HEADS[head]} | {VARIANTS[r['variant']][0]} | {r['gflops']:.1f} | "
                         f"{r['gflops'] / ref['gflops']:.2f} | {r['params_m']:.1f} | {ms} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
