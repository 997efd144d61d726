"""Evaluation metrics against references: torchmetrics, a literal port of panopticapi, COCOeval cases by hand."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omniseg.data.errors import DataError
from omniseg.data.meta import DatasetMeta
from omniseg.evaluation import (
    DatasetEvaluator,
    InstanceEvaluator,
    PanopticEvaluator,
    SemanticEvaluator,
    to_coco_results,
)

IGNORE = 255


def shared_data(name: str) -> Path:
    root = os.environ.get("OMNISEG_SHARED_DATA")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / "shared" / "data"
    path = base / name
    if not path.is_dir():
        pytest.skip(f"shared sample data {path} not found (set OMNISEG_SHARED_DATA)")
    return path


# ============================================================================ semantic
def test_semantic_hand_computed_confusion_matrix():
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    evaluator = SemanticEvaluator(4, class_names=["a", "b", "c", "absent"])
    evaluator.process(gt, pred)
    # rows = gt, cols = pred; the ignored pixel (predicted 2) is not counted anywhere.
    expected = torch.tensor([[1, 1, 0, 0], [1, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(evaluator.confusion, expected)
    r = evaluator.evaluate()
    # IoU: a 1/(2+3-1), b 2/(3+3-2), c 1/(2+1-1); class 3 is absent from gt and pred -> NaN, excluded.
    assert r["IoU"]["a"] == pytest.approx(25.0)
    assert r["IoU"]["b"] == pytest.approx(50.0)
    assert r["IoU"]["c"] == pytest.approx(50.0)
    assert math.isnan(r["IoU"]["absent"])
    assert r["mIoU"] == pytest.approx(125 / 3)
    assert r["mAcc"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3 * 100)
    assert r["pAcc"] == pytest.approx(4 / 7 * 100)
    assert r["fwIoU"] == pytest.approx((2 * 0.25 + 3 * 0.5 + 2 * 0.5) / 7 * 100)


def test_semantic_class_predicted_but_absent_from_gt_counts_as_zero():
    evaluator = SemanticEvaluator(3)
    evaluator.process(torch.tensor([[0, 0], [1, 1]]), torch.tensor([[0, 2], [1, 1]]))
    r = evaluator.evaluate()
    assert r["IoU"]["2"] == 0.0
    assert r["mIoU"] == pytest.approx((0.5 + 1.0 + 0.0) / 3 * 100)
    assert r["mAcc"] == pytest.approx((0.5 + 1.0) / 2 * 100)  # accuracy only over gt classes


def test_semantic_matches_torchmetrics_jaccard_with_ignore():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    k = 6
    generator = torch.Generator().manual_seed(0)
    ours = SemanticEvaluator(k)
    jaccard = MulticlassJaccardIndex(num_classes=k, ignore_index=IGNORE, average="none")
    recall = MulticlassAccuracy(num_classes=k, ignore_index=IGNORE, average="none")
    pixel_acc = MulticlassAccuracy(num_classes=k, ignore_index=IGNORE, average="micro")
    for _ in range(4):
        gt = torch.randint(0, k - 1, (24, 32), generator=generator)  # class k-1 never in gt ...
        wrong = torch.randint(0, k - 2, (24, 32), generator=generator)
        pred = torch.where(torch.rand(24, 32, generator=generator) < 0.6, gt, wrong)
        gt[torch.rand(24, 32, generator=generator) < 0.15] = IGNORE  # ... nor in pred: excluded
        ours.process(gt, pred)
        jaccard.update(pred, gt)
        recall.update(pred, gt)
        pixel_acc.update(pred, gt)
    r = ours.evaluate()
    reference_iou = jaccard.compute() * 100
    present = torch.arange(k) < k - 1
    ours_iou = torch.tensor([r["IoU"][str(i)] for i in range(k)], dtype=torch.float64)
    torch.testing.assert_close(ours_iou[present], reference_iou[present].double(), rtol=1e-5, atol=1e-4)
    assert math.isnan(r["IoU"][str(k - 1)])
    assert r["mIoU"] == pytest.approx(float(reference_iou[present].mean()), rel=1e-5)
    assert r["mAcc"] == pytest.approx(float(recall.compute()[present].mean() * 100), rel=1e-5)
    assert r["pAcc"] == pytest.approx(float(pixel_acc.compute() * 100), rel=1e-5)


def test_semantic_matches_torchmetrics_mean_iou_single_image():
    from torchmetrics.segmentation import MeanIoU

    generator = torch.Generator().manual_seed(1)
    gt = torch.randint(0, 5, (40, 40), generator=generator)
    wrong = torch.randint(0, 5, (40, 40), generator=generator)
    pred = torch.where(torch.rand(40, 40, generator=generator) < 0.5, gt, wrong)
    metric = MeanIoU(num_classes=5, input_format="index", per_class=True)
    metric.update(pred[None], gt[None])
    evaluator = SemanticEvaluator(5)
    evaluator.process(gt, pred)
    ours = torch.tensor([evaluator.evaluate()["IoU"][str(i)] for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(ours, metric.compute().double() * 100, rtol=1e-5, atol=1e-4)


def test_semantic_merge_equals_single_pass_and_rejects_bad_labels():
    generator = torch.Generator().manual_seed(2)
    pairs = [tuple(torch.randint(0, 4, (8, 8), generator=generator) for _ in range(2)) for _ in range(4)]
    single, first, second = SemanticEvaluator(4), SemanticEvaluator(4), SemanticEvaluator(4)
    for i, (gt, pred) in enumerate(pairs):
        single.process(gt, pred)
        (first if i % 2 else second).process(gt, pred)
    first.merge(second)
    assert torch.equal(first.confusion, single.confusion)
    restored = SemanticEvaluator(4)
    restored.load_state(single.state())
    assert restored.evaluate()["mIoU"] == single.evaluate()["mIoU"]
    with pytest.raises(ValueError, match="outside"):
        single.process(torch.tensor([[7]]), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="shape"):
        single.process(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


# ============================================================================ panoptic
def panopticapi_stats(gt_map, gt_info, pred_map, pred_info, num_classes):
    """Literal port of panopticapi `pq_compute_single_core` (numpy, dict loops) as the reference."""
    offset, void = 256 * 256 * 256, 0
    stats = {c: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0} for c in range(num_classes)}
    pan_gt, pan_pred = np.asarray(gt_map, dtype=np.uint64), np.asarray(pred_map, dtype=np.uint64)
    gt_segms = {el["id"]: dict(el) for el in gt_info}
    pred_segms = {el["id"]: dict(el) for el in pred_info}
    labels, counts = np.unique(pan_gt, return_counts=True)
    for label, count in zip(labels, counts):
        if int(label) in gt_segms:
            gt_segms[int(label)]["area"] = int(count)
    labels, counts = np.unique(pan_pred, return_counts=True)
    for label, count in zip(labels, counts):
        if int(label) == void:
            continue
        pred_segms[int(label)]["area"] = int(count)
    pred_segms = {k: v for k, v in pred_segms.items() if "area" in v}
    gt_pred_map = {}
    labels, counts = np.unique(pan_gt * offset + pan_pred, return_counts=True)
    for label, intersection in zip(labels, counts):
        gt_pred_map[(int(label) // offset, int(label) % offset)] = int(intersection)
    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), intersection in gt_pred_map.items():
        if gt_label not in gt_segms or pred_label not in pred_segms:
            continue
        if gt_segms[gt_label].get("iscrowd", 0) == 1:
            continue
        if gt_segms[gt_label]["category"] != pred_segms[pred_label]["category"]:
            continue
        union = (
            pred_segms[pred_label]["area"]
            + gt_segms[gt_label]["area"]
            - intersection
            - gt_pred_map.get((void, pred_label), 0)
        )
        iou = intersection / union
        if iou > 0.5:
            stats[gt_segms[gt_label]["category"]]["tp"] += 1
            stats[gt_segms[gt_label]["category"]]["iou"] += iou
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)
    crowd_labels_dict = {}
    for gt_label, gt_seg in gt_segms.items():
        if gt_label in gt_matched or "area" not in gt_seg:
            continue
        if gt_seg.get("iscrowd", 0) == 1:
            crowd_labels_dict[gt_seg["category"]] = gt_label
            continue
        stats[gt_seg["category"]]["fn"] += 1
    for pred_label, pred_seg in pred_segms.items():
        if pred_label in pred_matched:
            continue
        intersection = gt_pred_map.get((void, pred_label), 0)
        if pred_seg["category"] in crowd_labels_dict:
            intersection += gt_pred_map.get((crowd_labels_dict[pred_seg["category"]], pred_label), 0)
        if intersection / pred_seg["area"] > 0.5:
            continue
        stats[pred_seg["category"]]["fp"] += 1
    return stats


def panopticapi_average(stats, categories):
    pq = sq = rq = 0.0
    n = 0
    for c in categories:
        tp, fp, fn, iou = stats[c]["tp"], stats[c]["fp"], stats[c]["fn"], stats[c]["iou"]
        if tp + fp + fn == 0:
            continue
        n += 1
        pq += iou / (tp + 0.5 * fp + 0.5 * fn)
        sq += iou / tp if tp else 0
        rq += tp / (tp + 0.5 * fp + 0.5 * fn)
    return {"PQ": pq / n * 100, "SQ": sq / n * 100, "RQ": rq / n * 100}


THING_STUFF_META = DatasetMeta(
    classes=["person", "car", "dog", "sky", "grass"],
    isthing=[True, True, True, False, False],
    dataset_ids=[1, 3, 18, 119, 125],
)


def random_panoptic_case(generator, size=32, block=4, crowd=True, pred_void=True):
    """Blocky gt and pred maps with void, optional crowd, one segment per stuff class per image."""
    n = size // block
    meta = THING_STUFF_META

    def categories_for(ids, allow_crowd):
        info, used_stuff, crowd_used = [], set(), set()
        for segment_id in ids:
            category = int(torch.randint(0, meta.num_classes, (1,), generator=generator))
            if not meta.isthing[category]:
                if category in used_stuff:
                    category = int(torch.randint(0, 3, (1,), generator=generator))
                else:
                    used_stuff.add(category)
            is_crowd = bool(
                allow_crowd
                and meta.isthing[category]
                and category not in crowd_used
                and torch.rand(1, generator=generator) < 0.2
            )
            if is_crowd:
                crowd_used.add(category)
            info.append(
                {"id": segment_id, "category": category, "isthing": meta.isthing[category], "iscrowd": is_crowd}
            )
        return info

    gt_blocks = torch.randint(1, 8, (n, n), generator=generator)
    gt_blocks[torch.rand(n, n, generator=generator) < 0.12] = 0
    gt_info = categories_for(sorted(set(gt_blocks.unique().tolist()) - {0}), crowd)
    # predictions mostly copy the gt blocks so that many segments match
    replace = torch.rand(n, n, generator=generator) < 0.3
    pred_blocks = torch.where(replace, torch.randint(1, 10, (n, n), generator=generator), gt_blocks)
    if pred_void:
        pred_blocks[torch.rand(n, n, generator=generator) < 0.08] = 0
    else:
        pred_blocks[pred_blocks == 0] = 9
    gt_category = {s["id"]: s["category"] for s in gt_info}
    pred_info = categories_for(sorted(set(pred_blocks.unique().tolist()) - {0}), allow_crowd=False)
    used_stuff = {s["category"] for s in pred_info if not meta.isthing[s["category"]]}
    for segment in pred_info:  # keep the gt category most of the time
        wanted = gt_category.get(segment["id"])
        allowed = wanted is not None and (meta.isthing[wanted] or wanted not in used_stuff)
        if allowed and torch.rand(1, generator=generator) < 0.8:
            if not meta.isthing[segment["category"]]:
                used_stuff.discard(segment["category"])
            segment["category"], segment["isthing"] = wanted, meta.isthing[wanted]
            if not meta.isthing[wanted]:
                used_stuff.add(wanted)
        del segment["iscrowd"]
    # sub-block noise so IoUs are not multiples of a block
    up = lambda b: b.repeat_interleave(block, 0).repeat_interleave(block, 1)  # noqa: E731
    gt_map, pred_map = up(gt_blocks), up(pred_blocks)
    noise = torch.rand(size, size, generator=generator) < 0.05
    pred_map = torch.where(noise, pred_map.roll(1, dims=1), pred_map)
    present = set(pred_map.unique().tolist())
    pred_info = [s for s in pred_info if s["id"] in present]
    return gt_map, gt_info, pred_map, pred_info


def test_panoptic_hand_computed_void_and_crowd():
    meta = DatasetMeta(classes=["person", "car", "sky"], isthing=[True, True, False])
    gt = torch.tensor(
        [
            [1, 1, 1, 1, 4, 4, 4, 4],
            [1, 1, 1, 1, 4, 4, 4, 4],
            [0, 0, 0, 2, 2, 2, 3, 3],
            [0, 0, 0, 2, 2, 2, 3, 3],
        ]
    )
    gt_info = [
        {"id": 1, "category": 0, "isthing": True, "iscrowd": False},
        {"id": 2, "category": 0, "isthing": True, "iscrowd": True},
        {"id": 3, "category": 1, "isthing": True, "iscrowd": False},
        {"id": 4, "category": 2, "isthing": False, "iscrowd": False},
    ]
    pred = torch.tensor(
        [
            [1, 1, 0, 0, 4, 4, 4, 4],
            [1, 1, 1, 0, 4, 4, 4, 4],
            [1, 1, 1, 5, 5, 5, 6, 6],
            [7, 7, 0, 5, 8, 8, 0, 0],
        ]
    )
    pred_info = [
        {"id": 1, "category": 0},  # 5 px on gt 1 + 3 px on void: IoU 5 / (8 + 8 - 5 - 3) = 0.625 -> TP
        {"id": 4, "category": 2},  # exact -> TP, IoU 1
        {"id": 5, "category": 0},  # entirely on the person crowd region -> ignored
        {"id": 6, "category": 1},  # IoU 2/4 = 0.5 is not > 0.5 -> FP, and gt 3 is a FN
        {"id": 7, "category": 1},  # entirely on void -> ignored
        {"id": 8, "category": 1},  # on the *person* crowd, which does not excuse a car -> FP
    ]
    evaluator = PanopticEvaluator(meta)
    evaluator.process(gt, gt_info, pred, pred_info)
    assert evaluator.tp.tolist() == [1, 0, 1]
    assert evaluator.fp.tolist() == [0, 2, 0]
    assert evaluator.fn.tolist() == [0, 1, 0]
    torch.testing.assert_close(evaluator.iou_sum, torch.tensor([0.625, 0.0, 1.0], dtype=torch.float64))
    r = evaluator.evaluate()
    assert r["PQ"] == pytest.approx((62.5 + 0 + 100) / 3)
    assert r["SQ"] == pytest.approx((62.5 + 0 + 100) / 3)
    assert r["RQ"] == pytest.approx((100 + 0 + 100) / 3)
    assert r["PQ_th"] == pytest.approx(31.25)
    assert r["PQ_st"] == pytest.approx(100.0)
    assert r["per_class"]["car"] == {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "TP": 0, "FP": 2, "FN": 1}
    reference = panopticapi_stats(gt.numpy(), gt_info, pred.numpy(), pred_info, 3)
    assert [reference[c]["tp"] for c in range(3)] == [1, 0, 1]
    assert [reference[c]["fp"] for c in range(3)] == [0, 2, 0]


@pytest.mark.parametrize("seed", range(6))
def test_panoptic_matches_panopticapi_reference_with_void_and_crowd(seed):
    generator = torch.Generator().manual_seed(seed)
    evaluator = PanopticEvaluator(THING_STUFF_META)
    totals = {c: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0} for c in range(5)}
    for _ in range(3):
        gt_map, gt_info, pred_map, pred_info = random_panoptic_case(generator)
        evaluator.process(gt_map, gt_info, pred_map, pred_info)
        for c, s in panopticapi_stats(gt_map.numpy(), gt_info, pred_map.numpy(), pred_info, 5).items():
            for key in s:
                totals[c][key] += s[key]
    assert evaluator.tp.tolist() == [totals[c]["tp"] for c in range(5)]
    assert evaluator.fp.tolist() == [totals[c]["fp"] for c in range(5)]
    assert evaluator.fn.tolist() == [totals[c]["fn"] for c in range(5)]
    assert evaluator.iou_sum.tolist() == pytest.approx([totals[c]["iou"] for c in range(5)])
    assert sum(totals[c]["tp"] for c in range(5)) > 0 and sum(totals[c]["fp"] for c in range(5)) > 0
    r = evaluator.evaluate()
    for subset, categories in (("All", range(5)), ("Things", range(3)), ("Stuff", range(3, 5))):
        expected = panopticapi_average(totals, categories)
        for key in ("PQ", "SQ", "RQ"):
            assert r[subset][key] == pytest.approx(expected[key])


@pytest.mark.parametrize("seed", range(4))
def test_panoptic_matches_torchmetrics(seed):
    # torchmetrics has no crowd, merges stuff of one class and treats unmatched gt covered by
    # predicted void specially, so the cases have no crowd, one segment per stuff class and no
    # predicted void; ground-truth void is present (an unknown category for torchmetrics).
    from torchmetrics.detection import PanopticQuality

    generator = torch.Generator().manual_seed(100 + seed)
    meta = THING_STUFF_META
    metric = PanopticQuality(things={0, 1, 2}, stuffs={3, 4}, return_sq_and_rq=True, return_per_class=True)
    evaluator = PanopticEvaluator(meta)

    def pairs(segment_map, info):
        category = {s["id"]: s["category"] for s in info}
        lut = torch.full((int(segment_map.max()) + 1,), 5, dtype=torch.long)  # 5 = void for torchmetrics
        for segment_id, c in category.items():
            lut[segment_id] = c
        return torch.stack([lut[segment_map], segment_map], dim=-1)

    for _ in range(3):
        gt_map, gt_info, pred_map, pred_info = random_panoptic_case(generator, crowd=False, pred_void=False)
        evaluator.process(gt_map, gt_info, pred_map, pred_info)
        metric.update(pairs(pred_map, pred_info)[None], pairs(gt_map, gt_info)[None])
    reference = metric.compute()  # [K, 3]: pq, sq, rq per class
    r = evaluator.evaluate()
    counted = (evaluator.tp + evaluator.fp + evaluator.fn) > 0
    assert counted.sum() >= 3
    for c, name in enumerate(meta.classes):
        if counted[c]:
            assert r["per_class"][name]["PQ"] == pytest.approx(float(reference[c, 0]) * 100, abs=1e-4)
            assert r["per_class"][name]["SQ"] == pytest.approx(float(reference[c, 1]) * 100, abs=1e-4)
            assert r["per_class"][name]["RQ"] == pytest.approx(float(reference[c, 2]) * 100, abs=1e-4)
    assert r["PQ"] == pytest.approx(float(reference[counted, 0].mean()) * 100, abs=1e-4)


def coco_panoptic_sample():
    root = shared_data("coco_panoptic_sample")
    data = json.loads((root / "panoptic_examples.json").read_text())
    categories = json.loads((root / "panoptic_coco_categories.json").read_text())
    meta = DatasetMeta(
        classes=[c["name"] for c in categories],
        isthing=[bool(c["isthing"]) for c in categories],
        dataset_ids=[c["id"] for c in categories],
        colors=[tuple(c["color"]) for c in categories],
    )
    images = []
    for annotation in data["annotations"]:
        png = Image.open(root / "panoptic_examples" / annotation["file_name"]).convert("RGB")
        rgb = np.asarray(png, dtype=np.int64)
        segment_map = torch.from_numpy(rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2])
        info = [
            {
                "id": s["id"],
                "category": meta.to_contiguous(s["category_id"]),
                "isthing": meta.isthing[meta.to_contiguous(s["category_id"])],
                "iscrowd": bool(s["iscrowd"]),
            }
            for s in annotation["segments_info"]
        ]
        images.append((segment_map, info))
    return meta, images


def test_panoptic_coco_sample_against_itself_and_perturbed():
    meta, images = coco_panoptic_sample()
    evaluator = PanopticEvaluator(meta)
    for segment_map, info in images:
        evaluator.process(segment_map, info, segment_map, info)
    r = evaluator.evaluate()
    assert r["PQ"] == pytest.approx(100.0) and r["SQ"] == pytest.approx(100.0) and r["RQ"] == pytest.approx(100.0)
    categories = {s["category"] for _, info in images for s in info if not s["iscrowd"]}
    assert r["All"]["n"] == len(categories)
    assert int(evaluator.fp.sum()) == 0 and int(evaluator.fn.sum()) == 0

    # Perturb: drop the largest thing of each image to void and relabel one stuff segment.
    evaluator.reset()
    totals = {c: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0} for c in range(meta.num_classes)}
    for segment_map, info in images:
        areas = {s["id"]: int((segment_map == s["id"]).sum()) for s in info}
        things = [s for s in info if s["isthing"] and not s["iscrowd"]]
        dropped = max(things, key=lambda s: areas[s["id"]])["id"]
        pred_map = torch.where(segment_map == dropped, torch.zeros_like(segment_map), segment_map)
        pred_info = [dict(s) for s in info if s["id"] != dropped]
        stuff = next(s for s in pred_info if not s["isthing"])
        stuff["category"] = next(c for c in meta.stuff_ids if c != stuff["category"])
        evaluator.process(segment_map, info, pred_map, pred_info)
        for c, s in panopticapi_stats(segment_map.numpy(), info, pred_map.numpy(), pred_info, meta.num_classes).items():
            for key in s:
                totals[c][key] += s[key]
    r = evaluator.evaluate()
    expected = panopticapi_average(totals, range(meta.num_classes))
    assert r["PQ"] == pytest.approx(expected["PQ"]) and r["PQ"] < 100
    assert int(evaluator.fn.sum()) == 2 * 2  # per image: the dropped thing + the relabelled stuff


def test_panoptic_rejects_undescribed_prediction_ids():
    evaluator = PanopticEvaluator(THING_STUFF_META)
    segment_map = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="not in segments_info"):
        evaluator.process(segment_map, [{"id": 1, "category": 0}], segment_map, [{"id": 1, "category": 0}])


def test_panoptic_merge_state():
    generator = torch.Generator().manual_seed(7)
    cases = [random_panoptic_case(generator) for _ in range(4)]
    single, first, second = (PanopticEvaluator(THING_STUFF_META) for _ in range(3))
    for i, case in enumerate(cases):
        single.process(*case)
        (first if i < 2 else second).process(*case)
    first.merge(second)
    assert first.evaluate()["PQ"] == pytest.approx(single.evaluate()["PQ"])
    assert torch.equal(first.tp, single.tp) and torch.equal(first.fp, single.fp)


# ============================================================================ instance
def box_mask(h, w, y0, y1, x0, x1):
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_instance_perfect_predictions_give_ap_100():
    meta = THING_STUFF_META
    evaluator = InstanceEvaluator(meta)
    for image_id in range(3):
        masks = torch.stack(
            [box_mask(64, 64, 2, 20, 2, 30), box_mask(64, 64, 30, 60, 10, 60), box_mask(64, 64, 5, 9, 40, 44)]
        )
        labels = torch.tensor([0, 1, image_id % 3])
        gt = {"masks": masks, "labels": labels, "iscrowd": torch.zeros(3, dtype=torch.bool)}
        pred = {"masks": masks, "labels": labels, "scores": torch.tensor([0.9, 0.8, 0.7])}
        evaluator.process(image_id, 64, 64, gt, pred)
    # the same image again (a sampler padding the last batch) is counted once
    gt = {"masks": masks, "labels": labels, "iscrowd": torch.zeros(3, dtype=torch.bool)}
    evaluator.process(0, 64, 64, gt, {"masks": masks[:0], "labels": labels[:0], "scores": torch.zeros(0)})
    r = evaluator.evaluate()
    for key in ("AP", "AP50", "AP75", "APs", "APm"):
        assert r[key] == pytest.approx(100.0)
    assert math.isnan(r["APl"])  # no object larger than 96^2
    assert r["per_class"]["person"] == pytest.approx(100.0)
    assert math.isnan(r["per_class"]["sky"])


def test_instance_single_match_at_iou_0625():
    evaluator = InstanceEvaluator(THING_STUFF_META)
    gt_mask = box_mask(32, 32, 4, 12, 4, 14)  # 8 x 10 = 80 px
    pred_mask = box_mask(32, 32, 4, 9, 4, 14)  # 5 x 10 = 50 px inside it: IoU 50 / 80 = 0.625
    evaluator.process(
        "img",
        32,
        32,
        {"masks": gt_mask[None], "labels": torch.tensor([1]), "iscrowd": torch.tensor([False])},
        {"masks": pred_mask[None], "labels": torch.tensor([1]), "scores": torch.tensor([0.5])},
    )
    r = evaluator.evaluate()
    assert r["AP50"] == pytest.approx(100.0)
    assert r["AP75"] == pytest.approx(0.0)
    # matched at thresholds 0.50, 0.55, 0.60 out of 0.50:0.05:0.95
    assert r["AP"] == pytest.approx(30.0)


def test_instance_zero_predictions_and_crowd():
    evaluator = InstanceEvaluator(THING_STUFF_META)
    gt = {"masks": box_mask(32, 32, 0, 10, 0, 10)[None], "labels": torch.tensor([0]), "iscrowd": torch.tensor([False])}
    empty = {
        "masks": torch.zeros(0, 32, 32, dtype=torch.bool),
        "labels": torch.zeros(0, dtype=torch.long),
        "scores": torch.zeros(0),
    }
    evaluator.process(0, 32, 32, gt, empty)
    r = evaluator.evaluate()
    assert r["AP"] == 0.0 and r["AP50"] == 0.0

    # A prediction on a crowd region is neither a TP nor a FP: only the real object counts.
    evaluator = InstanceEvaluator(THING_STUFF_META)
    masks = torch.stack([box_mask(32, 32, 0, 10, 0, 10), box_mask(32, 32, 16, 32, 16, 32)])
    gt = {"masks": masks, "labels": torch.tensor([0, 0]), "iscrowd": torch.tensor([False, True])}
    pred = {"masks": masks.flip(0), "labels": torch.tensor([0, 0]), "scores": torch.tensor([0.9, 0.8])}
    evaluator.process(0, 32, 32, gt, pred)
    assert evaluator.evaluate()["AP"] == pytest.approx(100.0)


def test_to_coco_results_uses_dataset_ids_and_decodable_rle():
    from pycocotools import mask as mask_utils

    masks = torch.stack([box_mask(16, 20, 1, 5, 2, 9), box_mask(16, 20, 10, 16, 0, 20)])
    pred = {"masks": masks, "labels": torch.tensor([2, 0]), "scores": torch.tensor([0.75, 0.5])}
    records = to_coco_results(42, pred, THING_STUFF_META)
    assert [r["category_id"] for r in records] == [18, 1]
    assert all(isinstance(r["segmentation"]["counts"], str) for r in records)
    assert records[0]["bbox"] == [2.0, 1.0, 7.0, 4.0]
    assert records[0]["score"] == 0.75 and records[0]["image_id"] == 42
    json.dumps(records)
    decoded = mask_utils.decode([r["segmentation"] for r in records])
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), masks.numpy())


# ============================================================================ dataset evaluator
def make_sample_and_prediction(image_id):
    """A 24x24 sample with all three annotation kinds, and a prediction that is partly right."""
    pan = torch.zeros(24, 24, dtype=torch.long)
    pan[:12] = 10  # sky
    pan[12:, :] = 11  # grass
    pan[2:8, 2:8] = 1  # person
    pan[14:22, 10:20] = 2  # car
    info = [
        {"id": 1, "category": 0, "isthing": True, "iscrowd": False},
        {"id": 2, "category": 1, "isthing": True, "iscrowd": False},
        {"id": 10, "category": 3, "isthing": False, "iscrowd": False},
        {"id": 11, "category": 4, "isthing": False, "iscrowd": False},
    ]
    lut = {s["id"]: s["category"] for s in info}
    sem = pan.clone().apply_(lambda v: lut[v])
    things = [s for s in info if s["isthing"]]
    instances = {
        "masks": torch.stack([pan == s["id"] for s in things]),
        "labels": torch.tensor([s["category"] for s in things]),
        "boxes": torch.zeros(len(things), 4),
        "iscrowd": torch.zeros(len(things), dtype=torch.bool),
    }
    sample = {
        "image": torch.zeros(3, 24, 24, dtype=torch.uint8),
        "file_name": f"img{image_id}.png",
        "image_id": image_id,
        "height": 24,
        "width": 24,
        "sem_seg": sem,
        "pan_seg": pan,
        "segments_info": info,
        "instances": instances,
    }
    pred_pan = pan.clone()
    pred_pan[2:8, 2:5] = 10  # half of the person missed (IoU 0.5: not a match)
    pred_sem = pred_pan.clone().apply_(lambda v: lut[v])
    prediction = {
        "semantic": pred_sem,
        "panoptic": {"segment_map": pred_pan, "segments_info": [{**s, "score": 0.9} for s in info]},
        "instances": {
            "masks": torch.stack([pred_pan == 1, pred_pan == 2]),
            "labels": torch.tensor([0, 1]),
            "scores": torch.tensor([0.9, 0.8]),
            "boxes": torch.zeros(2, 4),
        },
    }
    return sample, prediction


def test_dataset_evaluator_all_tasks_and_summary():
    evaluator = DatasetEvaluator(THING_STUFF_META, ["panoptic", "semantic", "instance"])
    for image_id in range(2):
        evaluator.process(*make_sample_and_prediction(image_id))
    results = evaluator.evaluate()
    assert set(results) == {"semantic", "panoptic", "instance"}
    # person: 18 px predicted of 36, plus 18 px predicted as sky -> IoU 18/36 = 0.5
    assert results["semantic"]["IoU"]["person"] == pytest.approx(50.0)
    # panoptic: person FN + FP (IoU exactly 0.5); car, grass exact; sky IoU (288 - 36) / (288 - 18)
    per_class = results["panoptic"]["per_class"]
    assert per_class["person"]["PQ"] == 0.0 and per_class["person"]["FN"] == 2
    assert per_class["car"]["PQ"] == pytest.approx(100.0)
    assert per_class["sky"]["SQ"] == pytest.approx(252 / 270 * 100)
    # instance: car perfect (AP 100); person IoU 0.5 -> matched only at the 0.5 threshold
    assert results["instance"]["per_class"]["car"] == pytest.approx(100.0)
    assert results["instance"]["per_class"]["person"] == pytest.approx(10.0)
    pq, miou, ap = results["panoptic"]["PQ"], results["semantic"]["mIoU"], results["instance"]["AP"]
    assert evaluator.summary() == f"PQ {pq:.1f} | mIoU {miou:.1f} | AP {ap:.1f}"
    assert set(evaluator.scalars()) >= {"PQ", "mIoU", "AP", "PQ_th", "pAcc", "AP50"}


def test_dataset_evaluator_errors_name_the_file():
    evaluator = DatasetEvaluator(THING_STUFF_META, ["semantic"])
    sample, prediction = make_sample_and_prediction(0)
    del sample["sem_seg"], sample["pan_seg"]
    with pytest.raises(DataError, match="img0.png"):
        evaluator.process(sample, prediction)
    sample, prediction = make_sample_and_prediction(0)
    prediction["semantic"] = prediction["semantic"][:10]
    with pytest.raises(ValueError, match="original resolution"):
        evaluator.process(sample, prediction)
    with pytest.raises(ValueError, match="subset"):
        DatasetEvaluator(THING_STUFF_META, ["depth"])


def test_dataset_evaluator_derives_ground_truth_from_panoptic():
    pytest.importorskip("omniseg.data.targets")
    full = DatasetEvaluator(THING_STUFF_META, ["semantic", "instance"])
    derived = DatasetEvaluator(THING_STUFF_META, ["semantic", "instance"])
    for image_id in range(2):
        sample, prediction = make_sample_and_prediction(image_id)
        full.process(sample, prediction)
        del sample["sem_seg"], sample["instances"]
        derived.process(sample, prediction)
    a, b = full.evaluate(), derived.evaluate()
    assert a["semantic"]["mIoU"] == pytest.approx(b["semantic"]["mIoU"])
    assert a["instance"]["AP"] == pytest.approx(b["instance"]["AP"])


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        evaluator = DatasetEvaluator(THING_STUFF_META, ["semantic", "panoptic", "instance"])
        for image_id in range(4):
            if image_id % world_size == rank:
                evaluator.process(*make_sample_and_prediction(image_id))
        evaluator.evaluators["panoptic"].process(*random_panoptic_case(torch.Generator().manual_seed(rank))[:4])
        first = evaluator.scalars(evaluator.evaluate())
        second = evaluator.scalars(evaluator.evaluate())  # evaluating again must not double count
        torch.save({"first": first, "second": second}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_distributed_evaluation_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = DatasetEvaluator(THING_STUFF_META, ["semantic", "panoptic", "instance"])
    for image_id in range(4):
        single.process(*make_sample_and_prediction(image_id))
    for rank in range(2):
        single.evaluators["panoptic"].process(*random_panoptic_case(torch.Generator().manual_seed(rank))[:4])
    expected = single.scalars(single.evaluate())
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in expected.items():
            for run in ("first", "second"):
                assert got[run][key] == pytest.approx(value, nan_ok=True), (rank, run, key)
