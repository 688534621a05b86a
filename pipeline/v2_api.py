"""The Open Inference Protocol (KServe V2) REST API, independent of the HTTP transport.

`V2Api.handle()` takes a method, path, headers and body and returns a status, headers and body. The aiohttp
server (`pipeline.http_server`) and the API Gateway / function URL handler (`functions.http`) both call it,
so both serve the same routes with the same errors, auth and limits.

Errors use the V2 error shape `{"error": "message"}` with the HTTP status of the error code; the machine
readable code rides in the `x-maas-error-code` header.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from models.artifact import ModelConfig, short_repr
from models.repository import RepositoryUnavailableError
from pipeline.codec import CONTENT_TYPE, JSON, decode_request, encode_response, unsupported_media_type
from pipeline.engine import InferenceEngine, load_failed
from pipeline.errors import ErrorCode, InferenceError
from pipeline.protocol import InferenceRequest, refuse_claim_checks
from pipeline.ratelimit import ApiKeys, RateLimiter

SERVER_NAME = "maas"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
ERROR_CODE_HEADER = "x-maas-error-code"
#: Paths that answer without an API key: probes and scrapes must not need secrets.
PUBLIC_PATHS = ("/v2/health/live", "/v2/health/ready", "/metrics")

HTTP_REQUESTS = Counter("maas_http_requests_total", "HTTP API requests by route and status", ["route", "status"])
HTTP_LATENCY = Histogram(
    "maas_http_request_seconds", "HTTP API latency by route", ["route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
)


log = logging.getLogger(__name__)


@dataclass
class ApiRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes = b""


@dataclass
class ApiResponse:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=lambda: {CONTENT_TYPE: JSON})


class ApiError(Exception):
    """An HTTP-level refusal (auth, size, rate, routing) before or outside the engine."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def error_response(status: int, message: str, code: str, headers: Mapping[str, str] | None = None) -> ApiResponse:
    return ApiResponse(status, orjson.dumps({"error": message}),
                       {CONTENT_TYPE: JSON, ERROR_CODE_HEADER: code, **(headers or {})})


def refusal(status: int, message: str, code: str, headers: Mapping[str, str] | None = None) -> ApiResponse:
    """The error response to a request refused before it reached `V2Api.handle` (auth, size, a full server, a body
    that did not arrive), counted in maas_http_requests_total under route "-": left out, a server shedding load
    showed nothing there but the requests it still served."""
    HTTP_REQUESTS.labels("-", str(status)).inc()
    return error_response(status, message, code, headers)


def json_response(body: Any, status: int = 200) -> ApiResponse:
    return ApiResponse(status, orjson.dumps(body))


def _not_ready(message: str) -> ApiError:
    """The ready endpoints' "false": a 4xx, as the V2 protocol's health API says (400, as Triton answers). An
    infer request for a model that is not ready gets 503 instead, which invites a retry."""
    return ApiError(400, message, "NOT_READY")


def _codings(header: str) -> set[str]:
    """The codings a Content-Encoding or Transfer-Encoding header lists (its values comma-joined)."""
    return {coding.strip().lower() for coding in header.split(",")}


_MODEL = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
Handler = Callable[["V2Api", ApiRequest, dict[str, str]], Awaitable[ApiResponse]]


