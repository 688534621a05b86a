import importlib
import json

import pytest
import torch
from kernel_checks import DTYPES, assert_close, poisoned, randn

import kernels
from kernels._tuning_table import device_file
from kernels.attention import (
    INTERPRETER_PROGRAMS,
    PERSISTENT_ENV_VAR,
    PERSISTENT_MAX_KEYS,
    TMA_ENV_VAR,
    _tma_descriptors,
    attention_reference,
    attention_triton,
    kernel_candidates,
    lengths_mask,
    persistent_configs,
)


def _attention_matches_reference(gen, q, k, v, padding: str) -> None:
    """``kernels.attention`` into a NaN-filled ``out`` with keys padded as ``padding`` says ("none", "mask" or
    "lengths", random per batch row), held to the float64 reference."""
    b, h, sq, d = q.shape
    sk = k.shape[2]
    lengths = torch.randint(1, sk + 1, (b,), generator=gen, device=q.device)
    mask = lengths_mask(lengths, sk) if padding == "mask" else None
    key_lengths = lengths if padding == "lengths" else None
    out = poisoned(b, h, sq, d, dtype=q.dtype, device=q.device)
    y = kernels.attention(q, k, v, mask, key_lengths=key_lengths, out=out)
    assert y is out
    assert_close(y, attention_reference(q.double(), k.double(), v.double(), mask, key_lengths=key_lengths), q.dtype,
                 reduction=sk)


# Key lengths of 64 and 128 are whole tiles of the interpreter's 64 keys (no checked tail), 70 and 129 end in
# a part tile, 1 and 17 are a part tile only.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("b", "h", "sq", "sk", "d"),
    [(1, 1, 1, 1, 16), (2, 3, 17, 17, 32), (1, 2, 5, 70, 64), (2, 1, 129, 129, 16), (2, 2, 9, 64, 32),
     (1, 1, 4, 128, 16)],
)
@pytest.mark.parametrize("padding", ["none", "mask", "lengths"])
def test_attention_matches_reference(gen, device, dtype, b, h, sq, sk, d, padding):
    q, k, v = (randn(gen, b, h, s, d, dtype=dtype) for s in (sq, sk, sk))
    _attention_matches_reference(gen, q, k, v, padding)


def _fused_qkv(gen, b, h, s, d, dtype):
    """q, k, v as views into one [B, S, 3, H, D] projection, as the transformer passes them."""
    qkv = randn(gen, b, s, 3, h, d, dtype=dtype)
    return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))


# The TMA variant (MAAS_ATTENTION_TMA=on) reads q and the full key tiles through descriptors over the tensors'
# rows, which run on into the next head or batch row: part tiles of q and of the keys (17, 70, 129) show that
# nothing of a neighbour leaks in.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("layout", "b", "h", "sq", "sk", "d"), [
    ("contiguous", 2, 3, 17, 17, 32), ("contiguous", 1, 2, 5, 70, 64), ("contiguous", 2, 2, 129, 129, 16),
    ("fused", 2, 3, 17, 17, 32), ("fused", 2, 2, 129, 129, 16),  # a fused projection: as many queries as keys
])
@pytest.mark.parametrize("padding", ["none", "mask", "lengths"])
def test_the_tma_variant_matches_the_reference(gen, device, monkeypatch, dtype, layout, b, h, sq, sk, d, padding):
    monkeypatch.setenv(TMA_ENV_VAR, "on")
    if layout == "fused":
        q, k, v = _fused_qkv(gen, b, h, sq, d, dtype)
    else:
        q, k, v = (randn(gen, b, h, s, d, dtype=dtype) for s in (sq, sk, sk))
    assert _tma_descriptors(q, k, v) is not None  # the variant under test runs
    _attention_matches_reference(gen, q, k, v, padding)


