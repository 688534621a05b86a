"""Artifacts, the repository and the warm cache, on real safetensors files."""

from __future__ import annotations

import itertools
import json
import threading

import numpy as np
import pytest
import torch

from models.architectures.mlp import MLP
from models.artifact import WEIGHTS_FILE, ArtifactError, ModelConfig
from models.cache import ModelCache
from models.examples import MNIST_MLP, mnist_mlp_config, synthetic_digits
from models.repository import ModelNotFoundError


def _random_mlp_weights(layers=(784, 128, 10)) -> dict[str, torch.Tensor]:
    weights = {}
    for i, (d_in, d_out) in enumerate(itertools.pairwise(layers)):
        weights[f"layers.{i}.weight"] = torch.randn(d_out, d_in) / d_in**0.5
        weights[f"layers.{i}.bias"] = torch.randn(d_out)
    return weights


def test_example_model_classifies_fresh_digits(repository):
    model = repository.load(MNIST_MLP, repository.resolve(MNIST_MLP))
    images, labels = synthetic_digits(256, seed=12345)
    outputs = model.infer({"input": images})
    assert outputs["probabilities"].shape == (256, 10) and outputs["class"].dtype == np.int64
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    assert (outputs["class"] == labels).mean() > 0.95


def test_mlp_matches_its_plain_torch_twin():
    params = {"layers": [20, 33, 17, 10], "activations": ["relu", "tanh", "none"], "head": "softmax"}
    mlp = MLP(params, _random_mlp_weights(params["layers"]))
    x = torch.randn(7, 20)
    got, want = mlp.forward({"input": x}), mlp.reference_forward({"input": x})
    torch.testing.assert_close(got["probabilities"], want["probabilities"], rtol=1e-5, atol=1e-6)
    assert torch.equal(got["class"], want["class"])


def test_publish_increments_versions_and_latest_resolves(repository):
    config = mnist_mlp_config()
    assert repository.publish("digits", config, _random_mlp_weights()) == 1
    assert repository.publish("digits", config, _random_mlp_weights()) == 2
    assert repository.versions("digits") == [1, 2]
    assert repository.resolve("digits") == 2
    assert repository.resolve("digits", "1") == 1
    with pytest.raises(ModelNotFoundError, match=r"has no version 7; available: \[1, 2\]"):
        repository.resolve("digits", 7)
    with pytest.raises(ModelNotFoundError, match="not in the repository"):
        repository.resolve("nope")
    with pytest.raises(ModelNotFoundError, match="invalid"):
        repository.resolve("../../etc")


def test_weights_that_disagree_with_the_config_are_refused(repository):
    weights = _random_mlp_weights()
    weights["layers.1.weight"] = torch.zeros(10, 64)
    with pytest.raises(ArtifactError, match=r"tensor 'layers.1.weight' has shape \[10, 64\], the config implies "
                                            r"\[10, 128\]"):
        repository.publish("broken", mnist_mlp_config(), weights)
    del weights["layers.1.weight"]
    with pytest.raises(ArtifactError, match="missing tensor"):
        repository.publish("broken", mnist_mlp_config(), weights)


def test_unknown_architecture_and_bad_fields_are_named(repository):
    raw = mnist_mlp_config().to_json()
    with pytest.raises(ArtifactError, match="unknown architecture 'resnet9000'"):
        repository.publish("x", ModelConfig.parse({**raw, "architecture": "resnet9000"}), _random_mlp_weights())
    with pytest.raises(ArtifactError, match=r"inputs\[0\].shape: the first \(batch\) dimension must be -1"):
        ModelConfig.parse({**raw, "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784]}]})
    with pytest.raises(ArtifactError, match=r"batching\.max_batch_size"):
        ModelConfig.parse({**raw, "batching": {"max_batch_size": 0}})
    with pytest.raises(ArtifactError, match=r"batching\.close_when_idle: expected true or false"):
        ModelConfig.parse({**raw, "batching": {"close_when_idle": "yes"}})
    idle = ModelConfig.parse({**raw, "batching": {**raw["batching"], "close_when_idle": True}})
    assert idle.batching.close_when_idle and ModelConfig.parse(idle.to_json()) == idle


def test_pickled_weights_are_never_loaded(repository, tmp_path):
    folder = repository.root / "pickled" / "1"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(mnist_mlp_config().to_json()))
    torch.save(_random_mlp_weights(), folder / "model.pt")  # a pickle beside the config
    with pytest.raises(ArtifactError, match="safetensors"):
        repository.load("pickled", 1)
    torch.save(_random_mlp_weights(), folder / WEIGHTS_FILE)  # a pickle under the safetensors name
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        repository.load("pickled", 1)


def test_cache_loads_once_under_concurrency_and_evicts_lru(repository):
    for name in ("a", "b"):
        repository.publish(name, mnist_mlp_config(), _random_mlp_weights())
    one_model = repository.load("a", 1).nbytes
    cache = ModelCache(repository, max_bytes=int(one_model * 1.5))
    loaded = []
    threads = [threading.Thread(target=lambda: loaded.append(cache.get("a", 1))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.stats.loads == 1 and cache.stats.misses == 1 and cache.stats.hits == 7
    assert all(m is loaded[0] for m in loaded)
    cache.get("b", 1)
    assert cache.loaded() == [("b", 1)] and cache.stats.evictions == 1
    assert loaded[0].warmup_seconds > 0


def test_cache_resolves_latest_at_most_every_ttl(repository):
    cache = ModelCache(repository, latest_ttl_s=3600)
    assert cache.resolve(MNIST_MLP) == 1
    repository.publish(MNIST_MLP, mnist_mlp_config(), _random_mlp_weights())
    assert cache.resolve(MNIST_MLP) == 1  # cached
    assert ModelCache(repository, latest_ttl_s=0).resolve(MNIST_MLP) == 2
