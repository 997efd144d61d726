"""YOLO-seg and LabelMe: read for instance and panoptic training, written from predictions, and read back
with the same pixels."""

from __future__ import annotations

import base64
import math
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage
from typer.testing import CliRunner

from omniseg.cli import app
from omniseg.data.build import build_dataset
from omniseg.data.errors import DataError
from omniseg.data.formats.labelme import LabelMeDataset
from omniseg.data.formats.polygons import rasterize, trace
from omniseg.data.formats.yolo import YoloSegDataset
from omniseg.data.meta import DatasetMeta
from omniseg.outputs import labelme_json, yolo_seg_text
from serving import tiny_weights

H, W = 64, 80  # the tiny model of the engine test needs res5 larger than 1x1


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)


def _box(x0, y0, x1, y1):
    """Pixels x0..x1, y0..y1 inclusive, as a polygon in pixel-centre coordinates."""
    return [x0 - 0.5, y0 - 0.5, x1 + 0.5, y0 - 0.5, x1 + 0.5, y1 + 0.5, x0 - 0.5, y1 + 0.5]


def _corner_box(x0, y0, x1, y1):
    """Pixels x0..x1, y0..y1 inclusive, as a polygon in corner coordinates (YOLO's, times the size)."""
    return [x0, y0, x1 + 1, y0, x1 + 1, y1 + 1, x0, y1 + 1]


def _filled(x0, y0, x1, y1):
    m = np.zeros((H, W), bool)
    m[y0:y1 + 1, x0:x1 + 1] = True
    return m


@pytest.fixture
def yolo_root(tmp_path):
    root = tmp_path / "yolo"
    for split in ("train", "val"):
        _image(root / "images" / split / "a.png")
        _image(root / "images" / split / "b.png")  # no label file: no objects
        poly = np.array(_corner_box(2, 3, 9, 7)).reshape(-1, 2) / [W, H]
        grass = np.array(_corner_box(0, 12, W - 1, H - 1)).reshape(-1, 2) / [W, H]
        (root / "labels" / split).mkdir(parents=True)
        (root / "labels" / split / "a.txt").write_text(
            "1 " + " ".join(f"{v:.6f}" for v in poly.flatten()) + "\n"
            "2 " + " ".join(f"{v:.6f}" for v in grass.flatten()) + "\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: {0: cat, 1: dog, 2: grass}\n")
    return root


def test_yolo_seg_reads_polygons_and_stuff(yolo_root):
    ds = build_dataset({"format": "yolo_seg", "root": str(yolo_root), "data_yaml": "data.yaml"}, "val")
    assert ds.meta.classes == ["cat", "dog", "grass"] and len(ds) == 2
    sample = ds[0]
    inst = sample["instances"]
    assert inst["labels"].tolist() == [1, 2]
    assert np.array_equal(inst["masks"][0].numpy(), _filled(2, 3, 9, 7))
    assert np.array_equal(inst["masks"][1].numpy(), _filled(0, 12, W - 1, H - 1))
    assert ds[1]["instances"]["masks"].shape == (0, H, W)
    panoptic = build_dataset({"format": "yolo_seg", "root": str(yolo_root), "data_yaml": "data.yaml",
                              "stuff_classes": ["grass"]}, "train")
    s = panoptic[0]
    assert s["instances"]["labels"].tolist() == [1]  # things only
    assert [(i["category"], i["isthing"]) for i in s["segments_info"]] == [(1, True), (2, False)]
    assert int((s["pan_seg"] == 2).sum()) == W * (H - 12) and int((s["pan_seg"] == 1).sum()) == 8 * 5


