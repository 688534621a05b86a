"""LSTM layer forward (one direction), gates in torch's order ``i, f, g, o``.

The input projection ``x @ W_ih^T + b`` has no time dependency, so it runs once for all steps as one
:func:`kernels.linear` GEMM. What remains per time step is fused into one kernel: ``h @ W_hh^T`` for the
four gates, the precomputed input gates, the three sigmoids and the tanh, the cell update and the new
hidden state, with h and c kept in fp32. One launch per step (the recurrence is sequential).

Variable lengths follow torch's packed-sequence semantics: the forward direction reads positions
``0 .. len-1``; with ``reverse=True`` each sequence starts at its own last real token ``len-1`` and walks
back to 0 (so a bidirectional layer is this op twice, outputs concatenated). Outputs at positions
``>= len`` are 0. The initial state is zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from kernels._common import FLOAT_DTYPES, check_contiguous, check_tensor, compute_dtype, into, output, tanh, value_range
from kernels.dispatch import INTERPRETER, backend_for
from kernels.linear import launch_linear


@triton.jit(do_not_specialize=["step", "B"])  # one kernel for every step and batch: see kernels._common
def _lstm_step_kernel(
    gx_ptr, whh_ptr, len_ptr, h_in_ptr, h_out_ptr, c_ptr, y_ptr,
    step, B, S, H,
    REVERSE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    b_ok = offs_b < B
    j_ok = offs_j < H

    # Recurrent term for the four gates of hidden units offs_j: h_prev @ W_hh[gate * H + j, :]^T.
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for start in range(0, H, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        h = tl.load(h_in_ptr + offs_b[:, None] * H + offs_k[None, :], mask=b_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w_ptrs = whh_ptr + offs_j[None, :] * H + offs_k[:, None]
        w_mask = k_ok[:, None] & j_ok[None, :]
        acc_i = tl.dot(h, tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32), acc_i)
        acc_f = tl.dot(h, tl.load(w_ptrs + H * H, mask=w_mask, other=0.0).to(tl.float32), acc_f)
        acc_g = tl.dot(h, tl.load(w_ptrs + 2 * H * H, mask=w_mask, other=0.0).to(tl.float32), acc_g)
        acc_o = tl.dot(h, tl.load(w_ptrs + 3 * H * H, mask=w_mask, other=0.0).to(tl.float32), acc_o)

    # Which position each sequence handles at this step; finished sequences write 0 at position `step`.
    length = tl.load(len_ptr + offs_b, mask=b_ok, other=0)
    valid = step < length
    pos = tl.where(valid, length - 1 - step, step) if REVERSE else tl.zeros_like(length) + step
    tile_ok = b_ok[:, None] & j_ok[None, :]
    gx = gx_ptr + ((offs_b * S + pos) * 4 * H)[:, None] + offs_j[None, :]
    gate_i = tl.sigmoid(acc_i + tl.load(gx, mask=tile_ok, other=0.0).to(tl.float32))
    gate_f = tl.sigmoid(acc_f + tl.load(gx + H, mask=tile_ok, other=0.0).to(tl.float32))
    gate_g = tanh(acc_g + tl.load(gx + 2 * H, mask=tile_ok, other=0.0).to(tl.float32))
    gate_o = tl.sigmoid(acc_o + tl.load(gx + 3 * H, mask=tile_ok, other=0.0).to(tl.float32))

    state = offs_b[:, None] * H + offs_j[None, :]
    c = gate_f * tl.load(c_ptr + state, mask=tile_ok, other=0.0) + gate_i * gate_g
    h_new = gate_o * tanh(c)
    tl.store(c_ptr + state, c, mask=tile_ok)  # each program owns its (b, j) tile of c: in place is safe
    tl.store(h_out_ptr + state, h_new, mask=tile_ok)  # h is double-buffered: all programs read h_in
    y = tl.where(valid[:, None], h_new, 0.0)
    tl.store(y_ptr + ((offs_b * S + pos) * H)[:, None] + offs_j[None, :], y.to(y_ptr.dtype.element_ty),
             mask=tile_ok)


def _validate(x, w_ih, w_hh, bias, lengths) -> None:
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("w_hh", w_hh, ndim=2, dtypes=(x.dtype,), device=x.device)
    hidden = w_hh.shape[1]
    if w_hh.shape[0] != 4 * hidden or hidden < 1:
        raise ValueError(f"w_hh must be [4H, H] with H >= 1, got {tuple(w_hh.shape)}")
    if x.shape[2] < 1:
        raise ValueError(f"x must be [B, S, I] with I >= 1, got {tuple(x.shape)}")
    check_tensor("w_ih", w_ih, shape=(4 * hidden, x.shape[2]), dtypes=(x.dtype,), device=x.device)
    check_tensor("bias", bias, shape=(4 * hidden,), dtypes=(x.dtype,), device=x.device)
    if lengths is not None:
        check_tensor("lengths", lengths, shape=(x.shape[0],), dtypes=(torch.int64, torch.int32))
        bounds = value_range(lengths)
        if bounds is not None and (bounds[0] < 0 or bounds[1] > x.shape[1]):
            raise ValueError(f"lengths must lie in [0, {x.shape[1]}] (x's sequence length), got "
                             f"[{bounds[0]}, {bounds[1]}]")


def _launch(x, w_ih, w_hh, bias, lengths, reverse, out) -> torch.Tensor:
    b, s, _ = x.shape
    hidden = w_hh.shape[1]
    y = output(out, (b, s, hidden), x, x=x, w_ih=w_ih, w_hh=w_hh, bias=bias)
    if y.numel() == 0:
        return y
    gates = launch_linear(x, w_ih, None, bias, "none", None, None)  # [B, S, 4H] for all steps at once
    if lengths is None:
        lengths = torch.full((b,), s, dtype=torch.int64, device=x.device)
    lengths = lengths.to(device=x.device, dtype=torch.int64).contiguous()  # the kernel reads it densely
    h = [torch.zeros(b, hidden, dtype=torch.float32, device=x.device) for _ in range(2)]
    c = torch.zeros(b, hidden, dtype=torch.float32, device=x.device)
    block_b = 16 if INTERPRETER else min(64, max(16, triton.next_power_of_2(b)))
    block_h = min(64, max(16, triton.next_power_of_2(hidden)))
    block_k = min(64, max(16, triton.next_power_of_2(hidden)))
    grid = (triton.cdiv(b, block_b), triton.cdiv(hidden, block_h))
    # Two stages of (h tile + four W_hh tiles): three would need 240 KB of shared memory for fp32 64x64x64
    # tiles, more than a Hopper SM has (227 KB), and the launch would fail with OutOfResources.
    for step in range(s):
        h_in, h_out = h[step % 2], h[(step + 1) % 2]
        _lstm_step_kernel[grid](gates, w_hh, lengths, h_in, h_out, c, y, step, b, s, hidden, REVERSE=reverse,
                                BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, num_stages=2)
    return y


def lstm_triton(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, bias: torch.Tensor,
                lengths: torch.Tensor | None = None, reverse: bool = False, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton launcher (contiguous inputs only; ``lengths`` may live on the CPU, as torch's do)."""
    _validate(x, w_ih, w_hh, bias, lengths)
    check_contiguous(x=x, w_ih=w_ih, w_hh=w_hh, bias=bias)
    return _launch(x, w_ih, w_hh, bias, lengths, reverse, out)


