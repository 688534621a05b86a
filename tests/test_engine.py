"""The engine in-process: requests handed over together are validated one by one, batched together, and
answered in order; process knobs reach the model thread."""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from threadpoolctl import threadpool_info, threadpool_limits

import pipeline.engine as engine_module
from models.artifact import ArtifactError
from models.cache import ModelCache
from models.examples import (
    MNIST_MLP,
    SENTIMENT_TEXT,
    mnist_mlp_config,
    sentiment_config,
    synthetic_digits,
    train_mnist_mlp,
    train_sentiment,
)
from models.repository import ModelRepository
from pipeline.backpressure import Slots
from pipeline.codec import decode_request
from pipeline.engine import InferenceEngine
from pipeline.errors import ErrorCode, InferenceError
from pipeline.metrics import BatchRecord
from pipeline.protocol import InferenceRequest, InferenceResponse
from pipeline.runtime import DaemonThreadPool, configure_process
from pipeline.settings import Settings


def digit_request(request_id: str, image: np.ndarray, **changes) -> InferenceRequest:
    request = InferenceRequest(id=request_id, model_name=MNIST_MLP, model_version=None,
                               inputs={"input": image.reshape(1, -1).astype(np.float32)}, datatypes={"input": "FP32"})
    return replace(request, **changes)


@pytest.mark.parametrize("prepared_on", ["loop", "model thread"])
async def test_infer_many_answers_in_order_and_bad_requests_never_fail_their_batch_mates(repository, monkeypatch,
                                                                                         prepared_on):
    if prepared_on == "model thread":  # as batches over the size limit are
        monkeypatch.setattr(engine_module, "_PREPARE_ON_LOOP_BYTES", 0)
    images, _ = synthetic_digits(6, seed=3)
    nan_image = images[0].copy()
    nan_image[5] = np.nan
    requests = [
        digit_request("ok-0", images[0]),
        digit_request("shape", images[1][:100]),
        digit_request("ok-1", images[1]),
        digit_request("unknown-model", images[2], model_name="no_such_model"),
        digit_request("nan", nan_image),
        digit_request("unknown-again", images[2], model_name="no_such_model"),  # the failed lookup, reused
        digit_request("late", images[3], parameters={"deadline_ms": time.time() * 1000 - 1}),
        digit_request("bad-output", images[4], outputs=["logits"]),
        digit_request("ok-2", images[5], outputs=["class"]),
    ]
    async with InferenceEngine(ModelCache(repository)) as engine:
        outcomes = await engine.infer_many(requests)
    expected_codes = {"shape": ErrorCode.INVALID_INPUT, "unknown-model": ErrorCode.MODEL_NOT_FOUND,
                      "unknown-again": ErrorCode.MODEL_NOT_FOUND, "nan": ErrorCode.INVALID_INPUT,
                      "late": ErrorCode.DEADLINE_EXCEEDED, "bad-output": ErrorCode.INVALID_REQUEST}
    model = repository.load(MNIST_MLP, 1)
    for request, outcome in zip(requests, outcomes, strict=True):
        if request.id in expected_codes:
            assert isinstance(outcome, InferenceError), request.id
            assert (outcome.code, outcome.request_id) == (expected_codes[request.id], request.id)
            continue
        assert isinstance(outcome, InferenceResponse) and outcome.id == request.id
        alone = model.infer({"input": request.inputs["input"]})
        assert set(outcome.outputs) == set(request.outputs or alone)
        assert np.array_equal(outcome.outputs["class"], alone["class"])
    assert "'input'" in outcomes[4].message and "NaN" in outcomes[4].message
    assert outcomes[0].outputs is not outcomes[2].outputs  # batch-mates never share a dict


