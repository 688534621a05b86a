"""serverless.yml and infra/: every handler named imports and is callable, every referenced resource exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
FILE_INCLUDE = re.compile(r"^\$\{file\((?P<path>[^)]+)\)\}$")


def load_service() -> tuple[dict[str, Any], dict[str, Any]]:
    service = yaml.safe_load((ROOT / "serverless.yml").read_text())
    resources: dict[str, Any] = {}
    for item in service.get("resources") or []:
        match = FILE_INCLUDE.match(item) if isinstance(item, str) else None
        part = yaml.safe_load((ROOT / match["path"]).read_text()) if match else item
        resources.update(part.get("Resources") or {})
    return service, resources


def references(node: Any) -> set[str]:
    """Logical ids named by Ref / Fn::GetAtt anywhere in a document."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "Ref" and isinstance(value, str):
                found.add(value)
            elif key == "Fn::GetAtt":
                found.add(value[0] if isinstance(value, list) else value.split(".")[0])
            found |= references(value)
    elif isinstance(node, list):
        for value in node:
            found |= references(value)
    return found


def handler_name(function: dict[str, Any]) -> str:
    if "handler" in function:
        return function["handler"]
    return function["image"]["command"][0]


def test_every_handler_imports_and_is_callable():
    service, _ = load_service()
    assert set(service["functions"]) == {"kafka", "sqs", "s3", "http"}
    for name, function in service["functions"].items():
        module_name, _, attribute = handler_name(function).rpartition(".")
        handler = getattr(importlib.import_module(module_name), attribute)
        assert callable(handler), name
        assert function["image"]["name"] in service["provider"]["ecr"]["images"]


def test_every_referenced_resource_exists():
    service, resources = load_service()
    resources_doc = yaml.safe_load((ROOT / "infra/serverless/resources.yml").read_text())
    named = references(service) | references(resources_doc)
    assert named, "expected Ref / Fn::GetAtt references"
    # The framework names each function's resource <Name>LambdaFunction.
    generated = {f"{name[0].upper()}{name[1:]}LambdaFunction" for name in service["functions"]}
    missing = named - set(resources) - generated
    assert not missing, f"referenced but not defined: {sorted(missing)}"
    for logical_id, resource in resources.items():
        assert resource["Type"].startswith("AWS::"), logical_id
    image = service["provider"]["ecr"]["images"]["maas"]
    assert (ROOT / image["file"]).is_file()


def test_triggers_are_configured_as_the_handlers_expect():
    service, resources = load_service()
    events = {name: f.get("events", []) for name, f in service["functions"].items()}
    assert "events" not in service["functions"]["kafka"], "the MSK trigger is a resource of its own"
    mapping = resources["KafkaEventSourceMapping"]["Properties"]
    environment = service["provider"]["environment"]
    assert mapping["FunctionName"] == {"Fn::GetAtt": ["KafkaLambdaFunction", "Arn"]}
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]  # functions/kafka.py reports these
    assert mapping["ProvisionedPollerConfig"]["MinimumPollers"] >= 1  # which partial responses need
    assert 0 < mapping["MaximumRetryAttempts"] <= 10
    assert mapping["DestinationConfig"]["OnFailure"]["Destination"] == f"kafka://{environment['MAAS_TOPIC_DLQ']}"
    assert mapping["Topics"] == [environment["MAAS_TOPIC_REQUESTS"]]
    assert environment["MAAS_PARTIAL_BATCH_RESPONSE"] == "1"
    # MSK's IAM listener (9098) signs in with the function's role: the deployed settings must accept that
    from pipeline.settings import Settings

    deployed = Settings.from_env({**{k: v for k, v in environment.items() if isinstance(v, str)},
                                  "KAFKA_BOOTSTRAP_SERVERS": "b-1.maas.example:9098"})
    assert deployed.kafka_client_kwargs()["sasl_mechanism"] == "OAUTHBEARER"
    assert service["functions"]["s3"]["destinations"]["onFailure"]["arn"] == {
        "Fn::GetAtt": ["BatchJobsFailedQueue", "Arn"]}
    sqs = events["sqs"][0]["sqs"]
    assert sqs["functionResponseType"] == "ReportBatchItemFailures"
    s3 = events["s3"][0]["s3"]
    assert s3["event"] == "s3:ObjectCreated:*"
    assert {"prefix", "suffix"} == {k for rule in s3["rules"] for k in rule}
    routes = {(e["httpApi"]["method"], e["httpApi"]["path"]) for e in events["http"] if "httpApi" in e}
    assert {("GET", "/v2"), ("*", "/v2/{proxy+}"), ("GET", "/metrics")} <= routes
    queue = resources["RequestsQueue"]["Properties"]
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": ["RequestsDeadLetterQueue", "Arn"]}
    assert queue["VisibilityTimeout"] >= 6 * service["provider"]["timeout"]


def test_gpu_deployment_scales_on_consumer_lag():
    docs = []
    for path in sorted((ROOT / "infra/k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    deployment = by_kind[("Deployment", "maas-worker-gpu")]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["worker"] and container["resources"]["limits"]["nvidia.com/gpu"] == 1
    scaled = by_kind[("ScaledObject", "maas-worker-gpu")]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "maas-worker-gpu"
    trigger = scaled["spec"]["triggers"][0]
    config = by_kind[("ConfigMap", "maas-config")]["data"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == config["MAAS_CONSUMER_GROUP"]
    assert trigger["metadata"]["topic"] == config["MAAS_TOPIC_REQUESTS"]
    assert ("TriggerAuthentication", trigger["authenticationRef"]["name"]) in by_kind
    dockerfile = (ROOT / "infra/docker/Dockerfile").read_text()
    assert " AS lambda" in dockerfile and " AS gpu" in dockerfile


def test_large_results_expire_under_the_store_prefix_the_code_writes():
    from pipeline.claim_check import ClaimCheckStore

    service, resources = load_service()
    rules = {r["Id"]: r for r in resources["BatchBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]}
    expire = rules["expire-large-results"]
    days = service["params"]["default"]["resultsRetentionDays"]
    assert expire["Status"] == "Enabled" and expire["ExpirationInDays"] == "${param:resultsRetentionDays}"
    assert isinstance(days, int) and days >= 1
    store = ClaimCheckStore(None, frozenset({"b"}), output_bucket="b")
    key = store.default_uri("mnist_mlp", "r-1", suffix=".result").removeprefix("s3://b/")
    assert key.startswith(expire["Prefix"]) and expire["Prefix"] == f"{store.output_prefix}/"


def test_the_function_that_answers_on_kafka_runs_in_the_clusters_vpc_and_the_http_api_needs_keys():
    service, _ = load_service()
    functions = service["functions"]
    # MSK's IAM listener is private: a function outside the cluster's VPC cannot answer on it
    assert functions["kafka"]["vpc"] == {"subnetIds": "${param:mskSubnetIds}",
                                         "securityGroupIds": "${param:mskSecurityGroupIds}"}
    params = service["params"]["default"]
    assert params["mskSubnetIds"] and params["mskSecurityGroupIds"]
    assert "MAAS_SQS_RESULTS_QUEUE_URL" in functions["sqs"]["environment"]  # so it needs no Kafka, nor the VPC
    assert not {"vpc"} & (functions["sqs"].keys() | functions["s3"].keys() | functions["http"].keys())
    assert functions["http"]["environment"]["MAAS_API_KEYS"] == "${ssm:${param:apiKeysParameter}}"
