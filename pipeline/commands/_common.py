"""Helpers shared by the `maas` commands."""

from __future__ import annotations

import asyncio
import signal

from models.repository import ModelRepository
from pipeline.settings import ConfigError, Settings


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, so long-running commands shut down gracefully."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)
    return event


def open_repository(settings: Settings) -> ModelRepository:
    if settings.model_repository.startswith("s3://"):
        raise ConfigError("MAAS_MODEL_REPOSITORY: s3:// repositories are not supported yet; use a local folder")
    return ModelRepository(settings.model_repository)
