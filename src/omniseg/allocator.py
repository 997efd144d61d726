"""Keep freed tensor memory in the process (glibc malloc) instead of handing it back to the OS.

glibc serves every allocation above its mmap threshold (at most 32 MiB, usually far less) with a
fresh `mmap` and unmaps it on `free`, so each large temporary tensor of a CPU forward or training step
page-faults all its pages in again (the effect on Mask2Former's forward and training step is
measured in docs/results.md, "Allocator"). PyTorch's CPU tuning guides recommend
jemalloc or tcmalloc for the same reason; these two glibc settings get the same effect without an
extra library:

- `M_MMAP_THRESHOLD` 16 GiB (2 GiB through `mallopt`, which takes an int): large blocks come from the
  heap, not from one-off mappings;
- `M_TRIM_THRESHOLD` 1 GiB: up to 1 GiB of free memory at the top of the heap is kept for the next
  tensors, more is returned (keeping everything raised the peak RSS of a checkpointed training step
  by about 700 MiB for no speed, docs/results.md).

The `omniseg` command applies them first thing; Python users call `tune_malloc()` (at any time: it
applies to allocations made afterwards, `benchmarks/cpu_primitives.py` measures both orders) or set
the equivalent environment variables (`MALLOC_MMAP_THRESHOLD_`, ...) for the process.
`OMNISEG_MALLOC_TUNING=0` turns the command's tuning off.

`OMNISEG_MALLOC_TUNING=lean` does the opposite, for the smallest resident memory: every block above
1 MiB is its own mapping, returned to the OS on free, so the resident size follows the live tensors
(a heap keeps the holes between long-lived and freed blocks resident). Each large tensor then
page-faults its pages in again, which costs time (docs/results.md, "Training memory").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
SETTINGS = {"MALLOC_MMAP_THRESHOLD_": 1 << 34, "MALLOC_TRIM_THRESHOLD_": 1 << 30}  # the default: speed
LEAN_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": 1 << 20, "MALLOC_TRIM_THRESHOLD_": 1 << 20}  # OMNISEG_MALLOC_TUNING=lean
_OPTIONS = {"MALLOC_MMAP_THRESHOLD_": _M_MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": _M_TRIM_THRESHOLD}


def mode(env=None) -> str:
    """"speed" (default), "lean" or "off", from OMNISEG_MALLOC_TUNING (1 / lean / 0)."""
    value = (os.environ if env is None else env).get("OMNISEG_MALLOC_TUNING", "1")
    return {"0": "off", "lean": "lean"}.get(value, "speed")


def _enabled(env) -> bool:
    return mode(env) != "off"


def _settings(env) -> dict[str, int]:
    return LEAN_SETTINGS if mode(env) == "lean" else SETTINGS


def tune_malloc() -> bool:
    """Apply `SETTINGS` (`LEAN_SETTINGS` with OMNISEG_MALLOC_TUNING=lean) through glibc's `mallopt`;
    True when applied.

    Does nothing (False) off Linux/glibc or when `OMNISEG_MALLOC_TUNING=0`. Settings already given as
    environment variables are left alone.
    """
    if not _enabled(os.environ) or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = True
    for name, value in _settings(os.environ).items():
        if name in os.environ:
            continue
        applied &= bool(mallopt(_OPTIONS[name], min(value, 2**31 - 1)))  # mallopt takes a C int
    return applied


def tuned_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the settings as environment variables, for
    a child process (glibc reads them at start-up); variables already set are kept."""
    env = dict(os.environ if base is None else base)
    if _enabled(env):
        for name, value in _settings(env).items():
            env.setdefault(name, str(value))
    return env
