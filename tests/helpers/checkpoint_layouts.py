"""Released checkpoint layouts (tensor names and shapes read from the official code) as test fixtures.

A layout file `tests/fixtures/checkpoint_layouts/<name>.json` holds
    {"source": {"repo": "owner/name", "commit": "<40 hex>", "files": ["path/in/repo.py", ...]},
     "notes": "how the names were read, and which released file they describe",
     "tensors": {"<name>": [d0, d1, ...], ...}}
Tests write random tensors in that layout, in the release's file format, and convert them.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import torch

LAYOUTS = Path(__file__).resolve().parent.parent / "fixtures" / "checkpoint_layouts"


def load_layout(name: str) -> dict:
    return json.loads((LAYOUTS / f"{name}.json").read_text())


def random_state_dict(layout: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the layout's names and shapes: normal(0, 0.02) weights, positive variances,
    integer counters where the name says so (BatchNorm's num_batches_tracked)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in layout["tensors"].items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(0, dtype=torch.int64)
        elif name.endswith(("running_var", ".var")):
            out[name] = torch.rand(shape, generator=g) + 0.5
        else:
            out[name] = torch.randn(shape, generator=g) * 0.02
    return out


def write_detectron2_pkl(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """A detectron2 model-zoo `.pkl`: {"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}."""
    payload = {"model": {k: v.numpy() for k, v in state_dict.items()}, "__author__": "test",
               "matching_heuristics": True}
    with open(path, "wb") as f:
        pickle.dump(payload, f)
    return path


def write_torch_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], key: str | None = "model",
                           **extra) -> Path:
    """A torch `.pth` as training scripts save them: {key: state_dict, ...metadata} (key=None: the bare dict)."""
    torch.save(state_dict if key is None else {key: state_dict, **extra}, path)
    return path