def test_the_tma_variant_is_left_to_the_gpu_by_default_and_passes_over_layouts_it_cannot_read(gen, device,
                                                                                               monkeypatch):
    """``auto`` by default: timed on a GPU, never run (nor described) under the interpreter unless forced ``on``."""
    q, k, v = (randn(gen, 2, 2, 8, 16) for _ in range(3))
    monkeypatch.delenv(TMA_ENV_VAR, raising=False)
    assert _tma_descriptors(q, k, v) is None
    monkeypatch.setenv(TMA_ENV_VAR, "off")
    assert _tma_descriptors(q, k, v) is None
    monkeypatch.setenv(TMA_ENV_VAR, "on")
    assert _tma_descriptors(q, k, v) is not None
    k_seq_first = randn(gen, 8, 2, 2, 16).permute(1, 2, 0, 3)  # [S, B, H, D] memory: rows of a head not in a run
    assert _tma_descriptors(q, k_seq_first, v) is None
    y = kernels.attention(q, k_seq_first, v)  # the pointer kernel instead
    assert_close(y, attention_reference(q.double(), k_seq_first.double(), v.double()), torch.float32, 8)
    monkeypatch.setenv(TMA_ENV_VAR, "yes")
    with pytest.raises(ValueError, match=TMA_ENV_VAR):
        kernels.attention(q, k, v)


attention_module = importlib.import_module("kernels.attention")  # the package's ``attention`` is the op


