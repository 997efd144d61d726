"""MP-Former's cost: training step time over Mask2Former, and identical inference.

    python benchmarks/mp_former_overhead.py [--preset mask2former_demo] [--steps 20] [--out docs/benchmarks/mp_former_overhead.md]

Both models are built from the same preset with the same initial weights (MP-Former adds only its
label embedding), fed the same augmented synthetic batches, and timed interleaved (step i of one model,
then step i of the other) so machine noise hits both alike. Timed: forward + losses + backward +
AdamW step. Inference: the same weights through `predict` on validation images; outputs compared
bit for bit and timed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from omniseg.config import load_config
from omniseg.data.loader import collate
from omniseg.data.transforms import build_transforms
from omniseg.data.build import build_datasets
from omniseg.data.training import build_training_data, pad_targets
from omniseg.models.registry import build_model_from_config


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mask2former_demo")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--inference-images", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. data.batch_size=4")
    args = ap.parse_args(argv)

    cfg = load_config(args.preset, list(args.overrides))
    datasets, meta = build_datasets(cfg)
    torch.manual_seed(0)
    plain = build_model_from_config(cfg, meta).train()
    mp_cfg = load_config(args.preset, [*args.overrides, "model.mp.enabled=true"])
    torch.manual_seed(0)
    piloted = build_model_from_config(mp_cfg, meta).train()
    piloted.load_state_dict(plain.state_dict(), strict=False)  # same network weights; label_enc is extra

    # The batches `omniseg train` would draw (same augmentation, sampler and padding).
    train_set, sampler = build_training_data(cfg, datasets["train"])
    order = iter(sampler)
    batches = []
    for _ in range(args.warmup + args.steps):
        batch = collate([train_set[item] for item in next(order)], int(cfg.data.size_divisibility))
        batches.append((batch.images, pad_targets([s["targets"] for s in batch.samples], tuple(batch.images.shape[-2:]))))

    models = {"Mask2Former": plain, "MP-Former": piloted}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    times = {k: [] for k in models}
    for step, (images, targets) in enumerate(batches):
        for name, model in models.items():
            t0 = time.perf_counter()
            losses = model(images, targets)
            sum(losses.values()).backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    # Inference: identical weights (MP-Former's trained network copied into a plain Mask2Former).
    plain.load_state_dict({k: v for k, v in piloted.state_dict().items() if not k.startswith("mask_pilot.")})
    plain.eval(), piloted.eval()
    transforms = build_transforms(False)
    val = datasets["val"]
    infer = {k: [] for k in models}
    identical = True
    for i in range(min(args.inference_images, len(val))):
        batch = collate([transforms(val[i])], int(cfg.data.size_divisibility))
        outs = {}
        for name, model in models.items():
            t0 = time.perf_counter()
            outs[name] = model.predict(batch.images, batch.image_sizes, return_raw=True)[0]
            infer[name].append(time.perf_counter() - t0)
        a, b = outs["Mask2Former"], outs["MP-Former"]
        identical &= torch.equal(a["raw"]["pred_masks"], b["raw"]["pred_masks"])
        identical &= torch.equal(a["raw"]["pred_logits"], b["raw"]["pred_logits"])
        identical &= torch.equal(a["semantic"], b["semantic"]) and torch.equal(a["panoptic"]["segment_map"],
                                                                                b["panoptic"]["segment_map"])

    med = {k: statistics.median(v) for k, v in times.items()}
    inf = {k: statistics.median(v) for k, v in infer.items()}
    lines = [
        f"preset `{args.preset}` {' '.join(args.overrides)} | batch {cfg.data.batch_size} | crop {cfg.data.crop_size} | "
        f"{args.steps} timed steps (median) | torch {torch.__version__} | {torch.get_num_threads()} threads | "
        f"{platform.processor() or platform.machine()}",
        "",
        "| model | train step (s) | ratio | inference / image (s) |",
        "|---|---|---|---|",
    ]
    for name in models:
        lines.append(f"| {name} | {med[name]:.3f} | {med[name] / med['Mask2Former']:.3f}x | {inf[name]:.4f} |")
    lines += ["", f"inference outputs bit-identical on {len(infer['Mask2Former'])} images: {identical}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = "python benchmarks/mp_former_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.out.write_text(f"# MP-Former overhead\n\nCommand: `{cmd.strip()}`\n\n{text}\n")
    return text


if __name__ == "__main__":
    main()
