"""Datasets from configuration: `build_dataset(cfg.data, "train")`.

Config keys (plain dict or OmegaConf node)::

    format: coco_panoptic | coco_instance | semantic_folder | yolo_seg | labelme | synthetic
    root: folder the paths below are relative to (itself relative to the working directory)
    image_dir, json, png_dir          # COCO formats
    image_dir, label_dir, preset, classes, label_map, class_info, image_suffix, label_suffix  # folders
    data_yaml (or image_dir, label_dir, classes), stuff_classes     # yolo_seg
    image_dir, label_dir, classes, stuff_classes                     # labelme
    num_train, num_val, image_size, seed, view   # synthetic
    train: {...}, val: {...}          # optional per-split overrides of any key above

Path values may contain `{split}`; defaults follow each dataset's usual layout.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from omniseg.data.errors import DataError
from omniseg.data.formats import CocoInstanceDataset, CocoPanopticDataset, SemanticFolderDataset
from omniseg.data.formats.labelme import LabelMeDataset
from omniseg.data.meta import DatasetMeta
from omniseg.settings import DATA_FORMATS as FORMATS

_SPLIT_KEYS = ("train", "val", "test")

# Per-format / per-preset default paths, relative to root.
_DEFAULTS = {
    "coco_panoptic": {"image_dir": "{split}2017", "json": "annotations/panoptic_{split}2017.json",
                      "png_dir": "annotations/panoptic_{split}2017"},
    "coco_instance": {"image_dir": "{split}2017", "json": "annotations/instances_{split}2017.json"},
    "semantic_folder": {"image_dir": "images/{split}", "label_dir": "labels/{split}"},
    "camvid": {"image_dir": "{split}", "label_dir": "{split}annot"},
    "ade20k": {"image_dir": "images/{split}", "label_dir": "annotations/{split}", "class_info": "objectInfo150.csv",
               "split_names": {"train": "training", "val": "validation"}},
    "cityscapes": {"image_dir": "leftImg8bit/{split}", "label_dir": "gtFine/{split}"},
}


def as_plain_dict(cfg) -> dict:
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(cfg)


def _resolve_cfg(data_cfg, split: str) -> dict:
    """The keys of `split`: the section's own, then the split's; unset (null) keys left out so that the
    format's defaults apply."""
    cfg = as_plain_dict(data_cfg)
    merged = {k: v for k, v in cfg.items() if k not in _SPLIT_KEYS}
    if isinstance(cfg.get(split), dict):
        merged.update(cfg[split])
    return {k: v for k, v in merged.items() if v is not None}


def split_settings(cfg, split: str) -> dict:
    """A run config's `data.<split>` section as `build_dataset` reads it, with the synthetic-generation
    settings folded in for that format."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg.data[split], resolve=True)
    if node.get("format") == "synthetic":
        node = {**OmegaConf.to_container(cfg.data.synthetic, resolve=True), **node}
    return node


def build_datasets(cfg, splits=("train", "val")) -> tuple[dict[str, Dataset], DatasetMeta]:
    """The datasets of a run config's `splits` (those it defines) and their class metadata."""
    datasets = {s: build_dataset(split_settings(cfg, s), cfg.data[s].get("split") or s)
                for s in splits if cfg.data.get(s) is not None}
    if not datasets:
        raise ValueError(f"the config defines none of the data splits {list(splits)}")
    meta = next(iter(datasets.values())).meta
    return datasets, meta


def build_dataset(data_cfg, split: str) -> Dataset:
    """The dataset of `split` described by `data_cfg` (see module docstring)."""
    cfg = _resolve_cfg(data_cfg, split)
    fmt = cfg.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"data.format must be one of {FORMATS}, got {fmt!r}")
    root = Path(cfg.get("root") or ".")
    defaults = dict(_DEFAULTS.get(fmt, {}))
    if fmt == "semantic_folder" and cfg.get("preset"):
        defaults.update(_DEFAULTS.get(cfg["preset"], {}))
    split_name = cfg.get("split_name") or defaults.get("split_names", {}).get(split, split)

    def path(key: str, required: bool = True) -> Path | None:
        value = cfg.get(key, defaults.get(key))
        if value is None:
            if required:
                raise ValueError(f"data.{key} is required for format {fmt!r}")
            return None
        p = root / str(value).format(split=split_name)
        if required and not p.exists():
            raise DataError(p, f"data.{key} for split '{split}' does not exist")
        return p

    name = cfg.get("name")
    if fmt != "semantic_folder" and (cfg.get("sequences") is not None or cfg.get("exclude_sequences") is not None):
        raise ValueError(f"data.sequences / data.exclude_sequences select video frames of format semantic_folder, "
                         f"not {fmt!r}")
    if fmt == "synthetic":
        return _build_synthetic(cfg, split)
    if not root.exists():
        raise DataError(root, "data.root does not exist")
    if fmt == "coco_panoptic":
        return CocoPanopticDataset(path("image_dir"), path("json"), path("png_dir"), name=name)
    if fmt == "coco_instance":
        return CocoInstanceDataset(path("image_dir"), path("json"), name=name)
    if fmt == "yolo_seg":
        return _build_yolo(cfg, root, split_name, name)
    if fmt == "labelme":
        return LabelMeDataset(path("image_dir"), path("label_dir", required=False), cfg.get("classes"),
                              stuff_classes=cfg.get("stuff_classes") or (), name=name)
    class_info = path("class_info", required=False)
    if class_info is not None and not class_info.exists():
        if "class_info" in cfg:
            raise DataError(class_info, "data.class_info does not exist")
        class_info = None  # the preset's default file is optional
    return SemanticFolderDataset(
        path("image_dir"),
        path("label_dir"),
        classes=cfg.get("classes"),
        preset=cfg.get("preset"),
        image_suffix=cfg.get("image_suffix"),
        label_suffix=cfg.get("label_suffix"),
        label_map={int(k): int(v) for k, v in cfg["label_map"].items()} if cfg.get("label_map") else None,
        class_info=class_info,
        ignore_index=int(cfg.get("ignore_index", 255)),
        name=name,
        sequences=list(cfg["sequences"]) if cfg.get("sequences") is not None else None,
        exclude_sequences=list(cfg["exclude_sequences"]) if cfg.get("exclude_sequences") is not None else None,
    )


