"""Weight-only int8 linear layer: int8 weights with one fp32 scale per output channel.

Halves weight memory traffic against bf16, which is what bounds small-batch inference. The dequantization
is fused into :mod:`kernels.linear`'s kernel: int8 tiles are converted on load and since
``sum_k x[m,k] * q[n,k] * s[n] = s[n] * sum_k x[m,k] * q[n,k]`` the scale is applied once, in the epilogue.
"""

from __future__ import annotations

import torch

from kernels._common import (
    FLOAT_DTYPES,
    check_activation,
    check_contiguous,
    check_tensor,
    compute_dtype,
    dequantize,
    into,
)
from kernels.dispatch import backend_for
from kernels.linear import launch_linear, linear_reference


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of a ``[N, K]`` weight: ``(int8 [N, K], fp32 scales [N])``.

    ``weight ~= qweight * scales[:, None]``, with ``|qweight| <= 127`` (all-zero rows get scale 1).
    """
    check_tensor("weight", weight, ndim=2, dtypes=(*FLOAT_DTYPES, torch.float64))
    if weight.shape[1] < 1:
        raise ValueError(f"weight must be [N, K] with K >= 1, got {tuple(weight.shape)}")
    w = weight.to(torch.float32)
    scales = w.abs().amax(dim=1) / 127.0
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    qweight = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return qweight.contiguous(), scales.contiguous()


def _validate(x, qweight, scales, bias, activation) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., K] with K >= 1, got shape {tuple(x.shape)}")
    check_tensor("qweight", qweight, ndim=2, dtypes=(torch.int8,), device=x.device)
    if qweight.shape[1] != x.shape[-1]:
        raise ValueError(f"qweight must be [N, K={x.shape[-1]}], got {tuple(qweight.shape)}")
    check_tensor("scales", scales, shape=(qweight.shape[0],), dtypes=(torch.float32,), device=x.device)
    if bias is not None:
        check_tensor("bias", bias, shape=(qweight.shape[0],), dtypes=(x.dtype,), device=x.device)
    check_activation(activation)


def linear_int8_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton launcher (contiguous inputs only)."""
    _validate(x, qweight, scales, bias, activation)
    check_contiguous(x=x, qweight=qweight, scales=scales, bias=bias)
    return launch_linear(x, qweight, scales, bias, activation, None, out)


def linear_int8_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
) -> torch.Tensor:
    """Dequantize then a plain linear, in fp32 (fp64 for fp64 inputs), returned in ``x.dtype``."""
    dt = compute_dtype(x)
    return linear_reference(x, dequantize(qweight, scales, dt), bias, activation)


def linear_int8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x @ (qweight * scales[:, None])^T + bias)`` with x ``[..., K]`` fp32/bf16/fp16, qweight int8
    ``[N, K]`` and scales fp32 ``[N]`` from :func:`quantize_int8`; the result has x's dtype."""
    _validate(x, qweight, scales, bias, activation)
    if backend_for(x, qweight, scales, bias) == "torch":
        return into(out, linear_int8_reference(x, qweight, scales, bias, activation))
    bias = None if bias is None else bias.contiguous()
    x, qweight, scales = x.contiguous(), qweight.contiguous(), scales.contiguous()
    return launch_linear(x, qweight, scales, bias, activation, None, out)
