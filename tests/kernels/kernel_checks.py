"""Comparison tolerances for the kernel tests (the one place they are stated) and input helpers.

Kernels accumulate in fp32 and round once on store, so the error budget is dominated by the output dtype's
rounding (rtol) plus an absolute term that grows like sqrt(reduction length) for sums of rounded
products (FlagGems' habit). References run in float64 on the same (already rounded) inputs.
"""

from __future__ import annotations

import math

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# dtype -> (atol, rtol) for a reduction of length 1. rtol is about two units in the last place.
_BASE = {
    torch.float32: (1e-6, 1e-5),
    torch.float16: (2e-4, 2e-3),
    torch.bfloat16: (1e-3, 1.6e-2),
}


def tolerance(dtype: torch.dtype, reduction: int = 1, tf32: bool = False) -> dict[str, float]:
    """``atol``/``rtol`` for comparing an op's output of ``dtype`` against a float64 reference.

    ``tf32``: fp32 products went through TF32 tensor cores (``tl.dot`` on a GPU), whose 10-bit mantissa
    is fp16's, so fp32 gets fp16's budget.
    """
    atol, rtol = _BASE[torch.float16 if tf32 and dtype == torch.float32 else dtype]
    return {"atol": atol * math.sqrt(max(1, reduction)), "rtol": rtol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, reduction: int = 1,
                 tf32: bool = False) -> None:
    """Compare in float64; NaN (e.g. an unwritten poisoned element) always fails."""
    assert actual.dtype == dtype, f"output dtype {actual.dtype}, expected {dtype}"
    torch.testing.assert_close(actual.double(), expected.double(), **tolerance(dtype, reduction, tf32))


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0):
    """Normal samples from ``gen`` (on its device), rounded to ``dtype``."""
    return (torch.randn(shape, generator=gen, device=gen.device) * scale).to(dtype)


def rand_mask(gen: torch.Generator, *shape: int, p_keep: float = 0.7) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=gen.device) < p_keep


def poisoned(*shape: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An ``out=`` tensor full of NaN, so any element the kernel fails to write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