def lstm_reference(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, bias: torch.Tensor,
                   lengths: torch.Tensor | None = None, reverse: bool = False) -> torch.Tensor:
    """torch's own LSTM over a packed sequence, with the same semantics (fp32, or fp64 for fp64 inputs).

    The reverse direction is the forward one over each sequence flipped within its length. torch's fused
    LSTM is what a CPU serves: a Python loop over the steps took 5x as long for one sequence of 32 tokens.
    """
    dt, out_dtype = compute_dtype(x), x.dtype
    b, s, _ = x.shape
    hidden = w_hh.shape[1]
    if b == 0 or s == 0:  # nothing to pack: what the kernel returns too
        return x.new_zeros(b, s, hidden)
    lengths = torch.full((b,), s) if lengths is None else lengths.to("cpu", torch.int64)
    steps = torch.arange(s)
    real = steps[None, :] < lengths[:, None]  # [B, S]: positions < len
    x = x.to(dt)
    if reverse:
        flip = torch.where(real, lengths[:, None] - 1 - steps[None, :], steps[None, :]).to(x.device)  # an involution
        x = x.gather(1, flip[..., None].expand(-1, -1, x.shape[2]))
    # Packing needs every length >= 1: an empty sequence runs one step and its output is zeroed below.
    packed = pack_padded_sequence(x, lengths.clamp(min=1), batch_first=True, enforce_sorted=False)
    h0 = x.new_zeros(1, b, hidden)
    data, _, _ = torch.lstm(packed.data, packed.batch_sizes, (h0, h0),
                            (w_ih.to(dt), w_hh.to(dt), bias.to(dt), torch.zeros_like(bias, dtype=dt)),
                            True, 1, 0.0, False, False)  # has_biases, num_layers, dropout, train, bidirectional
    y, _ = pad_packed_sequence(packed._replace(data=data), batch_first=True, total_length=s)
    if reverse:
        y = y.gather(1, flip[..., None].expand(-1, -1, hidden))
    return (y * real[..., None].to(y.device, dt)).to(out_dtype)


def lstm(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, bias: torch.Tensor,
         lengths: torch.Tensor | None = None, reverse: bool = False, *,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """All hidden states ``[B, S, H]`` of an LSTM over x ``[B, S, I]``; w_ih ``[4H, I]``, w_hh ``[4H, H]``,
    bias ``[4H]`` (torch's ``bias_ih + bias_hh``), ``lengths`` int ``[B]`` (default: all S)."""
    _validate(x, w_ih, w_hh, bias, lengths)
    if backend_for(x, w_ih, w_hh, bias) == "torch":
        return into(out, lstm_reference(x, w_ih, w_hh, bias, lengths, reverse))
    return _launch(x.contiguous(), w_ih.contiguous(), w_hh.contiguous(), bias.contiguous(), lengths, reverse,
                   out)
