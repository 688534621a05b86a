"""Multi-head attention forward, FlashAttention style: ``softmax(q k^T * scale + mask) v`` without ever
writing the ``[S, S]`` score matrix to memory.

Each program owns a block of query rows and streams over key/value tiles, keeping a running row maximum
and normaliser (online softmax) and rescaling its accumulator when the maximum grows. Padded keys
(``key_padding_mask == False``, or at and past the row's ``key_lengths`` entry) get zero weight; padded
*query* rows are computed like any other row and so stay finite. A batch row whose keys are all padding gets
an all-zero output. Key tiles that lie wholly within the real keys (with no mask: all but the last) run
without bounds checks or selects.

q, k and v are read through their strides (only the head dimension must be contiguous), so a transformer can
pass views of one fused QKV projection ``[B, S, 3, H, D]`` without copying them apart. The output is laid out
``[B, S, H, D]`` in memory (returned as a ``[B, H, S, D]`` view), so merging the heads afterwards is free.

Two variants (checked and timed on an H100 in runs 20-26, see bench/results/gpu/README.md): the TMA one wins from
512 keys on and neither at 128, so the TMA one is ``auto`` by default (run 24: a start from the tuning table
exported under it took 7.1 s, 6.2 s with it off, the warm-ups equal), the persistent one ``off``. Timed in graph
replay, as serving runs; a worker without CUDA graphs serving short sequences may prefer ``off`` (run 26: the TMA
kernel's direct launch costs the host 0.21-0.30 ms against 0.15 ms):

- ``MAAS_ATTENTION_TMA``: on Hopper GPUs, q and the full key/value tiles read with TMA (the bulk tensor copy
  engine, ``_attention_tma_kernel``), where q, k and v are laid out as ``[B, S, H, D]`` with the heads side by
  side (a fused QKV projection's views included) or as contiguous ``[B, H, S, D]``;
- ``MAAS_ATTENTION_PERSISTENT``: for keys that fit one tile (up to ``PERSISTENT_MAX_KEYS``, MiniLM's 128 among
  them), as many programs as the GPU holds at once walk the query tiles, each loading its next tile's q, k and
  v while it computes the current one (``_attention_persistent_kernel``).

Each takes ``off``, ``on`` (wherever it can run, the interpreter included; with both on, TMA where it can) or
``auto``: on a GPU, every kernel that can run a problem is timed once per shape and the fastest runs from then
on, as ``kernels.linear`` chooses its GEMM kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels._autotune import TimedChoice, autotune, gpu_ms, stored_key, within_bucket
from kernels._common import (
    FLOAT_DTYPES,
    cast,
    check_apart,
    check_tensor,
    compute_dtype,
    lengths_mask,
    pdl_launch_dependents,
    pdl_wait,
)
from kernels.dispatch import (
    INTERPRETER,
    USE_AUTOTUNE,
    backend_for,
    compute_capability,
    env_choice,
    multiprocessors,
    pdl,
)

HEAD_DIMS = (16, 32, 64, 128)
# A finite "-inf": an all-masked tile then gives exp(0) * 0 = 0 rather than exp(-inf + inf) = NaN.
_NEG = tl.constexpr(-1.0e30)


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Wide query tiles for long sequences and big batches; narrow ones so that a single short sequence (few heads,
# S <= 128) still spreads over many SMs. (A 64 x 128 tile on 4 warps, a 128-key sequence in one key tile, changed
# nothing at S 128 on the H100, 2026-11-26: 1.08x and 1.02x SDPA flash at D 64 and 128, as without it.)
GPU_CONFIGS = [
    _config(128, 64, 4, 3),
    _config(128, 64, 8, 3),
    _config(128, 128, 8, 3),
    _config(64, 64, 4, 3),
    _config(64, 32, 4, 2),
    _config(32, 32, 4, 2),
]
SHARED_MEMORY = 232448  # bytes one block may use on an H100 (227 KB)


def fits_shared_memory(config: triton.Config, head_dim: int, element_size: int) -> bool:
    """The q tile plus ``num_stages`` copies of the k and v tiles, with room for the compiler's scratch."""
    kw = config.kwargs
    tiles = (kw["BLOCK_M"] + 2 * kw["BLOCK_N"] * config.num_stages) * head_dim * element_size
    return tiles <= 0.85 * SHARED_MEMORY


