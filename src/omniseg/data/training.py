"""What training reads: each raw sample augmented with its own seed and turned into mask-classification
targets, in the order a resumable (and DDP-sharded) batch sampler gives."""

from __future__ import annotations

import random

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from omniseg.data.errors import DataError
from omniseg.data.sampling import ResumableBatchSampler, repeat_factors
from omniseg.data.targets import mask_targets
from omniseg.data.transforms import train_transforms
from omniseg.tasks import TASKS

# Offset between a sample's augmentation seed and its loss-point seed, so the two streams differ.
POINT_SEED_OFFSET = 0x9E3779B97F4A7C15 >> 2


def gt_tasks(sample: dict) -> set[str]:
    """The tasks a raw sample's annotation supports."""
    tasks = set()
    if "sem_seg" in sample or "pan_seg" in sample:
        tasks.add("semantic")
    if "pan_seg" in sample:
        tasks.add("panoptic")
    if "instances" in sample or "pan_seg" in sample:
        tasks.add("instance")
    return tasks


class TrainingSet(Dataset):
    """Augments a raw sample with its own seed and attaches mask-classification targets.

    Bad samples raise DataError; with `skip_bad=True` each is reported and replaced by the next index,
    and the sample carries the skip messages so the main process counts them (workers cannot).
    """

    def __init__(self, dataset, transforms, task: str, *, skip_bad: bool = False):
        self.dataset, self.transforms, self.task, self.skip_bad = dataset, transforms, task, skip_bad

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        skipped = []
        for attempt in range(len(self.dataset)):
            source = (index + attempt) % len(self.dataset)
            py_state = random.getstate()
            try:
                # Seed augmentation per sample without disturbing the caller's RNG streams.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    random.seed(seed)
                    sample = self.transforms(self.dataset[source])
                break
            except DataError as e:
                if not self.skip_bad:
                    raise
                skipped.append(str(e))
                print(f"[omniseg] skipping bad sample {source}: {e}", flush=True)
            finally:
                random.setstate(py_state)
        else:
            raise DataError(None, f"every one of the {len(self.dataset)} training samples failed to load; "
                                  f"last error: {skipped[-1]}")
        task = self.task
        if task == "sampled":  # OneFormer: each image draws one task its annotation supports, uniformly
            supported = [t for t in TASKS if t in gt_tasks(sample)]
            if not supported:
                raise DataError(sample.get("file_name"), "no panoptic, instance or semantic annotation to "
                                                         "derive targets from")
            task = random.Random(seed).choice(supported)
        sample["targets"] = mask_targets(sample, task)
        sample["targets"]["task"] = task
        # The loss's random points get their own per-sample stream (see MaskFormer.losses).
        sample["targets"]["seed"] = (seed + POINT_SEED_OFFSET) % (1 << 62)
        sample["skipped"] = skipped  # travels to the main process, which counts every skip
        for k in ("pan_seg", "segments_info", "instances", "sem_seg"):
            sample.pop(k, None)  # targets carry what training needs; keep batches light
        return sample


def image_categories(dataset, index: int) -> set[int]:
    """The classes present in one training image: from the annotation files where the reader knows them
    without decoding the image, else from the loaded sample."""
    reader = getattr(dataset, "image_categories", None)
    if reader is not None:
        return set(reader(index))
    sample = dataset[index]
    if "segments_info" in sample:
        return {int(s["category"]) for s in sample["segments_info"]}
    if "instances" in sample:
        return set(sample["instances"]["labels"].tolist())
    if "sem_seg" in sample:
        return {int(c) for c in torch.unique(sample["sem_seg"]).tolist() if c != dataset.meta.ignore_index}
    return set()


def build_training_data(cfg: DictConfig, dataset, *, start_batch: int = 0, rank: int = 0,
                        world_size: int = 1) -> tuple[TrainingSet, ResumableBatchSampler]:
    """The augmented training set and the batch sampler that orders it (rank's share under DDP); with
    data.repeat_factor_threshold, images of rare classes repeat (LVIS's repeat-factor sampling)."""
    data = cfg.data
    factors = None
    if data.repeat_factor_threshold is not None:
        if not data.repeat_factor_threshold > 0:
            raise ValueError(f"data.repeat_factor_threshold must be positive, got {data.repeat_factor_threshold}")
        factors = repeat_factors([image_categories(dataset, i) for i in range(len(dataset))],
                                 data.repeat_factor_threshold)
        if rank == 0:
            print(f"[omniseg] repeat-factor sampling (t = {data.repeat_factor_threshold}): an epoch holds "
                  f"{sum(factors):.0f} images on average instead of {len(factors)}", flush=True)
    train_set = TrainingSet(
        dataset,
        train_transforms(data),
        str(cfg.task), skip_bad=data.skip_bad_samples,
    )
    sampler = ResumableBatchSampler(len(train_set), data.batch_size, seed=cfg.train.seed,
                                    start_batch=start_batch, rank=rank, world_size=world_size,
                                    repeat_factors=factors)
    return train_set, sampler


def pad_targets(targets: list[dict], padded_hw: tuple[int, int]) -> list[dict]:
    """Zero-pad each target's masks to the padded batch size."""
    out = []
    for t in targets:
        m = t["masks"]
        h, w = m.shape[-2:]
        if (h, w) != padded_hw:
            m = torch.nn.functional.pad(m, (0, padded_hw[1] - w, 0, padded_hw[0] - h))
        out.append({**t, "masks": m})
    return out
