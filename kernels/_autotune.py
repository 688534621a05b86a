"""Tile-config autotuning on the GPU: Triton's autotuner, made cheaper for a worker's cold start.

A model's warm-up tunes every GEMM, attention and embedding-pool launch once per power-of-two bucket of its
batch. Triton's autotuner then compiles each candidate config when it first times it, one after another: on an
H200, MiniLM's first call took 32.5 s with an empty Triton cache and 6.6-7.7 s with a warm one. Five things
here shorten that:

- :func:`within_bucket` drops tiles taller than the bucket before anything is compiled or timed;
- :class:`PrecompilingAutotuner` compiles a tuning round's remaining configs on a thread pool before timing
  them (``MAAS_COMPILE_THREADS``): Triton's compiler spends most of its time outside the GIL (MLIR passes,
  ``ptxas`` in a subprocess), so a round's few compiles overlap;
- :func:`compile_only` runs a warm-up's batches once without running anything, so that every binary they
  need (each autotuned launch's whole round, or its pick where timings are on disk; each fixed kernel)
  compiles on one pool at once, where the rounds would compile one after another, each waiting for its
  slowest config (on an H100, on threads, this took MiniLM's empty-cache cold start from 32.6 to 30.3 s: most
  of the compiling was already overlapped). From 8 workers the pool is of processes
  (:mod:`kernels._compile_workers`): a compile holds the GIL for part of its time, which caps what threads
  overlap;
- timings are kept on disk beside the compiled kernels (``TRITON_CACHE_DIR``, Triton >= 3.4), those of the
  TMA GEMM's configs included, and so are choices timed outside an autotuner (:class:`StoredChoices`), so a
  restarted worker skips both compiling and timing;
- a tuning table of the GPU model (:mod:`kernels._tuning_table`, exported by :func:`tuning_table` from a
  warm-up on that model) hands a key with no timings on disk its pick: only the picks compile, nothing is
  timed.

A model that has finished its warm-up serves :func:`tuned_shapes_only`: a bucket the warm-up did not visit
borrows the config of the nearest tuned one instead of tuning while a request waits (on an H100, 64 texts of
200 tokens after MiniLM's short-text warm-up waited 7.05 s for it on an empty cache).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from kernels._triton_cache import cached_binaries
from kernels._tuning_table import config_text, key_text, shipped_choice, shipped_config
from kernels.dispatch import USE_AUTOTUNE, env_choice
from kernels.precompile import Binary, recorded_binaries

try:  # Triton >= 3.4
    from triton.runtime._async_compile import AsyncCompileMode
except ImportError:  # pragma: no cover - older Triton: configs compile one by one as they are timed
    AsyncCompileMode = None

log = logging.getLogger(__name__)

_AUTOTUNE_PARAMETERS = inspect.signature(triton.autotune).parameters
_CACHE_TUNING = {"cache_results": True} if "cache_results" in _AUTOTUNE_PARAMETERS else {}

AUTOTUNE_TIMING_ENV = "MAAS_AUTOTUNE_TIMING"
COMPILE_THREADS_ENV = "MAAS_COMPILE_THREADS"
COMPILE_WORKERS_ENV = "MAAS_COMPILE_WORKERS"
# Threads by default: on an H100 machine's 16 CPUs MiniLM's empty-cache warm-up compiled its 54 binaries in
# 12.4 s on 15 threads and in 22.5 s in 15 worker processes (each imports torch before its first compile), though
# a compile holds the GIL 24% of its time there (bench/results/gpu, run 12). Processes keep the GIL free for an
# event loop serving other models meanwhile.
COMPILE_WORKERS_CHOICES = ("threads", "processes")
UNSEEN_SHAPES_ENV = "MAAS_AUTOTUNE_UNSEEN"
UNSEEN_SHAPES_CHOICES = ("borrow", "tune")

_serving = threading.local()
_compiling = threading.local()


@dataclass
class Borrowed:
    """How many tunings the launches inside one :func:`tuned_shapes_only` block borrowed."""

    count: int = 0


@contextmanager
def tuned_shapes_only() -> Iterator[Borrowed]:
    """Launches on this thread (a model's batches once it is warm) tune no new bucket: with
    ``MAAS_AUTOTUNE_UNSEEN=borrow`` (the default) a kernel meeting a bucket it has neither tuned nor found on disk
    runs the config of the nearest bucket it has tuned (:func:`nearest_key`), where tuning would compile and
    time a round of configs, seconds, while the batch waits; ``tune`` keeps Triton's tune-on-first-sight.
    The block's :class:`Borrowed` counts what it borrowed (the serving metrics report it per model).

    Thread-local, because a process may warm one model (which must tune) while serving another. The price is
    a config tuned for another size for the rest of the process; a config's ``warmup_inputs`` are how to have
    shapes that matter tuned instead."""
    outer_active, outer = getattr(_serving, "active", False), getattr(_serving, "borrowed", None)
    _serving.active, _serving.borrowed = True, Borrowed()
    try:
        yield _serving.borrowed
    finally:
        inner = _serving.borrowed
        _serving.active, _serving.borrowed = outer_active, outer
        if outer is not None:
            outer.count += inner.count


def note_borrowed() -> None:
    """Count one borrowed tuning in the enclosing :func:`tuned_shapes_only` block."""
    borrowed = getattr(_serving, "borrowed", None)
    if borrowed is not None:
        borrowed.count += 1


def borrowing() -> bool:
    """Whether a launch on this thread borrows instead of tuning (see :func:`tuned_shapes_only`)."""
    if not getattr(_serving, "active", False):
        return False
    return env_choice(UNSEEN_SHAPES_ENV, "borrow", UNSEEN_SHAPES_CHOICES) == "borrow"


def compiling_only() -> bool:
    """Whether launches on this thread compile and run nothing (see :func:`compile_only`)."""
    return getattr(_compiling, "pool", None) is not None


@dataclass
class CompilePass:
    """What a :func:`compile_only` block did: whether it compiled on a pool, on which ``workers``
    (``processes`` or ``threads``), and once it has ended, how many binaries it compiled or loaded from the
    Triton cache, how many it ``compiled`` (CUDA binaries new in the cache: 0 where a persistent or precompiled
    cache held them all), how many of those in worker processes, in how many seconds (the block's whole time)."""

    parallel: bool = False
    workers: str = ""
    binaries: int = 0
    compiled: int = 0
    in_processes: int = 0
    seconds: float = 0.0


@contextmanager
def compile_only(threads: int | None = None) -> Iterator[CompilePass]:
    """Within the block, this thread's kernel launches compile on a pool of ``threads`` workers (default: as for
    a tuning round, :func:`compile_threads`) and run nothing. An autotuned launch compiles its key's tuned config
    (in memory or on disk) or else its whole tuning round, and times nothing; :class:`TimedChoice` launches its
    known choice or else every candidate, and keeps nothing. The block ends once all have compiled. What the
    launches would have written is left as it was: the batches run here only to say which binaries they need,
    and run again afterwards. Yields a :class:`CompilePass`, not ``parallel`` with one worker or before Triton
    3.4: then the block does nothing, and launches run as usual.

    For CUDA, with ``MAAS_COMPILE_WORKERS=processes`` (:func:`compile_workers`; default threads), a binary
    missing from the Triton cache compiles in a worker process before a thread loads it
    (:mod:`kernels._compile_workers`)."""
    threads = threads or compile_threads(1 << 10)
    done = CompilePass()
    if threads < 2 or AsyncCompileMode is None or compiling_only():
        yield done
        return
    _hook_launches()
    done.parallel, start, cached = True, time.perf_counter(), cached_binaries()
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="triton-compile") as pool:
            mode = _compile_mode(pool, threads)
            done.workers = "threads" if type(mode) is AsyncCompileMode else "processes"
            try:
                with mode:
                    _compiling.pool = pool
                    try:
                        yield done
                    finally:
                        _compiling.pool = None
            finally:
                done.binaries, done.in_processes = len(mode.raw_futures), getattr(mode, "in_processes", 0)
                if done.workers == "processes":
                    mode.close()
    finally:
        done.seconds = time.perf_counter() - start
        done.compiled = len(cached_binaries() - cached)


def _compile_mode(pool: ThreadPoolExecutor, processes: int):
    """Triton's ``AsyncCompileMode`` on ``pool``; where :func:`compile_workers` says processes, the one that
    compiles a CUDA binary missing from the cache in one of ``processes`` worker processes first."""
    if compile_workers() == "processes":
        from kernels._compile_workers import WorkerCompileMode

        return WorkerCompileMode(pool, processes)
    return AsyncCompileMode(pool, ignore_errors=True)  # a config that fails compiles (and fails) when timed


def _hook_launches() -> None:
    """Make every ``kernel[grid](...)`` launch a compile-only warm-up while :func:`compiling_only` (this thread
    only: other threads keep launching). Installed once; Triton's ``JITFunction.run`` is what launches call."""
    if getattr(JITFunction.run, "_maas_compile_only", False):
        return
    launch = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        return launch(self, *args, grid=grid, warmup=warmup or compiling_only(), **kwargs)

    run._maas_compile_only = True
    JITFunction.run = run


def nearest_key(key: tuple, known: Iterable[tuple], buckets: Sequence[int]) -> tuple | None:
    """The key of ``known`` equal to ``key`` except at the positions ``buckets`` (powers of two: rows, lengths)
    and nearest to it there, in the sum of the buckets' log2 distances; a tie goes to the smaller buckets, whose
    tiles never exceed the problem's. None when no key matches outside the buckets.

    Any tuned config is correct for any bucket (tiles mask what lies past the problem); only its speed was
    measured at another size (``bench/models.py --gpu-cold-start`` times a long request both ways)."""
    def fixed(k: tuple) -> tuple:
        return tuple(v for i, v in enumerate(k) if i not in buckets)

    def log2(v) -> float:
        return math.log2(max(v, 1))

    same = [k for k in known if len(k) == len(key) and fixed(k) == fixed(key)]
    if not same or not buckets:
        return None
    return min(same, key=lambda k: (sum(abs(log2(k[i]) - log2(key[i])) for i in buckets),
                                    sum(log2(k[i]) for i in buckets)))


def within_bucket(configs: list[triton.Config], block: str, bucket: int) -> list[triton.Config]:
    """The configs whose ``block`` tile is no taller than ``bucket`` (the smallest tiles when all are taller).

    Rows of a tile past the problem are computed and thrown away, so a taller tile only adds work that a
    shorter one of the list avoids. On an H200 every pick measured for M of 1 to 24,576 obeyed this rule
    (``bench/results/gpu``), and it leaves a bucket of 16 rows three GEMM configs to compile and time
    instead of fourteen (smaller buckets: those three twice, rows wrapped and masked, see ``kernels.linear``).
    """
    floor = min(c.kwargs[block] for c in configs)
    return [c for c in configs if c.kwargs[block] <= max(bucket, floor)]


def usable_cpus() -> int:
    """CPUs this process may run on (a container's cpuset, not the whole host)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def compile_threads(configs: int) -> int:
    """Threads compiling one tuning round's configs: ``MAAS_COMPILE_THREADS`` (``auto``: all usable CPUs but
    one, left to the event loop, which may be serving other models meanwhile; ``1``: none, each config compiles
    when first timed), never more than there are configs."""
    choice = os.environ.get(COMPILE_THREADS_ENV, "auto").strip().lower() or "auto"
    if choice == "auto":
        threads = max(1, usable_cpus() - 1)
    elif choice.isascii() and choice.isdigit() and int(choice) >= 1:
        threads = int(choice)
    else:
        raise ValueError(f"{COMPILE_THREADS_ENV}={choice!r}: expected auto or a whole number >= 1")
    return min(threads, configs)


def compile_workers() -> str:
    """What compiles a warm-up's compile-only pass: ``threads`` (the default) or ``processes``, as
    ``MAAS_COMPILE_WORKERS`` says."""
    return env_choice(COMPILE_WORKERS_ENV, "threads", COMPILE_WORKERS_CHOICES)


class PrecompilingAutotuner(Autotuner):
    """Triton's autotuner, compiling a tuning round's configs on a thread pool before it times the first.

    It hooks the two steps of ``Autotuner.run`` that happen only when a key is new and its timings are not on
    disk: ``prune_configs`` names the round's configs, the first ``_bench`` compiles them all (Triton's
    ``AsyncCompileMode`` runs each ``JITFunction.warmup``'s compile in the pool and files the kernels in the
    function's own cache, where the timing launches find them). A config that fails to compile is left to the
    sequential path, which raises its error as before (the autotuner times it as infinitely slow).
    """

    _round: list[triton.Config] | None = None
    #: positions in the tuning key of the bucket arguments (``autotune(buckets=...)``), for borrowing
    bucket_positions: tuple[int, ...] = ()
    _borrowed: frozenset[tuple] = frozenset()  # keys that borrowed: they lend nothing on

    def prune_configs(self, kwargs: dict) -> list[triton.Config]:
        configs = super().prune_configs(kwargs)
        self._round = configs
        return configs

    def run(self, *args, **kwargs):
        if not compiling_only():
            return super().run(*args, **kwargs)
        # Compile what a real launch would: the tuned config of a known key or of timings on disk (a warm
        # TRITON_CACHE_DIR: loading every config's binary there would only slow a restart), else the whole round.
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        try:
            if len(self.configs) == 1:
                configs = self.configs
            else:
                key = self._tuning_key(kwargs)
                configs = super().prune_configs(kwargs)
                if key not in self.cache and getattr(self, "cache_results", False):
                    with contextlib.suppress(_NotOnDisk):  # found: the pick is filed in the cache
                        self._disk_or_bench(key, configs, _raise_not_on_disk)
                shipped = shipped_config(self.base_fn.__name__, key, configs) if key not in self.cache else None
                if shipped is not None:
                    configs = [shipped]
                elif key in self.cache:
                    configs = [self.cache[key]]
            self._compile(configs, args, kwargs)
        finally:
            self.nargs = None

    def _tuning_key(self, kwargs: dict) -> tuple:
        """The key ``Autotuner.run`` files a launch's timings under."""
        named = {k: v for k, v in {**self.nargs, **kwargs}.items() if k in self.arg_names}
        key = [named[k] for k in self.keys if k in named]
        return (*key, *(str(v.dtype) for v in named.values() if hasattr(v, "dtype")))

    def _bench(self, *args, config: triton.Config, **meta):
        if self._round:
            configs, self._round = self._round, None
            self.precompile(configs, args, meta)
        return super()._bench(*args, config=config, **meta)

    def check_disk_cache(self, tuning_key, configs: list[triton.Config], bench_fn) -> bool:
        """Where Triton looks for a new key's timings on disk before timing its round (``bench_fn``): without
        them, a key takes the pick of the GPU model's tuning table (:mod:`kernels._tuning_table`), and while
        :func:`borrowing`, the config of the nearest tuned key; in both cases nothing is compiled, timed or
        written to disk but the config itself."""
        try:
            return self._disk_or_bench(tuning_key, configs, lambda: self._untimed_or(tuning_key, configs, bench_fn))
        except _Untimed:
            return True  # what Triton's `run` takes for "found": no tuning report

    def _untimed_or(self, tuning_key, configs: list[triton.Config], bench_fn) -> None:
        """A key with no timings on disk: file the table's pick or a borrowed config and raise :class:`_Untimed`
        (Triton then writes no timings), else time the round."""
        shipped = shipped_config(self.base_fn.__name__, tuning_key, configs)
        lender = None
        if shipped is None and borrowing():
            tuned = [k for k in list(self.cache) if k not in self._borrowed]
            lender = nearest_key(tuning_key, tuned, self.bucket_positions)
        if shipped is None and lender is None:
            bench_fn()
            return
        self._round = None
        if shipped is not None:
            self.cache[tuning_key] = shipped
        else:
            self._borrowed |= {tuning_key}
            self.cache[tuning_key] = self.cache[lender]
            note_borrowed()
            log.info("%s: bucket %s not tuned while serving: it runs the config tuned for %s (%s)",
                     self.base_fn.__name__, tuning_key, lender, self.cache[lender])
        raise _Untimed

    def _disk_or_bench(self, tuning_key, configs: list[triton.Config], bench_fn) -> bool:
        """Triton's timings on disk, also for configs with a ``pre_hook`` (the TMA GEMM's), which Triton does
        not store as it cannot serialize the hook: it is handed copies without their hooks, and the config it
        picks gets its hook back."""
        hooked = {_without_hook(c): c for c in configs if c.pre_hook}
        if not hooked:
            return super().check_disk_cache(tuning_key, configs, bench_fn)

        def bench_then_unhook():
            bench_fn()
            self.configs_timings = {_without_hook(c): t for c, t in self.configs_timings.items()}

        found = super().check_disk_cache(tuning_key, [_without_hook(c) for c in configs], bench_then_unhook)
        if tuning_key in self.cache:
            self.cache[tuning_key] = hooked.get(self.cache[tuning_key], self.cache[tuning_key])
        return found

    def precompile(self, configs: list[triton.Config], args: tuple, meta: dict) -> None:
        """Compile ``configs`` for the launch ``(args, meta)`` in parallel; returns when all are done."""
        threads = compile_threads(len(configs))
        if threads < 2 or AsyncCompileMode is None:
            return
        try:
            with ThreadPoolExecutor(threads, thread_name_prefix="triton-compile") as pool, \
                    AsyncCompileMode(pool, ignore_errors=True):
                self._compile(configs, args, meta)
        except Exception as exc:  # an optimisation only: timing compiles whatever is missing
            log.warning("precompiling %s's configs failed (%s: %s); they compile one by one",
                        self.base_fn.__name__, type(exc).__name__, exc)

    def _compile(self, configs: list[triton.Config], args: tuple, meta: dict) -> None:
        """Start compiling ``configs`` for the launch ``(args, meta)`` on the active ``AsyncCompileMode``."""
        names = dict(zip(self.arg_names, args, strict=False))
        launch = {k: v for k, v in meta.items() if k not in ("grid", "warmup")}  # the kernel's own arguments
        for config in configs:
            current = {**launch, **config.all_kwargs()}
            if config.pre_hook:  # e.g. TMA tile shapes, part of the compiled signature
                config.pre_hook({**names, **current})
            self.fn.warmup(*args, grid=None, **current)


