"""Compile time of the tuning rounds a MiniLM warm-up runs: one config after another, on threads, in processes.

Most of a GPU worker's cold start is Triton compiling and timing the tile configs it autotunes. Its autotuner
compiles each config when it first times it; a GPU warm-up's first pass (``kernels.compile_only``) compiles
every round's configs at once instead, on ``MAAS_COMPILE_THREADS`` workers: threads, or worker processes
(``MAAS_COMPILE_WORKERS``, :mod:`kernels._compile_workers`). First, how much of a compile holds the GIL (what
caps threads): a pure-Python counting thread runs alone, then beside compiles, and what it loses is what they
held (an upper bound on a machine with few CPUs, where it also loses CPU time to them). Then this script
compiles MiniLM's tuning rounds at its warm-up's largest bucket (32 of its 256-token warm-up texts: the four
GEMM epilogues at 8,192 rows on the tiled kernel, the three of them past 2 G multiply-adds also on the TMA
kernel, and attention at sequence 256, head dim 32, bf16) one config after another and on each count of
workers given, threads and processes, each time with an empty Triton cache, for sm_90 through
:func:`kernels.offline.compile_for`: no GPU is needed, and on a GPU machine it measures that machine's CPUs,
which are what compile. Then, on the most threads given, the tiled GEMM rounds of MiniLM's short-text warm-up
(batches 1 to 64 of 16-token texts), each round precompiled on its own as ``PrecompilingAutotuner`` does,
smallest batch first and largest first (``models.loaded.warmup_batch_sizes``): the largest bucket's round
holds every config the smaller ones keep, so largest first compiles them in one parallel round per GEMM
instead of a few at a time. Last, the MNIST MLP's warm-up (batches 1 to 8,192): how many binaries its GEMM
rounds make, one per config and GEMM when no batch-dependent argument is specialized on.

Usage: ``python bench/compile.py [--threads 1 2 4 ...] [--workers threads processes] [--output FILE.json]``
(default: 1 and every CPU, threads and processes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)  # real compiles (the kernels below are defined after this)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from kernels._autotune import (  # noqa: E402
    COMPILE_THREADS_ENV,
    COMPILE_WORKERS_ENV,
    PrecompilingAutotuner,
    compile_only,
    usable_cpus,
)
from kernels.attention import GPU_CONFIGS as ATTENTION_CONFIGS  # noqa: E402
from kernels.attention import _attention_kernel as _attention_tuner  # noqa: E402
from kernels.attention import _prune_configs as prune_attention  # noqa: E402
from kernels.linear import _GPU_CONFIGS, _TMA_CONFIGS, TMA_MIN_MACS, _prune_configs, _prune_tma_configs  # noqa: E402
from kernels.linear import _linear_kernel as _linear_tuner  # noqa: E402
from kernels.linear import _linear_tma_kernel as _linear_tma_tuner  # noqa: E402
from kernels.offline import compile_for, compiled_kernels  # noqa: E402


def _jit(kernel):
    """The JIT function itself: on a GPU machine the kernels module wraps it in its autotuner."""
    return kernel.fn if isinstance(kernel, Autotuner) else kernel


_linear_kernel, _linear_tma_kernel = _jit(_linear_tuner), _jit(_linear_tma_tuner)
_attention_kernel = _jit(_attention_tuner)
BF16 = torch.bfloat16
ROWS, HIDDEN, HEADS, SEQ = 8192, 384, 12, 256
WARMUP_BUCKETS = [16 << i for i in range(7)]  # rows of MiniLM's warm-up GEMMs: batches 1..64 of 16 tokens
# MiniLM's GEMMs: (N, K, activation, residual) of the attention input and output projections and the MLP.
GEMMS = [(3 * HIDDEN, HIDDEN, "none", False), (HIDDEN, HIDDEN, "none", True), (4 * HIDDEN, HIDDEN, "gelu", False),
         (HIDDEN, 4 * HIDDEN, "none", True)]


# The MNIST MLP's GEMMs (784 -> 128 -> 10) and its warm-up's batch buckets: rows of 1 to 8,192.
MLP_GEMMS = [(128, 784, "relu", False), (10, 128, "none", False)]
MLP_BUCKETS = [1 << i for i in range(14)]


def gemm_rounds(rows: int, gemms: list[tuple] = GEMMS) -> list[tuple]:
    """(kernel, configs, positional args, keyword args) of the GEMM tuning rounds at ``rows`` rows, configs
    pruned as the tuner prunes them."""
    out = []
    for n, k, activation, residual in gemms:
        x, w, b, y = (torch.empty(rows, k, dtype=BF16), torch.empty(n, k, dtype=BF16), torch.empty(n, dtype=BF16),
                      torch.empty(rows, n, dtype=BF16))
        args = (x, w, None, None, b, y if residual else None, y, rows, n, k, triton.next_power_of_2(rows))
        kwargs = {"HAS_SCALE": False, "HAS_X_SCALE": False, "HAS_BIAS": True, "HAS_RESIDUAL": residual,
                  "ACTIVATION": activation, "UPCAST": False}
        named = dict(zip(_linear_kernel.arg_names, args, strict=False))
        out.append((_linear_kernel, _prune_configs(_GPU_CONFIGS, named), args, kwargs))
    return out


def tma_rounds(rows: int, gemms: list[tuple] = GEMMS) -> list[tuple]:
    """The TMA GEMM's tuning rounds at ``rows`` rows, for the GEMMs large enough to time it (``TMA_MIN_MACS``)."""
    out = []
    for n, k, activation, residual in gemms:
        if rows * n * k < TMA_MIN_MACS:
            continue
        x, w, b, y = (torch.empty(rows, k, dtype=BF16), torch.empty(n, k, dtype=BF16), torch.empty(n, dtype=BF16),
                      torch.empty(rows, n, dtype=BF16))
        x_desc, w_desc = TensorDescriptor.from_tensor(x, [1, 1]), TensorDescriptor.from_tensor(w, [1, 1])
        args = (x_desc, w_desc, b, y if residual else None, y, rows, n, k, triton.next_power_of_2(rows))
        kwargs = {"HAS_BIAS": True, "HAS_RESIDUAL": residual, "ACTIVATION": activation, "UPCAST": False,
                  "NUM_PROGRAMS": 132}
        named = dict(zip(_linear_tma_kernel.arg_names, args, strict=False))
        out.append((_linear_tma_kernel, _prune_tma_configs(_TMA_CONFIGS, named), args, kwargs))
    return out