def test_yolo_seg_errors_name_the_file(yolo_root):
    (yolo_root / "labels" / "val" / "a.txt").write_text("7 0.1 0.1 0.2 0.1 0.2 0.2\n")
    ds = build_dataset({"format": "yolo_seg", "root": str(yolo_root), "data_yaml": "data.yaml"}, "val")
    with pytest.raises(DataError, match=r"a\.txt: line 1: class 7 is not one of the 3 classes"):
        ds[0]
    (yolo_root / "labels" / "val" / "a.txt").write_text("1 0.1 0.1 1.4 0.1 0.2 0.2\n")
    with pytest.raises(DataError, match=r"a\.txt: line 1: coordinates must be normalised"):
        ds[0]
    with pytest.raises(DataError, match="names no 'test' split"):
        build_dataset({"format": "yolo_seg", "root": str(yolo_root), "data_yaml": "data.yaml"}, "test")


def _labelme(folder, shapes, name="a.png"):
    _image(folder / name)
    (folder / (name.rsplit(".", 1)[0] + ".json")).write_text(json.dumps(
        {"version": "5.5.0", "shapes": shapes, "imagePath": name, "imageHeight": H, "imageWidth": W, "flags": {}}))


def _shape(label, points, kind="polygon", group=None, **extra):
    return {"label": label, "points": points, "shape_type": kind, "group_id": group, "flags": {}, **extra}


def test_labelme_reads_every_region_shape_and_groups(tmp_path):
    bitmap = np.zeros((3, 4), np.uint8)
    bitmap[1:, 1:] = 255
    buffer = io.BytesIO()
    Image.fromarray(bitmap).save(buffer, format="PNG")
    shapes = [_shape("car", np.array(_box(2, 2, 5, 4)).reshape(-1, 2).tolist(), group=1),
              _shape("car", np.array(_box(8, 2, 9, 4)).reshape(-1, 2).tolist(), group=1),  # same object
              _shape("person", [[12, 2], [15, 6]], kind="rectangle"),
              _shape("person", [[24, 6], [24, 9]], kind="circle"),
              _shape("road", [[2, 18], [5, 20]], kind="mask", mask=base64.b64encode(buffer.getvalue()).decode())]
    _labelme(tmp_path, shapes)
    ds = LabelMeDataset(tmp_path, classes=["car", "person", "road"], stuff_classes=["road"])
    s = ds[0]
    inst = s["instances"]
    assert inst["labels"].tolist() == [0, 1, 1]
    assert np.array_equal(inst["masks"][0].numpy(), _filled(2, 2, 5, 4) | _filled(8, 2, 9, 4))
    assert np.array_equal(inst["masks"][1].numpy(), _filled(12, 2, 15, 6))
    assert int(inst["masks"][2].sum()) == pytest.approx(np.pi * 9, rel=0.25)
    road = s["pan_seg"] == next(i["id"] for i in s["segments_info"] if i["category"] == 2)
    assert np.array_equal(road.numpy(), _filled(3, 19, 5, 20))
    assert LabelMeDataset(tmp_path).meta.classes == ["car", "person", "road"]  # classes found when not given


def test_labelme_errors_name_the_file(tmp_path):
    _labelme(tmp_path, [_shape("wire", [[1, 1], [5, 5]], kind="line")])
    with pytest.raises(DataError, match=r"a\.json: shape 'wire' is a line, which marks no region"):
        LabelMeDataset(tmp_path)[0]
    with pytest.raises(DataError, match=r"a\.json: labels \['wire'\] are not among the classes"):
        LabelMeDataset(tmp_path, classes=["car"])
    _labelme(tmp_path, [_shape("car", [[1, 1], [5, 1], [5, 5]])], name="b.png")
    data = json.loads((tmp_path / "b.json").read_text())
    (tmp_path / "b.json").write_text(json.dumps({**data, "imageWidth": 99}))
    with pytest.raises(DataError, match=rf"b\.json: records 99x{H}"):
        LabelMeDataset(tmp_path, classes=["car", "wire"])[1]


def _blobs(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:H, :W]
    out = []
    for _ in range(n):
        m = np.zeros((H, W), bool)
        for _ in range(int(rng.integers(1, 3))):  # some objects in two parts
            cy, cx, r = rng.integers(3, H - 3), rng.integers(3, W - 3), rng.integers(2, 6)
            m |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        out.append(m)
    return out


