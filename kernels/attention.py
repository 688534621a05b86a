"""Multi-head attention forward, FlashAttention style: ``softmax(q k^T * scale + mask) v`` without ever
writing the ``[S, S]`` score matrix to memory.

Each program owns a block of query rows and streams over key/value tiles, keeping a running row maximum
and normaliser (online softmax) and rescaling its accumulator when the maximum grows. Padded keys
(``key_padding_mask == False``) get zero weight; padded *query* rows are computed like any other row and
so stay finite. A batch row whose keys are all padding gets an all-zero output.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._common import FLOAT_DTYPES, check_tensor, compute_dtype, into, output
from kernels.dispatch import INTERPRETER, backend_for

HEAD_DIMS = (16, 32, 64, 128)
# A finite "-inf": an all-masked tile then gives exp(0) * 0 = 0 rather than exp(-inf + inf) = NaN.
_NEG = tl.constexpr(-1.0e30)


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr,
    H, SQ, SK, qk_scale,
    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = q_ptr + bh * SQ * HEAD_DIM
    k_base = k_ptr + bh * SK * HEAD_DIM
    v_base = v_ptr + bh * SK * HEAD_DIM

    q = tl.load(q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_m[:, None] < SQ, other=0.0)
    if UPCAST:  # the interpreter computes bf16 wrongly: do its math in fp32
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), _NEG, dtype=tl.float32)  # running row max (log2 domain)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)

    for start in range(0, SK, BLOCK_N):
        cols = start + offs_n
        valid = cols < SK
        if HAS_MASK:
            valid &= tl.load(m_ptr + (bh // H) * SK + cols, mask=valid, other=0) != 0
        k_t = tl.load(k_base + cols[None, :] * HEAD_DIM + offs_d[:, None], mask=valid[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=valid[:, None], other=0.0)
        if UPCAST:
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k_t) * qk_scale
        s = tl.where(valid[None, :], s, _NEG)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.where(valid[None, :], tl.exp2(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = o_ptr + bh * SQ * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=offs_m[:, None] < SQ)


def _validate(q, k, v, key_padding_mask) -> None:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
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


def _launch(q, k, v, key_padding_mask, scale, out) -> torch.Tensor:
    o = output(out, q.shape, q)
    b, h, sq, d = q.shape
    sk = k.shape[2]
    if o.numel() == 0:
        return o
    if INTERPRETER:  # few, large tiles: every tile costs Python time
        block_m = block_n = min(64, max(16, triton.next_power_of_2(max(sq, sk))))
        meta = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    elif q.dtype == torch.float32:  # fp32 tiles take twice the shared memory
        meta = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    else:
        meta = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4 if d <= 64 else 8, "num_stages": 3}
    qk_scale = (scale if scale is not None else 1.0 / math.sqrt(d)) * math.log2(math.e)
    grid = (triton.cdiv(sq, meta["BLOCK_M"]), b * h)
    _attention_kernel[grid](q, k, v, key_padding_mask, o, h, sq, sk, qk_scale,
                            HAS_MASK=key_padding_mask is not None, HEAD_DIM=d, UPCAST=INTERPRETER, **meta)
    return o


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_padding_mask: torch.Tensor | None = None, scale: float | None = None, *,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton launcher (contiguous inputs only)."""
    _validate(q, k, v, key_padding_mask)
    for name, t in (("q", q), ("k", k), ("v", v), ("key_padding_mask", key_padding_mask)):
        if t is not None:
            check_tensor(name, t, contiguous=True)
    return _launch(q, k, v, key_padding_mask, scale, out)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    dt = compute_dtype(q)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = q.to(dt) @ k.to(dt).transpose(-1, -2) * scale
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        probs = probs.masked_fill(~keep.any(dim=-1, keepdim=True), 0.0)  # all-padding row: zeros, not NaN
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ v.to(dt)).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
              scale: float | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal attention. q ``[B, H, S_q, D]``, k and v ``[B, H, S_k, D]`` with D in 16/32/64/128,
    ``key_padding_mask`` bool ``[B, S_k]`` True for real tokens; ``scale`` defaults to ``D ** -0.5``."""
    _validate(q, k, v, key_padding_mask)
    if backend_for(q, k, v, key_padding_mask) == "torch":
        return into(out, attention_reference(q, k, v, key_padding_mask, scale))
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    return _launch(q.contiguous(), k.contiguous(), v.contiguous(), mask, scale, out)
