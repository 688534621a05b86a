"""Compile every kernel launch for an H100 (sm_90) without a GPU, to catch what the interpreter cannot.

The interpreter runs kernels as numpy and skips the compiler's rules (constexpr-only globals, type
unification in loops and branches, tile shapes for ``tl.dot``, shared-memory budget). This script runs the
real launchers on CPU tensors through Triton's own JIT, with :func:`kernels.offline.compile_for` standing in
for the CUDA driver and every launch turned into a compile-only warm-up, so each launch's exact arguments,
specialization and constexprs (the GPU tile configs included) go through the full Triton -> PTX -> cubin
pipeline. The compiles run on a thread pool (Triton's ``AsyncCompileMode``). It also launches every op at
1, 3 and 16 rows and fails if any of them compiles more than one binary for those (a warm-up visits every
batch bucket). Must run *without* ``TRITON_INTERPRET``.

With ``--pdl`` it compiles the plain launches only, with ``MAAS_PDL=on``: each kernel that supports
programmatic dependent launch must come out built for it, its PTX waiting on the kernel before it and
releasing the one after (``griddepcontrol``).

With ``--registers`` each compile's line also says what ``ptxas -v`` reports for it: registers a thread and
bytes spilled to local memory (stores/loads), an occupancy and spill check a CPU can make. A spill is not a
failure: where it sits (hot loop or epilogue) is for ``nvdisasm`` to say.

Usage: ``python tests/kernels/kernel_compile_check.py [--quick] [--registers] [--pdl]``; exits 1 on any
failure.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from triton.runtime._async_compile import AsyncCompileMode
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels._autotune import usable_cpus
from kernels.linear import SHARED_MEMORY
from kernels.offline import compile_for

# (launch, kernel name, constexprs and options, compiled kernel or its future) of every compile.
compiles: list[tuple[str, str, str, object]] = []
current_launch = ["-"]


def compile_only(run: Callable) -> Callable:
    """``JITFunction.run`` that compiles (asynchronously, under ``AsyncCompileMode``) and never launches."""

    def patched(self: JITFunction, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        label = ", ".join(f"{k}={v}" for k, v in kwargs.items() if isinstance(v, bool | int | str) and v is not None)
        compiles.append((current_launch[0], self.__name__, label, kernel))
        return kernel

    return patched


def launches(dt: torch.dtype) -> list[tuple[str, Callable[[], object]]]:
    """(name, thunk) pairs: each thunk calls one launcher on small CPU tensors of ``dt``."""
    from kernels.attention import attention_triton
    from kernels.conv2d import conv2d_triton
    from kernels.embedding_norm import embedding_norm_triton
    from kernels.embedding_pool import embedding_pool_triton
    from kernels.l2_normalize import l2_normalize_triton
    from kernels.layer_norm import layer_norm_triton
    from kernels.linear import launch_linear, linear_triton
    from kernels.linear_fp8 import linear_fp8_triton, quantize_fp8
    from kernels.linear_int8 import linear_int8_triton, quantize_int8
    from kernels.linear_layer_norm import _launch_fused
    from kernels.lstm import lstm_triton
    from kernels.max_pool2d import max_pool2d_triton
    from kernels.mean_pool import mean_pool_triton
    from kernels.softmax import softmax_triton

    def z(*shape):
        return torch.zeros(shape, dtype=dt)

    x, w, b, img = z(8, 64), z(32, 64), z(32), z(2, 3, 8, 8)
    ids = torch.zeros(2, 5, dtype=torch.int64)
    found = [
        ("linear", lambda: linear_triton(x, w, b, "gelu", z(8, 32))),
        ("linear, persistent TMA", lambda: launch_linear(x, w, None, b, "gelu", z(8, 32), None, kernel="tma")),
        ("linear, TMA split-K", lambda: launch_linear(x, w, None, b, "gelu", z(8, 32), None, kernel="tma_split_k")),
        ("linear, split-K", lambda: launch_linear(x, w, None, b, "gelu", z(8, 32), None, kernel="split_k")),
        ("linear_int8, split-K", lambda: launch_linear(x, *quantize_int8(w), b, "relu", None, None, kernel="split_k")),
        ("linear_int8", lambda: linear_int8_triton(x, *quantize_int8(w), b, "relu")),
        ("linear, GEMV", lambda: launch_linear(x[:1], w, None, b, "gelu", z(1, 32), None, kernel="gemv")),
        ("linear_int8, GEMV", lambda: launch_linear(x[:1], *quantize_int8(w), b, "relu", None, None, kernel="gemv")),
        ("linear_fp8", lambda: linear_fp8_triton(x, *quantize_fp8(w), b, "gelu", z(8, 32))),
        ("linear_layer_norm, fused", lambda: _launch_fused(x, w, None, b, z(8, 32), b, b, 1e-5, z(8, 32), 8, 32, 64)),
        ("linear_layer_norm int8, fused", lambda: _launch_fused(x, *quantize_int8(w), b, z(8, 32), b, b, 1e-5,
                                                                z(8, 32), 8, 32, 64)),
        ("softmax", lambda: softmax_triton(x, x > 0, log=True)),
        ("softmax, vocabulary-long rows", lambda: softmax_triton(z(2, 30522))),
        ("layer_norm, d=4096", lambda: layer_norm_triton(z(2, 4096), z(4096), z(4096))),
        ("layer_norm", lambda: layer_norm_triton(x, z(64), z(64), residual=x)),
        ("l2_normalize", lambda: l2_normalize_triton(x)),
        ("mean_pool", lambda: mean_pool_triton(z(2, 5, 64), torch.tensor([5, 2]), normalize=True)),
        ("embedding_pool", lambda: embedding_pool_triton(ids, x, ids == 0)),
        ("embedding_norm", lambda: embedding_norm_triton(ids, x, x, z(64), z(64))),
        ("conv2d", lambda: conv2d_triton(img, z(4, 3, 3, 3), z(4), True)),
        ("max_pool2d", lambda: max_pool2d_triton(img, 2)),
        ("lstm", lambda: lstm_triton(z(2, 4, 8), z(64, 8), z(64, 16), z(64), torch.tensor([4, 2]), True)),
        # The largest step tiles (64 rows x 64 units x 64): their pipeline must fit in shared memory in fp32.
        ("lstm, 64 rows", lambda: lstm_triton(z(64, 2, 8), z(256, 8), z(256, 64), z(256))),
    ]
    for d in (64, 128):
        q = z(1, 2, 8, d)
        mask = torch.ones(1, 8, dtype=torch.bool)
        found.append((f"attention d={d}", lambda q=q, mask=mask: attention_triton(q, q, q, mask)))
    return found


BATCH_SIZES = (1, 3, 16)  # an int equal to 1, one of no note, one divisible by 16: Triton's three cases


def batch_launches(dt: torch.dtype) -> list[tuple[str, Callable[[], object]]]:
    """Launches whose batch-dependent sizes differ (``BATCH_SIZES`` images, texts or rows), labelled ``batch
    <op>``: each op must compile one binary for all of them (``kernels._common`` says why)."""
    from kernels.attention import attention_triton
    from kernels.conv2d import conv2d_triton
    from kernels.embedding_norm import embedding_norm_triton
    from kernels.embedding_pool import embedding_pool_triton
    from kernels.l2_normalize import l2_normalize_triton
    from kernels.layer_norm import layer_norm_triton
    from kernels.linear import launch_linear
    from kernels.linear_fp8 import _quantize_rows
    from kernels.linear_layer_norm import _launch_fused
    from kernels.lstm import lstm_triton
    from kernels.max_pool2d import max_pool2d_triton
    from kernels.mean_pool import mean_pool_triton

    def z(*shape):
        return torch.zeros(shape, dtype=dt)

    found = []
    for b in BATCH_SIZES:
        x = z(b, 64)
        found += [
            ("batch linear", lambda x=x: launch_linear(x, z(32, 64), None, z(32), "gelu", None, None, kernel="tiled")),
            ("batch linear split-K", lambda x=x: launch_linear(x, z(32, 64), None, None, "none", None, None,
                                                               kernel="split_k")),
            ("batch layer_norm", lambda x=x: layer_norm_triton(x, z(64), z(64))),
            ("batch linear_layer_norm", lambda b=b, x=x: _launch_fused(x, z(32, 64), None, z(32), z(b, 32), z(32),
                                                                       z(32), 1e-5, z(b, 32), b, 32, 64)),
            ("batch embedding_norm", lambda b=b: embedding_norm_triton(torch.zeros(b, b + 2, dtype=torch.int64),
                                                                       z(8, 64), z(32, 64), z(64), z(64))),
            ("batch l2_normalize", lambda x=x: l2_normalize_triton(x)),
            ("batch mean_pool", lambda b=b: mean_pool_triton(z(b, 5, 64), torch.full((b,), 2))),
            ("batch conv2d", lambda b=b: conv2d_triton(z(b, 3, 8, 8), z(4, 3, 3, 3), z(4), True)),
            ("batch max_pool2d", lambda b=b: max_pool2d_triton(z(b, 4, 32, 32), 2)),  # 1,024+ outputs: one tile size
            ("batch lstm", lambda b=b: lstm_triton(z(b, 1, 8), z(64, 8), z(64, 16), z(64))),  # input GEMM: b rows
            ("batch attention", lambda b=b: attention_triton(z(b, 2, 8, 64), z(b, 2, 8, 64), z(b, 2, 8, 64))),
            ("batch embedding_pool", lambda b=b, x=x: embedding_pool_triton(torch.zeros(b, 5, dtype=torch.int64), x,
                                                                            torch.ones(b, 5, dtype=torch.bool))),
        ]
        if dt == torch.bfloat16:
            found.append(("batch quantize_rows_fp8", lambda x=x: _quantize_rows(x)))
    return found


def batch_binaries() -> dict[str, int]:
    """Per ``batch`` launch (and dtype) and kernel it ran, how many binaries its compiles came to."""
    found: dict[str, set[int]] = {}
    for launch, kernel_name, _, kernel in compiles:
        if launch.startswith("batch "):
            found.setdefault(f"{launch}: {kernel_name}", set()).add(id(kernel))
    return {name: len(ids) for name, ids in found.items()}


def gemm_configs(dt: torch.dtype, quick: bool) -> list[tuple[str, Callable[[], object]]]:
    """Every autotune config of the GEMM that its pruning keeps (``launches`` used the fixed tiles); for bf16
    also with fp8 X and W tiles and both scales (``linear_fp8``)."""
    from kernels.linear import _GPU_CONFIGS, _linear_kernel, fits_shared_memory
    from kernels.linear_fp8 import FP8

    x = torch.zeros(8, 64, dtype=dt)
    variants = {"linear": ((x, x, None, None, x[0], None, x, 8, 64, 64, 8), False)}
    if dt == torch.bfloat16:
        q, s = torch.zeros(8, 64, dtype=FP8), torch.ones(8)
        variants["linear fp8"] = ((q, q, s, s, x[0], x, x, 8, 64, 64, 8), True)
    found = []
    for label, (args, fp8) in variants.items():
        for config in _GPU_CONFIGS[: 3 if quick else None]:
            if fits_shared_memory(config, args[0].element_size()):
                kwargs = dict(HAS_SCALE=fp8, HAS_X_SCALE=fp8, HAS_BIAS=True, HAS_RESIDUAL=fp8, ACTIVATION="relu",
                              UPCAST=False, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
                found.append((f"{label} {config}",
                              lambda a=args, k=kwargs: _linear_kernel.warmup(*a, grid=None, **k)))
    return found + split_k_configs(dt, quick) + gemv_configs(dt, quick)


def split_k_configs(dt: torch.dtype, quick: bool) -> list[tuple[str, Callable[[], object]]]:
    """Every autotune config of the split-K GEMM: float weights, and for bf16 int8 and fp8 ones too."""
    from kernels.linear import _SPLIT_K_CONFIGS, _linear_split_k_kernel, fits_shared_memory
    from kernels.linear_fp8 import FP8

    x, partials = torch.zeros(8, 64, dtype=dt), torch.zeros(8, 8, 64)
    weights = {"": (x, x)}
    if dt == torch.bfloat16:
        weights |= {" int8": (x, torch.zeros(64, 64, dtype=torch.int8)), " fp8": (x.to(FP8), x.to(FP8))}
    found = []
    for label, (a, w) in weights.items():
        for config in _SPLIT_K_CONFIGS[: 2 if quick else None]:
            if fits_shared_memory(config, a.element_size()):
                args = (a, w, partials, 8, 64, 64, 8)
                kwargs = dict(HAS_SCALE=w.dtype != dt, UPCAST=False, **config.kwargs, num_warps=config.num_warps,
                              num_stages=config.num_stages)
                found.append((f"linear split-K{label} {config}",
                              lambda a=args, k=kwargs: _linear_split_k_kernel.warmup(*a, grid=None, **k)))
    return found


def gemv_configs(dt: torch.dtype, quick: bool) -> list[tuple[str, Callable[[], object]]]:
    """Every autotune config of the GEMV kernel: float weights, and for bf16 int8 and fp8 ones too (fp8 with fp8
    x and both scales)."""
    from kernels.linear import _GEMV_CONFIGS, _linear_gemv_kernel
    from kernels.linear_fp8 import FP8

    x, s = torch.zeros(1, 64, dtype=dt), torch.ones(64)
    weights = {"": (x, x, False)}
    if dt == torch.bfloat16:
        weights |= {" int8": (x, torch.zeros(64, 64, dtype=torch.int8), False), " fp8": (x.to(FP8), x.to(FP8), True)}
    found = []
    for label, (a, w, fp8) in weights.items():
        for config in _GEMV_CONFIGS[: 2 if quick else None]:
            args = (a, w, s, s, x[0], x, x, 64, 64)
            kwargs = dict(HAS_SCALE=w.dtype != dt, HAS_X_SCALE=fp8, HAS_BIAS=True, HAS_RESIDUAL=True,
                          ACTIVATION="gelu", X_VECTOR=16 // a.element_size(), **config.kwargs,
                          num_warps=config.num_warps, num_stages=config.num_stages)
            found.append((f"linear GEMV{label} {config}",
                          lambda a=args, k=kwargs: _linear_gemv_kernel.warmup(*a, grid=None, **k)))
    return found


def linear_layer_norm_configs(dt: torch.dtype, quick: bool) -> list[tuple[str, Callable[[], object]]]:
    """The fused linear + LayerNorm's GPU tiles (:func:`kernels.linear_layer_norm.tiles`) for a few rows and for
    many, at MiniLM's rows (384 columns: three blocks of 128; K 384 and 1,536) and a 256-wide one: float
    weights, and for bf16 int8 ones too."""
    from kernels.linear_layer_norm import _linear_layer_norm_kernel, row_chunks, tiles

    found = []
    for n, k in [(384, 384), (384, 1536), (256, 1024)][: 1 if quick else None]:
        x, v, r = torch.zeros(64, k, dtype=dt), torch.zeros(n, dtype=dt), torch.zeros(64, n, dtype=dt)
        weights = {"": (torch.zeros(n, k, dtype=dt), None)}
        if dt == torch.bfloat16:
            weights[" int8"] = (torch.zeros(n, k, dtype=torch.int8), torch.ones(n))
        for label, (w, s) in weights.items():
            for m in (16, 4096):
                chunks, block_n = row_chunks(n)
                kwargs = dict(HAS_SCALE=s is not None, HAS_BIAS=True, UPCAST=False, CHUNKS=chunks, BLOCK_N=block_n,
                              **tiles(m, n, dt.itemsize))
                args = (x, w, s, v, r, v, v, r, m, n, k, 1e-12)
                found.append((f"linear_layer_norm{label} M{m} N{n} K{k}",
                              lambda a=args, kw=kwargs: _linear_layer_norm_kernel.warmup(*a, grid=None, **kw)))
    return found


def tma_configs(dt: torch.dtype, quick: bool) -> list[tuple[str, Callable[[], object]]]:
    """Every autotune config of the persistent TMA GEMMs (whole K, and K split in halves) that pruning keeps."""
    from kernels.linear import (
        _TMA_CONFIGS,
        _TMA_SPLIT_K_CONFIGS,
        _linear_tma_kernel,
        _linear_tma_split_k_kernel,
        _set_tile_shapes,
        fits_shared_memory,
    )

    x = torch.zeros(512, 256, dtype=dt)
    found = []
    for label, configs, kernel, workspace in (("linear TMA", _TMA_CONFIGS[: 2 if quick else None],
                                               _linear_tma_kernel, ()),
                                              ("linear TMA split-K", _TMA_SPLIT_K_CONFIGS[: 1 if quick else None],
                                               _linear_tma_split_k_kernel, (x.float(), x.int()))):
        for config in configs:
            if fits_shared_memory(config, dt.itemsize):
                descs = {name: TensorDescriptor.from_tensor(x, [1, 1]) for name in ("x_desc", "w_desc")}
                _set_tile_shapes(descs | config.kwargs)
                args = (descs["x_desc"], descs["w_desc"], x[0], None, x, *workspace, 512, 512, 256, 512)
                kwargs = dict(HAS_BIAS=True, HAS_RESIDUAL=False, ACTIVATION="gelu", UPCAST=False, NUM_PROGRAMS=132,
                              **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
                found.append((f"{label} {config}",
                              lambda kernel=kernel, k=kwargs, a=args: kernel.warmup(*a, grid=None, **k)))
    return found


def attention_configs(dt: torch.dtype, quick: bool) -> list[tuple[str, Callable[[], object]]]:
    """Every autotune config of the attention kernel that its pruning keeps, for head dims 32 (MiniLM's), 64 and
    128, with key lengths (the transformer's); at 64 and 128 the first two configs also with a key-padding mask
    and with neither."""
    from kernels.attention import GPU_CONFIGS, _attention_kernel, fits_registers, fits_shared_memory

    found = []
    paddings = {"lengths": torch.ones(1, dtype=torch.int32), "mask": torch.ones(1, 8, dtype=torch.bool), "none": None}
    for d in (32, 64, 128):
        q = torch.zeros(1, 2, 8, d, dtype=dt)
        strides = (*q.stride()[:3],) * 4
        for i, config in enumerate(GPU_CONFIGS[: 2 if quick else None]):
            if not (fits_shared_memory(config, d, dt.itemsize) and fits_registers(config, d)):
                continue
            for padding, m in list(paddings.items())[: 3 if i < 2 and d > 32 else 1]:
                args = (q, q, q, m, q, 2, 8, 8, 0.125, 8, 8, 2, *strides)
                kwargs = dict(HAS_MASK=padding == "mask", HAS_LENGTHS=padding == "lengths", HEAD_DIM=d,
                              UPCAST=False, **config.kwargs, num_warps=config.num_warps,
                              num_stages=config.num_stages)
                found.append((f"attention d={d} {padding} {config}", lambda k=kwargs, a=args:
                              _attention_kernel.warmup(*a, grid=None, **k)))
    return found


def attention_tma_configs(dt: torch.dtype, quick: bool) -> list[tuple[str, Callable[[], object]]]:
    """Every autotune config of the TMA attention variant (``MAAS_ATTENTION_TMA=on``) that its pruning keeps, on
    views of a fused QKV projection with key lengths, as the transformer launches it."""
    from kernels.attention import (
        TMA_CONFIGS,
        _attention_tma_kernel,
        _set_tile_shapes,
        _tma_descriptor,
        fits_registers,
        fits_shared_memory,
    )

    found = []
    lengths = torch.ones(1, dtype=torch.int32)
    for d in (32, 64, 128):
        qkv = torch.zeros(1, 8, 3, 2, d, dtype=dt)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        descriptors = [_tma_descriptor(t) for t in (q, k, v)]
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *q.stride()[:3])
        for config in TMA_CONFIGS[: 2 if quick else None]:
            if not (fits_shared_memory(config, d, dt.itemsize) and fits_registers(config, d)):
                continue
            descs = [copy.copy(desc) for desc in descriptors]  # each config its own tile shapes
            kwargs = dict(HAS_MASK=False, HAS_LENGTHS=True, HEAD_DIM=d, UPCAST=False, **config.kwargs,
                          num_warps=config.num_warps, num_stages=config.num_stages)
            _set_tile_shapes({"q_desc": descs[0], "k_desc": descs[1], "v_desc": descs[2], **kwargs})
            args = (*descs, k, v, lengths, q, 2, 8, 8, 0.125, 8, 8, 2, *strides)
            found.append((f"attention TMA d={d} {config}", lambda k=kwargs, a=args:
                          _attention_tma_kernel.warmup(*a, grid=None, **k)))
    return found


def attention_persistent_configs(dt: torch.dtype, quick: bool) -> list[tuple[str, Callable[[], object]]]:
    """Every autotune config of the persistent attention variant (``MAAS_ATTENTION_PERSISTENT=on``) that its
    pruning keeps at 128 keys (one key tile of 128), on views of a fused QKV projection with key lengths, as the
    transformer launches it; at head dim 64 also with a mask and with neither."""
    from kernels.attention import _attention_persistent_kernel, persistent_configs

    found = []
    paddings = {"lengths": torch.ones(1, dtype=torch.int32), "mask": torch.ones(1, 128, dtype=torch.bool), "none": None}
    for d in (32, 64, 128):
        qkv = torch.zeros(1, 128, 3, 2, d, dtype=dt)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *q.stride()[:3])
        for config in persistent_configs(d, dt.itemsize, 128)[: 2 if quick else None]:
            for padding, m in list(paddings.items())[: 3 if d == 64 else 1]:
                args = (q, k, v, m, q, 1, 2, 128, 128, 0.125, 128, 128, 2, *strides)
                kwargs = dict(HAS_MASK=padding == "mask", HAS_LENGTHS=padding == "lengths", HEAD_DIM=d, UPCAST=False,
                              BLOCK_N=128, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
                found.append((f"attention persistent d={d} {padding} {config}", lambda k=kwargs, a=args:
                              _attention_persistent_kernel.warmup(*a, grid=None, **k)))
    return found


def embedding_pool_configs(dt: torch.dtype, quick: bool) -> list[tuple[str, Callable[[], object]]]:
    """Every autotune config of the embedding-pool kernel that its register bound keeps."""
    from kernels.embedding_pool import GPU_CONFIGS, _embedding_pool_kernel, fits_registers

    ids, table, mask = torch.zeros(2, 8, dtype=torch.int64), torch.zeros(16, 384, dtype=dt), torch.ones(2, 8) > 0
    found = []
    for config in [c for c in GPU_CONFIGS if fits_registers(c)][: 2 if quick else None]:
        y = torch.zeros(2, 384, dtype=dt)
        kwargs = dict(**config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        found.append((f"embedding_pool {config}", lambda k=kwargs, y=y: _embedding_pool_kernel.warmup(
            ids, table, mask, y, 8, 384, 2, 8, grid=None, **k)))
    return found


def register_use(kernel) -> str:
    """``regs=<per thread> spill=<store bytes>/<load bytes>`` from ``ptxas -v`` on a compiled kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", ptx, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return f"regs={regs.group(1) if regs else '?'} spill={'/'.join(spill.groups()) if spill else '?'}"


# The kernels that wait for the kernel before them and release the next (kernels._common.pdl_wait): what a
# MiniLM forward launches.
PDL_KERNELS = {"_linear_kernel", "_linear_tma_kernel", "_linear_tma_split_k_kernel", "_linear_split_k_kernel",
               "_split_k_reduce_kernel", "_linear_gemv_kernel", "_linear_layer_norm_kernel", "_embedding_norm_kernel",
               "_layer_norm_kernel", "_attention_kernel", "_mean_pool_kernel"}


def check_pdl() -> int:
    """``launches(bf16)`` with ``MAAS_PDL=on``: every kernel of ``PDL_KERNELS`` compiled for programmatic
    dependent launch, with both ``griddepcontrol`` instructions in its PTX; the other kernels without it."""
    os.environ["MAAS_PDL"] = "on"
    failed = 0
    with compile_for(90), ThreadPoolExecutor(usable_cpus()) as pool, AsyncCompileMode(pool, ignore_errors=True):
        for name, thunk in launches(torch.bfloat16):
            current_launch[0] = name
            try:
                thunk()
            except Exception:
                failed += 1
                print(f"FAIL {name}\n{traceback.format_exc()}", file=sys.stderr)
    built = set()
    for launch, kernel_name, _, kernel in compiles:
        kernel = kernel.result() if hasattr(kernel, "result") else kernel
        ptx = kernel.asm["ptx"]
        want = kernel_name in PDL_KERNELS
        got = (kernel.metadata.launch_pdl, "griddepcontrol.wait" in ptx, "griddepcontrol.launch_dependents" in ptx)
        if got != (want,) * 3:
            failed += 1
            print(f"FAIL {launch}: {kernel_name}: launch_pdl, wait, launch_dependents = {got}, expected {want}",
                  file=sys.stderr)
        elif want:
            built.add(kernel_name)
    for kernel_name in sorted(PDL_KERNELS - built):
        failed += 1
        print(f"FAIL {kernel_name}: no launch compiled it for programmatic dependent launch", file=sys.stderr)
    print(f"{len(built)} kernels compiled for programmatic dependent launch, {failed} failure(s)")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="bf16 only and two GEMM configs")
    parser.add_argument("--registers", action="store_true", help="report registers and spills (ptxas -v)")
    parser.add_argument("--pdl", action="store_true", help="the plain launches with programmatic dependent launch")
    opts = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: this check compiles the real kernels", file=sys.stderr)
        return 2
    JITFunction.run = compile_only(JITFunction.run)
    if opts.pdl:
        return check_pdl()
    failed = 0
    batch_launched: set[str] = set()
    with compile_for(90), ThreadPoolExecutor(usable_cpus()) as pool, AsyncCompileMode(pool, ignore_errors=True):
        for dt in [torch.bfloat16] if opts.quick else [torch.bfloat16, torch.float16, torch.float32]:
            for name, thunk in launches(dt) + batch_launches(dt) + gemm_configs(dt, opts.quick) + \
                    tma_configs(dt, opts.quick) + attention_configs(dt, opts.quick) + \
                    attention_tma_configs(dt, opts.quick) + attention_persistent_configs(dt, opts.quick) + \
                    linear_layer_norm_configs(dt, opts.quick) + embedding_pool_configs(dt, opts.quick):
                current_launch[0] = f"{name} {dt}"
                if name.startswith("batch "):
                    batch_launched.add(current_launch[0])
                try:
                    thunk()
                except Exception:
                    failed += 1
                    print(f"FAIL {current_launch[0]}\n{traceback.format_exc()}", file=sys.stderr)
    seen: set[int] = set()
    for launch, kernel_name, label, kernel in compiles:  # every compile has finished here
        if id(kernel) in seen:  # a launch that found its binary compiled already
            continue
        seen.add(id(kernel))
        try:
            kernel = kernel.result() if hasattr(kernel, "result") else kernel
            shared = kernel.metadata.shared
            if shared > SHARED_MEMORY:
                raise RuntimeError(f"needs {shared} bytes of shared memory > {SHARED_MEMORY}")
            if kernel_name.endswith("_tma_kernel") and "cp.async.bulk.tensor" not in kernel.asm["ptx"]:
                raise RuntimeError("a TMA kernel without a bulk tensor copy in its PTX")
            if kernel_name == "_linear_tma_split_k_kernel" and not all(
                    op in kernel.asm["ptx"] for op in ("cp.async.bulk.tensor", "relaxed.add", "release.add",
                                                       "acquire.gpu.cas")):
                raise RuntimeError("the TMA split-K kernel without its bulk copies or ordered atomics")
            if kernel_name == "_attention_persistent_kernel" and "cp.async.commit_group" not in kernel.asm["ptx"]:
                raise RuntimeError("the persistent kernel's loop is not pipelined (no asynchronous copies)")
            registers = f"  {register_use(kernel)}" if opts.registers else ""
        except Exception:
            failed += 1
            print(f"FAIL {launch}: {kernel_name} ({label})\n{traceback.format_exc()}", file=sys.stderr)
            continue
        print(f"ok  {kernel_name:<24} shared={shared:>6}{registers}  {label}")
    shared_binaries = batch_binaries()
    for name, binaries in shared_binaries.items():
        if binaries != 1:
            failed += 1
            print(f"FAIL {name}: {binaries} binaries for batch sizes {BATCH_SIZES}, expected one", file=sys.stderr)
    compiled_launches = {name.split(": ")[0] for name in shared_binaries}
    for launch in sorted(batch_launched - compiled_launches):
        failed += 1
        print(f"FAIL {launch}: compiled nothing", file=sys.stderr)
    print(f"batch sizes {BATCH_SIZES}: one binary each for {sum(n == 1 for n in shared_binaries.values())} of "
          f"{len(shared_binaries)} kernels and dtypes")
    print(f"{len(seen)} compiles for sm_90, {failed} failure(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
