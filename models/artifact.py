"""The model artifact contract: `<repo>/<name>/<version>/{model.safetensors,config.json}`.

config.json is parsed into typed objects here, and every error names the field that is wrong, because
the person reading it is the one who published the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import stat
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
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# Version folders and model_version strings: a positive integer in ASCII digits, no sign, no leading zero, so
# that one version has one spelling ("01" beside "1" would list it twice) and int() always succeeds.
VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")
VERSION_EXPECTED = 'a positive integer such as "3" (ASCII digits, no sign or leading zero) or "latest"'
#: Files an artifact may hold besides config.json: the weights and architecture assets (tokenizers).
ARTIFACT_FILES = (WEIGHTS_FILE, TOKENIZER_FILE)
QUANTIZATIONS = ("int8",)
# Upper bounds on the sizes a config may give, generous for real models (GPT-3: 96 layers, 12,288 wide; Gemma:
# a 256,000-word vocabulary). A config is a few hundred bytes: without them a load builds a name per layer,
# or a warm-up allocates a batch of the declared shape, gigabytes before any weight is compared.
MAX_LAYERS = 1024  # layers, and the entries of a list of layer sizes
MAX_WIDTH = 65536  # hidden, embedding, intermediate and dense sizes, heads, classes, kernels, image sides
MAX_SEQUENCE = 1 << 20  # sequence_length, max_length, max_position_embeddings
MAX_VOCAB = 1 << 24  # vocab_size
MAX_DIMS, MAX_DIM = 16, MAX_SEQUENCE  # a tensor spec's rank and any one of its dimensions
MAX_ROW_ELEMENTS = 1 << 26  # elements of one row of a tensor spec (its fixed dimensions, -1 counted as 1)
MAX_BATCH_SIZE = 65536  # rows of one batch: a GPU warm-up runs every power of two up to it
MAX_QUEUE_DELAY_MS = 60_000
# config.json holds hyper-parameters, tensor specs and a few warm-up inputs: kilobytes. Reading one is bounded.
MAX_CONFIG_BYTES = 1 << 20
# An asset (tokenizer.json) is read whole into memory at every load, and parsed: real ones are megabytes (a
# 256,000-word vocabulary's, some 35 MB). Weights are held to the model cache's budget before they are read.
MAX_ASSET_BYTES = 256 << 20
SCALE_SUFFIX = "_scale"  # an int8 weight `<name>` has its per-output-channel fp32 scales in `<name>_scale`


class ArtifactError(ValueError):
    """A model artifact is malformed; the message names the file and the field or tensor."""


def artifact_path(directory: Path, file: str = "") -> str:
    """How a message names a version folder (`<name>/<version>`) or one of its files
    (`<name>/<version>/<file>`): relative to the repository, whether the folder is in it or in an S3
    repository's local cache. These messages reach the callers of a served API (infer errors, readiness, the
    load endpoint), and where a server keeps its files is none of their business."""
    where = f"{directory.parent.name}/{directory.name}"
    return f"{where}/{file}" if file else where


def short_repr(value: Any, limit: int = 60) -> str:
    """`value`'s repr for an error message, cut to `limit` characters: what a caller sent comes back in the
    answer (and goes to logs), and must not set how long they are."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def validate_model_name(name: object) -> str:
    """Model names become path components and S3 keys: allow a safe alphabet only."""
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name) or ".." in name:
        raise ArtifactError(
            f"model name {short_repr(name)} is invalid: expected 1-128 characters of letters, digits, '_', '-', "
            "'.', starting with a letter or digit"
        )
    return name


