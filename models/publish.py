"""Publishing: read a checkpoint safely, convert it, optionally quantize it, and write a new version.

Weights come from a safetensors file, or from a torch state-dict file (.pt/.pth/.bin) read with
`torch.load(weights_only=True)` (tensors and plain containers only: never full unpickling) and converted
to safetensors. `--quantize int8` stores every dense layer as int8 with one fp32 scale per output channel
and reports how far the quantized outputs are from the float model's on the warm-up inputs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from models.architectures import architecture_class
from models.artifact import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, ArtifactError, ModelConfig, TensorSpec
from models.datatypes import random_inputs
from models.loaded import LoadedModel, v2_inputs
from models.repository import Repository

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a .safetensors file or a torch state dict (weights_only loading)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for malformed headers
            raise ArtifactError(f"{path}: not a valid safetensors file ({exc})") from None
    if path.suffix not in TORCH_SUFFIXES:
        raise ArtifactError(f"{path}: expected a .safetensors file or a torch state dict ({', '.join(TORCH_SUFFIXES)})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise ArtifactError(f"{path}: not a torch state dict loadable with weights_only=True ({exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ArtifactError(f"{path}: expected a dict of tensor names to tensors (a state dict)")
    return dict(state)


@dataclass
class Source:
    """What `maas models publish SRC` found: weights, the config (if SRC carried one) and assets."""

    weights: dict[str, torch.Tensor]
    config: ModelConfig | None = None
    assets: dict[str, bytes] = field(default_factory=dict)


def read_source(src: str | Path, config_path: str | Path | None = None,
                tokenizer_path: str | Path | None = None) -> Source:
    """SRC is a weights file, or a folder with model.safetensors (or pytorch_model.bin), an optional
    tokenizer.json and an optional config.json: ours, or a Hugging Face BERT one (converted)."""
    from models.examples import transformer_config_from_hf

    src = Path(src)
    config_raw: Any = None
    assets: dict[str, bytes] = {}
    if src.is_dir():
        weights_file = next((src / n for n in (WEIGHTS_FILE, "pytorch_model.bin", "model.pt") if (src / n).exists()),
                            None)
        if weights_file is None:
            raise ArtifactError(f"{src}: no {WEIGHTS_FILE} (or pytorch_model.bin) in this folder")
        weights = read_checkpoint(weights_file)
        if (src / TOKENIZER_FILE).exists():
            assets[TOKENIZER_FILE] = (src / TOKENIZER_FILE).read_bytes()
        if config_path is None and (src / CONFIG_FILE).exists():
            config_path = src / CONFIG_FILE
    else:
        weights = read_checkpoint(src)
    if tokenizer_path is not None:
        assets[TOKENIZER_FILE] = Path(tokenizer_path).read_bytes()
    config = None
    if config_path is not None:
        try:
            config_raw = json.loads(Path(config_path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{config_path}: cannot read the config ({exc})") from None
        if isinstance(config_raw, dict) and "architecture" not in config_raw and config_raw.get("model_type"):
            config = transformer_config_from_hf(config_raw)
        else:
            config = ModelConfig.parse(config_raw)
        config = replace(config, files={})
    return Source(weights=weights, config=config, assets=assets)


@dataclass
class PublishResult:
    name: str
    version: int
    config: ModelConfig
    #: For --quantize: per output, the difference between the int8 and the float model on the warm-up inputs.
    quantization_report: dict[str, dict[str, float]] = field(default_factory=dict)


def _compare(float_out: dict[str, np.ndarray], quant_out: dict[str, np.ndarray],
             specs: tuple[TensorSpec, ...]) -> dict[str, dict[str, float]]:
    report = {}
    for spec in specs:
        a, b = float_out[spec.name], quant_out[spec.name]
        if spec.datatype in ("FP16", "FP32", "FP64", "BF16"):
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            scale = float(np.abs(a).max()) or 1.0
            flat_a, flat_b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
            cos = (flat_a * flat_b).sum(1) / np.maximum(np.linalg.norm(flat_a, axis=1) * np.linalg.norm(flat_b, axis=1),
                                                        1e-12)
            report[spec.name] = {"max_abs_diff": float(diff.max(initial=0.0)), "mean_abs_diff": float(diff.mean()),
                                 "max_rel_diff": float(diff.max(initial=0.0)) / scale, "min_cosine": float(cos.min())}
        else:
            report[spec.name] = {"agreement": float((a == b).mean())}
    return report


def _on_cpu(config: ModelConfig, weights: dict[str, torch.Tensor], assets: dict[str, bytes]) -> LoadedModel:
    """The model in fp32 on the CPU, as publishing runs it to check it (its inputs in fp32 too, whatever
    dtype the config serves it in)."""
    cpu = torch.device("cpu")
    architecture = architecture_class(config.architecture)(config.params, dict(weights), assets, config.quantization)
    return LoadedModel(config.architecture, 0, replace(config, dtype="FP32"), architecture.to(cpu, torch.float32),
                       cpu)


@contextmanager
def _running(config: ModelConfig) -> Iterator[None]:
    """A failure of the model on its check inputs as an `ArtifactError` that says which field to fix."""
    try:
        yield
    except ArtifactError:
        raise
    except KeyError as exc:
        raise ArtifactError(f"architecture {config.architecture!r} reads or writes tensor {exc.args[0]!r}, which "
                            f"config.json's inputs {[s.name for s in config.inputs]} and outputs "
                            f"{[s.name for s in config.outputs]} do not name") from None
    except Exception as exc:
        raise ArtifactError(f"the model fails on its config's inputs {[s.to_json() for s in config.inputs]}: "
                            f"{type(exc).__name__}: {exc}") from None


def _check_inputs(config: ModelConfig, model: LoadedModel, batch: int) -> dict[str, np.ndarray]:
    """The config's warm-up inputs, else ``batch`` rows the architecture makes up."""
    return (v2_inputs(config.warmup_inputs) if config.warmup_inputs
            else model.architecture.example_inputs(config.inputs, batch, seed=1))