@pytest.mark.parametrize("prepared_on", ["loop", "model thread"])
async def test_inputs_a_model_overflows_on_get_an_error_not_null_outputs(repository, monkeypatch, prepared_on):
    if prepared_on == "model thread":
        monkeypatch.setattr(engine_module, "_PREPARE_ON_LOOP_BYTES", 0)
    repository.publish("half", replace(mnist_mlp_config(), dtype="FP16"), train_mnist_mlp(steps=5))
    images, _ = synthetic_digits(3, seed=8)
    huge = np.full(784, 1e38, np.float32)  # finite in FP32; the first layer's sums are not
    requests = [digit_request("ok", images[0]), digit_request("overflow", huge), digit_request("ok-1", images[1]),
                digit_request("half-ok", images[2], model_name="half"),
                digit_request("half-range", np.full(784, 7e4, np.float32), model_name="half")]
    async with InferenceEngine(ModelCache(repository)) as engine:
        outcomes = dict(zip([r.id for r in requests], await engine.infer_many(requests), strict=True))
    for ok in ("ok", "ok-1", "half-ok"):
        assert isinstance(outcomes[ok], InferenceResponse)
        assert np.isfinite(outcomes[ok].outputs["probabilities"]).all()
    assert (outcomes["overflow"].code, outcomes["overflow"].request_id) == (ErrorCode.INVALID_INPUT, "overflow")
    assert outcomes["overflow"].message.startswith("output 'probabilities' came out NaN or infinite")
    assert outcomes["half-range"].code == ErrorCode.INVALID_INPUT
    assert outcomes["half-range"].message == ("input 'input': values beyond +-65504 do not fit the model's FP16 "
                                              "computation")


def text_request(request_id: str, *texts: bytes) -> InferenceRequest:
    return InferenceRequest(id=request_id, model_name=SENTIMENT_TEXT, model_version=None,
                            inputs={"text": np.array(texts, dtype=object)}, datatypes={"text": "BYTES"})


@pytest.mark.parametrize("runtime", ["numpy", "torch"])
async def test_text_that_is_not_utf8_is_refused_alone_and_its_batch_mates_run_as_one_batch(repository, monkeypatch,
                                                                                          runtime):
    monkeypatch.setenv("MAAS_CPU_RUNTIME", runtime)
    repository.publish(SENTIMENT_TEXT, sentiment_config(), *train_sentiment(steps=20))
    requests = [text_request("ok-0", b"a wonderful film"), text_request("latin-1", b"fine", b"caf\xe9 au lait"),
                text_request("ok-1", "tr\u00e8s bien".encode(), b"dull"), text_request("cut", b"\xe2\x82")]
    records: list[BatchRecord] = []
    async with InferenceEngine(ModelCache(repository)) as engine:
        engine.add_batch_listener(records.append)
        outcomes = dict(zip([r.id for r in requests], await engine.infer_many(requests), strict=True))
    assert (outcomes["latin-1"].code, outcomes["latin-1"].message) == (
        ErrorCode.INVALID_INPUT, "input 'text': element 1 is not UTF-8 text (invalid continuation byte at byte 3)")
    assert outcomes["cut"].message == "input 'text': element 0 is not UTF-8 text (unexpected end of data at byte 0)"
    model = repository.load(SENTIMENT_TEXT, 1)
    for request_id in ("ok-0", "ok-1"):
        alone = model.infer(dict(next(r for r in requests if r.id == request_id).inputs))
        assert set(outcomes[request_id].outputs) == set(alone)
        for name, expected in alone.items():
            np.testing.assert_allclose(outcomes[request_id].outputs[name], expected, rtol=1e-5, atol=1e-6)
    assert [(r.batch_size, r.requests) for r in records] == [(3, 2)]  # the rest ran together, not one by one


async def test_a_priority_given_as_null_runs_as_no_priority(repository):
    """The decoder takes `"priority": null` as no priority, as it does a null deadline_ms: the engine must run such
    a request, not fail the whole call on int(None) (which sent every request of a fetch one by one, and this one
    to the dead-letter topic as a bug)."""
    image = synthetic_digits(1, seed=7)[0][0]
    body = {"id": "null-priority", "model_name": MNIST_MLP, "parameters": {"priority": None, "deadline_ms": None},
            "inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": image.tolist()}]}
    request = decode_request(json.dumps(body).encode(), max_bytes=1 << 20)
    async with InferenceEngine(ModelCache(repository)) as engine:
        outcomes = await engine.infer_many([request, digit_request("beside", image)])
    assert [type(o) for o in outcomes] == [InferenceResponse, InferenceResponse]
    assert np.array_equal(outcomes[0].outputs["class"], outcomes[1].outputs["class"])


