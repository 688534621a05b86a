"""Cloud-function handlers invoked with provider-shaped events (tests/events/) against the real broker and moto."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote_plus

import orjson
import pytest
from prometheus_client import REGISTRY
from worker_support import read_all, read_topic

import functions.http
import functions.kafka
import functions.s3
import functions.sqs
from functions import runtime
from infra.bootstrap import ensure_queue
from models.examples import MNIST_MLP
from pipeline.batch_jobs import BatchConfig
from pipeline.client import example_requests
from pipeline.codec import decode_response, encode_request, from_sqs_message, to_sqs_message
from pipeline.metrics import BatchRecord
from pipeline.services import aws_client, bootstrap

EVENTS = Path(__file__).parent / "events"


def dumps(value) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def event(name: str) -> dict:
    return json.loads((EVENTS / name).read_text())


@pytest.fixture
def env(settings, monkeypatch):
    """The function's environment: the settings of this test, with topics and bucket created."""
    asyncio.run(bootstrap(settings))
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MAAS_API_KEYS", raising=False)
    yield settings
    runtime.shutdown()


def broken_model(settings) -> str:
    """A model whose config is valid but whose weights do not load: every request fails transiently."""
    root = Path(settings.model_repository)
    shutil.copytree(root / MNIST_MLP, root / "broken")
    (root / "broken" / "1" / "model.safetensors").write_bytes(b"not safetensors")
    return "broken"


def kafka_record(template: dict, topic: str, partition: int, offset: int, value: bytes, key: str | None,
                 headers: dict[str, bytes] | None = None) -> dict:
    record = copy.deepcopy(template)
    record.update(topic=topic, partition=partition, offset=offset, value=base64.b64encode(value).decode(),
                  key=base64.b64encode(key.encode()).decode() if key else None)
    if headers is not None:
        record["headers"] = [{k: list(v)} for k, v in headers.items()]
    return record


@pytest.mark.parametrize("sample", ["kafka_msk.json", "kafka_self_managed.json"])
def test_kafka_trigger_answers_and_reports_transient_failures(env, sample, capsys):
    settings = env
    topic = settings.topics.requests
    template = event(sample)
    first = next(iter(template["records"].values()))[0]
    requests, truth = example_requests(6, prefix="kf")
    broken = broken_model(settings)
    bad_input = {**requests[0], "id": "kf-bad", "inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32",
                                                            "data": [1.0, 2.0, 3.0]}]}
    values = [orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) for r in requests]
    values += [dumps(bad_input), b"\xff not json", dumps({**requests[1], "id": "kf-broken", "model_name": broken}),
               dumps({**requests[2], "id": "kf-version", "model_version": "\u00b2"})]  # "²".isdigit() is True
    records = [kafka_record(first, topic, i % 2, 100 + i, value, f"k{i}") for i, value in enumerate(values)]
    # traceparent as a list of byte values, as the event source mapping sends headers
    records[0]["headers"] = next(iter(event("kafka_msk.json")["records"].values()))[0]["headers"]
    # Java bytes are signed: "été" arrives as [-61, -87, 116, -61, -87]
    records[1]["headers"] = [{"ce_source": [b - 256 if b > 127 else b for b in "été".encode()]}]
    test_event = {**template, "records": {}}
    for record in records:
        test_event["records"].setdefault(f"{topic}-{record['partition']}", []).append(record)

    codes = ("INVALID_INPUT", "INVALID_JSON", "INVALID_REQUEST", "UNAVAILABLE", "INTERNAL")
    errors_before = {code: REGISTRY.get_sample_value("maas_errors_total", {"code": code}) or 0 for code in codes}

    response = functions.kafka.handler(test_event, None)

    assert response == {"batchItemFailures": [{"itemIdentifier": {"topic-partition": f"{topic}-0", "offset": 108}}]}
    errors = {code: (REGISTRY.get_sample_value("maas_errors_total", {"code": code}) or 0) - errors_before[code]
              for code in codes}
    # The broken model's record is left to redelivery, not ended: it is counted once it ends, not per attempt.
    assert errors == {"INVALID_INPUT": 1, "INVALID_JSON": 1, "INVALID_REQUEST": 1, "UNAVAILABLE": 0, "INTERNAL": 0}
    results = asyncio.run(read_topic(settings, settings.topics.results, 8))
    answers = {r.key.decode(): (decode_response(r.value, {}), dict(r.headers)) for r in results}
    # Refused while decoding, but it named itself: answered under its id, not under the record's key ("k9")
    assert set(answers) == {*truth, "kf-bad", "kf-version"}
    assert answers["kf-version"][0]["error"]["code"] == "INVALID_REQUEST"
    assert "model_version" in answers["kf-version"][0]["error"]["message"]
    assert answers["kf-000001"][1]["ce_source"] == "été".encode()
    for request_id, label in truth.items():
        body = answers[request_id][0]
        assert next(o for o in body["outputs"] if o["name"] == "class")["data"] == [label]
    assert answers["kf-bad"][0]["error"]["code"] == "INVALID_INPUT"
    assert answers["kf-000000"][1]["traceparent"].startswith(b"00-0af7651916cd43dd8448eb211c80319c")
    dead = asyncio.run(read_topic(settings, settings.topics.dlq, 1))
    assert len(dead) == 1 and dead[0].value == b"\xff not json"
    assert dict(dead[0].headers)["maas-error-code"] == b"INVALID_JSON"
    assert dict(dead[0].headers)["maas-source"] == f"{topic}-1@107".encode()
    metrics = json.loads([line for line in capsys.readouterr().out.splitlines() if '"_aws"' in line][-1])
    assert metrics["function"] == "kafka" and metrics["ColdStart"] == 1 and metrics["Records"] == 10
    assert {"ImportMs", "InitMs", "ModelLoadMs", "DurationMs"} <= metrics.keys()


