"""The model families: which `model.arch` values each builds, its settings dataclass, and its presets.

A family registers itself by defining `FAMILY = Family(...)` in `models/<folder>/family.py`; its presets
are the YAML files in `models/<folder>/presets/`. Nothing here lists the families: they are found by
looking for those files, so adding a family touches no shared code.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from torch import nn

from omniseg.models.settings import ModelSettings
from omniseg.schema import ConfigError, suggestion


@dataclass(frozen=True)
class Family:
    """One model family.

    name: the folder under omniseg/models.
    archs: the `model.arch` values it builds (the first is its default).
    settings: its dataclass of the `model` section (a ModelSettings subclass).
    model: "module:Class" of its Segmenter, whose constructor takes (settings, num_classes, thing_ids);
        imported only when a model is built, so reading configs stays light.
    describe: settings -> (arch label, one-line network summary) for `omniseg models`.
    """

    name: str
    archs: tuple[str, ...]
    settings: type[ModelSettings]
    model: str
    describe: Callable[[Any], tuple[str, str]] = field(default=lambda s: (s.arch, ""))

    def model_class(self) -> type[nn.Module]:
        module, cls = self.model.split(":")
        return getattr(importlib.import_module(module), cls)

    @property
    def folder(self) -> Path:
        return Path(__file__).parent / self.name


@lru_cache(maxsize=1)
def families() -> tuple[Family, ...]:
    """Every family found under omniseg/models (see the module docstring)."""
    import omniseg.models as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg and (Path(info.module_finder.path) / info.name / "family.py").is_file():
            family = importlib.import_module(f"{package.__name__}.{info.name}.family").FAMILY
            found.append(family)
    return tuple(sorted(found, key=lambda f: f.name))


def available_archs() -> list[str]:
    return sorted(a for f in families() for a in f.archs)


def family_of(arch: str) -> Family:
    for f in families():
        if arch in f.archs:
            return f
    raise ConfigError(f"unknown model.arch {arch!r}{suggestion(str(arch), available_archs())}; "
                      f"known: {', '.join(available_archs())}")


def preset_folders() -> list[Path]:
    """The `presets` folders next to the model code (models/*/presets); shared bases are in omniseg/configs."""
    return sorted(p for p in Path(__file__).parent.glob("*/presets") if p.is_dir())


def build_model(settings: Any, num_classes: int, thing_ids: Sequence[int] = ()) -> nn.Module:
    """A model from its `model` settings (the family's dataclass, or a mapping checked against it)."""
    arch = settings.arch if isinstance(settings, ModelSettings) else dict(settings or {}).get("arch", "mask2former")
    family = family_of(arch)
    return family.model_class()(family.settings.coerce(settings), num_classes=num_classes, thing_ids=thing_ids)


def build_model_from_config(cfg, meta, *, with_backbone_weights: bool = True) -> nn.Module:
    """The model a whole config describes, for the classes of `meta` (a DatasetMeta). The one way the
    engine, the API and the hub build a model from a config. `with_backbone_weights=False` skips reading
    model.backbone_weights, for a model whose full weights are loaded next."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_object(cfg.model) if OmegaConf.is_config(cfg.model) else cfg.model
    if not with_backbone_weights:
        settings = dataclasses.replace(settings, backbone_weights=None) if dataclasses.is_dataclass(settings) \
            else {**dict(settings), "backbone_weights": None}
    return build_model(settings, num_classes=meta.num_classes, thing_ids=meta.thing_ids)
