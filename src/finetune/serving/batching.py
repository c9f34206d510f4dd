"""Requests that arrive within a small window share one model call, up to a number of texts.

``workers`` threads run the model, each on a batch of its own (serve.model_workers, 1 by default: PyTorch and
ONNX Runtime already use every core inside one call, and on 2 cores two single-threaded workers measured slower,
their Python parts contending for the GIL with the event loop; docs/benchmarks.md). A batch is collected only
once a worker is free: while all of them run, new requests queue, and the next batch takes them at once. With a
window of 0 every request is a model call of its own (batching off: the baseline the benchmark compares
against).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Predict = Callable[[list[str]], np.ndarray]


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future = field(repr=False)


class Batcher:
    """``await submit(texts)`` -> probability rows for those texts. ``on_batch(n_texts)`` is told each call's
    size (the batch-size metric)."""

    def __init__(self, predict: Predict, max_batch_size: int, window_ms: float,
                 on_batch: Callable[[int], None] = lambda n: None, workers: int = 1):
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.window = window_ms / 1000.0
        self.on_batch = on_batch
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="finetune-model")
        self.free_workers = asyncio.Semaphore(workers)
        self.running: set[asyncio.Task] = set()  # batches being answered
        self.queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self.worker: asyncio.Task | None = None

    async def start(self) -> None:
        if self.window > 0:
            self.worker = asyncio.create_task(self._run())

    async def submit(self, texts: list[str]) -> np.ndarray:
        if self.worker is None:  # batching off: one model call per request, in arrival order
            return await self._call(texts)
        pending = _Pending(list(texts), asyncio.get_running_loop().create_future())
        await self.queue.put(pending)
        return await pending.future

    async def stop(self) -> None:
        """Finish what is queued, then stop the worker and its thread."""
        if self.worker is not None:
            await self.queue.put(None)
            await self.worker
            self.worker = None
        if self.running:
            await asyncio.gather(*self.running, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def _call(self, texts: list[str]) -> np.ndarray:
        self.on_batch(len(texts))
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.predict, texts)

    async def _run(self) -> None:
        carry: _Pending | None = None
        while True:
            first = carry or await self.queue.get()
            carry = None
            if first is None:
                return
            await self.free_workers.acquire()  # collect only when a worker can take the batch at once
            batch, stop, carry = await self._collect(first)
            task = asyncio.create_task(self._answer(batch))
            self.running.add(task)
            task.add_done_callback(self._done)
            if stop:
                return

    def _done(self, task: asyncio.Task) -> None:
        self.running.discard(task)
        self.free_workers.release()

    async def _collect(self, first: _Pending) -> tuple[list[_Pending], bool, _Pending | None]:
        """``first`` and whatever arrives within the window, up to max_batch_size texts. Returns the batch,
        whether the stop marker came, and a request that did not fit (it starts the next batch)."""
        loop = asyncio.get_running_loop()
        batch, size, deadline = [first], len(first.texts), loop.time() + self.window
        while size < self.max_batch_size:
            try:  # queued requests are taken at once; only an empty queue waits for the window
                nxt = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
            if nxt is None:
                return batch, True, None
            if size + len(nxt.texts) > self.max_batch_size:
                return batch, False, nxt
            batch.append(nxt)
            size += len(nxt.texts)
        return batch, False, None

    async def _answer(self, batch: list[_Pending]) -> None:
        texts = [t for p in batch for t in p.texts]
        try:
            probs = await self._call(texts)
        except Exception as exc:  # every request of the batch gets the model's failure
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        start = 0
        for p in batch:
            if not p.future.done():  # a client that went away cancelled its future
                p.future.set_result(probs[start:start + len(p.texts)])
            start += len(p.texts)
