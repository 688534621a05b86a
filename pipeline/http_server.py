"""The HTTP server: aiohttp in front of `V2Api` (Open Inference Protocol REST endpoints and /metrics).

Concurrent HTTP clients share the engine's dynamic batcher, so requests from many connections are run
in one model batch. Auth and a declared oversize body are refused before the body is read.
"""

from __future__ import annotations

import logging

from aiohttp import web

from pipeline.errors import ErrorCode
from pipeline.v2_api import ApiRequest, V2Api, error_response

log = logging.getLogger(__name__)


def _to_web(response) -> web.Response:
    headers = dict(response.headers)
    content_type = headers.pop("content-type", None)
    resp = web.Response(status=response.status, body=response.body, headers=headers)
    if content_type:
        resp.headers["Content-Type"] = content_type
    return resp


def build_app(api: V2Api) -> web.Application:
    """One catch-all route: `V2Api` does the routing, so the Lambda adapter serves exactly the same paths."""
    app = web.Application(client_max_size=api.max_request_bytes + 1)

    async def dispatch(request: web.Request) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        refused = api.precheck(request.method, request.path, headers, request.content_length)
        if refused is not None:
            return _to_web(refused)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:  # chunked bodies have no Content-Length to check up front
            return _to_web(error_response(413, f"request body exceeds the limit of {api.max_request_bytes} bytes",
                                          ErrorCode.PAYLOAD_TOO_LARGE))
        response = await api.handle(ApiRequest(request.method, request.path, headers, body))
        return _to_web(response)

    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


class HttpServer:
    """Serve `V2Api` on host:port. `async with HttpServer(...)` or `start()` / `stop()`; port 0 picks one."""

    def __init__(self, api: V2Api, host: str = "127.0.0.1", port: int = 8000, *, backlog: int = 1024) -> None:
        self.api = api
        self.host = host
        self.port = port
        self.backlog = backlog
        self._runner: web.AppRunner | None = None

    async def start(self) -> HttpServer:
        self._runner = web.AppRunner(build_app(self.api), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=self.backlog)
        await site.start()
        if self._runner.addresses:
            self.port = self._runner.addresses[0][1]
        self.api.ready = True
        log.info("serving the V2 API on http://%s:%s", self.host, self.port)
        return self

    async def stop(self) -> None:
        """Refuse readiness first (load balancers drain), then close connections after in-flight requests."""
        self.api.ready = False
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> HttpServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
