"""EncNet's head (the context encoding module, the SE-loss) in the per-pixel family: the encoding layer against
its definition computed by hand, the SE-loss target against MMSeg's, the whole head against MMSeg's EncHead."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F

from helpers.mmseg_reference import mmseg
from omniseg.config import load_config
from omniseg.models.per_pixel.blocks import EncHead, EncodingLayer, class_presence
from omniseg.models.per_pixel.model import PerPixelSegmenter


def test_encoding_layer_sums_softly_assigned_residuals():
    layer = EncodingLayer(channels=2, num_codes=3)
    with torch.no_grad():
        layer.codewords.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
        layer.scale.copy_(torch.tensor([-1.0, -0.5, -2.0]))
    x = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 0.0, 1.0, 3.0]]).view(1, 2, 2, 2)  # four positions
    points = x.view(2, 4).t()
    expected = torch.zeros(3, 2)
    codes, scale = layer.codewords.detach(), layer.scale.detach()
    for point in points:
        weights = torch.softmax(torch.stack([scale[k] * ((point - codes[k]) ** 2).sum() for k in range(3)]), dim=0)
        for k in range(3):
            expected[k] += weights[k] * (point - codes[k])
    # The first position alone, by hand: distances (1.25, 1.25, 1.25) scaled by (-1, -0.5, -2).
    first = torch.softmax(torch.tensor([-1.25, -0.625, -2.5]), dim=0)
    torch.testing.assert_close(
        torch.softmax(torch.stack([scale[k] * ((points[0] - codes[k]) ** 2).sum() for k in range(3)]), dim=0), first)
    with torch.no_grad():
        encoded = layer(x)
    assert encoded.shape == (1, 3, 2)
    torch.testing.assert_close(encoded[0], expected, rtol=0, atol=1e-6)


def test_se_loss_target_is_the_classes_present_ignoring_255():
    labels = torch.full((2, 4, 5), 255, dtype=torch.long)
    labels[0, :2, :2] = 3
    labels[0, 3, 4] = 0
    labels[1, 1:, :] = 1
    presence = class_presence(labels, num_classes=4)
    assert presence.tolist() == [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]]
    mmseg()
    from mmseg.models.decode_heads.enc_head import EncHead as MMSegEncHead

    torch.testing.assert_close(presence, MMSegEncHead._convert_to_onehot_labels(labels, 4).float())


def _mmseg_enc_head(add_lateral: bool, num_classes: int = 5):
    mmseg()
    from mmseg.registry import MODELS

    torch.manual_seed(0)
    head = MODELS.build(dict(type="EncHead", in_channels=[12, 20, 24], in_index=(0, 1, 2), channels=64, num_codes=32,
                             use_se_loss=True, add_lateral=add_lateral, dropout_ratio=0.1, num_classes=num_classes,
                             norm_cfg=dict(type="BN", requires_grad=True), align_corners=False))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
    return head.eval()


def _renamed(state: dict) -> tuple[dict, dict]:
    """MMSeg EncHead names -> omniseg's EncHead, and the SE classifier apart."""
    head, se = {}, {}
    for key, value in state.items():
        if key.startswith("se_layer."):
            se[key[len("se_layer."):]] = value
            continue
        if key.startswith("loss_"):
            continue
        name = (key.replace("conv_seg.", "classifier.1.").replace("lateral_convs.", "laterals.")
                .replace("enc_module.encoding_project.", "encoding.project.")
                .replace("enc_module.encoding.0.", "encoding.encoding.")
                .replace("enc_module.encoding.1.", "encoding.code_norm.")
                .replace("enc_module.fc.0.", "encoding.fc."))
        name = name.replace(".conv.", ".0.").replace(".bn.", ".1.")
        head[name] = value
    return head, se


@pytest.mark.parametrize("add_lateral", [False, True])
def test_enc_head_computes_what_mmseg_enc_head_computes(add_lateral):
    reference = _mmseg_enc_head(add_lateral)
    assert float(reference.enc_module.encoding[1].running_var.sub(1).abs().max()) > 0.05  # non-trivial BN statistics
    ours = EncHead(24, 5, width=64, num_codes=32, lateral_channels=(12, 20) if add_lateral else ())
    head_state, se_state = _renamed(reference.state_dict())
    ours.load_state_dict(head_state, strict=True)
    se_classifier = nn.Linear(64, 5)
    se_classifier.load_state_dict(se_state)
    ours.eval()
    generator = torch.Generator().manual_seed(2)
    inputs = [torch.randn(2, 12, 16, 16, generator=generator), torch.randn(2, 20, 8, 8, generator=generator),
              torch.randn(2, 24, 16, 16, generator=generator)]
    with torch.no_grad():
        theirs, their_se = reference(inputs)
        logits, context = ours(inputs[-1], inputs[:-1], context=True)
    assert theirs.abs().max() > 1e-2 and their_se.abs().max() > 1e-2
    torch.testing.assert_close(logits, theirs, rtol=0, atol=1e-4)
    torch.testing.assert_close(se_classifier(context), their_se, rtol=0, atol=1e-4)


def _demo_model(**model) -> PerPixelSegmenter:
    cfg = load_config("encnet_jpu_demo", [f"model.{k}={v}" for k, v in model.items()])
    return PerPixelSegmenter(OmegaConf.to_container(cfg.model), 3)


def test_encnet_trains_with_the_se_loss_against_the_classes_present():
    torch.manual_seed(0)
    model = _demo_model(enc_lateral="true")
    assert model.head.fusion is not None and model.se_classifier.out_features == 3 and model.aux_weight == 0.4
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, :, :32], masks[1, :, 32:] = True, True
    targets = [{"labels": torch.tensor([0, 2]), "masks": masks}, {"labels": torch.tensor([1]), "masks": masks[:1]}]
    captured = {}
    model.se_classifier.register_forward_hook(lambda m, i, o: captured.update(se=o))
    losses = model.losses(images, targets)
    presence = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # image 2: its right half is unlabelled
    expected = 0.2 * F.binary_cross_entropy_with_logits(captured["se"], presence)
    torch.testing.assert_close(losses["loss_se"], expected)
    assert set(losses) == {"loss_ce", "loss_aux", "loss_se"}
    sum(losses.values()).backward()
    assert model.head.encoding.encoding.codewords.grad.abs().sum() > 0
    assert model.head.encoding.encoding.scale.grad.abs().sum() > 0

    without = _demo_model(**{"loss.se_weight": 0})
    assert without.se_classifier is None and "loss_se" not in without.losses(images, targets)


def test_other_archs_have_no_se_classifier():
    cfg = load_config("fastfcn_jpu_demo")
    model = PerPixelSegmenter(OmegaConf.to_container(cfg.model), 3)
    assert model.se_classifier is None and not any(k.startswith("se_classifier") for k in model.state_dict())