class StoredChoices:
    """Choices timed once per shape outside an autotuner (``kernels.linear``: which of its GEMM kernels), kept
    as names in ``<TRITON_CACHE_DIR>/<name>.json`` so that a restarted worker does not time them again.
    Keys are the caller's strings (naming the GPU model and the Triton version makes them safe to share). A
    missing or unreadable file reads as empty; writes merge with what is there and replace the file at once."""

    def __init__(self, name: str):
        self.name = name

    def _path(self) -> Path:
        return Path(triton.knobs.cache.dir) / f"{self.name}.json"

    def _read(self) -> dict[str, str]:
        try:
            stored = json.loads(self._path().read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in stored.items() if isinstance(v, str)} if isinstance(stored, dict) else {}

    def get(self, key: str) -> str | None:
        return self._read().get(key)

    def put(self, key: str, value: str) -> None:
        path = self._path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{self.name}.", delete=False) as f:
                json.dump({**self._read(), key: value}, f)
            os.replace(f.name, path)
        except OSError as exc:  # a read-only cache only costs the next worker a timing
            log.warning("could not store %s in %s: %s", key, path, exc)


class TimedChoice:
    """Which of several launchers runs a problem, where none wins everywhere (``kernels.linear``'s GEMM kernels;
    fused or separate ops): each candidate is timed once per key, replayed from CUDA graphs as serving runs it
    (:func:`gpu_ms`), and the fastest kept, in memory and on disk (:class:`StoredChoices`, for the next worker
    on the same ``TRITON_CACHE_DIR``). While :func:`borrowing`, a key not timed yet takes the choice of the
    nearest key differing only at ``bucket_at`` (a power-of-two size) if that candidate may run it, else the
    first candidate (the one that runs everything); a borrowed choice lends nothing on. Undecided inside a
    CUDA-graph capture (no timing there; warm-ups decide first), the first candidate runs."""

    def __init__(self, name: str, bucket_at: int):
        self.name = name
        self.bucket_at = bucket_at
        self.fastest: dict[tuple, str] = {}
        self.borrowed: set[tuple] = set()
        self._stored = StoredChoices(name)
        _CHOICES.add(self)

    def choose(self, key: tuple, stored_key: str, candidates: Sequence[str], time: Callable[[str], float]) -> str:
        """The choice for ``key`` among ``candidates``; ``time(candidate)`` gives its milliseconds when timing is
        needed. ``stored_key``: the key on disk (naming the GPU model and the Triton version)."""
        chosen = self.fastest.get(key)
        if chosen not in candidates:
            chosen = self._stored.get(stored_key)
        if chosen not in candidates:
            chosen = shipped_choice(self.name, stored_key)
        if compiling_only():  # the known choice compiles, else every candidate; nothing is timed or kept
            for name in [chosen] if chosen in candidates else candidates:
                time(name)
            return chosen if chosen in candidates else candidates[0]
        if chosen not in candidates and borrowing():
            chosen = self.borrow(key, candidates)
        if chosen not in candidates:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                return candidates[0]
            ms = {name: time(name) for name in candidates}
            chosen = min(ms, key=ms.get)
            log.debug("%s %s: %s (graph ms: %s)", self.name, key, chosen, ms)
            self._stored.put(stored_key, chosen)
        self.fastest[key] = chosen
        return chosen

    def borrow(self, key: tuple, candidates: Sequence[str]) -> str:
        """Without timing: the nearest timed key's choice if it is a candidate here, else the first candidate."""
        lender = nearest_key(key, [k for k in list(self.fastest) if k not in self.borrowed], [self.bucket_at])
        chosen = self.fastest[lender] if lender is not None and self.fastest[lender] in candidates else candidates[0]
        self.borrowed.add(key)
        note_borrowed()
        log.info("%s %s: not timed while serving: %s (chosen for %s)", self.name, key, chosen, lender)
        return chosen


