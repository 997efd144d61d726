"""Post-processing: hand-computed cases, the official resize order, and parity with HF's image processor.

HF ``Mask2FormerImageProcessor`` differs from the official Mask2Former code in ways that make a
naive comparison meaningless, so each parity test builds inputs where the difference vanishes:

* HF first resizes mask logits to 384x384: logits are given at 96x96 (stride 4 of a 384 input)
  or at 384x384, with a 384 input and (except semantic) a 384 output.
* HF panoptic uses ``argmax == k`` as the segment (official: ``& sigmoid >= 0.5``) and measures
  the original area on score-weighted probabilities; with saturated logits (|logit| >= 3) and every
  pixel covered by a kept query both definitions agree. HF also reuses a fused stuff id as its id
  counter, so queries of the same class are kept adjacent to avoid its id collisions.
* HF instance output is a non-overlapping map; we compare (label, score, binary mask) per detection.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import masks_to_boxes

from omniseg.models.maskformer.postprocess import (
    instance_inference,
    panoptic_inference,
    postprocess,
    resize_mask_logits,
    semantic_inference,
)


@pytest.fixture(scope="module")
def hf_processor():
    transformers = pytest.importorskip("transformers")
    return transformers.Mask2FormerImageProcessor()


def _hf_outputs(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(class_queries_logits=mask_cls[None], masks_queries_logits=mask_pred[None])


def _class_logits(classes: list[int], num_classes: int, strengths: torch.Tensor) -> torch.Tensor:
    """One row per query: zeros except ``strength`` on its class (index K = no-object)."""
    logits = torch.zeros(len(classes), num_classes + 1)
    logits[torch.arange(len(classes)), torch.tensor(classes)] = strengths
    return logits


# ----------------------------------------------------------------------------------- hand-computed
def test_semantic_inference_hand_computed():
    mask_cls = torch.log(torch.tensor([[2.0, 1.0, 1.0], [1.0, 2.0, 1.0]]))  # softmax -> [.5,.25,.25], [.25,.5,.25]
    mask_pred = torch.tensor([[[0.0, 0.0]], [[100.0, -100.0]]])  # sigmoid -> .5 everywhere; 1 then 0
    sem = semantic_inference(mask_cls, mask_pred)
    expected = torch.tensor([[[0.5 * 0.5 + 0.25, 0.5 * 0.5]], [[0.25 * 0.5 + 0.5, 0.25 * 0.5]]])
    assert torch.allclose(sem, expected)


def _quadrant_case():
    """4x4 image; classes: 0 thing, 1 and 2 stuff; K = 3 (index 3 = no-object)."""
    def mask(rows, cols):
        m = torch.full((4, 4), -10.0)
        m[rows, cols] = 10.0
        return m

    masks = torch.stack([
        mask(slice(0, 2), slice(0, 2)),  # q0 stuff 1, top-left
        mask(slice(0, 2), slice(2, 4)),  # q1 stuff 1, top-right -> merged with q0
        mask(slice(2, 4), slice(0, 2)),  # q2 thing 0, bottom-left
        mask(slice(2, 4), slice(2, 4)),  # q3 thing 0, bottom-right -> its own id
        mask(slice(0, 4), slice(0, 4)),  # q4 stuff 2, low class score -> not kept
        mask(slice(0, 4), slice(0, 4)),  # q5 predicts no-object -> not kept
    ])  # fmt: skip
    mask_cls = _class_logits([1, 1, 0, 0, 2, 3], 3, torch.tensor([8.0, 8.0, 8.0, 8.0, 1.0, 8.0]))
    return mask_cls, masks


def test_panoptic_inference_hand_computed():
    mask_cls, masks = _quadrant_case()
    seg, info = panoptic_inference(mask_cls, masks, thing_ids={0})
    expected = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    assert seg.dtype == torch.int64 and torch.equal(seg, expected)
    assert [(s["id"], s["category"], s["isthing"]) for s in info] == [(1, 1, False), (2, 0, True), (3, 0, True)]
    assert info[0]["score"] == pytest.approx(torch.softmax(mask_cls[0], 0).max().item())


def test_panoptic_overlap_threshold_and_void():
    mask_cls, masks = _quadrant_case()
    # q3 disappears; a kept stuff query (score ~0.85 < the others' ~1.0) covers everything and only
    # wins the bottom-right quadrant: 4 / 16 < 0.8 of its own area -> dropped, quadrant stays void
    mask_cls[3] = torch.tensor([0.0, 0.0, 0.0, 8.0])
    mask_cls[4] = torch.tensor([0.0, 0.0, float(torch.log(torch.tensor(17.0))), 0.0])
    seg, info = panoptic_inference(mask_cls, masks, thing_ids=[0])
    assert torch.equal(seg[2:, 2:], torch.zeros(2, 2, dtype=torch.int64))
    assert [s["category"] for s in info] == [1, 0]
    # with a permissive overlap threshold the same query survives on its quadrant
    seg, info = panoptic_inference(mask_cls, masks, thing_ids=[0], overlap_threshold=0.2)
    assert torch.equal(seg[2:, 2:], torch.full((2, 2), 3)) and info[-1]["category"] == 2


def test_instance_inference_hand_computed():
    mask_cls = torch.log(torch.tensor([[6.0, 3.0, 1.0], [1.0, 1.0, 8.0], [4.0, 4.0, 2.0]]))  # K = 2
    mask_pred = torch.full((3, 5, 6), -4.0)
    mask_pred[0, 1:3, 2:5] = 2.0
    mask_pred[2, 0:5, 0:1] = 0.5
    out = instance_inference(mask_cls, mask_pred, num_classes=2, topk=4)
    probs = torch.softmax(mask_cls, -1)[:, :2]
    # top-4 (query, class) pairs by class probability: (0,0) .6, (2,0) .4, (2,1) .4, (0,1) .3
    assert out["labels"].tolist()[0] == 0 and sorted(out["labels"].tolist()) == [0, 0, 1, 1]
    assert torch.allclose(out["scores"][0], probs[0, 0] * torch.sigmoid(torch.tensor(2.0)))
    assert out["masks"].dtype == torch.bool and out["masks"][0].sum() == 6
    assert out["boxes"][0].tolist() == [2.0, 1.0, 4.0, 2.0]
    assert torch.equal(out["boxes"], masks_to_boxes(out["masks"]))
    things = instance_inference(mask_cls, mask_pred, num_classes=2, topk=4, thing_ids={1})
    assert things["labels"].tolist() == [1, 1] and things["masks"].shape == (2, 5, 6)


# ----------------------------------------------------------------------------------- official resize order
def _random_outputs(seed: int, queries: int = 8, num_classes: int = 5, size=(24, 32)):
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, num_classes + 1, (queries,), generator=g).tolist()
    strengths = 2.0 + 6.0 * torch.rand(queries, generator=g)  # class scores from ~0.5 to ~1.0
    mask_cls = _class_logits(classes, num_classes, strengths) + 0.3 * torch.randn(queries, num_classes + 1, generator=g)
    # each query mostly owns the pixels where its smooth random field is largest, so that panoptic
    # segments survive the overlap test; soft boundaries keep the thresholds meaningful
    fields = F.interpolate(torch.randn(1, queries, 3, 4, generator=g), size=size, mode="bilinear")[0]
    owner = F.one_hot(fields.argmax(0), queries).permute(2, 0, 1).float()
    mask_pred = 4 * (2 * owner - 1) + 2 * fields + 0.5 * torch.randn(queries, *size, generator=g)
    return {"pred_logits": mask_cls, "pred_masks": mask_pred}


def _official_full_resolution(outputs, padded, image_size, output_size):
    """Reference order: every query's logits upsampled to the padded input, cropped, resized."""
    x = F.interpolate(outputs["pred_masks"][None], size=padded, mode="bilinear", align_corners=False)
    x = x[..., : image_size[0], : image_size[1]]
    return F.interpolate(x, size=output_size, mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_postprocess_selected_queries_equal_official_order(seed):
    outputs = _random_outputs(seed)
    padded, image_size, output_size = (96, 128), (90, 100), (123, 77)
    full = _official_full_resolution(outputs, padded, image_size, output_size)
    things = {0, 1, 2}

    pan = postprocess(outputs, image_size, output_size, ["panoptic"], things)["panoptic"]
    ref_map, ref_info = panoptic_inference(outputs["pred_logits"], full, thing_ids=things)
    assert pan["segment_map"].shape == output_size
    assert torch.equal(pan["segment_map"], ref_map) and pan["segments_info"] == ref_info

    inst = postprocess(outputs, image_size, output_size, ["instance"], things, topk=10)["instances"]
    ref = instance_inference(outputs["pred_logits"], full, num_classes=5, topk=10)
    assert torch.equal(inst["masks"], ref["masks"]) and torch.equal(inst["labels"], ref["labels"])
    assert torch.allclose(inst["scores"], ref["scores"]) and torch.equal(inst["boxes"], ref["boxes"])

    both = postprocess(outputs, image_size, output_size, ["semantic", "panoptic", "instance"], things, topk=10)
    sem_before = semantic_inference(outputs["pred_logits"], full)  # detectron2 "postprocess before inference"
    assert torch.equal(both["semantic"], sem_before.argmax(0))
    assert torch.equal(both["panoptic"]["segment_map"], ref_map)
    assert set(both["instances"]["labels"].tolist()) <= things  # panoptic models: things only

    sem_only = postprocess(outputs, image_size, output_size, ["semantic"], return_semantic_scores=True)
    padded_scores = semantic_inference(
        outputs["pred_logits"], F.interpolate(outputs["pred_masks"][None], size=padded, mode="bilinear")[0]
    )
    ref_scores = F.interpolate(padded_scores[None, :, :90, :100], size=output_size, mode="bilinear")[0]
    assert torch.allclose(sem_only["semantic_scores"], ref_scores, atol=1e-6)
    assert sem_only["semantic"].dtype == torch.int64 and sem_only["semantic"].shape == output_size


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sizes", [((96, 128), (96, 128), (96, 128)), ((96, 128), (90, 100), (123, 77)),
                                   ((96, 128), (90, 100), (40, 61))])
