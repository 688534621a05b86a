"""Compiling Triton kernels in worker processes, for a GPU warm-up's compile-only pass.

Triton's compiler holds the GIL for part of every compile (its Python front end, the glue between MLIR passes):
``bench/compile.py`` measures how much. Threads therefore cannot compile a cold start's hundreds of binaries on
all of a GPU machine's CPUs, and whatever they compile slows the event loop serving the other models. PyTorch
Inductor compiles its Triton kernels in a pool of processes for the same reasons.

What a compile needs fits in a string: Triton hands its ``jit_cache_hook`` the launch's ``specialization_data``
(JSON: signature, constants, options, cache key), and ``JITFunction.preload`` turns it back into the same
compile. A worker imports the kernel's module, compiles for the calling process's target on
:func:`kernels.offline.compile_for`'s stand-in driver (workers never touch the GPU), and files the binary in the
shared ``TRITON_CACHE_DIR`` under the key the caller would have used; the caller's thread then loads it from
there, in milliseconds. A binary already in the cache goes to no worker, and the workers start on the first
that is not: a warm cache spawns nothing. A compile that fails in a worker, or whose kernel a worker cannot
import, is left to the caller's thread, which compiles it itself.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import multiprocessing
import os
import threading
from concurrent.futures import Executor, Future, ProcessPoolExecutor, wait

import triton
from triton.runtime import driver
from triton.runtime._async_compile import AsyncCompileMode
from triton.runtime.cache import get_cache_manager
from triton.runtime.jit import JITFunction

try:
    from triton._C.libtriton import get_cache_invalidating_env_vars
except ImportError:  # pragma: no cover - a Triton without it keys nothing on the environment
    def get_cache_invalidating_env_vars() -> dict[str, str]:
        return {}

log = logging.getLogger(__name__)

_launch = threading.local()  # the specialization of the launch being compiled on this thread (see hand_over)


class WorkerCompileMode(AsyncCompileMode):
    """Triton's ``AsyncCompileMode`` (compiles on ``executor``'s threads, each binary filed in its function's
    cache), where a binary missing from the Triton cache first compiles in one of up to ``processes`` worker
    processes, the thread then loading it from the cache (binaries for CUDA: others compile on the threads).

    Triton calls its ``jit_cache_hook`` and then this mode's ``submit`` for each compile of a launch; the hook,
    installed while the mode is active, notes the launch's specialization for ``submit``. :meth:`close`
    stops the processes."""

    def __init__(self, executor: Executor, processes: int):
        super().__init__(executor, ignore_errors=True)  # a config that fails compiles (and fails) when timed
        self.processes = processes
        self.in_processes = 0  # binaries handed to the processes
        self.failed: list[str] = []  # compiles the processes failed, compiled by the caller's threads instead
        self._pool: ProcessPoolExecutor | None = None
        self._pool_failed = False
        self._previous_hook = None

    def __enter__(self) -> WorkerCompileMode:
        super().__enter__()
        self._previous_hook = triton.knobs.runtime.jit_cache_hook
        triton.knobs.runtime.jit_cache_hook = self._note_launch
        return self

    def __exit__(self, *exc) -> None:
        try:
            super().__exit__(*exc)  # waits for every compile
        finally:
            triton.knobs.runtime.jit_cache_hook = self._previous_hook

    def _note_launch(self, **launch) -> bool | None:
        _launch.pending = launch["fn"].jit_function, launch["compile"]["specialization_data"]
        return self._previous_hook(**launch) if self._previous_hook else None

    def submit(self, key, compile_fn, finalize_fn):
        pending, _launch.pending = getattr(_launch, "pending", None), None
        if key in self.future_kernels or pending is None or in_cache(key, pending[0]):
            return super().submit(key, compile_fn, finalize_fn)
        compiled = self._hand_over(*pending)
        if compiled is None:
            return super().submit(key, compile_fn, finalize_fn)
        self.in_processes += 1

        def load_or_compile():
            wait([compiled])
            if compiled.exception() is not None:  # compiled here instead
                self.failed.append(f"{pending[0]}: {type(compiled.exception()).__name__}: {compiled.exception()}")
            return compile_fn()

        return super().submit(key, load_or_compile, finalize_fn)

    def _hand_over(self, fn: JITFunction, specialization: str) -> Future | None:
        """``fn``'s compile submitted to the processes (started on the first call), or None for a target other
        than CUDA or where they could not start (no ``/dev/shm``, as in AWS Lambda) or broke (a worker killed):
        the caller's threads compile."""
        target = driver.active.get_current_target()  # the launching thread's: the GPU it compiles for
        if self._pool_failed or target.backend != "cuda":
            return None
        environment = {**get_cache_invalidating_env_vars(), "TRITON_CACHE_DIR": triton.knobs.cache.dir}
        try:
            if self._pool is None:  # spawned, not forked: the caller may hold a CUDA context and threads
                self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))
            return self._pool.submit(_compile, fn.fn.__module__, fn.fn.__qualname__, specialization,
                                     target.arch, target.warp_size, environment)
        except Exception as exc:
            self._pool_failed = True
            log.warning("compile worker processes failed (%s: %s); compiling on threads", type(exc).__name__, exc)
            return None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self.failed:
            log.warning("%d of %d kernel binaries failed to compile in worker processes and compiled on threads "
                        "(first: %s)", len(self.failed), self.in_processes, self.failed[0])


def in_cache(key: str, fn: JITFunction) -> bool:
    """Whether ``triton.compile`` would find the binary of cache key ``key`` (what Triton's ``AsyncCompileMode``
    is handed) in the Triton cache: the lookup it makes before compiling."""
    manager = get_cache_manager(hashlib.sha256(key.encode("utf-8")).hexdigest())
    return manager.get_group(f"{fn.__name__[:150]}.json") is not None


def _compile(module: str, qualname: str, specialization: str, arch: int, warp_size: int,
             environment: dict[str, str]) -> None:
    """In a worker: one compile, into the cache the caller reads (its directory and the environment variables
    that are part of Triton's cache keys are the caller's)."""
    from kernels.offline import compile_for

    os.environ.update(environment)
    with compile_for(arch, warp_size):
        jit_function(module, qualname).preload(specialization)


def jit_function(module: str, qualname: str) -> JITFunction:
    """The JIT function defined as ``module.qualname``, unwrapped from its autotuner or heuristics."""
    found = importlib.import_module(module)
    for name in qualname.split("."):
        found = getattr(found, name)
    while not isinstance(found, JITFunction):
        if not hasattr(found, "fn"):
            raise LookupError(f"{module}.{qualname} is not a Triton JIT function")
        found = found.fn
    return found
