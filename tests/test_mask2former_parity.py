"""Mask2Former network parity with HF transformers (random weights, fully offline).

Every parameter and buffer of a small HF Mask2FormerForUniversalSegmentation is perturbed (HF zeroes
many biases and offsets at init), converted with omniseg.hub.hf_mask2former, and the backbone maps,
pixel-decoder outputs and the class/mask logits of every decoder layer are compared.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig, SwinConfig  # noqa: E402

from omniseg.hub import CheckpointError, report_load  # noqa: E402
from omniseg.hub.hf_mask2former import (  # noqa: E402
    build_omniseg_modules_from_hf_config,
    convert_hf_mask2former_state_dict,
    hf_mask2former_config_to_omniseg,
    load_hf_mask2former_folder,
)
from omniseg.bench import stored_for_backward_bytes  # noqa: E402
from omniseg.models.layers.ms_deform_attn import (  # noqa: E402
    MSDeformAttn, ms_deform_attn_core, ms_deform_attn_core_grid_sample)
from omniseg.models.layers.mask_logits import PixelEmbeddings  # noqa: E402
from omniseg.models.layers.position_encoding import PositionEmbeddingSine  # noqa: E402
from omniseg.models.maskformer.masked_decoder import MultiScaleMaskedTransformerDecoder  # noqa: E402

STAGES = ["stage1", "stage2", "stage3", "stage4"]
ATOL = 1e-4


def _small_config(backbone_config, **overrides) -> Mask2FormerConfig:
    kwargs = dict(backbone_config=backbone_config, num_labels=5, hidden_dim=64, feature_size=64, mask_feature_size=64,
                  encoder_layers=2, decoder_layers=5, num_queries=10, encoder_feedforward_dim=128,
                  dim_feedforward=128)
    kwargs.update(overrides)
    return Mask2FormerConfig(**kwargs)


def _build_random_hf(config: Mask2FormerConfig, seed: int) -> Mask2FormerForUniversalSegmentation:
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    return model


def _hf_outputs(model, x) -> dict:
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True, output_auxiliary_logits=True)
    # HF: auxiliary_logits[0] = initial queries, ..., the final prediction separately
    logits = [a["class_queries_logits"] for a in out.auxiliary_logits] + [out.class_queries_logits]
    masks = [a["masks_queries_logits"] for a in out.auxiliary_logits] + [out.masks_queries_logits]
    return {"features": list(out.encoder_hidden_states), "mask_features": out.pixel_decoder_last_hidden_state,
            "multi_scale": list(out.pixel_decoder_hidden_states), "logits": logits, "masks": masks}


def _omniseg_outputs(modules, x) -> dict:
    with torch.no_grad():
        feats = modules["backbone"](x)
        mask_features, multi_scale = modules["pixel_decoder"](feats)
        out = modules["predictor"](multi_scale, mask_features)
    return {"features": [feats[n] for n in ("res2", "res3", "res4", "res5")], "mask_features": mask_features,
            "multi_scale": multi_scale,
            "logits": [a["pred_logits"] for a in out["aux_outputs"]] + [out["pred_logits"]],
            "masks": [a["pred_masks"] for a in out["aux_outputs"]] + [out["pred_masks"]]}


def _assert_parity(ours: dict, theirs: dict, num_predictions: int) -> None:
    for level, (a, b) in enumerate(zip(ours["features"], theirs["features"], strict=True)):
        assert a.shape == b.shape, f"backbone level {level}"
        # random BN statistics let ResNet activations grow to 1e3-1e4: compare relative to their scale
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= ATOL * scale, f"backbone level {level}"
    torch.testing.assert_close(ours["mask_features"], theirs["mask_features"], atol=ATOL, rtol=0)
    for a, b in zip(ours["multi_scale"], theirs["multi_scale"], strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert len(ours["logits"]) == len(theirs["logits"]) == num_predictions
    for i, (a, b) in enumerate(zip(ours["logits"], theirs["logits"])):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"class logits of prediction {i}: {m}")
    for i, (a, b) in enumerate(zip(ours["masks"], theirs["masks"])):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"mask logits of prediction {i}: {m}")


RESNET_CASES = {
    # R50-like bottlenecks, post-norm, batch of 2, non-square input
    "bottleneck": (dict(depths=[1, 2, 1, 1], hidden_sizes=[64, 128, 256, 512], layer_type="bottleneck"),
                   dict(), (2, 3, 96, 128)),
    # R18-like basic blocks, pre-norm decoder, conv_dim != hidden_dim (decoder input projections)
    "basic_prenorm": (dict(depths=[1, 1, 2, 1], hidden_sizes=[32, 64, 128, 256], layer_type="basic"),
                      dict(feature_size=32, mask_feature_size=48, pre_norm=True), (1, 3, 128, 128)),
}


@pytest.mark.parametrize("case", list(RESNET_CASES))
def test_resnet_mask2former_matches_hf(case):
    backbone_kwargs, overrides, shape = RESNET_CASES[case]
    config = _small_config(ResNetConfig(out_features=STAGES, **backbone_kwargs), **overrides)
    hf = _build_random_hf(config, seed=0)

    modules = build_omniseg_modules_from_hf_config(config.to_dict()).eval()
    state = convert_hf_mask2former_state_dict(hf.state_dict(), backbone="resnet")
    report = report_load(modules, state, source="hf", strict=True)
    assert report == {"missing": [], "unexpected": []}

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    _assert_parity(_omniseg_outputs(modules, x), _hf_outputs(hf, x), num_predictions=config.decoder_layers)


def test_swin_mask2former_from_saved_folder_matches_hf(tmp_path):
    """Goes through save_pretrained: the on-disk Swin names differ from transformers 5's in-memory ones.
    96x128 input: every Swin stage (24x32 ... 3x4) needs window padding, and shifted blocks run in
    all stages, which only matches with the original pad-then-shift order."""
    swin = SwinConfig(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=7, out_features=STAGES)
    names = {0: "cat", 1: "dog", 2: "sky", 3: "road", 4: "tree"}
    config = _small_config(swin, id2label=names, label2id={v: k for k, v in names.items()})
    hf = _build_random_hf(config, seed=10)
    hf.save_pretrained(tmp_path)

    modules, cfg = load_hf_mask2former_folder(tmp_path)
    modules.eval()
    assert cfg["class_names"] == ["cat", "dog", "sky", "road", "tree"]
    assert (cfg["num_classes"], cfg["dec_layers"], cfg["enc_layers"], cfg["conv_dim"]) == (5, 4, 2, 64)

    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(4))
    _assert_parity(_omniseg_outputs(modules, x), _hf_outputs(hf, x), num_predictions=config.decoder_layers)


def test_config_conversion_of_default_swin_checkpoint_config():
    cfg = hf_mask2former_config_to_omniseg(Mask2FormerConfig(num_labels=133).to_dict())
    assert cfg["backbone"] == "swin_s" and cfg["backbone_kwargs"]["window_size"] == 7
    assert cfg["backbone_kwargs"]["out_norms"] is True
    assert (cfg["hidden_dim"], cfg["num_queries"], cfg["nheads"], cfg["dim_feedforward"]) == (256, 100, 8, 2048)
    assert (cfg["dec_layers"], cfg["enc_layers"], cfg["enc_dim_feedforward"], cfg["enc_num_points"]) == (9, 6, 1024, 4)
    assert len(cfg["class_names"]) == cfg["num_classes"] == 133


def test_converter_rejects_unknown_keys():
    with pytest.raises(CheckpointError, match="no omniseg counterpart"):
        convert_hf_mask2former_state_dict({"model.transformer_module.surprise.weight": torch.zeros(1)},
                                          backbone="resnet")


def _naive_deform_attn(value, shapes, locations, weights):
    """Per-point bilinear sampling written out by hand (zeros outside, pixel centres at (i + 0.5) / size)."""
    b, _, heads, dh = value.shape
    _, lq, _, levels, points, _ = locations.shape
    out = torch.zeros(b, lq, heads, dh, dtype=value.dtype)
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    for n in range(b):
        for q in range(lq):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    v = value[n, starts[lvl]:starts[lvl] + h * w, m].view(h, w, dh)
                    for p in range(points):
                        x = locations[n, q, m, lvl, p, 0].item() * w - 0.5
                        y = locations[n, q, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(dh, dtype=value.dtype)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < h and 0 <= xx < w:
                                sample += (1 - abs(x - xx)) * (1 - abs(y - yy)) * v[yy, xx]
                        out[n, q, m] += weights[n, q, m, lvl, p] * sample
    return out.flatten(2)


def test_ms_deform_attn_core_matches_hand_written_bilinear_sampling():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 2), (1, 3)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 2, 3, generator=g, dtype=torch.float64)
    locations = torch.rand(2, 5, 2, 3, 2, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2  # some outside
    weights = torch.rand(2, 5, 2, 3, 2, generator=g, dtype=torch.float64)
    expected = _naive_deform_attn(value, shapes, locations, weights)
    torch.testing.assert_close(ms_deform_attn_core(value, shapes, locations, weights), expected)
    torch.testing.assert_close(ms_deform_attn_core(value, torch.tensor(shapes), locations, weights), expected)
    torch.testing.assert_close(ms_deform_attn_core_grid_sample(value, shapes, locations, weights), expected)


def test_ms_deform_attn_gather_core_gradients_match_grid_sample():
    """The gather core's hand-written backward gives grid_sample's gradients for the values, the sampling
    locations (zero where they are clamped, far outside) and the attention weights, also when only
    some inputs need a gradient."""
    g = torch.Generator().manual_seed(1)
    shapes = [(5, 6), (3, 3), (2, 4)]
    inputs = [torch.randn(2, sum(h * w for h, w in shapes), 3, 4, generator=g, dtype=torch.float64),
              torch.rand(2, 7, 3, 3, 4, 2, generator=g, dtype=torch.float64) * 2.2 - 0.6,  # up to 2.4 px outside
              torch.rand(2, 7, 3, 3, 4, generator=g, dtype=torch.float64)]
    assert ((inputs[1] * 2 < -0.5 / 2) | (inputs[1] * 2 > 2 + 0.5 / 2)).any()  # some clamped on the 2-pixel levels
    for needs in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
        grads = []
        for core in (ms_deform_attn_core, ms_deform_attn_core_grid_sample):
            leaves = [t.clone().requires_grad_(n) for t, n in zip(inputs, needs)]
            out = core(leaves[0], shapes, leaves[1], leaves[2])
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
            grads.append([t.grad for t in leaves])
        for ours, reference, needed in zip(*grads, needs):
            if needed:
                torch.testing.assert_close(ours, reference)
            else:
                assert ours is None


def test_ms_deform_attn_gather_core_passes_gradcheck_and_stores_no_samples():
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 4), (2, 2)]
    inputs = [torch.randn(1, 16, 2, 3, generator=g, dtype=torch.float64, requires_grad=True),
              (torch.rand(1, 4, 2, 2, 2, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1).requires_grad_(),
              torch.rand(1, 4, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda v, l, w: ms_deform_attn_core(v, shapes, l, w), inputs)

    # what autograd keeps between forward and backward, with the encoder's proportions (every pixel a query)
    shapes = [(8, 8), (4, 4)]
    inputs = [torch.randn(2, 80, 2, 16, requires_grad=True), torch.rand(2, 80, 2, 2, 2, 2, requires_grad=True),
              torch.rand(2, 80, 2, 2, 2, requires_grad=True)]

    def stored_bytes(core):
        return stored_for_backward_bytes(lambda: core(inputs[0], shapes, inputs[1], inputs[2]))

    samples = 2 * 2 * 16 * 2 * 80 * 2 * 4  # batch*heads, Dh, points, queries, levels, float32
    assert stored_bytes(ms_deform_attn_core) < stored_bytes(ms_deform_attn_core_grid_sample) - samples // 2


def test_ms_deform_attn_gather_core_training_under_bf16_autocast_close_to_fp32():
    g = torch.Generator().manual_seed(4)
    shapes = [(8, 8), (4, 4)]
    inputs = [torch.randn(2, 80, 4, 8, generator=g), torch.rand(2, 80, 4, 2, 4, 2, generator=g),
              torch.rand(2, 80, 4, 2, 4, generator=g).softmax(-1)]
    results = []
    for autocast in (False, True):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = leaves[0].to(torch.bfloat16) if autocast else leaves[0]  # a bf16 value projection
            out = ms_deform_attn_core(value, shapes, leaves[1], leaves[2])
        assert out.dtype == value.dtype
        out.float().square().sum().backward()
        assert all(t.grad.dtype == t.dtype for t in leaves)
        results.append([out.float()] + [t.grad for t in leaves])
    for fp32, bf16 in zip(*results):  # bf16 rounds the values: compare whole tensors, not single elements
        assert ((bf16 - fp32).norm() / fp32.norm()).item() < 0.01


def test_ms_deform_attn_gather_core_in_bf16_close_to_fp32():
    g = torch.Generator().manual_seed(2)
    shapes = [(16, 16), (8, 8), (4, 4)]
    value = torch.randn(1, 336, 8, 32, generator=g)
    locations = torch.rand(1, 336, 8, 3, 4, 2, generator=g)
    weights = torch.rand(1, 336, 8, 3, 4, generator=g).softmax(-1)
    fp32 = ms_deform_attn_core(value, shapes, locations, weights)
    bf16 = ms_deform_attn_core(value.bfloat16(), shapes, locations, weights)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), fp32, atol=0.03, rtol=0.02)


def test_ms_deform_attn_core_uses_the_hand_written_backward_only_when_a_gradient_is_needed():
    value, locations, weights = torch.randn(1, 4, 1, 2), torch.rand(1, 3, 1, 1, 1, 2), torch.rand(1, 3, 1, 1, 1)
    with torch.no_grad():
        assert ms_deform_attn_core(value.requires_grad_(), [(2, 2)], locations, weights).grad_fn is None
    assert type(ms_deform_attn_core(value, [(2, 2)], locations, weights).grad_fn).__name__ == "_GatherBackwardBackward"
    assert ms_deform_attn_core(value.detach(), [(2, 2)], locations, weights).grad_fn is None


def test_ms_deform_attn_gather_core_at_level_borders_and_far_outside():
    """Locations exactly on the [-1, size] clamp bounds, on pixel centres and far outside read what
    bilinear sampling with zero padding reads (the gather core clamps, then relies on a zero border)."""
    g = torch.Generator().manual_seed(5)
    shapes = [(3, 4), (2, 5)]
    value = torch.randn(1, 22, 2, 3, generator=g, dtype=torch.float64)
    edges = torch.tensor([-5.0, -1.0, -0.75, -0.5, 0.0, 0.125, 0.5, 0.875, 1.0, 1.25, 1.5, 6.0], dtype=torch.float64)
    locations = torch.stack(torch.meshgrid(edges, edges, indexing="ij"), -1).view(1, -1, 1, 1, 1, 2)
    locations = locations.expand(1, -1, 2, 2, 3, 2) + torch.rand(1, 1, 2, 2, 3, 2, generator=g, dtype=torch.float64) * (
        torch.arange(3, dtype=torch.float64).view(1, 1, 1, 1, 3, 1) > 0)  # point 0 exactly on the edges
    weights = torch.rand(1, locations.shape[1], 2, 2, 3, generator=g, dtype=torch.float64)
    expected = _naive_deform_attn(value, shapes, locations, weights)
    torch.testing.assert_close(ms_deform_attn_core(value, shapes, locations, weights), expected)
    torch.testing.assert_close(ms_deform_attn_core_grid_sample(value, shapes, locations, weights), expected)


def test_ms_deform_attn_module_matches_the_official_formula():
    """MSDeformAttn computes its sampling locations in pixels (reference in pixels + offsets, one addmm)
    and softmaxes in place at inference: the result equals the official normalised formula
    (reference + offsets / (w, h), softmax, grid_sample core), with and without gradients, and with
    the pixel reference precomputed."""
    torch.manual_seed(6)
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    shapes = [(6, 5), (3, 3), (2, 1)]
    num_values = sum(h * w for h, w in shapes)
    query, values = torch.randn(2, 7, 32), torch.randn(2, num_values, 32)
    reference = torch.rand(2, 7, 3, 2)
    offsets = attn.sampling_offsets(query).view(2, 7, 4, 3, 2, 2)
    normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
    locations = reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    weights = attn.attention_weights(query).view(2, 7, 4, 6).softmax(-1).view(2, 7, 4, 3, 2)
    value = attn.value_proj(values).view(2, num_values, 4, 8)
    expected = attn.output_proj(ms_deform_attn_core_grid_sample(value, shapes, locations, weights)).detach()
    with torch.no_grad():
        torch.testing.assert_close(attn(query, reference, values, shapes), expected, atol=1e-5, rtol=1e-5)
        base = attn.pixel_reference(reference, shapes)
        torch.testing.assert_close(attn(query, reference, values, shapes, pixel_reference=base), expected,
                                   atol=1e-5, rtol=1e-5)
    trained = attn(query, reference, values, shapes)  # gradients needed: the hand-written backward
    assert trained.requires_grad
    torch.testing.assert_close(trained.detach(), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reduced = attn(query, reference, values, shapes)
    assert ((reduced.float() - expected).norm() / expected.norm()).item() < 0.02


def test_ms_deform_attn_official_init():
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    bias = attn.sampling_offsets.bias.view(4, 3, 2, 2)  # heads, levels, points, (x, y)
    # head k points along angle 2*pi*k/4, scaled so the larger component is 1, times the point index
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    expected = directions[:, None, None, :] * torch.tensor([1.0, 2.0]).view(1, 1, 2, 1)
    torch.testing.assert_close(bias, expected.expand(4, 3, 2, 2), atol=1e-6, rtol=0)
    assert attn.sampling_offsets.weight.abs().sum() == 0 and attn.attention_weights.weight.abs().sum() == 0
    # zero attention logits: uniform weights over levels x points
    query = torch.randn(1, 4, 32)
    values = torch.randn(1, 3 * 4 + 2 * 2 + 1, 32)
    out = attn(query, torch.full((1, 4, 3, 2), 0.5), values, [(3, 4), (2, 2), (1, 1)])
    assert out.shape == (1, 4, 32)


def test_attention_mask_from_prediction_and_empty_rows():
    logits = torch.tensor([[[[2.0, -1.0], [-3.0, 0.5]],     # query 0: blocked where negative
                            [[-1.0, -2.0], [-0.1, -5.0]]]])  # query 1: negative everywhere
    blocked = MultiScaleMaskedTransformerDecoder._attention_mask_from_prediction(logits, (2, 2))
    assert blocked.tolist() == [[[False, True, True, False], [True, True, True, True]]]
    unblocked = MultiScaleMaskedTransformerDecoder.unblock_empty_rows(blocked)
    assert unblocked.tolist() == [[[False, True, True, False], [False, False, False, False]]]


def test_decoder_inference_path_predicts_attention_masks_at_their_resolution():
    """aux_outputs=False predicts the intermediate sets' attention masks from pixel embeddings resized to
    each level (bilinear resizing is linear): the last set equals the full path's, and every resized
    prediction equals resizing the full-resolution logits."""
    torch.manual_seed(7)
    dec = MultiScaleMaskedTransformerDecoder(16, num_classes=3, hidden_dim=16, num_queries=5, nheads=2,
                                             dim_feedforward=32, dec_layers=4, mask_dim=8).double().eval()
    feats = [torch.randn(2, 16, s, s, dtype=torch.float64) for s in (3, 5, 10)]
    mask_features = torch.randn(2, 8, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        full = dec(feats, mask_features)
        lean = dec(feats, mask_features, aux_outputs=False)
        assert set(lean) == {"pred_logits", "pred_masks"}
        torch.testing.assert_close(lean["pred_logits"], full["pred_logits"])
        torch.testing.assert_close(lean["pred_masks"], full["pred_masks"])
        pixels = PixelEmbeddings(mask_features)
        embed = torch.randn(2, 5, 8, dtype=torch.float64)
        for size in ((3, 3), (5, 5), (10, 10)):
            resized = F.interpolate(pixels.logits(embed), size=size, mode="bilinear", align_corners=False)
            torch.testing.assert_close(pixels.logits_at(embed, size), resized.flatten(2))


def test_channels_last_maps_are_read_without_copies():
    """Convolutions on Swin's features give channels-last maps: the pixel embeddings use them as a
    transposed matrix (no copy, same logits), and the cached sine encoding flattens to [B, h*w, C]
    as a view."""
    g = torch.Generator().manual_seed(8)
    mask_features = torch.randn(2, 8, 12, 10, generator=g).contiguous(memory_format=torch.channels_last)
    pixels = PixelEmbeddings(mask_features)
    assert pixels.flat.data_ptr() == mask_features.data_ptr()
    embed = torch.randn(2, 5, 8, generator=g)
    torch.testing.assert_close(pixels.logits(embed), torch.einsum("bqc,bchw->bqhw", embed, mask_features))
    resized = F.interpolate(mask_features, size=(6, 5), mode="bilinear", align_corners=False)
    torch.testing.assert_close(pixels.logits_at(embed, (6, 5)), torch.einsum("bqc,bchw->bqhw", embed, resized).flatten(2))
    pos = PositionEmbeddingSine(4, normalize=True)(mask_features)
    assert pos.stride(0) == 0 and pos[:1].flatten(2).transpose(1, 2).is_contiguous()  # one cached map per size


def test_decoder_output_structure_and_batch_independence():
    torch.manual_seed(0)
    dec = MultiScaleMaskedTransformerDecoder(16, num_classes=3, hidden_dim=16, num_queries=4, nheads=2,
                                             dim_feedforward=32, dec_layers=3, mask_dim=8).eval()
    feats = [torch.randn(2, 16, s, s) for s in (2, 4, 8)]
    mask_features = torch.randn(2, 8, 16, 16)
    out = dec(feats, mask_features)
    assert out["pred_logits"].shape == (2, 4, 4) and out["pred_masks"].shape == (2, 4, 16, 16)
    assert len(out["aux_outputs"]) == 3  # initial queries + layers 0, 1
    # the second image must not influence the first (no cross-batch leakage)
    single = dec([f[:1] for f in feats], mask_features[:1])
    torch.testing.assert_close(single["pred_masks"], out["pred_masks"][:1], atol=1e-5, rtol=0)


def test_hf_folder_loads_as_full_model_through_the_api(tmp_path):
    """The user-facing path: `load_model(folder)` / `Predictor(folder)` on a local HF checkpoint."""
    from omniseg.api import Predictor, load_model

    config = _small_config(ResNetConfig(out_features=STAGES, depths=[1, 1, 1, 1], hidden_sizes=[64, 128, 256, 512],
                                        layer_type="basic"),
                           id2label={i: f"c{i}" for i in range(5)}, label2id={f"c{i}": i for i in range(5)})
    hf = _build_random_hf(config, seed=21)
    hf.save_pretrained(tmp_path)
    model, cfg, meta = load_model(tmp_path)
    assert meta.classes == [f"c{i}" for i in range(5)] and cfg.model.arch == "mask2former"
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model.forward_raw(x)
        ref = hf(pixel_values=x)
    torch.testing.assert_close(ours["pred_logits"], ref.class_queries_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours["pred_masks"], ref.masks_queries_logits, atol=ATOL, rtol=0)
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    pred = Predictor(tmp_path, device="cpu")(image)
    assert pred["semantic"].shape == (50, 70) and pred["panoptic"]["segment_map"].shape == (50, 70)


def test_hf_folder_is_served_like_any_weights_file(tmp_path):
    """`omniseg serve -w HF_FOLDER`: the API answers with the HF classes and the Predictor's results."""
    pytest.importorskip("fastapi", reason="omniseg[serve] is not installed")
    import base64
    import io

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from omniseg.api import Predictor
    from omniseg.outputs import semantic_to_dataset_ids
    from omniseg.serve.app import create_app

    config = _small_config(ResNetConfig(out_features=STAGES, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128],
                                        layer_type="basic"),
                           id2label={i: f"c{i}" for i in range(5)}, label2id={f"c{i}": i for i in range(5)})
    _build_random_hf(config, seed=4).save_pretrained(tmp_path)
    predictor = Predictor(tmp_path, device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    with TestClient(create_app(predictor, name=tmp_path.name)) as client:
        assert [c["name"] for c in client.get("/v1/model").json()["classes"]] == [f"c{i}" for i in range(5)]
        answer = client.post("/v1/predict?tasks=semantic,panoptic", content=buffer.getvalue()).json()
    expected = predictor(torch.from_numpy(image).permute(2, 0, 1).contiguous())
    served = np.array(Image.open(io.BytesIO(base64.b64decode(answer["semantic"]["png"]))))
    assert np.array_equal(served, semantic_to_dataset_ids(expected["semantic"], predictor.meta))
    assert "panoptic" in answer and "instances" not in answer


def test_hf_folder_with_missing_weights_names_them(tmp_path):
    """A truncated or mismatched foreign checkpoint is refused with the keys that do not fit, never half-loaded."""
    from safetensors.torch import load_file, save_file

    from omniseg.api import load_model

    config = _small_config(ResNetConfig(out_features=STAGES, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128],
                                        layer_type="basic"))
    _build_random_hf(config, seed=2).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    dropped = next(k for k in state if k.endswith("class_predictor.weight"))
    del state[dropped]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"converted weights do not fit: missing \['predictor\.class_embed\.weight'\]"):
        load_model(tmp_path)
