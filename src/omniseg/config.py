"""Configs: YAML presets + `_base_` inheritance + dotted overrides, checked against the declared settings.

`load_config("mask2former_r50", ["train.max_iters=100"])` accepts a preset name or a YAML path. Presets
live next to the code of their family (models/<family>/presets/*.yaml); shared bases in omniseg/configs.
Every key of every file and override is checked against the settings dataclasses (omniseg/settings.py
and the family's, chosen by `model.arch`) before anything runs: an unknown key fails naming the file or
override it came from and the nearest valid key. The result is one resolved config holding every
setting, which a run saves next to its checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from omniseg.schema import ConfigError, check_choices, check_keys, drop_paths, suggestion
from omniseg.settings import RunSettings

__all__ = ["ConfigError", "load_config", "apply_overrides", "config_from_dict", "config_from_stored",
           "list_presets", "preset_path", "to_yaml", "from_yaml"]

SHARED_DIR = Path(str(resources.files("omniseg") / "configs"))
DEFAULT_ARCH = "mask2former"

# Settings that omniseg 0.1 wrote into every config, whatever the family (its _base_.yaml was Mask2Former's
# model section). Saved configs and weights files of that time carry them; where the family has no such
# key they are dropped (from files with a notice, from stored configs silently). On the command line
# they are refused like any unknown key.
LEGACY_MODEL_KEYS: dict = {
    **{k: None for k in ("hidden_dim", "num_queries", "nheads", "dim_feedforward", "dec_layers", "dropout",
                         "pre_norm", "enc_layers", "enc_dim_feedforward", "enc_num_points", "conv_dim",
                         "mask_dim")},
    "loss": {k: None for k in ("class_weight", "mask_weight", "dice_weight", "no_object_weight", "mask_loss",
                               "train_num_points", "oversample_ratio", "importance_sample_ratio",
                               "deep_supervision")},
    "mp": None,
    "oneformer": None,
    "test": {k: None for k in ("task", "object_mask_threshold", "overlap_threshold", "topk", "postprocess")},
}
_NOTED: set[tuple[str, str]] = set()


@dataclasses.dataclass
class _Layer:
    """One source of settings, in merge order: a YAML file, one command-line override, a stored config."""

    source: str
    node: dict
    legacy: str = "refuse"  # what to do with LEGACY_MODEL_KEYS the family lacks: refuse | note | drop


# -- presets ---------------------------------------------------------------------------------------

def _preset_files() -> dict[str, Path]:
    from omniseg.models.registry import preset_folders

    files: dict[str, Path] = {}
    for folder in [SHARED_DIR, *preset_folders()]:
        for p in sorted(folder.glob("*.yaml")):
            if p.stem in files:
                raise ConfigError(f"preset {p.stem!r} is defined twice: {files[p.stem]} and {p}")
            files[p.stem] = p
    return files


def list_presets() -> list[str]:
    """The named presets (`omniseg models`); names starting with "_" are bases, not listed."""
    return sorted(n for n in _preset_files() if not n.startswith("_"))


def preset_path(name: str) -> Path:
    """The YAML file of a preset or base, by name (with or without .yaml)."""
    files = _preset_files()
    stem = name[:-5] if name.endswith(".yaml") else name
    if stem not in files:
        raise FileNotFoundError(f"config {name!r}: neither a YAML file nor a preset"
                                f"{suggestion(stem, list(files))} (presets: {', '.join(list_presets())})")
    return files[stem]


def _resolve_path(name_or_path: str, relative_to: Path | None = None) -> Path:
    p = Path(name_or_path)
    for candidate in ([p] if relative_to is None else [relative_to / p, p]):
        if candidate.is_file():
            return candidate
    return preset_path(name_or_path)


def _file_layers(path: Path, legacy: str, seen: tuple[Path, ...] = ()) -> list[_Layer]:
    """The layers of a YAML file: its `_base_` files' layers (depth first, in order), then its own."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: _base_ chain loops back to itself ({' -> '.join(map(str, seen))})")
    try:
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except Exception as e:  # YAML syntax errors and the like
        raise ConfigError(f"{path}: not a readable YAML config ({e})") from None
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level")
    base = node.pop("_base_", None)
    layers: list[_Layer] = []
    for b in [base] if isinstance(base, str) else list(base or []):
        layers += _file_layers(_resolve_path(b, path.parent), legacy, (*seen, path.resolve()))
    return layers + [_Layer(str(path), node, legacy)]


def _override_layers(overrides: Sequence[str] | None) -> list[_Layer]:
    layers = []
    for o in overrides or ():
        if "=" not in o:
            raise ConfigError(f"override {o!r}: overrides look like key.path=value")
        try:
            node = OmegaConf.to_container(OmegaConf.from_dotlist([o]), resolve=False)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {o!r}: {e}") from None
        layers.append(_Layer(f"override {o!r}", node, "refuse"))
    return layers


# -- assembly --------------------------------------------------------------------------------------

def _arch(layers: list[_Layer]) -> tuple[str, str]:
    """(model.arch, the source that set it): the last layer that sets it wins."""
    for layer in reversed(layers):
        model = layer.node.get("model")
        if isinstance(model, dict) and "arch" in model:
            return str(model["arch"]), layer.source
    return DEFAULT_ARCH, "the default"


