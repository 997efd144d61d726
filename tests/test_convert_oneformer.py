"""omniseg convert --from oneformer: OneFormer's official checkpoints (ResNet-50, Swin) in the released layout.

No OneFormer implementation in the official layout installs, so the layouts are fixtures read from
SHI-Labs/OneFormer (tests/fixtures/checkpoint_layouts/oneformer_*.json): random tensors under every released
name and shape, saved as the release's .pth (state dict under "model"), convert with nothing unmapped or
missing, land in the right omniseg tensors, and predict every task.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.checkpoint_layouts import load_layout, random_state_dict, write_torch_checkpoint
from omniseg.api import Predictor, load_model
from omniseg.hub.convert import convert
from omniseg.hub.errors import CheckpointError


@pytest.mark.parametrize("name", ["oneformer_r50", "oneformer_swin_t"])
def test_released_oneformer_converts_completely_and_predicts_every_task(name, tmp_path):
    sd = random_state_dict(load_layout(name), seed=5)
    write_torch_checkpoint(tmp_path / "250_16.pth", sd, iteration=160000)
    report = convert(tmp_path / "250_16.pth", "oneformer", name, tmp_path / "m.safetensors", classes="ade20k")
    assert report["unmapped"] == [] and report["missing"] == [] and report["initialised"] == []
    assert {"model.num_queries=150", "model.oneformer.text_causal=true", "model.oneformer.n_ctx=16",
            "model.oneformer.task_seq_len=77"} <= set(report["overrides"])
    assert set(report["ignored"]) - {k for k in report["ignored"] if k.endswith("relative_position_index")} \
        == {"criterion.empty_weight"}

    model, cfg, meta = load_model(tmp_path / "m.safetensors")
    ours = model.state_dict()
    assert meta.num_classes == 150 and meta.classes[0] == "wall"
    p = "sem_seg_head.predictor."
    pairs = {  # the query initialiser, task MLP and the text side land where omniseg reads them
        "query_init.layers.1.cross_attn.in_proj_weight": p + "class_transformer.decoder.layers.1.multihead_attn.in_proj_weight",
        "query_init.norm.bias": p + "class_transformer.decoder.norm.bias",
        "query_init.input_proj.weight": p + "class_input_proj.weight",
        "predictor.query_embed.weight": p + "query_embed.weight",
        "task_mlp.layers.1.weight": "task_mlp.layers.1.weight",
        "text_mapper.text_encoder.transformer.layers.5.mlp.fc2.weight": "text_encoder.transformer.resblocks.5.mlp.c_proj.weight",
        "text_mapper.text_encoder.transformer.layers.0.layer_norm1.bias": "text_encoder.transformer.resblocks.0.ln_1.bias",
        "text_mapper.text_projector.layers.1.bias": "text_projector.layers.1.bias",
        "text_mapper.prompt_ctx.weight": "prompt_ctx.weight",
        "logit_scale": "criterion.logit_scale",
    }
    for omniseg_key, official_key in pairs.items():
        assert torch.equal(ours[omniseg_key], sd[official_key]), omniseg_key
    if name == "oneformer_r50":
        assert torch.equal(ours["backbone.body.bn1.running_mean"], sd["backbone.stem.conv1.norm.running_mean"])
    else:
        assert torch.equal(ours["backbone.out_norms.res2.weight"], sd["backbone.norm0.weight"])

    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    result = Predictor(tmp_path / "m.safetensors")(image)
    assert result["semantic"].shape == (64, 96) and int(result["semantic"].max()) < 150
    assert "panoptic" in result and "instances" in result


def test_other_checkpoints_are_refused(tmp_path):
    sd = random_state_dict(load_layout("mask2former_r50"), seed=7)
    write_torch_checkpoint(tmp_path / "m2f.pth", sd)
    with pytest.raises(CheckpointError, match="not an official OneFormer checkpoint"):
        convert(tmp_path / "m2f.pth", "oneformer", "oneformer_r50", tmp_path / "m.safetensors")
