"""2-D max pooling, NCHW, square window with stride equal to the window (the CNN downsampling step).

One program per block of output elements; the window is unrolled at compile time. Trailing rows/columns
that do not fill a window are dropped, as in ``torch.nn.functional.max_pool2d``'s default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import FLOAT_DTYPES, check_tensor, into, output
from kernels.dispatch import INTERPRETER, backend_for


@triton.jit(do_not_specialize=["TOTAL"])  # outputs of the batch: see kernels._common
def _max_pool2d_kernel(x_ptr, y_ptr, TOTAL, H, W, OH, OW, KERNEL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TOTAL
    plane = offs // (OH * OW)
    pix = offs % (OH * OW)
    base = plane * H * W + (pix // OW) * KERNEL * W + (pix % OW) * KERNEL
    acc = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for kh in tl.static_range(KERNEL):
        for kw in tl.static_range(KERNEL):
            v = tl.load(x_ptr + base + kh * W + kw, mask=ok, other=float("-inf"))
            acc = tl.maximum(acc, v.to(tl.float32))
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


def _validate(x, kernel) -> None:
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    if type(kernel) is not int or not 1 <= kernel <= min(x.shape[2], x.shape[3]):  # not a bool either
        raise ValueError(f"kernel must be an int in [1, min(H, W)] for x {tuple(x.shape)}, got {kernel!r}")


def _launch(x, kernel, out) -> torch.Tensor:
    n, c, h, w = x.shape
    oh, ow = h // kernel, w // kernel
    y = output(out, (n, c, oh, ow), x, x=x)
    if y.numel() == 0:
        return y
    block = min(triton.next_power_of_2(y.numel()), 4096 if INTERPRETER else 1024)
    _max_pool2d_kernel[(triton.cdiv(y.numel(), block),)](x, y, y.numel(), h, w, oh, ow, KERNEL=kernel,
                                                         BLOCK=block)
    return y


def max_pool2d_triton(x: torch.Tensor, kernel: int = 2, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton launcher (contiguous input only)."""
    _validate(x, kernel)
    check_tensor("x", x, contiguous=True)
    return _launch(x, kernel, out)


def max_pool2d_reference(x: torch.Tensor, kernel: int = 2) -> torch.Tensor:
    n, c, h, w = x.shape
    if c == 0:  # torch refuses an input without channels (RuntimeError); the kernel pools it to nothing
        return x.new_empty(n, c, h // kernel, w // kernel)
    return torch.nn.functional.max_pool2d(x, kernel)


def max_pool2d(x: torch.Tensor, kernel: int = 2, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Max over ``kernel x kernel`` windows with stride ``kernel``: ``[N, C, H, W] -> [N, C, H//k, W//k]``."""
    _validate(x, kernel)
    if backend_for(x) == "torch":
        return into(out, max_pool2d_reference(x, kernel))
    return _launch(x.contiguous(), kernel, out)
