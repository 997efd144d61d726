"""Prediction over folders of any size: images decoded by DataLoader workers, batched, every result written
at once in the formats other tools read, restartable.

Per image (named after the image's stem): semantic/<stem>.png (dataset ids), panoptic/<stem>.png (COCO
panoptic colours), overlay/<stem>_<task>.png, on request yolo/<stem>.txt and labelme/<stem>.json (the
instances as polygons, to correct in those tools), and records/<stem>.json, written last, holding the image's
id and size, its panoptic annotation and its instance results. A record on disk therefore means the
image is done: `skip_existing` skips those images. At the end the collection files are assembled from
the records, streamed so that nothing grows with the folder: images.json, panoptic.json (COCO panoptic)
and instances_results.json (COCO results). An unreadable image is reported, listed in failed.txt and
left out; the others go on. With a tiling Predictor (`--tile`), each image is predicted tile by tile at its
own resolution (omniseg.tiling), and with sliding windows or test-time augmentation (omniseg.test_time)
view by view from the image as read: one image at a time, whatever `batch_size` says.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from omniseg.data.errors import DataError
from omniseg.data.loader import collate
from omniseg.files import atomic_path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(folder_or_file: Path) -> list[Path]:
    """The images of a folder (sorted by name), or the one file; DataError when there are none or when
    two share a stem (their outputs would overwrite each other)."""
    path = Path(folder_or_file)
    if not path.exists():
        raise DataError(path, "no such file or folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise DataError(path, f"no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise DataError(f, f"has the same name stem as {seen[f.stem].name}: their outputs would collide")
        seen[f.stem] = f
    return files


@dataclass
class PredictionReport:
    images: int = 0
    predicted: int = 0
    skipped_existing: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, output: Path) -> str:
        parts = [f"{self.predicted} image(s) predicted"]
        if self.skipped_existing:
            parts.append(f"{self.skipped_existing} already done")
        if self.failed:
            parts.append(f"{len(self.failed)} unreadable (listed in {output / 'failed.txt'})")
        return f"{', '.join(parts)} in {self.seconds:.1f} s; outputs in {output}"


class _Images(Dataset):
    """Decodes and resizes one image in a worker; a bad file comes back as its error, not an exception."""

    def __init__(self, files: Sequence[Path], transforms, keep_original: bool):
        self.files, self.transforms, self.keep_original = list(files), transforms, keep_original

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        from omniseg.api import image_sample

        try:
            sample = image_sample(self.files[i])
        except (DataError, ValueError) as e:
            return {"index": i, "error": str(e)}
        original = sample["image"] if self.keep_original else None
        if self.transforms is not None:
            sample = self.transforms(sample)
        sample.update(index=i, original=original)
        return sample


def _batch(samples: list[dict]) -> list[dict]:
    return samples  # collated in the main process, where the bad ones are sorted out


def _record_path(output: Path, stem: str) -> Path:
    return output / "records" / f"{stem}.json"


def predict_folder(predictor, files: Sequence[Path], output: Path, *, tasks: Sequence[str], overlay: bool = True,
                   score_threshold: float = 0.5, batch_size: int = 1, num_workers: int = 0,
                   image_ids: dict[str, int] | None = None, skip_existing: bool = False,
                   polygon_formats: Sequence[str] = (),
                   progress: Callable[[Iterable], Iterable] | None = None) -> PredictionReport:
    """Predict every file and write its outputs (see the module docstring); returns what happened."""
    from omniseg import outputs as out
    from omniseg import visualize as vis

    start = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    meta = predictor.meta
    report = PredictionReport(images=len(files))
    unknown = sorted(set(polygon_formats) - {"yolo", "labelme"})
    if unknown or (polygon_formats and "instance" not in tasks):
        raise ValueError(f"polygon outputs are yolo and labelme, of the instance task; got {list(polygon_formats)} "
                         f"with tasks {list(tasks)}")
    if "yolo" in polygon_formats:
        with atomic_path(output / "yolo" / "data.yaml") as tmp:
            tmp.write_text("names:\n" + "".join(f"  {i}: {json.dumps(c)}\n" for i, c in enumerate(meta.classes)))
    ids = {f.name: (image_ids or {}).get(f.name, i) for i, f in enumerate(files)}
    todo = [f for f in files if not (skip_existing and _record_path(output, f.stem).is_file())]
    report.skipped_existing = len(files) - len(todo)
    # tiles, sliding windows and test-time views are cut from the image as read
    originals = predictor.reads_originals
    loader = DataLoader(_Images(todo, None if originals else predictor.transforms, overlay),
                        batch_size=1 if originals else batch_size, num_workers=num_workers,
                        collate_fn=_batch, prefetch_factor=2 if num_workers > 0 else None)
    bar = progress(range(len(todo))) if progress else None
    for samples in loader:
        good = []
        for s in samples:
            if "error" in s:
                report.failed.append(s["error"])
                print(f"[omniseg] skipping an unreadable image: {s['error']}", flush=True)
            else:
                good.append(s)
        if good:
            if originals:
                preds = [predictor.predict_original(s["image"], tasks) for s in good]
            else:
                batch = collate(good, size_divisibility=predictor.size_divisibility)
                preds = predictor.predict_prepared(batch, good, tasks=tasks)
            for s, pred in zip(good, preds):
                f = todo[s["index"]]
                _write_image(out, vis, output, f, ids[f.name], s, pred, meta, overlay, score_threshold, polygon_formats)
                report.predicted += 1
        if bar is not None:
            bar.update(len(samples))
    if bar is not None:
        bar.close()
    _assemble(output, files, tasks, meta)
    if report.failed:
        with atomic_path(output / "failed.txt") as tmp:
            tmp.write_text("".join(f"{line}\n" for line in report.failed))
    report.seconds = time.perf_counter() - start
    return report


def _write_image(out, vis, output: Path, file: Path, image_id: int, sample: dict, pred: dict, meta, overlay: bool,
                 score_threshold: float, polygon_formats: Sequence[str] = ()) -> None:
    """Every output of one image; the record last, so that its presence means the image is complete."""
    stem = file.stem
    record: dict = {"image": {"id": image_id, "file_name": file.name, "height": int(sample["height"]),
                              "width": int(sample["width"])}}
    if "semantic" in pred:
        out.write_semantic_png(output / "semantic" / f"{stem}.png", pred["semantic"], meta)
    if "panoptic" in pred:
        annotation = out.write_panoptic(output / "panoptic" / f"{stem}.png", pred["panoptic"]["segment_map"],
                                        pred["panoptic"]["segments_info"], meta, image_id=image_id)
        record["panoptic"] = annotation
    if "instances" in pred:
        record["instances"] = out.instances_to_coco_json(image_id, pred["instances"], meta)
        width, height = int(sample["width"]), int(sample["height"])
        if "yolo" in polygon_formats:
            with atomic_path(output / "yolo" / f"{stem}.txt") as tmp:
                tmp.write_text(out.yolo_seg_text(pred["instances"], width, height, scores=True))
        if "labelme" in polygon_formats:
            relative = os.path.relpath(file.resolve(), (output / "labelme").resolve())
            with atomic_path(output / "labelme" / f"{stem}.json") as tmp:
                tmp.write_text(json.dumps(out.labelme_json(pred["instances"], meta, relative, width, height)))
    if overlay:
        image = sample["original"]
        if "panoptic" in pred:
            vis.save_image(output / "overlay" / f"{stem}_panoptic.png",
                           vis.overlay_panoptic(image, pred["panoptic"]["segment_map"], pred["panoptic"]["segments_info"],
                                                meta))
        if "semantic" in pred:
            vis.save_image(output / "overlay" / f"{stem}_semantic.png", vis.overlay_semantic(image, pred["semantic"], meta))
        if "instances" in pred:
            vis.save_image(output / "overlay" / f"{stem}_instances.png",
                           vis.overlay_instances(image, pred["instances"], meta, score_threshold=score_threshold))
    with atomic_path(_record_path(output, stem)) as tmp:
        tmp.write_text(json.dumps(record))


def _records(output: Path, files: Sequence[Path]) -> Iterable[dict]:
    for f in files:
        path = _record_path(output, f.stem)
        if path.is_file():  # images that failed to load have none
            yield json.loads(path.read_text())


def _write_json_list(handle, items: Iterable) -> None:
    handle.write("[")
    for n, item in enumerate(items):
        handle.write(("," if n else "") + json.dumps(item))
    handle.write("]")


def _assemble(output: Path, files: Sequence[Path], tasks: Sequence[str], meta) -> None:
    """images.json, panoptic.json and instances_results.json from the per-image records, streamed."""
    from omniseg.outputs import coco_categories

    with atomic_path(output / "images.json") as tmp, open(tmp, "w") as handle:
        handle.write('{"images": ')
        _write_json_list(handle, (r["image"] for r in _records(output, files)))
        handle.write("}")
    if "panoptic" in tasks:
        with atomic_path(output / "panoptic.json") as tmp, open(tmp, "w") as handle:
            handle.write('{"images": ')
            _write_json_list(handle, (r["image"] for r in _records(output, files) if "panoptic" in r))
            handle.write(', "annotations": ')
            _write_json_list(handle, (r["panoptic"] for r in _records(output, files) if "panoptic" in r))
            handle.write(f', "categories": {json.dumps(coco_categories(meta))}}}')
    if "instance" in tasks:
        with atomic_path(output / "instances_results.json") as tmp, open(tmp, "w") as handle:
            _write_json_list(handle, (d for r in _records(output, files) for d in r.get("instances", [])))


def read_image_ids(path: Path) -> dict[str, int]:
    """file_name -> image id from a COCO (instance or panoptic) JSON, so results evaluate against it."""
    try:
        images = json.loads(Path(path).read_text())["images"]
        return {Path(im["file_name"]).name: int(im["id"]) for im in images}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(path, f"cannot read image ids from this COCO JSON ({e})") from None

