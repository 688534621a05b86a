import pytest
import torch
from kernel_checks import DTYPES, assert_close, poisoned, randn

import kernels
from kernels.lstm import lstm_reference, lstm_triton


def _weights(gen, inp, hidden, dtype):
    scale = hidden**-0.5
    return (randn(gen, 4 * hidden, inp, dtype=dtype, scale=scale), randn(gen, 4 * hidden, hidden, dtype=dtype,
            scale=scale), randn(gen, 4 * hidden, dtype=dtype, scale=scale))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("b", "s", "inp", "hidden", "ragged"), [(1, 1, 3, 16, False), (3, 7, 5, 20, True)])
def test_lstm_matches_reference(gen, device, dtype, reverse, b, s, inp, hidden, ragged):
    x = randn(gen, b, s, inp, dtype=dtype)
    w_ih, w_hh, bias = _weights(gen, inp, hidden, dtype)
    lengths = torch.tensor([s, 1, 0][:b]) if ragged else None
    out = poisoned(b, s, hidden, dtype=dtype, device=device)
    y = kernels.lstm(x, w_ih, w_hh, bias, lengths, reverse, out=out)
    assert y is out
    expected = lstm_reference(x.double(), w_ih.double(), w_hh.double(), bias.double(), lengths, reverse)
    assert_close(y, expected, dtype, reduction=4 * (inp + hidden))


def test_lstm_reference_matches_torch_packed_bidirectional(gen):
    """Pins the semantics: the reference equals a torch bidirectional LSTM over a packed batch."""
    b, s, inp, hidden = 3, 6, 4, 5
    lstm = torch.nn.LSTM(inp, hidden, batch_first=True, bidirectional=True).double()
    x = torch.randn(b, s, inp, dtype=torch.float64, generator=gen)
    lengths = torch.tensor([6, 3, 1])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    expected, _ = torch.nn.utils.rnn.pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=s)
    p = dict(lstm.named_parameters())
    fwd = lstm_reference(x, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"] + p["bias_hh_l0"], lengths)
    bwd = lstm_reference(x, p["weight_ih_l0_reverse"], p["weight_hh_l0_reverse"],
                         p["bias_ih_l0_reverse"] + p["bias_hh_l0_reverse"], lengths, reverse=True)
    torch.testing.assert_close(torch.cat([fwd, bwd], dim=-1), expected.detach())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"w_ih": torch.zeros(64, 4)}, "w_ih"),
        ({"w_hh": torch.zeros(60, 16)}, "w_hh"),
        ({"bias": torch.zeros(60)}, "bias"),
        ({"lengths": torch.tensor([2, 9])}, "lengths"),
        ({"lengths": torch.tensor([2.0, 1.0])}, "lengths"),
        ({"x": torch.zeros(5, 2, 3).transpose(0, 1)}, "x"),
    ],
)
def test_lstm_triton_rejects_bad_arguments(kwargs, name):
    args = {"x": torch.zeros(2, 5, 3), "w_ih": torch.zeros(64, 3), "w_hh": torch.zeros(64, 16),
            "bias": torch.zeros(64), "lengths": None} | kwargs
    with pytest.raises(ValueError, match=name):
        lstm_triton(**args)
