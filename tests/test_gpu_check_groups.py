"""The GPU session runs ``bench/gpu_kernels_check.py`` as parallel groups of cases: a case in no group would
never be checked on a GPU, a case in two would be checked twice, side by side, for nothing."""

from bench_support import load_bench_script


def _gpu_kernels_check():
    return load_bench_script("gpu_kernels_check")


def test_every_gpu_kernel_case_is_in_exactly_one_group():
    check = _gpu_kernels_check()
    labels = [label for label, _, _ in check._cases()]
    assert len(labels) == len(set(labels)), "two cases share a label"
    groups = {label: [i for i, texts in enumerate(check.GROUPS) if any(text in label for text in texts)]
              for label in labels}
    assert {label: found for label, found in groups.items() if len(found) != 1} == {}
    assert all(any(found == [i] for found in groups.values()) for i in range(len(check.GROUPS))), "an empty group"
