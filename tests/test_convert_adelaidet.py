"""omniseg convert --from adelaidet: AdelaiDet's released BlendMask .pth files (layouts read from AdelaiDet's code,
tests/fixtures/checkpoint_layouts) convert with nothing unmapped or missing, the config following the checkpoint
(levels, towers, norms, attention size, the panoptic models' Panoptic-FPN stuff head), and predict."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from helpers.checkpoint_layouts import load_layout, random_state_dict, write_torch_checkpoint
from omniseg.api import Predictor, load_model
from omniseg.cli import app
from omniseg.hub.convert import convert
from omniseg.hub.errors import CheckpointError

HEAD = "proposal_generator.fcos_head."


def _released(tmp_path, name: str):
    layout = load_layout(name)
    sd = random_state_dict(layout)
    path = write_torch_checkpoint(tmp_path / f"{name}.pth", sd, "model", iteration=269999)
    return layout, sd, path


def _image():
    return torch.randint(0, 256, (96, 128, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)).numpy()


def test_blendmask_r50_3x_converts_and_predicts(tmp_path):
    layout, sd, path = _released(tmp_path, "blendmask_r50_3x")
    report = convert(path, "adelaidet", "blendmask_r50", tmp_path / "b.safetensors", classes="coco")
    assert report["unmapped"] == [] and report["missing"] == [] and report["mapped"] == len(layout["tensors"])
    assert {"model.backbone=resnet50", "model.backbone_kwargs.stride_in_1x1=true", "model.blendmask.num_levels=5",
            "model.blendmask.num_cls_convs=4", "model.blendmask.tower_norm=gn", "model.blendmask.attn_size=14",
            "model.blendmask.basis_num_convs=3"} <= set(report["overrides"])
    model, cfg, meta = load_model(tmp_path / "b.safetensors")
    assert meta.num_classes == 80 and cfg.model.pixel_mean == [123.675, 116.28, 103.53]
    state = model.state_dict()
    assert torch.equal(state["head.box_tower.convs.3.weight"], sd[HEAD + "bbox_tower.9.weight"])
    assert torch.equal(state["head.cls_tower.norms.2.0.bias"], sd[HEAD + "cls_tower.7.bias"])
    assert model.head.cls_tower.norms[2][0].num_groups == 32  # AdelaiDet's GroupNorm(32)
    assert torch.equal(state["basis.post.1.running_var"], sd["basis_module.tower.4.1.running_var"])
    assert torch.equal(state["basis.bases.weight"], sd["basis_module.tower.5.weight"])
    assert torch.equal(state["aux_semantic.logits.weight"], sd["basis_module.seg_head.6.weight"])
    assert torch.equal(state["fpn.extra_blocks.p7.weight"], sd["backbone.top_block.p7.weight"])
    assert torch.equal(state["backbone.body.conv1.weight"], sd["backbone.bottom_up.stem.conv1.weight"].flip(1))
    assert model.backbone.body.layer4[0].conv1.stride == (2, 2)

    result = Predictor(tmp_path / "b.safetensors", min_size_test=96)(_image())["instances"]
    assert len(result["scores"]) > 0 and result["masks"].shape[1:] == (96, 128)
    assert ((result["labels"] >= 0) & (result["labels"] < 80)).all()


def test_blendmask_rt_converts_with_its_released_levels_and_attention_size(tmp_path):
    """AdelaiDet's RT models read P3-P5 with 14 x 14 attentions, as the blendmask_rt_r50 preset (the rt variant's own
    defaults, P3-P6 and 7 x 7, are the paper's)."""
    layout, sd, path = _released(tmp_path, "blendmask_rt_r50_4x_bn_head")
    report = convert(path, "adelaidet", "blendmask_rt_r50", tmp_path / "rt.safetensors")
    assert report["unmapped"] == [] and report["missing"] == [] and report["mapped"] == len(layout["tensors"])
    assert {"model.variant=rt", "model.blendmask.num_levels=3", "model.blendmask.sizes_of_interest=[64,128]",
            "model.blendmask.attn_size=14", "model.blendmask.num_share_convs=3", "model.blendmask.num_cls_convs=0",
            "model.blendmask.tower_norm=bn", "model.blendmask.basis_num_convs=2", "model.backbone_norm=bn",
            "model.backbone_freeze_at=0"} <= set(report["overrides"])
    model, cfg, _ = load_model(tmp_path / "rt.safetensors")
    assert model.num_levels == 3 and model.attn_size == 14 and model.fpn.extra_blocks is None
    state = model.state_dict()
    assert torch.equal(state["head.share_tower.norms.2.1.running_var"], sd[HEAD + "share_tower.7.1.running_var"])
    assert torch.equal(state["backbone.body.layer3.5.bn2.running_mean"], sd["backbone.bottom_up.res4.5.conv2.norm.running_mean"])
    result = Predictor(tmp_path / "rt.safetensors", min_size_test=96)(_image())["instances"]
    assert len(result["scores"]) > 0 and result["masks"].shape[1:] == (96, 128)