# fp32 accumulator registers a thread may give the [BLOCK_M, HEAD_DIM] output tile: past this, ptxas spilled
# inside the key loop (sm_90, 128-row tiles of head dim 128 on 4 warps: 40-52 bytes a thread), so those tiles
# are not tried (bench/results/kernel_registers_sm90.txt).
ACCUMULATOR_REGISTERS = 64


def fits_registers(config: triton.Config, head_dim: int) -> bool:
    return config.kwargs["BLOCK_M"] * head_dim <= ACCUMULATOR_REGISTERS * 32 * config.num_warps


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Before compiling and timing: drop tiles too big for shared memory or registers, then query (key) tiles
    longer than the query (key) length bucket."""
    size, head_dim = named_args["q_ptr"].element_size(), kwargs["HEAD_DIM"]
    configs = [c for c in configs if fits_shared_memory(c, head_dim, size) and fits_registers(c, head_dim)]
    return within_bucket(within_bucket(configs, "BLOCK_M", named_args["SQ_BUCKET"]), "BLOCK_N",
                         named_args["SK_BUCKET"])


# Tuned per power-of-two bucket of the query and key lengths and of batch x heads (capped: past 1024
# programs per query block every config fills the GPU), so new batch shapes reuse a tuned config. The buckets
# are keys only, not specialized on (see kernels._common).
@autotune(GPU_CONFIGS, key=["SQ_BUCKET", "SK_BUCKET", "BH_BUCKET", "HEAD_DIM"],
          prune_configs_by={"early_config_prune": _prune_configs}, buckets=["SQ_BUCKET", "SK_BUCKET", "BH_BUCKET"])
@triton.jit(do_not_specialize=["SQ_BUCKET", "SK_BUCKET", "BH_BUCKET"])
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr,
    H, SQ, SK, qk_scale, SQ_BUCKET, SK_BUCKET, BH_BUCKET,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LENGTHS: tl.constexpr = False, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    # m_ptr: the key-padding mask [B, SK] (HAS_MASK), or each batch row's number of real keys [B] (HAS_LENGTHS),
    # its padding all at the end: then, as with no mask, the key tiles before the row's last one are full and
    # take no bounds checks or selects, and tiles of padding only are not visited at all.
    b, h, pid_m = _program(tl.program_id(0), H, SQ, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=offs_m[:, None] < SQ, other=0.0)
    q, m_i, l_i, acc = _start(q, qk_scale, BLOCK_M, HEAD_DIM, UPCAST)
    kv_len = _key_count(m_ptr, b, SK, HAS_LENGTHS)
    full = 0 if HAS_MASK else kv_len - kv_len % BLOCK_N  # HAS_MASK: any key of any tile may be padding
    for start in range(0, full, BLOCK_N):
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, m_ptr, b * SK, start + offs_n, offs_d, kv_len,
                                stride_ks, stride_vs, False, False, UPCAST)
    for start in range(full, kv_len, BLOCK_N):
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, m_ptr, b * SK, start + offs_n, offs_d, kv_len,
                                stride_ks, stride_vs, True, HAS_MASK, UPCAST)
    _finish(acc, l_i, o_ptr + b * stride_ob + h * stride_oh, offs_m, offs_d, SQ, stride_os)
    pdl_launch_dependents(USE_PDL)


def _set_tile_shapes(nargs: dict) -> None:
    """A TMA descriptor carries its tile shape: set it from the config about to run (the autotuner's
    ``pre_hook``; the interpreter's launch calls it with its fixed tiles)."""
    nargs["q_desc"].block_shape = [nargs["BLOCK_M"], nargs["HEAD_DIM"]]
    nargs["k_desc"].block_shape = nargs["v_desc"].block_shape = [nargs["BLOCK_N"], nargs["HEAD_DIM"]]


TMA_CONFIGS = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_set_tile_shapes)
               for c in GPU_CONFIGS]


def _prune_tma_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    return _prune_configs(configs, {**named_args, "q_ptr": named_args["q_desc"].base}, **kwargs)


@autotune(TMA_CONFIGS, key=["SQ_BUCKET", "SK_BUCKET", "BH_BUCKET", "HEAD_DIM"],
          prune_configs_by={"early_config_prune": _prune_tma_configs}, buckets=["SQ_BUCKET", "SK_BUCKET", "BH_BUCKET"])
