"""The best CamVid recipe for a 2-core CPU, from scratch, within 2 hours: train, score, write test PNGs.

    python benchmarks/camvid_best.py --camvid-root ../shared/data/camvid --out docs/benchmarks/camvid_best

1. Trains the `camvid_best` preset on CamVid train (no pretrained weights) into --runs/camvid_best,
   unless that run finished already (then it is reused; a killed run resumes).
2. Scores the final model on CamVid val at the label resolution (480x360): mIoU, per-class IoU and
   the boundary F-score.
3. Writes the label PNGs a CamVid test-set evaluation needs, through the same code as
   `omniseg predict` (file name = image name, values = CamVid ids 0-10), for --predict-input (default:
   the val images) into --runs/camvid_best/predictions, and, for val, re-scores those PNGs from disk
   against valannot/ to check they carry exactly the evaluated predictions.
How the recipe was chosen (other candidates at equal iterations): benchmarks/camvid_candidates.py.

Writes RESULTS.md and results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from _runs import train_or_reuse  # benchmarks/_runs.py

CAMVID_DATA = ["data.crop_size=160", "data.scale_range=[1.0,2.0]", "data.min_size_test=180", "data.num_workers=1",
               "task=semantic", "eval_tasks=[semantic]"]


def camvid_overrides(root: Path) -> list[str]:
    r = str(root)
    return [f"data.root={r}",
            "data.train={format: semantic_folder, preset: camvid, root: " + r + ", split: train}",
            "data.val={format: semantic_folder, preset: camvid, root: " + r + ", split: val}", *CAMVID_DATA]


def check_camvid_root(path: Path) -> Path:
    root = path.resolve()
    for sub in ("train", "trainannot", "val", "valannot"):
        if not (root / sub).is_dir():
            raise SystemExit(f"--camvid-root {root}: no {sub}/ folder (expected the SegNet CamVid layout)")
    return root


def seconds_per_iteration(run: Path) -> float:
    """Mean training seconds per iteration from the logged windows (evaluation time excluded)."""
    from omniseg.engine.logger import read_metrics

    rows = [r for r in read_metrics(run / "metrics.jsonl") if "sec_per_iter" in r]
    return float(np.mean([r["sec_per_iter"] for r in rows])) if rows else float("nan")


def score_pngs(pred_dir: Path, label_dir: Path, num_classes: int = 11, ignore: int = 11) -> float:
    """mIoU of label PNGs on disk against CamVid annotation PNGs (void = 11 ignored)."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for gt_path in sorted(label_dir.glob("*.png")):
        gt = np.array(Image.open(gt_path)).astype(np.int64)
        pred = np.array(Image.open(pred_dir / gt_path.name)).astype(np.int64)
        if pred.shape != gt.shape:
            raise SystemExit(f"{pred_dir / gt_path.name}: shape {pred.shape} differs from {gt_path} {gt.shape}")
        keep = gt != ignore
        conf += np.bincount(gt[keep] * num_classes + pred[keep], minlength=num_classes ** 2).reshape(num_classes, -1)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]) * 100)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--camvid-root", type=Path, required=True)
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--predict-input", type=Path, default=None, help="images to write label PNGs for (default: val)")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides of camvid_best")
    args = ap.parse_intermixed_args(argv)
    root = check_camvid_root(args.camvid_root)

    from omniseg.api import load_model
    from omniseg.bench import cpu_model
    from omniseg.config import load_config
    from omniseg.data.build import build_datasets
    from omniseg.engine.evaluate import evaluate

    run = args.runs / "camvid_best"
    cfg = load_config("camvid_best", [*camvid_overrides(root), f"train.output_dir={run}", *args.overrides])
    train_or_reuse(cfg, run)
    final = json.loads((run / "final_metrics.json").read_text())

    model, run_cfg, meta = load_model(run / "model_final.safetensors")
    run_cfg.eval_boundary_f = True
    val = build_datasets(run_cfg, splits=("val",))[0]["val"]
    results = evaluate(model, val, run_cfg, meta, tasks=["semantic"])["semantic"]

    pred_dir = run / "predictions"
    from typer.testing import CliRunner

    from omniseg.cli import app

    predict_input = args.predict_input or root / "val"
    invoked = CliRunner().invoke(app, ["predict", "--weights", str(run / "model_final.safetensors"), "--input",
                                       str(predict_input), "--output", str(pred_dir), "--no-overlay"])
    if invoked.exit_code != 0:
        raise SystemExit(f"omniseg predict failed:\n{invoked.output}")
    png_miou = score_pngs(pred_dir / "semantic", root / "valannot") if args.predict_input is None else None

    machine = f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"
    command = "python benchmarks/camvid_best.py " + " ".join(sys.argv[1:])
    bf = {k: v for k, v in results.items() if k.startswith("BF@")}
    lines = [
        "# CamVid from scratch on a CPU: the `camvid_best` recipe", "",
        f"Command: `{command}`", "", f"Machine: {machine}", "",
        f"Trained on CamVid train (367 images) from random initialisation, {final['iteration']} iterations, "
        f"{final['seconds'] / 60:.1f} min wall clock for training and its periodic evaluations "
        f"({seconds_per_iteration(run):.2f} s per training iteration). Scored on CamVid val (101 images) at the "
        "label resolution 480x360, void ignored.", "",
        "| metric | value |", "|---|---|",
        f"| val mIoU | **{results['mIoU']:.1f}** |",
        f"| val pixel accuracy | {results['pAcc']:.1f} |",
        f"| val mean class accuracy | {results['mAcc']:.1f} |",
        *[f"| boundary F-score {k[3:]} | {v:.1f} |" for k, v in bf.items()],
    ]
    if png_miou is not None:
        lines.append(f"| mIoU re-scored from the written label PNGs | {png_miou:.1f} |")
    lines += ["", "Per-class IoU (val):", "", "| " + " | ".join(results["IoU"]) + " |",
              "|" + "---|" * len(results["IoU"]), "| " + " | ".join(f"{v:.1f}" for v in results["IoU"].values()) + " |"]
    lines += ["", "The CamVid test split is not used here (it is held out), so this is a val figure; SegNet's published "
              "~46 mIoU is on test, with an ImageNet-pretrained VGG16. The training time is the run's own wall "
              "clock and includes whatever else the machine ran meanwhile. Test-set label PNGs: "
              "`omniseg predict -w runs/camvid_best/model_final.safetensors -i CAMVID/test -o OUT --no-overlay` "
              "(OUT/semantic/<image name>.png, ids 0-10); this script does the same for --predict-input."]
    lines += ["", "How this recipe was chosen: [candidates at equal iterations](../camvid_candidates/RESULTS.md)."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"command": command, "machine": machine, "final": final, "val": results, "png_mIoU": png_miou,
         "seconds_per_iteration": seconds_per_iteration(run)}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
