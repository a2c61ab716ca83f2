"""Dynamic batching for the decoder: the next batch is formed when the decoder is free, from everything waiting.

Serve's `@serve.batch` forms batches on a timer, also while an earlier batch still decodes; the formed
batches then queue for the decoder. Measured on the 2-core machine at 16 concurrent clients: 16 requests
waited on the replica while it decoded batches of 2.4 on average (docs/serving.md). Here one consumer takes
the waiting queries only when the previous decode has finished, so batches grow with the load, and the
wait for stragglers (`wait_s`) applies only to a batch that is not full.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Query = TypeVar("Query")
Answer = TypeVar("Answer")


class BatcherStopped(RuntimeError):
    """The batcher was stopped: the query was not (or not completely) decoded."""


class DecodeBatcher(Generic[Query, Answer]):
    """`await submit(query)` -> its answer from `run(batch)`, which answers a list of queries in order."""

    def __init__(self, run: Callable[[list[Query]], Awaitable[Sequence[Answer]]], max_batch_size: int,
                 wait_s: float) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[Query, asyncio.Future[Answer]]] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._taken: list[tuple[Query, asyncio.Future[Answer]]] = []  # out of the queue, not answered yet
        self._stopped = False

    def configure(self, max_batch_size: int, wait_s: float) -> None:
        """New limits, in force from the next batch."""
        self.max_batch_size, self.wait_s = max_batch_size, wait_s

    async def submit(self, query: Query) -> Answer:
        if self._stopped:
            raise BatcherStopped("the batcher was stopped")
        if self._consumer is None:  # on first use: the queue and the consumer belong to the serving event loop
            self._loop = asyncio.get_running_loop()
            self._queue = asyncio.Queue()
            self._consumer = self._loop.create_task(self._consume())
        assert self._queue is not None
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((query, future))
        return await future

    def stop(self) -> None:
        """End the consumer; every caller still waiting, and any later one, gets BatcherStopped.

        Safe from any thread: Serve runs a replica's destructor on its event loop, the garbage collector anywhere.
        """
        self._stopped = True
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits on it any more
                self._loop.call_soon_threadsafe(self._shut_down)

    def _shut_down(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
        waiting = self._taken
        while self._queue is not None and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        self._fail(waiting, BatcherStopped("the batcher was stopped before this query was answered"))

    @staticmethod
    def _fail(batch: list[tuple[Query, asyncio.Future[Answer]]], exc: BaseException) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)

    async def _next_batch(self) -> list[tuple[Query, asyncio.Future[Answer]]]:
        """The next batch, gathered in `self._taken` (so that stop() can fail it while it forms)."""
        assert self._queue is not None
        batch = self._taken = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        # A caller that gave up (its request timed out) needs no decode.
        batch[:] = [(q, f) for q, f in batch if not f.done()]
        return batch

    async def _consume(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                answers = await self._run([q for q, _ in batch])
                if len(answers) != len(batch):  # no caller may get an answer that could be another's
                    raise RuntimeError(f"the decode answered {len(answers)} of {len(batch)} queries")
                for (_, future), answer in zip(batch, answers, strict=True):
                    if not future.done():
                        future.set_result(answer)
            except Exception as exc:  # every caller of the batch gets the error (the API answers 500)
                self._fail(batch, exc)
            self._taken = []
