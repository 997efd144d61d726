"""SegViT family: ATM masks, QD / EQD / QU token counts, losses, continual freezing, UPerNet on ViT."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from omniseg.config import load_config
from omniseg.models.registry import build_model
from omniseg.models.segvit import (
    ATMDecoder, PlainViT, SimilarityCrossAttention, atm_losses, edge_patch_targets, eqd_selection, grid_mask,
)
from omniseg.models.segvit.vit import gather_kept, qd_block

TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}
TINY_SEGVIT = ["model.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2}",
               "model.vit_out_indices=[1,2,3]", "model.qd_index=1", "model.hidden_dim=32", "model.nheads=2",
               "model.dec_layers=2", "model.dropout=0.0"]


def tiny_segvit(*extra: str, num_classes: int = 5, preset: str = "segvit_demo"):
    cfg = OmegaConf.to_container(load_config(preset, [*TINY_SEGVIT, *extra]).model, resolve=True)
    return build_model(cfg, num_classes=num_classes)


def targets_for(labels: torch.Tensor) -> dict:
    """Per-class semantic targets (the engine's format) from a label map."""
    present = [c for c in labels.unique().tolist() if c != 255]
    return {"labels": torch.tensor(present, dtype=torch.long),
            "masks": torch.stack([labels == c for c in present]) if present else torch.zeros(0, *labels.shape, dtype=torch.bool)}


def test_atm_mask_is_sigmoid_of_the_head_averaged_similarity_not_the_softmax():
    torch.manual_seed(0)
    attn = SimilarityCrossAttention(16, 4, dropout=0.0)
    q, mem = torch.randn(2, 3, 16), torch.randn(2, 10, 16)
    out, sim = attn(q, mem)
    Q = attn.q_proj(q).view(2, 3, 4, 4).transpose(1, 2)
    K = attn.k_proj(mem).view(2, 10, 4, 4).transpose(1, 2)
    V = attn.v_proj(mem).view(2, 10, 4, 4).transpose(1, 2)
    S = Q @ K.transpose(-2, -1) / math.sqrt(4)
    torch.testing.assert_close(sim, S.mean(1))  # the mask logits: pre-softmax, averaged over heads
    expected = attn.out_proj((S.softmax(-1) @ V).transpose(1, 2).reshape(2, 3, 16))
    torch.testing.assert_close(out, expected)  # ... while the attention itself uses the softmax
    assert not torch.allclose(torch.sigmoid(sim), S.softmax(-1).mean(1), atol=1e-3)


def test_atm_stage_masks_are_summed_and_the_class_head_is_shared():
    torch.manual_seed(0)
    dec = ATMDecoder(8, 3, dim=16, heads=2, stages=2, layers_per_stage=2, dropout=0.0).eval()
    sims = []
    for layers in dec.layers:
        layers[-1].cross_attn.register_forward_hook(lambda m, i, o: sims.append(o[1]))
    feats = [torch.randn(1, 6, 8), torch.randn(1, 6, 8)]
    outs = dec(feats, (2, 3))
    assert len(outs) == 2 and outs[0]["pred_logits"].shape == (1, 3, 4) and outs[0]["pred_masks"].shape == (1, 3, 2, 3)
    torch.testing.assert_close(outs[0]["pred_masks"].flatten(2), sims[0])
    torch.testing.assert_close(outs[1]["pred_masks"].flatten(2), sims[0] + sims[1])
    single = ATMDecoder(8, 3, dim=16, heads=2, stages=1, layers_per_stage=3, dropout=0.0)
    assert len(single([feats[0]], (2, 3))) == 3  # one stage: every layer is an output (Shrunk's decoder)


def test_qd_block_with_every_token_as_query_is_the_plain_block():
    torch.manual_seed(0)
    vit = PlainViT("vit_tiny_patch16_224", **TINY_VIT, out_indices=(3,)).eval()
    block = vit.body.blocks[0]
    x = torch.randn(2, 16, 32)
    every = torch.arange(16)[None].expand(2, -1)
    torch.testing.assert_close(qd_block(block, x, every), block(x), atol=1e-5, rtol=1e-5)
    # queries on the 2x2 grid: the residual is the sampled input, keys/values stay all 16 tokens
    grid = torch.nonzero(grid_mask(4, 4))[:, 0][None].expand(2, -1)
    out = qd_block(block, x, grid)
    assert out.shape == (2, 4, 32)
    x2 = x.clone()
    x2[:, 5] = torch.randn(2, 32)  # a token that is no query still changes the queries' outputs (it is a key)
    assert not torch.allclose(qd_block(block, x2, grid), out)


def _token_counts(vit: PlainViT, x: torch.Tensor) -> list[int]:
    counts = []
    hooks = [b.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1])) for b in vit.body.blocks]
    vit(x)
    for h in hooks:
        h.remove()
    return counts


