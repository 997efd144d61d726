"""Class imbalance: per-class loss weights in every family (model.loss.class_weights, BlendMask's
model.blendmask.class_weights) and LVIS repeat-factor sampling (data.repeat_factor_threshold)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY_MODEL
from omniseg.config import load_config
from omniseg.data.sampling import ResumableBatchSampler, repeat_factors
from omniseg.models.registry import build_model
from tiny_presets import TINY

K = 6  # the synthetic classes: 4 things, 2 stuff
THINGS = [0, 1, 2, 3]


def _targets(stuff: bool = True):
    torch.manual_seed(0)
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    out = []
    for i in range(2):
        masks, labels = [], []
        for c, (y, x) in zip((1 + i, 3), ((8, 8), (36, 30))):
            m = torch.zeros(64, 64, dtype=torch.bool)
            m[y:y + 20, x:x + 24] = True
            masks.append(m)
            labels.append(c)
        if stuff:
            masks.append(~torch.stack(masks).any(0))
            labels.append(4)
        out.append({"labels": torch.tensor(labels), "masks": torch.stack(masks), "seed": i, "task": "panoptic"})
    return images, out


def _settings(preset: str, *extra: str) -> dict:
    from omegaconf import OmegaConf

    family = {"mask2former_demo": "maskformer", "segvit_demo": "segvit", "maskrcnn_demo": "rcnn",
              "blendmask_panoptic_demo": "blendmask"}[preset]
    base = list(TINY_MODEL) if family == "maskformer" else []
    if family in ("rcnn", "blendmask"):
        base = ["model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [16, 32, 64, 64]}", *TINY[family]]
    if family == "segvit":
        base = ["model.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2}",
                "model.vit_out_indices=[1,2,3]", *TINY["segvit"]]
    return OmegaConf.to_container(load_config(preset, [*base, *extra]).model, resolve=True)


CASES = {  # preset -> (the weights' key, the class loss term)
    "mask2former_demo": ("model.loss.class_weights", "loss_ce"),
    "segvit_demo": ("model.loss.class_weights", "loss_ce"),
    "maskrcnn_demo": ("model.loss.class_weights", "loss_classifier"),
    "blendmask_panoptic_demo": ("model.blendmask.class_weights", "loss_fcos_cls"),
}


def _losses(preset: str, weights):
    key = CASES[preset][0]
    extra = [] if weights is None else [f"{key}=[{','.join(map(str, weights))}]"]
    torch.manual_seed(0)
    model = build_model(_settings(preset, *extra), num_classes=K, thing_ids=THINGS).train()
    images, targets = _targets(stuff=preset != "maskrcnn_demo")
    if preset == "segvit_demo":  # semantic targets: one mask per class
        targets = [{**t, "task": "semantic"} for t in targets]
    torch.manual_seed(1)  # the samplers of the two-stage heads draw from the global stream
    return {k: float(v.detach()) for k, v in model(images, targets).items()}


@pytest.mark.parametrize("preset", list(CASES))
def test_class_weights_scale_only_the_class_term(preset):
    term = CASES[preset][1]
    plain = _losses(preset, None)
    ones = _losses(preset, [1.0] * K)
    assert ones == pytest.approx(plain, rel=1e-6, abs=1e-7)  # weights of 1 change nothing
    weighted = _losses(preset, [1.0, 1.0, 1.0, 4.0, 1.0, 1.0])  # class 3 is in both images
    assert weighted[term] != pytest.approx(plain[term], rel=1e-4)
    others = {k: v for k, v in weighted.items() if k != term and not k.startswith(term + "_")}
    assert others == pytest.approx({k: plain[k] for k in others}, rel=1e-6, abs=1e-7)


def test_class_weights_must_match_the_classes():
    with pytest.raises(ValueError, match=r"model\.loss\.class_weights has 2 entries for 6 classes"):
        build_model(_settings("mask2former_demo", "model.loss.class_weights=[1,2]"), num_classes=K)
    with pytest.raises(ValueError, match="must not be negative"):
        build_model(_settings("mask2former_demo", "model.loss.class_weights=[1,1,1,1,1,-1]"), num_classes=K)


def test_the_criterion_weighs_each_class_and_keeps_no_object_weight():
    model = build_model(_settings("mask2former_demo", "model.loss.class_weights=[1,2,3,4,5,6]"), num_classes=K)
    assert model.criterion.empty_weight.tolist() == pytest.approx([1, 2, 3, 4, 5, 6, 0.1])


def test_repeat_factors_follow_lvis():
    categories = [{0}, {0}, {0}, {0, 1}, {2}, set()]  # class 0 in 4/6 images, 1 and 2 in 1/6 each
    factors = repeat_factors(categories, threshold=0.5)
    rare = math.sqrt(0.5 / (1 / 6))
    assert factors == pytest.approx([1.0, 1.0, 1.0, rare, rare, 1.0])


def test_repeat_factor_sampler_is_resumable_sharded_and_repeats_rare_images():
    factors = [1.0] * 18 + [2.5, 3.0]
    sampler = ResumableBatchSampler(20, 4, seed=3, repeat_factors=factors)
    stream = iter(sampler)
    first = [next(stream) for _ in range(60)]
    # batch k is a function of (seed, k): a sampler started at batch 37 (a resume) continues identically
    resumed = iter(ResumableBatchSampler(20, 4, seed=3, start_batch=37, repeat_factors=factors))
    assert [next(resumed) for _ in range(23)] == first[37:]
    counts = torch.bincount(torch.tensor([i for b in first for i, _ in b]), minlength=20).float()
    assert counts[18] / counts[:18].mean() == pytest.approx(2.5, rel=0.3)
    assert counts[19] / counts[:18].mean() == pytest.approx(3.0, rel=0.3)
    # two ranks take disjoint halves of each global batch
    ranks = [ResumableBatchSampler(20, 2, seed=3, rank=r, world_size=2, repeat_factors=factors) for r in range(2)]
    for k in range(10):
        a, b = (s.batch(k) for s in ranks)
        assert sorted(i for i, _ in a + b) == sorted(i for i, _ in first[k])
    with pytest.raises(ValueError, match="one factor >= 1 per sample"):
        ResumableBatchSampler(20, 4, repeat_factors=[0.5] * 20)


def test_the_engine_trains_with_repeat_factor_sampling(make_tiny_config, tmp_path, capsys):
    from omniseg.engine.trainer import train

    train(make_tiny_config("data.repeat_factor_threshold=0.9", "train.max_iters=2"), progress=False)
    assert "repeat-factor sampling (t = 0.9)" in capsys.readouterr().out
    assert (tmp_path / "run" / "model_final.safetensors").is_file()
