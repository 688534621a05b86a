"""CUDA-graph serving: bucketing, padding, the LRU bound and the eager fallback.

Capturing needs a GPU (``bench/gpu_models_check.py`` checks graphed models there); here ``capture=False``
runs the same padded static inputs eagerly, which is what decides whether padding can change a result.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from kernels import compile_only
from models import cuda_graphs
from models.architectures import build
from models.cuda_graphs import GraphedForward, bucket, length_groups
from models.examples import minilm_artifact, mnist_mlp_config, train_mnist_mlp
from models.loaded import LoadedModel, warmup_batch_sizes


@pytest.mark.parametrize(("n", "low", "high", "expected"),
                         [(1, 1, 8, 1), (3, 1, 8, 4), (8, 1, 8, 8), (5, 16, 256, 16), (17, 16, 256, 32),
                          (200, 16, 256, 256), (10, 16, 10, 10)])
def test_bucket_is_the_next_power_of_two_within_bounds(n, low, high, expected):
    assert bucket(n, low, high) == expected


@pytest.mark.parametrize(("lengths", "min_saved", "expected"), [
    # half short, half long, as in the MiniLM benchmark: two groups once the saving is large enough
    ([64, 128, 64, 128], 128, [(64, [0, 2]), (128, [1, 3])]),
    ([64, 128, 64, 128], 129, [(128, [0, 1, 2, 3])]),
    # a small group is carried up until the rows carried save enough: 2 x (64 - 32) = 64 >= 64
    ([20, 40, 60, 200], 64, [(64, [0, 1, 2]), (256, [3])]),
    ([20, 40, 60, 200], 1, [(32, [0]), (64, [1, 2]), (256, [3])]),
    ([5, 3, 16], 1, [(16, [0, 1, 2])]),  # one bucket: one group, rows in order
    ([300], 1, [(256, [0])]),  # lengths past the top bucket stay in it
])
def test_length_groups_split_a_batch_only_where_it_saves_enough_padding(lengths, min_saved, expected):
    assert [(length, rows.tolist()) for length, rows in length_groups(lengths, 16, 256, min_saved)] == expected


def _length_groups_one_by_one(lengths, low, high, min_saved):
    """The rule of `length_groups`, row by row in Python (what it was before it moved to numpy)."""
    by_bucket: dict[int, list[int]] = {}
    for row, n in enumerate(lengths):
        by_bucket.setdefault(bucket(n, low, high), []).append(row)
    ordered, groups, carried = sorted(by_bucket.items()), [], []
    for i, (length, rows) in enumerate(ordered):
        rows = carried + rows
        if i + 1 == len(ordered) or len(rows) * (ordered[i + 1][0] - length) >= min_saved:
            groups.append((length, sorted(rows)))
            carried = []
        else:
            carried = rows
    return groups


@pytest.mark.parametrize("seed", range(5))
def test_length_groups_in_numpy_follow_the_rule_row_by_row(seed):
    rng = np.random.default_rng(seed)
    for _ in range(50):
        lengths = rng.choice([0, 1, 2, 15, 16, 17, 31, 32, 33, 64, 65, 127, 128, 200, 256, 257, 512],
                             size=int(rng.integers(0, 300)))
        min_saved = int(rng.choice([1, 64, 4096]))
        got = [(length, rows.tolist()) for length, rows in length_groups(lengths, 16, 256, min_saved)]
        assert got == _length_groups_one_by_one(lengths.tolist(), 16, 256, min_saved)


def _row_sums(x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"sum": (x * mask).sum(dim=1), "rows": x[:, 0]}


def test_padding_is_filled_and_sliced_off_and_buckets_are_reused():
    calls = []

    def fn(x, mask):
        calls.append(tuple(x.shape))
        return _row_sums(x, mask)

    graphed = GraphedForward(fn, pad_values=(7, False), max_shape=(64, 32), min_shape=(1, 8), capture=False)
    x = torch.arange(15, dtype=torch.float32).reshape(3, 5) + 1
    mask = torch.ones(3, 5, dtype=torch.bool)
    out = graphed(x, mask)
    assert calls == [(4, 8)]  # padded to the bucket: rows to 4, columns to at least 8
    torch.testing.assert_close(out["sum"], x.sum(dim=1))  # the 7s of the padding are masked out
    assert out["rows"].shape == (3,)
    x2 = x[:2] * 2
    out2 = graphed(x2, mask[:2])
    assert calls[-1] == (2, 8) and len(graphed) == 2
    graphed(x + 1, mask)  # the (4, 8) bucket again: its static inputs are refilled, not reallocated
    assert len(graphed) == 2
    torch.testing.assert_close(graphed(x, mask)["sum"], x.sum(dim=1))
    torch.testing.assert_close(out2["sum"], x2.sum(dim=1))


def test_outputs_are_copies_that_the_next_call_does_not_overwrite():
    graphed = GraphedForward(_row_sums, pad_values=(0, False), max_shape=(8, 8), capture=False)
    mask = torch.ones(2, 3, dtype=torch.bool)
    first = graphed(torch.ones(2, 3), mask)
    graphed(torch.full((2, 3), 5.0), mask)
    torch.testing.assert_close(first["sum"], torch.full((2,), 3.0))


def test_least_recently_used_buckets_are_evicted_and_big_inputs_run_eagerly():
    graphed = GraphedForward(_row_sums, pad_values=(0, False), max_shape=(64, 8), max_elements=256,
                             max_graphs=2, capture=False)
    for rows in (1, 2, 4):
        graphed(torch.ones(rows, 8), torch.ones(rows, 8, dtype=torch.bool))
    assert len(graphed) == 2
    for rows in (33, 65):  # 64 x 8 buckets exceed max_elements; 65 rows exceed max_shape
        out = graphed(torch.ones(rows, 8), torch.ones(rows, 8, dtype=torch.bool))
        assert out["sum"].shape == (rows,)
    assert len(graphed) == 2


def test_a_compile_only_pass_runs_the_padded_bucket_and_captures_nothing():
    """A GPU warm-up's first pass (``kernels.compile_only``) must see the bucket's padded shapes, which are what
    its kernels compile for, and leave no graph behind: one captured there would hold no kernel."""
    calls = []

    def fn(x, mask):
        calls.append(tuple(x.shape))
        return _row_sums(x, mask)

    graphed = GraphedForward(fn, pad_values=(0, False), max_shape=(64, 32), min_shape=(1, 8), capture=True)
    x, mask = torch.ones(3, 5), torch.ones(3, 5, dtype=torch.bool)
    with compile_only(2) as compiled:
        out = graphed(x, mask)
    assert compiled.parallel and calls == [(4, 8)] and len(graphed) == 0
    torch.testing.assert_close(out["sum"], torch.full((3,), 5.0))


def test_a_failed_capture_is_logged_once_and_the_bucket_runs_eagerly(caplog):
    calls = []

    def fn(x, mask):
        calls.append(tuple(x.shape))
        return _row_sums(x, mask)

    graphed = GraphedForward(fn, pad_values=(0, False), max_shape=(8, 8), capture=True)  # no CUDA here
    x, mask = torch.ones(3, 4), torch.ones(3, 4, dtype=torch.bool)
    with caplog.at_level(logging.WARNING, logger="models.cuda_graphs"):
        for _ in range(2):
            torch.testing.assert_close(graphed(x, mask)["sum"], torch.full((3,), 4.0))
    assert sum("CUDA graph capture failed" in r.message for r in caplog.records) == 1
    assert calls[-2:] == [(3, 4), (3, 4)] and len(graphed) == 0  # eager, on the real shapes


def test_small_buckets_are_captured_for_programmatic_dependent_launch(monkeypatch):
    """Under ``MAAS_PDL=auto`` the kernels of a bucket of at most ``pdl_max_elements`` leading elements are
    launched for programmatic dependent launch while it is captured, those of a larger one are not."""
    from kernels import dispatch
    from kernels.offline import compile_for

    monkeypatch.delenv("MAAS_PDL", raising=False)
    monkeypatch.setattr(dispatch, "INTERPRETER", False)
    launched = {}

    def fn(x, mask):
        launched.setdefault(tuple(x.shape), dispatch.pdl(x))  # the capture's launches come first
        return _row_sums(x, mask)

    def capture_eagerly(self, forward, device):  # what _capture runs, but for the capture itself (CUDA only)
        return None, forward()

    monkeypatch.setattr(GraphedForward, "_capture", capture_eagerly)
    graphed = GraphedForward(fn, pad_values=(0, False), max_shape=(64, 32), min_shape=(1, 8), capture=True,
                             pdl_max_elements=64)
    with compile_for(90):  # a Hopper GPU, as the kernels see it
        for rows in (3, 20):
            graphed(torch.ones(rows, 5), torch.ones(rows, 5, dtype=torch.bool))
        assert dispatch.pdl(torch.zeros(1)) == {}  # outside a capture: not asked for
    assert launched == {(4, 8): {"USE_PDL": True, "launch_pdl": True}, (32, 8): {}}
    # A warm-up's compile-only pass compiles the kernels as the capture will launch them (their binaries differ).
    launched.clear()
    graphed = GraphedForward(fn, pad_values=(0, False), max_shape=(64, 32), min_shape=(1, 8), capture=True,
                             pdl_max_elements=64)
    with compile_for(90), compile_only(2):
        for rows in (3, 20):
            graphed(torch.ones(rows, 5), torch.ones(rows, 5, dtype=torch.bool))
    assert launched == {(4, 8): {"USE_PDL": True, "launch_pdl": True}, (32, 8): {}}


def test_the_env_var_turns_graphs_off(monkeypatch):
    monkeypatch.setenv(cuda_graphs.ENV_VAR, "0")
    assert not cuda_graphs.enabled()
    monkeypatch.setenv(cuda_graphs.ENV_VAR, "1")
    assert cuda_graphs.enabled()
    monkeypatch.setenv(cuda_graphs.ENV_VAR, "Off")
    assert not cuda_graphs.enabled()
    monkeypatch.setenv(cuda_graphs.ENV_VAR, "of")  # a typo is refused, not taken for on
    with pytest.raises(ValueError, match="MAAS_CUDA_GRAPHS='of'"):
        cuda_graphs.enabled()


def test_a_padded_mlp_batch_gives_the_rows_of_the_unpadded_one():
    model = build(mnist_mlp_config(), train_mnist_mlp(steps=2), {})
    x = torch.rand(5, 784)
    with torch.inference_mode():
        got = model.graphed(x)  # capture is off on a CPU model: the padded bucket of 8 runs eagerly
        want = model.forward({"input": x})
    assert len(model.graphed) == 1
    torch.testing.assert_close(got["probabilities"], want["probabilities"])
    assert torch.equal(got["class"], want["class"])


def test_a_padded_minilm_batch_gives_the_embeddings_of_the_unpadded_one():
    config, weights, assets = minilm_artifact()
    model = build(config, weights, assets)
    texts = np.array([b"A man is eating food.", b"Kafka topics.",
                      b"Hi"], dtype=object)
    ids, mask = model.encode(texts)
    longest = int(mask.sum(dim=1).max())  # the tokenizer pads to a multiple of 16: trim to the real tokens
    ids, mask = ids[:, :longest], mask[:, :longest]
    with torch.inference_mode():
        got = model.graphed(ids, mask.sum(dim=1, dtype=torch.int32))["embedding"]  # padded to 4 rows x 16 tokens
        want = model.forward_tokens(ids, mask)["embedding"]
    assert ids.shape[1] < 16
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_minilm_encodes_a_batch_of_short_and_long_texts_group_by_group(monkeypatch):
    """Serving splits the batch by token length; each row's embedding is the one of the padded batch."""
    from models.architectures import transformer

    config, weights, assets = minilm_artifact()
    model = build(config, weights, assets)
    long = "Events flow through Kafka topics to stateless workers that batch them per model. " * 3
    texts = np.array([b"Hi", long.encode(), b"A man is eating food.", (long * 2).encode(), b"Kafka."], dtype=object)
    widths = []
    forward_tokens, forward_lengths = model.forward_tokens, model.forward_lengths
    monkeypatch.setattr(model, "forward_lengths", lambda ids, lengths: widths.append(tuple(ids.shape))
                        or forward_lengths(ids, lengths))
    monkeypatch.setattr(transformer, "MIN_SAVED_POSITIONS", 1)
    with torch.inference_mode():
        got = model.run({"text": texts})["embedding"]
        split = list(widths)
        want = forward_tokens(*model.encode(texts))["embedding"]  # the whole batch padded to its longest text
    # the 3 short texts, then each long one in its own bucket (the longest cut to the batch's 112 tokens)
    assert split == [(3, 16), (1, 64), (1, 112)]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(transformer, "MIN_SAVED_POSITIONS", 10**6)  # nothing worth splitting: one forward
    widths.clear()
    with torch.inference_mode():
        torch.testing.assert_close(model.run({"text": texts})["embedding"], want, rtol=1e-4, atol=1e-5)
    assert len(widths) == 1


