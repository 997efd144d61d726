"""The multi-scale feature convention every backbone follows: {"res2".."res5"} NCHW maps at strides 4..32,
each described by a FeatureSpec (channels, stride) in the backbone's `specs`."""

from __future__ import annotations

from dataclasses import dataclass

FEATURE_NAMES = ("res2", "res3", "res4", "res5")


@dataclass(frozen=True)
class FeatureSpec:
    channels: int
    stride: int
