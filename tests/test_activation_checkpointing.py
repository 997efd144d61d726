"""model.activation_checkpointing: the same losses and gradients, with blocks recomputed in backward."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_MODEL, TINY_TEXT
from omniseg.config import load_config
from omniseg.models.registry import build_model


def _model(preset: str, checkpointing: bool):
    text = TINY_TEXT if preset.startswith("oneformer") else []
    cfg = load_config(preset, [*TINY_MODEL, *text, f"model.activation_checkpointing={str(checkpointing).lower()}"])
    torch.manual_seed(0)
    return build_model(OmegaConf.to_container(cfg.model, resolve=True), num_classes=3, thing_ids=[0, 1]).train()


def _step(model):
    torch.manual_seed(2)  # OneFormer's query initialiser has dropout: same stream for both models
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, :32], masks[1, 32:] = True, True
    targets = [{"labels": torch.tensor([0, 2]), "masks": masks, "seed": i, "task": "panoptic"} for i in range(2)]
    losses = model.losses(images, targets)
    total = sum(losses.values())
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["mask2former_demo", "oneformer_demo"])
def test_checkpointing_gives_the_same_gradients_and_recomputes_blocks(preset):
    plain, checkpointed = _model(preset, False), _model(preset, True)
    checkpointed.load_state_dict(plain.state_dict())
    calls = {"decoder": 0, "encoder": 0, "fpn": 0}
    checkpointed.predictor.transformer_ffn_layers[0].register_forward_pre_hook(
        lambda *a: calls.__setitem__("decoder", calls["decoder"] + 1))
    checkpointed.pixel_decoder.transformer.layers[0].register_forward_pre_hook(
        lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1))
    checkpointed.pixel_decoder.layer_1.register_forward_pre_hook(lambda *a: calls.__setitem__("fpn", calls["fpn"] + 1))
    loss_a, grads_a = _step(plain)
    loss_b, grads_b = _step(checkpointed)
    # forward + recompute in backward (pre-hooks: recomputation stops once it has what backward needs)
    assert calls == {"decoder": 2, "encoder": 2, "fpn": 2}
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4, msg=name)
    # no recomputation at inference
    checkpointed.eval()
    calls["decoder"] = 0
    with torch.no_grad():
        checkpointed.forward_raw(checkpointed.normalize(torch.zeros(1, 3, 64, 64)))
    assert calls["decoder"] == 1
