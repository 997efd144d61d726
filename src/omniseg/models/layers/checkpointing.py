"""Activation checkpointing: keep only a block's inputs in training and recompute its activations in
the backward pass, trading about one extra forward for the block's activation memory."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def run_block(block, *args, enabled: bool):
    """`block(*args)`, checkpointed when `enabled` and gradients are being recorded (never at inference).
    Non-reentrant checkpointing restores the RNG state, so dropout recomputes identically."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