class _Launches:
    """Stands in for a kernel's module attribute and counts its launches (then launches it)."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


# The persistent variant (MAAS_ATTENTION_PERSISTENT=on) runs keys that fit one tile (up to 128) with
# INTERPRETER_PROGRAMS programs here, each walking every third query tile: 17 queries make one tile a head,
# 129 three (the interpreter's 64-row tiles), so the programs walk uneven shares; 1, 17, 70 and 100 keys fill
# part of the key tile, 128 all of it.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("layout", "b", "h", "sq", "sk", "d"), [
    ("contiguous", 2, 3, 17, 17, 32), ("contiguous", 1, 2, 5, 70, 64), ("contiguous", 2, 2, 129, 100, 16),
    ("contiguous", 1, 1, 1, 1, 16), ("contiguous", 3, 1, 40, 128, 128), ("fused", 2, 3, 17, 17, 32),
])
@pytest.mark.parametrize("padding", ["none", "mask", "lengths"])
def test_the_persistent_variant_matches_the_reference(gen, device, monkeypatch, dtype, layout, b, h, sq, sk, d,
                                                      padding):
    monkeypatch.setenv(PERSISTENT_ENV_VAR, "on")
    launches = _Launches(attention_module._attention_persistent_kernel)
    monkeypatch.setattr(attention_module, "_attention_persistent_kernel", launches)
    if layout == "fused":
        q, k, v = _fused_qkv(gen, b, h, sq, d, dtype)
    else:
        q, k, v = (randn(gen, b, h, s, d, dtype=dtype) for s in (sq, sk, sk))
    _attention_matches_reference(gen, q, k, v, padding)
    # The variant under test ran, where a config of it fits (not fp32 at head dim 128: the tiled kernel runs)
    assert len(launches.grids) == (0 if (dtype, d) == (torch.float32, 128) else 1)


def test_the_persistent_variant_gives_zeros_for_rows_without_keys(gen, device, monkeypatch):
    monkeypatch.setenv(PERSISTENT_ENV_VAR, "on")
    q, k, v = (randn(gen, 4, 2, 6, 16) for _ in range(3))
    y = kernels.attention(q, k, v, key_lengths=torch.tensor([0, -3, 6, 9], dtype=torch.int32, device=device))
    assert torch.equal(y[:2], torch.zeros_like(y[:2]))
    assert_close(y[2:], attention_reference(q[2:].double(), k[2:].double(), v[2:].double()), torch.float32, 6)


def test_the_variants_defaults_and_where_each_runs(gen, device, monkeypatch):
    """By default the TMA variant is ``auto`` and the persistent one off; ``on`` runs one here under the
    interpreter; ``auto`` is for a GPU only, where they are timed against the tiled kernel."""
    monkeypatch.delenv(TMA_ENV_VAR, raising=False)
    monkeypatch.delenv(PERSISTENT_ENV_VAR, raising=False)
    assert (attention_module._setting(TMA_ENV_VAR), attention_module._setting(PERSISTENT_ENV_VAR)) == ("auto", "off")
    q, k, v = (randn(gen, 1, 2, 8, 16) for _ in range(3))
    long_k = randn(gen, 1, 2, PERSISTENT_MAX_KEYS + 1, 16)
    assert kernel_candidates(q, k, _tma_descriptors(q, k, v)) == (["tiled", "tma"] if q.is_cuda else ["tiled"])
    monkeypatch.setenv(PERSISTENT_ENV_VAR, "on")
    monkeypatch.setenv(TMA_ENV_VAR, "on")
    assert kernel_candidates(q, k, _tma_descriptors(q, k, v)) == ["tiled", "tma", "persistent"]
    assert kernel_candidates(q, long_k, _tma_descriptors(q, long_k, long_k)) == ["tiled", "tma"]
    assert kernel_candidates(q, k[:, :, :0], None) == ["tiled"]  # no keys: the tiled kernel's zeros
    monkeypatch.setenv(PERSISTENT_ENV_VAR, "auto")
    monkeypatch.setenv(TMA_ENV_VAR, "AUTO")
    assert kernel_candidates(q, k, _tma_descriptors(q, k, v)) == (
        ["tiled", "tma", "persistent"] if q.is_cuda else ["tiled"])
    monkeypatch.setenv(PERSISTENT_ENV_VAR, "yes")
    with pytest.raises(ValueError, match=f"{PERSISTENT_ENV_VAR}='yes': expected off, on or auto"):
        kernels.attention(q, k, v)


def test_the_shipped_h100_table_holds_the_attention_choices_the_defaults_time():
    """On a Hopper GPU the defaults time the plain kernel against the TMA one (candidates ``tiled+tma``): the table
    shipped for the H100 must hold those choices (exported under them, run 24), or every new worker times both
    kernels for each shape during its warm-up."""
    choices = json.loads(device_file("NVIDIA H100 80GB HBM3").read_text())["choices"]
    assert choices.get("maas_attention_kernel")
    assert all(key.endswith("|tiled+tma") for key in choices["maas_attention_kernel"])


@pytest.mark.parametrize(("head_dim", "element_size", "tried"), [
    (32, 2, True),  # 255 registers a thread on sm_90, no spill
    (64, 2, False),  # spilled 164 bytes
    (32, 4, False),  # spilled 652 bytes
])
def test_the_persistent_variant_tries_no_128_row_tile_on_4_warps_that_spilled(head_dim, element_size, tried):
    """At 128 keys (``kernel_compile_check.py --registers``); fp32 at head dim 128 has no tile left at all."""
    tiles = [(c.kwargs["BLOCK_M"], c.num_warps) for c in persistent_configs(head_dim, element_size, 128)]
    assert ((128, 4) in tiles) == tried and (128, 8) in tiles
    assert persistent_configs(128, 4, 128) == []


def test_both_variants_forced_on_run_the_tma_one(gen, device, monkeypatch):
    monkeypatch.setenv(PERSISTENT_ENV_VAR, "on")
    monkeypatch.setenv(TMA_ENV_VAR, "on")
    launches = {name: _Launches(getattr(attention_module, name))
                for name in ("_attention_kernel", "_attention_tma_kernel", "_attention_persistent_kernel")}
    for name, counter in launches.items():
        monkeypatch.setattr(attention_module, name, counter)
    q, k, v = (randn(gen, 2, 2, 8 * INTERPRETER_PROGRAMS, 16) for _ in range(3))
    kernels.attention(q, k, v)
    assert [len(c.grids) for c in launches.values()] == [0, 1, 0]
    monkeypatch.setenv(TMA_ENV_VAR, "off")
    kernels.attention(q, k, v)
    assert [len(c.grids) for c in launches.values()] == [0, 1, 1]


def test_a_kernel_forced_at_the_launcher_runs_whatever_the_settings_say(gen, device, monkeypatch):
    """``attention_triton(kernel=...)``, as the GPU checks and benchmarks time each variant: the settings off, the
    forced kernel runs; one that cannot run the problem, or an unknown name, is a ValueError naming ``kernel``."""
    monkeypatch.delenv(TMA_ENV_VAR, raising=False)
    monkeypatch.delenv(PERSISTENT_ENV_VAR, raising=False)
    launches = {name: _Launches(getattr(attention_module, name))
                for name in ("_attention_kernel", "_attention_tma_kernel", "_attention_persistent_kernel")}
    for name, counter in launches.items():
        monkeypatch.setattr(attention_module, name, counter)
    q, k, v = (randn(gen, 2, 2, 9, 16) for _ in range(3))
    for kernel in ("tma", "persistent", "tiled"):
        assert_close(attention_triton(q, k, v, kernel=kernel), attention_reference(q.double(), k.double(), v.double()),
                     torch.float32, 9)
    assert [len(c.grids) for c in launches.values()] == [1, 1, 1]
    long_k = randn(gen, 2, 2, PERSISTENT_MAX_KEYS + 1, 16)
    with pytest.raises(ValueError, match="kernel='persistent': the persistent variant does not run this problem"):
        attention_triton(q, long_k, long_k, kernel="persistent")
    with pytest.raises(ValueError, match="kernel='tma'"):
        attention_triton(q, long_k.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3), long_k, kernel="tma")
    with pytest.raises(ValueError, match="kernel must be one of"):
        attention_triton(q, k, v, kernel="flash")


def _strided(gen, shape, strides, offset=0):
    """A view of ``shape`` with ``strides`` into a NaN-filled buffer: what lies between its elements is NaN."""
    size = offset + sum((n - 1) * st for n, st in zip(shape, strides, strict=True)) + 1
    view = torch.as_strided(torch.full((size,), float("nan")), shape, strides, offset)
    return view.copy_(randn(gen, *shape))


@pytest.mark.parametrize(("shape", "strides", "offset", "tma"), [
    ((1, 2, 9, 16), (7, 16, 48, 1), 0, True),  # one batch row: its stride is never used
    ((2, 1, 9, 16), (9 * 48, 5, 48, 1), 0, True),  # one head: likewise
    ((1, 1, 9, 16), (0, 0, 16, 1), 0, True),
    ((2, 2, 9, 16), (2 * 9 * 16, 9 * 16, 16, 1), 3, False),  # a base off 16 bytes
    ((2, 2, 9, 16), (9 * 37, 16, 37, 1), 0, False),  # rows 37 elements apart: not 16-byte aligned
    ((2, 2, 9, 16), (9 * 40 + 8, 16, 40, 1), 0, False),  # a gap between batch rows
    ((1, 1, 0, 16), (16, 16, 16, 1), 0, False),  # no keys (torch.empty's strides): nothing to describe
])
def test_the_tma_variant_takes_exactly_the_layouts_it_can_read(gen, device, monkeypatch, shape, strides, offset, tma):
    monkeypatch.setenv(TMA_ENV_VAR, "on")
    q = _strided(gen, (shape[0], shape[1], 9, 16), (*strides[:2], max(strides[2], 16), 1), offset)
    k, v = (_strided(gen, shape, strides, offset) for _ in range(2))
    assert (_tma_descriptors(q, k, v) is not None) == tma
    y = kernels.attention(q, k, v)
    want = attention_reference(q.double(), k.double(), v.double())
    if shape[2] == 0:  # the reference's softmax over no keys is NaN where the kernels give zeros
        want = torch.zeros_like(want)
    assert_close(y, want, torch.float32, reduction=max(shape[2], 1))


def test_key_lengths_are_clamped_to_the_keys_and_a_row_without_keys_is_zero(gen, device):
    """A length of 0 (or below) leaves no real key: zeros, as for an all-padding mask; past S_k it is S_k."""
    q, k, v = (randn(gen, 4, 2, 6, 16) for _ in range(3))
    lengths = torch.tensor([0, -3, 64, 65], dtype=torch.int32, device=device)
    y = kernels.attention(q, k[:, :, :5].repeat(1, 1, 13, 1)[:, :, :64], v.repeat(1, 1, 11, 1)[:, :, :64],
                          key_lengths=lengths)
    assert torch.equal(y[:2], torch.zeros_like(y[:2]))
    whole = kernels.attention(q, k[:, :, :5].repeat(1, 1, 13, 1)[:, :, :64], v.repeat(1, 1, 11, 1)[:, :, :64])
    assert_close(y[2:], whole[2:].double(), torch.float32, reduction=64)


def test_int64_key_lengths_past_int32_are_clamped_not_wrapped(gen, device):
    """2**32 + 1 and 2**31 are past S_k (all keys), not 1 and -2**31 (one key, none) as int32 casts would read."""
    q, k, v = (randn(gen, 2, 1, 3, 16) for _ in range(3))
    y = kernels.attention(q, k, v, key_lengths=torch.tensor([2**32 + 1, 2**31], device=device))
    assert_close(y, attention_reference(q.double(), k.double(), v.double()), torch.float32, reduction=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_reference_gives_zeros_for_a_row_without_keys_and_softmax_elsewhere(gen, dtype):
    """The reference (what CPU tensors run) is torch's SDPA, which gives NaN where a row has no real key."""
    q, k, v = (randn(gen, 2, 3, 5, 16, dtype=dtype) for _ in range(3))
    y = attention_reference(q, k, v, key_lengths=torch.tensor([0, 3], device=q.device))
    assert y.dtype == dtype and torch.equal(y[0], torch.zeros_like(y[0]))
    scores = q[1].double() @ k[1, :, :3].double().transpose(-1, -2) / 4.0  # D ** -0.5
    assert_close(y[1], torch.softmax(scores, dim=-1) @ v[1, :, :3].double(), dtype, reduction=3)


