"""Python API: build or load a model, and a `Predictor` for in-process inference.

    from omniseg.api import Predictor
    predictor = Predictor("runs/demo/model_final.safetensors")
    result = predictor("image.jpg")          # {"semantic", "panoptic", "instances"}
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from omniseg.data.meta import DatasetMeta
from omniseg.hub import CheckpointError, load_state_dict_file
from omniseg.hub.hf_folder import is_hf_folder


def load_model(weights: str | os.PathLike, *, device: str | torch.device = "cpu",
               config: DictConfig | None = None) -> tuple[torch.nn.Module, DictConfig, DatasetMeta]:
    """Load a trained model from an omniseg weights file (config and classes are stored inside it) or a
    local HF transformers Mask2Former / MaskFormer checkpoint folder (config.json + weights)."""
    from omniseg.config import config_from_stored
    from omniseg.engine.checkpoint import read_weights_metadata
    from omniseg.models.registry import build_model_from_config

    path = Path(weights)
    if is_hf_folder(path):
        from omniseg.hub.hf import load_hf_checkpoint

        model, cfg, meta = load_hf_checkpoint(path)
        return model.to(device).eval(), cfg, meta
    if path.suffix in (".pth", ".pt", ".pkl", ".bin") and config is None:
        raise CheckpointError(f"{path}: not an omniseg weights file (a .safetensors with its config and classes "
                              f"inside); a released checkpoint becomes one with `omniseg convert {path.name} "
                              f"--from FORMAT --preset PRESET -o OUT.safetensors`")
    md = read_weights_metadata(path)
    if config is None:
        if "config" not in md:
            raise CheckpointError(f"{path}: no config stored in this weights file; pass the config it was trained with")
        config = config_from_stored(md["config"], f"{path} (stored config)")
    meta = DatasetMeta.from_dict(md["meta"]) if md.get("meta", {}).get("classes") else None
    if meta is None:
        raise CheckpointError(f"{path}: no class list stored in this weights file")
    model = build_model_from_config(config, meta, with_backbone_weights=False)
    sd = load_state_dict_file(path)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit the model in its config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.to(device).eval(), config, meta


def load_weights_into(model: torch.nn.Module, weights: str | os.PathLike) -> dict:
    """Initialise `model` from weights for fine-tuning (training restarts at iteration 0).

    Tensors whose shape differs (e.g. a classifier for another class count) are skipped and reported.
    """
    path = Path(weights)
    if is_hf_folder(path):
        from omniseg.hub.hf import read_hf_state_dict_converted

        sd = read_hf_state_dict_converted(path)
    else:
        sd = load_state_dict_file(path)
    own = model.state_dict()
    skipped = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    sd = {k: v for k, v in sd.items() if k not in skipped}
    result = model.load_state_dict(sd, strict=False)
    report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys), "shape_mismatch": skipped}
    print(f"[omniseg] initialised from {path}: {len(sd) - len(report['unexpected'])} tensors loaded, "
          f"{len(skipped)} skipped for shape ({skipped[:3]}), {len(report['missing'])} missing "
          f"({report['missing'][:3]}), {len(report['unexpected'])} unexpected ({report['unexpected'][:3]})", flush=True)
    return report


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """RGB uint8 [3,H,W] with EXIF orientation applied; DataError names the file if unreadable."""
    from omniseg.data.formats import load_rgb_image as load_image

    return load_image(path)


def image_sample(image) -> dict:
    """A file path, an HxWx3 uint8 array / PIL image or a uint8 [3,H,W] tensor -> the raw sample the
    transforms take ({"image", "file_name", "height", "width"})."""
    if isinstance(image, (str, os.PathLike)):
        name = str(image)
        image = read_image(image)
    else:
        name = "<array>"
        if not isinstance(image, torch.Tensor):
            image = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError("images must be file paths, HxWx3 uint8 arrays / PIL images, or uint8 [3,H,W] tensors")
    return {"image": image, "file_name": name, "height": int(image.shape[1]), "width": int(image.shape[2])}


class Predictor:
    """Image(s) in, prediction dicts out (original resolution), as in docs/design.md. With `tile` (px), every
    image is predicted tile by tile at its own resolution instead of resized whole (`predict_tiled`).

    `mode` ("whole" | "slide"), `crop_size`, `stride`, `scales` and `flip` override the weights' `inference`
    settings (omniseg/test_time.py: MMSeg's sliding windows and multi-scale + flip, semantic only)."""

    def __init__(self, weights: str | os.PathLike, *, device: str = "auto",
                 tasks: Sequence[str] | None = None, min_size_test: int | None = None,
                 config: DictConfig | None = None, postprocess: str | None = None,
                 tile: int | None = None, overlap: int | None = None, mode: str | None = None,
                 crop_size: int | Sequence[int] | None = None, stride: int | Sequence[int] | None = None,
                 scales: Sequence[float] | None = None, flip: bool | None = None):
        from omniseg.data.transforms import build_transforms
        from omniseg.runtime import resolve_device
        from omniseg.tasks import check_tasks
        from omniseg.test_time import InferenceMode

        self.device = resolve_device(device)
        self.model, self.cfg, self.meta = load_model(weights, device=self.device, config=config)
        self.tasks = check_tasks(self.model.tasks if tasks is None else tasks,  # default: all the model predicts
                                 self.model.tasks, what=f"{weights}: this {self.model.describe()} model")
        if postprocess is not None:  # overrides the checkpoint's model.test.postprocess
            try:
                self.model.set_postprocess_mode(postprocess)
            except ValueError as e:
                raise ValueError(f"{weights}: {e}") from None
        if min_size_test is None:
            min_size_test = self.cfg.data.min_size_test
        self.max_size_test = self.cfg.data.get("max_size_test")
        self.transforms = build_transforms(False, min_size_test=min_size_test, max_size_test=self.max_size_test)
        self.min_size_test = min_size_test
        self.size_divisibility = self.cfg.data.size_divisibility
        chosen = {k: v for k, v in dict(mode=mode, crop_size=crop_size, stride=stride, scales=scales,
                                        flip=flip).items() if v is not None}
        self.inference = InferenceMode.from_settings({**dict(self.cfg.get("inference") or {}), **chosen},
                                                     source=str(weights))
        if tasks is None and not self.inference.plain and "semantic" in self.model.tasks:
            self.tasks = ["semantic"]  # windows and augmented views average semantic scores only
        self.inference.check_tasks(self.tasks)
        self.tiling = None
        if tile is not None:
            from omniseg.tiling import TileSettings

            if not self.inference.plain:
                raise ValueError(f"tiles (at the image's own resolution) and inference ({self.inference.describe()}) "
                                 f"are two ways of predicting: choose one")
            self.tiling = TileSettings(size=tile, overlap=overlap)

    @property
    def reads_originals(self) -> bool:
        """Whether images are predicted from their original pixels (tiles, sliding windows, test-time
        augmentation) rather than resized once by `prepare`."""
        return self.tiling is not None or not self.inference.plain

    def _to_sample(self, image) -> dict:
        return image_sample(image)

    def prepare(self, images: Sequence):
        """Images as the model reads them: (padded batch, the transformed samples with their original sizes)."""
        from omniseg.data.loader import collate

        samples = [self.transforms(self._to_sample(im)) for im in images]
        return collate(samples, size_divisibility=self.size_divisibility), samples

    @torch.no_grad()
    def predict_batch(self, images: Sequence, tasks: Sequence[str] | None = None) -> list[dict]:
        """Predictions for several images at once (padded to one batch), for `tasks` (default: the
        Predictor's); with tiling, sliding windows or test-time augmentation, image by image."""
        if self.reads_originals:
            return [self.predict_original(image, tasks) for image in images]
        batch, samples = self.prepare(images)
        return self.predict_prepared(batch, samples, tasks)

    @torch.no_grad()
    def predict_prepared(self, batch, samples: Sequence[dict], tasks: Sequence[str] | None = None) -> list[dict]:
        """`predict_batch` for a batch already read and collated (`prepare`, or a DataLoader's workers)."""
        from omniseg.tasks import check_tasks

        if not self.inference.plain:
            raise ValueError(f"inference ({self.inference.describe()}) reads each image as it was read, not a "
                             f"resized batch: use predict_batch or predict_original")
        tasks = self.tasks if tasks is None else check_tasks(tasks, self.model.tasks, what=self.model.describe())
        preds = self.model.predict(batch.images.to(self.device), batch.image_sizes,
                                   [(s["height"], s["width"]) for s in samples], tasks=tasks)
        for pred, s in zip(preds, samples):
            pred.update(height=s["height"], width=s["width"])
        return preds

    def predict_original(self, image, tasks: Sequence[str] | None = None) -> dict:
        """One image as read (not resized): tile by tile with `tile`, else under the Predictor's inference
        mode (`omniseg.test_time.predict_semantic`: sliding windows, multi-scale + flip)."""
        from omniseg.tasks import check_tasks
        from omniseg.test_time import predict_semantic

        if self.tiling is not None:
            return self.predict_tiled(image, tasks)
        tasks = self.tasks if tasks is None else check_tasks(tasks, self.model.tasks, what=self.model.describe())
        self.inference.check_tasks(tasks)
        sample = self._to_sample(image)
        pred = predict_semantic(self.model, sample["image"], self.inference, min_size_test=self.min_size_test,
                                max_size_test=self.max_size_test, size_divisibility=self.size_divisibility, device=self.device)
        pred.update(height=sample["height"], width=sample["width"])
        return pred

    def predict_tiled(self, image, tasks: Sequence[str] | None = None, settings=None) -> dict:
        """One image of any size, tile by tile at its own resolution (`omniseg.tiling`; `settings`: a
        TileSettings, default the Predictor's `tile` / `overlap`). Instance masks come as CroppedMasks."""
        from omniseg.tasks import check_tasks
        from omniseg.tiling import TileSettings, predict_tiled

        settings = settings or self.tiling or TileSettings()
        tasks = self.tasks if tasks is None else check_tasks(tasks, self.model.tasks, what=self.model.describe())
        sample = self._to_sample(image)
        pred = predict_tiled(self.model, sample["image"], tasks, settings, size_divisibility=self.size_divisibility,
                             device=self.device)
        pred.update(height=sample["height"], width=sample["width"])
        return pred

    def __call__(self, image) -> dict:
        return self.predict_batch([image])[0]
