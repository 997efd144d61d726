"""Transforms keep every annotation aligned with the image; targets, collate and loaders."""

from __future__ import annotations

import pytest
import torch

from omniseg.data import (
    Batch,
    DataError,
    build_transforms,
    collate,
    mask_targets,
    semantic_from_panoptic,
)
from omniseg.data.targets import boxes_from_masks, instances_from_panoptic

# Ten well-separated colours: the label of a pixel can be read back from its colour.
PALETTE = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 0, 0], [255, 255, 0], [255, 0, 255], [0, 255, 255],
                        [255, 255, 255], [128, 0, 0], [0, 128, 0], [0, 0, 128]], dtype=torch.uint8)


pytestmark = pytest.mark.usefixtures("single_thread")  # small per-image ops: thread start-up dominates


def colour_coded_sample(h=48, w=64, block=16, seed=0) -> dict:
    """Blocks of random classes; the image colour encodes the class; pan/instances follow the classes."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 10, ((h + block - 1) // block, (w + block - 1) // block), generator=g)
    sem = coarse.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w].contiguous()
    pan = sem * 1000 + 1000  # one segment per class, id = 1000 * (class + 1)
    classes = sem.unique().tolist()
    infos = [{"id": 1000 * (c + 1), "category": c, "isthing": c < 5, "iscrowd": False} for c in classes]
    return {
        "image": PALETTE[sem].permute(2, 0, 1).contiguous(),
        "file_name": "coded.png", "image_id": seed, "height": h, "width": w,
        "sem_seg": sem, "pan_seg": pan, "segments_info": infos,
        "instances": instances_from_panoptic(pan, infos),
    }


def decode_labels(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest palette entry per pixel, and its colour distance."""
    d = (image.permute(1, 2, 0).float()[:, :, None, :] - PALETTE.float()[None, None]).abs().amax(-1)
    dist, label = d.min(-1)
    return label, dist


