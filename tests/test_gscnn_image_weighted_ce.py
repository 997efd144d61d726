"""Gated-SCNN's per-image class-weighted cross-entropy (`model.loss.image_weighted_ce`): weights and loss on
hand-made label maps, ignored pixels, the preset, and a tiny Gated-SCNN trained with it."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from omniseg.config import load_config
from omniseg.models.per_pixel.gscnn import image_class_weights, image_weighted_cross_entropy
from omniseg.models.registry import build_model

IGNORE = 255

# Two 2x3 images, 3 classes. Image 0: five labelled pixels, class 0 x2, class 1 x3 (one pixel ignored).
# Image 1: six labelled pixels, class 2 x5, class 0 x1.
LABELS = torch.tensor([
    [[0, 0, 1], [1, 1, IGNORE]],
    [[2, 2, 2], [2, 0, 2]],
])
# 1 + bound * (1 - share) for present classes, 1 for absent ones; bound 1:
#   image 0: class 0 1 + 0.6 = 1.6, class 1 1 + 0.4 = 1.4, class 2 absent 1.0
#   image 1: class 0 1 + 5/6 = 11/6, class 1 absent 1.0, class 2 1 + 1/6 = 7/6
WEIGHTS_BOUND_1 = [[1.6, 1.4, 1.0], [11 / 6, 1.0, 7 / 6]]
# bound 0.5: image 0 -> 1 + 0.5 * 0.6 = 1.3, 1 + 0.5 * 0.4 = 1.2, 1.0
WEIGHTS_BOUND_HALF_IMAGE_0 = [1.3, 1.2, 1.0]


def logits_for_labels(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 2, 3, generator=torch.Generator().manual_seed(seed))


def test_image_class_weights_are_one_plus_bound_times_one_minus_share_of_labelled_pixels():
    torch.testing.assert_close(image_class_weights(LABELS, 3), torch.tensor(WEIGHTS_BOUND_1))
    torch.testing.assert_close(image_class_weights(LABELS, 3, upper_bound=0.5)[0],
                               torch.tensor(WEIGHTS_BOUND_HALF_IMAGE_0))


def test_loss_is_the_mean_of_per_image_weighted_cross_entropies():
    logits = logits_for_labels()
    per_image = [F.cross_entropy(logits[i:i + 1], LABELS[i:i + 1], weight=torch.tensor(WEIGHTS_BOUND_1[i]),
                                 ignore_index=IGNORE) for i in range(2)]
    expected = (per_image[0] + per_image[1]) / 2
    torch.testing.assert_close(image_weighted_cross_entropy(logits, LABELS), expected)

    # Image 0 written out: nll of each labelled pixel times its class weight, over the sum of those weights.
    logp = torch.log_softmax(logits[0], dim=0)
    nll = [-logp[0, 0, 0], -logp[0, 0, 1], -logp[1, 0, 2], -logp[1, 1, 0], -logp[1, 1, 1]]
    image_0 = (1.6 * (nll[0] + nll[1]) + 1.4 * (nll[2] + nll[3] + nll[4])) / (2 * 1.6 + 3 * 1.4)
    torch.testing.assert_close(per_image[0], image_0)
    # Unweighted CE differs: the weights change the loss.
    assert abs(float(F.cross_entropy(logits, LABELS, ignore_index=IGNORE)) - float(expected)) > 1e-3


def test_ignored_pixels_count_neither_in_weights_nor_in_loss():
    logits = logits_for_labels(1)
    changed = logits.clone()
    changed[0, :, 1, 2] = torch.tensor([9.0, -9.0, 4.0])  # the ignored pixel of image 0
    torch.testing.assert_close(image_weighted_cross_entropy(changed, LABELS),
                               image_weighted_cross_entropy(logits, LABELS))
    # An image without labelled pixels leaves the mean to the others; none at all gives 0.
    batch = LABELS.clone()
    batch[1] = IGNORE
    torch.testing.assert_close(image_weighted_cross_entropy(logits, batch),
                               image_weighted_cross_entropy(logits[:1], LABELS[:1]))
    assert image_class_weights(batch, 3)[1].tolist() == [1.0, 1.0, 1.0]
    empty = torch.full_like(LABELS, IGNORE)
    assert float(image_weighted_cross_entropy(logits, empty)) == 0.0


def test_full_size_preset_turns_it_on_and_the_demo_keeps_the_plain_cross_entropy():
    r50 = load_config("gscnn_r50").model.loss
    assert r50.image_weighted_ce is True and r50.image_weight_upper_bound == 1.0
    assert load_config("gscnn_demo").model.loss.image_weighted_ce is False


# -- a tiny Gated-SCNN ---------------------------------------------------------------------------------

TINY_GSCNN = [
    "model.arch=gscnn", "model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [16, 32, 64, 64]}",
    "model.head_width=32", "model.shape_width=16", "model.aspp_rates=[1,2,3]",
]


def tiny_gscnn(*extra: str):
    cfg = load_config("pspnet_demo", [*TINY_GSCNN, *extra])
    return build_model(OmegaConf.to_container(cfg.model, resolve=True), num_classes=5)


def batch():
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, 20:44, 10:40] = 2
    labels[1, :, 56:] = 4
    labels[0, :4] = IGNORE
    targets = []
    for i in range(2):
        classes = [int(c) for c in labels[i].unique() if c != IGNORE]
        targets.append({"labels": torch.tensor(classes), "masks": torch.stack([labels[i] == c for c in classes]),
                        "seed": i})
    return images, labels, targets


def test_tiny_gscnn_trains_a_step_with_image_weighted_losses():
    images, labels, targets = batch()
    torch.manual_seed(0)
    plain = tiny_gscnn().train()
    torch.manual_seed(0)
    weighted = tiny_gscnn("model.loss.image_weighted_ce=true").train()
    weighted.load_state_dict(plain.state_dict())

    # The shape stream is made confident on the left half so that edge attention has pixels to weigh.
    left_half = torch.full((2, 1, 64, 64), -5.0)
    left_half[..., :32] = 5.0
    for model in (plain, weighted):
        network = model.network

        def confident_edges(x, *, training_outputs=False, network=network):
            out = network(x, training_outputs=training_outputs)
            if training_outputs:
                out["edge"] = left_half
            return out

        model.network = confident_edges

    torch.manual_seed(1)
    off = plain.losses(images, targets)
    torch.manual_seed(1)
    on = weighted.losses(images, targets)
    assert set(on) == {"loss_ce", "loss_edge", "loss_edge_att", "loss_dual"}

    torch.manual_seed(1)
    out = weighted.network(weighted.normalize(images), training_outputs=True)
    seg = F.interpolate(out["sem_seg"].float(), size=(64, 64), mode="bilinear", align_corners=False)
    attended = labels.clone()
    attended[..., 32:] = IGNORE
    torch.testing.assert_close(on["loss_ce"], image_weighted_cross_entropy(seg, labels), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(on["loss_edge_att"], image_weighted_cross_entropy(seg, attended), rtol=1e-5,
                               atol=1e-6)
    assert abs(float(on["loss_ce"].detach()) - float(off["loss_ce"].detach())) > 1e-3
    assert abs(float(on["loss_edge_att"].detach()) - float(off["loss_edge_att"].detach())) > 1e-3
    torch.testing.assert_close(on["loss_edge"], off["loss_edge"])  # the boundary BCE is not class-weighted

    opt = torch.optim.SGD(weighted.parameters(), lr=1e-2)
    before = weighted.head.classifier[1].weight.detach().clone()
    sum(on.values()).backward()
    opt.step()
    assert torch.isfinite(sum(v.detach() for v in on.values()))
    assert not torch.equal(before, weighted.head.classifier[1].weight)


def test_setting_is_refused_where_it_has_no_meaning():
    with pytest.raises(ValueError, match="Gated-SCNN"):
        build_model(OmegaConf.to_container(load_config("pspnet_demo", [
            "model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [16, 32, 64, 64]}",
            "model.loss.image_weighted_ce=true"]).model, resolve=True), num_classes=5)
    with pytest.raises(ValueError, match="class_weights must be null"):
        tiny_gscnn("model.loss.image_weighted_ce=true", "model.loss.class_weights=[1, 1, 1, 1, 0.1]")
