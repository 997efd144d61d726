"""The official recipes' ingredients, trained end to end at CPU size beside the engine's default recipe.

    python benchmarks/official_recipes_cpu.py --camvid-root ../shared/data/camvid --out docs/benchmarks/official_recipes_cpu

Each study trains one CPU-size network (a `*_demo` preset) twice for the same iterations and data: once
with the preset as it is (AdamW + poly, large-scale jitter, colour jitter, whole-image test) and once with
an official recipe's ingredients scaled to the demo's image size (MMSeg's SGD + poly with RandomResize,
RandomCrop(cat_max_ratio) and PhotoMetricDistortion and a sliding-window test; detectron2's SGD + steps with
ResizeShortestEdge; Mask2Former's step schedule), or with one of the headline components switched on
(BlendMask's Panoptic-FPN stuff head, SegViT's learned query grid with sliding windows, Gated-SCNN's
per-image class-weighted cross-entropy). Semantic studies use CamVid (train -> val, from scratch), the
others the built-in synthetic set. Runs live in --runs/official_recipes_cpu/<study>_<arm>_<iters> and are
reused once finished. Writes RESULTS.md and results.json to --out. The figures show that each recipe
trains and evaluates end to end; a few hundred iterations from scratch say nothing about the recipes'
full-schedule accuracy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _runs import all_finished, command_line, machine_line, train_or_reuse, write_report
from camvid_best import camvid_overrides, check_camvid_root, seconds_per_iteration


def _steps(iters: int) -> str:
    """detectron2's 1x steps (60k and 80k of 90k) at `iters`."""
    return f"train.steps=[{round(iters * 2 / 3)},{round(iters * 8 / 9)}]"


# MMSeg's semantic recipe at CamVid's CPU scale: RandomResize(scale=(240, 180), ratio_range=(0.67, 1.33)),
# i.e. the default's 1/3-2/3 frame scale, RandomCrop 160 with cat_max_ratio 0.75, flip, PhotoMetricDistortion;
# SGD 0.01, momentum 0.9, weight decay 5e-4, poly 0.9 to 1e-4; sliding 160 px windows (stride 2/3) at test.
MMSEG = ["train.optimizer=sgd", "train.lr=0.01", "train.momentum=0.9", "train.weight_decay=5.0e-4",
         "train.weight_decay_norm=5.0e-4", "train.backbone_multiplier=1.0", "train.clip_grad=0.0",
         "train.schedule=poly", "train.poly_power=0.9", "train.min_lr=1.0e-4", "train.warmup_iters=0",
         "data.train_resize=ratio_range", "data.resize_scale=[240,180]", "data.scale_range=[0.67,1.33]",
         "data.crop_size=160", "data.cat_max_ratio=0.75", "data.photometric_style=distortion",
         "inference.mode=slide", "inference.crop_size=160", "inference.stride=107"]


def detectron2_rcnn(iters: int) -> list[str]:
    """detectron2's Mask R-CNN 1x recipe at the synthetic set's 128 px: SGD 0.02 (16 images; x 8/16 for
    batch 8), steps at 2/3 and 8/9, linear warmup from 1/1000, ResizeShortestEdge(96..128, max 213), no crop."""
    return ["train.optimizer=sgd", "train.lr=0.01", "train.momentum=0.9", "train.weight_decay=1.0e-4",
            "train.backbone_multiplier=1.0", "train.clip_grad=0.0", "train.schedule=step", _steps(iters),
            "train.warmup=linear", f"train.warmup_iters={max(1, iters // 90)}", "train.warmup_factor=0.001",
            "data.train_resize=shortest_edge", "data.short_edge=[96,104,112,120,128]", "data.max_size=213",
            "data.crop_size=null", "data.photometric=false"]


