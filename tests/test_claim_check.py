"""Claim checks through the real worker and the real S3 server: inputs by reference, outputs to objects."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import replace

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from s3_support import unreachable_s3
from worker_support import read_all, read_topic, running_worker, stored_batches

from infra.bootstrap import ensure_topics
from models.cache import ModelCache
from models.examples import MNIST_MLP, synthetic_digits
from pipeline.claim_check import ClaimCheckStore, parse_s3_uri
from pipeline.client import ResultCollector, publish_requests
from pipeline.codec import Framed, decode_response, encode_request
from pipeline.engine import InferenceEngine
from pipeline.errors import ErrorCode, InferenceError
from pipeline.protocol import InferenceRequest
from pipeline.responder import Outcome, Responder
from pipeline.services import answer_producer, aws_client, bootstrap, claim_check_store, record_limits
from pipeline.settings import RECORD_OVERHEAD_BYTES, ConfigError, Settings
from pipeline.sinks import PAYLOAD_URI, Envelope, KafkaSink


@pytest.mark.parametrize("uri", ["http://x/y", "s3://", "s3://Bad_Bucket/k", "s3://bucket/", "s3://bucket/a//b",
                                 "s3://bucket/../x", "s3://bucket/a/./b", "s3://bucket/with space"])
def test_unsafe_uris_are_refused(uri):
    with pytest.raises(InferenceError) as caught:
        parse_s3_uri(uri, field="inputs_uri")
    assert caught.value.message.startswith("inputs_uri: ")


def test_default_result_keys_are_new_per_result_and_readable_per_request_id():
    """Request ids the key alphabet cannot spell as they are must not share a readable prefix: "team/a" and
    "team a" both spell "team_a"; nor may a caller pick an id that spells another's. Every key is new besides."""
    store = ClaimCheckStore(None, frozenset(), output_bucket="results-bucket")
    ids = ["team/a", "team a", "team_a", "..", ".", "", "ünï", "unI"]
    ids.append(store.default_uri("m", "team/a").rsplit("/", 2)[1])  # an id spelled like another's key
    uris = [store.default_uri("m", request_id, suffix=".result") for request_id in ids]
    assert len({uri.rsplit("/", 1)[0] for uri in uris}) == len(ids)
    assert uris[2].startswith("s3://results-bucket/results/m/team_a/")  # a plain id keeps its own spelling
    assert uris[2].endswith(".result") and store.default_uri("m", "team_a") != store.default_uri("m", "team_a")
    for uri in uris:
        parse_s3_uri(uri, field="outputs_uri")  # every key is one the store accepts


async def _answer(settings, repository, envelopes: list[Envelope], limits: dict[str, int] | None = None
                  ) -> list[Outcome]:
    """The envelopes through a worker's responder: the engine, claim checks and the Kafka sink (given the topics'
    `limits`, as `record_limits` reads them)."""
    async with answer_producer(settings) as producer, InferenceEngine(ModelCache(repository)) as engine:
        store = claim_check_store(settings)
        sink = KafkaSink.for_settings(producer, settings, store, limits)
        return await Responder(settings, engine, sink, store=store).handle_many(envelopes)


async def test_an_s3_outage_tells_the_caller_nothing_of_the_endpoint(caplog):
    """botocore's network errors quote the endpoint's URL (`Could not connect to the endpoint URL:
    "http://host:port/bucket/key"`), and a claim check that S3 did not answer carried it in its error: retried, then
    dead-lettered with it in maas-error-message, which callers read. It stays in the server's log."""
    down = unreachable_s3()
    store = ClaimCheckStore(down, frozenset({"bucket"}), "bucket")
    request = InferenceRequest("r-1", MNIST_MLP, None, {}, {}, inputs_uri="s3://bucket/claims/in.json")
    with caplog.at_level(logging.WARNING, logger="pipeline.claim_check"):
        with pytest.raises(InferenceError) as reading:
            async with store.resolved_inputs(request, 1 << 20):
                pass
        with pytest.raises(InferenceError) as writing:
            await store.put("s3://bucket/claims/out.json", Framed(b"{}", {}))
        with pytest.raises(InferenceError) as storing:
            await store.put_new(Framed(b"{}", {}), MNIST_MLP, "r-1")
    assert reading.value.message == "inputs_uri: S3 cannot be reached; retry later"
    assert writing.value.message == ("parameters.output_uri: S3 cannot be reached to write "
                                     "s3://bucket/claims/out.json; retry later")
    assert storing.value.message.startswith("result: S3 cannot be reached to write s3://bucket/results/mnist_mlp/r-1/")
    host = down.meta.endpoint_url.removeprefix("http://")
    for failed in (reading, writing, storing):
        assert failed.value.code == ErrorCode.UNAVAILABLE and host not in failed.value.message
    assert sum(host in record.getMessage() for record in caplog.records) == 3


