"""The V2 HTTP API over a real aiohttp server and engine: endpoints, binary extension, errors, auth, limits."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import shutil
import socket

import aiohttp
import numpy as np
import orjson
import pytest
import yarl
from prometheus_client import REGISTRY
from s3_support import assert_names_no_location, unreachable_s3

from models.cache import ModelCache
from models.examples import MNIST_MLP, mnist_mlp_config, synthetic_digits, train_mnist_mlp
from models.repository import open_repository
from pipeline.codec import decode_response, encode_request
from pipeline.engine import InferenceEngine
from pipeline.http_server import HttpServer
from pipeline.observability import IDLE_TIMEOUT_S, HealthServer
from pipeline.ratelimit import ApiKeys, Limit, RateLimiter, TokenBucket
from pipeline.services import aws_client
from pipeline.v2_api import V2Api


@contextlib.asynccontextmanager
async def serving(repository, load_retry_s: float = 10.0, **api_kwargs):
    api_kwargs.setdefault("max_request_bytes", 64 * 1024)
    async with InferenceEngine(ModelCache(repository, load_retry_s=load_retry_s), worker_id="http-test") as engine:
        api = V2Api(engine, **api_kwargs)
        async with HttpServer(api, "127.0.0.1", 0) as server, aiohttp.ClientSession(server.url) as session:
            yield session, api, server


def json_request(n: int = 1, seed: int = 3, **extra) -> dict:
    images, _ = synthetic_digits(n, seed=seed)
    return {"inputs": [{"name": "input", "shape": [n, 784], "datatype": "FP32", "data": images.reshape(-1).tolist()}],
            **extra}


async def test_health_metadata_and_repository(repository):
    async with serving(repository) as (http, api, _):
        for path, expected in [("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True})]:
            async with http.get(path) as r:
                assert r.status == 200 and await r.json() == expected
        async with http.get("/v2") as r:
            body = await r.json()
            assert body["name"] == "maas" and "binary_tensor_data" in body["extensions"]
        async with http.get(f"/v2/models/{MNIST_MLP}") as r:
            meta = await r.json()
        assert meta["name"] == MNIST_MLP and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}]
        assert {o["name"] for o in meta["outputs"]} == {"probabilities", "class"}
        async with http.get(f"/v2/models/{MNIST_MLP}/versions/1/ready") as r:
            assert r.status == 200
        async with http.get(f"/v2/models/{MNIST_MLP}/versions/7") as r:
            assert r.status == 404 and "no version 7" in (await r.json())["error"]
        async with http.post("/v2/repository/index") as r:
            assert await r.json() == [{"name": MNIST_MLP, "version": "1", "state": "READY",
                                       "reason": "loads on first request"}]
        async with http.post(f"/v2/repository/models/{MNIST_MLP}/unload") as r:
            assert r.status == 200
        async with http.get(f"/v2/models/{MNIST_MLP}/ready") as r:  # the V2 health API's "4xx for false"
            assert r.status == 400 and r.headers["x-maas-error-code"] == "NOT_READY"
        async with http.post(f"/v2/models/{MNIST_MLP}/infer", json=json_request()) as r:
            assert r.status == 503 and "unloaded" in (await r.json())["error"]
        async with http.post("/v2/repository/index", json={"ready": True}) as r:
            assert await r.json() == []
        async with http.post(f"/v2/repository/models/{MNIST_MLP}/load") as r:
            assert r.status == 200
        async with http.post("/v2/repository/index") as r:
            assert (await r.json())[0]["state"] == "READY" and (await r.json())[0]["reason"] == ""
        async with http.post("/v2/repository/models/nope/load") as r:
            assert r.status == 404
        api.ready = False  # starting or stopping
        async with http.get("/v2/health/ready") as r:
            assert r.status == 400 and r.headers["x-maas-error-code"] == "NOT_READY"
        api.ready = True
        async with http.get("/v2/health/nothing") as r:
            assert r.status == 404 and "error" in await r.json()
        async with http.delete("/v2/health/live") as r:
            assert r.status == 405


async def test_a_model_that_failed_to_load_is_not_ready_until_a_load_succeeds(repository, caplog):
    """A truncated weights file failed every infer with 500, yet ready said 200 and the index READY; the load
    endpoint answered an opaque 500 and logged the ArtifactError's traceback as an unexpected failure."""
    shutil.copytree(repository.root / MNIST_MLP / "1", repository.root / "broken" / "1")
    weights = repository.root / "broken" / "1" / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[:100])
    async with serving(repository, load_retry_s=0) as (http, _, _):  # readiness does not wait for a retry
        async with http.post("/v2/models/broken/infer", json=json_request()) as r:
            assert r.status == 500 and "failed to load" in (await r.json())["error"]
        for path in ("/v2/models/broken/ready", "/v2/models/broken/versions/1/ready"):
            async with http.get(path) as r:
                assert r.status == 400 and r.headers["x-maas-error-code"] == "NOT_READY"
                assert "model 'broken' version 1 failed to load" in (await r.json())["error"]
        async with http.post("/v2/repository/index") as r:
            row = next(row for row in await r.json() if row["name"] == "broken")
        assert row["state"] == "UNAVAILABLE" and row["reason"].startswith("failed to load: ")
        assert "sha256" in row["reason"]
        async with http.post("/v2/repository/index", json={"ready": True}) as r:
            assert [row["name"] for row in await r.json()] == [MNIST_MLP]
        async with http.post("/v2/repository/models/broken/load") as r:
            message = (await r.json())["error"]
            assert r.status == 500 and r.headers["x-maas-error-code"] == "INTERNAL"
        assert "model 'broken' version 1 failed to load" in message and "sha256" in message
        assert not [r for r in caplog.records if "unexpected failure" in r.getMessage()]
        weights.write_bytes(intact)  # repaired: the next load succeeds
        async with http.post("/v2/repository/models/broken/load") as r:
            assert r.status == 200
        async with http.get("/v2/models/broken/ready") as r:
            assert r.status == 200 and await r.json() == {"name": "broken", "ready": True}
        async with http.post("/v2/repository/index") as r:
            assert {"name": "broken", "version": "1", "state": "READY", "reason": ""} in await r.json()


