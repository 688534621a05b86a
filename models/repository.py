"""The model repository: `<root>/<name>/<version>/` folders holding published artifacts.

Versions are positive integers and immutable once published; "latest" is the largest.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from models.architectures import architecture_class
from models.artifact import (
    CONFIG_FILE,
    ArtifactError,
    ModelConfig,
    read_config,
    read_weights,
    validate_model_name,
    write_artifact,
)
from models.datatypes import TORCH_DTYPES
from models.loaded import LoadedModel, default_device


class ModelNotFoundError(LookupError):
    """The requested model or version does not exist in the repository."""


def parse_version(version: str | int | None) -> int | None:
    """`None`, "" and "latest" mean the newest version; anything else must be a positive integer."""
    if version is None or version == "" or version == "latest":
        return None
    if isinstance(version, int) and not isinstance(version, bool):
        number = version
    elif isinstance(version, str) and version.isdigit():
        number = int(version)
    else:
        raise ModelNotFoundError(f"model_version {version!r} is invalid: expected a positive integer")
    if number < 1:
        raise ModelNotFoundError(f"model_version {version!r} is invalid: expected a positive integer")
    return number


class ModelRepository:
    """A local folder of model artifacts. Configs are immutable per version, so they are cached."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._configs: dict[tuple[str, int], ModelConfig] = {}

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.root)!r})"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        folder = self.root / validate_model_name(name)
        if not folder.is_dir():
            return []
        return sorted(
            int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / CONFIG_FILE).exists()
        )

    def resolve(self, name: str, version: str | int | None = None) -> int:
        try:
            validate_model_name(name)
        except ArtifactError as exc:
            raise ModelNotFoundError(str(exc)) from None
        wanted = parse_version(version)
        available = self.versions(name)
        if not available:
            raise ModelNotFoundError(f"model {name!r} is not in the repository ({self.root})")
        if wanted is None:
            return available[-1]
        if wanted not in available:
            raise ModelNotFoundError(f"model {name!r} has no version {wanted}; available: {available}")
        return wanted

    def config(self, name: str, version: int) -> ModelConfig:
        key = (name, version)
        if key not in self._configs:
            self._configs[key] = read_config(self.root / name / str(version))
        return self._configs[key]

    def load(self, name: str, version: int, device: torch.device | None = None) -> LoadedModel:
        """Read, validate and place one version on its device. Safetensors only."""
        start = time.perf_counter()
        folder = self.root / name / str(version)
        config = self.config(name, version)
        cls = architecture_class(config.architecture)
        device = device or default_device()
        arch = cls(config.params, read_weights(folder)).to(device, TORCH_DTYPES[config.dtype])
        return LoadedModel(name, version, config, arch, device, load_seconds=time.perf_counter() - start)

    def publish(self, name: str, config: ModelConfig, weights: dict[str, torch.Tensor]) -> int:
        """Write a new version (newest + 1) after checking the weights fit the config."""
        validate_model_name(name)
        architecture_class(config.architecture)(config.params, weights)
        version = (self.versions(name) or [0])[-1] + 1
        write_artifact(self.root / name / str(version), config, weights)
        return version