class V2Api:
    """The V2 endpoints over one engine. Optional API keys, request size limit, per-tenant/model rate limits."""

    def __init__(self, engine: InferenceEngine, *, max_request_bytes: int, api_keys: ApiKeys | None = None,
                 rate_limiter: RateLimiter | None = None, admin_tenants: frozenset[str] = frozenset(),
                 repository_control: bool = True) -> None:
        self.engine = engine
        self.admin_tenants = admin_tenants
        self.repository_control = repository_control
        self.max_request_bytes = max_request_bytes
        self.api_keys = api_keys or ApiKeys({})
        self.rate_limiter = rate_limiter or RateLimiter(None)
        self.unloaded: set[str] = set()
        self.ready = True
        self._routes: list[tuple[str, re.Pattern[str], str, Handler]] = [
            ("GET", re.compile(r"/v2/health/live"), "live", V2Api._live),
            ("GET", re.compile(r"/v2/health/ready"), "ready", V2Api._server_ready),
            ("GET", re.compile(r"/v2/?"), "server_metadata", V2Api._server_metadata),
            ("GET", re.compile(_MODEL + r"/ready"), "model_ready", V2Api._model_ready),
            ("GET", re.compile(_MODEL), "model_metadata", V2Api._model_metadata),
            ("POST", re.compile(_MODEL + r"/infer"), "infer", V2Api._infer),
            ("POST", re.compile(r"/v2/repository/index"), "repository_index", V2Api._index),
            ("POST", re.compile(r"/v2/repository/models/(?P<name>[^/]+)/load"), "load", V2Api._load),
            ("POST", re.compile(r"/v2/repository/models/(?P<name>[^/]+)/unload"), "unload", V2Api._unload),
            ("GET", re.compile(r"/metrics"), "metrics", V2Api._metrics),
        ]

    # -- entry points ---------------------------------------------------------------------------------

    def precheck(self, method: str, path: str, headers: Mapping[str, str], content_length: int | None
                 ) -> ApiResponse | None:
        """What can be refused before the body is read: auth (401), a declared oversize body (413), a
        compressed one (415: inflating it would cost the event loop time the 413 cannot bound) and a transfer
        coding other than chunked (501, as RFC 9112 §6.1 says: reading it as if plain would misread it)."""
        try:
            self._authenticate(path, headers)
            if content_length is not None and content_length > self.max_request_bytes:
                raise ApiError(413, f"request body is {content_length} bytes; the limit is "
                               f"{self.max_request_bytes}", ErrorCode.PAYLOAD_TOO_LARGE)
            encoding = headers.get("content-encoding", "")
            if _codings(encoding) - {"", "identity"}:
                raise ApiError(415, f"content-encoding {encoding!r:.40} is not accepted: send the body uncompressed",
                               "UNSUPPORTED_MEDIA_TYPE")
            transfer = headers.get("transfer-encoding", "")
            if _codings(transfer) - {"", "chunked"}:
                raise ApiError(501, f"transfer-encoding {transfer!r:.40} is not implemented: send the body plain "
                               "or chunked", "NOT_IMPLEMENTED")
        except ApiError as exc:
            return refusal(exc.status, exc.message, exc.code, exc.headers)
        return None

    async def handle(self, request: ApiRequest) -> ApiResponse:
        started = time.perf_counter()
        route = "-"
        try:
            route, handler, params = self._route(request.method, request.path)
            tenant = self._authenticate(request.path, request.headers)
            if len(request.body) > self.max_request_bytes:
                raise ApiError(413, f"request body is {len(request.body)} bytes; the limit is "
                               f"{self.max_request_bytes}", ErrorCode.PAYLOAD_TOO_LARGE)
            params["tenant"] = tenant
            response = await handler(self, request, params)
        except ApiError as exc:
            response = error_response(exc.status, exc.message, exc.code, exc.headers)
        except InferenceError as exc:
            response = error_response(exc.code.status, exc.message, str(exc.code))
        except RepositoryUnavailableError as exc:  # listing the repository (the index, a model's versions)
            log.warning("%s %s: the model repository is unavailable: %s", request.method, request.path, exc)
            response = error_response(ErrorCode.UNAVAILABLE.status, "the model repository is unavailable; retry "
                                      "later", str(ErrorCode.UNAVAILABLE))
        except Exception:  # a bug: the caller gets a V2 error, the traceback stays in the server's log
            log.exception("unexpected failure on %s %s", request.method, request.path)
            response = error_response(500, "internal error (logged on the server)", str(ErrorCode.INTERNAL))
        HTTP_REQUESTS.labels(route, str(response.status)).inc()
        HTTP_LATENCY.labels(route).observe(time.perf_counter() - started)
        return response

    def _route(self, method: str, path: str) -> tuple[str, Handler, dict[str, str]]:
        allowed = []
        for verb, pattern, name, handler in self._routes:
            match = pattern.fullmatch(path)
            if match:
                if verb == method or (verb == "GET" and method == "HEAD"):
                    return name, handler, {k: v for k, v in match.groupdict().items() if v is not None}
                allowed.append(verb)
        if allowed:
            raise ApiError(405, f"{short_repr(method)} is not allowed on {short_repr(path)}; use "
                           f"{' or '.join(allowed)}", "METHOD_NOT_ALLOWED",
                           {"allow": ", ".join(allowed)})
        raise ApiError(404, f"no such endpoint: {short_repr(method)} {short_repr(path)}", "NOT_FOUND")

    def _authenticate(self, path: str, headers: Mapping[str, str]) -> str:
        if not self.api_keys.enabled:  # no keys, no tenants: rate limits are per model, for every caller at once
            return "anonymous"
        if path in PUBLIC_PATHS:
            return "public"
        presented = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if not presented and auth[:7].lower() == "bearer ":
            presented = auth[7:].strip()
        tenant = self.api_keys.tenant(presented)
        if tenant is None:
            message = "invalid API key" if presented else "missing API key: send x-api-key or Authorization: Bearer"
            raise ApiError(401, message, "UNAUTHENTICATED", {"www-authenticate": "Bearer"})
        return tenant

    # -- health and metadata --------------------------------------------------------------------------

    async def _live(self, request: ApiRequest, params: dict[str, str]) -> ApiResponse:
        return json_response({"live": True})

    async def _server_ready(self, request: ApiRequest, params: dict[str, str]) -> ApiResponse:
        if not self.ready:
            raise _not_ready("the server is not ready (starting or stopping)")
        return json_response({"ready": True})

    async def _server_metadata(self, request: ApiRequest, params: dict[str, str]) -> ApiResponse:
        return json_response({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})

    async def _config(self, name: str, version: str | None) -> tuple[int, ModelConfig]:
        return await self.engine.model_config(name, version)

    async def _model_metadata(self, request: ApiRequest, params: dict[str, str]) -> ApiResponse:
        name = params["name"]
        version, config = await self._config(name, params.get("version"))
        versions = await asyncio.to_thread(self.engine.cache.repository.versions, name)
        return json_response({
            "name": name,
            "versions": [str(v) for v in versions],
            "platform": f"maas_{config.architecture}",
            "inputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in config.inputs],
            "outputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in config.outputs],
            "parameters": {"version": str(version), "max_batch_size": config.batching.max_batch_size},
        })

    async def _model_ready(self, request: ApiRequest, params: dict[str, str]) -> ApiResponse:
        """Ready unless unloaded or its last load failed: a version that has not loaded yet is ready, since it
        loads on its first request."""
        name = params["name"]
        version, _ = await self._config(name, params.get("version"))  # 404 when unknown
        if name in self.unloaded:
            raise _not_ready(f"model {name!r} is unloaded; POST /v2/repository/models/{name}/load")
        failure = self.engine.cache.load_failure(name, version)
        if failure is not None:
            raise _not_ready(load_failed(name, version, failure).message)
        return json_response({"name": name, "ready": True})

    # -- inference ------------------------------------------------------------------------------------

    async def _infer(self, request: ApiRequest, params: dict[str, str]) -> ApiResponse:
        name = params["name"]
        if name in self.unloaded:
            raise ApiError(503, f"model {name!r} is unloaded; POST /v2/repository/models/{name}/load",
                           ErrorCode.UNAVAILABLE)
        await self._config(name, params.get("version"))  # 404 first: no rate-limit bucket for a made-up name
        retry_after = self.rate_limiter.check(params["tenant"], name)
        if retry_after > 0:
            raise ApiError(429, f"rate limit for model {name!r} exceeded; retry in {retry_after:.2f}s",
                           "RATE_LIMITED", {"retry-after": str(max(1, round(retry_after + 0.5)))})
        inference = self._decode(request, name, params.get("version"))
        response = await self.engine.infer(inference)
        framed = encode_response(response, inference)
        return ApiResponse(200, framed.body, dict(framed.headers))

    def _decode(self, request: ApiRequest, name: str, version: str | None) -> InferenceRequest:
        """V2 over HTTP makes `id` optional; the event contract needs one, so one is made up when absent.

        Claim checks are refused: an HTTP body has no message size limit to get around, and the answer comes
        back on the connection."""
        unsupported = unsupported_media_type(request.headers.get(CONTENT_TYPE))
        if unsupported is not None:
            raise ApiError(415, unsupported, "UNSUPPORTED_MEDIA_TYPE")
        defaults: dict[str, Any] = {"model_name": name}
        if version is not None:
            defaults["model_version"] = version
        inference = decode_request(request.body, request.headers, max_bytes=self.max_request_bytes,
                                   defaults=defaults, fallbacks={"id": uuid.uuid4().hex})
        refuse_claim_checks(inference.inputs_uri, inference.parameters, inference.id,
                            "over HTTP (claim checks are for Kafka and SQS messages)", "send the inputs in the body",
                            "the result comes back in the answer")
        return inference

    # -- model repository extension -------------------------------------------------------------------

    async def _index(self, request: ApiRequest, params: dict[str, str]) -> ApiResponse:
        only_ready = False
        if request.body.strip():
            try:
                body = orjson.loads(request.body)
            except orjson.JSONDecodeError as exc:
                raise InferenceError(ErrorCode.INVALID_JSON, f"request is not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise InferenceError(ErrorCode.INVALID_REQUEST, "request must be a JSON object")
            only_ready = body.get("ready", False)
            if not isinstance(only_ready, bool):
                raise InferenceError(ErrorCode.INVALID_REQUEST,
                                     f"ready: expected true or false, got {only_ready!r:.40}")
        repository = self.engine.cache.repository

        def listing() -> list[dict[str, str]]:
            loaded = set(self.engine.cache.loaded())
            rows = []
            for name in repository.names():
                for version in repository.versions(name):
                    failure = self.engine.cache.load_failure(name, version)
                    if name in self.unloaded:
                        state, reason = "UNAVAILABLE", "unloaded"
                    elif failure is not None:
                        state, reason = "UNAVAILABLE", f"failed to load: {failure}"
                    else:
                        state = "READY"
                        reason = "" if (name, version) in loaded else "loads on first request"
                    if not only_ready or state == "READY":
                        rows.append({"name": name, "version": str(version), "state": state, "reason": reason})
            return rows

        return json_response(await asyncio.to_thread(listing))

    def _require_admin(self, params: dict[str, str]) -> None:
        """Loading and unloading act for every caller: with API keys, only the admin tenants may; and only
        where one process serves every caller (`repository_control`): an unload would reach one of a cloud
        function's instances and leave the others serving."""
        if not self.repository_control:
            raise ApiError(403, "loading and unloading models is not served here: each instance of the function "
                           "keeps its own cache, and models load on their first request", "FORBIDDEN")
        if self.api_keys.enabled and params["tenant"] not in self.admin_tenants:
            raise ApiError(403, "loading and unloading models needs an admin tenant's key (MAAS_ADMIN_TENANTS)",
                           "FORBIDDEN")

    async def _load(self, request: ApiRequest, params: dict[str, str]) -> ApiResponse:
        self._require_admin(params)
        name = params["name"]
        version, _ = await self._config(name, None)
        await self.engine.load(name, version)  # a broken artifact: 500 INTERNAL saying what is wrong
        self.unloaded.discard(name)
        return json_response({})

    async def _unload(self, request: ApiRequest, params: dict[str, str]) -> ApiResponse:
        self._require_admin(params)
        name = params["name"]
        await self._config(name, None)
        self.unloaded.add(name)
        self.engine.unload(name)
        return json_response({})

    async def _metrics(self, request: ApiRequest, params: dict[str, str]) -> ApiResponse:
        return ApiResponse(200, generate_latest(), {CONTENT_TYPE: CONTENT_TYPE_LATEST})