def _truncate_weights(folder):
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])


def _unhashed_garbage_weights(folder):  # no sums recorded: the safetensors reader finds the fault
    config = orjson.loads((folder / "config.json").read_bytes())
    del config["files"]
    (folder / "config.json").write_bytes(orjson.dumps(config))
    (folder / "model.safetensors").write_bytes(b"garbage")


@pytest.mark.parametrize(("fault", "message"), [
    (_truncate_weights, "model 'broken' version 1 failed to load: broken/1/model.safetensors: sha256 "),
    (lambda folder: (folder / "model.safetensors").unlink(),
     "model 'broken' version 1 failed to load: broken/1/model.safetensors is missing; config.json records its sha256"),
    (_unhashed_garbage_weights,
     "model 'broken' version 1 failed to load: broken/1/model.safetensors: not a valid safetensors file"),
    (lambda folder: (folder / "config.json").write_text("{not json"),
     "model 'broken' is misconfigured: broken/1/config.json: invalid JSON"),
], ids=["sha256", "missing", "not-safetensors", "config"])
async def test_a_failed_load_names_the_file_but_never_the_servers_folders(repository, tmp_path, fault, message):
    """Infer errors, readiness, the index and the load endpoint quoted the repository's folder
    (/srv/models/broken/1/model.safetensors: ...): where a server keeps its files is none of its callers'
    business. They name the file inside the version, and what is wrong with it."""
    shutil.copytree(repository.root / MNIST_MLP / "1", repository.root / "broken" / "1")
    fault(repository.root / "broken" / "1")
    answers = []
    async with serving(repository, load_retry_s=0) as (http, _, _):
        async with http.post("/v2/models/broken/infer", json=json_request()) as r:
            assert r.status == 500 and r.headers["x-maas-error-code"] == "INTERNAL"
            answers.append((await r.json())["error"])
        assert answers[0].startswith(message)
        for path in ("/v2/models/broken/ready", "/v2/models/broken/versions/1/ready"):
            async with http.get(path) as r:
                assert r.status in (400, 500)
                answers.append((await r.json())["error"])
        async with http.post("/v2/repository/index") as r:
            answers.append(await r.text())
        async with http.post("/v2/repository/models/broken/load") as r:
            assert r.status == 500
            answers.append((await r.json())["error"])
    assert all(answer.startswith(message) for answer in answers[1:3] + answers[4:]), answers
    if "failed to load" in message:  # the index lists the version as failed, saying why
        assert f"failed to load: {message.partition('failed to load: ')[2]}" in answers[3]
    for answer in answers:
        assert str(tmp_path) not in answer and str(tmp_path.resolve()) not in answer, answer


async def test_an_s3_outage_gets_503_unavailable_naming_the_model_not_the_endpoint(live, tmp_path):
    """With S3 down, a model whose config was looked up failed its load with 500 and botocore's text (`Could not
    connect to the endpoint URL: "http://host:port/bucket/key"`), and one not looked up yet with an opaque 500
    "internal error": both are 503 UNAVAILABLE, which invites the retry that succeeds once S3 is back."""
    s3 = aws_client(live, "s3")
    repo = open_repository(f"s3://{live.batch_bucket}/served", lambda: s3, cache_dir=tmp_path / "cache")
    for name in ("looked_up", "not_looked_up"):
        assert repo.publish(name, mnist_mlp_config(), train_mnist_mlp(steps=1)) == 1
    async with serving(repo) as (http, _, _):
        async with http.get("/v2/models/looked_up/versions/1") as r:  # its config is known, its files not loaded
            assert r.status == 200
        repo.client = down = unreachable_s3()
        repo.listing_ttl_s = 0.0  # every lookup lists the store: none is answered from the listing above
        answers = []
        for method, path in [("POST", "/v2/models/looked_up/versions/1/infer"),
                             ("POST", "/v2/models/not_looked_up/infer"),
                             ("POST", "/v2/repository/models/not_looked_up/load"),
                             ("GET", "/v2/models/not_looked_up/versions/1")]:
            async with http.request(method, path, json=json_request()) as r:
                answers.append((r.status, r.headers["x-maas-error-code"], (await r.json())["error"]))
        async with http.post("/v2/repository/index", json={}) as r:  # a listing: no model to name
            index = (r.status, r.headers["x-maas-error-code"], (await r.json())["error"])
        repo.client = s3  # back: the retry is answered
        async with http.post("/v2/models/not_looked_up/infer", json=json_request()) as r:
            assert r.status == 200
    unavailable = "the model repository is unavailable; retry later"
    assert answers == [(503, "UNAVAILABLE", f"model 'looked_up' version 1: {unavailable}"),
                       (503, "UNAVAILABLE", f"model 'not_looked_up' version latest: {unavailable}"),
                       (503, "UNAVAILABLE", f"model 'not_looked_up' version latest: {unavailable}"),
                       (503, "UNAVAILABLE", f"model 'not_looked_up' version 1: {unavailable}")]
    assert index == (503, "UNAVAILABLE", unavailable)  # was 500 "internal error", a traceback in the log
    for _, _, message in [*answers, index]:
        assert_names_no_location(message, repo, down)


