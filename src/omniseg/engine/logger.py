"""Run logging: a progress bar (loss, it/s, ETA), metrics.jsonl for plots, optional TensorBoard."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from omniseg.data.errors import DataError
from omniseg.files import atomic_path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (the writer is at it, or was killed mid-line)
    is skipped; any other broken line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "metrics file not found")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise DataError(path, f"line {number} is not valid JSON") from None
        if isinstance(record, dict) and "iter" in record:
            records.append(record)
    return records


class RunLogger:
    """`enabled` is False on non-main ranks (nothing written); `progress` only controls the bar."""

    def __init__(self, output_dir: str | Path, *, total: int, initial: int = 0, tensorboard: bool = False,
                 enabled: bool = True, progress: bool = True):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.jsonl = self.dir / "metrics.jsonl"
        if enabled:
            self._rewind(initial)
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                        disable=not (enabled and progress), mininterval=1.0)
        self.tb = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tb"))
            except ImportError:
                tqdm.write("tensorboard is not installed: pip install 'omniseg[tensorboard]'; continuing without it")

    def _rewind(self, iteration: int) -> None:
        """Keep only records up to `iteration` (where this run starts or resumes): after a crash the
        iterations past the last checkpoint are redone and logged again, and a line torn by the kill is
        dropped, so the log never holds duplicates or garbage."""
        if not self.jsonl.exists():
            return
        kept = [r for r in read_metrics(self.jsonl) if int(r["iter"]) <= iteration]
        with atomic_path(self.jsonl) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def step(self, n: int = 1, **postfix) -> None:
        if not self.bar.disable:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)

    def log(self, iteration: int, values: dict) -> None:
        """Append one record to metrics.jsonl (and TensorBoard)."""
        if not self.enabled:
            return
        rec = {"iter": iteration, "time": time.time(), **{k: _plain(v) for k, v in values.items()}}
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("iter", "time"):
                    self.tb.add_scalar(k, v, iteration)

    def write(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _plain(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v
