import pytest
import torch
from kernel_checks import DTYPES, assert_close, poisoned, rand_mask, randn

import kernels
from kernels.embedding_pool import embedding_pool_reference, embedding_pool_triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize(("b", "s", "v", "d"), [(1, 1, 3, 16), (5, 17, 50, 129), (2, 130, 7, 32)])
def test_embedding_pool_matches_reference(gen, device, dtype, id_dtype, b, s, v, d):
    ids = torch.randint(0, v, (b, s), generator=gen, device=device, dtype=id_dtype)
    table = randn(gen, v, d, dtype=dtype)
    mask = rand_mask(gen, b, s)
    mask[0, 0] = True
    if b > 1:
        mask[-1] = False  # a row with no tokens
    out = poisoned(b, d, dtype=dtype, device=device)
    y = kernels.embedding_pool(ids, table, mask, out=out)
    assert y is out
    assert_close(y, embedding_pool_reference(ids, table.double(), mask), dtype, reduction=s)


@pytest.mark.parametrize("bad_id", [-1, 10])
def test_embedding_pool_rejects_out_of_range_ids(bad_id):
    ids = torch.tensor([[1, bad_id]])
    with pytest.raises(ValueError, match="ids"):
        kernels.embedding_pool(ids, torch.zeros(10, 4), torch.ones(1, 2, dtype=torch.bool))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"ids": torch.zeros(2, 3)}, "ids"),
        ({"table": torch.zeros(10, 4, dtype=torch.int64)}, "table"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool)}, "mask"),
        ({"mask": torch.ones(2, 3)}, "mask"),
        ({"table": torch.zeros(4, 10).t()}, "table"),
    ],
)
def test_embedding_pool_triton_rejects_bad_arguments(kwargs, name):
    args = {"ids": torch.zeros(2, 3, dtype=torch.int64), "table": torch.zeros(10, 4),
            "mask": torch.ones(2, 3, dtype=torch.bool)} | kwargs
    with pytest.raises(ValueError, match=name):
        embedding_pool_triton(**args)
