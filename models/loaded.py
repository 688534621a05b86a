"""A model version in memory, ready to run batches given as numpy arrays.

torch is imported by the torch architectures only: a CPU process serving numpy twins
(:mod:`models.numpy_models`) never pays for it.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from models.artifact import ArtifactError, ModelConfig
from models.datatypes import FLOAT_DATATYPES, NUMPY_DTYPES, torch_dtype

if TYPE_CHECKING:
    from kernels import CompilePass
    from models.architectures import Architecture
    from models.numpy_models import NumpyArchitecture

log = logging.getLogger(__name__)

# CUDA on Linux opens /dev/nvidiactl (and a container given a GPU has it); WSL2's GPU is /dev/dxg.
NVIDIA_DEVICE_FILES = ("/dev/nvidiactl", "/dev/dxg", "/proc/driver/nvidia/version")


def default_device() -> str:
    """The device to serve on: "cuda" when torch sees a GPU, else "cpu". Without an NVIDIA driver there can be
    no GPU, and torch is not imported just to learn that."""
    if not any(os.path.exists(path) for path in NVIDIA_DEVICE_FILES):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_type(device: Any) -> str:
    """The kind of a device given as text or torch.device: "cuda" for "cuda:1", "cpu" for "cpu"."""
    return str(device).partition(":")[0]


@dataclass
class LoadedModel:
    name: str
    version: int
    config: ModelConfig
    architecture: Architecture | NumpyArchitecture
    device: str  # "cpu", "cuda", "cuda:1": what torch.device() takes
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0
    warm: bool = field(default=False, init=False)  # warmed up: from now on its batches tune nothing new
    borrowed_tunings: int = field(default=0, init=False)  # tunings its batches borrowed since (metrics)
    compile_ahead: CompilePass | None = field(default=None, init=False)  # its warm-up's compile-only pass (GPU)
    # (rows, seconds) of each warm-up batch, in order: on a GPU the first of a bucket tunes, times kernel choices
    # and captures its graph, which is where a warm-up's time goes besides compiling.
    warmup_batches: list[tuple[int, float]] = field(default_factory=list, init=False)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = self.architecture.nbytes

    def _to_torch(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        compute_dtype = torch_dtype(self.config.dtype)
        tensors = {}
        for spec in self.config.inputs:
            array = inputs[spec.name]
            if array.dtype == object:  # BYTES inputs (text) are the architecture's to tokenize
                tensors[spec.name] = array
                continue
            # Calls that would change nothing are skipped: each torch call on the model thread hands the GIL
            # back to the event loop and waits to win it again.
            t = torch.from_numpy(np.require(array, requirements=["C", "W"]))
            if device_type(self.device) != "cpu":
                t = t.to(self.device, non_blocking=True)
            if t.is_floating_point() and t.dtype != compute_dtype:
                t = t.to(compute_dtype)
            tensors[spec.name] = t
        return tensors

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Inputs are keyed by the config's input names, batch first; outputs likewise."""
        if self.architecture.numpy_io:
            # An overflow is the engine's to report, per request (it refuses NaN and infinite outputs), not a
            # RuntimeWarning in the worker's log.
            with np.errstate(over="ignore", invalid="ignore"):
                outputs = self.architecture.run(dict(inputs))
        else:
            import torch

            from kernels import tuned_shapes_only

            with torch.inference_mode(), tuned_shapes_only() if self.warm else nullcontext() as borrowed:
                outputs = self.architecture.run(self._to_torch(inputs))
            if borrowed is not None:
                self.borrowed_tunings += borrowed.count
        result = {}
        for spec in self.config.outputs:
            value = outputs[spec.name]
            floating = value.dtype.kind == "f" if isinstance(value, np.ndarray) else value.is_floating_point()
            if floating and spec.datatype not in FLOAT_DATATYPES:
                raise ArtifactError(f"outputs: {spec.name!r} comes out as floating-point numbers, config.json "
                                    f"declares {spec.datatype}, which would truncate them")
            if isinstance(value, np.ndarray):
                result[spec.name] = value.astype(NUMPY_DTYPES[spec.datatype], copy=False)
                continue
            t = value.detach() if value.requires_grad else value
            if t.is_floating_point() and t.element_size() != 4:  # bf16 and fp16 travel as float32
                t = t.float()
            if t.device.type != "cpu":
                t = t.cpu()
            result[spec.name] = t.numpy().astype(NUMPY_DTYPES[spec.datatype], copy=False)
        return result

    def warmup(self) -> None:
        """Run the batches the model will see before it takes traffic (see :func:`warmup_batch_sizes`): at each
        size, inputs the architecture makes up and, when the config has them, its own ``warmup_inputs`` rows
        repeated to that size. Those are how a config warms shapes the made-up inputs miss: a transformer's
        made-up texts are short, and long ones need GEMM and attention shapes (tuned, compiled, captured) of
        their own. Once warm, the model's batches tune nothing (``kernels.tuned_shapes_only``): a shape the
        warm-up missed runs the configs tuned for the nearest one, where tuning would keep a request waiting
        for seconds."""
        start = time.perf_counter()
        own = v2_inputs(self.config.warmup_inputs) if self.config.warmup_inputs else None
        batches = []
        for batch in warmup_batch_sizes(self.config.batching.max_batch_size, self.device):
            batches.append(self.architecture.example_inputs(self.config.inputs, batch, seed=batch))
            if own is not None:
                batches.append(repeat_rows(own, batch))
        if device_type(self.device) == "cuda" and not self.architecture.numpy_io:
            self._compile_ahead(batches)
        self.warmup_batches = []
        for inputs in batches:
            began = time.perf_counter()
            self.infer(inputs)
            self.warmup_batches.append((len(next(iter(inputs.values()))), time.perf_counter() - began))
        self.warmup_seconds = time.perf_counter() - start
        self.warm = True

    def _compile_ahead(self, batches: list[dict[str, np.ndarray]]) -> None:
        """The warm-up's batches once through ``kernels.compile_only``: every binary they need (each tuning
        round's configs, each fixed kernel) compiles on one pool of workers, instead of round after round as the
        warm-up reaches them, each round waiting for its slowest compile. An optimisation only: should it
        fail, the warm-up compiles as it goes."""
        import torch

        from kernels import compile_only

        try:
            with compile_only() as compiled, torch.inference_mode():
                for inputs in batches if compiled.parallel else ():
                    self.architecture.run(self._to_torch(inputs))  # its outputs are garbage: not converted
            self.compile_ahead = compiled
            if compiled.parallel:
                log.info("%s: %d kernel binaries ahead of its warm-up in %.2f s on %s: %d compiled (%d in worker "
                         "processes), the others loaded from the Triton cache", self.name, compiled.binaries,
                         compiled.seconds, compiled.workers, compiled.compiled, compiled.in_processes)
        except Exception as exc:
            log.warning("%s: compiling the warm-up's kernels ahead failed (%s: %s); they compile as it runs",
                        self.name, type(exc).__name__, exc)


