import pytest
import torch
from kernel_checks import DTYPES, assert_close, poisoned, randn

import kernels
from kernels.linear import (
    GEMV_MAX_M,
    INTERPRETER_SPLIT_PROGRAMS,
    _choose_kernel,
    _interpreter_blocks,
    _linear_tma_split_k_kernel,
    _tma_descriptors,
    kernel_candidates,
    launch_linear,
    linear_reference,
    linear_triton,
    split_k_may_pay,
    tma_split_k_may_pay,
    use_gemv,
    use_split_k,
    use_tma,
    use_tma_split_k,
)
from kernels.linear_int8 import linear_int8_reference, quantize_int8

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



def _check_forced_kernel(kernel, gen, device, dtype, m, n, k, activation):
    """Random inputs with bias and residual: ``kernel`` (forced on by the caller's environment) is the one chosen,
    and its output, written into a poisoned tensor, matches the float64 reference. Returns x, w, b, r and it."""
    x = randn(gen, m, k, dtype=dtype)
    w = randn(gen, n, k, dtype=dtype, scale=k**-0.5)
    b, r = randn(gen, n, dtype=dtype), randn(gen, m, n, dtype=dtype)
    assert _choose_kernel(x, w, None, None, b, activation, r, None, m, n, k, {}) == kernel
    out = poisoned(m, n, dtype=dtype, device=device)
    y = kernels.linear(x, w, b, activation, residual=r, out=out)
    assert_close(y, linear_reference(x.double(), w.double(), b.double(), activation, r.double()), dtype, reduction=k)
    return x, w, b, r, y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k", "activation"),
                         [(1, 17, 200, "gelu"), (33, 65, 136, "tanh"), (129, 72, 40, "relu"), (17, 130, 264, "none")])
def test_tma_split_k_linear_matches_reference(gen, device, dtype, m, n, k, activation, monkeypatch):
    """TMA split-K forced on: K = 200 is 4 tiles of 64 (halves of 2), 136 three (2 and a partial 1), 40 one
    partial tile (1 and an empty half, adding zeros), 264 five (3 and 2). The interpreter's 3 programs run one
    after another, so at some tiles the second half ends first: 129 x 72 is 6 tiles of 64 x 64 (3 row blocks,
    one of a single row), 17 x 130 three (a partial N block), 33 x 65 two."""
    monkeypatch.setenv("MAAS_LINEAR_TMA_SPLIT_K", "1")
    _check_forced_kernel("tma_split_k", gen, device, dtype, m, n, k, activation)


def test_tma_split_k_leaves_its_arrival_counts_at_zero_for_the_next_launch(gen, device):
    """The autotuner times a config by relaunching it on the same arguments: each launch must find the counts
    as the first did, or a second half would stop waiting before the first half's partial is written."""
    m, n, k = 70, 40, 200
    x, w = randn(gen, m, k), randn(gen, n, k, scale=k**-0.5)
    x_desc, w_desc, meta = _tma_descriptors(x, w, m, k, _interpreter_blocks(m, n, k))
    tiles = 2  # of 64 x 64
    partials = torch.empty(tiles * 64 * 64, device=device)
    arrivals = torch.zeros(tiles, dtype=torch.int32, device=device)
    outputs = []
    for _ in range(2):
        y = poisoned(m, n, dtype=torch.float32, device=device)
        _linear_tma_split_k_kernel[(INTERPRETER_SPLIT_PROGRAMS,)](
            x_desc, w_desc, None, None, y, partials, arrivals, m, n, k, 128, HAS_BIAS=False, HAS_RESIDUAL=False,
            ACTIVATION="none", UPCAST=True, NUM_PROGRAMS=INTERPRETER_SPLIT_PROGRAMS, **meta)
        assert arrivals.tolist() == [0] * tiles
        outputs.append(y)
    assert_close(outputs[0], linear_reference(x.double(), w.double()), torch.float32, reduction=k)
    assert torch.equal(outputs[1], outputs[0])


