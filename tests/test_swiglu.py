"""swiglu: the Triton kernels against the reference, output and both gradients.

Without CUDA the kernels run in the interpreter (tests/conftest.py), so shapes are small. bf16 runs only
on CUDA: the triton 3.9 interpreter rounds fp32 -> bf16 casts toward zero instead of to nearest.
"""

from __future__ import annotations

import kernel_checks
import pytest
import torch
from kernel_checks import (
    DEVICE,
    count_calls,
    default_backend,
    needs_cuda,
    needs_triton,
    outputs_and_grads,
    seeded_randn,
)

from soulchat.kernels import swiglu as sg
from soulchat.kernels.dispatch import env_var, force_backend, triton_runs_on
from soulchat.kernels.swiglu import swiglu, swiglu_backend, swiglu_bwd, swiglu_fwd, swiglu_ref


def make_inputs(shape, dtype=torch.float32, seed=0):
    """Fresh random gate (wide, so both sigmoid tails are hit), up and upstream grad dy."""
    gen = torch.Generator().manual_seed(seed)
    return (
        seeded_randn(gen, shape, dtype, scale=4.0),
        seeded_randn(gen, shape, dtype),
        seeded_randn(gen, shape, dtype),
    )


def run(fn, gate, up, dy):
    """(y, d_gate, d_up) of fn on fresh leaf copies."""
    return outputs_and_grads(fn, (gate, up), dy)


def run_backend(backend, gate, up, dy):
    return kernel_checks.run_backend("swiglu", backend, swiglu, (gate, up), dy)


def check_against_reference(shape, dtype, seed=0):
    gate, up, dy = make_inputs(shape, dtype, seed)
    kernel_checks.check_against_reference(
        "swiglu", swiglu, swiglu_ref, (gate, up), dy, names=("y", "d_gate", "d_up")
    )


def test_swiglu_ref_matches_transformers_mlp_activation():
    """transformers' Qwen2MLP applies ACT2FN["silu"] (nn.SiLU) to gate_proj, then multiplies by up_proj."""
    gate, up, _ = make_inputs((4, 9), torch.float16)
    want = torch.nn.SiLU()(gate) * up
    assert torch.equal(swiglu_ref(gate, up), want)
    g = gate.double()
    torch.testing.assert_close(swiglu_ref(g, up.double()), g / (1 + torch.exp(-g)) * up.double())


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape",
    [
        (1, 1),  # T = 1, I = 1
        (5, 7),
        (1, 129),
        (3, 200),  # like 8960: not a power of 2
        (2, 3, 1500),  # [B, T, I]; two column blocks, the second masked
    ],
)
def test_swiglu_matches_reference(shape, dtype):
    check_against_reference(shape, dtype, seed=sum(shape))


@needs_triton
def test_swiglu_extreme_gates_stay_finite():
    """Saturated sigmoid on both sides: silu(-80) = -0, silu(80) = 80; gradients 0 and 1 (times up)."""
    gate = torch.tensor([[-80.0, -20.0, 0.0, 20.0, 80.0]], device=DEVICE)
    up = torch.full_like(gate, 1.5)
    dy = torch.ones_like(gate)
    got = run_backend("triton", gate, up, dy)
    want = run(swiglu_ref, gate.double(), up.double(), dy.double())
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-6)


@needs_triton
def test_swiglu_halves_of_a_fused_gate_up_projection():
    """gate and up as the two halves of one [T, 2I] projection output: strided rows, no copy."""
    gate_up = torch.randn(6, 2 * 45, generator=torch.Generator().manual_seed(3)).to(DEVICE).requires_grad_()
    dy = torch.randn(6, 45, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    gate, up = gate_up[:, :45], gate_up[:, 45:]
    assert gate.stride(0) == 90
    with force_backend("swiglu", "triton"):
        y = swiglu(gate, up)
    (d_gate_up,) = torch.autograd.grad(y, gate_up, dy)
    want_y, want_dg, want_du = run(swiglu_ref, gate.double(), up.double(), dy.double())
    torch.testing.assert_close(y.double(), want_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d_gate_up[:, :45].double(), want_dg, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d_gate_up[:, 45:].double(), want_du, rtol=1e-6, atol=1e-6)


@needs_triton
def test_swiglu_saves_only_its_inputs():
    """The autograd node keeps gate and up and nothing else (silu is recomputed in the backward)."""
    gate, up, _ = make_inputs((3, 20))
    gate.requires_grad_()
    up.requires_grad_()
    with force_backend("swiglu", "triton"):
        y = swiglu(gate, up)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 2
    assert saved[0].data_ptr() == gate.data_ptr() and saved[1].data_ptr() == up.data_ptr()


@needs_triton
def test_swiglu_empty():
    gate = torch.empty(0, 8, device=DEVICE)
    y = swiglu_fwd(gate, gate)
    dg, du = swiglu_bwd(gate, gate, gate)
    assert y.shape == dg.shape == du.shape == (0, 8)


@needs_cuda
@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (33, 8960)])
def test_swiglu_bf16_matches_reference_cuda(shape):
    check_against_reference(shape, torch.bfloat16, seed=2)


def test_swiglu_dispatch_default_and_forced(monkeypatch):
    gate, up, _ = make_inputs((3, 8))
    calls = count_calls(monkeypatch, sg, "swiglu_fwd")
    want = swiglu_ref(gate, up)
    expected = default_backend(DEVICE)
    assert swiglu_backend(gate) == expected
    swiglu(gate, up)
    assert len(calls) == (1 if expected == "triton" else 0)
    monkeypatch.setenv(env_var("swiglu"), "reference")
    calls.clear()
    assert torch.equal(swiglu(gate, up), want) and calls == []
    if triton_runs_on(DEVICE):
        monkeypatch.setenv(env_var("swiglu"), "triton")
        torch.testing.assert_close(swiglu(gate, up), want, rtol=1e-6, atol=1e-6)
        assert calls == [1]
        with pytest.raises(RuntimeError, match="forced"):
            swiglu(gate.double(), up.double())
    monkeypatch.setenv(env_var("swiglu"), "fused9000")
    with pytest.raises(ValueError, match="unknown swiglu backend"):
        swiglu(gate, up)


def test_swiglu_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(3, 8), torch.randn(3, 9))
    with pytest.raises(TypeError, match="one floating dtype"):
        swiglu(torch.randn(3, 8), torch.randn(3, 8, dtype=torch.float16))
