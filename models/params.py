"""What a config's `params` imply, checked without torch: shared by the torch architectures and their numpy
twins (:mod:`models.numpy_models`), so both refuse a bad artifact with the same message."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from models.artifact import (
    MAX_LAYERS,
    MAX_SEQUENCE,
    MAX_VOCAB,
    MAX_WIDTH,
    ArtifactError,
    positive_int,
    require,
    short_repr,
    size_in,
)

MLP_ACTIVATIONS = ("none", "relu", "gelu", "tanh", "sigmoid")
MLP_HEADS = ("none", "softmax")
TEXT_HEADS = ("sigmoid", "softmax")


@dataclass(frozen=True)
class MLPParams:
    """The `mlp` params: {"layers": [784, 128, 10], "activations": ["relu", "none"], "head": "softmax"}."""

    layers: tuple[int, ...]
    activations: tuple[str, ...]
    head: str

    @classmethod
    def parse(cls, params: dict[str, Any]) -> MLPParams:
        layers = require(params, "layers", list, "mlp")
        if not 2 <= len(layers) <= MAX_LAYERS + 1:
            raise ArtifactError(f"mlp.params.layers: expected 2 to {MAX_LAYERS + 1:,} sizes, got {len(layers)}")
        for i, size in enumerate(layers):
            size_in(size, f"mlp.params.layers[{i}]", MAX_WIDTH)
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


@dataclass(frozen=True)
class TextClassifierParams:
    """The `text_classifier` params: {"vocab_size": 1000, "embedding_dim": 16, "sequence_length": 10,
    "hidden": [16], "num_classes": 1, "head": "sigmoid"}."""

    vocab_size: int
    embedding_dim: int
    sequence_length: int
    hidden: tuple[int, ...]
    num_classes: int
    head: str

    @classmethod
    def parse(cls, params: dict[str, Any]) -> TextClassifierParams:
        where = "text_classifier"
        vocab = positive_int(params, "vocab_size", where, maximum=MAX_VOCAB)
        dim = positive_int(params, "embedding_dim", where)
        length = positive_int(params, "sequence_length", where, maximum=MAX_SEQUENCE)
        hidden = parse_hidden(params, where)
        classes = positive_int(params, "num_classes", where, default=1)
        head = params.get("head", "sigmoid")
        if head not in TEXT_HEADS:
            raise ArtifactError(f"{where}.params.head: {head!r} is not one of {TEXT_HEADS}")
        return cls(vocab, dim, length, tuple(hidden), classes, head)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"embedding.weight": (self.vocab_size, self.embedding_dim),
                **dense_head_shapes(self.embedding_dim, list(self.hidden), self.num_classes)}

    def quantizable(self) -> list[str]:
        return [n for n in self.weight_shapes() if n.endswith(".weight") and n != "embedding.weight"]


def parse_hidden(params: dict[str, Any], where: str, key: str = "hidden") -> list[int]:
    """A list of dense layer sizes: at most MAX_LAYERS of them, each at most MAX_WIDTH."""
    hidden = params.get(key, [])
    if not isinstance(hidden, list) or len(hidden) > MAX_LAYERS:
        raise ArtifactError(f"{where}.params.{key}: expected a list of up to {MAX_LAYERS:,} sizes, "
                            f"got {short_repr(hidden)}")
    for i, size in enumerate(hidden):
        size_in(size, f"{where}.params.{key}[{i}]", MAX_WIDTH)
    return hidden


def dense_head_shapes(d_in: int, hidden: list[int], classes: int) -> dict[str, tuple[int, ...]]:
    """Weights of the dense layers `dense.{i}` (sizes `hidden`) and the `output` layer that classifiers end with."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, d_out in enumerate(hidden):
        shapes[f"dense.{i}.weight"], shapes[f"dense.{i}.bias"] = (d_out, d_in), (d_out,)
        d_in = d_out
    shapes["output.weight"], shapes["output.bias"] = (classes, d_in), (classes,)
    return shapes
