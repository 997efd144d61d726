"""Training runs shared by the benchmark scripts: each is trained once into its folder and reused by
later calls, so the trainings of one study may run as separate processes and a last call reports."""

from __future__ import annotations

import time
from pathlib import Path


def finished(run: Path) -> bool:
    """A run is finished once the trainer has written its final metrics."""
    return (run / "final_metrics.json").is_file()


def train_or_reuse(cfg, run: Path) -> None:
    """Train `cfg` (whose train.output_dir is `run`) unless it finished; a killed run resumes. Records
    the wall time of this invocation in wall_seconds.txt."""
    from omniseg.engine.trainer import train

    if finished(run):
        print(f"[bench] {run}: finished run found, reused", flush=True)
        return
    t0 = time.time()
    train(cfg, resume=True)
    (run / "wall_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")


def all_finished(runs) -> bool:
    """True when every run finished; otherwise says that the report waits."""
    if all(finished(r) for r in runs):
        return True
    print("[bench] not all models are trained yet; report skipped", flush=True)
    return False


def command_line(script: str, argv=None) -> str:
    """The command as typed, with the script path relative to the working directory it ran from (so
    relative --out / --runs paths in it stay meaningful)."""
    import os
    import sys

    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", os.path.relpath(script, os.getcwd()), *args])


def machine_line(threads: int) -> str:
    """The report's machine facts (CPU model, cores, torch threads, torch version), a sentence without
    its full stop, for the caller to continue."""
    import os
    import platform

    import torch

    from omniseg.bench import cpu_model

    return (f"Machine: {cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, {threads} threads, "
            f"torch {torch.__version__}")


def write_report(text: str, out: Path) -> str:
    """Print a benchmark's markdown report and write it to `out` (folders created)."""
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text
