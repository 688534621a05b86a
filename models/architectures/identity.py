"""Returns its inputs as its outputs: a zero-cost model for testing transports and measuring overhead.

Every datatype of the protocol passes through unchanged (numpy in, numpy out), so a round trip through
Kafka, SQS, S3 or HTTP shows exactly what each encoding preserves.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from models.architectures.base import Architecture
from models.artifact import ArtifactError


class Identity(Architecture):
    """params: {"outputs": {"<output name>": "<input name>", ...}}."""

    name = "identity"
    numpy_io: ClassVar[bool] = True

    @classmethod
    def weight_shapes(cls, params: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        mapping = params.get("outputs")
        if not isinstance(mapping, dict) or not mapping or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
            raise ArtifactError("identity.params.outputs: expected an object mapping output names to input names")
        return {}

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        return {out: inputs[source] for out, source in self.params["outputs"].items()}

    def reference_forward(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        return self.forward(inputs)
