"""Writing files so that an interruption never leaves a truncated one: every writer in omniseg (checkpoints,
metrics, prediction PNGs and JSON, figures) writes to a temporary sibling and moves it into place."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block succeeds it replaces `path` atomically (on
    POSIX), otherwise it is removed. `durable` also flushes the file to disk before the rename, so the
    file survives a power loss once the block returns (checkpoints). The temporary name is
    `.<name>.<pid>.<random>.tmp`, and the file gets the usual permissions (umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
