"""``LayerNorm(x @ W^T + b + residual)``: a post-LN transformer block's projection, residual add and norm in
one kernel.

Each half of a BERT block ends with a projection, a residual add and a LayerNorm. Run apart, the projection
writes its output and the LayerNorm reads it back beside the residual: for MiniLM at 24,576 tokens, 19 MB
each way, twice a layer. Here a program owns whole output rows (``BLOCK_N``: N rounded up to a power of two,
at most ``MAX_N``), so its epilogue holds every column of its rows: bias, residual, then
:func:`kernels.layer_norm.normalize_rows` on the fp32 accumulator (the sum is not rounded before the norm)
and one store. The price: the row padded to a power of two (MiniLM's 384 to 512, a third more tensor-core
work) and tiles of at most 64 rows, to keep the whole-row accumulator in registers (:func:`tiles`). Whether
that pays depends on the shape, so on a GPU both ways are timed once per shape and M bucket
(:class:`kernels._autotune.TimedChoice`, stored and borrowed as the GEMM kernel choice is);
``MAAS_LINEAR_LAYER_NORM`` can force either (``1``: fused wherever N fits, the interpreter included; ``0``:
never).

Weights may be int8 with per-output-channel scales (``scales``), as in :mod:`kernels.linear_int8`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._autotune import TimedChoice, gpu_ms
from kernels._common import FLOAT_DTYPES, check_contiguous, check_tensor, compute_dtype, dequantize, into, output
from kernels.dispatch import INTERPRETER, backend_for, env_choice
from kernels.layer_norm import _launch as launch_layer_norm
from kernels.layer_norm import layer_norm_reference, normalize_rows
from kernels.linear import (
    SHARED_MEMORY,
    _dot_tiles,
    _interpreter_blocks,
    _scale_tile,
    launch_linear,
    linear_reference,
    stored_key,
)

MAX_N = 512
ENV_VAR = "MAAS_LINEAR_LAYER_NORM"
# fp32 registers a thread may give the [BLOCK_M, BLOCK_N] accumulator: 64 x 512 on 8 warps (128 a thread)
# spills only in the epilogue, 40-72 bytes a thread (sm_90 ptxas; bench/results/kernel_registers_sm90.txt).
ACCUMULATOR_REGISTERS = 128
SMALL_M = 32  # up to this many rows: 16-row tiles, rows past M masked (forced only, see _choose)


def tiles(m: int, n: int, element_size: int) -> dict:
    """The fused kernel's tiles on a GPU, by rule rather than autotuned: whether it runs at all is timed per M
    bucket against the separate ops, and tuning its tiles per bucket too would add a tuning round to every
    bucket of every warm-up. Rows: 16 (masked) for a few, else as many as a whole-row accumulator of
    ``ACCUMULATOR_REGISTERS`` a thread allows on 8 warps (64 for 512 columns, 128 for 256; half that in fp32,
    whose operands take more registers: ptxas spilled 276-724 bytes a thread otherwise); then the deepest K tile
    and pipeline that fit in shared memory."""
    block_n = max(16, triton.next_power_of_2(n))
    registers = ACCUMULATOR_REGISTERS if element_size <= 2 else ACCUMULATOR_REGISTERS // 2  # fp32 (TF32) operands
    if m <= SMALL_M:
        block_m, warps = 16, 4
    else:
        block_m, warps = min(128, registers * 32 * 8 // block_n), 8
    for block_k, stages in ((64, 3), (64, 2), (32, 3), (32, 2), (16, 2)):
        if (block_m + block_n) * block_k * element_size * stages <= SHARED_MEMORY:
            break
    return {"BLOCK_M": block_m, "BLOCK_K": block_k, "MASK_ROWS": block_m == 16, "num_warps": warps,
            "num_stages": stages}


@triton.jit(do_not_specialize=["M"])  # rows: see kernels._common
def _linear_layer_norm_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, r_ptr, nw_ptr, nb_ptr, y_ptr,
    M, N, K, eps,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, MASK_ROWS: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)  # the whole row: columns past N wrap onto real ones in _dot_tiles
    acc = _dot_tiles(x_ptr, w_ptr, offs_m, offs_n, M, N, K, 0, tl.cdiv(K, BLOCK_K),
                     HAS_SCALE, UPCAST, MASK_ROWS, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = _scale_tile(acc, offs_m, offs_n, M, N, s_ptr, s_ptr, HAS_SCALE, False)
    n_ok = offs_n < N
    ok = (offs_m < M)[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    offs = offs_m[:, None] * N + offs_n[None, :]
    acc += tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = normalize_rows(tl.where(ok, acc, 0.0), ok, offs_n, n_ok, nw_ptr, nb_ptr, N, eps)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


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
    if k != x.shape[-1]:
        raise ValueError(f"weight must be [N, K={x.shape[-1]}] (Linear layout), got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, shape=(n,), dtypes=(x.dtype,), device=x.device)
    check_tensor("norm_weight", norm_weight, shape=(n,), dtypes=(x.dtype,), device=x.device)
    check_tensor("norm_bias", norm_bias, shape=(n,), dtypes=(x.dtype,), device=x.device)
    check_tensor("residual", residual, shape=(*x.shape[:-1], n), dtypes=(x.dtype,), device=x.device)


def use_fused(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused kernel may run (``MAAS_LINEAR_LAYER_NORM``): rows of at most ``MAX_N``; forced with
    ``1``, or in ``auto`` on a GPU, where timing decides."""
    choice = env_choice(ENV_VAR, "auto", ("auto", "1", "0"))
    if choice == "0" or weight.shape[0] > MAX_N:
        return False
    return x.is_cuda or (choice == "1" and INTERPRETER)


def _launch_fused(x, weight, scales, bias, residual, norm_weight, norm_bias, eps, y, m, n, k) -> None:
    if INTERPRETER:  # the GEMM's fixed interpreter tiles, but for N: the whole row is the tile here
        blocks = _interpreter_blocks(m, n, k)
        meta = {name: blocks[name] for name in ("BLOCK_M", "BLOCK_K", "MASK_ROWS")}
    else:
        meta = tiles(m, n, x.element_size())
    _linear_layer_norm_kernel[(triton.cdiv(m, meta["BLOCK_M"]),)](
        x, weight, scales, bias, residual, norm_weight, norm_bias, y, m, n, k, eps,
        HAS_SCALE=scales is not None, HAS_BIAS=bias is not None, UPCAST=INTERPRETER,
        BLOCK_N=max(16, triton.next_power_of_2(n)), **meta,
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
    y = output(out, residual.shape, residual)
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
