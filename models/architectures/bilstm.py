"""BiLSTM text classifier: embedding, bidirectional LSTM (final states of both directions), dense, softmax.

Default sizes follow the classic Keras example: embedding 10000 x 64, Bidirectional(LSTM(64)), Dense(64,
relu), Dense(10, softmax). The LSTM weights use torch's `nn.LSTM(bidirectional=True)` names, so a torch
state dict publishes as is. Raw text in (V2 BYTES), tokenized by the word index in `tokenizer.json`.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import kernels
from models.architectures.base import Architecture
from models.artifact import MAX_SEQUENCE, MAX_VOCAB, TOKENIZER_FILE, TensorSpec, positive_int
from models.text import WordIndexTokenizer, check_vocabulary, sample_sentences, texts_of

_DIRECTIONS = ("", "_reverse")


class BiLSTMClassifier(Architecture):
    """params: {"vocab_size": 10000, "embedding_dim": 64, "hidden_size": 64, "sequence_length": 32,
    "dense": 64, "num_classes": 10}.

    Input "text" BYTES [-1] (or [-1, 1]). Outputs "probabilities" FP32 [-1, num_classes], "class" INT64 [-1].
    """

    name = "bilstm_classifier"
    asset_files = (TOKENIZER_FILE,)

    @classmethod
    def _parse(cls, params: dict[str, Any]) -> tuple[int, int, int, int, int, int]:
        where = cls.name
        return (positive_int(params, "vocab_size", where, maximum=MAX_VOCAB),
                positive_int(params, "embedding_dim", where),
                positive_int(params, "hidden_size", where),
                positive_int(params, "sequence_length", where, maximum=MAX_SEQUENCE),
                positive_int(params, "dense", where), positive_int(params, "num_classes", where))

    @classmethod
    def weight_shapes(cls, params: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        vocab, emb, hidden, _, dense, classes = cls._parse(params)
        shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (vocab, emb)}
        for suffix in _DIRECTIONS:
            shapes[f"lstm.weight_ih_l0{suffix}"] = (4 * hidden, emb)
            shapes[f"lstm.weight_hh_l0{suffix}"] = (4 * hidden, hidden)
            shapes[f"lstm.bias_ih_l0{suffix}"] = (4 * hidden,)
            shapes[f"lstm.bias_hh_l0{suffix}"] = (4 * hidden,)
        shapes["dense.weight"], shapes["dense.bias"] = (dense, 2 * hidden), (dense,)
        shapes["output.weight"], shapes["output.bias"] = (classes, dense), (classes,)
        return shapes

    @classmethod
    def quantizable(cls, params: dict[str, Any]) -> list[str]:
        return ["dense.weight", "output.weight"]

    def __init__(self, params: dict[str, Any], weights: dict[str, torch.Tensor], assets=None,
                 quantization: str | None = None) -> None:
        super().__init__(params, weights, assets, quantization)
        self.vocab, self.emb, self.hidden, self.length, _, self.classes = self._parse(params)
        check_vocabulary(self.tokenizer, self.vocab, self.name)
        self._torch_lstm: tuple[tuple, torch.nn.LSTM] | None = None

    @cached_property
    def tokenizer(self) -> WordIndexTokenizer:
        return WordIndexTokenizer.from_json(self.assets[TOKENIZER_FILE])

    def _encode(self, text: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, S] on the device and lengths [B] on the CPU (>= 1: an empty text reads one pad)."""
        ids, mask = self.tokenizer.encode(texts_of(text), self.length)
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask.sum(axis=1).clip(min=1))

    def _head(self, final: torch.Tensor, dense, softmax) -> dict[str, torch.Tensor]:
        probabilities = softmax(dense(dense(final, "dense", "relu"), "output"))
        return {"probabilities": probabilities, "class": probabilities.argmax(dim=-1)}

    def forward(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.forward_graph(*self.graph_arguments(inputs))

    def graph_arguments(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, lengths = self._encode(inputs["text"])  # a fixed length: graphs bucket the batch only
        return ids, lengths.to(ids.device)

    def graph_buckets(self) -> dict[str, Any]:
        return {"pad_values": (0, 1), "max_shape": (self.graph_max_batch,)}  # a padding row reads one pad token

    def forward_graph(self, ids: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """The classifier on token ids ``[B, S]`` and lengths ``[B]``, both on the model's device. Where
        ``kernels.lstm`` would run its torch path (a CPU), torch's fused bidirectional LSTM gives the final
        states at once: two one-way passes that return every state took 1.5-3x as long on this project's VM."""
        x = F.embedding(ids, self.weights["embedding.weight"])
        if kernels.backend_for(x) == "torch":
            final = self._fused_final_states(x, lengths)
        else:
            w = self.weights
            rows = torch.arange(ids.shape[0], device=ids.device)
            forward = kernels.lstm(x, w["lstm.weight_ih_l0"], w["lstm.weight_hh_l0"],
                                   w["lstm.bias_ih_l0"] + w["lstm.bias_hh_l0"], lengths)
            backward = kernels.lstm(x, w["lstm.weight_ih_l0_reverse"], w["lstm.weight_hh_l0_reverse"],
                                    w["lstm.bias_ih_l0_reverse"] + w["lstm.bias_hh_l0_reverse"], lengths, reverse=True)
            # Final states: the forward pass ends at each sequence's last token, the backward pass at position 0.
            final = torch.cat([forward[rows, lengths - 1], backward[:, 0]], dim=-1)
        return self._head(final, lambda h, p, act="none": self.dense(h, p, act), kernels.softmax)

    def _fused_final_states(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Both directions' final states ``[B, 2H]`` from torch's fused bidirectional LSTM over the packed batch."""
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self._reference_lstm()(packed)
        return torch.cat([h_n[0], h_n[1]], dim=-1)

    def _reference_lstm(self) -> torch.nn.LSTM:
        key = (self.device, self.dtype)
        if self._torch_lstm is None or self._torch_lstm[0] != key:
            module = torch.nn.LSTM(self.emb, self.hidden, batch_first=True, bidirectional=True)
            module.load_state_dict({k[len("lstm."):]: v for k, v in self.weights.items() if k.startswith("lstm.")})
            module.requires_grad_(False)
            self._torch_lstm = (key, module.to(device=self.device, dtype=self.dtype).eval())
        return self._torch_lstm[1]

    def reference_forward(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids, lengths = self._encode(inputs["text"])
        x = F.embedding(ids, self.weights["embedding.weight"])
        final = self._fused_final_states(x, lengths)
        return self._head(final, lambda h, p, act="none": self.reference_dense(h, p, act),
                          lambda t: torch.softmax(t, dim=-1))

    def example_inputs(self, specs: tuple[TensorSpec, ...], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        return sample_sentences(self.tokenizer.words, specs, batch, seed, length=min(self.length, 16))