def version_number(text: str) -> int | None:
    """The version a folder name, key segment or model_version string names; None if it names none."""
    return int(text) if VERSION_RE.fullmatch(text) else None


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
        if not isinstance(shape, list) or not 0 < len(shape) <= MAX_DIMS or not all(type(d) is int for d in shape):
            raise ArtifactError(f"{where}.shape: expected a list of 1 to {MAX_DIMS} integers")
        if shape[0] != -1:
            raise ArtifactError(f"{where}.shape: the first (batch) dimension must be -1, got {shape[0]}")
        if any(d < -1 or d == 0 or d > MAX_DIM for d in shape):
            raise ArtifactError(f"{where}.shape: dimensions must be -1 or in 1..{MAX_DIM:,}, got {shape}")
        if math.prod(max(d, 1) for d in shape) > MAX_ROW_ELEMENTS:
            raise ArtifactError(f"{where}.shape: one row holds more than {MAX_ROW_ELEMENTS:,} elements, got {shape}")
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
        known = ("max_batch_size", "max_queue_delay_ms", "preferred_batch_sizes", "close_when_idle")
        unknown = sorted(set(raw) - set(known))
        if unknown:  # a misspelt key would silently leave its default in force
            raise ArtifactError(f"batching: unknown key(s) {unknown}; expected {', '.join(known)}")
        size = raw.get("max_batch_size", cls.max_batch_size)
        delay = raw.get("max_queue_delay_ms", cls.max_queue_delay_ms)
        preferred = raw.get("preferred_batch_sizes", [])
        idle = raw.get("close_when_idle", False)
        if type(size) is not int or not 1 <= size <= MAX_BATCH_SIZE:
            raise ArtifactError(f"batching.max_batch_size: expected an integer in 1..{MAX_BATCH_SIZE:,}, got {size!r}")
        if type(delay) not in (int, float) or not 0 <= delay <= MAX_QUEUE_DELAY_MS:
            raise ArtifactError(f"batching.max_queue_delay_ms: expected a number in 0..{MAX_QUEUE_DELAY_MS:,}, "
                                f"got {delay!r}")
        if not isinstance(preferred, list) or not all(type(p) is int and 0 < p <= size for p in preferred):
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
        input_specs = tuple(TensorSpec.parse(s, f"inputs[{i}]") for i, s in enumerate(inputs))
        for i, tensor in enumerate(warmup):
            _check_warmup_tensor(tensor, input_specs, f"{CONFIG_FILE}.warmup_inputs[{i}]")
        return cls(
            architecture=arch,
            params=params,
            inputs=input_specs,
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


def _check_warmup_tensor(tensor: dict[str, Any], specs: tuple[TensorSpec, ...], where: str) -> None:
    """A warm-up tensor must be one the model takes, as a request would send it: the warm-up builds arrays from
    it at every load, where a bad one would fail the load with a message naming nothing."""
    spec = next((s for s in specs if s.name == tensor["name"]), None)
    if spec is None:
        raise ArtifactError(f"{where}.name: {tensor['name']!r:.60} is not one of the inputs "
                            f"{[s.name for s in specs]}")
    shape, data = tensor["shape"], tensor["data"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 1 for d in shape):
        raise ArtifactError(f"{where}.shape: expected a list of positive integers, got {shape!r:.60}")
    problem = spec.mismatch(tensor["datatype"], shape)
    if problem is not None:
        raise ArtifactError(f"{where}: {problem}")
    if not isinstance(data, list) or len(data) != math.prod(shape):
        raise ArtifactError(f"{where}.data: expected a flat list of {math.prod(shape)} elements (the shape's "
                            f"product), got {len(data) if isinstance(data, list) else type(data).__name__}")
    if spec.datatype == "BYTES":
        valid = all(isinstance(v, str) for v in data)
    elif spec.datatype == "BOOL":
        valid = all(isinstance(v, bool) for v in data)
    else:
        valid = all(type(v) in (int, float) for v in data)
    if not valid:
        kind = {"BYTES": "strings", "BOOL": "true or false"}.get(spec.datatype, "numbers")
        raise ArtifactError(f"{where}.data: expected {kind} for datatype {spec.datatype}")


def parse_config_bytes(raw: bytes, where: str) -> ModelConfig:
    """config.json's bytes, bounded and parsed; `where` names the file in errors."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ArtifactError(f"{where}: {len(raw):,} bytes, over the {MAX_CONFIG_BYTES:,} a config may have")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{where}: invalid JSON ({exc})") from None
    return ModelConfig.parse(body)


def _check_regular_file(path: Path, where: str, missing: str = "") -> None:
    """Refuse a version file that is not a regular file before opening it: opening a named pipe blocks (the
    model thread, and every model behind it) until some process writes to it, and a device such as /dev/zero
    reads as whatever it yields. `missing` completes the message of a file that is not there."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ArtifactError(f"{where} is missing{missing}") from None
    except OSError as exc:  # str(exc) would quote the server's path
        raise ArtifactError(f"{where} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not stat.S_ISREG(mode):
        raise ArtifactError(f"{where} is not a regular file")


def read_config(directory: Path) -> ModelConfig:
    where = artifact_path(directory, CONFIG_FILE)
    _check_regular_file(directory / CONFIG_FILE, where)
    try:
        with (directory / CONFIG_FILE).open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:  # removed since the check
        raise ArtifactError(f"{where} is missing") from None
    except OSError as exc:  # str(exc) would quote the server's path
        raise ArtifactError(f"{where} cannot be read ({exc.strerror or type(exc).__name__})") from None
    return parse_config_bytes(raw, where)


_WEIGHTS_MISSING = " (weights must be a safetensors file; pickle is refused)"


def read_weights(directory: Path, framework: Literal["pt", "np"] = "pt") -> dict[str, torch.Tensor | np.ndarray]:
    """Load weights from safetensors only: a pickle can run code, a safetensors file cannot.

    ``framework="np"`` gives numpy arrays without importing torch (see :mod:`models.numpy_models`).
    """
    path = directory / WEIGHTS_FILE
    _check_regular_file(path, artifact_path(directory, WEIGHTS_FILE), _WEIGHTS_MISSING)
    if framework == "np":
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise ArtifactError(f"{artifact_path(directory, WEIGHTS_FILE)}: not a valid safetensors file ({exc})") \
            from None


def weight_dtypes(directory: Path) -> set[str]:
    """The safetensors dtype names ("F32", "BF16", "I8", ...) of a version's weights, from the header only."""
    from safetensors import safe_open

    _check_regular_file(directory / WEIGHTS_FILE, artifact_path(directory, WEIGHTS_FILE), _WEIGHTS_MISSING)
    try:
        with safe_open(str(directory / WEIGHTS_FILE), framework="np") as f:
            return {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # a missing file or malformed header: read_weights says which
        raise ArtifactError(f"{artifact_path(directory, WEIGHTS_FILE)}: not a valid safetensors file ({exc})") \
            from None


def expected_shapes(shapes: dict[str, tuple[int, ...]], quantizable: list[str],
                    quantization: str | None) -> dict[str, tuple[int, ...]]:
    """The float weights' shapes plus, when quantized to int8, a scale vector beside each quantizable weight."""
    shapes = dict(shapes)
    if quantization == "int8":
        for wname in quantizable:
            shapes[wname + SCALE_SUFFIX] = (shapes[wname][0],)
    return shapes


FLOAT_WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def check_weights(expected: dict[str, tuple[int, ...]], weights: dict[str, Any], int8: Sequence[str] = ()) -> None:
    """Refuse weights (torch tensors or numpy arrays) whose names or shapes differ from what the config implies,
    whose quantized tensors (`int8`) are not int8, or whose other tensors are not floats, naming the tensor."""
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
    quantized = set(int8)
    for name in expected:
        dtype = str(weights[name].dtype).removeprefix("torch.")
        if name in quantized:
            if dtype != "int8":
                raise ArtifactError(f"tensor {name!r} has dtype {dtype}, quantization int8 implies int8")
        elif dtype not in FLOAT_WEIGHT_DTYPES:  # an int tensor would be cast and served as nonsense
            raise ArtifactError(f"tensor {name!r} has dtype {dtype}, expected a float dtype "
                                f"({', '.join(FLOAT_WEIGHT_DTYPES)})" + ("" if int8 or dtype != "int8" else
                                "; int8 weights need \"quantization\": \"int8\" and their scales"))


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


def positive_int(params: dict[str, Any], key: str, where: str, default: int | None = None,
                 maximum: int = MAX_WIDTH) -> int:
    """A size from the params, at most `maximum` (see MAX_WIDTH and the other bounds above)."""
    return size_in(params.get(key, default), f"{where}.params.{key}", maximum)


def size_in(value: Any, field: str, maximum: int) -> int:
    """`value` if it is an integer in 1..maximum, else an ArtifactError naming `field` and the bound."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise ArtifactError(f"{field}: expected an integer in 1..{maximum:,}, got {short_repr(value)}")
    return value


def read_assets(directory: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The architecture's extra files (e.g. tokenizer.json) of one version folder."""
    assets = {}
    for name in names:
        path = directory / name
        _check_regular_file(path, artifact_path(directory, name), " (the architecture needs it)")
        try:
            with path.open("rb") as f:  # bounded: one byte past the limit tells an oversized file
                data = f.read(MAX_ASSET_BYTES + 1)
        except OSError as exc:  # str(exc) would quote the server's path
            raise ArtifactError(f"{artifact_path(directory, name)} cannot be read "
                                f"({exc.strerror or type(exc).__name__})") from None
        if len(data) > MAX_ASSET_BYTES:
            raise ArtifactError(f"{artifact_path(directory, name)} is over the {MAX_ASSET_BYTES:,} bytes an asset "
                                "may have")
        assets[name] = data
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
        _check_regular_file(directory / name, artifact_path(directory, name), f"; {CONFIG_FILE} records its sha256")
        try:
            got = sha256_file(directory / name)
        except OSError as exc:
            raise ArtifactError(f"{artifact_path(directory, name)} cannot be read "
                                f"({exc.strerror or type(exc).__name__}); {CONFIG_FILE} records its sha256") from None
        if got != want:
            raise ArtifactError(f"{artifact_path(directory, name)}: sha256 {got} differs from {want} recorded in "
                                f"{CONFIG_FILE}")


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
