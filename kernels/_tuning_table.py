"""Tile configs and kernel choices tuned on one GPU model, shipped to the next worker on that model.

With an empty Triton cache a worker's first warm-up compiles and times every tile config of every tuning
round, and times every kernel choice: most of MiniLM's empty-cache cold start on an H100 (30.3 s against 7.0 s
with a warm cache, run 11). A warm-up on the same GPU model has already made every one of those decisions; a
table of them (:func:`kernels._autotune.tuning_table`, written by ``maas models tune``) hands each tuning key its
pick, so that only the picks compile and nothing is timed. vLLM ships its fused-MoE tile configs per GPU model the same
way.

Tables are JSON files: ``kernels/tuned/<device>.json`` for the GPU model named ``<device>`` (its CUDA name,
lower-cased, runs of other characters as ``-``), or the file ``MAAS_TUNING_TABLE`` names (``none``: no table).
The timings a worker makes itself, on disk in ``TRITON_CACHE_DIR``, come first. A pick the current configs no
longer hold (a config list changed since the export) is ignored, and that key is tuned as usual.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

TABLE_ENV = "MAAS_TUNING_TABLE"
TABLE_DIR = Path(__file__).resolve().parent / "tuned"


def device_file(device_name: str) -> Path:
    """Where the table of the GPU model ``device_name`` (e.g. ``NVIDIA H100 80GB HBM3``) is shipped."""
    return TABLE_DIR / (re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") + ".json")


def key_text(key: tuple) -> str:
    """An autotuner's tuning key (sizes, buckets, dtype names) as the table's JSON key."""
    return json.dumps([v if isinstance(v, (int, float, bool)) else str(v) for v in key])


def _table_path() -> tuple[Path | None, bool]:
    """The table's path, and whether ``MAAS_TUNING_TABLE`` named it (then it should exist)."""
    setting = os.environ.get(TABLE_ENV, "").strip()
    if setting.lower() == "none":
        return None, False
    if setting:
        return Path(setting), True
    import torch

    if not torch.cuda.is_available():
        return None, False
    return device_file(torch.cuda.get_device_name()), False


@functools.cache
def _read(path: Path, named: bool) -> dict:
    """The table at ``path``: ``{"autotuners": {kernel: {key_text: str(config)}}, "choices": {name: {stored key:
    choice}}, "binaries": [what ``maas models precompile`` compiles, see :mod:`kernels.precompile`]}``; empty when
    there is none (with a warning where ``MAAS_TUNING_TABLE`` named it) or when it cannot be read (with a warning:
    tuning as usual is slower, never wrong). Read once per process."""
    if not path.is_file():
        if named:
            log.warning("%s=%s: no such file; tuning as usual", TABLE_ENV, path)
        return {}
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("tuning table %s unreadable (%s); tuning as usual", path, exc)
        return {}
    if not isinstance(table, dict):
        log.warning("tuning table %s: expected a JSON object; tuning as usual", path)
        return {}
    return table


def current() -> dict:
    """The tuning table that applies here (see the module's docstring), or an empty one."""
    path, named = _table_path()
    return _read(path, named) if path is not None else {}


_warned_stale: set[str] = set()  # kernels whose stale picks were reported (shipped_config)


def shipped_config(kernel: str, key: tuple, candidates: list):
    """The candidate config the table picked for ``kernel`` at ``key``, or None. A pick that is none of the
    candidates (the kernel's configs changed since the export, or another Triton prints them otherwise) is
    ignored, with a warning once per kernel: that key is tuned as usual, which only costs time."""
    pick = current().get("autotuners", {}).get(kernel, {}).get(key_text(key))
    if not pick:
        return None
    found = next((c for c in candidates if config_text(c) == pick), None)
    if found is None and kernel not in _warned_stale:
        _warned_stale.add(kernel)
        log.warning("tuning table %s: %s's pick %r at %s is none of its configs (exported before they changed?); "
                    "tuning such keys as usual: export the table again", _table_path()[0], kernel, pick,
                    key_text(key))
    return found


def shipped_choice(name: str, stored_key: str) -> str | None:
    """The choice the table holds for ``stored_key`` of the :class:`kernels._autotune.TimedChoice` ``name``."""
    choice = current().get("choices", {}).get(name, {}).get(stored_key)
    return choice if isinstance(choice, str) else None


def summary(table: dict) -> str:
    """What ``table`` holds, in words."""
    return (f"{sum(map(len, table.get('autotuners', {}).values()))} autotuner picks, "
            f"{sum(map(len, table.get('choices', {}).values()))} kernel choices and "
            f"{len(table.get('binaries', []))} kernel binaries to precompile")


def config_text(config) -> str:
    """A tile config as the table writes it: its kwargs and compile options (Triton's own ``str``), no hook."""
    return str(config)
