"""`model.multi_grid`: DANet's released Cityscapes model dilates res5's three blocks 4, 8, 16 (multi-grid
[1, 2, 4] over res5's dilation 4 at output stride 8); null keeps the backbone's dilations."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from omniseg.config import list_presets, load_config
from omniseg.models.registry import family_of
from omniseg.models.per_pixel.model import PerPixelSegmenter

SMALL = ["model.backbone_kwargs={layers: [1, 1, 1, 3]}", "model.head_width=16"]


def _res5_dilations(*overrides: str) -> tuple[list[int], PerPixelSegmenter]:
    cfg = load_config("danet_r50", [*SMALL, *overrides])
    model = PerPixelSegmenter(OmegaConf.to_container(cfg.model), 2)
    return [block.conv2.dilation[0] for block in model.backbone.body.layer4], model


@pytest.mark.parametrize("overrides,expected", [
    ((), [2, 4, 4]),  # the preset's [1, 1, 2, 4] (= timm's output-stride-8 dilation), the first block at half
    (("model.multi_grid=[1,2,4]",), [4, 8, 16]),
    (("model.multi_grid=[1,2,4]", "model.output_stride=16", "model.stage_dilations=null"), [2, 4, 8]),
    (("model.multi_grid=[1,2]", "model.stage_dilations=[1,1,2,4]"), [4, 8, 4]),
])
def test_multi_grid_sets_the_res5_block_dilations(overrides, expected):
    dilations, model = _res5_dilations(*overrides)
    assert dilations == expected
    assert [block.conv2.padding[0] for block in model.backbone.body.layer4] == expected
    model.eval()
    with torch.no_grad():
        out = model.forward_raw(torch.randn(1, 3, 64, 64))["sem_seg"]
    assert out.shape == (1, 2, 64, 64) and torch.isfinite(out).all()


def test_multi_grid_is_off_in_every_shipped_preset():
    per_pixel = [name for name in list_presets() if family_of(load_config(name).model.arch).name == "per_pixel"]
    assert "danet_r50" in per_pixel
    assert all(load_config(name).model.multi_grid is None for name in per_pixel)
