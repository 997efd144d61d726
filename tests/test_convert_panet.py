"""omniseg convert --from panet: the released PyTorch PANet (Detectron.pytorch) is refused, naming the components
omniseg's panet lacks (GroupNorm FPN and heads, convolutional box head), rather than converted into another network.
Layout: tests/fixtures/checkpoint_layouts/panet_r50_fpn_2x_mask_partial.json (the tensors that show the differences)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from helpers.checkpoint_layouts import load_layout, random_state_dict, write_torch_checkpoint
from omniseg.cli import app
from omniseg.hub.convert import convert
from omniseg.hub.errors import CheckpointError


def _released(tmp_path, drop: str | None = None):
    sd = random_state_dict(load_layout("panet_r50_fpn_2x_mask_partial"))
    if drop:
        sd = {k: v for k, v in sd.items() if not k.startswith(drop)}
    return write_torch_checkpoint(tmp_path / "panet.pth", sd, "model", step=179999)


def test_the_released_mask_model_is_refused_with_its_differences_named(tmp_path):
    path = _released(tmp_path)
    with pytest.raises(CheckpointError) as error:
        convert(path, "panet", "panet_r50", tmp_path / "p.safetensors")
    message = str(error.value)
    assert message.startswith(f"{path}: the released PANet differs from omniseg's panet in structure")
    assert "GroupNorm in the FPN and bottom-up path" in message and "convolutional box head" in message
    assert "GroupNorm in the mask head" in message and "no mask head" not in message
    assert not (tmp_path / "p.safetensors").exists()


def test_detection_models_and_other_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no mask head"):
        convert(_released(tmp_path, drop="Mask_Head."), "panet", "panet_r50", tmp_path / "p.safetensors")
    other = write_torch_checkpoint(tmp_path / "other.pth", {"backbone.weight": random_state_dict(
        {"tensors": {"w": [2]}})["w"]})
    with pytest.raises(CheckpointError, match=r"other.pth: not a PANet \(Detectron.pytorch\) checkpoint"):
        convert(other, "panet", "panet_r50", tmp_path / "p.safetensors")


def test_cli_reports_the_refusal(tmp_path):
    result = CliRunner().invoke(app, ["convert", str(_released(tmp_path)), "--from", "panet", "--preset", "panet_r50",
                                      "-o", str(tmp_path / "p.safetensors")])
    assert result.exit_code != 0 and "convolutional box head" in result.output
    assert not (tmp_path / "p.safetensors").exists()
