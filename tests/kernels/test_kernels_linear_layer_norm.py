import sys

import pytest
import torch
from kernel_checks import DTYPES, assert_close, poisoned, randn

import kernels
from kernels.linear import SHARED_MEMORY
from kernels.linear_int8 import quantize_int8
from kernels.linear_layer_norm import (
    ACCUMULATOR_REGISTERS,
    MAX_N,
    _choose,
    linear_layer_norm_reference,
    linear_layer_norm_triton,
    row_chunks,
    tiles,
    use_fused,
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("way", ["1", "0"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 17, 40), (5, 40, 136), (33, 24, 64)])
def test_linear_layer_norm_matches_reference(gen, device, dtype, way, m, n, k, monkeypatch):
    """Fused (``1``) and separate (``0``): 17 and 40 columns in a row tile of 32 and 64 (columns past N wrapped
    and left out of the norm), K = 136 ending in a partial tile, 33 rows in tiles of 64 and 5 in a masked 16."""
    monkeypatch.setenv("MAAS_LINEAR_LAYER_NORM", way)
    x, w = randn(gen, m, k, dtype=dtype), randn(gen, n, k, dtype=dtype, scale=k**-0.5)
    b, r = randn(gen, n, dtype=dtype), randn(gen, m, n, dtype=dtype)
    nw, nb = randn(gen, n, dtype=dtype), randn(gen, n, dtype=dtype)
    out = poisoned(m, n, dtype=dtype, device=device)
    y = kernels.linear_layer_norm(x, w, b, r, nw, nb, 1e-5, out=out)
    assert y is out
    expected = linear_layer_norm_reference(x.double(), w.double(), b.double(), r.double(), nw.double(), nb.double(),
                                           1e-5)
    # Separate, the sum is rounded to the dtype before the norm, which divides it by the row's spread (24
    # columns can spread little): that rounding gets the budget of a reduction over the whole weight.
    assert_close(y, expected, dtype, reduction=k if way == "1" else k * n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), [(3, 33, 24), (5, 40, 72), (33, 64, 40)])
