"""Compiling kernels for a GPU on a machine without one.

Triton's JIT asks its active driver for the current device, stream and target before compiling; a machine
without CUDA has no driver. :func:`compile_for` puts a stand-in in its place that answers for a given GPU
architecture and refuses to launch, so ``JITFunction.warmup`` (and the autotuner's precompile) run the full
Triton -> PTX -> cubin pipeline on a CPU. The sm_90 compile check, the autotuning check and
``bench/compile.py`` use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from triton.backends.compiler import GPUTarget
from triton.compiler import CompiledKernel
from triton.runtime import driver
from triton.runtime.jit import JITFunction


class NoDevice(RuntimeError):
    """Raised when code compiled offline tries to run: there is no GPU to run it on."""


class _StandInDriver:
    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def __getattr__(self, name: str):
        raise NoDevice(f"no GPU here: compiled kernels cannot run (driver.{name} was asked for)")


@contextmanager
def compile_for(arch: int = 90, warp_size: int = 32) -> Iterator[GPUTarget]:
    """Within the block, Triton compiles for CUDA compute capability ``arch`` (90: H100/H200) and raises
    :class:`NoDevice` on any launch. Needs a process without ``TRITON_INTERPRET``."""
    target = GPUTarget("cuda", arch, warp_size)
    previous = driver._active  # not reset_active(): that would look for a real driver, and find none
    driver.set_active(_StandInDriver(target))
    try:
        yield target
    finally:
        driver._active = previous


def compiled_kernels(fn: JITFunction) -> int:
    """Binaries in ``fn``'s in-memory JIT cache (device 0) that finished compiling: what a compile-only run
    made of it."""
    return sum(isinstance(k, CompiledKernel) for k in fn.device_caches[0][0].values())
