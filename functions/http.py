"""HTTP trigger: API Gateway HTTP API (payload format 2.0) and Lambda function URLs; REST API (1.0) and ALB
targets (headers single- or multi-value) too.

The event becomes an `ApiRequest` for the same `V2Api` that `maas serve` runs, so the routes, errors, auth
and limits are the server's own. Binary bodies (binary tensor extension) travel base64-encoded both ways.
"""

from __future__ import annotations

import base64
import logging
from typing import Any
from urllib.parse import unquote

from functions.runtime import Runtime, invoke
from pipeline.codec import CONTENT_TYPE
from pipeline.v2_api import ApiRequest, refusal

log = logging.getLogger(__name__)
_TEXT_TYPES = ("application/json", "text/")


def api_request(event: dict[str, Any]) -> ApiRequest:
    context = event.get("requestContext") or {}
    if "http" in context:  # payload format 2.0 (HTTP API, function URL)
        # rawPath keeps the caller's percent-escapes; `maas serve` routes on the decoded path, so decode it too.
        method, path = context["http"]["method"], unquote(event.get("rawPath") or context["http"].get("path", "/"))
        # 2.0 puts a named stage in front of the path; 1.0's `path` never holds it (requestContext.path does), so
        # stripping it there cut `/v2` off every path of a REST API whose stage is named `v2`
        stage = context.get("stage")
        if stage and stage != "$default" and path.startswith(f"/{stage}/"):
            path = path[len(stage) + 1:]
    else:  # 1.0 (REST API)
        method, path = event.get("httpMethod", "GET"), event.get("path", "/")
    if multi := event.get("multiValueHeaders"):  # a REST API's (beside `headers`, which keeps the last value of
        # a repeated header) or an ALB target's with multi-value headers on: a repeated header keeps every value,
        # comma-joined, as `maas serve` reads it (the last alone would let `Content-Encoding: gzip` then `identity`
        # pass)
        headers = {k.lower(): ", ".join(v) for k, v in multi.items() if v}
    else:
        headers = {k.lower(): v for k, v in (event.get("headers") or {}).items()}
    raw = event.get("body") or ""
    body = base64.b64decode(raw) if event.get("isBase64Encoded") else raw.encode("utf-8")
    return ApiRequest(method.upper(), path, headers, body)


async def handle(runtime: Runtime, event: dict[str, Any]) -> dict[str, Any]:
    try:
        request = api_request(event)
    except (AttributeError, KeyError, ValueError, TypeError) as exc:
        # The caller gets a fixed message: the exception's may quote the event's values or the server's code.
        # The log says why, with the event's keys, never its values (they may carry credentials).
        log.warning("malformed HTTP event (%s: %s; keys %s); answered 400", type(exc).__name__, exc,
                    [str(k)[:20] for k in list(event)[:10]])
        response = refusal(400, "malformed HTTP event: the event is not an API Gateway or ALB HTTP event "
                           "(requestContext.http.method, or httpMethod and path; headers, body)", "INVALID_REQUEST")
    else:
        refused = runtime.api.precheck(request.method, request.path, request.headers, len(request.body))
        response = refused or await runtime.api.handle(request)
    content_type = response.headers.get(CONTENT_TYPE, "")
    text = content_type.startswith(_TEXT_TYPES)
    answer: dict[str, Any] = {"statusCode": response.status}
    if "headers" not in event and "multiValueHeaders" in event:  # ALB reads the form it sent
        answer["multiValueHeaders"] = {k: [v] for k, v in response.headers.items()}
    else:
        answer["headers"] = response.headers
    answer["body"] = response.body.decode("utf-8") if text else base64.b64encode(response.body).decode()
    answer["isBase64Encoded"] = not text
    return answer


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    return invoke("http", lambda runtime: handle(runtime, event))
