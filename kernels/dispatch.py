"""The one place that decides whether an op runs as a Triton kernel or as its plain-torch reference.

``MAAS_KERNEL_BACKEND`` (read on every call, so tests can flip it with ``monkeypatch``):

- ``auto`` (default): tensors on a CUDA device run the Triton kernels, CPU tensors run the torch reference;
- ``triton``: always the Triton kernels. CPU tensors then need the Triton interpreter, which is only active
  when ``TRITON_INTERPRET=1`` was set *before* ``kernels`` was imported (``@triton.jit`` looks at it when a
  kernel is defined, not when it runs);
- ``torch``: always the reference (useful to compare, or to rule a kernel out when debugging).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

ENV_VAR = "MAAS_KERNEL_BACKEND"
BACKENDS = ("auto", "triton", "torch")

#: True when the kernels were defined under the Triton interpreter (captured at import, like triton does).
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

#: ``@triton.autotune`` needs a real GPU driver: under the interpreter the launchers pass a fixed config.
USE_AUTOTUNE = not INTERPRETER and torch.cuda.is_available()


def env_choice(name: str, default: str, choices: Sequence[str]) -> str:
    """The environment variable ``name`` as one of ``choices`` (trimmed, lower-cased; unset or empty:
    ``default``); any other value raises ``ValueError`` naming the variable and what it takes. The kernels' knobs
    are read each time they act, so tests can flip them with ``monkeypatch``."""
    choice = os.environ.get(name, default).strip().lower() or default
    if choice not in choices:
        raise ValueError(f"{name}={choice!r}: expected {', '.join(choices[:-1])} or {choices[-1]}")
    return choice


def backend_for(*tensors: torch.Tensor | None) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op on ``tensors`` (``None`` entries are ignored)."""
    choice = env_choice(ENV_VAR, "auto", BACKENDS)
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if choice == "torch" or (choice == "auto" and not on_cuda):
        return "torch"
    if not on_cuda and not INTERPRETER:
        raise RuntimeError(
            f"{ENV_VAR}=triton with CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing kernels (or use CUDA tensors, or MAAS_KERNEL_BACKEND=auto)"
        )
    return "triton"
