"""The model repository: `<root>/<name>/<version>/` folders holding published artifacts.

Versions are positive integers and immutable once published; "latest" is the largest. The root is a local
folder (`ModelRepository`) or an S3 prefix (`models.s3_repository.S3ModelRepository`, which streams each
version into a local cache folder and checks its sha256 sums first). `open_repository(uri, ...)` picks one.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.artifact import (
    ARTIFACT_FILES,
    CONFIG_FILE,
    VERSION_EXPECTED,
    WEIGHTS_FILE,
    ArtifactError,
    ModelConfig,
    artifact_path,
    read_assets,
    read_config,
    read_weights,
    short_repr,
    validate_model_name,
    verify_files,
    version_number,
    weight_dtypes,
    write_artifact,
)
from models.datatypes import torch_dtype
from models.loaded import LoadedModel, default_device, device_type
from models.numpy_models import numpy_twin

if TYPE_CHECKING:
    import torch


class ModelNotFoundError(LookupError):
    """The requested model or version does not exist in the repository.

    `message` is what a served API's callers get; str() adds `where` (the repository's folder or URI) for the
    command line and logs: where a server keeps its models is none of its callers' business.
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.message, self.where = message, where

    def __str__(self) -> str:
        return self.message if self.where is None else f"{self.message} ({self.where})"


class VersionError(ModelNotFoundError):
    """A model_version that names no version at all ("-1", "1.0", "²"): the caller's mistake to fix."""


_URL_CREDENTIALS = re.compile(r"://[^/\s]+@")  # to the authority's last "@": botocore takes "user:p@ss@host"


