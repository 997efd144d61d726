"""omniseg convert: torchvision Mask R-CNN checkpoints become omniseg weights files whose network computes
what torchvision's does (parity against torchvision itself), with the config following the checkpoint."""

from __future__ import annotations

import torch
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.misc import FrozenBatchNorm2d
from typer.testing import CliRunner

import pytest

from omniseg.api import Predictor, load_model
from omniseg.cli import app
from omniseg.hub.convert import convert
from omniseg.hub.errors import CheckpointError


def _torchvision_mask_rcnn(num_classes: int = 5) -> MaskRCNN:
    torch.manual_seed(0)
    model = MaskRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3),
                     num_classes=num_classes).eval()
    with torch.no_grad():  # frozen norms with statistics that matter, and confident class scores
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
        model.roi_heads.box_predictor.cls_score.weight.mul_(20)
    return model


def test_torchvision_mask_rcnn_converts_to_the_same_network(tmp_path):
    tv = _torchvision_mask_rcnn()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    report = convert(tmp_path / "tv.pth", "torchvision", "maskrcnn_r50", tmp_path / "m.safetensors")
    assert report["unmapped"] == [] and report["missing"] == []
    assert "model.backbone=resnet18" in report["overrides"] and "model.roi.aligned=false" in report["overrides"]
    model, cfg, meta = load_model(tmp_path / "m.safetensors")
    assert cfg.model.backbone == "resnet18" and meta.num_classes == 4

    image = torch.randint(0, 256, (1, 3, 128, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = model.normalize(image)
    with torch.no_grad():
        ours = model.forward_raw(x)
        features = tv.backbone(x)
        proposals, _ = tv.rpn(ImageList(x, [(128, 160)]), features)
        theirs = tv.roi_heads(features, proposals, [(128, 160)])[0][0]
    assert 0 < len(theirs["boxes"]) and len(ours["boxes"]) == len(theirs["boxes"])
    torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=1e-4, atol=1e-4)
    assert torch.equal(ours["labels"] + 1, theirs["labels"])  # torchvision's class 0 is background
    torch.testing.assert_close(ours["mask_probs"], theirs["masks"][:, 0], rtol=1e-4, atol=1e-4)

    # and the whole of torchvision's model (its own normalisation, no resize at this size) agrees with predict
    tv.transform.min_size, tv.transform.max_size = (128,), 1333
    with torch.no_grad():
        full = tv([image[0].float() / 255])[0]
    pred = Predictor(tmp_path / "m.safetensors", min_size_test=128)(image[0])["instances"]
    keep = full["scores"] > 0.5
    assert int(keep.sum()) > 0 and len(pred["scores"]) == len(full["scores"])
    assert torch.equal(pred["labels"][pred["scores"] > 0.5] + 1, full["labels"][keep])
    torch.testing.assert_close(pred["boxes"][pred["scores"] > 0.5], full["boxes"][keep], rtol=1e-3, atol=1e-2)


def test_the_released_resnet50_layout_converts_with_coco_classes_from_the_cli(tmp_path):
    torch.save(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict(), tmp_path / "r50.pth")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "r50.pth"), "--from", "torchvision", "--preset",
                                      "maskrcnn_r50", "--classes", "coco", "-o", str(tmp_path / "r50.safetensors")])
    assert result.exit_code == 0, result.output
    assert "model.backbone=resnet50" in result.output and "BatchNorm counter" in result.output
    _, cfg, meta = load_model(tmp_path / "r50.safetensors")
    assert cfg.model.backbone == "resnet50" and meta.num_classes == 90
    assert meta.classes[0] == "person" and meta.dataset_ids[0] == 1 and meta.classes[89] == "toothbrush"


def test_unmapped_or_missing_tensors_are_refused_and_listed(tmp_path):
    sd = _torchvision_mask_rcnn().state_dict()
    sd["extra_head.weight"] = torch.zeros(3)
    del sd["rpn.head.cls_logits.bias"]
    torch.save(sd, tmp_path / "tv.pth")
    with pytest.raises(CheckpointError, match=r"1 checkpoint tensors unmapped \(extra_head.weight\).*1 model tensors "
                                              r"missing \(detector.rpn.head.cls_logits.bias\)"):
        convert(tmp_path / "tv.pth", "torchvision", "maskrcnn_r50", tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    report = convert(tmp_path / "tv.pth", "torchvision", "maskrcnn_r50", tmp_path / "m.safetensors", allow_missing=True)
    assert report["unmapped"] == ["extra_head.weight"] and report["missing"] == ["detector.rpn.head.cls_logits.bias"]
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "tv.pth"), "--from", "detectron3", "--preset",
                                      "maskrcnn_r50", "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2 and "--from detectron3: choose from detectron2, oneformer" in result.output


