"""omniseg convert --from mmseg: MMSegmentation PSPNet, DANet and FastFCN (PSP, ASPP or Enc head) checkpoints
become omniseg weights files whose network computes what MMSegmentation's does (parity against mmseg's own
modules, random weights and BatchNorm statistics, saved as MMSeg saves them), with the config following the
checkpoint."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from typer.testing import CliRunner

import pytest

from helpers.mmseg_reference import mmseg
from omniseg.api import Predictor, load_model
from omniseg.cli import app
from omniseg.hub.convert import convert
from omniseg.hub.errors import CheckpointError

BN = dict(type="BN", requires_grad=True)


def _backbone(depth: int, dilated: bool, kind: str = "ResNetV1c") -> dict:
    """MMSeg's ResNetV1c as its configs set it: "-d8" (PSPNet, DANet) or FastFCN's "-d32" (`kind="ResNet"`:
    the 7x7-stem ResNet of MMSeg's "r50b" configs)."""
    return dict(type=kind, depth=depth, num_stages=4, out_indices=(0, 1, 2, 3) if dilated else (1, 2, 3),
                dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1) if dilated else (1, 2, 2, 2), norm_cfg=BN,
                norm_eval=False, style="pytorch", contract_dilation=True)


def _aux(cin: int, channels: int, num_classes: int, in_index: int) -> dict:
    return dict(type="FCNHead", in_channels=cin, in_index=in_index, channels=channels, num_convs=1,
                concat_input=False, dropout_ratio=0.1, num_classes=num_classes, norm_cfg=BN, align_corners=False)


class Segmentor(nn.Module):
    """backbone -> [neck] -> decode head, as MMSeg's EncoderDecoder names and runs them (whole-image test)."""

    def __init__(self, backbone: dict, decode_head: dict, auxiliary_head: dict | None, neck: dict | None = None):
        super().__init__()
        mmseg()  # the mmcv.ops stand-in, then mmseg's registry
        from mmseg.registry import MODELS

        self.backbone = MODELS.build(backbone)
        if neck is not None:
            self.neck = MODELS.build(neck)
        self.decode_head = MODELS.build(decode_head)
        if auxiliary_head is not None:
            self.auxiliary_head = MODELS.build(auxiliary_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        if hasattr(self, "neck"):
            feats = self.neck(feats)
        logits = self.decode_head(feats)
        logits = logits[0] if isinstance(logits, tuple) else logits  # DAHead: (pam_cam, pam, cam)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, non-zero attention scales, eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
            if name.endswith("gamma") and hasattr(m, "scale"):  # mmcv Scale, 0 at initialisation
                m.scale.fill_(0.7 if "pam" in name else 0.3)
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0, 0.1, generator=generator)
    return model.eval()


def _save(model: nn.Module, path, meta: dict | None = None) -> None:
    """As MMSeg writes a checkpoint: meta + state_dict (+ optimizer state)."""
    torch.save({"meta": meta or {"mmseg_version": "1.2.2", "iter": 80000}, "state_dict": model.state_dict(),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.01}]}}, path)


