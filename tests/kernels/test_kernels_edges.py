"""Edges every launcher shares: outputs that alias inputs, views the kernels would read as dense, empty and
degenerate sizes, non-finite values. The torch path (a CPU caller) and the Triton path must agree: the same
ValueError for the same bad argument, the same numbers for the same odd input."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close, poisoned, randn

import kernels
from kernels._common import MAX_ELEMENTS
from kernels.linear import launch_linear
from kernels.lstm import lstm_reference


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("MAAS_KERNEL_BACKEND", request.param)
    return request.param


def _aliased(backend: str):
    """The Triton path refuses an ``out`` that shares memory with an input it reads (it would read its own
    partial results); the torch path computes first and copies, so there it is the caller's business."""
    return pytest.raises(ValueError, match="out must not share memory with") if backend == "triton" else _NoRaise()


class _NoRaise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_outputs_that_alias_inputs_are_refused_on_the_triton_path(backend, gen):
    x, w = randn(gen, 16, 16), randn(gen, 16, 16)
    with _aliased(backend):
        kernels.linear(x, w, out=x)
    with _aliased(backend):
        kernels.linear(x, w, out=w)
    image, kernel = randn(gen, 1, 4, 5, 5), randn(gen, 4, 4, 1, 1)
    with _aliased(backend):
        kernels.conv2d(image, kernel, out=image)
    q = randn(gen, 1, 2, 8, 16)
    with _aliased(backend):
        kernels.attention(q, q, q, out=q)
    pooled = randn(gen, 1, 1, 4, 4)
    with _aliased(backend):
        kernels.max_pool2d(pooled, 2, out=pooled.view(-1)[:4].view(1, 1, 2, 2))


def test_outputs_that_alias_what_every_program_reads_are_refused_on_the_triton_path(backend, gen, device,
                                                                                    monkeypatch):
    """A table every program may gather from, or a weight every program loads: a program writing its rows there
    changes what the programs after it read (the rows they give came out wrong)."""
    ids, mask = torch.tensor([[1, 2], [0, 3]], device=device), torch.ones(2, 2, dtype=torch.bool, device=device)
    table = randn(gen, 6, 4)
    with _aliased(backend):
        kernels.embedding_pool(ids, table, mask, out=table[:2])
    with _aliased(backend):
        kernels.embedding_norm(ids, table, randn(gen, 2, 4), randn(gen, 4), randn(gen, 4),
                               out=table[:4].view(2, 2, 4))
    x = randn(gen, 129, 16)  # 2 programs of 128 rows
    with _aliased(backend):
        kernels.layer_norm(x, x[0], randn(gen, 16), out=x)
    monkeypatch.setenv("MAAS_LINEAR_LAYER_NORM", "1")
    buffer = randn(gen, 80, 16)  # 2 programs of 64 rows; the weight lies in the first one's
    with _aliased(backend):
        kernels.linear_layer_norm(randn(gen, 80, 16), buffer[:16], None, randn(gen, 80, 16), randn(gen, 16),
                                  randn(gen, 16), out=buffer)


def test_out_may_be_the_residual_it_adds(gen):
    x, w, residual = randn(gen, 5, 8), randn(gen, 8, 8), randn(gen, 5, 8)
    expected = x.double() @ w.double().T + residual.double()
    assert kernels.linear(x, w, residual=residual, out=residual) is residual
    assert_close(residual, expected, torch.float32, reduction=8)


def test_attention_refuses_an_expanded_out(gen, device):
    q = randn(gen, 1, 2, 4, 16)
    with pytest.raises(ValueError, match="expanded view"):
        kernels.attention(q, q, q, out=torch.zeros(1, 1, 1, 16, device=device).expand(1, 2, 4, 16))


def test_lstm_reads_strided_lengths_as_the_caller_sees_them(gen, device):
    """The kernel reads ``lengths`` densely: a strided view must be made dense first, or it reads the values
    between (and, reversed, writes past the end of ``out``)."""
    x, hidden = randn(gen, 2, 7, 3), 4
    w_ih, w_hh, bias = randn(gen, 4 * hidden, 3), randn(gen, 4 * hidden, hidden), randn(gen, 4 * hidden)
    lengths = torch.tensor([4, 7, 2, 0], device=device)[::2]  # [4, 2]
    for reverse in (False, True):
        out = poisoned(2, 7, hidden, dtype=torch.float32, device=device)
        got = kernels.lstm(x, w_ih, w_hh, bias, lengths, reverse, out=out)
        want = lstm_reference(x.double(), w_ih.double(), w_hh.double(), bias.double(), lengths.contiguous(), reverse)
        assert_close(got, want, torch.float32, reduction=hidden)


