"""The architectures a config.json may name, by their `architecture` string."""

from __future__ import annotations

from models.architectures.base import Architecture
from models.architectures.mlp import MLP
from models.artifact import ArtifactError

ARCHITECTURES: dict[str, type[Architecture]] = {cls.name: cls for cls in (MLP,)}


def architecture_class(name: str) -> type[Architecture]:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ArtifactError(f"config.json.architecture: unknown architecture {name!r}; known: "
                            f"{sorted(ARCHITECTURES)}") from None


__all__ = ["ARCHITECTURES", "Architecture", "architecture_class"]
