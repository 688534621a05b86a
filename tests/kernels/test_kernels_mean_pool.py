import pytest
import torch
from kernel_checks import DTYPES, assert_close, poisoned, randn

import kernels
from kernels.mean_pool import mean_pool_reference, mean_pool_triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(("b", "s", "d"), [(1, 1, 1), (3, 17, 129), (2, 130, 384), (4, 5, 16)])
def test_mean_pool_matches_reference(gen, device, dtype, normalize, b, s, d):
    x = randn(gen, b, s, d, dtype=dtype)
    lengths = torch.randint(1, s + 1, (b,), generator=gen, device=device, dtype=torch.int32)
    if b > 1:
        lengths[-1] = 0  # a row without a position: zeros, normalized or not
    x[torch.arange(s, device=device)[None, :] >= lengths[:, None]] = float("nan")  # padding is never read
    out = poisoned(b, d, dtype=dtype, device=device)
    y = kernels.mean_pool(x, lengths, normalize=normalize, out=out)
    assert y is out
    assert_close(y, mean_pool_reference(x.double(), lengths, normalize=normalize), dtype, reduction=s)
    if b > 1:
        assert torch.equal(y[-1], torch.zeros_like(y[-1]))


def test_mean_pool_normalized_rows_have_unit_norm(gen, device):
    x = randn(gen, 3, 9, 48, scale=5.0)
    y = kernels.mean_pool(x, torch.tensor([9, 4, 1], device=device), normalize=True)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(3, device=device))
    torch.testing.assert_close(y[2], torch.nn.functional.normalize(x[2, 0], dim=0))


def test_mean_pool_lengths_past_the_sequence_are_clamped(gen, device):
    x = randn(gen, 2, 6, 8)
    y = kernels.mean_pool(x, torch.tensor([99, -3], device=device, dtype=torch.int64))
    torch.testing.assert_close(y, torch.stack([x[0].mean(dim=0), torch.zeros(8, device=device)]))



def test_mean_pool_int64_lengths_past_int32_are_clamped_not_wrapped(gen, device):
    """2**32 + 1 and 2**31 are past S (every position), not 1 and -2**31 (one position, none) as int32 reads them."""
    x = randn(gen, 2, 6, 8)
    y = kernels.mean_pool(x, torch.tensor([2**32 + 1, 2**31], device=device))
    assert_close(y, x.double().mean(dim=1), torch.float32, reduction=6)

@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"x": torch.zeros(2, 3)}, "x"),
        ({"x": torch.zeros(2, 3, 4, dtype=torch.int32)}, "x"),
        ({"x": torch.zeros(2, 4, 3).transpose(1, 2)}, "x"),
        ({"lengths": torch.ones(3, dtype=torch.int32)}, "lengths"),
        ({"lengths": torch.ones(2)}, "lengths"),
    ],
)
def test_mean_pool_triton_rejects_bad_arguments(kwargs, name):
    args = {"x": torch.zeros(2, 3, 4), "lengths": torch.ones(2, dtype=torch.int32)} | kwargs
    with pytest.raises(ValueError, match=name):
        mean_pool_triton(**args)
