"""Artifacts, the repository and the warm cache, on real safetensors files."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import threading

import numpy as np
import pytest
import torch

from models.architectures import architecture_class
from models.architectures.mlp import MLP
from models.artifact import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    ModelConfig,
    TensorSpec,
    read_config,
)
from models.cache import ModelCache
from models.examples import MNIST_MLP, mnist_mlp_config, sentiment_config, synthetic_digits, train_sentiment
from models.publish import publish_model
from models.repository import ModelNotFoundError, ModelRepository, VersionError


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
    assert not cache._load_locks, "a load lock outlived the loads (one per version ever asked for, forever)"
    cache.get("b", 1)
    assert cache.loaded() == [("b", 1)] and cache.stats.evictions == 1
    assert loaded[0].warmup_seconds > 0
    (repository.root / "a" / "1" / WEIGHTS_FILE).write_bytes(b"corrupted")  # evicted: loaded again, and fails
    with pytest.raises(ArtifactError):
        cache.get("a", 1)
    assert not cache._load_locks


class _WatchedRepository(ModelRepository):
    """Notes what its cache held each time it read a version's weights."""

    cache: ModelCache
    held_at_load: list

    def load(self, name, version, device=None):
        self.held_at_load.append((name, self.cache.loaded()))
        return super().load(name, version, device)


def test_cache_makes_room_before_loading_and_refuses_a_model_over_its_whole_budget(repository):
    for name in ("a", "b"):
        repository.publish(name, mnist_mlp_config(), _random_mlp_weights())
    one_model = repository.load("a", 1).nbytes
    watched = _WatchedRepository(repository.root)
    watched.held_at_load = []
    watched.cache = cache = ModelCache(watched, max_bytes=int(one_model * 1.5))
    cache.get("a", 1)
    cache.get("b", 1)
    assert watched.held_at_load == [("a", []), ("b", [])]  # "a" went before "b" was read, not after
    assert cache.loaded() == [("b", 1)] and cache.stats.evictions == 1

    watched.cache = small = ModelCache(watched, max_bytes=one_model // 2)
    with pytest.raises(ArtifactError, match=rf"model 'a' version 1 holds \d+ bytes of weights, more than the "
                                            rf"whole model cache's budget of {one_model // 2} bytes"):
        small.get("a", 1)
    assert len(watched.held_at_load) == 2 and small.loaded() == []  # refused without reading the weights


def test_cache_resolves_latest_at_most_every_ttl(repository):
    cache = ModelCache(repository, latest_ttl_s=3600)
    assert cache.resolve(MNIST_MLP) == 1
    repository.publish(MNIST_MLP, mnist_mlp_config(), _random_mlp_weights())
    assert cache.resolve(MNIST_MLP) == 1  # cached
    assert ModelCache(repository, latest_ttl_s=0).resolve(MNIST_MLP) == 2


def test_version_folders_with_other_spellings_are_not_versions(repository):
    """A stray folder ("²", "01", "0", Arabic-Indic "٣") must neither break listing nor count as a version."""
    folder = repository.root / MNIST_MLP
    config = (folder / "1" / "config.json").read_text()
    for stray in ("²", "01", "0", "٣", "1.0", "-2"):
        (folder / stray).mkdir()
        (folder / stray / "config.json").write_text(config)
    assert repository.versions(MNIST_MLP) == [1] and MNIST_MLP in repository.names()
    assert repository.resolve(MNIST_MLP) == 1
    for version in ("²", "01", "0", "-1", "1.0", "9" * 5000):
        with pytest.raises(VersionError, match=r"model_version .* is invalid: expected a positive integer"):
            repository.resolve(MNIST_MLP, version)


def test_names_ending_in_a_newline_are_refused(repository):
    with pytest.raises(ArtifactError, match="is invalid"):
        repository.publish("digits\n", mnist_mlp_config(), _random_mlp_weights())
    assert not (repository.root / "digits\n").exists()


@pytest.mark.parametrize(("dtype", "fragment"), [
    (torch.int8, "tensor 'layers.0.weight' has dtype int8, expected a float dtype .*quantization"),
    (torch.int32, "tensor 'layers.0.weight' has dtype int32, expected a float dtype"),
    (torch.bool, "tensor 'layers.0.weight' has dtype bool, expected a float dtype"),
])
def test_weights_of_a_non_float_dtype_are_refused_by_name(repository, dtype, fragment):
    weights = _random_mlp_weights()
    weights["layers.0.weight"] = weights["layers.0.weight"].mul(10).to(dtype)
    with pytest.raises(ArtifactError, match=fragment):
        repository.publish("ints", mnist_mlp_config(), weights)
    folder = repository.root / "ints" / "1"  # written by hand: the load refuses it too, on the CPU's numpy twin
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    save_file(weights, str(folder / WEIGHTS_FILE))
    (folder / "config.json").write_text(json.dumps(mnist_mlp_config().to_json()))
    with pytest.raises(ArtifactError, match=fragment):
        repository.load("ints", 1)


@pytest.mark.parametrize(("change", "fragment"), [
    ({"batching": {"max_batch_size": True}}, r"batching\.max_batch_size: expected an integer in 1\.\.65,536"),
    ({"batching": {"max_batch_size": 10**9}}, r"batching\.max_batch_size"),
    ({"batching": {"max_queue_delay_ms": 1e300}}, r"batching\.max_queue_delay_ms: expected a number in 0\.\.60,000"),
    ({"batching": {"max_queue_delay_ms": True}}, r"batching\.max_queue_delay_ms"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, True]}]}, r"inputs\[0\]\.shape"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 10**12]}]}, r"inputs\[0\]\.shape: dimensions"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1] * 17}]}, r"inputs\[0\]\.shape: expected a list"),
    ({"warmup_inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": [0] * 784}]},
     r"warmup_inputs\[0\]\.name: 'x' is not one of the inputs \['input'\]"),
    ({"warmup_inputs": [{"name": "input", "shape": [1, 784], "datatype": "NOPE", "data": [0] * 784}]},
     r"warmup_inputs\[0\]: input 'input': datatype NOPE given, expected FP32"),
    ({"warmup_inputs": [{"name": "input", "shape": [1, 783], "datatype": "FP32", "data": [0] * 783}]},
     r"warmup_inputs\[0\]: input 'input': shape \[1, 783\] given"),
    ({"warmup_inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0] * 3}]},
     r"warmup_inputs\[0\]\.data: expected a flat list of 784 elements"),
    ({"warmup_inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": ["a"] * 784}]},
     r"warmup_inputs\[0\]\.data: expected numbers for datatype FP32"),
])
def test_config_values_out_of_bounds_are_named(change, fragment):
    with pytest.raises(ArtifactError, match=fragment):
        ModelConfig.parse({**mnist_mlp_config().to_json(), **change})