async def test_requests_of_several_rows_get_their_own_rows_back(repository):
    images, _ = synthetic_digits(6, seed=6)
    sizes = [1, 3, 2]
    starts = [0, 1, 4]
    requests = [InferenceRequest(id=f"rows-{n}", model_name=MNIST_MLP, model_version=None,
                                 inputs={"input": images[start:start + n].astype(np.float32)},
                                 datatypes={"input": "FP32"}) for start, n in zip(starts, sizes, strict=True)]
    async with InferenceEngine(ModelCache(repository)) as engine:
        outcomes = await engine.infer_many(requests)
    model = repository.load(MNIST_MLP, 1)
    for request, outcome in zip(requests, outcomes, strict=True):
        alone = model.infer(request.inputs)
        assert outcome.outputs["class"].shape == (request.batch_rows,)
        assert np.array_equal(outcome.outputs["class"], alone["class"])
        assert np.allclose(outcome.outputs["probabilities"], alone["probabilities"], atol=1e-6)


async def test_a_model_that_loses_rows_fails_its_batch_with_an_internal_error_and_the_engine_goes_on(repository):
    images, _ = synthetic_digits(4, seed=7)
    cache = ModelCache(repository)
    model = cache.get(MNIST_MLP, 1)
    healthy = model.infer
    model.infer = lambda inputs: {k: v[:-1] for k, v in healthy(inputs).items()}
    async with InferenceEngine(cache) as engine:
        broken = await engine.infer_many([digit_request(f"b{i}", image) for i, image in enumerate(images[:3])])
        model.infer = healthy
        fine = await engine.infer(digit_request("after", images[3]))
    assert [(o.code, o.request_id) for o in broken] == [(ErrorCode.INTERNAL, f"b{i}") for i in range(3)]
    assert "one row per input row" in broken[0].message
    assert fine.outputs["class"].shape == (1,)


class _QuotesItsFolder(ModelRepository):
    """A repository whose load failures quote where it keeps its files, as an OSError's str() does (a disk read
    error) or a library's message may: the engine's answers and the cache's readiness reason cut that away."""

    def load(self, name, version, device=None):
        path = self.root / name / str(version) / "model.safetensors"
        if name == "unreadable":
            raise OSError(errno.EIO, "Input/output error", str(path))
        raise ArtifactError(f"{path}: not a valid safetensors file (header of {self.root})")


async def test_a_load_failure_that_quotes_the_repository_folder_reaches_no_caller_with_it(repository):
    for name in ("unreadable", "garbled"):
        shutil.copytree(repository.root / MNIST_MLP / "1", repository.root / name / "1")
    images, _ = synthetic_digits(1, seed=7)
    quoting = _QuotesItsFolder(repository.root)
    async with InferenceEngine(ModelCache(quoting)) as engine:
        outcomes = await engine.infer_many([digit_request(name, images[0], model_name=name)
                                            for name in ("unreadable", "garbled")])
        failure = engine.cache.load_failure("garbled", 1)
    assert [(o.code, o.message) for o in outcomes] == [
        (ErrorCode.INTERNAL, "model 'unreadable' version 1 failed to load: [Errno 5] Input/output error: "
                             "'unreadable/1/model.safetensors'"),
        (ErrorCode.INTERNAL, "model 'garbled' version 1 failed to load: garbled/1/model.safetensors: not a valid "
                             "safetensors file (header of the model repository)"),
    ]
    assert failure == "garbled/1/model.safetensors: not a valid safetensors file (header of the model repository)"


async def test_loads_evictions_and_cache_bytes_reach_the_metrics(repository):
    """Issue #6's cache counters on /metrics: hit/miss (maas_model_cache_total), load + warm-up time per load,
    evictions past the memory budget, and the bytes held."""
    repository.publish("other", mnist_mlp_config(), train_mnist_mlp(steps=2))
    one_model = repository.load(MNIST_MLP, 1).nbytes
    cache = ModelCache(repository, max_bytes=int(one_model * 1.5))  # room for one version at a time
    image = synthetic_digits(1, seed=5)[0][0]

    def sample(name: str, labels: dict | None = None) -> float:
        return REGISTRY.get_sample_value(name, labels or {}) or 0.0

    before = {"loads": sample("maas_model_load_seconds_count", {"model": "other:1"}),
              "evictions": sample("maas_model_cache_evictions_total")}
    async with InferenceEngine(cache) as engine:
        await engine.infer(digit_request("first", image))
        await engine.infer(digit_request("second", image, model_name="other"))  # evicts mnist_mlp
        await engine.infer(digit_request("again", image, model_name="other"))  # a hit
    assert sample("maas_model_load_seconds_count", {"model": "other:1"}) == before["loads"] + 1
    assert sample("maas_model_load_seconds_sum", {"model": "other:1"}) > 0
    assert sample("maas_model_cache_evictions_total") == before["evictions"] + 1
    assert sample("maas_model_cache_bytes") == cache.nbytes == one_model
    assert cache.loaded() == [("other", 1)]


