"""Compiling Triton kernels in worker processes, for a GPU warm-up's compile-only pass.

Triton's compiler holds the GIL for part of every compile (its Python front end, the glue between MLIR passes):
``bench/compile.py`` measures how much. Threads therefore cannot compile a cold start's hundreds of binaries on
all of a GPU machine's CPUs, and whatever they compile slows the event loop serving the other models. PyTorch
Inductor compiles its Triton kernels in worker processes for the same reasons. Yet on an H100 machine's 16 CPUs
MiniLM's empty-cache warm-up compiled its 54 binaries in 22.5 s in 15 workers, each importing torch first, and
in 12.4 s on 15 threads (``bench/results/gpu``, run 12): threads are the default, and workers
(``MAAS_COMPILE_WORKERS=processes``) the choice where the GIL must stay with an event loop serving other models.

What a compile needs fits in a string: Triton hands its ``jit_cache_hook`` the launch's ``specialization_data``
(JSON: signature, constants, options, cache key), and ``JITFunction.preload`` turns it back into the same
compile. A worker (``python -m kernels._compile_workers``, reading one job a line) imports the kernel's module,
compiles for the calling process's target on :func:`kernels.offline.compile_for`'s stand-in driver (workers see
no GPU), and files the binary in the shared ``TRITON_CACHE_DIR`` under the key the caller would have used; the
caller's thread then loads it from there, in milliseconds. A binary already in the cache goes to no worker,
and the workers start on the first that is not: a warm cache starts nothing. A compile that fails in a worker,
or whose kernel a worker cannot import, is left to the caller's thread, which compiles it itself.

Workers are plain subprocesses, not ``multiprocessing`` ones: those re-run the caller's main script on start
(a script without an ``if __name__ == "__main__"`` guard would load its models again in every worker) and
need ``/dev/shm``, which AWS Lambda lacks.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
from concurrent.futures import Executor

import triton
from triton.runtime import driver
from triton.runtime._async_compile import AsyncCompileMode
from triton.runtime.jit import JITFunction

from kernels._triton_cache import in_cache, jit_function

try:
    from triton._C.libtriton import get_cache_invalidating_env_vars
except ImportError:  # pragma: no cover - a Triton without it keys nothing on the environment
    def get_cache_invalidating_env_vars() -> dict[str, str]:
        return {}

log = logging.getLogger(__name__)

_launch = threading.local()  # the specialization of the launch being compiled on this thread (see submit)


class WorkerCompileMode(AsyncCompileMode):
    """Triton's ``AsyncCompileMode`` (compiles on ``executor``'s threads, each binary filed in its function's
    cache), where a binary missing from the Triton cache first compiles in one of up to ``processes`` worker
    processes, the thread then loading it from the cache (binaries for CUDA: others compile on the threads).

    Triton calls its ``jit_cache_hook`` and then this mode's ``submit`` for each compile of a launch; the hook,
    installed while the mode is active, notes the launch's specialization for ``submit``. :meth:`close`
    stops the processes."""

    def __init__(self, executor: Executor, processes: int):
        super().__init__(executor, ignore_errors=True)  # a config that fails compiles (and fails) when timed
        self.workers = CompileWorkers(processes)
        self._previous_hook = None

    @property
    def in_processes(self) -> int:
        """Binaries compiled in the worker processes so far."""
        return self.workers.compiled

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
        target = driver.active.get_current_target()  # the launching thread's: the GPU it compiles for
        if (key in self.future_kernels or pending is None or target.backend != "cuda" or self.workers.broken
                or in_cache(key, pending[0])):
            return super().submit(key, compile_fn, finalize_fn)
        fn, specialization = pending

        def compile_in_worker_then_load():
            self.workers.compile(fn, specialization, target.arch, target.warp_size)
            return compile_fn()  # from the cache; compiles here if the worker failed

        return super().submit(key, compile_in_worker_then_load, finalize_fn)

    def close(self) -> None:
        failed = self.workers.close()
        if failed:
            log.warning("%d kernel binaries failed to compile in worker processes and compiled on threads "
                        "(first: %s)", len(failed), failed[0])


class CompileWorkers:
    """Up to ``processes`` worker processes, started as compiles need them; :meth:`compile` blocks its thread
    until a worker has compiled (or failed), so as many threads as processes keep them all busy. A worker that
    dies is replaced; past ``processes`` deaths, or when one cannot start, the pool is ``broken`` and the
    callers compile on their threads."""

    def __init__(self, processes: int):
        self.processes = processes
        self.broken = False
        self.compiled = 0
        self.failed: list[str] = []
        self._idle: queue.SimpleQueue[subprocess.Popen] = queue.SimpleQueue()
        self._started: list[subprocess.Popen] = []
        self._deaths = 0
        self._lock = threading.Lock()

    def compile(self, fn: JITFunction, specialization: str, arch: int, warp_size: int) -> None:
        """``fn`` compiled in a worker as ``specialization`` (Triton's ``specialization_data``) says, for CUDA
        compute capability ``arch``; a failure is only recorded (the caller compiles it)."""
        worker = self._worker()
        if worker is None:  # the pool broke (and said so): the caller compiles
            return
        job = {"module": fn.fn.__module__, "qualname": fn.fn.__qualname__, "specialization": specialization,
               "arch": arch, "warp_size": warp_size,
               "environment": {**get_cache_invalidating_env_vars(), "TRITON_CACHE_DIR": triton.knobs.cache.dir}}
        try:
            worker.stdin.write(json.dumps(job) + "\n")
            worker.stdin.flush()
            answer = json.loads(worker.stdout.readline() or '{"error": "the worker process exited"}')
        except (OSError, ValueError) as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        with self._lock:
            if "error" in answer:
                self.failed.append(f"{fn}: {answer['error']}")
            else:
                self.compiled += 1
        if worker.poll() is None:
            self._idle.put(worker)
            return
        with self._lock:  # died: a new one may take its place, unless they keep dying
            self._started.remove(worker)
            self._deaths += 1
            self.broken = self.broken or self._deaths > self.processes

    def _worker(self) -> subprocess.Popen | None:
        """An idle worker, a new one while fewer than ``processes`` run, else the next to finish its job."""
        while not self.broken:
            with self._lock:
                if self._idle.empty() and len(self._started) < self.processes:
                    try:
                        self._started.append(_start_worker())
                    except OSError as exc:
                        self.broken = True
                        log.warning("compile worker processes failed to start (%s: %s); compiling on threads",
                                    type(exc).__name__, exc)
                        return None
                    return self._started[-1]
            try:
                return self._idle.get(timeout=1.0)
            except queue.Empty:
                continue  # all busy, or one died: look again
        return None

    def close(self) -> list[str]:
        """Stop the workers (each exits at the end of its input); the compiles they failed."""
        with self._lock:
            started, self._started = self._started, []
        for worker in started:
            try:
                worker.stdin.close()
                worker.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                worker.kill()
        return self.failed


def _start_worker() -> subprocess.Popen:
    """A worker process: this Python, this ``sys.path``, no GPU, no interpreter mode."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join(p for p in sys.path if p), CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen([sys.executable, "-m", "kernels._compile_workers"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, text=True, bufsize=1)


def serve(jobs, answers) -> None:
    """A worker's loop: one JSON job a line from ``jobs``, one JSON answer a line to ``answers``."""
    from kernels.offline import compile_for

    for line in jobs:
        try:
            job = json.loads(line)
            os.environ.update(job["environment"])  # the caller's cache and cache-key environment
            with compile_for(job["arch"], job["warp_size"]):
                jit_function(job["module"], job["qualname"]).preload(job["specialization"])
            answer = {"ok": True}
        except Exception as exc:  # the caller compiles it instead, and reports it
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    # Answers go to the real stdout; anything else printing there (a library) goes to stderr instead.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin, answers)