def _build_yolo(cfg: dict, root: Path, split: str, name: str | None) -> Dataset:
    """YOLO-seg from the data YAML (its split folders and names), or from image_dir / label_dir / classes."""
    from omniseg.data.formats.yolo import YoloSegDataset, read_data_yaml

    classes, image_dir = cfg.get("classes"), cfg.get("image_dir")
    if cfg.get("data_yaml"):
        spec = read_data_yaml(root / cfg["data_yaml"])
        classes = classes or spec["names"]
        if image_dir is None:
            if split not in spec["splits"]:
                raise DataError(root / cfg["data_yaml"], f"names no '{split}' split (it has {sorted(spec['splits'])})")
            image_dir = spec["splits"][split]
    if classes is None or image_dir is None:
        raise ValueError("data.format yolo_seg needs data_yaml, or image_dir and classes")
    image_dir = root / str(image_dir).format(split=split)
    label_dir = root / str(cfg["label_dir"]).format(split=split) if cfg.get("label_dir") else None
    return YoloSegDataset(image_dir, label_dir, classes, stuff_classes=cfg.get("stuff_classes") or (), name=name)


_NOTED_ROOTS: set[str] = set()


def _build_synthetic(cfg: dict, split: str) -> Dataset:
    """Generate (once) and read the synthetic data through the COCO panoptic reader.

    The semantic-folder and COCO-instance readings of the same files are attached as `.views` so
    every reader can be exercised on identical data.
    """
    from omniseg.data.synthetic import existing_manifest, generate, synthetic_meta, synthetic_paths

    root = Path(cfg.get("root") or "datasets/synthetic")
    wanted = dict(num_train=int(cfg.get("num_train", 320)), num_val=int(cfg.get("num_val", 80)),
                  image_size=int(cfg.get("image_size", 128)), seed=int(cfg.get("seed", 0)))
    found = existing_manifest(root)
    if found is None:
        generate(root, **wanted)
    elif any(found.get(k) != v for k, v in wanted.items()) and str(root) not in _NOTED_ROOTS:
        _NOTED_ROOTS.add(str(root))
        # A finished dataset is data the user pointed at: read it, never regenerate it behind their back.
        print(f"[omniseg] {root}: using the existing synthetic dataset "
              f"({ {k: found.get(k) for k in wanted} }); the config's generation settings {wanted} apply only "
              f"to a missing folder", flush=True)
    if split not in ("train", "val"):
        raise ValueError(f"the synthetic dataset has splits 'train' and 'val', not {split!r}")
    p = synthetic_paths(root, split)
    meta = synthetic_meta()
    views = {
        "panoptic": CocoPanopticDataset(p["image_dir"], p["panoptic_json"], p["panoptic_png_dir"], name="synthetic"),
        "instance": CocoInstanceDataset(p["image_dir"], p["instances_json"], name="synthetic"),
        "semantic": SemanticFolderDataset(p["image_dir"], p["semantic_dir"], classes=meta.classes,
                                          isthing=meta.isthing, colors=meta.colors, name="synthetic"),
    }
    view = cfg.get("view", "panoptic")
    if view not in views:
        raise ValueError(f"data.view must be one of {sorted(views)}, got {view!r}")
    for ds in views.values():
        ds.views = views
    return views[view]


def _unwrap(ds):
    while not hasattr(ds, "meta") or getattr(ds, "meta", None) is None:
        inner = getattr(ds, "dataset", None)
        if inner is None:
            break
        ds = inner
    return ds


def describe_dataset(ds, max_images: int | None = 200) -> str:
    """Human-readable class <-> id table with per-class counts, for checking a custom dataset."""
    base = _unwrap(ds)
    meta = base.meta
    counts, unit = None, ""
    if hasattr(base, "class_counts"):
        if isinstance(base, SemanticFolderDataset):
            counts, unit = base.class_counts(max_images), "images"
            if max_images is not None and len(base) > max_images:
                unit += f" (first {max_images})"
        else:
            counts = base.class_counts()
            unit = "segments" if isinstance(base, CocoPanopticDataset) else "instances"
    lines = [
        f"dataset '{meta.name}' ({type(base).__name__}): {len(ds)} images, {meta.num_classes} classes "
        f"({len(meta.thing_ids)} thing, {len(meta.stuff_ids)} stuff), ignore index {meta.ignore_index}",
        f"{'id':>4}  {'dataset_id':>10}  {'kind':<5}  {'name':<24}" + (f"  {unit}" if counts else ""),
    ]
    for i, cls in enumerate(meta.classes):
        kind = "thing" if meta.isthing[i] else "stuff"
        row = f"{i:>4}  {meta.dataset_ids[i]:>10}  {kind:<5}  {cls:<24}"
        if counts:
            row += f"  {counts[i]}"
        lines.append(row)
    if counts:
        missing = [meta.classes[i] for i, c in enumerate(counts) if c == 0]
        if missing:
            lines.append(f"classes never seen: {', '.join(missing)}")
    return "\n".join(lines)
