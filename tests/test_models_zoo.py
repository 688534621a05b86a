"""The model zoo: every architecture against its plain-torch twin (torch and Triton-interpreter kernels), the
real all-MiniLM-L6-v2 weights, trained examples, int8 publishing, safe checkpoint reading, the S3 repository
(real moto server) and the warm cache over it."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from s3_support import assert_names_no_location, unreachable_s3

from kernels.dispatch import INTERPRETER
from models.architectures import ARCHITECTURES, build
from models.artifact import TOKENIZER_FILE, WEIGHTS_FILE, ArtifactError, ModelConfig, TensorSpec, read_weights
from models.cache import ModelCache
from models.examples import (
    MINILM,
    MNIST_MLP,
    bilstm_config,
    minilm_artifact,
    minilm_folder,
    mnist_mlp_config,
    regression_inputs,
    regression_target,
    regressor_config,
    sentiment_config,
    synthetic_reviews,
    train_regressor,
    train_sentiment,
)
from models.loaded import LoadedModel, repeat_rows
from models.publish import publish_model, read_checkpoint, read_source
from models.repository import ModelNotFoundError, ModelRepository, RepositoryError, open_repository
from models.s3_repository import S3ModelRepository, parse_s3_uri
from models.text import WordIndexTokenizer
from pipeline.engine import InferenceEngine
from pipeline.errors import ErrorCode, InferenceError
from pipeline.protocol import InferenceRequest
from pipeline.services import aws_client

WORDS = [f"w{i}" for i in range(40)]
WORD_TOKENIZER = WordIndexTokenizer(WORDS).to_json()


def _texts(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice([*WORDS, "unknownword"], size=int(rng.integers(1, 9)))) for _ in range(n)]
    texts[0] = ""  # an empty text: no tokens at all
    return np.array([t.encode() for t in texts], dtype=object)


def _minilm_tokenizer() -> bytes:
    return (minilm_folder() / TOKENIZER_FILE).read_bytes()


def _text_spec() -> tuple[TensorSpec, ...]:
    return (TensorSpec("text", "BYTES", (-1,)),)


# Small configurations of every architecture: (params, inputs maker, assets maker, input specs)
SMALL = {
    "mlp": ({"layers": [12, 16, 5], "activations": ["gelu", "none"], "head": "softmax"},
            lambda n: {"input": torch.randn(n, 12)}, dict, (TensorSpec("input", "FP32", (-1, 12)),)),
    "text_classifier": ({"vocab_size": 50, "embedding_dim": 16, "sequence_length": 6, "hidden": [16],
                         "num_classes": 3, "head": "softmax"},
                        lambda n: {"text": _texts(n)}, lambda: {TOKENIZER_FILE: WORD_TOKENIZER}, _text_spec()),
    "cnn": ({"input_shape": [10, 10, 3], "conv": [{"filters": 16, "kernel": 3, "pool": 2},
                                                   {"filters": 16, "kernel": 2, "pool": 0}],
             "dense": [16], "num_classes": 4},
            lambda n: {"input": torch.rand(n, 10, 10, 3)}, dict, (TensorSpec("input", "FP32", (-1, 10, 10, 3)),)),
    "bilstm_classifier": ({"vocab_size": 50, "embedding_dim": 16, "hidden_size": 16, "sequence_length": 5,
                           "dense": 16, "num_classes": 3},
                          lambda n: {"text": _texts(n, 1)}, lambda: {TOKENIZER_FILE: WORD_TOKENIZER}, _text_spec()),
    "transformer_encoder": ({"vocab_size": 30522, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                             "intermediate_size": 64, "max_position_embeddings": 64, "max_length": 16},
                            lambda n: {"text": np.array([b"Hello world!", b"A much longer sentence about models.",
                                                         b"x"][:n], dtype=object)},
                            lambda: {TOKENIZER_FILE: _minilm_tokenizer()}, _text_spec()),
}


def _random_weights(cls, params: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * 0.3 for name, shape in cls.weight_shapes(params).items()}


def _small_model(arch: str, seed: int):
    """A SMALL architecture with random weights (``seed``) and three rows of its inputs (``seed + 1``)."""
    params, make_inputs, assets, _ = SMALL[arch]
    cls = ARCHITECTURES[arch]
    model = cls(params, _random_weights(cls, params, seed=seed), assets())
    torch.manual_seed(seed + 1)
    return model, make_inputs(3)


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert set(got) == set(want)
    for name in want:
        if want[name].is_floating_point():
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=atol, msg=name)
        else:
            assert torch.equal(got[name], want[name]), name


def test_an_encoder_whose_max_length_is_no_multiple_of_16_takes_texts_longer_than_it():
    params = {**SMALL["transformer_encoder"][0], "max_position_embeddings": 40, "max_length": 40}
    cls = ARCHITECTURES["transformer_encoder"]
    model = cls(params, _random_weights(cls, params), {TOKENIZER_FILE: _minilm_tokenizer()})
    texts = np.array([b"word " * 30, b"word " * 38, b"word " * 100, b"short"], dtype=object)
    ids, mask = model.encode(texts)
    assert ids.shape == (4, 40)  # padded up to 48 by the tokenizer, then cut to max_length
    assert mask[1:3].all() and mask[0].sum() == 32
    with torch.inference_mode():
        got = model.run({"text": texts})["embedding"]
        want = model.reference_forward({"text": texts})["embedding"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_every_architecture_is_registered():
    # `identity` has no weights and no twin: tests/test_codec_roundtrip.py covers it.
    assert set(SMALL) == set(ARCHITECTURES) - {"identity"}


@pytest.mark.parametrize("quantization", [None, "int8"])
@pytest.mark.parametrize("arch", sorted(SMALL))
def test_architecture_matches_its_plain_torch_twin(arch, quantization):
    params, make_inputs, assets, _ = SMALL[arch]
    cls = ARCHITECTURES[arch]
    weights = _random_weights(cls, params)
    if quantization:
        if not cls.quantizable(params):
            pytest.skip(f"{arch} has no dense layer to quantize")
        weights = cls.quantize_weights(params, weights)
    model = cls(params, weights, assets(), quantization)
    torch.manual_seed(1)
    inputs = make_inputs(3)
    _close(model.forward(inputs), model.reference_forward(inputs), atol=1e-5)


@pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1 before kernels is imported")
@pytest.mark.parametrize("arch", sorted(SMALL))
def test_architecture_on_triton_kernels_matches_its_twin(arch, monkeypatch):
    """The same, with every op forced onto its Triton kernel (the interpreter on this CPU)."""
    model, inputs = _small_model(arch, seed=2)
    want = model.reference_forward(inputs)
    monkeypatch.setenv("MAAS_KERNEL_BACKEND", "triton")
    _close(model.forward(inputs), want, atol=1e-4)


@pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1 before kernels is imported")
def test_encoder_with_its_projections_and_norms_fused_matches_its_twin(monkeypatch):
    """The transformer's block ends on kernels.linear_layer_norm's fused kernel (timed against the separate
    ops on a GPU, forced here)."""
    model, inputs = _small_model("transformer_encoder", seed=3)
    want = model.reference_forward(inputs)
    monkeypatch.setenv("MAAS_KERNEL_BACKEND", "triton")
    monkeypatch.setenv("MAAS_LINEAR_LAYER_NORM", "1")
    _close(model.forward(inputs), want, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_a_batch_padded_into_its_graph_bucket_gives_the_unpadded_rows(arch):
    """What CUDA-graph serving runs (``graph_arguments`` padded to a bucket, then ``forward_graph``), here
    with capture off: padding rows and positions must change no real row."""
    model, inputs = _small_model(arch, seed=4)
    arguments = model.graph_arguments(inputs)
    assert arguments is not None, f"{arch} is not served from CUDA graphs"
    with torch.inference_mode():
        got = model.graphed(*arguments)
        want = model.forward(inputs)
    assert len(model.graphed) == 1  # one bucket (4 rows) was filled and run
    _close(got, want, atol=1e-5)


def test_bytes_inputs_may_be_a_column_and_outputs_follow_the_config(tmp_path):
    repo = ModelRepository(tmp_path)
    params, _, assets, _ = SMALL["bilstm_classifier"]
    config = ModelConfig("bilstm_classifier", params, (TensorSpec("text", "BYTES", (-1, 1)),),
                         (TensorSpec("probabilities", "FP32", (-1, 3)), TensorSpec("class", "INT64", (-1,))))
    repo.publish("topics", config, _random_weights(ARCHITECTURES["bilstm_classifier"], params), assets())
    model = ModelCache(repo).get("topics", 1)  # warmed up with generated [1, 1] text
    out = model.infer({"text": _texts(4).reshape(4, 1)})
    assert out["probabilities"].shape == (4, 3) and out["class"].dtype == np.int64
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)


def test_weights_and_assets_that_disagree_with_the_config_are_refused(tmp_path):
    repo = ModelRepository(tmp_path)
    cls = ARCHITECTURES["cnn"]
    params = SMALL["cnn"][0]
    weights = _random_weights(cls, params)
    weights["conv.1.weight"] = torch.zeros(16, 16, 3, 3)
    config = ModelConfig("cnn", params, (TensorSpec("input", "FP32", (-1, 10, 10, 3)),),
                         (TensorSpec("class", "INT64", (-1,)),))
    with pytest.raises(ArtifactError, match=r"tensor 'conv.1.weight' has shape \[16, 16, 3, 3\], the config "
                                            r"implies \[16, 16, 2, 2\]"):
        repo.publish("img", config, weights)
    bad = replace(config, params={**params, "conv": [{"filters": 16, "kernel": 11}]})
    with pytest.raises(ArtifactError, match=r"cnn.params.conv\[0\]: the image shrinks to 0x0"):
        repo.publish("img", bad, weights)
    text = ModelConfig("text_classifier", {**SMALL["text_classifier"][0], "vocab_size": 30}, _text_spec(),
                       (TensorSpec("label", "INT64", (-1,)),))
    with pytest.raises(ArtifactError, match="text_classifier: the artifact lacks file"):
        repo.publish("t", text, _random_weights(ARCHITECTURES["text_classifier"], text.params))
    with pytest.raises(ArtifactError, match=r"42 ids .* exceed text_classifier\.params\.vocab_size 30"):
        repo.publish("t", text, _random_weights(ARCHITECTURES["text_classifier"], text.params),
                     {TOKENIZER_FILE: WORD_TOKENIZER})
    enc = ModelConfig("transformer_encoder", {**SMALL["transformer_encoder"][0], "num_heads": 3}, _text_spec(),
                      (TensorSpec("embedding", "FP32", (-1, 32)),))
    with pytest.raises(ArtifactError, match=r"transformer_encoder\.params\.num_heads"):
        repo.publish("e", enc, {}, {TOKENIZER_FILE: _minilm_tokenizer()})


@pytest.fixture(scope="module")
def minilm_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("minilm_repo")
    config, weights, assets = minilm_artifact()
    ModelRepository(root).publish(MINILM, config, weights, assets)
    return root


def test_minilm_real_weights_match_a_plain_torch_encoder(minilm_root):
    model = ModelRepository(minilm_root).load(MINILM, 1, torch.device("cpu"))
    assert model.config.outputs[0].shape == (-1, 384) and model.config.inputs[0].datatype == "BYTES"
    texts = np.array([b"A man is eating food.", b"A man is eating a piece of bread.",
                      b"The girl is carrying a baby."], dtype=object)
    got = model.infer({"text": texts})["embedding"]
    with torch.inference_mode():
        want = model.architecture.reference_forward({"text": texts})["embedding"].numpy()
    assert got.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    cosine = (got * want).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= 0.999, cosine
    similarity = got @ got.T  # the sentence-transformers documentation's example pair scores 0.7553
    assert abs(similarity[0, 1] - 0.7553) < 0.01 and similarity[0, 2] < 0.1


def test_minilm_int8_stays_close_to_float(minilm_root, tmp_path):
    repo = ModelRepository(tmp_path)
    config, weights, assets = minilm_artifact()
    result = publish_model(repo, "minilm8", config, weights, assets, quantize="int8")
    assert result.config.quantization == "int8"
    assert result.quantization_report["embedding"]["min_cosine"] > 0.995
    model = repo.load("minilm8", result.version, torch.device("cpu"))
    assert model.architecture.weights["encoder.layer.0.attention.self.qkv.weight"].dtype == torch.int8
    assert model.nbytes < 0.7 * ModelRepository(minilm_root).load(MINILM, 1, torch.device("cpu")).nbytes


def test_regressor_example_learns_its_known_function(tmp_path):
    repo = ModelRepository(tmp_path)
    version = repo.publish("regressor_mlp", regressor_config(), train_regressor())
    model = repo.load("regressor_mlp", version, torch.device("cpu"))
    x = regression_inputs(512, seed=99)
    y = regression_target(x)
    out = model.infer({"input": x})["output"]
    r2 = 1 - ((out - y) ** 2).sum() / ((y - y.mean(axis=0)) ** 2).sum()
    assert r2 > 0.97 and np.sqrt(((out - y) ** 2).mean()) < 0.15

    result = publish_model(repo, "regressor_int8", regressor_config(), train_regressor(), quantize="int8")
    stats = result.quantization_report["output"]
    assert 0 < stats["max_abs_diff"] < 0.05 and stats["min_cosine"] > 0.999
    quantized = repo.load("regressor_int8", result.version, torch.device("cpu")).infer({"input": x})["output"]
    assert np.abs(quantized - out).max() < 0.1


@pytest.mark.parametrize("dtype", ["BF16", "FP16"])
def test_a_half_precision_model_publishes_with_and_without_int8(tmp_path, dtype):
    repo = ModelRepository(tmp_path)
    config = replace(regressor_config(), dtype=dtype)
    assert publish_model(repo, "half", config, train_regressor()).version == 1
    result = publish_model(repo, "half", config, train_regressor(), quantize="int8")
    assert result.version == 2 and result.quantization_report["output"]["min_cosine"] > 0.99
    served = repo.load("half", 1, torch.device("cpu"))
    assert served.architecture.weights["layers.0.weight"].dtype == getattr(torch, {"BF16": "bfloat16",
                                                                                 "FP16": "float16"}[dtype])
    x = regression_inputs(8, seed=5)
    assert np.abs(served.infer({"input": x})["output"] - regression_target(x)).max() < 0.5


def test_sentiment_example_classifies_raw_text_through_the_cache(tmp_path):
    repo = ModelRepository(tmp_path)
    weights, assets = train_sentiment()
    repo.publish("sentiment_text", sentiment_config(), weights, assets)
    assert json.loads((tmp_path / "sentiment_text" / "1" / TOKENIZER_FILE).read_text())["type"] == "word_index"
    texts, labels = synthetic_reviews(256, seed=4321)
    model = ModelCache(repo).get("sentiment_text", 1)
    out = model.infer({"text": np.array([t.encode() for t in texts], dtype=object)})
    assert out["scores"].shape == (256, 1)
    assert (out["label"] == labels).mean() > 0.9
    plain = model.infer({"text": np.array([b"What a wonderful, delightful film", b"boring and awful"],
                                          dtype=object)})
    assert plain["label"].tolist() == [1, 0]


def test_torch_checkpoints_are_read_with_weights_only(tmp_path):
    weights = {"layers.0.weight": torch.randn(3, 2), "layers.0.bias": torch.randn(3)}
    torch.save({"state_dict": weights}, tmp_path / "ok.pt")
    assert torch.equal(read_checkpoint(tmp_path / "ok.pt")["layers.0.weight"], weights["layers.0.weight"])
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"layers.0.weight": Evil()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(ArtifactError, match="weights_only=True"):
        read_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    (tmp_path / "weights.pkl").write_bytes(b"not even a pickle")
    with pytest.raises(ArtifactError, match=r"expected a \.safetensors file or a torch state dict"):
        read_checkpoint(tmp_path / "weights.pkl")


def test_publish_source_folder_converts_a_hugging_face_bert_folder():
    source = read_source(minilm_folder())
    assert source.config is not None and source.config.architecture == "transformer_encoder"
    assert source.config.params["num_layers"] == 6 and TOKENIZER_FILE in source.assets
    assert "embeddings.position_ids" in source.weights  # dropped by the architecture at publish time


# --- S3 -------------------------------------------------------------------------------------------------------
@pytest.fixture
def s3(live):
    return aws_client(live, "s3")


def test_s3_uris_and_names_are_validated():
    assert parse_s3_uri("s3://my-bucket/models/prod") == ("my-bucket", "models/prod")
    assert parse_s3_uri("s3://my-bucket") == ("my-bucket", "")
    for bad in ("s3://my-bucket/../etc", "s3://my-bucket/a/..", "s3://My_Bucket/x", "s3://b/x y", "http://b/x"):
        with pytest.raises(RepositoryError):
            parse_s3_uri(bad)
    with pytest.raises(RepositoryError, match="expected a local folder or an s3://"):
        open_repository("gs://bucket/models")


def test_the_default_s3_cache_folder_is_private_to_its_user(tmp_path, monkeypatch):
    """Under a shared /tmp, another user who made the cache folder first could swap a version's files between their
    sha256 check and their load."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = tmp_path / f"maas-model-cache-{os.getuid()}"
    assert S3ModelRepository("s3://bucket/models", None).cache_dir == folder / "bucket" / "models"
    assert folder.stat().st_mode & 0o777 == 0o700
    folder.chmod(0o777)  # as one made by someone else, or by a umask that lets others write, would be
    with pytest.raises(RepositoryError, match=rf"the model cache folder {folder} is not a folder of this user's"):
        S3ModelRepository("s3://bucket/models", None)
    assert S3ModelRepository("s3://bucket/models", None, cache_dir=tmp_path / "mine").cache_dir.parent.parent == (
        tmp_path / "mine")  # a folder MAAS_MODEL_CACHE_DIR names (a mounted volume) is the operator's to secure


