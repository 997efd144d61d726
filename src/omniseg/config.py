"""Configs: YAML presets (shipped in omniseg/configs) + `_base_` inheritance + dotted overrides.

`load_config("mask2former_r50", ["train.max_iters=100"])` accepts a preset name or a YAML path.
Everything a run needs is in the one resolved config, which is saved next to its checkpoints.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PRESET_DIR = Path(str(resources.files("omniseg") / "configs"))


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _resolve_path(name_or_path: str, relative_to: Path | None = None) -> Path:
    p = Path(name_or_path)
    candidates = [p]
    if relative_to is not None:
        candidates.append(relative_to / p)
    candidates += [PRESET_DIR / p, PRESET_DIR / f"{name_or_path}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"config {name_or_path!r}: neither a YAML file nor a preset (presets: {', '.join(list_presets())})"
    )


def _load_with_bases(path: Path) -> DictConfig:
    cfg = OmegaConf.load(path)
    base = cfg.pop("_base_", None)
    if base is None:
        return cfg
    bases = [base] if isinstance(base, str) else list(base)
    merged = OmegaConf.create()
    for b in bases:
        merged = OmegaConf.merge(merged, _load_with_bases(_resolve_path(b, path.parent)))
    return OmegaConf.merge(merged, cfg)


def load_config(name_or_path: str, overrides: list[str] | None = None) -> DictConfig:
    """Load a preset or YAML file and apply `a.b=c` overrides (values parsed as YAML)."""
    cfg = _load_with_bases(_resolve_path(name_or_path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like key.path=value, got {bad}")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def from_yaml(text: str) -> DictConfig:
    return OmegaConf.create(text)
