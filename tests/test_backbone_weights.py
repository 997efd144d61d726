"""Local timm checkpoints load into omniseg's features_only backbones tensor for tensor."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from omniseg.hub import CheckpointError, load_backbone_weights
from omniseg.models.backbones import build_backbone


@pytest.mark.parametrize("name,timm_name,kwargs", [
    ("resnet18", "resnet18", {}),
    ("swin_t", "swin_tiny_patch4_window7_224", {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 2)}),
])
def test_timm_checkpoint_loads_into_features_backbone(tmp_path, name, timm_name, kwargs):
    torch.manual_seed(0)
    ref = timm.create_model(timm_name, pretrained=False, **kwargs)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    backbone = build_backbone(name, **kwargs)
    report = load_backbone_weights(backbone, path)
    assert not report["missing"]
    theirs = ref.state_dict()
    for key, value in backbone.body.state_dict().items():
        original = key.replace("layers_", "layers.", 1) if key.startswith("layers_") else key
        if key.endswith(("relative_position_index", "attn_mask")) or "num_batches_tracked" in key:
            continue
        assert torch.equal(value, theirs[original]), key


def test_checkpoint_for_another_model_is_refused(tmp_path):
    ref = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items() if not k.startswith("layer4")}, str(path))
    with pytest.raises(CheckpointError, match="missing"):
        load_backbone_weights(build_backbone("resnet18"), path)