def stored_key(key: tuple) -> str:
    """A choice's key on disk: the GPU model and the Triton version in place of the device."""
    device, *shape = key
    return "|".join(map(str, (torch.cuda.get_device_name(device), triton.__version__, *shape)))


def gpu_ms(launch: Callable[[], object]) -> float:
    """GPU milliseconds of ``launch`` replayed from a CUDA graph, as serving runs it: on an H200 a host-side
    TMA descriptor costs the launching thread more than the tiled GEMM's launch (tens of microseconds), which
    timing eager launches would count against a kernel that is faster on the GPU."""
    from triton.testing import do_bench, do_bench_cudagraph

    launch()  # autotune (and compile) outside the capture
    if compiling_only():
        return 0.0
    try:
        return do_bench_cudagraph(launch, rep=20)
    except RuntimeError as exc:  # a driver that cannot capture here: time eager launches instead
        log.warning("CUDA-graph timing failed (%s); timing eager launches", exc)
        return do_bench(launch, warmup=5, rep=20)


class _NotOnDisk(Exception):
    """Raised in place of timing a round: it leaves Triton's ``check_disk_cache`` before it writes timings."""


class _Untimed(Exception):
    """Raised once a key without timings on disk has a config that needed none (a table's pick, a borrowed one):
    it leaves Triton's ``check_disk_cache`` before it writes timings."""


