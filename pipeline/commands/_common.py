"""Helpers shared by the `maas` commands."""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
from collections.abc import Callable

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_event() -> asyncio.Event:
    """An event set by the first SIGINT or SIGTERM, so long-running commands shut down gracefully.

    The first signal also gives both back to their default handlers: a graceful shutdown may take a while
    (requests drain for up to 30 s), and a second Ctrl-C or SIGTERM must then end the process, not wait.
    """
    event = asyncio.Event()
    loop = asyncio.get_running_loop()

    def first_signal() -> None:
        event.set()
        for sig in _STOP_SIGNALS:
            loop.remove_signal_handler(sig)  # SIGINT: KeyboardInterrupt again; SIGTERM: its default action

    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, first_signal)
    return event


def exit_on_sigterm() -> None:
    """Until a command installs its graceful handler (`stop_event`), SIGTERM raises SystemExit instead of
    killing the process outright: `finally` blocks and error paths run, so an embedded stack that is being
    started is stopped and its temporary folder removed (a SIGTERM during `maas up`'s startup left both)."""
    signal.signal(signal.SIGTERM, _exit)


def _exit(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 (pick a free one) to 65535."""
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {text!r}")
    return int(text)


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number in ``low..high`` (``low`` >= 0), for a bound an API sets (SQS's long poll
    takes 0 to 20 s) that the command should refuse at once rather than pass on to fail later."""

    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number in {low}..{high}, got {text!r}")
        return int(text)

    return parse


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value
