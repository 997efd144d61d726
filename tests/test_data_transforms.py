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


# --------------------------------------------------------------------------- official training pipelines


def assert_aligned(out: dict) -> None:
    """Image colour, sem_seg, pan_seg and instances of a transformed colour-coded sample agree."""
    img, sem, pan = out["image"], out["sem_seg"], out["pan_seg"]
    pad = sem == 255
    assert (img[:, pad] == 0).all() and (pan[pad] == 0).all()
    label, dist = decode_labels(img)
    inner = interior(torch.where(pad, torch.tensor(-1), sem)) & ~pad
    inner[[0, -1], :] = inner[:, [0, -1]] = False  # a crop edge may cut a resampled (blended) boundary
    assert inner.sum() >= 10 and (dist[inner] <= 2).all() and torch.equal(label[inner], sem[inner])
    assert torch.equal(pan[~pad], sem[~pad] * 1000 + 1000)
    inst = out["instances"]
    assert sorted(inst["labels"].tolist()) == sorted(c for c in sem[~pad].unique().tolist() if c < 5)
    for m, c in zip(inst["masks"], inst["labels"].tolist()):
        assert torch.equal(m, sem == c)


@pytest.mark.parametrize("train_resize, extra, expect", [
    # detectron2 ResizeShortestEdge(choice of 32 / 40, max 60) + a 24x28 crop, no padding: 48x64 -> 32x43 or 40x53
    ("shortest_edge", dict(short_edge=(32, 40), max_size=60), {(24, 28)}),
    # MMSeg RandomResize((60, 20) x [1, 2]) + RandomCrop + pad to the crop
    ("ratio_range", dict(resize_scale=(60, 20), scale_range=(1.0, 2.0)), {(24, 28)}),
])
def test_official_pipelines_keep_annotations_aligned(train_resize, extra, expect):
    scale_range = extra.pop("scale_range", (0.1, 2.0))
    tf = build_transforms(True, size=(24, 28), scale_range=scale_range, photometric=False,
                          train_resize=train_resize, **extra)
    shapes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out = tf(colour_coded_sample(seed=seed))
        shapes.add(tuple(out["image"].shape[-2:]))
        assert out["sem_seg"].shape == out["image"].shape[-2:]
        assert_aligned(out)
    assert shapes == expect


def test_resize_shortest_edge_sizes_as_detectron2():
    from omniseg.data.transforms import ResizeShortestEdge

    # detectron2's get_output_shape: the short side to the size, the long side bounded, each rounded.
    assert ResizeShortestEdge([800], max_size=1333).output_size(480, 640) == (800, 1067)
    assert ResizeShortestEdge([800], max_size=1333).output_size(640, 480) == (1067, 800)
    assert ResizeShortestEdge([800], max_size=1333).output_size(300, 1000) == (400, 1333)  # 800x2667 capped
    drawn = set()
    tf = ResizeShortestEdge([10, 13], sampling="range", max_size=1000)
    for seed in range(60):
        torch.manual_seed(seed)
        drawn.add(tf.output_size(20, 30)[0])
    assert drawn == {10, 11, 12, 13}
    with pytest.raises(ValueError, match="short_edge_sampling=range"):
        ResizeShortestEdge([10, 11, 12], sampling="range")


def test_ratio_range_resize_matches_mmseg():
    from helpers.mmseg_reference import mmseg

    mmseg()
    import numpy as np
    from mmcv.transforms import RandomResize  # what MMSeg configs name as RandomResize

    from omniseg.data.transforms import RatioRangeResize

    for h, w in [(480, 640), (1024, 2048), (375, 500), (512, 300)]:
        for ratio in (0.5, 0.75, 1.25, 2.0):
            ref = RandomResize(scale=(2048, 512), ratio_range=(ratio, ratio), keep_ratio=True)
            out = ref.transform({"img": np.zeros((h, w, 3), np.uint8)})["img"]
            assert RatioRangeResize((2048, 512), (ratio, ratio)).output_size(h, w) == out.shape[:2], (h, w, ratio)


