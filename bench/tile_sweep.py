"""Time many more tile configs than the kernels' own lists, on the shapes still short of their GPU targets.

GPU time comes in short leases: rather than adding tiles one guess per lease, one run of this script times a
wide grid of them where the issue's targets are not met yet (``bench/results/gpu/README.md``): ``linear`` bf16
with bias and ReLU at M 16 (N = K = 4,096) and M 512 (N 3,072 K 768; N = K = 4,096), each kernel that may run
it, and ``attention`` at sequence 128 and 512, head dim 64 and 128. Each row autotunes one kernel on one shape
twice through its own autotuner, first over its own config list and then over that list plus the grid, with
CUDA-graph timing (``MAAS_AUTOTUNE_TIMING=graph``), no tuning table and a Triton cache of its own; the
autotuner's pruning still drops tiles too big for shared memory, registers or the bucket, and compiles each
round's configs in parallel. It prints the torch baseline (eager, from a CUDA graph: the benchmark's ``x eager``
column), the best of the own list and of the grid with their ratios to it, and the grid's five best (``*``:
already in the own list). Split-K's times are its partial-sum kernel's alone, without the reduction that
follows (about a microsecond here): they rank its tiles, not it against the baseline. Results go to JSON after
every row.

Usage: ``python bench/tile_sweep.py [--only linear|attention] [--output FILE.json]``. Without a CUDA GPU it
says so and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BF16 = torch.bfloat16


def linear_grids() -> dict[str, list]:
    """The tiles each GEMM kernel is timed over on top of its own: thin ones (16 rows, 16-128 columns, K steps
    up to 512, 2-8 warps, 3-5 stages) and TMA ones of the wgmma minimum of 64 rows for 16 rows; split-K up to its
    scratch's ``MAX_SPLIT_K``; for 512 rows, 64-256 square-ish tiles on 4 or 8 warps, 3 or 4 stages."""
    from kernels.linear import MAX_SPLIT_K, _config, _set_tile_shapes, _split_config, _with_masked_rows

    thin = [_config(16, bn, bk, warps, stages, MASK_ROWS=False)
            for bn, bk, stages in itertools.product((16, 32, 64, 128), (64, 128, 256, 512), (3, 4, 5))
            for warps in ((2, 4) if bn <= 32 else (4, 8))]
    split = _with_masked_rows([_split_config(16, bn, bk, 4, stages, split) for bn, bk, stages, split
                               in itertools.product((32, 64, 128), (64, 128, 256), (3, 4), (2, 4, 8))
                               if split <= MAX_SPLIT_K])
    thin_tma = [_config(64, bn, bk, 4, stages, pre_hook=_set_tile_shapes)
                for bn, bk, stages in itertools.product((32, 64, 128), (64, 128, 256), (3, 4, 5))]
    wide = list(itertools.product((64, 128, 256), (64, 128, 256), (32, 64, 128), (4, 8), (3, 4)))
    return {"thin": thin, "split": split, "thin_tma": thin_tma,
            "wide": [_config(*tiles, MASK_ROWS=False) for tiles in wide],
            "wide_tma": [_config(*tiles, pre_hook=_set_tile_shapes) for tiles in wide]}


def attention_grid() -> list:
    """Query tiles of 64 or 128 rows, key tiles of 32-128, 4 or 8 warps, 2-5 stages."""
    from kernels.attention import _config

    return [_config(bm, bn, warps, stages)
            for bm, bn, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4, 5))]


