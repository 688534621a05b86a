"""Image classifier: conv (3x3, ReLU) / max-pool stacks, then dense layers and a softmax head.

CIFAR-10 style: input_shape [32, 32, 3], conv [{filters 32, pool 2}, {64, pool 2}, {64}], dense [64], 10
classes. MNIST style: input_shape [28, 28, 1]. Convolutions are stride 1 without padding (Keras' default
"valid"), the flattening is channel-major (torch's order), so torch `nn.Conv2d`/`nn.Linear` state dicts fit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import kernels
from models.architectures.base import Architecture
from models.artifact import MAX_LAYERS, MAX_WIDTH, ArtifactError, size_in
from models.params import dense_head_shapes, parse_hidden

LAYOUTS = ("NHWC", "NCHW")


class CNN(Architecture):
    """params: {"input_shape": [H, W, C], "layout": "NHWC", "conv": [{"filters": 32, "kernel": 3, "pool": 2},
    ...], "dense": [64], "num_classes": 10}.

    Input "input" FP32 [-1, H, W, C] (layout NHWC, the default) or [-1, C, H, W] (NCHW). Outputs
    "probabilities" FP32 [-1, num_classes] and "class" INT64 [-1].
    """

    name = "cnn"
    graph_inputs = ("input",)

    @classmethod
    def _parse(cls, params: dict[str, Any]) -> tuple[tuple[int, int, int], list[tuple[int, int, int]], list[int],
                                                      int, str]:
        where = cls.name
        shape = params.get("input_shape")
        if not isinstance(shape, list) or len(shape) != 3:
            raise ArtifactError(f"{where}.params.input_shape: expected [H, W, C] positive integers, got {shape!r}")
        for i, side in enumerate(shape):
            size_in(side, f"{where}.params.input_shape[{i}]", MAX_WIDTH)
        layout = params.get("layout", "NHWC")
        if layout not in LAYOUTS:
            raise ArtifactError(f"{where}.params.layout: {layout!r} is not one of {LAYOUTS}")
        raw_convs = params.get("conv")
        if not isinstance(raw_convs, list) or not 1 <= len(raw_convs) <= MAX_LAYERS:
            raise ArtifactError(f"{where}.params.conv: expected a list of 1 to {MAX_LAYERS:,} "
                                "{filters, kernel, pool}")
        convs = []
        h, w, _ = shape
        for i, conv in enumerate(raw_convs):
            if not isinstance(conv, dict):
                raise ArtifactError(f"{where}.params.conv[{i}]: expected an object {{filters, kernel, pool}}")
            filters, kernel, pool = conv.get("filters"), conv.get("kernel", 3), conv.get("pool", 0)
            for key, value in (("filters", filters), ("kernel", kernel)):
                size_in(value, f"{where}.params.conv[{i}].{key}", MAX_WIDTH)
            if not isinstance(pool, int) or pool < 0:
                raise ArtifactError(f"{where}.params.conv[{i}].pool: expected an integer >= 0, got {pool!r}")
            h, w = h - kernel + 1, w - kernel + 1
            if pool > 1:
                h, w = h // pool, w // pool
            if h < 1 or w < 1:
                raise ArtifactError(f"{where}.params.conv[{i}]: the image shrinks to {h}x{w}; use fewer or smaller "
                                    "layers")
            convs.append((filters, kernel, pool))
        dense = parse_hidden(params, where, "dense")
        classes = params.get("num_classes", 10)
        if not isinstance(classes, int) or not 2 <= classes <= MAX_WIDTH:
            raise ArtifactError(f"{where}.params.num_classes: expected an integer in 2..{MAX_WIDTH:,}, got {classes!r}")
        return (shape[0], shape[1], shape[2]), convs, dense, classes, layout

    @classmethod
    def weight_shapes(cls, params: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        (h, w, c), convs, dense, classes, _ = cls._parse(params)
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (filters, kernel, pool) in enumerate(convs):
            shapes[f"conv.{i}.weight"], shapes[f"conv.{i}.bias"] = (filters, c, kernel, kernel), (filters,)
            h, w, c = h - kernel + 1, w - kernel + 1, filters
            if pool > 1:
                h, w = h // pool, w // pool
        return {**shapes, **dense_head_shapes(h * w * c, dense, classes)}

    @classmethod
    def quantizable(cls, params: dict[str, Any]) -> list[str]:
        return [n for n in cls.weight_shapes(params) if n.endswith(".weight") and not n.startswith("conv.")]

    def __init__(self, params: dict[str, Any], weights: dict[str, torch.Tensor], assets=None,
                 quantization: str | None = None) -> None:
        super().__init__(params, weights, assets, quantization)
        _, self.convs, self.dense_sizes, self.classes, self.layout = self._parse(params)

    def _nchw(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).contiguous() if self.layout == "NHWC" else x

    @staticmethod
    def _outputs(probabilities: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"probabilities": probabilities, "class": probabilities.argmax(dim=-1)}

    def forward(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = self._nchw(inputs["input"])
        for i, (_, _, pool) in enumerate(self.convs):
            x = kernels.conv2d(x, self.weights[f"conv.{i}.weight"], self.weights[f"conv.{i}.bias"], relu=True)
            if pool > 1:
                x = kernels.max_pool2d(x, pool)
        h = x.flatten(1)
        for i in range(len(self.dense_sizes)):
            h = self.dense(h, f"dense.{i}", "relu")
        return self._outputs(kernels.softmax(self.dense(h, "output")))

    def reference_forward(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = self._nchw(inputs["input"])
        for i, (_, _, pool) in enumerate(self.convs):
            x = F.relu(F.conv2d(x, self.weights[f"conv.{i}.weight"], self.weights[f"conv.{i}.bias"]))
            if pool > 1:
                x = F.max_pool2d(x, pool)
        h = x.flatten(1)
        for i in range(len(self.dense_sizes)):
            h = self.reference_dense(h, f"dense.{i}", "relu")
        return self._outputs(torch.softmax(self.reference_dense(h, "output"), dim=-1))