def test_key_lengths_give_what_the_mask_they_stand_for_gives(gen, device):
    """The transformer passes lengths where it has a right-padded mask: the same attention, less work."""
    q, k, v = (randn(gen, 3, 2, 40, 32) for _ in range(3))
    lengths = torch.tensor([40, 1, 23], device=device)
    by_lengths = kernels.attention(q, k, v, key_lengths=lengths)
    by_mask = kernels.attention(q, k, v, lengths_mask(lengths, 40))
    assert_close(by_lengths, by_mask.double(), torch.float32, reduction=40)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_reads_strided_views_of_a_fused_qkv_buffer(gen, device, dtype):
    """q, k, v as views into one [B, S, 3, H, D] projection, as the transformer passes them (no copies)."""
    b, s, h, d = 2, 19, 3, 32
    q, k, v = _fused_qkv(gen, b, h, s, d, dtype)
    assert not q.is_contiguous()
    mask = torch.arange(s, device=device)[None, :] < torch.tensor([[s], [7]], device=device)
    y = kernels.attention(q, k, v, mask)
    assert y.transpose(1, 2).is_contiguous()  # [B, S, H, D] in memory: merging the heads is a view
    want = attention_reference(q.double().contiguous(), k.double().contiguous(), v.double().contiguous(), mask)
    assert_close(y, want, dtype, reduction=s)