def rounds() -> list[tuple]:
    """The GEMM rounds (tiled, and TMA where timed) at ``ROWS`` rows and attention's round at ``SEQ`` tokens."""
    batch = ROWS // SEQ
    q = torch.empty(batch, HEADS, SEQ, HIDDEN // HEADS, dtype=BF16)
    lengths = torch.full((batch,), SEQ, dtype=torch.int32)  # the transformer's key padding
    args = (q, q, q, lengths, q, HEADS, SEQ, SEQ, 0.25, SEQ, SEQ, 1024, *q.stride()[:3], *q.stride()[:3],
            *q.stride()[:3], *q.stride()[:3])
    kwargs = {"HAS_MASK": False, "HAS_LENGTHS": True, "HEAD_DIM": HIDDEN // HEADS, "UPCAST": False}
    named = dict(zip(_attention_kernel.arg_names, args, strict=False))
    configs = prune_attention(ATTENTION_CONFIGS, named, **kwargs)
    return [*gemm_rounds(ROWS), *tma_rounds(ROWS), (_attention_kernel, configs, args, kwargs)]


def _fresh_caches(threads: int) -> None:
    for kernel in (_linear_kernel, _linear_tma_kernel, _attention_kernel):
        kernel.device_caches.clear()
    os.environ[COMPILE_THREADS_ENV] = str(threads)


def _compile_one_by_one(kernel, configs: list, args: tuple, kwargs: dict) -> None:
    """What timing does without a precompile: each config compiles on its first launch."""
    for config in configs:
        if config.pre_hook:  # TMA tile shapes, part of the compiled signature
            config.pre_hook({**dict(zip(kernel.arg_names, args, strict=False)), **config.all_kwargs()})
        kernel.warmup(*args, grid=None, **kwargs, **config.all_kwargs())


def compile_all(threads: int, workers: str = "threads") -> float:
    """Seconds to compile every round into an empty cache: one by one (1 thread), or all rounds at once on
    ``threads`` threads or processes, as a GPU warm-up's compile-only pass does (``kernels.compile_only``)."""
    _fresh_caches(threads)
    os.environ[COMPILE_WORKERS_ENV] = workers
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        start = time.perf_counter()
        if threads == 1:
            for kernel, configs, args, kwargs in rounds():
                _compile_one_by_one(kernel, configs, args, kwargs)
        else:
            with compile_only(threads) as done:
                for kernel, configs, args, kwargs in rounds():
                    PrecompilingAutotuner(kernel, kernel.arg_names, configs, [], None, None)._compile(configs, args,
                                                                                                     kwargs)
            if done.workers != workers:
                raise RuntimeError(f"compiled on {done.workers}, not {workers} (see the log)")
        return time.perf_counter() - start


def gil_share(configs: int = 6) -> tuple[float, float]:
    """The share of its time a compile holds the GIL, and how much a busy Python thread slows it: a thread
    counting in pure Python runs alone, then beside ``configs`` compiles one after another on this thread, with
    the interpreter switching threads every 50 us (so that the counter gets the GIL whenever the compiles let
    go: what it loses is what they held), then at Python's default 5 ms (the slowdown: a compile thread that
    lets go of the GIL waits up to that long to get it back)."""
    def count(stop: threading.Event, counted: list[int]) -> None:
        n = 0
        while not stop.is_set():
            for _ in range(10_000):
                n += 1
        counted.append(n)

    kernel, round_configs, args, kwargs = rounds()[0]
    chosen = round_configs[:configs]

    def compile_seconds(configs: list, counting: bool = False) -> tuple[float, float]:
        """Seconds to compile ``configs`` into an empty cache, and the counter's rate meanwhile (if counting)."""
        _fresh_caches(1)
        stop, counted = threading.Event(), []
        counter = threading.Thread(target=count, args=(stop, counted))
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TRITON_CACHE_DIR"] = cache
            if counting:
                counter.start()
            start = time.perf_counter()
            _compile_one_by_one(kernel, configs, args, kwargs) if configs else time.sleep(2)
            seconds = time.perf_counter() - start
        if counting:
            stop.set()
            counter.join()
        return seconds, counted[0] / seconds if counting else 0.0

    compile_seconds(chosen[:1])  # the process's first compile loads what later ones reuse: not timed
    alone, _ = compile_seconds(chosen)
    default = sys.getswitchinterval()
    sys.setswitchinterval(50e-6)
    try:
        _, idle_rate = compile_seconds([], counting=True)
        _, busy_rate = compile_seconds(chosen, counting=True)
    finally:
        sys.setswitchinterval(default)
    beside, _ = compile_seconds(chosen, counting=True)
    return 1 - busy_rate / idle_rate, beside / alone


def compile_warmup(buckets: list[int], threads: int, gemms: list[tuple] = GEMMS) -> tuple[float, int]:
    """Seconds to precompile the GEMM rounds of a warm-up visiting ``buckets`` (rows) in that order, into an
    empty cache, and the binaries it made: each round compiles the configs its bucket keeps that no earlier
    round compiled (for the same specialization of the arguments)."""
    _fresh_caches(threads)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        start = time.perf_counter()
        for rows in buckets:
            for kernel, configs, args, kwargs in gemm_rounds(rows, gemms):
                PrecompilingAutotuner(kernel, kernel.arg_names, configs, [], None, None).precompile(configs, args,
                                                                                                      kwargs)
        seconds = time.perf_counter() - start
    return seconds, compiled_kernels(_linear_kernel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, usable_cpus()}))
    parser.add_argument("--workers", nargs="+", choices=["threads", "processes"], default=["threads", "processes"],
                        help="what compiles the rounds at once where there is more than one worker")
    parser.add_argument("--output", default=None, help="write the results as JSON here (after every step)")
    args = parser.parse_args()
    configs = sum(len(r[1]) for r in rounds())
    print(f"{configs} configs in {len(rounds())} tuning rounds, sm_90, on {usable_cpus()} CPUs "
          f"({platform.processor() or platform.machine()}), triton {triton.__version__}")
    threads = max(args.threads)
    found = {"cpus": usable_cpus(), "triton": triton.__version__, "configs": configs, "results": [],
             "warmup_order_threads": threads, "warmup_order_s": {}}

    def save() -> None:  # a time limit may stop the run after any step
        if args.output:
            Path(args.output).write_text(json.dumps(found, indent=2))

    results = found["results"]
    with compile_for(90):
        share, slowdown = gil_share()
        found["gil"] = {"share": share, "slowdown_beside_busy_thread": slowdown}
        print(f"a compile holds the GIL {share:.0%} of its time; beside a busy Python thread it takes {slowdown:.2f}x "
              f"as long (threads switching every {sys.getswitchinterval() * 1e3:g} ms)", flush=True)
        for n in args.threads:
            for workers in args.workers if n > 1 else ["threads"]:
                results.append({"threads": n, "workers": workers, "seconds": compile_all(n, workers)})
                print(f"  {n} {workers if n > 1 else 'thread'}: {results[-1]['seconds']:.2f} s", flush=True)
                save()
    one = statistics.median(r["seconds"] for r in results if r["threads"] == 1) if 1 in args.threads else None
    print(f"{'workers':>8} {'kind':>10} {'median s':>9} {'x one thread':>13}")
    for n, workers in dict.fromkeys((r["threads"], r["workers"]) for r in results):
        seconds = statistics.median(r["seconds"] for r in results if (r["threads"], r["workers"]) == (n, workers))
        print(f"{n:>8} {workers:>10} {seconds:>9.2f} {f'{one / seconds:.2f}' if one else '-':>13}")
    if threads > 1:
        print(f"\nMiniLM's warm-up (16-token texts, batches 1..64: {WARMUP_BUCKETS[0]}..{WARMUP_BUCKETS[-1]} rows), "
              f"its GEMM rounds precompiled on {threads} threads, by the order of the batches:")
        with compile_for(90):
            for name, buckets in (("smallest first", WARMUP_BUCKETS), ("largest first", WARMUP_BUCKETS[::-1])):
                found["warmup_order_s"][name], _ = compile_warmup(buckets, threads)
                print(f"  {name}: {found['warmup_order_s'][name]:.2f} s", flush=True)
                save()
    print(f"\nThe MNIST MLP's warm-up (batches 1..{MLP_BUCKETS[-1]}, largest first), its two GEMMs' rounds precompiled "
          f"on {threads} thread(s):")
    with compile_for(90):
        mlp_s, mlp_binaries = compile_warmup(MLP_BUCKETS[::-1], threads, MLP_GEMMS)
    print(f"  {mlp_binaries} binaries in {mlp_s:.2f} s", flush=True)
    found["mlp_warmup"] = {"seconds": mlp_s, "binaries": mlp_binaries}
    save()


if __name__ == "__main__":
    main()