async def test_lookups_of_made_up_models_cost_no_s3_call_of_their_own(live, tmp_path):
    """Each lookup in an S3 repository asked S3 for a listing of its own: a request naming a model or version that
    does not exist (a 404, which no rate limit counts, so that made-up names get no bucket) cost a ListObjectsV2
    call, 200 of them in a second under a limit of one request a second cost 200; a model's metadata cost one each,
    the repository index one per model. The store is now listed at most once per `listing_ttl_s`: with S3 gone just
    after a listing, those requests are answered from it (404, 200) instead of asking S3 (503), until it is due."""
    s3 = aws_client(live, "s3")
    repo = open_repository(f"s3://{live.batch_bucket}/listed", lambda: s3, cache_dir=tmp_path / "cache")
    assert repo.publish("m", mnist_mlp_config(), train_mnist_mlp(steps=1)) == 1
    repo.listing_ttl_s = 60.0  # longer than the requests below take, however loaded the machine
    async with serving(repo, rate_limiter=RateLimiter(Limit(rate=1, burst=1))) as (http, _, _):
        async with http.get("/v2/models/m") as r:  # lists the store, reads the config
            assert r.status == 200 and (await r.json())["versions"] == ["1"]
        repo.client = unreachable_s3()  # from here on a request that asks S3 anything gets 503
        statuses = collections.Counter()
        for i in range(50):
            for method, path in (("POST", f"/v2/models/made-up-{i}/infer"),
                                 ("POST", f"/v2/models/m/versions/{i + 2}/infer"),
                                 ("GET", f"/v2/models/made-up-{i}/ready"), ("GET", "/v2/models/m")):
                async with http.request(method, path, json=json_request()) as r:
                    statuses[method, "made-up" not in path, r.status] += 1
        assert statuses == {("POST", False, 404): 50, ("POST", True, 404): 50, ("GET", False, 404): 50,
                            ("GET", True, 200): 50}
        async with http.post("/v2/repository/index") as r:
            assert r.status == 200 and [row["name"] for row in await r.json()] == ["m"]
        repo.listing_ttl_s = 0.0  # due: the next lookup lists the store again, and finds it down
        async with http.post("/v2/models/made-up/infer", json=json_request()) as r:
            assert r.status == 503 and r.headers["x-maas-error-code"] == "UNAVAILABLE"
        repo.client = s3
        async with http.post("/v2/models/made-up/infer", json=json_request()) as r:
            assert r.status == 404


async def test_infer_json_concurrent_clients_are_batched(repository):
    async with serving(repository) as (http, _api, _):
        images, labels = synthetic_digits(64, seed=5)

        async def one(i: int) -> dict:
            body = {"id": f"r{i}", "inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32",
                                                "data": images[i].tolist()}]}
            async with http.post(f"/v2/models/{MNIST_MLP}/versions/1/infer", json=body) as r:
                assert r.status == 200, await r.text()
                return await r.json()

        answers = await asyncio.gather(*(one(i) for i in range(64)))
        assert [a["id"] for a in answers] == [f"r{i}" for i in range(64)]
        predicted = [next(o for o in a["outputs"] if o["name"] == "class")["data"][0] for a in answers]
        assert np.mean(np.array(predicted) == labels) > 0.9
        assert all(a["model_version"] == "1" for a in answers)
        # requests without an id (V2 makes it optional over HTTP) get one
        async with http.post(f"/v2/models/{MNIST_MLP}/infer", json=json_request(2, outputs=[{"name": "class"}])) as r:
            body = await r.json()
        assert body["id"] and [o["name"] for o in body["outputs"]] == ["class"] and body["outputs"][0]["shape"] == [2]
        async with http.get("/metrics") as r:
            text = await r.text()
        assert 'maas_http_requests_total{route="infer",status="200"}' in text
        assert "maas_batch_size_bucket" in text


async def test_infer_binary_tensor_extension(repository):
    images, labels = synthetic_digits(4, seed=9)
    framed = encode_request("b-1", MNIST_MLP, {"input": images}, binary=True, binary_outputs=True)
    async with serving(repository) as (http, _, _):
        async with http.post(f"/v2/models/{MNIST_MLP}/infer", data=framed.body, headers=framed.headers) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "application/octet-stream"
            body = decode_response(await r.read(), {k.lower(): v for k, v in r.headers.items()})
        classes = next(o for o in body["outputs"] if o["name"] == "class")["data"]
        assert isinstance(classes, np.ndarray) and (classes == labels).mean() >= 0.75
        # JSON request, binary answer asked through Accept
        async with http.post(f"/v2/models/{MNIST_MLP}/infer", json=json_request(),
                             headers={"Accept": "application/octet-stream"}) as r:
            assert "inference-header-content-length" in {k.lower() for k in r.headers}
        # framing errors are 400s that say what is wrong
        bad = {"inference-header-content-length": "99999999"}
        async with http.post(f"/v2/models/{MNIST_MLP}/infer", data=framed.body, headers=bad) as r:
            assert r.status == 400 and "outside the payload" in (await r.json())["error"]
        truncated = framed.body[:-10]
        async with http.post(f"/v2/models/{MNIST_MLP}/infer", data=truncated, headers=framed.headers) as r:
            assert r.status == 400 and "truncated" in (await r.json())["error"]
        async with http.post(f"/v2/models/{MNIST_MLP}/infer", data=framed.body,
                             headers={**framed.headers, "inference-header-content-length": "abc"}) as r:
            assert r.status == 400 and r.headers["x-maas-error-code"] == "INVALID_REQUEST"


async def test_an_outputs_own_binary_data_overrides_the_requests(repository):
    """The extension: "If binary_data is specified on an output it overrides" binary_data_output, and the binary
    answer an accept header asks for; such an output came back as raw bytes all the same."""
    keep_json = {"name": "class", "parameters": {"binary_data": False}}
    async with serving(repository) as (http, _, _):
        body = json_request(2, outputs=[keep_json, {"name": "probabilities"}],
                            parameters={"binary_data_output": True})
        async with http.post(f"/v2/models/{MNIST_MLP}/infer", json=body) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "application/octet-stream"
            answer = decode_response(await r.read(), {k.lower(): v for k, v in r.headers.items()})
        outputs = {o["name"]: o for o in answer["outputs"]}
        assert isinstance(outputs["class"]["data"], list) and "parameters" not in outputs["class"]
        assert isinstance(outputs["probabilities"]["data"], np.ndarray)
        async with http.post(f"/v2/models/{MNIST_MLP}/infer", json=json_request(outputs=[keep_json]),
                             headers={"Accept": "application/octet-stream"}) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "application/json"
            assert isinstance((await r.json())["outputs"][0]["data"], list)