def test_fused_rows_in_column_blocks_match_the_reference(gen, device, dtype, m, n, k, monkeypatch):
    """Rows as several accumulator blocks (16 columns each here, 128 on a GPU): 33 columns as 3 blocks (the
    third all but one column past N), 40 as 3, 64 as 4 whole ones; the norm spans every block of a row."""
    monkeypatch.setenv("MAAS_LINEAR_LAYER_NORM", "1")
    monkeypatch.setattr(sys.modules["kernels.linear_layer_norm"], "CHUNK_N", 16)  # the package's name is the op
    assert row_chunks(n) == (-(-n // 16), 16)
    x, w = randn(gen, m, k, dtype=dtype), randn(gen, n, k, dtype=dtype, scale=k**-0.5)
    b, r = randn(gen, n, dtype=dtype), randn(gen, m, n, dtype=dtype)
    nw, nb = randn(gen, n, dtype=dtype), randn(gen, n, dtype=dtype)
    out = poisoned(m, n, dtype=dtype, device=device)
    kernels.linear_layer_norm(x, w, b, r, nw, nb, 1e-5, out=out)
    expected = linear_layer_norm_reference(x.double(), w.double(), b.double(), r.double(), nw.double(), nb.double(),
                                           1e-5)
    assert_close(out, expected, dtype, reduction=k)


@pytest.mark.parametrize(("n", "expected"), [(17, (1, 32)), (129, (1, 256)), (256, (1, 256)), (257, (3, 128)),
                                             (300, (3, 128)), (384, (3, 128)), (512, (4, 128))])
def test_a_row_is_one_block_up_to_256_columns_else_blocks_of_128(n, expected):
    assert row_chunks(n) == expected


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_linear_layer_norm_dequantizes_int8_weights(gen, device, dtype, monkeypatch):
    monkeypatch.setenv("MAAS_LINEAR_LAYER_NORM", "1")
    m, n, k = 3, 40, 300
    x = randn(gen, m, k, dtype=dtype)
    q, s = quantize_int8(randn(gen, n, k, scale=k**-0.5))
    r, nw, nb = randn(gen, m, n, dtype=dtype), randn(gen, n, dtype=dtype), randn(gen, n, dtype=dtype)
    y = kernels.linear_layer_norm(x, q, None, r, nw, nb, 1e-5, scales=s)
    expected = linear_layer_norm_reference(x.double(), q, None, r.double(), nw.double(), nb.double(), 1e-5,
                                           scales=s.double())
    assert_close(y, expected, dtype, reduction=k)


def test_the_fused_kernel_runs_only_where_a_row_fits_its_tile(gen, monkeypatch):
    x, r = randn(gen, 4, 32), randn(gen, 4, 8)
    narrow, wide = randn(gen, 8, 32), randn(gen, MAX_N + 1, 32)
    args = (x, narrow, None, None, r, torch.ones(8), torch.zeros(8), 1e-5, torch.empty(4, 8), 4, 8, 32)
    monkeypatch.setenv("MAAS_LINEAR_LAYER_NORM", "auto")
    assert not use_fused(x, narrow)  # timing decides, on a GPU only
    assert _choose(*args) == "separate"
    monkeypatch.setenv("MAAS_LINEAR_LAYER_NORM", "1")
    assert use_fused(x, narrow) and not use_fused(x, wide)
    assert _choose(*args) == "fused"
    monkeypatch.setenv("MAAS_LINEAR_LAYER_NORM", "0")
    assert _choose(*args) == "separate"
    monkeypatch.setenv("MAAS_LINEAR_LAYER_NORM", "sometimes")
    with pytest.raises(ValueError, match="MAAS_LINEAR_LAYER_NORM"):
        use_fused(x, narrow)


@pytest.mark.parametrize("element_size", [1, 2, 4])
@pytest.mark.parametrize("n", [16, 100, 256, 384, 512])
@pytest.mark.parametrize("m", [1, 32, 33, 24576])
def test_gpu_tiles_fit_registers_and_shared_memory(m, n, element_size):
    t = tiles(m, n, element_size)
    chunks, block_n = row_chunks(n)
    registers = ACCUMULATOR_REGISTERS // (2 if element_size == 4 else 1)
    assert t["BLOCK_M"] * chunks * block_n <= registers * 32 * t["num_warps"]
    assert (t["BLOCK_M"] + chunks * block_n) * t["BLOCK_K"] * element_size * t["num_stages"] <= SHARED_MEMORY
    assert t["MASK_ROWS"] == (m <= 32) == (t["BLOCK_M"] == 16)
    if m > 32 and n == 384 and element_size == 2:  # MiniLM's rows in bf16: the tiles the sm_90 checks compiled
        assert (t["BLOCK_M"], t["BLOCK_K"], t["num_warps"], t["num_stages"]) == (64, 64, 8, 3)


def test_linear_layer_norm_torch_backend_is_the_reference(gen, monkeypatch):
    monkeypatch.setenv("MAAS_KERNEL_BACKEND", "torch")
    x, w, b, r = randn(gen, 3, 8), randn(gen, 5, 8), randn(gen, 5), randn(gen, 3, 5)
    nw, nb = randn(gen, 5), randn(gen, 5)
    torch.testing.assert_close(kernels.linear_layer_norm(x, w, b, r, nw, nb),
                               kernels.layer_norm(kernels.linear(x, w, b), nw, nb, 1e-5, residual=r))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"weight": torch.zeros(4, 7)}, "weight"),
        ({"weight": torch.zeros(4, 8, dtype=torch.int8)}, "weight"),  # int8 without scales
        ({"scales": torch.ones(4)}, "weight"),  # scales with a float weight
        ({"bias": torch.zeros(5)}, "bias"),
        ({"residual": torch.zeros(3, 5)}, "residual"),
        ({"norm_weight": torch.ones(5)}, "norm_weight"),
        ({"norm_bias": torch.zeros(4, dtype=torch.float16)}, "norm_bias"),
        ({"x": torch.zeros(8, 3).t()}, "x"),
    ],
)
def test_linear_layer_norm_triton_rejects_bad_arguments(kwargs, name):
    args = {"x": torch.zeros(3, 8), "weight": torch.zeros(4, 8), "bias": torch.zeros(4), "residual": torch.zeros(3, 4),
            "norm_weight": torch.ones(4), "norm_bias": torch.zeros(4), "scales": None} | kwargs
    with pytest.raises(ValueError, match=name):
        linear_layer_norm_triton(**args)

