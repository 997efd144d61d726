"""glibc malloc tuning: freed tensor memory stays mapped when tuned, is returned when not or when opted out."""

import json
import subprocess
import sys

import pytest

from omniseg.allocator import SETTINGS, tuned_environment

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")

# Allocates and frees a 256 MiB tensor, touching every page, and reports resident memory before and after the free.
_PROBE = """
import json, os, sys
from omniseg.allocator import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tune" else None
import torch
if sys.argv[1] == "tune-late":
    applied = tune_malloc()
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20
x = torch.ones(64 * 2**20)  # 256 MiB
held = rss()
del x
print(json.dumps({"applied": applied, "held": held, "after_free": rss()}))
"""


def _probe(mode: str, env=None) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@linux_only
def test_freed_tensor_memory_stays_in_the_process_when_tuned():
    plain = _probe("plain", env=tuned_environment({"PATH": "", "OMNISEG_MALLOC_TUNING": "0"}))
    assert plain["applied"] is None
    # untuned glibc unmaps the 256 MiB block on free; tuned it keeps it for the next tensor
    assert plain["held"] - plain["after_free"] > 200
    for mode in ("tune", "tune-late"):  # before or after torch is imported
        tuned = _probe(mode, env={"PATH": ""})
        assert tuned["applied"] is True
        assert tuned["held"] - tuned["after_free"] < 20


@linux_only
def test_opt_out_variable():
    assert _probe("tune", env={"PATH": "", "OMNISEG_MALLOC_TUNING": "0"})["applied"] is False


def test_tuned_environment_keeps_what_the_user_set():
    env = tuned_environment({"MALLOC_TRIM_THRESHOLD_": "4096"})
    assert env["MALLOC_TRIM_THRESHOLD_"] == "4096"
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(SETTINGS["MALLOC_MMAP_THRESHOLD_"])
    assert "MALLOC_MMAP_THRESHOLD_" not in tuned_environment({"OMNISEG_MALLOC_TUNING": "0"})


@linux_only
def test_environment_variables_reach_a_child_like_mallopt():
    """The child-process route (environment variables read by glibc at start-up) keeps freed memory too."""
    child = _probe("plain", env=tuned_environment({"PATH": ""}))
    assert child["held"] - child["after_free"] < 20


@linux_only
def test_lean_mode_returns_freed_blocks_and_reaches_children():
    """OMNISEG_MALLOC_TUNING=lean: large blocks are mapped and returned on free (resident memory follows the
    live tensors), through mallopt and through the child environment alike."""
    from omniseg.allocator import LEAN_SETTINGS, mode

    lean = {"PATH": "", "OMNISEG_MALLOC_TUNING": "lean"}
    assert mode(lean) == "lean" and mode({"OMNISEG_MALLOC_TUNING": "0"}) == "off" and mode({}) == "speed"
    tuned = _probe("tune", env=lean)
    assert tuned["applied"] is True and tuned["held"] - tuned["after_free"] > 200
    env = tuned_environment(lean)
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(LEAN_SETTINGS["MALLOC_MMAP_THRESHOLD_"])
    assert _probe("plain", env=env)["held"] - _probe("plain", env=env)["after_free"] > 200