def test_kafka_trigger_dead_letters_a_record_the_event_gets_wrong_and_answers_the_others(env):
    settings = env
    topic = settings.topics.requests
    first = next(iter(event("kafka_msk.json")["records"].values()))[0]
    requests, truth = example_requests(2, prefix="kr")
    good = [kafka_record(first, topic, 0, 10 + i, dumps(r), r["id"]) for i, r in enumerate(requests)]
    not_base64 = {**good[0], "offset": 20, "value": "!!! not base64 !!!"}
    bad_header = {**good[0], "offset": 21, "headers": [{"traceparent": "00-not-a-byte-list"}]}
    out_of_range = {**good[0], "offset": 22, "headers": [{"h": [1, 2, 4096]}]}
    no_partition = {k: v for k, v in good[0].items() if k != "partition"}
    null_value = {**good[0], "offset": 23, "value": None}
    test_event = {"eventSource": "aws:kafka", "records": {
        f"{topic}-0": [good[0], not_base64, bad_header, out_of_range, no_partition, null_value, good[1]]}}

    response = functions.kafka.handler(test_event, None)

    assert response == {"batchItemFailures": []}
    results = asyncio.run(read_topic(settings, settings.topics.results, 2))
    answers = {r.key.decode(): decode_response(r.value, {}) for r in results}
    assert set(answers) == set(truth)
    dead = asyncio.run(read_topic(settings, settings.topics.dlq, 5))
    by_source = {dict(d.headers)["maas-source"].decode(): d for d in dead}
    assert set(by_source) == {f"{topic}-0@20", f"{topic}-0@21", f"{topic}-0@22", f"{topic}-0@23", "kafka-event"}
    null = by_source.pop(f"{topic}-0@23")
    assert null.value is None and dict(null.headers)["maas-error-code"] == b"INVALID_JSON"  # kept null, not b""
    for record in by_source.values():
        headers = dict(record.headers)
        assert headers["maas-error-code"] == b"INVALID_REQUEST"
        assert headers["maas-error-message"].startswith(b"the event's record could not be read")
    assert orjson.loads(by_source[f"{topic}-0@20"].value) == not_base64  # the record as it came
    assert b"partition" in dict(by_source["kafka-event"].headers)["maas-error-message"]


