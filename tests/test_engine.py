"""Training engine: learning actually happens, resume is exact, checkpoints are safe, schedules are right."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from omniseg.engine.checkpoint import Checkpointer
from omniseg.engine.optim import WarmupPolyLR, build_optimizer
from omniseg.data.build import build_datasets
from omniseg.engine.evaluate import evaluate, flat_metrics
from omniseg.engine.trainer import train
from omniseg.models.registry import build_model_from_config
from omniseg.hub import CheckpointError, load_state_dict_file


def _read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_tiny_model_overfits_synthetic_images(make_tiny_config, tmp_path):
    """A tiny Mask2Former on 16 synthetic images: the loss falls and PQ / mIoU rise well above chance."""
    cfg = make_tiny_config("train.max_iters=150", "train.lr=2e-3", "train.clip_grad=1.0", "train.log_period=10",
                           "train.checkpoint_period=1000", "data.scale_range=[1.0,1.0]", "data.photometric=false")
    datasets, meta = build_datasets(cfg)
    torch.manual_seed(0)
    untrained = flat_metrics(evaluate(build_model_from_config(cfg, meta), datasets["train"], cfg, meta, progress=False))
    train(cfg, progress=False)
    log = [r for r in _read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert log[-1]["loss"] < 0.6 * log[0]["loss"], (log[0]["loss"], log[-1]["loss"])
    from omniseg.api import load_model

    model, cfg2, meta2 = load_model(tmp_path / "run" / "model_final.safetensors")
    trained = flat_metrics(evaluate(model, datasets["train"], cfg2, meta2, progress=False))
    assert trained["mIoU"] > untrained["mIoU"] + 20, (untrained, trained)
    assert trained["PQ"] > untrained["PQ"] + 10, (untrained, trained)


def test_zero_periods_mean_only_after_the_last_iteration(make_tiny_config, tmp_path):
    """train.eval_period=0 (likewise checkpoint_period, log_period) switches the periodic action off: it runs
    once, after the last iteration."""
    from omniseg.engine.trainer import due

    assert [i for i in range(1, 11) if due(i, 0, 10)] == [10]
    assert [i for i in range(1, 11) if due(i, 4, 10)] == [4, 8, 10]
    cfg = make_tiny_config("train.max_iters=3", "train.eval_period=0", "train.checkpoint_period=0",
                           "train.log_period=0")
    train(cfg, progress=False)
    records = _read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["iter"] for r in records if "loss" in r] == [3]
    assert [r["iter"] for r in records if "mIoU" in r] == [3]
    assert sorted(p.name for p in (tmp_path / "run").glob("model_*.safetensors")) == [
        "model_0000003.safetensors", "model_final.safetensors"]


def test_resume_is_bit_exact(make_tiny_config, tmp_path):
    """Train 6 iterations straight, or 2 + resume to 4 + resume to 6: identical weights, bit for bit."""
    straight = make_tiny_config("train.max_iters=6", out_dir=tmp_path / "straight")
    train(straight, progress=False)
    interrupted = tmp_path / "interrupted"
    for stop in (2, 4, 6):
        cfg = make_tiny_config("train.max_iters=6", out_dir=interrupted)
        cfg.train.stop_at_iter = stop  # stop (as if killed) right after the checkpoint at `stop`
        train(cfg, resume=stop > 2, progress=False)
    a = load_state_dict_file(tmp_path / "straight" / "model_final.safetensors")
    b = load_state_dict_file(interrupted / "model_final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_without_checkpoint_starts_at_zero_and_weights_init_is_separate(make_tiny_config, tmp_path):
    cfg = make_tiny_config("train.max_iters=2")
    train(cfg, resume=True, progress=False)  # nothing to resume: starts at 0, no crash
    first = tmp_path / "run" / "model_final.safetensors"
    # `train.weights` initialises a NEW run (iteration 0) from those weights: it does not resume.
    cfg2 = make_tiny_config("train.max_iters=2", f"train.weights={first}", out_dir=tmp_path / "finetune")
    train(cfg2, progress=False)
    log = _read_jsonl(tmp_path / "finetune" / "metrics.jsonl")
    assert log[0]["iter"] == 1


def test_damaged_checkpoint_is_refused(make_tiny_config, tmp_path):
    cfg = make_tiny_config("train.max_iters=2")
    train(cfg, progress=False)
    ckpt = Checkpointer(tmp_path / "run")
    weights = tmp_path / "run" / ckpt.last()["weights"]
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside a tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        train(make_tiny_config("train.max_iters=4"), resume=True, progress=False)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_state_dict_file(path)
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_optimizer_groups_and_schedule(make_tiny_config, synth_root):
    cfg = make_tiny_config("train.lr=1e-3", "train.backbone_multiplier=0.1", "train.weight_decay=0.05")
    _, meta = build_datasets(cfg, splits=("val",))
    model = build_model_from_config(cfg, meta)
    opt = build_optimizer(model, dict(cfg.train))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model.backbone.body.conv1.weight)] == pytest.approx(1e-4)
    assert lr_of[id(model.predictor.class_embed.weight)] == pytest.approx(1e-3)
    assert wd_of[id(model.predictor.query_feat.weight)] == 0.0  # embeddings: no weight decay
    assert wd_of[id(model.predictor.decoder_norm.weight)] == 0.0  # norms: no weight decay
    assert wd_of[id(model.predictor.class_embed.weight)] == pytest.approx(0.05)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for p in model.parameters() if p.requires_grad)
    # torch's fused AdamW on CPU: the multi-tensor path's update
    assert opt.defaults["fused"]
    reference = torch.optim.AdamW([{k: (v if k != "params" else [p]) for k, v in g.items()} for g in opt.param_groups
                                   for p in g["params"]], lr=1e-3, weight_decay=0.05, foreach=True)
    clones = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
    gen = torch.Generator().manual_seed(0)
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.randn(p.shape, generator=gen)
    for _ in range(2):
        reference.step()
    updated = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
    with torch.no_grad():
        for g in opt.param_groups:
            for p in g["params"]:
                p.copy_(clones[id(p)])
    for _ in range(2):
        opt.step()
    for g in opt.param_groups:
        for p in g["params"]:
            torch.testing.assert_close(p.detach(), updated[id(p)])
    opt.state.clear()
    sched = WarmupPolyLR(opt, max_iters=100, power=0.9, warmup_iters=10, warmup_factor=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"] / opt.param_groups[0]["initial_lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx((0.1 * 0.5 + 0.5) * (1 - 5 / 100) ** 0.9)
    assert lrs[50] == pytest.approx(0.5 ** 0.9)


def test_gradient_accumulation_matches_larger_batch(make_tiny_config, tmp_path):
    """batch 2 x accumulate 2 takes the same step as batch 4 when the samples are the same."""
    from omniseg.data.transforms import build_transforms
    from omniseg.data.loader import collate
    from omniseg.data.training import TrainingSet, pad_targets

    cfg = make_tiny_config()
    datasets, meta = build_datasets(cfg)
    ts = TrainingSet(datasets["train"], build_transforms(True, size=64, scale_range=(1.0, 1.0), hflip=False,
                                                         photometric=False), "panoptic")
    samples = [ts[(i, i)] for i in range(4)]
    torch.manual_seed(0)
    model = build_model_from_config(cfg, meta).eval()  # eval: BatchNorm statistics independent of batch split
    model.criterion.matcher.num_points = model.criterion.num_points = 8192  # 2x the pixels: matching is stable

    def grads(chunks):
        model.zero_grad()
        for chunk in chunks:
            batch = collate(chunk, 32)
            torch.manual_seed(1)
            losses = model.losses(batch.images, pad_targets([s["targets"] for s in chunk], tuple(batch.images.shape[-2:])))
            (sum(losses.values()) / len(chunks)).backward()
        return model.predictor.class_embed.weight.grad.clone()

    g_full = grads([samples])
    g_acc = grads([samples[:2], samples[2:]])
    # The loss is normalised per batch (num_masks), so equality holds up to that normalisation.
    assert torch.nn.functional.cosine_similarity(g_full.flatten(), g_acc.flatten(), dim=0) > 0.9
