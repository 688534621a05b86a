import pytest
import torch
from kernel_checks import DTYPES, assert_close, poisoned, randn

import kernels
from kernels.attention import attention_reference, attention_triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("b", "h", "sq", "sk", "d"),
    [(1, 1, 1, 1, 16), (2, 3, 17, 17, 32), (1, 2, 5, 70, 64), (2, 1, 129, 129, 16)],
)
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_reference(gen, device, dtype, b, h, sq, sk, d, masked):
    q, k, v = (randn(gen, b, h, s, d, dtype=dtype) for s in (sq, sk, sk))
    mask = None
    if masked:
        lengths = torch.randint(1, sk + 1, (b,), generator=gen, device=device)
        mask = torch.arange(sk, device=device)[None, :] < lengths[:, None]
    out = poisoned(b, h, sq, d, dtype=dtype, device=device)
    y = kernels.attention(q, k, v, mask, out=out)
    assert y is out
    assert_close(y, attention_reference(q.double(), k.double(), v.double(), mask), dtype, reduction=sk)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_reads_strided_views_of_a_fused_qkv_buffer(gen, device, dtype):
    """q, k, v as views into one [B, S, 3, H, D] projection, as the transformer passes them (no copies)."""
    b, s, h, d = 2, 19, 3, 32
    qkv = randn(gen, b, s, 3, h, d, dtype=dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
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
    ],
)
def test_attention_triton_rejects_bad_arguments(kwargs, name):
    args = {"q": torch.zeros(1, 2, 4, 16), "k": torch.zeros(1, 2, 4, 16), "v": torch.zeros(1, 2, 4, 16),
            "key_padding_mask": None} | kwargs
    with pytest.raises(ValueError, match=name):
        attention_triton(**args)
