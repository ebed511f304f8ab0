"""rms_norm: the Triton kernels against the reference, outputs and both gradients.

Without CUDA the kernels run in the interpreter (tests/conftest.py), so shapes are small. bf16 runs only
on CUDA: the triton 3.9 interpreter rounds fp32 -> bf16 casts toward zero instead of to nearest, so its
bf16 results are not what a GPU computes.
"""

from __future__ import annotations

import kernel_checks
import pytest
import torch
from kernel_checks import (
    DEVICE,
    assert_within_torch_error,
    count_calls,
    default_backend,
    needs_cuda,
    needs_triton,
    outputs_and_grads,
    seeded_randn,
)

from soulchat.kernels import rms_norm as rn
from soulchat.kernels.dispatch import env_var, force_backend, triton_runs_on
from soulchat.kernels.rms_norm import rms_norm, rms_norm_backend, rms_norm_bwd, rms_norm_fwd, rms_norm_ref

EPS = 1e-6


def make_inputs(shape, dtype=torch.float32, w_dtype=None, seed=0):
    """Fresh random x, weight (around 1, as trained norms are) and upstream grad dy; never zeros."""
    gen = torch.Generator().manual_seed(seed)
    w_dtype = w_dtype or dtype
    x = seeded_randn(gen, shape, dtype, scale=2.0, shift=0.3)
    w = seeded_randn(gen, shape[-1:], w_dtype, scale=0.5, shift=1.0)
    dy = seeded_randn(gen, shape, torch.promote_types(dtype, w_dtype))
    return x, w, dy


def run(fn, x, w, dy):
    """(y, dx, dw) of fn on fresh leaf copies."""
    return outputs_and_grads(fn, (x, w), dy)


def run_backend(backend, x, w, dy):
    return kernel_checks.run_backend("rms_norm", backend, lambda a, b: rms_norm(a, b, EPS), (x, w), dy)


def check_against_reference(shape, dtype, w_dtype=None, seed=0):
    x, w, dy = make_inputs(shape, dtype, w_dtype, seed)
    kernel_checks.check_against_reference(
        "rms_norm", lambda a, b: rms_norm(a, b, EPS), lambda a, b: rms_norm_ref(a, b, EPS), (x, w), dy,
        names=("y", "dx", "dw"),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# the reference itself
# --------------------------------------------------------------------------------------------------


def test_rms_norm_ref_matches_transformers_qwen2():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    x, w, _ = make_inputs((3, 5, 24), torch.float16)
    hf = Qwen2RMSNorm(24, eps=EPS).to(DEVICE, torch.float16)
    with torch.no_grad():
        hf.weight.copy_(w)
        want = hf(x)
    got = rms_norm_ref(x, w, EPS)
    assert got.dtype == want.dtype == torch.float16
    assert torch.equal(got, want)  # same ops in the same order: bit for bit


# --------------------------------------------------------------------------------------------------
# Triton against the reference: odd hidden sizes, one row, fp32 and fp16
# --------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape",
    [
        (1, 1),  # T = 1, H = 1
        (6, 7),
        (1, 129),  # one row, one lane past a power of 2
        (2, 5, 200),  # [B, T, H], H like 896: not a power of 2
        (3, 17, 64),  # q/k-norm-like rows: many short rows per tile
    ],
)
def test_rms_norm_matches_reference(shape, dtype):
    check_against_reference(shape, dtype, seed=sum(shape))


@needs_triton
def test_rms_norm_fp16_input_fp32_weight_promotes_like_transformers():
    """bf16/fp16 activations with fp32 weights give fp32 outputs in transformers; so here."""
    x, w, dy = make_inputs((5, 33), torch.float16, torch.float32, seed=3)
    got = run_backend("triton", x, w, dy)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float16 and got[2].dtype == torch.float32
    same_dtype = run(lambda a, b: rms_norm_ref(a, b, EPS), x, w, dy)
    assert same_dtype[0].dtype == torch.float32
    # The forward is the same ops (fp32 stats, x_hat rounded to fp16, exact product), so nearly every
    # element is equal; a last-bit difference in rstd may flip a rare fp16 rounding of x_hat (one ulp).
    assert torch.isclose(got[0], same_dtype[0], rtol=2e-7, atol=0).float().mean() > 0.98
    torch.testing.assert_close(got[0], same_dtype[0], rtol=2**-10, atol=0)
    # The fp64 truth keeps x's fp16 rounding (same inputs); only the math is exact.
    truth = run(lambda a, b: rms_norm_ref(a, b, EPS), x.double(), w.double(), dy.double())
    assert_within_torch_error(got[1:], same_dtype[1:], truth[1:], names=("dx", "dw"))


@needs_triton
@pytest.mark.parametrize("programs, block_rows", [(1, 4), (3, 2), (7, 1), (40, None), (2, None)])
def test_rms_norm_bwd_dweight_partials_over_uneven_row_splits(programs, block_rows):
    """dweight is per-program partial sums then a sum: every split of the rows gives the same answer,
    with one or several row tiles per program and a partly masked last tile."""
    x, w, dy = make_inputs((19, 40), torch.float32, seed=programs)
    _, rstd = rms_norm_fwd(x, w, EPS)
    dx, dw = rms_norm_bwd(dy, x, w, rstd, programs=programs, block_rows=block_rows)
    _, want_dx, want_dw = run(lambda a, b: rms_norm_ref(a, b, EPS), x.double(), w.double(), dy.double())
    torch.testing.assert_close(dx.double(), want_dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), want_dw, rtol=1e-5, atol=1e-5)
    # rstd is what the backward relies on: check it directly.
    want_rstd = torch.rsqrt(x.double().pow(2).mean(-1) + EPS)
    torch.testing.assert_close(rstd.double(), want_rstd, rtol=1e-6, atol=0)


