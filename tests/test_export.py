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


# One preset per exportable family, plus the parts with their own dynamic-size code: the MSDeformAttn pixel
# decoder (mask2former_demo), Swin's windows and shift mask (mask2former_swin_t), the ViT and its Shrunk
# query downsampling (segvit_shrunk_demo), and each per-pixel head.
DYNAMIC_PRESETS = ["mask2former_demo", "maskformer_r50", "mask2former_swin_t", "oneformer_demo", "pspnet_demo",
                   "danet_demo", "fastfcn_jpu_demo", "gscnn_demo", "segvit_shrunk_demo", "upernet_vit_demo"]


@pytest.mark.parametrize("preset", DYNAMIC_PRESETS)
def test_dynamic_size_export_serves_two_sizes_from_one_file(preset, synth_root, tmp_path):
    from omniseg.export import InferenceGraph
    from tiny_presets import tiny_config

    cfg = tiny_config(preset, synth_root, tmp_path / "run")
    _, meta = build_datasets(cfg, splits=("val",))
    torch.manual_seed(0)
    model = build_model_from_config(cfg, meta).eval()
    path = export_model(model, tmp_path / "m.pt2", meta=meta, dynamic=True)
    sidecar = json.loads((tmp_path / "m.pt2.json").read_text())
    sizes = sidecar["input"]["dynamic"]
    assert sidecar["input"]["shape"] == [1, 3, "H", "W"] and sizes["multiple"] == 32 and sizes["max"] == [8192, 8192]
    low_h, low_w = sizes["min"]
    assert 32 <= low_h <= 256 and 32 <= low_w <= 256
    run, graph = load_exported(path), InferenceGraph(model).eval()
    for size in [(low_h, low_w + 64), (low_h + 96, low_w + 32)]:
        images = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            eager = graph(images)
        exported = run(images)
        assert len(exported) == len(eager)
        for a, b in zip(exported, eager):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if low_h > 32:  # below the recorded minimum the graph refuses, rather than computing something else
        with pytest.raises(Exception, match="(?i)guard|range|constraint"):
            run(torch.zeros((1, 3, low_h - 32, low_w), dtype=torch.uint8))


