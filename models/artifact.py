"""The model artifact contract: `<repo>/<name>/<version>/{model.safetensors,config.json}`.

config.json is parsed into typed objects here, and every error names the field that is wrong, because
the person reading it is the one who published the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from models.datatypes import DATATYPES

if TYPE_CHECKING:  # torch is imported only where torch weights are read or written (2-3 s of a cold start)
    import numpy as np
    import torch

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
#: Files an artifact may hold besides config.json: the weights and architecture assets (tokenizers).
ARTIFACT_FILES = (WEIGHTS_FILE, TOKENIZER_FILE)
QUANTIZATIONS = ("int8",)
SCALE_SUFFIX = "_scale"  # an int8 weight `<name>` has its per-output-channel fp32 scales in `<name>_scale`


class ArtifactError(ValueError):
    """A model artifact is malformed; the message names the file and the field or tensor."""


def validate_model_name(name: object) -> str:
    """Model names become path components and S3 keys: allow a safe alphabet only."""
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name) or ".." in name:
        raise ArtifactError(
            f"model name {name!r} is invalid: expected 1-128 characters of letters, digits, '_', '-', '.', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: V2 datatype and shape, -1 for a variable dimension.

    The first dimension is the batch dimension and is always variable (-1).
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def parse(cls, raw: Any, where: str) -> TensorSpec:
        if not isinstance(raw, dict):
            raise ArtifactError(f"{where}: expected an object with name, datatype, shape")
        name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
        if not isinstance(name, str) or not name:
            raise ArtifactError(f"{where}.name: expected a non-empty string")
        if datatype not in DATATYPES:
            raise ArtifactError(f"{where}.datatype: {datatype!r} is not one of {sorted(DATATYPES)}")
        if not isinstance(shape, list) or not shape or not all(isinstance(d, int) for d in shape):
            raise ArtifactError(f"{where}.shape: expected a non-empty list of integers")
        if shape[0] != -1:
            raise ArtifactError(f"{where}.shape: the first (batch) dimension must be -1, got {shape[0]}")
        if any(d < -1 or d == 0 for d in shape):
            raise ArtifactError(f"{where}.shape: dimensions must be positive or -1, got {shape}")
        return cls(name=name, datatype=datatype, shape=tuple(shape))

    def mismatch(self, datatype: str, shape: list[int] | tuple[int, ...]) -> str | None:
        """Why a request tensor does not fit this spec, or None when it does."""
        if datatype != self.datatype:
            return f"input {self.name!r}: datatype {datatype} given, expected {self.datatype}"
        if len(shape) != len(self.shape) or (shape[1:] != self.shape[1:] and any(  # the first test is C-fast
            want != -1 and got != want for got, want in zip(shape, self.shape, strict=True)
        )):
            return f"input {self.name!r}: shape {list(shape)} given, expected {list(self.shape)} (-1 = any)"
        return None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class BatchingPolicy:
    """How requests of one model are grouped: a batch closes when it holds `max_batch_size` rows, when its
    oldest request has waited `max_queue_delay_ms`, when its size is one of `preferred_batch_sizes` and no
    more requests are queued, or (with `close_when_idle`) as soon as the model has no batch to run, so a
    lone caller does not wait out the delay while busy periods still fill batches."""

    max_batch_size: int = 64
    max_queue_delay_ms: float = 5.0
    preferred_batch_sizes: tuple[int, ...] = ()
    close_when_idle: bool = False

    @classmethod
    def parse(cls, raw: Any) -> BatchingPolicy:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ArtifactError("batching: expected an object")
        size = raw.get("max_batch_size", cls.max_batch_size)
        delay = raw.get("max_queue_delay_ms", cls.max_queue_delay_ms)
        preferred = raw.get("preferred_batch_sizes", [])
        idle = raw.get("close_when_idle", False)
        if not isinstance(size, int) or size < 1:
            raise ArtifactError(f"batching.max_batch_size: expected an integer >= 1, got {size!r}")
        if not isinstance(delay, int | float) or delay < 0 or not math.isfinite(delay):
            raise ArtifactError(f"batching.max_queue_delay_ms: expected a number >= 0, got {delay!r}")
        if not isinstance(preferred, list) or not all(isinstance(p, int) and 0 < p <= size for p in preferred):
            raise ArtifactError(
                f"batching.preferred_batch_sizes: expected integers in 1..max_batch_size, got {preferred!r}"
            )
        if not isinstance(idle, bool):
            raise ArtifactError(f"batching.close_when_idle: expected true or false, got {idle!r}")
        return cls(max_batch_size=size, max_queue_delay_ms=float(delay), preferred_batch_sizes=tuple(preferred),
                   close_when_idle=idle)


@dataclass(frozen=True)
class ModelConfig:
    """The parsed config.json of one model version."""

    architecture: str
    params: dict[str, Any]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: BatchingPolicy = field(default_factory=BatchingPolicy)
    dtype: str = "FP32"
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: "int8": weight-only int8 dense layers (kernels.linear_int8); None: float weights.
    quantization: str | None = None
    #: sha256 (hex) of every file of the artifact but config.json, recorded at publish time.
    files: dict[str, str] = field(default_factory=dict)
    #: Optional V2 input tensors ({"name", "shape", "datatype", "data"}) for the warm-up batch.
    warmup_inputs: tuple[dict[str, Any], ...] = ()

    @classmethod
    def parse(cls, raw: Any) -> ModelConfig:
        if not isinstance(raw, dict):
            raise ArtifactError(f"{CONFIG_FILE}: expected a JSON object")
        arch = raw.get("architecture")
        if not isinstance(arch, str) or not arch:
            raise ArtifactError(f"{CONFIG_FILE}.architecture: expected a string naming an architecture")
        params = raw.get("params", {})
        if not isinstance(params, dict):
            raise ArtifactError(f"{CONFIG_FILE}.params: expected an object")
        inputs = raw.get("inputs")
        outputs = raw.get("outputs")
        if not isinstance(inputs, list) or not inputs:
            raise ArtifactError(f"{CONFIG_FILE}.inputs: expected a non-empty list of tensor specs")
        if not isinstance(outputs, list) or not outputs:
            raise ArtifactError(f"{CONFIG_FILE}.outputs: expected a non-empty list of tensor specs")
        dtype = raw.get("dtype", "FP32")
        if dtype not in {"FP32", "FP16", "BF16"}:
            raise ArtifactError(f"{CONFIG_FILE}.dtype: expected FP32, FP16 or BF16, got {dtype!r}")
        quantization = raw.get("quantization")
        if quantization is not None and quantization not in QUANTIZATIONS:
            raise ArtifactError(f"{CONFIG_FILE}.quantization: expected null or one of {QUANTIZATIONS}, "
                                f"got {quantization!r}")
        files = raw.get("files", {})
        if not isinstance(files, dict) or not all(
            k in ARTIFACT_FILES and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in files.items()
        ):
            raise ArtifactError(f"{CONFIG_FILE}.files: expected {{file name: sha256 hex}} for files among "
                                f"{list(ARTIFACT_FILES)}, got {files!r}")
        warmup = raw.get("warmup_inputs", [])
        if not isinstance(warmup, list) or not all(
            isinstance(w, dict) and {"name", "shape", "datatype", "data"} <= set(w) for w in warmup
        ):
            raise ArtifactError(f"{CONFIG_FILE}.warmup_inputs: expected a list of V2 input tensors "
                                "({name, shape, datatype, data})")
        known = {"architecture", "params", "inputs", "outputs", "batching", "dtype", "description", "quantization",
                 "files", "warmup_inputs"}
        return cls(
            architecture=arch,
            params=params,
            inputs=tuple(TensorSpec.parse(s, f"inputs[{i}]") for i, s in enumerate(inputs)),
            outputs=tuple(TensorSpec.parse(s, f"outputs[{i}]") for i, s in enumerate(outputs)),
            batching=BatchingPolicy.parse(raw.get("batching")),
            dtype=dtype,
            description=str(raw.get("description", "")),
            extra={k: v for k, v in raw.items() if k not in known},
            quantization=quantization,
            files=dict(files),
            warmup_inputs=tuple(warmup),
        )

    def to_json(self) -> dict[str, Any]:
        body = {
            "architecture": self.architecture,
            "params": self.params,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "batching": {**asdict(self.batching), "preferred_batch_sizes": list(self.batching.preferred_batch_sizes)},
            "dtype": self.dtype,
            "description": self.description,
        }
        if self.quantization is not None:
            body["quantization"] = self.quantization
        if self.warmup_inputs:
            body["warmup_inputs"] = list(self.warmup_inputs)
        if self.files:
            body["files"] = dict(self.files)
        return {**body, **self.extra}


def read_config(directory: Path) -> ModelConfig:
    path = directory / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: invalid JSON ({exc})") from None
    return ModelConfig.parse(raw)


def read_weights(directory: Path, framework: Literal["pt", "np"] = "pt") -> dict[str, torch.Tensor | np.ndarray]:
    """Load weights from safetensors only: a pickle can run code, a safetensors file cannot.

    ``framework="np"`` gives numpy arrays without importing torch (see :mod:`models.numpy_models`).
    """
    path = directory / WEIGHTS_FILE
    if not path.exists():
        raise ArtifactError(f"{path} is missing (weights must be a safetensors file; pickle is refused)")
    if framework == "np":
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise ArtifactError(f"{path}: not a valid safetensors file ({exc})") from None


def weight_dtypes(directory: Path) -> set[str]:
    """The safetensors dtype names ("F32", "BF16", "I8", ...) of a version's weights, from the header only."""
    from safetensors import safe_open

    path = directory / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="np") as f:
            return {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # a missing file or malformed header: read_weights says which
        raise ArtifactError(f"{path}: not a valid safetensors file ({exc})") from None


def expected_shapes(shapes: dict[str, tuple[int, ...]], quantizable: list[str],
                    quantization: str | None) -> dict[str, tuple[int, ...]]:
    """The float weights' shapes plus, when quantized to int8, a scale vector beside each quantizable weight."""
    shapes = dict(shapes)
    if quantization == "int8":
        for wname in quantizable:
            shapes[wname + SCALE_SUFFIX] = (shapes[wname][0],)
    return shapes


def check_weights(expected: dict[str, tuple[int, ...]], weights: dict[str, Any], int8: Sequence[str] = ()) -> None:
    """Refuse weights (torch tensors or numpy arrays) whose names or shapes differ from what the config implies,
    or whose quantized tensors (`int8`) are not int8, naming the tensor."""
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
    for name in int8:
        dtype = str(weights[name].dtype).removeprefix("torch.")
        if dtype != "int8":
            raise ArtifactError(f"tensor {name!r} has dtype {dtype}, quantization int8 implies int8")


def check_artifact(architecture: str, asset_files: Sequence[str], assets: dict[str, bytes],
                   shapes: dict[str, tuple[int, ...]], quantizable: list[str], quantization: str | None,
                   weights: dict[str, Any]) -> None:
    """What every architecture checks at load, torch or numpy twin, with the same messages: the asset files it
    needs, then its weights against what the params imply (`shapes`, plus int8 scales when quantized)."""
    missing = [n for n in asset_files if n not in assets]
    if missing:
        raise ArtifactError(f"{architecture}: the artifact lacks file(s) {missing}")
    check_weights(expected_shapes(shapes, quantizable, quantization), weights,
                  quantizable if quantization == "int8" else ())


def require(params: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = params.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ArtifactError(f"{where}.params.{key}: expected {kind.__name__}, got {value!r}")
    return value


def positive_int(params: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = params.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArtifactError(f"{where}.params.{key}: expected a positive integer, got {value!r}")
    return value


def read_assets(directory: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The architecture's extra files (e.g. tokenizer.json) of one version folder."""
    assets = {}
    for name in names:
        path = directory / name
        if not path.exists():
            raise ArtifactError(f"{path} is missing (the architecture needs it)")
        assets[name] = path.read_bytes()
    return assets


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(directory: Path, config: ModelConfig) -> None:
    """Check every file against the sha256 recorded at publish time."""
    for name, want in config.files.items():
        got = sha256_file(directory / name)
        if got != want:
            raise ArtifactError(f"{directory / name}: sha256 {got} differs from {want} recorded in {CONFIG_FILE}")


def write_artifact(directory: Path, config: ModelConfig, weights: dict[str, torch.Tensor],
                   assets: dict[str, bytes] | None = None) -> ModelConfig:
    """Write one version's folder; the config goes last so a reader never sees half an artifact.

    Returns the config as written: with the sha256 of the weights and of every asset file in `files`.
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(directory / WEIGHTS_FILE))
    for name, data in (assets or {}).items():
        if name not in ARTIFACT_FILES or name == WEIGHTS_FILE:
            raise ArtifactError(f"asset file {name!r} is not allowed; expected one of {list(ARTIFACT_FILES[1:])}")
        (directory / name).write_bytes(data)
    files = {name: sha256_file(directory / name) for name in (WEIGHTS_FILE, *(assets or {}))}
    config = replace(config, files=files)
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config.to_json(), indent=2) + "\n")
    tmp.replace(directory / CONFIG_FILE)
    return config