async def test_bad_requests_get_v2_errors(repository):
    async with serving(repository, max_request_bytes=16 * 1024) as (http, _, _):
        cases = [
            (f"/v2/models/{MNIST_MLP}/infer", b"{not json", 400, "INVALID_JSON"),
            (f"/v2/models/{MNIST_MLP}/infer", b"[1, 2]", 400, "INVALID_REQUEST"),
            ("/v2/models/no_such_model/infer", orjson.dumps(json_request()), 404, "MODEL_NOT_FOUND"),
            (f"/v2/models/{MNIST_MLP}/versions/3/infer", orjson.dumps(json_request()), 404, "MODEL_NOT_FOUND"),
            (f"/v2/models/{MNIST_MLP}/infer", orjson.dumps({"inputs": [{"name": "input", "shape": [1, 28, 28],
                                                                       "datatype": "FP32", "data": [0.0] * 784}]}),
             400, "INVALID_INPUT"),
            (f"/v2/models/{MNIST_MLP}/infer", b"x" * 20000, 413, "PAYLOAD_TOO_LARGE"),
            # A line break in the path (aiohttp decodes %0a) got aiohttp's plain-text 404, not a V2 error.
            ("/v2/models/a%0ab/infer", orjson.dumps(json_request()), 404, "MODEL_NOT_FOUND"),
            ("/v2/a%0ab", b"{}", 404, "NOT_FOUND"),
        ]
        for path, body, status, code in cases:
            async with http.post(yarl.URL(path, encoded=True), data=body,
                                 headers={"Content-Type": "application/json"}) as r:
                assert r.status == status, (path, await r.text())
                assert r.headers["x-maas-error-code"] == code
                payload = await r.json()
                assert list(payload) == ["error"] and isinstance(payload["error"], str)

        async def chunked():
            for _ in range(40):
                yield b"y" * 1000

        async with http.post(f"/v2/models/{MNIST_MLP}/infer", data=chunked()) as r:  # no Content-Length
            assert r.status == 413


@pytest.mark.parametrize(("body", "field"), [
    ({"inputs_uri": "s3://bucket/claims/in.json"}, "inputs_uri"),
    (json_request(parameters={"output_uri": "s3://bucket/claims/out.json"}), "parameters.output_uri"),
], ids=["inputs_uri", "output_uri"])
async def test_claim_checks_are_refused_over_http_naming_the_field(repository, body, field):
    """inputs_uri got "input 'input' is missing" and output_uri was silently not written."""
    async with serving(repository) as (http, _, _), http.post(f"/v2/models/{MNIST_MLP}/infer", json=body) as r:
        assert r.status == 400 and r.headers["x-maas-error-code"] == "INVALID_REQUEST"
        assert (await r.json())["error"].startswith(f"{field}: not supported over HTTP (claim checks are for "
                                                    "Kafka and SQS messages)")


def _nested(rows: list[list]) -> dict:
    return {"inputs": [{"name": "input", "shape": [2, 784], "datatype": "FP32", "data": rows}]}


_ROW = [0.25] * 784


@pytest.mark.parametrize("body", [
    {"inputs": [{"name": "input", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3, 4], [5, 6]]}]},
    _nested([[*_ROW, 0.5], _ROW[1:]]),  # the same, 2 KB and more: simdjson's as_buffer flattened it
    _nested([_ROW, [*_ROW[:5], [0.5], *_ROW[6:]]]),  # rows of one length, one holding a list among its numbers
    _nested([_ROW, [*_ROW[:5], [0.5, 0.5], [], *_ROW[7:]]]),
], ids=["small", "large", "large-list-among-numbers", "large-lists-that-add-up"])
async def test_ragged_nested_data_is_refused_whatever_the_bodys_size(repository, body):
    async with serving(repository) as (http, _, _), http.post(f"/v2/models/{MNIST_MLP}/infer", json=body) as r:
        assert r.status == 400 and r.headers["x-maas-error-code"] == "INVALID_INPUT"
        assert (await r.json())["error"] == "inputs[0].data: ragged nested lists"


async def test_large_nested_data_of_one_row_length_is_read(repository):
    images, _ = synthetic_digits(2, seed=4)
    flat = {"id": "flat", **json_request(2, seed=4), "outputs": [{"name": "probabilities"}]}
    async with serving(repository) as (http, _, _):
        async with http.post(f"/v2/models/{MNIST_MLP}/infer", json=flat) as r:
            expected = (await r.json())["outputs"]
        for request_id in ("nested", "a [bracket] in a string"):  # the second is read by orjson instead
            body = {"id": request_id, **_nested(images.tolist()), "outputs": [{"name": "probabilities"}]}
            async with http.post(f"/v2/models/{MNIST_MLP}/infer", json=body) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["outputs"] == expected


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "Text/Plain; q=1"])
async def test_an_unsupported_content_type_gets_415_naming_the_accepted_ones(repository, content_type):
    async with serving(repository) as (http, _, _):
        async with http.post(f"/v2/models/{MNIST_MLP}/infer", data=orjson.dumps(json_request()),
                             headers={"Content-Type": content_type}) as r:
            assert r.status == 415 and r.headers["x-maas-error-code"] == "UNSUPPORTED_MEDIA_TYPE"
            message = (await r.json())["error"]
        assert repr(content_type.split(";")[0].lower()) in message
        assert "application/json" in message and "application/octet-stream" in message


