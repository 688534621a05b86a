import pytest
import torch
from kernel_checks import DTYPES, assert_close, poisoned, randn

import kernels
from kernels.conv2d import conv2d_reference, conv2d_triton
from kernels.max_pool2d import max_pool2d_reference, max_pool2d_triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "c", "h", "w", "co", "k"), [(1, 1, 5, 5, 1, 5), (2, 3, 9, 11, 17, 3)])
@pytest.mark.parametrize(("with_bias", "relu"), [(False, False), (True, True)])
def test_conv2d_matches_reference(gen, device, dtype, n, c, h, w, co, k, with_bias, relu):
    x = randn(gen, n, c, h, w, dtype=dtype)
    weight = randn(gen, co, c, k, k, dtype=dtype, scale=(c * k * k) ** -0.5)
    bias = randn(gen, co, dtype=dtype) if with_bias else None
    out = poisoned(n, co, h - k + 1, w - k + 1, dtype=dtype, device=device)
    y = kernels.conv2d(x, weight, bias, relu, out=out)
    assert y is out
    expected = conv2d_reference(x.double(), weight.double(), None if bias is None else bias.double(), relu)
    assert_close(y, expected, dtype, reduction=c * k * k)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"x": torch.zeros(1, 2, 6, 6, dtype=torch.float16)}, "weight"),
        ({"weight": torch.zeros(4, 3, 3, 3)}, "weight"),
        ({"weight": torch.zeros(4, 2, 7, 3)}, "weight"),
        ({"bias": torch.zeros(3)}, "bias"),
        ({"x": torch.zeros(1, 6, 6, 2).permute(0, 3, 1, 2)}, "x"),
    ],
)
def test_conv2d_triton_rejects_bad_arguments(kwargs, name):
    args = {"x": torch.zeros(1, 2, 6, 6), "weight": torch.zeros(4, 2, 3, 3), "bias": None} | kwargs
    with pytest.raises(ValueError, match=name):
        conv2d_triton(**args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "kernel"), [((1, 1, 2, 2), 2), ((2, 3, 9, 17), 2), ((1, 2, 7, 7), 3)])
def test_max_pool2d_matches_reference(gen, device, dtype, shape, kernel):
    x = randn(gen, *shape, dtype=dtype)
    n, c, h, w = shape
    out = poisoned(n, c, h // kernel, w // kernel, dtype=dtype, device=device)
    y = kernels.max_pool2d(x, kernel, out=out)
    assert y is out
    assert torch.equal(y, max_pool2d_reference(x, kernel))


@pytest.mark.parametrize(
    ("x", "kernel", "name"),
    [
        (torch.zeros(2, 4, 4), 2, "x"),
        (torch.zeros(1, 2, 4, 4).transpose(2, 3), 2, "x"),
        (torch.zeros(1, 1, 4, 4), 5, "kernel"),
        (torch.zeros(1, 1, 4, 4), 2.0, "kernel"),
    ],
)
def test_max_pool2d_triton_rejects_bad_arguments(x, kernel, name):
    with pytest.raises(ValueError, match=name):
        max_pool2d_triton(x, kernel)
