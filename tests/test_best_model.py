"""train.save_best keeps the best-scoring weights (metric and iteration in their metadata);
train.early_stop_patience ends a run that stopped improving; both survive --resume exactly."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from omniseg.api import load_model
from omniseg.data.build import build_datasets
from omniseg.engine.checkpoint import read_weights_metadata
from omniseg.engine.evaluate import evaluate, flat_metrics
from omniseg.engine.trainer import BestModel, check_best_settings, train
from omniseg.schema import ConfigError


def _evals(run):
    return [json.loads(line) for line in open(run / "metrics.jsonl") if "mIoU" in line]


def test_best_model_tracker():
    best = BestModel("mIoU", patience=2)
    assert best.update(1, {"mIoU": 3.0}) and best.update(2, {"mIoU": 4.0})
    assert not best.update(3, {"mIoU": 4.0}) and not best.exhausted  # a tie is no improvement
    assert not best.update(4, {"mIoU": math.nan}) and best.exhausted
    assert best.state() == {"metric": "mIoU", "value": 4.0, "iteration": 2, "stale": 2}
    again = BestModel("mIoU", patience=2)
    again.load(best.state())
    assert again.state() == best.state() and again.exhausted


def test_settings_are_checked_before_training(make_tiny_config):
    cfg = make_tiny_config("train.save_best=mIOU")
    with pytest.raises(ConfigError, match=r"'mIOU' is not a metric.*did you mean mIoU"):
        check_best_settings(cfg, has_val=True)
    with pytest.raises(ConfigError, match="needs train.save_best"):
        check_best_settings(make_tiny_config("train.early_stop_patience=2"), has_val=True)
    with pytest.raises(ConfigError, match="needs a validation split"):
        check_best_settings(make_tiny_config("train.save_best=PQ"), has_val=False)
    with pytest.raises(ConfigError, match="at least 1"):
        check_best_settings(make_tiny_config("train.save_best=PQ", "train.early_stop_patience=0"), has_val=True)


def test_model_best_holds_the_best_evaluation(make_tiny_config, tmp_path):
    cfg = make_tiny_config("train.max_iters=4", "train.eval_period=1", "train.save_best=mIoU")
    train(cfg, progress=False)
    run = tmp_path / "run"
    scores = {r["iter"]: r["mIoU"] for r in _evals(run)}
    best_iteration = max(scores, key=lambda i: (scores[i], -i))
    info = read_weights_metadata(run / "model_best.safetensors")["info"]["best"]
    assert info["metric"] == "mIoU" and info["iteration"] == best_iteration
    assert info["value"] == pytest.approx(scores[best_iteration])
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["best"]["iteration"] == best_iteration and final["stopped_early"] is False
    # the kept weights score exactly that value again
    model, saved_cfg, meta = load_model(run / "model_best.safetensors")
    datasets, _ = build_datasets(saved_cfg, splits=("val",))
    assert flat_metrics(evaluate(model, datasets["val"], saved_cfg, meta, progress=False))["mIoU"] == info["value"]


def test_early_stopping_ends_a_run_that_stopped_improving(make_tiny_config, tmp_path):
    """lr 0 and frozen BatchNorm: the model cannot change, so the second evaluation is no improvement."""
    cfg = make_tiny_config("train.max_iters=6", "train.eval_period=1", "train.lr=0", "model.backbone_norm=frozen_bn",
                           "train.save_best=mIoU", "train.early_stop_patience=1")
    train(cfg, progress=False)
    run = tmp_path / "run"
    assert [r["iter"] for r in _evals(run)] == [1, 2]
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["stopped_early"] is True and final["iteration"] == 2 and final["best"]["iteration"] == 1
    assert (run / "model_final.safetensors").is_file()
    # resuming a run that stopped early trains nothing more
    train(cfg, resume=True, progress=False)
    assert [r["iter"] for r in _evals(run)] == [1, 2]


def test_save_best_and_patience_resume_exactly(make_tiny_config, tmp_path):
    overrides = ("train.max_iters=5", "train.eval_period=1", "train.checkpoint_period=1", "train.save_best=mIoU",
                 "train.early_stop_patience=3")
    train(make_tiny_config(*overrides, out_dir=tmp_path / "straight"), progress=False)
    for stop in (2, 4, 5):
        cfg = make_tiny_config(*overrides, out_dir=tmp_path / "interrupted")
        cfg.train.stop_at_iter = stop
        train(cfg, resume=stop > 2, progress=False)
    a, b = tmp_path / "straight", tmp_path / "interrupted"
    assert read_weights_metadata(a / "model_best.safetensors")["info"] == \
        read_weights_metadata(b / "model_best.safetensors")["info"]
    wa, wb = load_file(a / "model_best.safetensors"), load_file(b / "model_best.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)
    fa, fb = (json.loads((r / "final_metrics.json").read_text()) for r in (a, b))
    assert fa["best"] == fb["best"] and fa["stopped_early"] == fb["stopped_early"] and fa["iteration"] == fb["iteration"]
