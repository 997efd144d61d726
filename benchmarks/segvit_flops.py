"""SegViT's cost claims, measured: ATM decoder vs UPerNet decoder on the same ViT, and the Shrunk /
Shrunk++ encoders vs the plain ViT, at 512x512.

    python benchmarks/segvit_flops.py --out docs/benchmarks/segvit_flops

Builds the ViT-B/16 presets (`segvit_vit_b`, `segvit_shrunk_vit_b`, `segvit_shrunkpp_vit_b`,
`upernet_vit_b`, 150 classes as ADE20K) with random weights and reports FLOPs (torch.utils.flop_counter:
2 x multiply-adds of linears, convs and attention matmuls) split into encoder and decoder, parameters,
and the median CPU forward time over --repeats runs after a warm-up. The encoder is the ViT (for
Shrunk / Shrunk++ with its QD, edge head and QU, which the paper counts as the encoder); the decoder is
everything after it (ATM; or neck + UPerHead). Shrunk++ keeps the edge patches at full resolution, so
its cost depends on how many patches are edges: with random weights that share is arbitrary, so the
edge head's decision is set to a given share of patches (--edge-shares, chosen at random) to report
the cost at that share; `--camvid-root` adds the share of 16 px patches that hold a class boundary in
CamVid val labels at 512 px, as a realistic value.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from _runs import command_line  # benchmarks/_runs.py
from torch.utils.flop_counter import FlopCounterMode

MODELS = {  # key -> (label, preset)
    "atm": ("ViT-B + ATM (SegViT)", "segvit_vit_b"),
    "upernet": ("ViT-B + UPerNet", "upernet_vit_b"),
    "shrunk": ("Shrunk ViT-B + ATM", "segvit_shrunk_vit_b"),
    "shrunkpp": ("Shrunk++ ViT-B + ATM", "segvit_shrunkpp_vit_b"),
}


def build(preset: str) -> torch.nn.Module:
    from omegaconf import OmegaConf

    from omniseg.config import load_config
    from omniseg.models.registry import build_model

    cfg = load_config(preset)
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True), num_classes=150).eval()
    return model.requires_grad_(False)  # inference only (and FlopCounterMode's module tracker wants it)


def run_encoder(model: torch.nn.Module, x: torch.Tensor):
    """Run what counts as the encoder: the ViT (+ QD / edge head / QU for Shrunk encoders)."""
    if hasattr(model, "decoders"):  # SegViT
        return model.decoder_inputs(model.normalize(x))
    return model.backbone.vit(model.normalize(x))  # UPerNet on a ViT pyramid: the neck belongs to the decoder


def force_edge_share(model: torch.nn.Module, share: float, seed: int = 0):
    """Make Shrunk++'s edge head call `share` of the patches edges (a random subset); returns the hook."""
    generator = torch.Generator().manual_seed(seed)

    def hook(module, inputs, output):
        edge = torch.rand(output.shape[:-1], generator=generator) < share
        logits = torch.zeros_like(output)
        logits[..., 1] = torch.where(edge, 10.0, -10.0)
        return logits

    return model.backbone.edge_head.register_forward_hook(hook)


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(total, encoder) GFLOPs of one forward."""
    with FlopCounterMode(display=False) as counter:
        model.forward_raw(x)
    with FlopCounterMode(display=False) as encoder:
        run_encoder(model, x)
    return counter.get_total_flops() / 1e9, encoder.get_total_flops() / 1e9


def camvid_edge_share(root: Path, size: int = 512, patch: int = 16) -> float:
    """Share of patch x patch cells that contain more than one label in CamVid val labels resized to `size`."""
    import numpy as np
    from PIL import Image

    from omniseg.models.segvit.vit import edge_patch_targets

    labels = sorted((root / "valannot").glob("*.png"))
    if not labels:
        raise SystemExit(f"{root}/valannot: no label PNGs found")
    shares = []
    for path in labels:
        lab = Image.open(path).resize((size, size), Image.NEAREST)
        lab = torch.from_numpy(np.array(lab, dtype=np.int64))
        lab = torch.where(lab == 11, 255, lab)  # void
        edges = edge_patch_targets(lab[None], patch, (size // patch, size // patch))
        shares.append(float((edges == 1).float().mean()))
    return sum(shares) / len(shares)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--edge-shares", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--camvid-root", type=Path, default=None)
    ap.add_argument("--no-latency", action="store_true", help="FLOPs and parameters only")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from omniseg.bench import cpu_model, median_ms

    shares = list(args.edge_shares)
    camvid_share = None
    if args.camvid_root is not None:
        camvid_share = camvid_edge_share(args.camvid_root, args.size)
        shares.append(round(camvid_share, 3))
        print(f"CamVid val: {100 * camvid_share:.1f}% of 16 px patches at {args.size} px hold a class boundary")
    x = torch.randn(1, 3, args.size, args.size)
    rows = []
    with torch.no_grad():
        for key, (label, preset) in MODELS.items():
            model = build(preset)
            params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("aux_head")) / 1e6
            for share in (shares if key == "shrunkpp" else [None]):
                hook = force_edge_share(model, share) if share is not None else None
                total, encoder = count_flops(model, x)
                row = {"model": key, "label": label, "preset": preset, "edge_share": share, "params_m": params,
                       "gflops": total, "encoder_gflops": encoder, "decoder_gflops": total - encoder}
                if not args.no_latency:
                    row["ms"] = median_ms(lambda: model.forward_raw(x), 1, args.repeats)
                if hook is not None:
                    hook.remove()
                rows.append(row)
                edges = "" if share is None else f"edges {share:.0%}"
                print(f"{label:<24} {edges:<11} {total:7.1f} GFLOP "
                      f"(encoder {encoder:6.1f}, decoder {total - encoder:6.1f})  {params:6.1f} M"
                      + (f"  {row['ms']:7.0f} ms" if "ms" in row else ""), flush=True)
    machine = f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}, Python {platform.python_version()}"
    command = command_line(__file__, argv)
    by = {r["model"]: r for r in rows if r["edge_share"] is None}
    atm, uper, plain = by["atm"], by["upernet"], by["atm"]
    lines = [
        "# SegViT cost: ATM vs UPerNet decoder, Shrunk / Shrunk++ vs plain encoder", "",
        f"Command: `{command}`", "", f"Machine: {machine}", "",
        f"ViT-B/16, {args.size}x{args.size}, batch 1, 150 classes, random weights, fp32 inference. FLOPs from "
        "torch.utils.flop_counter (2 x multiply-adds); time: median of "
        f"{args.repeats} forwards after a warm-up" + (" (not measured in this run)" if args.no_latency else "") + ".",
        "Shrunk++ rows: the edge head is set to mark the given share of patches as edges"
        + (f"; {100 * camvid_share:.1f}% is the share of 16 px patches holding a class boundary in CamVid val "
           f"labels at {args.size} px" if camvid_share is not None else "") + ".", "",
        "| model | edge patches | GFLOPs | encoder GFLOPs | x plain encoder | decoder GFLOPs | x UPerNet decoder "
        "| params (M) | forward (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = f"{r['ms']:.0f}" if "ms" in r else "-"
        edges = "-" if r["edge_share"] is None else f"{100 * r['edge_share']:.0f}%"
        lines.append(f"| {r['label']} | {edges} | "
                     f"{r['gflops']:.1f} | {r['encoder_gflops']:.1f} | {r['encoder_gflops'] / plain['encoder_gflops']:.2f} "
                     f"| {r['decoder_gflops']:.1f} | {r['decoder_gflops'] / uper['decoder_gflops']:.3f} | "
                     f"{r['params_m']:.1f} | {ms} |")
    lines += ["", f"ATM decoder / UPerNet decoder: {100 * atm['decoder_gflops'] / uper['decoder_gflops']:.1f}% of the "
              f"FLOPs (SegViT paper: about 5%); Shrunk encoder / plain: "
              f"{100 * by['shrunk']['encoder_gflops'] / plain['encoder_gflops']:.0f}%; whole Shrunk model / plain: "
              f"{by['shrunk']['gflops'] / atm['gflops']:.2f} (paper, ViT-B Table 8: 97.1 / 115.8 = 0.84; its "
              f"\"about 50%\" is ViT-L at 640 px)."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows,
                                                       "camvid_edge_share": camvid_share}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
