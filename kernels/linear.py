"""Fused linear layer: ``Y = act(X @ W^T + b) + residual`` in one kernel.

Bias, activation and residual are applied to the fp32 accumulator tile before the single store, so a
``Linear -> GELU`` or ``Linear -> +skip`` pair costs one pass over memory instead of three. The same kernel
serves :mod:`kernels.linear_int8`: with ``HAS_SCALE`` the weight tile is int8, converted on load and the
per-output-channel scale is applied in the epilogue (it factors out of the sum over K). And
:mod:`kernels.linear_fp8`: X and W tiles both fp8, multiplied as they are, with a per-row scale of X
(``HAS_X_SCALE``) applied in the epilogue beside W's.

Four more kernels share that epilogue, each for the problems where the tiled one leaves the GPU underused:

- **persistent TMA** (large float problems on Hopper and later): one program per multiprocessor walks the
  output tiles, fed by the tensor memory accelerator (TMA), which copies whole X and W tiles into shared memory
  without address arithmetic or registers, as in Triton's persistent-matmul tutorial;
- **TMA split-K** (a few hundred rows of a wide weight): the same with its widest tiles, too few of them to
  occupy every multiprocessor, each tile's K split in two halves run by two programs; the one to end second
  adds the other's fp32 partial sum and applies the epilogue. One launch;
- **split-K** (a few rows: online inference): a thin output has too few tiles to occupy every
  multiprocessor, so programs also split the sum over K into runs, write fp32 partial sums, and a second small
  kernel adds them in a fixed order and applies the epilogue. Any weight dtype, int8 and fp8 included;
- **GEMV** (a single row): no tensor-core tiles, whose 16 rows would be 15 of padding; products on the CUDA
  cores, with narrow column blocks for parallelism instead of a split of K. Any weight dtype too.

``MAAS_LINEAR_TMA``, ``MAAS_LINEAR_TMA_SPLIT_K``, ``MAAS_LINEAR_SPLIT_K`` and ``MAAS_LINEAR_GEMV`` each pick:
``auto`` (where one may pay, see ``use_tma``, ``use_tma_split_k``, ``use_split_k`` and ``use_gemv``, the
candidate kernels are timed once per shape, replayed from CUDA graphs as serving runs them, and the fastest runs
from then on), ``1`` (always where it can run, the interpreter included) or ``0`` (never). ``auto`` is the
default, but for TMA split-K: ``0`` until a GPU has checked it.
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels._autotune import TimedChoice, autotune, gpu_ms, stored_key, within_bucket
from kernels._common import (
    FLOAT_DTYPES,
    MAX_ELEMENTS,
    activation_reference,
    apply_activation,
    cast,
    check_activation,
    check_contiguous,
    check_tensor,
    compute_dtype,
    into,
    output,
    pdl_launch_dependents,
    pdl_wait,
)
from kernels.dispatch import INTERPRETER, USE_AUTOTUNE, backend_for, env_choice, multiprocessors, pdl

log = logging.getLogger(__name__)


def _config(bm: int, bn: int, bk: int, warps: int, stages: int, pre_hook=None, **more: bool) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, **more}, num_warps=warps,
                         num_stages=stages, pre_hook=pre_hook)


# Rows of a tile past M are wrapped onto real rows (MASK_ROWS off): the loads need no row mask. With fewer
# rows than the tile has, each row of x is then fetched several times over, by every program at once: with
# M = 1, 16 times. On an H100 the same binary took 34.0 us at M = 1 against 24.5 at M = 4 and 16 (int8,
# N = 14,336, K = 4,096; bf16 N = K = 4,096: 17.9 against 12.0), so the thin tiles also come with rows past
# M masked off (MASK_ROWS on: more instructions in the K loop, no repeated fetches). For buckets of fewer
# rows than the tile, the autotuner times both; whether masking is what wins is for the GPU to show.
def _with_masked_rows(configs: list[triton.Config]) -> list[triton.Config]:
    """``configs`` with rows wrapped, then their 16-row ones again with rows masked."""
    def variant(c: triton.Config, mask: bool) -> triton.Config:
        return triton.Config({**c.kwargs, "MASK_ROWS": mask}, num_warps=c.num_warps, num_stages=c.num_stages)
    return [variant(c, False) for c in configs] + [variant(c, True) for c in configs if c.kwargs["BLOCK_M"] == 16]


# Large tiles for big batches (tutorial 03's list; its two widest tiles one pipeline stage deeper, which fits
# Hopper's 227 KB of shared memory in bf16; 128-deep K tiles for the short K loops of small models, where
# MiniLM's K = 384 takes only six 64-deep steps) plus thin-M tiles for online inference (M <= 64). The last,
# 512 deep, won the tile sweep at M 16, N = K = 4,096 on an H100 (8.5 us against 11.6 for the best of the
# others; bench/tile_sweep.py, bench/results/gpu run 14).
_GPU_CONFIGS = _with_masked_rows([
    _config(128, 256, 64, 8, 3),
    _config(256, 128, 64, 8, 3),
    _config(128, 256, 64, 8, 4),
    _config(256, 128, 64, 8, 4),
    _config(128, 128, 128, 8, 3),
    _config(128, 256, 128, 8, 2),
    _config(128, 128, 64, 4, 4),
    _config(128, 64, 32, 4, 4),
    _config(64, 128, 32, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(32, 64, 128, 4, 4),
    _config(16, 64, 128, 4, 4),
    _config(16, 128, 64, 4, 4),
    _config(16, 32, 256, 2, 4),
    _config(16, 32, 512, 4, 3),
])


SHARED_MEMORY = 232448  # bytes one block may use on an H100 (227 KB); an A100 allows 166 KB


def fits_shared_memory(config: triton.Config, element_size: int) -> bool:
    """Whether the software pipeline's ``num_stages`` copies of the X and W tiles fit in shared memory."""
    kw = config.kwargs
    tiles = (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * element_size
    return tiles * config.num_stages <= SHARED_MEMORY


def _prune_configs(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    """Before compiling and timing: drop tiles too big for fp32 inputs (twice the bytes of bf16), then tiles
    taller than the M bucket, and masked-row variants of tiles the bucket fills."""
    size = named_args["x_ptr"].element_size()
    bucket = named_args["M_BUCKET"]
    fitting = [c for c in configs if fits_shared_memory(c, size)]
    kept = within_bucket(fitting, "BLOCK_M", bucket)
    return [c for c in kept if not c.kwargs["MASK_ROWS"] or bucket < c.kwargs["BLOCK_M"]]


# Rows and their bucket vary with the batch: not specialized on (see kernels._common). N and K, fixed per
# layer, are: their divisibility by 16 lets loads and stores be vectorized.
BATCH_ARGS = ("M", "M_BUCKET")


# M_BUCKET (M rounded up to a power of two) is the tuning key instead of M itself: a dynamic batcher sees a
# new M on almost every batch and must not re-tune each time.
@autotune(_GPU_CONFIGS, key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune_configs},
          buckets=["M_BUCKET"])
@triton.jit(do_not_specialize=BATCH_ARGS)
def _linear_kernel(
    x_ptr, w_ptr, s_ptr, xs_ptr, b_ptr, r_ptr, y_ptr,
    M, N, K, M_BUCKET,
    HAS_SCALE: tl.constexpr, HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    MASK_ROWS: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _dot_tiles(x_ptr, w_ptr, offs_m, offs_n, M, N, K, 0, tl.cdiv(K, BLOCK_K),
                     HAS_SCALE, UPCAST, MASK_ROWS, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = _scale_tile(acc, offs_m, offs_n, M, N, s_ptr, xs_ptr, HAS_SCALE, HAS_X_SCALE)
    _store_tile(acc, offs_m, offs_n, M, N, b_ptr, r_ptr, y_ptr, HAS_BIAS, HAS_RESIDUAL, ACTIVATION)
    pdl_launch_dependents(USE_PDL)


@triton.jit
def _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Output tile ``tile``'s row and column blocks, in grouped order: GROUP_M row blocks in a row share each
    weight column block while it is in L2."""
    group_size = GROUP_M * num_pid_n
    first_m = (tile // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % group_size) % group_m, (tile % group_size) // group_m


@triton.jit
def _dot_tiles(x_ptr, w_ptr, offs_m, offs_n, M, N, K, first_k, steps,
               HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr, MASK_ROWS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``X[offs_m] @ W[offs_n]^T`` over ``steps`` K tiles from tile ``first_k`` on, in fp32: all of K for the
    tiled kernel, one run of it for a program of the split-K kernel."""
    offs_k = first_k * BLOCK_K + tl.arange(0, BLOCK_K)
    # Wrapping rows/columns keeps every load in bounds without a mask; the stores are masked. MASK_ROWS: rows
    # past M load nothing instead (see _with_masked_rows).
    x_ptrs = x_ptr + (offs_m % M)[:, None] * K + offs_k[None, :]
    m_ok = offs_m < M
    w_ptrs = w_ptr + (offs_n % N)[None, :] * K + offs_k[:, None]  # W^T tile: [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, steps):
        k_ok = offs_k < K - k * BLOCK_K
        if MASK_ROWS:
            a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:  # the interpreter computes bf16 wrongly: do its math in fp32
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        elif HAS_SCALE:
            w = w.to(a.dtype)  # int8 -> fp16/bf16 is exact for |q| <= 127 (fp8 with fp8: nothing to do)
        # fp8 with fp8 chains too, which on Hopper is "fast accumulation" (the tensor cores keep fewer bits than
        # fp32 between products). Summing each K tile apart into the fp32 accumulator cut the H100 check's
        # largest fp8 errors by only 10-35% and the 4096^3 throughput by 28% (956 -> 691 TFLOP/s): the rest of the
        # error is inside each tile's MMAs, so the GPU check holds fp8 to cuBLAS's fp8 GEMM on the same inputs.
        acc = tl.dot(a, w, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _scale_tile(acc, offs_m, offs_n, M, N, s_ptr, xs_ptr, HAS_SCALE: tl.constexpr, HAS_X_SCALE: tl.constexpr):
    """The quantized weights' per-output-channel scales (and fp8 activations' per-row ones): they factor out
    of the sum over K, so they are applied once, to the fp32 sum."""
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if HAS_X_SCALE:
        acc = acc * tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    return acc


@triton.jit
def _store_tile(acc, offs_m, offs_n, M, N, b_ptr, r_ptr, y_ptr,
                HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr):
    """The epilogue both kernels share: bias, activation and residual on the fp32 tile, one masked store."""
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = apply_activation(acc, ACTIVATION)
    y_offs = offs_m[:, None] * N + offs_n[None, :]
    y_mask = (offs_m[:, None] < M) & n_ok[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + y_offs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _set_tile_shapes(nargs: dict) -> None:
    """A TMA descriptor carries its tile shape: set it from the config about to run (the autotuner's
    ``pre_hook``; the interpreter's launch calls it with its fixed tiles)."""
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


# Wide tiles for big outputs, narrower ones so that MiniLM-sized N (384) still fills 132 multiprocessors, and
# 64 x 64 for a few hundred rows of a wide weight (M 128, N 4,096: 128 tiles where 128 x 64 makes 64 and leaves
# half the multiprocessors idle while the weight streams; cuBLAS took 16.4 us there, this kernel 19.0). 128 x 128
# on 4 warps won the tile sweep at M 512, N 3,072, K 768 (7.0 against 7.2 us; run 14).
_TMA_CONFIGS = [
    _config(*tiles, pre_hook=_set_tile_shapes)
    for tiles in ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4),
                  (128, 128, 128, 8, 3), (128, 128, 64, 4, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                  (64, 64, 128, 4, 4))
]


@triton.jit
def _tma_dot_tiles(x_desc, w_desc, pid_m, pid_n, first_k, steps, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``X @ W^T`` on output tile (``pid_m``, ``pid_n``) over ``steps`` K tiles from tile ``first_k`` on, in
    fp32, read with TMA: it fills tiles past M, N or K with zeros, so the loads need no masks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(first_k, first_k + steps):
        a = x_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
        w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w.T, acc)
    return acc


def _prune_tma_configs(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    size = named_args["x_desc"].base.element_size()
    return within_bucket([c for c in configs if fits_shared_memory(c, size)], "BLOCK_M", named_args["M_BUCKET"])


@autotune(_TMA_CONFIGS, key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune_tma_configs},
          buckets=["M_BUCKET"])
@triton.jit(do_not_specialize=BATCH_ARGS)
def _linear_tma_kernel(
    x_desc, w_desc, b_ptr, r_ptr, y_ptr,
    M, N, K, M_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, UPCAST: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    # Persistent: program p takes output tiles p, p + NUM_PROGRAMS, ... in the grouped order of the kernel
    # above.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
        pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        acc = _tma_dot_tiles(x_desc, w_desc, pid_m, pid_n, 0, tl.cdiv(K, BLOCK_K), UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _store_tile(acc, offs_m, offs_n, M, N, b_ptr, r_ptr, y_ptr, HAS_BIAS, HAS_RESIDUAL, ACTIVATION)
    pdl_launch_dependents(USE_PDL)


# The persistent TMA kernel's widest tiles run closest to the tensor cores' peak: in the tile sweep (run 15) a
# 128 x 256 tile made 6.5 TFLOP/s a multiprocessor at M 512, N = K = 4,096, a 128 x 128 one 4.5. But that output
# is only 64 such tiles, for 132 multiprocessors (41.2 us, where 128 tiles of 128 x 128 took 29.8 and cuBLAS
# 29.9). Splitting each tile's K in two halves gives 128 programs of the wide tile. The 32-deep tiles are the
# ones fp32 fits in shared memory.
_TMA_SPLIT_K_CONFIGS = [
    _config(*tiles, pre_hook=_set_tile_shapes)
    for tiles in ((128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (256, 128, 64, 8, 4),
                  (128, 256, 32, 8, 4), (256, 128, 32, 8, 4))
]


@autotune(_TMA_SPLIT_K_CONFIGS, key=["M_BUCKET", "N", "K"],
          prune_configs_by={"early_config_prune": _prune_tma_configs}, buckets=["M_BUCKET"])
@triton.jit(do_not_specialize=BATCH_ARGS)
def _linear_tma_split_k_kernel(
    x_desc, w_desc, b_ptr, r_ptr, y_ptr, p_ptr, c_ptr,
    M, N, K, M_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, UPCAST: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    # Persistent over halves: unit u is half u % 2 of output tile u // 2's K tiles (the second half short or
    # empty), so a tile's halves go to neighbouring programs and end together. One launch: the half that ends
    # second adds the other's fp32 partial sum to its own (in registers: a sum of two, the same whichever came
    # second) and applies the epilogue. c_ptr[tile] (zero at launch) counts: each half adds 1 as it ends and
    # the first adds 1 more once its partial is written, so 3 means both. The second then sets it back to 0:
    # a relaunch on the same counts (the autotuner's timing runs) starts as the first did. The second waits
    # only for a half that has ended its loop, in a program that is running and waits for nothing: no
    # deadlock, however many programs the GPU holds at once.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_half = tl.cdiv(k_tiles, 2)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    in_slab = rows[:, None] * BLOCK_N + cols[None, :]
    for unit in tl.range(tl.program_id(0), num_pid_m * num_pid_n * 2, NUM_PROGRAMS):
        tile = unit // 2
        pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        first_k = (unit % 2) * per_half
        acc = _tma_dot_tiles(x_desc, w_desc, pid_m, pid_n, first_k, tl.minimum(per_half, k_tiles - first_k),
                             UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        slab = p_ptr + tile * BLOCK_M * BLOCK_N + in_slab
        if tl.atomic_add(c_ptr + tile, 1, sem="relaxed") == 0:
            tl.store(slab, acc)
            tl.debug_barrier()  # every thread's share of the slab written before one thread releases it
            tl.atomic_add(c_ptr + tile, 1, sem="release")
        else:
            while tl.atomic_cas(c_ptr + tile, 3, 0, sem="acquire") != 3:
                pass
            acc += tl.load(slab, cache_modifier=".cg")
            _store_tile(acc, pid_m * BLOCK_M + rows, pid_n * BLOCK_N + cols, M, N, b_ptr, r_ptr, y_ptr,
                        HAS_BIAS, HAS_RESIDUAL, ACTIVATION)
    pdl_launch_dependents(USE_PDL)


def _split_config(bm: int, bn: int, bk: int, warps: int, stages: int, split: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_warps=warps,
                         num_stages=stages)


# For a few rows (M <= SPLIT_K_MAX_M) the tiled kernel has one program per 16 x 32..128 output tile: 4,096
# outputs make 32-128 programs for 132 multiprocessors, each streaming all of K alone. Splitting K 2-8 ways
# gives the memory system several times more loads in flight. The 128-row tiles are for 65-128 rows, where
# 64 x 64 tiles of a 4,096-wide output leave idle only 4 of 132 multiprocessors but each runs all of K.
_SPLIT_K_CONFIGS = _with_masked_rows([
    _split_config(16, 64, 128, 4, 4, 4),
    _split_config(16, 64, 128, 4, 4, 8),
    _split_config(16, 32, 256, 4, 3, 4),
    _split_config(16, 128, 128, 4, 3, 4),
    _split_config(16, 64, 256, 4, 3, 8),
    _split_config(32, 64, 128, 4, 4, 4),
    _split_config(64, 64, 64, 4, 4, 4),
    _split_config(64, 128, 64, 4, 4, 2),
    _split_config(64, 128, 128, 4, 3, 4),
    _split_config(128, 128, 64, 8, 3, 4),
])
MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in _SPLIT_K_CONFIGS)


@autotune(_SPLIT_K_CONFIGS, key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune_configs},
          buckets=["M_BUCKET"])
@triton.jit(do_not_specialize=BATCH_ARGS)
def _linear_split_k_kernel(
    x_ptr, w_ptr, p_ptr,
    M, N, K, M_BUCKET,
    HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    MASK_ROWS: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    # Program (tile, s) sums the s-th of SPLIT_K equal runs of K tiles (the last ones may be short or empty)
    # into slab s of the fp32 partials: the reduction kernel adds the slabs in a fixed order (no atomics, so
    # results do not depend on timing) and applies the epilogue once.
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_pid_n
    pid_n = tl.program_id(0) % num_pid_n
    split = tl.program_id(1)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    first_k = split * per_split
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _dot_tiles(x_ptr, w_ptr, offs_m, offs_n, M, N, K, first_k, tl.minimum(per_split, k_tiles - first_k),
                     HAS_SCALE, UPCAST, MASK_ROWS, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(p_ptr + split * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)
    pdl_launch_dependents(USE_PDL)


@triton.jit(do_not_specialize=["M"])
def _split_k_reduce_kernel(
    p_ptr, s_ptr, xs_ptr, b_ptr, r_ptr, y_ptr,
    M, N, SPLIT_K,
    HAS_SCALE: tl.constexpr, HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    p_ptrs = p_ptr + offs_m[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, SPLIT_K):
        acc += tl.load(p_ptrs, mask=mask, other=0.0)
        p_ptrs += M * N
    acc = _scale_tile(acc, offs_m, offs_n, M, N, s_ptr, xs_ptr, HAS_SCALE, HAS_X_SCALE)
    _store_tile(acc, offs_m, offs_n, M, N, b_ptr, r_ptr, y_ptr, HAS_BIAS, HAS_RESIDUAL, ACTIVATION)
    pdl_launch_dependents(USE_PDL)


def _gemv_config(bn: int, bk: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=1)


# With one row the work is a matrix-vector product: all the time goes into streaming the weight, and a
# tensor-core tile pads the row to 16 (15 of 16 rows computed for nothing, x fetched 16 times over by every
# program). The GEMV kernel multiplies on the CUDA cores instead, in fp32, keeping a product per (column, k)
# slot that is summed over K once, after the loop (as embedding_pool does), so the loop is loads, converts and
# fused multiply-adds with no barrier (sm_90 PTX). Narrow column blocks make many programs of a thin output
# (N = 3,072 in blocks of 8: 384 programs for 132 multiprocessors) without splitting K, so no second launch.
# Triton does not software-pipeline these loads (no cp.async at any num_stages): occupancy hides the latency.
# Tiles of 16, 32 and 64 elements a thread (as many fp32 accumulators) trade bytes in flight per thread
# against threads per multiprocessor. Two rows or more would need a 3-D accumulator, whose broadcasts Triton
# lays out through shared memory (six barriers in every step of the loop): they stay on the tensor-core tiles.
_GEMV_CONFIGS = [
    _gemv_config(4, 512, 4),
    _gemv_config(8, 256, 4),
    _gemv_config(8, 512, 4),
    _gemv_config(16, 256, 4),
    _gemv_config(16, 512, 4),
    _gemv_config(16, 512, 8),
    _gemv_config(32, 128, 4),
    _gemv_config(32, 256, 4),
    _gemv_config(64, 128, 8),
]
GEMV_MAX_M = 1


@autotune(_GEMV_CONFIGS, key=["N", "K"])
@triton.jit
def _linear_gemv_kernel(
    x_ptr, w_ptr, s_ptr, xs_ptr, b_ptr, r_ptr, y_ptr,
    N, K,
    HAS_SCALE: tl.constexpr, HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, X_VECTOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Columns past N wrap onto real ones (no mask on the weight's rows); the store is masked.
    # x is read as a [BLOCK_N, BLOCK_K] tile of repeated rows, in the weight tile's own layout (the repeats come
    # from L1): a [BLOCK_K] vector broadcast over the columns went through shared memory, behind two barriers
    # in every step of the loop. For that the two loads must be vectorized alike: a weight narrower than x
    # (int8 under bf16) is read in runs of as many elements as one 16-byte load of x holds.
    w_ptrs = w_ptr + (offs_n % N).to(tl.int64)[:, None] * K + tl.max_contiguous(offs_k, X_VECTOR)[None, :]
    x_ptrs = x_ptr + offs_k[None, :] + 0 * offs_n[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = (offs_k < K - k * BLOCK_K)[None, :]
        w = tl.load(w_ptrs, mask=k_ok, other=0.0).to(tl.float32)  # int8 and fp8 are exact in fp32
        a = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
        acc += w * a
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    offs_m = tl.arange(0, 1)
    out = _scale_tile(tl.sum(acc, axis=1)[None, :], offs_m, offs_n, 1, N, s_ptr, xs_ptr, HAS_SCALE, HAS_X_SCALE)
    _store_tile(out, offs_m, offs_n, 1, N, b_ptr, r_ptr, y_ptr, HAS_BIAS, HAS_RESIDUAL, ACTIVATION)
    pdl_launch_dependents(USE_PDL)


def _interpreter_blocks(m: int, n: int, k: int) -> dict[str, int]:
    """Fixed tiles for the interpreter: as large as the problem (<= 64) since each step costs Python time.
    Rows are masked in the 16-row tiles (up to 16 rows) and wrapped in taller ones, so tests run both ways
    and every row count up to 16 shares one binary."""

    def block(d: int) -> int:
        return min(64, max(16, triton.next_power_of_2(d)))

    return {"BLOCK_M": block(m), "BLOCK_N": block(n), "BLOCK_K": block(k), "GROUP_M": 8,
            "MASK_ROWS": block(m) == 16}


TMA_ENV_VAR = "MAAS_LINEAR_TMA"
SPLIT_K_ENV_VAR = "MAAS_LINEAR_SPLIT_K"
GEMV_ENV_VAR = "MAAS_LINEAR_GEMV"
TMA_SPLIT_K_ENV_VAR = "MAAS_LINEAR_TMA_SPLIT_K"
# Knobs whose ``auto`` is not the default: the TMA split-K kernel has not yet run on a GPU (its programs hand
# partial sums to each other through memory, which the interpreter, running programs one after another, cannot
# race), so it stays off until a GPU check has passed it.
_DEFAULT_SETTINGS = {TMA_SPLIT_K_ENV_VAR: "0"}
# Timing both kernels autotunes the TMA kernel's tiles on top of the tiled kernel's for every M bucket of a
# model, which lengthens its warm-up: only problems this large (multiply-adds) are worth it. On an H200 the TMA
# kernel was faster in graph replays from 8.6 G up (512 x 4,096 x 4,096: 25.4 against 31.3 us; MiniLM's
# 24,576 x 1,152 x 384: 55.9 against 62.7 us). On an H100 it also wins at 1.2 G, 512 x 3,072 x 768: 1.18x
# torch's matmul + bias + relu replayed (run 18), where the tiled kernel made 1.06x (run 16): from 1 G up.
# That keeps MiniLM's warm-up batches (up to 64 short texts, 0.6 G at most) on the tiled kernel alone.
TMA_MIN_MACS = 2**30
# Split-K is timed against the tiled kernel for at most this many rows (its fp32 partials hold MAX_SPLIT_K
# copies of the output: 16 MB at 128 x 4,096), for weights this large at least (elements; 8 Mi is 16 MB in
# bf16, over 5 us of streaming at 3 TB/s, enough to repay a second launch), and only where the tiled kernel's
# tiles (16 x 32 for up to 16 rows, SPLIT_K_TILE above) make fewer programs than the GPU has multiprocessors,
# so leave some idle. On an H100,
# in graph replays: inside these bounds split-K won (M = 1 and 16, N = K = 4,096: 13.1 against 17.9 us and 11.1
# against 12.0); outside, with 448 thin tiles (int8, N = 14,336), it won by 4% at M = 1 and lost by 16-21% at
# M = 4 and 16, and on a small weight (N = 3,072, K = 768) it lost 7.4 against 5.2 us. The timing decides
# within the bounds, which keep it out of warm-ups where it cannot pay (MiniLM's largest weight is 0.6 Mi).
# Up to 128 rows it can also be forced (``MAAS_LINEAR_SPLIT_K=1``), and `bench/kernels.py` times it there:
# at M = 128, N = K = 4,096 cuBLAS beat both other kernels (16.4 against 20.4 us).
SPLIT_K_MAX_M = 128
SPLIT_K_MIN_WEIGHT = 8 * 2**20
# Past 16 rows the tiles counted are 64 x 64, what the H200 picked at 128 rows (bench/results/gpu, run 4): at
# M = 128, N = K = 4,096 they make 128 programs for 132 multiprocessors, where cuBLAS beat both other kernels.
SPLIT_K_TILE = (64, 64)


@functools.cache
def _has_tma(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def _tma_aligned(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned base addresses and row strides."""
    return all(t.data_ptr() % 16 == 0 and t.shape[-1] * t.element_size() % 16 == 0 for t in tensors)


def _setting(env_var: str) -> str:
    """``auto``, ``1`` (force the kernel on where it can run) or ``0`` (never), from ``env_var``."""
    return env_choice(env_var, _DEFAULT_SETTINGS.get(env_var, "auto"), ("auto", "1", "0"))


def use_tma(x: torch.Tensor, weight: torch.Tensor, m: int) -> bool:
    """Whether the persistent TMA kernel may run (``MAAS_LINEAR_TMA``): forced with ``1``, or in ``auto`` a big
    enough problem on a Hopper GPU, where timing decides (``_choose_kernel``)."""
    choice = _setting(TMA_ENV_VAR)
    if choice == "0" or not weight.is_floating_point() or not _tma_aligned(x, weight):
        return False
    if choice == "1":
        return x.is_cuda or INTERPRETER
    return x.is_cuda and m * weight.shape[0] * weight.shape[1] >= TMA_MIN_MACS and _has_tma(x.device)


def use_split_k(x: torch.Tensor, weight: torch.Tensor, m: int) -> bool:
    """Whether the split-K kernel may run (``MAAS_LINEAR_SPLIT_K``): at most ``SPLIT_K_MAX_M`` rows, forced
    with ``1``, or in ``auto`` a GPU problem the tiled kernel leaves multiprocessors idle on (see above), where
    timing decides. Any weight dtype: int8 and fp8 weights at small M are what it is for."""
    choice = _setting(SPLIT_K_ENV_VAR)
    if choice == "0" or m > SPLIT_K_MAX_M:
        return False
    if choice == "1":
        return x.is_cuda or INTERPRETER
    return x.is_cuda and split_k_may_pay(m, *weight.shape, multiprocessors(x.device))


def split_k_may_pay(m: int, n: int, k: int, multiprocessors: int) -> bool:
    """The bounds above: worth timing split-K against the tiled kernel on a GPU with ``multiprocessors``."""
    rows, cols = SPLIT_K_TILE if m > 16 else (16, 32)
    return (m <= SPLIT_K_MAX_M and n * k >= SPLIT_K_MIN_WEIGHT
            and triton.cdiv(m, rows) * triton.cdiv(n, cols) < multiprocessors)


# The TMA split-K kernel's fp32 partials hold a copy of the output: at most this many outputs (16 MB of
# partials; 8 MB at 512 x 4,096, and the timing bound below keeps to 2.2 M outputs on an H100).
TMA_SPLIT_K_MAX_OUTPUTS = 2**22
TMA_SPLIT_K_TILE = (128, 256)  # its widest tile, whose count says whether splitting K may pay


def use_tma_split_k(x: torch.Tensor, weight: torch.Tensor, m: int) -> bool:
    """Whether the persistent TMA kernel with K split between programs may run (``MAAS_LINEAR_TMA_SPLIT_K``,
    off by default): at most ``TMA_SPLIT_K_MAX_OUTPUTS`` outputs of aligned float weights, forced with ``1``,
    or in ``auto`` a Hopper GPU problem of ``TMA_MIN_MACS`` or more that its wide tiles leave half the
    multiprocessors idle on (``tma_split_k_may_pay``), where timing decides."""
    choice = _setting(TMA_SPLIT_K_ENV_VAR)
    n, k = weight.shape
    if (choice == "0" or not weight.is_floating_point() or not _tma_aligned(x, weight)
            or m * n > TMA_SPLIT_K_MAX_OUTPUTS):
        return False
    if choice == "1":
        return x.is_cuda or INTERPRETER
    return (x.is_cuda and m * n * k >= TMA_MIN_MACS and _has_tma(x.device)
            and tma_split_k_may_pay(m, n, multiprocessors(x.device)))


def tma_split_k_may_pay(m: int, n: int, multiprocessors: int) -> bool:
    """Whether the widest tiles, their K split in two, still leave none of ``multiprocessors`` a second one."""
    rows, cols = TMA_SPLIT_K_TILE
    return 2 * triton.cdiv(m, rows) * triton.cdiv(n, cols) <= multiprocessors


# The GEMV kernel is timed against the others for a single row, on weights this large at least
# (elements; 1 Mi is 2 MB in bf16, under a microsecond of streaming at 3 TB/s: below that every kernel waits on
# its launch and the warm-up would time it for nothing). A judgement, not a measured crossover.
GEMV_MIN_WEIGHT = 2**20


def use_gemv(x: torch.Tensor, weight: torch.Tensor, m: int) -> bool:
    """Whether the GEMV kernel may run (``MAAS_LINEAR_GEMV``): one row (``GEMV_MAX_M``), forced with ``1``,
    or in ``auto`` a GPU problem with a weight of ``GEMV_MIN_WEIGHT`` elements or more, where timing decides.
    Any weight dtype."""
    choice = _setting(GEMV_ENV_VAR)
    if choice == "0" or m > GEMV_MAX_M:
        return False
    if choice == "1":
        return x.is_cuda or INTERPRETER
    return x.is_cuda and weight.numel() >= GEMV_MIN_WEIGHT


def kernel_candidates(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None, m: int) -> list[str]:
    """The kernels that may run a problem, the tiled one (which runs everything) first; TMA takes float weights
    only, as TMA split-K does."""
    return ["tiled", *(["tma"] if scales is None and use_tma(x, weight, m) else []),
            *(["tma_split_k"] if scales is None and use_tma_split_k(x, weight, m) else []),
            *(["split_k"] if use_split_k(x, weight, m) else []), *(["gemv"] if use_gemv(x, weight, m) else [])]


def kernel_key(x: torch.Tensor, weight: torch.Tensor, bias, activation: str, residual) -> tuple:
    """What a kernel choice holds for: device, dtypes, M bucket, N, K and epilogue."""
    n, k = weight.shape
    return (x.device, x.dtype, weight.dtype, triton.next_power_of_2(x.numel() // k), n, k, bias is not None,
            activation, residual is not None)


_KERNEL_CHOICE = TimedChoice("maas_linear_kernel", bucket_at=3)  # kernel_key's M bucket
FASTEST_KERNEL = _KERNEL_CHOICE.fastest  # kernel_key -> the kernel timed fastest there, of those that may run it


def _choose_kernel(x, weight, scales, x_scales, bias, activation, residual, y, m, n, k, meta) -> str:
    """The kernel that runs a problem (the launchers' arguments). One forced on (``1``) runs where it can.
    Otherwise, where several may (``auto``, on a GPU), each (with its own autotuned tiles) is timed once per
    ``kernel_key`` and the fastest kept (:class:`kernels._autotune.TimedChoice`): none wins everywhere. A warm
    model's bucket its warm-up missed is not timed but borrows the nearest bucket's choice where that kernel may
    run it, else takes the tiled kernel (which the warm-up ran wherever it timed no choice)."""
    candidates = kernel_candidates(x, weight, scales, m)
    forced = [name for name in candidates[1:] if _setting(_FORCING_ENV[name]) == "1"]
    if forced or len(candidates) == 1:
        return (forced or candidates)[0]
    key = kernel_key(x, weight, bias, activation, residual)
    scratch: list[torch.Tensor] = []  # y may be the residual (in place): timing must not touch it

    def time(name: str) -> float:
        scratch[:] = scratch or [torch.empty_like(y)]
        timed = (x, weight, scales, x_scales, bias, activation, residual, scratch[0], m, n, k, meta)
        return gpu_ms(lambda: _LAUNCHERS[name](*timed))

    return _KERNEL_CHOICE.choose(key, stored_key(key), candidates, time)


INTERPRETER_PROGRAMS = 4  # the persistent kernels' programs under the interpreter: each walks several tiles


def _tma_descriptors(x: torch.Tensor, weight: torch.Tensor, m: int, k: int, meta: dict):
    """X's and W's TMA descriptors, and ``meta`` for a TMA kernel. Their tile shapes are set per config (the
    autotuner's pre_hook), or here from the interpreter's fixed tiles, whose rows past M come as zeros from
    TMA: nothing to mask."""
    x_desc = TensorDescriptor.from_tensor(x.view(m, k), [1, 1])
    w_desc = TensorDescriptor.from_tensor(weight, [1, 1])
    if meta:
        meta = {name: v for name, v in meta.items() if name != "MASK_ROWS"}
        _set_tile_shapes({"x_desc": x_desc, "w_desc": w_desc, **meta})
    return x_desc, w_desc, meta


def _launch_tma(x, weight, scales, x_scales, bias, activation, residual, y, m, n, k, meta) -> None:
    """The persistent kernel: as many programs as multiprocessors (or tiles, when fewer). No int8 scales."""
    num_programs = multiprocessors(x.device) if x.is_cuda else INTERPRETER_PROGRAMS
    x_desc, w_desc, meta = _tma_descriptors(x, weight, m, k, meta)

    def grid(config: dict) -> tuple[int]:
        return (min(num_programs, triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"])),)

    _linear_tma_kernel[grid](
        x_desc, w_desc, bias, residual, y,
        m, n, k, triton.next_power_of_2(m),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, ACTIVATION=activation, UPCAST=INTERPRETER,
        NUM_PROGRAMS=num_programs,
        **meta, **pdl(x),
    )


# The TMA split-K kernel's programs under the interpreter, which runs them one after another: with an odd
# count, the first half of a tile to end is its second at some tiles.
INTERPRETER_SPLIT_PROGRAMS = 3


def _launch_tma_split_k(x, weight, scales, x_scales, bias, activation, residual, y, m, n, k, meta) -> None:
    """The persistent TMA kernel with each tile's K split in two halves (``_TMA_SPLIT_K_CONFIGS``). The fp32
    partials (one a tile) and arrival counts have room for whichever config the autotuner runs; the counts
    start at zero (one small memset a launch: a buffer kept between launches would be shared by whatever
    streams and CUDA graphs launch the kernel, at once)."""
    num_programs = multiprocessors(x.device) if x.is_cuda else INTERPRETER_SPLIT_PROGRAMS
    x_desc, w_desc, meta = _tma_descriptors(x, weight, m, k, meta)
    configs = [meta] if meta else [c.kwargs for c in _TMA_SPLIT_K_CONFIGS]

    def tiles(config: dict) -> int:
        return triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"])

    partials = torch.empty(max(tiles(c) * c["BLOCK_M"] * c["BLOCK_N"] for c in configs), dtype=torch.float32,
                           device=x.device)
    arrivals = torch.zeros(max(tiles(c) for c in configs), dtype=torch.int32, device=x.device)

    def grid(config: dict) -> tuple[int]:
        return (min(num_programs, 2 * tiles(config)),)

    _linear_tma_split_k_kernel[grid](
        x_desc, w_desc, bias, residual, y, partials, arrivals,
        m, n, k, triton.next_power_of_2(m),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, ACTIVATION=activation, UPCAST=INTERPRETER,
        NUM_PROGRAMS=num_programs,
        **meta, **pdl(x),
    )


def _launch_tiled(x, weight, scales, x_scales, bias, activation, residual, y, m, n, k, meta) -> None:
    def grid(config: dict) -> tuple[int]:  # called with the autotuner's chosen config
        return (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)

    _linear_kernel[grid](
        x, weight, scales, x_scales, bias, residual, y,
        m, n, k, triton.next_power_of_2(m),
        HAS_SCALE=scales is not None, HAS_X_SCALE=x_scales is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        ACTIVATION=activation, UPCAST=INTERPRETER,
        **meta, **pdl(x),
    )


INTERPRETER_SPLIT_K = 3  # uneven runs of K, and an empty last one when K has 4 tiles or fewer


def _launch_split_k(x, weight, scales, x_scales, bias, activation, residual, y, m, n, k, meta) -> None:
    """Partial sums over runs of K into fp32 slabs, then one reduction applying the epilogue."""
    if meta:  # the interpreter's fixed tiles
        meta = {"BLOCK_M": meta["BLOCK_M"], "BLOCK_N": meta["BLOCK_N"], "BLOCK_K": meta["BLOCK_K"],
                "SPLIT_K": INTERPRETER_SPLIT_K, "MASK_ROWS": meta["MASK_ROWS"]}
    partials = torch.empty((meta.get("SPLIT_K", MAX_SPLIT_K), m, n), dtype=torch.float32, device=x.device)
    splits = []  # autotuned, the split it ran with: the grid is called last with the autotuner's pick

    def grid(config: dict) -> tuple[int, int]:
        splits.append(config["SPLIT_K"])
        return triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]), config["SPLIT_K"]

    _linear_split_k_kernel[grid](
        x, weight, partials,
        m, n, k, triton.next_power_of_2(m),
        HAS_SCALE=scales is not None, UPCAST=INTERPRETER,
        **meta, **pdl(x),
    )
    # One tile shape for every batch (one binary): rows past M are masked, and these sums are small.
    _split_k_reduce_kernel[(triton.cdiv(m, 16), triton.cdiv(n, 128))](
        partials, scales, x_scales, bias, residual, y,
        m, n, meta.get("SPLIT_K") or splits[-1],
        HAS_SCALE=scales is not None, HAS_X_SCALE=x_scales is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, ACTIVATION=activation,
        BLOCK_M=16, BLOCK_N=128, **pdl(x),
    )


INTERPRETER_GEMV_BLOCKS = {"BLOCK_N": 16, "BLOCK_K": 64}


def _launch_gemv(x, weight, scales, x_scales, bias, activation, residual, y, m, n, k, meta) -> None:
    """A CUDA-core matrix-vector product for a single row of x (any weight dtype)."""
    if meta:  # the interpreter's fixed tiles
        meta = INTERPRETER_GEMV_BLOCKS

    def grid(config: dict) -> tuple[int]:
        return (triton.cdiv(n, config["BLOCK_N"]),)

    _linear_gemv_kernel[grid](
        x, weight, scales, x_scales, bias, residual, y,
        n, k,
        HAS_SCALE=scales is not None, HAS_X_SCALE=x_scales is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, ACTIVATION=activation, X_VECTOR=16 // x.element_size(),
        **meta, **pdl(x),
    )


_LAUNCHERS = {"tiled": _launch_tiled, "tma": _launch_tma, "tma_split_k": _launch_tma_split_k,
              "split_k": _launch_split_k, "gemv": _launch_gemv}
_FORCING_ENV = {"tma": TMA_ENV_VAR, "tma_split_k": TMA_SPLIT_K_ENV_VAR, "split_k": SPLIT_K_ENV_VAR,
                "gemv": GEMV_ENV_VAR}


def launch_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str,
    residual: torch.Tensor | None,
    out: torch.Tensor | None,
    *,
    kernel: str | None = None,
    x_scales: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Run a kernel on validated contiguous tensors; ``x`` is ``[..., K]``, the output ``[..., N]``, of
    ``out_dtype`` (default: x's). ``kernel`` forces one (``tiled``; ``tma`` and ``tma_split_k``, for aligned
    float weights; ``split_k``; ``gemv``, for one row); None lets ``MAAS_LINEAR_TMA``,
    ``MAAS_LINEAR_TMA_SPLIT_K``, ``MAAS_LINEAR_SPLIT_K``, ``MAAS_LINEAR_GEMV`` and the timings decide.
    ``x_scales`` (fp32, one per row of x) go with fp8 x and weights, whose ``scales`` are per output channel."""
    if kernel is not None and kernel not in _LAUNCHERS:
        raise ValueError(f"kernel must be one of {tuple(_LAUNCHERS)} or None, got {kernel!r}")
    if kernel in ("tma", "tma_split_k") and scales is not None:
        raise ValueError(f"kernel={kernel!r} takes float weights only (no scales)")
    n, k = weight.shape
    m = x.numel() // k
    if kernel == "gemv" and m > GEMV_MAX_M:
        raise ValueError(f"kernel='gemv' takes a single row of x, got {m} rows")
    if kernel in ("tma", "tma_split_k") and not _tma_aligned(x, weight):
        raise ValueError(f"kernel={kernel!r} takes x and weight with 16-byte aligned rows and data (TMA), got "
                         f"rows of {k * x.element_size()} bytes")
    if kernel == "tma_split_k" and m * n > TMA_SPLIT_K_MAX_OUTPUTS:
        raise ValueError(f"kernel='tma_split_k' takes at most {TMA_SPLIT_K_MAX_OUTPUTS:,} outputs (its fp32 "
                         f"partial sums hold a copy of them), got {m:,} x {n:,}")
    y = output(out, (*x.shape[:-1], n), x if out_dtype is None else x.new_empty(0, dtype=out_dtype), x=x,
               weight=weight, bias=bias)  # out=residual is fine: each element is read once, then written
    if max(x.numel(), weight.numel(), y.numel()) > MAX_ELEMENTS:
        raise ValueError(f"x, weight and the output must each hold at most {MAX_ELEMENTS:,} elements (the kernels "
                         f"index in 32 bits), got {x.numel():,}, {weight.numel():,} and {y.numel():,}")
    if m == 0 or n == 0:
        return y
    meta = {} if USE_AUTOTUNE else _interpreter_blocks(m, n, k)
    args = (x, weight, scales, x_scales, bias, activation, residual, y, m, n, k, meta)
    _LAUNCHERS[kernel or _choose_kernel(*args)](*args)
    return y


def _validate(x, weight, bias, activation, residual) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., K] with K >= 1, got shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [N, K={x.shape[-1]}] (Linear layout), got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, shape=(weight.shape[0],), dtypes=(x.dtype,), device=x.device)
    check_activation(activation)
    if residual is not None:
        check_tensor("residual", residual, shape=(*x.shape[:-1], weight.shape[0]), dtypes=(x.dtype,),
                     device=x.device)


def linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton launcher: validates (contiguity included), picks tiles and grid, runs the kernel."""
    _validate(x, weight, bias, activation, residual)
    check_contiguous(x=x, weight=weight, bias=bias, residual=residual)
    return launch_linear(x, weight, None, bias, activation, residual, out)


def linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch: computed in fp32 (or fp64 for fp64 inputs), returned in ``x.dtype``."""
    dt = compute_dtype(x)
    y = torch.nn.functional.linear(cast(x, dt), cast(weight, dt), None if bias is None else cast(bias, dt))
    y = activation_reference(y, activation)
    if residual is not None:
        y = y + cast(residual, dt)
    return cast(y, x.dtype)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x @ weight^T + bias) + residual``.

    x ``[..., K]``, weight ``[N, K]`` (torch Linear layout), bias ``[N]``, residual ``[..., N]``, all of one
    dtype (fp32, bf16 or fp16); the result has x's dtype, accumulated in fp32. ``activation`` is one of
    ``none``, ``relu``, ``gelu`` (exact erf form), ``tanh``, ``sigmoid``; the residual is added after it.
    On a GPU fp32 inputs use TF32 tensor cores (Triton's default for ``tl.dot``).
    """
    _validate(x, weight, bias, activation, residual)
    if backend_for(x, weight, bias, residual) == "torch":
        return into(out, linear_reference(x, weight, bias, activation, residual))
    return launch_linear(
        x.contiguous(), weight.contiguous(), None, None if bias is None else bias.contiguous(), activation,
        None if residual is None else residual.contiguous(), out,
    )