def test_dynamic_onnx_export_and_postprocessing_match_predict(synth_root, tmp_path):
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is a test extra")
    pytest.importorskip("onnxscript", reason="the ONNX exporter needs onnxscript (pip install 'omniseg[export]')")
    model, meta, val = _model(synth_root)
    path = export_model(model, tmp_path / "m.onnx", fmt="onnx", meta=meta, dynamic=True)
    sidecar = json.loads((tmp_path / "m.onnx.json").read_text())
    run = load_exported(path)
    for size in [(64, 96), (128, 64)]:
        images = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
        for a, b in zip(run(images), _eager(model, images)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    image = val[0]["image"][None]  # 64x64: post-processing takes the padded size from the mask logits
    ours = postprocess_exported(*run(image), sidecar, [(64, 64)])[0]
    ref = model.predict(image, [(64, 64)])[0]
    assert torch.equal(ours["panoptic"]["segment_map"], ref["panoptic"]["segment_map"])
    assert torch.equal(ours["semantic"], ref["semantic"])


def test_swin_window_layout_and_shift_mask_in_graph_form_equal_the_cached_ones():
    """The dynamic-size export computes Swin's window layout and shift mask with torch operations; on
    concrete sizes they equal the numpy layout and timm's mask the eager path uses."""
    from timm.models.swin_transformer import SwinTransformerBlock

    from omniseg.models.backbones import _traced_shift_mask, _traced_window_layout, _window_indices

    for h, w, win, shift in [(5, 3, 7, 0), (8, 12, 7, 3), (14, 16, 7, 3), (16, 7, 4, 2), (28, 21, 7, 3)]:
        gather, padding, scatter, num_windows, padded = _window_indices(h, w, (win, win), (shift, shift))
        traced = _traced_window_layout(h, w, (win, win), (shift, shift), "cpu")
        padding_mask = torch.zeros(gather.size, dtype=torch.bool)
        padding_mask[torch.as_tensor(padding)] = True
        assert torch.equal(traced.gather, torch.as_tensor(gather)) and torch.equal(traced.scatter, torch.as_tensor(scatter))
        assert torch.equal(traced.padding, padding_mask)
        assert (traced.num_windows, traced.padded) == (num_windows, padded)
        if shift:
            block = SwinTransformerBlock(dim=8, input_resolution=padded, num_heads=2, window_size=win, shift_size=shift)
            block.window_size, block.shift_size, block.window_area = (win, win), (shift, shift), win * win
            expected = block.get_attn_mask(torch.empty((1, *padded, 1)))
            assert torch.equal(_traced_shift_mask(padded, (win, win), (shift, shift), "cpu", torch.float32), expected)


def test_export_cli_dynamic(synth_root, tmp_path):
    model, meta, _ = _model(synth_root)
    from omniseg.config import to_yaml
    from omniseg.engine.checkpoint import save_weights

    cfg = load_config("mask2former_demo", [*TINY_MODEL, f"data.train.root={synth_root}", f"data.val.root={synth_root}"])
    weights = tmp_path / "m.safetensors"
    save_weights(weights, model, config_yaml=to_yaml(cfg), meta=meta.to_dict())
    result = CliRunner().invoke(app, ["export", "-w", str(weights), "-o", str(tmp_path / "m.pt2"), "--dynamic"])
    assert result.exit_code == 0, result.output
    assert "H, W multiples of 32, H >= 64, W >= 64, up to 8192" in result.output
    images = torch.randint(0, 256, (1, 3, 96, 160), dtype=torch.uint8)
    for a, b in zip(load_exported(tmp_path / "m.pt2")(images), _eager(model, images)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def _detector(preset, synth_root, tmp_path):
    """A tiny detector whose score threshold is set so that the probe images give some, not all, detections:
    the exported graphs must then return an image-dependent number of them."""
    from tiny_presets import tiny_config

    cfg = tiny_config(preset, synth_root, tmp_path / "run")
    _, meta = build_datasets(cfg, splits=("val",))
    torch.manual_seed(0)
    model = build_model_from_config(cfg, meta).eval()
    probe = torch.randint(0, 256, (1, 3, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        scores = model.forward_raw(model.normalize(probe))["scores"]
    threshold = float(scores.median())
    if preset.startswith("blendmask"):
        model.test_cfg.score_threshold = threshold ** 2  # FCOS thresholds cls * ctr; the score is its sqrt
    else:
        model.detector.roi_heads.score_thresh = threshold
    return model, meta


DETECTORS = ["maskrcnn_demo", "panet_demo", "blendmask_panoptic_demo"]


@pytest.mark.parametrize("preset", DETECTORS)
def test_detectors_export_with_image_dependent_detection_counts(preset, synth_root, tmp_path):
    from omniseg.export import InferenceGraph, instances_from_exported

    model, meta = _detector(preset, synth_root, tmp_path)
    path = export_model(model, tmp_path / "det.pt2", meta=meta, dynamic=True)
    sidecar = json.loads((tmp_path / "det.pt2.json").read_text())
    run, graph = load_exported(path), InferenceGraph(model).eval()
    low_h, low_w = sidecar["input"]["dynamic"]["min"]
    low_h, low_w = max(low_h, 128), max(low_w, 128)
    counts = set()
    for size, seed in [((low_h, low_w), 9), ((low_h + 32, low_w + 64), 10), ((low_h, low_w), 11)]:
        image = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            eager = graph(image)
        exported = run(image)
        for a, b in zip(exported, eager):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        counts.add(exported[0].shape[0])
        # post-processing the exported outputs gives predict's instances (the image fills the input)
        ours = instances_from_exported(dict(zip(sidecar["outputs"], exported)), sidecar, size, (size[0] + 8, size[1] - 8))
        ref = model.predict(image, [size], [(size[0] + 8, size[1] - 8)], tasks=["instance"])[0]["instances"]
        assert torch.equal(ours["masks"], ref["masks"]) and torch.equal(ours["labels"], ref["labels"])
        torch.testing.assert_close(ours["boxes"], ref["boxes"], rtol=1e-4, atol=1e-4)
    assert len(counts) > 1 and 0 < min(counts) < 100, counts  # the number of detections follows the image
    with pytest.raises(ValueError, match="one image per call"):
        export_model(model, tmp_path / "b2.pt2", batch=2, meta=meta)


@pytest.mark.parametrize("preset", DETECTORS)
def test_detectors_export_to_onnx(preset, synth_root, tmp_path):
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is a test extra")
    pytest.importorskip("onnxscript", reason="the ONNX exporter needs onnxscript (pip install 'omniseg[export]')")
    from omniseg.export import InferenceGraph

    model, meta = _detector(preset, synth_root, tmp_path)
    path = export_model(model, tmp_path / "det.onnx", fmt="onnx", height=128, width=128, meta=meta)
    image = torch.randint(0, 256, (1, 3, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        eager = InferenceGraph(model).eval()(image)
    exported = load_exported(path)(image)
    assert 0 < exported[0].shape[0] < 100
    for a, b in zip(exported, eager):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, check_dtype=False)