@triton.jit(do_not_specialize=["SQ_BUCKET", "SK_BUCKET", "BH_BUCKET"])
def _attention_tma_kernel(
    q_desc, k_desc, v_desc, k_ptr, v_ptr, m_ptr, o_ptr,
    H, SQ, SK, qk_scale, SQ_BUCKET, SK_BUCKET, BH_BUCKET,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LENGTHS: tl.constexpr = False, USE_PDL: tl.constexpr = False,
):
    """The kernel above with q and the full key/value tiles read by TMA. Each descriptor sees its tensor as a
    matrix of rows ``stride_*s`` elements apart (:func:`_tma_descriptor`): the head (b, h) starts at row
    ``(b * stride_b + h * stride_h) // stride_s`` and column ``... % stride_s``. Rows past a head's own ones
    belong to the next head or batch row (or are zeros past the tensor): q rows past SQ are computed but not
    stored, and the last, partial key tile is read with masked loads as above."""
    pdl_wait(USE_PDL)
    b, h, pid_m = _program(tl.program_id(0), H, SQ, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_at = b * stride_qb + h * stride_qh
    k_at = b * stride_kb + h * stride_kh
    v_at = b * stride_vb + h * stride_vh

    q = q_desc.load([(q_at // stride_qs + pid_m * BLOCK_M).to(tl.int32), (q_at % stride_qs).to(tl.int32)])
    q, m_i, l_i, acc = _start(q, qk_scale, BLOCK_M, HEAD_DIM, UPCAST)
    kv_len = _key_count(m_ptr, b, SK, HAS_LENGTHS)
    full = 0 if HAS_MASK else kv_len - kv_len % BLOCK_N
    k_row, k_col = (k_at // stride_ks).to(tl.int32), (k_at % stride_ks).to(tl.int32)
    v_row, v_col = (v_at // stride_vs).to(tl.int32), (v_at % stride_vs).to(tl.int32)
    for start in range(0, full, BLOCK_N):
        k = k_desc.load([k_row + start, k_col])
        v = v_desc.load([v_row + start, v_col])
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, q, k.T, v, None, False)
    for start in range(full, kv_len, BLOCK_N):
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_ptr + k_at, v_ptr + v_at, m_ptr, b * SK, start + offs_n, offs_d,
                                kv_len, stride_ks, stride_vs, True, HAS_MASK, UPCAST)
    _finish(acc, l_i, o_ptr + b * stride_ob + h * stride_oh, offs_m, offs_d, SQ, stride_os)
    pdl_launch_dependents(USE_PDL)


def _persistent_config(block_m: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "STAGES": stages}, num_warps=warps, num_stages=stages)


# Every key of a short sequence fits one key tile (BLOCK_N: the key length's power of two), so a query tile is
# one load of q, k and v, two dots and a store; 4,096 of them at B 128, H 32, S 128, each a program of the kernel
# above, spend much of their time starting up and waiting on their first loads. Here as many programs as the
# GPU holds at once walk the tiles instead, their loops pipelined (``STAGES``) so that the next tile's q, k
# and v are on their way while this one's are computed. On an H100 at S 128 the kernel above moved 2.5 TB/s
# (bench/results/gpu run 17); 1.2x SDPA flash there takes 2.85-3.0 TB/s, what a copy reaches.
PERSISTENT_CONFIGS = [
    _persistent_config(128, 4, 2),
    _persistent_config(128, 8, 2),
    _persistent_config(64, 4, 2),
    _persistent_config(64, 4, 3),
    _persistent_config(128, 8, 3),
]
PERSISTENT_MAX_KEYS = 128  # one key tile: its scores (BLOCK_M x BLOCK_N fp32) in registers beside the output's
# Registers a thread may give the fp32 score and output tiles and the q tile together: past this, ptxas spilled
# (sm_90, 128 x 128 scores on 4 warps: with a bf16 q of head dim 64, 224 a thread, 164 bytes stored and 156 loaded;
# fp32 q of head dim 32, 192, 652 and 680), and at 176 (bf16, head dim 32) or 160 it did not, so those tiles are not
# tried (`tests/kernels/kernel_compile_check.py --registers`).
PERSISTENT_TILE_REGISTERS = 176
SHARED_MEMORY_PER_SM = 233472  # bytes of shared memory an H100 multiprocessor has for its blocks (228 KB)


def persistent_shared_bytes(block_m: int, block_n: int, stages: int, head_dim: int, element_size: int) -> int:
    """Shared memory of the persistent kernel: ``stages`` copies of the q tile and the k and v tiles (what
    ``ptxas`` reported for sm_90 at head dims 32, 64 and 128)."""
    return stages * (block_m + 2 * block_n) * head_dim * element_size


def persistent_block_n(sk: int) -> int:
    """The persistent kernel's key tile for ``sk`` keys: all of them."""
    return max(16, triton.next_power_of_2(sk))


def persistent_configs(head_dim: int, element_size: int, block_n: int) -> list[triton.Config]:
    """The configs whose tiles fit registers and shared memory at this head dim, dtype size and key tile: none
    for fp32 at head dim 128 and 128 keys, which the tiled kernel runs."""
    def fits(c: triton.Config) -> bool:
        block_m, threads = c.kwargs["BLOCK_M"], 32 * c.num_warps
        registers = block_m * (block_n + head_dim + head_dim * element_size // 4)  # scores, output, q
        return (fits_registers(c, head_dim) and registers <= PERSISTENT_TILE_REGISTERS * threads
                and persistent_shared_bytes(block_m, block_n, c.kwargs["STAGES"], head_dim, element_size)
                <= 0.85 * SHARED_MEMORY)

    return [c for c in PERSISTENT_CONFIGS if fits(c)]


def _prune_persistent_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    fitting = persistent_configs(kwargs["HEAD_DIM"], named_args["q_ptr"].element_size(), kwargs["BLOCK_N"])
    return within_bucket([c for c in configs if c in fitting], "BLOCK_M", named_args["SQ_BUCKET"])


@autotune(PERSISTENT_CONFIGS, key=["SQ_BUCKET", "SK_BUCKET", "BH_BUCKET", "HEAD_DIM"],
          prune_configs_by={"early_config_prune": _prune_persistent_configs},
          buckets=["SQ_BUCKET", "SK_BUCKET", "BH_BUCKET"])
@triton.jit(do_not_specialize=["SQ_BUCKET", "SK_BUCKET", "BH_BUCKET"])
def _attention_persistent_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr,
    B, H, SQ, SK, qk_scale, SQ_BUCKET, SK_BUCKET, BH_BUCKET,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr, HAS_LENGTHS: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
):
    """The first kernel's work for keys that fit one tile (``SK <= BLOCK_N``), each program walking query
    tiles ``tl.num_programs(0)`` apart."""
    pdl_wait(USE_PDL)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    tiles = B * H * tl.cdiv(SQ, BLOCK_M)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), num_stages=STAGES):
        b, h, pid_m = _program(tile, H, SQ, BLOCK_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                    mask=offs_m[:, None] < SQ, other=0.0)
        q, m_i, l_i, acc = _start(q, qk_scale, BLOCK_M, HEAD_DIM, UPCAST)
        kv_len = _key_count(m_ptr, b, SK, HAS_LENGTHS)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_ptr + b * stride_kb + h * stride_kh,
                                v_ptr + b * stride_vb + h * stride_vh, m_ptr, b * SK, offs_n, offs_d, kv_len,
                                stride_ks, stride_vs, True, HAS_MASK, UPCAST)
        _finish(acc, l_i, o_ptr + b * stride_ob + h * stride_oh, offs_m, offs_d, SQ, stride_os)
    pdl_launch_dependents(USE_PDL)


