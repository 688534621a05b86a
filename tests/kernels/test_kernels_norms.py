import pytest
import torch
from kernel_checks import DTYPES, assert_close, poisoned, randn

import kernels
from kernels.l2_normalize import l2_normalize_reference, l2_normalize_triton
from kernels.layer_norm import layer_norm_reference, layer_norm_triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 17), (2, 3, 129), (9, 600), (3, 2100)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_matches_reference(gen, device, dtype, shape, with_residual):
    x = randn(gen, *shape, dtype=dtype, scale=2.0)
    w = randn(gen, shape[-1], dtype=dtype)
    b = randn(gen, shape[-1], dtype=dtype)
    r = randn(gen, *shape, dtype=dtype) if with_residual else None
    out = poisoned(*shape, dtype=dtype, device=device)
    y = kernels.layer_norm(x, w, b, 1e-5, residual=r, out=out)
    assert y is out
    r64 = None if r is None else r.double()
    expected = layer_norm_reference(x.double(), w.double(), b.double(), 1e-5, r64)
    assert_close(y, expected, dtype, reduction=shape[-1])


def test_layer_norm_constant_row_gives_bias(device):
    x = torch.full((2, 8), 3.0, device=device)
    b = torch.arange(8.0, device=device)
    torch.testing.assert_close(kernels.layer_norm(x, torch.ones(8, device=device), b), b.expand(2, 8))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"weight": torch.ones(7)}, "weight"),
        ({"bias": torch.zeros(8, dtype=torch.float16)}, "bias"),
        ({"residual": torch.zeros(3, 7)}, "residual"),
        ({"x": torch.zeros(8, 3).t()}, "x"),
    ],
)
def test_layer_norm_triton_rejects_bad_arguments(kwargs, name):
    args = {"x": torch.zeros(3, 8), "weight": torch.ones(8), "bias": torch.zeros(8), "residual": None}
    args |= kwargs
    with pytest.raises(ValueError, match=name):
        layer_norm_triton(**args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (6, 17), (2, 3, 384), (9, 600), (3, 2100)])
def test_l2_normalize_matches_reference(gen, device, dtype, shape):
    x = randn(gen, *shape, dtype=dtype)
    out = poisoned(*shape, dtype=dtype, device=device)
    y = kernels.l2_normalize(x, out=out)
    assert y is out
    assert_close(y, l2_normalize_reference(x.double()), dtype, reduction=shape[-1])


def test_l2_normalize_zero_row_stays_zero(device):
    zeros = torch.zeros(2, 5, device=device)
    assert torch.equal(kernels.l2_normalize(zeros), zeros)


@pytest.mark.parametrize("x", [torch.zeros(3, 8, dtype=torch.int32), torch.zeros(8, 3).t()])
def test_l2_normalize_triton_rejects_bad_input(x):
    with pytest.raises(ValueError, match="x"):
        l2_normalize_triton(x)