def test_category_area_crop_avoids_a_dominant_class():
    from torchvision import tv_tensors

    from omniseg.data.transforms import CategoryAreaCrop

    # Class 1 fills the image but for a 6x6 patch of class 2 (shifted labels: 0 = ignore, never counted).
    labels = torch.ones(32, 32, dtype=torch.int64)
    labels[18:24, 18:24] = 2
    labels[:, :2] = 0

    def meets_rule(window: torch.Tensor) -> bool:
        counts = torch.stack([(window == c).sum() for c in (1, 2)])
        return bool((counts > 0).all()) and counts.max().item() < 0.75 * counts.sum().item()

    # The share of the 25 x 25 possible 8x8 windows that meet the rule; ten tries meet it 1 - (1 - p)^10.
    p = sum(meets_rule(labels[y:y + 8, x:x + 8]) for y in range(25) for x in range(25)) / 625
    assert 0.03 < p < 0.1
    payload = {"image": tv_tensors.Image(torch.zeros(3, 32, 32, dtype=torch.uint8)), "sem_seg": tv_tensors.Mask(labels)}
    rates = {}
    for ratio in (0.75, 1.0):
        crop, hits = CategoryAreaCrop((8, 8), cat_max_ratio=ratio), 0
        for seed in range(200):
            torch.manual_seed(seed)
            out = crop(payload)["sem_seg"].as_subclass(torch.Tensor)
            assert out.shape == (8, 8)
            hits += meets_rule(out)
        rates[ratio] = hits / 200
    expected = 1 - (1 - p) ** 10
    assert abs(rates[1.0] - p) < 0.05 and abs(rates[0.75] - expected) < 0.1, (p, expected, rates)
    with pytest.raises(ValueError, match="semantic or panoptic labels"):
        CategoryAreaCrop((8, 8), cat_max_ratio=0.75)({"image": payload["image"]})


def test_category_crop_reads_panoptic_categories():
    tf = build_transforms(True, size=16, photometric=False, hflip=False, train_resize="shortest_edge",
                          short_edge=(48,), max_size=1000, cat_max_ratio=0.5)
    sample = colour_coded_sample(seed=3)
    sample.pop("sem_seg")
    torch.manual_seed(0)
    out = tf(sample)
    assert out["pan_seg"].shape == (16, 16) and "_categories" not in out


def test_cat_max_ratio_needs_a_crop_and_a_constrained_resize():
    with pytest.raises(ValueError, match="set data.crop_size"):
        build_transforms(True, size=None, train_resize="ratio_range", cat_max_ratio=0.75)
    with pytest.raises(ValueError, match="scale_jitter"):
        build_transforms(True, size=32, cat_max_ratio=0.75)
    with pytest.raises(ValueError, match="train_resize"):
        build_transforms(True, size=32, train_resize="lsj")