def test_fast_mode_makes_the_official_decisions(seed, sizes):
    """mode="fast" never resizes N masks, yet panoptic maps and instance masks equal the official order's
    (same resize chain), and semantic labels equal the argmax of the resized low-resolution scores."""
    outputs = _random_outputs(seed)
    padded, image_size, output_size = sizes
    things = {0, 1, 2}
    kwargs = dict(padded_size=padded, topk=10)
    official = postprocess(outputs, image_size, output_size, ["panoptic", "instance"], things, **kwargs)
    fast = postprocess(outputs, image_size, output_size, ["panoptic", "instance"], things, mode="fast", **kwargs)
    assert torch.equal(fast["panoptic"]["segment_map"], official["panoptic"]["segment_map"])
    assert fast["panoptic"]["segments_info"] == official["panoptic"]["segments_info"]
    assert fast["panoptic"]["segments_info"], "the case must produce segments"
    fi, oi = fast["instances"], official["instances"]
    assert torch.equal(fi["masks"], oi["masks"]) and torch.equal(fi["labels"], oi["labels"])
    assert torch.equal(fi["boxes"], oi["boxes"])
    assert torch.allclose(fi["scores"], oi["scores"], atol=0.05)  # mask scores averaged at mask resolution

    sem = postprocess(outputs, image_size, output_size, ["semantic"], mode="fast", padded_size=padded)["semantic"]
    low_scores = semantic_inference(outputs["pred_logits"], outputs["pred_masks"])
    ref = _official_full_resolution({"pred_masks": low_scores}, padded, image_size, output_size).argmax(0)
    assert sem.shape == output_size and sem.dtype == torch.int64
    assert torch.equal(sem, ref)


