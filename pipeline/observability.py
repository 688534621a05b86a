"""Liveness, readiness and Prometheus metrics of a worker on a small aiohttp server, and JSON logs.

Kubernetes probes `/health/live` and `/health/ready`; Prometheus scrapes `/metrics`. The server runs on
the worker's event loop, so a live answer also proves the loop is not blocked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from models.repository import without_credentials

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extras such as request_id and traceparent become fields."""

    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        body.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            body["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(body, default=str)


#: Control characters (tab aside) as escapes: `\n` for a line feed, `\x1b` for an escape.
_CONTROL_ESCAPES = {c: repr(chr(c))[1:-1] for c in (*range(32), 127) if c != 9}


class TextFormatter(logging.Formatter):
    """One line per message: control characters in it are escaped. Messages quote what callers sent (a request id,
    a topic), and a request id holding a line feed wrote a log line of the caller's making, level and logger
    included, which log alerts and searches took for the worker's own. A traceback keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_CONTROL_ESCAPES)
        return super().formatMessage(record)


class MaskCredentials(logging.Filter):
    """A handler's filter: the ``user:password@`` of every URL in a record's message and traceback masked. An
    endpoint URL may carry credentials (``AWS_ENDPOINT_URL=http://user:secret@host``), and botocore's network
    errors quote it (``Could not connect to the endpoint URL: "http://user:secret@host/"``), which the SQS and
    batch workers log when a receive fails. On a handler, it covers every logger, the libraries' included."""

    def filter(self, record: logging.LogRecord) -> bool:
        # The message formatted once, here: the formatter's getMessage() then has no arguments left to apply. One
        # that cannot be formatted is left as it is, for the handler to report as it reports any (a filter's
        # exception is not caught by logging: it reached the code that logged).
        try:
            message = record.getMessage()
        except Exception:
            return True
        record.msg, record.args = without_credentials(message), None
        if record.exc_info and not record.exc_text:  # formatters reuse exc_text once it is set
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = without_credentials(record.exc_text)
        return True


_TRACEBACKS = logging.Formatter()
MASK_CREDENTIALS = MaskCredentials()  # one object: adding it to a handler again is a no-op


def mask_credentials_in_logs() -> None:
    """Add `MaskCredentials` to the root logger's handlers (a cloud function's runtime installs its own)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(MASK_CREDENTIALS)


def configure_logging(verbose: bool, fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(MASK_CREDENTIALS)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.WARNING if verbose else logging.CRITICAL)


#: How long a connection may stay open without a request under way: before its first request's head has arrived
#: whole, and between requests. aiohttp's server default is 3,630 s, and a connection that sent nothing, or half a
#: head, held its file descriptor that long: a few thousand of them, which anyone who can reach the port could open,
#: used up the process's file descriptors, and then nobody could connect, the health probes included. 75 s, as
#: aiohttp's own `run_app` has it, outlasts the idle timeout of the load balancers that keep connections to a server
#: open (AWS ALB's 60 s), which must be the ones to close them.
IDLE_TIMEOUT_S = 75.0


class WithholdRequestText(logging.Filter):
    """aiohttp logs a request it cannot parse with the offending bytes, which may be an API key's header:
    the record keeps what went wrong and drops the text. The body of a request refused before it was read
    (a compressed one, say) is read by aiohttp after the answer, and the connection then closed: one line
    at INFO, not two ERROR tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = "refused a malformed HTTP request (%s %s; its text withheld)", (
                type(exc).__name__, getattr(exc, "code", ""))
            record.exc_info = record.exc_text = None
        elif isinstance(exc, RequestPayloadError | ConnectionResetError):
            record.msg, record.args = "the body of a refused or abandoned request was not read (%s)", (
                type(exc).__name__,)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


WITHHOLD_REQUEST_TEXT = WithholdRequestText()


async def listen(runner: web.AppRunner, host: str, port: int, **site_options: Any) -> web.TCPSite:
    """Set `runner` up and listen on host:port. When that fails (the port is taken), the runner is cleaned up
    again: a failed start() leaves nothing running, and nothing for stop() to close. aiohttp's server log withholds
    the text of the requests it cannot parse (`WITHHOLD_REQUEST_TEXT`), on the health port as on the API's."""
    logging.getLogger("aiohttp.server").addFilter(WITHHOLD_REQUEST_TEXT)  # the same object: added once however often
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, **site_options)
        await site.start()
    except socket.gaierror as exc:  # its message names neither the host nor the port
        await runner.cleanup()
        raise OSError(f"cannot listen on {host}:{port}: no such address ({exc.strerror})") from None
    except BaseException:
        await runner.cleanup()
        raise
    return site


class HealthServer:
    """`/health/live`, `/health/ready` and `/metrics`. `not_ready()` decides readiness: None when ready, else why not
    (no partition owned, answers the broker does not take), which `/health/ready` says beside its 503: a probe's or
    operator's only sign that a worker is stuck, and why. The reason is served with the credentials of any URL in it
    masked, as in the logs: the health port listens on 0.0.0.0 by default."""

    def __init__(self, host: str, port: int, not_ready: Callable[[], str | None], *,
                 idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self.host = host
        self.port = port
        self._not_ready = not_ready
        self.idle_timeout_s = idle_timeout_s
        self._started = time.monotonic()
        self._runner: web.AppRunner | None = None
        self._stop_lock = asyncio.Lock()  # a second stop() waits for the first, then finds nothing to close

    async def start(self) -> HealthServer:
        app = web.Application()
        app.router.add_get("/health/live", self._live)
        app.router.add_get("/health/ready", self._readiness)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=self.idle_timeout_s)
        site = await listen(runner, self.host, self.port)
        self._runner = runner
        self.port = site._server.sockets[0].getsockname()[1]  # the real port when 0 was asked for
        return self

    async def stop(self) -> None:
        async with self._stop_lock:
            runner, self._runner = self._runner, None
            if runner is not None:
                await runner.cleanup()

    async def __aenter__(self) -> HealthServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live", "uptime_s": round(time.monotonic() - self._started, 1)})

    async def _readiness(self, request: web.Request) -> web.Response:
        reason = self._not_ready()
        if reason is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": without_credentials(reason)}, status=503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})
