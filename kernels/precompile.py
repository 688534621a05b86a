"""Kernel binaries compiled ahead of time, on a machine without a GPU, for a GPU model's workers.

A GPU worker with an empty Triton cache spends most of its cold start compiling (MiniLM bf16 on an H100: 37.3 s
with an empty cache, 29.3 s with the GPU model's tuning table, 8.1 s with a warm cache; ``bench/results/gpu``,
run 12). A persistent ``TRITON_CACHE_DIR`` volume saves every start after the first; an image baked with the
binaries saves the first too, and so serves platforms whose containers start with empty disks.

What a binary needs is a launch's specialization (signature, constexprs, compile options, target): Triton hands
it, as JSON, to its ``jit_cache_hook`` before each compile, and ``JITFunction.preload`` compiles the same binary
from it, under the same cache key, on any machine with the same Triton and kernel sources
(:func:`kernels.offline.compile_for` stands in for the absent GPU). So ``maas models tune`` records the binaries
its warm-ups compile (:func:`record_binaries`; the tuning table keeps those a worker reading the table needs:
:func:`kernels._autotune.tuning_table`), and ``maas models precompile`` (:func:`precompile`) compiles them into
a cache directory, e.g. during a ``docker build``: a worker on that GPU model then compiles nothing and, with
the table's picks, times nothing.

A binary is not all a first launch builds: Tritons before 3.7 also compile a host-side launcher per kernel
signature, and every Triton its launch helpers, C modules built with the host's compiler into the same cache.
On an H100 with every binary precompiled, MiniLM's first two warm-up batches still took 1.6 and 0.7 s against
0.05 and 0.08 with a warm cache (``bench/results/gpu``, run 14). :func:`precompile` builds those modules too
where it can: they link against the NVIDIA driver's ``libcuda.so.1``, which a build machine may lack.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import triton
from triton.compiler import CompiledKernel
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from kernels._triton_cache import cached_binaries, jit_function
from kernels.offline import compile_for

log = logging.getLogger(__name__)

#: Binaries one process records at most: a worker serving many models for days must not grow without bound.
MAX_RECORDED = 10_000

_lock = threading.Lock()
_recorded: dict[tuple[str, str], Binary] = {}
_recording = False
_unrecorded = 0  # binaries not recorded: past MAX_RECORDED, or whose specialization could not be read


@dataclass(frozen=True, eq=False)  # compared by identity: its dicts make it unhashable by value
class Binary:
    """One compiled kernel binary: the kernel (``module:qualname``), the GPU target it was compiled for
    (``{"backend", "arch", "warp_size"}``) and Triton's ``specialization_data``. ``params``: its constexprs by
    argument name and its compile options, what an autotuner's config sets (see :meth:`compiled_with`)."""

    kernel: str
    target: dict
    specialization: str
    fn: JITFunction = field(repr=False)
    params: dict = field(repr=False)

    def compiled_with(self, config: triton.Config) -> bool:
        """Whether this binary is ``config``'s: every kwarg and compile option the config sets has its value."""
        return all(self.params.get(name, object()) == value for name, value in config.all_kwargs().items())

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "target": self.target, "specialization": self.specialization}


def record_binaries() -> None:
    """From now on, note every kernel binary this process compiles or loads from the Triton cache (for the
    GPU it runs on, or the one :func:`kernels.offline.compile_for` names): :func:`recorded_binaries`. Installed
    once, in front of whatever ``jit_cache_hook`` was set (a hook set later, like the compile workers', calls
    the one it replaced)."""
    global _recording
    with _lock:
        if _recording:
            return
        _recording = True
        previous = triton.knobs.runtime.jit_cache_hook

        def hook(**launch):
            try:
                _note(launch["fn"].jit_function, launch["compile"]["specialization_data"])
            except Exception as exc:  # a record is worth less than the compile it would break
                _skip(f"{type(exc).__name__}: {exc}")
            return previous(**launch) if previous else None

        triton.knobs.runtime.jit_cache_hook = hook