def quantization_report(config: ModelConfig, float_weights: dict[str, torch.Tensor],
                        quant_weights: dict[str, torch.Tensor], assets: dict[str, bytes],
                        batch: int = 16) -> dict[str, dict[str, float]]:
    """Run the float and the int8 model on the warm-up inputs (config's, else generated) on the CPU."""
    with _running(config):
        float_model = _on_cpu(replace(config, quantization=None), float_weights, assets)
        quant_model = _on_cpu(replace(config, quantization="int8"), quant_weights, assets)
        inputs = _check_inputs(config, float_model, batch)
        return _compare(float_model.infer(inputs), quant_model.infer(inputs), config.outputs)


def check_runs(config: ModelConfig, weights: dict[str, torch.Tensor], assets: dict[str, bytes]) -> None:
    """One batch through the model on the CPU, on its warm-up inputs, before anything is written: inputs or
    outputs that config.json names differently from what the architecture reads and writes would otherwise
    pass every check and fail only at a worker's first load, with a message that names no field."""
    with _running(config):
        model = _on_cpu(config, weights, assets)
        outputs = model.infer(_check_inputs(config, model, 2))
    for batch, free in ((1, 3), (3, 8)):  # what requests may send: config.json's shapes, free sizes at two values
        inputs = random_inputs(config.inputs, batch, seed=2, free=free)
        try:
            model.infer(inputs)
        except Exception as exc:
            shapes = {name: list(value.shape) for name, value in inputs.items()}
            raise ArtifactError(f"inputs: config.json lets a request send {shapes} (its -1 dimensions at {free}), "
                                f"and the model fails on that: {type(exc).__name__}: {exc}; declare the sizes "
                                "it takes") from None
    for spec in config.outputs:
        got = outputs[spec.name].shape
        if len(got) != len(spec.shape) or any(w != -1 and g != w for g, w in zip(got, spec.shape, strict=False)):
            raise ArtifactError(f"outputs: {spec.name!r} comes out with shape {list(got)} on a batch of "
                                f"{len(got) and got[0]}, config.json says {list(spec.shape)} (-1 = any)")


def publish_model(repository: Repository, name: str, config: ModelConfig, weights: dict[str, torch.Tensor],
                  assets: dict[str, bytes] | None = None, quantize: str | None = None) -> PublishResult:
    """Check, convert, optionally quantize (`"int8"`), and publish as the next version of `name`."""
    assets = dict(assets or {})
    cls = architecture_class(config.architecture)
    weights = cls.adapt_weights(config.params, weights)
    report: dict[str, dict[str, float]] = {}
    if quantize is not None:
        if quantize != "int8":
            raise ArtifactError(f"--quantize: expected int8, got {quantize!r}")
        if config.quantization == "int8":
            raise ArtifactError("the config already says quantization int8; publish the float weights to quantize")
        if not cls.quantizable(config.params):
            raise ArtifactError(f"architecture {cls.name!r} has no dense layers to quantize")
        cls(config.params, weights, assets)  # the float weights must fit the config first
        quant_weights = cls.quantize_weights(config.params, weights)
        report = quantization_report(config, weights, quant_weights, assets)
        config, weights = replace(config, quantization="int8"), quant_weights
    check_runs(config, weights, assets)
    version = repository.publish(name, config, weights, assets)
    return PublishResult(name, version, repository.config(name, version), report)