def test_fast_mode_with_edges_everywhere_takes_the_dense_route_and_agrees():
    """Pure-noise masks (edges in every window) make exact evaluation dearer than a resize: same answer."""
    g = torch.Generator().manual_seed(5)
    outputs = {"pred_logits": _class_logits([0, 1, 2, 3] * 3, 5, torch.full((12,), 8.0)),
               "pred_masks": torch.randn(12, 24, 32, generator=g)}
    official = postprocess(outputs, (90, 120), (90, 120), ["panoptic", "instance"], {0, 1}, topk=5)
    fast = postprocess(outputs, (90, 120), (90, 120), ["panoptic", "instance"], {0, 1}, topk=5, mode="fast")
    assert torch.equal(fast["panoptic"]["segment_map"], official["panoptic"]["segment_map"])
    assert torch.equal(fast["instances"]["masks"], official["instances"]["masks"])
    sem = postprocess(outputs, (90, 120), (90, 120), ["semantic"], mode="fast")["semantic"]
    low_scores = semantic_inference(outputs["pred_logits"], outputs["pred_masks"])
    assert torch.equal(sem, _official_full_resolution({"pred_masks": low_scores}, (96, 128), (90, 120), (90, 120)).argmax(0))


def test_panoptic_with_no_confident_query_is_empty_not_an_error():
    """Every query predicts no-object (an untrained model, an empty image): panoptic keeps nothing."""
    outputs = _random_outputs(3)
    outputs["pred_logits"][:, -1] = 50.0  # no-object wins everywhere
    for semantic_first in (False, True):
        result = postprocess(outputs, (40, 50), (40, 50), ["panoptic", "instance"], {0, 1},
                             semantic_before_inference=semantic_first)
        assert result["panoptic"]["segments_info"] == []
        assert result["panoptic"]["segment_map"].shape == (40, 50) and int(result["panoptic"]["segment_map"].max()) == 0
    for mode in ("official", "fast"):
        only = postprocess(outputs, (40, 50), (40, 50), ["panoptic"], {0, 1}, mode=mode)
        assert only["panoptic"]["segments_info"] == [] and only["panoptic"]["segment_map"].shape == (40, 50)