# study -> (title, dataset, preset, metric, {arm: (label, overrides(iters))})
STUDIES = {
    "pspnet_mmseg": ("PSPNet: MMSeg's recipe", "camvid", "pspnet_demo", "mIoU", {
        "default": ("engine default (AdamW + poly, scale jitter, colour jitter, whole image)", lambda n: []),
        "mmseg": ("MMSeg recipe (SGD + poly, RandomResize + cat_max_ratio crop, PhotoMetricDistortion, slide)",
                  lambda n: MMSEG)}),
    "gscnn_image_weighted_ce": ("Gated-SCNN: per-image class-weighted CE", "camvid", "gscnn_demo", "mIoU", {
        "default": ("plain cross-entropy", lambda n: []),
        "image_weighted": ("per-image class weights 1 + (1 - share)", lambda n: ["model.loss.image_weighted_ce=true"])}),
    "segvit_shrunk_grid": ("SegViT Shrunk: official query upsampling", "camvid", "segvit_shrunk_demo", "mIoU", {
        "default": ("QU queries = the QD-entry tokens, whole image", lambda n: []),
        "grid": ("learned 20 x 20 query grid (two stacks), 160 px sliding windows",
                 lambda n: ["model.qu_mode=grid", "model.qu_grid=20", "inference.mode=slide",
                            "inference.crop_size=160", "inference.stride=107"])}),
    "maskrcnn_detectron2": ("Mask R-CNN: detectron2's 1x recipe", "synthetic", "maskrcnn_demo", "AP", {
        "default": ("engine default (AdamW + poly, scale jitter + 128 px crop)", lambda n: []),
        "detectron2": ("detectron2 recipe (SGD + steps, ResizeShortestEdge, no crop)", detectron2_rcnn)}),
    "blendmask_panoptic_fpn": ("Panoptic BlendMask: the Panoptic-FPN stuff head", "synthetic",
                               "blendmask_panoptic_demo", "PQ", {
        "default": ("stuff head on the basis features", lambda n: []),
        "panoptic_fpn": ("Panoptic-FPN head on P2-P5 (AdelaiDet's)", lambda n: ["model.blendmask.stuff_head=panoptic_fpn"])}),
    "mask2former_steps": ("Mask2Former: the COCO step schedule", "synthetic", "mask2former_demo", "PQ", {
        "default": ("poly decay", lambda n: []),
        "steps": ("steps at 0.889 and 0.963 of the iterations (Mask2Former's 327778 / 355092 of 368750)",
                  lambda n: ["train.schedule=step", f"train.steps=[{round(n * 0.889)},{round(n * 0.963)}]"])}),
}


def run_dir(runs: Path, study: str, arm: str, iters: int) -> Path:
    return runs / "official_recipes_cpu" / f"{study}_{arm}_{iters}"


def arm_config(study: str, arm: str, iters: int, run: Path, camvid: Path | None, synth: Path):
    from omniseg.config import load_config

    _, dataset, preset, _, arms = STUDIES[study]
    if dataset == "camvid":
        if camvid is None:
            raise SystemExit(f"study {study} trains on CamVid: pass --camvid-root")
        data = camvid_overrides(camvid)
    else:
        data = [f"data.train.root={synth}", f"data.val.root={synth}"]
    overrides = [*data, *arms[arm][1](iters), f"train.max_iters={iters}", f"train.eval_period={iters}",
                 f"train.checkpoint_period={iters}", f"train.output_dir={run}", "train.log_period=20"]
    return load_config(preset, overrides), overrides


def headline(metrics: dict, metric: str) -> float:
    flat = {k: v for task in metrics.values() if isinstance(task, dict) for k, v in task.items()}
    return float(flat.get(metric, metrics.get(metric, float("nan"))))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--camvid-root", type=Path, default=None)
    ap.add_argument("--synthetic-root", type=Path, default=Path("runs/data/synthetic"))
    ap.add_argument("--studies", nargs="*", default=list(STUDIES), choices=list(STUDIES))
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/official_recipes_cpu"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    camvid = check_camvid_root(args.camvid_root) if args.camvid_root else None
    synth = args.synthetic_root  # generated by the first training that needs it, then reused
    runs = {}
    for study in args.studies:
        for arm in STUDIES[study][4]:
            run = run_dir(args.runs, study, arm, args.iters)
            cfg, overrides = arm_config(study, arm, args.iters, run, camvid, synth)
            train_or_reuse(cfg, run)
            runs[(study, arm)] = (run, overrides)
    if not all_finished([r for r, _ in runs.values()]):
        return
    results, lines = [], [
        "# Official recipes at CPU size", "",
        f"`{command_line(__file__, argv)}`", "",
        f"{machine_line(args.threads)}. {args.iters} iterations per run, from scratch, one seed; wall time is "
        "the training + final evaluation of each run as measured on this machine (other jobs may have shared "
        "the cores). These runs show the recipes training end to end; they make no claim about the full "
        "schedules' accuracy.", ""]
    for study in args.studies:
        title, dataset, preset, metric, arms = STUDIES[study]
        lines += [f"## {title}", "", f"`{preset}` on {'CamVid train -> val (the data settings of `camvid_best`)' if dataset == 'camvid' else 'the synthetic set'}; "
                  "overrides: what the arm changes.", "",
                  f"| arm | {metric} | s / iteration | wall s | overrides |", "|---|---|---|---|---|"]
        for arm, (label, _) in arms.items():
            run, _ = runs[(study, arm)]
            final = json.loads((run / "final_metrics.json").read_text())
            value = headline(final, metric)
            wall = float((run / "wall_seconds.txt").read_text()) if (run / "wall_seconds.txt").is_file() else float("nan")
            spi = seconds_per_iteration(run)
            shown = arms[arm][1](args.iters)
            lines.append(f"| {label} | {value:.1f} | {spi:.2f} | {wall:.0f} | `{' '.join(shown) or '(preset)'}` |")
            results.append({"study": study, "arm": arm, "preset": preset, "metric": metric, "value": value,
                            "sec_per_iter": spi, "wall_s": wall, "iters": args.iters, "overrides": shown,
                            "final": final})
        lines.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    write_report("\n".join(lines), args.out / "RESULTS.md")


if __name__ == "__main__":
    main()