def test_sqs_trigger_partial_batch_response_and_sqs_results(env, monkeypatch):
    settings = env
    sqs = aws_client(settings, "sqs")
    results_url = ensure_queue(sqs, f"{settings.batch_bucket}-results")
    dlq_url = ensure_queue(sqs, f"{settings.batch_bucket}-dlq")
    monkeypatch.setenv("MAAS_SQS_RESULTS_QUEUE_URL", results_url)
    monkeypatch.setenv("MAAS_SQS_DLQ_URL", dlq_url)
    template = event("sqs.json")["Records"][0]
    broken = broken_model(settings)
    requests, truth = example_requests(3, prefix="sq")

    def record(message_id: str, message: dict) -> dict:
        attributes = {k: {"stringValue": v["StringValue"], "stringListValues": [], "binaryListValues": [],
                          "dataType": "String"} for k, v in message["MessageAttributes"].items()}
        return {**template, "messageId": message_id, "body": message["MessageBody"], "messageAttributes": attributes}

    import numpy as np

    image = np.asarray(requests[2]["inputs"][0]["data"], dtype=np.float32).reshape(1, 784)
    binary = encode_request("sq-binary", MNIST_MLP, {"input": image}, binary=True)
    records = [record(f"m{i}", {"MessageBody": orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY).decode(),
                                "MessageAttributes": {"content-type": {"StringValue": "application/json"}}})
               for i, r in enumerate(requests[:2])]
    records += [
        record("m-binary", to_sqs_message(binary)),
        record("m-invalid", {"MessageBody": orjson.dumps({"id": "sq-invalid", "model_name": MNIST_MLP,
                                                          "inputs": []}).decode(), "MessageAttributes": {}}),
        record("m-broken", {"MessageBody": orjson.dumps({**requests[0], "id": "sq-broken", "model_name": broken},
                                                        option=orjson.OPT_SERIALIZE_NUMPY).decode(),
                            "MessageAttributes": {}}),
        record("m-garbage", {"MessageBody": "not json at all", "MessageAttributes": {}}),
        record("m-unwrappable", {"MessageBody": "!!! not base64 !!!", "MessageAttributes": {
            "content-transfer-encoding": {"StringValue": "base64"}}}),
    ]

    response = functions.sqs.handler({"Records": records}, None)

    assert response == {"batchItemFailures": [{"itemIdentifier": "m-broken"}]}
    received = []
    while len(received) < 4:
        batch = sqs.receive_message(QueueUrl=results_url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                    MessageAttributeNames=["All"]).get("Messages", [])
        assert batch, "results missing"
        received += batch
    bodies = {}
    for message in received:
        payload, headers = from_sqs_message(message["Body"], message.get("MessageAttributes"))
        body = decode_response(payload, headers)
        bodies[body["id"]] = body
    assert set(bodies) == {"sq-000000", "sq-000001", "sq-binary", "sq-invalid"}
    assert bodies["sq-invalid"]["error"]["code"] == "INVALID_REQUEST"
    assert next(o for o in bodies["sq-binary"]["outputs"] if o["name"] == "class")["data"] == [truth["sq-000002"]]
    dead = []
    while len(dead) < 2:
        batch = sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10, MessageAttributeNames=["All"],
                                    WaitTimeSeconds=1).get("Messages", [])
        assert batch, "dead letters missing"
        dead += batch
    dead_letters = {from_sqs_message(m["Body"], m["MessageAttributes"])[0]:
                    m["MessageAttributes"]["maas-error-code"]["StringValue"] for m in dead}
    assert dead_letters == {b"not json at all": "INVALID_JSON", b"!!! not base64 !!!": "INVALID_REQUEST"}

    # default destination: the results topic
    monkeypatch.delenv("MAAS_SQS_RESULTS_QUEUE_URL")
    assert functions.sqs.handler({"Records": records[:1]}, None) == {"batchItemFailures": []}
    results = asyncio.run(read_topic(settings, settings.topics.results, 1))
    assert [r.key for r in results] == [b"sq-000000"]


