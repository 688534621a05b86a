"""Helpers shared by the `maas` commands."""

from __future__ import annotations

import asyncio
import signal

from models.repository import Repository, RepositoryError
from models.repository import open_repository as open_model_repository
from pipeline.services import aws_client
from pipeline.settings import ConfigError, Settings


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, so long-running commands shut down gracefully."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)
    return event


def open_repository(settings: Settings) -> Repository:
    """MAAS_MODEL_REPOSITORY as a repository: a local folder, or S3 through the configured endpoint.

    With the embedded stack, call this after the stack's endpoint is in `settings`.
    """
    try:
        return open_model_repository(settings.model_repository, lambda: aws_client(settings, "s3"),
                                     cache_dir=settings.model_cache_dir)
    except RepositoryError as exc:
        raise ConfigError(f"MAAS_MODEL_REPOSITORY: {exc}") from None
