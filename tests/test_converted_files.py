"""A converted checkpoint is an omniseg weights file like any other: for one checkpoint per source format,
`omniseg predict`, `omniseg eval` (from the weights, and from predict's output: the same figures) and
`omniseg export` (the exported graph computes what the model does) all work on it.

The checkpoints are random weights in each release's layout and file format (the per-format tests check
that the conversions are faithful)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers.checkpoint_layouts import load_layout, random_state_dict, write_detectron2_pkl, write_torch_checkpoint
from omniseg.api import load_model
from omniseg.cli import app
from omniseg.export import InferenceGraph, load_exported
from omniseg.hub.convert import convert

SIZE = (64, 96)


def _torchvision(tmp_path: Path) -> Path:
    from test_convert import _torchvision_mask_rcnn

    torch.save(_torchvision_mask_rcnn().state_dict(), tmp_path / "tv.pth")
    return tmp_path / "tv.pth"


def _mmseg(tmp_path: Path) -> Path:
    from test_convert_mmseg import Segmentor, _aux, _backbone, _randomise, _save

    head = dict(type="PSPHead", in_channels=512, in_index=3, channels=64, pool_scales=(1, 2, 3, 6), dropout_ratio=0.1,
                num_classes=5, norm_cfg=dict(type="BN", requires_grad=True), align_corners=False)
    _save(_randomise(Segmentor(_backbone(18, True), head, _aux(256, 32, 5, 2))).eval(), tmp_path / "psp.pth")
    return tmp_path / "psp.pth"


def _layout(name: str, writer, spread: tuple[str, ...] = (), **kwargs):
    """Random weights in a released layout; `spread`: tensors scaled up so that detection scores differ
    (at N(0, 0.02) they tie to 1e-7, and tied detections may come out in either order)."""

    def build(tmp_path: Path) -> Path:
        sd = random_state_dict(load_layout(name), seed=5)
        for key in sd:  # trained-like LayerNorm scales keep transformer tokens at their scale
            if key.endswith(("ln1.weight", "ln2.weight", "norm.weight", "norm1.weight", "norm2.weight")):
                sd[key] = sd[key] + 1.0
            if key in spread:
                sd[key] = sd[key] * 100
        return writer(tmp_path / f"{name}{'.pkl' if writer is write_detectron2_pkl else '.pth'}", sd, **kwargs)

    return build


def _hf(tmp_path: Path) -> Path:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    config = Mask2FormerConfig(
        backbone_config=ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"], depths=[1, 1, 1, 1],
                                     hidden_sizes=[64, 128, 256, 512], layer_type="basic"),
        num_labels=4, hidden_dim=32, feature_size=32, mask_feature_size=32, encoder_layers=1, decoder_layers=3,
        num_queries=6, encoder_feedforward_dim=64, dim_feedforward=64)
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).eval().save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


# format -> (checkpoint builder, preset, task scored, export options)
CASES = {
    "torchvision": (_torchvision, "maskrcnn_r50", "instance", []),
    "mmseg": (_mmseg, "pspnet_r50", "semantic", []),
    "detectron2": (_layout("mask2former_r50", write_detectron2_pkl), "mask2former_r50", "semantic", []),
    "oneformer": (_layout("oneformer_r50", write_torch_checkpoint, iteration=1), "oneformer_r50", "semantic",
                  ["--task", "semantic"]),
    "adelaidet": (_layout("blendmask_r50_3x", write_torch_checkpoint,
                          spread=("proposal_generator.fcos_head.cls_logits.weight",)), "blendmask_r50", "instance", []),
    "segvit": (_layout("segvit_small", write_torch_checkpoint, key="state_dict", meta={"mmseg_version": "0.24.0"}),
               "segvit_vit_b", "semantic", []),
    "gscnn": (_layout("gscnn_wrn38_cityscapes", write_torch_checkpoint, key="state_dict", epoch=174),
              "gscnn_r50", "semantic", []),
    "panet": (_layout("panet_r50_fpn_2x_mask", write_torch_checkpoint, spread=("Box_Outs.cls_score.weight",),
                      step=179999), "panet_r50", "instance", []),
    "hf": (_hf, "mask2former_r50", "semantic", []),
}


RCNN = ("torchvision", "panet")


def _dataset(root: Path, meta, task: str) -> Path:
    """Two images with ground truth in the model's own classes: label PNGs (semantic) or a COCO instance
    JSON (instance); returns the dataset config for `omniseg eval -c`."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        images.append({"id": i + 1, "file_name": f"im{i}.png", "height": SIZE[0], "width": SIZE[1]})
        x, y = 10 + 20 * i, 8
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": meta.dataset_ids[i % meta.num_classes],
                            "iscrowd": 0, "area": 30.0 * 24, "bbox": [x, y, 30, 24],
                            "segmentation": [[x, y, x + 30, y, x + 30, y + 24, x, y + 24]]})
    if task == "semantic":
        (root / "labels").mkdir()
        for i in range(2):
            label = rng.integers(0, meta.num_classes, SIZE).astype(np.uint8)
            label[:4] = 255  # ignored
            Image.fromarray(label).save(root / "labels" / f"im{i}.png")
        data = {"format": "semantic_folder", "root": str(root), "image_dir": "images", "label_dir": "labels",
                "classes": list(meta.classes)}
    else:
        categories = [{"id": int(d), "name": n} for d, n in zip(meta.dataset_ids, meta.classes)]
        (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                          "categories": categories}))
        data = {"format": "coco_instance", "root": str(root), "image_dir": "images", "json": "instances.json"}
    config = root / "dataset.yaml"
    config.write_text(json.dumps({"data": {"val": data}}))
    return config


