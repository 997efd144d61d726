"""The training loop: one readable function from config to trained, evaluated, checkpointed model.

Features: AdamW or SGD with per-parameter lr / weight-decay rules, warmup + poly / step / cosine schedule,
an exponential moving average of the weights (train.ema: evaluated and saved as model_best / model_final
in place of the trained weights when enabled), full-model gradient clipping,
gradient accumulation, bf16 autocast, periodic evaluation, save-best and early stopping, atomic
checkpoints with exact resume (`resume=True`) kept separate from weight initialisation (`train.weights`),
DDP under torchrun.
Datasets come from omniseg.data.build, the sample order and targets from omniseg.data.training, the
model from omniseg.models.registry and scoring from omniseg.engine.evaluate.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from omniseg.config import to_yaml
from omniseg.data.build import build_datasets
from omniseg.data.loader import PadCollate
from omniseg.data.training import build_training_data, pad_targets
from omniseg.engine.checkpoint import Checkpointer, save_weights, set_rng_state
from omniseg.engine.distributed import distributed_session
from omniseg.engine.evaluate import evaluate, flat_metrics
from omniseg.engine.logger import RunLogger
from omniseg.engine.optim import build_ema, build_optimizer, build_scheduler
from omniseg.files import atomic_path
from omniseg.models.registry import build_model_from_config
from omniseg.runtime import resolve_device, seed_everything


@dataclass
class BestModel:
    """train.save_best / early_stop_patience: the best value of one evaluation metric so far (higher is
    better: every omniseg metric is), where it was reached, and how many evaluations have passed since."""

    metric: str
    patience: int | None = None
    value: float = -math.inf
    iteration: int = 0
    stale: int = 0

    def update(self, iteration: int, metrics: dict) -> bool:
        """Record one evaluation; True when it is a new best (a tie keeps the earlier weights)."""
        value = metrics.get(self.metric)
        if value is not None and not math.isnan(value) and value > self.value:
            self.value, self.iteration, self.stale = float(value), iteration, 0
            return True
        self.stale += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def state(self) -> dict:
        return {"metric": self.metric, "value": self.value, "iteration": self.iteration, "stale": self.stale}

    def load(self, state: dict | None) -> None:
        if state:
            self.value, self.iteration, self.stale = float(state["value"]), int(state["iteration"]), int(state["stale"])


def check_best_settings(cfg: DictConfig, has_val: bool) -> BestModel | None:
    """The BestModel the config asks for, or ConfigError naming the problem (before anything trains)."""
    from omniseg.evaluation.evaluator import SCALAR_KEYS
    from omniseg.schema import ConfigError, suggestion

    name, patience = cfg.train.save_best, cfg.train.early_stop_patience
    if name is None:
        if patience is not None:
            raise ConfigError("train.early_stop_patience needs train.save_best: the metric whose improvement it waits for")
        return None
    known = [k for task in cfg.eval_tasks for k in SCALAR_KEYS.get(task, ())]
    if name not in known:
        raise ConfigError(f"train.save_best: {name!r} is not a metric of eval_tasks {list(cfg.eval_tasks)}"
                          f"{suggestion(str(name), known)}; choose from {', '.join(known)}")
    if not has_val:
        raise ConfigError("train.save_best needs a validation split (data.val) to evaluate on")
    if patience is not None and patience < 1:
        raise ConfigError(f"train.early_stop_patience must be at least 1, got {patience}")
    return BestModel(name, patience)


def due(iteration: int, period: int, last: int) -> bool:
    """Whether a periodic action (evaluation, checkpoint, log) runs after `iteration`: every `period`
    iterations, and always after the last one; `period` 0 means only after the last one."""
    return iteration == last or (period > 0 and iteration % period == 0)


def train(cfg: DictConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Train as configured; returns the final evaluation metrics (flat dict)."""
    device = resolve_device(cfg.train.device)
    with distributed_session(device) as (rank, world):
        return _train(cfg, device, rank, world, resume=resume, progress=progress)