def _image(size=(64, 96), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _assert_same_network(reference: nn.Module, weights, size=(64, 96)) -> None:
    model, _, _ = load_model(weights)
    x = model.normalize(_image(size))
    with torch.no_grad():
        ours = model.forward_raw(x)["sem_seg"]
        theirs = reference(x)
    assert ours.shape == theirs.shape and theirs.abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def _converted(reference, tmp_path, preset, meta=None):
    _save(reference, tmp_path / "mmseg.pth", meta)
    report = convert(tmp_path / "mmseg.pth", "mmseg", preset, tmp_path / "m.safetensors")
    assert report["unmapped"] == [] and report["missing"] == [] and report["initialised"] == []
    assert report["ignored"] == {}
    return report


@pytest.mark.parametrize("depth,kind", [(18, "ResNetV1c"), (50, "ResNetV1c"), (18, "ResNet")])
def test_pspnet_converts_to_the_same_network(tmp_path, depth, kind):
    top, res4 = (512, 256) if depth == 18 else (2048, 1024)
    torch.manual_seed(0)
    reference = _randomise(Segmentor(
        _backbone(depth, dilated=True, kind=kind),
        dict(type="PSPHead", in_channels=top, in_index=3, channels=64, pool_scales=(1, 2, 3, 6), dropout_ratio=0.1,
             num_classes=5, norm_cfg=BN, align_corners=False),
        _aux(res4, 32, 5, in_index=2)))
    report = _converted(reference, tmp_path, "pspnet_r50")
    for setting in (f"model.backbone=resnet{depth}", "model.output_stride=8", "model.stage_dilations=[1,1,2,4]",
                    "model.psp_branch_width=64", "model.aux_width=32"):
        assert setting in report["overrides"]
    assert ("model.backbone_kwargs.stem_type=deep" in report["overrides"]) == (kind == "ResNetV1c")
    _assert_same_network(reference, tmp_path / "m.safetensors")


def test_danet_converts_with_its_auxiliary_head_and_attention_scales(tmp_path):
    torch.manual_seed(0)
    reference = _randomise(Segmentor(
        _backbone(50, dilated=True),
        dict(type="DAHead", in_channels=2048, in_index=3, channels=64, pam_channels=16, dropout_ratio=0.1,
             num_classes=4, norm_cfg=BN, align_corners=False),
        _aux(1024, 32, 4, in_index=2)))
    report = _converted(reference, tmp_path, "danet_r50")
    assert "model.pam_channels=16" in report["overrides"] and "model.loss.aux_weight=0.4" in report["overrides"]
    model, cfg, _ = load_model(tmp_path / "m.safetensors")
    assert cfg.model.arch == "danet" and model.aux_head is not None
    assert float(model.head.pam.gamma) == pytest.approx(0.7) and float(model.head.cam.beta) == pytest.approx(0.3)
    torch.testing.assert_close(model.aux_head.classifier[1].weight, reference.auxiliary_head.conv_seg.weight)
    _assert_same_network(reference, tmp_path / "m.safetensors")


def _fastfcn(decode_head: dict, num_classes: int = 3) -> Segmentor:
    torch.manual_seed(0)
    neck = dict(type="JPU", in_channels=(512, 1024, 2048), mid_channels=32, start_level=0, end_level=-1,
                dilations=(1, 2, 4, 8), align_corners=False, norm_cfg=BN)
    return _randomise(Segmentor(_backbone(50, dilated=False), decode_head, _aux(1024, 32, num_classes, 1),
                                neck))


def test_fastfcn_psp_converts_to_the_same_network_with_the_checkpoint_config_and_classes(tmp_path):
    from mmengine.config import Config

    head = dict(type="PSPHead", in_channels=128, in_index=2, channels=48, pool_scales=(1, 2, 4), dropout_ratio=0.1,
                num_classes=3, norm_cfg=BN, align_corners=False)
    reference = _fastfcn(head)
    config = Config(dict(model=dict(type="EncoderDecoder", backbone=_backbone(50, dilated=False),
                                    neck=dict(type="JPU", dilations=(1, 2, 4, 8), align_corners=False),
                                    decode_head=head))).pretty_text
    report = _converted(reference, tmp_path, "fastfcn_jpu_r50",
                        meta={"config": config, "CLASSES": ("road", "car", "sky"), "PALETTE": [[1, 2, 3]] * 3})
    for setting in ("model.neck=jpu", "model.jpu_width=32", "model.jpu_align_corners=false", "model.psp_bins=[1,2,4]",
                    "model.stage_dilations=[1,1,2,4]"):
        assert setting in report["overrides"]
    _, cfg, meta = load_model(tmp_path / "m.safetensors")
    assert meta.classes == ["road", "car", "sky"] and cfg.model.output_stride == 8  # the neck makes it 32
    _assert_same_network(reference, tmp_path / "m.safetensors", size=(96, 64))


def test_fastfcn_aspp_head_is_computed_the_mmseg_way(tmp_path):
    reference = _fastfcn(dict(type="ASPPHead", in_channels=128, in_index=2, channels=32,
                                      dilations=(1, 12, 24, 36), dropout_ratio=0.1, num_classes=3, norm_cfg=BN,
                                      align_corners=False))
    report = _converted(reference, tmp_path, "fastfcn_jpu_r50")
    assert "model.arch=deeplabv3" in report["overrides"] and "model.aspp_project=false" in report["overrides"]
    assert "model.aspp_rates=[12,24,36]" in report["overrides"]
    _assert_same_network(reference, tmp_path / "m.safetensors", size=(64, 64))


@pytest.mark.parametrize("add_lateral", [False, True])
def test_fastfcn_enc_head_converts_to_the_same_network(tmp_path, add_lateral):
    """FastFCN's EncNet (EncHead over the JPU): context encoding, SE classifier, laterals of res3 / res4."""
    from mmengine.config import Config

    head = dict(type="EncHead", in_channels=[512, 1024, 128], in_index=(0, 1, 2), channels=32, num_codes=8,
                use_se_loss=True, add_lateral=add_lateral, dropout_ratio=0.1, num_classes=3, norm_cfg=BN,
                align_corners=False, loss_se_decode=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=0.3))
    reference = _fastfcn(head)
    config = Config(dict(model=dict(type="EncoderDecoder", backbone=_backbone(50, dilated=False),
                                    neck=dict(type="JPU", dilations=(1, 2, 4, 8), align_corners=False),
                                    decode_head=head))).pretty_text
    report = _converted(reference, tmp_path, "encnet_jpu_r50", meta={"config": config})
    for setting in ("model.arch=encnet", "model.num_codes=8", f"model.enc_lateral={str(add_lateral).lower()}",
                    "model.loss.se_weight=0.3", "model.neck=jpu", "model.head_width=32"):
        assert setting in report["overrides"]
    model, _, _ = load_model(tmp_path / "m.safetensors")
    torch.testing.assert_close(model.se_classifier.weight, reference.decode_head.se_layer.weight)
    torch.testing.assert_close(model.head.encoding.encoding.codewords,
                               reference.decode_head.enc_module.encoding[0].codewords)
    _assert_same_network(reference, tmp_path / "m.safetensors", size=(64, 96))


