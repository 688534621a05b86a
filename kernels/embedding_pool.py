"""Embedding lookup fused with masked mean pooling: ``[B, S]`` token ids -> ``[B, D]`` sentence vectors.

Bag-of-embeddings text classifiers only need the mean, so gathering rows and averaging them in one kernel
avoids materialising the ``[B, S, D]`` embeddings. Each program owns one sequence and a slice of D, and
gathers a tile of tokens at a time. A gather waits for the ids it reads, so each tile costs two memory
latencies in a row (ids and mask together, then the rows): tiles of up to 64 tokens keep that chain short for
long sequences.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import FLOAT_DTYPES, check_contiguous, check_ids, check_tensor, compute_dtype, into, output
from kernels.dispatch import INTERPRETER, backend_for


@triton.jit
def _embedding_pool_kernel(ids_ptr, table_ptr, mask_ptr, y_ptr, S, D, BLOCK_S: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    # Summed per token slot and reduced over the slots once, after the loop: a reduction across the tile's rows
    # (threads, then warps through shared memory behind a barrier) in every step would hold each warp's next
    # gather until all warps had finished this one.
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    count = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for start in range(0, S, BLOCK_S):
        offs_s = start + tl.arange(0, BLOCK_S)
        s_ok = offs_s < S
        # Every id is in range (checked), padding included: no need to wait for the mask to read it.
        ids = tl.load(ids_ptr + b * S + offs_s, mask=s_ok, other=0).to(tl.int64)
        keep = s_ok & (tl.load(mask_ptr + b * S + offs_s, mask=s_ok, other=0) != 0)
        rows = tl.load(table_ptr + ids[:, None] * D + offs_d[None, :], mask=keep[:, None] & d_ok[None, :],
                       other=0.0)
        acc += rows.to(tl.float32)
        count += keep.to(tl.float32)
    mean = tl.sum(acc, axis=0) / tl.maximum(tl.sum(count, axis=0), 1.0)  # no real token: 0 / 1 = 0
    tl.store(y_ptr + b * D + offs_d, mean.to(y_ptr.dtype.element_ty), mask=d_ok)


def _validate(ids, table, mask) -> None:
    check_tensor("ids", ids, ndim=2, dtypes=(torch.int64, torch.int32))
    check_tensor("table", table, ndim=2, dtypes=FLOAT_DTYPES, device=ids.device)
    check_tensor("mask", mask, shape=ids.shape, dtypes=(torch.bool,), device=ids.device)
    check_ids(ids, table)


def _launch(ids, table, mask, out) -> torch.Tensor:
    b, s = ids.shape
    d = table.shape[1]
    y = output(out, (b, d), table)
    if y.numel() == 0:
        return y
    block_d = min(triton.next_power_of_2(d), 256 if INTERPRETER else 128)
    block_s = min(triton.next_power_of_2(max(s, 1)), 64)
    num_warps = 8 if block_s * block_d >= 8192 else 4
    _embedding_pool_kernel[(b, triton.cdiv(d, block_d))](ids, table, mask, y, s, d, BLOCK_S=block_s,
                                                         BLOCK_D=block_d, num_warps=num_warps)
    return y


def embedding_pool_triton(ids: torch.Tensor, table: torch.Tensor, mask: torch.Tensor, *,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton launcher (contiguous inputs only)."""
    _validate(ids, table, mask)
    check_contiguous(ids=ids, table=table, mask=mask)
    return _launch(ids, table, mask, out)


def embedding_pool_reference(ids: torch.Tensor, table: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = table.to(compute_dtype(table))[ids] * mask[..., None]
    return (rows.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)).to(table.dtype)


def embedding_pool(ids: torch.Tensor, table: torch.Tensor, mask: torch.Tensor, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``table[ids[b, s]]`` over the positions where ``mask`` is True: ids ``[B, S]`` int64/int32,
    table ``[V, D]``, mask bool ``[B, S]`` -> ``[B, D]`` in the table's dtype; a row with no token gives 0.

    Every id, padding positions included, must be in ``[0, V)`` (checked here, which syncs with the GPU).
    """
    _validate(ids, table, mask)
    if backend_for(ids, table, mask) == "torch":
        return into(out, embedding_pool_reference(ids, table, mask))
    return _launch(ids.contiguous(), table.contiguous(), mask.contiguous(), out)
