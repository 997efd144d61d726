"""Checked configs: every key of every file and override is declared (omniseg/settings.py and the model
family's dataclass); a mistyped key, a wrong type or a value outside its choices fails before anything
runs, naming where it came from and the nearest valid key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from omniseg.cli import app
from omniseg.config import (ConfigError, apply_overrides, config_from_stored, list_presets, load_config,
                            preset_path)
from omniseg.models.maskformer.family import MaskFormerSettings
from omniseg.models.registry import build_model, families, family_of
from omniseg.settings import RunSettings


def test_mistyped_override_names_the_override_and_the_nearest_key():
    with pytest.raises(ConfigError) as e:
        load_config("mask2former_demo", ["model.num_querys=5"])
    msg = str(e.value)
    assert "override 'model.num_querys=5'" in msg and "unknown key model.num_querys" in msg
    assert "did you mean num_queries?" in msg


def test_mistyped_key_in_a_file_names_the_file(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("_base_: mask2former_demo.yaml\ntrain:\n  max_iter: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(user))
    assert str(user) in str(e.value) and "train.max_iter" in str(e.value) and "max_iters" in str(e.value)


def test_nested_and_data_keys_are_checked_too():
    with pytest.raises(ConfigError, match=r"model\.mp\.grops.*did you mean groups"):
        load_config("mp_former_demo", ["model.mp.grops=2"])
    with pytest.raises(ConfigError, match=r"data\.train\.fromat.*did you mean format"):
        load_config("mask2former_demo", ["data.train.fromat=synthetic"])
    with pytest.raises(ConfigError, match="unknown key trian"):
        load_config("mask2former_demo", ["trian.max_iters=3"])


def test_wrong_types_and_choices_are_refused_with_their_source():
    with pytest.raises(ConfigError, match=r"override 'model.num_queries=many'.*model.num_queries"):
        load_config("mask2former_demo", ["model.num_queries=many"])
    with pytest.raises(ConfigError, match=r"override 'train.amp=bf61'.*one of 'none', 'bf16', 'fp16'.*did you mean bf16"):
        load_config("mask2former_demo", ["train.amp=bf61"])
    with pytest.raises(ConfigError, match=r"unknown model.arch 'maskformr'.*did you mean maskformer"):
        load_config("mask2former_demo", ["model.arch=maskformr"])
    with pytest.raises(ConfigError, match=r"model.mp.groups must be >= 1"):
        build_model({"arch": "mask2former", "mp": {"enabled": True, "groups": 0}}, num_classes=3)


def test_a_key_of_another_family_is_refused_on_the_command_line():
    with pytest.raises(ConfigError, match="unknown key model.num_queries"):
        load_config("pspnet_demo", ["model.num_queries=50"])
    with pytest.raises(ConfigError, match="unknown key model.oneformer"):
        load_config("mask2former_demo", ["model.oneformer.n_ctx=2"])


def test_python_api_mappings_are_checked_against_the_same_declaration():
    with pytest.raises(ConfigError, match="unknown key model.num_querys.*num_queries"):
        build_model({"arch": "mask2former", "num_querys": 4}, num_classes=3)
    s = MaskFormerSettings.coerce({"num_queries": 4, "loss": {"class_weight": 1.0}})
    assert s.num_queries == 4 and s.loss.class_weight == 1.0 and s.loss.dice_weight == 5.0  # declared defaults


def test_every_preset_loads_and_every_setting_has_one_declared_default():
    names = list_presets()
    assert len(names) >= 30 and "mask2former_demo" in names
    for name in names:
        cfg = load_config(name)
        family = family_of(cfg.model.arch)
        assert OmegaConf.get_type(cfg.model) is family.settings, name
        assert OmegaConf.get_type(cfg) is RunSettings
    for family in families():  # every dataclass field has a default (a missing one would be MISSING)
        for f in dataclasses.fields(family.settings):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name


def test_presets_live_next_to_their_family_code():
    for name in list_presets():
        folder = preset_path(name).parent
        assert folder.name == "presets" and folder.parent.parent.name == "models", name


def test_a_required_value_stays_required():
    cfg = load_config("camvid_best")
    assert OmegaConf.is_missing(cfg.data, "root")
    assert load_config("camvid_best", ["data.root=/x"]).data.train.root == "/x"


def test_stored_config_of_an_older_omniseg_loads(capsys):
    """omniseg 0.1 wrote every family's model keys (its _base_ was Mask2Former's) into every saved config:
    where the family has no such setting they are dropped, silently for stored configs, with a notice for
    files; any other unknown key still fails."""
    cfg = load_config("pspnet_demo")
    old = OmegaConf.to_container(cfg, resolve=True)
    old["model"].update(num_queries=24, hidden_dim=128, oneformer={"n_ctx": 16},
                        test={"task": "panoptic", "object_mask_threshold": 0.5})
    old["model"]["loss"].update(class_weight=2.0, train_num_points=1024)
    text = OmegaConf.to_yaml(OmegaConf.create(old))
    stored = config_from_stored(text, "old.safetensors")
    assert OmegaConf.to_container(stored) == OmegaConf.to_container(cfg)
    assert capsys.readouterr().out == ""
    bad = text.replace("num_queries: 24", "num_querys: 24")
    with pytest.raises(ConfigError, match="old.safetensors: unknown key model.num_querys"):
        config_from_stored(bad, "old.safetensors")


def test_old_saved_config_file_loads_with_a_notice(tmp_path, capsys):
    old = OmegaConf.to_container(load_config("pspnet_demo"), resolve=True)
    old["model"]["num_queries"] = 24
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    assert "num_queries" not in load_config(str(path)).model
    out = capsys.readouterr().out
    assert f"{path}: model.num_queries does not apply to model.arch pspnet; ignored" in out


def test_apply_overrides_checks_like_load_config():
    cfg = load_config("mask2former_demo")
    assert apply_overrides(cfg, ["data.val.root=/elsewhere"]).data.val.root == "/elsewhere"
    with pytest.raises(ConfigError, match="data.val.rot.*did you mean root"):
        apply_overrides(cfg, ["data.val.rot=/elsewhere"])


def test_cli_train_with_a_mistyped_key_exits_before_training(tmp_path):
    """The command line: one red line, exit code 2, nothing trained or written."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "omniseg.cli", "train", "mask2former_demo", "model.num_querys=5",
                           f"train.output_dir={out}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "num_queries" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_cli_models_table_comes_from_the_registry():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:]}
    assert set(rows) == set(list_presets())
    assert rows["mp_former_demo"][1] == "mp_former" and rows["mask2former_demo"][1] == "mask2former"
    assert rows["segvit_shrunkpp_demo"][1:3] == ["segvit", "vit_tiny_patch16_224"]
    assert "FCOS + blender, variant rt" in result.output


def test_cli_config_prints_every_resolved_setting():
    result = CliRunner().invoke(app, ["config", "pspnet_demo", "model.head_width=64"])
    assert result.exit_code == 0, result.output
    cfg = OmegaConf.create(result.output)
    assert cfg.model.head_width == 64 and cfg.model.loss.edge_radius == 2 and cfg.train.max_iters == 1000
