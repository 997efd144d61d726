"""Loading weights from local files, safely, in several published layouts.

Only safetensors and allow-listed unpicklers (`omniseg.hub.pickled`: torch.load(weights_only=True), and a
restricted unpickler for detectron2 `.pkl` files) are used: a pickle that names anything but tensors,
numpy arrays and plain containers is refused before anything in it runs. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from omniseg.hub.errors import CheckpointError

__all__ = ["CheckpointError", "load_state_dict_file", "report_load", "feature_wrapper_keys", "load_backbone_weights"]




def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat tensor dict from .safetensors, a torch file (.pt/.pth/.bin) or a detectron2-style
    pickle of numpy arrays (.pkl), the last two through `omniseg.hub.pickled.read_pickled`.

    Nested checkpoints (`{"model": ...}`, `{"state_dict": ...}`) are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # corrupt header, truncated file
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    from omniseg.hub.pickled import read_pickled

    obj = read_pickled(path)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a dict of tensors")
    return obj


def report_load(module: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str, strict: bool = False) -> dict:
    """load_state_dict with a clear report of missing / unexpected / mis-shaped keys."""
    own = module.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        details = ", ".join(f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:5])
        raise CheckpointError(f"{source}: {len(mismatched)} tensors have the wrong shape: {details}")
    result = module.load_state_dict(state_dict, strict=False)
    report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
    if strict and (report["missing"] or report["unexpected"]):
        raise CheckpointError(
            f"{source}: {len(report['missing'])} missing keys (e.g. {report['missing'][:5]}), "
            f"{len(report['unexpected'])} unexpected keys (e.g. {report['unexpected'][:5]})"
        )
    return report


def feature_wrapper_keys(sd: dict, body: nn.Module) -> dict:
    """Rename whole-model keys to a timm features_only wrapper's, which flattens `layers.0.` to `layers_0.`."""
    own = body.state_dict().keys()
    out = {}
    for k, v in sd.items():
        if k not in own:
            m = re.match(r"^([A-Za-z]\w*?)\.(\d+)\.(.*)$", k)
            if m and f"{m[1]}_{m[2]}.{m[3]}" in own:
                k = f"{m[1]}_{m[2]}.{m[3]}"
        out[k] = v
    return out


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> dict:
    """Load timm-format backbone weights (e.g. a timm ResNet/Swin checkpoint) into a TimmBackbone.

    Classifier heads in the file are expected and ignored; anything else missing is reported.
    """
    sd = load_state_dict_file(path)
    body = backbone.body
    import importlib

    import timm

    # timm's own filter converts original-repo layouts (e.g. Microsoft Swin) to timm's and resamples
    # position embeddings; it needs the whole model, which for a features_only wrapper is rebuilt on
    # the meta device (shapes only, no memory).
    wrapped = type(body).__module__ == "timm.models._features"
    if timm.is_model(backbone.timm_name):
        module = importlib.import_module(timm.models.model_entrypoint(backbone.timm_name).__module__)
        filt = getattr(module, "checkpoint_filter_fn", None)
        if filt is not None:
            try:
                if wrapped:
                    with torch.device("meta"):
                        target = timm.create_model(backbone.timm_name, **getattr(backbone, "timm_kwargs", {}))
                else:
                    target = body
                sd = filt(sd, target)
            except Exception as e:  # noqa: BLE001 - any failure here means the file does not fit
                raise CheckpointError(f"{path}: timm could not convert it for {backbone.timm_name}: {e}") from e
    if wrapped:
        sd = feature_wrapper_keys(sd, body)
    sd = {k: v for k, v in sd.items() if not k.startswith(("fc.", "head.", "classifier."))}
    report = report_load(body, sd, source=str(path))
    if report["missing"]:
        raise CheckpointError(f"{path}: {len(report['missing'])} backbone weights missing, e.g. {report['missing'][:5]}")
    return report