@triton.jit
def _program(tile, H, SQ, BLOCK_M: tl.constexpr):
    """The batch row, head and query block of ``tile`` (a program's id, or the tiles a persistent program
    walks). One axis over (batch x head, query block), query blocks fastest, so a head's programs run together
    and share its keys in L2; a second grid axis would cap batch x heads at 65,535."""
    blocks_m = tl.cdiv(SQ, BLOCK_M)
    bh = tile // blocks_m
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64), tile % blocks_m


@triton.jit
def _start(q, qk_scale, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """q scaled, and the online softmax's empty state: running row max (log2 domain), sum of exp, output."""
    if UPCAST:  # the interpreter computes bf16 wrongly: do its math in fp32
        q = q.to(tl.float32)
    # The scale (log2 e folded in) goes on q once, in q's dtype, rather than on every score tile: one more
    # rounding of q, and a multiply less per score.
    q = (q * qk_scale).to(q.dtype)
    m_i = tl.full((BLOCK_M,), _NEG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    return q, m_i, l_i, tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)


@triton.jit
def _key_count(m_ptr, b, SK, HAS_LENGTHS: tl.constexpr):
    """How many of batch row ``b``'s keys are real: its length, clamped to [0, SK], or all of them. Clamped in the
    lengths' own dtype: an int64 length past 2**31 cast to int32 first would wrap (2**32 + 1 to 1)."""
    if HAS_LENGTHS:
        return tl.maximum(tl.minimum(tl.load(m_ptr + b), SK), 0).to(tl.int32)
    return SK


@triton.jit
def _finish(acc, l_i, o_base, offs_m, offs_d, SQ, stride_os):
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = o_base + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_base.dtype.element_ty), mask=offs_m[:, None] < SQ)


