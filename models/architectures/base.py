"""What every architecture provides, so the repository and cache can treat them alike."""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

import kernels
from models import cuda_graphs
from models.artifact import SCALE_SUFFIX, TensorSpec, check_artifact, expected_shapes
from models.datatypes import random_inputs

TORCH_ACTIVATIONS = {
    "none": lambda t: t,
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


class Architecture(ABC):
    """A model built from `kernels` ops. Subclasses declare the weights they expect so that an artifact
    whose tensors disagree with its config is refused at load time, naming the tensor.

    `assets` are the artifact's extra files the architecture names in `asset_files` (e.g. a tokenizer).
    `quantization="int8"` means the dense weights listed by `quantizable` are int8 with a per-output-channel
    fp32 scale beside each (`<name>_scale`), and run through `kernels.linear_int8`.
    """

    name: ClassVar[str]
    asset_files: ClassVar[tuple[str, ...]] = ()
    numpy_io: ClassVar[bool] = False  # True: forward() takes and returns numpy arrays, untouched by dtype rules
    # The tensor inputs of a forward that a CUDA graph can replay (all of its inputs, batch-first, no host
    # syncs inside); empty: never graphed, unless the architecture overrides `graph_arguments` (text models
    # graph their forward on token ids).
    graph_inputs: ClassVar[tuple[str, ...]] = ()
    graph_max_batch: ClassVar[int] = 1024

    def __init__(self, params: dict[str, Any], weights: dict[str, torch.Tensor],
                 assets: dict[str, bytes] | None = None, quantization: str | None = None) -> None:
        self.params = params
        self.quantization = quantization
        self.assets = dict(assets or {})
        check_artifact(self.name, self.asset_files, self.assets, self.weight_shapes(params), self.quantizable(params),
                       quantization, weights)
        self.weights = weights

    @classmethod
    @abstractmethod
    def weight_shapes(cls, params: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """The exact tensor names and shapes that `params` implies (float weights)."""

    @classmethod
    def quantizable(cls, params: dict[str, Any]) -> list[str]:
        """Names of the `[N, K]` dense weights that `--quantize int8` turns into int8 + scales."""
        return []

    @classmethod
    def expected_shapes(cls, params: dict[str, Any], quantization: str | None = None) -> dict[str, tuple[int, ...]]:
        return expected_shapes(cls.weight_shapes(params), cls.quantizable(params), quantization)

    @classmethod
    def adapt_weights(cls, params: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a checkpoint's tensors onto this architecture's names (e.g. drop constant buffers)."""
        return weights

    @classmethod
    def quantize_weights(cls, params: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Float weights -> weight-only int8 (per output channel) for every quantizable dense layer."""
        out = dict(weights)
        for wname in cls.quantizable(params):
            qweight, scales = kernels.quantize_int8(weights[wname].float())
            out[wname], out[wname + SCALE_SUFFIX] = qweight, scales
        return out

    @abstractmethod
    def forward(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Run one batch: inputs and outputs are keyed by the V2 tensor names of the config."""

    @abstractmethod
    def reference_forward(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The same computation in plain torch.nn.functional: the twin that tests compare against."""

    def run(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """What serving calls: on a GPU, ``forward_graph`` replayed from a CUDA graph per shape bucket for the
        architectures that allow it (see :mod:`models.cuda_graphs`); else ``forward``."""
        if self.device.type == "cuda" and cuda_graphs.enabled():
            arguments = self.graph_arguments(inputs)
            if arguments is not None:
                return self.graphed(*arguments)
        return self.forward(inputs)

    def graph_arguments(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, ...] | None:
        """The batch-first tensors ``forward_graph`` takes, or None when this architecture is not graphed."""
        return tuple(inputs[name] for name in self.graph_inputs) if self.graph_inputs else None

    def forward_graph(self, *tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """``forward`` on ``graph_arguments``: what a CUDA graph records (no host syncs allowed inside)."""
        return self.forward(dict(zip(self.graph_inputs, tensors, strict=True)))

    def graph_buckets(self) -> dict[str, Any]:
        """How ``graph_arguments`` are padded into buckets: ``GraphedForward``'s shape arguments."""
        return {"pad_values": (0,) * len(self.graph_inputs), "max_shape": (self.graph_max_batch,)}

    @cached_property
    def graphed(self) -> cuda_graphs.GraphedForward:
        return cuda_graphs.GraphedForward(self.forward_graph, capture=self.device.type == "cuda", device=self.device,
                                          **self.graph_buckets())

    def example_inputs(self, specs: tuple[TensorSpec, ...], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        """A batch of plausible inputs (warm-up, benchmarks, the int8 report); text models override this."""
        return random_inputs(specs, batch, seed)

    @property
    def device(self) -> torch.device:
        return next(iter(self.weights.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next((t.dtype for t in self.weights.values() if t.is_floating_point()), torch.float32)

    def to(self, device: torch.device, dtype: torch.dtype) -> Architecture:
        """Place the weights; int8 weights stay int8 and their scales fp32 (what kernels.linear_int8 takes).
        Graphs captured before hold the old tensors, so they go."""
        self.__dict__.pop("graphed", None)
        self.weights = {
            k: v.to(device=device, dtype=dtype if v.is_floating_point() and not k.endswith(SCALE_SUFFIX) else v.dtype)
            for k, v in self.weights.items()
        }
        return self

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())

    # Dense layers, float or int8, shared by every architecture: `prefix.weight`, `prefix.bias`.
    def dense(self, x: torch.Tensor, prefix: str, activation: str = "none",
              residual: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = self.weights[f"{prefix}.weight"], self.weights.get(f"{prefix}.bias")
        scales = self.weights.get(f"{prefix}.weight{SCALE_SUFFIX}")
        if scales is None:
            return kernels.linear(x, weight, bias, activation, residual)
        y = kernels.linear_int8(x, weight, scales, bias, activation)
        return y if residual is None else y + residual

    def reference_dense(self, x: torch.Tensor, prefix: str, activation: str = "none") -> torch.Tensor:
        weight, bias = self.weights[f"{prefix}.weight"], self.weights.get(f"{prefix}.bias")
        scales = self.weights.get(f"{prefix}.weight{SCALE_SUFFIX}")
        if scales is not None:
            weight = weight.to(x.dtype) * scales.to(x.dtype)[:, None]
        return TORCH_ACTIVATIONS[activation](F.linear(x, weight, bias))