def without_credentials(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it masked: an endpoint URL may carry credentials
    (``AWS_ENDPOINT_URL=http://user:secret@host``), and errors quoting it reach terminals, logs and callers."""
    return _URL_CREDENTIALS.sub("://***@", text)


class RepositoryError(OSError):
    """The repository cannot be read or written (S3 unreachable, access denied, ...). Its message quotes the
    failure, which may quote an endpoint URL: credentials in it are masked."""

    def __init__(self, message: str) -> None:
        super().__init__(without_credentials(message))


class RepositoryUnavailableError(RepositoryError):
    """The repository's store cannot be reached or answered with an error (S3 down, refusing connections, timing
    out, throttling): a retry may succeed once it is back. Its message quotes the store's own, endpoint URL, bucket
    and key included, for the server's log: callers are told that the repository is unavailable, not where it is."""


def parse_version(version: str | int | None) -> int | None:
    """`None`, "" and "latest" mean the newest version; anything else must be a positive integer."""
    if version is None or version == "" or version == "latest":
        return None
    number = None
    if isinstance(version, int) and not isinstance(version, bool):
        number = version_number(str(version))
    elif isinstance(version, str):
        number = version_number(version)
    if number is None:
        raise VersionError(f"model_version {str(version)!r:.40} is invalid: expected {VERSION_EXPECTED}")
    return number


class Repository(ABC):
    """What the cache, the engine and the `maas models` command use, whatever the storage.

    Configs are immutable per version, so they are cached.
    """

    root: Any  # a Path for a local folder, the s3:// URI for S3: for messages

    def __init__(self) -> None:
        self._configs: dict[tuple[str, int], ModelConfig] = {}

    def _locations(self) -> list[str]:
        """Where this repository keeps its files, as messages may quote them: absolute folders and URIs."""
        return [str(self.root)]

    def for_callers(self, text: str) -> str:
        """`text` (a failure's message) as the callers of a served API may read it: URL credentials masked and
        this repository's own locations (its root, its local cache folder) cut away, so that a path inside it
        reads `<name>/<version>/<file>` as `models.artifact.artifact_path` writes it. Messages are made that way
        where they are raised; this is the boundary's second line, for one quoting a path anyway (an OSError's
        str(), a library's message). The server's log may keep the full text."""
        text = without_credentials(text)
        for location in sorted({loc.rstrip("/") for loc in self._locations()}, key=len, reverse=True):
            if location:  # never "" (the root "/"): that would cut every slash
                # The location whole: not the end of a longer path, nor the start of a neighbour's name ("repo2",
                # "repo.old"); a sentence's full stop may follow it.
                pattern = r"(?<![\w.~/-])" + re.escape(location) + r"(?:/|(?![\w~-]|\.[\w~-]))"
                text = re.sub(pattern, _in_repository, text)
        return text

    @abstractmethod
    def names(self) -> list[str]:
        """Models that have at least one complete version, sorted."""

    @abstractmethod
    def versions(self, name: str) -> list[int]:
        """Complete (config.json written) versions of one model, ascending."""

    @abstractmethod
    def _read_config(self, name: str, version: int) -> ModelConfig: ...

    @abstractmethod
    def local_folder(self, name: str, version: int) -> Path:
        """A local folder holding the version's files (for S3: downloaded and checked first)."""

    @abstractmethod
    def _write(self, name: str, config: ModelConfig, weights: dict[str, torch.Tensor],
               assets: dict[str, bytes]) -> int:
        """Claim the next version number and write the artifact there; returns the version."""

    @abstractmethod
    def weights_nbytes(self, name: str, version: int) -> int | None:
        """The size of the stored weights file, without reading it (None when it cannot be told: the load then
        reports why), so that a cache can make room before loading or refuse a model it could never hold."""

    def resolve(self, name: str, version: str | int | None = None) -> int:
        try:
            validate_model_name(name)
        except ArtifactError as exc:
            raise ModelNotFoundError(str(exc)) from None
        wanted = parse_version(version)
        available = self.versions(name)
        if not available:
            raise ModelNotFoundError(f"model {short_repr(name)} is not in the repository", str(self.root))
        if wanted is None:
            return available[-1]
        if wanted not in available:
            raise ModelNotFoundError(f"model {short_repr(name)} has no version {wanted}; available: {available}")
        return wanted

    def config(self, name: str, version: int) -> ModelConfig:
        key = (name, version)
        if key not in self._configs:
            validate_model_name(name)
            self._configs[key] = self._read_config(name, int(version))
        return self._configs[key]

    def load(self, name: str, version: int, device: str | torch.device | None = None) -> LoadedModel:
        """Read, validate and place one version on its device. Safetensors only.

        On a CPU, an architecture with a numpy twin is served by it (see :mod:`models.numpy_models`).
        """
        start = time.perf_counter()
        config = self.config(name, version)
        folder = self.local_folder(name, version)
        device = str(device) if device is not None else default_device()
        twin = numpy_twin(config, weight_dtypes(folder)) if device_type(device) == "cpu" else None
        if twin is not None:
            arch = twin(config, read_weights(folder, "np"), read_assets(folder, twin.asset_files))
        else:
            from models.architectures import architecture_class

            cls = architecture_class(config.architecture)
            arch = cls(config.params, read_weights(folder), read_assets(folder, cls.asset_files), config.quantization)
            arch = arch.to(device, torch_dtype(config.dtype))
        return LoadedModel(name, version, config, arch, device, load_seconds=time.perf_counter() - start)

    def publish(self, name: str, config: ModelConfig, weights: dict[str, torch.Tensor],
                assets: dict[str, bytes] | None = None) -> int:
        """Write a new version (newest + 1) after checking the weights and assets fit the config."""
        from models.architectures import architecture_class

        validate_model_name(name)
        cls = architecture_class(config.architecture)
        weights = cls.adapt_weights(config.params, weights)
        cls(config.params, weights, assets, config.quantization)
        return self._write(name, config, weights, dict(assets or {}))


class ModelRepository(Repository):
    """A local folder of model artifacts.

    Each load checks the files against the sha256 sums that publishing recorded in config.json, as loads from
    S3 do: a weights file overwritten in place, truncated by a full disk or planted beside the config is
    refused instead of served (about 0.1 s for MiniLM's 90 MB).
    """

    def __init__(self, root: str | Path, verify: bool = True) -> None:
        super().__init__()
        self.root = Path(root)
        self.verify = verify

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.root)!r})"

    def _locations(self) -> list[str]:
        return [str(self.root.absolute()), str(self.root.resolve())]

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and _valid_name(p.name) and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        folder = self.root / validate_model_name(name)
        if not folder.is_dir():
            return []
        numbered = ((version_number(p.name), p) for p in folder.iterdir())
        return sorted(number for number, p in numbered if number is not None and (p / CONFIG_FILE).is_file())

    def _read_config(self, name: str, version: int) -> ModelConfig:
        folder = self.root / name / str(version)
        self._refuse_links_out(folder, (CONFIG_FILE,))  # its config is read before its files: metadata, a load
        return read_config(folder)

    def _refuse_links_out(self, folder: Path, files: tuple[str, ...]) -> None:
        """Refuse a version folder, or one of its `files`, that a link leads out of the repository: the server would
        read a file of the link's choosing, and its messages (a config's field errors) quote what they read."""
        root = self.root.resolve()
        for file in ("", *files):
            path = folder / file if file else folder
            if path.exists() and not path.resolve().is_relative_to(root):
                raise ArtifactError(f"{artifact_path(folder, file)} leads outside the repository; refusing to load "
                                    "it")

    def local_folder(self, name: str, version: int) -> Path:
        folder = self.root / validate_model_name(name) / str(int(version))
        self._refuse_links_out(folder, (CONFIG_FILE, *ARTIFACT_FILES))
        if self.verify:
            verify_files(folder, self.config(name, version))
        return folder

    def weights_nbytes(self, name: str, version: int) -> int | None:
        try:
            return (self.root / validate_model_name(name) / str(int(version)) / WEIGHTS_FILE).stat().st_size
        except OSError:
            return None

    def _write(self, name: str, config: ModelConfig, weights: dict[str, torch.Tensor],
               assets: dict[str, bytes]) -> int:
        version = (self.versions(name) or [0])[-1] + 1
        while True:  # claim the number by creating its folder, so concurrent publishers never share one
            try:
                (self.root / name / str(version)).mkdir(parents=True)
                break
            except FileExistsError:
                version += 1
        write_artifact(self.root / name / str(version), config, weights, assets)
        return version


def _in_repository(match: re.Match[str]) -> str:
    """A repository location `for_callers` cuts away: a path under it keeps its part inside the repository."""
    return "" if match.group().endswith("/") else "the model repository"


def _valid_name(name: str) -> bool:
    try:
        validate_model_name(name)
    except ArtifactError:
        return False
    return True


def open_repository(uri: str | Path, s3_client_factory: Callable[[], Any] | None = None,
                    cache_dir: str | Path | None = None) -> Repository:
    """The repository at `uri`: a local folder, or `s3://bucket/prefix`.

    For S3, `s3_client_factory()` gives the boto3 S3 client to use (endpoint, credentials); without one,
    `boto3.client("s3")` reads the usual environment (AWS_ENDPOINT_URL, the credential chain). Downloaded
    versions are kept under `cache_dir` (default: <tmp>/maas-model-cache-<uid>, private to the user).
    """
    text = str(uri)
    if text.startswith("s3://"):
        from models.s3_repository import S3ModelRepository

        if s3_client_factory is None:
            import boto3

            def s3_client_factory() -> Any:
                return boto3.client("s3")
        return S3ModelRepository(text, s3_client_factory(), cache_dir=cache_dir)
    if "://" in text:
        raise RepositoryError(f"model repository {text!r}: expected a local folder or an s3://bucket/prefix URI")
    return ModelRepository(text)
