"""Layer-consistency metrics (mIoU-Li, Util) on hand-made layer predictions."""

from __future__ import annotations

import pytest
import torch

from omniseg.evaluation.consistency import LayerConsistencyEvaluator


def _set(masks: dict[int, tuple[slice, slice]], classes: dict[int, int], num_queries=3, num_classes=3):
    logits = torch.full((num_queries, num_classes + 1), -10.0)
    logits[:, -1] = 10.0  # no-object unless stated
    for q, c in classes.items():
        logits[q, -1] = -10.0
        logits[q, c] = 10.0
    pred = torch.full((num_queries, 16, 16), -10.0)
    for q, (rows, cols) in masks.items():
        pred[q, rows, cols] = 10.0
    return {"pred_logits": logits, "pred_masks": pred}


def test_util_and_miou_on_a_hand_made_case():
    gt = torch.zeros((2, 64, 64), dtype=torch.bool)
    gt[0, :32, :32] = True  # -> pred cells [0:8, 0:8]
    gt[1, 32:, :] = True  # -> pred cells [8:16, :]
    labels = torch.tensor([0, 1])
    top_left, bottom, left_half = (slice(0, 8), slice(0, 8)), (slice(8, 16), slice(0, 16)), (slice(0, 8), slice(0, 4))
    sets = [
        _set({0: top_left, 1: bottom}, {0: 0, 1: 1}),
        # layer 1: query 2 owns GT 0; query 0 covers half of it and says no-object
        _set({0: left_half, 1: bottom, 2: top_left}, {1: 1, 2: 0}),
        _set({0: top_left, 1: bottom}, {0: 0, 1: 1}),
    ]
    ev = LayerConsistencyEvaluator(seed=0)
    ev.process(sets, labels, gt)
    r = ev.evaluate()
    assert r["objects"] == 2
    assert r["Util"] == pytest.approx([100.0, 50.0])  # sets 0 and 1 against the last (no column for the last)
    # query 0: IoU(top-left, left half) = 0.5 between sets 0-1 and 1-2; query 1 unchanged (1.0)
    assert r["mIoU-Li"] == pytest.approx([75.0, 75.0])
    assert r["mIoU-Li-gt"] == pytest.approx([100.0, 75.0, 100.0])

    # a second image where everything is consistent averages in per object
    ev.process([sets[0]] * 3, labels, gt)
    r = ev.evaluate()
    assert r["Util"] == pytest.approx([100.0, 75.0])
    assert r["mIoU-Li"] == pytest.approx([87.5, 87.5])


def test_images_without_segments_and_layer_count_checks():
    ev = LayerConsistencyEvaluator()
    empty = _set({}, {})
    ev.process([empty, empty], torch.empty(0, dtype=torch.int64), torch.zeros((0, 64, 64), dtype=torch.bool))
    assert ev.evaluate()["images"] == 1 and ev.evaluate()["objects"] == 0
    with pytest.raises(ValueError, match="prediction sets"):
        ev.process([empty] * 3, torch.empty(0, dtype=torch.int64), torch.zeros((0, 64, 64), dtype=torch.bool))
