"""Process-wide knobs of a serving process, applied once by its entry point (a `maas` command, a function).

On a CPU the model thread and the event loop share few cores. torch's intra-op threads then spin against
the busy event-loop thread, and every return from a torch op waits for the GIL for up to Python's switch
interval (5 ms by default) while the loop decodes: a batch that computes in 0.3 ms alone took ~20 ms.
Fewer torch threads and a shorter switch interval give the model thread its turn.
"""

from __future__ import annotations

import sys

import torch

from pipeline.settings import Settings


def configure_process(settings: Settings) -> None:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.gil_switch_interval_us:
        sys.setswitchinterval(settings.gil_switch_interval_us / 1e6)
