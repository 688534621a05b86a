"""FP8 (e4m3) linear layer: weights and activations both in 8 bits, for the fp8 tensor cores of Hopper.

Hopper multiplies fp8 at twice its bf16 rate. The weight is quantized once, with one fp32 scale per output
channel (:func:`quantize_fp8`); the activations on the fly, with one scale per row
(:func:`quantize_rows_fp8`, a kernel of its own: a row's scale needs the whole row). :mod:`kernels.linear`'s
kernel then multiplies the fp8 tiles with fp32 accumulation and applies both scales in the epilogue, since
``sum_k (x[m,k] / sx[m]) (w[n,k] / sw[n]) = (sum_k x[m,k] w[n,k]) / (sx[m] sw[n])``, before bias, activation
and residual. It pays where the GEMM is compute-bound (large M); whether it wins at a shape is for
``bench/kernels.py`` to say. Needs compute capability >= 8.9 on a GPU; any CPU runs the torch reference.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels._common import (
    FLOAT_DTYPES,
    check_activation,
    check_contiguous,
    check_tensor,
    compute_dtype,
    dequantize,
    into,
    row_block,
    rows_per_program,
)
from kernels.dispatch import INTERPRETER, backend_for
from kernels.linear import launch_linear, linear_reference

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value
MAX_ROW = 65536


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel fp8 quantization of a ``[N, K]`` weight: ``(e4m3 [N, K], fp32 scales [N])``.

    ``weight ~= qweight * scales[:, None]``, each row's largest magnitude mapped to 448 (all-zero rows get
    scale 1).
    """
    check_tensor("weight", weight, ndim=2, dtypes=(*FLOAT_DTYPES, torch.float64))
    if weight.shape[1] < 1:
        raise ValueError(f"weight must be [N, K] with K >= 1, got {tuple(weight.shape)}")
    return _quantize(weight.to(torch.float32))


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 quantization in torch, the formula :func:`_quantize_rows_kernel` follows step by step."""
    scales = x.abs().amax(dim=-1) / FP8_MAX
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = (x / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.contiguous(), scales.contiguous()


@triton.jit
def _round_to_e4m3(v):
    """``v`` (fp32, ``|v| <= 448``) rounded to the nearest e4m3 value, ties to even, in fp32 arithmetic. The
    interpreter's own fp32 -> e4m3 conversion drops the carry when a value rounds up to the next power of two
    (126.9 becomes 64); GPUs convert correctly and skip this."""
    bits = v.to(tl.int32, bitcast=True)
    # Normal e4m3 values keep 3 of fp32's 23 mantissa bits: round the 20 dropped ones to nearest even (a carry
    # into the exponent is the next power of two, as it should be).
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    # Below 2^-6 e4m3 is subnormal, multiples of 2^-9: adding and taking away 2^14 rounds |v| there, to even
    # (fp32's step in [2^14, 2^15)); the sign goes back on after, so tiny negatives round to -0 as on a GPU.
    magnitude = (tl.abs(v) + 16384.0) - 16384.0
    subnormal = tl.where(v < 0, -magnitude, magnitude)
    return tl.where(tl.abs(v) < 0.015625, subnormal, normal)


@triton.jit(do_not_specialize=["M"])  # rows: see kernels._common
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, FP8_MAX: tl.constexpr, ROUND_IN_FP32: tl.constexpr,
                          ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < M
    ok = row_ok[:, None] & (cols < K)[None, :]
    offs = rows[:, None] * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    # A row holding NaN or inf has no finite scale: NaN throughout, as torch's amax would make it (max and the
    # clamp below drop NaNs on a GPU, which would turn such a row into finite numbers).
    bad = tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1) > 0
    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), FP8_MAX)  # rounded as torch rounds, bit for bit
    scale = tl.where(scale == 0.0, 1.0, scale)
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -FP8_MAX), FP8_MAX)
    if ROUND_IN_FP32:
        q = _round_to_e4m3(q)
    q = tl.where(bad[:, None], float("nan"), q)
    scale = tl.where(bad, float("nan"), scale)
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + rows, scale, mask=row_ok)


def _check_rows(x: torch.Tensor) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or not 1 <= x.shape[-1] <= MAX_ROW:
        raise ValueError(f"x must be [..., K] with 1 <= K <= {MAX_ROW}, got shape {tuple(x.shape)}")


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[..., K]`` as e4m3 with one fp32 scale per row: ``(q [..., K], scales [...])``, ``x ~= q * scales``.
    A kernel on a GPU (and under the interpreter), the same formula in torch elsewhere."""
    _check_rows(x)
    if backend_for(x) == "torch":
        return _quantize(x.to(torch.float32))
    return _quantize_rows(x.contiguous())


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's launch, on a contiguous x."""
    k = x.shape[-1]
    m = x.numel() // k
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    scales = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if m:
        block, num_warps = row_block(k)
        rows = rows_per_program(block)
        _quantize_rows_kernel[(triton.cdiv(m, rows),)](x, q, scales, m, k, FP8_MAX=FP8_MAX, ROUND_IN_FP32=INTERPRETER,
                                                      ROWS=rows, BLOCK=block, num_warps=num_warps)
    return q, scales