def test_blendmask_panoptic_converts_into_the_panoptic_fpn_stuff_head_and_predicts(tmp_path):
    """AdelaiDet's Panoptic R_50_3x: FCOS on P3-P7, an FPN that also builds P2, and detectron2's SemSegFPNHead
    (`panoptic_module.p<l>.<2k>`) with 53 stuff classes + "things"."""
    layout, sd, path = _released(tmp_path, "blendmask_panoptic_r50_3x")
    report = convert(path, "adelaidet", "blendmask_panoptic_r50", tmp_path / "p.safetensors", classes="coco_panoptic")
    assert report["unmapped"] == [] and report["missing"] == [] and report["mapped"] == len(layout["tensors"])
    assert {"model.variant=panoptic", "model.blendmask.stuff_head=panoptic_fpn", "model.blendmask.stuff_channels=128",
            "model.blendmask.num_levels=5", "model.blendmask.test.instance_score_threshold=0.45",
            "model.blendmask.test.overlap_threshold=0.4"} <= set(report["overrides"])
    model, cfg, meta = load_model(tmp_path / "p.safetensors")
    assert meta.num_classes == 133 and model.thing_ids == list(range(80)) and len(model.stuff_ids) == 53
    assert model.fpn_inputs == ("res2", "res3", "res4", "res5") and model.strides == [8, 16, 32, 64, 128]
    state = model.state_dict()
    assert torch.equal(state["fpn.inner_blocks.0.0.weight"], sd["backbone.fpn_lateral2.weight"])
    assert torch.equal(state["fpn.layer_blocks.3.0.bias"], sd["backbone.fpn_output5.bias"])
    assert torch.equal(state["stuff_head.scale_heads.0.0.0.weight"], sd["panoptic_module.p2.0.weight"])
    assert torch.equal(state["stuff_head.scale_heads.2.1.0.weight"], sd["panoptic_module.p4.2.weight"])
    assert torch.equal(state["stuff_head.scale_heads.3.2.1.bias"], sd["panoptic_module.p5.4.norm.bias"])
    assert torch.equal(state["stuff_head.predictor.weight"], sd["panoptic_module.predictor.weight"])
    assert model.stuff_head.scale_heads[3][2][1].num_groups == 32  # detectron2's GroupNorm(32, 128)

    pred = Predictor(tmp_path / "p.safetensors", min_size_test=96)(_image())
    seg, infos = pred["panoptic"]["segment_map"], pred["panoptic"]["segments_info"]
    assert seg.shape == (96, 128) and {s["id"] for s in infos} == set(torch.unique(seg).tolist()) - {0}
    assert any(not s["isthing"] for s in infos)  # the converted stuff head's classes reach the merge
    assert all(s["isthing"] == (s["category"] < 80) for s in infos)
    assert pred["instances"]["masks"].shape[1:] == (96, 128)
    # Without --classes the checkpoint's own split holds: the detector's 80 classes are the things.
    convert(path, "adelaidet", "blendmask_panoptic_r50", tmp_path / "q.safetensors")
    _, _, meta = load_model(tmp_path / "q.safetensors")
    assert meta.num_classes == 133 and meta.thing_ids == list(range(80))


def test_checkpoints_omniseg_cannot_build_are_refused(tmp_path):
    sd = random_state_dict(load_layout("blendmask_r50_3x"))
    panoptic = random_state_dict(load_layout("blendmask_panoptic_r50_3x"))
    path = write_torch_checkpoint(tmp_path / "panoptic.pth", panoptic)
    with pytest.raises(CheckpointError, match="panoptic.pth: .*convert it with the panoptic preset"):
        convert(path, "adelaidet", "blendmask_r50", tmp_path / "x.safetensors")
    cases = {
        "nop2": (dict(sd, **{"panoptic_module.predictor.weight": torch.zeros(54, 128, 1, 1)}),
                 r"needs the FPN's P2"),
        "dla": ({k: v for k, v in sd.items() if not k.startswith("backbone.bottom_up.")}, r"not a detectron2 ResNet"),
        "scales": (dict(sd, **{HEAD + "scales.0.scale": torch.ones(1)}), r"per-level scales"),
        "dcn": (dict(sd, **{"backbone.bottom_up.res5.0.conv2.conv_offset.weight": torch.zeros(18, 512, 3, 3)}),
                r"deformable convs"),
    }
    for name, (state, message) in cases.items():
        path = write_torch_checkpoint(tmp_path / f"{name}.pth", state)
        with pytest.raises(CheckpointError, match=f"{name}.pth: .*{message}"):
            convert(path, "adelaidet", "blendmask_panoptic_r50" if name == "nop2" else "blendmask_r50",
                    tmp_path / "x.safetensors")
    path = write_torch_checkpoint(tmp_path / "instance.pth", sd)
    with pytest.raises(CheckpointError, match="convert it with an instance preset"):
        convert(path, "adelaidet", "blendmask_panoptic_r50", tmp_path / "x.safetensors")


def test_cli_converts_an_adelaidet_blendmask(tmp_path):
    _, _, path = _released(tmp_path, "blendmask_rt_r50_4x_bn_head")
    result = CliRunner().invoke(app, ["convert", str(path), "--from", "adelaidet", "--preset", "blendmask_rt_r50",
                                      "--classes", "coco", "-o", str(tmp_path / "rt.safetensors")])
    assert result.exit_code == 0, result.output
    assert "model.blendmask.num_levels=3" in result.output and "wrote" in result.output
    _, cfg, meta = load_model(tmp_path / "rt.safetensors")
    assert cfg.model.blendmask.attn_size == 14 and meta.classes[0] == "person"