@pytest.mark.parametrize(("call", "fragment"), [
    (lambda: kernels.linear_layer_norm(torch.zeros(3, 4), torch.zeros(0, 4), None, torch.zeros(3, 0),
                                       torch.zeros(0), torch.zeros(0)), r"weight must be \[N >= 1"),
    (lambda: kernels.conv2d(torch.zeros(2, 3, 5, 5), torch.zeros(4, 3, 0, 0)), "every size >= 1"),
    (lambda: kernels.conv2d(torch.zeros(2, 0, 5, 5), torch.zeros(4, 0, 1, 1)), "every size >= 1"),
    (lambda: kernels.conv2d(torch.zeros(2, 3, 5, 5), torch.zeros(0, 3, 1, 1)), "every size >= 1"),
    (lambda: kernels.lstm(torch.zeros(2, 3, 0), torch.zeros(16, 0), torch.zeros(16, 4), torch.zeros(16)), "I >= 1"),
    (lambda: kernels.lstm(torch.zeros(2, 3, 5), torch.zeros(0, 5), torch.zeros(0, 0), torch.zeros(0)), "H >= 1"),
    (lambda: kernels.quantize_int8(torch.zeros(4, 0)), "K >= 1"),
    (lambda: kernels.quantize_fp8(torch.zeros(4, 0)), "K >= 1"),
    (lambda: kernels.max_pool2d(torch.zeros(1, 1, 4, 4), True), "kernel must be an int"),
])
def test_degenerate_sizes_are_value_errors_on_both_paths(backend, device, call, fragment):
    with torch.device(device), pytest.raises(ValueError, match=fragment):
        call()


def test_an_empty_batch_of_sequences_gives_an_empty_result_on_both_paths(backend, device):
    hidden = 4
    for b, s in ((0, 3), (2, 0)):
        with torch.device(device):
            y = kernels.lstm(torch.zeros(b, s, 5), torch.zeros(4 * hidden, 5), torch.zeros(4 * hidden, hidden),
                             torch.zeros(4 * hidden))
        assert y.shape == (b, s, hidden)


def test_max_pool2d_of_no_channels_is_empty_on_both_paths(backend, device):
    for shape in ((2, 0, 4, 5), (0, 3, 4, 5)):
        y = kernels.max_pool2d(torch.zeros(shape, device=device), 2)
        assert y.shape == (shape[0], shape[1], 2, 2)


def test_rows_with_nothing_left_agree_between_the_paths(backend, device):
    """A row all -inf (or all masked out) has no distribution: softmax 0, log-softmax -inf, on both paths."""
    x = torch.tensor([[float("-inf")] * 5, [0.0, 1.0, float("-inf"), 2.0, 3.0], [1.0] * 5], device=device)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False], [False] * 5], device=device)
    for m in (None, mask):
        soft, log = kernels.softmax(x, m), kernels.log_softmax(x, m)
        empty = torch.tensor([True, False, m is not None], device=device)
        assert (soft[empty] == 0).all() and (log[empty] == float("-inf")).all()
        assert torch.isfinite(soft[~empty]).all()
        torch.testing.assert_close(soft[~empty].sum(-1), torch.ones(int((~empty).sum()), device=device))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_attention_scale_is_a_value_error_on_both_paths(backend, gen, scale):
    """Scores times inf or NaN have no softmax: the kernel wrote NaN, and the CPU path zeros for a NaN scale."""
    q = randn(gen, 1, 1, 3, 16)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        kernels.attention(q, q, q, scale=scale)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter divides NaNs
def test_fp8_rows_holding_nan_or_inf_come_out_nan_on_both_paths(backend, gen):
    qweight, scales = kernels.quantize_fp8(randn(gen, 8, 16))
    x = randn(gen, 3, 16)
    x[0, 3], x[1, 5] = float("nan"), float("inf")
    y = kernels.linear_fp8(x, qweight, scales)
    assert y[:2].isnan().all() and torch.isfinite(y[2]).all()


def test_embedding_pool_ignores_what_padding_rows_hold(backend, device):
    with torch.device(device):
        table = torch.tensor([[1.0, 2.0], [float("inf"), float("nan")], [3.0, 4.0]])
        ids, mask = torch.tensor([[0, 1, 2]]), torch.tensor([[True, False, True]])
        torch.testing.assert_close(kernels.embedding_pool(ids, table, mask), torch.tensor([[2.0, 3.0]]))


def test_tensors_past_32_bit_offsets_are_refused():
    x, w = torch.empty(2**20, 2**11 + 1, device="meta"), torch.empty(4, 2**11 + 1, device="meta")
    with pytest.raises(ValueError, match=f"at most {MAX_ELEMENTS:,} elements"):
        launch_linear(x, w, None, None, "none", None, None)
