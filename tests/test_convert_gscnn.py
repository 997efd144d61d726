"""omniseg convert --from gscnn: the official Gated-SCNN release (WideResNet-38-A2, Cityscapes).

No reference installs (the official code needs CUDA, OpenCV and its own config), so: a random checkpoint in
the release's full layout (tests/fixtures/checkpoint_layouts/gscnn_wrn38_cityscapes.json, read from the
official code), saved as the official training saves it, converts with nothing unmapped or missing and
predicts; the layers whose inputs the converter reorders are checked against the official computation
written out by hand; the WideResNet-38 blocks are checked against BN -> ReLU -> conv computed by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from typer.testing import CliRunner

from helpers.checkpoint_layouts import load_layout, random_state_dict, write_torch_checkpoint

from omniseg.api import Predictor, load_model
from omniseg.cli import app
from omniseg.hub.convert import convert
from omniseg.hub.errors import CheckpointError
from omniseg.models.per_pixel.gscnn import numpy_uint8_cast
from omniseg.models.per_pixel.wider_resnet import PreActBlock


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """best_cityscapes_checkpoint.pth as the official utils/misc.py saves snapshots: {state_dict (the
    DataParallel-wrapped network, hence `module.`), optimizer, epoch, mean_iu, command}."""
    layout = load_layout("gscnn_wrn38_cityscapes")
    state_dict = random_state_dict(layout, seed=0)
    path = tmp_path_factory.mktemp("gscnn") / "best_cityscapes_checkpoint.pth"
    write_torch_checkpoint(path, state_dict, key="state_dict", optimizer={"state": {}, "param_groups": []},
                           epoch=174, mean_iu=0.8, command="--evaluate")
    return path, state_dict


def _image(seed: int = 0) -> torch.Tensor:
    """uint8 [3, 64, 96] noise with a flat block, so Canny finds edges."""
    image = torch.randint(0, 256, (3, 64, 96), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    image[:, 16:40, 24:64] = 30
    return image


def test_the_released_checkpoint_converts_and_predicts(release, tmp_path):
    path, official = release
    out = tmp_path / "g.safetensors"
    report = convert(path, "gscnn", "gscnn_r50", out, classes="cityscapes")
    assert report["unmapped"] == [] and report["missing"] == [] and report["initialised"] == []
    assert sorted(report["ignored"]) == ["dsn1.bias", "dsn1.weight"]
    model, cfg, meta = load_model(out)
    model.eval()
    assert meta.num_classes == 19 and meta.classes[0] == "road"
    m = cfg.model
    assert (m.backbone, m.head_width, m.shape_level, m.shape_stem, list(m.shape_gate_levels), m.gscnn_fine_level,
            m.gscnn_fine_norm, m.gscnn_classifier_bias, m.canny_input) == (
        "wider_resnet38", 256, "res0", False, ["res2", "res3", "res5"], "res1", False, False, "normalized_uint8")

    # WideResNet-38-A2 as the official dilated trunk: strides 1, 2, 4, 8 then dilation 2 (mod5), 4 (mod6, mod7).
    backbone = model.backbone
    assert {k: (s.channels, s.stride) for k, s in backbone.specs.items()} == {
        "res0": (64, 1), "res1": (128, 2), "res2": (256, 4), "res3": (512, 8), "res4": (2048, 8), "res5": (4096, 8)}
    assert backbone.mod4.block1.convs.conv1.stride == (2, 2) and backbone.mod4.block2.convs.conv1.dilation == (1, 1)
    assert backbone.mod5.block1.convs.conv1.dilation == (2, 2) and backbone.mod7.block1.convs.conv2.dilation == (4, 4)
    own = model.state_dict()
    assert torch.equal(own["backbone.mod7.block1.convs.conv3.weight"],
                       official["module.mod7.block1.convs.conv3.weight"])
    assert torch.equal(own["shape_stream.blocks.0.conv1.1.running_var"], official["module.res1.bn1.running_var"])
    assert torch.equal(own["head.classifier.1.weight"], official["module.final_seg.6.weight"])

    head = model.head
    with torch.no_grad():
        # ASPP: the official 1x1 projection reads [image pooling, edge, 1x1, atrous x3].
        x, edge = torch.randn(1, 4096, 4, 5), torch.randn(1, 256, 4, 5)
        aspp = head.aspp
        pooled = aspp.image_pool(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, 4, 5)
        parts = torch.cat([pooled, edge, *(branch(x) for branch in aspp.branches)], dim=1)
        expected = F.conv2d(parts, official["module.bot_aspp.weight"])
        torch.testing.assert_close(aspp(x, edge), expected, rtol=1e-4, atol=1e-5)
        # Decoder: the official final_seg reads [bot_fine(m2), upsampled ASPP].
        up, fine = torch.randn(1, 256, 6, 7), torch.randn(1, 48, 6, 7)
        bn = {k: official[f"module.final_seg.1.{k}"] for k in ("running_mean", "running_var", "weight", "bias")}
        expected = F.relu(F.batch_norm(F.conv2d(torch.cat([fine, up], 1), official["module.final_seg.0.weight"],
                                                padding=1), **bn))
        torch.testing.assert_close(head.fuse[0](torch.cat([up, fine], 1)), expected, rtol=1e-4, atol=1e-5)
        # Edge fusion: the official cw reads [sigmoid(edge logits), cv2.Canny map in 0/255].
        logits, edges = torch.randn(1, 1, 8, 8), (torch.rand(1, 1, 8, 8) > 0.5).float()
        expected = torch.sigmoid(F.conv2d(torch.cat([torch.sigmoid(logits), 255 * edges], 1),
                                          official["module.cw.weight"]))
        torch.testing.assert_close(torch.sigmoid(model.edge_fusion.fuse(torch.cat([torch.sigmoid(logits), edges], 1))),
                                   expected)

    image = _image()
    semantic = Predictor(out, device="cpu", min_size_test=64)(image)["semantic"]
    with torch.no_grad():
        logits = model.forward_raw(model.normalize(image[None].float()))["sem_seg"]
    assert semantic.shape == (64, 96) and logits.shape == (1, 19, 64, 96)
    assert torch.equal(semantic, logits.argmax(1)[0])


def test_canny_reads_the_normalised_image_cast_to_uint8_as_numpy_does():
    """The official code runs cv2.Canny on `inp.numpy().astype(np.uint8)` of the *normalised* image; NumPy
    gives [254, 255, 255, 0, 0, 0, 1, 2] for these values on x86."""
    x = torch.tensor([-2.1, -1.7, -1.0, -0.3, 0.0, 0.4, 1.9, 2.6])
    cast = numpy_uint8_cast(x)
    assert cast.dtype == torch.uint8 and cast.tolist() == [254, 255, 255, 0, 0, 0, 1, 2]


def test_the_command_line_converts_the_release(release, tmp_path):
    path, _ = release
    out = tmp_path / "g.safetensors"
    result = CliRunner().invoke(app, ["convert", str(path), "--from", "gscnn", "--preset", "gscnn_r50",
                                      "--classes", "cityscapes", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.exists() and "model.backbone=wider_resnet38" in result.output


def _bn_stats(channels: int, g: torch.Generator) -> dict:
    return {"running_mean": torch.randn(channels, generator=g), "running_var": torch.rand(channels, generator=g) + 0.5,
            "weight": torch.randn(channels, generator=g), "bias": torch.randn(channels, generator=g)}


def _randomise(block: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for module in block.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            for name, value in _bn_stats(module.num_features, g).items():
                getattr(module, name).data.copy_(value)
        elif isinstance(module, torch.nn.Conv2d):
            module.weight.data.copy_(torch.randn(module.weight.shape, generator=g) * 0.3)
    block.eval()


def _bn_relu(x, bn: torch.nn.BatchNorm2d):
    return F.relu(F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=1e-5))


def test_pre_activation_blocks_match_the_computation_written_out():
    """WideResNet-38's blocks: out = convs(BN-ReLU(x)) + shortcut, shortcut = x, or a 1x1 (strided)
    projection of BN-ReLU(x) where width or resolution change; the two-width block is 3x3 -> BN-ReLU -> 3x3,
    the three-width one 1x1 -> BN-ReLU -> dilated 3x3 -> BN-ReLU -> 1x1."""
    x = torch.randn(2, 4, 9, 11, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        projected = PreActBlock(4, (6, 6), stride=2)
        _randomise(projected, 0)
        a = _bn_relu(x, projected.bn1[0])
        convs = projected.convs
        expected = (F.conv2d(_bn_relu(F.conv2d(a, convs.conv1.weight, stride=2, padding=1), convs.bn2[0]),
                             convs.conv2.weight, padding=1)
                    + F.conv2d(a, projected.proj_conv.weight, stride=2))
        torch.testing.assert_close(projected(x), expected)
        assert expected.shape == (2, 6, 5, 6)

        identity = PreActBlock(4, (5, 4), dilation=2)
        _randomise(identity, 1)
        assert identity.proj_conv is None
        convs = identity.convs
        a = _bn_relu(x, identity.bn1[0])
        expected = F.conv2d(_bn_relu(F.conv2d(a, convs.conv1.weight, padding=2, dilation=2), convs.bn2[0]),
                            convs.conv2.weight, padding=2, dilation=2) + x
        torch.testing.assert_close(identity(x), expected)

        bottleneck = PreActBlock(4, (3, 5, 8), dilation=4, dropout=0.5)
        _randomise(bottleneck, 2)
        convs = bottleneck.convs
        a = _bn_relu(x, bottleneck.bn1[0])
        inner = _bn_relu(F.conv2d(_bn_relu(F.conv2d(a, convs.conv1.weight), convs.bn2[0]), convs.conv2.weight,
                                  padding=4, dilation=4), convs.bn3[0])
        expected = F.conv2d(inner, convs.conv3.weight) + F.conv2d(a, bottleneck.proj_conv.weight)
        torch.testing.assert_close(bottleneck(x), expected)
        assert [name for name, _ in convs.named_children()] == ["conv1", "bn2", "conv2", "bn3", "dropout", "conv3"]


def test_files_that_are_not_official_gscnn_checkpoints_are_refused(tmp_path):
    """Names decide the refusals: the tensors are zero-sized stand-ins of the right rank."""
    tensors = load_layout("gscnn_wrn38_cityscapes")["tensors"]
    no_trunk = {k: torch.zeros([0] + shape[1:]) if shape else torch.zeros(())
                for k, shape in tensors.items() if not k.startswith("module.mod")}
    write_torch_checkpoint(tmp_path / "no_trunk.pth", no_trunk, key="state_dict", epoch=1)
    with pytest.raises(CheckpointError, match="without the WideResNet-38 trunk"):
        convert(tmp_path / "no_trunk.pth", "gscnn", "gscnn_r50", tmp_path / "g.safetensors")
    shallow = {k: torch.zeros([0] + shape[1:]) if shape else torch.zeros(()) for k, shape in tensors.items()
               if not k.startswith(tuple(f"module.mod4.block{b}" for b in range(3, 7)))}
    write_torch_checkpoint(tmp_path / "shallow.pth", shallow, key="state_dict", epoch=1)
    with pytest.raises(CheckpointError, match=r"\(3, 3, 2, 3, 1, 1\) blocks in mod2..mod7"):
        convert(tmp_path / "shallow.pth", "gscnn", "gscnn_r50", tmp_path / "g.safetensors")
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a Gated-SCNN checkpoint"):
        convert(tmp_path / "other.pth", "gscnn", "gscnn_r50", tmp_path / "g.safetensors")
    assert not (tmp_path / "g.safetensors").exists()
