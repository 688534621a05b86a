"""Numpy twins of the architectures simple enough to need no torch, for CPU-only processes.

Importing torch takes 2-3 s on a small machine, more than a serverless cold start can afford for a model
that is a few matrix products. On a CPU, `Repository.load` serves the architectures listed here from numpy
arrays (float32, read with `safetensors.numpy`), so a process that only serves them never imports torch.
`MAAS_CPU_RUNTIME=torch` serves them with the torch architectures instead; GPUs always use those.

A twin takes the same config and weights as its torch architecture, refuses the same bad artifacts with the
same messages, and is checked against the torch reference in tests.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np

from models.artifact import (
    SCALE_SUFFIX,
    TOKENIZER_FILE,
    ModelConfig,
    TensorSpec,
    check_artifact,
)
from models.datatypes import random_inputs
from models.params import MLPParams, TextClassifierParams
from models.text import WordIndexTokenizer, check_vocabulary, sample_sentences, texts_of

CPU_RUNTIME_ENV = "MAAS_CPU_RUNTIME"
CPU_RUNTIMES = ("numpy", "torch")
#: safetensors dtypes numpy can read (bf16 has no numpy dtype: such weights go to torch).
NUMPY_WEIGHT_DTYPES = frozenset({"F16", "F32", "F64", "I8"})


def cpu_runtime() -> str:
    """`MAAS_CPU_RUNTIME`: "numpy" (default: the architectures of this module run on numpy on a CPU) or
    "torch" (every architecture runs on torch)."""
    value = os.environ.get(CPU_RUNTIME_ENV, "numpy").strip().lower() or "numpy"
    if value not in CPU_RUNTIMES:
        raise ValueError(f"{CPU_RUNTIME_ENV}={value!r}: expected one of {CPU_RUNTIMES}")
    return value


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


class NumpyArchitecture:
    """What `LoadedModel` needs of a model (`run`, `example_inputs`, `nbytes`), numpy arrays in and out.

    Dense layers `prefix.weight` / `prefix.bias` are kept as float32 `(W^T, b)`; int8 weights are dequantized
    once, at load: on a CPU the float product is what runs either way, and the memory budget counts the
    float copy.
    """

    name: ClassVar[str]
    asset_files: ClassVar[tuple[str, ...]] = ()
    numpy_io: ClassVar[bool] = True  # LoadedModel passes numpy arrays in and out untouched
    device: ClassVar[str] = "cpu"
    layers: list[tuple[np.ndarray, np.ndarray, str]]  # (W^T, b, activation) of each dense layer, in order
    tables: tuple[np.ndarray, ...] = ()  # other weights it keeps (embeddings)

    @staticmethod
    def dense_layer(weights: dict[str, np.ndarray], prefix: str, activation: str) -> tuple[np.ndarray, np.ndarray, str]:
        weight = weights[f"{prefix}.weight"].astype(np.float32)
        scales = weights.get(f"{prefix}.weight{SCALE_SUFFIX}")
        if scales is not None:
            weight *= scales.astype(np.float32)[:, None]
        # Stored transposed so that `h @ w` reads it row by row, as BLAS prefers.
        return np.ascontiguousarray(weight.T), weights[f"{prefix}.bias"].astype(np.float32), activation

    def dense_stack(self, h: np.ndarray) -> np.ndarray:
        for weight, bias, activation in self.layers:
            h = h @ weight
            h += bias
            h = NUMPY_ACTIVATIONS[activation](h)
        return h

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes + b.nbytes for w, b, _ in self.layers) + sum(t.nbytes for t in self.tables)

    def example_inputs(self, specs: tuple[TensorSpec, ...], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        return random_inputs(specs, batch, seed)


class NumpyMLP(NumpyArchitecture):
    """`models.architectures.mlp.MLP` in numpy float32."""

    name = "mlp"

    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray], assets: dict[str, bytes] | None = None
                 ) -> None:
        self.params = MLPParams.parse(config.params)
        check_artifact(self.name, self.asset_files, assets or {}, self.params.weight_shapes(),
                       self.params.quantizable(), config.quantization, weights)
        self.layers = [self.dense_layer(weights, f"layers.{i}", activation)
                       for i, activation in enumerate(self.params.activations)]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        h = self.dense_stack(np.asarray(inputs["input"], dtype=np.float32))
        if self.params.head == "none":
            return {"output": h}
        probabilities = softmax(h)
        return {"probabilities": probabilities, "class": probabilities.argmax(axis=-1)}


class NumpyTextClassifier(NumpyArchitecture):
    """`models.architectures.text_classifier.TextClassifier` in numpy float32: word index, masked mean of the
    embeddings, dense layers, sigmoid or softmax."""

    name = "text_classifier"
    asset_files = (TOKENIZER_FILE,)

    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray], assets: dict[str, bytes] | None = None
                 ) -> None:
        self.params = p = TextClassifierParams.parse(config.params)
        assets = assets or {}
        check_artifact(self.name, self.asset_files, assets, p.weight_shapes(), p.quantizable(), config.quantization,
                       weights)
        self.tokenizer = WordIndexTokenizer.from_json(assets[TOKENIZER_FILE])
        check_vocabulary(self.tokenizer, p.vocab_size, self.name)
        self.embedding = weights["embedding.weight"].astype(np.float32)
        self.tables = (self.embedding,)
        self.layers = [self.dense_layer(weights, f"dense.{i}", "relu") for i in range(len(p.hidden))]
        self.layers.append(self.dense_layer(weights, "output", "sigmoid" if p.head == "sigmoid" else "none"))

    def run(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        ids, mask = self.tokenizer.encode(texts_of(inputs["text"]), self.params.sequence_length)
        counts = np.maximum(mask.sum(axis=1, keepdims=True), 1).astype(np.float32)
        h = self.dense_stack(np.einsum("bsd,bs->bd", self.embedding[ids], mask.astype(np.float32)) / counts)
        scores = h if self.params.head == "sigmoid" else softmax(h)
        if self.params.head == "sigmoid" and self.params.num_classes == 1:
            label = (scores[:, 0] > 0.5).astype(np.int64)
        else:
            label = scores.argmax(axis=-1)
        return {"scores": scores, "label": label}

    def example_inputs(self, specs: tuple[TensorSpec, ...], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        return sample_sentences(self.tokenizer.words, specs, batch, seed, length=self.params.sequence_length)


NUMPY_ARCHITECTURES: dict[str, type[NumpyArchitecture]] = {cls.name: cls for cls in (NumpyMLP, NumpyTextClassifier)}


def numpy_twin(config: ModelConfig, weight_dtypes: set[str]) -> type[NumpyArchitecture] | None:
    """The numpy class that serves this model on a CPU, or None when it needs torch (another architecture,
    a half-precision compute dtype, bf16 weights, or `MAAS_CPU_RUNTIME=torch`)."""
    if config.dtype != "FP32" or not weight_dtypes <= NUMPY_WEIGHT_DTYPES or cpu_runtime() != "numpy":
        return None
    return NUMPY_ARCHITECTURES.get(config.architecture)