def test_qd_reduces_later_layers_to_a_quarter_and_qu_restores_the_grid():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)  # 8x8 patches
    plain = PlainViT("vit_tiny_patch16_224", **TINY_VIT, out_indices=(1, 3)).eval()
    assert _token_counts(plain, x) == [64, 64, 64, 64]
    shrunk = PlainViT("vit_tiny_patch16_224", **TINY_VIT, out_indices=(3,), shrink="shrunk", qd_index=1).eval()
    out = shrunk(x)
    # the QD block (1) runs through qd_block, not the block's forward: blocks 2, 3 see 16 tokens
    assert _token_counts(shrunk, x) == [64, 16, 16] and out.deep.shape == (2, 16, 32) and out.hi_res.shape == (2, 64, 32)
    model = tiny_segvit("model.shrink=shrunk").eval()
    outs, _ = model.network(torch.randn(2, 3, 64, 64))
    assert outs[0][-1]["pred_masks"].shape == (2, 5, 8, 8)  # back on the stride-8 (here) patch grid


def test_eqd_keeps_exactly_the_grid_and_the_tokens_above_tau():
    prob = torch.zeros(2, 16)
    prob[0, [1, 5, 6]] = torch.tensor([0.71, 0.9, 0.7])  # 0.7 is not above tau
    prob[1, 0] = 0.95  # already a grid token
    kept = eqd_selection(prob, 4, 4, 0.7)
    grid = grid_mask(4, 4)
    assert torch.equal(kept[0], grid | torch.isin(torch.arange(16), torch.tensor([1, 5])))
    assert torch.equal(kept[1], grid)

    torch.manual_seed(0)
    vit = PlainViT("vit_tiny_patch16_224", **TINY_VIT, out_indices=(3,), shrink="shrunkpp", qd_index=1, tau=0.7).eval()
    chosen = {0: [1, 3, 9, 27], 1: [7]}

    def fixed_edges(module, inputs, output):
        logits = torch.zeros_like(output)
        logits[..., 1] = -5.0
        for b, idx in chosen.items():
            logits[b, idx, 1] = 5.0
        return logits

    vit.edge_head.register_forward_hook(fixed_edges)
    x = torch.randn(2, 3, 64, 64)
    out = vit(x)
    grid = grid_mask(8, 8)
    for b, idx in chosen.items():
        expected = grid.clone()
        expected[idx] = True
        assert torch.equal(out.kept[b], expected)
    assert out.deep.shape[1] == 16 + 4 and out.deep_padding[1].sum() == 3  # padded to the larger set
    # padding does not leak: image 1 alone gives the same deep tokens
    chosen = {0: [7]}
    alone = vit(x[1:])
    torch.testing.assert_close(alone.deep[0], out.deep[1, :17], atol=1e-5, rtol=1e-5)


