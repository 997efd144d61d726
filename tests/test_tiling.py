"""Tiled inference (omniseg.tiling): tile layout, semantic blending, objects cut by tile borders coming out whole,
duplicates in overlaps removed, panoptic assembly, CroppedMasks against dense masks, Predictor and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from scipy import ndimage

from omniseg.evaluation.instance import encode_masks
from omniseg.masks import CroppedMasks, combine_panoptic, mask_crops
from omniseg.models.base import Segmenter
from omniseg.tiling import TileSettings, merge_tile_instances, predict_tiled, tile_starts, _TileInstances

# Class colours of the scenes below: 0 background (stuff), 1 road (stuff), 2 car and 3 house (things).
COLORS = torch.tensor([[0, 0, 0], [90, 90, 90], [200, 30, 30], [30, 30, 200]], dtype=torch.int64)


class ColourOracle(Segmenter):
    """Reads each pixel's class from its colour and each thing as a connected region of its colour, inside
    whatever image (tile) it is given: a model that is exact on whole images, so tiling is all that can
    change its output. Scores vary with the pixel so that blending has something to average."""

    tasks = ("semantic", "instance", "panoptic")

    def __init__(self):
        super().__init__({"arch": "colour_oracle"}, num_classes=4, thing_ids=[2, 3])

    def losses(self, images, targets):
        raise NotImplementedError

    def infer(self, images, image_sizes, output_sizes, tasks, *, return_raw=False, semantic_scores=False):
        results = []
        for image, (h, w) in zip(images, image_sizes):
            rgb = image[:, :h, :w].long()
            label = (rgb[None] == COLORS[:, :, None, None]).all(1).float().argmax(0)
            result = {}
            if "semantic" in tasks:
                result["semantic"] = label
                if semantic_scores:
                    result["semantic_scores"] = torch.nn.functional.one_hot(label, 4).permute(2, 0, 1).float() * 0.9
            if "instance" in tasks:
                masks, labels = [], []
                for c in self.thing_ids:
                    regions, count = ndimage.label((label == c).numpy())
                    for k in range(1, count + 1):
                        masks.append(torch.from_numpy(regions == k))
                        labels.append(c)
                masks = torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.bool)
                from omniseg.masks import boxes_from_masks

                result["instances"] = {"masks": masks, "labels": torch.tensor(labels, dtype=torch.int64),
                                       "scores": torch.full((len(labels),), 0.9), "boxes": boxes_from_masks(masks)}
            results.append(result)
        return results


def scene(height: int, width: int, objects: list[tuple[int, int, int, int, int]]) -> torch.Tensor:
    """uint8 [3,H,W]: a road band on background, then rectangles (class, y0, x0, y1, x1)."""
    label = torch.zeros((height, width), dtype=torch.int64)
    label[height // 2 - 8:height // 2 + 8] = 1
    for c, y0, x0, y1, x1 in objects:
        label[y0:y1, x0:x1] = c
    return COLORS[label].permute(2, 0, 1).to(torch.uint8)


OBJECTS = [  # with 64 px tiles overlapping by 16, tiles start at 0, 48, 96 and 136
    (2, 50, 30, 80, 150),     # crosses three column borders
    (3, 90, 100, 190, 120),   # crosses row and column borders: six tiles
    (2, 10, 50, 20, 60),      # lies inside the overlap of two tiles: seen whole twice
    (2, 150, 10, 170, 30),    # one column of tiles
    (3, 20, 160, 40, 190),    # in the last column
]


def test_tile_starts_cover_the_image_with_at_least_the_overlap():
    assert tile_starts(100, 128, 32) == [0]
    assert tile_starts(200, 64, 16) == [0, 48, 96, 136]
    for length, size, overlap in [(1000, 256, 64), (513, 128, 0), (300, 100, 99)]:
        starts = tile_starts(length, size, overlap)
        assert starts[0] == 0 and starts[-1] + size == length
        assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError, match="overlap < size"):
        TileSettings(size=64, overlap=64)


def test_objects_cut_by_tile_borders_come_out_whole_and_once():
    image = scene(200, 200, OBJECTS)
    model = ColourOracle().eval()
    whole = model.predict(image[None], [(200, 200)])[0]
    for size, overlap in [(64, 16), (96, 24), (200, 0)]:
        tiled = predict_tiled(model, image, ("semantic", "instance", "panoptic"), TileSettings(size=size, overlap=overlap, stuff_area=100))
        assert torch.equal(tiled["semantic"], whole["semantic"])
        got = tiled["instances"]
        assert len(got["masks"]) == len(OBJECTS), (size, overlap)
        want = {(c, y0, x0, y1, x1) for c, y0, x0, y1, x1 in OBJECTS}
        found = set()
        for mask, label, box in zip(got["masks"].dense(), got["labels"].tolist(), got["boxes"].tolist()):
            ys, xs = mask.nonzero(as_tuple=True)
            rect = (label, int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
            assert int(mask.sum()) == (rect[3] - rect[1]) * (rect[4] - rect[2])  # the whole rectangle, no hole
            assert box == [rect[2], rect[1], rect[4], rect[3]]
            found.add(rect)
        assert found == want
        # Panoptic: one segment per object and one per stuff class, covering the image as the scene does.
        pan = tiled["panoptic"]
        assert sorted((s["category"], s["isthing"]) for s in pan["segments_info"]) == sorted(
            [(c, True) for c, *_ in OBJECTS] + [(0, False), (1, False)])
        ids = {s["id"]: s["category"] for s in pan["segments_info"]}
        category_map = torch.tensor([0, *[ids[i] for i in sorted(ids)]])[pan["segment_map"]]
        assert torch.equal(category_map, whole["semantic"])
        assert all(s["score"] == pytest.approx(0.9) for s in pan["segments_info"])


def test_overlapping_tiles_are_required_to_join_instances():
    with pytest.raises(ValueError, match="overlap > 0"):
        predict_tiled(ColourOracle().eval(), scene(100, 100, []), ("instance",), TileSettings(size=64, overlap=0))


def test_semantic_blend_is_the_mean_of_the_overlapping_tiles_scores():
    """Each tile adds scores that depend on the tile; the stitched argmax must be that of their mean."""

    class TileBiased(ColourOracle):
        tasks = ("semantic",)

        def infer(self, images, image_sizes, output_sizes, tasks, *, return_raw=False, semantic_scores=False):
            out = []
            for image, (h, w) in zip(images, image_sizes):
                g = torch.Generator().manual_seed(int(image.long().sum()))  # a tile's own random scores
                scores = torch.rand((3, h, w), generator=g)
                out.append({"semantic": scores.argmax(0), "semantic_scores": scores})
            return out

    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 255, size=(3, 150, 170), dtype=np.uint8))
    model = TileBiased().eval()
    settings = TileSettings(size=64, overlap=24, batch=3)
    got = predict_tiled(model, image, ("semantic",), settings)["semantic"]
    total, count = torch.zeros((3, 150, 170)), torch.zeros((150, 170))
    for y in tile_starts(150, 64, 24):
        for x in tile_starts(170, 64, 24):
            total[:, y:y + 64, x:x + 64] += model.predict(image[None, :, y:y + 64, x:x + 64], [(64, 64)],
                                                          semantic_scores=True)[0]["semantic_scores"]
            count[y:y + 64, x:x + 64] += 1
    assert torch.equal(got, (total / count).argmax(0))


def test_merge_joins_parts_by_iou_in_the_shared_area_only():
    found = _TileInstances.empty()
    left, right = torch.zeros((1, 40, 60), dtype=torch.bool), torch.zeros((1, 40, 60), dtype=torch.bool)
    left[0, 10:20, 30:60] = True    # tile 0 spans x 0-60: the object runs out of its right edge
    right[0, 10:20, 0:30] = True    # tile 1 spans x 40-100: same object, x 40-70 in the image
    inst = lambda m: {"masks": m, "labels": torch.tensor([2]), "scores": torch.tensor([0.8]),  # noqa: E731
                      "boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]])}
    found.add(0, 0, 0, inst(left), 0.05)
    found.add(1, 0, 40, inst(right), 0.05)
    merged = merge_tile_instances(found, [(0, 0, 40, 60), (0, 40, 40, 100)], (40, 100), 0.5)
    assert len(merged["masks"]) == 1
    assert torch.equal(merged["masks"].dense()[0].nonzero()[:, 1].unique(), torch.arange(30, 70))
    # Parts that overlap in the shared area by less than the IoU threshold stay apart.
    found.crops[1] = found.crops[1][:, :5]  # now x 40-45 only: IoU in the shared x 40-60 is 5 / 20
    assert len(merge_tile_instances(found, [(0, 0, 40, 60), (0, 40, 40, 100)], (40, 100), 0.5)["masks"]) == 2
    assert len(merge_tile_instances(found, [(0, 0, 40, 60), (0, 40, 40, 100)], (40, 100), 0.2)["masks"]) == 1


def test_panoptic_alone_drops_low_scoring_tile_instances_before_merging():
    class LowScores(ColourOracle):
        def infer(self, *args, **kwargs):
            results = super().infer(*args, **kwargs)
            for r in results:
                if "instances" in r:
                    r["instances"]["scores"] = torch.full_like(r["instances"]["scores"], 0.3)
            return results

    image = scene(200, 200, OBJECTS)
    settings = TileSettings(size=64, overlap=16)
    assert len(predict_tiled(LowScores(), image, ["instance"], settings)["instances"]["labels"]) == len(OBJECTS)
    panoptic = predict_tiled(LowScores(), image, ["panoptic"], settings)["panoptic"]
    assert not any(s["isthing"] for s in panoptic["segments_info"])  # 0.3 < panoptic_score 0.5


def random_masks(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros((n, height, width), dtype=torch.bool)
    for i in range(n - 1):  # the last one stays empty
        y0, x0 = torch.randint(0, height - 1, (2,), generator=g).tolist()
        y1, x1 = y0 + torch.randint(1, height - y0 + 1, (1,), generator=g).item(), x0 + 5
        masks[i, y0:y1, x0:min(x1, width)] = torch.rand((y1 - y0, min(x1, width) - x0), generator=g) > 0.3
    masks[0] = True  # full
    return masks


def test_cropped_masks_stand_in_for_dense_masks():
    dense = random_masks(7, 23, 31, seed=1)
    cropped = CroppedMasks.from_dense(dense)
    assert cropped.shape == dense.shape and len(cropped) == 7
    assert torch.equal(cropped.dense(), dense)
    assert torch.equal(cropped[3], dense[3])
    assert torch.equal(cropped[torch.tensor([4, 1])].dense(), dense[[4, 1]])
    assert torch.equal(cropped.areas(), dense.flatten(1).sum(1))
    # RLEs built from crops are pycocotools' own, byte for byte.
    assert cropped.rles() == encode_masks(dense)
    assert np.array_equal(mask_utils.decode(cropped.rles()).transpose(2, 0, 1), dense.numpy())
    assert [(c.shape, y, x) for c, y, x in mask_crops(dense)] == [(c.shape, y, x) for c, y, x in mask_crops(cropped)]
    with pytest.raises(ValueError, match="does not fit"):
        CroppedMasks([torch.ones((5, 5), dtype=torch.bool)], [(20, 0)], (23, 31))


def test_writers_and_overlays_take_cropped_masks(tmp_path):
    from omniseg import outputs, visualize
    from omniseg.data.meta import DatasetMeta

    meta = DatasetMeta(classes=["a", "b", "c"], isthing=[True, True, True])
    dense = random_masks(5, 40, 50, seed=2)
    instances = {"masks": dense, "labels": torch.tensor([0, 1, 2, 1, 0]), "scores": torch.tensor([.9, .8, .7, .6, .5]),
                 "boxes": torch.tensor([[0.0, 0.0, 50.0, 40.0]] * 5)}
    cropped = dict(instances, masks=CroppedMasks.from_dense(dense))
    assert outputs.instances_to_coco_json(3, cropped, meta) == outputs.instances_to_coco_json(3, instances, meta)
    assert outputs.yolo_seg_text(cropped, 50, 40) == outputs.yolo_seg_text(instances, 50, 40)
    assert outputs.labelme_json(cropped, meta, "x.png", 50, 40) == outputs.labelme_json(instances, meta, "x.png", 50, 40)
    image = torch.randint(0, 255, (3, 40, 50), dtype=torch.uint8)
    assert torch.equal(visualize.overlay_instances(image, cropped, meta, score_threshold=0.55),
                       visualize.overlay_instances(image, instances, meta, score_threshold=0.55))


def test_panoptic_merge_is_the_same_on_cropped_masks():
    dense = random_masks(6, 30, 40, seed=3)
    scores, labels = torch.tensor([0.9, 0.3, 0.8, 0.7, 0.6, 0.95]), torch.tensor([0, 1, 0, 1, 0, 1])
    stuff_map = torch.randint(0, 3, (30, 40))
    a = combine_panoptic(dense, scores, labels, stuff_map, None, [2, 3], stuff_area_threshold=5)
    b = combine_panoptic(CroppedMasks.from_dense(dense), scores, labels, stuff_map, None, [2, 3], stuff_area_threshold=5,
                         band_rows=7)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_predict_cli_tiles_images_and_writes_every_output(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from omniseg import outputs
    from omniseg.api import Predictor
    from omniseg.cli import app
    from serving import tiny_weights

    weights = tiny_weights(tmp_path / "m2f.safetensors")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 255, (150, 170, 3), dtype=np.uint8)).save(folder / "big.png")
    result = CliRunner().invoke(app, ["predict", "-w", str(weights), "-i", str(folder), "-o", str(tmp_path / "out"),
                                      "--tile", "64", "--overlap", "16", "--yolo", "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    predictor = Predictor(weights, tile=64, overlap=16)
    pred = predictor(folder / "big.png")
    assert pred["height"] == 150 and isinstance(pred["instances"]["masks"], CroppedMasks)
    out = tmp_path / "out"
    semantic = np.array(Image.open(out / "semantic" / "big.png"))
    assert np.array_equal(semantic, outputs.semantic_to_dataset_ids(pred["semantic"], predictor.meta))
    records = json.loads((out / "instances_results.json").read_text())
    assert [r["segmentation"] for r in records] == pred["instances"]["masks"].rles()
    assert len((out / "yolo" / "big.txt").read_text().splitlines()) == len(pred["instances"]["masks"])
    for task in ("semantic", "panoptic", "instances"):
        assert Image.open(out / "overlay" / f"big_{task}.png").size == (170, 150)
    refused = CliRunner().invoke(app, ["predict", "-w", str(weights), "-i", str(folder), "-o", str(tmp_path / "x"),
                                       "--overlap", "16"])
    assert refused.exit_code == 2 and "--tile" in refused.output
    refused = CliRunner().invoke(app, ["predict", "-w", str(weights), "-i", str(folder), "-o", str(tmp_path / "x"),
                                       "--tile", "64", "--overlap", "64"])
    assert refused.exit_code == 2 and "overlap < size" in refused.output
