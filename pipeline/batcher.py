"""Dynamic batching per model, after aiokafka's producer accumulator.

`submit()` enqueues a request and returns a future. One background task per (model, version) closes a
batch when it holds `max_batch_size` rows or when the oldest request has waited `max_queue_delay_ms`,
whichever comes first, then hands it to the runner. While the runner computes, the next batch fills, so
under load batches close full without waiting. Queues are bounded: `submit()` waits when a model's queue
is full, which is the backpressure that reaches the sources.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from models.artifact import BatchingPolicy
from pipeline.errors import ErrorCode, InferenceError

log = logging.getLogger(__name__)

BatchKey = tuple[str, int]


@dataclass(order=True)
class Pending:
    """One queued request. Ordered by priority (higher first), then arrival."""

    sort_key: tuple[int, int]
    payload: Any = field(compare=False)
    rows: int = field(compare=False)
    future: asyncio.Future = field(compare=False)
    enqueued: float = field(compare=False, default_factory=time.monotonic)


BatchRunner = Callable[[BatchKey, list[Pending]], Awaitable[None]]


class DynamicBatcher:
    """`max_running` batches of one model may be handed to the runner at once, so the next batches already
    wait in the model's executor when the current one finishes: the model does not sit idle until a busy
    event loop (a fetch of 500 records is milliseconds of decoding) gets round to closing the next batch.
    Priority orders requests that are still queued; a batch handed to the runner keeps its place.

    A collector with nothing queued or running for `retire_after_s` ends, and its queue goes with it: the
    versions a long-lived worker has served, superseded ones included, do not each keep a task forever."""

    def __init__(self, runner: BatchRunner, max_queue: int = 1024, max_running: int = 8,
                 retire_after_s: float = 60.0) -> None:
        self._runner = runner
        self._max_queue = max_queue
        self._max_running = max_running
        self._retire_after_s = retire_after_s
        self._queues: dict[BatchKey, asyncio.PriorityQueue[Pending]] = {}
        self._tasks: dict[BatchKey, asyncio.Task] = {}
        self._seq = itertools.count()
        self._closed = False

    async def start(self) -> None:
        self._closed = False

    async def stop(self) -> None:
        """Cancel the collectors and fail whatever is still queued, so no caller waits forever."""
        self._closed = True
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for queue in self._queues.values():
            _settle([queue.get_nowait() for _ in range(queue.qsize())],
                    InferenceError(ErrorCode.UNAVAILABLE, "the engine is shutting down"))
        self._tasks.clear()
        self._queues.clear()

    @property
    def collecting(self) -> list[BatchKey]:
        """The (model, version) keys that have a collector now."""
        return list(self._tasks)

    async def submit(self, key: BatchKey, policy: BatchingPolicy, payload: Any, rows: int,
                     priority: int = 0) -> asyncio.Future:
        if self._closed:
            raise InferenceError(ErrorCode.UNAVAILABLE, "the engine is shutting down")
        future = asyncio.get_running_loop().create_future()
        pending = Pending((-priority, next(self._seq)), payload, rows, future)
        while True:
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = asyncio.PriorityQueue(self._max_queue)
                self._tasks[key] = asyncio.create_task(self._collect(key, queue, policy), name=f"batcher-{key}")
            await queue.put(pending)
            if self._queues.get(key) is queue:
                return future
            if self._closed:  # put after stop() drained the queue: no one reads it
                _settle([pending], InferenceError(ErrorCode.UNAVAILABLE, "the engine is shutting down"))
                return future
            # Its collector retired while this waited for room: no one reads that queue; take a new one.

    async def _collect(self, key: BatchKey, queue: asyncio.PriorityQueue[Pending], policy: BatchingPolicy) -> None:
        held: Pending | None = None
        batch: list[Pending] = []
        running: set[asyncio.Task] = set()
        room = asyncio.Semaphore(self._max_running)
        idle = asyncio.Event()  # no batch of this model is running
        idle.set()

        def finished(task: asyncio.Task) -> None:
            running.discard(task)
            room.release()
            if not running:
                idle.set()

        try:
            while True:
                await room.acquire()  # a batch closes only when it can run: until then it keeps filling
                if held is not None:  # held back for size: back in line, in its place, in case a request of
                    with contextlib.suppress(asyncio.QueueFull):  # higher priority came meanwhile
                        queue.put_nowait(held)
                        held = None
                first = held or await self._get_or_retire(key, queue, running)
                if first is None:
                    return
                held = None
                batch = [first]
                held = await self._fill(batch, queue, policy, idle if policy.close_when_idle else None)
                task = asyncio.create_task(self._run(key, batch), name=f"batch-{key}")
                running.add(task)
                idle.clear()
                task.add_done_callback(finished)
                batch = []
        except asyncio.CancelledError:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            _settle([*batch, *([held] if held else [])],
                    InferenceError(ErrorCode.UNAVAILABLE, "the engine stopped before the request ran"))
            raise

    async def _get_or_retire(self, key: BatchKey, queue: asyncio.PriorityQueue[Pending],
                             running: set[asyncio.Task]) -> Pending | None:
        """The next request; None once the collector has retired (nothing queued or running for a while)."""
        while True:
            try:
                async with asyncio.timeout(self._retire_after_s):
                    return await queue.get()
            except TimeoutError:
                if running or not queue.empty():
                    continue
                del self._queues[key], self._tasks[key]  # no await since the check: a submit sees it gone
                return None

    async def _run(self, key: BatchKey, batch: list[Pending]) -> None:
        try:
            await self._runner(key, batch)
        except asyncio.CancelledError:
            _settle(batch, InferenceError(ErrorCode.UNAVAILABLE, "the engine stopped before the request ran"))
            raise
        except Exception as exc:  # the runner should settle every future; this is the safety net
            log.exception("batch of %s failed", key)  # its message is for the log: callers get its type
            _settle(batch, InferenceError(ErrorCode.INTERNAL, f"batch failed ({type(exc).__name__}; the server's "
                                          "log has the details)"))

    @staticmethod
    async def _fill(batch: list[Pending], queue: asyncio.PriorityQueue[Pending], policy: BatchingPolicy,
                    idle: asyncio.Event | None) -> Pending | None:
        """Add queued requests to `batch` until it is full or its oldest request's delay is up (or, given
        `idle`, the model has nothing to run).

        Returns a request that did not fit, to start the next batch with.
        """
        loop = asyncio.get_running_loop()
        rows = batch[0].rows
        close_at = loop.time() + max(0.0, policy.max_queue_delay_ms / 1000.0 - (time.monotonic() - batch[0].enqueued))
        while rows < policy.max_batch_size:
            if queue.empty():
                if rows in policy.preferred_batch_sizes or (idle is not None and idle.is_set()):
                    return None
                remaining = close_at - loop.time()
                if remaining <= 0:
                    return None
                item = await _next(queue, remaining, idle)
                if item is None:
                    return None
            else:
                item = queue.get_nowait()
            if rows + item.rows > policy.max_batch_size:
                return item
            batch.append(item)
            rows += item.rows
        return None


async def _next(queue: asyncio.PriorityQueue[Pending], timeout: float, idle: asyncio.Event | None) -> Pending | None:
    """The next queued request, or None if `timeout` passes (or the model goes idle) first."""
    if idle is None:
        # Not wait_for: in Python 3.11 it returns an item that arrived in the tick its caller was cancelled and
        # drops the cancellation, and the collector would then outlive stop(). A cancelled get leaves the item.
        try:
            async with asyncio.timeout(timeout):
                return await queue.get()
        except TimeoutError:
            return None
    get = asyncio.ensure_future(queue.get())
    woken = asyncio.ensure_future(idle.wait())
    try:
        await asyncio.wait({get, woken}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        if get.done() and not get.cancelled():  # taken off the queue just now: answer it, do not drop it
            _settle([get.result()], InferenceError(ErrorCode.UNAVAILABLE, "the engine stopped before the "
                                                   "request ran"))
        raise
    finally:
        woken.cancel()
        if not get.done():
            get.cancel()  # a cancelled get leaves its item on the queue
    return get.result() if get.done() and not get.cancelled() else None


def _settle(batch: list[Pending], error: InferenceError) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)
