"""Class-incremental (continual) semantic segmentation: one training run per learning step.

`model.continual.steps` splits the K classes into contiguous groups, e.g. [6, 5] (CamVid "6-5") or
[4, 1, 1] (synthetic "4-1-1"). Step t is an ordinary `train` run in `<output_dir>/step<t>` whose model
has decoders 0..t, initialised from step t-1's final weights (the new decoder starts fresh), trained on
labels of step t's classes only. With `continual.freeze` (SegViT's recipe) everything learnt before is
frozen; with `freeze: false` it is plain fine-tuning, the forgetting baseline. After each step the
model is scored on the classes seen so far (ground truth of unseen classes is ignored), and
`continual.json` reports mIoU of the step-0 ("old") classes, of the later ("new") classes and of all
seen classes per step, plus forgetting = old mIoU after step 0 minus old mIoU after the last step.

A finished step (final_metrics.json + model_final.safetensors) is reused; an interrupted one resumes.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from omniseg.files import atomic_path


def step_iterations(cfg: DictConfig, n_steps: int) -> list[int]:
    """Iterations per step: train.max_iters for step 0, continual.step_iters (int or list) for the rest."""
    first = int(cfg.train.max_iters)
    later = OmegaConf.select(cfg, "model.continual.step_iters", default=None)
    if later is None:
        return [first] * n_steps
    if isinstance(later, (int, float)):
        return [first] + [int(later)] * (n_steps - 1)
    later = [int(v) for v in later]
    if len(later) != n_steps - 1:
        raise ValueError(f"model.continual.step_iters has {len(later)} values for {n_steps - 1} later steps")
    return [first] + later


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def step_summary(class_iou: dict[str, float], class_names: list[str], steps: list[int], step: int) -> dict:
    """mIoU of the step-0 classes, of the classes added in steps 1..step, and of all seen classes."""
    seen = sum(steps[: step + 1])
    ious = [class_iou.get(name, math.nan) for name in class_names[:seen]]
    return {"step": step, "seen_classes": seen, "mIoU_old": _mean(ious[: steps[0]]),
            "mIoU_new": _mean(ious[steps[0]:]) if step > 0 else math.nan, "mIoU_all": _mean(ious),
            "class_IoU": dict(zip(class_names[:seen], ious))}


def train_continual(cfg: DictConfig, *, progress: bool = True) -> dict:
    """Run every learning step of `model.continual.steps`; returns (and writes) the continual report."""
    from omniseg.engine.trainer import train

    if "continual" not in cfg.model:
        raise ValueError(f"train-continual needs a SegViT config (model.arch segvit), not model.arch {cfg.model.arch}")
    steps = cfg.model.continual.steps
    if not steps or len(steps) < 2:
        raise ValueError("train-continual needs model.continual.steps with at least two steps, e.g. [4, 2]")
    steps = [int(s) for s in steps]
    iters = step_iterations(cfg, len(steps))
    out = Path(cfg.train.output_dir)
    freeze = cfg.model.continual.freeze
    weights = cfg.train.weights
    rows, class_names = [], None
    for t, n_iter in enumerate(iters):
        run = out / f"step{t}"
        step_cfg = copy.deepcopy(cfg)
        OmegaConf.update(step_cfg, "model.continual.step", t)
        step_cfg.train.output_dir = str(run)
        step_cfg.train.max_iters = n_iter
        step_cfg.train.weights = weights
        final_file, final_weights = run / "final_metrics.json", run / "model_final.safetensors"
        if final_file.is_file() and final_weights.is_file():
            print(f"[omniseg] continual step {t}: finished run in {run} reused", flush=True)
        else:
            print(f"[omniseg] continual step {t}/{len(steps) - 1}: {steps[t]} new classes, {n_iter} iterations, "
                  f"{'earlier parameters frozen' if freeze and t else 'all parameters trained'}", flush=True)
            train(step_cfg, resume=True, progress=progress)
        final = json.loads(final_file.read_text())
        if not final.get("class_IoU"):
            raise ValueError(f"{final_file}: no per-class IoU (the run needs a val split to be scored)")
        if class_names is None:
            class_names = list(final["class_IoU"])
        rows.append({**step_summary(final["class_IoU"], class_names, steps, t), "iterations": n_iter,
                     "seconds": final.get("seconds")})
        weights = str(final_weights)
    report = {"steps": steps, "freeze": freeze, "classes": class_names, "per_step": rows,
              "forgetting": rows[0]["mIoU_old"] - rows[-1]["mIoU_old"]}
    with atomic_path(out / "continual.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict) -> str:
    """The continual report as a Markdown table."""
    lines = [f"steps {'-'.join(map(str, report['steps']))}, "
             f"{'SegViT frozen recipe' if report['freeze'] else 'plain fine-tuning'}",
             "| after step | classes seen | old mIoU | new mIoU | all mIoU |", "|---|---|---|---|---|"]
    for r in report["per_step"]:
        lines.append(f"| {r['step']} | {r['seen_classes']} | {r['mIoU_old']:.1f} | "
                     f"{'-' if math.isnan(r['mIoU_new']) else format(r['mIoU_new'], '.1f')} | {r['mIoU_all']:.1f} |")
    lines.append(f"forgetting (old mIoU after step 0 - after the last step): {report['forgetting']:.1f}")
    return "\n".join(lines)
