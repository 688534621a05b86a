"""Example artifacts, trained for a moment on generated data so their answers can be checked.

`synthetic_digits` draws 28x28 "digits": ten fixed random stroke patterns plus noise. A model trained on
them should classify fresh samples almost perfectly, which gives the demo and tests a real accuracy to
check instead of random outputs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.artifact import BatchingPolicy, ModelConfig, TensorSpec
from models.repository import ModelRepository

MNIST_MLP = "mnist_mlp"
_PROTOTYPE_SEED = 20261125


def _prototypes() -> np.ndarray:
    rng = np.random.default_rng(_PROTOTYPE_SEED)
    return (rng.random((10, 784)) < 0.2).astype(np.float32)


def synthetic_digits(n: int, seed: int = 0, noise: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """n samples of shape [784] (float32 in [0, 1]) and their labels (int64)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    images = _prototypes()[labels] + rng.normal(0.0, noise, size=(n, 784)).astype(np.float32)
    return np.clip(images, 0.0, 1.0).astype(np.float32), labels.astype(np.int64)


def mnist_mlp_config(max_batch_size: int = 64, max_queue_delay_ms: float = 5.0) -> ModelConfig:
    return ModelConfig(
        architecture="mlp",
        params={"layers": [784, 128, 10], "activations": ["relu", "none"], "head": "softmax"},
        inputs=(TensorSpec("input", "FP32", (-1, 784)),),
        outputs=(TensorSpec("probabilities", "FP32", (-1, 10)), TensorSpec("class", "INT64", (-1,))),
        batching=BatchingPolicy(max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms),
        description="MNIST-style classifier 784 -> 128 (ReLU) -> 10 (softmax), trained on synthetic digits",
    )


def train_mnist_mlp(steps: int = 150, seed: int = 0) -> dict[str, torch.Tensor]:
    """A few seconds of Adam on synthetic digits; returns the state dict in the artifact's naming."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    images, labels = synthetic_digits(steps * 64, seed=seed + 1)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    for step in range(steps):
        batch = slice(step * 64, (step + 1) * 64)
        loss = F.cross_entropy(net(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {
        "layers.0.weight": net[0].weight.detach(),
        "layers.0.bias": net[0].bias.detach(),
        "layers.1.weight": net[2].weight.detach(),
        "layers.1.bias": net[2].bias.detach(),
    }


def ensure_examples(repository: ModelRepository) -> list[tuple[str, int]]:
    """Publish the example models that the repository lacks; returns what was published."""
    published = []
    if not repository.versions(MNIST_MLP):
        version = repository.publish(MNIST_MLP, mnist_mlp_config(), train_mnist_mlp())
        published.append((MNIST_MLP, version))
    return published
