"""Instance segmentation from scratch: BlendMask, PANet, Mask R-CNN and Mask2Former at equal iterations
on the synthetic set, and inference time against the number of detected instances.

    python benchmarks/instance_family.py --out docs/benchmarks/instance_family

Part 1 trains each CPU preset (`blendmask_demo`, `blendmask_rt_demo`, `panet_demo`, `maskrcnn_demo`,
`mask2former_demo` with task=instance) for --iters iterations on the 600 synthetic training scenes
(same seed and data order) into --runs/instance_family/<key>_<iters>, reused once finished, and scores
mask AP on the 100 val scenes (pycocotools).

Part 2 loads the trained BlendMask and Mask R-CNN / PANet and times `predict` on one --size px image
(a val scene upscaled) with exactly N detections kept (score threshold 0, no NMS suppression,
N detections per image) for N in --instances: the median of --repeats runs after a warm-up. BlendMask's
mask branch is one RoIAlign + blend + paste for all detections, Mask R-CNN runs its mask head per RoI,
so the claim is that BlendMask's time stays flat (time(100) / time(10) <= 1.15).
Writes RESULTS.md and results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from _runs import all_finished, command_line, train_or_reuse  # benchmarks/_runs.py

# key -> (label, preset, overrides)
MODELS = {
    "blendmask": ("BlendMask", "blendmask_demo", []),
    "blendmask_rt": ("BlendMask-RT", "blendmask_rt_demo", []),
    "panet": ("PANet", "panet_demo", []),
    "maskrcnn": ("Mask R-CNN", "maskrcnn_demo", []),
    "mask2former": ("Mask2Former", "mask2former_demo", ["task=instance", "eval_tasks=[instance]"]),
}
# How each family is told to keep exactly N detections (score threshold 0, NMS that suppresses nothing).
KEEP_N = {
    "blendmask": lambda n: ["model.blendmask.test.score_threshold=0.0", "model.blendmask.test.nms_threshold=1.0",
                            f"model.blendmask.test.detections_per_image={n}", f"model.blendmask.test.pre_nms_topk={n}"],
    "maskrcnn": lambda n: ["model.test.score_thresh=0.0", "model.test.nms_thresh=1.0",
                           f"model.test.detections_per_img={n}"],
}
KEEP_N["blendmask_rt"] = KEEP_N["blendmask"]
KEEP_N["panet"] = KEEP_N["maskrcnn"]


def run_dir(runs: Path, key: str, iters: int) -> Path:
    return runs / "instance_family" / f"{key}_{iters}"


def train_config(key: str, iters: int, run: Path, synthetic_root: str):
    from omniseg.config import load_config

    _, preset, extra = MODELS[key]
    return load_config(preset, [f"data.train.root={synthetic_root}", f"data.val.root={synthetic_root}", *extra,
                                f"train.max_iters={iters}", f"train.eval_period={iters}",
                                f"train.checkpoint_period={iters}", f"train.output_dir={run}"])


def summarize(key: str, run: Path) -> dict:
    from camvid_best import seconds_per_iteration

    from omniseg.api import load_model

    final = json.loads((run / "final_metrics.json").read_text())
    model = load_model(run / "model_final.safetensors")[0]
    m = final["metrics"]
    return {"label": MODELS[key][0], "preset": MODELS[key][1], "AP": m["AP"], "AP50": m.get("AP50"),
            "AP75": m.get("AP75"), "sec_per_iter": seconds_per_iteration(run),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def time_vs_instances(key: str, run: Path, counts: list[int], size: int, repeats: int) -> dict:
    """Median predict time (ms) with exactly n detections, for each n; and the detections actually kept."""
    from omegaconf import OmegaConf
    from torch.nn import functional as F

    from omniseg.api import load_model
    from omniseg.bench import median_ms
    from omniseg.config import from_yaml
    from omniseg.data.build import build_dataset

    weights = run / "model_final.safetensors"
    base_cfg = from_yaml((run / "config.yaml").read_text())
    dataset = build_dataset(base_cfg.data, "val")
    image = dataset[0]["image"]
    image = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", align_corners=False)
    image = image.round().clamp(0, 255).to(torch.uint8)
    out = {}
    for n in counts:
        cfg = OmegaConf.merge(base_cfg, OmegaConf.from_dotlist(KEEP_N[key](n)))
        model = load_model(weights, config=cfg)[0]
        with torch.no_grad():
            kept = model.predict(image, [(size, size)])[0]["instances"]["masks"].shape[0]
            ms = median_ms(lambda: model.predict(image, [(size, size)]), 1, repeats)
        out[n] = {"ms": ms, "kept": int(kept)}
        print(f"{MODELS[key][0]:<14} {n:4d} detections requested, {kept:4d} kept: {out[n]['ms']:7.1f} ms", flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--synthetic-root", default="runs/data/synthetic")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--instances", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the timing part")
    args = ap.parse_args(argv)
    from omniseg.bench import cpu_model

    runs = {key: run_dir(args.runs, key, args.iters) for key in args.models}
    for key, run in runs.items():
        train_or_reuse(train_config(key, args.iters, run, args.synthetic_root), run)
    if not all_finished(runs.values()):
        return
    rows = {key: summarize(key, run) for key, run in runs.items()}
    if args.threads:
        torch.set_num_threads(args.threads)
    timing = {key: time_vs_instances(key, runs[key], args.instances, args.size, args.repeats)
              for key in runs if key in KEEP_N}

    machine = f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"
    command = command_line(__file__, argv)
    lines = ["# Instance segmentation from scratch: BlendMask, PANet, Mask R-CNN, Mask2Former", "",
             f"Command: `{command}`", "", f"Machine: {machine}", "",
             f"{args.iters} iterations each, batch 8, 128 px synthetic scenes (600 train, same seed and data order), "
             "no pretrained weights; mask AP (pycocotools) on the 100 val scenes. s / iteration is the trainer's "
             "logged mean and depends on what else the machine ran.", "",
             "| model | preset | params (M) | s / iteration | mask AP | AP50 | AP75 |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows.values(), key=lambda r: -r["AP"]):
        lines.append(f"| {r['label']} | `{r['preset']}` | {r['params_m']:.1f} | {r['sec_per_iter']:.2f} | "
                     f"{r['AP']:.1f} | {r['AP50']:.1f} | {r['AP75']:.1f} |")
    if timing:
        ns = args.instances
        lines += ["", f"Inference time against the number of detections: one {args.size}x{args.size} image, exactly N "
                  f"detections kept, median of {args.repeats} `predict` calls after a warm-up (ms).", "",
                  "| model | " + " | ".join(f"N = {n}" for n in ns) + f" | time({ns[-1]}) / time({ns[0]}) |",
                  "|---|" + "---|" * (len(ns) + 1)]
        for key, t in timing.items():
            kept = [t[n]["kept"] for n in ns]
            note = "" if kept == ns else f" (kept {kept})"
            lines.append(f"| {MODELS[key][0]}{note} | " + " | ".join(f"{t[n]['ms']:.0f}" for n in ns)
                         + f" | {t[ns[-1]]['ms'] / t[ns[0]]['ms']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps({"command": command, "machine": machine, "iters": args.iters,
                                                       "models": rows, "timing": timing}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
