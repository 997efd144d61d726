"""Denormal flushing reaches every thread torch computes on, not only the calling one."""

import json
import platform
import subprocess
import sys

import pytest

from omniseg.denormals import enabled_by_environment

x86_linux = pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")),
                               reason="FTZ/DAZ through torch.set_flush_denormal and libgomp: x86 Linux")

# A parallel multiply whose exact results are denormal (1e-30 x 1e-10): the halves computed by each of
# the two OpenMP threads come out zero only where that thread flushes denormals.
_PROBE = """
import json, sys, torch
torch.set_num_threads(2)
x = torch.full((1 << 22,), 1e-30)
x * 1e-10  # the OpenMP pool exists before anything is flushed
threads = None
if sys.argv[1] != "plain":
    from omniseg.denormals import flush_denormals
    threads = flush_denormals()
    if sys.argv[1] == "undo":
        threads = flush_denormals(False)
y = x * 1e-10
half = y.numel() // 2
print(json.dumps({"threads": threads, "first_zero": bool((y[:half] == 0).all()),
                  "second_zero": bool((y[half:] == 0).all()), "any_zero": bool((y == 0).any())}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@x86_linux
def test_without_flushing_products_stay_denormal():
    result = _probe("plain")
    assert not result["any_zero"]


@x86_linux
def test_flush_reaches_the_worker_threads_created_before_it():
    result = _probe("flush")
    assert result["threads"] == 2
    assert result["first_zero"] and result["second_zero"]


@x86_linux
def test_flush_can_be_undone_in_every_thread():
    result = _probe("undo")
    assert not result["any_zero"]


def test_environment_opt_out():
    assert enabled_by_environment({}) and enabled_by_environment({"OMNISEG_FLUSH_DENORMALS": "1"})
    assert not enabled_by_environment({"OMNISEG_FLUSH_DENORMALS": "0"})