async def test_evictions_of_loads_under_way_together_are_counted_once(repository):
    """Two loads under way at once (batches of two models missing from the cache): each one's evictions are counted
    once on maas_model_cache_evictions_total. Each counted the cache's evictions since it began, and the load queued
    behind the other on the model thread counted the other's too."""
    repository.publish("other", mnist_mlp_config(), train_mnist_mlp(steps=2))
    repository.publish("other", mnist_mlp_config(), train_mnist_mlp(steps=2))
    one_model = repository.load(MNIST_MLP, 1).nbytes
    cache = ModelCache(repository, max_bytes=int(one_model * 1.5))  # room for one version at a time

    def evictions() -> float:
        return REGISTRY.get_sample_value("maas_model_cache_evictions_total") or 0.0

    async with InferenceEngine(cache) as engine:
        await engine.load(MNIST_MLP, 1)
        before, stats_before = evictions(), cache.stats.evictions
        await asyncio.gather(engine.load("other", 1), engine.load("other", 2))  # evicts mnist_mlp, then other:1
    assert cache.stats.evictions - stats_before == 2
    assert evictions() - before == 2
    assert cache.loaded() == [("other", 2)]


async def test_kernel_binaries_a_warm_up_compiled_or_loaded_are_counted_per_model(repository, monkeypatch):
    """``maas_kernel_binaries_total{source}``: a GPU warm-up's compile-only pass (``LoadedModel.compile_ahead``)
    compiled some binaries and loaded the others from the Triton cache (counted by the kernels: see
    autotune_check.py); a CPU model, with no such pass, adds nothing."""
    from kernels import CompilePass
    from models.loaded import LoadedModel

    def sample(source: str) -> float:
        return REGISTRY.get_sample_value("maas_kernel_binaries_total", {"model": f"{MNIST_MLP}:1",
                                                                       "source": source}) or 0.0

    before = {source: sample(source) for source in ("compiled", "cache")}
    warmup = LoadedModel.warmup

    def warmup_with_a_compile_pass(self):
        warmup(self)
        self.compile_ahead = CompilePass(parallel=True, workers="threads", binaries=7, compiled=2)

    async with InferenceEngine(ModelCache(repository)) as engine:
        assert (await engine.infer(digit_request("cpu", synthetic_digits(1, seed=4)[0][0]))).outputs is not None
        assert {source: sample(source) for source in before} == before
    monkeypatch.setattr(LoadedModel, "warmup", warmup_with_a_compile_pass)
    async with InferenceEngine(ModelCache(repository)) as engine:
        assert (await engine.infer(digit_request("gpu", synthetic_digits(1, seed=5)[0][0]))).outputs is not None
    assert (sample("compiled"), sample("cache")) == (before["compiled"] + 2, before["cache"] + 5)


async def test_tunings_a_batch_borrowed_are_counted_per_model(repository):
    """``maas_borrowed_tunings_total``: shapes a warm model's warm-up missed, served on borrowed GPU configs
    (``LoadedModel.borrowed_tunings``, counted by the kernels: see test_cuda_graphs)."""
    images, _ = synthetic_digits(2, seed=3)
    cache = ModelCache(repository)
    model = cache.get(MNIST_MLP, 1)
    healthy = model.infer

    def borrowing_infer(inputs):
        model.borrowed_tunings += 3  # as if the batch met three untuned kernel shapes
        return healthy(inputs)

    counted = REGISTRY.get_sample_value("maas_borrowed_tunings_total", {"model": f"{MNIST_MLP}:1"}) or 0.0
    async with InferenceEngine(cache) as engine:
        assert (await engine.infer(digit_request("plain", images[0]))).outputs is not None
        assert REGISTRY.get_sample_value("maas_borrowed_tunings_total", {"model": f"{MNIST_MLP}:1"}) in (None, counted)
        model.infer = borrowing_infer
        assert (await engine.infer(digit_request("borrowed", images[1]))).outputs is not None
    assert REGISTRY.get_sample_value("maas_borrowed_tunings_total", {"model": f"{MNIST_MLP}:1"}) == counted + 3


