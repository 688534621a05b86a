"""``LayerNorm(x @ W^T + b + residual)``: a post-LN transformer block's projection, residual add and norm in
one kernel.

Each half of a BERT block ends with a projection, a residual add and a LayerNorm. Run apart, the projection
writes its output and the LayerNorm reads it back beside the residual: for MiniLM at 24,576 tokens, 19 MB
each way, twice a layer. Here a program owns whole output rows, at most ``MAX_N`` columns, so its epilogue
holds every column of its rows: bias, residual, then the LayerNorm on the fp32 accumulators (the sum is not
rounded before the norm) and one store. A wide row is up to ``MAX_CHUNKS`` column blocks of ``CHUNK_N``
(:func:`row_chunks`), each with its own accumulator and all fed by one load of each X tile: MiniLM's 384
columns are three blocks of 128, where one power-of-two block would pad them to 512 and spend a third more
tensor-core work on the padding. The rows a tile holds are bounded by the registers the accumulators take
(:func:`tiles`). Whether fusing pays depends on the shape, so on a GPU both ways are timed once per shape and
M bucket (:class:`kernels._autotune.TimedChoice`, stored and borrowed as the GEMM kernel choice is);
``MAAS_LINEAR_LAYER_NORM`` can force either (``1``: fused wherever N fits, the interpreter included; ``0``:
never).

Weights may be int8 with per-output-channel scales (``scales``), as in :mod:`kernels.linear_int8`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._autotune import TimedChoice, gpu_ms, stored_key
from kernels._common import (
    FLOAT_DTYPES,
    check_contiguous,
    check_tensor,
    compute_dtype,
    dequantize,
    into,
    output,
    pdl_launch_dependents,
    pdl_wait,
)
from kernels.dispatch import INTERPRETER, backend_for, env_choice, pdl
from kernels.layer_norm import _launch as launch_layer_norm
from kernels.layer_norm import layer_norm_reference, scale_shift
from kernels.linear import (
    SHARED_MEMORY,
    _interpreter_blocks,
    _scale_tile,
    launch_linear,
    linear_reference,
)

CHUNK_N = 128  # columns of one accumulator block
MAX_CHUNKS = 4
MAX_N = CHUNK_N * MAX_CHUNKS
ENV_VAR = "MAAS_LINEAR_LAYER_NORM"
# fp32 registers a thread may give the accumulators of a [BLOCK_M, row] tile on 8 warps. sm_90 ptxas: 64 x 512 in
# one block (128 a thread) spilled 40-72 bytes a thread in the epilogue; 64 x 384 in three blocks of 128 (96 a
# thread) spills nothing (bench/results/kernel_registers_sm90.txt).
ACCUMULATOR_REGISTERS = 128
SMALL_M = 32  # up to this many rows: 16-row tiles, rows past M masked (forced only, see _choose)


def row_chunks(n: int) -> tuple[int, int]:
    """``(chunks, block_n)``: a row of ``n`` columns as one power-of-two block (>= 16, for ``tl.dot``) where that
    pads no more than blocks of ``CHUNK_N`` would (up to ``2 * CHUNK_N`` columns), else as blocks of ``CHUNK_N``:
    40 is 1 x 64, 256 is 1 x 256, 300 is 3 x 128, 384 is 3 x 128 (not 512)."""
    single = max(16, triton.next_power_of_2(n))
    return (1, single) if single <= 2 * CHUNK_N else (triton.cdiv(n, CHUNK_N), CHUNK_N)


def tiles(m: int, n: int, element_size: int) -> dict:
    """The fused kernel's tiles on a GPU, by rule rather than autotuned: whether it runs at all is timed per M
    bucket against the separate ops, and tuning its tiles per bucket too would add a tuning round to every
    bucket of every warm-up. Rows: 16 (masked) for a few, else the most (a power of two, at most 128) whose
    accumulators for the whole padded row take ``ACCUMULATOR_REGISTERS`` a thread on 8 warps (64 for 384 or
    512 columns, 128 for 256; half that in fp32, whose operands take more registers: ptxas spilled 276-724 bytes
    a thread otherwise); then the deepest K tile and pipeline that fit in shared memory."""
    chunks, block_n = row_chunks(n)
    width = chunks * block_n
    registers = ACCUMULATOR_REGISTERS if element_size <= 2 else ACCUMULATOR_REGISTERS // 2  # fp32 (TF32) operands
    if m <= SMALL_M:
        block_m, warps = 16, 4
    else:
        fit = registers * 32 * 8 // width
        block_m, warps = min(128, 1 << (fit.bit_length() - 1)), 8
    for block_k, stages in ((64, 3), (64, 2), (32, 3), (32, 2), (16, 2)):
        if (block_m + width) * block_k * element_size * stages <= SHARED_MEMORY:
            break
    return {"BLOCK_M": block_m, "BLOCK_K": block_k, "MASK_ROWS": block_m == 16, "num_warps": warps,
            "num_stages": stages}


@triton.jit
def _chunk_dot(a, w_ptrs, acc, k_ok, HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr):
    """One K step of one column block: ``acc + a @ W^T tile``."""
    w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
    if UPCAST:  # the interpreter computes bf16 wrongly: its math in fp32 (a is upcast already)
        w = w.to(tl.float32)
    elif HAS_SCALE:
        w = w.to(a.dtype)  # int8 -> fp16/bf16 is exact for |q| <= 127
    return tl.dot(a, w, acc)


@triton.jit
def _pre_norm(acc, offs_m, cols, M, N, s_ptr, b_ptr, r_ptr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One column block of the sum the norm takes: scaled (int8), + bias + residual; zero outside the rows
    and columns."""
    acc = _scale_tile(acc, offs_m, cols, M, N, s_ptr, s_ptr, HAS_SCALE, False)
    col_ok = cols < N
    ok = (offs_m < M)[:, None] & col_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc += tl.load(r_ptr + offs_m[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, acc, 0.0)


@triton.jit
def _squares(z, mean, offs_m, cols, M, N):
    """Per row, the sum of one block's squared deviations from the mean (two passes: no cancellation)."""
    ok = (offs_m < M)[:, None] & (cols < N)[None, :]
    centered = tl.where(ok, z - mean[:, None], 0.0)
    return tl.sum(centered * centered, axis=1)


@triton.jit
def _store_normalized(z, mean, rstd, offs_m, cols, M, N, nw_ptr, nb_ptr, y_ptr):
    col_ok = cols < N
    y = scale_shift(z - mean[:, None], rstd, cols, col_ok, nw_ptr, nb_ptr)
    ok = (offs_m < M)[:, None] & col_ok[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["M"])  # rows: see kernels._common
def _linear_layer_norm_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, r_ptr, nw_ptr, nb_ptr, y_ptr,
    M, N, K, eps,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, CHUNKS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, MASK_ROWS: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    cols0 = tl.arange(0, BLOCK_N)  # the row's column blocks; the unused ones (CHUNKS < 4) compile away
    cols1 = cols0 + BLOCK_N
    cols2 = cols1 + BLOCK_N
    cols3 = cols2 + BLOCK_N
    # Wrapping rows/columns keeps every load in bounds without a mask; the stores are masked. MASK_ROWS: rows
    # past M load nothing instead (the 16-row tiles of a few rows).
    m_ok = offs_m < M
    x_ptrs = x_ptr + (offs_m % M)[:, None] * K + offs_k[None, :]
    w_ptrs0 = w_ptr + (cols0 % N)[None, :] * K + offs_k[:, None]  # W^T tiles: [BLOCK_K, BLOCK_N]
    w_ptrs1 = w_ptr + (cols1 % N)[None, :] * K + offs_k[:, None]
    w_ptrs2 = w_ptr + (cols2 % N)[None, :] * K + offs_k[:, None]
    w_ptrs3 = w_ptr + (cols3 % N)[None, :] * K + offs_k[:, None]
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        if MASK_ROWS:
            a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        acc0 = _chunk_dot(a, w_ptrs0, acc0, k_ok, HAS_SCALE, UPCAST)
        if CHUNKS > 1:
            acc1 = _chunk_dot(a, w_ptrs1, acc1, k_ok, HAS_SCALE, UPCAST)
        if CHUNKS > 2:
            acc2 = _chunk_dot(a, w_ptrs2, acc2, k_ok, HAS_SCALE, UPCAST)
        if CHUNKS > 3:
            acc3 = _chunk_dot(a, w_ptrs3, acc3, k_ok, HAS_SCALE, UPCAST)
        x_ptrs += BLOCK_K
        w_ptrs0 += BLOCK_K
        w_ptrs1 += BLOCK_K
        w_ptrs2 += BLOCK_K
        w_ptrs3 += BLOCK_K
    acc0 = _pre_norm(acc0, offs_m, cols0, M, N, s_ptr, b_ptr, r_ptr, HAS_SCALE, HAS_BIAS)
    total = tl.sum(acc0, axis=1)
    if CHUNKS > 1:
        acc1 = _pre_norm(acc1, offs_m, cols1, M, N, s_ptr, b_ptr, r_ptr, HAS_SCALE, HAS_BIAS)
        total += tl.sum(acc1, axis=1)
    if CHUNKS > 2:
        acc2 = _pre_norm(acc2, offs_m, cols2, M, N, s_ptr, b_ptr, r_ptr, HAS_SCALE, HAS_BIAS)
        total += tl.sum(acc2, axis=1)
    if CHUNKS > 3:
        acc3 = _pre_norm(acc3, offs_m, cols3, M, N, s_ptr, b_ptr, r_ptr, HAS_SCALE, HAS_BIAS)
        total += tl.sum(acc3, axis=1)
    mean = total / N
    squares = _squares(acc0, mean, offs_m, cols0, M, N)
    if CHUNKS > 1:
        squares += _squares(acc1, mean, offs_m, cols1, M, N)
    if CHUNKS > 2:
        squares += _squares(acc2, mean, offs_m, cols2, M, N)
    if CHUNKS > 3:
        squares += _squares(acc3, mean, offs_m, cols3, M, N)
    rstd = 1.0 / tl.sqrt(squares / N + eps)
    _store_normalized(acc0, mean, rstd, offs_m, cols0, M, N, nw_ptr, nb_ptr, y_ptr)
    if CHUNKS > 1:
        _store_normalized(acc1, mean, rstd, offs_m, cols1, M, N, nw_ptr, nb_ptr, y_ptr)
    if CHUNKS > 2:
        _store_normalized(acc2, mean, rstd, offs_m, cols2, M, N, nw_ptr, nb_ptr, y_ptr)
    if CHUNKS > 3:
        _store_normalized(acc3, mean, rstd, offs_m, cols3, M, N, nw_ptr, nb_ptr, y_ptr)
    pdl_launch_dependents(USE_PDL)


def _validate(x, weight, scales, bias, residual, norm_weight, norm_bias) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., K] with K >= 1, got shape {tuple(x.shape)}")
    if scales is None:
        check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    else:
        check_tensor("weight", weight, ndim=2, dtypes=(torch.int8,), device=x.device)
        check_tensor("scales", scales, shape=weight.shape[:1], dtypes=(torch.float32,), device=x.device)
    n, k = weight.shape
    if k != x.shape[-1] or n < 1:
        raise ValueError(f"weight must be [N >= 1, K={x.shape[-1]}] (Linear layout), got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, shape=(n,), dtypes=(x.dtype,), device=x.device)
    check_tensor("norm_weight", norm_weight, shape=(n,), dtypes=(x.dtype,), device=x.device)
    check_tensor("norm_bias", norm_bias, shape=(n,), dtypes=(x.dtype,), device=x.device)
    check_tensor("residual", residual, shape=(*x.shape[:-1], n), dtypes=(x.dtype,), device=x.device)


def use_fused(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused kernel may run (``MAAS_LINEAR_LAYER_NORM``): rows of at most ``MAX_N``; forced with
    ``1``, or in ``auto`` on a GPU, where timing decides."""
    choice = env_choice(ENV_VAR, "auto", ("auto", "1", "0"))
    if choice == "0" or weight.shape[0] > CHUNK_N * MAX_CHUNKS:
        return False
    return x.is_cuda or (choice == "1" and INTERPRETER)


def _launch_fused(x, weight, scales, bias, residual, norm_weight, norm_bias, eps, y, m, n, k) -> None:
    if INTERPRETER:  # the GEMM's fixed interpreter tiles, but for N: the whole row is the tile here
        blocks = _interpreter_blocks(m, n, k)
        meta = {name: blocks[name] for name in ("BLOCK_M", "BLOCK_K", "MASK_ROWS")}
    else:
        meta = tiles(m, n, x.element_size())
    chunks, block_n = row_chunks(n)
    _linear_layer_norm_kernel[(triton.cdiv(m, meta["BLOCK_M"]),)](
        x, weight, scales, bias, residual, norm_weight, norm_bias, y, m, n, k, eps,
        HAS_SCALE=scales is not None, HAS_BIAS=bias is not None, UPCAST=INTERPRETER, CHUNKS=chunks,
        BLOCK_N=block_n, **meta, **pdl(x),
    )


def _launch_separate(x, weight, scales, bias, residual, norm_weight, norm_bias, eps, y, m, n, k) -> None:
    projected = launch_linear(x, weight, scales, bias, "none", None, None)
    launch_layer_norm(projected, norm_weight, norm_bias, eps, residual, y)  # inputs validated by the caller


_LAUNCHERS = {"separate": _launch_separate, "fused": _launch_fused}
_CHOICE = TimedChoice("maas_linear_layer_norm", bucket_at=3)  # the key's M bucket


def _choose(x, weight, scales, bias, residual, norm_weight, norm_bias, eps, y, m, n, k) -> str:
    """Fused or separate: forced, or timed (``auto``). Up to ``SMALL_M`` rows the fused kernel is one program
    streaming the whole weight alone, while the GEMM spreads it over many: the separate ops run untimed."""
    if not use_fused(x, weight):
        return "separate"
    if env_choice(ENV_VAR, "auto", ("auto", "1", "0")) == "1":
        return "fused"
    if m <= SMALL_M:
        return "separate"
    key = (x.device, x.dtype, weight.dtype, triton.next_power_of_2(m), n, k, bias is not None)

    def time(name: str) -> float:
        scratch = torch.empty_like(y)  # y may be the residual (in place): timing must not touch it
        return gpu_ms(lambda: _LAUNCHERS[name](x, weight, scales, bias, residual, norm_weight, norm_bias, eps,
                                               scratch, m, n, k))

    return _CHOICE.choose(key, stored_key(key), list(_LAUNCHERS), time)


def _launch(x, weight, scales, bias, residual, norm_weight, norm_bias, eps, out) -> torch.Tensor:
    n, k = weight.shape
    m = x.numel() // k
    # out=residual (or x) is fine: a program reads its own rows of them, and all of the weight and vectors
    y = output(out, residual.shape, residual, weight=weight, scales=scales, bias=bias, norm_weight=norm_weight,
               norm_bias=norm_bias)
    if m == 0:
        return y
    args = (x, weight, scales, bias, residual, norm_weight, norm_bias, eps, y, m, n, k)
    _LAUNCHERS[_choose(*args)](*args)
    return y


def linear_layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             residual: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                             eps: float = 1e-5, *, scales: torch.Tensor | None = None,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton launcher (contiguous inputs only)."""
    _validate(x, weight, scales, bias, residual, norm_weight, norm_bias)
    check_contiguous(x=x, weight=weight, scales=scales, bias=bias, residual=residual, norm_weight=norm_weight,
                     norm_bias=norm_bias)
    return _launch(x, weight, scales, bias, residual, norm_weight, norm_bias, eps, out)


def linear_layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                residual: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                                eps: float = 1e-5, *, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: the linear layer plus the residual (int8 weights dequantized first), then the LayerNorm."""
    if scales is not None:
        weight = dequantize(weight, scales, compute_dtype(x))
    return layer_norm_reference(linear_reference(x, weight, bias, "none", residual), norm_weight, norm_bias, eps)


def linear_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                      norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float = 1e-5, *,
                      scales: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``LayerNorm(x @ weight^T + bias + residual)`` over the last dim: x ``[..., K]``, weight ``[N, K]`` (float
    in x's dtype, or int8 with fp32 ``scales [N]``), bias, norm_weight and norm_bias ``[N]``, residual
    ``[..., N]``; the result has x's dtype."""
    _validate(x, weight, scales, bias, residual, norm_weight, norm_bias)
    if backend_for(x, weight, bias, residual, norm_weight, norm_bias) == "torch":
        return into(out, linear_layer_norm_reference(x, weight, bias, residual, norm_weight, norm_bias, eps,
                                                     scales=scales))

    def dense(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.contiguous()

    return _launch(dense(x), dense(weight), dense(scales), dense(bias), dense(residual), dense(norm_weight),
                   dense(norm_bias), eps, out)
