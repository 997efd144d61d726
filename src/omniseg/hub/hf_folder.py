"""Reading a local HF transformers checkpoint folder (what `save_pretrained` writes), shared by the
Mask2Former, MaskFormer and OneFormer converters."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omniseg.hub import CheckpointError

# Keys of the converters' settings dicts that describe the checkpoint, not the model section of a config.
CHECKPOINT_KEYS = ("num_classes", "class_names", "backbone_type")


def is_hf_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def read_hf_folder(path: str | os.PathLike) -> tuple[dict, Path]:
    """(config.json as a dict, the weights file) of an HF checkpoint folder; CheckpointError names what
    is missing or unreadable."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing (expected an HF checkpoint folder)")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from e
    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin")
    return hf_config, weights


def model_settings(settings: dict) -> dict:
    """A converter's settings without the checkpoint-only keys: the `model` section of a config."""
    return {k: v for k, v in settings.items() if k not in CHECKPOINT_KEYS}
