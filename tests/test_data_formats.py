"""Format readers: conformance on real sample data and a DataError for every kind of bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omniseg.data import (
    CocoInstanceDataset,
    CocoPanopticDataset,
    DataError,
    SemanticFolderDataset,
    build_dataset,
    describe_dataset,
)
from omniseg.data.formats.coco_panoptic import id_to_rgb

SHARED = Path(os.environ.get("OMNISEG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


pytestmark = pytest.mark.usefixtures("single_thread")  # small per-image ops: thread start-up dominates


def shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared sample data not found at {p} (set OMNISEG_SHARED_DATA)")
    return p


# --------------------------------------------------------------------------- real data conformance


def test_coco_panoptic_sample_matches_json():
    root = shared("coco_panoptic_sample")
    ds = CocoPanopticDataset(root / "input_images", root / "panoptic_examples.json", root / "panoptic_examples")
    data = json.loads((root / "panoptic_examples.json").read_text())
    assert len(ds) == 2 and ds.meta.num_classes == 133
    assert len(ds.meta.thing_ids) == 80 and len(ds.meta.stuff_ids) == 53
    assert ds.meta.colors[0] == (220, 20, 60)  # person colour from the JSON
    for i, ann in enumerate(data["annotations"]):
        s = ds[i]
        assert s["image_id"] == ann["image_id"]
        assert s["image"].shape[1:] == s["pan_seg"].shape == (s["height"], s["width"])
        assert len(s["segments_info"]) == len(ann["segments_info"])
        for seg, ref in zip(s["segments_info"], ann["segments_info"]):
            assert seg["id"] == ref["id"]
            assert ds.meta.to_dataset_id(seg["category"]) == ref["category_id"]
            assert int((s["pan_seg"] == seg["id"]).sum()) == ref["area"]
            assert seg["iscrowd"] == bool(ref["iscrowd"])
        # Derived views: each labelled pixel carries its segment's class; crowd and void are ignored.
        for seg in s["segments_info"]:
            values = s["sem_seg"][s["pan_seg"] == seg["id"]].unique().tolist()
            assert values == ([255] if seg["iscrowd"] else [seg["category"]])
        assert (s["sem_seg"][s["pan_seg"] == 0] == 255).all()
        things = [seg for seg in s["segments_info"] if seg["isthing"]]
        assert s["instances"]["labels"].tolist() == [seg["category"] for seg in things]
        assert s["instances"]["iscrowd"].tolist() == [seg["iscrowd"] for seg in things]
    assert sum(ds[0]["instances"]["iscrowd"].tolist()) == 1  # 000000142238 has one crowd of people


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under numpy 2
def test_coco128_instances_read_all_939_including_crowd_rle():
    from pycocotools import mask as mask_utils

    root = shared("coco128")
    ds = CocoInstanceDataset(root / "train2017", root / "annotations" / "instances_train2017.json")
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    by_id = {a["id"]: a for a in data["annotations"]}
    assert len(ds) == 128 and ds.meta.num_classes == 80 and all(ds.meta.isthing)
    total, crowd = 0, 0
    for i in range(len(ds)):
        inst = ds.load_instances(i)
        anns = ds.annotations.get(ds.images[i]["id"], [])
        total += len(anns)
        crowd += int(inst["iscrowd"].sum())
        assert inst["masks"].dtype == torch.bool and inst["masks"].shape[0] == len(anns)
        for k, ann in enumerate(anns):
            area = int(inst["masks"][k].sum())
            if ann["iscrowd"]:
                # Uncompressed RLE: decoded exactly as pycocotools' reference decoder does.
                assert isinstance(ann["segmentation"]["counts"], list)
                ref = mask_utils.decode(mask_utils.frPyObjects(ann["segmentation"], *ann["segmentation"]["size"]))
                assert np.array_equal(inst["masks"][k].numpy(), ref.astype(bool))
            else:
                assert area == pytest.approx(ann["area"], rel=0.1, abs=30)  # rasterised polygon vs polygon area
            x, y, w, h = by_id[ann["id"]]["bbox"]
            assert inst["boxes"][k].tolist() == pytest.approx([x, y, x + w, y + h])
            assert ds.meta.to_dataset_id(int(inst["labels"][k])) == ann["category_id"]
    assert (total, crowd) == (939, 10)
    s = ds[0]
    assert s["image"].shape == (3, s["height"], s["width"]) and s["image"].dtype == torch.uint8
    assert s["instances"]["masks"].shape[1:] == (s["height"], s["width"])


def test_camvid_preset_maps_void_to_ignore():
    root = shared("camvid")
    ds = SemanticFolderDataset(root / "val", root / "valannot", preset="camvid")
    assert len(ds) == 101
    assert ds.meta.classes == ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                               "Car", "Pedestrian", "Bicyclist"]
    seen_void = False
    for i in range(3):
        s = ds[i]
        raw = torch.from_numpy(np.array(Image.open(ds.items[i][2])).astype(np.int64))
        expected = torch.where(raw == 11, torch.tensor(255), raw)
        assert torch.equal(s["sem_seg"], expected)
        seen_void |= bool((raw == 11).any())
        assert s["sem_seg"].shape == (360, 480)
    assert seen_void


def _frames(tmp_path, names):
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir(exist_ok=True)
    for n in names:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / f"{n}.png")
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "labels" / f"{n}.png")


def test_sequences_select_video_frames(tmp_path):
    _frames(tmp_path, ["0001TP_000010", "0001TP_000020", "0006R0_f00930", "Seq05VD_f00000"])
    cfg = {"format": "semantic_folder", "root": str(tmp_path), "image_dir": "images", "label_dir": "labels",
           "classes": ["a", "b"]}
    keys = lambda ds: [k for k, _, _ in ds.items]  # noqa: E731
    assert keys(build_dataset({**cfg, "sequences": ["0001TP", "Seq05VD"]}, "train")) == [
        "0001TP_000010", "0001TP_000020", "Seq05VD_f00000"]
    assert keys(build_dataset({**cfg, "exclude_sequences": ["0001TP"]}, "train")) == ["0006R0_f00930", "Seq05VD_f00000"]
    with pytest.raises(DataError, match=r"data.sequences: no frames of \['0016E5'\]"):
        build_dataset({**cfg, "sequences": ["0016E5"]}, "train")
    with pytest.raises(DataError, match="no frames left"):
        build_dataset({**cfg, "sequences": ["0006R0"], "exclude_sequences": ["0006R0"]}, "train")
    with pytest.raises(ValueError, match="semantic_folder"):
        build_dataset({"format": "synthetic", "root": str(tmp_path), "sequences": ["0001TP"]}, "train")


def test_camvid_sequence_held_out_split():
    """Train on 0001TP + 0016E5, validate on all of 0006R0: no sequence shared (CamVid val is 0016E5)."""
    root = shared("camvid")
    cfg = {"format": "semantic_folder", "preset": "camvid", "root": str(root)}
    train = build_dataset({**cfg, "exclude_sequences": ["0006R0"]}, "train")
    held_out = build_dataset({**cfg, "sequences": ["0006R0"]}, "train")  # frames of CamVid's train folder
    assert (len(train), len(held_out)) == (266, 101)
    seqs = lambda ds: {k.split("_")[0] for k, _, _ in ds.items}  # noqa: E731
    assert seqs(train) == {"0001TP", "0016E5"} and seqs(held_out) == {"0006R0"}


def test_ade20k_preset_reduces_zero_label():
    root = shared("ade20k_sample")
    ds = SemanticFolderDataset(root / "images", root / "annotations", preset="ade20k",
                               class_info=root / "objectInfo150.csv")
    assert len(ds) == 3 and ds.meta.num_classes == 150
    assert ds.meta.classes[:3] == ["wall", "building", "sky"]
    assert ds.meta.dataset_ids[0] == 1 and ds.meta.to_contiguous(150) == 149
    for i in range(3):
        s = ds[i]
        raw = torch.from_numpy(np.array(Image.open(ds.items[i][2])).astype(np.int64))
        expected = torch.where(raw == 0, torch.tensor(255), raw - 1)
        assert torch.equal(s["sem_seg"], expected)
        assert (raw == 0).any()
    unnamed = SemanticFolderDataset(root / "images", root / "annotations", preset="ade20k")
    assert unnamed.meta.classes[0] == "class_0" and unnamed.meta.num_classes == 150


def test_cityscapes_preset_maps_label_ids_to_train_ids(tmp_path):
    img_dir, lbl_dir = tmp_path / "leftImg8bit" / "val" / "aachen", tmp_path / "gtFine" / "val" / "aachen"
    img_dir.mkdir(parents=True)
    lbl_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(img_dir / "aachen_000000_000019_leftImg8bit.png")
    raw = np.array([[7, 8, 26, 33], [0, 1, 6, 24]], np.uint8)
    Image.fromarray(raw).save(lbl_dir / "aachen_000000_000019_gtFine_labelIds.png")
    ds = build_dataset({"format": "semantic_folder", "preset": "cityscapes", "root": str(tmp_path)}, "val")
    assert len(ds) == 1 and ds.meta.num_classes == 19
    assert ds[0]["sem_seg"].tolist() == [[0, 1, 13, 18], [255, 255, 255, 11]]
    assert ds.meta.classes[13] == "car" and ds.meta.to_dataset_id(13) == 26


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((10, 20, 3), np.uint8))  # stored 20 wide, 10 high
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "a.jpg", exif=exif)
    Image.fromarray(np.zeros((20, 10), np.uint8)).save(tmp_path / "a.png")
    ds = SemanticFolderDataset(tmp_path, tmp_path, classes=["bg"], image_suffix=".jpg")
    assert ds[0]["image"].shape == (3, 20, 10)


# --------------------------------------------------------------------------- bad input


def _write_semantic(tmp_path: Path, label: np.ndarray, image_hw=(8, 8)) -> tuple[Path, Path]:
    (tmp_path / "img").mkdir()
    (tmp_path / "lbl").mkdir()
    Image.fromarray(np.zeros((*image_hw, 3), np.uint8)).save(tmp_path / "img" / "scene1.png")
    Image.fromarray(label).save(tmp_path / "lbl" / "scene1.png")
    return tmp_path / "img", tmp_path / "lbl"


def test_label_value_out_of_range_names_file_and_values(tmp_path):
    label = np.zeros((8, 8), np.uint8)
    label[0, 0], label[1, 1], label[2, 2] = 3, 7, 255
    img, lbl = _write_semantic(tmp_path, label)
    ds = SemanticFolderDataset(img, lbl, classes=["a", "b", "c"])
    with pytest.raises(DataError, match=r"scene1\.png.*\[3, 7\]"):
        ds[0]


def test_label_size_mismatch(tmp_path):
    img, lbl = _write_semantic(tmp_path, np.zeros((8, 9), np.uint8))
    with pytest.raises(DataError, match=r"lbl/scene1\.png.*differs from its image"):
        SemanticFolderDataset(img, lbl, classes=["a"])[0]


def test_colour_label_rejected(tmp_path):
    img, lbl = _write_semantic(tmp_path, np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"scene1\.png.*single-channel"):
        SemanticFolderDataset(img, lbl, classes=["a"])[0]


def test_corrupt_image(tmp_path):
    img, lbl = _write_semantic(tmp_path, np.zeros((8, 8), np.uint8))
    (img / "scene1.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(DataError, match=r"img/scene1\.png.*cannot read image"):
        SemanticFolderDataset(img, lbl, classes=["a"])[0]


def test_missing_label_and_missing_dirs(tmp_path):
    img, lbl = _write_semantic(tmp_path, np.zeros((8, 8), np.uint8))
    (lbl / "scene1.png").unlink()
    with pytest.raises(DataError, match=r"scene1\.png.*no matching label file"):
        SemanticFolderDataset(img, lbl, classes=["a"])
    with pytest.raises(DataError, match=r"nowhere.*does not exist"):
        SemanticFolderDataset(tmp_path / "nowhere", lbl, classes=["a"])
    with pytest.raises(DataError, match=r"missing_root.*does not exist"):
        build_dataset({"format": "coco_instance", "root": str(tmp_path / "missing_root")}, "train")
    with pytest.raises(DataError, match=r"instances_val2017\.json.*does not exist"):
        (tmp_path / "val2017").mkdir()
        build_dataset({"format": "coco_instance", "root": str(tmp_path)}, "val")


def _write_panoptic(tmp_path: Path, pan_ids: np.ndarray, segments: list[dict], categories=None) -> tuple:
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "pan").mkdir(exist_ok=True)
    h, w = pan_ids.shape
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(tmp_path / "images" / "im7.jpg")
    Image.fromarray(id_to_rgb(pan_ids)).save(tmp_path / "pan" / "im7.png")
    categories = categories or [{"id": 5, "name": "cat", "isthing": 1}, {"id": 9, "name": "grass", "isthing": 0}]
    data = {"images": [{"id": 7, "file_name": "im7.jpg", "height": h, "width": w}],
            "annotations": [{"image_id": 7, "file_name": "im7.png", "segments_info": segments}],
            "categories": categories}
    (tmp_path / "pan.json").write_text(json.dumps(data))
    return tmp_path / "images", tmp_path / "pan.json", tmp_path / "pan"


def test_tiny_panoptic_hand_checked(tmp_path):
    pan = np.array([[0, 300, 300], [70000, 70000, 1]])
    segs = [{"id": 300, "category_id": 5, "iscrowd": 0}, {"id": 70000, "category_id": 9, "iscrowd": 0},
            {"id": 1, "category_id": 5, "iscrowd": 1}]
    ds = CocoPanopticDataset(*_write_panoptic(tmp_path, pan, segs))
    s = ds[0]
    assert s["pan_seg"].tolist() == pan.tolist()
    assert s["sem_seg"].tolist() == [[255, 0, 0], [1, 1, 255]]
    assert s["instances"]["labels"].tolist() == [0, 0]
    assert s["instances"]["iscrowd"].tolist() == [False, True]
    assert s["instances"]["boxes"].tolist() == [[1, 0, 3, 1], [2, 1, 3, 2]]
    assert ds.meta.colors is not None and ds.meta.dataset_ids == [5, 9]


def test_panoptic_png_id_without_segments_info(tmp_path):
    pan = np.array([[0, 300], [301, 300]])
    ds = CocoPanopticDataset(*_write_panoptic(tmp_path, pan, [{"id": 300, "category_id": 5, "iscrowd": 0}]))
    with pytest.raises(DataError, match=r"im7\.png.*\[301\].*no segments_info"):
        ds[0]


def test_panoptic_segments_info_id_missing_from_png(tmp_path):
    pan = np.array([[0, 300], [300, 300]])
    segs = [{"id": 300, "category_id": 5, "iscrowd": 0}, {"id": 44, "category_id": 9, "iscrowd": 0}]
    ds = CocoPanopticDataset(*_write_panoptic(tmp_path, pan, segs))
    with pytest.raises(DataError, match=r"im7\.png.*\[44\].*do not appear in the PNG"):
        ds[0]


def test_panoptic_unknown_category(tmp_path):
    pan = np.array([[0, 300], [300, 300]])
    with pytest.raises(DataError, match=r"pan\.json.*category_id 77"):
        CocoPanopticDataset(*_write_panoptic(tmp_path, pan, [{"id": 300, "category_id": 77, "iscrowd": 0}]))


def test_panoptic_size_mismatch_and_missing_image(tmp_path):
    pan = np.array([[300, 300], [300, 300]])
    image_dir, js, png_dir = _write_panoptic(tmp_path, pan, [{"id": 300, "category_id": 5, "iscrowd": 0}])
    Image.fromarray(np.zeros((3, 2, 3), np.uint8)).save(image_dir / "im7.jpg")
    with pytest.raises(DataError, match=r"im7\.png.*differs from its image im7\.jpg"):
        CocoPanopticDataset(image_dir, js, png_dir)[0]
    (image_dir / "im7.jpg").unlink()
    with pytest.raises(DataError, match=r"im7\.jpg.*does not exist"):
        CocoPanopticDataset(image_dir, js, png_dir)[0]


def _write_instances(tmp_path: Path, anns: list[dict]) -> tuple[Path, Path]:
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 12}], "annotations": anns,
            "categories": [{"id": 3, "name": "box"}]}
    (tmp_path / "inst.json").write_text(json.dumps(data))
    return tmp_path / "images", tmp_path / "inst.json"


def test_instances_polygon_and_uncompressed_rle(tmp_path):
    rle = {"size": [10, 12], "counts": [22, 3, 7, 3, 85]}  # column-major: column 2 rows 2-4, column 3 rows 2-4
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": [[4, 4, 10, 4, 10, 8, 4, 8]]},
            {"id": 2, "image_id": 1, "category_id": 3, "iscrowd": 1, "segmentation": rle}]
    ds = CocoInstanceDataset(*_write_instances(tmp_path, anns))
    inst = ds[0]["instances"]
    assert inst["iscrowd"].tolist() == [False, True]
    crowd = torch.zeros(10, 12, dtype=torch.bool)
    crowd[2:5, 2:4] = True
    assert torch.equal(inst["masks"][1], crowd)
    poly = inst["masks"][0]
    assert poly[5, 6] and not poly[1, 1] and 20 <= int(poly.sum()) <= 35
    assert inst["boxes"][1].tolist() == [2, 2, 4, 5]  # no bbox in JSON -> from the mask


def test_instances_unknown_category_and_bad_json(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 99, "iscrowd": 0, "segmentation": [[0, 0, 5, 0, 5, 5]]}]
    with pytest.raises(DataError, match=r"inst\.json.*category_id 99"):
        CocoInstanceDataset(*_write_instances(tmp_path, anns))
    (tmp_path / "inst.json").write_text("{not json")
    with pytest.raises(DataError, match=r"inst\.json.*not valid JSON"):
        CocoInstanceDataset(tmp_path / "images", tmp_path / "inst.json")


def test_describe_dataset_lists_mapping_and_counts(tmp_path):
    pan = np.array([[0, 300, 300], [70000, 70000, 1]])
    segs = [{"id": 300, "category_id": 5, "iscrowd": 0}, {"id": 70000, "category_id": 9, "iscrowd": 0},
            {"id": 1, "category_id": 5, "iscrowd": 1}]
    text = describe_dataset(CocoPanopticDataset(*_write_panoptic(tmp_path, pan, segs)))
    lines = text.splitlines()
    assert "1 images, 2 classes (1 thing, 1 stuff)" in lines[0]
    assert lines[2].split() == ["0", "5", "thing", "cat", "2"]
    assert lines[3].split() == ["1", "9", "stuff", "grass", "1"]


def test_build_dataset_from_omegaconf_with_split_overrides():
    from omegaconf import OmegaConf

    root = shared("ade20k_sample")
    cfg = OmegaConf.create({"format": "semantic_folder", "preset": "ade20k", "root": str(root),
                            "val": {"image_dir": "images", "label_dir": "annotations"}})
    ds = build_dataset(cfg, "val")
    assert len(ds) == 3 and ds.meta.classes[2] == "sky"  # objectInfo150.csv found under root by default
    text = describe_dataset(ds)
    assert "3 images, 150 classes" in text and "classes never seen" in text
    wall = next(line for line in text.splitlines() if " wall " in line)
    assert wall.split() == ["0", "1", "stuff", "wall", "3"]  # wall occurs in all three images
    with pytest.raises(DataError, match=r"images/training.*does not exist"):
        build_dataset(cfg, "train")  # ADE20K's own split folder name


def test_binary_masks_preset_and_the_0_255_warning(tmp_path):
    """0/255 (or 0/1) masks: the binary preset reads 255 and 1 as foreground; without it, a label PNG of only
    0 and 255 would have its foreground ignored, which is warned about once."""
    import warnings

    from omniseg.data.formats import SemanticFolderDataset

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    mask = np.zeros((8, 10), np.uint8)
    mask[2:6, 3:8] = 255
    for i, values in enumerate((mask, (mask > 0).astype(np.uint8))):
        Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(images / f"{i}.png")
        Image.fromarray(values).save(labels / f"{i}.png")
    binary = SemanticFolderDataset(images, labels, preset="binary")
    assert binary.meta.classes == ["background", "foreground"]
    for i in range(2):
        assert binary[i]["sem_seg"].tolist() == (mask > 0).astype(np.int64).tolist()
    assert SemanticFolderDataset(images, labels, ["sea", "ship"], preset="binary").meta.classes == ["sea", "ship"]
    plain = SemanticFolderDataset(images, labels, ["background", "foreground"])
    with pytest.warns(UserWarning, match=r"0\.png: this label PNG holds only 0 and 255.*preset: binary"):
        assert int((plain[0]["sem_seg"] == 255).sum()) == 20  # the foreground is ignored, as warned
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain[0]  # once per dataset
