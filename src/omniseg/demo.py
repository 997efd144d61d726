"""`make demo` / `omniseg demo`: synthetic data -> train on CPU -> evaluate -> overlays and curves."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def run_demo(output: str | Path = "runs/demo", *, preset: str = "mp_former_demo", overrides: list[str] | None = None) -> dict:
    from omniseg import visualize as vis
    from omniseg.api import Predictor
    from omniseg.config import load_config
    from omniseg.data.build import build_datasets
    from omniseg.engine.trainer import train

    output = Path(output)
    cfg = load_config(preset, [f"train.output_dir={output}", *(overrides or [])])
    t0 = time.time()
    print(f"[demo] preset {preset}: {cfg.model.arch} / {cfg.model.backbone}, {cfg.train.max_iters} iterations, "
          f"batch {cfg.data.batch_size}, {torch.get_num_threads()} threads; data in {cfg.data.train.root}", flush=True)
    metrics = train(cfg)
    train_seconds = time.time() - t0

    # Overlays for a few validation images, through the same Predictor users call.
    predictor = Predictor(output / "model_final.safetensors")
    datasets, meta = build_datasets(cfg, splits=("val",))
    val = datasets["val"]
    for i in range(min(6, len(val))):
        sample = val[i]
        pred = predictor(sample["image"])
        panel = torch.cat([sample["image"],
                           vis.overlay_panoptic(sample["image"], pred["panoptic"]["segment_map"],
                                                pred["panoptic"]["segments_info"], meta),
                           vis.overlay_semantic(sample["image"], pred["semantic"], meta),
                           vis.overlay_instances(sample["image"], pred["instances"], meta)], dim=2)
        vis.save_image(output / "overlays" / f"val_{i:02d}.png", panel)
    vis.plot_training_curves(output / "metrics.jsonl", output / "training_curves.png")
    summary = {
        "preset": preset,
        "iterations": int(cfg.train.max_iters),
        "train_and_eval_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "metrics": {k: round(v, 2) for k, v in metrics.items() if k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU", "pAcc", "AP", "AP50", "AP75")},
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    m = summary["metrics"]
    print(f"[demo] done in {train_seconds / 60:.1f} min: PQ {m.get('PQ', float('nan')):.1f} | "
          f"mIoU {m.get('mIoU', float('nan')):.1f} | AP {m.get('AP', float('nan')):.1f}", flush=True)
    print(f"[demo] overlays: {output / 'overlays'}  curves: {output / 'training_curves.png'}  "
          f"weights: {output / 'model_final.safetensors'}", flush=True)
    return summary
