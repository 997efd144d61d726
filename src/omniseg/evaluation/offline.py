"""Scoring saved predictions against a dataset's ground truth, with the evaluators model-based evaluation
uses, so the numbers are the same.

What is read (`omniseg predict` writes all of it into one folder; other toolkits write the same formats):
  semantic   label PNGs of dataset ids named after the images: `semantic/<stem>.png`, or a folder of them
  panoptic   a COCO panoptic JSON + its PNG folder: `panoptic.json` + `panoptic/`, or any `X.json` with `X/`
             (panopticapi's convention) or `panoptic/` beside it
  instance   COCO results JSON (`instances_results.json`, or any JSON list of records): "segmentation"
             RLE and/or "bbox", "score", "category_id" (dataset ids), "image_id"
Images are matched by file-name stem; instance results by image id, read through `images.json` or the
panoptic JSON's images when the folder has them (omniseg predict numbers images 0, 1, ...), else taken
as the dataset's own ids. A dataset image without its prediction, a prediction for no dataset image,
and a malformed file are errors naming the file.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from omniseg.data.errors import DataError
from omniseg.data.formats.files import load_json, load_png_array
from omniseg.data.meta import DatasetMeta


def _stem(file_name) -> str:
    return Path(str(file_name)).stem


class PredictionFiles:
    """The prediction files found at `path` (a folder or one JSON file), per task."""

    def __init__(self, path: str | Path, meta: DatasetMeta):
        self.path, self.meta = Path(path), meta
        if not self.path.exists():
            raise DataError(self.path, "no such prediction file or folder")
        self.semantic: dict[str, Path] | None = None   # stem -> label PNG
        self.semantic_dir: Path | None = None
        self.panoptic: dict[str, dict] | None = None   # stem -> annotation
        self.panoptic_json: Path | None = None
        self.panoptic_dir: Path | None = None
        self.instances: dict | None = None             # image id -> records
        self.instances_json: Path | None = None
        self.ids: dict | None = None                   # prediction image id -> stem
        if self.path.is_dir():
            self._read_folder()
        else:
            self._read_json(self.path)
        if not self.tasks:
            raise DataError(self.path, "holds no predictions: semantic/*.png, panoptic.json + panoptic/, "
                                       "instances_results.json, a folder of label PNGs or one such JSON")
        self._id_of_stem = {s: i for i, s in self.ids.items()} if self.ids is not None else None

    @property
    def tasks(self) -> list[str]:
        return [t for t, v in (("semantic", self.semantic), ("panoptic", self.panoptic),
                               ("instance", self.instances)) if v is not None]

    # -- discovery ----------------------------------------------------------------------------
    def _read_folder(self) -> None:
        folder = self.path
        if (folder / "images.json").is_file():
            images = load_json(folder / "images.json", "images JSON").get("images")
            if not isinstance(images, list):
                raise DataError(folder / "images.json", "has no 'images' list")
            self.ids = {im["id"]: _stem(im["file_name"]) for im in images}
        if (folder / "semantic").is_dir():
            self._semantic_folder(folder / "semantic")
        if (folder / "panoptic.json").is_file():
            self._read_json(folder / "panoptic.json")
        if (folder / "instances_results.json").is_file():
            self._read_json(folder / "instances_results.json")
        if self.semantic is None and self.panoptic is None and self.instances is None:
            if any(p.suffix.lower() == ".png" for p in folder.iterdir()):
                self._semantic_folder(folder)

    def _semantic_folder(self, folder: Path) -> None:
        self.semantic_dir = folder
        self.semantic = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() == ".png"}

    def _read_json(self, path: Path) -> None:
        data = load_json(path, "prediction JSON", allow_list=True)
        if isinstance(data, dict):
            if "annotations" not in data:
                raise DataError(path, "is neither a COCO panoptic JSON (with 'annotations') nor a COCO results list")
            self._panoptic(path, data)
        else:
            self._instances(path, data)

    def _panoptic(self, path: Path, data: dict) -> None:
        for candidate in (path.with_suffix(""), path.parent / "panoptic"):
            if candidate.is_dir():
                self.panoptic_dir = candidate
                break
        else:
            raise DataError(path, f"panoptic JSON without its PNG folder ({path.with_suffix('')} or "
                                  f"{path.parent / 'panoptic'})")
        images = {im.get("id"): _stem(im.get("file_name", "")) for im in data.get("images") or []}
        if self.ids is None and images:
            self.ids = images
        self.panoptic_json, self.panoptic = path, {}
        for ann in data["annotations"]:
            if not isinstance(ann, dict) or "file_name" not in ann or "segments_info" not in ann:
                raise DataError(path, f"annotation without file_name / segments_info: {str(ann)[:80]}")
            stem = images.get(ann.get("image_id")) or _stem(ann["file_name"])
            self.panoptic[stem] = ann

    def _instances(self, path: Path, records: list) -> None:
        self.instances_json, self.instances = path, defaultdict(list)
        for i, r in enumerate(records):
            if not isinstance(r, dict) or "image_id" not in r or "category_id" not in r or "score" not in r:
                raise DataError(path, f"result {i} lacks image_id / category_id / score: {str(r)[:80]}")
            if "segmentation" not in r and "bbox" not in r:
                raise DataError(path, f"result {i} has neither a segmentation nor a bbox")
            if not self.meta.has_dataset_id(int(r["category_id"])):
                raise DataError(path, f"result {i}: category_id {r['category_id']} is not a class of the dataset")
            self.instances[r["image_id"]].append(r)

    # -- per image ----------------------------------------------------------------------------
    def _instance_key(self, stem: str, image_id):
        """The key of an image's results: the predictions' own id (via images.json) or the dataset's."""
        if self._id_of_stem is None:
            return image_id
        if stem not in self._id_of_stem:
            raise DataError(self.instances_json, f"the predictions list no image {stem} of the dataset")
        return self._id_of_stem[stem]

    def check_present(self, stem: str, tasks: list[str]) -> None:
        """The dataset image `stem` has a prediction for every task (instance results may be empty)."""
        if "semantic" in tasks and stem not in self.semantic:
            raise DataError(self.semantic_dir / f"{stem}.png", f"missing: the semantic prediction of dataset image {stem}")
        if "panoptic" in tasks and stem not in self.panoptic:
            raise DataError(self.panoptic_json, f"has no annotation for dataset image {stem}")

    def check_nothing_left(self, stems: set[str], instance_keys: set, tasks: list[str]) -> None:
        """No prediction is left over once every dataset image has been scored."""
        if "semantic" in tasks:
            extra = sorted(set(self.semantic) - stems)
            if extra:
                raise DataError(self.semantic[extra[0]], f"predicts no image of the dataset ({len(extra)} such file(s))")
        if "panoptic" in tasks:
            extra = sorted(set(self.panoptic) - stems)
            if extra:
                raise DataError(self.panoptic_json, f"annotates {extra[0]}, which is no image of the dataset "
                                                    f"({len(extra)} such annotation(s))")
        if "instance" in tasks:
            unknown = sorted(str(i) for i in self.instances if i not in instance_keys)
            if unknown:
                hint = "" if self.ids is not None else "; if the ids are the prediction run's own, write images.json beside it"
                raise DataError(self.instances_json, f"results for image_id {unknown[0]}, which is no image of the "
                                                     f"dataset ({len(unknown)} such id(s)){hint}")

    def prediction(self, stem: str, image_id, height: int, width: int, tasks: list[str]) -> dict:
        """One dataset image's prediction dict, as `DatasetEvaluator.process` takes it."""
        out: dict = {}
        if "semantic" in tasks:
            out["semantic"] = self._semantic(self.semantic[stem], height, width)
        if "panoptic" in tasks:
            out["panoptic"] = self._panoptic_image(self.panoptic[stem], height, width)
        if "instance" in tasks:
            out["instances"] = list(self.instances.get(self._instance_key(stem, image_id), []))
        return out

    def _semantic(self, path: Path, height: int, width: int) -> torch.Tensor:
        raw = load_png_array(path, "semantic prediction PNG").astype(np.int64)
        if raw.ndim != 2:
            raise DataError(path, f"a semantic prediction PNG must be single-channel, got shape {raw.shape}")
        if raw.shape != (height, width):
            raise DataError(path, f"is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image is {width}x{height}")
        lut = np.full(max(int(raw.max()) + 1, max(self.meta.dataset_ids) + 1), -1, dtype=np.int64)
        lut[self.meta.dataset_ids] = np.arange(self.meta.num_classes)
        labels = lut[raw]
        unknown = sorted(set(np.unique(raw[labels < 0]).tolist()) - {255, 65535})
        if unknown:
            raise DataError(path, f"holds values {unknown[:5]} that are no dataset class id (nor 255 = no label)")
        return torch.from_numpy(np.where(labels < 0, 255, labels))

    def _panoptic_image(self, ann: dict, height: int, width: int) -> dict:
        from omniseg.outputs import rgb_to_id

        path = self.panoptic_dir / ann["file_name"]
        rgb = load_png_array(path, "panoptic prediction PNG")
        if rgb.ndim != 3 or rgb.shape[2] < 3:
            raise DataError(path, f"a COCO panoptic PNG must be RGB, got shape {rgb.shape}")
        if rgb.shape[:2] != (height, width):
            raise DataError(path, f"is {rgb.shape[1]}x{rgb.shape[0]} (WxH) but its image is {width}x{height}")
        infos = []
        for s in ann["segments_info"]:
            if not self.meta.has_dataset_id(int(s.get("category_id", -1))):
                raise DataError(self.panoptic_json, f"{ann['file_name']}: segment {s.get('id')} has category_id "
                                                    f"{s.get('category_id')}, which is no class of the dataset")
            category = self.meta.to_contiguous(int(s["category_id"]))
            infos.append({"id": int(s["id"]), "category": category, "isthing": bool(self.meta.isthing[category]),
                          "score": float(s.get("score", 1.0))})
        return {"segment_map": torch.from_numpy(rgb_to_id(rgb[..., :3])), "segments_info": infos}