@pytest.mark.parametrize("fmt", list(CASES))
def test_a_converted_checkpoint_works_in_predict_eval_and_export(fmt, tmp_path):
    build, preset, task, export_options = CASES[fmt]
    weights = tmp_path / "converted.safetensors"
    # the test size of the small images; R-CNN heads on 100 proposals, not 1000 (PANet's conv box head is heavy)
    overrides = [f"data.min_size_test={SIZE[0]}"] + (["model.rpn.post_nms_topk_test=100"] if fmt in RCNN else [])
    report = convert(build(tmp_path), fmt, preset, weights, overrides=overrides)
    assert report["unmapped"] == [] and report["missing"] == []
    model, cfg, meta = load_model(weights)
    dataset = _dataset(tmp_path / "data", meta, task)
    runner = CliRunner()

    result = runner.invoke(app, ["predict", "-w", str(weights), "-i", str(tmp_path / "data" / "images"), "-o",
                                 str(tmp_path / "preds"), "--task", task, "--no-overlay"])
    assert result.exit_code == 0, result.output
    scores = {}
    for name, source in (("weights", ["-w", str(weights)]), ("predictions", ["-p", str(tmp_path / "preds")])):
        # --dataset names the ground truth; with --weights the network and its test size stay the file's own
        result = runner.invoke(app, ["eval", *source, "--dataset", str(dataset), "--task", task, "-o",
                                     str(tmp_path / f"{name}.json")])
        assert result.exit_code == 0, result.output
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())[task]
    headline = "mIoU" if task == "semantic" else "AP"
    assert 0.0 <= scores["weights"][headline] <= 100.0
    assert scores["weights"][headline] == pytest.approx(scores["predictions"][headline], abs=1e-6)

    result = runner.invoke(app, ["export", "-w", str(weights), "-o", str(tmp_path / "m.pt2"), "--height",
                                 str(SIZE[0]), "--width", str(SIZE[1]), *export_options])
    assert result.exit_code == 0, result.output
    image = torch.randint(0, 256, (1, 3, *SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    exported = load_exported(tmp_path / "m.pt2")(image)
    with torch.no_grad():
        eager = InferenceGraph(model, export_options[1] if export_options else None)(image)
    assert len(exported) == len(eager) > 0
    for a, b in zip(exported, eager):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
