"""A model version in memory, ready to run batches given as numpy arrays."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from models.architectures import Architecture
from models.artifact import ModelConfig
from models.datatypes import NUMPY_DTYPES, TORCH_DTYPES


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class LoadedModel:
    name: str
    version: int
    config: ModelConfig
    architecture: Architecture
    device: torch.device
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = self.architecture.nbytes

    def _to_torch(self, inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        compute_dtype = TORCH_DTYPES[self.config.dtype]
        tensors = {}
        for spec in self.config.inputs:
            array = inputs[spec.name]
            if array.dtype == object:  # BYTES inputs (text) are the architecture's to tokenize
                tensors[spec.name] = array
                continue
            t = torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)
            tensors[spec.name] = t.to(compute_dtype) if t.is_floating_point() else t
        return tensors

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Inputs are keyed by the config's input names, batch first; outputs likewise."""
        with torch.inference_mode():
            outputs = self.architecture.forward(self._to_torch(inputs))
        result = {}
        for spec in self.config.outputs:
            t = outputs[spec.name].detach()
            if t.is_floating_point():
                t = t.float()
            result[spec.name] = t.cpu().numpy().astype(NUMPY_DTYPES[spec.datatype], copy=False)
        return result

    def warmup(self) -> None:
        """Run one small batch so kernels compile and caches fill before the first real request."""
        start = time.perf_counter()
        batch = {}
        for spec in self.config.inputs:
            shape = [1 if d == -1 else d for d in spec.shape]
            if spec.datatype == "BYTES":
                batch[spec.name] = np.full(shape, b"warm up", dtype=object)
            else:
                batch[spec.name] = np.zeros(shape, dtype=NUMPY_DTYPES[spec.datatype])
        self.infer(batch)
        self.warmup_seconds = time.perf_counter() - start
