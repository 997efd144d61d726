"""omniseg convert: detectron2 Mask R-CNN .pkl files (model zoo mask_rcnn_R_*_FPN_*) become omniseg `maskrcnn`
weights files. Reference: a random torchvision MaskRCNN written in detectron2's layout by the name table below
(background-last classifier, K-class box and mask predictors, BGR stem), whose outputs the converted model must
reproduce; and the released R-50 layout (tests/fixtures/checkpoint_layouts) converting with nothing left over."""

from __future__ import annotations

import re

import pytest
import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.image_list import ImageList
from typer.testing import CliRunner

from helpers.checkpoint_layouts import load_layout, random_state_dict, write_detectron2_pkl
from test_convert import _torchvision_mask_rcnn as torchvision_mask_rcnn
from omniseg.api import Predictor, load_model
from omniseg.cli import app
from omniseg.hub import load_state_dict_file
from omniseg.hub.convert import convert
from omniseg.hub.converters.detectron2_rcnn import convert_rcnn_checkpoint
from omniseg.hub.errors import CheckpointError
from omniseg.models.rcnn.model import LevelRoIAlign, UnroundedAnchorGenerator

DETECTRON2_MEAN_BGR = torch.tensor([103.530, 116.280, 123.675]).view(1, 3, 1, 1)


def _torchvision_mask_rcnn(num_classes: int = 5) -> MaskRCNN:
    """test_convert's reference Mask R-CNN, its stem scaled for detectron2's pixel std of 1 (activations keep
    their usual size)."""
    model = torchvision_mask_rcnn(num_classes)
    with torch.no_grad():
        model.backbone.body.conv1.weight.div_(58)
    return model