def test_postprocess_rejects_bad_arguments():
    outputs = _random_outputs(0)
    with pytest.raises(ValueError, match="thing_ids"):
        postprocess(outputs, (90, 100), (90, 100), ["panoptic"])
    with pytest.raises(ValueError, match="unknown tasks"):
        postprocess(outputs, (90, 100), (90, 100), ["depth"])
    with pytest.raises(ValueError, match="post-processing mode"):
        postprocess(outputs, (90, 100), (90, 100), ["semantic"], mode="quick")
    with pytest.raises(ValueError, match="return_semantic_scores"):
        postprocess(outputs, (90, 100), (90, 100), ["semantic"], mode="fast", return_semantic_scores=True)
    with pytest.raises(ValueError, match="one image"):
        postprocess({"pred_logits": outputs["pred_logits"][None], "pred_masks": outputs["pred_masks"][None]},
                    (90, 100), (90, 100), ["semantic"])  # fmt: skip


def test_resize_mask_logits_crops_before_resizing():
    logits = torch.arange(4.0).view(1, 1, 4).expand(1, 4, 4)  # value = column index
    out = resize_mask_logits(logits, padded_size=(4, 4), image_size=(4, 2), output_size=(4, 4))
    # only columns 0-1 survive the crop; the bilinear resize spreads them over 4 columns
    assert torch.allclose(out[0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))


# ----------------------------------------------------------------------------------- HF parity
def test_semantic_matches_hf(hf_processor):
    outputs = _random_outputs(4, queries=10, num_classes=6, size=(96, 96))
    ours = postprocess(outputs, (384, 384), (200, 300), ["semantic"], return_semantic_scores=True)
    ref = hf_processor.post_process_semantic_segmentation(
        _hf_outputs(outputs["pred_logits"], outputs["pred_masks"]), target_sizes=[(200, 300)],
        return_segmentation_scores=True,
    )[0]  # fmt: skip
    assert torch.allclose(ours["semantic_scores"], ref.segmentation_scores, atol=1e-5)
    top2 = ref.segmentation_scores.topk(2, dim=0).values
    decided = (top2[0] - top2[1]) > 1e-5
    assert decided.float().mean() > 0.99
    assert torch.equal(ours["semantic"][decided], ref.segmentation[decided])