def test_bytes_warmup_inputs_must_be_strings():
    raw = sentiment_config().to_json()
    ModelConfig.parse({**raw, "warmup_inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["ok"]}]})
    with pytest.raises(ArtifactError, match=r"warmup_inputs\[0\]\.data: expected strings for datatype BYTES"):
        ModelConfig.parse({**raw, "warmup_inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                                     "data": [300000000]}]})


def test_unreadable_and_oversized_configs_are_artifact_errors(repository):
    folder = repository.root / "odd" / "1"
    folder.mkdir(parents=True)
    (folder / "config.json").write_bytes(b'{"architecture": "mlp\xff"}')
    with pytest.raises(ArtifactError, match="invalid JSON"):
        repository.config("odd", 1)
    (folder / "config.json").write_bytes(b'{"description": "' + b"x" * (MAX_CONFIG_BYTES + 1) + b'"}')
    with pytest.raises(ArtifactError, match="over the 1,048,576 a config may have"):
        read_config(folder)


def test_publish_runs_the_model_once_so_misnamed_tensors_are_refused(repository):
    raw = mnist_mlp_config().to_json()
    renamed_input = ModelConfig.parse({**raw, "inputs": [{**raw["inputs"][0], "name": "x"}]})
    with pytest.raises(ArtifactError, match=r"reads or writes tensor 'input', which config.json's inputs \['x'\]"):
        publish_model(repository, "renamed", renamed_input, _random_mlp_weights())
    renamed_output = ModelConfig.parse({**raw, "outputs": [{**raw["outputs"][0], "name": "y"}, raw["outputs"][1]]})
    with pytest.raises(ArtifactError, match="tensor 'y'"):
        publish_model(repository, "renamed", renamed_output, _random_mlp_weights())
    wrong_width = ModelConfig.parse({**raw, "outputs": [{**raw["outputs"][0], "shape": [-1, 11]}, raw["outputs"][1]]})
    with pytest.raises(ArtifactError, match=r"comes out with shape \[2, 10\] .* config.json says \[-1, 11\]"):
        publish_model(repository, "renamed", wrong_width, _random_mlp_weights())
    assert repository.versions("renamed") == []
    assert publish_model(repository, "renamed", mnist_mlp_config(), _random_mlp_weights()).version == 1


def test_publish_refuses_shapes_and_datatypes_the_model_cannot_honour(repository):
    """Requests that match config.json must run: otherwise each fails as INTERNAL and ends dead-lettered."""
    raw = mnist_mlp_config().to_json()
    narrow = {**raw["params"], "layers": [8, 16, 10]}  # 8 wide: what the made-up inputs' -1 becomes
    any_width = ModelConfig.parse({**raw, "params": narrow, "inputs": [{**raw["inputs"][0], "shape": [-1, -1]}]})
    with pytest.raises(ArtifactError, match=r"inputs: config.json lets a request send \{'input': \[1, 3\]\} "
                                            r"\(its -1 dimensions at 3\), and the model fails on that"):
        publish_model(repository, "loose", any_width, _random_mlp_weights((8, 16, 10)))
    text = sentiment_config().to_json()
    two_texts = ModelConfig.parse({**text, "inputs": [{**text["inputs"][0], "shape": [-1, 2]}]})
    weights, assets = train_sentiment(steps=1)
    with pytest.raises(ArtifactError, match=r"inputs: config.json lets a request send \{'text': \[1, 2\]\}"):
        publish_model(repository, "loose", two_texts, weights, assets)
    integer = ModelConfig.parse({**raw, "outputs": [{**raw["outputs"][0], "datatype": "INT64"}, raw["outputs"][1]]})
    with pytest.raises(ArtifactError, match=r"outputs: 'probabilities' comes out as floating-point numbers, "
                                            r"config.json declares INT64, which would truncate them"):
        publish_model(repository, "loose", integer, _random_mlp_weights())
    assert repository.versions("loose") == []


def test_a_failed_load_is_not_retried_until_its_backoff_ends(repository):
    folder = repository.root / "broken" / "1"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(mnist_mlp_config().to_json()))  # no weights file
    cache = ModelCache(repository, load_retry_s=3600)
    with pytest.raises(ArtifactError, match=r"model\.safetensors") as first:
        cache.get("broken", 1)
    assert "not retried" not in str(first.value)
    for _ in range(2):  # answered from the remembered failure, without loading again
        with pytest.raises(ArtifactError, match=r"model\.safetensors.*\(not retried for 3600 s after a failed load\)"):
            cache.get("broken", 1)
    retrying = ModelCache(repository, load_retry_s=0)
    for _ in range(2):
        with pytest.raises(ArtifactError, match=r"model\.safetensors") as again:
            retrying.get("broken", 1)
        assert "not retried" not in str(again.value)


def test_a_version_linked_from_outside_the_repository_is_refused(repository, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(repository.root / MNIST_MLP / "1", outside)
    (repository.root / "linked").mkdir()
    (repository.root / "linked" / "1").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ArtifactError, match="leads outside the repository"):
        repository.load("linked", 1)
    (repository.root / "half").mkdir()
    shutil.copytree(repository.root / MNIST_MLP / "1", repository.root / "half" / "1")
    (repository.root / "half" / "1" / WEIGHTS_FILE).unlink()
    (repository.root / "half" / "1" / WEIGHTS_FILE).symlink_to(outside / WEIGHTS_FILE)
    with pytest.raises(ArtifactError, match=r"model\.safetensors leads outside the repository"):
        repository.load("half", 1)


def test_a_config_linked_from_outside_the_repository_is_refused_before_it_is_read(repository, tmp_path):
    """Only a load checked where links lead, after the version's config.json was read through them: a model's
    metadata (and a config error quoting its fields) came from a file outside the repository."""
    outside = tmp_path / "elsewhere"
    shutil.copytree(repository.root / MNIST_MLP / "1", outside)
    (repository.root / "linked").mkdir()
    (repository.root / "linked" / "1").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ArtifactError, match=r"^linked/1 leads outside the repository"):
        repository.config("linked", 1)
    shutil.copytree(repository.root / MNIST_MLP / "1", repository.root / "half" / "1")
    (repository.root / "half" / "1" / CONFIG_FILE).unlink()
    (repository.root / "half" / "1" / CONFIG_FILE).symlink_to(outside / CONFIG_FILE)
    with pytest.raises(ArtifactError, match=r"^half/1/config\.json leads outside the repository"):
        repository.config("half", 1)
    assert repository.config(MNIST_MLP, 1).architecture == "mlp"


def test_an_asset_over_its_limit_is_refused_without_being_read_whole(repository, monkeypatch):
    """tokenizer.json was read whole into memory at every load, however large a published one was (config.json
    is bounded, weights are held to the cache's budget): a limit, one byte past which it is refused."""
    import models.artifact

    repository.publish("sentiment", sentiment_config(), *train_sentiment(steps=1))
    size = (repository.root / "sentiment" / "1" / TOKENIZER_FILE).stat().st_size
    monkeypatch.setattr(models.artifact, "MAX_ASSET_BYTES", size - 1)
    with pytest.raises(ArtifactError, match=r"^sentiment/1/tokenizer.json is over the [\d,]+ bytes an asset may have$"):
        repository.load("sentiment", 1)
    monkeypatch.setattr(models.artifact, "MAX_ASSET_BYTES", size)
    assert repository.load("sentiment", 1).version == 1


def test_load_failures_name_files_inside_the_version_never_the_servers_folders(repository, tmp_path, caplog):
    """The messages quoted the repository's folder (and where a link led): they reach a served API's callers,
    as its infer errors and readiness. They name `<name>/<version>/<file>`; the server's log says where the
    repository is."""
    outside = tmp_path / "elsewhere"
    shutil.copytree(repository.root / MNIST_MLP / "1", outside)
    (repository.root / "linked").mkdir()
    (repository.root / "linked" / "1").symlink_to(outside, target_is_directory=True)
    cache = ModelCache(repository)
    with pytest.raises(ArtifactError) as linked:
        cache.get("linked", 1)
    assert str(linked.value) == "linked/1 leads outside the repository; refusing to load it"
    assert cache.load_failure("linked", 1) == str(linked.value)
    assert any(str(repository.root) in r.getMessage() and "linked/1 leads outside" in r.getMessage()
               for r in caplog.records), "the log keeps where the repository is"

    unchecked = ModelRepository(repository.root, verify=False)
    unchecked.publish("sentiment", sentiment_config(), *train_sentiment(steps=1))
    tokenizer = repository.root / "sentiment" / "1" / TOKENIZER_FILE
    tokenizer.unlink()
    with pytest.raises(ArtifactError) as missing:
        unchecked.load("sentiment", 1)
    assert str(missing.value) == "sentiment/1/tokenizer.json is missing (the architecture needs it)"
    tokenizer.mkdir()
    with pytest.raises(ArtifactError) as unreadable:
        unchecked.load("sentiment", 1)
    assert str(unreadable.value) == "sentiment/1/tokenizer.json is not a regular file"
    folder = repository.root / "odd" / "1"
    (folder / CONFIG_FILE).mkdir(parents=True)
    with pytest.raises(ArtifactError) as config:
        read_config(folder)
    assert str(config.value) == "odd/1/config.json is not a regular file"
    for error in (linked, missing, unreadable, config):
        assert str(tmp_path) not in str(error.value)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("file", [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE])
@pytest.mark.parametrize("verify", [True, False])
def test_a_named_pipe_in_a_version_folder_is_refused_without_being_opened(repository, file, verify):
    """Opening a named pipe blocks until something writes to it: the model thread, and every model behind it,
    waited on a file planted in the repository."""
    repository.publish("sentiment", sentiment_config(), *train_sentiment(steps=1))
    path = repository.root / "sentiment" / "1" / file
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(ArtifactError) as refused:
        ModelRepository(repository.root, verify=verify).load("sentiment", 1)
    assert str(refused.value) == f"sentiment/1/{file} is not a regular file"


def test_for_callers_cuts_the_repositorys_locations_from_a_message(tmp_path, monkeypatch):
    """The boundary's second line: a message quoting a path inside the repository anyway keeps only its part
    inside; the root alone becomes words; a neighbour folder, a root of "/" and URL credentials are handled."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    repository = ModelRepository(tmp_path / "link")
    text = (f"[Errno 5] Input/output error: '{tmp_path}/link/m/3/model.safetensors'; {real}/m/3/config.json; "
            f"root {tmp_path}/link, {real}. next door: {tmp_path}/link2/x, {tmp_path}/link.old; "
            "http://user:secret@host/x")
    assert repository.for_callers(text) == (
        "[Errno 5] Input/output error: 'm/3/model.safetensors'; m/3/config.json; root the model repository, "
        f"the model repository. next door: {tmp_path}/link2/x, {tmp_path}/link.old; http://***@host/x")
    monkeypatch.chdir(tmp_path)
    relative = ModelRepository("real")
    assert relative.for_callers(f"{real}/m/1/model.safetensors: bad") == "m/1/model.safetensors: bad"
    assert ModelRepository("/").for_callers("/srv/m/1/model.safetensors") == "/srv/m/1/model.safetensors"


def test_url_credentials_are_masked_whole_when_the_password_holds_an_at_sign():
    """botocore takes an endpoint URL whose password holds a bare "@" (its host is what follows the last one), and
    quotes the URL in its errors: the mask stopped at the first "@", and the rest of the password was shown."""
    from models.repository import without_credentials

    message = 'Could not connect to the endpoint URL: "http://user:p@ss@127.0.0.1:9/bucket/key"; s3://b/k@1 x@y'
    assert without_credentials(message) == ('Could not connect to the endpoint URL: "http://***@127.0.0.1:9/bucket/'
                                            'key"; s3://b/k@1 x@y')


def test_a_local_version_whose_files_changed_since_publishing_is_refused(repository):
    for name in ("changed", "missing"):
        shutil.copytree(repository.root / MNIST_MLP / "1", repository.root / name / "1")
    assert WEIGHTS_FILE in repository.config("changed", 1).files
    weights = repository.root / "changed" / "1" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors: sha256 [0-9a-f]{64} differs from [0-9a-f]{64}"):
        repository.load("changed", 1)
    (repository.root / "missing" / "1" / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"model\.safetensors is missing; config\.json records its sha256"):
        ModelCache(repository).get("missing", 1)
    assert repository.load(MNIST_MLP, 1).version == 1


def test_misspelt_batching_keys_and_non_boolean_tokenizer_flags_are_refused():
    raw = mnist_mlp_config().to_json()
    with pytest.raises(ArtifactError, match=r"batching: unknown key\(s\) \['max_batch_sise'\]"):
        ModelConfig.parse({**raw, "batching": {"max_batch_sise": 8}})
    from models.text import WordIndexTokenizer

    with pytest.raises(ArtifactError, match="lowercase: expected true or false"):
        WordIndexTokenizer.from_json(json.dumps({"type": "word_index", "words": ["a"], "lowercase": "false"}))


_TRANSFORMER = {"vocab_size": 8, "hidden_size": 16, "num_layers": 1, "num_heads": 1, "intermediate_size": 16,
                "max_position_embeddings": 8, "max_length": 8}
_TEXT = {"vocab_size": 8, "embedding_dim": 4, "sequence_length": 8, "hidden": [], "num_classes": 1}


@pytest.mark.parametrize(("architecture", "params", "message"), [
    ("transformer_encoder", {**_TRANSFORMER, "num_layers": 10**9},
     "transformer_encoder.params.num_layers: expected an integer in 1..1,024, got 1000000000"),
    ("transformer_encoder", {**_TRANSFORMER, "hidden_size": 1 << 17, "num_heads": 1 << 11},
     "transformer_encoder.params.hidden_size: expected an integer in 1..65,536"),
    ("transformer_encoder", {**_TRANSFORMER, "max_position_embeddings": 1 << 21, "max_length": 1 << 21},
     "transformer_encoder.params.max_position_embeddings: expected an integer in 1..1,048,576"),
    ("text_classifier", {**_TEXT, "sequence_length": 400_000_000},
     "text_classifier.params.sequence_length: expected an integer in 1..1,048,576, got 400000000"),
    ("text_classifier", {**_TEXT, "hidden": [16] * 1025}, "text_classifier.params.hidden: expected a list of up to "
                                                          "1,024 sizes"),
    ("mlp", {"layers": [784, 10**6, 10]}, "mlp.params.layers[1]: expected an integer in 1..65,536"),
    ("cnn", {"input_shape": [32, 32, 3], "conv": [{"filters": 1 << 20}]},
     "cnn.params.conv[0].filters: expected an integer in 1..65,536"),
])
def test_sizes_in_params_have_upper_bounds(architecture, params, message):
    """A config of a few hundred bytes must not make a load build or allocate gigabytes before any weight is
    compared: num_layers 10**9 built 16 names per layer, a sequence_length of 4e8 a warm-up batch of that width."""
    with pytest.raises(ArtifactError, match=re.escape(message)):
        architecture_class(architecture).weight_shapes(params)


@pytest.mark.parametrize(("shape", "message"), [
    ([-1, 1 << 31], "dimensions must be -1 or in 1..1,048,576"),
    ([-1, 1 << 14, 1 << 14], "one row holds more than 67,108,864 elements"),
])
def test_tensor_specs_have_upper_bounds(shape, message):
    """Warm-ups allocate batches of the declared shapes."""
    with pytest.raises(ArtifactError, match=re.escape(f"inputs[0].shape: {message}")):
        TensorSpec.parse({"name": "x", "datatype": "FP32", "shape": shape}, "inputs[0]")


class _OutOfMemory(ModelRepository):
    """A repository whose loads run out of memory, as a load of a config too large for the process does."""

    def load(self, name, version, **kwargs):
        raise MemoryError


def test_a_load_that_runs_out_of_memory_is_remembered_as_a_failed_load(repository):
    """Otherwise every batch would try the load again, and readiness would not say why the model is not ready."""
    cache = ModelCache(_OutOfMemory(repository.root), load_retry_s=3600)
    with pytest.raises(ArtifactError, match=r"model 'mnist_mlp' version 1 does not fit in memory while it loads$"):
        cache.get(MNIST_MLP, 1)
    with pytest.raises(ArtifactError, match=r"does not fit in memory while it loads \(not retried for 3600 s"):
        cache.get(MNIST_MLP, 1)
    assert "does not fit in memory" in cache.load_failure(MNIST_MLP, 1)


class _OutOfGpuMemory(ModelRepository):
    """A repository whose loads fail as placing weights on a full GPU does: torch raises a RuntimeError."""

    loads = 0

    def load(self, name, version, **kwargs):
        self.loads += 1
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_load_that_runs_out_of_gpu_memory_is_remembered_as_a_failed_load(repository):
    """torch's CUDA out-of-memory is no MemoryError: it escaped the cache, so every batch read the weights again
    and failed with the error's type only, while readiness said the model was ready."""
    failing = _OutOfGpuMemory(repository.root)
    cache = ModelCache(failing, load_retry_s=3600)
    with pytest.raises(ArtifactError, match=r"^model 'mnist_mlp' version 1 could not be loaded: OutOfMemoryError: "
                                            r"CUDA out of memory\. Tried to allocate 2\.00 GiB$"):
        cache.get(MNIST_MLP, 1)
    with pytest.raises(ArtifactError, match=r"CUDA out of memory.* \(not retried for 3600 s"):
        cache.get(MNIST_MLP, 1)
    assert failing.loads == 1 and "CUDA out of memory" in cache.load_failure(MNIST_MLP, 1)


class _PausedRepository(ModelRepository):
    """A repository whose loads wait, once they have read the weights, until the test lets them finish."""

    started: threading.Event
    resume: threading.Event

    def load(self, name, version, device=None):
        model = super().load(name, version, device)
        self.started.set()
        assert self.resume.wait(60), "the test never let the load finish"
        return model


def test_an_unload_during_a_load_of_the_version_leaves_it_unloaded(repository):
    """The load added its version to the cache after the unload, which so had no effect: the v2 unload of a model a
    batch was loading left its weights in memory (and in the cache's bytes) until an eviction."""
    paused = _PausedRepository(repository.root)
    paused.started, paused.resume = threading.Event(), threading.Event()
    cache = ModelCache(paused)
    loaded = []
    loading = threading.Thread(target=lambda: loaded.append(cache.get(MNIST_MLP, 1)))
    loading.start()
    assert paused.started.wait(60)
    cache.unload(MNIST_MLP)
    paused.resume.set()
    loading.join()
    assert loaded[0].version == 1  # the load's caller runs it
    assert cache.loaded() == [] and cache.nbytes == 0 and not cache._loading
    assert cache.get(MNIST_MLP, 1) is not loaded[0] and cache.loaded() == [(MNIST_MLP, 1)]  # asked again: loaded
