"""Process-wide knobs of a serving process, applied once by its entry point (a `maas` command, a function).

On a CPU the model thread and the event loop share few cores. torch's intra-op threads then spin against
the busy event-loop thread, and every return from a torch op waits for the GIL for up to Python's switch
interval (5 ms by default) while the loop decodes: a batch that computes in 0.3 ms alone took ~20 ms.
Fewer torch threads and a shorter switch interval give the model thread its turn. torch is not imported for
this: a worker that serves numpy twins only (`models.numpy_models`) never imports it, and one that does
applies the thread count on its model thread once it has (`configure_torch_threads`). numpy's BLAS gets the
same count: OpenBLAS ran a batch-64 product on both cores of the 2-core machine and then kept its second
thread spinning for milliseconds after every call, the very core the event loop needed.

Python's cyclic garbage collector is the other hidden cost: a request allocates a few dozen containers,
so with the default threshold (700) a collection ran every ~20 requests, and every older-generation pass
rescanned the million objects torch's import leaves behind. Freezing what startup created and collecting
the young generation every 50,000 allocations took a worker from ~14,000 to ~22,000 trivial requests/s on
the 2-core machine. Requests rarely form cycles; reference counting frees them.
"""

from __future__ import annotations

import gc
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy  # noqa: F401 (loads numpy's BLAS library, which threadpoolctl then finds)
from threadpoolctl import threadpool_info, threadpool_limits

from pipeline.settings import Settings

_torch_threads: int | None = None  # None: leave torch alone (no configure_process); 0: its default less one
_torch_default: int | None = None  # torch's own default, read once, before it is changed
# numpy's BLAS threads (OpenBLAS: one per core), read at import, before configure_process changes them.
_BLAS_DEFAULT = max((pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"), default=0)


def configure_process(settings: Settings) -> None:
    global _torch_threads
    _torch_threads = settings.torch_threads
    configure_torch_threads()
    if _BLAS_DEFAULT:  # numpy's BLAS threads are process-wide: set here, once for every thread
        threadpool_limits(settings.torch_threads or max(1, _BLAS_DEFAULT - 1), user_api="blas")
    if settings.gil_switch_interval_us:
        sys.setswitchinterval(settings.gil_switch_interval_us / 1e6)
    if settings.gc_gen0_threshold:
        gc.collect()
        gc.freeze()  # modules, torch and the settings never become garbage: stop rescanning them
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(settings.gc_gen0_threshold, gen1, gen2)


def configure_torch_threads() -> None:
    """Apply the configured intra-op thread count to the calling thread, if torch is imported by now.

    It is a per-thread setting of torch's OpenMP pool: the model thread must apply it itself, or it ignores
    MAAS_TORCH_THREADS and its idle OpenMP workers spin against the event loop.
    """
    global _torch_default
    torch = sys.modules.get("torch")
    if _torch_threads is None or torch is None:
        return
    if _torch_default is None:
        _torch_default = torch.get_num_threads()
    # By default torch takes every core; one is left to the event loop, which is the other busy thread.
    wanted = _torch_threads or max(1, _torch_default - 1)
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


class DaemonThreadPool(ThreadPoolExecutor):
    """The event loop's default executor in a `maas` process (`asyncio.to_thread`): daemon threads, which
    neither the event loop's close nor the interpreter's exit waits for.

    Every S3 and SQS call runs in such a thread, and one cannot be interrupted: against an endpoint that does not
    answer (a network partition, a hung server) it waits for its read timeout (30 s), three times over. A source
    that stops abandons such calls at its deadline, but `asyncio.run` then joined the default executor's threads,
    and the interpreter joins a ThreadPoolExecutor's at exit: a `maas worker` whose stop() took 2 s exited two
    minutes after its SIGTERM, past any pod's grace period. What such a thread still does when the command returns
    was abandoned by it (its request is left to redelivery), so nothing waits for it. Like ThreadPoolExecutor, it
    starts a thread only when none is idle, up to `max_workers`. It is a ThreadPoolExecutor for
    `loop.set_default_executor`, which takes nothing else, and shares none of its workings.

    The engine's model thread is one too: a model that hangs is abandoned the same way, once the engine's stop has
    waited for it as long as it may (`join`).
    """

    def __init__(self, max_workers: int | None = None, thread_name_prefix: str = "maas-io") -> None:
        super().__init__(max_workers, thread_name_prefix)
        self._prefix = thread_name_prefix
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._daemons: list[threading.Thread] = []  # ThreadPoolExecutor's own stay empty
        self._lock = threading.Lock()
        self._shut_down = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            if self._shut_down:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: Future = Future()
            self._work.put((future, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and len(self._daemons) < self._max_workers:
                thread = threading.Thread(target=self._run, name=f"{self._prefix}_{len(self._daemons)}", daemon=True)
                thread.start()
                self._daemons.append(thread)
            return future

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            future, fn, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # the caller's, through its future
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                    del result
            del future, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; the idle threads end, and those still in a call end after it. Returns at once whatever
        `wait` says (see the class): what is still running was abandoned by the command."""
        with self._lock:
            self._shut_down = True
            if cancel_futures:
                while True:
                    try:
                        item = self._work.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            for _ in self._daemons:
                self._work.put(None)

    def join(self, timeout_s: float) -> bool:
        """After `shutdown`: wait up to `timeout_s` for the threads to end their calls under way; whether all did."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            threads = list(self._daemons)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)
