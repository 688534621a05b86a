"""Kernel tests run the Triton kernels: on a GPU when there is one, else under the Triton interpreter.

The interpreter must be switched on (``TRITON_INTERPRET=1``) before ``kernels`` is first imported; the root
``tests/conftest.py`` does that on machines without CUDA. Each test forces the Triton backend through the
environment, which the dispatch reads at call time.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from kernels.dispatch import INTERPRETER


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    if not (INTERPRETER or torch.cuda.is_available()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 set before kernels is imported")
    monkeypatch.setenv("MAAS_KERNEL_BACKEND", "triton")


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() and not INTERPRETER else "cpu"


@pytest.fixture
def gen(device) -> torch.Generator:
    """A fresh seed per test, printed so a failure can be replayed with ``KERNEL_TEST_SEED=<seed>``."""
    seed = int(os.environ.get("KERNEL_TEST_SEED") or random.SystemRandom().randrange(2**31))
    print(f"seed={seed}")
    return torch.Generator(device=device).manual_seed(seed)

