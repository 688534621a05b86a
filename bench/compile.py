"""Compile time of the tuning rounds a MiniLM warm-up runs, one config after another vs on a thread pool.

A GPU worker's cold start is mostly Triton compiling the tile configs it autotunes. Triton's autotuner compiles
each config when it first times it; ``kernels._autotune.PrecompilingAutotuner`` compiles a round's configs on
``MAAS_COMPILE_THREADS`` threads first. This script compiles MiniLM's tuning rounds at a large bucket (the
four GEMM epilogues at 8,192 rows, and attention at sequence 128, head dim 32, bf16) both ways, each time with
an empty Triton cache, for sm_90 through :func:`kernels.offline.compile_for`: no GPU is needed, and on a GPU
machine it measures that machine's CPUs, which are what compile.

Usage: ``python bench/compile.py [--threads 1 2 4 ...] [--output FILE.json]`` (default: 1 and every CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)  # real compiles (the kernels below are defined after this)

import torch  # noqa: E402
import triton  # noqa: E402

from kernels._autotune import COMPILE_THREADS_ENV, PrecompilingAutotuner, usable_cpus  # noqa: E402
from kernels.attention import GPU_CONFIGS as ATTENTION_CONFIGS  # noqa: E402
from kernels.attention import _attention_kernel  # noqa: E402
from kernels.attention import _prune_configs as prune_attention  # noqa: E402
from kernels.linear import _GPU_CONFIGS, _linear_kernel, _prune_configs  # noqa: E402
from kernels.offline import compile_for  # noqa: E402

BF16 = torch.bfloat16
ROWS, HIDDEN, HEADS, SEQ = 8192, 384, 12, 128
# MiniLM's GEMMs: (N, K, activation, residual) of the attention input and output projections and the MLP.
GEMMS = [(3 * HIDDEN, HIDDEN, "none", False), (HIDDEN, HIDDEN, "none", True), (4 * HIDDEN, HIDDEN, "gelu", False),
         (HIDDEN, 4 * HIDDEN, "none", True)]


def rounds() -> list[tuple]:
    """(kernel, configs, positional args, keyword args) of each tuning round, configs pruned as the tuner does."""
    out = []
    for n, k, activation, residual in GEMMS:
        x, w, b, y = (torch.empty(ROWS, k, dtype=BF16), torch.empty(n, k, dtype=BF16), torch.empty(n, dtype=BF16),
                      torch.empty(ROWS, n, dtype=BF16))
        args = (x, w, None, None, b, y if residual else None, y, ROWS, n, k, ROWS)
        kwargs = {"HAS_SCALE": False, "HAS_X_SCALE": False, "HAS_BIAS": True, "HAS_RESIDUAL": residual,
                  "ACTIVATION": activation, "UPCAST": False}
        named = dict(zip(_linear_kernel.arg_names, args, strict=False))
        out.append((_linear_kernel, _prune_configs(_GPU_CONFIGS, named), args, kwargs))
    batch = ROWS // SEQ
    q = torch.empty(batch, HEADS, SEQ, HIDDEN // HEADS, dtype=BF16)
    mask = torch.ones(batch, SEQ, dtype=torch.bool)
    args = (q, q, q, mask, q, HEADS, SEQ, SEQ, 0.25, SEQ, SEQ, 1024, *q.stride()[:3], *q.stride()[:3],
            *q.stride()[:3], *q.stride()[:3])
    kwargs = {"HAS_MASK": True, "HEAD_DIM": HIDDEN // HEADS, "UPCAST": False}
    named = dict(zip(_attention_kernel.arg_names, args, strict=False))
    configs = prune_attention(ATTENTION_CONFIGS, named, **kwargs)
    out.append((_attention_kernel, configs, args, kwargs))
    return out


def compile_all(threads: int) -> float:
    """Seconds to compile every round into an empty cache: one by one (1 thread) or precompiled per round."""
    for kernel in (_linear_kernel, _attention_kernel):
        kernel.device_caches.clear()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        os.environ[COMPILE_THREADS_ENV] = str(threads)
        start = time.perf_counter()
        for kernel, configs, args, kwargs in rounds():
            if threads == 1:  # what timing does: each config compiles on its first launch
                for config in configs:
                    kernel.warmup(*args, grid=None, **kwargs, **config.all_kwargs())
            else:
                tuner = PrecompilingAutotuner(kernel, kernel.arg_names, configs, [], None, None)
                tuner.precompile(configs, args, kwargs)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, usable_cpus()}))
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    configs = sum(len(r[1]) for r in rounds())
    print(f"{configs} configs in {len(GEMMS) + 1} tuning rounds, sm_90, on {usable_cpus()} CPUs "
          f"({platform.processor() or platform.machine()}), triton {triton.__version__}")
    results = []
    with compile_for(90):
        for threads in args.threads:
            results.append({"threads": threads, "seconds": compile_all(threads)})
            print(f"  {threads} thread(s): {results[-1]['seconds']:.2f} s", flush=True)
    medians = {t: statistics.median(r["seconds"] for r in results if r["threads"] == t) for t in args.threads}
    print(f"{'threads':>8} {'median s':>9} {'x one thread':>13}")
    for threads, seconds in medians.items():
        ratio = f"{medians[1] / seconds:.2f}" if 1 in medians else "-"
        print(f"{threads:>8} {seconds:>9.2f} {ratio:>13}")
    if args.output:
        Path(args.output).write_text(json.dumps({"cpus": usable_cpus(), "triton": triton.__version__,
                                                 "configs": configs, "results": results}, indent=2))


if __name__ == "__main__":
    main()