@functools.cache
def _has_fp8_tensor_cores(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _validate(x, qweight, scales, bias, activation, residual) -> None:
    _check_rows(x)
    check_tensor("qweight", qweight, ndim=2, dtypes=(FP8,), device=x.device)
    if qweight.shape[1] != x.shape[-1]:
        raise ValueError(f"qweight must be [N, K={x.shape[-1]}], got {tuple(qweight.shape)}")
    check_tensor("scales", scales, shape=(qweight.shape[0],), dtypes=(torch.float32,), device=x.device)
    if bias is not None:
        check_tensor("bias", bias, shape=(qweight.shape[0],), dtypes=(x.dtype,), device=x.device)
    check_activation(activation)
    if residual is not None:
        check_tensor("residual", residual, shape=(*x.shape[:-1], qweight.shape[0]), dtypes=(x.dtype,),
                     device=x.device)
    if x.is_cuda and not _has_fp8_tensor_cores(x.device):
        raise ValueError(f"linear_fp8 needs fp8 tensor cores (compute capability >= 8.9); {x.device} has "
                         f"{torch.cuda.get_device_capability(x.device)}: use linear_int8 there")


def _launch(x, qweight, scales, bias, activation, residual, out) -> torch.Tensor:
    qx, x_scales = _quantize_rows(x)
    return launch_linear(qx, qweight, scales, bias, activation, residual, out, x_scales=x_scales,
                         out_dtype=x.dtype)


def linear_fp8_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton launcher (contiguous inputs only)."""
    _validate(x, qweight, scales, bias, activation, residual)
    check_contiguous(x=x, qweight=qweight, scales=scales, bias=bias, residual=residual)
    return _launch(x, qweight, scales, bias, activation, residual, out)


def linear_fp8_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x quantized per row as the kernel does, both sides dequantized, then a plain linear in fp32 (fp64 for
    fp64 inputs), returned in ``x.dtype``."""
    dt = compute_dtype(x)
    qx, x_scales = _quantize(x.to(torch.float32))
    xd, wd = qx.to(dt) * x_scales.to(dt)[..., None], dequantize(qweight, scales, dt)
    return linear_reference(xd, wd, bias, activation, residual).to(x.dtype)


def linear_fp8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(fp8(x) @ (qweight * scales[:, None])^T + bias) + residual`` with x ``[..., K]`` fp32/bf16/fp16
    (quantized per row on the way in), qweight e4m3 ``[N, K]`` and scales fp32 ``[N]`` from
    :func:`quantize_fp8`; the result has x's dtype."""
    _validate(x, qweight, scales, bias, activation, residual)
    if backend_for(x, qweight, scales, bias, residual) == "torch":
        return into(out, linear_fp8_reference(x, qweight, scales, bias, activation, residual))
    return _launch(x.contiguous(), qweight.contiguous(), scales.contiguous(),
                   None if bias is None else bias.contiguous(), activation,
                   None if residual is None else residual.contiguous(), out)
