"""Shared fixtures: a tiny synthetic dataset and a tiny model config, so engine tests stay fast."""

from __future__ import annotations

import pytest
import torch

from omniseg.config import load_config

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def single_thread():
    """Per-image data code is dominated by thread start-up on a busy 2-core machine: run it on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    from omniseg.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synth") / "data", num_train=16, num_val=6, image_size=64, seed=3)


TINY_MODEL = [
    "model.backbone=resnet18",
    "model.backbone_norm=bn",
    "model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [16, 32, 64, 64]}",
    "model.hidden_dim=32", "model.conv_dim=32", "model.mask_dim=32", "model.nheads=2",
    "model.dim_feedforward=64", "model.enc_layers=1", "model.enc_dim_feedforward=64",
    "model.num_queries=8", "model.dec_layers=3", "model.loss.train_num_points=256",
    "model.test.object_mask_threshold=0.5",
]
# OneFormer's text mapper sized to TINY_MODEL (training only; 2 context vectors of the 8 queries).
TINY_TEXT = ["model.oneformer.n_ctx=2", "model.oneformer.text_width=32", "model.oneformer.text_layers=1",
             "model.oneformer.text_vocab_size=32", "model.oneformer.text_context_length=8"]


def tiny_config(synth_root, out_dir, *extra: str):
    """The demo preset shrunk to a model that trains in seconds on 64 px images."""
    overrides = [
        *TINY_MODEL,
        f"data.train.root={synth_root}", f"data.val.root={synth_root}",
        "data.crop_size=64", "data.scale_range=[0.8,1.2]", "data.batch_size=4", "data.num_workers=0",
        f"train.output_dir={out_dir}", "train.max_iters=4", "train.eval_period=1000", "train.checkpoint_period=2",
        "train.log_period=1", "train.warmup_iters=0", "train.amp=none",
        *extra,
    ]
    return load_config("mask2former_demo", overrides)


@pytest.fixture
def make_tiny_config(synth_root, tmp_path):
    def make(*extra: str, out_dir=None):
        return tiny_config(synth_root, out_dir or tmp_path / "run", *extra)

    return make
