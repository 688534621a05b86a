"""BERT-style sentence encoder: embeddings, N post-LN blocks of multi-head self-attention and a GELU MLP,
masked mean pooling, L2 normalization (the sentence-transformers recipe, e.g. all-MiniLM-L6-v2).

Weights use the Hugging Face `BertModel` names (`embeddings.word_embeddings.weight`,
`encoder.layer.{i}.attention.self.query.weight`, ...), so a BERT safetensors file publishes as is; the
`embeddings.position_ids` buffer and an unused pooler are dropped. Raw text in (V2 BYTES), tokenized by the
Hugging Face `tokenizer.json` stored in the version folder.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import kernels
from models import cuda_graphs
from models.architectures.base import Architecture
from models.artifact import (
    MAX_LAYERS,
    MAX_SEQUENCE,
    MAX_VOCAB,
    MAX_WIDTH,
    SCALE_SUFFIX,
    TOKENIZER_FILE,
    ArtifactError,
    TensorSpec,
    positive_int,
)
from models.text import PAD_MULTIPLE, WordPieceTokenizer, texts_of

HEAD_DIMS = (16, 32, 64, 128)
# A batch is encoded in groups of similar token length when a group saves at least this many padded positions
# (64 rows x 64 tokens, say: half of a batch of 256 whose short texts are 64 tokens shorter); smaller savings
# do not pay for the extra, less efficient forward.
MIN_SAVED_POSITIONS = 4096
# Graphs of at most this many token positions launch their kernels for programmatic dependent launch
# (MAAS_PDL=auto, see graph_buckets).
PDL_MAX_TOKENS = 4096
POSITIONS = "embeddings.positions"  # derived at load: position rows + the token-type-0 row
_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
            "intermediate.dense", "output.dense")
SAMPLE_SENTENCES = (
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "The new movie is awesome and the cast was great.",
    "Events flow through Kafka topics to stateless workers.",
    "A monkey is playing drums.",
    "Two men pushed carts through the woods.",
    "The cat sits outside.",
    "How do I bake bread at home?",
)


class TransformerEncoder(Architecture):
    """params: {"vocab_size": 30522, "hidden_size": 384, "num_layers": 6, "num_heads": 12,
    "intermediate_size": 1536, "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
    "max_length": 256, "normalize": true}.

    Input "text" BYTES [-1] (or [-1, 1]). Output "embedding" FP32 [-1, hidden_size].
    """

    name = "transformer_encoder"
    asset_files = (TOKENIZER_FILE,)

    @classmethod
    def _parse(cls, params: dict[str, Any]) -> dict[str, Any]:
        where = cls.name
        p = {key: positive_int(params, key, where, default, maximum) for key, default, maximum in (
            ("vocab_size", None, MAX_VOCAB), ("hidden_size", None, MAX_WIDTH), ("num_layers", None, MAX_LAYERS),
            ("num_heads", None, MAX_WIDTH), ("intermediate_size", None, MAX_WIDTH),
            ("max_position_embeddings", 512, MAX_SEQUENCE), ("type_vocab_size", 2, MAX_VOCAB),
            ("max_length", 256, MAX_SEQUENCE))}
        if p["hidden_size"] % p["num_heads"] or p["hidden_size"] // p["num_heads"] not in HEAD_DIMS:
            raise ArtifactError(f"{where}.params.num_heads: hidden_size / num_heads must be one of {HEAD_DIMS} "
                                f"(the attention kernel's head sizes), got {p['hidden_size']} / {p['num_heads']}")
        if p["max_length"] > p["max_position_embeddings"]:
            raise ArtifactError(f"{where}.params.max_length: {p['max_length']} exceeds max_position_embeddings "
                                f"{p['max_position_embeddings']}")
        eps = params.get("layer_norm_eps", 1e-12)
        if not isinstance(eps, float | int) or not 0 < eps < 1:
            raise ArtifactError(f"{where}.params.layer_norm_eps: expected a small positive number, got {eps!r}")
        p["layer_norm_eps"] = float(eps)
        p["normalize"] = bool(params.get("normalize", True))
        return p

    @classmethod
    def weight_shapes(cls, params: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        p = cls._parse(params)
        d, ff = p["hidden_size"], p["intermediate_size"]
        shapes: dict[str, tuple[int, ...]] = {
            "embeddings.word_embeddings.weight": (p["vocab_size"], d),
            "embeddings.position_embeddings.weight": (p["max_position_embeddings"], d),
            "embeddings.token_type_embeddings.weight": (p["type_vocab_size"], d),
            "embeddings.LayerNorm.weight": (d,),
            "embeddings.LayerNorm.bias": (d,),
        }
        for i in range(p["num_layers"]):
            layer = f"encoder.layer.{i}"
            for name, (n, k) in zip(_LINEARS, ((d, d), (d, d), (d, d), (d, d), (ff, d), (d, ff)), strict=True):
                shapes[f"{layer}.{name}.weight"], shapes[f"{layer}.{name}.bias"] = (n, k), (n,)
            for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
                shapes[f"{layer}.{norm}.weight"], shapes[f"{layer}.{norm}.bias"] = (d,), (d,)
        return shapes

    @classmethod
    def quantizable(cls, params: dict[str, Any]) -> list[str]:
        return [f"encoder.layer.{i}.{name}.weight" for i in range(cls._parse(params)["num_layers"])
                for name in _LINEARS]

    @classmethod
    def adapt_weights(cls, params: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in weights.items():
            key = key.removeprefix("bert.")
            if key == "embeddings.position_ids" or key.startswith("pooler."):
                continue
            out[key] = value
        return out

    def __init__(self, params: dict[str, Any], weights: dict[str, torch.Tensor], assets=None,
                 quantization: str | None = None) -> None:
        super().__init__(params, weights, assets, quantization)
        self.p = self._parse(params)
        self.weights = self._fuse_qkv(dict(self.weights), self.p["num_layers"])
        # Token type 0 for every token (single-segment input): its row joins the position rows once, here.
        self.weights[POSITIONS] = (self.weights["embeddings.position_embeddings.weight"]
                                   + self.weights["embeddings.token_type_embeddings.weight"][0])
        if self.tokenizer.size > self.p["vocab_size"]:
            raise ArtifactError(f"{TOKENIZER_FILE}: {self.tokenizer.size} tokens exceed "
                                f"{self.name}.params.vocab_size {self.p['vocab_size']}")

    @staticmethod
    def _fuse_qkv(weights: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
        """Each layer's query, key and value projections as one ``[3d, d]`` matrix (``...attention.self.qkv``,
        with bias and int8 scales alike): one GEMM that reads the hidden states once, whose output the
        attention kernel reads in place, instead of three GEMMs and three copies into head-major layout."""
        for i in range(num_layers):
            prefix = f"encoder.layer.{i}.attention.self"
            for suffix in ("weight", "bias", "weight" + SCALE_SUFFIX):
                names = [f"{prefix}.{part}.{suffix}" for part in ("query", "key", "value")]
                if names[0] in weights:
                    weights[f"{prefix}.qkv.{suffix}"] = torch.cat([weights.pop(name) for name in names])
        return weights

    @cached_property
    def tokenizer(self) -> WordPieceTokenizer:
        return WordPieceTokenizer(self.assets[TOKENIZER_FILE], self.p["max_length"])

    def encode(self, text: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer.encode(texts_of(text))
        return ids.to(self.device), mask.to(self.device)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The reference's embedding sum (the kernels path fuses it into its LayerNorm: kernels.embedding_norm)."""
        w = self.weights
        return (F.embedding(ids, w["embeddings.word_embeddings.weight"])
                + w["embeddings.position_embeddings.weight"][: ids.shape[1]]
                + w["embeddings.token_type_embeddings.weight"][0])

    def _dense_norm(self, x: torch.Tensor, block: str, residual: torch.Tensor) -> torch.Tensor:
        """``block.LayerNorm(block.dense(x) + residual)``, the end of each half of a post-LN block: one kernel
        where it pays (kernels.linear_layer_norm), float or int8 weights."""
        w = self.weights
        return kernels.linear_layer_norm(x, w[f"{block}.dense.weight"], w.get(f"{block}.dense.bias"), residual,
                                         w[f"{block}.LayerNorm.weight"], w[f"{block}.LayerNorm.bias"],
                                         self.p["layer_norm_eps"], scales=w.get(f"{block}.dense.weight{SCALE_SUFFIX}"))

    def _split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views ``[B, H, S, D]`` of q, k and v inside the fused projection's output ``[B, S, 3 * H * D]``."""
        b, s, _ = qkv.shape
        parts = qkv.view(b, s, 3, self.p["num_heads"], -1)
        return parts[:, :, 0].transpose(1, 2), parts[:, :, 1].transpose(1, 2), parts[:, :, 2].transpose(1, 2)

    def forward(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.forward_tokens(*self.encode(inputs["text"]))

    def run(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.run_tokens(*self.tokenizer.encode(texts_of(inputs["text"])))

    def run_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """What serving runs on token ids (on the CPU, as the tokenizer makes them; lengths read from a GPU
        mask cost a sync): the rows grouped by length (:func:`models.cuda_graphs.length_groups`), each group
        padded to its own length bucket only and encoded apart, replayed from its CUDA graph on a GPU (which
        takes the group's token ids and lengths from the CPU itself, through its pinned copies), launched kernel
        by kernel elsewhere; the results are put back in row order."""
        if self.device.type == "cuda" and cuda_graphs.enabled():
            encode = self.graphed
        else:
            def encode(ids: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
                return self.forward_lengths(self._to_device(ids), self._to_device(lengths))
        if mask.device.type == "cpu":  # in numpy: torch's bool sums on a CPU cost more
            lengths = torch.from_numpy(mask.numpy().sum(axis=1, dtype=np.int32))
        else:
            lengths = mask.sum(dim=1, dtype=torch.int32)
        groups = []  # a batch too small for any split to save enough: not grouped
        if mask.numel() >= MIN_SAVED_POSITIONS:
            groups = cuda_graphs.length_groups(lengths.cpu().numpy(), PAD_MULTIPLE, self.p["max_length"],
                                               MIN_SAVED_POSITIONS)
        if len(groups) <= 1:
            return encode(ids, lengths)
        # Each group's rows go to the device just before it runs, without waiting (pinned copies): on a GPU the
        # host gathers the next group while the previous one's replay runs.
        outputs: dict[str, torch.Tensor] = {}
        for length, rows in groups:
            index = torch.from_numpy(rows).to(ids.device)
            part = encode(ids.index_select(0, index)[:, :min(length, ids.shape[1])], lengths.index_select(0, index))
            index = self._to_device(index)
            for name, t in part.items():
                if name not in outputs:
                    outputs[name] = t.new_empty((ids.shape[0], *t.shape[1:]))
                outputs[name].index_copy_(0, index, t)
        return outputs

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return cuda_graphs.to_device(t, self.device)

    def graph_arguments(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """One graph's inputs, token ids and each row's length, on the CPU (`run` groups the rows first)."""
        ids, mask = self.tokenizer.encode(texts_of(inputs["text"]))
        return ids, mask.sum(dim=1, dtype=torch.int32)

    def graph_buckets(self) -> dict[str, Any]:
        # Batch x token length (the lengths bucketed along the batch only), padding rows of length 0; up to 64k
        # tokens per graph (256 x 256, 512 x 128): past that the launches are amortized anyway. Programmatic
        # dependent launch (MAAS_PDL=auto) in graphs of up to 4k tokens: on an H100 it won at 1 x 128 tokens (runs
        # 17 and 19: 0.251 -> 0.216 and 0.248 -> 0.236 ms a batch), while a batch of 256 (graphs of 128 x 64 and
        # 128 x 128) lost 7% in run 17 and 1% in run 19 (bench/results/gpu).
        return {"pad_values": (0, 0), "max_shape": (self.graph_max_batch, self.p["max_length"]),
                "min_shape": (1, PAD_MULTIPLE), "max_elements": 65536, "pdl_max_elements": PDL_MAX_TOKENS}

    def reference_forward(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.reference_forward_tokens(*self.encode(inputs["text"]))

    def forward_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The encoder on token ids ``[B, S]`` and their padding mask, right-padded as the tokenizer makes it
        (read as each row's length): what the GPU runs, timed apart from the tokenizer (which runs on the CPU
        whatever the device) by ``bench/models.py``."""
        return self.forward_lengths(ids, mask.sum(dim=1, dtype=torch.int32))

    def forward_lengths(self, ids: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """The encoder on token ids ``[B, S]`` whose row b holds ``lengths[b]`` tokens, then padding: what a CUDA
        graph records. The kernels take the padding as lengths (attention then skips the checks on full key
        tiles, pooling never reads padding), so a graph's inputs are the ids and the lengths, not the mask: no
        reduction over it in the graph, and one transfer less."""
        w, eps = self.weights, self.p["layer_norm_eps"]
        b, s = ids.shape
        h = kernels.embedding_norm(ids, w["embeddings.word_embeddings.weight"], w[POSITIONS],
                                   w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        for i in range(self.p["num_layers"]):
            layer = f"encoder.layer.{i}"
            q, k, v = self._split_heads(self.dense(h, f"{layer}.attention.self.qkv"))
            context = kernels.attention(q, k, v, key_lengths=lengths).transpose(1, 2).reshape(b, s, -1)  # a view
            h = self._dense_norm(context, f"{layer}.attention.output", h)
            h = self._dense_norm(self.dense(h, f"{layer}.intermediate.dense", "gelu"), f"{layer}.output", h)
        return {"embedding": kernels.mean_pool(h, lengths, normalize=self.p["normalize"])}

    forward_graph = forward_lengths

    def reference_forward_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        w, eps, d = self.weights, self.p["layer_norm_eps"], self.p["hidden_size"]
        b, s = ids.shape
        h = F.layer_norm(self._embed(ids), (d,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"],
                         eps)
        attn_mask = mask[:, None, None, :]
        for i in range(self.p["num_layers"]):
            layer = f"encoder.layer.{i}"
            q, k, v = self._split_heads(self.reference_dense(h, f"{layer}.attention.self.qkv"))
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(b, s, d)
            a = self.reference_dense(context, f"{layer}.attention.output.dense")
            h = F.layer_norm(a + h, (d,), w[f"{layer}.attention.output.LayerNorm.weight"],
                             w[f"{layer}.attention.output.LayerNorm.bias"], eps)
            f = self.reference_dense(self.reference_dense(h, f"{layer}.intermediate.dense", "gelu"),
                                     f"{layer}.output.dense")
            h = F.layer_norm(f + h, (d,), w[f"{layer}.output.LayerNorm.weight"], w[f"{layer}.output.LayerNorm.bias"],
                             eps)
        keep = mask[..., None].to(h.dtype)
        pooled = (h * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        return {"embedding": F.normalize(pooled, dim=-1) if self.p["normalize"] else pooled}

    def example_inputs(self, specs: tuple[TensorSpec, ...], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        texts = [SAMPLE_SENTENCES[i] for i in rng.integers(0, len(SAMPLE_SENTENCES), size=batch)]
        spec = next((sp for sp in specs if sp.name == "text"), None)
        shape = (batch, 1) if spec is not None and len(spec.shape) == 2 else (batch,)
        return {"text": np.array([t.encode() for t in texts], dtype=object).reshape(shape)}