def test_linear_takes_the_tma_split_k_kernel_only_where_it_can(gen, monkeypatch):
    x, w = randn(gen, 512, 64), randn(gen, 32, 64)
    monkeypatch.delenv("MAAS_LINEAR_TMA_SPLIT_K", raising=False)
    assert not use_tma_split_k(x, w, 512)  # off by default until a GPU has checked it
    monkeypatch.setenv("MAAS_LINEAR_TMA_SPLIT_K", "auto")
    assert not use_tma_split_k(x, w, 512)  # timing decides, on a Hopper GPU only
    monkeypatch.setenv("MAAS_LINEAR_TMA_SPLIT_K", "1")
    assert use_tma_split_k(x, w, 512)
    assert kernel_candidates(x, w, None, 512)[:2] == ["tiled", "tma_split_k"]
    assert not use_tma_split_k(x[:, :63].contiguous(), w[:, :63].contiguous(), 512)  # rows not 16-byte aligned
    assert not use_tma_split_k(x, w.to(torch.int8), 512)
    assert "tma_split_k" not in kernel_candidates(x, w.to(torch.int8), torch.ones(32), 512)
    wide = torch.empty(2**13 + 8, 64)
    assert not use_tma_split_k(x, wide, 512)  # 4.2 M outputs: 17 MB of fp32 partial sums
    with pytest.raises(ValueError, match="at most 4,194,304 outputs"):
        launch_linear(x, wide, None, None, "none", None, None, kernel="tma_split_k")
    with pytest.raises(ValueError, match="16-byte aligned"):
        launch_linear(x[:, :63].contiguous(), w[:, :63].contiguous(), None, None, "none", None, None,
                      kernel="tma_split_k")
    monkeypatch.setenv("MAAS_LINEAR_TMA_SPLIT_K", "halves")
    with pytest.raises(ValueError, match="MAAS_LINEAR_TMA_SPLIT_K"):
        use_tma_split_k(x, w, 512)


def test_tma_split_k_is_timed_only_where_its_wide_tiles_leave_multiprocessors_idle():
    assert tma_split_k_may_pay(512, 4096, multiprocessors=132)  # 64 tiles of 128 x 256: 128 programs split
    assert tma_split_k_may_pay(256, 4096, multiprocessors=132)
    assert not tma_split_k_may_pay(640, 4096, multiprocessors=132)  # 80 tiles: 160 programs split in two
    assert not tma_split_k_may_pay(4096, 4096, multiprocessors=132)
    assert tma_split_k_may_pay(512, 3072, multiprocessors=132)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k", "activation"), [(1, 17, 200, "gelu"), (33, 65, 136, "tanh")])
