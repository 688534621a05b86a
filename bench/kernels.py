"""Benchmark the Triton kernels against torch eager and torch.compile on a CUDA GPU.

For each op and size it prints the Triton time (``triton.testing.do_bench``, median), the achieved TFLOP/s
(GEMM-like ops) or GB/s (memory-bound ops), and the speed-up over torch eager and over ``torch.compile``
of the same eager function (``> 1`` means the Triton kernel is faster); then both timed again replayed from
CUDA graphs (``do_bench_cudagraph``: GPU time alone, warm L2), which separates a slow kernel from a slow
launch (the JSON also has the rate from it, ``graph_rate``), and the tiles the GEMM autotuner picked. Results go to
``bench/results/kernels.json`` and, when matplotlib is installed, a bar chart ``bench/results/kernels.png``.

Baselines are the natural torch code in the same dtype: ``F.linear`` + activation (cuBLAS), ``softmax``,
``F.layer_norm``, ``F.normalize``, ``F.scaled_dot_product_attention`` on its flash backend (the baseline
issue #3 names; left to choose, SDPA's pick depends on torch version and GPU; torch.compile gets the plain call),
gather + masked mean, ``F.conv2d``, ``F.max_pool2d``, ``torch.nn.LSTM`` (cuDNN). Rows ``attention mask`` and
``attention lengths`` run MiniLM's attention with padded keys given either way, against SDPA with a boolean
mask (whichever backend SDPA picks: flash takes no mask); rows ``attention_tma`` the variant that reads its tiles
with TMA (``MAAS_ATTENTION_TMA=on``; the default, ``auto``, times it against the plain kernel and the ``attention``
rows run the faster) on the ``attention`` rows' shapes, rows ``attention_persistent`` the persistent variant for
keys that fit one tile (``MAAS_ATTENTION_PERSISTENT=on``, off by default) on those of 128 keys and on MiniLM's.
For ``linear_int8`` the eager
baseline is the dense bf16 ``F.linear`` it replaces, the compiled one ``torch.compile`` of dequantize + matmul; for
``linear_fp8`` (activations quantized per row on the way in, inside the timed call) both are the bf16
``F.linear`` + bias + ReLU it would replace.

Usage: ``python bench/kernels.py [--quick] [--no-compile] [--only OP ...] [--sizes TEXT ...]`` (an OP also
selects the rows named ``OP something``, ``attention`` those of ``attention lengths``; ``--sizes`` keeps the rows
whose size holds one of the texts, ``M512 N4096``); ``--plot RESULTS.json`` only redraws
a saved run's chart beside it (no GPU needed). Without a CUDA GPU it says so and
exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
BF16 = torch.bfloat16


@dataclass
class Case:
    op: str
    size: str
    args: tuple
    triton: Callable  # the kernels op
    eager: Callable  # the torch baseline, also what torch.compile compiles
    flops: float = 0.0  # > 0: report TFLOP/s
    bytes: float = 0.0  # otherwise: report GB/s of compulsory traffic
    compiled_fn: Callable | None = None  # a different function to compile (linear_int8)
    # False: the op syncs with the host (a capture forbids it). embedding_pool's id range check is skipped while
    # capturing (kernels._common.value_range), so its graph time is the kernel's alone, its do_bench time with it.
    graphable: bool = True
    gemm: tuple | None = None  # a GEMM's (x, weight, bias, activation) as launched: which kernel ran it


def _sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cases(quick: bool, dev: str = "cuda") -> list[Case]:
    """The benchmark's cases on ``dev`` (the tests build them on ``meta``, where the torch baselines run too)."""
    import kernels
    from kernels.attention import PERSISTENT_MAX_KEYS
    from kernels.linear import GEMV_MAX_M, SPLIT_K_MAX_M, TMA_SPLIT_K_MAX_OUTPUTS, launch_linear, use_tma
    from kernels.linear_fp8 import FP8


    def rnd(*shape, dtype=BF16):
        return torch.randn(shape, device=dev).to(dtype)

    found: list[Case] = []
    inference = [(m, n, k) for m in (1, 16, 128, 512) for k, n in ((768, 3072), (4096, 4096))]
    gemms = [(4096, 4096, 4096), *inference]
    # MiniLM's four GEMMs at the benchmark batch (256 x 96 real tokens on average): QKV, output, FFN up, down.
    minilm = [(24576, 1152, 384), (24576, 384, 384), (24576, 1536, 384), (24576, 384, 1536)]
    for m, n, k in gemms[:3] if quick else gemms + minilm:
        x, w, b = rnd(m, k), rnd(n, k) * k**-0.5, rnd(n)
        found.append(Case("linear", f"M{m} N{n} K{k} +bias relu", (x, w, b),
                          lambda x, w, b: kernels.linear(x, w, b, "relu"),
                          lambda x, w, b: torch.relu(F.linear(x, w, b)), flops=2.0 * m * n * k,
                          gemm=(x, w, b, "relu")))
        # Each kernel that may run the problem on its own (split-K also where its bounds rule it out of timing),
        # to see what each gains where timing picks one, and whether those bounds are right.
        candidates = ["tiled", *["tma"] * use_tma(x, w, m),
                      *["tma_split_k"] * (use_tma(x, w, m) and m * n <= TMA_SPLIT_K_MAX_OUTPUTS),
                      *["split_k"] * (m <= SPLIT_K_MAX_M), *["gemv"] * (m <= GEMV_MAX_M)]
        for kernel in candidates * (len(candidates) > 1 and not quick):
            found.append(Case(f"linear {kernel}", f"M{m} N{n} K{k} +bias relu", (x, w, b),
                              lambda x, w, b, kernel=kernel: launch_linear(x, w, None, b, "relu", None, None,
                                                                           kernel=kernel),
                              lambda x, w, b: torch.relu(F.linear(x, w, b)), flops=2.0 * m * n * k))
    for m in (1, 16) if quick else (1, 4, 16):
        n, k = 14336, 4096
        x, w = rnd(m, k), rnd(n, k) * k**-0.5
        q, s = kernels.quantize_int8(w)
        found.append(Case("linear_int8", f"M{m} N{n} K{k}", (x, w, q, s),
                          lambda x, w, q, s: kernels.linear_int8(x, q, s),
                          lambda x, w, q, s: F.linear(x, w),
                          bytes=_nbytes(x, q, s) + m * n * 2,
                          compiled_fn=lambda x, w, q, s: F.linear(x, q.to(x.dtype) * s[:, None].to(x.dtype)),
                          gemm=(x, q, None, "none")))
        for kernel in ("tiled", "split_k", *["gemv"] * (m <= GEMV_MAX_M)) * (not quick):
            found.append(Case(f"linear_int8 {kernel}", f"M{m} N{n} K{k}", (x, w, q, s),
                              lambda x, w, q, s, kernel=kernel: launch_linear(x, q, s, None, "none", None, None,
                                                                              kernel=kernel),
                              lambda x, w, q, s: F.linear(x, w), bytes=_nbytes(x, q, s) + m * n * 2,
                              compiled_fn=lambda x, w, q, s: F.linear(x, q.to(x.dtype) * s[:, None].to(x.dtype))))
    for m, n, k in gemms[:1] if quick else [gemms[0], (512, 4096, 4096), *minilm]:
        x, w, b = rnd(m, k), rnd(n, k) * k**-0.5, rnd(n)
        q, s = kernels.quantize_fp8(w)
        found.append(Case("linear_fp8", f"M{m} N{n} K{k} +bias relu", (x, w, b, q, s),
                          lambda x, w, b, q, s: kernels.linear_fp8(x, q, s, b, "relu"),
                          lambda x, w, b, q, s: torch.relu(F.linear(x, w, b)), flops=2.0 * m * n * k,
                          gemm=(x.to(FP8), q, b, "relu")))  # x quantized to fp8 rows, as launched
    # The last size of each memory-bound op moves 1 GB or more: ten times the H100's 50 MB of L2 and more, so that
    # neither the warm L2 of graph replays nor the dirty lines do_bench's flush leaves behind sway its GB/s.
    large = () if quick else ((65536, 4096),)
    for rows, n in ((4096, 4096), (16384, 1024), (1024, 32768), *large):
        x = rnd(rows, n)
        found.append(Case("softmax", f"{rows}x{n}", (x,), kernels.softmax, lambda x: torch.softmax(x, dim=-1),
                          bytes=2 * _nbytes(x)))
    for rows, n in ((16384, 768), (8192, 4096), *large):
        x, r, w, b = rnd(rows, n), rnd(rows, n), rnd(n), rnd(n)
        found.append(Case("layer_norm", f"{rows}x{n} +residual", (x, r, w, b),
                          lambda x, r, w, b: kernels.layer_norm(x, w, b, 1e-5, r),
                          lambda x, r, w, b: F.layer_norm(x + r, (x.shape[-1],), w, b, 1e-5),
                          bytes=3 * _nbytes(x)))
    for rows, n in ((65536, 384), (16384, 1024), *[(rows * 4, n // 4) for rows, n in large]):
        x = rnd(rows, n)
        found.append(Case("l2_normalize", f"{rows}x{n}", (x,), kernels.l2_normalize,
                          lambda x: F.normalize(x, dim=-1), bytes=2 * _nbytes(x)))
    for b, s, d in ((1, 128, 384), (256, 128, 384), (1024, 512, 768)):  # MiniLM's tail at batch 1 and 256
        x = rnd(b, s, d)
        lengths = torch.full((b,), s, device=dev, dtype=torch.int32)
        found.append(Case("mean_pool", f"B{b} S{s} D{d} normalized", (x, lengths),
                          lambda x, lengths: kernels.mean_pool(x, lengths, normalize=True),
                          lambda x, lengths: F.normalize(torch.bmm(torch.ones_like(x[:, None, :, 0]), x).squeeze(1),
                                                         dim=-1),
                          bytes=_nbytes(x)))
    for b, s, v, d in ((1024, 128, 30522, 384), (256, 512, 30522, 768)):
        ids = torch.randint(0, v, (b, s), device=dev)
        table = rnd(v, d)
        mask = torch.rand(b, s, device=dev) < 0.7
        found.append(Case("embedding_pool", f"B{b} S{s} V{v} D{d}", (ids, table, mask),
                          kernels.embedding_pool,
                          lambda ids, table, mask: ((table[ids] * mask[..., None]).sum(1)
                                                    / mask.sum(1, keepdim=True).clamp(min=1)),
                          bytes=_nbytes(ids, mask) + b * s * d * 2 + b * d * 2))
    # MiniLM's two projections that end in a residual add and a LayerNorm, at the benchmark batch: as served (the
    # faster of fused and separate, timed), then each way forced.
    from kernels.linear_layer_norm import _LAUNCHERS as LINEAR_LAYER_NORM

    for m, n, k in [(24576, 384, 384), (24576, 384, 1536)][: 1 if quick else None]:
        x, r, w, bias, nw, nb = rnd(m, k), rnd(m, n), rnd(n, k) * k**-0.5, rnd(n), rnd(n), rnd(n)
        out = torch.empty_like(r)
        ways = {"": lambda x, r, w, b, nw, nb: kernels.linear_layer_norm(x, w, b, r, nw, nb, 1e-12)}
        for way in LINEAR_LAYER_NORM if not quick else ():
            ways[f" {way}"] = lambda x, r, w, b, nw, nb, way=way, out=out: LINEAR_LAYER_NORM[way](
                x, w, None, b, r, nw, nb, 1e-12, out, x.shape[0], w.shape[0], x.shape[1])
        for label, fn in ways.items():
            found.append(Case(f"linear_layer_norm{label}", f"M{m} N{n} K{k}", (x, r, w, bias, nw, nb), fn,
                              lambda x, r, w, b, nw, nb: F.layer_norm(F.linear(x, w, b) + r, (r.shape[-1],), nw, nb,
                                                                      1e-12),
                              flops=2.0 * m * n * k))
    b, s, v, d = 256, 128, 30522, 384  # MiniLM's embedding block at the benchmark batch
    ids, table, positions, w, bias = torch.randint(0, v, (b, s), device=dev), rnd(v, d), rnd(512, d), rnd(d), rnd(d)
    found.append(Case("embedding_norm", f"B{b} S{s} V{v} D{d}", (ids, table, positions, w, bias),
                      lambda ids, table, positions, w, bias: kernels.embedding_norm(ids, table, positions, w, bias),
                      lambda ids, table, positions, w, bias: F.layer_norm(
                          F.embedding(ids, table) + positions[: ids.shape[1]], table.shape[1:], w, bias, 1e-12),
                      bytes=_nbytes(ids) + 2 * b * s * d * 2))
    for d in (64, 128):
        for s in (128, 1024) if quick else (128, 512, 1024, 4096):
            b, h = max(1, 16384 // s), 2048 // d
            q, k, v = rnd(b, h, s, d), rnd(b, h, s, d), rnd(b, h, s, d)
            found.append(Case("attention", f"B{b} H{h} S{s} D{d}", (q, k, v), kernels.attention, _sdpa_flash,
                              flops=4.0 * b * h * s * s * d, compiled_fn=F.scaled_dot_product_attention))
            found.append(Case("attention_tma", f"B{b} H{h} S{s} D{d}", (q, k, v), _attention_variant("tma"),
                              _sdpa_flash, flops=4.0 * b * h * s * s * d))
            if s <= PERSISTENT_MAX_KEYS:
                found.append(Case("attention_persistent", f"B{b} H{h} S{s} D{d}", (q, k, v),
                                  _attention_variant("persistent"), _sdpa_flash, flops=4.0 * b * h * s * s * d))
    if not quick:  # MiniLM's attention at the benchmark batch, keys padded (lengths 64-128), both ways
        b, h, s, d = 256, 12, 128, 32
        q, k, v = rnd(b, h, s, d), rnd(b, h, s, d), rnd(b, h, s, d)
        lengths = torch.randint(64, s + 1, (b,), dtype=torch.int32)
        real = 4.0 * h * d * s * lengths.sum().item()  # flops on real keys only
        lengths = lengths.to(dev)
        mask = torch.arange(s, device=dev)[None, :] < lengths[:, None]
        for padding, kwargs in (("mask", {"key_padding_mask": mask}), ("lengths", {"key_lengths": lengths})):
            found.append(Case(f"attention {padding}", f"B{b} H{h} S{s} D{d} keys 64-{s}", (q, k, v),
                              lambda q, k, v, kwargs=kwargs: kernels.attention(q, k, v, **kwargs),
                              lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None]),
                              flops=real))
        found.append(Case("attention_persistent lengths", f"B{b} H{h} S{s} D{d} keys 64-{s}", (q, k, v),
                          _attention_variant("persistent", key_lengths=lengths),
                          lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None]),
                          flops=real))
    x, w, bias = rnd(256, 32, 28, 28), rnd(64, 32, 3, 3) * (32 * 9) ** -0.5, rnd(64)
    found.append(Case("conv2d", "N256 C32 28x28 -> 64 k3 relu", (x, w, bias),
                      lambda x, w, b: kernels.conv2d(x, w, b, relu=True),
                      lambda x, w, b: torch.relu(F.conv2d(x, w, b)), flops=2.0 * 256 * 64 * 26 * 26 * 32 * 9))
    x = rnd(256, 64, 26, 26)
    found.append(Case("max_pool2d", "N256 C64 26x26 k2", (x,), kernels.max_pool2d,
                      lambda x: F.max_pool2d(x, 2), bytes=1.25 * _nbytes(x)))
    lstm = torch.nn.LSTM(300, 256, batch_first=True, device=dev, dtype=BF16)
    x = rnd(64, 128, 300)
    bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach()
    found.append(Case("lstm", "B64 S128 I300 H256", (x,),
                      lambda x: kernels.lstm(x, lstm.weight_ih_l0.detach(), lstm.weight_hh_l0.detach(), bias),
                      lambda x: lstm(x)[0], flops=2.0 * 64 * 128 * 4 * 256 * (300 + 256), graphable=False))
    return found


