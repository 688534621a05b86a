"""Loading a script of ``bench/`` (a folder of scripts, not a package) as a module, for the tests of its helpers."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_bench_script(name: str) -> ModuleType:
    """``bench/<name>.py`` imported as module ``bench_<name>`` (registered, so dataclasses resolve; not as
    ``<name>``: ``bench/kernels.py`` would shadow the ``kernels`` package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