@triton.jit
def _attend(acc, m_i, l_i, q, k_base, v_base, m_ptr, mask_row, cols, offs_d, kv_len, stride_ks, stride_vs,
            CHECKED: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr):
    """One key/value tile into the online softmax (q already scaled). ``CHECKED``: keys at or past ``kv_len``
    (and with ``HAS_MASK`` the masked ones) get zero weight; unchecked, every key of the tile is real."""
    valid = None
    if CHECKED:
        valid = cols < kv_len
        if HAS_MASK:
            valid &= tl.load(m_ptr + mask_row + cols, mask=valid, other=0) != 0
        k_t = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=valid[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=valid[:, None], other=0.0)
    else:
        k_t = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None])
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :])
    if UPCAST:
        k_t = k_t.to(tl.float32)
        v = v.to(tl.float32)
    return _online_softmax(acc, m_i, l_i, q, k_t, v, valid, CHECKED)


@triton.jit
def _online_softmax(acc, m_i, l_i, q, k_t, v, valid, CHECKED: tl.constexpr):
    """Scores against one key tile (``k_t``: ``[HEAD_DIM, BLOCK_N]``) into the running max, sum and output.
    ``CHECKED``: only the keys where ``valid`` holds count."""
    s = tl.dot(q, k_t)
    if CHECKED:
        s = tl.where(valid[None, :], s, _NEG)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    if CHECKED:  # a row with no real key yet has m_new = _NEG, where exp2 of a masked score would give 1
        p = tl.where(valid[None, :], p, 0.0)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


def _validate(q, k, v, key_padding_mask, key_lengths=None, scale=None) -> None:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    if scale is not None and not math.isfinite(scale):  # scores of inf or NaN: NaN out, or zeros on the CPU path
        raise ValueError(f"scale must be a finite number (None: D ** -0.5), got {scale!r}")
    b, h, _, d = q.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"q head dim must be one of {HEAD_DIMS}, got {d}")
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, d):
        raise ValueError(f"k must be [B={b}, H={h}, S_k, D={d}], got {tuple(k.shape)}")
    check_tensor("v", v, shape=k.shape, dtypes=(q.dtype,), device=q.device)
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, shape=(b, k.shape[2]), dtypes=(torch.bool,),
                     device=q.device)
    if key_lengths is not None:
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask and key_lengths: pass one of them, not both")
        check_tensor("key_lengths", key_lengths, shape=(b,), dtypes=(torch.int32, torch.int64), device=q.device)


def _check_head_stride(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must have a contiguous head dimension (stride 1 along the last axis), got "
                         f"strides {t.stride()}")


def _output(out: torch.Tensor | None, like: torch.Tensor, **reads: torch.Tensor) -> torch.Tensor:
    """``out`` checked against q (``like``) and against the tensors the kernel reads while writing it,
    ``reads``; or a new ``[B, S_q, H, D]`` buffer seen as ``[B, H, S_q, D]``."""
    if out is None:
        b, h, sq, d = like.shape
        return torch.empty((b, sq, h, d), dtype=like.dtype, device=like.device).transpose(1, 2)
    check_tensor("out", out, shape=like.shape, dtypes=(like.dtype,), device=like.device)
    _check_head_stride("out", out)
    if any(stride == 0 and size > 1 for size, stride in zip(out.shape, out.stride(), strict=True)):
        raise ValueError(f"out must not be an expanded view (strides {out.stride()}): its rows would overlap")
    check_apart(out, **reads)
    return out