def test_sqs_trigger_reports_only_the_message_whose_answer_sqs_refuses(env, monkeypatch):
    """An answer the results queue refuses fails its own message, not the invocation: the others are answered
    once and not reported; an undecodable body too large for the dead-letter queue goes to S3. The queues shrink
    to 1 KiB after the warm function read their size: it sends results inline as a 256 KiB queue takes them."""
    settings = env
    sqs, s3 = aws_client(settings, "sqs"), aws_client(settings, "s3")
    results_url = sqs.create_queue(QueueName=f"{settings.batch_bucket}-results")["QueueUrl"]
    dlq_url = sqs.create_queue(QueueName=f"{settings.batch_bucket}-dlq")["QueueUrl"]
    monkeypatch.setenv("MAAS_SQS_RESULTS_QUEUE_URL", results_url)
    monkeypatch.setenv("MAAS_SQS_DLQ_URL", dlq_url)
    assert functions.sqs.handler({"Records": []}, None) == {"batchItemFailures": []}  # warm: the sizes are read
    for url in (results_url, dlq_url):
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"MaximumMessageSize": "1024"})
    template = event("sqs.json")["Records"][0]
    requests, _ = example_requests(5, prefix="sz")
    ok = {**requests[0], "outputs": [{"name": "class"}]}
    big = {**requests[1], "inputs": [{**requests[1]["inputs"][0], "shape": [4, 784],
                                      "data": [r["inputs"][0]["data"] for r in requests[1:]]}]}
    long_text = "{not json " + "z" * 4000
    records = [{**template, "messageId": message_id, "body": body, "messageAttributes": {}}
               for message_id, body in (("m-ok", dumps(ok).decode()), ("m-big", dumps(big).decode()),
                                        ("m-long", long_text))]

    assert functions.sqs.handler({"Records": records}, None) == {"batchItemFailures": [{"itemIdentifier": "m-big"}]}
    answers = sqs.receive_message(QueueUrl=results_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)["Messages"]
    assert [orjson.loads(m["Body"])["id"] for m in answers] == ["sz-000000"]
    (dead,) = sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                  MessageAttributeNames=["All"])["Messages"]
    uri = dead["MessageAttributes"]["maas-payload-uri"]["StringValue"]
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == long_text.encode()


