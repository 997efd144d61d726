"""omniseg convert --from gscnn: the official Gated-SCNN release (WideResNet-38, Cityscapes) is recognised and
refused, naming the WideResNet-38 backbone and the head layout omniseg's ResNet-based gscnn lacks. The layout
is read from the official code (tests/fixtures/checkpoint_layouts/gscnn_wrn38_cityscapes.json)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from helpers.checkpoint_layouts import load_layout

from omniseg.cli import app
from omniseg.hub.convert import convert
from omniseg.hub.errors import CheckpointError


def _release(tmp_path, tensors: dict) -> str:
    """As the official utils/misc.py saves snapshots: {state_dict (DataParallel names), optimizer, epoch,
    mean_iu, command}. Names are what is checked: the tensors are zero-sized stand-ins of the right rank."""
    sd = {k: torch.zeros([0] + shape[1:]) if shape else torch.zeros(()) for k, shape in tensors.items()}
    sd["module.final_seg.6.weight"] = torch.zeros(19, 256, 1, 1)
    path = tmp_path / "best_cityscapes_checkpoint.pth"
    torch.save({"state_dict": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 174, "mean_iu": 0.8,
                "command": "--evaluate"}, path)
    return path


def test_the_released_wideresnet38_checkpoint_is_refused_naming_the_backbone(tmp_path):
    layout = load_layout("gscnn_wrn38_cityscapes")
    assert layout["tensors"]["module.final_seg.6.weight"] == [19, 256, 1, 1]
    assert layout["tensors"]["module.dsn7.weight"] == [1, 4096, 1, 1]
    path = _release(tmp_path, layout["tensors"])
    with pytest.raises(CheckpointError, match=r"19 classes\) runs on a WideResNet-38-A2 backbone \(mod1, mod2, mod3, "
                                              r"mod4, mod5, mod6, mod7\), which omniseg does not have"):
        convert(path, "gscnn", "gscnn_r50", tmp_path / "g.safetensors")
    assert not (tmp_path / "g.safetensors").exists()
    result = CliRunner().invoke(app, ["convert", str(path), "--from", "gscnn", "--preset", "gscnn_r50",
                                      "-o", str(tmp_path / "g.safetensors")])
    assert result.exit_code != 0 and "WideResNet-38" in result.output and "bot_fine" in result.output


def test_files_that_are_not_official_gscnn_checkpoints_are_refused(tmp_path):
    tensors = load_layout("gscnn_wrn38_cityscapes")["tensors"]
    no_trunk = {k: v for k, v in tensors.items() if not k.startswith("module.mod")}
    with pytest.raises(CheckpointError, match="without the WideResNet-38 trunk"):
        convert(_release(tmp_path, no_trunk), "gscnn", "gscnn_r50", tmp_path / "g.safetensors")
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a Gated-SCNN checkpoint"):
        convert(tmp_path / "other.pth", "gscnn", "gscnn_r50", tmp_path / "g.safetensors")
