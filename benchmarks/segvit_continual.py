"""SegViT's continual-learning claim, measured: forgetting of the first step's classes under SegViT's
frozen recipe vs plain fine-tuning, class-incremental, from scratch.

    python benchmarks/segvit_continual.py --out docs/benchmarks/segvit_continual

Protocols (scaled-down versions of ADE20K's 100-50 / 100-10): on the built-in synthetic set (6 classes:
4 shapes, then the 2 textures) "4-2" and "4-1-1"; with --camvid-root also CamVid "6-5" (11 classes, the
first 6 then the last 5). Each study is `omniseg train-continual segvit_demo` with
model.continual.steps=<protocol> and model.continual.freeze true (SegViT: encoder and earlier decoders
frozen, a new ATM decoder per step) or false (plain fine-tuning of everything on the new labels).
Step 0 is the same training for every study of a dataset (same classes, config and seed), so it is
trained once and shared. Runs live in --runs/segvit_continual and are reused once finished.
Writes RESULTS.md and results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
from pathlib import Path

import torch
from _runs import command_line  # benchmarks/_runs.py

PROTOCOLS = {"synthetic": [[4, 2], [4, 1, 1]], "camvid": [[6, 5]]}
RECIPES = {True: "SegViT (earlier parameters frozen)", False: "plain fine-tuning"}


def study_config(dataset: str, steps: list[int], freeze: bool, out: Path, args):
    from omniseg.config import load_config

    overrides = [f"model.continual.steps=[{','.join(map(str, steps))}]", f"model.continual.freeze={str(freeze).lower()}",
                 f"train.max_iters={args.first_iters}", f"model.continual.step_iters={args.step_iters}",
                 f"train.output_dir={out}", f"train.eval_period={max(args.first_iters, args.step_iters)}",
                 "train.checkpoint_period=250"]
    if dataset == "camvid":
        from camvid_best import camvid_overrides, check_camvid_root

        overrides = [*camvid_overrides(check_camvid_root(args.camvid_root)), *overrides]
    return load_config("segvit_demo", overrides)


def share_first_step(source: Path, target: Path) -> None:
    """Give a study the dataset's common step 0 (final weights and metrics) so it is not retrained."""
    src, dst = source / "step0", target / "step0"
    if (dst / "final_metrics.json").is_file() or not (src / "final_metrics.json").is_file():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("final_metrics.json", "model_final.safetensors"):
        shutil.copyfile(src / name, dst / name)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--camvid-root", type=Path, default=None)
    ap.add_argument("--first-iters", type=int, default=1000)
    ap.add_argument("--step-iters", type=int, default=500)
    ap.add_argument("--protocols", nargs="+", default=None,
                    help="subset of the protocols to run, e.g. 4-2 6-5 (default: all of each dataset)")
    args = ap.parse_args(argv)
    from omniseg.bench import cpu_model
    from omniseg.engine.continual import train_continual

    datasets = ["synthetic"] + (["camvid"] if args.camvid_root else [])
    studies = []
    for dataset in datasets:
        first = None
        for steps in PROTOCOLS[dataset]:
            if args.protocols and "-".join(map(str, steps)) not in args.protocols:
                continue
            for freeze in (True, False):
                out = args.runs / "segvit_continual" / dataset / f"{'-'.join(map(str, steps))}_{'frozen' if freeze else 'finetune'}"
                if first is not None:
                    share_first_step(first, out)
                report = train_continual(study_config(dataset, steps, freeze, out, args), progress=False)
                first = first or out
                studies.append({"dataset": dataset, "protocol": "-".join(map(str, steps)), "freeze": freeze, **report})

    machine = f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"
    command = command_line(__file__, argv)

    def fmt(v: float) -> str:
        return "-" if v is None or math.isnan(v) else f"{v:.1f}"

    lines = ["# Continual semantic segmentation: SegViT's frozen recipe vs plain fine-tuning", "",
             f"Command: `{command}`", "", f"Machine: {machine}", "",
             f"`segvit_demo` (6-block ViT, 8 px patches, ATM) from scratch: step 0 trains {args.first_iters} iterations "
             f"on the first classes, every later step {args.step_iters} iterations with labels of its own classes only "
             "(other pixels are negatives), on all training images. After each step the model is scored on val for "
             "the classes seen so far (ground truth of later classes ignored). old = mIoU of step 0's classes, "
             "new = mIoU of the classes added since; forgetting = old after step 0 - old after the last step.", "",
             "| dataset | protocol | recipe | old after step 0 | old at the end | forgetting | new at the end | all at the end |",
             "|---|---|---|---|---|---|---|---|"]
    for s in studies:
        first, last = s["per_step"][0], s["per_step"][-1]
        lines.append(f"| {s['dataset']} | {s['protocol']} | {RECIPES[s['freeze']]} | {fmt(first['mIoU_old'])} | "
                     f"{fmt(last['mIoU_old'])} | {fmt(s['forgetting'])} | {fmt(last['mIoU_new'])} | {fmt(last['mIoU_all'])} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps({"command": command, "machine": machine,
                                                       "studies": studies}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
