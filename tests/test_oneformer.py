"""OneFormer: HF-transformers parity (random weights, offline), task-token and prompt ids, the text
mapper, the contrastive loss on a hand-computed case, per-image task sampling and training."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_MODEL, TINY_TEXT
from omniseg.config import load_config
from omniseg.models.oneformer import PromptTokenizer, TextMapper, task_token_ids
from omniseg.models.oneformer.text import TASK_TOKEN_IDS, query_text_contrastive_loss
from omniseg.models.registry import build_model

STAGES = ["stage1", "stage2", "stage3", "stage4"]
ATOL = 1e-4


def _tiny_cfg() -> dict:
    return OmegaConf.to_container(load_config("oneformer_demo", [*TINY_MODEL, *TINY_TEXT]).model, resolve=True)


# ------------------------------------------------------------------------------------ ids


def test_task_token_ids_are_clip_ids_zero_padded():
    ids = task_token_ids(["semantic", "panoptic"], seq_len=10)
    assert ids.tolist() == [[49406, 518, 10549, 533, 29119, 1550, 49407, 0, 0, 0],
                            [49406, 518, 10549, 533, 1072, 24755, 49407, 0, 0, 0]]
    assert task_token_ids(["instance"])[0, :6].tolist() == list(TASK_TOKEN_IDS["instance"])
    with pytest.raises(ValueError, match="unknown task"):
        task_token_ids(["depth"])


def test_prompt_tokenizer_layout():
    tok = PromptTokenizer(num_classes=3, vocab_size=20, context_length=8)
    a, photo, with_, first_class = 1, 3, 4, 8
    assert tok.class_prompt(2) == [18, a, photo, with_, a, first_class + 2, 19, 0]
    assert tok.task_prompt("instance") == [18, 2, 6, photo, 19, 0, 0, 0]  # "an instance photo"
    ids = tok.prompts([1, 0], "semantic", num_text=4)
    assert ids.shape == (4, 8)
    assert ids.argmax(-1).tolist() == [6, 6, 4, 4]  # the end token is the largest id: pooling finds it
    assert ids[2].tolist() == tok.task_prompt("semantic") == ids[3].tolist()
    with pytest.raises(ValueError, match="cannot hold"):
        PromptTokenizer(num_classes=15, vocab_size=20, context_length=8)


def test_causal_text_encoder_ignores_what_follows_the_end_token():
    torch.manual_seed(0)
    mapper = TextMapper(vocab_size=20, context_length=8, width=16, layers=2, hidden_dim=16, n_ctx=3).eval()
    ids = torch.tensor([[[18, 1, 3, 19, 0, 0, 0, 0]]])
    noisy = ids.clone()
    noisy[0, 0, 4:] = torch.tensor([5, 6, 7, 2])
    out = mapper(ids)
    assert out.shape == (1, 1 + 3, 16)
    torch.testing.assert_close(mapper(noisy)[0, 0], out[0, 0])  # causal: later tokens invisible
    torch.testing.assert_close(out[0, 1:], mapper.prompt_ctx.weight)
    mapper.text_encoder.causal = False
    assert not torch.allclose(mapper(noisy)[0, 0], mapper(ids)[0, 0])


def test_contrastive_loss_matches_hand_computation():
    img = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])  # 2 images, 1 query of width 2
    txt = torch.tensor([[[3.0, 4.0]], [[0.0, -1.0]]])
    scale = torch.tensor(math.log(10.0))
    # normalised: img (1,0),(0,1); txt (.6,.8),(0,-1); logits_per_text = 10 * [[.6,.8],[0,-1]]
    lt = torch.tensor([[6.0, 8.0], [0.0, -10.0]])
    ce_text = (-torch.log_softmax(lt, 1).diagonal()).mean()
    ce_img = (-torch.log_softmax(lt.t(), 1).diagonal()).mean()
    loss = query_text_contrastive_loss(img, txt, scale)
    torch.testing.assert_close(loss, ce_text + ce_img)
    # the temperature is clamped at 100
    big = query_text_contrastive_loss(img, txt, torch.tensor(math.log(1000.0)))
    lt100 = lt * 10
    expected = (-torch.log_softmax(lt100, 1).diagonal()).mean() + (-torch.log_softmax(lt100.t(), 1).diagonal()).mean()
    torch.testing.assert_close(big, expected)


# ------------------------------------------------------------------------------------ model


def test_text_mapper_is_not_used_at_inference_and_is_not_exported(tmp_path):
    model = build_model(_tiny_cfg(), num_classes=6, thing_ids=[0, 1, 2, 3]).eval()
    calls = []
    model.text_mapper.register_forward_hook(lambda *a: calls.append(1))
    preds = model.predict(torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), [(64, 64)])
    assert calls == [] and set(preds[0]) == {"semantic", "panoptic", "instances"}
    from omniseg.export import InferenceGraph

    graph = InferenceGraph(model)
    assert not any(k.startswith(("model.text_mapper", "model.logit_scale")) for k in graph.state_dict())


def test_task_token_changes_the_prediction_and_predict_runs_one_pass_per_task():
    model = build_model(_tiny_cfg(), num_classes=6, thing_ids=[0, 1, 2, 3]).eval()
    images = torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8)
    x = model.normalize(images)
    sem, pan = model.forward_raw(x, "semantic"), model.forward_raw(x, "panoptic")
    assert sem["pred_logits"].shape == (2, 8, 7) and len(sem["aux_outputs"]) == 3
    assert not torch.allclose(sem["pred_logits"], pan["pred_logits"])
    # the last query is the (normalised) task token itself
    token = model.predictor.decoder_norm(model.task_token(task_token_ids(["semantic"], model.task_seq_len)))
    torch.testing.assert_close(sem["contrastive_queries"][0, -1], token[0])
    preds = model.predict(images, [(64, 96), (60, 90)], tasks=["semantic"], return_raw=True)
    assert set(preds[1]) == {"semantic", "raw"} and preds[1]["semantic"].shape == (60, 90)
    torch.testing.assert_close(preds[0]["raw"]["pred_logits"], sem["pred_logits"][0])
    both = model.predict(images, [(64, 96), (60, 90)], tasks=["semantic", "panoptic"], return_raw=True)
    assert set(both[0]["raw"]) == {"semantic", "panoptic"}  # one decoder pass per task
    torch.testing.assert_close(both[0]["raw"]["panoptic"]["pred_logits"], pan["pred_logits"][0])
    torch.testing.assert_close(both[1]["semantic"], preds[1]["semantic"])


def test_training_lowers_every_loss_and_reaches_every_parameter():
    torch.manual_seed(0)
    model = build_model(_tiny_cfg(), num_classes=3, thing_ids=[0, 1]).train()
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, :32], masks[1, 32:, :32], masks[2, 32:, 32:] = True, True, True
    targets = [{"labels": torch.tensor([0, 1, 2]), "masks": masks, "task": "panoptic", "seed": 1},
               {"labels": torch.tensor([2]), "masks": masks[:1] | masks[1:2], "task": "semantic", "seed": 2}]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for step in range(40):
        losses = model.losses(images, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        if step == 0:
            assert [n for n, p in model.named_parameters() if p.grad is None] == []
        opt.step()
        history.append({k: v.item() for k, v in losses.items() if k in ("loss_ce", "loss_dice", "loss_contrastive")})
    for key in ("loss_ce", "loss_dice", "loss_contrastive"):
        assert history[-1][key] < 0.7 * history[0][key], (key, history[0][key], history[-1][key])


def test_task_sampling_is_uniform_deterministic_and_respects_annotations():
    from omniseg.data.training import TrainingSet

    pan = torch.tensor([[1, 1], [2, 2]], dtype=torch.int32)
    infos = [{"id": 1, "category": 0, "isthing": True}, {"id": 2, "category": 1, "isthing": False}]

    class Source(torch.utils.data.Dataset):
        def __init__(self, key):
            self.key = key

        def __len__(self):
            return 1

        def __getitem__(self, i):
            image = torch.zeros(3, 2, 2, dtype=torch.uint8)
            if self.key == "pan":
                return {"image": image, "pan_seg": pan, "segments_info": infos, "file_name": "a.png"}
            if self.key == "none":
                return {"image": image, "file_name": "c.png"}
            return {"image": image, "sem_seg": torch.tensor([[0, 0], [1, 1]]), "file_name": "b.png"}

    drawn = [TrainingSet(Source("pan"), lambda s: s, "sampled")[(0, seed)]["targets"] for seed in range(300)]
    counts = {t: sum(d["task"] == t for d in drawn) for t in ("semantic", "instance", "panoptic")}
    assert all(70 <= c <= 130 for c in counts.values()), counts
    inst = next(d for d in drawn if d["task"] == "instance")
    assert inst["labels"].tolist() == [0]  # things only
    sem = next(d for d in drawn if d["task"] == "semantic")
    assert sem["labels"].tolist() == [0, 1]
    again = TrainingSet(Source("pan"), lambda s: s, "sampled")[(0, 7)]["targets"]["task"]
    assert again == drawn[7]["task"]
    only_sem = {TrainingSet(Source("sem"), lambda s: s, "sampled")[(0, s)]["targets"]["task"] for s in range(20)}
    assert only_sem == {"semantic"}
    from omniseg.data.errors import DataError

    with pytest.raises(DataError, match="c.png"):
        TrainingSet(Source("none"), lambda s: s, "sampled")[(0, 0)]
    random.seed(0)  # the draw does not disturb the global stream
    first = random.random()
    random.seed(0)
    TrainingSet(Source("pan"), lambda s: s, "sampled")[(0, 3)]
    assert random.random() == first


# ------------------------------------------------------------------------------------ HF parity

transformers = pytest.importorskip("transformers")


def _hf_model(backbone_config, seed: int, **overrides):
    from transformers import OneFormerConfig, OneFormerForUniversalSegmentation

    kwargs = dict(backbone_config=backbone_config, num_labels=5, hidden_dim=64, conv_dim=64, mask_dim=64,
                  encoder_layers=2, decoder_layers=4, num_queries=10, encoder_feedforward_dim=128,
                  dim_feedforward=128, text_encoder_width=64, text_encoder_num_layers=2,
                  text_encoder_context_length=8, text_encoder_vocab_size=40, text_encoder_n_ctx=4, is_training=True,
                  id2label={i: f"c{i}" for i in range(5)}, label2id={f"c{i}": i for i in range(5)},
                  # HF's pixel-decoder layers apply dropout whenever config.is_training is set, even in
                  # eval mode; is_training is needed to build the text mapper, so dropout must be 0 here.
                  dropout=0.0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = OneFormerForUniversalSegmentation(OneFormerConfig(**kwargs)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # HF zeroes many biases at init: perturb everything so every weight matters
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.add_(0.1 * torch.randn(t.shape, generator=g))
    return model


def _assert_task_parity(model, hf, x, task: str, text_ids):
    ids = task_token_ids([task] * x.shape[0], 77)
    with torch.no_grad():
        ref = hf(pixel_values=x, task_inputs=ids, text_inputs=text_ids, output_auxiliary_logits=True)
        ours = model.forward_raw(x, task)
        text = model.text_mapper(text_ids)
    ref_logits = [a["class_queries_logits"] for a in ref.auxiliary_predictions] + [ref.class_queries_logits]
    ref_masks = [a["masks_queries_logits"] for a in ref.auxiliary_predictions] + [ref.masks_queries_logits]
    our_logits = [a["pred_logits"] for a in ours["aux_outputs"]] + [ours["pred_logits"]]
    our_masks = [a["pred_masks"] for a in ours["aux_outputs"]] + [ours["pred_masks"]]
    assert len(our_logits) == len(ref_logits) == hf.config.decoder_layers
    for i, (a, b) in enumerate(zip(our_logits, ref_logits)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"{task} class logits {i}: {m}")
    for i, (a, b) in enumerate(zip(our_masks, ref_masks)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"{task} mask logits {i}: {m}")
    torch.testing.assert_close(ours["contrastive_queries"], ref.transformer_decoder_contrastive_queries,
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(text, ref.text_queries, atol=ATOL, rtol=0)
    with torch.no_grad():
        hf_loss = hf.criterion.loss_contrastive(ref.transformer_decoder_contrastive_queries,
                                                ref.text_queries)["loss_contrastive"]
        our_loss = query_text_contrastive_loss(ours["contrastive_queries"], text, model.logit_scale)
    torch.testing.assert_close(our_loss, hf_loss, atol=ATOL, rtol=0)


def _text_ids(batch: int, num_text: int, seed: int) -> torch.Tensor:
    tok = PromptTokenizer(num_classes=5, vocab_size=40, context_length=8)
    rng = random.Random(seed)
    return torch.stack([tok.prompts([rng.randrange(5) for _ in range(rng.randrange(num_text))],
                                    rng.choice(["semantic", "instance", "panoptic"]), num_text)
                        for _ in range(batch)])


def test_resnet_oneformer_matches_hf_for_every_task_and_layer(tmp_path):
    from transformers import ResNetConfig

    from omniseg.api import load_model

    backbone = ResNetConfig(out_features=STAGES, depths=[1, 2, 1, 1], hidden_sizes=[64, 128, 256, 512],
                            layer_type="bottleneck")
    hf = _hf_model(backbone, seed=0)
    hf.save_pretrained(tmp_path)
    model, cfg, meta = load_model(tmp_path)
    assert cfg.model.arch == "oneformer" and meta.classes == [f"c{i}" for i in range(5)]
    assert cfg.model.oneformer.text_causal is False and cfg.model.dec_layers == 3
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(3))
    text_ids = _text_ids(2, 10 - 4, seed=1)
    for task in ("semantic", "instance", "panoptic"):
        _assert_task_parity(model, hf, x, task, text_ids)


def test_swin_prenorm_oneformer_matches_hf(tmp_path):
    from transformers import SwinConfig

    from omniseg.hub.hf import load_hf_checkpoint

    swin = SwinConfig(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=7, out_features=STAGES)
    hf = _hf_model(swin, seed=10, pre_norm=True, query_dec_layers=1, num_attention_heads=4)
    hf.save_pretrained(tmp_path)
    model, cfg, _ = load_hf_checkpoint(tmp_path)
    assert cfg.model.pre_norm and cfg.model.oneformer.query_dec_layers == 1
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(4))
    _assert_task_parity(model, hf, x, "instance", _text_ids(1, 6, seed=2))


def test_inference_checkpoint_without_text_mapper_loads(tmp_path):
    """Published checkpoints (is_training=false) carry no text mapper: they load for inference."""
    from transformers import ResNetConfig

    from omniseg.api import Predictor

    backbone = ResNetConfig(out_features=STAGES, depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 256],
                            layer_type="basic")
    hf = _hf_model(backbone, seed=5, is_training=False)
    assert not any(k.startswith("model.text_mapper") for k in hf.state_dict())
    hf.save_pretrained(tmp_path)
    predictor = Predictor(tmp_path, device="cpu", tasks=["semantic"])
    pred = predictor(torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8))
    assert set(pred) >= {"semantic"} and pred["semantic"].shape == (50, 70)
    assert "panoptic" not in pred


# ------------------------------------------------------------------------------------ end to end


def test_cli_trains_one_checkpoint_and_predicts_each_task_with_it(synth_root, tmp_path):
    from typer.testing import CliRunner

    from omniseg.cli import app

    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "oneformer_demo", *TINY_MODEL, *TINY_TEXT, f"data.train.root={synth_root}",
                                 f"data.val.root={synth_root}", "data.crop_size=64", "data.batch_size=2",
                                 "data.num_workers=0", "train.max_iters=3", "train.eval_period=3",
                                 f"train.output_dir={out}"])
    assert result.exit_code == 0, result.output
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_contrastive" in row for row in logged)
    final = json.loads((out / "final_metrics.json").read_text())["metrics"]
    assert {"PQ", "mIoU", "AP"} <= set(final)
    images = synth_root / "val" / "images"
    for task, produced in (("semantic", "semantic"), ("instance", "instances_results.json")):
        pred_dir = tmp_path / task
        result = runner.invoke(app, ["predict", "--weights", str(out / "model_final.safetensors"), "--input",
                                     str(images), "--output", str(pred_dir), "--task", task, "--no-overlay"])
        assert result.exit_code == 0, result.output
        assert (pred_dir / produced).exists() and not (pred_dir / "panoptic.json").exists()


def test_export_bakes_the_chosen_task_into_the_graph(tmp_path):
    from omniseg.export import export_model, load_exported

    model = build_model(_tiny_cfg(), num_classes=6, thing_ids=[0, 1, 2, 3]).eval()
    images = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    path = export_model(model, tmp_path / "sem.pt2", height=64, width=96, task="semantic")
    assert json.loads((tmp_path / "sem.pt2.json").read_text())["task"] == "semantic"
    logits, masks = load_exported(path)(images)
    with torch.no_grad():
        eager = model.forward_raw(model.normalize(images), "semantic")
    torch.testing.assert_close(logits, eager["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(masks, eager["pred_masks"], atol=1e-5, rtol=0)
    shared = {k: v for k, v in _tiny_cfg().items() if k != "oneformer"}  # the Mask2Former keys OneFormer extends
    shared["test"] = {k: v for k, v in shared["test"].items() if k != "task"}
    mask2former = build_model({**shared, "arch": "mask2former"}, num_classes=6).eval()
    with pytest.raises(ValueError, match="OneFormer"):
        export_model(mask2former, tmp_path / "m.pt2", height=64, width=96, task="semantic")


def _contrastive_rank(rank: int, world: int, port: int, img, txt, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mine_img = img[rank:rank + 1].clone().requires_grad_(True)
        loss = query_text_contrastive_loss(mine_img, txt[rank:rank + 1], torch.tensor(math.log(5.0)))
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": mine_img.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_contrastive_loss_gathers_over_ranks_like_one_big_batch(tmp_path):
    """Two gloo ranks with one image each score the same 2x2 similarity as one process with both
    images; DDP then averages the ranks' gradients, which equals the one-process gradient."""
    import socket

    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_contrastive_rank, args=(2, port, img, txt, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    whole = img.clone().requires_grad_(True)
    expected = query_text_contrastive_loss(whole, txt, torch.tensor(math.log(5.0)))
    expected.backward()
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["loss"], expected.detach())
        # all_gather's backward sums every rank's gradient for this rank's rows; DDP divides by the world size
        torch.testing.assert_close(got["grad"][0] / 2, whole.grad[r], atol=1e-6, rtol=0)
