"""Export of the inference network: torch.export and ONNX graphs give eager outputs; MP-Former exports as Mask2Former."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_MODEL  # noqa: E402
from omniseg.cli import app
from omniseg.config import load_config
from omniseg.data.build import build_datasets
from omniseg.models.registry import build_model_from_config
from omniseg.export import export_model, load_exported, postprocess_exported


def _model(synth_root, *extra: str):
    cfg = load_config("mask2former_demo", [*TINY_MODEL, f"data.train.root={synth_root}",
                                           f"data.val.root={synth_root}", *extra])
    datasets, meta = build_datasets(cfg, splits=("val",))
    torch.manual_seed(0)
    model = build_model_from_config(cfg, meta).eval()
    # A few steps of "training" so that thresholds select real segments: scale the class head.
    with torch.no_grad():
        model.predictor.class_embed.weight.mul_(20)
    return model, meta, datasets["val"]


def _eager(model, images):
    with torch.no_grad():
        out = model.forward_raw(model.normalize(images))
    return out["pred_logits"], out["pred_masks"]


@pytest.mark.parametrize("fmt,suffix,atol", [("torch-export", ".pt2", 1e-5), ("onnx", ".onnx", 1e-4)])
def test_exported_graph_matches_eager(synth_root, tmp_path, fmt, suffix, atol):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="ONNX Runtime is a test extra")
        pytest.importorskip("onnxscript", reason="the ONNX exporter needs onnxscript (pip install 'omniseg[export]')")
    model, meta, _ = _model(synth_root)
    path = export_model(model, tmp_path / f"m{suffix}", fmt=fmt, height=64, width=96, batch=2, meta=meta)
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    assert sidecar["input"]["shape"] == [2, 3, 64, 96] and sidecar["classes"] == meta.classes
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ours = load_exported(path)(images)
    ref = _eager(model, images)
    assert ours[0].shape == ref[0].shape and ours[1].shape == (2, ref[1].shape[1], 16, 24)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_mp_former_exports_the_mask2former_graph_and_postprocessing_matches_predict(synth_root, tmp_path):
    model, meta, val = _model(synth_root, "model.mp.enabled=true")
    assert model.mask_pilot is not None
    path = export_model(model, tmp_path / "mp.pt2", height=64, width=64, meta=meta)
    exported_names = {n for n, _ in torch.export.load(path).module().named_parameters()}
    assert exported_names and not any("mask_pilot" in n for n in exported_names)  # training-only parts left out
    sidecar = json.loads((tmp_path / "mp.pt2.json").read_text())
    image = val[0]["image"][None]  # 64x64 synthetic validation image
    logits, masks = load_exported(path)(image)
    ours = postprocess_exported(logits, masks, sidecar, [(64, 64)])[0]
    ref = model.predict(image, [(64, 64)])[0]
    assert torch.equal(ours["semantic"], ref["semantic"])
    assert torch.equal(ours["panoptic"]["segment_map"], ref["panoptic"]["segment_map"])
    assert len(ref["panoptic"]["segments_info"]) > 0
    torch.testing.assert_close(ours["instances"]["scores"], ref["instances"]["scores"])


def test_export_cli(synth_root, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "mask2former_demo", *TINY_MODEL, f"data.train.root={synth_root}",
                                 f"data.val.root={synth_root}", "data.crop_size=64", "data.batch_size=2",
                                 "data.num_workers=0", "train.max_iters=1", "train.eval_period=100",
                                 f"train.output_dir={run}"])
    assert result.exit_code == 0, result.output
    weights = str(run / "model_final.safetensors")
    result = runner.invoke(app, ["export", "-w", weights, "-o", str(tmp_path / "m.pt2"), "--height", "64", "--width", "64"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.pt2").is_file() and (tmp_path / "m.pt2.json").is_file()
    result = runner.invoke(app, ["export", "-w", weights, "-o", str(tmp_path / "x.pt2"), "--height", "70"])
    assert result.exit_code == 2 and "multiples of 32" in result.output
    result = runner.invoke(app, ["export", "-w", weights, "-o", str(tmp_path / "x.trt"), "--format", "tensorrt"])
    assert result.exit_code == 2 and "torch-export, onnx" in result.output


SMALL_ARCHS = {
    "maskformer": ("maskformer_r50", ["model.backbone=resnet18", "model.backbone_kwargs={layers: [1,1,1,1], channels: [16,32,64,64]}",
                                      "model.hidden_dim=32", "model.conv_dim=32", "model.mask_dim=32", "model.nheads=2",
                                      "model.dim_feedforward=64", "model.num_queries=8", "model.dec_layers=2"]),
    "mask2former_swin": ("mask2former_swin_t", ["model.backbone_kwargs.embed_dim=32", "model.backbone_kwargs.depths=[1,1,2,1]",
                                                "model.backbone_kwargs.num_heads=[1,2,4,8]", "model.hidden_dim=32",
                                                "model.conv_dim=32", "model.mask_dim=32", "model.nheads=2",
                                                "model.dim_feedforward=64", "model.enc_layers=1", "model.num_queries=8",
                                                "model.dec_layers=2"]),
}


@pytest.mark.parametrize("arch", list(SMALL_ARCHS))
def test_other_architectures_export(arch, tmp_path):
    """MaskFormer (FPN + DETR decoder) and Swin (padded, shifted windows) export too; 96x128 needs Swin padding."""
    from omegaconf import OmegaConf

    from omniseg.models.registry import build_model

    preset, extra = SMALL_ARCHS[arch]
    cfg = load_config(preset, extra)
    torch.manual_seed(0)
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True), num_classes=5, thing_ids=[1, 2]).eval()
    path = export_model(model, tmp_path / "m.pt2", height=96, width=128)
    images = torch.randint(0, 256, (1, 3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    for a, b in zip(load_exported(path)(images), _eager(model, images)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_swin_export_after_eager_calls_filled_the_caches(tmp_path):
    """Eager calls cache Swin window indices, attention biases and position encodings; an export made
    afterwards still matches eager (and the caches never hold traced values: the test above exports first)."""
    from omegaconf import OmegaConf

    from omniseg.models.registry import build_model

    preset, extra = SMALL_ARCHS["mask2former_swin"]
    cfg = load_config(preset, extra)
    torch.manual_seed(0)
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True), num_classes=5, thing_ids=[1, 2]).eval()
    images = torch.randint(0, 256, (1, 3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    before = _eager(model, images)
    path = export_model(model, tmp_path / "m.pt2", height=96, width=128)
    for exported, eager, cached in zip(load_exported(path)(images), _eager(model, images), before):
        torch.testing.assert_close(eager, cached)
        torch.testing.assert_close(exported, eager, atol=1e-5, rtol=0)
