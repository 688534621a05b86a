"""Row-wise softmax and log-softmax over the last dimension, with an optional keep-mask.

One program per row keeps the whole row in registers (as in the Triton softmax tutorial): one read, one
write, and the max-subtraction makes it stable. Rows longer than ``MAX_ROW`` are rejected (attention has
its own fused kernel; nothing in this project needs longer rows).

Masked-out entries (``mask == False``) get probability 0 (``-inf`` for log-softmax). A row with every entry
masked out (or ``-inf``) has no distribution: softmax returns 0 for the whole row and log-softmax ``-inf``,
rather than the NaNs torch gives for an all ``-inf`` row, on the torch path as on the kernel's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import FLOAT_DTYPES, cast, check_tensor, compute_dtype, into, output, row_block
from kernels.dispatch import backend_for

MAX_ROW = 65536


@triton.jit
def _softmax_kernel(x_ptr, m_ptr, y_ptr, N, HAS_MASK: tl.constexpr, LOG: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=ok, other=float("-inf")).to(tl.float32)
    if HAS_MASK:
        keep = tl.load(m_ptr + row * N + cols, mask=ok, other=0) != 0
        x = tl.where(keep, x, float("-inf"))
    row_max = tl.max(x, axis=0)
    shifted = x - tl.where(row_max == float("-inf"), 0.0, row_max)  # all-masked row: keep -inf, not NaN
    e = tl.exp(shifted)
    total = tl.sum(e, axis=0)
    total = tl.where(total == 0.0, 1.0, total)  # all-masked row: softmax 0, log-softmax -inf
    y = shifted - tl.log(total) if LOG else e / total
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


def _validate(x, mask) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] > MAX_ROW:
        raise ValueError(f"x must be [..., N] with N <= {MAX_ROW}, got shape {tuple(x.shape)}")
    if mask is not None:
        check_tensor("mask", mask, shape=x.shape, dtypes=(torch.bool,), device=x.device)


def _launch(x: torch.Tensor, mask: torch.Tensor | None, log: bool, out: torch.Tensor | None) -> torch.Tensor:
    y = output(out, x.shape, x)
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    if rows == 0:
        return y
    block, num_warps = row_block(n)
    _softmax_kernel[(rows,)](x, mask, y, n, HAS_MASK=mask is not None, LOG=log, BLOCK=block,
                             num_warps=num_warps)
    return y


def softmax_triton(x: torch.Tensor, mask: torch.Tensor | None = None, *, log: bool = False,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton launcher (contiguous inputs only); ``log=True`` gives log-softmax."""
    _validate(x, mask)
    check_tensor("x", x, contiguous=True)
    if mask is not None:
        check_tensor("mask", mask, contiguous=True)
    return _launch(x, mask, log, out)


def _masked_input(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x = cast(x, compute_dtype(x))
    return x if mask is None else x.masked_fill(~mask, float("-inf"))


def softmax_reference(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    masked = _masked_input(x, mask)
    y = torch.softmax(masked, dim=-1).masked_fill(_no_distribution(masked), 0.0)
    return cast(y, x.dtype)


def log_softmax_reference(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    masked = _masked_input(x, mask)
    y = torch.log_softmax(masked, dim=-1).masked_fill(_no_distribution(masked), float("-inf"))
    return y.to(x.dtype)


def _no_distribution(masked: torch.Tensor) -> torch.Tensor:
    """Rows with nothing left once masked (every entry masked out or -inf): the kernel's 0 / -inf rows."""
    return (masked == float("-inf")).all(dim=-1, keepdim=True)


def softmax(x: torch.Tensor, mask: torch.Tensor | None = None, *,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dim of x (fp32/bf16/fp16); ``mask`` (bool, x's shape) is True where kept."""
    _validate(x, mask)
    if backend_for(x, mask) == "torch":
        return into(out, softmax_reference(x, mask))
    return _launch(x.contiguous(), None if mask is None else mask.contiguous(), False, out)


def log_softmax(x: torch.Tensor, mask: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Log-softmax over the last dim of x; masked entries and all-masked rows give ``-inf``."""
    _validate(x, mask)
    if backend_for(x, mask) == "torch":
        return into(out, log_softmax_reference(x, mask))
    return _launch(x.contiguous(), None if mask is None else mask.contiguous(), True, out)