def _raise_not_on_disk() -> None:
    raise _NotOnDisk


def _without_hook(config: triton.Config) -> triton.Config:
    return triton.Config(**{**config.__dict__, "pre_hook": None})


def _quick_timing(kernel_call, quantiles):
    """Triton's eager timing (L2 flushed before each launch) on a fifth of its budget: 5 ms of warm-up and 20 ms
    of launches a config instead of 25 and 100. A warm-up tunes hundreds of (config, bucket) pairs: MiniLM's
    (batches 1 to 64) times 268 GEMM configs after pruning, by arithmetic some 30 s at Triton's budget and 7 s
    at this one. The pick is the median launch: 20 ms still gives a 10 us kernel about 200 launches (each after
    a 256 MB L2 flush) and a 1 ms one 18. torch.compile's own benchmarker stops at 25 ms a config
    (``max_benchmark_duration`` in ``torch._inductor.runtime.benchmarking``)."""
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def _graph_timing(kernel_call, quantiles):
    """A config's GPU time replayed from a CUDA graph, as serving runs kernels: ten replays of a graph of
    about 20 ms of launches. Triton's default times eager launches, where a microsecond kernel's launch cost
    hides its differences."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(kernel_call, rep=20, quantiles=quantiles)


_TIMINGS = {"full": None, "quick": _quick_timing, "graph": _graph_timing}


def _timing_options() -> dict:
    """``MAAS_AUTOTUNE_TIMING`` (read when ``kernels`` is imported): ``quick`` (default, :func:`_quick_timing`),
    ``full`` (Triton's own eager timing, 25 + 100 ms a config) or ``graph`` (:func:`_graph_timing`)."""
    timing = _TIMINGS[env_choice(AUTOTUNE_TIMING_ENV, "quick", tuple(_TIMINGS))]
    return {"do_bench": timing} if timing and "do_bench" in _AUTOTUNE_PARAMETERS else {}


def autotune(configs: list[triton.Config], key: list[str], prune_configs_by: dict | None = None,
             buckets: Sequence[str] = ()):
    """``triton.autotune`` with :class:`PrecompilingAutotuner` on a GPU; a no-op under the interpreter, where
    launchers pass a fixed config. ``buckets``: the arguments of ``key`` that round a size up to a power of two
    (what a bucket the warm-up missed may borrow across, see :func:`tuned_shapes_only`)."""
    if not USE_AUTOTUNE:
        return lambda fn: fn

    def wrap(fn) -> PrecompilingAutotuner:
        tuner = PrecompilingAutotuner(fn, fn.arg_names, configs, key, reset_to_zero=None, restore_value=None,
                                      prune_configs_by=prune_configs_by, **_CACHE_TUNING, **_timing_options())
        tuner.bucket_positions = bucket_positions(key, buckets)
        _TUNERS.add(tuner)
        return tuner

    return wrap


_TUNERS: weakref.WeakSet[PrecompilingAutotuner] = weakref.WeakSet()  # every kernel's autotuner (autotune)
_CHOICES: weakref.WeakSet[TimedChoice] = weakref.WeakSet()


def tuning_table(device_name: str) -> dict:
    """What this process has tuned, as a tuning table for the GPU model ``device_name``
    (:mod:`kernels._tuning_table`): every autotuner's picks but those it borrowed, every timed choice kept in
    ``TRITON_CACHE_DIR`` for that model, and the binaries a worker reading the table compiles
    (:func:`needed_binaries`; recorded since :func:`kernels.precompile.record_binaries`, none otherwise)."""
    autotuners: dict[str, dict[str, str]] = {}
    picked: dict[Callable, list[triton.Config]] = {}  # by the kernel's Python function (Triton's base_fn)
    for tuner in list(_TUNERS):
        kept = [(k, c) for k, c in list(tuner.cache.items()) if k not in tuner._borrowed]
        if kept:
            autotuners.setdefault(tuner.base_fn.__name__, {}).update({key_text(k): config_text(c) for k, c in kept})
        picked.setdefault(tuner.base_fn, []).extend(c for _, c in kept)
    choices = {}
    for choice in list(_CHOICES):
        stored = {k: v for k, v in choice._stored._read().items() if k.startswith(f"{device_name}|")}
        if stored:
            choices.setdefault(choice.name, {}).update(stored)
    return {"device": device_name, "triton": triton.__version__,
            "autotuners": {name: dict(sorted(picks.items())) for name, picks in sorted(autotuners.items())},
            "choices": {name: dict(sorted(kept.items())) for name, kept in sorted(choices.items())},
            "binaries": [b.to_json() for b in needed_binaries(recorded_binaries(), picked)]}


def needed_binaries(binaries: Iterable[Binary], picked: dict[Callable, list[triton.Config]]) -> list[Binary]:
    """Of ``binaries``, those a worker given the picks ``picked`` (each autotuned kernel's picked configs, by its
    Python function) may compile: every binary of a kernel no autotuner tunes, and of an autotuned kernel those
    of a picked config.
    The configs a tuning round timed and passed over are left out: such a worker never compiles them. (A config
    picked at one key keeps its binaries at every key, and a kernel a timed choice passed over keeps its picks:
    a few more than needed.)"""
    return [b for b in binaries if b.fn.fn not in picked or any(b.compiled_with(c) for c in picked[b.fn.fn])]


def write_tuning_table(path: str | Path) -> dict:
    """What this process has tuned on its CUDA device (:func:`tuning_table`), written to ``path`` as JSON."""
    table = tuning_table(torch.cuda.get_device_name())
    Path(path).write_text(json.dumps(table, indent=1))
    return table


def bucket_positions(key: Sequence[str], buckets: Sequence[str]) -> tuple[int, ...]:
    """Where the ``buckets`` arguments sit in an autotuner's tuning key (its ``key`` arguments in order, then
    dtypes): all must be key arguments."""
    missing = [name for name in buckets if name not in key]
    if missing:
        raise ValueError(f"buckets {missing} are not autotune key arguments {list(key)}")
    return tuple(i for i, name in enumerate(key) if name in buckets)