def _attention_variant(name: str, **kwargs) -> Callable:
    """The attention launcher with its variant ``name`` (``tma`` or ``persistent``) forced: an error where that
    variant would not run (a GPU below compute capability 9.0 for TMA), rather than another kernel's time under its
    label."""
    from kernels.attention import attention_triton

    return lambda q, k, v: attention_triton(q, k, v, kernel=name, **kwargs)


def _time(fn: Callable, args: tuple) -> float:
    from triton.testing import do_bench

    with torch.no_grad():
        return do_bench(lambda: fn(*args), return_mode="median")


def _time_graph(fn: Callable, args: tuple) -> float | None:
    """Milliseconds per call replayed from a CUDA graph: GPU time without the Python launch cost that a
    microsecond kernel can hide behind (no L2 flush between calls, unlike ``_time``)."""
    from triton.testing import do_bench_cudagraph

    try:
        with torch.no_grad():
            return do_bench_cudagraph(lambda: fn(*args), return_mode="median")
    except Exception as exc:  # e.g. an op with a host sync cannot be captured
        print(f"  no CUDA-graph timing: {type(exc).__name__}: {exc}"[:160])
        return None


def _tile_config(case: Case) -> str | None:
    """The kernel and tiles a GEMM ran in the case just timed: the one its op names (``linear split_k``), or
    the one timing picked for its shape; for attention and embedding_pool, the tiles their autotuner picked."""
    if case.op.startswith(("attention", "embedding_pool")):
        from kernels.attention import _attention_kernel, _attention_persistent_kernel, _attention_tma_kernel
        from kernels.embedding_pool import _embedding_pool_kernel

        tuner = (_attention_tma_kernel if case.op == "attention_tma" else _attention_persistent_kernel
                 if case.op.startswith("attention_persistent") else _attention_kernel
                 if case.op.startswith("attention") else _embedding_pool_kernel)
        config = getattr(tuner, "best_config", None)
        return None if config is None else f"{config}{runner_up_note(getattr(tuner, 'configs_timings', {}))}"
    if case.gemm is None and not case.op.startswith("linear "):
        return None
    from kernels.linear import (
        FASTEST_KERNEL,
        _linear_gemv_kernel,
        _linear_kernel,
        _linear_split_k_kernel,
        _linear_tma_kernel,
        _linear_tma_split_k_kernel,
        kernel_key,
    )

    kernel = case.op.split()[-1] if case.gemm is None else FASTEST_KERNEL.get(kernel_key(*case.gemm, None), "tiled")
    tuner = {"tiled": _linear_kernel, "tma": _linear_tma_kernel, "tma_split_k": _linear_tma_split_k_kernel,
             "split_k": _linear_split_k_kernel, "gemv": _linear_gemv_kernel}[kernel]
    config = getattr(tuner, "best_config", None)
    return None if config is None else f"{kernel} {config}{masked_rows_note(getattr(tuner, 'configs_timings', {}))}"


