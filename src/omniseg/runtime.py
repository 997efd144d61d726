"""Process-wide settings. The CPU settings the `omniseg` command applies first thing, and the benchmarks on both
sides: glibc malloc keeps freed tensor memory (`omniseg.allocator`) and denormal floats are flushed to
zero in every torch thread (`omniseg.denormals`). Python users call `tune_process()` once.
Opt out with OMNISEG_MALLOC_TUNING=0 / OMNISEG_FLUSH_DENORMALS=0; OMNISEG_MALLOC_TUNING=lean trades
speed for the smallest resident memory. Also the device a run uses and the seeding of the global RNGs."""

from __future__ import annotations

from omniseg.allocator import mode, tune_malloc
from omniseg.denormals import enabled_by_environment, flush_denormals


def tune_process() -> dict[str, int | bool]:
    """Apply both settings (each unless opted out); what was applied: {"malloc": bool,
    "denormal_threads": threads now flushing denormals (0: none)}."""
    return {"malloc": tune_malloc(),
            "denormal_threads": flush_denormals() if enabled_by_environment() else 0}


def describe(applied: dict[str, int | bool]) -> str:
    """One line for benchmark reports: the settings `tune_process()` reported as applied."""
    malloc = "defaults"
    if applied["malloc"]:
        malloc = "lean (blocks above 1 MiB mapped and returned on free)" if mode() == "lean" else "keeps freed memory"
    threads = applied["denormal_threads"]
    return (f"glibc malloc: {malloc}; denormals flushed to zero: "
            + (f"yes ({threads} threads)" if threads else "no"))


def resolve_device(name: str = "auto"):
    """A torch.device from "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
