"""What every architecture provides, so the repository and cache can treat them alike."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from models.artifact import ArtifactError


class Architecture(ABC):
    """A model built from `kernels` ops. Subclasses declare the weights they expect so that an artifact
    whose tensors disagree with its config is refused at load time, naming the tensor."""

    name: ClassVar[str]

    def __init__(self, params: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        self.params = params
        check_weights(self.weight_shapes(params), weights)
        self.weights = weights

    @classmethod
    @abstractmethod
    def weight_shapes(cls, params: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """The exact tensor names and shapes that `params` implies."""

    @abstractmethod
    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run one batch: inputs and outputs are keyed by the V2 tensor names of the config."""

    @abstractmethod
    def reference_forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The same computation in plain torch.nn.functional: the twin that tests compare against."""

    def to(self, device: torch.device, dtype: torch.dtype) -> Architecture:
        self.weights = {
            k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            for k, v in self.weights.items()
        }
        return self

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())


def check_weights(expected: dict[str, tuple[int, ...]], weights: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ArtifactError(f"weights are missing tensor(s) {missing} that the config implies")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise ArtifactError(f"weights hold tensor(s) {unexpected} that the config does not use")
    for name, shape in expected.items():
        got = tuple(weights[name].shape)
        if got != tuple(shape):
            raise ArtifactError(f"tensor {name!r} has shape {list(got)}, the config implies {list(shape)}")


def require(params: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = params.get(key)
    if not isinstance(value, kind):
        raise ArtifactError(f"{where}.params.{key}: expected {kind.__name__}, got {value!r}")
    return value