async def test_two_callers_with_one_request_id_get_their_own_result_objects(live, repository):
    """Callers choose request ids: two teams' "r-1", both with results too large to send inline, must not
    share one object, where the second would overwrite the first and both would be handed its data."""
    settings = replace(live, max_inline_output_bytes=1024)
    images, labels = synthetic_digits(64, seed=7)
    envelopes = [Envelope(encode_request("r-1", MNIST_MLP, {"input": images[i * 32:(i + 1) * 32]}).body, {},
                          f"team-{i}@0") for i in range(2)]
    assert await _answer(settings, repository, envelopes) == [Outcome.RESULT] * 2
    uris = [orjson.loads(record.value)["outputs_uri"] for record in
            await read_topic(settings, settings.topics.results, 2)]
    assert len(set(uris)) == 2
    s3, stored = aws_client(settings, "s3"), set()
    for uri in uris:
        bucket, key = parse_s3_uri(uri, field="outputs_uri")
        assert key.startswith("results/mnist_mlp/r-1/")
        body = orjson.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        stored.add(tuple(next(o for o in body["outputs"] if o["name"] == "class")["data"]))
    assert stored == {tuple(labels[:32].tolist()), tuple(labels[32:].tolist())}


async def test_claim_checks_reach_only_keys_under_the_claim_check_prefix(live, repository):
    """A caller's output_uri must neither overwrite the batch jobs' results (outbox) or the store's own nor plant
    a job file in the inbox, and its inputs_uri must not read from them: each is an INVALID_REQUEST naming the
    field and the prefix that is allowed, before the model runs. Under the claim-check prefix both work."""
    s3, bucket = aws_client(live, "s3"), live.batch_bucket
    victim = b'{"line": 1, "id": "victim"}\n'
    s3.put_object(Bucket=bucket, Key="outbox/victim.results.jsonl", Body=victim)
    image = synthetic_digits(1, seed=3)[0]
    for key in ("inbox/in.json", "outbox/in.json", "results/in.json", "claims/in.json"):
        s3.put_object(Bucket=bucket, Key=key, Body=encode_request("ignored", MNIST_MLP, {"input": image}).body,
                      ContentType="application/json")
    cases = {  # id -> (what the request says, the field refused; None: allowed)
        "to-outbox": ({"parameters": {"output_uri": f"s3://{bucket}/outbox/victim.results.jsonl"}},
                      "parameters.output_uri"),
        "to-inbox": ({"parameters": {"output_uri": f"s3://{bucket}/inbox/planted.jsonl"}}, "parameters.output_uri"),
        "to-results": ({"parameters": {"output_uri": f"s3://{bucket}/results/mnist_mlp/r-1/x.result"}},
                       "parameters.output_uri"),
        "from-inbox": ({"inputs_uri": f"s3://{bucket}/inbox/in.json"}, "inputs_uri"),
        "from-outbox": ({"inputs_uri": f"s3://{bucket}/outbox/in.json"}, "inputs_uri"),
        "from-results": ({"inputs_uri": f"s3://{bucket}/results/in.json"}, "inputs_uri"),
        "claimed": ({"inputs_uri": f"s3://{bucket}/claims/in.json",
                     "parameters": {"output_uri": f"s3://{bucket}/claims/out.result"}}, None),
    }
    envelopes = []
    for request_id, (fields, _) in cases.items():
        body = {**orjson.loads(encode_request(request_id, MNIST_MLP, {"input": image}).body), **fields}
        if "inputs_uri" in body:
            del body["inputs"]
        envelopes.append(Envelope(orjson.dumps(body), {}, f"{request_id}@0"))
    assert await _answer(live, repository, envelopes) == [Outcome.ERROR] * 6 + [Outcome.RESULT]
    answers = {r.key.decode(): orjson.loads(r.value) for r in await read_topic(live, live.topics.results, 7)}
    for request_id, (_, field) in cases.items():
        if field is None:
            assert answers[request_id]["outputs_uri"] == f"s3://{bucket}/claims/out.result"
            continue
        error = answers[request_id]["error"]
        assert error["code"] == "INVALID_REQUEST" and error["message"].startswith(f"{field}: key ")
        assert f"s3://{bucket}/claims/..." in error["message"] and "MAAS_CLAIM_CHECK_PREFIX" in error["message"]
    assert s3.get_object(Bucket=bucket, Key="outbox/victim.results.jsonl")["Body"].read() == victim
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="inbox/")["Contents"]] == ["inbox/in.json"]


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"claim_check_prefix": "inbox/"}, "MAAS_CLAIM_CHECK_PREFIX='inbox/' overlaps 'inbox/'"),
    ({"claim_check_prefix": "outbox/claims/"}, "overlaps 'outbox/'"),
    ({"claim_check_prefix": "results/"}, "overlaps 'results/'"),
    ({"claim_check_prefix": "re"}, "expected a plain key prefix ending in '/'"),
    ({"claim_check_prefix": "a//b/"}, "expected a plain key prefix"),
    ({"claim_check_prefix": "../claims/"}, "expected a plain key prefix"),
    ({"batch_inbox_prefix": "claims/jobs/"}, "MAAS_CLAIM_CHECK_PREFIX='claims/' overlaps 'claims/jobs/'"),
])
def test_a_claim_check_prefix_that_reaches_what_callers_must_not_is_a_config_error(changes, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        claim_check_store(replace(Settings(), **changes))
    prefix = "team-a/claims/"
    assert claim_check_store(Settings.from_env({"MAAS_CLAIM_CHECK_PREFIX": prefix})).claim_prefix == prefix


async def test_inputs_by_reference_and_outputs_to_s3(live):
    settings = replace(live, max_inline_output_bytes=2048)
    s3 = aws_client(settings, "s3")
    images, labels = synthetic_digits(40, seed=99)
    json_obj = encode_request("ignored", MNIST_MLP, {"input": images[:20]})
    binary_obj = encode_request("ignored", MNIST_MLP, {"input": images[20:]}, binary=True)
    s3.put_object(Bucket=settings.batch_bucket, Key="claims/in/a.json", Body=json_obj.body,
                  ContentType="application/json")
    s3.put_object(Bucket=settings.batch_bucket, Key="claims/in/b.bin", Body=binary_obj.body,
                  ContentType="application/octet-stream",
                  Metadata={"inference-header-content-length": binary_obj.headers["inference-header-content-length"]})
    requests = [
        {"id": "by-ref-json", "model_name": MNIST_MLP, "inputs_uri": f"s3://{settings.batch_bucket}/claims/in/a.json",
         "outputs": [{"name": "class"}]},
        {"id": "by-ref-binary", "model_name": MNIST_MLP, "inputs_uri": f"s3://{settings.batch_bucket}/claims/in/b.bin",
         "parameters": {"output_uri": f"s3://{settings.batch_bucket}/claims/out/b.result"}},
    ]
    async with running_worker(settings), ResultCollector(settings) as collector:
        await publish_requests(settings, requests)
        answers = await collector.wait_for(["by-ref-json", "by-ref-binary"], timeout=60)
    small = answers["by-ref-json"].body
    assert "outputs_uri" not in small, "a small result stays inline"
    np.testing.assert_array_equal(np.asarray(small["outputs"][0]["data"]), labels[:20])
    ref = answers["by-ref-binary"].body
    assert ref["outputs_uri"] == f"s3://{settings.batch_bucket}/claims/out/b.result"
    assert {o["name"]: o["shape"] for o in ref["outputs"]} == {"probabilities": [20, 10], "class": [20]}
    stored = s3.get_object(Bucket=settings.batch_bucket, Key="claims/out/b.result")
    full = decode_response(stored["Body"].read(), {"content-type": stored["ContentType"]})
    outputs = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in full["outputs"]}
    np.testing.assert_array_equal(outputs["class"], labels[20:])


