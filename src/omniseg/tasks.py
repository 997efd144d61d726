"""The three segmentation tasks, named once. The order is OneFormer's (semantic, instance, panoptic),
which is also the order a `task: sampled` run draws from."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

TASKS = ("semantic", "instance", "panoptic")


def check_tasks(tasks: Iterable[str], supported: Sequence[str] = TASKS, *, what: str = "omniseg") -> list[str]:
    """`tasks` as a list, or ValueError naming the unknown or unsupported ones and what `what` offers."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the tasks are {', '.join(TASKS)}")
    unsupported = [t for t in tasks if t not in supported]
    if unsupported:
        raise ValueError(f"{what} predicts {', '.join(supported)}, not {', '.join(unsupported)}")
    return tasks
