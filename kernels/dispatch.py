"""The one place that decides whether an op runs as a Triton kernel or as its plain-torch reference.

``MAAS_KERNEL_BACKEND`` (read on every call, so tests can flip it with ``monkeypatch``):

- ``auto`` (default): tensors on a CUDA device run the Triton kernels, CPU tensors run the torch reference;
- ``triton``: always the Triton kernels. CPU tensors then need the Triton interpreter, which is only active
  when ``TRITON_INTERPRET=1`` was set *before* ``kernels`` was imported (``@triton.jit`` looks at it when a
  kernel is defined, not when it runs);
- ``torch``: always the reference (useful to compare, or to rule a kernel out when debugging).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

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


PDL_ENV_VAR = "MAAS_PDL"
PDL_SETTINGS = ("auto", "off", "on")
_PDL_OPTIONS = {"USE_PDL": True, "launch_pdl": True}
_PDL_WANTED: ContextVar[bool] = ContextVar("maas_pdl_wanted", default=False)


@contextmanager
def pdl_launches(wanted: bool) -> Iterator[None]:
    """Within this block, ``MAAS_PDL=auto`` launches the kernels that support it for programmatic dependent launch
    if ``wanted``: the caller knows what the setting cannot, whether the launches are short enough for the gap
    between two of them to matter (``models.cuda_graphs.GraphedForward`` asks for it when capturing a small
    bucket)."""
    token = _PDL_WANTED.set(wanted)
    try:
        yield
    finally:
        _PDL_WANTED.reset(token)


def pdl(t: torch.Tensor) -> dict[str, bool]:
    """Launch options for a kernel that supports programmatic dependent launch (``kernels._common.pdl_wait``
    first, ``pdl_launch_dependents`` last), on ``t``'s device. On a GPU of compute capability 9.0 or more (Hopper
    on), such a kernel is launched so that its programs may start before the kernel ahead of it in the stream has
    finished, which hides the gap between two kernels of a CUDA graph (tens of them in a small model's batch of
    one): with ``MAAS_PDL=on`` always, with ``auto`` (the default) inside :func:`pdl_launches` ``(True)`` only, with
    ``off`` never. ``auto`` because on an H100 it took MiniLM's served batch of one from 0.251 to 0.216 ms but
    its batch of 256 (graphs of 128 rows) from 2.54 to 2.73 ms (bench/results/gpu, run 17; run 19: 0.248 to
    0.236 ms, and 2.50 to 2.52 ms)."""
    if INTERPRETER:
        return {}
    setting = env_choice(PDL_ENV_VAR, "auto", PDL_SETTINGS)
    if setting == "off" or (setting == "auto" and not _PDL_WANTED.get()):
        return {}
    return _PDL_OPTIONS if compute_capability(t) >= 90 else {}


def compute_capability(t: torch.Tensor) -> int:
    """The compute capability of ``t``'s GPU as Triton writes it (90 for 9.0); for CPU tensors, that of the GPU
    :func:`kernels.offline.compile_for` compiles for."""
    if t.is_cuda:
        return _capability(t.device.index if t.device.index is not None else torch.cuda.current_device())
    from triton.runtime import driver

    return driver.active.get_current_target().arch


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """How many multiprocessors (SMs) the CUDA ``device`` has: a persistent kernel's programs, a grid's wave."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


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
