"""Numpy twins of the architectures simple enough to need no torch, for CPU-only processes.

Importing torch takes 2-3 s on a small machine, more than a serverless cold start can afford for a model
that is a few matrix products. On a CPU, `Repository.load` serves the architectures listed here from numpy
arrays (float32, read with `safetensors.numpy`), so a process that only serves them never imports torch.
`MAAS_CPU_RUNTIME=torch` serves them with the torch architectures instead; GPUs always use those.

A twin takes the same config and weights as its torch architecture, refuses the same bad artifacts with the
same messages, and is checked against the torch reference in tests.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from models.artifact import (
    SCALE_SUFFIX,
    ArtifactError,
    ModelConfig,
    TensorSpec,
    check_weights,
    expected_shapes,
    require,
)
from models.datatypes import random_inputs

CPU_RUNTIME_ENV = "MAAS_CPU_RUNTIME"
CPU_RUNTIMES = ("numpy", "torch")
#: safetensors dtypes numpy can read (bf16 has no numpy dtype: such weights go to torch).
NUMPY_WEIGHT_DTYPES = frozenset({"F16", "F32", "F64", "I8"})

MLP_ACTIVATIONS = ("none", "relu", "gelu", "tanh", "sigmoid")
MLP_HEADS = ("none", "softmax")


def cpu_runtime() -> str:
    """`MAAS_CPU_RUNTIME`: "numpy" (default: the architectures of this module run on numpy on a CPU) or
    "torch" (every architecture runs on torch)."""
    value = os.environ.get(CPU_RUNTIME_ENV, "numpy").strip().lower() or "numpy"
    if value not in CPU_RUNTIMES:
        raise ValueError(f"{CPU_RUNTIME_ENV}={value!r}: expected one of {CPU_RUNTIMES}")
    return value


@dataclass(frozen=True)
class MLPParams:
    """The `mlp` params: {"layers": [784, 128, 10], "activations": ["relu", "none"], "head": "softmax"}."""

    layers: tuple[int, ...]
    activations: tuple[str, ...]
    head: str

    @classmethod
    def parse(cls, params: dict[str, Any]) -> MLPParams:
        layers = require(params, "layers", list, "mlp")
        if len(layers) < 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in layers):
            raise ArtifactError(f"mlp.params.layers: expected >= 2 positive integers, got {layers!r}")
        activations = params.get("activations", ["relu"] * (len(layers) - 2) + ["none"])
        if not isinstance(activations, list) or len(activations) != len(layers) - 1:
            raise ArtifactError(f"mlp.params.activations: expected {len(layers) - 1} names, got {activations!r}")
        for act in activations:
            if act not in MLP_ACTIVATIONS:
                raise ArtifactError(f"mlp.params.activations: {act!r} is not one of {MLP_ACTIVATIONS}")
        head = params.get("head", "none")
        if head not in MLP_HEADS:
            raise ArtifactError(f"mlp.params.head: {head!r} is not one of {MLP_HEADS}")
        return cls(tuple(layers), tuple(activations), head)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (d_in, d_out) in enumerate(itertools.pairwise(self.layers)):
            shapes[f"layers.{i}.weight"] = (d_out, d_in)
            shapes[f"layers.{i}.bias"] = (d_out,)
        return shapes

    def quantizable(self) -> list[str]:
        return [f"layers.{i}.weight" for i in range(len(self.layers) - 1)]


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to within 1.5e-7 (5e-7 in float32; Abramowitz and Stegun 7.1.26): numpy has none, and torch's gelu
    is the exact, erf-based one."""
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.copysign(1.0 - poly * np.exp(-x * x), x)


NUMPY_ACTIVATIONS = {
    "none": lambda h: h,
    "relu": lambda h: np.maximum(h, 0, out=h),
    "gelu": lambda h: 0.5 * h * (1.0 + _erf(h * np.float32(0.7071067811865476))),
    "tanh": lambda h: np.tanh(h, out=h),
    "sigmoid": lambda h: 0.5 * (1.0 + np.tanh(0.5 * h)),  # = 1 / (1 + exp(-h)), without its overflow
}


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise, numerically stable."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class NumpyMLP:
    """`models.architectures.mlp.MLP` in numpy float32. int8 weights are dequantized once, at load: on a CPU
    the float product is what runs either way, and the memory budget counts the float copy."""

    name: ClassVar[str] = "mlp"
    numpy_io: ClassVar[bool] = True  # LoadedModel passes numpy arrays in and out untouched
    device: ClassVar[str] = "cpu"

    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray]) -> None:
        self.params = MLPParams.parse(config.params)
        quantizable = self.params.quantizable()
        int8 = quantizable if config.quantization == "int8" else []
        check_weights(expected_shapes(self.params.weight_shapes(), quantizable, config.quantization), weights, int8)
        self.layers: list[tuple[np.ndarray, np.ndarray, str]] = []
        for i, activation in enumerate(self.params.activations):
            weight = weights[f"layers.{i}.weight"].astype(np.float32)
            if f"layers.{i}.weight{SCALE_SUFFIX}" in weights:
                weight *= weights[f"layers.{i}.weight{SCALE_SUFFIX}"].astype(np.float32)[:, None]
            # Stored transposed so that `h @ w` reads it row by row, as BLAS prefers.
            self.layers.append((np.ascontiguousarray(weight.T), weights[f"layers.{i}.bias"].astype(np.float32),
                                activation))

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes + b.nbytes for w, b, _ in self.layers)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        h = np.asarray(inputs["input"], dtype=np.float32)
        for weight, bias, activation in self.layers:
            h = h @ weight
            h += bias
            h = NUMPY_ACTIVATIONS[activation](h)
        if self.params.head == "none":
            return {"output": h}
        probabilities = softmax(h)
        return {"probabilities": probabilities, "class": probabilities.argmax(axis=-1)}

    def example_inputs(self, specs: tuple[TensorSpec, ...], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        return random_inputs(specs, batch, seed)


NUMPY_ARCHITECTURES: dict[str, type[NumpyMLP]] = {NumpyMLP.name: NumpyMLP}


def numpy_twin(config: ModelConfig, weight_dtypes: set[str]) -> type[NumpyMLP] | None:
    """The numpy class that serves this model on a CPU, or None when it needs torch (another architecture,
    a half-precision compute dtype, bf16 weights, or `MAAS_CPU_RUNTIME=torch`)."""
    if config.dtype != "FP32" or not weight_dtypes <= NUMPY_WEIGHT_DTYPES or cpu_runtime() != "numpy":
        return None
    return NUMPY_ARCHITECTURES.get(config.architecture)
