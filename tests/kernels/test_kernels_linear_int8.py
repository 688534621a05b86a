import pytest
import torch
from kernel_checks import DTYPES, assert_close, poisoned, randn

import kernels
from kernels.linear_int8 import linear_int8_reference, linear_int8_triton


def test_quantize_int8_round_trips_within_half_a_step(gen):
    w = randn(gen, 33, 70)
    q, s = kernels.quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (33,)
    assert q.abs().max() <= 127
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()


def test_quantize_int8_zero_row_gets_unit_scale():
    q, s = kernels.quantize_int8(torch.zeros(2, 5))
    assert torch.equal(s, torch.ones(2)) and not q.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k", "activation"), [(1, 33, 129, "none"), (17, 48, 40, "gelu")])
def test_linear_int8_matches_reference(gen, device, dtype, m, n, k, activation):
    x = randn(gen, m, k, dtype=dtype)
    q, s = kernels.quantize_int8(randn(gen, n, k, scale=k**-0.5))
    b = randn(gen, n, dtype=dtype)
    out = poisoned(m, n, dtype=dtype, device=device)
    y = kernels.linear_int8(x, q, s, b, activation, out=out)
    assert y is out
    expected = linear_int8_reference(x.double(), q, s.double(), b.double(), activation)
    assert_close(y, expected, dtype, reduction=k)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"qweight": torch.zeros(4, 8, dtype=torch.int16)}, "qweight"),
        ({"qweight": torch.zeros(4, 7, dtype=torch.int8)}, "qweight"),
        ({"scales": torch.ones(4, dtype=torch.float16)}, "scales"),
        ({"scales": torch.ones(5)}, "scales"),
        ({"bias": torch.zeros(4, dtype=torch.float16)}, "bias"),
    ],
)
def test_linear_int8_triton_rejects_bad_arguments(kwargs, name):
    args = {"x": torch.zeros(3, 8), "qweight": torch.zeros(4, 8, dtype=torch.int8), "scales": torch.ones(4),
            "bias": None} | kwargs
    with pytest.raises(ValueError, match=name):
        linear_int8_triton(**args)
