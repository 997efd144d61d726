"""Soak test: train a small model for many iterations and watch resident memory (a leak shows as a slope).

    python benchmarks/soak.py [--iters 2000] [--out docs/benchmarks/soak] [--data-root runs/data/synthetic] [overrides...]

Runs `omniseg train` (with DataLoader workers, periodic evaluation and checkpoints, as a user would) in a
child process and samples the resident set size (RSS) of it and its workers from /proc every half
second. Writes RESULTS.md (RSS every 10% of the run, and the growth over the second half) and rss.png.
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from omniseg.engine.logger import read_metrics

SMALL_MODEL = [
    "model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [16, 32, 64, 64]}",
    "model.hidden_dim=64", "model.conv_dim=64", "model.mask_dim=64", "model.nheads=2",
    "model.dim_feedforward=128", "model.enc_layers=1", "model.enc_dim_feedforward=128",
    "model.num_queries=16", "model.loss.train_num_points=512",
    "data.crop_size=64", "data.batch_size=4", "data.num_workers=2",
]


def tree_rss_mb(pid: int) -> float:
    """RSS of `pid` and all its descendants, in MiB."""
    total_kb = 0
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
        stack.extend(children.get(p, []))
    return total_kb / 1024


def last_iter(jsonl: Path) -> int:
    """Newest logged iteration (0 before the first record)."""
    if not jsonl.is_file():
        return 0
    return max((int(r["iter"]) for r in read_metrics(jsonl)), default=0)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/soak"))
    ap.add_argument("--data-root", default="runs/data/synthetic")
    ap.add_argument("--run-dir", type=Path, default=Path("runs/bench/soak"))
    ap.add_argument("overrides", nargs="*", help="extra config overrides")
    args = ap.parse_args(argv)

    import shutil

    shutil.rmtree(args.run_dir, ignore_errors=True)
    overrides = [*SMALL_MODEL, f"data.train.root={args.data_root}", f"data.val.root={args.data_root}",
                 f"train.max_iters={args.iters}", f"train.eval_period={max(1, args.iters // 4)}",
                 f"train.checkpoint_period={max(1, args.iters // 8)}", "train.log_period=10",
                 f"train.output_dir={args.run_dir}", *args.overrides]
    cmd = [sys.executable, "-m", "omniseg.cli", "train", "mask2former_demo", *overrides]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, int, float]] = []  # (seconds, iteration, RSS MiB)
    while proc.poll() is None:
        samples.append((time.time() - t0, last_iter(args.run_dir / "metrics.jsonl"), tree_rss_mb(proc.pid)))
        time.sleep(0.5)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}):\n{err[-3000:]}")
    seconds = time.time() - t0

    def rss_at(fraction: float) -> float:
        """Median RSS over the samples within +-2.5% of the run around `fraction` of the iterations."""
        lo, hi = (fraction - 0.025) * args.iters, (fraction + 0.025) * args.iters
        window = sorted(r for _, it, r in samples if lo <= it <= hi and it > 0)
        return window[len(window) // 2] if window else float("nan")

    rows = [(int(f * args.iters), rss_at(f)) for f in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.975)]
    half, end = rss_at(0.5), rss_at(0.975)
    peak = max(r for _, _, r in samples)
    growth_per_1k = (end - half) / (0.475 * args.iters) * 1000

    args.out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([it for _, it, _ in samples], [r for _, _, r in samples], lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("RSS of trainer + workers (MiB)")
    ax.set_title(f"omniseg soak: {args.iters} iterations")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "rss.png", dpi=110)

    command = "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Soak: resident memory over a long training run",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, no GPU. "
        f"`omniseg train mask2former_demo` shrunk to a small model ({' '.join(SMALL_MODEL[-3:])}), "
        f"evaluation every {max(1, args.iters // 4)} and checkpoints every {max(1, args.iters // 8)} iterations; "
        f"RSS = trainer process + DataLoader workers, sampled every 0.5 s.",
        "",
        "| iteration | RSS (MiB) |",
        "|---|---|",
        *[f"| {it} | {r:.0f} |" for it, r in rows],
        "",
        f"Peak {peak:.0f} MiB. Growth from 50% to 97.5% of the run: {end - half:+.1f} MiB "
        f"({growth_per_1k:+.2f} MiB per 1000 iterations). Wall time {seconds:.0f} s.",
        "",
        "![RSS over the run](rss.png)",
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "RESULTS.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
