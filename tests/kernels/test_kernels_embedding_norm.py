import pytest
import torch
from kernel_checks import DTYPES, assert_close, poisoned, randn

import kernels
from kernels.embedding_norm import embedding_norm_reference, embedding_norm_triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize(("b", "s", "v", "d"), [(1, 1, 3, 16), (3, 17, 50, 129), (2, 5, 7, 384)])
def test_embedding_norm_matches_reference(gen, device, dtype, id_dtype, b, s, v, d):
    """Rows of several sequences share a program (their positions wrap at S), and a row past the last is masked:
    3 x 17 rows of 129 columns are four to a program, 2 x 5 rows of 384 four too."""
    ids = torch.randint(0, v, (b, s), generator=gen, device=device, dtype=id_dtype)
    table, positions = randn(gen, v, d, dtype=dtype), randn(gen, s + 3, d, dtype=dtype)
    w, bias = randn(gen, d, dtype=dtype), randn(gen, d, dtype=dtype)
    out = poisoned(b, s, d, dtype=dtype, device=device)
    y = kernels.embedding_norm(ids, table, positions, w, bias, 1e-5, out=out)
    assert y is out
    expected = embedding_norm_reference(ids, table.double(), positions.double(), w.double(), bias.double(), 1e-5)
    assert_close(y, expected, dtype, reduction=d)


def test_embedding_norm_is_the_layer_norm_of_the_summed_embeddings(gen, device):
    ids = torch.tensor([[2, 0, 2]], device=device)
    table, positions = randn(gen, 3, 8), randn(gen, 4, 8)
    w, b = randn(gen, 8), randn(gen, 8)
    expected = kernels.layer_norm(table[ids] + positions[:3], w, b, 1e-5)
    torch.testing.assert_close(kernels.embedding_norm(ids, table, positions, w, b, 1e-5), expected)


@pytest.mark.parametrize("bad_id", [-1, 10])
def test_embedding_norm_rejects_out_of_range_ids(bad_id):
    with pytest.raises(ValueError, match="ids"):
        kernels.embedding_norm(torch.tensor([[1, bad_id]]), torch.zeros(10, 4), torch.zeros(2, 4), torch.ones(4),
                               torch.zeros(4))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"ids": torch.zeros(2, 3)}, "ids"),
        ({"ids": torch.zeros(6, dtype=torch.int64)}, "ids"),
        ({"table": torch.zeros(10, 4, dtype=torch.int64)}, "table"),
        ({"positions": torch.zeros(2, 4)}, "positions"),  # fewer rows than tokens
        ({"positions": torch.zeros(3, 5)}, "positions"),
        ({"weight": torch.ones(5)}, "weight"),
        ({"bias": torch.zeros(4, dtype=torch.float16)}, "bias"),
        ({"table": torch.zeros(4, 10).t()}, "table"),
    ],
)
def test_embedding_norm_triton_rejects_bad_arguments(kwargs, name):
    args = {"ids": torch.zeros(2, 3, dtype=torch.int64), "table": torch.zeros(10, 4), "positions": torch.zeros(3, 4),
            "weight": torch.ones(4), "bias": torch.zeros(4)} | kwargs
    with pytest.raises(ValueError, match=name):
        embedding_norm_triton(**args)
