"""Dynamic batching for the server: requests wait in one queue; a single worker takes what has arrived
(up to `max_batch`, waiting at most `max_wait_s` for more after the first), groups it by what can share a
forward pass (same tasks, same image size: padding then changes nothing), and runs each group in a thread
so the event loop keeps accepting requests."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    key: Hashable  # jobs with equal keys may share a forward pass
    payload: Any
    future: asyncio.Future = field(repr=False)


class BatchQueue:
    """`await queue.submit(key, payload)` -> `run_group(payloads)`'s result for that payload.

    `run_group` gets the payloads of one group (same key) and returns one result per payload; it runs in
    a worker thread. An exception it raises is given to every request of that group."""

    def __init__(self, run_group: Callable[[list[Any]], list[Any]], *, max_batch: int = 8, max_wait_s: float = 0.005):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run_group, self.max_batch, self.max_wait_s = run_group, max_batch, max_wait_s
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.group_sizes: Counter[int] = Counter()  # forward passes by batch size
        self.requests = 0
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None

    async def submit(self, key: Hashable, payload: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(Job(key, payload, future))
        return await future

    async def _collect(self) -> list[Job]:
        jobs = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(jobs) < self.max_batch:
            if not self.queue.empty():
                jobs.append(self.queue.get_nowait())
                continue
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self.queue.get(), timeout=left))
            except asyncio.TimeoutError:
                break
        return jobs

    async def _run(self) -> None:
        while True:
            jobs = await self._collect()
            groups: dict[Hashable, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                group = [j for j in group if not j.future.cancelled()]  # the client went away
                if not group:
                    continue
                self.group_sizes[len(group)] += 1
                self.requests += len(group)
                try:
                    results = await asyncio.to_thread(self.run_group, [j.payload for j in group])
                except Exception as e:  # every request of the group gets the error; the worker goes on
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(e)
                    continue
                for job, result in zip(group, results):
                    if not job.future.done():
                        job.future.set_result(result)
