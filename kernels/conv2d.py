"""2-D convolution (NCHW, stride 1, no padding) as an implicit GEMM, with bias and ReLU fused.

The convolution is the matrix product ``Y[m, co] = sum_k X_col[m, k] * W[co, k]`` over output pixels
``m = (n, oh, ow)`` and filter taps ``k = (c, kh, kw)``. The im2col matrix ``X_col`` is never built: each
tile of it is gathered straight from the input by index arithmetic, so memory traffic stays that of the
input, the filters and the output, and the inner loop is a tensor-core ``tl.dot``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import (
    FLOAT_DTYPES,
    MAX_ELEMENTS,
    check_contiguous,
    check_tensor,
    compute_dtype,
    into,
    output,
)
from kernels.dispatch import INTERPRETER, backend_for


@triton.jit(do_not_specialize=["M"])  # output pixels of the batch: see kernels._common
def _conv2d_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    C, H, W, CO, OH, OW, M,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    K = C * KH * KW
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < CO
    img = offs_m // (OH * OW)
    pix = offs_m % (OH * OW)
    x_rows = img * C * H * W + (pix // OW) * W + pix % OW  # input offset of each output pixel's (0, 0) tap

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        tap = offs_k % (KH * KW)
        x_cols = (offs_k // (KH * KW)) * H * W + (tap // KW) * W + tap % KW
        a = tl.load(x_ptr + x_rows[:, None] + x_cols[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        if UPCAST:  # the interpreter computes bf16 wrongly: do its math in fp32
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y_offs = (img * CO * OH * OW + pix)[:, None] + (offs_n * OH * OW)[None, :]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _validate(x, weight, bias) -> None:
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=4, dtypes=(x.dtype,), device=x.device)
    co, ci, kh, kw = weight.shape
    if min(co, ci, kh, kw) < 1:
        raise ValueError(f"weight must be [C_out, C_in, KH, KW] with every size >= 1, got {tuple(weight.shape)}")
    if ci != x.shape[1]:
        raise ValueError(f"weight must be [C_out, C_in={x.shape[1]}, KH, KW], got {tuple(weight.shape)}")
    if kh > x.shape[2] or kw > x.shape[3]:
        raise ValueError(f"weight's kernel {kh}x{kw} is larger than x's image {x.shape[2]}x{x.shape[3]}")
    if bias is not None:
        check_tensor("bias", bias, shape=(co,), dtypes=(x.dtype,), device=x.device)


def _launch(x, weight, bias, relu, out) -> torch.Tensor:
    n, c, h, w = x.shape
    co, _, kh, kw = weight.shape
    oh, ow = h - kh + 1, w - kw + 1
    y = output(out, (n, co, oh, ow), x, x=x, weight=weight, bias=bias)
    if max(x.numel(), y.numel()) > MAX_ELEMENTS:
        raise ValueError(f"x and the output must each hold at most {MAX_ELEMENTS:,} elements (the kernel indexes "
                         f"in 32 bits), got {x.numel():,} and {y.numel():,}")
    m = n * oh * ow
    if y.numel() == 0:
        return y
    if INTERPRETER:
        block_m, block_n, block_k, meta = 64, min(64, max(16, triton.next_power_of_2(co))), 64, {}
    else:
        block_m, block_n, block_k = 128, min(128, max(16, triton.next_power_of_2(co))), 32
        meta = {"num_warps": 4, "num_stages": 3}
    grid = (triton.cdiv(m, block_m), triton.cdiv(co, block_n))
    _conv2d_kernel[grid](x, weight, bias, y, c, h, w, co, oh, ow, m, KH=kh, KW=kw, HAS_BIAS=bias is not None,
                         RELU=relu, UPCAST=INTERPRETER, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                         **meta)
    return y


def conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False,
                  *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton launcher (contiguous inputs only)."""
    _validate(x, weight, bias)
    check_contiguous(x=x, weight=weight, bias=bias)
    return _launch(x, weight, bias, relu, out)


def conv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     relu: bool = False) -> torch.Tensor:
    dt = compute_dtype(x)
    y = torch.nn.functional.conv2d(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt))
    return (torch.relu(y) if relu else y).to(x.dtype)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(conv2d(x, weight) + bias)``: x ``[N, C_in, H, W]``, weight ``[C_out, C_in, KH, KW]``, bias
    ``[C_out]``, stride 1 and no padding -> ``[N, C_out, H - KH + 1, W - KW + 1]`` in x's dtype."""
    _validate(x, weight, bias)
    if backend_for(x, weight, bias) == "torch":
        return into(out, conv2d_reference(x, weight, bias, relu))
    bias = None if bias is None else bias.contiguous()
    return _launch(x.contiguous(), weight.contiguous(), bias, relu, out)
