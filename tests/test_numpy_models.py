"""The numpy twins that serve simple models on a CPU without importing torch (models/numpy_models.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.architectures import build
from models.architectures.mlp import MLP
from models.architectures.text_classifier import TextClassifier
from models.artifact import TOKENIZER_FILE, ArtifactError, ModelConfig, weight_dtypes
from models.cache import ModelCache
from models.examples import MNIST_MLP, synthetic_digits
from models.numpy_models import CPU_RUNTIME_ENV, NumpyMLP, NumpyTextClassifier, cpu_runtime
from models.params import MLPParams, TextClassifierParams
from models.repository import ModelRepository
from models.text import WordIndexTokenizer

ROOT = Path(__file__).resolve().parents[1]
# fp32 products over K terms against a float64 reference: the error grows with the reduction length.
RTOL, ATOL_PER_SQRT_K = 1e-5, 2e-6


def mlp_config(layers: list[int], activations: list[str], head: str, quantization: str | None = None,
               dtype: str = "FP32") -> ModelConfig:
    outputs = ([{"name": "output", "datatype": "FP32", "shape": [-1, layers[-1]]}] if head == "none" else
               [{"name": "probabilities", "datatype": "FP32", "shape": [-1, layers[-1]]},
                {"name": "class", "datatype": "INT64", "shape": [-1]}])
    return ModelConfig.parse({
        "architecture": "mlp", "params": {"layers": layers, "activations": activations, "head": head},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, layers[0]]}], "outputs": outputs,
        "quantization": quantization, "dtype": dtype})


def random_weights(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    shapes = MLPParams.parse(config.params).weight_shapes()
    weights = {name: torch.from_numpy((rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32))
               for name, shape in shapes.items()}
    return MLP.quantize_weights(config.params, weights) if config.quantization == "int8" else weights


def as_numpy(weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in weights.items()}


@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "tanh", "sigmoid"])
@pytest.mark.parametrize("head", ["none", "softmax"])
@pytest.mark.parametrize("quantization", [None, "int8"])
@pytest.mark.parametrize("batch", [1, 17])
def test_numpy_mlp_matches_the_torch_reference_in_float64(activation, head, quantization, batch):
    layers = [33, 129, 7]
    config = mlp_config(layers, [activation, "none" if head == "softmax" else activation], head, quantization)
    weights = random_weights(config, seed=batch)
    x = np.random.default_rng(batch + 100).standard_normal((batch, layers[0])).astype(np.float32)
    twin = NumpyMLP(config, as_numpy(weights))
    got = twin.run({"input": x})

    reference = build(config, {k: v if v.dtype == torch.int8 else v.double() for k, v in weights.items()})
    want = reference.reference_forward({"input": torch.from_numpy(x).double()})
    atol = ATOL_PER_SQRT_K * np.sqrt(max(layers))
    for name, value in want.items():
        assert got[name].shape == tuple(value.shape), name
        if value.is_floating_point():
            assert got[name].dtype == np.float32
            np.testing.assert_allclose(got[name], value.numpy(), rtol=RTOL, atol=atol, err_msg=name)
        else:  # the argmax of probabilities that agree to ~1e-6 (no near-ties with these random weights)
            np.testing.assert_array_equal(got[name], value.numpy(), err_msg=name)


def test_numpy_mlp_refuses_what_the_torch_architecture_refuses_with_the_same_message():
    config = mlp_config([8, 4, 3], ["relu", "none"], "softmax")
    weights = random_weights(config, seed=0)
    bad_cases = {
        "wrong shape": {**weights, "layers.0.weight": torch.zeros(4, 9)},
        "missing": {k: v for k, v in weights.items() if k != "layers.1.bias"},
        "unexpected": {**weights, "layers.2.weight": torch.zeros(1)},
    }
    for case, bad in bad_cases.items():
        with pytest.raises(ArtifactError) as torch_error:
            build(config, bad)
        with pytest.raises(ArtifactError) as numpy_error:
            NumpyMLP(config, as_numpy(bad))
        assert str(numpy_error.value) == str(torch_error.value), case
    quantized = mlp_config([8, 4, 3], ["relu", "none"], "softmax", quantization="int8")
    scales = {"layers.0.weight_scale": torch.ones(4), "layers.1.weight_scale": torch.ones(3)}
    with pytest.raises(ArtifactError, match=r"'layers\.0\.weight' has dtype float32, quantization int8 implies int8"):
        NumpyMLP(quantized, as_numpy({**weights, **scales}))
    with pytest.raises(ArtifactError, match=r"mlp\.params\.activations: 'swish' is not one of"):
        NumpyMLP(mlp_config([8, 4, 3], ["swish", "none"], "softmax"), as_numpy(weights))


def publish(root: Path, name: str, config: ModelConfig, weights: dict[str, torch.Tensor]) -> ModelRepository:
    repository = ModelRepository(root)
    repository.publish(name, config, weights)
    return repository


def test_cpu_loads_pick_the_numpy_twin_unless_torch_is_asked_for_or_needed(tmp_path, monkeypatch):
    config = mlp_config([16, 8, 4], ["gelu", "none"], "softmax")
    weights = random_weights(config, seed=3)
    repository = publish(tmp_path, "m", config, weights)
    x = np.random.default_rng(0).random((5, 16)).astype(np.float32)

    served = repository.load("m", 1, "cpu")
    assert isinstance(served.architecture, NumpyMLP) and served.device == "cpu"
    monkeypatch.setenv(CPU_RUNTIME_ENV, "torch")
    with_torch = repository.load("m", 1, torch.device("cpu"))
    assert isinstance(with_torch.architecture, MLP)
    for name, value in with_torch.infer({"input": x}).items():
        np.testing.assert_allclose(served.infer({"input": x})[name], value, rtol=1e-5, atol=1e-6)
    assert served.nbytes == with_torch.nbytes  # float32 weights either way

    monkeypatch.setenv(CPU_RUNTIME_ENV, "tensorflow")
    with pytest.raises(ValueError, match="MAAS_CPU_RUNTIME='tensorflow': expected one of"):
        cpu_runtime()
    monkeypatch.delenv(CPU_RUNTIME_ENV)
    # bf16 weights have no numpy dtype, and a half-precision model computes in half: both stay on torch.
    bf16 = publish(tmp_path / "bf16", "m", config, {k: v.bfloat16() for k, v in weights.items()})
    assert isinstance(bf16.load("m", 1, "cpu").architecture, MLP)
    half = publish(tmp_path / "half", "m", mlp_config([16, 8, 4], ["gelu", "none"], "softmax", dtype="FP16"),
                   weights)
    assert isinstance(half.load("m", 1, "cpu").architecture, MLP)


def test_int8_models_are_served_by_the_twin_from_their_int8_weights(tmp_path):
    config = mlp_config([24, 12, 3], ["relu", "none"], "none", quantization="int8")
    weights = random_weights(config, seed=4)
    repository = publish(tmp_path, "q", config, weights)
    model = repository.load("q", 1, "cpu")
    assert isinstance(model.architecture, NumpyMLP)
    x = np.random.default_rng(1).random((3, 24)).astype(np.float32)
    want = build(config, weights).reference_forward({"input": torch.from_numpy(x)})["output"].numpy()
    np.testing.assert_allclose(model.infer({"input": x})["output"], want, rtol=1e-5, atol=1e-5)


def test_a_cold_cpu_process_serves_the_mnist_mlp_without_importing_torch(repository, monkeypatch):
    """The cold-start path of a CPU worker: cache, load, warm up, answer, and torch never imported."""
    images, _ = synthetic_digits(3, seed=5)
    code = (
        "import json, sys\n"
        "import numpy as np\n"
        "from models.cache import ModelCache\n"
        "from models.repository import ModelRepository\n"
        f"cache = ModelCache(ModelRepository({str(repository.root)!r}))\n"
        f"model = cache.get({MNIST_MLP!r}, cache.resolve({MNIST_MLP!r}))\n"
        "x = np.array(json.loads(sys.stdin.read()), dtype=np.float32)\n"
        "out = model.infer({'input': x})\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'class': out['class'].tolist(),\n"
        "                  'probabilities': out['probabilities'].tolist()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != CPU_RUNTIME_ENV}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(images.tolist()), capture_output=True,
                          text=True, env=env, check=True, timeout=120)
    child = json.loads(done.stdout)
    assert child["torch"] is False
    monkeypatch.setenv(CPU_RUNTIME_ENV, "torch")
    cache = ModelCache(ModelRepository(repository.root))
    want = cache.get(MNIST_MLP, cache.resolve(MNIST_MLP)).infer({"input": images.astype(np.float32)})
    assert child["class"] == want["class"].tolist()
    np.testing.assert_allclose(child["probabilities"], want["probabilities"], rtol=1e-5, atol=1e-6)


def test_bf16_weights_saved_by_torch_are_read_by_the_header_check(tmp_path):
    save_file({"a": torch.zeros(2, dtype=torch.bfloat16), "b": torch.zeros(1, dtype=torch.int8)},
              str(tmp_path / "model.safetensors"))
    assert weight_dtypes(tmp_path) == {"BF16", "I8"}
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        weight_dtypes(tmp_path)


WORDS = ["good", "bad", "movie", "plot", "great", "awful", "acting", "fine"]


def text_config(head: str, classes: int, quantization: str | None = None, vocab: int = 12) -> ModelConfig:
    return ModelConfig.parse({
        "architecture": "text_classifier", "quantization": quantization,
        "params": {"vocab_size": vocab, "embedding_dim": 6, "sequence_length": 5, "hidden": [7],
                   "num_classes": classes, "head": head},
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, classes]},
                    {"name": "label", "datatype": "INT64", "shape": [-1]}]})


def text_weights(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    shapes = TextClassifierParams.parse(config.params).weight_shapes()
    weights = {name: torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for name, shape in shapes.items()}
    return TextClassifier.quantize_weights(config.params, weights) if config.quantization == "int8" else weights


@pytest.mark.parametrize(("head", "classes"), [("sigmoid", 1), ("sigmoid", 3), ("softmax", 4)])
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_numpy_text_classifier_matches_the_torch_reference_in_float64(head, classes, quantization):
    config = text_config(head, classes, quantization)
    weights = text_weights(config, seed=classes)
    assets = {TOKENIZER_FILE: WordIndexTokenizer(WORDS).to_json()}
    # Unknown words, an empty text, one longer than sequence_length, and [B, 1] as well as [B] shapes.
    texts = ["good movie", "awful acting and a boring plot", "", "GREAT great great fine fine fine", "zzz"]
    twin = NumpyTextClassifier(config, as_numpy(weights), assets)
    reference = build(config, {k: v if v.dtype == torch.int8 else v.double() for k, v in weights.items()}, assets)
    want = reference.reference_forward({"text": texts})
    for shape in [(5,), (5, 1)]:
        got = twin.run({"text": np.array([t.encode() for t in texts], dtype=object).reshape(shape)})
        np.testing.assert_allclose(got["scores"], want["scores"].numpy(), rtol=RTOL, atol=1e-6)
        np.testing.assert_array_equal(got["label"], want["label"].numpy())
        assert got["scores"].dtype == np.float32 and got["label"].dtype == np.int64


def test_numpy_text_classifier_refuses_what_the_torch_architecture_refuses():
    config = text_config("sigmoid", 1)
    weights = text_weights(config, seed=0)
    assets = {TOKENIZER_FILE: WordIndexTokenizer(WORDS).to_json()}
    small = text_config("sigmoid", 1, vocab=5)  # 8 words + padding + OOV do not fit 5 ids
    small_weights = {**weights, "embedding.weight": torch.zeros(5, 6)}
    cases = {"no tokenizer": (config, weights, {}), "vocabulary too large": (small, small_weights, assets),
             "bad shape": (config, {**weights, "dense.0.bias": torch.zeros(3)}, assets)}
    for case, (cfg, w, a) in cases.items():
        with pytest.raises(ArtifactError) as torch_error:
            build(cfg, w, a)
        with pytest.raises(ArtifactError) as numpy_error:
            NumpyTextClassifier(cfg, as_numpy(w), a)
        assert str(numpy_error.value) == str(torch_error.value), case


def test_a_published_text_classifier_is_served_by_its_twin_on_a_cpu(tmp_path):
    config = text_config("softmax", 3)
    weights = text_weights(config, seed=9)
    assets = {TOKENIZER_FILE: WordIndexTokenizer(WORDS).to_json()}
    repository = ModelRepository(tmp_path)
    repository.publish("topics", config, weights, assets)
    model = ModelCache(repository).get("topics", 1)
    assert isinstance(model.architecture, NumpyTextClassifier) and model.warmup_seconds > 0
    texts = np.array([b"great plot", b"bad bad acting"], dtype=object)
    want = build(config, weights, assets).reference_forward({"text": texts})
    got = model.infer({"text": texts})
    np.testing.assert_allclose(got["scores"], want["scores"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["label"], want["label"].numpy())