def _note(fn: JITFunction, specialization: str) -> None:
    kernel = f"{fn.fn.__module__}:{fn.fn.__qualname__}"
    if (kernel, specialization) in _recorded:
        return
    data = json.loads(specialization)
    target = data.get("target") or driver.active.get_current_target().__dict__
    params = {fn.arg_names[path[0]]: value["constexpr"] if isinstance(value, dict) and "constexpr" in value else value
              for path, value in zip(data["constant_keys"], data["constant_vals"], strict=True) if len(path) == 1}
    params.update({k: data["options"].get(k) for k in ("num_warps", "num_ctas", "num_stages", "maxnreg")})
    with _lock:
        if len(_recorded) >= MAX_RECORDED:
            _skip(f"{MAX_RECORDED} binaries recorded already")
        else:
            _recorded[(kernel, specialization)] = Binary(kernel, dict(target), specialization, fn, params)


def _skip(why: str) -> None:
    """Count a binary left unrecorded; say why the first time."""
    global _unrecorded
    _unrecorded += 1
    if _unrecorded == 1:
        log.warning("a compiled kernel binary was not recorded (%s): a table exported from this process misses "
                    "it, and workers compile it themselves", why)


def recorded_binaries() -> list[Binary]:
    """The binaries noted since :func:`record_binaries`, in the order they were first compiled or loaded."""
    with _lock:
        return list(_recorded.values())


@dataclass
class Precompiled:
    """What :func:`precompile` did: ``binaries`` asked for; ``compiled`` of them new in the cache (the rest
    were there already, or failed); ``failed``: one line each, the kernel and why; ``seconds``: its time;
    ``host_modules``: the launchers and launch helpers built or found in the cache; ``host_modules_skipped``:
    why some (or all, with ``host_modules`` 0) could not be: workers build those on their first launches."""

    binaries: int = 0
    compiled: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    host_modules: int = 0
    host_modules_skipped: str = ""


def precompile(binaries: Iterable[dict], threads: int) -> Precompiled:
    """Compile ``binaries`` (a tuning table's ``"binaries"``: :meth:`Binary.to_json` entries) into the Triton
    cache (``TRITON_CACHE_DIR``) on ``threads`` threads, each for its own target, with no GPU needed. A binary
    already in the cache is only read; one that cannot compile (a kernel no longer in the sources, an entry
    that is not one) is reported in ``failed`` and the others compile all the same. Call it in a process
    without ``TRITON_INTERPRET`` (the kernels must be defined for the real compiler)."""
    entries = list(binaries)
    done = Precompiled(binaries=len(entries))
    before = cached_binaries()
    start = time.perf_counter()
    failed: dict[int, str] = {}
    kernels: list[CompiledKernel] = []
    by_target: dict[tuple[int, int], list[tuple[int, dict]]] = {}
    for i, entry in enumerate(entries):
        target = entry.get("target") if isinstance(entry, dict) else None
        if not isinstance(target, dict) or target.get("backend") != "cuda":
            failed[i] = (f"binary {i}: expected {{'kernel', 'target': {{'backend': 'cuda', 'arch', 'warp_size'}}, "
                         f"'specialization'}}, got {str(entry)[:120]}")
            continue
        by_target.setdefault((int(target.get("arch", 0)), int(target.get("warp_size", 32))), []).append((i, entry))
    for (arch, warp_size), group in sorted(by_target.items()):
        with compile_for(arch, warp_size), ThreadPoolExecutor(max(1, threads), "precompile") as pool:
            for (i, _), (kernel, error) in zip(group, pool.map(_compile, group), strict=True):
                if error:
                    failed[i] = error
                elif isinstance(kernel, CompiledKernel):
                    kernels.append(kernel)
    done.compiled = len(cached_binaries() - before)
    done.host_modules, done.host_modules_skipped = _build_host_modules(kernels, threads)
    done.seconds = time.perf_counter() - start
    done.failed = [failed[i] for i in sorted(failed)]
    return done


