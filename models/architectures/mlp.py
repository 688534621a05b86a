"""A stack of Linear layers with activations, optionally ending in a softmax classifier head."""

from __future__ import annotations

import itertools
from typing import Any

import torch

import kernels
from models.architectures.base import Architecture, require
from models.artifact import ArtifactError

ACTIVATIONS = ("none", "relu", "gelu", "tanh", "sigmoid")
HEADS = ("none", "softmax")


class MLP(Architecture):
    """params: {"layers": [784, 128, 10], "activations": ["relu", "none"], "head": "softmax"}.

    Input "input" [-1, layers[0]]. Outputs: "output" (head "none"), or "probabilities" and "class"
    (head "softmax").
    """

    name = "mlp"
    graph_inputs = ("input",)
    graph_max_batch = 8192  # a graph of a few small GEMMs stays small even for big batches

    @classmethod
    def _parse(cls, params: dict[str, Any]) -> tuple[list[int], list[str], str]:
        layers = require(params, "layers", list, "mlp")
        if len(layers) < 2 or not all(isinstance(d, int) and d > 0 for d in layers):
            raise ArtifactError(f"mlp.params.layers: expected >= 2 positive integers, got {layers!r}")
        activations = params.get("activations", ["relu"] * (len(layers) - 2) + ["none"])
        if not isinstance(activations, list) or len(activations) != len(layers) - 1:
            raise ArtifactError(f"mlp.params.activations: expected {len(layers) - 1} names, got {activations!r}")
        for act in activations:
            if act not in ACTIVATIONS:
                raise ArtifactError(f"mlp.params.activations: {act!r} is not one of {ACTIVATIONS}")
        head = params.get("head", "none")
        if head not in HEADS:
            raise ArtifactError(f"mlp.params.head: {head!r} is not one of {HEADS}")
        return layers, activations, head

    @classmethod
    def weight_shapes(cls, params: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        layers, _, _ = cls._parse(params)
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (d_in, d_out) in enumerate(itertools.pairwise(layers)):
            shapes[f"layers.{i}.weight"] = (d_out, d_in)
            shapes[f"layers.{i}.bias"] = (d_out,)
        return shapes

    @classmethod
    def quantizable(cls, params: dict[str, Any]) -> list[str]:
        layers, _, _ = cls._parse(params)
        return [f"layers.{i}.weight" for i in range(len(layers) - 1)]

    def __init__(self, params: dict[str, Any], weights: dict[str, torch.Tensor], assets=None,
                 quantization: str | None = None) -> None:
        super().__init__(params, weights, assets, quantization)
        self.layers, self.activations, self.head = self._parse(params)

    def _outputs(self, logits: torch.Tensor, softmax) -> dict[str, torch.Tensor]:
        if self.head == "none":
            return {"output": logits}
        probabilities = softmax(logits)
        return {"probabilities": probabilities, "class": probabilities.argmax(dim=-1)}

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = inputs["input"]
        for i, act in enumerate(self.activations):
            h = self.dense(h, f"layers.{i}", act)
        return self._outputs(h, kernels.softmax)

    def reference_forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = inputs["input"]
        for i, act in enumerate(self.activations):
            h = self.reference_dense(h, f"layers.{i}", act)
        return self._outputs(h, lambda t: torch.softmax(t, dim=-1))
