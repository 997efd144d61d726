"""One OneFormer vs three task-specific Mask2Former models on the synthetic panoptic set.

    python benchmarks/oneformer_vs_task_specific.py --out docs/benchmarks/oneformer_synthetic

All four use the `mask2former_demo` network (OneFormer adds its task MLP, query initialiser and, in
training only, the text mapper) and the same seed, data order and number of iterations each. OneFormer
draws each image's task uniformly and is trained once; each Mask2Former is trained on one task's
targets. Every model is scored on PQ, AP and mIoU (OneFormer with the matching task token for each).

Also measured: what OneFormer costs at inference next to Mask2Former of the same size (parameters
used, forward time per task) and that the text mapper is never run. Finished runs are reused, so the
trainings may run as separate processes (`--models ...`) and a last call assembles the report.
Writes RESULTS.md and results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from _runs import all_finished, train_or_reuse  # benchmarks/_runs.py

MODELS = {  # key -> (label, preset, overrides); "{iters}" / "{total}" = --iters / 3 x --iters
    "oneformer": ("OneFormer, {iters} iterations (as each task-specific model)", "oneformer_demo", ["task=sampled"]),
    "oneformer_total": ("OneFormer, {total} iterations (as the three together)", "oneformer_demo",
                        ["task=sampled", "train.max_iters={total}", "train.eval_period={total}",
                         "train.checkpoint_period={total}"]),
    "m2f_panoptic": ("Mask2Former trained on panoptic", "mask2former_demo", ["task=panoptic"]),
    "m2f_instance": ("Mask2Former trained on instance", "mask2former_demo", ["task=instance"]),
    "m2f_semantic": ("Mask2Former trained on semantic", "mask2former_demo", ["task=semantic"]),
}
OWN_METRIC = {"m2f_panoptic": "PQ", "m2f_instance": "AP", "m2f_semantic": "mIoU"}


def _median_ms(fn, repeats: int) -> float:
    from omniseg.bench import median_ms

    return median_ms(fn, 1, repeats)


def inference_cost(size: int, repeats: int) -> dict:
    """Parameters and forward time of OneFormer (per task) vs Mask2Former, same demo network, random weights."""
    from omegaconf import OmegaConf

    from omniseg.config import load_config
    from omniseg.models.oneformer import task_token_ids
    from omniseg.models.registry import build_model

    def build(preset):
        cfg = OmegaConf.to_container(load_config(preset).model, resolve=True)
        return build_model(cfg, num_classes=6, thing_ids=[0, 1, 2, 3]).eval()

    torch.manual_seed(0)
    oneformer, m2f = build("oneformer_demo"), build("mask2former_demo")
    calls = []
    oneformer.text_mapper.register_forward_hook(lambda *a: calls.append(1))
    x = oneformer.normalize(torch.randint(0, 255, (1, 3, size, size), dtype=torch.uint8))

    def count(model, skip=()):
        return sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] not in skip)

    out = {"size": size, "repeats": repeats,
           "params_oneformer_total": count(oneformer),
           "params_oneformer_text_mapper": count(oneformer.text_mapper),
           "params_oneformer_inference": count(oneformer, oneformer.training_only),
           "params_mask2former": count(m2f)}
    with torch.no_grad():
        out["ms_mask2former_forward"] = _median_ms(lambda: m2f.forward_raw(x), repeats)
        out["ms_oneformer_forward"] = _median_ms(lambda: oneformer.forward_raw(x, "panoptic"), repeats)
        mask_features, multi_scale = oneformer.pixel_features(x)
        ids = {t: task_token_ids([t], oneformer.task_seq_len) for t in ("semantic", "instance", "panoptic")}
        out["ms_oneformer_decoder_per_task"] = {
            t: _median_ms(lambda t=t: oneformer.decode(multi_scale, mask_features, ids[t]), repeats) for t in ids}
        m_feats, m_scale = m2f.pixel_features(x)
        out["ms_mask2former_decoder"] = _median_ms(lambda: m2f.predictor(m_scale, m_feats), repeats)
    out["text_mapper_calls_during_inference"] = len(calls)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic-root", default="runs/data/synthetic")
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--runs", type=Path, default=Path("runs/bench"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)

    from omniseg.config import load_config

    base = [f"data.train.root={args.synthetic_root}", f"data.val.root={args.synthetic_root}",
            f"train.max_iters={args.iters}", f"train.eval_period={args.iters}",
            f"train.checkpoint_period={args.iters}", "eval_tasks=[panoptic,semantic,instance]", *args.overrides]
    for key in args.models:
        run = args.runs / f"oneformer_bench_{key}"
        _, preset, extra = MODELS[key]
        extra = [e.format(iters=args.iters, total=3 * args.iters) for e in extra]
        train_or_reuse(load_config(preset, [*base, *extra, f"train.output_dir={run}"]), run)

    runs = {key: args.runs / f"oneformer_bench_{key}" for key in MODELS}
    if not all_finished(runs.values()):
        return
    from omniseg.bench import cpu_model

    batch = load_config(str(runs["oneformer"] / "config.yaml")).data.batch_size
    results = {"iters": args.iters, "batch_size": int(batch), "models": {}, "threads": torch.get_num_threads(),
               "cpu": cpu_model()}
    for key, run in runs.items():
        metrics = json.loads((run / "final_metrics.json").read_text())["metrics"]
        wall = run / "wall_seconds.txt"
        label = MODELS[key][0].format(iters=args.iters, total=3 * args.iters)
        results["models"][key] = {"label": label, **{m: metrics.get(m) for m in ("PQ", "AP", "mIoU")},
                                  "train_seconds": float(wall.read_text()) if wall.is_file() else None}
    results["inference"] = [inference_cost(s, args.repeats) for s in (128, 512)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    cmd = "python benchmarks/oneformer_vs_task_specific.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "RESULTS.md").write_text(_report(results, cmd))
    print((args.out / "RESULTS.md").read_text())


def _fmt(v) -> str:
    return "" if v is None else f"{v:.1f}"


def _report(results: dict, cmd: str) -> str:
    models = results["models"]
    lines = [
        "# One OneFormer vs three task-specific Mask2Former models (synthetic panoptic set)", "",
        f"Command: `{cmd.strip()}`", "",
        f"Machine: {results['cpu']} ({platform.machine()}), {results['threads']} threads, "
        f"torch {torch.__version__}, no GPU. Network: `mask2former_demo` (half-width ResNet-18 from scratch, "
        f"3 decoder layers, 24 queries) for all four; {results['iters']} iterations each at batch "
        f"{results['batch_size']}, same seed "
        "and data order. Validation: the 100 synthetic val images at 128 px.", "",
        "| model | PQ | AP | mIoU |", "|---|---|---|---|",
    ]
    for key, m in models.items():
        cells = []
        for metric in ("PQ", "AP", "mIoU"):
            value = _fmt(m[metric])
            cells.append(f"**{value}**" if OWN_METRIC.get(key) == metric else value)
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    one, total = models["oneformer"], models["oneformer_total"]
    specific = {metric: models[key][metric] for key, metric in OWN_METRIC.items()}
    lines += [
        "", "Bold: the task each Mask2Former was trained for. (Training wall times are in results.json; they are "
        "not compared here because other jobs shared the two cores during some of the runs.)", "",
        f"| task | task-specific Mask2Former ({results['iters']} it each, {3 * results['iters']} in total) | "
        f"OneFormer, {results['iters']} it | difference | OneFormer, {3 * results['iters']} it | difference |",
        "|---|---|---|---|---|---|",
    ]
    for metric, value in specific.items():
        cells = []
        for m in (one, total):
            diff = None if m[metric] is None or value is None else m[metric] - value
            cells += [_fmt(m[metric]), "" if diff is None else f"{diff:+.1f}"]
        lines.append(f"| {metric} | {_fmt(value)} | " + " | ".join(cells) + " |")
    lines += ["", "## Inference cost (random weights, 1 image, median over repeats after one warm-up)", "",
              "| input | OneFormer params used at inference | text mapper params (training only) | "
              "Mask2Former params | Mask2Former forward (ms) | OneFormer forward, one task (ms) | "
              "decoder pass: Mask2Former / OneFormer semantic / instance / panoptic (ms) | text mapper calls |",
              "|---|---|---|---|---|---|---|---|"]
    for c in results["inference"]:
        per_task = c["ms_oneformer_decoder_per_task"]
        lines.append(
            f"| {c['size']}x{c['size']} | {c['params_oneformer_inference'] / 1e6:.3f} M | "
            f"{c['params_oneformer_text_mapper'] / 1e6:.3f} M | {c['params_mask2former'] / 1e6:.3f} M | "
            f"{c['ms_mask2former_forward']:.1f} | {c['ms_oneformer_forward']:.1f} | "
            f"{c['ms_mask2former_decoder']:.1f} / {per_task['semantic']:.1f} / {per_task['instance']:.1f} / "
            f"{per_task['panoptic']:.1f} | {c['text_mapper_calls_during_inference']} |")
    lines += ["", "The text mapper is never called at inference and is left out of exports "
              "(`model.training_only`). OneFormer's own inference additions are the task MLP and the "
              "2-layer query initialiser; predicting several tasks runs the backbone and pixel decoder once and the "
              "transformer decoder once per task.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
