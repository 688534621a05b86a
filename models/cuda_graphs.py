"""CUDA graphs of a model's forward, one per shape bucket, replayed instead of launching kernel by kernel.

A batch of a small model is a few dozen kernel launches, and each launch costs the serving thread tens of
microseconds of Python (argument checks, the autotuner's lookup, the launch itself): on an H200 MiniLM's
forward at batch 1 took 3-5 ms of launching for under 0.2 ms of GPU work (``bench/models.py --tokens``). A
CUDA graph records the launches once and replays them with one call.

Graphs need fixed shapes and addresses, so inputs are padded up to a bucket (the next power of two along
each bucketed leading dimension) and copied into that bucket's static input tensors; the outputs are sliced
back to the real batch and cloned out of the graph's memory before the next replay may overwrite them. The
forward must be row-independent along the batch (padding rows must not change real rows), free of host
syncs and data-dependent shapes; a capture that fails is logged once and that bucket runs eagerly from then
on. ``MAAS_CUDA_GRAPHS=0`` turns graphs off.

Inputs may come from the CPU, as the tokenizer makes them: each bucket then keeps pinned host copies of its
static inputs and pads into those, in numpy. Moving the inputs to the GPU first costs, per input and per batch,
a pinned allocation, a transfer, and one or two more kernels on the GPU to pad and copy them into the bucket
(on an H100, MiniLM served at batch 1: 0.258 ms from pinned copies against 0.276 ms with the ids moved first,
and 91,279 against 87,415 sequences/s at batch 256, side by side in run 16 of ``bench/results/gpu``). The
graph itself holds the transfers out of the pinned copies (``copies_in_graph``, a captured copy reads its
host memory at each replay): at batch 1 the serving thread then makes one call before the GPU starts, where
it made one per input and then the replay.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from kernels import compiling_only
from kernels.dispatch import env_choice, pdl_launches

log = logging.getLogger(__name__)

ENV_VAR = "MAAS_CUDA_GRAPHS"
_OFF = ("0", "false", "no", "off")


def enabled() -> bool:
    """Whether serving may replay CUDA graphs (read per call, like ``MAAS_KERNEL_BACKEND``): 1/0, true/false,
    yes/no or on/off; any other value raises ValueError rather than counting as on (``Settings.from_env``
    refuses it at start)."""
    return env_choice(ENV_VAR, "1", ("1", "true", "yes", "on", *_OFF)) not in _OFF


def bucket(n: int, low: int, high: int) -> int:
    """The power of two >= ``n``, at least ``low`` and at most ``high`` (callers ensure ``n <= high``)."""
    return min(max(low, 1 << max(n - 1, 0).bit_length()), high)


def length_groups(lengths: Sequence[int] | np.ndarray, low: int, high: int,
                  min_saved: int) -> list[tuple[int, np.ndarray]]:
    """Rows grouped by the bucket of their length (``bucket(n, low, high)``), ascending: ``(bucket, rows)``,
    the rows an int64 array in ascending order.

    A batch of short and long texts padded as one tensor spends GEMM and attention work on the short rows'
    padding (a quarter of all positions in the MiniLM benchmark's batch); run group by group, each row is
    padded to its own bucket only. A group is folded into the next longer one when keeping it apart would save
    fewer than ``min_saved`` padded positions, which would not pay for one more forward (another graph replay
    of smaller, less efficient kernels). In numpy, with each length's bucket looked up in a table: serving
    calls this on every batch before its first replay, with the GPU waiting (a Python loop over 256 rows took
    about 0.1 ms; numpy's unique, split and sort 35-36 us on this project's 2-CPU machine, this 21-22 us: three
    runs side by side).
    """
    buckets = _bucket_table(low, high)[np.clip(np.asarray(lengths, dtype=np.int64), 0, high)]
    order = np.argsort(buckets, kind="stable")  # rows of one bucket stay in ascending order
    ordered = buckets[order]
    starts = np.flatnonzero(np.diff(ordered, prepend=-1))
    values, ends = ordered[starts].tolist(), [*starts[1:].tolist(), len(order)]
    groups: list[tuple[int, np.ndarray]] = []
    carried = None
    for i, (length, start, end) in enumerate(zip(values, starts.tolist(), ends, strict=True)):
        rows = order[start:end] if carried is None else np.sort(np.concatenate((carried, order[start:end])))
        if i + 1 == len(values) or len(rows) * (values[i + 1] - length) >= min_saved:
            groups.append((length, rows))
            carried = None
        else:
            carried = rows
    return groups


@functools.lru_cache(maxsize=16)
def _bucket_table(low: int, high: int) -> np.ndarray:
    """``bucket(n, low, high)`` for every length ``n`` from 0 to ``high``."""
    return np.array([bucket(n, low, high) for n in range(high + 1)], dtype=np.int64)


Forward = Callable[..., dict[str, torch.Tensor]]


def _in_bucket(shape: tuple[int, ...], x: torch.Tensor) -> tuple[int, ...]:
    """The shape of input ``x`` padded to the bucket ``shape``: its bucketed leading dimensions, as many as it has
    (a per-row input, such as the lengths of a batch of texts, has the batch dimension only), then its own."""
    return (*shape[: x.dim()], *x.shape[len(shape):])


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; from the CPU to a GPU through pinned memory, without waiting: a copy from pageable
    memory first waits for all the GPU work queued before it, which leaves the GPU idle from that work's end
    until the next launch."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.contiguous().pin_memory().to(device, non_blocking=True)  # one block for one DMA copy


# What a bucket pads on the host, in numpy (a few times cheaper than torch's CPU ops on small tensors): token
# ids, masks, lengths, and the float types numpy has.
_HOST_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.float32,
                          torch.float64, torch.float16})


class _Bucket:
    """One bucket's static inputs and what replays them: the graph and its outputs (None where a capture is off),
    and, for inputs from the CPU, pinned host copies of the static inputs (``staged``, with numpy views to pad
    them cheaply) and the event of the last replay that read them, which must end before they are rewritten."""

    __slots__ = ("graph", "inputs", "outputs", "staged", "staged_arrays", "transferred")

    def __init__(self, inputs: list[torch.Tensor], outputs: dict[str, torch.Tensor] | None,
                 graph: torch.cuda.CUDAGraph | None) -> None:
        self.inputs, self.outputs, self.graph = inputs, outputs, graph
        self.staged: list[torch.Tensor] | None = None
        self.staged_arrays: list[np.ndarray] = []
        self.transferred: torch.cuda.Event | None = None


class GraphedForward:
    """``fn(*inputs) -> {name: tensor}``, with every input and output batch-first, replayed from graphs.

    ``pad_values[i]`` fills input i's padding; ``max_shape``/``min_shape`` bound the bucketed leading
    dimensions, which the first input has all of (another may have fewer: it is bucketed along those). Inputs
    beyond ``max_shape`` or ``max_elements`` run eagerly: their launches are amortized and their graphs would
    hold too much memory. At most ``max_graphs`` buckets stay captured (least
    recently used evicted); they share one memory pool, which is safe because replays are serialized and
    their outputs cloned at once, and which makes a graph cost about its outputs beyond the largest graph's
    intermediates: 40 cover the 35 buckets (7 batch x 5 length) of a text model batching up to 64 rows.
    ``capture=False`` runs the padded inputs eagerly instead: the same bucketing on a machine without CUDA,
    which is how the tests check that padding changes no result. ``device``: where ``fn`` runs, where inputs
    from elsewhere (the CPU) are copied (default: wherever the inputs are). ``copies_in_graph=False`` copies
    inputs from the CPU before each replay instead of in it (the way before, kept for side-by-side timing).
    Inputs from the CPU and from the GPU make different graphs of a bucket: each graph reads its inputs from
    where they are put. Buckets of at most ``pdl_max_elements`` leading elements are captured with their kernels
    launched for programmatic dependent launch under ``MAAS_PDL=auto`` (``kernels.dispatch.pdl``): in a small
    bucket the gaps between kernels are a large part of a replay, in a large one the overlap cost more than it hid.
    """

    def __init__(self, fn: Forward, pad_values: Sequence[int | bool], max_shape: Sequence[int],
                 min_shape: Sequence[int] | None = None, *, max_elements: int | None = None,
                 max_graphs: int = 40, capture: bool = True, device: torch.device | None = None,
                 copies_in_graph: bool = True, pdl_max_elements: int = 0) -> None:
        self.fn = fn
        self.pdl_max_elements = pdl_max_elements
        self.device = device
        self.copies_in_graph = copies_in_graph
        self.pad_values = tuple(pad_values)
        self.max_shape = tuple(max_shape)
        self.min_shape = tuple(min_shape or (1,) * len(self.max_shape))
        self.max_elements = max_elements or math.prod(self.max_shape)
        self.max_graphs = max_graphs
        self.capture = capture
        self._entries: OrderedDict[tuple, _Bucket] = OrderedDict()
        self._buckets: dict[tuple[int, ...], tuple[int, ...] | None] = {}  # leading dims -> their bucket
        self._failed: set[tuple] = set()
        self._pool = None
        self._lock = threading.Lock()  # one replay at a time: static inputs and outputs are shared

    def _bucket(self, inputs: Sequence[torch.Tensor]) -> tuple[int, ...] | None:
        lead = inputs[0].shape[: len(self.max_shape)]
        shape = self._buckets.get(lead, False)  # remembered: a batch of one waits on this Python before its replay
        if shape is False:
            shape = self._bucket_of(tuple(lead))
            if len(self._buckets) >= 4096:  # leads within max_shape repeat; others need not fill memory
                self._buckets.clear()
            self._buckets[lead] = shape
        return shape

    def _bucket_of(self, lead: tuple[int, ...]) -> tuple[int, ...] | None:
        if len(lead) < len(self.max_shape) or any(n < 1 or n > m for n, m in zip(lead, self.max_shape, strict=True)):
            return None
        shape = tuple(bucket(n, lo, hi) for n, lo, hi in zip(lead, self.min_shape, self.max_shape, strict=True))
        return shape if math.prod(shape) <= self.max_elements else None

    def __call__(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        shape = self._bucket(inputs)
        if shape is None:
            return self.fn(*self._moved(inputs))
        if compiling_only():  # kernels.compile_only: the bucket's shapes compile, as its capture will launch them
            padded = self._padded(shape, self._moved(inputs))
            with pdl_launches(self._pdl(shape)):
                outputs = self.fn(*padded)
            return {name: t[: inputs[0].shape[0]] for name, t in outputs.items()}
        host = self._from_host(inputs)
        key = (shape, host, *((tuple(x.shape[len(shape):]), x.dtype) for x in inputs))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                if key in self._failed:
                    return self.fn(*self._moved(inputs))
                entry = self._build(key, shape, inputs, host)
                if entry is None:
                    return self.fn(*self._moved(inputs))
            else:
                self._entries.move_to_end(key)
                if host:
                    self._stage(entry, inputs)
                else:
                    self._load(entry.inputs, self._moved(inputs))
            if host and not self.copies_in_graph:
                self._copy_staged(entry)
            if entry.graph is None:
                outputs = self.fn(*entry.inputs)
            else:
                entry.graph.replay()
                outputs = entry.outputs
            if host:  # the pinned copies are read by this replay (or the copies before it)
                entry.transferred.record(torch.cuda.current_stream(entry.inputs[0].device))
            rows = inputs[0].shape[0]
            return {name: t[:rows].clone() for name, t in outputs.items()}

    def _pdl(self, shape: tuple[int, ...]) -> bool:
        """Whether the bucket ``shape``'s kernels are launched for programmatic dependent launch under ``auto``."""
        return math.prod(shape) <= self.pdl_max_elements

    def _from_host(self, inputs: Sequence[torch.Tensor]) -> bool:
        """Whether ``inputs`` go to a captured bucket through its pinned copies: CPU tensors numpy can pad, bound
        for a GPU."""
        return (self.capture and self.device is not None and self.device.type == "cuda"
                and all(x.device.type == "cpu" and x.dtype in _HOST_DTYPES for x in inputs))

    def _moved(self, inputs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """``inputs`` on ``device``, for the calls that run ``fn`` on them directly."""
        return inputs if self.device is None else [to_device(x, self.device) for x in inputs]

    def _stage(self, entry: _Bucket, inputs: Sequence[torch.Tensor]) -> None:
        """``inputs`` padded into the bucket's pinned copies, once the last replay has read them (long ago,
        normally: the caller waited for its outputs)."""
        entry.transferred.synchronize()
        for staged, x, pad in zip(entry.staged_arrays, (x.numpy() for x in inputs), self.pad_values, strict=True):
            if staged.shape == x.shape:  # a full bucket: nothing to pad
                np.copyto(staged, x)
                continue
            staged.fill(pad)
            staged[tuple(slice(0, n) for n in x.shape)] = x

    @staticmethod
    def _copy_staged(entry: _Bucket) -> None:
        for staged, static in zip(entry.staged, entry.inputs, strict=True):
            static.copy_(staged, non_blocking=True)

    def _load(self, static_inputs: list[torch.Tensor], inputs: Sequence[torch.Tensor]) -> None:
        for static, x, pad in zip(static_inputs, inputs, self.pad_values, strict=True):
            if static.shape == x.shape:  # a full bucket: no padding to write
                static.copy_(x)
                continue
            static.fill_(pad)
            static[tuple(slice(0, n) for n in x.shape)].copy_(x)

    def _padded(self, shape: tuple[int, ...], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """New tensors of the bucket's ``shape`` holding ``inputs``, padded."""
        padded = [torch.empty(_in_bucket(shape, x), dtype=x.dtype, device=x.device) for x in inputs]
        self._load(padded, inputs)
        return padded

    def _build(self, key: tuple, shape: tuple[int, ...], inputs: Sequence[torch.Tensor],
               host: bool) -> _Bucket | None:
        if host:
            static_inputs = [torch.empty(_in_bucket(shape, x), dtype=x.dtype, device=self.device) for x in inputs]
        else:
            static_inputs = self._padded(shape, self._moved(inputs))
        entry = _Bucket(static_inputs, None, None)
        if host:
            entry.staged = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in static_inputs]
            entry.staged_arrays = [t.numpy() for t in entry.staged]
            entry.transferred = torch.cuda.Event()
            self._stage(entry, inputs)
            if not self.copies_in_graph:  # the warm-up runs read them
                self._copy_staged(entry)
        if self.capture:
            copies = host and self.copies_in_graph

            def forward() -> dict[str, torch.Tensor]:
                if copies:  # captured too: each replay reads the pinned copies as they are then
                    self._copy_staged(entry)
                return self.fn(*static_inputs)

            try:
                with pdl_launches(self._pdl(shape)):
                    entry.graph, entry.outputs = self._capture(forward, static_inputs[0].device)
            except Exception as exc:  # a forward that cannot be captured still serves, eagerly
                log.warning("CUDA graph capture failed for input shapes %s (%s: %s); that bucket runs eagerly",
                            [tuple(t.shape) for t in static_inputs], type(exc).__name__, exc)
                self._failed.add(key)
                return None
        self._entries[key] = entry
        while len(self._entries) > self.max_graphs:
            self._entries.popitem(last=False)
        return entry

    def _capture(self, forward: Callable[[], dict[str, torch.Tensor]], device: torch.device):
        # Warm-up runs on a side stream compile and autotune the kernels, which must not happen inside a capture.
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static_outputs = forward()
        return graph, static_outputs

    def __len__(self) -> int:
        return len(self._entries)
