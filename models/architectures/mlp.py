"""A stack of Linear layers with activations, optionally ending in a softmax classifier head."""

from __future__ import annotations

from typing import Any

import torch

import kernels
from models.architectures.base import Architecture
from models.params import MLPParams


class MLP(Architecture):
    """params: {"layers": [784, 128, 10], "activations": ["relu", "none"], "head": "softmax"}.

    Input "input" [-1, layers[0]]. Outputs: "output" (head "none"), or "probabilities" and "class"
    (head "softmax"). Its numpy twin, `models.numpy_models.NumpyMLP`, serves it on CPUs.
    """

    name = "mlp"
    graph_inputs = ("input",)
    graph_max_batch = 8192  # a graph of a few small GEMMs stays small even for big batches

    @classmethod
    def weight_shapes(cls, params: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        return MLPParams.parse(params).weight_shapes()

    @classmethod
    def quantizable(cls, params: dict[str, Any]) -> list[str]:
        return MLPParams.parse(params).quantizable()

    def __init__(self, params: dict[str, Any], weights: dict[str, torch.Tensor], assets=None,
                 quantization: str | None = None) -> None:
        super().__init__(params, weights, assets, quantization)
        parsed = MLPParams.parse(params)
        self.layers, self.activations, self.head = list(parsed.layers), list(parsed.activations), parsed.head
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
