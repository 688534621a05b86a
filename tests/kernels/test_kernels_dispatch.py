import pytest
import torch

import kernels
from kernels import dispatch


@pytest.mark.parametrize(("setting", "expected"), [("auto", "torch"), ("", "torch"), ("torch", "torch"),
                                                   ("TRITON", "triton")])
def test_backend_for_cpu_tensors_follows_the_environment(monkeypatch, setting, expected):
    monkeypatch.setenv("MAAS_KERNEL_BACKEND", setting)
    monkeypatch.setattr(dispatch, "INTERPRETER", True)
    assert kernels.backend_for(torch.zeros(2), None) == expected


def test_backend_for_is_read_at_call_time(monkeypatch):
    monkeypatch.delenv("MAAS_KERNEL_BACKEND", raising=False)
    assert kernels.backend_for(torch.zeros(2)) == "torch"


def test_backend_for_rejects_unknown_setting(monkeypatch):
    monkeypatch.setenv("MAAS_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MAAS_KERNEL_BACKEND"):
        kernels.backend_for(torch.zeros(2))


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MAAS_KERNEL_BACKEND", "triton")
    monkeypatch.setattr(dispatch, "INTERPRETER", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.softmax(torch.zeros(2, 3))


def test_every_public_op_is_exported():
    expected = {"linear", "linear_int8", "quantize_int8", "linear_fp8", "quantize_fp8", "softmax", "log_softmax",
                "layer_norm", "l2_normalize", "mean_pool", "attention", "embedding_pool", "conv2d", "max_pool2d",
                "lstm", "backend_for"}
    assert expected <= set(kernels.__all__)
    assert all(callable(getattr(kernels, name)) for name in expected)

