"""The synthetic dataset: deterministic, consistent across its three on-disk formats, hard enough."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from omniseg.data import (
    CocoInstanceDataset,
    CocoPanopticDataset,
    DataError,
    SemanticFolderDataset,
    build_dataset,
    synthetic_meta,
)
from omniseg.data import synthetic
from omniseg.data.synthetic import generate, synthetic_paths


pytestmark = pytest.mark.usefixtures("single_thread")  # small per-image ops: thread start-up dominates


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth") / "ds", num_train=12, num_val=4, image_size=64, seed=3)


def _read_all(root, split="train"):
    p = synthetic_paths(root, split)
    meta = synthetic_meta()
    pan = CocoPanopticDataset(p["image_dir"], p["panoptic_json"], p["panoptic_png_dir"])
    inst = CocoInstanceDataset(p["image_dir"], p["instances_json"])
    sem = SemanticFolderDataset(p["image_dir"], p["semantic_dir"], classes=meta.classes)
    return pan, inst, sem


def test_layout_and_classes(small):
    for split, n in (("train", 12), ("val", 4)):
        p = synthetic_paths(small, split)
        assert len(list(p["image_dir"].glob("*.png"))) == n
        assert len(list(p["panoptic_png_dir"].glob("*.png"))) == n
        assert len(list(p["semantic_dir"].glob("*.png"))) == n
    meta = synthetic_meta()
    assert len(meta.thing_ids) >= 4 and len(meta.stuff_ids) >= 2
    assert json.loads((small / "meta.json").read_text()) == meta.to_dict()
    cats = json.loads(synthetic_paths(small, "train")["panoptic_json"].read_text())["categories"]
    assert [c["id"] for c in cats] == meta.dataset_ids and all("color" in c and "isthing" in c for c in cats)


def test_three_readers_agree(small):
    pan, inst, sem = _read_all(small)
    assert len(pan) == len(inst) == len(sem) == 12
    assert pan.meta.classes == synthetic_meta().classes
    seen = set()
    for i in range(len(pan)):
        a, b, c = pan[i], inst[i], sem[i]
        assert a["file_name"] == b["file_name"] == c["file_name"]
        assert torch.equal(a["image"], b["image"])
        # The semantic map derived from the panoptic PNG is the written semantic PNG.
        assert torch.equal(a["sem_seg"], c["sem_seg"])
        assert not (c["sem_seg"] == 255).any()
        # Instance masks and labels from the instance JSON equal those from the panoptic PNG.
        assert torch.equal(a["instances"]["masks"], b["instances"]["masks"])
        assert torch.equal(a["instances"]["labels"], b["instances"]["labels"])
        assert torch.equal(a["instances"]["boxes"], b["instances"]["boxes"])
        assert 1 <= len(b["instances"]["labels"]) <= 6
        seen |= set(c["sem_seg"].unique().tolist())
    assert seen == set(range(6))  # every class occurs


def test_deterministic_by_seed(tmp_path, small):
    again = generate(tmp_path / "again", num_train=12, num_val=4, image_size=64, seed=3)
    other = generate(tmp_path / "other", num_train=12, num_val=4, image_size=64, seed=4)
    for rel in ("train/images/000005.png", "annotations/panoptic_train/000005.png", "semantic_val/000002.png",
                "annotations/instances_train.json", "annotations/panoptic_val.json"):
        assert (small / rel).read_bytes() == (again / rel).read_bytes()
    assert (small / "train/images/000005.png").read_bytes() != (other / "train/images/000005.png").read_bytes()


def test_regeneration_is_skipped_unless_parameters_change(tmp_path):
    root = generate(tmp_path / "d", num_train=3, num_val=1, image_size=32, seed=0)
    image = root / "train" / "images" / "000001.png"
    stamp = image.stat().st_mtime_ns
    generate(root, num_train=3, num_val=1, image_size=32, seed=0)
    assert image.stat().st_mtime_ns == stamp
    generate(root, num_train=2, num_val=1, image_size=32, seed=0)
    assert len(list((root / "train" / "images").glob("*.png"))) == 2  # stale files removed
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "precious.txt").write_text("x")
    with pytest.raises(DataError, match="refusing to overwrite"):
        generate(tmp_path / "user", num_train=1, num_val=1, image_size=32)


def test_shapes_overlap_and_occlude():
    size = 64
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    occluded = 0
    for i in range(30):
        _, _, shapes, inst = synthetic._render_scene(np.random.default_rng(i), size, xx, yy)
        for j, (_, full) in enumerate(shapes):
            visible = inst == j + 1
            assert (visible <= full).all()
            later = np.zeros_like(full)
            for _, m in shapes[j + 1:]:
                later |= m
            # Painter's order: what is visible is the shape minus everything drawn after it.
            assert np.array_equal(visible, full & ~later)
            assert visible.sum() >= 8
            occluded += int((full & later).any())
    assert occluded >= 10


def test_colour_does_not_identify_the_class():
    size = 48
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    sums = np.zeros((6, 3))
    counts = np.zeros(6)
    for i in range(120):
        image, stuff, shapes, inst = synthetic._render_scene(np.random.default_rng(1000 + i), size, xx, yy)
        sem = np.where(inst > 0, 0, stuff + 4)
        for j, (kind, _) in enumerate(shapes):
            sem[inst == j + 1] = kind
        for c in range(6):
            # Per-instance mean colour (each instance/region counts once).
            if (sem == c).any():
                sums[c] += image[sem == c].mean(0)
                counts[c] += 1
    means = sums / counts[:, None]
    assert (counts > 20).all()
    assert np.abs(means - 127.5).max() < 25, means


def test_build_dataset_generates_and_attaches_views(tmp_path):
    cfg = {"format": "synthetic", "root": str(tmp_path / "gen"), "num_train": 4, "num_val": 2, "image_size": 32}
    train = build_dataset(cfg, "train")
    val = build_dataset(cfg, "val")
    assert isinstance(train, CocoPanopticDataset) and len(train) == 4 and len(val) == 2
    assert set(train.views) == {"panoptic", "instance", "semantic"}
    assert isinstance(train.views["semantic"], SemanticFolderDataset)
    assert build_dataset({**cfg, "view": "instance"}, "val").meta.num_classes == 4
    assert train[0]["image"].shape == (3, 32, 32)
    # an existing dataset is read as it is, even when the config would generate a different one
    before = (tmp_path / "gen" / "manifest.json").read_text()
    other = build_dataset({**cfg, "num_train": 7, "image_size": 48}, "train")
    assert len(other) == 4 and other[0]["image"].shape == (3, 32, 32)
    assert (tmp_path / "gen" / "manifest.json").read_text() == before


def test_generation_is_fast(tmp_path):
    start = time.perf_counter()
    generate(tmp_path / "fast", num_train=80, num_val=20, image_size=128, seed=1)
    assert time.perf_counter() - start < 10.0  # ~1 s on an idle 2-core CPU
