"""Run under torchrun: one training step's loss and gradients for the first global batch.

`torchrun --nproc_per_node=N tests/helpers/ddp_gradients.py CONFIG.yaml OUT.pt` builds the model and the
rank's share of the first batch exactly as `omniseg train` does, runs forward/backward (through DDP
when N > 1) and rank 0 saves the rank-averaged loss terms and the (DDP-averaged) gradients.
"""

from __future__ import annotations

import sys

import torch

from omniseg.config import load_config
from omniseg.data.loader import collate
from omniseg.data.build import build_datasets
from omniseg.data.training import build_training_data, pad_targets
from omniseg.engine.distributed import distributed_session
from omniseg.models.registry import build_model_from_config
from omniseg.runtime import seed_everything


def main(config_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    cfg = load_config(config_path)
    with distributed_session(torch.device("cpu")) as (rank, world):
        seed_everything(int(cfg.train.seed))
        datasets, meta = build_datasets(cfg)
        model = build_model_from_config(cfg, meta)
        model.train()
        step_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        train_set, sampler = build_training_data(cfg, datasets["train"], rank=rank, world_size=world)
        batch = collate([train_set[item] for item in next(iter(sampler))], int(cfg.data.size_divisibility))
        targets = pad_targets([s["targets"] for s in batch.samples], tuple(batch.images.shape[-2:]))
        losses = step_model(batch.images, targets)
        sum(losses.values()).backward()
        terms = torch.stack([v.detach() for v in losses.values()])
        if world > 1:
            torch.distributed.all_reduce(terms)
            terms /= world
        if rank == 0:
            torch.save({"losses": dict(zip(losses, terms)),
                        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        "image_ids": [s["image_id"] for s in batch.samples], "world": world}, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