def test_attention_writes_into_a_strided_out(gen, device):
    q, k, v = (randn(gen, 1, 2, 9, 16) for _ in range(3))
    buffer = poisoned(1, 9, 2, 16, dtype=torch.float32, device=device)
    y = kernels.attention(q, k, v, out=buffer.transpose(1, 2))
    assert y.data_ptr() == buffer.data_ptr()
    assert_close(y, attention_reference(q.double(), k.double(), v.double()), torch.float32, 9)


def test_attention_head_dim_128_and_custom_scale(gen, device):
    q, k, v = (randn(gen, 1, 1, 20, 128) for _ in range(3))
    y = kernels.attention(q, k, v, scale=0.05)
    assert_close(y, attention_reference(q.double(), k.double(), v.double(), scale=0.05), torch.float32, 20)


def test_attention_all_padding_row_is_zero(device):
    q = torch.randn(2, 1, 4, 16, device=device)
    mask = torch.tensor([[True, True, False, False], [False] * 4], device=device)
    y = kernels.attention(q, q, q, mask)
    assert torch.isfinite(y).all()
    assert torch.equal(y[1], torch.zeros_like(y[1]))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"q": torch.zeros(1, 2, 4, 24)}, "q"),
        ({"q": torch.zeros(1, 2, 4, 16, dtype=torch.float64)}, "q"),
        ({"k": torch.zeros(1, 3, 4, 16)}, "k"),
        ({"v": torch.zeros(1, 2, 5, 16)}, "v"),
        ({"key_padding_mask": torch.ones(1, 5, dtype=torch.bool)}, "key_padding_mask"),
        ({"key_padding_mask": torch.ones(1, 4)}, "key_padding_mask"),
        ({"v": torch.zeros(1, 2, 16, 4).transpose(2, 3)}, "v"),
        ({"out": torch.zeros(1, 2, 16, 4).transpose(2, 3)}, "out"),
        ({"out": torch.zeros(1, 2, 4, 16, dtype=torch.float16)}, "out"),
        ({"key_lengths": torch.ones(2, dtype=torch.int32)}, "key_lengths"),
        ({"key_lengths": torch.ones(1)}, "key_lengths"),
        ({"key_lengths": torch.ones(1, dtype=torch.int32), "key_padding_mask": torch.ones(1, 4, dtype=torch.bool)},
         "key_padding_mask and key_lengths"),
    ],
)
def test_attention_triton_rejects_bad_arguments(kwargs, name):
    args = {"q": torch.zeros(1, 2, 4, 16), "k": torch.zeros(1, 2, 4, 16), "v": torch.zeros(1, 2, 4, 16),
            "key_padding_mask": None} | kwargs
    with pytest.raises(ValueError, match=name):
        attention_triton(**args)