def test_gather_kept_orders_and_pads():
    x = torch.arange(8.0).view(1, 8, 1).expand(2, -1, -1)
    kept = torch.tensor([[1, 0, 0, 1, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    tokens, padding = gather_kept(x, kept)
    assert tokens[0, :, 0].tolist() == [0.0, 3.0, 5.0] and tokens[1, 0, 0] == 1.0
    assert padding.tolist() == [[False, False, False], [False, True, True]]


def test_edge_patch_targets_from_the_label_map():
    labels = torch.full((1, 8, 12), 2)
    labels[0, :, 6:] = 3  # vertical boundary between columns 5 and 6: inside patch column 1 (4..7)
    labels[0, 4:, 8:] = 255  # bottom-right patch all void -> ignored
    labels[0, 0, 0] = 255  # a void pixel does not make an edge
    t = edge_patch_targets(labels, 4, (2, 3))
    assert t.tolist() == [[0, 1, 0, 0, 1, 255]]


def test_atm_loss_fixed_assignment_and_hand_computed_terms():
    logits = torch.zeros(1, 3, 4)
    masks = torch.zeros(1, 3, 2, 2)
    masks[0, 1] = torch.tensor([[2.0, -2.0], [0.0, 1.0]])
    gt = torch.tensor([[[True, False], [False, True]]])
    losses = atm_losses([{"pred_logits": logits, "pred_masks": masks}], [{"labels": torch.tensor([1]), "masks": gt}],
                        3, eos_coef=0.1)
    # CE: uniform logits -> ln 4 for every token, weighted mean stays ln 4
    assert losses["loss_ce"].item() == pytest.approx(math.log(4), abs=1e-6)
    p, g = masks[0, 1].flatten(), gt[0].flatten().float()
    prob = p.sigmoid()
    ce = F.binary_cross_entropy_with_logits(p, g, reduction="none")
    pt = prob * g + (1 - prob) * (1 - g)
    focal = ((0.25 * g + 0.75 * (1 - g)) * ce * (1 - pt) ** 2).mean()
    dice = 1 - (2 * (prob * g).sum() + 1) / (prob.sum() + g.sum() + 1)
    assert losses["loss_focal"].item() == pytest.approx(20 * focal.item(), rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice.item(), rel=1e-5)
    # the CE target: token 1 -> class 1, the others -> absent (index 3); raising token 0's absent logit helps
    better = logits.clone()
    better[0, 0, 3] = 3.0
    assert atm_losses([{"pred_logits": better, "pred_masks": masks}], [{"labels": torch.tensor([1]), "masks": gt}],
                      3)["loss_ce"] < losses["loss_ce"]
    # a label outside this decoder's range (continual: another step's class) gets neither token nor mask
    offset = atm_losses([{"pred_logits": logits, "pred_masks": masks}], [{"labels": torch.tensor([4]), "masks": gt}],
                        3, label_offset=3)
    assert offset["loss_dice"].item() == pytest.approx(dice.item(), rel=1e-5)


@pytest.mark.parametrize("shrink", ["null", "shrunk", "shrunkpp"])
def test_training_lowers_the_loss_and_reaches_every_parameter(shrink):
    torch.manual_seed(0)
    model = tiny_segvit(f"model.shrink={shrink}").train()
    images = torch.randint(0, 60, (2, 3, 64, 64), dtype=torch.uint8)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, 16:48, 8:40] = 2
    labels[1, :, 48:] = 4
    images.permute(0, 2, 3, 1)[labels == 2] = 230
    targets = [targets_for(labels[i]) for i in range(2)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for step in range(30):
        losses = model.losses(images, targets)
        total = sum(losses.values())
        if step == 0:
            first = total.item()
            total.backward()
            unused = [n for n, p in model.named_parameters() if p.grad is None]
            assert unused == [], unused
            assert ("loss_edge" in losses) == (shrink == "shrunkpp")
        else:
            total.backward()
        opt.step()
        opt.zero_grad()
    assert total.item() < 0.6 * first
    model.eval()
    pred = model.predict(images, [(64, 64)] * 2, [(32, 48)] * 2)
    assert pred[0]["semantic"].shape == (32, 48) and pred[0]["semantic"].dtype == torch.int64


def test_continual_step_freezes_old_parameters_bit_identically_and_concatenates_steps(tmp_path):
    from safetensors.torch import save_file

    from omniseg.api import load_weights_into

    torch.manual_seed(0)
    step0 = tiny_segvit("model.continual.steps=[3,2]", "model.continual.step=0")
    assert step0.seen_classes == 3 and len(step0.decoders) == 1
    path = tmp_path / "step0.safetensors"
    save_file({k: v.contiguous() for k, v in step0.state_dict().items()}, str(path))
    step1 = tiny_segvit("model.continual.steps=[3,2]", "model.continual.step=1")
    report = load_weights_into(step1, path)
    assert all(k.startswith("decoders.1.") for k in report["missing"]) and report["missing"]
    before = {k: v.clone() for k, v in step1.state_dict().items()}
    trainable = {n for n, p in step1.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("decoders.1.") for n in trainable)
    from omniseg.engine.optim import build_optimizer

    opt = build_optimizer(step1, {"lr": 1e-2, "weight_decay": 0.05})
    step1.train()
    assert not step1.backbone.training and not step1.decoders[0].training and step1.decoders[1].training
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, :, 32:] = 3
    labels[:, :16] = 1  # an old class: not labelled at step 1
    for _ in range(3):
        losses = step1.losses(images, [targets_for(labels[i]) for i in range(2)])
        # only the new decoder's losses: 3 stages (2 deep-supervision outputs + the final one)
        assert set(losses) == {f"step1_loss_{term}{suffix}" for term in ("ce", "focal", "dice")
                               for suffix in ("", "_0", "_1")}
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad()
    after = step1.state_dict()
    for k, v in before.items():
        if k.startswith("decoders.1."):
            continue
        assert torch.equal(after[k], v), k  # encoder and step-0 decoder untouched, bit for bit
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("decoders.1."))
    step1.eval()
    scores = step1.scores(step1.normalize(images))
    assert scores.shape == (2, 5, 8, 8)
    # the step-0 channels are exactly the step-0 model's scores
    step0.eval()
    torch.testing.assert_close(scores[:, :3], step0.scores(step0.normalize(images)))


def test_plain_fine_tuning_trains_everything_and_old_tokens_learn_absent():
    torch.manual_seed(0)
    model = tiny_segvit("model.continual.steps=[3,2]", "model.continual.step=1", "model.continual.freeze=false")
    assert all(p.requires_grad for p in model.parameters())
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    labels[:, :, 32:] = 3
    losses = model.losses(torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), [targets_for(labels[0])])
    assert {"step0_loss_ce", "step1_loss_ce"} <= set(losses)
    # class 0 is present in the image but not labelled at step 1: step 0's decoder sees no mask target
    assert losses["step0_loss_dice"].item() == 0.0


