"""Triton kernels for the model-serving engine, each with a plain-torch reference.

Every public op picks its backend through :func:`kernels.backend_for` (see :mod:`kernels.dispatch`): Triton
on CUDA tensors, the torch reference on CPU tensors, overridable with ``MAAS_KERNEL_BACKEND``. Each op
module also exposes ``<op>_triton`` (the launcher: strict checks, contiguous inputs only) and
``<op>_reference`` (plain torch, also accepts float64); the public ops accept any strides. The package
attribute ``kernels.linear`` is the op, not the module: reach a module's extras with
``from kernels.linear import linear_triton``.

Compilation and warm-up: the first call of an op with a new combination of dtypes and flags compiles its
kernel (and autotunes ``linear`` per power-of-two bucket of rows, ``attention`` per bucket of lengths and
batch x heads, ``embedding_pool`` per bucket of batch and length), which takes from a second to tens of
seconds. Run one batch of the real shapes before taking traffic, as the model warm-up inputs do. Compiled
kernels, and with Triton >= 3.4 the autotuning timings, are cached on disk under ``TRITON_CACHE_DIR``
(Triton's own setting, default ``~/.triton/cache``): point it at a persistent volume so restarted workers skip
compiling and tuning. Inside :func:`tuned_shapes_only` (a warm model's batches) a bucket that was not tuned
borrows the nearest tuned bucket's config instead. Inside :func:`compile_only`, launches compile (all on one
pool of worker processes, or threads) and run nothing: a warm-up runs its batches that way first, so its
binaries compile together rather than round after round. :mod:`kernels.precompile` records the binaries a
process compiled and compiles them again on a machine without a GPU (``maas models precompile``), to ship
them in a worker's image.

Tests run the kernels on CPU under the Triton interpreter: set ``TRITON_INTERPRET=1`` before importing
this package and ``MAAS_KERNEL_BACKEND=triton``.
"""

from kernels._autotune import CompilePass, compile_only, compiling_only, tuned_shapes_only
from kernels.attention import attention
from kernels.conv2d import conv2d
from kernels.dispatch import backend_for
from kernels.embedding_norm import embedding_norm
from kernels.embedding_pool import embedding_pool
from kernels.l2_normalize import l2_normalize
from kernels.layer_norm import layer_norm
from kernels.linear import linear
from kernels.linear_fp8 import linear_fp8, quantize_fp8
from kernels.linear_int8 import linear_int8, quantize_int8
from kernels.linear_layer_norm import linear_layer_norm
from kernels.lstm import lstm
from kernels.max_pool2d import max_pool2d
from kernels.mean_pool import mean_pool
from kernels.softmax import log_softmax, softmax

__all__ = [
    "CompilePass",
    "attention",
    "backend_for",
    "compile_only",
    "compiling_only",
    "conv2d",
    "embedding_norm",
    "embedding_pool",
    "l2_normalize",
    "layer_norm",
    "linear",
    "linear_fp8",
    "linear_int8",
    "linear_layer_norm",
    "log_softmax",
    "lstm",
    "max_pool2d",
    "mean_pool",
    "quantize_fp8",
    "quantize_int8",
    "softmax",
    "tuned_shapes_only",
]
