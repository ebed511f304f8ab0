"""The one rule for where a Triton kernel may run (dispatch.triton_usable)."""

from __future__ import annotations

import pytest
import torch

from soulchat.kernels import dispatch
from soulchat.kernels.dispatch import force_backend, triton_usable

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.skipif(not dispatch.TRITON_IMPORTABLE, reason="triton is not installed")
def test_triton_usable_on_cuda_for_the_kernel_dtypes_only():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert triton_usable("loss", CUDA, dtype)
    assert not triton_usable("loss", CUDA, torch.float64)


@pytest.mark.skipif(not dispatch.TRITON_IMPORTABLE, reason="triton is not installed")
def test_triton_usable_on_cpu_only_interpreted_forced_and_not_bf16(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not triton_usable("swiglu", CPU, torch.float32)  # never the automatic choice
    with force_backend("swiglu", "triton"):
        assert triton_usable("swiglu", CPU, torch.float32) and triton_usable("swiglu", CPU, torch.float16)
        assert not triton_usable("swiglu", CPU, torch.bfloat16)  # the interpreter is wrong in bf16
        assert not triton_usable("rms_norm", CPU, torch.float32)  # forced for another op only
    monkeypatch.setenv("SOULCHAT_RMS_NORM_BACKEND", "triton")
    assert triton_usable("rms_norm", CPU, torch.float16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_usable("rms_norm", CPU, torch.float16)  # no interpreter: no Triton on a CPU
    assert not triton_usable("rms_norm", torch.device("meta"), torch.float16)


def test_triton_usable_without_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "TRITON_IMPORTABLE", False)
    assert not triton_usable("loss", CUDA, torch.bfloat16)