def runner_up_note(timings: dict) -> str:
    """For the tuning round just timed, how much slower its second-best config ran, in the autotuner's own
    timing: how close another tile came."""
    ms = sorted(t[0] if isinstance(t, list | tuple) else t for t in timings.values())
    return f" (autotuning: {len(ms)} configs, the next {ms[1] / ms[0]:.2f}x slower)" if len(ms) > 1 and ms[0] else ""


def masked_rows_note(timings: dict) -> str:
    """For a tuning round that timed thin tiles both with rows past M masked and wrapped (``MASK_ROWS``, buckets
    of fewer rows than the tile), the fastest of each, in the autotuner's own timing: whether masking pays."""
    best: dict[bool, float] = {}
    for config, timing in timings.items():
        masked = config.kwargs.get("MASK_ROWS")
        ms = timing[0] if isinstance(timing, list | tuple) else timing
        if masked is not None:
            best[masked] = min(ms, best.get(masked, float("inf")))
    if len(best) < 2:
        return ""
    return f" (autotuning: rows masked {best[True] * 1e3:.1f} us, wrapped {best[False] * 1e3:.1f} us)"


def run(case: Case, compile_baseline: bool) -> dict:
    ms = _time(case.triton, case.args)
    tiles = _tile_config(case)
    eager_ms = _time(case.eager, case.args)
    graph_ms = eager_graph_ms = None
    if case.graphable:
        graph_ms, eager_graph_ms = _time_graph(case.triton, case.args), _time_graph(case.eager, case.args)
    compiled_ms = None
    if compile_baseline:
        try:
            compiled_ms = _time(torch.compile(case.compiled_fn or case.eager), case.args)
        except Exception as exc:  # a baseline that does not compile is reported, not fatal
            print(f"  torch.compile failed for {case.op} {case.size}: {type(exc).__name__}: {exc}"[:200])
    work, unit = (case.flops / 1e9, "TFLOP/s") if case.flops else (case.bytes / 1e6, "GB/s")
    return {
        "op": case.op, "size": case.size, "triton_ms": ms, "eager_ms": eager_ms, "compile_ms": compiled_ms,
        "rate": work / ms, "graph_rate": work / graph_ms if graph_ms else None, "unit": unit,
        "speedup_vs_eager": eager_ms / ms,
        "speedup_vs_compile": compiled_ms / ms if compiled_ms else None, "tiles": tiles,
        "triton_graph_ms": graph_ms, "eager_graph_ms": eager_graph_ms,
        "speedup_vs_eager_graphs": eager_graph_ms / graph_ms if graph_ms and eager_graph_ms else None,
    }


