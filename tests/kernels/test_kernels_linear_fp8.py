"""linear_fp8 against float64: the row quantization kernel value for value against its torch formula, the
GEMM (both scales, bias, activation, residual) against the reference on the same fp8 values."""

import pytest
import torch
from kernel_checks import DTYPES, assert_close, poisoned, randn

import kernels
from kernels.linear_fp8 import (
    FP8,
    FP8_MAX,
    _quantize,
    linear_fp8_reference,
    linear_fp8_triton,
    quantize_fp8,
    quantize_rows_fp8,
)


def test_quantize_fp8_maps_each_row_max_to_448_within_half_a_step(gen):
    w = randn(gen, 33, 70)
    q, s = quantize_fp8(w)
    assert q.dtype == FP8 and s.dtype == torch.float32 and s.shape == (33,)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((33,), FP8_MAX, device=w.device))
    # Round to nearest: half a step is 1/16 of the value (3 mantissa bits), or 2^-10 scales below 2^-6.
    assert ((q.float() * s[:, None] - w).abs() <= w.abs() / 16 + s[:, None] * 2**-10).all()


def test_quantize_fp8_zero_row_gets_unit_scale():
    q, s = quantize_fp8(torch.zeros(2, 5))
    assert torch.equal(s, torch.ones(2)) and not q.float().any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 17), (2, 3, 600), (3, 2100)])
def test_row_quantization_matches_its_torch_formula(gen, dtype, shape):
    x = randn(gen, *shape, dtype=dtype, scale=3.0)
    if x.shape[-1] > 3:  # a zero, and values that scale into e4m3's subnormals
        x[0, ..., :3] = torch.tensor([0.0, 1e-6, -3e-5])
    q, s = quantize_rows_fp8(x)
    assert q.dtype == FP8 and q.shape == x.shape and s.shape == x.shape[:-1]
    expected_q, expected_s = _quantize(x.float())
    assert torch.equal(s, expected_s)
    assert torch.equal(q.float(), expected_q.float())  # round to nearest even, as torch and the GPU do
    assert torch.equal(q.float().abs().amax(dim=-1), torch.full(s.shape, FP8_MAX, device=x.device))
    assert ((q.float() * s[..., None] - x.float()).abs() <= x.float().abs() / 16 + s[..., None] * 2**-10).all()


def test_row_quantization_of_an_all_zero_row_gives_unit_scale(device):
    q, s = quantize_rows_fp8(torch.zeros(2, 7, device=device))
    assert torch.equal(s, torch.ones(2, device=device)) and not q.float().any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k", "activation", "with_residual"),
                         [(1, 33, 129, "none", False), (17, 48, 40, "gelu", True), (70, 20, 64, "relu", False)])
def test_linear_fp8_matches_the_float64_reference(gen, device, dtype, m, n, k, activation, with_residual):
    x = randn(gen, m, k, dtype=dtype)
    qw, sw = quantize_fp8(randn(gen, n, k, scale=k**-0.5))
    b = randn(gen, n, dtype=dtype)
    r = randn(gen, m, n, dtype=dtype) if with_residual else None
    out = poisoned(m, n, dtype=dtype, device=device)
    y = kernels.linear_fp8(x, qw, sw, b, activation, r, out=out)
    assert y is out
    expected = linear_fp8_reference(x.double(), qw, sw.double(), b.double(), activation,
                                    None if r is None else r.double())
    # On a GPU fp8 products accumulate in reduced precision (Hopper's fast fp8 accumulation): fp16's budget.
    assert_close(y, expected, dtype, reduction=k, tf32=True)



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("forcing", "m"), [("MAAS_LINEAR_SPLIT_K", 5), ("MAAS_LINEAR_GEMV", 1)])
def test_linear_fp8_on_the_split_k_and_gemv_kernels(gen, device, dtype, forcing, m, monkeypatch):
    """Both scales applied once: split-K's by the reduction to the sum of the runs' partial sums, GEMV's to
    its fp32 sum of products."""
    monkeypatch.setenv(forcing, "1")
    n, k = 33, 300
    x = randn(gen, m, k, dtype=dtype)
    qw, sw = quantize_fp8(randn(gen, n, k, scale=k**-0.5))
    b, r = randn(gen, n, dtype=dtype), randn(gen, m, n, dtype=dtype)
    out = poisoned(m, n, dtype=dtype, device=device)
    y = kernels.linear_fp8(x, qw, sw, b, "sigmoid", r, out=out)
    expected = linear_fp8_reference(x.double(), qw, sw.double(), b.double(), "sigmoid", r.double())
    assert_close(y, expected, dtype, reduction=k, tf32=True)


def test_linear_fp8_keeps_leading_dimensions(gen, device):
    x = randn(gen, 2, 3, 24, dtype=torch.bfloat16)
    qw, sw = quantize_fp8(randn(gen, 8, 24))
    assert kernels.linear_fp8(x, qw, sw).shape == (2, 3, 8)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"qweight": torch.zeros(4, 8, dtype=torch.int8)}, "qweight"),
        ({"qweight": torch.zeros(4, 7, dtype=FP8)}, "qweight"),
        ({"scales": torch.ones(4, dtype=torch.float16)}, "scales"),
        ({"scales": torch.ones(5)}, "scales"),
        ({"bias": torch.zeros(4, dtype=torch.float16)}, "bias"),
        ({"residual": torch.zeros(3, 5)}, "residual"),
        ({"activation": "swish"}, "activation"),
        ({"x": torch.zeros(3, 8, dtype=torch.int32)}, "x"),
    ],
)
def test_linear_fp8_triton_rejects_bad_arguments(kwargs, name):
    args = {"x": torch.zeros(3, 8), "qweight": torch.zeros(4, 8, dtype=FP8), "scales": torch.ones(4),
            "bias": None, "activation": "none", "residual": None} | kwargs
    with pytest.raises(ValueError, match=name):
        linear_fp8_triton(**args)
