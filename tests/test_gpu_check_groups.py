"""The GPU session runs ``bench/gpu_kernels_check.py`` as parallel groups of cases: a case in no group would
never be checked on a GPU, a case in two would be checked twice, side by side, for nothing."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gpu_kernels_check():
    spec = importlib.util.spec_from_file_location("gpu_kernels_check", ROOT / "bench" / "gpu_kernels_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_gpu_kernel_case_is_in_exactly_one_group():
    check = _gpu_kernels_check()
    labels = [label for label, _, _ in check._cases()]
    assert len(labels) == len(set(labels)), "two cases share a label"
    groups = {label: [i for i, texts in enumerate(check.GROUPS) if any(text in label for text in texts)]
              for label in labels}
    assert {label: found for label, found in groups.items() if len(found) != 1} == {}
    assert all(any(found == [i] for found in groups.values()) for i in range(len(check.GROUPS))), "an empty group"