TMA_ENV_VAR = "MAAS_ATTENTION_TMA"
PERSISTENT_ENV_VAR = "MAAS_ATTENTION_PERSISTENT"
_ENV_VARS = {"tma": TMA_ENV_VAR, "persistent": PERSISTENT_ENV_VAR}
_DEFAULT_SETTINGS = {TMA_ENV_VAR: "auto", PERSISTENT_ENV_VAR: "off"}  # see the module's docstring


def _setting(env_var: str) -> str:
    """``off``, ``on`` (wherever it can run, the interpreter included) or ``auto`` (on a GPU where it can run,
    timed against the others: the fastest runs)."""
    return env_choice(env_var, _DEFAULT_SETTINGS[env_var], ("off", "on", "auto"))


def _tma_descriptor(t: torch.Tensor) -> TensorDescriptor | None:
    """``t`` (``[B, H, S, D]``) as the matrix ``_attention_tma_kernel`` reads, rows ``t.stride(2)`` elements apart:
    ``[B * S, H * D]`` where the heads lie side by side in each position's row (``[B, S, H, D]`` memory, a fused
    QKV projection's views among them), ``[B * H * S, D]`` where ``t`` is a contiguous ``[B, H, S, D]``; None for
    any other layout, or one that TMA cannot address (16-byte aligned base and rows, 2**31 rows at most)."""
    b, h, s, d = t.shape
    stride_b, stride_h, stride_s, _ = t.stride()
    if t.numel() == 0:  # a descriptor has no empty dimension (the plain kernel gives zeros for no keys)
        return None
    if (h == 1 or stride_h == d) and (b == 1 or stride_b == s * stride_s) and stride_s >= h * d:
        shape = [b * s, h * d]
    elif stride_s == d and (h == 1 or stride_h == s * d) and (b == 1 or stride_b == h * s * d):
        shape = [b * h * s, d]
    else:
        return None
    if t.data_ptr() % 16 or (stride_s * t.element_size()) % 16 or shape[0] >= 2**31:  # the kernel's int32 rows
        return None
    return TensorDescriptor(t, shape, [stride_s, 1], [1, 1])  # tile shapes: set per config (pre_hook)


def _tma_descriptors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[TensorDescriptor] | None:
    """:func:`_tma_readable` where ``MAAS_ATTENTION_TMA`` lets the TMA kernel run (``on``; ``auto`` on a GPU), else
    None: no descriptors made for a kernel that will not run (the default ``auto`` under the interpreter)."""
    return _tma_readable(q, k, v) if _may_run(TMA_ENV_VAR, q) else None


def _tma_readable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[TensorDescriptor] | None:
    """Descriptors of q, k and v for ``_attention_tma_kernel`` where the GPU has TMA (compute capability 9.0 or
    more; the interpreter emulates it) and every layout suits it; else None."""
    if not INTERPRETER and compute_capability(q) < 90:
        return None
    descriptors = [_tma_descriptor(t) for t in (q, k, v)]
    return None if any(desc is None for desc in descriptors) else descriptors