def test_s3_trigger_runs_a_batch_job_once(env):
    settings = env
    s3 = aws_client(settings, "s3")
    config = BatchConfig.from_settings(settings)
    requests, _ = example_requests(12, prefix="s3")
    key = "inbox/team a/job+1.jsonl"
    body = b"".join(orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n" for r in requests)
    etag = s3.put_object(Bucket=settings.batch_bucket, Key=key, Body=body)["ETag"].strip('"')
    test_event = event("s3_put.json")
    obj = test_event["Records"][0]["s3"]
    obj["bucket"].update(name=settings.batch_bucket, arn=f"arn:aws:s3:::{settings.batch_bucket}")
    obj["object"].update(key=quote_plus(key), eTag=etag, size=len(body))
    assert obj["object"]["key"] == "inbox%2Fteam+a%2Fjob%2B1.jsonl"

    first = functions.s3.handler(test_event, None)
    again = functions.s3.handler(test_event, None)  # a re-delivered event

    assert first["jobs"][0]["status"] == "completed" and first["jobs"][0]["lines"] == 12
    assert again["jobs"][0]["status"] == "duplicate"
    assert runtime.last_metrics["ColdStart"] == 0 and "ImportMs" not in runtime.last_metrics
    results = s3.get_object(Bucket=settings.batch_bucket, Key=config.results_key("team a/job+1"))["Body"].read()
    assert [orjson.loads(line)["id"] for line in results.splitlines()] == [r["id"] for r in requests]


def http_event(method: str, path: str, body: bytes = b"", headers: dict | None = None, binary: bool = False) -> dict:
    sample = event("http_api_v2.json")
    sample["rawPath"] = sample["requestContext"]["http"]["path"] = path
    sample["requestContext"]["http"]["method"] = method
    sample["headers"] = {**sample["headers"], "content-length": str(len(body)), **(headers or {})}
    sample["body"] = base64.b64encode(body).decode() if binary else body.decode()
    sample["isBase64Encoded"] = binary
    return sample


def test_a_cold_function_process_answers_without_importing_torch(env):
    """A CPU function serving an mlp never imports torch (2-3 s of its cold start): numpy twin, lazy imports."""
    requests, truth = example_requests(1, prefix="cold")
    request = orjson.dumps(requests[0], option=orjson.OPT_SERIALIZE_NUMPY)
    code = (
        "import json, sys\n"
        "import functions.http\n"
        "from functions import runtime\n"
        "answer = functions.http.handler(json.loads(sys.stdin.read()), None)\n"
        "print(json.dumps({'status': answer['statusCode'], 'body': json.loads(answer['body']),\n"
        "                  'torch': 'torch' in sys.modules, 'cold': runtime.last_metrics['ColdStart']}))\n"
        "runtime.shutdown()\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    environment.pop("MAAS_CPU_RUNTIME", None)
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(
        http_event("POST", f"/v2/models/{MNIST_MLP}/infer", request)), capture_output=True, text=True,
        env=environment, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["status"] == 200 and child["cold"] == 1
    assert next(o for o in child["body"]["outputs"] if o["name"] == "class")["data"] == [truth["cold-000000"]]
    assert child["torch"] is False


def test_http_trigger_serves_the_v2_routes(env, monkeypatch):
    requests, truth = example_requests(2, prefix="h")
    request = orjson.dumps(requests[0], option=orjson.OPT_SERIALIZE_NUMPY)
    ready = functions.http.handler(http_event("GET", "/v2/health/ready"), None)
    assert ready["statusCode"] == 200 and json.loads(ready["body"]) == {"ready": True}
    assert runtime.last_metrics["ColdStart"] == 1
    answer = functions.http.handler(http_event("POST", f"/v2/models/{MNIST_MLP}/infer", request), None)
    assert answer["statusCode"] == 200 and not answer["isBase64Encoded"]
    body = json.loads(answer["body"])
    assert body["id"] == "h-000000"
    assert next(o for o in body["outputs"] if o["name"] == "class")["data"] == [truth["h-000000"]]
    assert runtime.last_metrics["ColdStart"] == 0

    import numpy as np

    image = np.asarray(requests[1]["inputs"][0]["data"], dtype=np.float32).reshape(1, 784)
    framed = encode_request("h-bin", MNIST_MLP, {"input": image}, binary=True, binary_outputs=True)
    binary = functions.http.handler(http_event("POST", f"/v2/models/{MNIST_MLP}/infer", framed.body,
                                               framed.headers, binary=True), None)
    assert binary["statusCode"] == 200 and binary["isBase64Encoded"]
    decoded = decode_response(base64.b64decode(binary["body"]), binary["headers"])
    assert next(o for o in decoded["outputs"] if o["name"] == "class")["data"].tolist() == [truth["h-000001"]]

    missing = functions.http.handler(http_event("POST", "/v2/models/nope/infer", request), None)
    assert missing["statusCode"] == 404 and "nope" in json.loads(missing["body"])["error"]
    garbage = functions.http.handler(http_event("POST", f"/v2/models/{MNIST_MLP}/infer", b"{oops"), None)
    assert garbage["statusCode"] == 400
    # rawPath keeps percent-escapes, which `maas serve` decodes before routing: so does the function
    escaped = functions.http.handler(http_event("GET", "/v2/models/mnist%5Fmlp"), None)
    assert escaped["statusCode"] == 200 and json.loads(escaped["body"])["name"] == MNIST_MLP
    for version in ("%C2%B2", "-1", "01"):  # not a version at all: the caller's mistake (400), not a 404
        bad = functions.http.handler(http_event("GET", f"/v2/models/{MNIST_MLP}/versions/{version}"), None)
        assert bad["statusCode"] == 400 and "model_version" in json.loads(bad["body"])["error"], version
    index = functions.http.handler(http_event("POST", "/v2/repository/index", b'{"ready": "false"}'), None)
    assert index["statusCode"] == 400 and "ready: expected true or false" in json.loads(index["body"])["error"]

    monkeypatch.setenv("MAAS_API_KEYS", "team:k1")
    denied = functions.http.handler(http_event("GET", f"/v2/models/{MNIST_MLP}"), None)
    assert denied["statusCode"] == 401
    allowed = functions.http.handler(http_event("GET", f"/v2/models/{MNIST_MLP}", headers={"x-api-key": "k1"}), None)
    assert allowed["statusCode"] == 200 and json.loads(allowed["body"])["name"] == MNIST_MLP


def test_http_trigger_refuses_unloads_and_speaks_alb_multi_value_headers(env):
    """An unload reached one warm instance of the function and left the others serving (anyone could send it);
    an ALB target with multi-value headers sends and reads `multiValueHeaders` only. A REST API sends both forms:
    its `headers` keep the last value of a repeated header, so only `multiValueHeaders` tells every one."""
    for action in ("unload", "load"):
        refused = functions.http.handler(http_event("POST", f"/v2/repository/models/{MNIST_MLP}/{action}"), None)
        assert refused["statusCode"] == 403 and "not served here" in json.loads(refused["body"])["error"]
    assert functions.http.handler(http_event("GET", f"/v2/models/{MNIST_MLP}/ready"), None)["statusCode"] == 200

    requests, truth = example_requests(1, prefix="alb")
    alb = {"requestContext": {"elb": {"targetGroupArn": "arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/t/1"}},
           "httpMethod": "POST", "path": f"/v2/models/{MNIST_MLP}/infer", "queryStringParameters": {},
           "multiValueHeaders": {"Content-Type": ["application/json"], "X-Forwarded-For": ["10.0.0.1"]},
           "body": dumps(requests[0]).decode(), "isBase64Encoded": False}
    answer = functions.http.handler(alb, None)
    assert answer["statusCode"] == 200 and "headers" not in answer
    assert answer["multiValueHeaders"]["content-type"] == ["application/json"]
    body = json.loads(answer["body"])
    assert next(o for o in body["outputs"] if o["name"] == "class")["data"] == [truth["alb-000000"]]
    alb["multiValueHeaders"]["Content-Encoding"] = ["gzip", "identity"]  # every value counts, not the last
    assert functions.http.handler(alb, None)["statusCode"] == 415
    rest = {"resource": "/{proxy+}", "path": f"/v2/models/{MNIST_MLP}/infer", "httpMethod": "POST",
            "headers": {"Content-Type": "application/json", "Content-Encoding": "identity"},
            "multiValueHeaders": {"Content-Type": ["application/json"], "Content-Encoding": ["gzip", "identity"]},
            "requestContext": {"stage": "prod", "httpMethod": "POST"}, "body": alb["body"], "isBase64Encoded": False}
    assert functions.http.handler(rest, None)["statusCode"] == 415, "a REST API's headers keep the last value only"


def test_a_rest_api_stage_is_stripped_from_2_0_paths_only():
    """Payload 2.0 puts a named stage in front of rawPath; a REST API's (1.0) `path` never holds it, and stripping it
    there turned every path of a stage named `v2` into a 404 (`/v2/models/m/ready` became `/models/m/ready`)."""
    rest = {"resource": "/{proxy+}", "path": f"/v2/models/{MNIST_MLP}/ready", "httpMethod": "GET",
            "headers": {"Host": "abcdef123.execute-api.us-east-1.amazonaws.com"}, "multiValueHeaders": {},
            "requestContext": {"stage": "v2", "path": f"/v2/v2/models/{MNIST_MLP}/ready", "httpMethod": "GET"},
            "body": None, "isBase64Encoded": False}
    assert functions.http.api_request(rest).path == f"/v2/models/{MNIST_MLP}/ready"
    http_api = http_event("GET", f"/v2/v2/models/{MNIST_MLP}/ready")
    http_api["requestContext"]["stage"] = "v2"
    assert functions.http.api_request(http_api).path == f"/v2/models/{MNIST_MLP}/ready"


def test_a_malformed_http_event_is_answered_with_a_fixed_message_and_logged(env, caplog):
    """The 400 quoted the exception (its repr: the server's wording, or a piece of the event); it now says what the
    event should have been, and the log says what went wrong, with the event's keys but none of its values."""
    good = http_event("POST", f"/v2/models/{MNIST_MLP}/infer", b"{}")
    no_method = copy.deepcopy(good)
    del no_method["requestContext"]["http"]["method"]
    events = {
        "KeyError": no_method,
        "Error": {**good, "body": "secret-token-in-a-bad-base64-body!", "isBase64Encoded": True},
        "TypeError": {**good, "body": 12345, "isBase64Encoded": True},
        "AttributeError": {**good, "headers": ["x-api-key: secret-key-in-a-list"]},
    }
    for kind, bad in events.items():
        caplog.clear()
        answer = functions.http.handler(bad, None)
        assert answer["statusCode"] == 400, kind
        assert json.loads(answer["body"])["error"] == (
            "malformed HTTP event: the event is not an API Gateway or ALB HTTP event (requestContext.http.method, "
            "or httpMethod and path; headers, body)"), kind
        assert f"{kind}: " in caplog.text and "malformed HTTP event" in caplog.text, kind
        assert "secret" not in caplog.text, kind


def _kafka_event(settings, requests) -> dict:
    first = next(iter(event("kafka_msk.json")["records"].values()))[0]
    topic = settings.topics.requests
    records = [kafka_record(first, topic, i % 2, 300 + i, dumps(r), r["id"]) for i, r in enumerate(requests)]
    test_event = {"eventSource": "aws:kafka", "records": {}}
    for record in records:
        test_event["records"].setdefault(f"{topic}-{record['partition']}", []).append(record)
    return test_event


def test_a_kafka_invocation_leaves_no_reply_to_lookup_running_on_the_warm_loop(env, stack):
    """A reply_to topic is looked up in a task of its own, shielded from the chunks waiting for it, and a function's
    event loop outlives its invocation: an invocation cut short cancelled its chunks and left the lookup to run on
    into the next invocation, asking a cluster that does not answer through the warm producer. The handler stops its
    sink when it ends, normally or not. Here it is cut short by cancelling it, as gather_or_cancel cancels the chunks
    beside one whose answers cannot be delivered: against the paused broker that one would fail only after the
    producer's request timeout (40 s), long after the lookup gave up on its own (reply_to_timeout_s, 10 s)."""
    settings = env
    requests, _ = example_requests(1, prefix="lk")
    test_event = _kafka_event(settings, [{**requests[0], "parameters": {"reply_to": f"{settings.topics.results}.lk"}}])
    loop = runtime._event_loop()

    def lookups() -> list[asyncio.Task]:
        return [t for t in asyncio.all_tasks(loop) if t.get_coro().__qualname__ == "KafkaSink._look_up"]

    # Warm, with the broker up: the topic is looked up (there is none: answered with an error on the results topic).
    assert functions.kafka.handler(test_event, None) == {"batchItemFailures": []}
    assert not lookups()

    async def cut_short() -> asyncio.Task:
        invocation = asyncio.ensure_future(functions.kafka.handle(runtime._runtime, test_event))
        async with asyncio.timeout(10):  # hang guard: the model answers at once, then the lookup waits for the broker
            while not lookups():
                await asyncio.sleep(0.01)
        invocation.cancel()
        await asyncio.wait([invocation])
        return invocation

    stack._broker.send_signal(signal.SIGSTOP)  # the cluster does not answer: connections stay open, unanswered
    try:
        invocation = loop.run_until_complete(cut_short())
    finally:
        stack._broker.send_signal(signal.SIGCONT)
    assert invocation.cancelled()
    assert not lookups(), "a lookup outlived its invocation"


def test_kafka_trigger_publishes_its_batches_to_the_metrics_topic(env):
    """The Kafka function answered over Kafka but published no per-batch record to the metrics topic."""
    settings = env
    sent = 0
    for round_ in range(2):  # a cold and a warm invocation
        requests, _ = example_requests(5, prefix=f"km{round_}")
        assert functions.kafka.handler(_kafka_event(settings, requests), None) == {"batchItemFailures": []}
        sent += len(requests)
    results = asyncio.run(read_topic(settings, settings.topics.results, sent))
    assert len({r.key for r in results}) == sent
    # An invocation gives its metrics METRICS_SETTLE_S, then its loop stops until the next one: sends a loaded
    # broker had not acknowledged by then are still pending. Let them finish, then read the topic to its end.
    warm = runtime._runtime
    runtime._event_loop().run_until_complete(warm.metrics.settle(30))
    assert warm.metrics.pending == 0
    records = [orjson.loads(r.value) for r in asyncio.run(read_all(settings, settings.topics.metrics))]
    assert records, "no batch record on the metrics topic"
    for record in records:
        assert set(BatchRecord.__dataclass_fields__) <= record.keys()
        assert record["model"] == MNIST_MLP and record["version"] >= 1
        assert record["worker"] == runtime._runtime.settings.worker_id  # the function's own, as in its answers
        assert record["batch_size"] >= record["requests"] >= 1 and record["compute_ms"] >= 0
    assert sum(record["requests"] for record in records) == sent


def test_kafka_trigger_answers_everything_when_its_metrics_topic_refuses_every_record(env):
    """A metrics topic that cannot be written costs metrics (counted), never an answer, and an invocation waits
    for its metrics at most METRICS_SETTLE_S."""
    settings = env
    before = REGISTRY.get_sample_value("maas_batch_metrics_unpublished_total") or 0.0
    requests, truth = example_requests(6, prefix="kr")
    functions.kafka.handler(_kafka_event(settings, requests[:1]), None)  # cold start: models loaded
    metrics = runtime._runtime.metrics
    runtime._event_loop().run_until_complete(metrics.settle(10))
    # A name the broker refuses (MAAS_TOPIC_METRICS takes none: refused at start); Tansu creates any valid one
    metrics.topic, published = "no such topic: spaces are not allowed", metrics.published
    started = time.monotonic()
    assert functions.kafka.handler(_kafka_event(settings, requests[1:]), None) == {"batchItemFailures": []}
    assert time.monotonic() - started < runtime.METRICS_SETTLE_S + 5
    results = asyncio.run(read_topic(settings, settings.topics.results, len(requests)))
    assert {r.key.decode() for r in results} == set(truth)
    assert runtime._runtime is not None and runtime._runtime.metrics.published == published
    runtime.shutdown()  # stop(): the sends still waiting for the topic are given up, and counted
    assert (REGISTRY.get_sample_value("maas_batch_metrics_unpublished_total") or 0.0) > before
