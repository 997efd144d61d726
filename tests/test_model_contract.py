"""The model contract (models/base.py), checked on every preset `omniseg models` lists, shrunk to a tiny
size: a training step, `predict` for every declared task (and a clear refusal of the others), save and
reload, and export (parity with eager, or a clear refusal). A new preset is covered without a new test;
a new family only needs its tiny sizes in TINY (tests/tiny_presets.py)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from typer.testing import CliRunner

from omniseg.api import Predictor, load_model
from omniseg.cli import app
from omniseg.config import list_presets, to_yaml
from omniseg.data.build import build_datasets
from omniseg.data.loader import PadCollate, collate
from omniseg.data.training import build_training_data, pad_targets
from omniseg.engine.checkpoint import save_weights
from omniseg.export import InferenceGraph, export_model, load_exported
from omniseg.models.base import Segmenter
from omniseg.models.registry import build_model_from_config, families
from omniseg.tasks import TASKS
from omniseg.tiling import TileSettings, predict_tiled
from tiny_presets import TINY, tiny_config


def test_every_family_has_tiny_sizes():
    assert {f.name for f in families()} <= set(TINY)


def _training_batch(cfg, dataset):
    train_set, sampler = build_training_data(cfg, dataset)
    batch = PadCollate(cfg.data.size_divisibility)([train_set[i] for i in next(iter(sampler))])
    targets = pad_targets([s["targets"] for s in batch.samples], tuple(batch.images.shape[-2:]))
    return batch.images, targets


def _check_prediction(pred: dict, task: str, size: tuple[int, int], num_classes: int) -> None:
    h, w = size
    if task == "semantic":
        sem = pred["semantic"]
        assert sem.dtype == torch.int64 and tuple(sem.shape) == (h, w)
        assert int(sem.min()) >= 0 and int(sem.max()) < num_classes
    elif task == "panoptic":
        pan = pred["panoptic"]
        seg = pan["segment_map"]
        assert seg.dtype == torch.int64 and tuple(seg.shape) == (h, w)
        ids = {int(s["id"]) for s in pan["segments_info"]}
        assert set(torch.unique(seg).tolist()) - {0} <= ids
        for s in pan["segments_info"]:
            assert {"id", "category", "isthing", "score"} <= set(s) and 0 <= int(s["category"]) < num_classes
    else:
        inst = pred["instances"]
        n = inst["masks"].shape[0]
        assert inst["masks"].dtype == torch.bool and tuple(inst["masks"].shape) == (n, h, w)
        assert inst["labels"].dtype == torch.int64 and tuple(inst["labels"].shape) == (n,)
        assert inst["scores"].dtype == torch.float32 and tuple(inst["scores"].shape) == (n,)
        assert inst["boxes"].dtype == torch.float32 and tuple(inst["boxes"].shape) == (n, 4)
        if n:
            assert int(inst["labels"].min()) >= 0 and int(inst["labels"].max()) < num_classes


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("preset", list_presets())
def test_preset_honours_the_model_contract(preset, synth_root, tmp_path):
    cfg = tiny_config(preset, synth_root, tmp_path / "run")
    datasets, meta = build_datasets(cfg)
    torch.manual_seed(0)
    model = build_model_from_config(cfg, meta)
    assert isinstance(model, Segmenter)
    assert set(model.tasks) <= set(TASKS) and model.tasks
    assert model.default_task is None or model.default_task in model.tasks
    assert all(hasattr(model, name) for name in model.training_only), model.training_only  # (may be None)
    assert 0 < model.seen_classes <= model.num_classes == meta.num_classes

    # A training step: finite losses and gradients, some of them non-zero.
    images, targets = _training_batch(cfg, datasets["train"])
    model.train()
    losses = model(images, targets)
    assert losses and all(v.dim() == 0 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)

    # predict: the documented keys, dtypes and shapes for each declared task, at the output size asked.
    model.eval()
    images = images[:1]
    sizes, out_sizes = [(64, 48)], [(40, 36)]
    for task in model.tasks:
        pred = model.predict(images, sizes, out_sizes, tasks=[task])[0]
        _check_prediction(pred, task, out_sizes[0], meta.num_classes)
    every = model.predict(images, sizes, out_sizes)[0]
    for task in model.tasks:
        _check_prediction(every, task, out_sizes[0], meta.num_classes)
    for task in set(TASKS) - set(model.tasks):
        with pytest.raises(ValueError, match=f"predicts .*not {task}"):
            model.predict(images, sizes, tasks=[task])
    with pytest.raises(ValueError, match="unknown task"):
        model.predict(images, sizes, tasks=["depth"])

    # query decoders: every prediction set, the last one the exported output
    with torch.no_grad():
        layers = model.query_layers(model.normalize(images))
        if layers is not None:
            raw = model.forward_raw(model.normalize(images), **model.raw_forward_options())
            assert len(layers) in (model.settings.dec_layers, model.settings.dec_layers + 1)  # + the initial queries
            for name in model.raw_output_names:
                torch.testing.assert_close(layers[-1][name], raw[name], rtol=1e-4, atol=1e-4)

    # post-processing modes: the declared ones are accepted, anything else is refused with the reason.
    for mode in (*model.postprocess_modes, *model.postprocess_modes[:1]):  # ends on the first (the default)
        model.set_postprocess_mode(mode)
    with pytest.raises(ValueError, match="post-processing mode 'sloppy'"):
        model.set_postprocess_mode("sloppy")

    # semantic_scores: per-class scores whose argmax is the semantic prediction, where the family has them.
    if "semantic" in model.tasks:
        scored = model.predict(images, sizes, out_sizes, tasks=["semantic"], semantic_scores=True)[0]
        if "semantic_scores" in scored:
            assert tuple(scored["semantic_scores"].shape) == (model.seen_classes, *out_sizes[0])
            assert torch.equal(scored["semantic_scores"].argmax(0), scored["semantic"])

    # tiled: one tile covering the image predicts what the whole image does (instances above the tiles'
    # least score); overlapping tiles give the documented outputs, with instance masks as crops.
    crop = images[0, :, :64, :48]
    whole = model.predict(collate([{"image": crop}], cfg.data.size_divisibility).images, sizes, tasks=model.tasks)[0]
    one_tile = predict_tiled(model, crop, model.tasks, TileSettings(size=64))
    for task in model.tasks:
        _check_prediction(one_tile, task, (64, 48), meta.num_classes)
    if "semantic" in model.tasks:
        assert torch.equal(one_tile["semantic"], whole["semantic"])
    if "instance" in model.tasks:  # (instance alone: next to panoptic, instances are things only)
        whole = model.predict(collate([{"image": crop}], cfg.data.size_divisibility).images, sizes,
                              tasks=["instance"])[0]["instances"]
        one_tile = predict_tiled(model, crop, ["instance"], TileSettings(size=64))["instances"]
        kept = (whole["scores"] >= 0.05) & whole["masks"].flatten(1).any(1)
        order = whole["scores"][kept].argsort(descending=True, stable=True)
        assert torch.equal(one_tile["masks"].dense(), whole["masks"][kept][order])
        assert torch.equal(one_tile["labels"], whole["labels"][kept][order])
    tiles = predict_tiled(model, crop, model.tasks, TileSettings(size=32, overlap=8, batch=2))
    for task in model.tasks:
        _check_prediction(tiles, task, (64, 48), meta.num_classes)

    # save -> load_model: the same configuration and the same predictions.
    path = tmp_path / "model.safetensors"
    save_weights(path, model, config_yaml=to_yaml(cfg), meta=meta.to_dict())
    loaded, loaded_cfg, loaded_meta = load_model(path)
    assert OmegaConf.to_container(loaded_cfg.model) == OmegaConf.to_container(cfg.model)
    assert loaded_meta.classes == meta.classes
    assert _same(loaded.predict(images, sizes, out_sizes), model.predict(images, sizes, out_sizes))
    if not model.postprocess_modes:  # a Predictor asked for `fast` post-processing says there is none
        with pytest.raises(ValueError, match=f"{path}: post-processing mode 'fast'.*one fixed post-processing"):
            Predictor(path, postprocess="fast")

    # export: parity with the eager network, or a refusal that says why.
    reason = model.export_refusal()
    if reason is not None:
        assert model.describe() in reason and "export" in reason
        with pytest.raises(ValueError) as refused:
            export_model(model, tmp_path / "model.pt2", height=64, width=64, meta=meta)
        assert str(refused.value) == reason and not (tmp_path / "model.pt2").exists()
        result = CliRunner().invoke(app, ["export", "-w", str(path), "-o", str(tmp_path / "x.onnx"),
                                          "--height", "64", "--width", "64"])
        assert result.exit_code == 2 and result.output == f"error: {reason}\n", result.output
        return
    graph = InferenceGraph(model).eval()
    out = tmp_path / "model.pt2"
    export_model(model, out, fmt="torch-export", height=64, width=64, meta=meta)
    probe = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = graph(probe)
    exported = load_exported(out)(probe)
    assert len(exported) == len(eager) == len(model.raw_output_names)
    for a, b in zip(exported, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
