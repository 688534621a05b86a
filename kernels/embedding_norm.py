"""A BERT embedding block in one pass: ``LayerNorm(table[ids] + positions[:S])`` for token ids ``[B, S]``.

Done with torch ops, the lookup writes ``[B, S, D]``, adding the position (and token-type) rows reads and
writes it again, and the LayerNorm reads and writes it once more: for MiniLM at 256 x 128 tokens, about 125 MB
moved that this kernel does not (it gathers the table rows and writes the result, nothing in between). A
program normalizes a tile of whole rows; token ``(b, s)`` is row ``b * S + s`` and takes position row ``s``.
The LayerNorm itself is :func:`kernels.layer_norm.normalize_rows`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import (
    FLOAT_DTYPES,
    cast,
    check_contiguous,
    check_ids,
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
from kernels.layer_norm import MAX_ROW, normalize_rows


@triton.jit(do_not_specialize=["M", "S"])  # the batch and its token length: see kernels._common
def _embedding_norm_kernel(ids_ptr, table_ptr, pos_ptr, w_ptr, b_ptr, y_ptr, M, S, N, eps,
                           ROWS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_wait(USE_PDL)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < M
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # in range (checked)
    x = tl.load(table_ptr + ids[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    x += tl.load(pos_ptr + (rows % S)[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    y = normalize_rows(x, ok, cols, col_ok, w_ptr, b_ptr, N, eps)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
    pdl_launch_dependents(USE_PDL)


def _validate(ids, table, positions, weight, bias) -> None:
    check_tensor("ids", ids, ndim=2, dtypes=(torch.int64, torch.int32))
    check_tensor("table", table, ndim=2, dtypes=FLOAT_DTYPES, device=ids.device)
    d = table.shape[1]
    if not 1 <= d <= MAX_ROW:
        raise ValueError(f"table must be [V, D] with 1 <= D <= {MAX_ROW}, got shape {tuple(table.shape)}")
    check_tensor("positions", positions, ndim=2, dtypes=(table.dtype,), device=ids.device)
    if positions.shape[1] != d or positions.shape[0] < ids.shape[1]:
        raise ValueError(f"positions must be [P, D={d}] with P >= the {ids.shape[1]} tokens of ids, got "
                         f"{tuple(positions.shape)}")
    check_tensor("weight", weight, shape=(d,), dtypes=(table.dtype,), device=ids.device)
    check_tensor("bias", bias, shape=(d,), dtypes=(table.dtype,), device=ids.device)
    check_ids(ids, table)


def _launch(ids, table, positions, weight, bias, eps, out) -> torch.Tensor:
    b, s = ids.shape
    d = table.shape[1]
    y = output(out, (b, s, d), table, ids=ids, table=table, positions=positions, weight=weight, bias=bias)
    m = b * s
    if m == 0:
        return y
    block, num_warps = row_block(d)
    rows = rows_per_program(block)
    _embedding_norm_kernel[(triton.cdiv(m, rows),)](ids, table, positions, weight, bias, y, m, s, d, eps,
                                                    ROWS=rows, BLOCK=block, num_warps=num_warps, **pdl(ids))
    return y


def embedding_norm_triton(ids: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor, eps: float = 1e-12, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton launcher (contiguous inputs only)."""
    _validate(ids, table, positions, weight, bias)
    check_contiguous(ids=ids, table=table, positions=positions, weight=weight, bias=bias)
    return _launch(ids, table, positions, weight, bias, eps, out)


def embedding_norm_reference(ids: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    dt = compute_dtype(table)
    h = cast(table, dt)[ids] + cast(positions, dt)[: ids.shape[1]]
    y = torch.nn.functional.layer_norm(h, h.shape[-1:], cast(weight, dt), cast(bias, dt), eps)
    return cast(y, table.dtype)


def embedding_norm(ids: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float = 1e-12, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``LayerNorm(table[ids] + positions[:S])``: ids ``[B, S]`` int64/int32, table ``[V, D]``, positions
    ``[P >= S, D]`` (a BERT's position rows with its token-type row added), weight and bias ``[D]``, all in
    the table's dtype -> ``[B, S, D]``. Every id must be in ``[0, V)`` (checked here, which syncs with the GPU;
    not inside a CUDA-graph capture, see ``kernels._common.value_range``)."""
    _validate(ids, table, positions, weight, bias)
    if backend_for(ids, table, positions, weight, bias) == "torch":
        return into(out, embedding_norm_reference(ids, table, positions, weight, bias, eps))
    return _launch(ids.contiguous(), table.contiguous(), positions.contiguous(), weight.contiguous(),
                   bias.contiguous(), eps, out)