def test_continual_steps_must_cover_the_classes():
    with pytest.raises(ValueError, match="sum to the 5 classes"):
        tiny_segvit("model.continual.steps=[3,3]")


def test_vit_feature_pyramid_strides_and_upernet_output():
    torch.manual_seed(0)
    cfg = load_config("upernet_vit_demo", [
        "model.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2, out_indices: [0, 1, 2, 3]}",
        "model.head_width=16"])
    model = build_model(OmegaConf.to_object(cfg.model), num_classes=5)
    feats = model.backbone(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape[-2:]) for k, v in feats.items()} == {"res2": (32, 32), "res3": (16, 16),
                                                                  "res4": (8, 8), "res5": (4, 4)}
    assert [s.stride for s in model.backbone.specs.values()] == [2, 4, 8, 16]  # patch 8: strides 2..16
    model.eval()
    assert model.forward_raw(torch.randn(1, 3, 64, 64))["sem_seg"].shape == (1, 5, 64, 64)


def test_local_timm_vit_checkpoint_loads(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, **TINY_VIT)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    vit = PlainViT("vit_tiny_patch16_224", **TINY_VIT, out_indices=(3,), weights=str(path))
    theirs = ref.state_dict()
    for k, v in vit.body.state_dict().items():
        if k == "pos_embed":  # resampled from the checkpoint's 4x4 grid to the model's 28x28
            assert v.shape[1] == 1 + 28 * 28
            continue
        assert torch.equal(v, theirs[k]), k


def test_engine_trains_and_evaluates_the_demo_presets(synth_root, tmp_path):
    from omniseg.engine.trainer import train

    for preset in ("segvit_demo", "segvit_shrunkpp_demo", "upernet_vit_demo"):
        extra = TINY_SEGVIT if preset.startswith("segvit") else [
            "model.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2, out_indices: [0, 1, 2, 3]}",
            "model.head_width=16"]
        cfg = load_config(preset, [*extra, f"data.train.root={synth_root}", f"data.val.root={synth_root}",
                                   "data.crop_size=64", "data.batch_size=2", "data.num_workers=0", "train.max_iters=2",
                                   "train.eval_period=2", f"train.output_dir={tmp_path / preset}", "train.log_period=1"])
        result = train(cfg, progress=False)
        assert 0.0 <= result["mIoU"] <= 100.0, preset


