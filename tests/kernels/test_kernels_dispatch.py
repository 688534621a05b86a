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



PDL = {"USE_PDL": True, "launch_pdl": True}


@pytest.mark.parametrize(("setting", "arch", "wanted", "expected"), [
    (None, 90, False, {}),  # auto: only where the caller asks for it
    (None, 90, True, PDL),
    ("auto", 80, True, {}),  # an A100 has no programmatic dependent launch
    ("on", 90, False, PDL),
    ("ON", 100, False, PDL),
    ("on", 80, False, {}),
    ("off", 90, True, {}),
])
def test_pdl_options_follow_the_setting_the_caller_and_the_gpu(monkeypatch, setting, arch, wanted, expected):
    from kernels.offline import compile_for

    if setting is None:
        monkeypatch.delenv("MAAS_PDL", raising=False)
    else:
        monkeypatch.setenv("MAAS_PDL", setting)
    monkeypatch.setattr(dispatch, "INTERPRETER", False)
    with compile_for(arch), dispatch.pdl_launches(wanted):
        assert dispatch.pdl(torch.zeros(2)) == expected
    with compile_for(arch):  # the block's wish ends with it
        assert dispatch.pdl(torch.zeros(2)) == (PDL if setting in ("on", "ON") and arch >= 90 else {})


def test_pdl_is_off_under_the_interpreter_and_refuses_unknown_settings(monkeypatch):
    monkeypatch.setenv("MAAS_PDL", "on")
    monkeypatch.setattr(dispatch, "INTERPRETER", True)
    assert dispatch.pdl(torch.zeros(2)) == {}
    monkeypatch.setattr(dispatch, "INTERPRETER", False)
    monkeypatch.setenv("MAAS_PDL", "yes")
    with pytest.raises(ValueError, match="MAAS_PDL"):
        dispatch.pdl(torch.zeros(2))