def _detectron2_name(tv_name: str) -> str:
    """torchvision MaskRCNN tensor name -> detectron2 GeneralizedRCNN tensor name (read from detectron2's modules)."""
    table = [
        (r"backbone\.body\.conv1\.(\w+)", r"backbone.bottom_up.stem.conv1.\1"),
        (r"backbone\.body\.bn1\.(\w+)", r"backbone.bottom_up.stem.conv1.norm.\1"),
        (r"backbone\.body\.layer(\d)\.(\d+)\.conv(\d)\.(\w+)", lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.{m[4]}"),
        (r"backbone\.body\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)", lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
        (r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.0\.(\w+)", lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.{m[3]}"),
        (r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)", lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"),
        (r"backbone\.fpn\.inner_blocks\.(\d)\.0\.(\w+)", lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}.{m[2]}"),
        (r"backbone\.fpn\.layer_blocks\.(\d)\.0\.(\w+)", lambda m: f"backbone.fpn_output{int(m[1]) + 2}.{m[2]}"),
        (r"rpn\.head\.conv\.0\.0\.(\w+)", r"proposal_generator.rpn_head.conv.\1"),
        (r"rpn\.head\.cls_logits\.(\w+)", r"proposal_generator.rpn_head.objectness_logits.\1"),
        (r"rpn\.head\.bbox_pred\.(\w+)", r"proposal_generator.rpn_head.anchor_deltas.\1"),
        (r"roi_heads\.box_head\.fc6\.(\w+)", r"roi_heads.box_head.fc1.\1"),
        (r"roi_heads\.box_head\.fc7\.(\w+)", r"roi_heads.box_head.fc2.\1"),
        (r"roi_heads\.box_predictor\.(\w+)\.(\w+)", r"roi_heads.box_predictor.\1.\2"),
        (r"roi_heads\.mask_head\.(\d)\.0\.(\w+)", lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.{m[2]}"),
        (r"roi_heads\.mask_predictor\.conv5_mask\.(\w+)", r"roi_heads.mask_head.deconv.\1"),
        (r"roi_heads\.mask_predictor\.mask_fcn_logits\.(\w+)", r"roi_heads.mask_head.predictor.\1"),
    ]
    for pattern, replacement in table:
        if re.fullmatch(pattern, tv_name):
            return re.sub(pattern, replacement, tv_name)
    raise KeyError(tv_name)


def _as_detectron2(tv: MaskRCNN) -> dict[str, torch.Tensor]:
    """torchvision's weights as detectron2 saves them: background last in the classifier, no background box deltas
    or mask channel."""
    out = {}
    for name, value in tv.state_dict().items():
        if name.startswith("roi_heads.box_predictor.cls_score."):
            value = torch.cat([value[1:], value[:1]])
        elif name.startswith("roi_heads.box_predictor.bbox_pred."):
            value = value[4:]
        elif name.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
            value = value[1:]
        out[_detectron2_name(name)] = value.clone()
    return out


def _torchvision_detections(tv: MaskRCNN, x: torch.Tensor) -> dict[str, torch.Tensor]:
    size = [tuple(x.shape[-2:])]
    with torch.no_grad():
        tv.double()
        features = tv.backbone(x.double())
        proposals, _ = tv.rpn(ImageList(x.double(), size), features)
        return tv.roi_heads(features, proposals, size)[0][0]


def _assert_same_detections(ours: dict, theirs: dict) -> None:
    assert 3 <= len(theirs["boxes"]) and len(ours["boxes"]) == len(theirs["boxes"])
    torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=1e-4, atol=1e-4)
    assert torch.equal(ours["labels"] + 1, theirs["labels"])  # torchvision's class 0 is background
    torch.testing.assert_close(ours["mask_probs"], theirs["masks"][:, 0], rtol=1e-4, atol=1e-4)


def test_a_mask_rcnn_in_detectron2_layout_computes_what_torchvision_computes(tmp_path):
    tv = _torchvision_mask_rcnn()
    write_detectron2_pkl(tmp_path / "d2.pkl", _as_detectron2(tv))
    image = torch.randint(0, 256, (1, 3, 128, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    # what a detectron2 model is fed: BGR, minus its pixel mean, std 1
    x_bgr = image.flip(1).float() - DETECTRON2_MEAN_BGR

    # 1) the pooling and anchors set to torchvision's (unaligned RoIAlign, 2 samples, rounded anchors): the
    #    renaming, background permutation, zero background rows and BGR stem must give torchvision's detections
    report = convert(tmp_path / "d2.pkl", "detectron2", "maskrcnn_r50", tmp_path / "tv_pooling.safetensors",
                     overrides=["model.roi.aligned=false", "model.roi.sampling_ratio=2", "model.rpn.anchors=torchvision"])
    assert report["unmapped"] == [] and report["missing"] == []
    model, cfg, meta = load_model(tmp_path / "tv_pooling.safetensors")
    assert cfg.model.backbone == "resnet18" and meta.num_classes == 4
    assert list(cfg.model.pixel_mean) == [123.675, 116.28, 103.53] and list(cfg.model.pixel_std) == [1.0, 1.0, 1.0]
    with torch.no_grad():  # float64 on both sides: the reversed stem sums its channels in another order
        ours = model.double().forward_raw(model.normalize(image).double())
    _assert_same_detections(ours, _torchvision_detections(tv, x_bgr))

    # 2) the conversion as made (detectron2's ROIAlignV2 with adaptive sampling, unrounded anchors at fixed
    #    strides): torchvision with those poolers and anchors swapped in
    report = convert(tmp_path / "d2.pkl", "detectron2", "maskrcnn_r50", tmp_path / "d2.safetensors")
    assert {"model.roi.aligned=true", "model.roi.sampling_ratio=0", "model.rpn.anchors=detectron2",
            "model.roi.bbox_reg_weights=[10.0,10.0,5.0,5.0]"} <= set(report["overrides"])
    model, cfg, _ = load_model(tmp_path / "d2.safetensors")
    names = ["0", "1", "2", "3"]  # torchvision's FPN level names
    tv.roi_heads.box_roi_pool = LevelRoIAlign(names, [4, 8, 16, 32], 7, sampling_ratio=0, aligned=True)
    tv.roi_heads.mask_roi_pool = LevelRoIAlign(names, [4, 8, 16, 32], 14, sampling_ratio=0, aligned=True)
    tv.rpn.anchor_generator = UnroundedAnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5,
                                                       strides=[4, 8, 16, 32, 64])
    with torch.no_grad():  # float64 on both sides: the reversed stem sums its channels in another order
        ours = model.double().forward_raw(model.normalize(image).double())
    _assert_same_detections(ours, _torchvision_detections(tv, x_bgr))


def test_detectron2_anchors_are_unrounded_and_at_each_levels_stride():
    generator = UnroundedAnchorGenerator(((32,), (64,)), ((0.5, 1.0, 2.0),) * 2, strides=[4, 64])
    # detectron2: w = sqrt(size^2 / ratio), h = ratio * w, centred on 0
    w = (32 ** 2 / 0.5) ** 0.5
    expected = torch.tensor([[-w / 2, -w / 4, w / 2, w / 4], [-16, -16, 16, 16], [-w / 4, -w / 2, w / 4, w / 2]])
    torch.testing.assert_close(generator.cell_anchors[0], expected)
    image = ImageList(torch.zeros(1, 3, 96, 96), [(96, 96)])  # 96 / 64 rounds up: torchvision would infer stride 48
    anchors = generator(image, [torch.zeros(1, 8, 24, 24), torch.zeros(1, 8, 2, 2)])[0]
    top = anchors[24 * 24 * 3:].view(2, 2, 3, 4)
    torch.testing.assert_close(top[1, 1, 1], torch.tensor([64.0 - 32, 64 - 32, 64 + 32, 64 + 32]))


def test_the_released_r50_layout_converts_and_predicts(tmp_path):
    layout = load_layout("maskrcnn_detectron2_r50_fpn_3x")
    sd = random_state_dict(layout)
    sd["roi_heads.box_predictor.cls_score.bias"][0] = 8.0  # every RoI a confident "person": detections to paste
    write_detectron2_pkl(tmp_path / "model_final.pkl", sd)
    conversion = convert_rcnn_checkpoint(load_state_dict_file(tmp_path / "model_final.pkl"), "model_final.pkl")
    assert conversion.num_classes == 80
    out = conversion.state_dict
    cls = sd["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(out["detector.roi_heads.box_predictor.cls_score.weight"][0], cls[80])  # background first
    assert torch.equal(out["detector.roi_heads.box_predictor.cls_score.weight"][1:], cls[:80])
    bbox = out["detector.roi_heads.box_predictor.bbox_pred.weight"]
    assert bbox.shape == (81 * 4, 1024) and not bbox[:4].any()
    assert torch.equal(bbox[4:], sd["roi_heads.box_predictor.bbox_pred.weight"])
    mask = out["detector.roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert mask.shape[0] == 81 and not mask[0].any()
    assert torch.equal(out["detector.backbone.body.body.conv1.weight"],
                       sd["backbone.bottom_up.stem.conv1.weight"].flip(1))  # BGR stem reads RGB
    assert torch.equal(out["detector.backbone.body.body.layer3.0.downsample.1.running_var"],
                       sd["backbone.bottom_up.res4.0.shortcut.norm.running_var"])

    report = convert(tmp_path / "model_final.pkl", "detectron2", "maskrcnn_r50", tmp_path / "m.safetensors",
                     classes="coco")
    assert report["unmapped"] == [] and report["missing"] == [] and report["mapped"] == len(layout["tensors"])
    assert {"model.backbone=resnet50", "model.backbone_kwargs.stride_in_1x1=true"} <= set(report["overrides"])
    model, cfg, meta = load_model(tmp_path / "m.safetensors")
    assert meta.classes[0] == "person" and meta.num_classes == 80
    body = model.detector.backbone.body.body
    assert body.layer2[0].conv1.stride == (2, 2) and body.layer2[0].conv2.stride == (1, 1)  # MSRA stride in 1x1
    assert body.layer1[0].conv1.stride == (1, 1)
    image = torch.randint(0, 256, (96, 128, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)).numpy()
    result = Predictor(tmp_path / "m.safetensors", min_size_test=96)(image)["instances"]
    assert len(result["scores"]) > 0 and (result["labels"] == 0).all() and (result["scores"] > 0.9).all()
    assert result["masks"].shape[-2:] == (96, 128) and result["boxes"].shape == (len(result["scores"]), 4)


def test_detection_only_and_class_agnostic_checkpoints_are_refused(tmp_path):
    sd = random_state_dict(load_layout("maskrcnn_detectron2_r50_fpn_3x"))
    faster = {k: v for k, v in sd.items() if not k.startswith("roi_heads.mask_head.")}
    with pytest.raises(CheckpointError, match=r"faster.pkl: .*no mask head: a detection-only \(Faster R-CNN\)"):
        convert_rcnn_checkpoint(faster, "faster.pkl")
    agnostic = dict(sd, **{"roi_heads.box_predictor.bbox_pred.weight": torch.zeros(4, 1024)})
    with pytest.raises(CheckpointError, match="class-agnostic box regression"):
        convert_rcnn_checkpoint(agnostic, "agnostic.pkl")
    gn = dict(sd, **{"roi_heads.mask_head.mask_fcn1.norm.weight": torch.ones(256)})
    with pytest.raises(CheckpointError, match=r"normalised mask head"):
        convert_rcnn_checkpoint(gn, "gn.pkl")


def test_cli_converts_a_detectron2_mask_rcnn(tmp_path):
    write_detectron2_pkl(tmp_path / "d2.pkl", _as_detectron2(_torchvision_mask_rcnn()))
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "d2.pkl"), "--from", "detectron2", "--preset",
                                      "maskrcnn_r50", "-o", str(tmp_path / "d2.safetensors")])
    assert result.exit_code == 0, result.output
    assert "model.backbone=resnet18" in result.output and "model.rpn.anchors=detectron2" in result.output
    _, cfg, meta = load_model(tmp_path / "d2.safetensors")
    assert cfg.model.roi.sampling_ratio == 0 and meta.num_classes == 4
