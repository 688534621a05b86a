"""L2 normalization over the last dimension (sentence-embedding output): ``x / max(||x||_2, eps)``.

Same semantics as ``torch.nn.functional.normalize(x, dim=-1)``; one program per row, one read, one write.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import FLOAT_DTYPES, check_tensor, compute_dtype, into, output
from kernels.dispatch import backend_for

MAX_ROW = 65536


@triton.jit
def _l2_normalize_kernel(x_ptr, y_ptr, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32)
    norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=0)), eps)
    tl.store(y_ptr + row * N + cols, (x / norm).to(y_ptr.dtype.element_ty), mask=ok)


def _validate(x) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] > MAX_ROW:
        raise ValueError(f"x must be [..., N] with N <= {MAX_ROW}, got shape {tuple(x.shape)}")


def _launch(x: torch.Tensor, eps: float, out: torch.Tensor | None) -> torch.Tensor:
    y = output(out, x.shape, x)
    n = x.shape[-1]
    if x.numel() == 0:
        return y
    block = triton.next_power_of_2(n)
    num_warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    _l2_normalize_kernel[(x.numel() // n,)](x, y, n, eps, BLOCK=block, num_warps=num_warps)
    return y


def l2_normalize_triton(x: torch.Tensor, eps: float = 1e-12, *,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton launcher (contiguous input only)."""
    _validate(x)
    check_tensor("x", x, contiguous=True)
    return _launch(x, eps, out)


def l2_normalize_reference(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return torch.nn.functional.normalize(x.to(compute_dtype(x)), dim=-1, eps=eps).to(x.dtype)


def l2_normalize(x: torch.Tensor, eps: float = 1e-12, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x / max(||x||, eps)`` along the last dim, in x's dtype (fp32/bf16/fp16), computed in fp32."""
    _validate(x)
    if backend_for(x) == "torch":
        return into(out, l2_normalize_reference(x, eps))
    return _launch(x.contiguous(), eps, out)