def _train(cfg: DictConfig, device: torch.device, rank: int, world: int, *, resume: bool, progress: bool) -> dict:
    t0 = time.time()
    out_dir = Path(cfg.train.output_dir)
    main_process = rank == 0
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
    seed_everything(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    best = check_best_settings(cfg, has_val=cfg.data.get("val") is not None)
    datasets, meta = build_datasets(cfg)
    model = build_model_from_config(cfg, meta).to(device)
    if cfg.train.weights:
        from omniseg.api import load_weights_into

        load_weights_into(model, cfg.train.weights)
    train_settings = OmegaConf.to_container(cfg.train, resolve=True)
    optimizer = build_optimizer(model, train_settings)
    max_iters = cfg.train.max_iters
    scheduler = build_scheduler(optimizer, train_settings)
    ema = build_ema(model, train_settings)  # None unless train.ema.enabled
    amp = cfg.train.amp
    if amp == "fp16" and device.type == "cpu" and main_process:
        print("[omniseg] train.amp=fp16 on the CPU (the GPU recipes' mixed precision): it runs, but float16 is "
              "slow on most CPUs; train.amp=bf16 (CPUs with AVX512-BF16 or AMX) or train.amp=none", flush=True)
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
        state = checkpointer.resume(model, optimizer, scheduler, scaler=scaler, ema=ema)
        if state is None:
            print(f"[omniseg] --resume: no checkpoint in {out_dir}, starting from iteration 0", flush=True)
        else:
            start_iter = int(state["iteration"])
            print(f"[omniseg] resumed from {out_dir / checkpointer.last()['weights']} at iteration {start_iter}", flush=True)
            if ema is not None and state.get("ema") is None:
                print("[omniseg] the checkpoint has no weight average (train.ema was off): the average starts "
                      "from the resumed weights", flush=True)

    train_model = model
    if world > 1:
        if cfg.train.sync_bn:
            if device.type != "cuda":
                raise ValueError("train.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); on CPU "
                                 "use model.backbone_norm=frozen_bn, whose results do not depend on how the batch is split")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)

    accumulate = cfg.train.accumulate
    train_set, sampler = build_training_data(cfg, datasets["train"], start_batch=start_iter * accumulate,
                                             rank=rank, world_size=world)
    workers = cfg.data.num_workers
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=workers,
                        collate_fn=PadCollate(cfg.data.size_divisibility),
                        persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None)
    data_iter = iter(loader)  # draws a base seed from the global RNG ...
    if state is not None:
        set_rng_state(state["rng"])  # ... so the saved RNG state is restored only now, as in an uninterrupted run

    meta_dict = meta.to_dict()
    config_yaml = to_yaml(cfg)
    logger = RunLogger(out_dir, total=max_iters, initial=start_iter, tensorboard=cfg.train.tensorboard,
                       enabled=main_process, progress=progress)
    eval_period, ckpt_period, log_period = cfg.train.eval_period, cfg.train.checkpoint_period, cfg.train.log_period
    clip = cfg.train.clip_grad or 0.0
    # Stop this invocation early (checkpointing first), e.g. to fit a long run into job time limits.
    stop_at = cfg.train.stop_at_iter or 0
    # A checkpoint records a finished iteration: trained, then evaluated if due, with the latest metrics
    # and the bad-sample count in its state. A run killed mid-evaluation redoes that iteration; one killed
    # after its last checkpoint still knows its final metrics and how many samples were skipped.
    saved = (state or {}).get("extra", {})
    last_metrics: dict = dict(saved.get("metrics", {}))
    last_class_iou: dict | None = None  # per-class IoU of the latest evaluation (final_metrics.json)
    skipped_before = int(saved.get("skipped_samples", 0))  # all ranks, before this invocation
    skipped_total = 0  # this rank, this invocation
    if best is not None:
        best.load(saved.get("best"))
    if saved.get("stopped_early"):
        logger.write(f"[omniseg] this run stopped early at iteration {start_iter} (train.early_stop_patience): "
                     f"nothing to resume")
        logger.close()
        return last_metrics
    stopped_early = False

    def skipped_so_far() -> int:
        """Bad samples skipped by all ranks since the run began (a collective under DDP)."""
        count = torch.tensor([skipped_total], dtype=torch.int64, device=device)  # gloo: CPU, nccl: CUDA
        if world > 1:
            torch.distributed.all_reduce(count)
        return skipped_before + int(count.item())

    scored_model = ema.module if ema is not None else model  # what validation scores and model_best holds
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
        if ema is not None:
            ema.update(model)

        total = sum(loss_terms.values())
        window["loss"] = window.get("loss", 0.0) + total
        for k, v in loss_terms.items():
            if not k[-1].isdigit():  # final-layer terms (loss_ce, loss_mask_mp, ...); aux terms only in the total
                window[k] = window.get(k, 0.0) + v
        window_n += 1
        logger.step(1, loss=total, lr=optimizer.param_groups[0]["lr"])
        done = it + 1
        if due(done, log_period, max_iters):
            elapsed = time.time() - t_window
            rec = {k: v / window_n for k, v in window.items()}
            rec.update(lr=scheduler.get_last_lr()[0], sec_per_iter=elapsed / window_n)
            if skipped_before + skipped_total:
                rec["skipped_samples"] = skipped_before + skipped_total  # this rank's view
            logger.log(done, rec)
            window, window_n, t_window = {}, 0, time.time()
        stopping = done == stop_at and done < max_iters  # at max_iters the normal ending follows
        if "val" in datasets and due(done, eval_period, max_iters):
            # Every rank scores its shard; the evaluators sum their state across ranks.
            results = evaluate(scored_model, datasets["val"], cfg, meta, device=device, progress=False,
                               rank=rank, world_size=world)
            last_metrics = flat_metrics(results)
            last_class_iou = (results.get("semantic") or {}).get("IoU")
            logger.log(done, {k: last_metrics[k] for k in ("PQ", "SQ", "RQ", "mIoU", "AP", "AP50") if k in last_metrics})
            logger.write(f"[iter {done}] " + " | ".join(f"{k} {last_metrics[k]:.2f}" for k in ("PQ", "mIoU", "AP")
                                                       if k in last_metrics))
            if best is not None:
                if best.update(done, last_metrics) and main_process:
                    save_weights(out_dir / "model_best.safetensors", scored_model, config_yaml=config_yaml,
                                 meta=meta_dict, info={"best": best.state()})
                    logger.write(f"[omniseg] new best {best.metric} {best.value:.2f}: model_best.safetensors")
                stopped_early = best.exhausted and done < max_iters
        if due(done, ckpt_period, max_iters) or stopping or stopped_early:
            extra = {"metrics": last_metrics, "skipped_samples": skipped_so_far()}  # every rank joins the sum
            if best is not None:
                extra.update(best=best.state(), stopped_early=stopped_early)
            if main_process:
                checkpointer.save(done, model, optimizer, scheduler, scaler=scaler, ema=ema, extra=extra,
                                  config_yaml=config_yaml, meta=meta_dict)
        if stopped_early:
            logger.write(f"[omniseg] stopping early at iteration {done}: {best.metric} has not improved on "
                         f"{best.value:.2f} (iteration {best.iteration}) for {best.stale} evaluations")
            break
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
        last = checkpointer.last()
        final = {"iteration": int(last["iteration"]) if last else max_iters, "seconds": round(time.time() - t0, 1),
                 "metrics": last_metrics, "class_IoU": last_class_iou, "skipped_samples": skipped_total}
        if best is not None:
            final.update(best=best.state(), stopped_early=stopped_early)
        (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
        # A stable name for the trained weights, next to the periodic ones; with train.ema, their average.
        if ema is not None:
            save_weights(out_dir / "model_final.safetensors", ema.module, config_yaml=config_yaml, meta=meta_dict,
                         info={"ema": {"decay": ema.decay, "warmup": ema.warmup, "updates": ema.updates}})
        elif last:
            with atomic_path(out_dir / "model_final.safetensors", durable=True) as tmp:
                shutil.copyfile(out_dir / last["weights"], tmp)
    return last_metrics