def _check_layer(layer: _Layer, settings_cls: type, arch: str, arch_source: str) -> None:
    """Refuse unknown keys of one layer (naming its source); drop or note legacy keys as the layer allows."""
    node = dict(layer.node)
    model = node.pop("model", None)
    check_keys(node, RunSettings, prefix="", source=layer.source)
    if model is None:
        return
    if not isinstance(model, dict):
        raise ConfigError(f"{layer.source}: model must be a mapping of settings, got {model!r}")
    tolerate = LEGACY_MODEL_KEYS if layer.legacy != "refuse" else None
    try:
        legacy = check_keys(model, settings_cls, prefix="model.", source=layer.source, tolerate=tolerate)
    except ConfigError as e:  # the keys a model section may have depend on its arch: say which
        where = "" if arch_source == layer.source else f", set by {arch_source}"
        raise ConfigError(f"{e} (model.arch {arch}{where})") from None
    if legacy:
        drop_paths(layer.node, legacy)
        if layer.legacy == "note":
            for path in legacy:
                if (layer.source, path) not in _NOTED:
                    _NOTED.add((layer.source, path))
                    print(f"[omniseg] {layer.source}: {path} does not apply to model.arch {arch}; ignored",
                          flush=True)


def _source_of(path: str, layers: list[_Layer]) -> str:
    """The last layer that sets the dotted `path`."""
    for layer in reversed(layers):
        node = layer.node
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        else:
            return layer.source
    return "the config"


def _missing_paths(node: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the literal ??? values in a nested dict."""
    out = []
    for key, value in node.items():
        if isinstance(value, dict):
            out += _missing_paths(value, f"{prefix}{key}.")
        elif value == "???":
            out.append(f"{prefix}{key}")
    return out


def _assemble(layers: list[_Layer]) -> DictConfig:
    from omniseg.models.registry import family_of

    arch, arch_source = _arch(layers)
    try:
        family = family_of(arch)
    except ConfigError as e:
        raise ConfigError(f"{arch_source}: {e}") from None
    for layer in layers:
        _check_layer(layer, family.settings, arch, arch_source)
    cfg = OmegaConf.structured(RunSettings)
    cfg.model = OmegaConf.structured(family.settings)
    for layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer.node)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", "") or ""
            raise ConfigError(f"{layer.source}: {key}: {str(getattr(e, 'msg', e)).splitlines()[0]}") from None
    # An explicit ??? (a value the user must give) stays missing, as in a plain OmegaConf merge, where it
    # is not replaced by the declared default.
    plain = OmegaConf.to_container(OmegaConf.merge(*(OmegaConf.create(layer.node) for layer in layers)),
                                   resolve=False) if layers else {}
    for key in _missing_paths(plain):
        OmegaConf.update(cfg, key, "???")
    source_of = lambda path: _source_of(path, layers)  # noqa: E731
    check_choices(cfg, RunSettings, prefix="", source=source_of)
    check_choices(cfg.model, family.settings, prefix="model.", source=source_of)
    return cfg


def load_config(name_or_path: str, overrides: Sequence[str] | None = None) -> DictConfig:
    """Load a preset or YAML file and apply `a.b=c` overrides (values parsed as YAML), every key checked."""
    return _assemble(_file_layers(_resolve_path(name_or_path), "note") + _override_layers(overrides))


def apply_overrides(cfg: DictConfig, overrides: Sequence[str] | None, source: str = "config") -> DictConfig:
    """`cfg` (a loaded config) with `a.b=c` overrides applied and checked, as `load_config` does."""
    if not overrides:
        return cfg
    base = _Layer(source, OmegaConf.to_container(cfg, resolve=False), "drop")
    return _assemble([base, *_override_layers(overrides)])


def config_from_dict(node: dict, source: str, *, legacy: str = "refuse") -> DictConfig:
    """A checked config from a plain nested dict (e.g. built from an HF checkpoint's config.json)."""
    return _assemble([_Layer(source, dict(node), legacy)])


def replace_section(cfg: DictConfig, path: str, section) -> DictConfig:
    """`cfg` with the section at dotted `path` (e.g. "data.val") replaced as a whole, checked."""
    node = OmegaConf.to_container(cfg, resolve=False)
    *parents, last = path.split(".")
    target = node
    for key in parents:
        target = target[key]
    target[last] = OmegaConf.to_container(section, resolve=False) if isinstance(section, DictConfig) else section
    return config_from_dict(node, f"config with {path} replaced")


def config_from_stored(text: str, source: str) -> DictConfig:
    """The config saved inside a weights file or a run folder (YAML text), checked; keys an older omniseg
    wrote for every family are dropped where this model's family has no such setting."""
    try:
        node = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: the stored config is not valid YAML ({e})") from None
    if not isinstance(node, dict):
        raise ConfigError(f"{source}: the stored config is not a mapping")
    return _assemble([_Layer(source, node, "drop")])


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def from_yaml(text: str) -> DictConfig:
    """A checked config from YAML text (see `config_from_stored`)."""
    return config_from_stored(text, "YAML text")