def _compile(numbered: tuple[int, dict]) -> tuple[CompiledKernel | None, str | None]:
    """Compile one entry: the compiled kernel, or what went wrong."""
    i, entry = numbered
    kernel = entry.get("kernel", "?")
    try:
        module, _, qualname = str(kernel).partition(":")
        fn = jit_function(module, qualname)
        specialization = _local_libraries(_with_defaults(fn, json.loads(entry["specialization"])))
        specialization.setdefault("target", entry["target"])  # Tritons before 3.7 do not write it; 3.7 needs it
        compiled = fn.preload(json.dumps(specialization))
        compiled = compiled.result() if hasattr(compiled, "result") else compiled  # under an async compile mode
    except Exception as exc:  # reported, and the other binaries compile
        return None, f"binary {i} ({kernel}): {type(exc).__name__}: {str(exc)[:300]}"
    if compiled is None:  # a jit_cache_hook that returns true skips the compile
        return None, f"binary {i} ({kernel}): not compiled: Triton's jit_cache_hook skipped it"
    return compiled, None


def _local_libraries(specialization: dict) -> dict:
    """``specialization`` without the external libraries (libdevice) whose recorded path does not exist here: a
    table exported on a GPU machine names that machine's Triton install, which a build machine lays out elsewhere.
    Triton then links this install's own, and files the binary under a hash of the library's contents, not its
    path: the key the workers look up, for the same Triton version."""
    options = specialization.get("options")
    if isinstance(options, dict) and isinstance(options.get("extern_libs"), list):
        options["extern_libs"] = [lib for lib in options["extern_libs"]
                                  if isinstance(lib, list) and len(lib) == 2 and os.path.exists(str(lib[1]))]
    return specialization


def _with_defaults(fn: JITFunction, specialization: dict) -> dict:
    """``specialization`` with the constexpr parameters of ``fn`` that have a default and that it lacks set to
    that default, as a launch that does not pass them compiles: a table recorded before the kernel gained them
    (``USE_PDL``, see ``kernels.dispatch.pdl``) then still precompiles, into the binary and cache entry such a
    launch looks up. Triton's preload fails on a signature without every parameter."""
    signature = specialization.get("signature")
    if not isinstance(signature, dict):
        return specialization
    missing = [p for p in fn.params if p.name not in signature and p.is_constexpr
               and p.default is not inspect.Parameter.empty]
    if not missing:
        return specialization
    named = {p.name for p in missing}
    specialization["signature"] = {p.name: signature.get(p.name, "constexpr") for p in fn.params
                                   if p.name in signature or p.name in named}
    constants = [*zip(specialization["constant_keys"], specialization["constant_vals"], strict=True),
                 *(([p.num], p.default) for p in missing)]
    constants.sort(key=lambda pair: pair[0])  # in argument order, as a launch lists them
    specialization["constant_keys"] = [key for key, _ in constants]
    specialization["constant_vals"] = [value for _, value in constants]
    return specialization


def _first_line(exc: Exception) -> str:
    """The exception's type and the first line of its message (libcuda's is several lines of advice)."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


def _build_host_modules(kernels: list[CompiledKernel], threads: int) -> tuple[int, str]:
    """Build into the cache the C modules the first launches of ``kernels`` would build: the launch helpers
    (``CudaUtils``), and, in Tritons that have one per signature, each kernel's launcher. The modules found,
    or 0 and why none could be built (the first line of the error: no ``libcuda.so.1`` on a machine without
    the NVIDIA driver, say)."""
    try:
        from triton.backends.nvidia import driver as cuda

        cuda.CudaUtils()
    except Exception as exc:  # no driver library here: the binaries still serve, the worker builds these
        return 0, _first_line(exc)
    if not hasattr(cuda, "make_launcher"):  # Triton 3.7+: one generic launcher, inside the helpers
        return 1, ""

    # One per binary: binaries sharing a launcher find it in the cache (its key is a hash of its source), and
    # keying on what that source depends on would copy Triton's launcher generator.
    def build(kernel: CompiledKernel) -> str | None:
        try:
            cuda.CudaLauncher(kernel.src, kernel.metadata)
        except Exception as exc:
            return _first_line(exc)
        return None

    with ThreadPoolExecutor(max(1, threads), "precompile-launchers") as pool:
        errors = [error for error in pool.map(build, kernels) if error]
    return 1 + len(kernels) - len(errors), errors[0] if errors else ""