def evaluate_predictions(path: str | Path, dataset, meta: DatasetMeta, *, tasks: list[str] | None = None,
                         boundary_f: bool = False, bbox: bool = False, progress: bool = True) -> dict:
    """Score the predictions at `path` on `dataset` (results as `omniseg.engine.evaluate.evaluate` gives)."""
    from tqdm.auto import tqdm

    from omniseg.data.training import gt_tasks
    from omniseg.evaluation.evaluator import DatasetEvaluator

    files = PredictionFiles(path, meta)
    wanted = list(tasks or files.tasks)
    absent = [t for t in wanted if t not in files.tasks]
    if absent:
        raise DataError(files.path, f"holds no {', '.join(absent)} predictions (it has: {', '.join(files.tasks)})")
    if len(dataset):
        available = gt_tasks(dataset[0])
        wanted = [t for t in wanted if t in available]
    if not wanted:
        raise DataError(files.path, "none of its prediction tasks has ground truth in the dataset")
    evaluator = DatasetEvaluator(meta, wanted, boundary_f=boundary_f, bbox=bbox)
    stems, instance_keys = set(), set()
    for i in tqdm(range(len(dataset)), desc="score", disable=not progress, mininterval=1.0):
        sample = dataset[i]
        stem = _stem(sample["file_name"])
        files.check_present(stem, wanted)
        stems.add(stem)
        if "instance" in wanted:
            instance_keys.add(files._instance_key(stem, sample.get("image_id")))
        pred = files.prediction(stem, sample.get("image_id"), int(sample["height"]), int(sample["width"]), wanted)
        try:
            evaluator.process(sample, pred)
        except DataError:
            raise
        except ValueError as e:
            raise DataError(files.path, f"prediction of {stem}: {e}") from None
    files.check_nothing_left(stems, instance_keys, wanted)
    return evaluator.evaluate()
