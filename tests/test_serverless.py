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
    missing = named - set(resources)
    assert not missing, f"referenced but not defined: {sorted(missing)}"
    for logical_id, resource in resources.items():
        assert resource["Type"].startswith("AWS::"), logical_id
    image = service["provider"]["ecr"]["images"]["maas"]
    assert (ROOT / image["file"]).is_file()


def test_triggers_are_configured_as_the_handlers_expect():
    service, resources = load_service()
    events = {name: f["events"] for name, f in service["functions"].items()}
    msk = events["kafka"][0]["msk"]
    assert msk["functionResponseTypes"] == ["ReportBatchItemFailures"]
    assert msk["topic"] == service["provider"]["environment"]["MAAS_TOPIC_REQUESTS"]
    sqs = events["sqs"][0]["sqs"]
    assert sqs["functionResponseType"] == "ReportBatchItemFailures"
    s3 = events["s3"][0]["s3"]
    assert s3["event"] == "s3:ObjectCreated:*"
    assert {"prefix", "suffix"} == {k for rule in s3["rules"] for k in rule}
    assert any("httpApi" in e for e in events["http"])
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