def warmup_batch_sizes(max_batch_size: int, device: Any) -> list[int]:
    """One batch on a CPU, where nothing compiles. On a GPU every power-of-two batch up to the batching
    limit: each is a bucket of its own (tile configs autotuned per power of two of rows, a CUDA graph per
    bucket), and the first request of an untuned bucket would otherwise wait seconds for it.

    Largest first: the largest bucket's tuning rounds hold every tile config a smaller one may use, so they
    all compile at once, in parallel (``kernels._autotune``), and smaller buckets find them compiled; and the
    graphs, which share one memory pool, are captured largest first, so the smaller ones reuse its blocks."""
    if device_type(device) == "cpu":
        return [1]
    sizes = [1 << i for i in range(max(max_batch_size, 1).bit_length())]
    return (sizes if sizes[-1] == max_batch_size else [*sizes, max_batch_size])[::-1]


def repeat_rows(arrays: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """``arrays`` with ``batch`` rows: their rows taken in turn, as many times as it takes (or the first ones)."""
    return {name: np.take(a, np.arange(batch) % len(a), axis=0) if len(a) else a for name, a in arrays.items()}


def v2_inputs(tensors: tuple[dict, ...] | list[dict]) -> dict[str, np.ndarray]:
    """V2 JSON input tensors ({"name", "shape", "datatype", "data"}) as numpy arrays (BYTES: object arrays)."""
    arrays = {}
    for t in tensors:
        if t["datatype"] == "BYTES":
            flat = [v.encode() if isinstance(v, str) else bytes(v) for v in np.ravel(np.array(t["data"], dtype=object))]
            arrays[t["name"]] = np.array(flat, dtype=object).reshape(t["shape"])
        else:
            arrays[t["name"]] = np.array(t["data"], dtype=NUMPY_DTYPES[t["datatype"]]).reshape(t["shape"])
    return arrays