def _saturated_panoptic_case(seed: int, num_classes: int = 6):
    """Queries grouped by class, saturated 384x384 logits, a kept full-image query for coverage."""
    g = torch.Generator().manual_seed(seed)
    classes, strengths, masks = [], [], []
    for c in range(num_classes):
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            kept = torch.rand(1, generator=g).item() < 0.8
            classes.append(c)
            strengths.append(3.5 + 4 * torch.rand(1, generator=g).item() if kept else 1.0)
            sign = -torch.ones(384, 384)
            y0, x0 = torch.randint(0, 300, (2,), generator=g).tolist()
            h, w = torch.randint(40, 200, (2,), generator=g).tolist()
            sign[y0 : y0 + h, x0 : x0 + w] = 1.0
            masks.append(sign * (3 + 5 * torch.rand(384, 384, generator=g)))
    classes.append(num_classes - 1)  # background stuff query: everywhere, kept, lowest score
    strengths.append(3.4)
    masks.append(3 + 5 * torch.rand(384, 384, generator=g))
    classes.append(num_classes)  # a no-object query
    strengths.append(6.0)
    masks.append(5 * torch.ones(384, 384))
    return _class_logits(classes, num_classes, torch.tensor(strengths)), torch.stack(masks)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_panoptic_matches_hf(hf_processor, seed):
    things, stuff = {0, 1, 2}, {3, 4, 5}
    mask_cls, mask_pred = _saturated_panoptic_case(seed)
    ours = postprocess(
        {"pred_logits": mask_cls, "pred_masks": mask_pred}, (384, 384), (384, 384), ["panoptic"], things,
        padded_size=(384, 384),
    )["panoptic"]  # fmt: skip
    ref = hf_processor.post_process_panoptic_segmentation(
        _hf_outputs(mask_cls, mask_pred), threshold=0.8, overlap_mask_area_threshold=0.8,
        label_ids_to_fuse=stuff, target_sizes=[(384, 384)],
    )[0]  # fmt: skip
    assert len(ours["segments_info"]) >= 3
    assert torch.equal(ours["segment_map"], ref["segmentation"].to(torch.int64))
    ref_info = {}
    for s in ref["segments_info"]:  # HF lists a fused stuff segment once per query
        ref_info.setdefault(s["id"], s)
    assert [(s["id"], s["category"], s["isthing"]) for s in ours["segments_info"]] == [
        (i, s["label_id"], not s["was_fused"]) for i, s in ref_info.items()
    ]
    assert [round(s["score"], 6) for s in ours["segments_info"]] == pytest.approx(
        [s["score"] for s in ref_info.values()], abs=2e-6
    )


def test_instance_matches_hf(hf_processor):
    outputs = _random_outputs(5, queries=10, num_classes=6, size=(96, 96))
    ours = postprocess(outputs, (384, 384), (384, 384), ["instance"], topk=10)["instances"]
    ref = hf_processor.post_process_instance_segmentation(
        _hf_outputs(outputs["pred_logits"], outputs["pred_masks"]), threshold=0.0, return_binary_maps=True
    )[0]
    nonempty = ours["masks"].flatten(1).any(1)
    assert nonempty.sum() == len(ref["segments_info"]) >= 5
    ref_order = sorted(range(len(ref["segments_info"])), key=lambda i: -ref["segments_info"][i]["score"])
    ours_order = torch.argsort(ours["scores"][nonempty], descending=True)
    ours_masks, ours_labels, ours_scores = (ours[k][nonempty][ours_order] for k in ("masks", "labels", "scores"))
    for j, i in enumerate(ref_order):
        info = ref["segments_info"][i]
        assert ours_labels[j].item() == info["label_id"]
        assert ours_scores[j].item() == pytest.approx(info["score"], abs=2e-6)
        assert torch.equal(ours_masks[j], ref["segmentation"][i].bool())