CHART_SERIES = [("vs torch eager, CUDA-graph replay", "speedup_vs_eager_graphs"),
                ("vs torch eager, launches timed (do_bench)", "speedup_vs_eager"),
                ("vs torch.compile (do_bench)", "speedup_vs_compile")]


def chart_series(rows: list[dict]) -> list[tuple[str, list[float]]]:
    """(label, one speed-up a row) of each of ``CHART_SERIES`` that some row has; 0 (no bar) where a row has
    none (the LSTM has no graph replay, a run without torch.compile no compile column)."""
    return [(label, [r.get(field) or 0 for r in rows]) for label, field in CHART_SERIES
            if any(r.get(field) for r in rows)]


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Bars of each row's speed-ups on a log scale: against torch eager replayed from CUDA graphs (GPU time
    alone, the figure the README reports), with launches timed by ``do_bench`` (the host included, which
    decides small ops), and against torch.compile where it ran."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib to get it)")
        return
    series = chart_series(rows)
    labels = [f"{r['op']} {r['size']}" for r in rows]
    height = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(rows) + 1.5))
    for i, (label, values) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * height
        ax.barh([y + offset for y in range(len(rows))], values, height=height, label=label)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(list(range(len(rows))), labels, fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up of the Triton kernel (torch time / Triton time)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def replot(results: Path) -> int:
    """Redraw the chart of a saved ``kernels.json`` beside it (``.png``): no GPU needed."""
    saved = json.loads(results.read_text())
    plot(saved["results"], results.with_suffix(".png"), chart_title(saved.get("meta", {})))
    return 0


def chart_title(meta: dict) -> str:
    return ", ".join(f"{k} {meta[k]}" for k in ("device", "torch", "triton", "date") if k in meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--only", nargs="+", metavar="OP",
                        help="benchmark only these ops (and the rows named 'OP something')")
    parser.add_argument("--sizes", nargs="+", metavar="TEXT", help="benchmark only the sizes holding these texts")
    parser.add_argument("--plot", type=Path, metavar="JSON", help="only redraw the chart of a saved kernels.json")
    opts = parser.parse_args(argv)
    if opts.plot:
        return replot(opts.plot)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (none found): nothing to measure.")
        return 0
    import triton

    torch.manual_seed(0)
    rows = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"{'op':<15} {'size':<30} {'triton ms':>10} {'rate':>16} {'x eager':>8} {'x compile':>9} "
          f"{'graph ms':>9} {'x eager':>8}  tiles")
    for case in cases(opts.quick):
        if opts.only and case.op not in opts.only and case.op.split()[0] not in opts.only:
            continue
        if opts.sizes and not any(text in case.size for text in opts.sizes):
            continue
        try:
            row = run(case, not opts.no_compile)
        except Exception as exc:  # one op that cannot run here (a variant this GPU lacks): report it and go on
            print(f"{case.op:<15} {case.size:<30} failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            continue
        rows.append(row)  # saved after every row: a run cut short by a time limit still leaves its rows
        (RESULTS / "kernels.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
        vs_compile = f"{row['speedup_vs_compile']:.2f}" if row["speedup_vs_compile"] else "-"
        graph = f"{row['triton_graph_ms']:>9.4f}" if row["triton_graph_ms"] else f"{'-':>9}"
        vs_graphs = f"{row['speedup_vs_eager_graphs']:.2f}" if row["speedup_vs_eager_graphs"] else "-"
        print(f"{row['op']:<15} {row['size']:<30} {row['triton_ms']:>10.4f} {row['rate']:>8.1f} "
              f"{row['unit']:<7} {row['speedup_vs_eager']:>8.2f} {vs_compile:>9} {graph} {vs_graphs:>8}  "
              f"{row['tiles'] or ''}")
    geo = math.exp(sum(math.log(r["speedup_vs_eager"]) for r in rows) / max(1, len(rows)))
    print(f"geometric mean speed-up vs eager: {geo:.2f}")
    print(f"wrote {RESULTS / 'kernels.json'}")
    plot(rows, RESULTS / "kernels.png", chart_title(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
