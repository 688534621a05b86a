"""The HTTP server: aiohttp in front of `V2Api` (Open Inference Protocol REST endpoints and /metrics).

Concurrent HTTP clients share the engine's dynamic batcher, so requests from many connections are run
in one model batch. What can be refused before the body is read is refused then (auth, a declared
oversize or compressed body), including on `Expect: 100-continue`, before the client sends the body. The
server holds at most `max_in_flight` requests (503 past it; health probes and metrics scrapes are not
counted, nor refused), gives a body `body_timeout_s` to arrive (408), closes a connection without a request
under way after `idle_timeout_s` (one that sent nothing, or half a request's head, included), and on `stop()`
stops listening, lets the requests in flight finish (up to `drain_timeout_s`), then closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from pipeline.errors import ErrorCode
from pipeline.observability import IDLE_TIMEOUT_S, listen
from pipeline.v2_api import PUBLIC_PATHS, ApiRequest, ApiResponse, V2Api, refusal

log = logging.getLogger(__name__)


def _to_web(response: ApiResponse, *, close: bool = False) -> web.Response:
    headers = dict(response.headers)
    content_type = headers.pop("content-type", None)
    resp = web.Response(status=response.status, body=response.body, headers=headers)
    if content_type:
        resp.headers["Content-Type"] = content_type
    if close:  # a refused request's body may still be on its way: do not read it to keep the connection
        resp.force_close()
    return resp


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    """Lower-case names; a header sent more than once keeps all its values, comma-joined as RFC 9110 §5.3
    combines them (keeping the last let `Content-Encoding: gzip` then `identity` pass as uncompressed)."""
    lowered: dict[str, str] = {}
    for name, value in headers.items():  # a multidict: every value of a repeated header
        key = name.lower()
        lowered[key] = f"{lowered[key]}, {value}" if key in lowered else value
    return lowered


@dataclass
class Traffic:
    """The requests a server holds now, and its bounds."""

    max_in_flight: int = 4096
    body_timeout_s: float = 30.0
    in_flight: int = 0
    stopping: bool = False  # draining: requests arriving on open connections are refused, and connections closed


def build_app(api: V2Api, traffic: Traffic | None = None) -> web.Application:
    """One catch-all route: `V2Api` does the routing, so the Lambda adapter serves exactly the same paths."""
    traffic = traffic or Traffic()
    app = web.Application(client_max_size=api.max_request_bytes + 1)

    def precheck(request: web.Request, headers: dict[str, str]) -> web.Response | None:
        refused = api.precheck(request.method, request.path, headers, request.content_length)
        return None if refused is None else _to_web(refused, close=True)

    async def expect(request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: refuse now, or invite the body."""
        refused = precheck(request, _lower(request.headers))
        if refused is not None:
            return refused
        if request.headers.get("expect", "").lower() != "100-continue":
            return _to_web(refusal(417, "only Expect: 100-continue is understood", "EXPECTATION_FAILED"),
                           close=True)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None

    async def dispatch(request: web.Request) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:  # a probe refused for load gets a busy server restarted or taken out
            # of service: they answer however busy it is, and hold no slot, since their bodies are not read
            probe = ApiRequest(request.method, request.path, _lower(request.headers))
            return _to_web(await api.handle(probe), close=request.body_exists or traffic.stopping)
        if traffic.stopping:  # a keep-alive connection's next request: served, it kept the drain going until its
            # deadline, which then cut the requests in flight off unanswered
            return _to_web(refusal(503, "the server is stopping; retry shortly", str(ErrorCode.UNAVAILABLE),
                                   {"retry-after": "1"}), close=True)
        if traffic.in_flight >= traffic.max_in_flight:
            return _to_web(refusal(503, f"the server holds {traffic.max_in_flight} requests "
                                   "(MAAS_MAX_IN_FLIGHT); retry shortly", str(ErrorCode.UNAVAILABLE),
                                   {"retry-after": "1"}), close=True)
        traffic.in_flight += 1
        try:
            headers = _lower(request.headers)
            refused = precheck(request, headers)
            if refused is not None:
                return refused
            try:
                async with asyncio.timeout(traffic.body_timeout_s):
                    body = await request.read()
            except web.HTTPRequestEntityTooLarge:  # chunked bodies have no Content-Length to check up front
                return _to_web(refusal(413, f"request body exceeds the limit of {api.max_request_bytes} "
                                       "bytes", ErrorCode.PAYLOAD_TOO_LARGE), close=True)
            except TimeoutError:
                return _to_web(refusal(408, f"the request body did not arrive within "
                                       f"{traffic.body_timeout_s:g} s", "REQUEST_TIMEOUT"), close=True)
            response = await api.handle(ApiRequest(request.method, request.path, headers, body))
            return _to_web(response, close=traffic.stopping)
        finally:
            traffic.in_flight -= 1

    # (?s): a path holding a line break (aiohttp decodes %0a) is ours to answer, not aiohttp's plain-text 404
    app.router.add_route("*", "/{tail:(?s:.*)}", dispatch, expect_handler=expect)
    return app




class HttpServer:
    """Serve `V2Api` on host:port. `async with HttpServer(...)` or `start()` / `stop()`; port 0 picks one."""

    def __init__(self, api: V2Api, host: str = "127.0.0.1", port: int = 8000, *, backlog: int = 1024,
                 max_in_flight: int = 4096, body_timeout_s: float = 30.0, drain_timeout_s: float = 25.0,
                 idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self.api = api
        self.host = host
        self.port = port
        self.backlog = backlog
        self.traffic = Traffic(max_in_flight=max_in_flight, body_timeout_s=body_timeout_s)
        self.drain_timeout_s = drain_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._runner: web.AppRunner | None = None
        self._stop_lock = asyncio.Lock()  # a second stop() waits for the first, then finds nothing to close

    async def start(self) -> HttpServer:
        """Listen; the API reports ready only once it does (a port in use fails start() not ready)."""
        self.api.ready = self.traffic.stopping = False
        runner = web.AppRunner(build_app(self.api, self.traffic), access_log=None, handle_signals=False,
                               shutdown_timeout=1.0, keepalive_timeout=self.idle_timeout_s)
        await listen(runner, self.host, self.port, backlog=self.backlog)
        self._runner = runner
        if runner.addresses:
            self.port = runner.addresses[0][1]
        self.api.ready = True
        log.info("serving the V2 API on http://%s:%s", self.host, self.port)
        return self

    async def stop(self) -> None:
        """Refuse readiness, stop listening, let the requests in flight finish (up to `drain_timeout_s`), close.

        Open connections are closed after their request in flight; a new request on one gets 503 (a keep-alive
        client would otherwise keep the drain busy until its deadline). A stop() called while another runs returns
        once that one has closed the server.
        """
        self.api.ready = False
        self.traffic.stopping = True
        async with self._stop_lock:
            runner, self._runner = self._runner, None
            if runner is None:
                return
            for site in list(runner.sites):
                await site.stop()
            deadline = time.monotonic() + self.drain_timeout_s
            while self.traffic.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if self.traffic.in_flight:
                log.warning("closing with %d requests still in flight after %.0f s", self.traffic.in_flight,
                            self.drain_timeout_s)
            await runner.cleanup()

    async def __aenter__(self) -> HttpServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