async def test_a_model_that_fails_tells_the_caller_its_exception_type_and_the_log_the_rest(repository, caplog):
    """A model's exception came back whole (`model execution failed: RuntimeError('cannot load /srv/...')`): its message
    may quote the server's files, memory or devices. The caller gets its type; the server's log keeps the rest."""
    async with serving(repository) as (http, api, _):
        model = await api.engine.load(MNIST_MLP, 1)

        def failing(inputs):
            raise RuntimeError("cannot load /srv/maas/kernel-cache/linear.cubin: out of memory on cuda:0")

        model.infer = failing
        async with http.post(f"/v2/models/{MNIST_MLP}/infer", json=json_request(2)) as r:
            assert r.status == 500 and r.headers["x-maas-error-code"] == "INTERNAL"
            message = (await r.json())["error"]
    assert "RuntimeError" in message and "/srv/maas" not in message, message
    assert "/srv/maas/kernel-cache/linear.cubin" in caplog.text


async def test_errors_keep_the_repository_path_to_the_server_and_echo_a_bounded_part_of_the_input(repository):
    """A 404 said "is not in the repository (/path/on/the/server)"; a 5,000-character model name, path or list of
    output names came back whole, and so did a valid model name of no model (up to 128 characters)."""
    async with serving(repository, max_request_bytes=1 << 20) as (http, _, _):
        async with http.post("/v2/models/no_such_model/infer", json=json_request()) as r:
            assert r.status == 404 and (await r.json())["error"] == "model 'no_such_model' is not in the repository"
        async with http.get("/v2/models/no_such_model/ready") as r:
            assert r.status == 404 and str(repository.root) not in await r.text()
        outputs = [{"name": f"out-{i}"} for i in range(1000)]
        for method, path, body, status in [
            ("POST", f"/v2/models/{'m' * 5000}/infer", json_request(), 404),
            ("POST", f"/v2/models/{'m' * 128}/infer", json_request(), 404),  # a valid name of no model
            ("GET", f"/v2/{'x' * 5000}", None, 404),
            ("DELETE", f"/v2/models/{'m' * 5000}", None, 405),
            ("POST", f"/v2/models/{MNIST_MLP}/infer", json_request(outputs=outputs), 400),
            ("POST", f"/v2/models/{MNIST_MLP}/infer",
             {"inputs": [{"name": "n" * 5000, "shape": [1], "datatype": "FP32", "data": [1]}] * 2}, 400),
        ]:
            async with http.request(method, path, json=body) as r:
                message = (await r.json())["error"]
            assert r.status == status and len(message) < 300, (path[:40], message[:400])
            assert "..." in message


def test_api_keys_name_one_tenant_each_and_are_read_without_the_spaces_around_them():
    """A key given to two tenants went to the later one (the earlier one's callers spent its quota, with its
    rights); `team-a: KEY` made a key starting with a space, which no caller sends: every request got 401."""
    from pipeline.settings import ConfigError

    keys = ApiKeys.parse("team-a: secret-a , team-b :secret-b,bare")
    assert [keys.tenant(k) for k in ("secret-a", "secret-b", "bare", " secret-a")] == ["team-a", "team-b", "key-3",
                                                                                     None]
    with pytest.raises(ConfigError, match="item 2 repeats the key of tenant 'team-a'"):
        ApiKeys.parse("team-a:same,team-b:same")
    with pytest.raises(ConfigError, match="item 1 has an empty tenant"):
        ApiKeys.parse(":secret")
    with pytest.raises(ConfigError, match="item 1 has an empty key"):
        ApiKeys.parse("team-a: ")


async def test_api_keys_and_rate_limits(repository):
    keys = ApiKeys.parse("team-a:secret-a,team-b:secret-b")
    limiter = RateLimiter(None, {MNIST_MLP: Limit(rate=0.001, burst=2)})
    async with serving(repository, api_keys=keys, rate_limiter=limiter) as (http, _, _):
        async with http.get("/v2/health/ready") as r:  # probes need no key
            assert r.status == 200
        async with http.get("/v2") as r:
            assert r.status == 401 and r.headers["x-maas-error-code"] == "UNAUTHENTICATED"
        async with http.post(f"/v2/models/{MNIST_MLP}/infer", json=json_request(),
                             headers={"x-api-key": "wrong"}) as r:
            assert r.status == 401 and (await r.json())["error"] == "invalid API key"
        statuses = []
        for _ in range(3):
            async with http.post(f"/v2/models/{MNIST_MLP}/infer", json=json_request(),
                                 headers={"Authorization": "Bearer secret-a"}) as r:
                statuses.append(r.status)
                if r.status == 429:
                    assert int(r.headers["Retry-After"]) >= 1 and "rate limit" in (await r.json())["error"]
        assert statuses == [200, 200, 429]
        async with http.post(f"/v2/models/{MNIST_MLP}/infer", json=json_request(),
                             headers={"x-api-key": "secret-b"}) as r:  # another tenant has its own bucket
            assert r.status == 200


def test_token_bucket_refills():
    bucket = TokenBucket(rate=10, burst=2)
    assert bucket.take(0.0) == 0 and bucket.take(0.0) == 0
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.1) == 0


