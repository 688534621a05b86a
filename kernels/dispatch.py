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

import torch

ENV_VAR = "MAAS_KERNEL_BACKEND"
BACKENDS = ("auto", "triton", "torch")

#: True when the kernels were defined under the Triton interpreter (captured at import, like triton does).
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

#: ``@triton.autotune`` needs a real GPU driver: under the interpreter the launchers pass a fixed config.
USE_AUTOTUNE = not INTERPRETER and torch.cuda.is_available()


def backend_for(*tensors: torch.Tensor | None) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op on ``tensors`` (``None`` entries are ignored)."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={choice!r}: expected one of {', '.join(BACKENDS)}")
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if choice == "torch" or (choice == "auto" and not on_cuda):
        return "torch"
    if not on_cuda and not INTERPRETER:
        raise RuntimeError(
            f"{ENV_VAR}=triton with CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing kernels (or use CUDA tensors, or MAAS_KERNEL_BACKEND=auto)"
        )
    return "triton"