def test_evaluation_ignores_classes_not_yet_learnt():
    from omniseg.data.meta import DatasetMeta
    from omniseg.evaluation.evaluator import DatasetEvaluator

    meta = DatasetMeta(classes=["a", "b", "c"], isthing=[False] * 3)
    gt = torch.tensor([[0, 0, 1, 2], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 1]])  # the model knows classes 0 and 1 only
    sample = {"sem_seg": gt, "file_name": "x.png"}
    seen = DatasetEvaluator(meta, ["semantic"], seen_classes=2)
    seen.process(sample, {"semantic": pred})
    iou = seen.evaluate()["semantic"]["IoU"]
    # class 2's pixels are ignored: a: 1 TP, 1 FN -> 1/2; b: 2 TP, 1 FP -> 2/3
    assert iou["a"] == pytest.approx(50.0) and iou["b"] == pytest.approx(200 / 3) and math.isnan(iou["c"])
    every = DatasetEvaluator(meta, ["semantic"])
    every.process(sample, {"semantic": pred})
    assert every.evaluate()["semantic"]["IoU"]["c"] == 0.0  # without the protocol class 2 scores 0


def test_continual_summary_splits_old_and_new_classes():
    from omniseg.engine.continual import step_iterations, step_summary

    iou = {"a": 80.0, "b": 60.0, "c": 40.0, "d": float("nan"), "e": 10.0}
    row = step_summary(iou, list("abcde"), [2, 2, 1], step=1)
    assert row["seen_classes"] == 4 and row["mIoU_old"] == pytest.approx(70.0)
    assert row["mIoU_new"] == pytest.approx(40.0) and row["mIoU_all"] == pytest.approx(60.0)
    assert math.isnan(step_summary(iou, list("abcde"), [2, 2, 1], step=0)["mIoU_new"])
    cfg = OmegaConf.create({"train": {"max_iters": 10}, "model": {"continual": {"step_iters": 4}}})
    assert step_iterations(cfg, 3) == [10, 4, 4]


@pytest.mark.parametrize("freeze", [True, False])
def test_train_continual_freezes_everything_learnt_before(synth_root, tmp_path, freeze):
    """SegViT's recipe leaves the encoder and the step-0 decoder bit-identical; fine-tuning changes them."""
    from safetensors.torch import load_file

    from omniseg.engine.continual import train_continual

    out = tmp_path / ("frozen" if freeze else "finetune")
    cfg = load_config("segvit_demo", [*TINY_SEGVIT, f"data.train.root={synth_root}", f"data.val.root={synth_root}",
                                      "data.crop_size=64", "data.batch_size=2", "data.num_workers=0",
                                      "train.max_iters=3", "train.eval_period=3", "train.log_period=1",
                                      f"train.output_dir={out}", "model.continual.steps=[4,2]",
                                      f"model.continual.freeze={str(freeze).lower()}", "model.continual.step_iters=2"])
    report = train_continual(cfg, progress=False)
    assert [r["seen_classes"] for r in report["per_step"]] == [4, 6]
    assert [r["iterations"] for r in report["per_step"]] == [3, 2]
    assert (out / "continual.json").is_file() and report["forgetting"] == pytest.approx(
        report["per_step"][0]["mIoU_old"] - report["per_step"][1]["mIoU_old"])
    before = load_file(str(out / "step0" / "model_final.safetensors"))
    after = load_file(str(out / "step1" / "model_final.safetensors"))
    assert not any(k.startswith("decoders.1.") for k in before) and any(k.startswith("decoders.1.") for k in after)
    old = [k for k in before if k.startswith(("backbone.", "decoders.0.")) and before[k].is_floating_point()]
    same = [torch.equal(before[k], after[k]) for k in old]
    if freeze:
        assert all(same)
    else:
        assert not all(same)
    # A finished study is reused, not retrained.
    assert train_continual(cfg, progress=False)["per_step"] == report["per_step"]


def test_qd_grid_positions_are_the_grid_tokens_in_raster_order():
    """Shrunk's query downsampling reads a static index set (exportable); it is the grid mask's tokens."""
    from omniseg.models.segvit.vit import grid_positions

    for h, w in ((4, 6), (8, 8), (2, 10)):
        kept = grid_mask(h, w)[None]
        positions = torch.arange(h * w)[None]
        expected, padding = gather_kept(positions[..., None], kept)
        assert torch.equal(grid_positions(h, w), expected[0, :, 0]) and not padding.any()