async def test_tritonclient_talks_to_the_server(repository):
    httpclient = pytest.importorskip("tritonclient.http")
    images, labels = synthetic_digits(8, seed=11)
    async with serving(repository, max_request_bytes=1 << 20) as (_, _, server):
        server_url = f"{server.host}:{server.port}"

        def call() -> tuple:
            client = httpclient.InferenceServerClient(server_url)
            try:
                live, ready = client.is_server_live(), client.is_model_ready(MNIST_MLP)
                meta = client.get_model_metadata(MNIST_MLP)
                outputs = []
                for binary in (False, True):
                    inp = httpclient.InferInput("input", list(images.shape), "FP32")
                    inp.set_data_from_numpy(images, binary_data=binary)
                    out = [httpclient.InferRequestedOutput("class", binary_data=binary)]
                    result = client.infer(MNIST_MLP, [inp], outputs=out, request_id=f"tc-{binary}")
                    outputs.append(result.as_numpy("class"))
                try:
                    client.infer("no_such_model", [inp])
                    missing = None
                except Exception as exc:  # tritonclient raises InferenceServerException
                    missing = str(exc)
                index = client.get_model_repository_index()
                return live, ready, meta, outputs, missing, index
            finally:
                client.close()

        live, ready, meta, outputs, missing, index = await asyncio.to_thread(call)
    assert live and ready and meta["name"] == MNIST_MLP
    for classes in outputs:
        assert (classes == labels).mean() >= 0.75
    assert missing and "no_such_model" in missing
    assert index[0]["name"] == MNIST_MLP


async def _raw(port: int, request: bytes, *, read_until_close: bool = True, timeout: float = 10.0) -> bytes:
    """Send raw bytes on a fresh connection; what came back (until the server closed it, or `timeout`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        if not read_until_close:
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def test_refusals_before_the_body_compressed_bodies_and_continue(repository, caplog):
    keys = ApiKeys.parse("team-a:secret-a")
    async with serving(repository, api_keys=keys) as (http, _, server):
        path = f"/v2/models/{MNIST_MLP}/infer"
        # Expect: 100-continue is answered with the refusal itself, before the client sends the body
        head = await _raw(server.port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n"
                          "Expect: 100-continue\r\nx-api-key: secret-a\r\n\r\n".encode(), read_until_close=False)
        assert head.startswith(b"HTTP/1.1 413"), head
        head = await _raw(server.port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                          "Expect: 100-continue\r\n\r\n".encode(), read_until_close=False)
        assert head.startswith(b"HTTP/1.1 401"), head
        head = await _raw(server.port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                          "Expect: 100-continue\r\nx-api-key: secret-a\r\n\r\n".encode(), read_until_close=False)
        assert head.startswith(b"HTTP/1.1 100 Continue"), head
        # a gzip body would be inflated on the event loop whatever its size: refused
        async with http.post(path, data=b"\x1f\x8b" + b"\x00" * 64, headers={
                "Content-Encoding": "gzip", "x-api-key": "secret-a"}) as r:
            assert r.status == 415 and "content-encoding" in (await r.json())["error"]
        await asyncio.sleep(0.1)  # aiohttp logs what it makes of the unread body after the answer
        logged = [r for r in caplog.records if r.name.startswith("aiohttp")]
        assert not [r for r in logged if r.exc_info or r.levelno >= logging.ERROR], [r.getMessage() for r in logged]
        # a key that is not UTF-8 is just a wrong key
        head = await _raw(server.port, "GET /v2 HTTP/1.1\r\nHost: x\r\nx-api-key: \xff\xfe\r\n\r\n".encode("latin-1"),
                          read_until_close=False)
        assert head.startswith(b"HTTP/1.1 401"), head


@pytest.mark.parametrize(("headers", "status", "code"), [
    ("Content-Encoding: gzip\r\nContent-Encoding: identity\r\n", 415, "UNSUPPORTED_MEDIA_TYPE"),
    ("Content-Encoding: identity, gzip\r\n", 415, "UNSUPPORTED_MEDIA_TYPE"),
    ("Transfer-Encoding: gzip, chunked\r\n", 501, "NOT_IMPLEMENTED"),
], ids=["two-content-encodings", "content-encoding-list", "transfer-coding-list"])
async def test_every_coding_a_request_declares_is_checked(repository, headers, status, code):
    """Only the last Content-Encoding header was checked, so gzip then identity passed as uncompressed, and a
    transfer coding before chunked was read as if the body were plain."""
    async with serving(repository) as (_, _, server):
        body = orjson.dumps(json_request())
        chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        framing = "" if "Transfer-Encoding" in headers else "Transfer-Encoding: chunked\r\n"
        reply = await _raw(server.port, f"POST /v2/models/{MNIST_MLP}/infer HTTP/1.1\r\nHost: x\r\n"
                           f"Content-Type: application/json\r\n{framing}{headers}\r\n".encode() + chunked)
        head, _, answer = reply.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status}".encode()), reply
        assert f"x-maas-error-code: {code}".encode() in head and "error" in orjson.loads(answer)
        assert (await _raw(server.port, f"POST /v2/models/{MNIST_MLP}/infer HTTP/1.1\r\nHost: x\r\n"
                           "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
                           "Content-Encoding: identity\r\n\r\n".encode() + chunked)).startswith(b"HTTP/1.1 200")


async def _holding(server: HttpServer, count: int) -> None:
    """Wait until `server` holds `count` requests (its slots taken): a request written on a connection gets there
    after the server accepted the connection and read the request's head, in a time of its own on a loaded machine."""
    async with asyncio.timeout(10):
        while server.traffic.in_flight != count:
            await asyncio.sleep(0.01)