def test_serving_goes_through_run(monkeypatch):
    """LoadedModel.infer calls Architecture.run, the method that graphs on a GPU."""
    model = build(mnist_mlp_config(), train_mnist_mlp(steps=2), {})
    seen = []
    original = model.run
    monkeypatch.setattr(model, "run", lambda inputs: seen.append(sorted(inputs)) or original(inputs))
    loaded = LoadedModel("m", 1, mnist_mlp_config(), model, torch.device("cpu"))
    out = loaded.infer({"input": np.random.rand(2, 784).astype(np.float32)})
    assert seen == [["input"]] and out["probabilities"].shape == (2, 10)


def test_a_warm_model_serves_without_tuning_new_shapes(monkeypatch):
    """Its warm-up batches may tune (they are what tunes); once warm, its batches run under
    ``kernels.tuned_shapes_only``, where a GPU kernel borrows a tuned config instead (``autotune_check.py``)."""
    from kernels._autotune import borrowing, note_borrowed

    model = build(mnist_mlp_config(), train_mnist_mlp(steps=2), {})
    seen = []
    original = model.run

    def run(inputs):
        seen.append(borrowing())
        note_borrowed()  # what a GPU kernel does when it borrows: counted only inside a warm model's batch
        return original(inputs)

    monkeypatch.setattr(model, "run", run)
    loaded = LoadedModel("m", 1, mnist_mlp_config(), model, torch.device("cpu"))
    loaded.warmup()
    assert seen == [False] and loaded.warm and loaded.borrowed_tunings == 0
    loaded.infer({"input": np.random.rand(2, 784).astype(np.float32)})
    assert seen == [False, True] and not borrowing()  # only inside the batch, and only on its thread
    assert loaded.borrowed_tunings == 1
    monkeypatch.setenv("MAAS_AUTOTUNE_UNSEEN", "tune")
    loaded.infer({"input": np.random.rand(2, 784).astype(np.float32)})
    assert seen == [False, True, False]


