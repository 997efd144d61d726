"""Checkpoints that survive a crash: atomic writes, checksums, and an exact-resume state file.

Layout of an output dir:
  model_<iter>.safetensors   weights + the resolved config and dataset meta (self-contained: predict
                             needs nothing else)
  state_<iter>.pt            optimizer, scheduler, grad scaler, RNG states, iteration, data position,
                             the weight average (train.ema) and the weights' SHA-256 (loaded with
                             weights_only=True)
  last_checkpoint.json       points at the newest complete pair; written last, atomically
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from omniseg.files import atomic_path
from omniseg.hub import CheckpointError, load_state_dict_file


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(path: str | os.PathLike, model: torch.nn.Module, *, config_yaml: str = "", meta: dict | None = None,
                 info: dict | None = None) -> str:
    """Save weights (+ config, dataset meta and any JSON `info`, e.g. why these weights were kept, as
    safetensors metadata) atomically; returns SHA-256."""
    path = Path(path)
    sd = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    metadata = {"format": "omniseg", "config": config_yaml, "meta": json.dumps(meta or {})}
    if info:
        metadata["info"] = json.dumps(info)
    with atomic_path(path, durable=True) as tmp:
        save_file(sd, tmp, metadata=metadata)
    return sha256_file(path)


def read_weights_metadata(path: str | os.PathLike) -> dict:
    """The config YAML, dataset meta and info stored in an omniseg weights file ({} for foreign files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    out = {}
    if md.get("config"):
        out["config"] = md["config"]
    if md.get("meta"):
        out["meta"] = json.loads(md["meta"])
    if md.get("info"):
        out["info"] = json.loads(md["info"])
    return out


def stored_config(path: str | os.PathLike) -> bool:
    """Whether `path` is an omniseg weights file with its config inside (not an HF folder or a bare file)."""
    path = Path(path)
    return path.is_file() and "config" in read_weights_metadata(path)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _numpy_state_to_tensors(st) -> dict:
    # Plain tensors/ints only, so the state file loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = st
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_from_tensors(d: dict):
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and restores everything training needs to continue exactly where it stopped."""

    def __init__(self, output_dir: str | os.PathLike, *, keep: int = 2):
        self.dir = Path(output_dir)
        self.keep = keep

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete temp files left by a process killed inside `atomic_path` (they were never renamed,
        so no checkpoint refers to them). Call from the single writing process before training."""
        stale = [p for p in self.dir.glob(".*.tmp") if p.is_file()] if self.dir.is_dir() else []
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def save(self, iteration: int, model, optimizer, scheduler, *, scaler=None, ema=None, extra: dict | None = None,
             config_yaml: str = "", meta: dict | None = None, name: str | None = None) -> Path:
        name = name or f"{iteration:07d}"
        weights = self.dir / f"model_{name}.safetensors"
        digest = save_weights(weights, model, config_yaml=config_yaml, meta=meta)
        state = {
            "iteration": iteration,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "rng": rng_state(),
            "weights": weights.name,
            "weights_sha256": digest,
            "extra": extra or {},
        }
        state_path = self.dir / f"state_{name}.pt"
        with atomic_path(state_path, durable=True) as tmp:
            torch.save(state, tmp)
        pointer = {"weights": weights.name, "state": state_path.name, "iteration": iteration}
        with atomic_path(self.dir / "last_checkpoint.json", durable=True) as tmp:
            tmp.write_text(json.dumps(pointer))
        self._prune(keep_names={weights.name, state_path.name})
        return weights

    def _prune(self, keep_names: set[str]) -> None:
        if self.keep <= 0:
            return
        states = sorted(self.dir.glob("state_[0-9]*.pt"))
        for old in states[: max(0, len(states) - self.keep)]:
            w = self.dir / old.name.replace("state_", "model_").replace(".pt", ".safetensors")
            for p in (old, w):
                if p.name not in keep_names and p.exists():
                    p.unlink()

    def last(self) -> dict | None:
        pointer = self.dir / "last_checkpoint.json"
        if not pointer.is_file():
            return None
        try:
            return json.loads(pointer.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{pointer}: corrupt checkpoint pointer ({e})") from e

    def resume(self, model, optimizer, scheduler, *, scaler=None, ema=None) -> dict | None:
        """Restore the newest complete checkpoint; returns its state dict (iteration, extra) or None.
        A weight average (`ema`) missing from the checkpoint restarts at the restored weights."""
        pointer = self.last()
        if pointer is None:
            return None
        weights = self.dir / pointer["weights"]
        state_path = self.dir / pointer["state"]
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{state_path}: unreadable training state ({e})") from e
        if sha256_file(weights) != state["weights_sha256"]:
            raise CheckpointError(f"{weights}: checksum does not match {state_path.name}; the file is damaged")
        _unwrap(model).load_state_dict(load_state_dict_file(weights), strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None:
            if state.get("ema"):
                ema.load_state_dict(state["ema"])
            else:
                ema.reset_to(model)
        set_rng_state(state["rng"])
        return state