@pytest.mark.parametrize(("count", "batches"), [(40, [40]), (100, [64, 36])])
async def test_requests_handed_over_together_fill_batches_up_to_max_batch_size(repository, count, batches):
    images, _ = synthetic_digits(count, seed=4)
    records: list[BatchRecord] = []
    async with InferenceEngine(ModelCache(repository)) as engine:
        engine.add_batch_listener(records.append)
        outcomes = await engine.infer_many([digit_request(f"r{i}", image) for i, image in enumerate(images)])
    assert [o.id for o in outcomes] == [f"r{i}" for i in range(count)]
    assert sorted(r.batch_size for r in records) == sorted(batches)
    assert sum(r.requests for r in records) == count


async def test_a_model_config_is_looked_up_once_however_many_requests_name_it(repository):
    calls = []
    cache = ModelCache(repository)
    resolve = repository.resolve

    def counting_resolve(name, version=None):
        calls.append((name, version))
        time.sleep(0.05)  # a slow repository (S3): requests keep arriving meanwhile
        return resolve(name, version)

    repository.resolve = counting_resolve
    images, _ = synthetic_digits(30, seed=5)
    async with InferenceEngine(cache) as engine:
        outcomes = await asyncio.gather(*(engine.infer(digit_request(f"r{i}", image))
                                          for i, image in enumerate(images)))
    assert len(outcomes) == 30 and calls == [(MNIST_MLP, None)]


async def test_latest_is_at_most_latest_ttl_s_old(repository):
    """The engine keeps its answer for "latest" for latest_ttl_s, so it asks the repository, not the cache's
    resolve(), whose answer may already be that old: staleness adds up to one TTL, not two."""
    cache = ModelCache(repository, latest_ttl_s=3600)
    image = synthetic_digits(1, seed=4)[0][0]
    async with InferenceEngine(cache) as engine:
        assert cache.resolve(MNIST_MLP) == 1  # the cache keeps this answer for an hour
        repository.publish(MNIST_MLP, mnist_mlp_config(), train_mnist_mlp(steps=2))
        assert (await engine.infer(digit_request("a", image))).model_version == 2  # not the cache's hour-old 1


async def test_the_model_thread_runs_with_the_configured_torch_threads(repository, monkeypatch):
    """torch's thread count is per thread: the model thread applies MAAS_TORCH_THREADS itself."""
    monkeypatch.setattr("pipeline.runtime._torch_threads", None)  # this process's setting, restored after
    before = torch.get_num_threads()
    try:
        configure_process(replace(Settings(), torch_threads=1, gc_gen0_threshold=0))
        async with InferenceEngine(ModelCache(repository)) as engine:
            assert await engine._in_executor("a test", torch.get_num_threads) == 1
    finally:
        torch.set_num_threads(before)


def test_configure_process_is_idempotent_and_sets_threads_and_the_gc_threshold(monkeypatch):
    monkeypatch.setattr("pipeline.runtime._torch_threads", None)
    threads, thresholds, blas = torch.get_num_threads(), gc.get_threshold(), blas_threads()
    try:
        configure_process(Settings())
        first = torch.get_num_threads(), blas_threads()
        configure_process(Settings())
        assert (torch.get_num_threads(), blas_threads()) == first and min(first) >= 1
        assert gc.get_threshold()[0] == Settings().gc_gen0_threshold
        configure_process(replace(Settings(), torch_threads=3, gc_gen0_threshold=0))
        assert torch.get_num_threads() == 3 and blas_threads() == 3  # numpy's BLAS follows the same setting
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        torch.set_num_threads(threads)
        threadpool_limits(blas, user_api="blas")