def test_rgb_hsv_as_opencv():
    cv2 = pytest.importorskip("cv2", reason="OpenCV (installed with the mmcv-lite test extra) is the reference")
    import numpy as np

    from omniseg.data.transforms import hsv_uint8_to_rgb, rgb_to_hsv_uint8

    image = torch.randint(0, 256, (3, 29, 41), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    image[:, 0, :6] = torch.tensor([[0, 0, 0], [255, 255, 255], [7, 7, 7], [255, 0, 0], [0, 255, 0], [0, 0, 255]]).T
    ref = cv2.cvtColor(image.permute(1, 2, 0).numpy(), cv2.COLOR_RGB2HSV)
    assert np.array_equal(rgb_to_hsv_uint8(image).permute(1, 2, 0).numpy(), ref)  # fixed-point: exact
    back = cv2.cvtColor(ref, cv2.COLOR_HSV2RGB).astype(int)
    ours = hsv_uint8_to_rgb(torch.from_numpy(ref).permute(2, 0, 1)).permute(1, 2, 0).numpy().astype(int)
    assert np.abs(back - ours).max() <= 1


@pytest.mark.parametrize("params", [
    dict(brightness=12.7, contrast_first=True, contrast=1.3, saturation=0.7, hue=-11),
    dict(brightness=None, contrast_first=False, contrast=0.6, saturation=1.4, hue=17),
    dict(brightness=-30.2, contrast_first=True, contrast=None, saturation=None, hue=5),
    dict(brightness=None, contrast_first=False, contrast=None, saturation=None, hue=None),
])
def test_photometric_distortion_matches_mmseg(params, monkeypatch):
    """MMSeg's PhotoMetricDistortion with its random draws fixed to `params` gives our result."""
    from helpers.mmseg_reference import mmseg

    mmseg()
    from mmseg.datasets.transforms import transforms as mmseg_transforms

    from omniseg.data.transforms import PhotoMetricDistortion

    draws = [1, params["brightness"]] if params["brightness"] is not None else [0]
    draws.append(1 if params["contrast_first"] else 0)  # MMSeg: mode 1 -> contrast before saturation and hue
    contrast = [1, params["contrast"]] if params["contrast"] is not None else [0]
    draws += contrast if params["contrast_first"] else []
    draws += [1, params["saturation"]] if params["saturation"] is not None else [0]
    draws += [1, params["hue"]] if params["hue"] is not None else [0]
    draws += [] if params["contrast_first"] else contrast

    class FixedDraws:
        def randint(self, *args):
            return draws.pop(0)

        uniform = randint

    monkeypatch.setattr(mmseg_transforms, "random", FixedDraws())
    image = torch.randint(0, 256, (3, 37, 53), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    bgr = image.flip(0).permute(1, 2, 0).numpy().copy()
    ref = torch.from_numpy(mmseg_transforms.PhotoMetricDistortion().transform({"img": bgr})["img"])
    ref = ref.permute(2, 0, 1).flip(0)
    ours = PhotoMetricDistortion.apply(image, params)
    assert not draws
    diff = (ref.int() - ours.int()).abs()
    # Brightness, contrast and RGB -> HSV are exact; OpenCV's HSV -> RGB differs by one level now and then.
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.005


def test_photometric_distortion_draws_and_ranges():
    from omniseg.data.transforms import PhotoMetricDistortion

    pmd = PhotoMetricDistortion()
    seen = {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0, "contrast_first": 0}
    for seed in range(200):
        torch.manual_seed(seed)
        p = pmd.draw()
        for k in seen:
            seen[k] += int(p[k] not in (None, False))
        assert p["brightness"] is None or -32 <= p["brightness"] <= 32
        assert p["contrast"] is None or 0.5 <= p["contrast"] <= 1.5
        assert p["hue"] is None or -18 <= p["hue"] < 18
    assert all(70 <= n <= 130 for n in seen.values()), seen  # each a fair coin
    with pytest.raises(TypeError, match="uint8"):
        pmd(torch.zeros(3, 4, 4))


def test_eval_transform_bounds_the_long_side():
    sample = colour_coded_sample(h=48, w=160)
    out = build_transforms(False, min_size_test=24, max_size_test=64)(sample)
    assert out["image"].shape == (3, 19, 64)  # 24 x 80 would exceed 64: the long side sets the scale
    with pytest.raises(ValueError, match="min_size_test"):
        build_transforms(False, max_size_test=64)


def test_training_data_follows_the_config(tmp_path):
    from omniseg.config import load_config
    from omniseg.data.training import build_training_data
    from omniseg.data.transforms import CategoryAreaCrop, PhotoMetricDistortion, RatioRangeResize

    cfg = load_config("mask2former_demo", ["data.train_resize=ratio_range", "data.resize_scale=[256,64]",
                                           "data.scale_range=[0.5,2.0]", "data.crop_size=[48,64]",
                                           "data.cat_max_ratio=0.75", "data.photometric_style=distortion"])
    train_set, _ = build_training_data(cfg, [None] * cfg.data.batch_size)  # the transforms, not the samples
    steps = train_set.transforms.steps
    assert isinstance(steps[0], RatioRangeResize) and steps[0].scale == (256, 64)
    assert isinstance(steps[1], CategoryAreaCrop) and steps[1].size == (48, 64) and steps[1].cat_max_ratio == 0.75
    assert isinstance(train_set.transforms.photometric, PhotoMetricDistortion)
