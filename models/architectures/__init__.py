"""The architectures a config.json may name, by their `architecture` string."""

from __future__ import annotations

import torch

from models.architectures.base import Architecture
from models.architectures.bilstm import BiLSTMClassifier
from models.architectures.cnn import CNN
from models.architectures.identity import Identity
from models.architectures.mlp import MLP
from models.architectures.text_classifier import TextClassifier
from models.architectures.transformer import TransformerEncoder
from models.artifact import ArtifactError, ModelConfig

ARCHITECTURES: dict[str, type[Architecture]] = {
    cls.name: cls for cls in (MLP, TextClassifier, CNN, BiLSTMClassifier, TransformerEncoder, Identity)
}


def architecture_class(name: str) -> type[Architecture]:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ArtifactError(f"config.json.architecture: unknown architecture {name!r}; known: "
                            f"{sorted(ARCHITECTURES)}") from None


def build(config: ModelConfig, weights: dict[str, torch.Tensor], assets: dict[str, bytes] | None = None
          ) -> Architecture:
    """The architecture a config names, checked against its weights and assets."""
    cls = architecture_class(config.architecture)
    return cls(config.params, cls.adapt_weights(config.params, weights), assets, config.quantization)


__all__ = ["ARCHITECTURES", "Architecture", "architecture_class", "build"]
