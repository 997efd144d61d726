"""Training killed with SIGKILL at random moments and resumed ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from omniseg.config import to_yaml
from omniseg.engine.logger import read_metrics
from omniseg.engine.trainer import train
from omniseg.hub import load_state_dict_file

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")


def _last_logged_iter(run: Path) -> int:
    path = run / "metrics.jsonl"
    return max((int(r["iter"]) for r in read_metrics(path)), default=0) if path.is_file() else 0


def _train_until_killed(config: Path, run: Path, kill_after: int, delay: float) -> int:
    """Start `omniseg train --resume`, SIGKILL it `delay` s after iteration `kill_after` is logged."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "omniseg.cli", "train", str(config), "--resume"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while proc.poll() is None and _last_logged_iter(run) < kill_after and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its DataLoader worker, with no chance to clean up
    proc.wait()
    return proc.returncode


def test_sigkill_at_random_moments_then_resume_is_bit_exact(make_tiny_config, tmp_path):
    common = ("train.max_iters=10", "train.checkpoint_period=1", "train.log_period=1", "data.num_workers=1",
              "train.eval_period=10")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count everywhere: same float reduction order
    straight_config = tmp_path / "straight.yaml"
    straight_config.write_text(to_yaml(make_tiny_config(*common, out_dir=tmp_path / "straight")))
    subprocess.run([sys.executable, "-m", "omniseg.cli", "train", str(straight_config)], env=env,
                   capture_output=True, check=True, timeout=600)

    run = tmp_path / "killed"
    config = tmp_path / "killed.yaml"
    config.write_text(to_yaml(make_tiny_config(*common, out_dir=run)))
    rng = random.Random(20261123)
    kills = 0
    for kill_after in sorted(rng.sample(range(1, 9), 3)):
        code = _train_until_killed(config, run, kill_after, delay=rng.uniform(0.0, 0.3))
        kills += code == -signal.SIGKILL
    assert kills >= 2, "the runs finished before they could be killed"
    done = subprocess.run([sys.executable, "-m", "omniseg.cli", "train", str(config), "--resume"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    a = load_state_dict_file(tmp_path / "straight" / "model_final.safetensors")
    b = load_state_dict_file(run / "model_final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    straight = json.loads((tmp_path / "straight" / "final_metrics.json").read_text())
    resumed = json.loads((run / "final_metrics.json").read_text())
    assert straight["metrics"] == resumed["metrics"] and "PQ" in resumed["metrics"]
    # The log holds each iteration once (redone iterations replace what the killed runs wrote)...
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if "loss" in r] == list(range(1, 11))
    ref = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log if "loss" in r] == [r["loss"] for r in ref if "loss" in r]
    # ... and no half-written checkpoint file is left behind.
    assert not list(run.glob(".*.tmp"))


def test_crash_inside_a_checkpoint_write_keeps_the_previous_checkpoint(make_tiny_config, tmp_path, monkeypatch):
    """A write that dies half-way (simulated) never replaces the last good checkpoint; resume uses it."""
    from omniseg.engine import checkpoint as ckpt_mod

    cfg = make_tiny_config("train.max_iters=4", "train.checkpoint_period=2")
    cfg.train.stop_at_iter = 2
    train(cfg, progress=False)
    real_save = ckpt_mod.save_file

    def dying_save(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt_mod, "save_file", dying_save)
    cfg.train.stop_at_iter = None
    with pytest.raises(KeyboardInterrupt):
        train(cfg, resume=True, progress=False)
    run = tmp_path / "run"
    assert json.loads((run / "last_checkpoint.json").read_text())["iteration"] == 2
    assert not (run / "model_0000004.safetensors").exists()
    monkeypatch.setattr(ckpt_mod, "save_file", real_save)
    train(cfg, resume=True, progress=False)
    assert json.loads((run / "last_checkpoint.json").read_text())["iteration"] == 4


def test_resume_after_the_last_checkpoint_keeps_the_final_metrics(make_tiny_config, tmp_path):
    """Killed after the last checkpoint was written but before final_metrics.json: --resume has no
    iteration left to train, yet writes the same final metrics (the checkpoint carries them)."""
    cfg = make_tiny_config("train.max_iters=2", "train.checkpoint_period=1", "train.eval_period=2",
                           "data.num_workers=0", out_dir=tmp_path / "run")
    config = tmp_path / "run.yaml"
    config.write_text(to_yaml(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "omniseg.cli", "train", str(config)], env=env, capture_output=True,
                   check=True, timeout=600)
    run = tmp_path / "run"
    straight = json.loads((run / "final_metrics.json").read_text())["metrics"]
    (run / "final_metrics.json").unlink()  # what such a kill leaves behind
    subprocess.run([sys.executable, "-m", "omniseg.cli", "train", str(config), "--resume"], env=env,
                   capture_output=True, check=True, timeout=600)
    assert "PQ" in straight
    assert json.loads((run / "final_metrics.json").read_text())["metrics"] == straight
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in evals if "loss" not in r] == [2]  # evaluated once, not again on resume
