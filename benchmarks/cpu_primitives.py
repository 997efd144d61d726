"""The CPU facts omniseg's speed work rests on, measured on this machine.

    python benchmarks/cpu_primitives.py [--threads 2] [--out docs/benchmarks/cpu_primitives.md]

1. Reductions over the channel axis of a [133, 128, 128] map (the semantic post-processing's score
   bounds): with an index (max, argmax) against value-only (amax) and the narrow-integer counts
   `ResizeGrid.argmax_candidates` uses instead of a bool sum.
2. A 44 MB elementwise product (one deformable-attention level's samples at 512x512, batch 2) in a
   fresh process with glibc's defaults, with omniseg's allocator setting (omniseg/allocator.py), and
   with the same settings made only after torch is imported.
3. Resident memory right after importing torch, and torch + timm (what every training process starts with).
4. Softmax over the last axis of a [43008, 12] map (deformable attention's weights over levels x
   points at 512x512): torch's kernel against max-subtract, exp and divide in place.
5. A [441, 768] x [768, 768] linear layer (Swin-T's last-stage attention projection at 512x512) whose
   input holds denormal floats in a third of its rows (what a padded window's attention outputs with
   zero-bias weights), in a fresh process with and without `omniseg.denormals.flush_denormals()`.
Each timing is the median of --repeats calls after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _runs import command_line, machine_line, write_report  # benchmarks/_runs.py

from omniseg.allocator import tuned_environment

_CHILD = """
import ctypes, json, os, sys, time, statistics
from omniseg.allocator import SETTINGS, _OPTIONS, tune_malloc
late = sys.argv[3] == "late"
tuned = False if late else tune_malloc()
import torch
if late:  # the same mallopt calls, made after torch is imported
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    tuned = all(mallopt(_OPTIONS[k], min(v, 2**31 - 1)) for k, v in SETTINGS.items())
torch.set_num_threads(int(sys.argv[1]))
x = torch.randn(16, 32, 4, 5376)
def product():
    y = x * 2
times = []
for i in range(int(sys.argv[2]) + 2):
    t = time.perf_counter(); product(); times.append(time.perf_counter() - t)
print(json.dumps({"tuned": tuned, "ms": 1000 * statistics.median(times[2:])}))
"""

_DENORMAL = """
import json, statistics, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
threads = 0
if sys.argv[3] == "flush":
    from omniseg.denormals import flush_denormals
    threads = flush_denormals()
g = torch.Generator().manual_seed(0)
x = torch.randn(441, 768, generator=g)
x[::3] = torch.randn(147, 768, generator=g) * 1e-40  # denormal: below 1.2e-38
weight, bias = torch.randn(768, 768, generator=g) * 0.02, torch.zeros(768)
times = []
for i in range(int(sys.argv[2]) + 2):
    t = time.perf_counter(); torch.nn.functional.linear(x, weight, bias); times.append(time.perf_counter() - t)
print(json.dumps({"threads": threads, "ms": 1000 * statistics.median(times[2:])}))
"""

_RSS = """
import importlib, json, os, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
with open("/proc/self/statm") as f:
    print(json.dumps(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20))
"""


def _child(code: str, args: list[str], env: dict) -> object:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/cpu_primitives.md"))
    args = ap.parse_args(argv)

    import torch

    from omniseg.bench import median_ms

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(133, 128, 128, generator=g)
    reach = maps >= maps.amax(0) - 0.5
    reach8 = reach.view(torch.uint8)
    index = torch.arange(133, dtype=torch.uint8).view(-1, 1, 1)
    reductions = {
        "max(0) (values and indices)": lambda: maps.max(0),
        "argmax(0)": lambda: maps.argmax(0),
        "amax(0) (values only)": lambda: maps.amax(0),
        "bool sum(0, dtype=int32) (count)": lambda: reach.sum(0, dtype=torch.int32),
        "uint8 sum(0, dtype=uint8) (count)": lambda: reach8.sum(0, dtype=torch.uint8),
        "uint8 (reach x index).sum(0) (the single reaching channel)": lambda: (reach8 * index).sum(0, dtype=torch.uint8),
    }
    rows = [f"| {name} | {median_ms(fn, 3, args.repeats):.2f} ms |" for name, fn in reductions.items()]
    from omniseg.models.layers.ms_deform_attn import softmax_last_dim

    logits = torch.randn(43008, 12, generator=g)
    softmax_rows = [f"| {name} | {median_ms(fn, 3, args.repeats):.2f} ms |" for name, fn in (
        ("torch.softmax(-1)", lambda: logits.softmax(-1)),
        ("omniseg softmax_last_dim (in place, no autograd)", lambda: softmax_last_dim(logits)))]

    plain_env = tuned_environment({**os.environ, "OMNISEG_MALLOC_TUNING": "0"})
    tuned_env = {k: v for k, v in os.environ.items() if k != "OMNISEG_MALLOC_TUNING"}
    product = {label: _child(_CHILD, [str(args.threads), str(args.repeats), when], env)
               for label, env, when in (("glibc defaults (OMNISEG_MALLOC_TUNING=0)", plain_env, "early"),
                                        ("omniseg allocator setting, before `import torch`", tuned_env, "early"),
                                        ("the same mallopt calls after `import torch`", plain_env, "late"))}
    rss = {" + ".join(mods): _child(_RSS, list(mods), plain_env) for mods in (("torch",), ("torch", "timm"))}
    denormal = {label: _child(_DENORMAL, [str(args.threads), str(args.repeats), mode], tuned_env)
                for label, mode in (("torch defaults", "plain"),
                                    ("`omniseg.denormals.flush_denormals()`", "flush"))}

    text = "\n".join([
        "# CPU primitives",
        "",
        f"Command: `{command_line(__file__, argv)}`",
        "",
        machine_line(args.threads) + f"; median of {args.repeats} after warm-up.",
        "",
        "## Channel-axis reductions of a [133, 128, 128] float32 map",
        "",
        "| reduction | time |",
        "|---|---|",
        *rows,
        "",
        "## Softmax over the last axis of a [43008, 12] float32 map",
        "",
        "| softmax | time |",
        "|---|---|",
        *softmax_rows,
        "",
        "## 44 MB elementwise product ([16, 32, 4, 5376] float32 x 2), fresh process",
        "",
        "| allocator | time |",
        "|---|---|",
        *[f"| {label} | {r['ms']:.1f} ms (setting applied: {r['tuned']}) |" for label, r in product.items()],
        "",
        "## Resident memory right after import (glibc defaults)",
        "",
        "| imports | RSS |",
        "|---|---|",
        *[f"| {mods} | {mib:.0f} MiB |" for mods, mib in rss.items()],
        "",
        "## [441, 768] x [768, 768] linear, a third of the input rows denormal, fresh process",
        "",
        "| denormals | time |",
        "|---|---|",
        *[f"| {label} | {r['ms']:.2f} ms (threads flushing: {r['threads']}) |" for label, r in denormal.items()],
        "",
    ])
    return write_report(text, args.out)


if __name__ == "__main__":
    main()