def test_malicious_checkpoints_are_refused_by_convert_and_predictor_without_running(tmp_path):
    import os
    import pickle

    class RunsShell:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"w": torch.zeros(2).numpy()}, "__author__": RunsShell()}, f)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": RunsShell()}, tmp_path / "evil.pth")
    for name, fmt in (("evil.pkl", "detectron2"), ("evil.pth", "mmseg"), ("evil.pth", "torchvision")):
        result = CliRunner().invoke(app, ["convert", str(tmp_path / name), "--from", fmt, "--preset", "maskrcnn_r50",
                                          "-o", str(tmp_path / "out.safetensors")])
        assert result.exit_code == 2 and "system" in result.output and "refused" in result.output, result.output
        with pytest.raises(CheckpointError, match="omniseg convert"):
            Predictor(tmp_path / name)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out.safetensors").exists()


def test_named_class_lists_are_the_datasets_own():
    import json
    from pathlib import Path

    from omniseg.data.named_classes import named_classes
    from omniseg.hub.convert import class_list

    coco, panoptic = named_classes("coco", 80), named_classes("coco_panoptic", 133)
    assert coco.classes[:3] == ["person", "bicycle", "car"] and coco.dataset_ids[-1] == 90 and coco.dataset_ids[11] == 13
    assert panoptic.classes[80] == "banner" and panoptic.dataset_ids[80] == 92 and len(panoptic.thing_ids) == 80
    city = named_classes("cityscapes", 19)
    assert city.classes[11] == "person" and city.dataset_ids[11] == 24 and len(city.thing_ids) == 8
    ade = named_classes("ade20k", 150)
    assert ade.classes[:3] == ["wall", "building", "sky"] and ade.classes[-1] == "flag" and ade.dataset_ids[0] == 1
    with pytest.raises(CheckpointError, match="has 19 classes but --classes ade20k gives 150"):
        class_list("ade20k", 19, "x.pth")
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if (shared / "coco_panoptic_sample").is_dir():  # against the official category files where present
        cats = json.loads((shared / "coco_panoptic_sample" / "panoptic_coco_categories.json").read_text())
        assert panoptic.classes == [c["name"] for c in cats] and panoptic.dataset_ids == [c["id"] for c in cats]
        assert panoptic.isthing == [bool(c["isthing"]) for c in cats]
        cats = json.loads((shared / "coco128" / "annotations" / "instances_train2017.json").read_text())["categories"]
        assert coco.classes == [c["name"] for c in cats] and coco.dataset_ids == [c["id"] for c in cats]


def test_named_class_lists_match_mmsegmentation():
    from helpers.mmseg_reference import mmseg

    mmseg()
    from mmseg.datasets import ADE20KDataset, CityscapesDataset

    from omniseg.data.named_classes import named_classes

    assert named_classes("ade20k", 150).classes == [c.strip() for c in ADE20KDataset.METAINFO["classes"]]
    assert named_classes("cityscapes", 19).classes == list(CityscapesDataset.METAINFO["classes"])


def test_an_hf_folder_converts_to_the_same_model_as_loading_it(tmp_path):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    names = {i: f"c{i}" for i in range(5)}
    config = Mask2FormerConfig(
        backbone_config=ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"], depths=[1, 1, 1, 1],
                                     hidden_sizes=[64, 128, 256, 512], layer_type="basic"),
        num_labels=5, hidden_dim=32, feature_size=32, mask_feature_size=32, encoder_layers=1, decoder_layers=3,
        num_queries=6, encoder_feedforward_dim=64, dim_feedforward=64, id2label=names,
        label2id={v: k for k, v in names.items()})
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).eval().save_pretrained(tmp_path / "hf")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "hf"), "--from", "hf", "--preset", "mp_former_r50",
                                      "-o", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0, result.output
    direct, _, _ = load_model(tmp_path / "hf")
    converted, cfg, meta = load_model(tmp_path / "m.safetensors")
    assert meta.classes == list(names.values()) and cfg.model.mp.enabled  # MP-Former training, HF's network
    assert cfg.train.output_dir == "runs/mp_former_r50" and cfg.model.num_queries == 6
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = direct.forward_raw(x), converted.forward_raw(x)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_masks"], b["pred_masks"])
