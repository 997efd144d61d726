"""MMSegmentation 1.x as a parity reference, importable on CPU with mmcv-lite.

mmcv-lite ships no compiled ops, and `mmcv.ops` fails on import; mmseg imports a few of its names at
module level (point_sample, sigmoid_focal_loss, CrissCrossAttention, PSAMask) for heads the parity tests
never build. A stand-in module answers those names with a function that refuses to run, so any use of
a compiled op fails loudly instead of computing something else.
"""

from __future__ import annotations

import sys
import types
import warnings

import pytest


def _compiled_op(name: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"mmcv.ops.{name} is a compiled op, absent from mmcv-lite")

    return refuse


def mmseg():
    """Import mmseg (with the mmcv.ops stand-in), or skip the test with the reason."""
    pytest.importorskip("mmengine", reason="mmengine (test extra) is not installed")
    pytest.importorskip("mmcv", reason="mmcv-lite (test extra) is not installed")
    if "mmcv.ops" not in sys.modules:
        try:
            import mmcv.ops  # noqa: F401  (the full mmcv, if installed, is used as is)
        except ImportError:
            stand_in = types.ModuleType("mmcv.ops")

            def __getattr__(name: str):
                if name.startswith("__"):
                    raise AttributeError(name)
                return _compiled_op(name)

            stand_in.__getattr__ = __getattr__
            sys.modules["mmcv.ops"] = stand_in
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("mmseg.models", reason="mmsegmentation (test extra) is not installed")
