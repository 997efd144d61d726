"""Load a local HF transformers Mask2Former / MaskFormer / OneFormer checkpoint folder as a full omniseg model.

The folder is what `save_pretrained` writes: config.json + model.safetensors (or pytorch_model.bin).
Nothing is downloaded. HF configs do not say which classes are "things"; all classes are treated as
things (HF's own default, no stuff fusion) unless `stuff_classes` names the stuff ones.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from omegaconf import DictConfig

from omniseg.data.meta import DatasetMeta
from omniseg.hub import CheckpointError, load_state_dict_file, report_load
from omniseg.hub.hf_folder import model_settings, read_hf_folder


def _settings_and_converter(hf_config: dict):
    model_type = hf_config.get("model_type")
    if model_type == "mask2former":
        from omniseg.hub.hf_mask2former import convert_hf_mask2former_state_dict, hf_mask2former_config_to_omniseg

        settings = hf_mask2former_config_to_omniseg(hf_config)
        settings["arch"] = "mask2former"
        kind = (hf_config.get("backbone_config") or {}).get("model_type") or settings["backbone"]
        return settings, lambda sd: convert_hf_mask2former_state_dict(sd, backbone=kind)
    if model_type == "maskformer":
        from omniseg.hub.hf_maskformer import convert_hf_maskformer_state_dict, hf_maskformer_config_to_omniseg

        settings = hf_maskformer_config_to_omniseg(hf_config)
        return settings, lambda sd: convert_hf_maskformer_state_dict(sd, backbone=settings["backbone_type"])
    if model_type == "oneformer":
        from omniseg.hub.hf_oneformer import convert_hf_oneformer_state_dict, hf_oneformer_config_to_omniseg

        settings = hf_oneformer_config_to_omniseg(hf_config)
        kind = (hf_config.get("backbone_config") or {}).get("model_type") or settings["backbone"]
        return settings, lambda sd: convert_hf_oneformer_state_dict(sd, backbone=kind)
    raise CheckpointError(f"HF model_type {model_type!r} is not supported (mask2former, maskformer, oneformer)")


def hf_folder_to_config(path: str | os.PathLike, *, stuff_classes: Iterable[str] = ()) -> tuple[DictConfig, DatasetMeta]:
    """An omniseg config (the declared defaults + the checkpoint's architecture) and class metadata."""
    from omniseg.config import config_from_dict

    hf_config, _ = read_hf_folder(path)
    settings, _ = _settings_and_converter(hf_config)
    names = settings["class_names"]
    model = {"backbone_norm": "bn", **model_settings(settings)}  # eval-mode BatchNorm == HF's (frozen) statistics
    if model["arch"] == "maskformer":
        model.setdefault("loss", {"class_weight": 1.0, "mask_weight": 20.0, "dice_weight": 1.0, "mask_loss": "focal"})
    cfg = config_from_dict({"model": model}, f"HF checkpoint {path}")
    stuff = set(stuff_classes)
    meta = DatasetMeta(classes=names, isthing=[n not in stuff for n in names], name=Path(path).name)
    return cfg, meta


def read_hf_state_dict_converted(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The folder's weights renamed to omniseg's MaskFormer module names."""
    hf_config, weights = read_hf_folder(path)
    _, convert = _settings_and_converter(hf_config)
    return convert(load_state_dict_file(weights))


def load_hf_checkpoint(path: str | os.PathLike, *, stuff_classes: Iterable[str] = ()):
    """-> (omniseg model in eval mode, config, DatasetMeta). Every HF tensor must find its place."""
    from omniseg.models.registry import build_model_from_config

    cfg, meta = hf_folder_to_config(path, stuff_classes=stuff_classes)
    model = build_model_from_config(cfg, meta)
    state = read_hf_state_dict_converted(path)
    report = report_load(model, state, source=str(path))
    # Inference checkpoints lack training-only weights (loss buffers; OneFormer's text mapper, which
    # then starts from its initialisation if the model is fine-tuned).
    missing = [k for k in report["missing"] if not model.is_training_only(k)]
    if missing or report["unexpected"]:
        raise CheckpointError(f"{path}: converted weights do not fit: missing {missing[:5]}, "
                              f"unexpected {report['unexpected'][:5]}")
    return model.eval(), cfg, meta