def test_s3_repository_publish_list_load_and_cache(live, s3, tmp_path, repository):
    uri = f"s3://{live.batch_bucket}/zoo/prod"
    repo = open_repository(uri, lambda: s3, cache_dir=tmp_path / "cache")
    assert isinstance(repo, S3ModelRepository) and repo.names() == []
    weights, assets = train_sentiment(steps=60)
    mnist = read_weights(repository.local_folder(MNIST_MLP, 1))
    assert repo.publish(MNIST_MLP, mnist_mlp_config(), mnist) == 1
    assert repo.publish(MNIST_MLP, mnist_mlp_config(), mnist) == 2
    assert repo.publish("sentiment_text", sentiment_config(), weights, assets) == 1
    assert repo.names() == [MNIST_MLP, "sentiment_text"] and repo.versions(MNIST_MLP) == [1, 2]
    assert repo.resolve(MNIST_MLP) == 2 and repo.config(MNIST_MLP, 1).files[WEIGHTS_FILE]
    stored = (repository.local_folder(MNIST_MLP, 1) / WEIGHTS_FILE).stat().st_size
    assert repo.weights_nbytes(MNIST_MLP, 2) == stored and repo.weights_nbytes(MNIST_MLP, 3) is None
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=live.batch_bucket, Prefix="zoo/")["Contents"])
    assert "zoo/prod/sentiment_text/1/tokenizer.json" in keys and "zoo/prod/mnist_mlp/2/config.json" in keys
    with pytest.raises(ModelNotFoundError, match="has no version 3"):
        repo.resolve(MNIST_MLP, 3)
    with pytest.raises(ModelNotFoundError, match="invalid"):
        repo.resolve("../mnist_mlp")

    cache = ModelCache(repo)
    loaded = []
    threads = [threading.Thread(target=lambda: loaded.append(cache.get("sentiment_text", 1))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.stats.loads == 1 and all(m is loaded[0] for m in loaded)
    out = loaded[0].infer({"text": np.array([b"great fun", b"awful waste"], dtype=object)})
    assert out["scores"].shape == (2, 1)
    assert (tmp_path / "cache" / live.batch_bucket / "zoo/prod" / "sentiment_text" / "1" / TOKENIZER_FILE).exists()
    digits = cache.get(MNIST_MLP, cache.resolve(MNIST_MLP)).infer({"input": np.zeros((1, 784), np.float32)})
    assert digits["probabilities"].shape == (1, 10)

    # A corrupted object is refused by a cold cache, while a warm cache folder keeps serving the verified copy.
    s3.put_object(Bucket=live.batch_bucket, Key="zoo/prod/mnist_mlp/2/model.safetensors", Body=b"corrupt")
    cold = open_repository(uri, lambda: s3, cache_dir=tmp_path / "cold")
    with pytest.raises(ArtifactError, match=r"^mnist_mlp/2/model\.safetensors: sha256 .* differs"):
        cold.load(MNIST_MLP, 2)
    assert not (tmp_path / "cold" / live.batch_bucket / "zoo/prod" / MNIST_MLP / "2").exists()
    warm = open_repository(uri, lambda: s3, cache_dir=tmp_path / "cache")
    assert warm.load(MNIST_MLP, 2).nbytes > 0


class _PausedListing(S3ModelRepository):
    """Pauses a listing of the whole store once, when it has listed and before `_listed` keeps what it found."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pause = False
        self.listed, self.resume = threading.Event(), threading.Event()

    def _index(self, name: str | None = None) -> dict[str, list[int]]:
        index = super()._index(name)
        if name is None and self.pause:
            self.pause = False
            self.listed.set()
            self.resume.wait(10)
        return index


def test_a_publish_during_a_listing_is_seen_at_once_by_the_repositorys_callers(live, s3, tmp_path, repository):
    """A listing under way (a request's lookup, in a thread) while this repository published a version finished after
    the publish had dropped the kept listing, and kept its own, from before the publish: the new version stayed
    unseen for listing_ttl_s, although a publish is to be seen at once by the repository's callers."""
    repo = _PausedListing(f"s3://{live.batch_bucket}/race", s3, cache_dir=tmp_path / "cache")
    mnist = read_weights(repository.local_folder(MNIST_MLP, 1))
    assert repo.publish(MNIST_MLP, mnist_mlp_config(), mnist) == 1
    repo.listing_ttl_s = 60.0  # longer than this test, however loaded the machine
    repo.pause = True
    found: list[list[int]] = []
    lookup = threading.Thread(target=lambda: found.append(repo.versions(MNIST_MLP)))
    lookup.start()
    try:
        assert repo.listed.wait(10)
        assert repo.publish(MNIST_MLP, mnist_mlp_config(), mnist) == 2
    finally:
        repo.resume.set()
        lookup.join(10)
    assert found == [[1]]  # it began before the publish
    assert repo.versions(MNIST_MLP) == [1, 2]
    assert repo.resolve(MNIST_MLP) == 2


def test_s3_cache_folder_is_used_only_while_it_matches_the_store(live, s3, tmp_path, repository):
    """A cached copy is the store's only if its files hash to the sums the store's config.json records: a bucket
    reset and republished, another store sharing the cache folder, or a tampered file is downloaded again."""
    uri, cache_dir = f"s3://{live.batch_bucket}/reset", tmp_path / "cache"
    mnist = read_weights(repository.local_folder(MNIST_MLP, 1))
    zeros = {name: torch.zeros_like(w) for name, w in mnist.items()}
    image = {"input": np.random.default_rng(0).random((1, 784), dtype=np.float32)}
    assert open_repository(uri, lambda: s3, cache_dir=cache_dir).publish(MNIST_MLP, mnist_mlp_config(), mnist) == 1
    first = open_repository(uri, lambda: s3, cache_dir=cache_dir).load(MNIST_MLP, 1).infer(image)
    assert first["probabilities"].max() > 0.2
    for obj in s3.list_objects_v2(Bucket=live.batch_bucket, Prefix="reset/")["Contents"]:
        s3.delete_object(Bucket=live.batch_bucket, Key=obj["Key"])
    assert open_repository(uri, lambda: s3, cache_dir=cache_dir).publish(MNIST_MLP, mnist_mlp_config(), zeros) == 1
    again = open_repository(uri, lambda: s3, cache_dir=cache_dir).load(MNIST_MLP, 1).infer(image)
    np.testing.assert_allclose(again["probabilities"], 0.1, rtol=1e-6)  # zero weights: a uniform softmax

    cached = cache_dir / live.batch_bucket / "reset" / MNIST_MLP / "1" / WEIGHTS_FILE
    from safetensors.torch import save_file
    save_file(mnist, str(cached))  # a planted file in the cache folder
    served = open_repository(uri, lambda: s3, cache_dir=cache_dir).load(MNIST_MLP, 1).infer(image)
    np.testing.assert_allclose(served["probabilities"], 0.1, rtol=1e-6)
    assert not any(p.name.startswith(".") for p in cached.parent.parent.iterdir())  # no staging or stale left


def test_an_s3_cache_folder_that_lost_its_config_is_checked_or_replaced(live, s3, tmp_path, repository):
    """A cached copy whose config.json is gone (a cleaner of old files in /tmp, where the cache folder is by
    default: a load never reads the cached config) was taken for no copy, and the fresh download could not take
    its place: every load of the version failed with "cannot write the local copy ... (Directory not empty)"."""
    uri, cache_dir = f"s3://{live.batch_bucket}/lost", tmp_path / "cache"
    mnist = read_weights(repository.local_folder(MNIST_MLP, 1))
    assert open_repository(uri, lambda: s3, cache_dir=cache_dir).publish(MNIST_MLP, mnist_mlp_config(), mnist) == 1
    folder = open_repository(uri, lambda: s3, cache_dir=cache_dir).local_folder(MNIST_MLP, 1)
    (folder / "config.json").unlink()
    assert open_repository(uri, lambda: s3, cache_dir=cache_dir).load(MNIST_MLP, 1).version == 1
    (folder / WEIGHTS_FILE).write_bytes(b"tampered")  # and a file that no longer matches: downloaded again
    assert open_repository(uri, lambda: s3, cache_dir=cache_dir).load(MNIST_MLP, 1).version == 1
    assert (folder / WEIGHTS_FILE).read_bytes() == s3.get_object(
        Bucket=live.batch_bucket, Key=f"lost/{MNIST_MLP}/1/{WEIGHTS_FILE}")["Body"].read()
    assert not any(p.name.startswith(".") for p in folder.parent.iterdir())  # no staging or stale left


async def test_s3_load_failures_name_the_file_inside_the_version_never_the_bucket_or_the_cache_folder(
        live, s3, tmp_path, repository):
    """They quoted s3://bucket/prefix/<name>/<version>/<file> and the local cache folder's path: where a server
    keeps its models is none of its callers' business (the server's log says it)."""
    uri = f"s3://{live.batch_bucket}/private/models"
    repo = open_repository(uri, lambda: s3, cache_dir=tmp_path / "cache")
    mnist = read_weights(repository.local_folder(MNIST_MLP, 1))
    for name in ("gone", "corrupt", "unwritable"):
        assert repo.publish(name, mnist_mlp_config(), mnist) == 1
    s3.delete_object(Bucket=live.batch_bucket, Key="private/models/gone/1/model.safetensors")
    s3.put_object(Bucket=live.batch_bucket, Key="private/models/corrupt/1/model.safetensors", Body=b"corrupt")
    repo.cache_dir.mkdir(parents=True)
    (repo.cache_dir / "unwritable").write_bytes(b"")  # a file where the model's cache folder goes
    messages = {}
    async with InferenceEngine(ModelCache(repo)) as engine:
        for name in ("gone", "corrupt", "unwritable"):
            with pytest.raises(InferenceError) as failed:
                await engine.load(name, 1)
            messages[name] = failed.value.message
    assert messages["gone"] == "model 'gone' version 1 failed to load: gone/1/model.safetensors: not found"
    assert messages["corrupt"].startswith("model 'corrupt' version 1 failed to load: corrupt/1/model.safetensors: "
                                          "sha256 ")
    assert messages["unwritable"] == ("model 'unwritable' version 1 failed to load: cannot write the local copy of "
                                      "unwritable/1 (Not a directory); the server's log says where")
    for message in messages.values():
        assert live.batch_bucket not in message and str(tmp_path) not in message, message


def test_an_s3_asset_over_max_asset_bytes_is_refused_before_its_download(live, s3, tmp_path, repository,
                                                                           monkeypatch):
    """Weights were held to the cache's budget before a download, but an asset (tokenizer.json) was downloaded to
    the cache folder whatever its size. One over MAX_ASSET_BYTES (made small here) is refused by name, as a local
    one is, and nothing of it is left in the cache folder; one within it still loads."""
    monkeypatch.setattr("models.s3_repository.MAX_ASSET_BYTES", 1024)
    repo = open_repository(f"s3://{live.batch_bucket}/assets/models", lambda: s3, cache_dir=tmp_path / "cache")
    mnist = read_weights(repository.local_folder(MNIST_MLP, 1))
    assert repo.publish("small", mnist_mlp_config(), mnist, {TOKENIZER_FILE: b"{}" + b" " * 1022}) == 1
    assert repo.publish("big", mnist_mlp_config(), mnist, {TOKENIZER_FILE: b"{}" + b" " * 1023}) == 1
    assert (repo.local_folder("small", 1) / TOKENIZER_FILE).stat().st_size == 1024
    with pytest.raises(ArtifactError) as refused:
        repo.local_folder("big", 1)
    assert str(refused.value) == "big/1/tokenizer.json is over the 1,024 bytes an asset may have"
    assert_names_no_location(str(refused.value), repo, s3)
    assert str(tmp_path) not in str(refused.value)
    assert [p.name for p in (repo.cache_dir / "big").iterdir()] == []  # no staging folder, no partial file


async def test_an_s3_outage_tells_callers_the_repository_is_unavailable_never_where_it_is(live, s3, tmp_path,
                                                                                        repository, caplog):
    """botocore's messages quote the endpoint (`Could not connect to the endpoint URL: "http://127.0.0.1:PORT/
    bucket/prefix/<name>/<version>/model.safetensors"`): a load failed with that text for its callers, and a lookup
    that failed escaped the engine as a RepositoryError quoting s3://bucket/prefix. Both are UNAVAILABLE now (once
    S3 is back, a retry succeeds), naming the model and version; the server's log keeps the whole failure."""
    repo = open_repository(f"s3://{live.batch_bucket}/private/models", lambda: s3, cache_dir=tmp_path / "cache")
    mnist = read_weights(repository.local_folder(MNIST_MLP, 1))
    for name in ("looked_up", "not_looked_up"):
        assert repo.publish(name, mnist_mlp_config(), mnist) == 1
    image = np.zeros((1, 784), np.float32)
    requests = [InferenceRequest(id=name, model_name=name, model_version=version, inputs={"input": image},
                                 datatypes={"input": "FP32"})
                for name, version in (("looked_up", "1"), ("not_looked_up", None))]
    async with InferenceEngine(ModelCache(repo)) as engine:
        await engine.model_config("looked_up", "1")  # its config is known; its files are not downloaded yet
        repo.client = down = unreachable_s3()
        repo.listing_ttl_s = 0.0  # every lookup lists the store: none is answered from an earlier listing
        with caplog.at_level(logging.WARNING):
            outcomes = await engine.infer_many(requests)
            with pytest.raises(InferenceError) as loading:
                await engine.load("looked_up", 1)
            with pytest.raises(InferenceError) as looking_up:
                await engine.model_config("not_looked_up", "1")
        repo.client = s3  # back: the next request is answered
        assert (await engine.infer(requests[1])).model_version == 1
    assert [(o.code, o.message) for o in outcomes] == [
        (ErrorCode.UNAVAILABLE, "model 'looked_up' version 1: the model repository is unavailable; retry later"),
        (ErrorCode.UNAVAILABLE, "model 'not_looked_up' version latest: the model repository is unavailable; retry "
                                "later"),
    ]
    assert (loading.value.code, looking_up.value.code) == (ErrorCode.UNAVAILABLE, ErrorCode.UNAVAILABLE)
    assert loading.value.message == outcomes[0].message
    assert looking_up.value.message == ("model 'not_looked_up' version 1: the model repository is unavailable; "
                                        "retry later")
    for message in (*(o.message for o in outcomes), loading.value.message, looking_up.value.message):
        assert_names_no_location(message, repo, down)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert down.meta.endpoint_url in logged and f"s3://{live.batch_bucket}/private/models" in logged


def test_s3_version_claims_never_collide(live, s3, tmp_path):
    repo = S3ModelRepository(f"s3://{live.batch_bucket}/claims", s3, cache_dir=tmp_path)
    assert [repo._claim("m", 1), repo._claim("m", 1), repo._claim("m", 2)] == [1, 2, 3]
    assert repo.versions("m") == []  # claimed but not complete: no config.json yet


def test_maas_models_cli_publishes_to_s3(live, monkeypatch, tmp_path, capsys, repository):
    from pipeline.cli import main

    uri = f"s3://{live.batch_bucket}/cli"
    monkeypatch.setenv("MAAS_MODEL_REPOSITORY", uri)
    monkeypatch.setenv("AWS_ENDPOINT_URL", live.aws_endpoint_url)
    monkeypatch.setenv("MAAS_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "config.json").write_text(json.dumps(mnist_mlp_config().to_json()))
    torch.save(read_weights(repository.local_folder(MNIST_MLP, 1)), tmp_path / "weights.pt")

    def maas(*args: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
        captured = capsys.readouterr()
        return exit_.value.code, captured.out + captured.err

    code, out = maas("models", "publish", str(tmp_path / "weights.pt"), "--name", "digits", "--config",
                     str(tmp_path / "config.json"), "--quantize", "int8")
    assert code == 0 and f"published digits v1 (mlp, int8) to {uri}" in out
    assert "output 'class': agreement 1" in out
    code, out = maas("models", "list")
    assert code == 0 and out.startswith("digits\tversions [1]")
    code, out = maas("models", "describe", "digits")
    assert code == 0 and json.loads(out)["quantization"] == "int8"
    code, out = maas("models", "publish", str(tmp_path / "weights.pt"), "--name", "x/../y", "--config",
                     str(tmp_path / "config.json"))
    assert code == 2 and "model name 'x/../y' is invalid" in out
    bad = {**mnist_mlp_config().to_json(), "architecture": "resnet9000"}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    code, out = maas("models", "publish", str(tmp_path / "weights.pt"), "--name", "y", "--config",
                     str(tmp_path / "bad.json"))
    assert code == 2 and "unknown architecture 'resnet9000'" in out


def test_warmup_uses_the_configs_warmup_inputs(repository):
    config = replace(mnist_mlp_config(), warmup_inputs=({"name": "input", "shape": [2, 784], "datatype": "FP32",
                                                         "data": [0.5] * 1568},))
    raw = ModelConfig.parse(config.to_json())
    assert raw.warmup_inputs == config.warmup_inputs
    model = repository.load(MNIST_MLP, 1)
    loaded = LoadedModel("m", 1, raw, model.architecture, model.device)
    batches = []
    infer = loaded.infer
    loaded.infer = lambda inputs: batches.append(inputs["input"].copy()) or infer(inputs)
    loaded.warmup()
    assert loaded.warmup_seconds > 0
    # One batch on a CPU: made-up inputs, then the config's own rows cut (or repeated) to that size.
    assert [b.shape for b in batches] == [(1, 784), (1, 784)]
    assert [rows for rows, _ in loaded.warmup_batches] == [1, 1]  # each timed, in order
    assert 0 < sum(seconds for _, seconds in loaded.warmup_batches) <= loaded.warmup_seconds
    assert (batches[1] == 0.5).all() and not (batches[0] == 0.5).all()
    with pytest.raises(ArtifactError, match="warmup_inputs"):
        ModelConfig.parse({**config.to_json(), "warmup_inputs": [{"name": "input"}]})


def test_warmup_rows_repeat_to_each_batch_size():
    text = np.array([b"short", b"a much longer text"], dtype=object)
    rows = repeat_rows({"text": text, "x": np.arange(6).reshape(2, 3)}, 5)
    assert rows["text"].tolist() == [b"short", b"a much longer text"] * 2 + [b"short"]
    assert rows["x"][:, 0].tolist() == [0, 3, 0, 3, 0]
    assert repeat_rows({"x": np.zeros((0, 3))}, 4)["x"].shape == (0, 3)


def test_bilstm_example_config_has_the_keras_sizes():
    cls = ARCHITECTURES["bilstm_classifier"]
    shapes = cls.weight_shapes(bilstm_config().params)
    assert shapes["embedding.weight"] == (10000, 64) and shapes["lstm.weight_hh_l0_reverse"] == (256, 64)
    model = build(bilstm_config(), {k: torch.zeros(v) for k, v in shapes.items()},
                  {TOKENIZER_FILE: WORD_TOKENIZER})
    assert model.nbytes == sum(int(np.prod(s)) * 4 for s in shapes.values())