async def test_a_slow_body_gets_408_and_a_full_server_503_but_for_probes_and_scrapes(repository):
    """Health probes and /metrics counted against MAAS_MAX_IN_FLIGHT: a server busy with slow bodies failed its
    liveness probe, which restarts it. The 408 and 503 count in maas_http_requests_total: they did not, and a
    server shedding load showed only the requests it still served."""

    def refused(status: str) -> float:
        return REGISTRY.get_sample_value("maas_http_requests_total", {"route": "-", "status": status}) or 0.0

    before = {status: refused(status) for status in ("408", "503")}
    async with InferenceEngine(ModelCache(repository), worker_id="http-test") as engine:
        api = V2Api(engine, max_request_bytes=64 * 1024)
        async with HttpServer(api, "127.0.0.1", 0, body_timeout_s=0.5, max_in_flight=1) as server:
            reply = await _raw(server.port, f"POST /v2/models/{MNIST_MLP}/infer HTTP/1.1\r\nHost: x\r\n"
                               "Content-Length: 100\r\n\r\n{".encode(), read_until_close=False)  # 99 never come
            assert reply.startswith(b"HTTP/1.1 408") and b"Connection: close" in reply
            # The request held below must outlive the probes, however slowly a loaded machine sends them: a body
            # timeout read per request, so the 408 above had its 0.5 s.
            server.traffic.body_timeout_s = 30
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{")
            await writer.drain()
            await _holding(server, 1)  # the first request now holds the only slot, waiting for its body
            async with aiohttp.ClientSession(server.url) as http:
                async with http.get("/v2") as r:
                    assert r.status == 503 and r.headers["Retry-After"] == "1"
                for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
                    async with http.get(path) as r:
                        assert r.status == 200, path
            writer.write(b"}   ")
            await writer.drain()
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
            writer.close()
    assert {status: refused(status) - before[status] for status in before} == {"408": 1, "503": 1}


async def test_stop_lets_requests_in_flight_finish(repository):
    async with InferenceEngine(ModelCache(repository), worker_id="http-test") as engine:
        api = V2Api(engine, max_request_bytes=64 * 1024)
        server = await HttpServer(api, "127.0.0.1", 0, drain_timeout_s=10).start()
        body = orjson.dumps(json_request(id="late"))
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"POST /v2/models/{MNIST_MLP}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        await writer.drain()
        await _holding(server, 1)  # in flight, waiting for the rest of its body
        stopping = asyncio.create_task(server.stop())
        await asyncio.sleep(0.3)
        assert not api.ready and not stopping.done()
        with pytest.raises(OSError):  # no new connections once stopping
            await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(body[100:])  # the rest of the body arrives while the server drains
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 10)
        await asyncio.wait_for(stopping, 10)
        writer.close()
    assert reply.startswith(b"HTTP/1.1 200") and b'"id":"late"' in reply


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response's head and body, read off a connection that stays open."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
                 .split(b":")[1])
    return head, await asyncio.wait_for(reader.readexactly(length), 10)