def test_split_k_linear_matches_reference(gen, device, dtype, m, n, k, activation, monkeypatch):
    """Split-K forced on: K = 200 is 4 tiles of 64 for the interpreter's 3 runs (2, 2 and none, an empty run
    writing zeros), K = 136 is 3 (1, 1, 1 with a partial last tile); two row blocks and a partial N block."""
    monkeypatch.setenv("MAAS_LINEAR_SPLIT_K", "1")
    x, w, b, r, y = _check_forced_kernel("split_k", gen, device, dtype, m, n, k, activation)
    # Partial sums added in a fixed order: the same inputs give the same bits.
    assert torch.equal(kernels.linear(x, w, b, activation, residual=r), y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kernel", "m"), [("split_k", 3), ("gemv", 1)])
def test_split_k_and_gemv_dequantize_int8_weights(gen, device, dtype, kernel, m):
    n, k = 40, 300
    x = randn(gen, m, k, dtype=dtype)
    q, s = quantize_int8(randn(gen, n, k, scale=k**-0.5))
    b = randn(gen, n, dtype=dtype)
    out = poisoned(m, n, dtype=dtype, device=device)
    y = launch_linear(x, q, s, b, "relu", None, out, kernel=kernel)
    assert_close(y, linear_int8_reference(x.double(), q, s.double(), b.double(), "relu"), dtype, reduction=k)


def test_linear_takes_the_split_k_kernel_only_for_a_few_rows(gen, monkeypatch):
    x, w = randn(gen, 64, 1024), randn(gen, 32, 1024)
    monkeypatch.setenv("MAAS_LINEAR_SPLIT_K", "auto")
    assert not use_split_k(x, w, 16)  # timing decides on a GPU only
    monkeypatch.setenv("MAAS_LINEAR_SPLIT_K", "1")
    assert use_split_k(x, w, 64)
    assert use_split_k(x, w.to(torch.int8), 64)  # quantized weights too: small batches are what they are for
    assert use_split_k(torch.cat([x, x]), w, 128)
    assert not use_split_k(torch.cat([x, x, x[:1]]), w, 129)  # its partials hold 8 copies of the output
    assert kernel_candidates(x, w, None, 64) == ["tiled", "split_k"]
    monkeypatch.setenv("MAAS_LINEAR_SPLIT_K", "0")
    assert not use_split_k(x, w, 1)
    assert kernel_candidates(x, w, None, 1) == ["tiled"]
    monkeypatch.setenv("MAAS_LINEAR_SPLIT_K", "often")
    with pytest.raises(ValueError, match="MAAS_LINEAR_SPLIT_K"):
        use_split_k(x, w, 1)


def test_split_k_is_timed_only_for_large_weights_the_tiled_kernel_leaves_multiprocessors_idle_on():
    assert split_k_may_pay(1, 4096, 4096, multiprocessors=132)  # 128 tiles of 16 x 32
    assert split_k_may_pay(16, 2048, 8192, multiprocessors=132)
    assert not split_k_may_pay(1, 4224, 4096, multiprocessors=132)  # 132 tiles: every multiprocessor busy
    assert split_k_may_pay(128, 4096, 4096, multiprocessors=132)  # 128 tiles of 64 x 64: cuBLAS won there
    assert split_k_may_pay(17, 8192, 4096, multiprocessors=132)
    assert not split_k_may_pay(128, 8192, 4096, multiprocessors=132)  # 256 tiles of 64 x 64
    assert split_k_may_pay(128, 64, 1 << 17, multiprocessors=132)
    assert not split_k_may_pay(129, 64, 1 << 17, multiprocessors=132)  # too many rows for its partials
    assert not split_k_may_pay(4, 14336, 4096, multiprocessors=132)  # 448 thin tiles: it lost on an H100
    assert not split_k_may_pay(1, 3072, 768, multiprocessors=132)  # 4.5 MB of bf16 weight: a few us at most
    assert not split_k_may_pay(16, 384, 1536, multiprocessors=132)  # MiniLM's largest GEMM: warm-ups skip it


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k", "activation"), [(17, 200, "gelu"), (40, 136, "tanh"), (16, 64, "sigmoid")])
def test_gemv_linear_matches_reference(gen, device, dtype, n, k, activation, monkeypatch):
    """The GEMV kernel forced on for one row: 17 and 40 columns end in a partial block of 16 (wrapped loads,
    masked stores), K = 200 and 136 in a partial K tile of 64."""
    monkeypatch.setenv("MAAS_LINEAR_GEMV", "1")
    x = randn(gen, 1, k, dtype=dtype)
    w = randn(gen, n, k, dtype=dtype, scale=k**-0.5)
    b, r = randn(gen, n, dtype=dtype), randn(gen, 1, n, dtype=dtype)
    assert _choose_kernel(x, w, None, None, b, activation, r, None, 1, n, k, {}) == "gemv"
    out = poisoned(1, n, dtype=dtype, device=device)
    y = kernels.linear(x, w, b, activation, residual=r, out=out)
    expected = linear_reference(x.double(), w.double(), b.double(), activation, r.double())
    assert_close(y, expected, dtype, reduction=k)


def test_linear_takes_the_gemv_kernel_only_for_one_row(gen, monkeypatch):
    x, w = randn(gen, 5, 64), randn(gen, 32, 64)
    monkeypatch.setenv("MAAS_LINEAR_GEMV", "auto")
    assert not use_gemv(x, w, 1)  # timing decides on a GPU only
    monkeypatch.setenv("MAAS_LINEAR_GEMV", "1")
    assert use_gemv(x, w, 1)
    assert use_gemv(x, w.to(torch.int8), 1)
    assert not use_gemv(x, w, GEMV_MAX_M + 1)
    assert kernel_candidates(x, w, None, 1) == ["tiled", "gemv"]
    with pytest.raises(ValueError, match="single row of x, got 5 rows"):
        launch_linear(x, w, None, None, "none", None, None, kernel="gemv")
    monkeypatch.setenv("MAAS_LINEAR_GEMV", "0")
    assert kernel_candidates(x, w, None, 1) == ["tiled"]
    monkeypatch.setenv("MAAS_LINEAR_GEMV", "yes")
    with pytest.raises(ValueError, match="MAAS_LINEAR_GEMV"):
        use_gemv(x, w, 1)


def test_launch_linear_refuses_a_kernel_it_does_not_have(gen):
    x, w = randn(gen, 2, 16), randn(gen, 8, 16)
    with pytest.raises(ValueError, match="kernel must be one of"):
        launch_linear(x, w, None, None, "none", None, None, kernel="cutlass")
    q, s = quantize_int8(w)
    with pytest.raises(ValueError, match="float weights only"):
        launch_linear(x, q, s, None, "none", None, None, kernel="tma")

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
