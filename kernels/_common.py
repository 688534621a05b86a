"""Helpers shared by the ops: argument checks, output allocation, activations (Triton and torch)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTIVATIONS = ("none", "relu", "gelu", "tanh", "sigmoid")


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    shape: Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Raise ``ValueError`` naming ``name`` unless ``t`` is a tensor with the given properties."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all inputs must share one device)")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    return t


def check_contiguous(**tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the first of ``tensors`` (by keyword, None skipped) that is not contiguous:
    the launchers index their inputs as dense row-major arrays."""
    for name, t in tensors.items():
        if t is not None:
            check_tensor(name, t, contiguous=True)


def value_range(t: torch.Tensor) -> tuple[int, int] | None:
    """``(min, max)`` of an integer tensor in one reduction and one device sync, for index-range checks;
    None when ``t`` is empty or a CUDA graph is being recorded on its stream. A capture forbids syncs: the
    check ran in the warm-up calls before it, and a replay trusts its inputs as the caller's graph does (the
    models' tokenizers keep ids in range)."""
    if t.numel() == 0 or (t.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    low, high = torch.stack(torch.aminmax(t)).tolist()
    return low, high


def check_ids(ids: torch.Tensor, table: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every id indexes a row of ``table`` (one sync, see :func:`value_range`): a
    lookup out of range would read past the table."""
    bounds = value_range(ids)
    if bounds is not None and (bounds[0] < 0 or bounds[1] >= table.shape[0]):
        raise ValueError(f"ids must lie in [0, {table.shape[0]}) (the table's rows), got [{bounds[0]}, {bounds[1]}]")


def lengths_mask(lengths: torch.Tensor, s: int) -> torch.Tensor:
    """The padding mask ``[B, s]`` that each row's length stands for (right padding): its first ``length``
    positions are real."""
    return torch.arange(s, device=lengths.device)[None, :] < lengths[:, None]


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


# The GEMM and conv kernels compute offsets in 32 bits (row * K and the like): a tensor of more elements than
# this would wrap around, so their launchers refuse it.
MAX_ELEMENTS = 2**31 - 1


def output(out: torch.Tensor | None, shape: Sequence[int], like: torch.Tensor, **reads: torch.Tensor | None
           ) -> torch.Tensor:
    """``out`` checked against ``shape`` and ``like``'s dtype and device, or a new tensor. ``reads`` name the
    tensors the kernel reads while it writes ``out``: sharing memory with one of them, ``out`` would feed the
    kernel its own partial results (the torch path, which copies at the end, would not)."""
    if out is None:
        return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)
    check_tensor("out", out, shape=shape, dtypes=(like.dtype,), device=like.device, contiguous=True)
    check_apart(out, **reads)
    return out


def check_apart(out: torch.Tensor, **reads: torch.Tensor | None) -> None:
    """Raise ``ValueError`` if ``out`` shares memory with one of ``reads``, the tensors a kernel reads while it
    writes ``out``."""
    for name, tensor in reads.items():
        if tensor is not None and overlaps(out, tensor):
            raise ValueError(f"out must not share memory with {name}: the kernel reads {name} while it writes out")


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' bytes may overlap (their extents in one storage intersect)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    return a0 < b1 and b0 < a1


def _extent(t: torch.Tensor) -> tuple[int, int]:
    span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True)) + 1
    start = t.data_ptr() - sum((size - 1) * -stride for size, stride in zip(t.shape, t.stride(), strict=True)
                               if stride < 0) * t.element_size()
    return start, start + span * t.element_size()


def into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    """Return ``result``, copied into ``out`` when the caller gave one (the torch path of an op)."""
    if out is None:
        return result
    output(out, result.shape, result).copy_(result)
    return out


# Triton compiles a separate binary for an int argument equal to 1 or divisible by 16. Counts that vary with the
# batch (rows, output pixels, batch rows, bucket keys) enter only masks and tuning keys, never an address's
# alignment: each kernel lists them in ``do_not_specialize``, or the batch buckets of a warm-up would compile
# each kernel (each tile config, when autotuned) up to three times over: for 1 row, a multiple of 16, any other count.

# Elements a program of the norms (layer_norm, l2_normalize) handles at least: shorter rows share a program.
ROW_TILE = 2048


def row_block(n: int) -> tuple[int, int]:
    """``BLOCK`` (a row of ``n`` rounded up to a power of two) and ``num_warps`` of a row-wise kernel."""
    block = triton.next_power_of_2(n)
    return block, 4 if block <= 2048 else 8 if block <= 8192 else 16


def rows_per_program(block: int) -> int:
    """Rows one program of a row-wise kernel normalizes: a 384-wide row is 768 bytes in bf16, too little work
    to pay for a program (and a reduction) of its own, so short rows are taken ``ROW_TILE`` elements at a time."""
    return max(1, ROW_TILE // block)


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """First thing in a kernel launched with programmatic dependent launch (see :func:`kernels.dispatch.pdl`): its
    programs may start while the kernel before it still runs, so they wait here, before reading anything that
    kernel wrote or writing anything it reads, until it has finished and its writes are visible."""
    if USE_PDL:
        gdc_wait()


@triton.jit
def pdl_launch_dependents(USE_PDL: tl.constexpr):
    """Last thing in such a kernel, after its stores: once every program has passed here the next kernel may
    launch, so its launch and its programs' start overlap this kernel's last ones. (At the start instead, a
    kernel of many waves would share its SMs with the next one's programs, idle at their wait.)"""
    if USE_PDL:
        gdc_launch_dependents()


@triton.jit
def tanh(x):
    # tl.math.tanh is missing from the interpreter; tanh(x) = 2 * sigmoid(2x) - 1 is exact in real numbers.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr):
    """Activation on an fp32 tile; ``gelu`` is the exact erf form (torch's ``nn.GELU()`` default)."""
    if ACTIVATION == "relu":
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == "gelu":
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == "tanh":
        x = tanh(x)
    elif ACTIVATION == "sigmoid":
        x = tl.sigmoid(x)
    return x


def activation_reference(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The torch twin of :func:`apply_activation`."""
    if activation == "relu":
        return torch.relu(x)
    if activation == "gelu":
        return torch.nn.functional.gelu(x)
    if activation == "tanh":
        return torch.tanh(x)
    if activation == "sigmoid":
        return torch.sigmoid(x)
    return x


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the call when nothing would change.

    On a CPU serving thread every torch call releases the GIL and must win it back from the busy event loop;
    a no-op ``.to`` costs such a round trip like any real op.
    """
    return t if t.dtype == dtype else t.to(dtype)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A quantized ``[N, K]`` weight (int8 or fp8) times its per-output-channel ``scales``, in ``dtype``: what the
    references of the quantized kernels multiply by."""
    return cast(qweight, dtype) * cast(scales, dtype)[:, None]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a reference computes in: fp32 for half types (as the kernels accumulate), else unchanged."""
    return torch.promote_types(t.dtype, torch.float32)
