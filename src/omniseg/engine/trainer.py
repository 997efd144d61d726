"""The training loop: one readable function from config to trained, evaluated, checkpointed model.

Features: AdamW + backbone lr multiplier, warmup + poly schedule, full-model gradient clipping,
gradient accumulation, bf16 autocast, periodic evaluation, atomic checkpoints with exact resume
(`resume=True`) kept separate from weight initialisation (`train.weights`), DDP under torchrun.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from omniseg.config import to_yaml
from omniseg.data.build import build_dataset
from omniseg.data.errors import DataError
from omniseg.data.loader import PadCollate, collate
from omniseg.data.targets import TASKS, mask_targets
from omniseg.data.transforms import build_transforms
from omniseg.engine.checkpoint import Checkpointer, atomic_write, set_rng_state
from omniseg.engine.logger import RunLogger
from omniseg.engine.optim import WarmupPolyLR, build_optimizer
from omniseg.engine.sampling import ResumableBatchSampler
from omniseg.models.registry import build_model


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def dataset_cfg(cfg: DictConfig, split: str) -> dict:
    """The data section for one split, with the synthetic-generation parameters folded in."""
    node = OmegaConf.to_container(cfg.data[split], resolve=True)
    if node.get("format") == "synthetic":
        node = {**OmegaConf.to_container(cfg.data.synthetic, resolve=True), **node}
    return node


def build_datasets(cfg: DictConfig, splits=("train", "val")):
    datasets = {s: build_dataset(dataset_cfg(cfg, s), cfg.data[s].get("split", s)) for s in splits if s in cfg.data}
    meta = next(iter(datasets.values())).meta
    return datasets, meta


def build_model_from_config(cfg: DictConfig, meta) -> torch.nn.Module:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    return build_model(model_cfg, num_classes=meta.num_classes, thing_ids=meta.thing_ids)


# Offset between a sample's augmentation seed and its loss-point seed, so the two streams differ.
POINT_SEED_OFFSET = 0x9E3779B97F4A7C15 >> 2


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
            supported = [t for t in TASKS if t in _gt_tasks(sample)]
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


def build_training_data(cfg: DictConfig, dataset, *, start_batch: int = 0, rank: int = 0,
                        world_size: int = 1) -> tuple[TrainingSet, ResumableBatchSampler]:
    """The augmented training set and the batch sampler that orders it (rank's share under DDP)."""
    train_set = TrainingSet(
        dataset,
        build_transforms(True, size=cfg.data.crop_size, scale_range=tuple(cfg.data.scale_range),
                         hflip=bool(cfg.data.hflip), photometric=bool(cfg.data.photometric)),
        str(cfg.task), skip_bad=bool(cfg.data.get("skip_bad_samples", False)),
    )
    sampler = ResumableBatchSampler(len(train_set), int(cfg.data.batch_size), seed=int(cfg.train.seed),
                                    start_batch=start_batch, rank=rank, world_size=world_size)
    return train_set, sampler


def pad_targets(targets: list[dict], padded_hw: tuple[int, int]) -> list[dict]:
    out = []
    for t in targets:
        m = t["masks"]
        h, w = m.shape[-2:]
        if (h, w) != padded_hw:
            m = torch.nn.functional.pad(m, (0, padded_hw[1] - w, 0, padded_hw[0] - h))
        out.append({**t, "masks": m})
    return out


def _is_dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextmanager
def distributed_session(device: torch.device):
    """(rank, world size) for this process. Under torchrun (WORLD_SIZE > 1) joins the process group,
    and on leaving waits for every rank and tears the group down (a process that exits with a live
    gloo group can abort at interpreter shutdown). A group set up by the caller is left alone."""
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _is_dist():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    try:
        yield (torch.distributed.get_rank(), torch.distributed.get_world_size()) if _is_dist() else (0, 1)
        if created:
            torch.distributed.barrier()
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _gt_tasks(sample: dict) -> set[str]:
    tasks = set()
    if "sem_seg" in sample or "pan_seg" in sample:
        tasks.add("semantic")
    if "pan_seg" in sample:
        tasks.add("panoptic")
    if "instances" in sample or "pan_seg" in sample:
        tasks.add("instance")
    return tasks


@torch.no_grad()
def evaluate(model, dataset, cfg: DictConfig, meta, *, tasks=None, device=None, max_images: int | None = None,
             batch_size: int = 1, progress: bool = True, rank: int = 0, world_size: int = 1) -> dict:
    """Run the model over a dataset and score it (PQ / mIoU / AP) at the original resolution.

    Under DDP pass `rank`/`world_size`: each rank scores images rank, rank + world_size, ... and every
    rank must call this (the evaluators gather across ranks); all ranks get the global result.
    """
    from omniseg.evaluation.evaluator import DatasetEvaluator

    tasks = list(tasks or cfg.eval_tasks)
    if len(dataset):  # score only what the dataset has ground truth for (a semantic folder has no panoptic GT)
        available = _gt_tasks(dataset[0])
        tasks = [t for t in tasks if t in available]
    device = device or next(model.parameters()).device
    transforms = build_transforms(False, min_size_test=cfg.data.get("min_size_test"))
    seen = getattr(getattr(model, "module", model), "seen_classes", None)  # continual models: learnt classes
    evaluator = DatasetEvaluator(meta, tasks, boundary_f=bool(cfg.get("eval_boundary_f", False)), seen_classes=seen)
    was_training = model.training
    model.eval()
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    from tqdm.auto import tqdm

    shard = list(range(rank, n, world_size))
    for start in tqdm(range(0, len(shard), batch_size), desc="eval", disable=not progress, mininterval=1.0):
        samples = [transforms(dataset[i]) for i in shard[start:start + batch_size]]
        batch = collate(samples, size_divisibility=int(cfg.data.size_divisibility))
        preds = model.predict(batch.images.to(device), batch.image_sizes,
                              [(s["height"], s["width"]) for s in samples], tasks=tasks)
        for s, p in zip(samples, preds):
            evaluator.process(s, p)
    model.train(was_training)
    return evaluator.evaluate()


def flat_metrics(results: dict) -> dict:
    """{"panoptic": {"PQ": ..}, ...} -> {"PQ": .., "mIoU": .., "AP": ..} (headline numbers)."""
    out = {}
    for task in ("panoptic", "semantic", "instance"):
        for k, v in (results.get(task) or {}).items():
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                out[k] = float(v)
    return out


def train(cfg: DictConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Train as configured; returns the final evaluation metrics (flat dict)."""
    device = resolve_device(cfg.train.get("device", "auto"))
    with distributed_session(device) as (rank, world):
        return _train(cfg, device, rank, world, resume=resume, progress=progress)


def _train(cfg: DictConfig, device: torch.device, rank: int, world: int, *, resume: bool, progress: bool) -> dict:
    t0 = time.time()
    out_dir = Path(cfg.train.output_dir)
    main_process = rank == 0
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
    seed_everything(int(cfg.train.seed))
    if cfg.train.get("deterministic"):
        torch.use_deterministic_algorithms(True, warn_only=True)

    datasets, meta = build_datasets(cfg)
    model = build_model_from_config(cfg, meta).to(device)
    if cfg.train.get("weights"):
        from omniseg.api import load_weights_into

        load_weights_into(model, cfg.train.weights)
    optimizer = build_optimizer(model, OmegaConf.to_container(cfg.train, resolve=True))
    max_iters = int(cfg.train.max_iters)
    scheduler = WarmupPolyLR(optimizer, max_iters, power=float(cfg.train.poly_power),
                             warmup_iters=int(cfg.train.warmup_iters), warmup_factor=float(cfg.train.warmup_factor))
    amp = str(cfg.train.get("amp", "none"))
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp in ("bf16", "fp16") else nullcontext())

    checkpointer = Checkpointer(out_dir)
    if main_process:
        for stale in checkpointer.remove_stale_temp_files():
            print(f"[omniseg] removed {stale.name}, a checkpoint file left half-written by an interrupted run",
                  flush=True)
    start_iter = 0
    state = None
    if resume:
        state = checkpointer.resume(model, optimizer, scheduler, scaler=scaler)
        if state is None:
            print(f"[omniseg] --resume: no checkpoint in {out_dir}, starting from iteration 0", flush=True)
        else:
            start_iter = int(state["iteration"])
            print(f"[omniseg] resumed from {out_dir / checkpointer.last()['weights']} at iteration {start_iter}", flush=True)

    train_model = model
    if world > 1:
        if cfg.train.get("sync_bn"):
            if device.type != "cuda":
                raise ValueError("train.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); on CPU "
                                 "use model.backbone_norm=frozen_bn, whose results do not depend on how the batch is split")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)

    accumulate = int(cfg.train.get("accumulate", 1))
    train_set, sampler = build_training_data(cfg, datasets["train"], start_batch=start_iter * accumulate,
                                             rank=rank, world_size=world)
    workers = int(cfg.data.num_workers)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=workers,
                        collate_fn=PadCollate(int(cfg.data.size_divisibility)),
                        persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None)
    data_iter = iter(loader)  # draws a base seed from the global RNG ...
    if state is not None:
        set_rng_state(state["rng"])  # ... so the saved RNG state is restored only now, as in an uninterrupted run

    meta_dict = meta.to_dict()
    config_yaml = to_yaml(cfg)
    logger = RunLogger(out_dir, total=max_iters, initial=start_iter, tensorboard=bool(cfg.train.get("tensorboard")),
                       enabled=main_process, progress=progress)
    eval_period = int(cfg.train.eval_period)
    ckpt_period = int(cfg.train.checkpoint_period)
    log_period = int(cfg.train.log_period)
    clip = float(cfg.train.get("clip_grad") or 0.0)
    # Stop this invocation early (checkpointing first), e.g. to fit a long run into job time limits.
    stop_at = int(cfg.train.get("stop_at_iter") or 0)
    # A checkpoint records a finished iteration: trained, then evaluated if due, with the latest metrics
    # and the bad-sample count in its state. A run killed mid-evaluation redoes that iteration; one killed
    # after its last checkpoint still knows its final metrics and how many samples were skipped.
    saved = (state or {}).get("extra", {})
    last_metrics: dict = dict(saved.get("metrics", {}))
    last_class_iou: dict | None = None  # per-class IoU of the latest evaluation (final_metrics.json)
    skipped_before = int(saved.get("skipped_samples", 0))  # all ranks, before this invocation
    skipped_total = 0  # this rank, this invocation

    def skipped_so_far() -> int:
        """Bad samples skipped by all ranks since the run began (a collective under DDP)."""
        count = torch.tensor([skipped_total], dtype=torch.int64, device=device)  # gloo: CPU, nccl: CUDA
        if world > 1:
            torch.distributed.all_reduce(count)
        return skipped_before + int(count.item())

    model.train()
    window: dict[str, float] = {}
    window_n = 0
    t_window = time.time()
    for it in range(start_iter, max_iters):
        optimizer.zero_grad(set_to_none=True)
        loss_terms: dict[str, float] = {}
        for _ in range(accumulate):
            batch = next(data_iter)
            images = batch.images.to(device, non_blocking=True)
            targets = pad_targets([{k: v.to(device) if torch.is_tensor(v) else v for k, v in s["targets"].items()}
                                    for s in batch.samples], tuple(images.shape[-2:]))
            skipped_total += sum(len(s.get("skipped", ())) for s in batch.samples)
            with autocast:
                losses = train_model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at iteration {it}: "
                                         + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items()))
            (scaler.scale(loss / accumulate) if scaler else loss / accumulate).backward()
            for k, v in losses.items():
                loss_terms[k] = loss_terms.get(k, 0.0) + float(v.detach()) / accumulate
        if scaler:
            scaler.unscale_(optimizer)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()

        total = sum(loss_terms.values())
        window["loss"] = window.get("loss", 0.0) + total
        for k, v in loss_terms.items():
            if not k[-1].isdigit():  # final-layer terms (loss_ce, loss_mask_mp, ...); aux terms only in the total
                window[k] = window.get(k, 0.0) + v
        window_n += 1
        logger.step(1, loss=total, lr=optimizer.param_groups[0]["lr"])
        done = it + 1
        if done % log_period == 0 or done == max_iters:
            elapsed = time.time() - t_window
            rec = {k: v / window_n for k, v in window.items()}
            rec.update(lr=scheduler.get_last_lr()[0], sec_per_iter=elapsed / window_n)
            if skipped_before + skipped_total:
                rec["skipped_samples"] = skipped_before + skipped_total  # this rank's view
            logger.log(done, rec)
            window, window_n, t_window = {}, 0, time.time()
        stopping = done == stop_at and done < max_iters  # at max_iters the normal ending follows
        if "val" in datasets and (done % eval_period == 0 or done == max_iters):
            # Every rank scores its shard; the evaluators sum their state across ranks.
            results = evaluate(model, datasets["val"], cfg, meta, device=device, progress=False,
                               rank=rank, world_size=world)
            last_metrics = flat_metrics(results)
            last_class_iou = (results.get("semantic") or {}).get("IoU")
            logger.log(done, {k: last_metrics[k] for k in ("PQ", "SQ", "RQ", "mIoU", "AP", "AP50") if k in last_metrics})
            logger.write(f"[iter {done}] " + " | ".join(f"{k} {last_metrics[k]:.2f}" for k in ("PQ", "mIoU", "AP")
                                                       if k in last_metrics))
        if done % ckpt_period == 0 or done == max_iters or stopping:
            extra = {"metrics": last_metrics, "skipped_samples": skipped_so_far()}  # every rank joins the sum
            if main_process:
                checkpointer.save(done, model, optimizer, scheduler, scaler=scaler, extra=extra,
                                  config_yaml=config_yaml, meta=meta_dict)
        if stopping:
            logger.write(f"[omniseg] stopping at iteration {done} as asked (train.stop_at_iter); "
                         f"continue with --resume")
            logger.close()
            return last_metrics
    logger.close()
    skipped_total = skipped_so_far()
    if skipped_total:
        logger.write(f"[omniseg] {skipped_total} bad training samples were skipped (data.skip_bad_samples); "
                     f"each is listed above")
    if main_process:
        final = {"iteration": max_iters, "seconds": round(time.time() - t0, 1), "metrics": last_metrics,
                 "class_IoU": last_class_iou,
                 "skipped_samples": skipped_total}
        (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
        # A stable name for the trained weights, next to the periodic ones.
        import shutil

        last = checkpointer.last()
        if last:
            atomic_write(out_dir / "model_final.safetensors",
                          lambda tmp: shutil.copyfile(out_dir / last["weights"], tmp))
    return last_metrics
