"""How `camvid_best` was chosen: candidate recipes from every family, equal iterations on CamVid, from scratch.

    python benchmarks/camvid_candidates.py --camvid-root ../shared/data/camvid --out docs/benchmarks/camvid_candidates

Each candidate trains for --iters iterations on CamVid train with the data settings of `camvid_best`
(160 px crops of 1/3-2/3-scale frames, batch 8, same seed and data order, evaluated on val at 1/2
scale) into --runs/camvid_candidates/<key>_<iters>, and is reused once finished. Trainings of one
study may run as separate processes (e.g. `--candidates pspnet danet` and `--candidates fastfcn gscnn`
side by side); a call whose candidates have all finished writes RESULTS.md and results.json, keeping
the rows that earlier calls at the same --iters wrote there.

Candidates that this call does not train but that another committed benchmark trained on the same
network and data settings (MP-Former / Mask2Former in docs/benchmarks/mp_former_camvid) are listed
below the table with their source, not mixed into it.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from _runs import all_finished, command_line, train_or_reuse  # benchmarks/_runs.py
from camvid_best import camvid_overrides, check_camvid_root, seconds_per_iteration

# key -> (label, preset, overrides)
CANDIDATES = {
    "mp_former": ("MP-Former (camvid_best network)", "camvid_best", []),
    "mask2former": ("Mask2Former (same network)", "camvid_best", ["model.mp.enabled=false"]),
    "pspnet": ("PSPNet (dilated OS8)", "pspnet_demo", []),
    "fastfcn": ("FastFCN: JPU + PSPNet head", "fastfcn_jpu_demo", []),
    "danet": ("DANet (dilated OS8)", "danet_demo", []),
    "gscnn": ("Gated-SCNN (dilated OS8)", "gscnn_demo", []),
    "segvit": ("SegViT: plain ViT + ATM", "segvit_demo", []),
    "segvit_shrunkpp": ("SegViT Shrunk++ ViT + ATM", "segvit_shrunkpp_demo", []),
    "upernet_vit": ("plain ViT + UPerNet", "upernet_vit_demo", []),
}
MASK_REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "mp_former_camvid" / "results.json"


def candidate_run(runs: Path, key: str, iters: int) -> Path:
    return runs / "camvid_candidates" / f"{key}_{iters}"


def candidate_config(key: str, root: Path, iters: int, run: Path):
    from omniseg.config import load_config

    _, preset, extra = CANDIDATES[key]
    return load_config(preset, [*camvid_overrides(root), *extra, f"train.max_iters={iters}",
                                f"train.eval_period={iters}", f"train.checkpoint_period={iters}",
                                f"train.output_dir={run}"])


def summarize(key: str, run: Path) -> dict:
    from omniseg.api import load_model

    label, preset, _ = CANDIDATES[key]
    final = json.loads((run / "final_metrics.json").read_text())
    model = load_model(run / "model_final.safetensors")[0]
    return {"label": label, "preset": preset, "mIoU": final["metrics"]["mIoU"],
            "pAcc": final["metrics"]["pAcc"], "sec_per_iter": seconds_per_iteration(run),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def mask_reference(iters: int) -> dict:
    """Final mIoU of the MP-Former / Mask2Former runs of the convergence benchmark, if it ran `iters`."""
    if not MASK_REFERENCE.is_file():
        return {}
    ref = json.loads(MASK_REFERENCE.read_text())
    if ref.get("iters") != iters:
        return {}
    return {m["name"]: m["curve"][-1][1] for m in ref["models"].values()}


def earlier_rows(path: Path, iters: int) -> dict:
    """Rows of an earlier call's results.json at the same iteration count (each with its command)."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    if int(earlier.get("iters", -1)) != iters:
        return {}
    return {key: {"command": earlier.get("command"), "machine": earlier.get("machine"), **row}
            for key, row in earlier.get("candidates", {}).items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--camvid-root", type=Path, required=True)
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--iters", type=int, default=1000)
    args = ap.parse_args(argv)
    root = check_camvid_root(args.camvid_root)

    runs = {key: candidate_run(args.runs, key, args.iters) for key in args.candidates}
    for key, run in runs.items():
        train_or_reuse(candidate_config(key, root, args.iters, run), run)
    if not all_finished(runs.values()):
        return
    machine = f"{_cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"
    command = command_line(__file__, argv)
    rows = {key: {**summarize(key, run), "command": command, "machine": machine} for key, run in runs.items()}
    rows = {**earlier_rows(args.out / "results.json", args.iters), **rows}  # a table grows over separate calls
    reference = {} if {"mp_former", "mask2former"} & set(rows) else mask_reference(args.iters)

    calls = list(dict.fromkeys((r["command"], r["machine"]) for r in rows.values()))
    lines = ["# CamVid candidates at equal iterations, from scratch", "", "Commands (each trains the recipes it "
             "names and adds them to this table; a run already trained is reused):", ""]
    lines += [f"- `{c}` on {m}" for c, m in calls]
    lines += ["",
             f"{args.iters} iterations each on CamVid train (367 images), batch 8, 160 px crops of 1/3-2/3-scale "
             "frames, no pretrained weights; val (101 images) at 1/2 scale, void ignored. s / iteration is the "
             "trainer's logged mean (evaluation excluded) and depends on what else the machine ran.", "",
             "| recipe | preset | params (M) | s / iteration | val pixel acc | val mIoU |", "|---|---|---|---|---|---|"]
    for r in sorted(rows.values(), key=lambda r: -r["mIoU"]):
        lines.append(f"| {r['label']} | `{r['preset']}` | {r['params_m']:.1f} | {r['sec_per_iter']:.2f} | "
                     f"{r['pAcc']:.1f} | {r['mIoU']:.1f} |")
    if reference:
        lines += ["", f"Same data settings and {args.iters} iterations, from `benchmarks/mp_former_convergence.py camvid` "
                  "([its page](../mp_former_camvid/RESULTS.md), an earlier commit, single-threaded): "
                  + ", ".join(f"{name} {miou:.1f}" for name, miou in reference.items()) + " val mIoU."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps({"iters": args.iters, "candidates": rows,
                                                       "reference": reference}, indent=2))
    print("\n".join(lines))


def _cpu() -> str:
    from omniseg.bench import cpu_model

    return cpu_model()


if __name__ == "__main__":
    main()