def cases(dev: str = "cuda") -> list[tuple[str, str, object, list, Callable, Callable]]:
    """(op, shape, autotuner, grid, the kernel's launch, the torch baseline) of every row, on ``dev`` (the tests
    build them on ``meta``, where the baselines run too)."""
    import kernels
    from bench.kernels import _sdpa_flash  # the benchmark's baseline: SDPA on its flash backend
    from kernels.attention import _attention_kernel
    from kernels.linear import _linear_kernel, _linear_split_k_kernel, _linear_tma_kernel, launch_linear

    grids = linear_grids()
    found = []
    for m, n, k in ((16, 4096, 4096), (512, 3072, 768), (512, 4096, 4096)):
        x, w, b = torch.randn(m, k, device=dev, dtype=BF16), \
            torch.randn(n, k, device=dev, dtype=BF16) * k**-0.5, torch.randn(n, device=dev, dtype=BF16)
        kernels_here = ([("tiled", _linear_kernel, grids["thin"]), ("split_k", _linear_split_k_kernel, grids["split"]),
                         ("tma", _linear_tma_kernel, grids["thin_tma"])] if m == 16 else
                        [("tiled", _linear_kernel, grids["wide"]), ("tma", _linear_tma_kernel, grids["wide_tma"])])
        for name, tuner, grid in kernels_here:
            found.append((f"linear {name}", f"M{m} N{n} K{k} +bias relu", tuner, grid,
                          lambda x=x, w=w, b=b, name=name: launch_linear(x, w, None, b, "relu", None, None,
                                                                         kernel=name),
                          lambda x=x, w=w, b=b: torch.relu(F.linear(x, w, b))))
    for d in (64, 128):
        for s in (128, 512):
            bsz, h = 16384 // s, 2048 // d
            q, k, v = (torch.randn(bsz, h, s, d, device=dev, dtype=BF16) for _ in range(3))
            found.append(("attention", f"B{bsz} H{h} S{s} D{d}", _attention_kernel, attention_grid(),
                          lambda q=q, k=k, v=v: kernels.attention(q, k, v),
                          lambda q=q, k=k, v=v: _sdpa_flash(q, k, v)))
    return found


def tuned(tuner, configs: list, launch: Callable) -> dict[str, float]:
    """Microseconds each config of ``configs`` (as pruned, each once) took when ``tuner`` tuned ``launch``'s key
    over them; the tuner keeps its own configs and forgets the key afterwards."""
    from kernels._tuning_table import config_text

    own = tuner.configs
    tuner.configs, tuner.configs_timings = list({config_text(c): c for c in configs}.values()), {}
    tuner.cache.clear()
    try:
        launch()
        torch.cuda.synchronize()
        timings = tuner.configs_timings or {}
    finally:
        tuner.configs = own
        tuner.cache.clear()
    return {config_text(c): 1e3 * (t[0] if isinstance(t, list | tuple) else t) for c, t in timings.items()}


def save(path: Path, meta: dict, rows: list[dict]) -> None:
    """The rows so far: a run cut short by its time limit still leaves them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["linear", "attention"], help="only these rows")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "tile_sweep.json")
    opts = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/tile_sweep.py needs a CUDA GPU (none found): nothing to measure.")
        return 0
    # Read when kernels is imported: graph timing, no table's picks, no timings from an earlier run on disk.
    os.environ.update(MAAS_AUTOTUNE_TIMING="graph", MAAS_TUNING_TABLE="none",
                      TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="tile-sweep-"))
    import triton
    from triton.testing import do_bench_cudagraph

    torch.manual_seed(0)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    rows = []
    print(f"tile sweep on {meta['device']} (torch {meta['torch']}, Triton {meta['triton']}); us from CUDA graphs")
    for op, shape, tuner, grid, launch, baseline in cases():
        if opts.only and not op.startswith(opts.only):
            continue
        started = time.perf_counter()
        try:
            own = tuned(tuner, tuner.configs, launch)
            wide = tuned(tuner, [*tuner.configs, *grid], launch)
            base = 1e3 * do_bench_cudagraph(baseline, return_mode="median")
        except Exception as exc:  # one row's failure (a launch the GPU refuses) leaves the others to run
            print(f"\n{op} {shape}: FAILED, {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            rows.append({"op": op, "shape": shape, "error": f"{type(exc).__name__}: {exc}"[:1000]})
            save(opts.output, meta, rows)
            continue
        ranked = sorted(wide.items(), key=lambda item: item[1])
        rows.append({"op": op, "shape": shape, "baseline_us": base, "own_us": own, "grid_us": wide,
                     "seconds": time.perf_counter() - started})
        save(opts.output, meta, rows)
        best_own = min(own.values(), default=float("nan"))
        print(f"\n{op} {shape}: torch {base:.2f} us; own list best {best_own:.2f} us ({base / best_own:.2f}x), "
              f"grid best {ranked[0][1]:.2f} us ({base / ranked[0][1]:.2f}x) of {len(wide)} timed "
              f"({rows[-1]['seconds']:.0f} s)" if ranked else f"\n{op} {shape}: nothing timed", flush=True)
        for text, us in ranked[:5]:
            print(f"  {'*' if text in own else ' '} {us:8.2f} us  {base / us:5.2f}x  {text}")
    print(f"\nwrote {opts.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
