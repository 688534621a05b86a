"""Text classifier: token embedding, masked mean pooling, dense layers; raw text in (V2 BYTES)."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import kernels
from models.architectures.base import Architecture
from models.artifact import TOKENIZER_FILE, TensorSpec
from models.params import TextClassifierParams
from models.text import WordIndexTokenizer, check_vocabulary, sample_sentences, texts_of


class TextClassifier(Architecture):
    """params: {"vocab_size": 1000, "embedding_dim": 16, "sequence_length": 10, "hidden": [16],
    "num_classes": 1, "head": "sigmoid"}; the word index lives in `tokenizer.json`.

    Input "text" BYTES [-1] (or [-1, 1]). Outputs "scores" FP32 [-1, num_classes] (sigmoid or softmax) and
    "label" INT64 [-1] (score > 0.5 for one sigmoid output, else the argmax).
    """

    name = "text_classifier"
    graph_max_batch = 4096  # one embedding-pool launch and a few small GEMMs: launch-bound at any batch
    asset_files = (TOKENIZER_FILE,)

    @classmethod
    def weight_shapes(cls, params: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        return TextClassifierParams.parse(params).weight_shapes()

    @classmethod
    def quantizable(cls, params: dict[str, Any]) -> list[str]:
        return TextClassifierParams.parse(params).quantizable()

    def __init__(self, params: dict[str, Any], weights: dict[str, torch.Tensor], assets=None,
                 quantization: str | None = None) -> None:
        super().__init__(params, weights, assets, quantization)
        p = TextClassifierParams.parse(params)
        self.vocab, self.length, self.hidden, self.classes, self.head = (
            p.vocab_size, p.sequence_length, list(p.hidden), p.num_classes, p.head)
        check_vocabulary(self.tokenizer, self.vocab, self.name)

    @cached_property
    def tokenizer(self) -> WordIndexTokenizer:
        return WordIndexTokenizer.from_json(self.assets[TOKENIZER_FILE])

    def encode(self, text: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer.encode(texts_of(text), self.length)
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)

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