@needs_triton
def test_rms_norm_strided_rows_and_frozen_weight():
    """Rows read through their stride (a view, no copy); a weight without grad skips dweight."""
    x_wide, w, _ = make_inputs((8, 50), torch.float32, seed=5)
    x = x_wide[:, 3:40]  # [8, 37], row stride 50
    w = w[:37].clone()
    dy = torch.randn(8, 37, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    xg = x.detach().clone().requires_grad_()  # the clone is contiguous: compare the view to it
    xv = x_wide.detach().clone().requires_grad_()
    with force_backend("rms_norm", "triton"):
        y_view = rms_norm(xv[:, 3:40], w, EPS)  # w does not require grad
        y = rms_norm(xg, w, EPS)
    assert torch.equal(y_view, y)
    (dx_wide,) = torch.autograd.grad(y_view, xv, dy)
    (dx,) = torch.autograd.grad(y, xg, dy)
    assert torch.equal(dx_wide[:, 3:40], dx)
    assert dx_wide[:, :3].abs().sum() == 0 and dx_wide[:, 40:].abs().sum() == 0
    _, want_dx, _ = run(lambda a, b: rms_norm_ref(a, b, EPS), x.double(), w.double(), dy.double())
    torch.testing.assert_close(dx.double(), want_dx, rtol=1e-5, atol=1e-5)


@needs_triton
def test_rms_norm_empty_rows():
    x = torch.empty(0, 16, device=DEVICE)
    w = torch.ones(16, device=DEVICE)
    y, rstd = rms_norm_fwd(x, w, EPS)
    dx, dw = rms_norm_bwd(torch.empty_like(x), x, w, rstd)
    assert y.shape == (0, 16) and dx.shape == (0, 16) and torch.equal(dw, torch.zeros(16, device=DEVICE))


@needs_cuda
@pytest.mark.parametrize("shape", [(1, 1), (9, 129), (4, 33, 896), (64, 1536)])
def test_rms_norm_bf16_matches_reference_cuda(shape):
    check_against_reference(shape, torch.bfloat16, seed=1)
    check_against_reference(shape, torch.bfloat16, torch.float32, seed=2)


# --------------------------------------------------------------------------------------------------
# dispatch and errors
# --------------------------------------------------------------------------------------------------


def test_rms_norm_dispatch_default_and_forced(monkeypatch):
    x, w, _ = make_inputs((3, 8))
    calls = count_calls(monkeypatch, rn, "rms_norm_fwd")
    want = rms_norm_ref(x, w, EPS)
    expected = default_backend(DEVICE)
    assert rms_norm_backend(x, w) == expected
    rms_norm(x, w, EPS)
    assert len(calls) == (1 if expected == "triton" else 0)
    with force_backend("rms_norm", "reference"):
        assert torch.equal(rms_norm(x, w, EPS), want)
    monkeypatch.setenv(env_var("rms_norm"), "reference")
    calls.clear()
    rms_norm(x, w, EPS)
    assert calls == [] and rms_norm_backend(x, w) == "reference"
    if triton_runs_on(DEVICE):
        monkeypatch.setenv(env_var("rms_norm"), "triton")
        torch.testing.assert_close(rms_norm(x, w, EPS), want, rtol=1e-6, atol=1e-6)
        assert calls == [1]
        # A forced backend that cannot run raises instead of silently measuring another one.
        with pytest.raises(RuntimeError, match="forced"):
            rms_norm(x.double(), w.double(), EPS)
    monkeypatch.setenv(env_var("rms_norm"), "cuda_magic")
    with pytest.raises(ValueError, match="unknown rms_norm backend"):
        rms_norm(x, w, EPS)


def test_rms_norm_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"weight \[H\]"):
        rms_norm(torch.randn(4, 8), torch.ones(7))
    with pytest.raises(ValueError, match=r"weight \[H\]"):
        rms_norm(torch.randn(4, 8), torch.ones(1, 8))
    with pytest.raises(TypeError, match="floating point"):
        rms_norm(torch.ones(4, 8, dtype=torch.int64), torch.ones(8))


def test_rms_norm_rows_wider_than_max_hidden_take_the_reference(monkeypatch):
    # MAX_HIDDEN is where the row-in-registers kernels stop spilling on sm_90 (tests/test_hopper_compile.py
    # compiles it): wider rows never reach them.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, rn.MAX_HIDDEN + 16)
    w = torch.randn(rn.MAX_HIDDEN + 16)
    monkeypatch.setattr(rn, "triton_usable", lambda *args: True)
    assert not rn._triton_available(x, w)
    assert rn._triton_available(x[:, : rn.MAX_HIDDEN], w[: rn.MAX_HIDDEN])
    if rn.triton is not None:
        with pytest.raises(ValueError, match=f"> {rn.MAX_HIDDEN}"):
            rn.rms_norm_fwd(x, w, 1e-6)
