"""Looking into Triton's on-disk kernel cache (``TRITON_CACHE_DIR``) and finding a kernel by name: what the compile
workers (:mod:`kernels._compile_workers`), the compile-only pass and the precompiler (:mod:`kernels.precompile`)
share. Kept apart from ``kernels._compile_workers``, which runs as ``python -m``: a module the package imports
would run twice in each worker, once as itself and once as ``__main__``.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import triton
from triton.runtime.cache import get_cache_manager
from triton.runtime.jit import JITFunction


def cached_binaries() -> set[Path]:
    """The CUDA binaries in the Triton cache (``TRITON_CACHE_DIR``): each compile that did not find its binary
    there adds one."""
    return set(Path(triton.knobs.cache.dir).glob("*/*.cubin"))


def in_cache(key: str, fn: JITFunction) -> bool:
    """Whether ``triton.compile`` would find the binary of cache key ``key`` (what Triton's ``AsyncCompileMode``
    is handed) in the Triton cache: the lookup it makes before compiling."""
    manager = get_cache_manager(hashlib.sha256(key.encode("utf-8")).hexdigest())
    return manager.get_group(f"{fn.__name__[:150]}.json") is not None


def jit_function(module: str, qualname: str) -> JITFunction:
    """The JIT function defined as ``module.qualname``, unwrapped from its autotuner or heuristics."""
    found = importlib.import_module(module)
    for name in qualname.split("."):
        found = getattr(found, name)
    while not isinstance(found, JITFunction):
        if not hasattr(found, "fn"):
            raise LookupError(f"{module}.{qualname} is not a Triton JIT function")
        found = found.fn
    return found
