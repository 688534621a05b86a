"""L2 normalization over the last dimension (sentence-embedding output): ``x / max(||x||_2, eps)``.

Same semantics as ``torch.nn.functional.normalize(x, dim=-1)``; one read, one write. A program normalizes a
tile of whole rows: several short ones at once (``rows_per_program``), a long one alone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import FLOAT_DTYPES, check_tensor, compute_dtype, into, output, row_block, rows_per_program
from kernels.dispatch import backend_for

MAX_ROW = 65536


@triton.jit(do_not_specialize=["M"])  # rows: see kernels._common
def _l2_normalize_kernel(x_ptr, y_ptr, M, N, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)
    tl.store(y_ptr + offs, (x / norm[:, None]).to(y_ptr.dtype.element_ty), mask=ok)


def _validate(x) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] > MAX_ROW:
        raise ValueError(f"x must be [..., N] with N <= {MAX_ROW}, got shape {tuple(x.shape)}")


def _launch(x: torch.Tensor, eps: float, out: torch.Tensor | None) -> torch.Tensor:
    y = output(out, x.shape, x)
    n = x.shape[-1]
    if x.numel() == 0:
        return y
    m = x.numel() // n
    block, num_warps = row_block(n)
    rows = rows_per_program(block)
    _l2_normalize_kernel[(triton.cdiv(m, rows),)](x, y, m, n, eps, ROWS=rows, BLOCK=block, num_warps=num_warps)
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