def test_compiling_ahead_runs_each_warm_up_batch_once_with_compile_only_launches(monkeypatch):
    """A GPU warm-up's first pass (here called directly: on a CPU the warm-up skips it): each batch once, every
    launch inside ``kernels.compile_only``; its outputs are not converted, and the model is not marked warm."""
    from kernels import compiling_only

    monkeypatch.setenv("MAAS_COMPILE_THREADS", "2")  # auto leaves one of this VM's two CPUs: no pool, no pass
    model = build(mnist_mlp_config(), train_mnist_mlp(steps=2), {})
    seen = []
    original = model.run
    monkeypatch.setattr(model, "run", lambda inputs: seen.append((len(inputs["input"]), compiling_only()))
                        or original(inputs))
    loaded = LoadedModel("m", 1, mnist_mlp_config(), model, torch.device("cpu"))
    batches = [{"input": np.random.rand(rows, 784).astype(np.float32)} for rows in (4, 1)]
    loaded._compile_ahead(batches)
    assert seen == [(4, True), (1, True)] and not compiling_only() and not loaded.warm
    assert loaded.compile_ahead.parallel and loaded.compile_ahead.seconds > 0  # no kernel launches: a CPU model


def test_a_failing_compile_only_pass_warns_and_leaves_the_warm_up_to_compile(monkeypatch, caplog):
    monkeypatch.setenv("MAAS_COMPILE_THREADS", "2")
    model = build(mnist_mlp_config(), train_mnist_mlp(steps=2), {})
    monkeypatch.setattr(model, "run", lambda inputs: (_ for _ in ()).throw(RuntimeError("no such kernel")))
    loaded = LoadedModel("m", 1, mnist_mlp_config(), model, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="models.loaded"):
        loaded._compile_ahead([{"input": np.random.rand(2, 784).astype(np.float32)}])
    assert [r.getMessage() for r in caplog.records] == [
        "m: compiling the warm-up's kernels ahead failed (RuntimeError: no such kernel); they compile as it runs"]


def test_moving_a_model_drops_its_graphs():
    model = build(mnist_mlp_config(), train_mnist_mlp(steps=2), {})
    with torch.inference_mode():
        model.graphed(torch.rand(2, 784))
    first = model.graphed
    model.to(torch.device("cpu"), torch.float64)
    assert model.graphed is not first and len(model.graphed) == 0


@pytest.mark.parametrize(("max_batch", "device", "expected"),
                         [(64, "cpu", [1]), (64, "cuda", [64, 32, 16, 8, 4, 2, 1]),
                          (100, "cuda", [100, 64, 32, 16, 8, 4, 2, 1]), (1, "cuda", [1])])
def test_warm_up_covers_every_batch_bucket_on_a_gpu_largest_first(max_batch, device, expected):
    assert warmup_batch_sizes(max_batch, torch.device(device)) == expected