def test_written_polygons_read_back_with_the_same_pixels(tmp_path):
    masks = _blobs(6)
    instances = {"masks": torch.from_numpy(np.stack(masks)), "labels": torch.tensor([0, 1, 2, 0, 1, 2]),
                 "scores": torch.linspace(0.9, 0.4, 6)}
    meta = DatasetMeta(["a", "b", "c"])
    for m in masks:
        assert np.array_equal(rasterize([r.flatten().tolist() for r in trace(m)], H, W), m)
    # YOLO-seg: one polygon per object, parts bridged; the trailing scores are read back as such
    _image(tmp_path / "images" / "x.png")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "x.txt").write_text(yolo_seg_text(instances, W, H, scores=True))
    back = YoloSegDataset(tmp_path / "images", tmp_path / "labels", meta.classes)[0]["instances"]
    assert back["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    assert all(np.array_equal(a.numpy(), b) for a, b in zip(back["masks"], masks))
    # LabelMe: a polygon per part, parts grouped
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "x.json").write_text(json.dumps(labelme_json(instances, meta, "x.png", W, H)))
    back = LabelMeDataset(tmp_path / "images", tmp_path / "lm", meta.classes)[0]["instances"]
    assert back["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    assert all(np.array_equal(a.numpy(), b) for a, b in zip(back["masks"], masks))


def test_predict_writes_yolo_and_labelme_that_read_back_as_predicted(tmp_path):
    weights = tiny_weights(tmp_path / "m2f.safetensors")
    images = tmp_path / "images"
    for name in ("p.png", "q.png"):
        _image(images / name)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", "-w", str(weights), "-i", str(images), "-o", str(out),
                                      "--task", "instance", "--no-overlay", "--yolo", "--labelme"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "instances_results.json").read_text())
    names = [line.split(": ", 1)[1].strip().strip('"') for line in (out / "yolo" / "data.yaml").read_text().splitlines()[1:]]
    for index, stem in enumerate(("p", "q")):
        predicted = [r for r in results if r["image_id"] == index]
        yolo = YoloSegDataset(images, out / "yolo", names)[index]["instances"]
        labelme = LabelMeDataset(images, out / "labelme", names)[index]["instances"]
        kept = [r for r in predicted if mask_utils.decode(r["segmentation"]).any()]
        for back in (yolo, labelme):
            assert len(back["labels"]) == len(kept)
            # the same pixels with holes filled (neither format has holes), up to regions touching at a corner
            agree = [np.mean(ndimage.binary_fill_holes(mask_utils.decode(r["segmentation"]).astype(bool)) == m.numpy())
                     for r, m in zip(kept, back["masks"])]
            assert min(agree, default=1.0) > 0.99
    lm = json.loads((out / "labelme" / "p.json").read_text())
    assert (out / "labelme" / lm["imagePath"]).resolve() == (images / "p.png").resolve()


@pytest.mark.parametrize("kind", ["yolo_instance", "labelme_panoptic"])
def test_the_engine_trains_on_polygon_datasets(kind, yolo_root, tmp_path, make_tiny_config):
    from omniseg.engine.trainer import train

    if kind == "yolo_instance":
        data = [f"data.{s}={{format: yolo_seg, root: {yolo_root}, data_yaml: data.yaml}}" for s in ("train", "val")]
        extra = ["task=instance", "eval_tasks=[instance]"]
    else:
        folder = tmp_path / "lm"
        for i in range(2):
            _labelme(folder, [_shape("car", np.array(_box(2 + i, 2, 9, 8)).reshape(-1, 2).tolist()),
                              _shape("road", [[0, 14], [W - 1, H - 1]], kind="rectangle")], name=f"{i}.png")
        data = [f"data.{s}={{format: labelme, image_dir: {folder}, stuff_classes: [road]}}" for s in ("train", "val")]
        extra = ["task=panoptic", "eval_tasks=[panoptic,semantic]"]
    cfg = make_tiny_config(*data, *extra, "train.max_iters=2", "data.batch_size=2")
    metrics = train(cfg, progress=False)
    assert metrics and all(math.isfinite(v) for v in metrics.values())
