"""Convergence study: Mask2Former vs MP-Former with the same network, seeds, data order and budget.

    # (a) synthetic panoptic set: PQ vs iteration
    python benchmarks/mp_former_convergence.py synthetic --out docs/benchmarks/mp_former_synthetic
    # (b) CamVid semantic: mIoU vs iteration (train on train, evaluate on val)
    python benchmarks/mp_former_convergence.py camvid --camvid-root ../shared/data/camvid --out docs/benchmarks/mp_former_camvid

Each model is trained with `omniseg.engine.trainer.train` from the `mask2former_demo` network
(override anything with trailing key=value), evaluated every `--eval-every` iterations, then scored
for layer consistency (mIoU-Li / Util per decoder layer) on the validation split. Finished runs are
reused (their folders hold model_final.safetensors), so the two trainings may also be launched as two
processes (`--models mask2former` / `--models mp_former`) and the report assembled by a third call.
Writes RESULTS.md, results.json and curves.png to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from _runs import all_finished, train_or_reuse  # benchmarks/_runs.py

MODELS = {"mask2former": ("Mask2Former", []), "mp_former": ("MP-Former", ["model.mp.enabled=true"])}
HEADLINE = {"synthetic": "PQ", "camvid": "mIoU"}


def dataset_overrides(name: str, camvid_root: str | None, synth_root: str) -> list[str]:
    if name == "synthetic":
        return [f"data.train.root={synth_root}", f"data.val.root={synth_root}"]
    if not camvid_root or not Path(camvid_root).is_dir():
        raise SystemExit(f"--camvid-root {camvid_root!r} is not a folder (CamVid with train/, trainannot/, val/, valannot/)")
    root = str(Path(camvid_root).resolve())
    return [
        "task=semantic", "eval_tasks=[semantic]",
        "data.train={format: semantic_folder, preset: camvid, root: " + root + ", split: train}",
        "data.val={format: semantic_folder, preset: camvid, root: " + root + ", split: val}",
        # 360x480 frames trained at 1/3-2/3 scale in 160 px crops, evaluated at 1/2 scale
        "data.crop_size=160", "data.scale_range=[1.0,2.0]", "data.min_size_test=180",
    ]


def read_curve(run: Path, metric: str) -> list[tuple[int, float]]:
    from omniseg.engine.logger import read_metrics

    return [(int(r["iter"]), float(r[metric])) for r in read_metrics(run / "metrics.jsonl")
            if isinstance(r.get(metric), (int, float))]


def first_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((it for it, v in curve if v >= target), None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=sorted(HEADLINE))
    ap.add_argument("--camvid-root", default=None)
    ap.add_argument("--synthetic-root", default="runs/data/synthetic")
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--consistency-images", type=int, default=50)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--runs", type=Path, default=Path("runs/bench"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)

    from omniseg.api import load_model
    from omniseg.config import load_config
    from omniseg.data.build import build_datasets
    from omniseg.evaluation.consistency import evaluate_consistency

    metric = HEADLINE[args.dataset]
    base = [*dataset_overrides(args.dataset, args.camvid_root, args.synthetic_root),
            f"train.max_iters={args.iters}", f"train.eval_period={args.eval_every}",
            f"train.checkpoint_period={args.iters}", *args.overrides]
    for key in args.models:
        run = args.runs / f"{args.dataset}_{key}"
        train_or_reuse(load_config("mask2former_demo", [*base, *MODELS[key][1], f"train.output_dir={run}"]), run)

    runs = {key: args.runs / f"{args.dataset}_{key}" for key in MODELS}
    if not all_finished(runs.values()):
        return

    results = {"dataset": args.dataset, "metric": metric, "iters": args.iters, "models": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for key, run in runs.items():
        curve = read_curve(run, metric)
        model, cfg, _ = load_model(run / "model_final.safetensors")
        datasets, _ = build_datasets(cfg, splits=("val",))
        figure = args.out / f"layer_masks_{key}.png" if args.dataset == "synthetic" else None
        consistency = evaluate_consistency(model, datasets["val"], cfg, max_images=args.consistency_images,
                                           figure=str(figure) if figure else None, progress=False)
        steps = [seconds for _, seconds in read_curve(run, "sec_per_iter")]
        results["models"][key] = {"name": MODELS[key][0], "curve": curve, "final": curve[-1][1] if curve else None,
                                  "consistency": consistency,
                                  "median_sec_per_iter": sorted(steps)[len(steps) // 2] if steps else None}
    m2f, mp = results["models"]["mask2former"], results["models"]["mp_former"]
    results["mp_first_reaches_m2f_final_at"] = first_reaching(mp["curve"], m2f["final"])
    results["m2f_first_reaches_mp_final_at"] = first_reaching(m2f["curve"], mp["final"])
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(results, args.out / "curves.png")
    cmd = "python benchmarks/mp_former_convergence.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "RESULTS.md").write_text(_report(results, cmd))
    print((args.out / "RESULTS.md").read_text())


def _report(results: dict, cmd: str) -> str:
    metric = results["metric"]
    m2f, mp = results["models"]["mask2former"], results["models"]["mp_former"]
    its = sorted({it for m in (m2f, mp) for it, _ in m["curve"]})
    by_it = {k: dict(results["models"][k]["curve"]) for k in ("mask2former", "mp_former")}
    lines = [
        f"# Mask2Former vs MP-Former convergence: {results['dataset']} ({metric})", "",
        f"Command: `{cmd.strip()}`", "",
        f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, no GPU. "
        "Same network (`mask2former_demo`), seed, data order and schedule; MP-Former adds mask-piloted training only.", "",
        f"| iteration | Mask2Former {metric} | MP-Former {metric} |", "|---|---|---|",
    ]
    for it in its:
        a, b = by_it["mask2former"].get(it), by_it["mp_former"].get(it)
        lines.append(f"| {it} | {'' if a is None else f'{a:.1f}'} | {'' if b is None else f'{b:.1f}'} |")
    reach = results["mp_first_reaches_m2f_final_at"]
    lines += [
        "",
        f"Final {metric}: Mask2Former {m2f['final']:.1f}, MP-Former {mp['final']:.1f}. "
        f"MP-Former first reaches Mask2Former's final {metric} at iteration "
        f"{reach if reach is not None else 'never (within the budget)'} of {results['iters']}.",
        f"Median training seconds per iteration (whole loop incl. data): Mask2Former {m2f['median_sec_per_iter']:.3f}, "
        f"MP-Former {mp['median_sec_per_iter']:.3f}.", "",
        "## Layer consistency of the final models (validation, %)", "",
        "Set 0 = initial queries, set i = after decoder layer i. mIoU-Li: IoU of the final owner query's mask "
        "between consecutive sets (i -> i+1); mIoU-Li-gt: that mask vs its GT; Util: GT matched to its final "
        "owner already at that set (the last set is the reference, so it has none; see "
        "`omniseg.evaluation.consistency`).", "",
    ]
    n_sets = len(m2f["consistency"]["mIoU-Li-gt"])
    header = "| model | metric | " + " | ".join(f"set {i}" for i in range(n_sets)) + " |"
    lines += [header, "|---|---|" + "---|" * n_sets]
    for m in (m2f, mp):
        for key in ("mIoU-Li", "mIoU-Li-gt", "Util"):
            vals = m["consistency"][key]
            cells = [f"{v:.1f}" for v in vals] + [""] * (n_sets - len(vals))
            lines.append(f"| {m['name']} | {key} | " + " | ".join(cells) + " |")
    lines += ["", f"({m2f['consistency']['images']} images, {m2f['consistency']['objects']} GT segments)", ""]
    return "\n".join(lines)


def _plot(results: dict, out: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.5))
    ax_curve, ax_cons = figure.subplots(1, 2)
    for key, style in (("mask2former", "o"), ("mp_former", "s")):
        m = results["models"][key]
        if m["curve"]:
            xs, ys = zip(*m["curve"])
            ax_curve.plot(xs, ys, marker=style, markersize=3, label=m["name"])
        ax_cons.plot(range(len(m["consistency"]["mIoU-Li"])), m["consistency"]["mIoU-Li"], marker=style, markersize=3,
                     label=f"{m['name']} mIoU-Li")
        ax_cons.plot(range(len(m["consistency"]["Util"])), m["consistency"]["Util"], marker=style, markersize=3, alpha=0.5,
                     linestyle="--", label=f"{m['name']} Util")
    ax_curve.set_xlabel("iteration")
    ax_curve.set_ylabel(results["metric"])
    ax_curve.set_title(f"{results['dataset']}: {results['metric']} vs iteration")
    ax_cons.set_xlabel("prediction set (0 = initial queries)")
    ax_cons.set_ylabel("%")
    ax_cons.set_title("layer consistency (final models)")
    for ax in (ax_curve, ax_cons):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=100)


if __name__ == "__main__":
    main()
