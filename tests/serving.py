"""Helpers for the server tests: tiny weights files, a server process on a free port, a Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL
from omniseg.config import load_config, to_yaml
from omniseg.data.synthetic import synthetic_meta
from omniseg.engine.checkpoint import save_weights
from omniseg.models.registry import build_model_from_config

PER_PIXEL_TINY = ["model.backbone=resnet18", "model.backbone_norm=bn", "model.head_width=16",
                  "model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [16, 32, 64, 64]}"]


def tiny_weights(path: Path, preset: str = "mask2former_demo", *extra: str) -> Path:
    """A weights file of a tiny random-weight model for the synthetic classes. Mask classification keeps
    every query (object threshold 0), so random weights still give segments of every task."""
    overrides = [*TINY_MODEL, "model.test.object_mask_threshold=0.0"] if preset.startswith("mask2former") \
        else list(PER_PIXEL_TINY)
    cfg = load_config(preset, [*overrides, *extra])
    meta = synthetic_meta()
    torch.manual_seed(0)
    save_weights(path, build_model_from_config(cfg, meta).eval(), config_yaml=to_yaml(cfg), meta=meta.to_dict())
    return path


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def server(weights: Path, *args: str, timeout: float = 90.0):
    """`omniseg serve` in its own process on a free port: yields (base URL, process); stopped at the end."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.Popen([sys.executable, "-m", "omniseg.cli", "serve", "-w", str(weights), "--port", str(port),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"omniseg serve exited with {proc.returncode}: {proc.stdout.read().decode()}")
            try:
                get_json(f"{url}/healthz")
                break
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError(f"omniseg serve did not answer on {url} within {timeout} s") from None
                time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def chromium() -> str:
    """Debian's Chromium, installed with apt-get when missing and this user may (CI runs as root); a test
    that needs it is skipped, with the reason, only where it can neither be found nor installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("no Chromium: install Debian's chromium package (apt-get install chromium) for the browser test")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:  # package lists may be missing
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium but it is not on PATH"
    return found