async def test_stop_refuses_requests_that_arrive_on_open_connections_and_closes_them(repository):
    """A keep-alive connection's next request was served during the drain (and its answer kept the connection
    open for more): clients with a pool kept the drain busy until its deadline, which then cut off the requests
    still in flight, unanswered. Now it gets 503 and the connection is closed; the request in flight is answered,
    closing its connection too."""
    async with InferenceEngine(ModelCache(repository), worker_id="http-test") as engine:
        api = V2Api(engine, max_request_bytes=64 * 1024)
        server = await HttpServer(api, "127.0.0.1", 0, drain_timeout_s=10).start()
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)
        idle_writer.write(b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _ = await _answer(idle_reader)
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head  # kept alive
        body = orjson.dumps(json_request(id="held"))
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"POST /v2/models/{MNIST_MLP}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        await writer.drain()
        await _holding(server, 1)
        stopping = asyncio.create_task(server.stop())
        await asyncio.sleep(0.3)
        assert not stopping.done()
        idle_writer.write(b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
        head, answer = await _answer(idle_reader)
        assert head.startswith(b"HTTP/1.1 503") and b"Connection: close" in head, head
        assert b"retry-after: 1" in head.lower() and "stopping" in orjson.loads(answer)["error"]
        assert await asyncio.wait_for(idle_reader.read(), 10) == b""  # closed by the server
        writer.write(body[100:])
        await writer.drain()
        head, answer = await _answer(reader)
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head and b'"id":"held"' in answer
        await asyncio.wait_for(stopping, 10)
        for closing in (writer, idle_writer):
            closing.close()


async def _closed_by_server(port: int, sent: bytes, within_s: float) -> bool:
    """Whether the server closes a connection on which `sent` was written (and whatever it answered read) within
    `within_s` seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(sent)
        await writer.drain()
        async with asyncio.timeout(within_s):
            while await reader.read(65536):
                pass
        return True
    except TimeoutError:
        return False
    finally:
        writer.close()


async def test_idle_and_half_sent_connections_are_closed(repository):
    """A connection that sent nothing, or half a request's head, was held for aiohttp's default of 3,630 s, and one
    idle after a request as long: a few hundred of them, opened by anyone who can reach the port, used up a server's
    file descriptors, and no one could connect, health probes included. Both servers now close them after their
    idle timeout (IDLE_TIMEOUT_S, 75 s: AWS ALB's 60 s idle timeout must close first)."""
    assert 60 < IDLE_TIMEOUT_S <= 120
    async with InferenceEngine(ModelCache(repository), worker_id="http-test") as engine:
        api = V2Api(engine, max_request_bytes=64 * 1024)
        async with (HttpServer(api, "127.0.0.1", 0, idle_timeout_s=1.0) as server,
                    HealthServer("127.0.0.1", 0, lambda: None, idle_timeout_s=1.0) as health):
            for port, path in ((server.port, "/v2"), (health.port, "/health/live")):
                for sent in (b"", f"GET {path} HTTP/1.1\r\nHost: x\r\nX-A".encode(),
                             f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()):  # the last: idle after its answer
                    assert await _closed_by_server(port, sent, within_s=10), (port, sent)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            for _ in range(3):  # a connection that is used is kept: the timeout starts again after each answer
                writer.write(b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
                head, _ = await _answer(reader)
                assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head
                await asyncio.sleep(0.5)  # 1.5 s in all, each gap within the timeout
            writer.close()
        async with HttpServer(api, "127.0.0.1", 0) as server:  # the default holds for longer than a test waits
            assert not await _closed_by_server(server.port, b"GET /v2 HTTP/1.1\r\n", within_s=1)


async def test_rate_limits_cannot_be_dodged_by_header_or_by_made_up_models(repository):
    limiter = RateLimiter(None, {MNIST_MLP: Limit(rate=0.001, burst=2)}, max_buckets=2)
    async with serving(repository, rate_limiter=limiter) as (http, _, _):
        statuses = []
        for i in range(3):  # no API keys: one bucket per model for everyone, whatever x-tenant-id says
            async with http.post(f"/v2/models/{MNIST_MLP}/infer", json=json_request(),
                                 headers={"x-tenant-id": f"t{i}"}) as r:
                statuses.append(r.status)
        assert statuses == [200, 200, 429]
        for i in range(5):  # unknown models are 404s that make no bucket, so they cannot push ours out
            async with http.post(f"/v2/models/made-up-{i}/infer", json=json_request()) as r:
                assert r.status == 404
        async with http.post(f"/v2/models/{MNIST_MLP}/infer", json=json_request()) as r:
            assert r.status == 429


async def test_made_up_models_versions_and_paths_do_not_grow_the_scrape(repository):
    """/metrics is labelled by route and status, never by what a caller put in the path: 100 made-up models,
    versions and paths add no time series of their own."""
    async with serving(repository) as (http, api, _):
        async with http.get("/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=")
        for i in range(100):
            for method, path in (("POST", f"/v2/models/made-up-{i}/infer"), ("GET", f"/v2/models/made-up-{i}/ready"),
                                 ("POST", f"/v2/models/{MNIST_MLP}/versions/{i + 2}/infer"),
                                 ("GET", f"/made-up-{i}")):
                async with http.request(method, path, json=json_request()) as r:
                    assert r.status == 404, path
        async with http.get("/metrics") as r:
            text = await r.text()
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert not [line for line in samples if "made-up" in line or "versions" in line]
    routes = {line.split('route="')[1].split('"')[0] for line in samples if 'route="' in line}
    assert routes <= {"-"} | {name for _, _, name, _ in api._routes}


async def test_unloading_a_model_shows_on_the_cache_bytes_gauge(repository):
    """maas_model_cache_bytes was set only when a model loaded: after an unload it kept reporting the weights."""

    async def cache_bytes(http) -> float:
        async with http.get("/metrics") as r:
            (line,) = [line for line in (await r.text()).splitlines() if line.startswith("maas_model_cache_bytes ")]
        return float(line.split()[1])

    async with serving(repository) as (http, api, _):
        async with http.post(f"/v2/models/{MNIST_MLP}/infer", json=json_request()) as r:
            assert r.status == 200
        assert await cache_bytes(http) == api.engine.cache.nbytes > 0
        async with http.post(f"/v2/repository/models/{MNIST_MLP}/unload") as r:
            assert r.status == 200
        assert await cache_bytes(http) == api.engine.cache.nbytes == 0


@pytest.mark.parametrize("spec", ["0", "0:5", "nan", "5:nan", "inf", "2:inf", "-1"])
def test_rate_limits_that_would_break_or_switch_off_limiting_are_refused(spec):
    from pipeline.settings import ConfigError

    with pytest.raises(ConfigError, match="RATE must be a number > 0"):
        RateLimiter.parse(spec)


def test_malformed_requests_are_logged_without_their_text(caplog):
    import logging

    from aiohttp.http_exceptions import BadHttpMessage

    from pipeline.observability import WITHHOLD_REQUEST_TEXT

    logger = logging.getLogger("aiohttp.server")
    logger.addFilter(WITHHOLD_REQUEST_TEXT)
    try:
        exc = BadHttpMessage("Invalid header value char", headers=None)
        exc.args = ("Invalid header value char: b'x-api-key: SECRET-KEY\\x01'",)
        try:
            raise exc
        except BadHttpMessage:
            logger.exception("Error handling request from %s", "127.0.0.1")
    finally:
        logger.removeFilter(WITHHOLD_REQUEST_TEXT)
    assert "SECRET-KEY" not in caplog.text and "malformed HTTP request" in caplog.text


async def test_with_api_keys_only_admin_tenants_load_and_unload(repository):
    keys = ApiKeys.parse("team-a:secret-a,ops:secret-ops")
    async with serving(repository, api_keys=keys, admin_tenants=frozenset({"ops"})) as (http, api, _):
        async with http.post(f"/v2/repository/models/{MNIST_MLP}/unload", headers={"x-api-key": "secret-a"}) as r:
            assert r.status == 403 and "MAAS_ADMIN_TENANTS" in (await r.json())["error"]
        assert MNIST_MLP not in api.unloaded
        async with http.post(f"/v2/repository/models/{MNIST_MLP}/unload", headers={"x-api-key": "secret-ops"}) as r:
            assert r.status == 200
        async with http.post(f"/v2/repository/models/{MNIST_MLP}/load", headers={"x-api-key": "secret-a"}) as r:
            assert r.status == 403
        assert MNIST_MLP in api.unloaded


async def test_a_failed_start_leaves_nothing_up_and_concurrent_stops_both_return(repository):
    """A port in use left the runner set up and the API ready; a second stop() while the first was draining
    raised AttributeError (the first had cleared the runner under it)."""
    async with InferenceEngine(ModelCache(repository), worker_id="http-test") as engine:
        api = V2Api(engine, max_request_bytes=64 * 1024)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            server = HttpServer(api, "127.0.0.1", taken.getsockname()[1])
            with pytest.raises(OSError):
                await server.start()
        assert not api.ready and server._runner is None
        with pytest.raises(OSError, match=r"cannot listen on 999\.1\.1\.1:8000: no such address"):
            await HttpServer(api, "999.1.1.1", 8000).start()  # the message named neither (socket.gaierror)
        server = await HttpServer(api, "127.0.0.1", 0).start()
        assert api.ready
        await asyncio.gather(server.stop(), server.stop())
        assert not api.ready and server._runner is None
