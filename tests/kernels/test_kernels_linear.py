import pytest
import torch
from kernel_checks import DTYPES, assert_close, poisoned, randn

import kernels
from kernels.linear import linear_reference, linear_triton, use_tma

ACTIVATIONS = ["none", "relu", "gelu", "tanh", "sigmoid"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 17, 33), (33, 65, 129)])
def test_linear_matches_reference(gen, device, dtype, activation, m, n, k):
    x = randn(gen, m, k, dtype=dtype)
    w = randn(gen, n, k, dtype=dtype, scale=k**-0.5)
    b = randn(gen, n, dtype=dtype)
    r = randn(gen, m, n, dtype=dtype)
    out = poisoned(m, n, dtype=dtype, device=device)
    y = kernels.linear(x, w, b, activation, residual=r, out=out)
    assert y is out
    expected = linear_reference(x.double(), w.double(), b.double(), activation, r.double())
    assert_close(y, expected, dtype, reduction=k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 17, 40), (150, 130, 136)])
def test_persistent_tma_linear_matches_reference(gen, device, dtype, m, n, k, monkeypatch):
    """The TMA kernel forced on (row strides of K elements are 16-byte aligned): tiles past M, N and K are
    TMA's zero fill; 150 x 130 is 9 tiles of 64 x 64 for the interpreter's 4 programs, so each walks several."""
    monkeypatch.setenv("MAAS_LINEAR_TMA", "1")
    x = randn(gen, m, k, dtype=dtype)
    w = randn(gen, n, k, dtype=dtype, scale=k**-0.5)
    assert use_tma(x, w, m)
    b, r = randn(gen, n, dtype=dtype), randn(gen, m, n, dtype=dtype)
    out = poisoned(m, n, dtype=dtype, device=device)
    y = kernels.linear(x, w, b, "gelu", residual=r, out=out)
    assert_close(y, linear_reference(x.double(), w.double(), b.double(), "gelu", r.double()), dtype, reduction=k)


def test_linear_takes_the_tma_kernel_only_where_it_can(gen, monkeypatch):
    x, w = randn(gen, 512, 64), randn(gen, 32, 64)
    monkeypatch.setenv("MAAS_LINEAR_TMA", "auto")
    assert not use_tma(x, w, 512)  # 1 M multiply-adds: far too small to time both kernels (and not on a CPU)
    monkeypatch.setenv("MAAS_LINEAR_TMA", "1")
    assert use_tma(x, w, 512)
    assert not use_tma(x[:, :63].contiguous(), w[:, :63].contiguous(), 512)  # 252-byte rows: not 16-aligned
    assert not use_tma(x, w.to(torch.int8), 512)  # int8 weights take linear_int8's dequantizing kernel
    monkeypatch.setenv("MAAS_LINEAR_TMA", "0")
    assert not use_tma(x, w, 512)
    monkeypatch.setenv("MAAS_LINEAR_TMA", "sometimes")
    with pytest.raises(ValueError, match="MAAS_LINEAR_TMA"):
        use_tma(x, w, 512)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_without_bias_with_leading_dims(gen, device, dtype):
    x = randn(gen, 2, 3, 40, dtype=dtype)
    w = randn(gen, 24, 40, dtype=dtype, scale=0.2)
    y = kernels.linear(x, w, activation="relu")
    assert y.shape == (2, 3, 24)
    assert_close(y, linear_reference(x.double(), w.double(), activation="relu"), dtype, reduction=40)


def test_linear_accepts_non_contiguous_views(gen):
    x = randn(gen, 20, 16).t()  # [16, 20], not contiguous
    w = randn(gen, 32, 20)
    assert_close(kernels.linear(x, w), linear_reference(x.double(), w.double()), torch.float32, reduction=20)


def test_linear_torch_backend_is_the_reference(gen, monkeypatch):
    monkeypatch.setenv("MAAS_KERNEL_BACKEND", "torch")
    x, w, b = randn(gen, 3, 8), randn(gen, 5, 8), randn(gen, 5)
    torch.testing.assert_close(kernels.linear(x, w, b, "gelu"), linear_reference(x, w, b, "gelu"))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"weight": torch.zeros(4, 7)}, "weight"),
        ({"weight": torch.zeros(4, 8, dtype=torch.float16)}, "weight"),
        ({"bias": torch.zeros(5)}, "bias"),
        ({"residual": torch.zeros(3, 5)}, "residual"),
        ({"x": torch.zeros(3, 8, dtype=torch.int32)}, "x"),
        ({"x": torch.zeros(8, 3).t()}, "x"),
        ({"activation": "swish"}, "activation"),
        ({"out": torch.zeros(3, 5)}, "out"),
    ],
)
def test_linear_triton_rejects_bad_arguments(kwargs, name):
    args = {"x": torch.zeros(3, 8), "weight": torch.zeros(4, 8), "bias": torch.zeros(4), "residual": None,
            "activation": "none", "out": None} | kwargs
    with pytest.raises(ValueError, match=name):
        linear_triton(**args)


def test_linear_rejects_device_mismatch():
    with pytest.raises(ValueError, match="weight is on meta"):
        kernels.linear(torch.zeros(3, 8), torch.zeros(4, 8, device="meta"))
