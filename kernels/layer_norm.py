"""Layer normalization over the last dimension, optionally of ``x + residual`` (post-LN transformer blocks).

A program holds a tile of whole rows in registers (several short ones, ``rows_per_program``, loading the
weight and bias once for them all): mean and variance come from the same load (two-pass in registers, so no
``E[x^2] - E[x]^2`` cancellation), and the residual add is fused instead of a separate elementwise kernel
writing ``x + residual`` to memory first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import (
    FLOAT_DTYPES,
    cast,
    check_contiguous,
    check_tensor,
    compute_dtype,
    into,
    output,
    pdl_launch_dependents,
    pdl_wait,
    row_block,
    rows_per_program,
)
from kernels.dispatch import backend_for, pdl

MAX_ROW = 65536


@triton.jit(do_not_specialize=["M"])  # rows: see kernels._common
def _layer_norm_kernel(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, M, N, eps, HAS_RESIDUAL: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_wait(USE_PDL)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < N
    ok = (rows < M)[:, None] & col_ok[None, :]
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = normalize_rows(x, ok, cols, col_ok, w_ptr, b_ptr, N, eps)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)
    pdl_launch_dependents(USE_PDL)


@triton.jit
def normalize_rows(x, ok, cols, col_ok, w_ptr, b_ptr, N, eps):
    """LayerNorm of a ``[ROWS, BLOCK]`` fp32 tile whose entries outside ``ok`` are 0, scaled by the weight and
    shifted by the bias at ``cols``: mean and variance from the same registers (two passes, so no
    ``E[x^2] - E[x]^2`` cancellation). Shared with :mod:`kernels.embedding_norm`."""
    mean = tl.sum(x, axis=1) / N
    centered = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / N + eps)
    return scale_shift(centered, rstd, cols, col_ok, w_ptr, b_ptr)


@triton.jit
def scale_shift(centered, rstd, cols, col_ok, w_ptr, b_ptr):
    """The end of a LayerNorm: ``centered * rstd`` (one per row), scaled by the weight and shifted by the bias
    at ``cols``. Shared with :mod:`kernels.linear_layer_norm`, which normalizes a row block by block."""
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return centered * rstd[:, None] * w[None, :] + b[None, :]


def _validate(x, weight, bias, residual) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or not 1 <= x.shape[-1] <= MAX_ROW:
        raise ValueError(f"x must be [..., N] with 1 <= N <= {MAX_ROW}, got shape {tuple(x.shape)}")
    check_tensor("weight", weight, shape=x.shape[-1:], dtypes=(x.dtype,), device=x.device)
    check_tensor("bias", bias, shape=x.shape[-1:], dtypes=(x.dtype,), device=x.device)
    if residual is not None:
        check_tensor("residual", residual, shape=x.shape, dtypes=(x.dtype,), device=x.device)


def _launch(x, weight, bias, eps, residual, out) -> torch.Tensor:
    y = output(out, x.shape, x, weight=weight, bias=bias)  # out=x or residual is fine: a program reads its rows first
    n = x.shape[-1]
    m = x.numel() // n
    if m == 0:
        return y
    block, num_warps = row_block(n)
    rows = rows_per_program(block)
    _layer_norm_kernel[(triton.cdiv(m, rows),)](x, residual, weight, bias, y, m, n, eps,
                                                HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK=block,
                                                num_warps=num_warps, **pdl(x))
    return y


def layer_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton launcher (contiguous inputs only)."""
    _validate(x, weight, bias, residual)
    check_contiguous(x=x, weight=weight, bias=bias, residual=residual)
    return _launch(x, weight, bias, eps, residual, out)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                         residual: torch.Tensor | None = None) -> torch.Tensor:
    dt = compute_dtype(x)
    h = cast(x, dt) if residual is None else cast(x, dt) + cast(residual, dt)
    y = torch.nn.functional.layer_norm(h, h.shape[-1:], cast(weight, dt), cast(bias, dt), eps)
    return cast(y, x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
               residual: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``LayerNorm(x + residual)`` over the last dim; weight and bias ``[N]`` in x's dtype."""
    _validate(x, weight, bias, residual)
    if backend_for(x, weight, bias, residual) == "torch":
        return into(out, layer_norm_reference(x, weight, bias, eps, residual))
    return _launch(x.contiguous(), weight.contiguous(), bias.contiguous(), eps,
                   None if residual is None else residual.contiguous(), out)
