"""The official recipes: for every full-size preset, the values of the config behind its paper's headline
result, read from the official config files, beside the preset's own values.

One YAML file per preset in omniseg/official_recipes/ (machine-readable, one row per setting: the preset key,
the preset's value, the official value in omniseg's units, the official file it comes from, and where the
two differ on purpose, why). The test suite checks every full-size preset against its file; `omniseg recipe`
prints one, and docs/recipes.md renders them all (`python -m omniseg.recipes > docs/recipes.md`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from omegaconf import OmegaConf

# The settings every recipe states: what a user needs to train and test as the paper did.
REQUIRED_KEYS = (
    "train.optimizer", "train.lr", "train.weight_decay", "train.schedule", "train.max_iters",
    "train.warmup_iters", "train.backbone_multiplier", "train.clip_grad",
    "data.batch_size", "data.train_resize", "data.crop_size", "data.scale_range", "data.hflip",
    "data.photometric", "data.min_size_test", "inference.mode",
)
# CPU-size presets: trained on the synthetic set or CamVid, not a paper's recipe.
CPU_SIZE_SUFFIXES = ("_demo",)
CPU_SIZE_PRESETS = ("camvid_best",)


@dataclass
class RecipeRow:
    key: str
    value: Any          # the preset's resolved value
    official: Any       # the official config's value, in omniseg's units
    source: str         # the official file (path in the repository named by Recipe.official)
    why: str | None = None  # where value differs from official on purpose

    @property
    def deviates(self) -> bool:
        return not same_value(self.value, self.official)


@dataclass
class Recipe:
    preset: str
    headline: str       # the published result this recipe produced
    official: str       # the official config: repository@commit: path
    rows: list[RecipeRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what no setting expresses (SyncBN, pre-training, ...)


def same_value(a: Any, b: Any) -> bool:
    """Equality that treats ints and floats alike (1e-4 == 0.0001, 512 == 512.0) and lists element-wise."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    return a == b


def full_size_presets() -> list[str]:
    """The presets that stand for a paper's model (every preset but the CPU-size ones)."""
    from omniseg.config import list_presets

    return [p for p in list_presets() if not p.endswith(CPU_SIZE_SUFFIXES) and p not in CPU_SIZE_PRESETS]


def _folder():
    return resources.files("omniseg") / "official_recipes"


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in _folder().iterdir() if p.name.endswith(".yaml"))


def load_recipe(preset: str) -> Recipe:
    path = _folder() / f"{preset}.yaml"
    if not path.is_file():
        cpu = preset.endswith(CPU_SIZE_SUFFIXES) or preset in CPU_SIZE_PRESETS
        why = "a CPU-size preset, not a paper's recipe" if cpu else "no official recipe for this preset"
        raise FileNotFoundError(f"{preset!r}: {why} (recipes: {', '.join(recipe_names())})")
    node = OmegaConf.to_container(OmegaConf.load(str(path)), resolve=False)
    unknown = set(node) - {"headline", "official", "rows", "notes"}
    if unknown:
        raise ValueError(f"{path}: unknown fields {sorted(unknown)}")
    rows = []
    for i, row in enumerate(node.get("rows") or []):
        missing = {"key", "value", "official", "source"} - set(row)
        extra = set(row) - {"key", "value", "official", "source", "why"}
        if missing or extra:
            raise ValueError(f"{path}: row {i} ({row.get('key')}): missing {sorted(missing)}, unknown {sorted(extra)}")
        rows.append(RecipeRow(**row))
    return Recipe(preset, node["headline"], node["official"], rows, list(node.get("notes") or []))


def resolved_value(cfg, key: str) -> Any:
    """A dotted key's value in a loaded config, as plain Python (lists, dicts)."""
    value = OmegaConf.select(cfg, key, throw_on_missing=True, default=KeyError)
    if value is KeyError:
        raise KeyError(key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_recipe(recipe: Recipe) -> list[str]:
    """Every way the preset and its official table disagree: a value that is not the preset's, a deviation
    without its reason, a reason without a deviation, a required key without a row, a key twice."""
    from omniseg.config import load_config

    cfg = load_config(recipe.preset)
    problems = []
    keys = [r.key for r in recipe.rows]
    for key in sorted({k for k in keys if keys.count(k) > 1}):
        problems.append(f"{key}: more than one row")
    for key in REQUIRED_KEYS:
        if key not in keys:
            problems.append(f"{key}: no row (every recipe states it)")
    for row in recipe.rows:
        try:
            actual = resolved_value(cfg, row.key)
        except Exception:
            problems.append(f"{row.key}: not a setting of the preset")
            continue
        if not same_value(actual, row.value):
            problems.append(f"{row.key}: the preset has {actual!r}, the table says {row.value!r}")
        if row.deviates and not row.why:
            problems.append(f"{row.key}: preset {row.value!r} differs from the official {row.official!r} without a why")
        if not row.deviates and row.why:
            problems.append(f"{row.key}: a why but no deviation")
        if not row.source:
            problems.append(f"{row.key}: no source file")
    return problems


def _cell(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_cell(v)}" for k, v in value.items()) + "}"
    return str(value).replace("|", "\\|")


def render_recipe(recipe: Recipe) -> str:
    lines = [f"## `{recipe.preset}`", "", f"Headline: {recipe.headline}", "", f"Official config: {recipe.official}", "",
             "| setting | preset | official | official source | why it differs |",
             "|---|---|---|---|---|"]
    for r in recipe.rows:
        mark = " **≠**" if r.deviates else ""
        lines.append(f"| `{r.key}` | {_cell(r.value)}{mark} | {_cell(r.official)} | {r.source} | {r.why or ''} |")
    if recipe.notes:
        lines += ["", "Not expressed as a setting:", ""] + [f"- {n}" for n in recipe.notes]
    return "\n".join(lines) + "\n"


def render_markdown() -> str:
    """docs/recipes.md: every recipe's table, in preset order."""
    head = (
        "# Official recipes\n\n"
        "Every full-size preset, value by value against the official config of the result its paper reports.\n"
        "Rows marked **≠** differ on purpose, and say why. The tables are generated from the machine-readable\n"
        "files in `src/omniseg/official_recipes/` (`python -m omniseg.recipes > docs/recipes.md`); the test suite\n"
        "(`tests/test_recipes.py`) checks every preset against them, so a preset cannot drift from its table.\n"
        "`omniseg recipe PRESET` prints one table; `omniseg config PRESET` prints the whole resolved config.\n\n"
        "Values are in omniseg's units: `data.crop_size` in pixels ([h, w] or one side), `train.max_iters` in\n"
        "iterations of `data.batch_size` images, learning rates for that batch. CPU-size presets (`*_demo`,\n"
        "`camvid_best`) are not paper recipes and are not listed.\n\n"
    )
    return head + "\n".join(render_recipe(load_recipe(name)) for name in recipe_names())


if __name__ == "__main__":
    print(render_markdown(), end="")
