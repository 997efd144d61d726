"""Writers round-trip through the files other tools read; overlays touch only annotated pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from omniseg.data.errors import DataError
from omniseg.data.meta import DatasetMeta
from omniseg.evaluation import PanopticEvaluator
from omniseg.outputs import (
    InstanceJsonWriter,
    PanopticJsonWriter,
    id_to_rgb,
    instances_to_coco_json,
    rgb_to_id,
    write_coco_instances_json,
    write_panoptic,
    write_semantic_png,
)
from omniseg.visualize import (
    overlay_instances,
    overlay_panoptic,
    overlay_semantic,
    plot_training_curves,
    save_image,
)

META = DatasetMeta(
    classes=["person", "car", "sky", "grass"],
    isthing=[True, True, False, False],
    dataset_ids=[1, 3, 119, 125],
    colors=[(220, 20, 60), (0, 0, 142), (70, 130, 180), (107, 142, 35)],
)


def no_temp_files(folder) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ============================================================================ panoptic
def test_id_rgb_round_trip_matches_panopticapi_convention():
    ids = torch.tensor([[0, 1, 255], [256, 65536 + 2, 2**24 - 1]])
    rgb = id_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert rgb[1, 1].tolist() == [2, 0, 1] and rgb[1, 0].tolist() == [0, 1, 0]
    assert np.array_equal(rgb_to_id(rgb), ids.numpy())
    with pytest.raises(ValueError):
        id_to_rgb(torch.tensor([[2**24]]))


def panoptic_case():
    segment_map = torch.zeros(6, 8, dtype=torch.long)
    segment_map[:3] = 300  # sky (an id needing two bytes)
    segment_map[3:] = 7  # grass
    segment_map[1:5, 2:4] = 1  # person, spans rows 1-4, cols 2-3
    segment_map[4:6, 6:8] = 2  # car
    segment_map[0, 0] = 0  # void
    segment_map[5, 0] = 99  # id without segments_info -> written as void
    info = [
        {"id": 1, "category": 0, "isthing": True, "score": 0.9},
        {"id": 2, "category": 1, "isthing": True, "score": 0.8},
        {"id": 300, "category": 2, "isthing": False, "score": 0.7},
        {"id": 7, "category": 3, "isthing": False, "score": 0.6},
        {"id": 55, "category": 1, "isthing": True, "score": 0.5},  # no pixels -> dropped
    ]
    return segment_map, info


def test_write_panoptic_png_and_segments(tmp_path):
    segment_map, info = panoptic_case()
    annotation = write_panoptic(tmp_path / "a" / "img.png", segment_map, info, META, image_id=5)
    assert annotation["file_name"] == "img.png" and annotation["image_id"] == 5
    read = rgb_to_id(np.asarray(Image.open(tmp_path / "a" / "img.png").convert("RGB")))
    expected = segment_map.clone()
    expected[5, 0] = 0
    assert np.array_equal(read, expected.numpy())
    segments = {s["id"]: s for s in annotation["segments_info"]}
    assert set(segments) == {1, 2, 300, 7}
    assert segments[1] == {"id": 1, "category_id": 1, "area": 8, "bbox": [2, 1, 2, 4], "iscrowd": 0, "score": 0.9}
    assert segments[2]["category_id"] == 3 and segments[2]["bbox"] == [6, 4, 2, 2] and segments[2]["area"] == 4
    assert segments[300]["category_id"] == 119 and segments[300]["area"] == 24 - 1 - 4
    assert no_temp_files(tmp_path)


def test_panoptic_json_writer_round_trips_through_the_evaluator(tmp_path):
    segment_map, info = panoptic_case()
    with PanopticJsonWriter(tmp_path / "panoptic.json", tmp_path / "panoptic", META) as writer:
        writer.add(11, "dir/img_11.jpg", 6, 8, segment_map, info)
    data = json.loads((tmp_path / "panoptic.json").read_text())
    assert data["images"] == [{"id": 11, "file_name": "img_11.jpg", "height": 6, "width": 8}]
    assert [c["id"] for c in data["categories"]] == [1, 3, 119, 125]
    assert [c["isthing"] for c in data["categories"]] == [1, 1, 0, 0]
    annotation = data["annotations"][0]
    assert annotation["image_id"] == 11 and annotation["file_name"] == "img_11.png"
    # Read the files back as a dataset loader would and score them against the source: PQ 100.
    read_map = torch.from_numpy(rgb_to_id(np.asarray(Image.open(tmp_path / "panoptic" / "img_11.png").convert("RGB"))))
    read_info = [{"id": s["id"], "category": META.to_contiguous(s["category_id"])} for s in annotation["segments_info"]]
    evaluator = PanopticEvaluator(META)
    source_map = torch.where(segment_map == 99, torch.zeros_like(segment_map), segment_map)
    evaluator.process(source_map, info[:4], read_map, read_info)
    assert evaluator.evaluate()["PQ"] == pytest.approx(100.0)


# ============================================================================ semantic
def test_semantic_png_holds_dataset_ids(tmp_path):
    labels = torch.tensor([[0, 1, 2], [3, 255, -1]])
    write_semantic_png(tmp_path / "sem.png", labels, META)
    image = Image.open(tmp_path / "sem.png")
    assert image.mode == "L"
    assert np.asarray(image).tolist() == [[1, 3, 119], [125, 255, 255]]

    wide = DatasetMeta(classes=["a", "b"], dataset_ids=[7, 1000])
    write_semantic_png(tmp_path / "wide.png", torch.tensor([[0, 1, 255]]), wide)
    assert np.asarray(Image.open(tmp_path / "wide.png")).astype(np.int64).tolist() == [[7, 1000, 255]]
    assert no_temp_files(tmp_path)


# ============================================================================ instances
def test_instances_json_loads_in_coco(tmp_path):
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 1:4, 2:6] = True
    masks[1, 5:10, 0:12] = True
    instances = {"masks": masks, "labels": torch.tensor([1, 0]), "scores": torch.tensor([0.9, 0.4])}
    path = write_coco_instances_json(tmp_path / "res.json", [(3, instances)], META)
    with InstanceJsonWriter(tmp_path / "res2.json", META) as writer:
        writer.add(3, instances)
    results = json.loads(path.read_text())
    assert results == json.loads((tmp_path / "res2.json").read_text())
    assert results == json.loads(json.dumps(instances_to_coco_json(3, instances, META)))
    assert [r["category_id"] for r in results] == [3, 1] and [r["image_id"] for r in results] == [3, 3]
    decoded = mask_utils.decode([r["segmentation"] for r in results]).transpose(2, 0, 1).astype(bool)
    assert np.array_equal(decoded, masks.numpy())

    gt = COCO()
    gt.dataset = {
        "images": [{"id": 3, "height": 10, "width": 12}],
        "annotations": [],
        "categories": [{"id": i} for i in META.dataset_ids],
    }
    gt.createIndex()
    loaded = gt.loadRes(str(path))
    assert len(loaded.getAnnIds()) == 2
    assert sorted(a["area"] for a in loaded.anns.values()) == [12, 60]


# ============================================================================ overlays
def make_image(h=16, w=20):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8)


def test_overlay_semantic_changes_only_labelled_pixels():
    image = make_image()
    labels = torch.full((16, 20), 255)
    labels[2:6, 3:9] = 2
    labels[10:, :] = 0
    out = overlay_semantic(image, labels, META, alpha=0.5)
    assert out.dtype == torch.uint8 and out.shape == image.shape
    outside = labels == 255
    assert torch.equal(out[:, outside], image[:, outside])
    expected = (image[:, 2, 3].float() * 0.5 + torch.tensor([70.0, 130.0, 180.0]) * 0.5).round().to(torch.uint8)
    assert torch.equal(out[:, 2, 3], expected)


def test_overlay_panoptic_jitters_things_and_outlines_them():
    image = make_image(6, 8)
    segment_map, info = panoptic_case()
    second = {"id": 3, "category": 0, "isthing": True}
    segment_map[0, 5:7] = 3  # a second person
    out = overlay_panoptic(image, segment_map, info + [second], META, alpha=0.6)
    assert out.dtype == torch.uint8 and out.shape == image.shape
    untouched = (segment_map == 0) | (segment_map == 99)
    assert torch.equal(out[:, untouched], image[:, untouched])
    assert not torch.equal(out[:, ~untouched], image[:, ~untouched])
    # stuff keeps the class colour: blended value is exact away from things
    expected = (image[:, 2, 7].float() * 0.4 + torch.tensor([70.0, 130.0, 180.0]) * 0.6).round().to(torch.uint8)
    assert torch.equal(out[:, 2, 7], expected)
    # two persons get different colours; the person's outline (row 1, col 2) is drawn opaque
    plain = overlay_panoptic(image, segment_map, info + [second], META, alpha=1.0, contours=False)
    assert not torch.equal(plain[:, 2, 2], plain[:, 0, 5])
    assert torch.equal(out[:, 1, 2], (plain[:, 1, 2].float() * 0.5).round().to(torch.uint8))


def test_overlay_instances_masks_and_boxes():
    image = make_image(32, 32)
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[0, 4:12, 4:14] = True
    masks[1, 20:30, 18:28] = True
    masks[2, 0:3, 0:3] = True  # below the score threshold: not drawn
    instances = {"masks": masks, "labels": torch.tensor([0, 1, 2]), "scores": torch.tensor([0.9, 0.6, 0.1])}
    out = overlay_instances(image, instances, META, score_threshold=0.5, alpha=0.3, draw_boxes=False)
    assert out.dtype == torch.uint8 and out.shape == image.shape
    drawn = masks[0] | masks[1]
    assert torch.equal(out[:, ~drawn], image[:, ~drawn])
    assert (out[:, drawn] != image[:, drawn]).any(dim=0).float().mean() > 0.9

    boxed = overlay_instances(image, instances, META, score_threshold=0.5, draw_labels=False)
    inside_boxes = torch.zeros(32, 32, dtype=torch.bool)
    inside_boxes[4:12, 4:14] = True
    inside_boxes[20:30, 18:28] = True
    assert torch.equal(boxed[:, ~inside_boxes], image[:, ~inside_boxes])
    labelled = overlay_instances(image, instances, META)
    assert labelled.shape == image.shape and not torch.equal(labelled, boxed)
    nothing = overlay_instances(image, instances, META, score_threshold=0.95)
    assert torch.equal(nothing, image)


def test_save_image_round_trip(tmp_path):
    image = make_image()
    save_image(tmp_path / "out" / "x.png", image)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "x.png")), image.permute(1, 2, 0).numpy())
    save_image(tmp_path / "gray.png", image[0])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "gray.png")), image[0].numpy())
    with pytest.raises(ValueError, match="suffix"):
        save_image(tmp_path / "x.unknown", image)
    assert no_temp_files(tmp_path)


# ============================================================================ curves
def test_plot_training_curves(tmp_path):
    lines = [json.dumps({"iter": i, "loss": 5.0 / (i + 1), "lr": 1e-4 * (1 - i / 50)}) for i in range(0, 50, 5)]
    lines.append(json.dumps({"iter": 25, "PQ": 10.5, "mIoU": 20.0, "AP": 5.0}))
    lines.append(json.dumps({"iter": 50, "PQ": 15.5, "mIoU": 25.0, "AP": 7.5}))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(lines) + '\n{"iter": 55, "lo')  # the trainer is mid-write
    out = plot_training_curves(metrics, tmp_path / "plots" / "curves.png")
    with Image.open(out) as image:
        width, height = image.size
    assert width >= 3 * 300 and height >= 2 * 200  # loss, lr, PQ / mIoU, AP: two rows of three
    assert no_temp_files(tmp_path)

    metrics.write_text('{"iter": 1, "loss": 1.0}\nnot json\n{"iter": 2, "loss": 0.5}\n')
    with pytest.raises(DataError, match="line 2"):
        plot_training_curves(metrics, tmp_path / "bad.png")
    with pytest.raises(DataError, match="not found"):
        plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "bad.png")
