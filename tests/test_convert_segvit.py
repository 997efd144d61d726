"""omniseg convert --from segvit: the official SegViT releases (plain ViT + ATM head; ViT-L Shrunk with the
TPN head) convert with nothing unmapped or missing and predict. The layouts are read from the official
code (tests/fixtures/checkpoint_layouts/segvit_*.json); the full-size ones are checked on the meta device."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from helpers.checkpoint_layouts import load_layout, random_state_dict, write_torch_checkpoint

from omniseg.api import Predictor, load_model
from omniseg.cli import app
from omniseg.config import apply_overrides, load_config
from omniseg.hub.convert import convert
from omniseg.hub.converters.segvit import convert as convert_segvit
from omniseg.hub.errors import CheckpointError


def _release(tmp_path, layout: str, seed: int = 0):
    """A random checkpoint in the release's layout and file format (MMCV's {"meta", "state_dict"})."""
    sd = random_state_dict(load_layout(layout), seed)
    for key in sd:  # LayerNorm scales around 1, as trained ones, so the tokens keep their scale
        if key.endswith(("ln1.weight", "ln2.weight", "norm.weight", "norm1.weight", "norm2.weight", "norm3.weight")):
            sd[key] = sd[key] + 1.0
    return write_torch_checkpoint(tmp_path / f"{layout}.pth", sd, key="state_dict",
                                  meta={"mmseg_version": "0.24.0", "CLASSES": None})


@pytest.mark.parametrize("layout, preset", [("segvit_small", "segvit_vit_b"),
                                            ("segvit_shrunk_small", "segvit_shrunk_vit_b")])
def test_segvit_releases_convert_and_predict(tmp_path, layout, preset):
    path = _release(tmp_path, layout)
    report = convert(path, "segvit", preset, tmp_path / "m.safetensors")
    assert report["unmapped"] == [] and report["missing"] == [] and report["initialised"] == []
    assert all(k.endswith("criterion.empty_weight") for k in report["ignored"])
    model, cfg, meta = load_model(tmp_path / "m.safetensors")
    assert meta.num_classes == 5 and cfg.model.hidden_dim == 64 and cfg.model.nheads == 2
    assert cfg.model.backbone_kwargs.pos_resize == "mmseg" and cfg.model.upsample_mask_logits is True
    sd = torch.load(path, weights_only=True)["state_dict"]
    own = model.state_dict()
    if layout == "segvit_small":
        assert cfg.model.shrink is None and list(cfg.model.vit_out_indices) == [1, 3, 5]
        torch.testing.assert_close(own["decoders.0.layers.2.1.cross_attn.k_proj.weight"],
                                   sd["decode_head.decoder_3.layers.1.multihead_attn.k.weight"])
    else:
        assert cfg.model.shrink == "shrunk" and cfg.model.qu_mode == "grid" and cfg.model.qu_grid == 4
        assert cfg.model.qd_index == 2 and cfg.model.qu_layers == 3
        torch.testing.assert_close(own["qu.stages.1.2.multihead_attn.in_proj_weight"],
                                   sd["decode_head.decoder_2.layers.2.multihead_attn.in_proj_weight"])
        torch.testing.assert_close(own["decoders.0.layers.0.0.cross_attn.out_proj.bias"],
                                   sd["decode_head.atm.decoder_1.layers.0.multihead_attn.proj.bias"])
    torch.testing.assert_close(own["backbone.body.blocks.4.attn.qkv.weight"],
                               sd["backbone.layers.4.attn.attn.in_proj_weight"])
    head = "decode_head.atm." if layout == "segvit_shrunk_small" else "decode_head."
    torch.testing.assert_close(own["decoders.0.class_tokens.weight"], sd[head + "q.weight"])

    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    pred = Predictor(tmp_path / "m.safetensors", min_size_test=64)(image)["semantic"]
    assert pred.shape == (64, 96) and int(pred.min()) >= 0 and int(pred.max()) < 5
    # The Shrunk release's queries cover one 64 px window (the Predictor slides them); the plain one reads any size.
    x = image[None] if layout == "segvit_small" else image[None, :, :, :64]
    with torch.no_grad():
        scores = model.forward_raw(model.normalize(x))["sem_seg"]
    assert scores.shape == (1, 5, *x.shape[-2:]) and torch.isfinite(scores).all() and scores.std() > 0


@pytest.mark.parametrize("layout, preset, expect", [
    ("segvit_vit-b_ade20k", "segvit_vit_b",
     ["model.backbone=vit_b", "model.vit_out_indices=[5,7,11]", "model.nheads=12"]),
    ("segvit_vit-l_shrunk_ade20k", "segvit_shrunk_vit_b",
     ["model.backbone=vit_l", "model.qd_index=8", "model.qu_grid=40", "model.shrink=shrunk"]),
])
def test_full_size_release_layouts_map_onto_the_converted_config(layout, preset, expect, monkeypatch):
    """Every tensor of the full-size releases (ViT-B ADE20K, ViT-L Shrunk ADE20K) has its place, with its
    shape, in the network the converted config builds (built on the meta device: no memory)."""
    from omniseg.models.registry import build_model_from_config
    from omniseg.data.meta import DatasetMeta

    tensors = load_layout(layout)["tensors"]
    sd = {k: torch.empty(v, device="meta") for k, v in tensors.items()}
    monkeypatch.setattr("omniseg.hub.converters.segvit.load_state_dict_file", lambda source: sd)
    conversion = convert_segvit(layout, load_config(preset))
    assert all(e in conversion.overrides for e in expect), conversion.overrides
    assert conversion.num_classes == 150
    cfg = apply_overrides(load_config(preset), conversion.overrides)
    with torch.device("meta"):
        model = build_model_from_config(cfg, DatasetMeta(classes=[f"c{i}" for i in range(150)]),
                                        with_backbone_weights=False)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = {k: tuple(v.shape) for k, v in conversion.state_dict.items()}
    assert sorted(set(mapped) - set(own)) == [] and sorted(set(own) - set(mapped)) == []
    assert {k: s for k, s in mapped.items() if own[k] != s} == {}
    assert len(mapped) + len(conversion.ignored) == len(tensors)


def test_cli_and_refusals(tmp_path):
    path = _release(tmp_path, "segvit_small")
    result = CliRunner().invoke(app, ["convert", str(path), "--from", "segvit", "--preset", "segvit_vit_b",
                                      "-o", str(tmp_path / "s.safetensors")])
    assert result.exit_code == 0, result.output
    assert "model.vit_out_indices=[1,3,5]" in result.output
    sd = torch.load(path, weights_only=True)["state_dict"]
    no_head = {k: v for k, v in sd.items() if not k.startswith("decode_head.")}
    torch.save({"state_dict": no_head}, tmp_path / "vit_only.pth")
    with pytest.raises(CheckpointError, match="not a SegViT ATM head"):
        convert(tmp_path / "vit_only.pth", "segvit", "segvit_vit_b", tmp_path / "x.safetensors")
    torch.save({"state_dict": {"decode_head.q.weight": torch.zeros(3, 4)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no MMSeg ViT backbone"):
        convert(tmp_path / "other.pth", "segvit", "segvit_vit_b", tmp_path / "x.safetensors")