def blas_threads() -> int:
    return max(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")


async def test_slots_are_taken_whole_and_never_beyond_capacity():
    slots = Slots(3)
    assert await slots.take(5) == 3  # more than the capacity: all of it
    waiting = asyncio.create_task(slots.take(2))
    slots.give(1)
    await asyncio.sleep(0.01)
    assert not waiting.done()  # one slot back is not enough for a fetch of two
    slots.give(1)
    assert await asyncio.wait_for(waiting, 1) == 2
    assert slots.free == 0


def rows_request(request_id: str, images: np.ndarray, **changes) -> InferenceRequest:
    return replace(digit_request(request_id, images[0]), inputs={"input": images}, **changes)


def _slow(model, seconds: float, seen: list) -> None:
    """The loaded model, made slow: each batch records its rows (and the wall time it started) first."""
    infer = model.infer

    def slow(inputs):
        seen.append((len(next(iter(inputs.values()))), time.time() * 1000))
        time.sleep(seconds)
        return infer(inputs)

    model.infer = slow


async def test_a_deadline_that_passes_while_the_batch_waits_for_the_model_thread_is_kept(repository):
    """Batches wait on the one model thread (up to max_running_batches handed over): a request whose deadline
    passes there is answered DEADLINE_EXCEEDED and not run, and its batch-mates still run."""
    cache = ModelCache(repository)
    seen: list = []
    _slow(cache.get(MNIST_MLP, 1), 0.5, seen)
    images = np.random.default_rng(0).random((64, 784), dtype=np.float32)
    async with InferenceEngine(cache) as engine:
        # The second batch starts about 0.5 s in (after the first): 400 ms of margin for a loaded machine to start
        # the first one (200 ms at 0.4 s and 600 ms). The third cannot start before 1.0 s: past the deadline.
        deadline = time.time() * 1000 + 900
        requests = [rows_request(f"d{i}", images, parameters={"deadline_ms": deadline}) for i in range(4)]
        requests.append(rows_request("no-deadline", images[:1]))
        outcomes = await asyncio.gather(*(engine.infer_many([r]) for r in requests))
    codes = [getattr(o, "code", "ok") for (o,) in outcomes]
    assert codes[:2] == ["ok", "ok"] and codes[2:4] == [ErrorCode.DEADLINE_EXCEEDED] * 2 and codes[4] == "ok"
    assert all(started <= deadline for rows, started in seen if rows == 64) and len(seen) == 3


async def test_stop_waits_for_the_running_batch_off_the_event_loop(repository):
    cache = ModelCache(repository)
    seen: list = []
    _slow(cache.get(MNIST_MLP, 1), 1.0, seen)
    gaps, ticking = [], True

    async def ticker():
        last = time.monotonic()
        while ticking:
            await asyncio.sleep(0.01)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()

    engine = await InferenceEngine(cache).start()
    running = asyncio.create_task(engine.infer(digit_request("slow", synthetic_digits(1, seed=1)[0][0])))
    while not seen:
        await asyncio.sleep(0.01)
    ticks = asyncio.create_task(ticker())
    await engine.stop()
    ticking = False
    await ticks
    assert max(gaps) < 0.5  # the loop kept running while the model thread finished its second of work
    with pytest.raises(InferenceError):
        await running


def _hang(model, entered: threading.Event, release: threading.Event) -> None:
    """The loaded model, made to hang (a GPU hang, a C call that never returns) until `release` is set."""
    infer = model.infer

    def hang(inputs):
        entered.set()
        release.wait()
        return infer(inputs)

    model.infer = hang


async def test_stop_abandons_a_batch_that_outlives_stop_timeout_s(repository, caplog):
    """stop() waited for the model thread without limit: a hung model held it, and a worker's SIGTERM, forever. Past
    stop_timeout_s the batch is abandoned on its thread, a daemon that does not hold the process's exit; its caller
    has an UNAVAILABLE error, and the batch, ending later, answers no one."""
    cache = ModelCache(repository)
    entered, release = threading.Event(), threading.Event()
    _hang(cache.get(MNIST_MLP, 1), entered, release)
    records: list[BatchRecord] = []
    before = set(threading.enumerate())
    # A serving process's engine waits a quarter of MAAS_SHUTDOWN_TIMEOUT_S: 0.5 s here.
    engine = await InferenceEngine.for_settings(cache, replace(Settings(), shutdown_timeout_s=2)).start()
    engine.add_batch_listener(records.append)
    try:
        running = asyncio.create_task(engine.infer(digit_request("hung", synthetic_digits(1, seed=1)[0][0])))
        assert await asyncio.to_thread(entered.wait, 10)
        started = time.monotonic()
        await asyncio.wait_for(engine.stop(), 10)  # hang guard
        took = time.monotonic() - started
        (model_thread,) = [t for t in set(threading.enumerate()) - before if t.name.startswith("maas-model")]
        assert model_thread.daemon  # the interpreter's exit does not wait for it
    finally:
        release.set()
    assert 0.5 <= took < 2, f"stop() took {took:.2f} s"
    assert any("'mnist_mlp' version 1" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    with pytest.raises(InferenceError) as stopped:
        await running
    assert stopped.value.code == ErrorCode.UNAVAILABLE
    await asyncio.to_thread(model_thread.join, 10)
    assert not model_thread.is_alive() and records == []  # released, the batch ran to its end for no one


async def test_stop_is_bounded_while_the_default_executor_is_busy(repository):
    """stop() waited for the model thread through `asyncio.to_thread`: in a `maas` process the default executor's
    few threads may all be held by S3 or SQS calls their sources abandoned (an endpoint that does not answer: 30 s a
    try, three tries), and the wait queued behind them, far past stop_timeout_s."""
    cache = ModelCache(repository)
    entered, release = threading.Event(), threading.Event()
    _hang(cache.get(MNIST_MLP, 1), entered, release)
    engine = await InferenceEngine(cache, stop_timeout_s=0.5).start()
    running = asyncio.create_task(engine.infer(digit_request("hung", synthetic_digits(1, seed=1)[0][0])))
    assert await asyncio.to_thread(entered.wait, 10)
    loop = asyncio.get_running_loop()
    loop.set_default_executor(DaemonThreadPool(1))  # as `maas` commands set it, its one thread taken below
    abandoned = threading.Event()
    busy = loop.run_in_executor(None, abandoned.wait)  # an S3 call that its endpoint does not answer
    try:
        started = time.monotonic()
        await asyncio.wait_for(engine.stop(), 10)  # hang guard
        took = time.monotonic() - started
    finally:
        release.set()
        abandoned.set()
    await busy
    assert took < 2, f"stop() took {took:.2f} s, stop_timeout_s 0.5"
    with pytest.raises(InferenceError):
        await running


async def test_a_stop_called_while_another_waits_returns_when_that_one_is_done(repository):
    """The second stop() found the model thread taken by the first and returned at once, its caller taking the
    engine for stopped while the first still waited for the batch under way."""
    cache = ModelCache(repository)
    entered, release = threading.Event(), threading.Event()
    _hang(cache.get(MNIST_MLP, 1), entered, release)
    engine = await InferenceEngine(cache, stop_timeout_s=1.0).start()
    try:
        running = asyncio.create_task(engine.infer(digit_request("hung", synthetic_digits(1, seed=1)[0][0])))
        assert await asyncio.to_thread(entered.wait, 10)
        first = asyncio.create_task(engine.stop())
        await asyncio.sleep(0.05)
        second = asyncio.create_task(engine.stop())
        await asyncio.sleep(0.3)
        assert not second.done(), "the second stop() returned while the first still waited"
        first.cancel()  # its caller gives up: the stop goes on for the second
        await asyncio.sleep(0.1)
        assert not second.done()
        await asyncio.wait_for(second, 10)  # hang guard
    finally:
        release.set()
    with pytest.raises(InferenceError):
        await running


def test_a_process_whose_model_hangs_exits_after_the_engine_stops(repository):
    """A hung model's thread must not hold the interpreter's exit, as a ThreadPoolExecutor's did (joined at exit)."""
    code = (
        "import asyncio, sys, threading\n"
        "from models.cache import ModelCache\n"
        "from models.repository import ModelRepository\n"
        "from pipeline.engine import InferenceEngine\n"
        "async def main():\n"
        "    cache, entered = ModelCache(ModelRepository(sys.argv[1])), threading.Event()\n"
        "    cache.fetch = lambda *key: (entered.set(), threading.Event().wait())  # a load that never ends\n"
        "    engine = await InferenceEngine(cache, stop_timeout_s=0.2).start()\n"
        "    loading = asyncio.create_task(engine.load('mnist_mlp', 1))\n"
        "    await asyncio.to_thread(entered.wait)\n"
        "    await engine.stop()\n"
        "    print('stopped', flush=True)\n"
        "asyncio.run(main())\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, str(repository.root)], capture_output=True, text=True,
                          env=environment, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["stopped"], done.stderr[-2000:]
    assert time.monotonic() - started < 30


async def test_a_start_that_fails_stops_the_model_thread_and_the_batcher(repository, monkeypatch):
    """A start that raised (torch cannot be imported on the model thread, say) left the thread it started running,
    and its batcher open: the engine, never started for its caller, went on taking requests."""
    def broken() -> None:
        raise ImportError("torch is broken here")

    monkeypatch.setattr(engine_module, "_serves_torch_models", lambda repository: True)
    monkeypatch.setattr(engine_module, "_import_torch", broken)
    before = set(threading.enumerate())
    engine = InferenceEngine(ModelCache(repository))
    with pytest.raises(ImportError, match="torch is broken here"):
        await engine.start()
    assert [t.name for t in set(threading.enumerate()) - before if t.name.startswith("maas-model")] == []
    with pytest.raises(InferenceError) as refused:
        await engine.infer(digit_request("after", synthetic_digits(1, seed=5)[0][0]))
    assert refused.value.code == ErrorCode.UNAVAILABLE and engine._batcher.collecting == []


async def test_a_cancelled_caller_gives_up_its_rows(repository):
    cache = ModelCache(repository)
    seen: list = []
    _slow(cache.get(MNIST_MLP, 1), 0.3, seen)
    image = synthetic_digits(1, seed=2)[0][0]
    async with InferenceEngine(cache) as engine:
        first = asyncio.create_task(engine.infer(digit_request("first", image)))
        while not seen:
            await asyncio.sleep(0.01)
        quitters = [asyncio.create_task(engine.infer(digit_request(f"q{i}", image))) for i in range(10)]
        await asyncio.sleep(0.05)  # queued behind the running batch
        for task in quitters:
            task.cancel()
        last = await engine.infer(digit_request("last", image))
        await first
    assert last.id == "last" and [rows for rows, _ in seen] == [1, 1]  # nobody ran the quitters' rows


async def test_a_caller_cancelled_while_its_model_queue_is_full_gives_up_the_rows_it_queued(repository):
    """A call of more than max_batch_size requests submits a queue item per chunk; cancelled while a later chunk
    waits for room in the full queue, it must give up the chunks already queued as well, not leave them to run."""
    cache = ModelCache(repository)
    seen: list = []
    _slow(cache.get(MNIST_MLP, 1), 0.3, seen)
    images, _ = synthetic_digits(100, seed=8)
    async with InferenceEngine(cache, max_queue_per_model=1, max_running_batches=1) as engine:
        first = asyncio.create_task(engine.infer(digit_request("first", images[0])))
        while not seen:
            await asyncio.sleep(0.01)
        quitter = asyncio.create_task(engine.infer_many([digit_request(f"q{i}", image)
                                                         for i, image in enumerate(images)]))
        await asyncio.sleep(0.05)  # its first 64 rows queued, the next 36 waiting for room
        quitter.cancel()
        await first
        last = await engine.infer(digit_request("last", images[1]))
    assert last.id == "last" and [rows for rows, _ in seen] == [1, 1]  # nobody ran the quitter's rows


async def test_compute_time_excludes_the_wait_for_the_model_thread(repository):
    cache = ModelCache(repository)
    seen: list = []
    _slow(cache.get(MNIST_MLP, 1), 0.1, seen)
    images = np.random.default_rng(0).random((64, 784), dtype=np.float32)
    records: list[BatchRecord] = []
    async with InferenceEngine(cache) as engine:
        engine.add_batch_listener(records.append)
        await asyncio.gather(*(engine.infer(rows_request(f"c{i}", images)) for i in range(4)))
    assert len(records) == 4 and all(r.compute_ms < 250 for r in records)  # each 100 ms, not 100 x its place
    assert max(r.queue_wait_ms_max for r in records) > 200  # the last batch's wait shows as waiting


def test_fetch_says_whether_this_call_loaded_the_model(repository):
    cache = ModelCache(repository)
    first, loaded = cache.fetch(MNIST_MLP, 1)
    again, loaded_again = cache.fetch(MNIST_MLP, 1)
    assert loaded and not loaded_again and again is first


@pytest.mark.parametrize("runtime", ["numpy", "torch"])
def test_torch_is_imported_at_start_only_when_a_model_needs_it(repository, runtime):
    """Imported by a first request's load instead, on the model thread, torch held the GIL long enough to stall
    the event loop ~0.26 s; a process serving numpy twins only must still never import it."""
    code = (
        "import asyncio, sys\n"
        "from models.cache import ModelCache\n"
        "from models.repository import ModelRepository\n"
        "from pipeline.engine import InferenceEngine\n"
        "async def main():\n"
        "    async with InferenceEngine(ModelCache(ModelRepository(sys.argv[1]))):\n"
        "        print('torch' in sys.modules)\n"
        "asyncio.run(main())\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MAAS_CPU_RUNTIME": runtime}
    done = subprocess.run([sys.executable, "-c", code, str(repository.root)], capture_output=True, text=True,
                          env=environment, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(runtime == "torch")]
