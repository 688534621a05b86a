"""`maas serve`: the Open Inference Protocol (KServe V2) HTTP API over the model repository."""

from __future__ import annotations

import argparse

from models.examples import ensure_examples
from pipeline.commands._common import port, stop_event
from pipeline.engine import InferenceEngine
from pipeline.http_server import HttpServer
from pipeline.ratelimit import ApiKeys, RateLimiter
from pipeline.services import model_cache, open_repository
from pipeline.settings import Settings
from pipeline.v2_api import V2Api


async def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    repository = open_repository(settings)
    if args.examples:
        ensure_examples(repository)
    api_keys, limiter = ApiKeys.from_settings(settings), RateLimiter.from_settings(settings)
    async with InferenceEngine.for_settings(model_cache(settings, repository), settings) as engine:
        api = V2Api(engine, max_request_bytes=settings.max_request_bytes, api_keys=api_keys, rate_limiter=limiter,
                    admin_tenants=settings.admin_tenants)
        # On SIGTERM, the requests in flight get three quarters of MAAS_SHUTDOWN_TIMEOUT_S, closing the rest; then the
        # engine waits up to a quarter more for the model thread.
        async with HttpServer(api, args.host, args.port, max_in_flight=settings.max_in_flight,
                              drain_timeout_s=settings.shutdown_timeout_s * 3 / 4) as server:
            print(f"serving the V2 API on {server.url} (models from {repository.root}; "
                  f"auth {'on' if api_keys.enabled else 'off'}, rate limits {'on' if limiter.enabled else 'off'})",
                  flush=True)
            await stop_event().wait()
    print("server stopped", flush=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve the Open Inference Protocol (KServe V2) HTTP API")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=port, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.add_argument("--examples", action="store_true", help="publish the example models first if missing")
    serve.set_defaults(run=cmd_serve)
