"""Embedding lookup fused with masked mean pooling: ``[B, S]`` token ids -> ``[B, D]`` sentence vectors.

Bag-of-embeddings text classifiers only need the mean, so gathering rows and averaging them in one kernel
avoids materialising the ``[B, S, D]`` embeddings. Each program owns one sequence and a slice of D, and
gathers a tile of tokens at a time. A gather waits for the ids it reads, so each tile costs two memory
latencies in a row (ids and mask together, then the rows), during the first of which the program moves no
table bytes: how many tokens a tile takes (fewer latency chains) against how many programs share an SM (more
bytes in flight) is autotuned on the GPU per bucket of batch and sequence length (on the H100 the first rule,
64-token tiles of 128 columns on 8 warps, reached 81% of the copy bandwidth at 1024 x 128 x 384).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._autotune import autotune, within_bucket
from kernels._common import FLOAT_DTYPES, check_contiguous, check_ids, check_tensor, compute_dtype, into, output
from kernels.dispatch import INTERPRETER, USE_AUTOTUNE, backend_for


def _config(block_s: int, block_d: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_S": block_s, "BLOCK_D": block_d}, num_warps=warps)


GPU_CONFIGS = [
    _config(64, 128, 8),  # the fixed rule's choice for long sequences before autotuning
    _config(128, 128, 8),  # a 128-token sequence in one tile: one latency chain
    _config(64, 256, 8),
    _config(32, 256, 8),
    _config(128, 64, 4),
    _config(64, 128, 4),
    _config(32, 128, 4),
    _config(64, 64, 4),
    _config(16, 128, 4),
    _config(32, 32, 4),  # narrow tables (a small text classifier's 16 to 32 columns)
    _config(16, 16, 4),
]
# fp32 accumulator registers a thread may give the [BLOCK_S, BLOCK_D] tile (as for attention's output tile).
ACCUMULATOR_REGISTERS = 64


def fits_registers(config: triton.Config) -> bool:
    return config.kwargs["BLOCK_S"] * config.kwargs["BLOCK_D"] <= ACCUMULATOR_REGISTERS * 32 * config.num_warps


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Before compiling and timing: drop tiles too big for registers or narrower than 64 columns where the row
    is wider (they only make more programs re-read the same ids), then tiles longer than the sequence length
    bucket or wider than the row."""
    width = triton.next_power_of_2(named_args["D"])
    configs = [c for c in configs if fits_registers(c) and c.kwargs["BLOCK_D"] >= min(width, 64)]
    return within_bucket(within_bucket(configs, "BLOCK_S", named_args["S_BUCKET"]), "BLOCK_D", width)


def _rule_config(s: int, d: int) -> dict:
    """Tiles without a GPU to tune on: large ones under the interpreter (every tile costs Python time); for the
    sm_90 compile check, what the launcher picked before autotuning."""
    block_d = min(triton.next_power_of_2(d), 256 if INTERPRETER else 128)
    block_s = min(triton.next_power_of_2(max(s, 1)), 64)
    return {"BLOCK_S": block_s, "BLOCK_D": block_d, "num_warps": 8 if block_s * block_d >= 8192 else 4}


# Tuned per power-of-two bucket of the batch (capped: past 1024 sequences every config fills the GPU) and of
# the sequence length, and per row width; the buckets are keys only, not specialized on.
@autotune(GPU_CONFIGS, key=["B_BUCKET", "S_BUCKET", "D"], prune_configs_by={"early_config_prune": _prune_configs},
          buckets=["B_BUCKET", "S_BUCKET"])
@triton.jit(do_not_specialize=["B_BUCKET", "S_BUCKET"])
def _embedding_pool_kernel(ids_ptr, table_ptr, mask_ptr, y_ptr, S, D, B_BUCKET, S_BUCKET, BLOCK_S: tl.constexpr,
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
    y = output(out, (b, d), table, ids=ids, table=table, mask=mask)  # any program may gather any table row
    if y.numel() == 0:
        return y
    meta = {} if USE_AUTOTUNE else _rule_config(s, d)

    def grid(config: dict) -> tuple[int, int]:  # called with the autotuner's chosen config
        return b, triton.cdiv(d, config["BLOCK_D"])

    buckets = min(triton.next_power_of_2(b), 1024), triton.next_power_of_2(max(s, 1))
    _embedding_pool_kernel[grid](ids, table, mask, y, s, d, *buckets, **meta)
    return y


def embedding_pool_triton(ids: torch.Tensor, table: torch.Tensor, mask: torch.Tensor, *,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton launcher (contiguous inputs only)."""
    _validate(ids, table, mask)
    check_contiguous(ids=ids, table=table, mask=mask)
    return _launch(ids, table, mask, out)


def embedding_pool_reference(ids: torch.Tensor, table: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = torch.where(mask[..., None], table.to(compute_dtype(table))[ids], 0.0)  # padding's inf/NaN stay out
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
