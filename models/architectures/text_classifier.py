"""Text classifier: token embedding, masked mean pooling, dense layers; raw text in (V2 BYTES)."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import kernels
from models.architectures.base import Architecture, dense_head_shapes, texts_of
from models.artifact import TOKENIZER_FILE, ArtifactError, TensorSpec, positive_int
from models.text import WordIndexTokenizer

HEADS = ("sigmoid", "softmax")


def parse_hidden(params: dict[str, Any], where: str) -> list[int]:
    hidden = params.get("hidden", [])
    if not isinstance(hidden, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                               for d in hidden):
        raise ArtifactError(f"{where}.params.hidden: expected a list of positive integers, got {hidden!r}")
    return hidden


def sample_sentences(words: list[str], specs: tuple[TensorSpec, ...], batch: int, seed: int,
                     length: int = 8) -> dict[str, np.ndarray]:
    """`batch` sentences of vocabulary words (plus one unknown word each) for the "text" input (BYTES)."""
    rng = np.random.default_rng(seed)
    pool = words[:200] or ["hello"]
    texts = [" ".join([*rng.choice(pool, size=max(1, length - 1)).tolist(), "zzunknownzz"]) for _ in range(batch)]
    spec = next((s for s in specs if s.name == "text"), None)
    shape = (batch, 1) if spec is not None and len(spec.shape) == 2 else (batch,)
    return {"text": np.array([t.encode() for t in texts], dtype=object).reshape(shape)}


class TextClassifier(Architecture):
    """params: {"vocab_size": 1000, "embedding_dim": 16, "sequence_length": 10, "hidden": [16],
    "num_classes": 1, "head": "sigmoid"}; the word index lives in `tokenizer.json`.

    Input "text" BYTES [-1] (or [-1, 1]). Outputs "scores" FP32 [-1, num_classes] (sigmoid or softmax) and
    "label" INT64 [-1] (score > 0.5 for one sigmoid output, else the argmax).
    """

    name = "text_classifier"
    asset_files = (TOKENIZER_FILE,)

    @classmethod
    def _parse(cls, params: dict[str, Any]) -> tuple[int, int, int, list[int], int, str]:
        where = cls.name
        vocab = positive_int(params, "vocab_size", where)
        dim = positive_int(params, "embedding_dim", where)
        length = positive_int(params, "sequence_length", where)
        hidden = parse_hidden(params, where)
        classes = positive_int(params, "num_classes", where, default=1)
        head = params.get("head", "sigmoid")
        if head not in HEADS:
            raise ArtifactError(f"{where}.params.head: {head!r} is not one of {HEADS}")
        return vocab, dim, length, hidden, classes, head

    @classmethod
    def weight_shapes(cls, params: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        vocab, dim, _, hidden, classes, _ = cls._parse(params)
        return {"embedding.weight": (vocab, dim), **dense_head_shapes(dim, hidden, classes)}

    @classmethod
    def quantizable(cls, params: dict[str, Any]) -> list[str]:
        return [n for n in cls.weight_shapes(params) if n.endswith(".weight") and n != "embedding.weight"]

    def __init__(self, params: dict[str, Any], weights: dict[str, torch.Tensor], assets=None,
                 quantization: str | None = None) -> None:
        super().__init__(params, weights, assets, quantization)
        self.vocab, _, self.length, self.hidden, self.classes, self.head = self._parse(params)
        if self.tokenizer.size > self.vocab:
            raise ArtifactError(f"{TOKENIZER_FILE}: {self.tokenizer.size} ids (words + padding + OOV) exceed "
                                f"{self.name}.params.vocab_size {self.vocab}")

    @cached_property
    def tokenizer(self) -> WordIndexTokenizer:
        return WordIndexTokenizer.from_json(self.assets[TOKENIZER_FILE])

    def encode(self, text: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer.encode(texts_of(text), self.length)
        return ids.to(self.device), mask.to(self.device)

    def _outputs(self, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.head == "sigmoid" and self.classes == 1:
            label = (scores[:, 0] > 0.5).to(torch.int64)
        else:
            label = scores.argmax(dim=-1)
        return {"scores": scores, "label": label}

    def forward(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.forward_graph(*self.graph_arguments(inputs))

    def graph_arguments(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(inputs["text"])  # tokenized on the CPU to a fixed length: graphs bucket the batch only

    def graph_buckets(self) -> dict[str, Any]:
        return {"pad_values": (0, False), "max_shape": (self.graph_max_batch,)}

    def forward_graph(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The classifier on token ids ``[B, S]`` and their mask, both on the model's device."""
        h = kernels.embedding_pool(ids, self.weights["embedding.weight"], mask)
        for i in range(len(self.hidden)):
            h = self.dense(h, f"dense.{i}", "relu")
        if self.head == "sigmoid":
            return self._outputs(self.dense(h, "output", "sigmoid"))
        return self._outputs(kernels.softmax(self.dense(h, "output")))

    def reference_forward(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids, mask = self.encode(inputs["text"])
        rows = F.embedding(ids, self.weights["embedding.weight"]) * mask[..., None].to(self.dtype)
        h = rows.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1).to(self.dtype)
        for i in range(len(self.hidden)):
            h = self.reference_dense(h, f"dense.{i}", "relu")
        logits = self.reference_dense(h, "output")
        return self._outputs(torch.sigmoid(logits) if self.head == "sigmoid" else torch.softmax(logits, dim=-1))

    def example_inputs(self, specs: tuple[TensorSpec, ...], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        return sample_sentences(self.tokenizer.words, specs, batch, seed, length=self.length)
