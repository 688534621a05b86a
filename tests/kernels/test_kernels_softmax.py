import pytest
import torch
from kernel_checks import DTYPES, assert_close, poisoned, rand_mask, randn

import kernels
from kernels.softmax import log_softmax_reference, softmax_reference, softmax_triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 17), (3, 5, 129)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_matches_reference(gen, device, dtype, shape, masked, log):
    x = randn(gen, *shape, dtype=dtype, scale=3.0)
    mask = rand_mask(gen, *shape) if masked else None
    if masked:
        mask[..., 0, :] = False  # one fully masked row
    op, ref = (kernels.log_softmax, log_softmax_reference) if log else (kernels.softmax, softmax_reference)
    out = poisoned(*shape, dtype=dtype, device=device)
    y = op(x, mask, out=out)
    assert y is out
    assert_close(y, ref(x.double(), mask), dtype, reduction=shape[-1])


def test_softmax_fully_masked_row_is_zero_and_log_is_minus_inf(device):
    x = torch.randn(2, 9, device=device)
    mask = torch.ones(2, 9, dtype=torch.bool, device=device)
    mask[1] = False
    assert torch.equal(kernels.softmax(x, mask)[1], torch.zeros(9, device=device))
    assert torch.isneginf(kernels.log_softmax(x, mask)[1]).all()


def test_softmax_is_stable_for_large_inputs(device):
    x = torch.tensor([[1000.0, 1000.0, -1000.0]], device=device)
    torch.testing.assert_close(kernels.softmax(x), torch.tensor([[0.5, 0.5, 0.0]], device=device))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"x": torch.zeros(3, 8, dtype=torch.int64)}, "x"),
        ({"x": torch.zeros(8, 3).t()}, "x"),
        ({"mask": torch.ones(3, 7, dtype=torch.bool)}, "mask"),
        ({"mask": torch.ones(3, 8)}, "mask"),
        ({"out": torch.zeros(3, 8, dtype=torch.float16)}, "out"),
    ],
)
def test_softmax_triton_rejects_bad_arguments(kwargs, name):
    args = {"x": torch.zeros(3, 8), "mask": None, "out": None} | kwargs
    with pytest.raises(ValueError, match=name):
        softmax_triton(**args)