def interior(label_map: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Pixels whose (2r+1)^2 neighbourhood carries a single label (safe from resampling blur)."""
    x = label_map.float()[None, None]
    k = 2 * radius + 1
    hi = torch.nn.functional.max_pool2d(x, k, 1, radius)
    lo = -torch.nn.functional.max_pool2d(-x, k, 1, radius)
    return (hi == lo)[0, 0]


def test_train_transform_keeps_every_annotation_aligned():
    tf = build_transforms(True, size=40, scale_range=(0.5, 1.8), photometric=False)
    padded_seen = flipped_or_cropped = 0
    for seed in range(12):
        sample = colour_coded_sample(seed=seed)
        torch.manual_seed(seed)
        out = tf(sample)
        img, sem, pan = out["image"], out["sem_seg"], out["pan_seg"]
        assert img.shape == (3, 40, 40) and sem.shape == pan.shape == (40, 40)
        assert (out["height"], out["width"]) == (40, 40)
        pad = sem == 255
        padded_seen += int(pad.any())
        # Padding: black image, void panoptic id.
        assert (img[:, pad] == 0).all() and (pan[pad] == 0).all()
        # Image colour and every label map agree at interior pixels.
        label, dist = decode_labels(img)
        inner = interior(torch.where(pad, torch.tensor(-1), sem)) & ~pad
        assert inner.sum() >= 10
        assert (dist[inner] <= 2).all()
        assert torch.equal(label[inner], sem[inner])
        assert torch.equal(pan[~pad], sem[~pad] * 1000 + 1000)
        # Instances: one mask per thing class still visible, exactly that class's pixels.
        inst = out["instances"]
        visible_things = sorted(c for c in sem[~pad].unique().tolist() if c < 5)
        assert sorted(inst["labels"].tolist()) == visible_things
        for m, c in zip(inst["masks"], inst["labels"].tolist()):
            assert torch.equal(m, sem == c)
        assert torch.equal(inst["boxes"], boxes_from_masks(inst["masks"]))
        assert {s["id"] for s in out["segments_info"]} == set(pan.unique().tolist()) - {0}
        flipped_or_cropped += int(not torch.equal(label[inner], sample["sem_seg"][:40, :40][inner]))
    assert padded_seen >= 2 and flipped_or_cropped >= 6


def test_hflip_moves_boxes():
    masks = torch.zeros(1, 10, 20, dtype=torch.bool)
    masks[0, 3:8, 2:10] = True
    sample = {"image": torch.zeros(3, 10, 20, dtype=torch.uint8), "file_name": "f", "image_id": 0,
              "height": 10, "width": 20,
              "instances": {"masks": masks, "labels": torch.tensor([4]), "boxes": torch.tensor([[2.0, 3, 10, 8]]),
                            "iscrowd": torch.tensor([False])}}
    sample["image"][0, 3:8, 2:10] = 200
    tf = build_transforms(True, size=None, photometric=False)
    results = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out = tf(sample)
        box = out["instances"]["boxes"][0].tolist()
        results.add(tuple(box))
        if box == [10.0, 3.0, 18.0, 8.0]:  # flipped: x -> 20 - x
            assert (out["image"][0, 3:8, 10:18] == 200).all() and out["instances"]["masks"][0, 3:8, 10:18].all()
    assert results == {(2.0, 3.0, 10.0, 8.0), (10.0, 3.0, 18.0, 8.0)}


def test_instances_cropped_away_are_removed():
    # A 4x4 instance in the corner of a 32x32 image; 2x upscale then a random 32x32 crop of the 64x64.
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :4, :4] = True
    masks[1, 8:24, 8:24] = True
    sample = {"image": torch.zeros(3, 32, 32, dtype=torch.uint8), "file_name": "f", "image_id": 0,
              "height": 32, "width": 32,
              "instances": {"masks": masks, "labels": torch.tensor([1, 2]), "boxes": boxes_from_masks(masks),
                            "iscrowd": torch.tensor([False, True])}}
    tf = build_transforms(True, size=32, scale_range=(2.0, 2.0), hflip=False, photometric=False)
    counts = set()
    for seed in range(20):
        torch.manual_seed(seed)
        inst = tf(sample)["instances"]
        n = len(inst["labels"])
        counts.add(n)
        assert inst["masks"].shape[0] == inst["boxes"].shape[0] == inst["iscrowd"].shape[0] == n
        assert inst["masks"].flatten(1).any(1).all()
        # The big instance (label 2, crowd) is always kept; its flag follows it.
        assert inst["labels"][-1] == 2 and bool(inst["iscrowd"][-1])
        assert torch.equal(inst["boxes"], boxes_from_masks(inst["masks"]))
    assert counts == {1, 2}


def test_eval_transform_resizes_only_the_image():
    sample = colour_coded_sample(h=48, w=64)
    out = build_transforms(False, min_size_test=24)(sample)
    assert out["image"].shape == (3, 24, 32)
    assert (out["height"], out["width"]) == (48, 64)
    assert out["sem_seg"] is sample["sem_seg"] and out["pan_seg"] is sample["pan_seg"]
    assert build_transforms(False)(sample)["image"] is sample["image"]


def test_photometric_changes_only_the_image():
    sample = colour_coded_sample()
    tf = build_transforms(True, size=None, hflip=False, photometric=True)
    changed = 0
    for seed in range(5):
        torch.manual_seed(seed)
        out = tf(sample)
        changed += int(not torch.equal(out["image"], sample["image"]))
        assert torch.equal(out["sem_seg"], sample["sem_seg"])
    assert changed >= 3


# --------------------------------------------------------------------------- targets


def tiny_panoptic() -> dict:
    pan = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 0, 4], [3, 3, 4, 4]])
    infos = [{"id": 1, "category": 0, "isthing": True, "iscrowd": False},
             {"id": 2, "category": 0, "isthing": True, "iscrowd": True},
             {"id": 3, "category": 2, "isthing": False, "iscrowd": False},
             {"id": 4, "category": 1, "isthing": True, "iscrowd": False}]
    return {"file_name": "tiny.png", "pan_seg": pan, "segments_info": infos}


def test_semantic_from_panoptic_hand_computed():
    s = tiny_panoptic()
    assert semantic_from_panoptic(s["pan_seg"], s["segments_info"]).tolist() == [
        [0, 0, 255, 255], [0, 0, 255, 255], [2, 2, 255, 1], [2, 2, 1, 1]]


def test_mask_targets_per_task():
    s = tiny_panoptic()
    pan = s["pan_seg"]
    sem = mask_targets(s, "semantic")
    assert sem["labels"].tolist() == [0, 1, 2]
    assert torch.equal(sem["masks"][0], pan == 1) and torch.equal(sem["masks"][1], pan == 4)
    inst = mask_targets(s, "instance")
    assert inst["labels"].tolist() == [0, 1]
    assert torch.equal(inst["masks"], torch.stack([pan == 1, pan == 4]))
    panoptic = mask_targets(s, "panoptic")
    assert panoptic["labels"].tolist() == [0, 2, 1]
    assert torch.equal(panoptic["masks"], torch.stack([pan == 1, pan == 3, pan == 4]))
    assert panoptic["masks"].dtype == torch.bool and panoptic["labels"].dtype == torch.int64

    # Without pan_seg: instances for the instance task, sem_seg for the semantic task.
    derived = {"file_name": "x", "instances": instances_from_panoptic(pan, s["segments_info"]),
               "sem_seg": semantic_from_panoptic(pan, s["segments_info"])}
    assert torch.equal(mask_targets(derived, "instance")["masks"], inst["masks"])
    assert torch.equal(mask_targets(derived, "semantic")["masks"], sem["masks"])
    combined = mask_targets(derived, "panoptic", stuff_classes=[2])
    assert combined["labels"].tolist() == [0, 1, 2]
    only_sem = {"file_name": "x", "sem_seg": derived["sem_seg"]}
    assert mask_targets(only_sem, "semantic")["labels"].tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="no annotation"):
        mask_targets(only_sem, "instance")


def test_mask_targets_drop_segments_cropped_away():
    s = tiny_panoptic()
    s["pan_seg"] = torch.where(s["pan_seg"] == 4, torch.tensor(0), s["pan_seg"])
    assert mask_targets(s, "instance")["labels"].tolist() == [0]


# --------------------------------------------------------------------------- collate and loaders


def test_collate_pads_to_size_divisibility():
    a = torch.full((3, 30, 40), 7, dtype=torch.uint8)
    b = torch.full((3, 50, 20), 9, dtype=torch.uint8)
    batch = collate([{"image": a}, {"image": b}], size_divisibility=32)
    assert batch.images.shape == (2, 3, 64, 64) and batch.images.dtype == torch.uint8
    assert batch.image_sizes == [(30, 40), (50, 20)]
    assert (batch.images[0, :, :30, :40] == 7).all() and batch.images[0, :, 30:].sum() == 0
    assert batch.images[0, :, :, 40:].sum() == 0
    assert (batch.images[1, :, :50, :20] == 9).all() and batch.images[1, :, :, 20:].sum() == 0
    assert collate([{"image": a}, {"image": b}], size_divisibility=1).images.shape == (2, 3, 50, 40)
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and len(moved) == 2


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, n):
        self.samples = [colour_coded_sample(h=20, w=24, block=4, seed=i) for i in range(n)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return dict(self.samples[i])


def test_batch_sampler_is_a_pure_function_of_seed_and_batch_index():
    from omniseg.data.sampling import ResumableBatchSampler

    s = ResumableBatchSampler(10, 3, seed=5)
    stream = iter(s)
    first = [next(stream) for _ in range(6)]  # 3 batches per epoch: crosses into epoch 1
    assert first == [s.batch(k) for k in range(6)]
    resumed = iter(ResumableBatchSampler(10, 3, seed=5, start_batch=4))
    assert next(resumed) == first[4]  # resuming needs nothing but the batch index
    epoch0 = [i for b in first[:3] for i, _ in b]
    assert len(set(epoch0)) == 9 and epoch0 != sorted(epoch0)  # a permutation, last partial batch dropped
    assert [i for b in first[3:] for i, _ in b] != epoch0  # a new permutation per epoch
    assert ResumableBatchSampler(10, 3, seed=6).batch(0) != first[0]
    seeds = [seed for b in first for _, seed in b]
    assert len(set(seeds)) == len(seeds)  # every sample draw gets its own augmentation seed
    ranks = [ResumableBatchSampler(10, 2, seed=5, rank=r, world_size=2).batch(0) for r in range(2)]
    assert sorted(i for b in ranks for i, _ in b) == sorted(ResumableBatchSampler(10, 4, seed=5).batch(0)[k][0]
                                                             for k in range(4))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(3, 2, world_size=2)


def test_training_set_augmentation_depends_only_on_the_sample_seed():
    from omniseg.data.training import TrainingSet

    ds = _ListDataset(2)
    ts = TrainingSet(ds, build_transforms(True, size=16, scale_range=(0.5, 1.5)), "panoptic")
    torch.manual_seed(0)
    x = ts[(1, 77)]
    torch.manual_seed(123)  # the global RNG state must not matter ...
    state = torch.get_rng_state()
    y = ts[(1, 77)]
    assert torch.equal(torch.get_rng_state(), state)  # ... nor be disturbed
    assert torch.equal(x["image"], y["image"]) and torch.equal(x["targets"]["masks"], y["targets"]["masks"])
    assert not torch.equal(x["image"], ts[(1, 78)]["image"])
    batch = collate([ts[(0, 1)], ts[(1, 2)]], size_divisibility=32)
    assert batch.images.shape == (2, 3, 32, 32)
