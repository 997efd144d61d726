"""`omniseg convert`: a released checkpoint -> an omniseg weights file (config and classes inside), which
`eval`, `predict`, `Predictor`, `export` and `train.weights=` use like any omniseg file.

The source format's converter (`omniseg.hub.converters`) reads the checkpoint safely and renames its
tensors; here the model is built with the config the checkpoint implies, and a model with unmapped
checkpoint tensors or uninitialised model tensors is refused, listing them, unless `allow_missing`.
Training-only modules (auxiliary heads, OneFormer's text mapper) that an inference checkpoint lacks keep
their initialisation and are reported, as when an HF folder is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from omniseg.hub.converters import SOURCES, load_converter
from omniseg.hub.errors import CheckpointError

__all__ = ["SOURCES", "class_list", "convert"]


def class_list(spec: str | None, num_classes: int, source: str, checkpoint_meta=None):
    """DatasetMeta for `--classes`: a named list (coco, coco_panoptic, ade20k, cityscapes), a file with one
    name per line, or None (the checkpoint's own names if it has them, else class_0 ...). The count must
    be the checkpoint's."""
    from omniseg.data.meta import DatasetMeta
    from omniseg.data.named_classes import NAMED, named_classes

    if spec is None:
        if checkpoint_meta is not None:
            return checkpoint_meta
        return DatasetMeta(classes=[f"class_{i}" for i in range(num_classes)], name="converted")
    if spec in NAMED:
        meta = named_classes(spec, num_classes)
    else:
        path = Path(spec)
        if not path.is_file():
            raise CheckpointError(f"--classes {spec}: neither one of {', '.join(NAMED)} nor a file of class names")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        meta = DatasetMeta(classes=names, name=path.stem)
    if meta.num_classes != num_classes:
        raise CheckpointError(f"{source}: the checkpoint has {num_classes} classes but --classes {spec} gives "
                              f"{meta.num_classes}")
    return meta


def convert(source: str | os.PathLike, fmt: str, preset: str, output: str | os.PathLike, *,
            classes: str | None = None, allow_missing: bool = False, overrides=()) -> dict:
    """Convert `source` (format `fmt`) for `preset` and write `output` (.safetensors); returns the report
    {"mapped", "ignored", "unmapped", "missing", "initialised", "overrides"}. Unmapped or missing tensors
    are an error naming them unless `allow_missing`."""
    from omegaconf import OmegaConf

    from omniseg.config import apply_overrides, config_from_dict, load_config, to_yaml
    from omniseg.engine.checkpoint import save_weights
    from omniseg.models.registry import build_model_from_config

    converter = load_converter(fmt)
    source = Path(source)
    if not source.exists():
        raise CheckpointError(f"{source}: no such checkpoint")
    cfg = load_config(preset)
    conversion = converter(source, cfg)
    if conversion.model is not None:  # the checkpoint describes the whole network
        node = OmegaConf.to_container(cfg, resolve=False)
        node["model"] = conversion.model
        cfg = config_from_dict(node, f"{preset} with {source}")
    cfg = apply_overrides(cfg, [*conversion.overrides, *overrides], f"{preset} with {source}")
    meta = class_list(classes, conversion.num_classes, str(source), conversion.meta)
    model = build_model_from_config(cfg, meta, with_backbone_weights=False)
    own = model.state_dict()
    unmapped = sorted(k for k in conversion.state_dict if k not in own)
    absent = sorted(k for k in own if k not in conversion.state_dict)
    initialised = [k for k in absent if model.is_training_only(k)]
    missing = [k for k in absent if not model.is_training_only(k)]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in conversion.state_dict.items()
             if k in own and own[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{source}: {len(wrong)} tensors do not fit {preset}: {', '.join(wrong[:5])}")
    if (unmapped or missing) and not allow_missing:
        raise CheckpointError(f"{source}: {len(unmapped)} checkpoint tensors unmapped ({', '.join(unmapped[:8])}) and "
                              f"{len(missing)} model tensors missing ({', '.join(missing[:8])}); --allow-missing "
                              f"writes the file anyway")
    model.load_state_dict({k: v for k, v in conversion.state_dict.items() if k in own}, strict=False)
    save_weights(output, model, config_yaml=to_yaml(cfg), meta=meta.to_dict(),
                 info={"converted_from": str(source), "format": fmt})
    return {"mapped": len(conversion.state_dict) - len(unmapped), "ignored": conversion.ignored,
            "unmapped": unmapped, "missing": missing, "initialised": initialised, "overrides": conversion.overrides}