async def test_a_result_over_the_inline_limit_goes_to_s3(live):
    settings = replace(live, max_inline_output_bytes=1024)
    images, labels = synthetic_digits(32, seed=5)
    request = orjson.loads(encode_request("big", MNIST_MLP, {"input": images}).body)
    async with running_worker(settings), ResultCollector(settings) as collector:
        await publish_requests(settings, [request])
        answer = (await collector.wait_for(["big"], timeout=60))["big"]
    uri = answer.body["outputs_uri"]
    bucket, key = parse_s3_uri(uri, field="outputs_uri")
    assert bucket == settings.batch_bucket and key.startswith("results/mnist_mlp/")
    stored = aws_client(settings, "s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    classes = next(o for o in orjson.loads(stored)["outputs"] if o["name"] == "class")
    assert classes["data"] == labels.tolist()


async def test_records_naming_one_large_object_wait_for_the_claim_check_byte_budget(live, repository):
    """Small records can each name a large object: a fetch of them must not download it once per record at
    once (30 records of 87 bytes naming a 60 MB object took a worker to 2 GB). The objects' bytes in flight stay
    within MAAS_CLAIM_CHECK_BYTES_IN_FLIGHT; the other records wait for room and are answered all the same."""
    s3, bucket = aws_client(live, "s3"), live.batch_bucket
    images, labels = synthetic_digits(64, seed=11)
    body = encode_request("ignored", MNIST_MLP, {"input": images}).body
    s3.put_object(Bucket=bucket, Key="claims/large.json", Body=body, ContentType="application/json")
    settings = replace(live, max_claim_check_bytes=len(body), claim_check_bytes_in_flight=2 * len(body))
    envelopes = [Envelope(orjson.dumps({"id": f"c-{i}", "model_name": MNIST_MLP,
                                        "inputs_uri": f"s3://{bucket}/claims/large.json"}), {}, f"c-{i}@0")
                 for i in range(12)]
    async with answer_producer(settings) as producer, InferenceEngine(ModelCache(repository)) as engine:
        store = claim_check_store(settings)
        responder = Responder(settings, engine, KafkaSink.for_settings(producer, settings, store), store=store)
        assert await responder.handle_many(envelopes) == [Outcome.RESULT] * 12
    assert store.budget.peak == 2 * len(body) and store.budget.held == 0
    answers = [orjson.loads(r.value) for r in await read_topic(settings, settings.topics.results, 12)]
    assert len(answers) == 12
    for answer in answers:
        np.testing.assert_array_equal(next(o for o in answer["outputs"] if o["name"] == "class")["data"], labels)


def test_the_claim_check_byte_budget_must_hold_the_largest_object():
    with pytest.raises(ConfigError, match=r"MAAS_CLAIM_CHECK_BYTES_IN_FLIGHT=1024 is below "
                                          r"MAAS_MAX_CLAIM_CHECK_BYTES=2048"):
        claim_check_store(replace(Settings(), max_claim_check_bytes=2048, claim_check_bytes_in_flight=1024))
    with pytest.raises(ConfigError, match=r"MAAS_CLAIM_CHECK_BYTES_IN_FLIGHT=1024 must be in 2048\.\."):
        Settings.from_env({"MAAS_MAX_CLAIM_CHECK_BYTES": "2048", "MAAS_CLAIM_CHECK_BYTES_IN_FLIGHT": "1024"})
    assert Settings.from_env({"MAAS_MAX_CLAIM_CHECK_BYTES": "2048"}).claim_check_bytes_in_flight == 4 * 2048


async def test_objects_uploaded_without_a_content_type_are_read(live, repository):
    """boto3 uploads without a ContentType, and S3 then reports binary/octet-stream: such an object is read as
    the README's claim checks allow, JSON, or binary with its inference-header-content-length metadata."""
    s3, bucket = aws_client(live, "s3"), live.batch_bucket
    images, labels = synthetic_digits(4, seed=21)
    binary = encode_request("ignored", MNIST_MLP, {"input": images}, binary=True)
    s3.put_object(Bucket=bucket, Key="claims/plain.json", Body=encode_request("ignored", MNIST_MLP,
                                                                              {"input": images}).body)
    s3.put_object(Bucket=bucket, Key="claims/plain.bin", Body=binary.body,
                  Metadata={"inference-header-content-length": binary.headers["inference-header-content-length"]})
    assert s3.head_object(Bucket=bucket, Key="claims/plain.json")["ContentType"] == "binary/octet-stream"
    envelopes = [Envelope(orjson.dumps({"id": key, "model_name": MNIST_MLP,
                                        "inputs_uri": f"s3://{bucket}/claims/{key}"}), {}, f"{key}@0")
                 for key in ("plain.json", "plain.bin")]
    assert await _answer(live, repository, envelopes) == [Outcome.RESULT] * 2
    for record in await read_topic(live, live.topics.results, 2):
        classes = next(o for o in orjson.loads(record.value)["outputs"] if o["name"] == "class")
        assert classes["data"] == labels.tolist()


async def test_the_topics_it_creates_take_the_largest_record_the_settings_allow(live):
    """Kafka's default max.message.bytes (1 MB) is under what the default settings produce (4 MiB requests in dead
    letters, 1 MiB inline results, each with headers): the topics the platform creates say how much they take."""
    async with answer_producer(live) as producer:
        limits = await record_limits(producer, live)
    assert limits == {live.topics.results: live.max_record_bytes, live.topics.dlq: live.max_record_bytes}
    assert live.max_record_bytes == live.max_request_bytes + RECORD_OVERHEAD_BYTES


async def test_topics_that_take_less_than_the_settings_allow_get_larger_answers_by_reference(settings, caplog):
    """Topics created elsewhere, with a max.message.bytes under what the settings allow: the broker would refuse a
    result or a dead letter over it, the worker would stop on the record, and stop on it again after each restart.
    Results and dead letters that the topics would refuse go to S3; the others stay in the record."""
    caplog.set_level(logging.INFO, logger="pipeline.services")
    limit = RECORD_OVERHEAD_BYTES + 1024
    await ensure_topics(settings.kafka_client_kwargs(), [settings.topics.results, settings.topics.dlq],
                        settings.topic_partitions, configs={"max.message.bytes": str(limit)})
    await bootstrap(settings)  # the other topics and the bucket; the two above are left as they are
    images, labels = synthetic_digits(32, seed=7)
    requests = [orjson.loads(encode_request(f"rows-{n}", MNIST_MLP, {"input": images[:n]}).body) for n in (1, 32)]
    unreadable = b"{" + b"x" * 4096  # not JSON: a dead letter, with more than the 1 KiB the topic leaves it
    async with running_worker(settings), ResultCollector(settings) as collector:
        await publish_requests(settings, requests)
        producer = AIOKafkaProducer(**settings.kafka_client_kwargs())
        await producer.start()
        try:
            await producer.send_and_wait(settings.topics.requests, unreadable, key=b"unreadable")
        finally:
            await producer.stop()
        answers = await collector.wait_for(["rows-1", "rows-32"], timeout=60)
        (dead,) = await read_topic(settings, settings.topics.dlq, 1)
    assert f"topic {settings.topics.results} takes records of at most {limit} bytes" in caplog.text
    assert f"topic {settings.topics.dlq} takes records of at most {limit} bytes" in caplog.text
    assert f"topic {settings.topics.dlq} takes record batches" not in caplog.text, "each dead letter goes alone"
    batches = [r for r in caplog.records if r.getMessage().startswith(f"topic {settings.topics.results} takes record "
                                                                        f"batches of at most {limit} bytes")]
    assert [r.levelno for r in batches] == [logging.INFO], "the sink keeps its batches within the results topic's limit"
    small, large = answers["rows-1"].body, answers["rows-32"].body
    assert "outputs_uri" not in small and small["outputs"], "a result the topic takes stays inline"
    bucket, key = parse_s3_uri(large["outputs_uri"], field="outputs_uri")
    s3 = aws_client(settings, "s3")
    stored = orjson.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert next(o for o in stored["outputs"] if o["name"] == "class")["data"] == labels.tolist()
    headers = dict(dead.headers)
    assert dead.value == b"" and dead.key == b"unreadable"
    bucket, key = parse_s3_uri(headers[PAYLOAD_URI].decode(), field=PAYLOAD_URI)
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == unreadable


def _reply_to(request_id: str, topic: str, images) -> Envelope:
    body = orjson.loads(encode_request(request_id, MNIST_MLP, {"input": images}).body)
    return Envelope(orjson.dumps({**body, "parameters": {"reply_to": topic}}), {}, f"{request_id}@0")


async def test_reply_to_topics_that_take_less_than_the_results_topic_get_larger_results_by_reference(live, repository):
    """A caller's reply_to topic may take smaller records (its max.message.bytes) than the results topic: the broker
    refused a result over it, and the caller got an INVALID_REQUEST error on the results topic instead, the result
    computed and thrown away. The topic's limit is read when the topic is first looked up: a larger result goes to S3
    and the answer on the caller's topic points to it, whether its request ran with its fetch or alone (claim-checked
    inputs); a smaller one stays inline. Tansu does not enforce max.message.bytes: the old code sent all inline."""
    limit = RECORD_OVERHEAD_BYTES + 1024
    team = f"{live.topics.results}.team-a"
    await ensure_topics(live.kafka_client_kwargs(), [team], live.topic_partitions,
                        configs={"max.message.bytes": str(limit)})
    s3, bucket = aws_client(live, "s3"), live.batch_bucket
    images, labels = synthetic_digits(32, seed=13)
    s3.put_object(Bucket=bucket, Key="claims/rows.json", ContentType="application/json",
                  Body=encode_request("ignored", MNIST_MLP, {"input": images}).body)
    by_reference = Envelope(orjson.dumps({"id": "by-ref", "model_name": MNIST_MLP, "parameters": {"reply_to": team},
                                          "inputs_uri": f"s3://{bucket}/claims/rows.json"}), {}, "by-ref@0")
    envelopes = [_reply_to("rows-1", team, images[:1]), _reply_to("rows-32", team, images), by_reference]
    assert await _answer(live, repository, envelopes) == [Outcome.RESULT] * 3
    answers = {r.key.decode(): orjson.loads(r.value) for r in await read_topic(live, team, 3)}
    assert answers.keys() == {"rows-1", "rows-32", "by-ref"}
    small = answers["rows-1"]
    assert "outputs_uri" not in small, "a result the topic takes stays inline"
    assert next(o for o in small["outputs"] if o["name"] == "class")["data"] == labels[:1].tolist()
    for request_id in ("rows-32", "by-ref"):
        assert len(orjson.dumps(answers[request_id])) < 1024
        result_bucket, key = parse_s3_uri(answers[request_id]["outputs_uri"], field="outputs_uri")
        stored = orjson.loads(s3.get_object(Bucket=result_bucket, Key=key)["Body"].read())
        assert next(o for o in stored["outputs"] if o["name"] == "class")["data"] == labels.tolist()
    assert await read_all(live, live.topics.results) == [], "no error instead of a result"


async def test_reply_to_topics_whose_limit_cannot_serve_answer_with_what_they_can(live, repository, caplog):
    """Without an object store a result over a reply_to topic's max.message.bytes cannot go by reference: the caller
    gets an error saying the result is too large on its own topic, rather than a record its broker refuses. For a
    topic whose limit the cluster does not give (Tansu gives none for a topic created without it) none is chosen:
    the result is sent as it is, as before. Each is logged once per topic, not once per answer, nor once per fetch
    answered while it is looked up."""
    caplog.set_level(logging.INFO, logger="pipeline.sinks")
    small, unsaid = f"{live.topics.results}.small", f"{live.topics.results}.unsaid"
    await ensure_topics(live.kafka_client_kwargs(), [small], live.topic_partitions,
                        configs={"max.message.bytes": str(RECORD_OVERHEAD_BYTES + 1024)})
    await ensure_topics(live.kafka_client_kwargs(), [unsaid], live.topic_partitions)
    images = synthetic_digits(32, seed=17)[0]
    async with answer_producer(live) as producer, InferenceEngine(ModelCache(repository)) as engine:
        store = claim_check_store(live)
        with_store = Responder(live, engine, KafkaSink.for_settings(producer, live, store), store=store)
        without_store = Responder(live, engine, KafkaSink.for_settings(producer, live, None))
        for fetches in (2, 1):  # two fetches (of two partitions) at once, then one more
            outcomes = await asyncio.gather(*(
                responder.handle_many([_reply_to(f"{topic}-{fetches}-{n}", topic, images)])
                for n in range(fetches) for responder, topic in ((with_store, unsaid), (without_store, small))))
            assert outcomes == [[Outcome.RESULT], [Outcome.ERROR]] * fetches
    answers = [orjson.loads(r.value) for r in await read_topic(live, unsaid, 3)]
    assert len(answers) == 3 and all("outputs" in a and "outputs_uri" not in a for a in answers)
    errors = [orjson.loads(r.value) for r in await read_topic(live, small, 3)]
    assert len(errors) == 3
    assert all("outputs" not in e and "too large to send inline" in e["error"]["message"] for e in errors)
    logged = [r.getMessage() for r in caplog.records if r.name == "pipeline.sinks"]
    assert len([m for m in logged if f"reply_to topic {small} takes records of at most" in m
                and "no object store" in m]) == 1
    assert len([m for m in logged if f"max.message.bytes of reply_to topic {unsaid}" in m]) == 1


def _assert_batched(stored: dict[int, list[tuple[int, list]]], request_ids: list[str], limit: int) -> None:
    """The answers to `request_ids` as a topic's partitions stored them (`stored_batches`): in record batches of at
    most `limit` bytes, some partition in more than one (the answers together take more), each answer once, and
    in the order of their requests within each partition."""
    sizes = [size for batches in stored.values() for size, _ in batches]
    assert sizes and max(sizes) <= limit, f"batches of {sorted(sizes)} bytes, over the topic's {limit}"
    assert len(sizes) > len(stored), "the answers took more than one batch's limit: some partition needs several"
    by_partition = [[record.key.decode() for _, records in batches for record in records]
                    for batches in stored.values()]
    assert sorted(key for keys in by_partition for key in keys) == sorted(request_ids)
    for keys in by_partition:
        assert keys == sorted(keys, key=request_ids.index)


async def test_answers_to_a_reply_to_topic_go_in_batches_it_takes(live, repository):
    """Kafka checks a whole record batch against the topic's max.message.bytes: answers that each fit a caller's topic
    went to it in one batch per partition (up to the producer's 256 KiB), which its broker refused, every answer of it
    then an INVALID_REQUEST error on the results topic. Batches now end before the limit the lookup read. Tansu does not
    enforce the limit (the old code's batches were stored whole): the test reads the batches the broker stored."""
    limit = RECORD_OVERHEAD_BYTES + 4096
    team = f"{live.topics.results}.batched"
    await ensure_topics(live.kafka_client_kwargs(), [team], live.topic_partitions,
                        configs={"max.message.bytes": str(limit)})
    images, labels = synthetic_digits(8, seed=19)
    request_ids = [f"b-{n:03d}" for n in range(100)]  # answers of some 2 KiB: 200 KB in all
    assert await _answer(live, repository, [_reply_to(i, team, images) for i in request_ids]) == [Outcome.RESULT] * 100
    stored = await stored_batches(live, team)
    _assert_batched(stored, request_ids, limit)
    for _, records in (batch for batches in stored.values() for batch in batches):
        for record in records:
            assert next(o for o in orjson.loads(record.value)["outputs"] if o["name"] == "class")["data"] == \
                labels.tolist()
    assert await read_all(live, live.topics.results) == [], "no error instead of an answer"


async def test_answers_to_a_results_topic_that_takes_less_go_in_batches_it_takes(settings, repository):
    """The results topic's max.message.bytes, read at start (`record_limits`), bounds the batches of answers to it as
    well as each answer: a batch the broker refuses there stops the worker, on the same records after a restart."""
    limit = RECORD_OVERHEAD_BYTES + 4096
    await ensure_topics(settings.kafka_client_kwargs(), [settings.topics.results], settings.topic_partitions,
                        configs={"max.message.bytes": str(limit)})
    await bootstrap(settings)  # the other topics and the bucket
    images = synthetic_digits(8, seed=23)[0]
    request_ids = [f"b-{n:03d}" for n in range(100)]
    envelopes = [Envelope(encode_request(i, MNIST_MLP, {"input": images}).body, {}, f"{i}@0") for i in request_ids]
    outcomes = await _answer(settings, repository, envelopes, limits={settings.topics.results: limit})
    assert outcomes == [Outcome.RESULT] * 100
    _assert_batched(await stored_batches(settings, settings.topics.results), request_ids, limit)