def _persistent_fits(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the persistent kernel can run the problem: up to ``PERSISTENT_MAX_KEYS`` keys (one or more), with a
    config of it that fits."""
    sk = k.shape[2]
    return 0 < sk <= PERSISTENT_MAX_KEYS and bool(persistent_configs(q.shape[3], q.element_size(),
                                                                     persistent_block_n(sk)))


def _may_run(env_var: str, q: torch.Tensor) -> bool:
    setting = _setting(env_var)
    return (setting == "on" and (q.is_cuda or INTERPRETER)) or (setting == "auto" and q.is_cuda)


def kernel_candidates(q: torch.Tensor, k: torch.Tensor, descriptors: list[TensorDescriptor] | None) -> list[str]:
    """The kernels that may run a problem by their settings, the tiled one (which runs everything) first: the TMA
    variant where ``descriptors`` could be made, the persistent one for up to ``PERSISTENT_MAX_KEYS`` keys where
    a config of it fits."""
    return ["tiled", *(["tma"] if descriptors is not None and _may_run(TMA_ENV_VAR, q) else []),
            *(["persistent"] if _may_run(PERSISTENT_ENV_VAR, q) and _persistent_fits(q, k) else [])]


_KERNEL_CHOICE = TimedChoice("maas_attention_kernel", bucket_at=5)  # the key's batch x heads bucket


def _choose_kernel(q: torch.Tensor, candidates: list[str], key: tuple, launchers: dict) -> str:
    """The kernel that runs a problem: one forced ``on`` (the TMA variant before the persistent one) where it can
    run; otherwise, where several may (``auto``), each is timed once per key (with its own autotuned tiles)
    and the fastest kept (:class:`kernels._autotune.TimedChoice`, as ``kernels.linear`` chooses its GEMM)."""
    forced = [name for name in candidates[1:] if _setting(_ENV_VARS[name]) == "on"]
    if forced or len(candidates) == 1:
        return (forced or candidates)[0]
    key = (q.device, *key, "+".join(candidates))
    return _KERNEL_CHOICE.choose(key, stored_key(key), candidates, lambda name: gpu_ms(launchers[name]))


INTERPRETER_PROGRAMS = 3  # the persistent kernel's programs under the interpreter: each walks several tiles


def _fixed_meta(kernel: str, sq: int, sk: int, d: int, element_size: int) -> dict:
    """The tiles a launch passes where nothing is autotuned: none on a GPU; few, large tiles under the
    interpreter (every tile costs Python time); compiled without a GPU to tune on (the sm_90 compile check),
    the first config its pruning keeps."""
    persistent = kernel == "persistent"
    if USE_AUTOTUNE:
        return {}
    if INTERPRETER:
        block = min(64, max(16, triton.next_power_of_2(max(sq, sk))))
        return {"BLOCK_M": min(64, max(16, triton.next_power_of_2(sq))), "STAGES": 2} if persistent else \
            {"BLOCK_M": block, "BLOCK_N": block}
    if persistent:
        return persistent_configs(d, element_size, persistent_block_n(sk))[0].all_kwargs()
    return next(c for c in GPU_CONFIGS if fits_shared_memory(c, d, element_size) and fits_registers(c, d)).all_kwargs()


KERNELS = ("tiled", "tma", "persistent")


def _launch(q, k, v, key_padding_mask, scale, out, key_lengths=None, kernel: str | None = None) -> torch.Tensor:
    o = _output(out, q, q=q, k=k, v=v)
    b, h, sq, d = q.shape
    sk = k.shape[2]
    if o.numel() == 0:
        return o
    if kernel is None:
        descriptors = _tma_descriptors(q, k, v)
    else:  # forced: it must be able to run the problem, whatever the settings say
        descriptors = _tma_readable(q, k, v) if kernel == "tma" else None
        if (kernel == "tma" and descriptors is None) or (kernel == "persistent" and not _persistent_fits(q, k)):
            raise ValueError(f"kernel={kernel!r}: the {kernel} variant does not run this problem here (TMA: compute "
                             "capability 9.0 and a layout it reads; persistent: 1-128 keys, a tile that fits)")
    qk_scale = (scale if scale is not None else 1.0 / math.sqrt(d)) * math.log2(math.e)

    def grid(config: dict) -> tuple[int]:  # called with the autotuner's chosen config
        return (triton.cdiv(sq, config["BLOCK_M"]) * b * h,)

    def persistent_grid(config: dict) -> tuple[int]:  # as many programs as fit the GPU at once, at most a tile each
        shared = persistent_shared_bytes(config["BLOCK_M"], block_n, config["STAGES"], d, q.element_size())
        programs = multiprocessors(q.device) * min(4, max(1, SHARED_MEMORY_PER_SM // shared)) if q.is_cuda \
            else INTERPRETER_PROGRAMS
        return (min(programs, grid(config)[0]),)

    buckets = triton.next_power_of_2(sq), triton.next_power_of_2(sk), min(triton.next_power_of_2(b * h), 1024)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3])
    args = (key_padding_mask if key_lengths is None else key_lengths, o, h, sq, sk, qk_scale, *buckets, *strides)
    options = dict(HAS_MASK=key_padding_mask is not None, HEAD_DIM=d, UPCAST=INTERPRETER,
                   HAS_LENGTHS=key_lengths is not None, **pdl(q))
    block_n = persistent_block_n(sk)

    def tiled() -> None:
        _attention_kernel[grid](q, k, v, *args, **options, **_fixed_meta("tiled", sq, sk, d, q.element_size()))

    def tma() -> None:
        meta = _fixed_meta("tma", sq, sk, d, q.element_size())
        if meta:  # fixed tiles: the autotuner's pre_hook does not run
            _set_tile_shapes({"q_desc": descriptors[0], "k_desc": descriptors[1], "v_desc": descriptors[2],
                              **options, **meta})
        _attention_tma_kernel[grid](*descriptors, k, v, *args, **options, **meta)

    def persistent() -> None:
        _attention_persistent_kernel[persistent_grid](
            q, k, v, args[0], o, b, *args[2:], **options, BLOCK_N=block_n,
            **_fixed_meta("persistent", sq, sk, d, q.element_size()))

    launchers = {"tiled": tiled, "tma": tma, "persistent": persistent}
    if kernel is None:
        key = (q.dtype, d, *buckets, options["HAS_MASK"], options["HAS_LENGTHS"])
        kernel = _choose_kernel(q, kernel_candidates(q, k, descriptors), key, launchers)
    launchers[kernel]()
    return o


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_padding_mask: torch.Tensor | None = None, scale: float | None = None, *,
                     key_lengths: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     kernel: str | None = None) -> torch.Tensor:
    """The Triton launcher: any strides but a contiguous head dimension; the mask must be contiguous. ``kernel``
    forces one of ``KERNELS`` (``tma`` and ``persistent`` where they can run the problem, else ``ValueError``), as
    the GPU checks and benchmarks time each; None lets ``MAAS_ATTENTION_TMA``, ``MAAS_ATTENTION_PERSISTENT`` and
    the timings decide."""
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} or None, got {kernel!r}")
    _validate(q, k, v, key_padding_mask, key_lengths, scale)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_head_stride(name, t)
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, contiguous=True)
    if key_lengths is not None:
        check_tensor("key_lengths", key_lengths, contiguous=True)
    return _launch(q, k, v, key_padding_mask, scale, out, key_lengths, kernel)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    key_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch's ``scaled_dot_product_attention`` in the compute dtype (float64 for the tests' references), and
    zeros for a batch row without a real key, where its softmax over nothing gives NaN. CPU tensors are served
    with it: on this project's 2-core VM its fused kernel took 18-26 ms where matmul, softmax, matmul took
    117-134 ms (B 64, H 12, S 128, D 32, fp32, keys masked)."""
    dt = compute_dtype(q)
    if key_lengths is not None:
        key_padding_mask = lengths_mask(key_lengths, k.shape[2])
    keep = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(cast(q, dt), cast(k, dt), cast(v, dt), attn_mask=keep, scale=scale)
    if keep is not None:
        out = torch.where(keep.any(dim=-1, keepdim=True), out, 0.0)
    return cast(out, q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
              scale: float | None = None, *, key_lengths: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal attention. q ``[B, H, S_q, D]``, k and v ``[B, H, S_k, D]`` with D in 16/32/64/128,
    ``key_padding_mask`` bool ``[B, S_k]`` True for real tokens, or instead ``key_lengths`` (int32/int64
    ``[B]``) when each row's padding is all at the end: its first ``length`` keys are real (a length past S_k
    counts as S_k, below 0 as 0). Lengths leave the kernel less to do: full key tiles skip every check, and
    tiles of padding only are skipped. ``scale`` defaults to ``D ** -0.5``. The result is ``[B, H, S_q, D]``; on the
    Triton path its memory is ``[B, S_q, H, D]`` (see the module)."""
    _validate(q, k, v, key_padding_mask, key_lengths, scale)
    if backend_for(q, k, v, key_padding_mask, key_lengths) == "torch":
        result = attention_reference(q, k, v, key_padding_mask, scale, key_lengths=key_lengths)
        return result if out is None else _output(out, q).copy_(result)
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    lengths = None if key_lengths is None else key_lengths.contiguous()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _launch(q, k, v, mask, scale, out, lengths)
