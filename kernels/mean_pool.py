"""Mean pooling over each sequence's real positions, optionally L2-normalized: hidden states ``[B, S, D]`` and
each row's length -> sentence vectors ``[B, D]`` (the tail of a sentence encoder).

Padding is at the end of each row (as tokenizers pad), so a row is pooled over its first ``length`` positions and
its padding is never read. One kernel replaces the three launches an encoder's tail took (the mask cast to the
states' dtype, a batched GEMV summing the kept positions, :mod:`kernels.l2_normalize`): in a CUDA graph of a
batch-1 forward of about 0.2 ms, every launch is a few microseconds of it. A program owns one sequence and
its whole row, which normalizing needs, and sums tiles of positions in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import (
    FLOAT_DTYPES,
    check_contiguous,
    check_tensor,
    compute_dtype,
    into,
    lengths_mask,
    output,
    pdl_launch_dependents,
    pdl_wait,
)
from kernels.dispatch import backend_for, pdl

MAX_ROW = 8192
# Elements of a program's tile of positions x row: 64 fp32 accumulators a thread on 8 warps, and 32 positions of
# a 384-wide row (MiniLM's) in flight at once, so a 128-token sequence is four loads deep.
TILE = 16384


@triton.jit(do_not_specialize=["S"])  # the sequence length varies with each batch's bucket
def _mean_pool_kernel(x_ptr, lengths_ptr, y_ptr, S, D, eps, NORMALIZE: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_wait(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(lengths_ptr + b), 0), S).to(tl.int32)  # clamped before int32: no wrap
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    # Summed per position slot and reduced once after the loop (see kernels.embedding_pool).
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    for start in range(0, n, BLOCK_S):
        offs_s = start + tl.arange(0, BLOCK_S)
        rows = tl.load(x_ptr + (b * S + offs_s[:, None]) * D + offs_d[None, :],
                       mask=(offs_s < n)[:, None] & d_ok[None, :], other=0.0)
        acc += rows.to(tl.float32)
    mean = tl.sum(acc, axis=0) / tl.maximum(n, 1).to(tl.float32)  # no real position: 0 / 1 = 0
    if NORMALIZE:
        mean = mean / tl.maximum(tl.sqrt(tl.sum(mean * mean, axis=0)), eps)
    tl.store(y_ptr + b * D + offs_d, mean.to(y_ptr.dtype.element_ty), mask=d_ok)
    pdl_launch_dependents(USE_PDL)


def _validate(x, lengths) -> None:
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    if x.shape[2] > MAX_ROW:
        raise ValueError(f"x must be [B, S, D] with D <= {MAX_ROW}, got shape {tuple(x.shape)}")
    check_tensor("lengths", lengths, shape=x.shape[:1], dtypes=(torch.int32, torch.int64), device=x.device)


def _launch(x: torch.Tensor, lengths: torch.Tensor, normalize: bool, eps: float,
            out: torch.Tensor | None) -> torch.Tensor:
    b, s, d = x.shape
    y = output(out, (b, d), x, x=x)
    if y.numel() == 0:
        return y
    block_d = triton.next_power_of_2(d)
    block_s = min(max(TILE // block_d, 1), triton.next_power_of_2(max(s, 1)))
    num_warps = 8 if block_s * block_d >= 8192 else 4
    _mean_pool_kernel[(b,)](x, lengths, y, s, d, eps, NORMALIZE=normalize, BLOCK_S=block_s, BLOCK_D=block_d,
                            num_warps=num_warps, **pdl(x))
    return y


def mean_pool_triton(x: torch.Tensor, lengths: torch.Tensor, *, normalize: bool = False, eps: float = 1e-12,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton launcher (contiguous inputs only)."""
    _validate(x, lengths)
    check_contiguous(x=x, lengths=lengths)
    return _launch(x, lengths, normalize, eps, out)


def mean_pool_reference(x: torch.Tensor, lengths: torch.Tensor, *, normalize: bool = False,
                        eps: float = 1e-12) -> torch.Tensor:
    keep = lengths_mask(lengths, x.shape[1])[..., None]
    rows = torch.where(keep, x.to(compute_dtype(x)), 0.0)  # padding's inf/NaN stay out
    mean = rows.sum(dim=1) / keep.sum(dim=1).clamp(min=1)
    return (torch.nn.functional.normalize(mean, dim=-1, eps=eps) if normalize else mean).to(x.dtype)


def mean_pool(x: torch.Tensor, lengths: torch.Tensor, *, normalize: bool = False, eps: float = 1e-12,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x[b, :lengths[b]]`` over the sequence for each row b (a length past S counts as S, below 0 as
    0, and a row without a position gives 0): x ``[B, S, D]`` fp32/bf16/fp16, lengths int32/int64 ``[B]`` ->
    ``[B, D]`` in x's dtype, computed in fp32; with ``normalize``, each mean divided by ``max(||mean||, eps)``
    (``F.normalize``)."""
    _validate(x, lengths)
    if backend_for(x, lengths) == "torch":
        return into(out, mean_pool_reference(x, lengths, normalize=normalize, eps=eps))
    return _launch(x.contiguous(), lengths.contiguous(), normalize, eps, out)
