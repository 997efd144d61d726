"""Flush denormal floats to zero in every thread torch computes on.

A float32 below 1.2e-38 is "denormal"; x86 CPUs handle denormal operands in microcode. Attention can
make them: masked attention adds -100 (Swin's shift mask) or -inf-like biases before a softmax, whose
weights then reach exp(-100) ~ 4e-44, and a query whose visible keys all carry zero values outputs
nothing but those products. On a 2-core Xeon, a [441, 768] x [768, 768] product whose input is a
third denormal took 60x longer than flushed (`python benchmarks/cpu_primitives.py`). omniseg's own
Swin code no longer feeds such rows to a matrix product, and Mask2Former Swin-T measured the same
with and without flushing (docs/results.md): this is a guard for other models and weights.

Flushing (FTZ) and treating denormal inputs as zero (DAZ) changes results only below 1.2e-38.
`torch.set_flush_denormal` sets it for the calling thread only, and torch's OpenMP worker threads
keep the setting they were created with; `flush_denormals` therefore also runs it once inside every
thread of torch's OpenMP pool (libgomp's `GOMP_parallel`, which LLVM's libomp provides too). New
threads created later copy the setting from the main thread.

The `omniseg` command and the benchmark scripts call it first thing (`OMNISEG_FLUSH_DENORMALS=0`
turns that off); Python users call `omniseg.denormals.flush_denormals()` once, at any time.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import torch

_OPENMP_RUNTIMES = ("libgomp", "libomp", "libiomp5")


def enabled_by_environment(env=None) -> bool:
    """False when OMNISEG_FLUSH_DENORMALS=0 (the command and benchmarks then leave denormals alone)."""
    return (os.environ if env is None else env).get("OMNISEG_FLUSH_DENORMALS", "1") != "0"


def _openmp_library() -> str | None:
    """Path of the OpenMP runtime loaded into this process (torch's own), from /proc/self/maps."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return None
    for line in maps.splitlines():
        path = line.split()[-1] if line.split() else ""
        if any(Path(path).name.startswith(name) for name in _OPENMP_RUNTIMES):
            return path
    return None


def flush_denormals(enabled: bool = True) -> int:
    """Set (or clear) flush-to-zero / denormals-are-zero in this thread and in every thread of
    torch's OpenMP pool. Returns how many distinct threads now have the setting: 0 when the CPU
    cannot flush denormals, 1 when only the calling thread could be reached (no OpenMP runtime found,
    e.g. off Linux)."""
    if not torch.set_flush_denormal(enabled):
        return 0
    library = _openmp_library()
    if library is None:
        return 1
    try:
        gomp_parallel = ctypes.CDLL(library).GOMP_parallel
    except (OSError, AttributeError):
        return 1
    callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    threads = set()
    lock = threading.Lock()

    def in_each_thread(_):
        torch.set_flush_denormal(enabled)
        with lock:
            threads.add(threading.get_native_id())

    callback = callback_type(in_each_thread)
    gomp_parallel.argtypes = [callback_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    gomp_parallel.restype = None
    gomp_parallel(callback, None, torch.get_num_threads(), 0)
    return max(len(threads), 1)
