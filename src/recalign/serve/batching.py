"""Micro-batching: concurrent requests to one model are gathered into one call of the model.

A request hands in its rows (e.g. one prompt per item to score) and awaits its results. One asyncio task
per model takes the first waiting request, then keeps gathering requests for at most `max_wait_ms` or until
`max_batch` rows are together, and runs the model once on all their rows in the model's own worker thread
(so the event loop keeps accepting requests meanwhile, and a model never runs two batches at once). While
a batch runs, new requests queue up and form the next batch, so under load batches fill without waiting.
A request is never split: one with more than `max_batch` rows is a batch of its own. `max_batch=1` turns
batching off (each request is its own call, one after the other).

`close()` stops taking requests and answers every request already queued before it returns (drain on
shutdown); a later `submit` (e.g. a new app over the same model) starts the batcher again.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence


class MicroBatcher:
    def __init__(self, fn: Callable[[list], Sequence[Any]], max_batch: int = 32, max_wait_ms: float = 5.0,
                 name: str = "model", on_batch: Callable[[int, int, float], None] | None = None,
                 executor: ThreadPoolExecutor | None = None):
        """fn(rows) -> one result per row (runs in a worker thread); on_batch(rows, requests, seconds) is
        called after every batch (metrics)."""
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.fn = fn
        self.max_batch = int(max_batch)
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.name = name
        self.on_batch = on_batch
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"serve-{name}")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.batches = 0  # batches run so far (tests, /models)

    # ------------------------------------------------------------------ client side
    async def submit(self, rows: Sequence) -> list:
        """The results of fn for `rows`, computed together with whatever other requests are waiting."""
        rows = list(rows)
        if not rows:
            return []
        if self._closing:
            raise RuntimeError(f"{self.name}: the server is shutting down")
        self._start()
        future = self._loop.create_future()
        await self._queue.put((rows, future))
        return await future

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None and self._loop is loop and not self._task.done():
            return
        if self._task is not None and not self._task.done() and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)  # a batcher left on another app's loop
        self._loop = loop
        self._queue = asyncio.Queue()
        self._task = loop.create_task(self._run(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        """Answer every queued request, then stop."""
        self._closing = True
        try:
            if self._task is not None and not self._task.done() and self._loop is asyncio.get_running_loop():
                await self._queue.put(None)
                await self._task
        finally:
            self._task, self._closing = None, False

    # ------------------------------------------------------------------ worker side
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        carry = None  # a request that did not fit into the previous batch
        stop = False
        while not stop:
            job = carry if carry is not None else await self._queue.get()
            carry = None
            if job is None:
                break
            jobs, n_rows = [job], len(job[0])
            deadline = loop.time() + self.max_wait
            while n_rows < self.max_batch:
                try:  # what is already queued joins at once; otherwise wait until the deadline
                    nxt = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if nxt is None:
                    stop = True
                    break
                if n_rows + len(nxt[0]) > self.max_batch:
                    carry = nxt
                    break
                jobs.append(nxt)
                n_rows += len(nxt[0])
            await self._process(loop, jobs, n_rows)
        # drain: anything still queued behind the stop marker (a request that raced with close) is answered
        while carry is not None or not self._queue.empty():
            job = carry if carry is not None else self._queue.get_nowait()
            carry = None
            if job is not None:
                await self._process(loop, [job], len(job[0]))

    async def _process(self, loop, jobs: list, n_rows: int) -> None:
        rows = [row for job_rows, _ in jobs for row in job_rows]
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self.executor, self.fn, rows)
            if len(results) != len(rows):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(rows)} rows")
        except Exception as exc:  # every waiting request gets the error (the app turns it into a response)
            for _, future in jobs:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self.batches += 1
        if self.on_batch is not None:
            self.on_batch(n_rows, len(jobs), time.perf_counter() - started)
        start = 0
        for job_rows, future in jobs:
            if not future.done():  # a client that went away cancelled its future
                future.set_result(list(results[start:start + len(job_rows)]))
            start += len(job_rows)