def test_dilated_encnet_converts_without_the_se_layer(tmp_path):
    """MMSeg's EncNet "-d8" (EncHead on res5 of a dilated ResNet), trained without the SE-loss."""
    torch.manual_seed(0)
    reference = _randomise(Segmentor(
        _backbone(18, dilated=True),
        dict(type="EncHead", in_channels=[128, 256, 512], in_index=(1, 2, 3), channels=32, num_codes=4,
             use_se_loss=False, add_lateral=False, dropout_ratio=0.1, num_classes=4, norm_cfg=BN, align_corners=False),
        _aux(256, 16, 4, in_index=2)))
    report = _converted(reference, tmp_path, "encnet_jpu_r50")
    for setting in ("model.arch=encnet", "model.neck=null", "model.output_stride=8", "model.loss.se_weight=0.0"):
        assert setting in report["overrides"]
    model, _, _ = load_model(tmp_path / "m.safetensors")
    assert model.se_classifier is None
    _assert_same_network(reference, tmp_path / "m.safetensors")


def test_released_pspnet_r50_layout_converts_with_ade20k_classes_then_predicts(tmp_path):
    """The model zoo's pspnet_r50-d8 ADE20K layout (full widths, 150 classes) through the command line,
    then `omniseg predict` and Predictor on the converted file."""
    torch.manual_seed(0)
    reference = _randomise(Segmentor(
        _backbone(50, dilated=True),
        dict(type="PSPHead", in_channels=2048, in_index=3, channels=512, pool_scales=(1, 2, 3, 6), dropout_ratio=0.1,
             num_classes=150, norm_cfg=BN, align_corners=False),
        _aux(1024, 256, 150, in_index=2)))
    _save(reference, tmp_path / "pspnet_r50-d8_ade20k.pth")
    weights = tmp_path / "pspnet.safetensors"
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(tmp_path / "pspnet_r50-d8_ade20k.pth"), "--from", "mmseg", "--preset",
                                 "pspnet_r50", "--classes", "ade20k", "-o", str(weights)])
    assert result.exit_code == 0, result.output
    assert "model.backbone=resnet50" in result.output and "model.stage_dilations=[1,1,2,4]" in result.output
    model, cfg, meta = load_model(weights)
    assert meta.num_classes == 150 and meta.classes[0] == "wall" and cfg.model.psp_branch_width == 512

    image = _image((64, 96), seed=3)[0]  # a multiple of 32: no padding, the network sees what mmseg sees
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "image.png")
    result = runner.invoke(app, ["predict", "-w", str(weights), "-i", str(tmp_path / "image.png"), "-o",
                                 str(tmp_path / "out"), "--num-workers", "0", "--device", "cpu", "--no-overlay"])
    assert result.exit_code == 0, result.output
    written = sorted(p for p in (tmp_path / "out").rglob("*.png"))
    assert written, result.output
    semantic = Predictor(weights, device="cpu", min_size_test=64)(image)["semantic"]
    with torch.no_grad():
        expected = reference(model.normalize(image[None])).argmax(1)[0]
    assert semantic.shape == (64, 96)
    assert (semantic == expected).float().mean() > 0.99
    label = np.asarray(Image.open(written[0]))
    assert label.shape == (64, 96)


def test_non_mmseg_checkpoints_and_unknown_tensors_are_refused(tmp_path):
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="decode_head"):
        convert(tmp_path / "x.pth", "mmseg", "pspnet_r50", tmp_path / "x.safetensors")
    reference = Segmentor(_backbone(18, dilated=True), dict(type="PSPHead", in_channels=512, in_index=3, channels=16,
                                                           num_classes=2, norm_cfg=BN), None)
    sd = reference.state_dict()
    sd["decode_head.extra_conv.weight"] = torch.zeros(2, 16, 1, 1)
    torch.save({"meta": {}, "state_dict": sd}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="1 checkpoint tensors unmapped \\(decode_head.extra_conv.weight\\)"):
        convert(tmp_path / "extra.pth", "mmseg", "pspnet_r50", tmp_path / "extra.safetensors")
