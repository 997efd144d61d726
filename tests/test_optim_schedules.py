"""Optimisers, parameter-group rules, learning-rate schedules and the weight average (engine/optim.py)."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from omniseg.data.build import build_datasets
from omniseg.engine.checkpoint import Checkpointer
from omniseg.engine.optim import ModelEMA, WarmupLR, build_ema, build_optimizer, build_scheduler, parameter_rules
from omniseg.engine.trainer import train
from omniseg.hub import load_state_dict_file
from omniseg.models.registry import build_model_from_config
from omniseg.schema import ConfigError

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _groups_before_options(model, cfg):
    """The parameter groups as omniseg formed them before optimisers and rules were configurable:
    backbone lr x backbone_multiplier, weight_decay_norm on norm layers, weight_decay_embed on embeddings
    and Swin position tables, weight_decay elsewhere; one group per (lr, wd) in first-seen order."""
    lr, wd = cfg["lr"], cfg["weight_decay"]
    in_backbone = {id(p) for p in model.backbone.parameters()}
    groups, seen = {}, set()
    for _, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            p_lr = lr * cfg["backbone_multiplier"] if id(p) in in_backbone else lr
            p_wd = wd
            if isinstance(module, _NORMS):
                p_wd = cfg["weight_decay_norm"]
            elif (isinstance(module, nn.Embedding) or "relative_position_bias_table" in name
                  or "absolute_pos_embed" in name):
                p_wd = cfg["weight_decay_embed"]
            groups.setdefault((p_lr, p_wd), []).append(p)
    return groups


def _poly_before_options(it, max_iters, power, warmup_iters, warmup_factor):
    warm = 1.0
    if it < warmup_iters:
        alpha = it / max(1, warmup_iters)
        warm = warmup_factor * (1 - alpha) + alpha
    return warm * max(0.0, 1.0 - it / max_iters) ** power


@pytest.fixture
def tiny_model(make_tiny_config):
    cfg = make_tiny_config("train.lr=1e-3", "train.weight_decay=0.05", "train.backbone_multiplier=0.1")
    _, meta = build_datasets(cfg, splits=("val",))
    return cfg, build_model_from_config(cfg, meta)


def _lrs(optimizer, scheduler, iters):
    """lr of every group before each of `iters` iterations."""
    out = []
    for _ in range(iters):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def test_defaults_keep_the_earlier_groups_and_learning_rates(tiny_model):
    cfg, model = tiny_model
    settings = OmegaConf.to_container(cfg.train, resolve=True)
    settings.update(max_iters=60, warmup_iters=7, warmup_factor=0.25)
    expected = _groups_before_options(model, settings)
    opt = build_optimizer(model, settings)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == list(expected)
    for g, ps in zip(opt.param_groups, expected.values()):
        assert [id(p) for p in g["params"]] == [id(p) for p in ps]
    sched = build_scheduler(opt, settings)
    for it, lrs in enumerate(_lrs(opt, sched, 61)):
        for g, lr in zip(opt.param_groups, lrs):
            assert lr == g["initial_lr"] * _poly_before_options(it, 60, 0.9, 7, 0.25), it  # bit-equal


def _toy_optimizer(lrs=(0.01, 0.001)):
    params = [nn.Parameter(torch.zeros(2)) for _ in lrs]
    return torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)], lr=lrs[0])


def _warm(it, kind, iters, factor):
    if it >= iters:
        return 1.0
    return factor if kind == "constant" else factor * (1 - it / iters) + it / iters


@pytest.mark.parametrize("warmup", ["linear", "constant"])
@pytest.mark.parametrize("schedule", ["poly", "step", "cosine"])
def test_schedule_and_warmup_match_hand_computed_values(schedule, warmup):
    max_iters, steps, gamma, power, min_lr = 100, [30, 80], 0.1, 0.9, 1e-4
    opt = _toy_optimizer()
    sched = WarmupLR(opt, max_iters, schedule=schedule, power=power, steps=steps, gamma=gamma, min_lr=min_lr,
                     warmup=warmup, warmup_iters=10, warmup_factor=0.001)
    seen = _lrs(opt, sched, max_iters + 1)
    for it in (0, 1, 5, 9, 10, 29, 30, 31, 50, 79, 80, 99, 100):
        for base, lr in zip((0.01, 0.001), seen[it]):
            if schedule == "poly":
                main = (base - min_lr) * (1 - it / max_iters) ** power + min_lr
            elif schedule == "cosine":
                main = (base - min_lr) * 0.5 * (1 + math.cos(math.pi * it / max_iters)) + min_lr
            else:
                main = base * gamma ** sum(it >= s for s in steps)  # min_lr does not apply to steps
            assert lr == pytest.approx(_warm(it, warmup, 10, 0.001) * main, rel=1e-12), (it, base)
    if schedule == "step":
        assert seen[29][0] == pytest.approx(0.01) and seen[30][0] == pytest.approx(0.001)
        assert seen[80][0] == pytest.approx(0.0001)
    else:
        assert seen[max_iters][0] == pytest.approx(min_lr)


def test_poly_with_min_lr_matches_mmengine_polylr():
    """MMSegmentation's schedules: PolyLR(eta_min=1e-4, power=0.9, end=E) over SGD lr 0.01, no warmup; its
    decay reaches eta_min at E - 1."""
    scheduler = pytest.importorskip("mmengine.optim.scheduler")
    ours, theirs = _toy_optimizer(), _toy_optimizer()
    mine = build_scheduler(ours, {"max_iters": 200, "min_lr": 1e-4, "poly_power": 0.9, "warmup_iters": 0,
                                  "decay_iters": 199})
    ref = scheduler.PolyLR(theirs, eta_min=1e-4, power=0.9, begin=0, end=200, by_epoch=False)
    assert ours.param_groups[0]["lr"] == 0.01
    for it in range(200):
        for a, b in zip(ours.param_groups, theirs.param_groups):
            assert a["lr"] == pytest.approx(b["lr"], rel=1e-9, abs=1e-15), it
        ours.step(), theirs.step()
        mine.step(), ref.step()
    assert ours.param_groups[0]["lr"] == pytest.approx(1e-4) and ours.param_groups[1]["lr"] == pytest.approx(1e-4)


def test_bad_schedule_settings_are_refused():
    with pytest.raises(ValueError, match="increasing"):
        WarmupLR(_toy_optimizer(), 10, schedule="step", steps=[8, 3])
    with pytest.raises(ValueError, match="train.schedule"):
        WarmupLR(_toy_optimizer(), 10, schedule="exp")


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, 4, 3))
        self.stem = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.BatchNorm1d(5))
        self.query = nn.Embedding(2, 5)
        self.decode_head = nn.Linear(5, 2)
        self.aux_head = nn.Linear(5, 2)

    def forward(self, x):
        return self.decode_head(self.stem((x + self.pos_embed).mean(1))) + self.aux_head(self.query.weight).sum()


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_step_equals_torch_sgd(nesterov):
    torch.manual_seed(0)
    model = _Toy()
    settings = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": nesterov, "weight_decay": 5e-4,
                "weight_decay_norm": 5e-4, "weight_decay_embed": 5e-4}
    opt = build_optimizer(model, settings)
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 1
    reference_model = _Toy()
    reference_model.load_state_dict(model.state_dict())
    reference = torch.optim.SGD(reference_model.parameters(), lr=0.01, momentum=0.9, nesterov=nesterov,
                                weight_decay=5e-4)
    for step in range(3):
        x = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(step))
        for m, o in ((model, opt), (reference_model, reference)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for (name, a), b in zip(model.named_parameters(), reference_model.parameters()):
        assert torch.equal(a, b), name


def test_parameter_rules_per_name():
    settings = {"lr": 0.01, "weight_decay": 0.05, "weight_decay_norm": 0.0, "weight_decay_embed": 0.001,
                "weight_decay_bias": 0.002,
                "custom_keys": {"head": {"lr_mult": 10.0}, "aux_head": {"lr_mult": 2.0, "decay_mult": 0.5},
                                "pos_embed": {"decay_mult": 0.0}}}
    got = {name: (lr, wd) for name, _, lr, wd in parameter_rules(_Toy(), settings)}
    assert got == {
        "pos_embed": (0.01, 0.0),                   # custom key: no decay
        "stem.0.weight": (0.01, 0.05),
        "stem.0.bias": (0.01, 0.002),               # weight_decay_bias
        "stem.1.weight": (0.01, 0.0), "stem.1.bias": (0.01, 0.0),  # norms: weight_decay_norm
        "stem.2.weight": (0.01, 0.0), "stem.2.bias": (0.01, 0.0),
        "query.weight": (0.01, 0.001),              # embedding: weight_decay_embed
        "decode_head.weight": (pytest.approx(0.1), 0.05), "decode_head.bias": (pytest.approx(0.1), 0.002),
        "aux_head.weight": (0.02, 0.025),           # the longest matching key decides, not "head"
        "aux_head.bias": (0.02, 0.001),
    }
    with pytest.raises(ConfigError, match="match no trainable parameter"):
        parameter_rules(_Toy(), {**settings, "custom_keys": {"pos_embedding": {"decay_mult": 0.0}}})
    with pytest.raises(ConfigError, match="unknown field"):
        parameter_rules(_Toy(), {**settings, "custom_keys": {"head": {"lr_multiplier": 10}}})


def test_backbone_multiplier_and_custom_keys_combine_on_a_segmenter(tiny_model):
    cfg, model = tiny_model
    settings = OmegaConf.to_container(cfg.train, resolve=True)
    settings["custom_keys"] = {"class_embed": {"lr_mult": 10.0}, "backbone.body.conv1": {"decay_mult": 0.0}}
    rules = {name: (lr, wd) for name, _, lr, wd in parameter_rules(model, settings)}
    assert rules["backbone.body.conv1.weight"] == (pytest.approx(1e-4), 0.0)
    assert rules["predictor.class_embed.weight"] == (pytest.approx(1e-2), 0.05)
    assert rules["predictor.query_feat.weight"] == (1e-3, 0.0)
    opt = build_optimizer(model, settings)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_equals_the_hand_computed_average(warmup):
    torch.manual_seed(0)
    model = _Toy()
    ema = build_ema(model, {"ema": {"enabled": True, "decay": 0.8, "warmup": warmup}})
    assert build_ema(model, {"ema": {"enabled": False}}) is None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = {k: v.detach().clone().double() for k, v in model.named_parameters()}
    for n in range(5):
        opt.zero_grad()
        model(torch.randn(6, 4, 3)).square().mean().backward()
        opt.step()
        ema.update(model)
        decay = min(0.8, (1 + n) / (10 + n)) if warmup else 0.8
        for k, p in model.named_parameters():
            expected[k] = decay * expected[k] + (1 - decay) * p.detach().double()
    assert ema.updates == 5
    for k, p in ema.module.named_parameters():
        torch.testing.assert_close(p.double(), expected[k], rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, dict(model.named_parameters())[k]), k
    bn = ema.module.stem[2]
    assert torch.equal(bn.running_mean, model.stem[2].running_mean)  # buffers follow the model
    assert int(bn.num_batches_tracked) == 5 and not ema.module.training


def test_ema_parameters_match_timm_model_ema_v2():
    model_ema = pytest.importorskip("timm.utils.model_ema")
    torch.manual_seed(0)
    model = _Toy()
    ours, theirs = ModelEMA(model, decay=0.9), model_ema.ModelEmaV2(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(6, 4, 3)).square().mean().backward()
        opt.step()
        ours.update(model), theirs.update(model)
    reference = dict(theirs.module.named_parameters())
    for name, p in ours.module.named_parameters():
        torch.testing.assert_close(p, reference[name], rtol=1e-6, atol=1e-7)


def test_ema_training_resumes_bit_exactly_and_is_evaluated_and_saved(make_tiny_config, tmp_path, monkeypatch):
    import omniseg.engine.trainer as trainer

    evaluated = []
    real_evaluate = trainer.evaluate

    def recording_evaluate(model, *args, **kwargs):
        evaluated.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", recording_evaluate)
    common = ("train.max_iters=4", "train.ema.enabled=true", "train.ema.decay=0.7", "train.eval_period=4",
              "train.checkpoint_period=1", "train.save_best=mIoU")
    straight = tmp_path / "straight"
    train(make_tiny_config(*common, out_dir=straight), progress=False)
    interrupted = tmp_path / "interrupted"
    for stop in (2, 4):
        cfg = make_tiny_config(*common, out_dir=interrupted)
        cfg.train.stop_at_iter = stop
        train(cfg, resume=stop > 2, progress=False)

    a = load_state_dict_file(straight / "model_final.safetensors")
    b = load_state_dict_file(interrupted / "model_final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # model_final holds the average, not the trained weights of the last checkpoint ...
    trained = load_state_dict_file(straight / "model_0000004.safetensors")
    assert any(not torch.equal(a[k], trained[k]) for k in a if a[k].is_floating_point())
    state = torch.load(straight / "state_0000004.pt", weights_only=True)
    assert state["ema"]["updates"] == 4
    assert all(torch.equal(a[k], state["ema"]["weights"][k]) for k in a)
    # ... and the average is what validation scored (once per run at iteration 4)
    assert len(evaluated) == 2
    for weights in evaluated:
        assert all(torch.equal(weights[k], a[k]) for k in a)
    best = load_state_dict_file(straight / "model_best.safetensors")
    assert all(torch.equal(best[k], a[k]) for k in a)


def test_ema_missing_from_a_checkpoint_restarts_at_the_resumed_weights(make_tiny_config, tmp_path):
    run = tmp_path / "run"
    cfg = make_tiny_config("train.max_iters=4", out_dir=run)
    cfg.train.stop_at_iter = 2
    train(cfg, progress=False)
    model = build_model_from_config(cfg, build_datasets(cfg, splits=("val",))[1])
    settings = OmegaConf.to_container(cfg.train, resolve=True)
    opt = build_optimizer(model, settings)
    ema = ModelEMA(model, decay=0.9)
    Checkpointer(run).resume(model, opt, build_scheduler(opt, settings), ema=ema)
    trained = load_state_dict_file(run / "model_0000002.safetensors")
    assert ema.updates == 0
    assert all(torch.equal(v, trained[k]) for k, v in ema.module.state_dict().items())
