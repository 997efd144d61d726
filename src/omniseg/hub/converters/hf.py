"""An HF transformers folder (Mask2Former, MaskFormer, OneFormer; what `save_pretrained` writes) -> omniseg.

The folder's config.json describes the whole network, so the converted `model` section is the one
`omniseg.hub.hf` derives from it (as when the folder is loaded directly); of the preset, the training
settings and, for a Mask2Former checkpoint under an MP-Former preset, the mask-piloting section stay.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from omniseg.hub.converters import Conversion
from omniseg.hub.errors import CheckpointError


def convert(source: Path, preset) -> Conversion:
    from omniseg.hub.hf import hf_folder_to_config, read_hf_state_dict_converted

    if not source.is_dir():
        raise CheckpointError(f"{source}: --from hf takes the folder save_pretrained wrote (config.json + weights)")
    cfg, meta = hf_folder_to_config(source)
    model = OmegaConf.to_container(cfg.model, resolve=False)
    preset_model = OmegaConf.to_container(preset.model, resolve=False)
    if model.get("arch") == preset_model.get("arch") == "mask2former" and "mp" in preset_model:
        model["mp"] = preset_model["mp"]
    return Conversion(read_hf_state_dict_converted(source), [], meta.num_classes, model=model, meta=meta)
