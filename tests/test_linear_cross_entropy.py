"""Fused lm-head + cross-entropy: every backend against the reference, gradients included.

The Triton kernel runs in the interpreter on a CPU (tests/conftest.py sets TRITON_INTERPRET=1) in fp32
and fp16; bf16 through Triton runs on CUDA only (the interpreter rounds fp32 -> bf16 toward zero), the
chunked PyTorch path is checked in bf16 on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import assert_error_within_twice_torch, max_abs_error, needs_cuda
from torch.utils._python_dispatch import TorchDispatchMode

import soulchat.kernels.linear_cross_entropy as lce
from soulchat.kernels.dispatch import force_backend
from soulchat.kernels.linear_cross_entropy import (
    LOGITS_CHUNK_BYTES,
    check_target_range,
    chunk_rows,
    linear_cross_entropy,
    linear_cross_entropy_fwd,
    linear_cross_entropy_ref,
    logits_chunk_bytes,
)

BACKENDS = ["triton", "chunked"]


def make_inputs(n, h, v, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / math.sqrt(h) * 3
    targets = torch.randint(0, v, (n,), generator=g)
    token_weight = torch.rand(n, generator=g, dtype=torch.float32) + 0.1
    if n > 2:
        token_weight[1] = 0.0  # a zero weight: contributes nothing, not even gradient
        token_weight[2] = 3.0
    return (
        hidden.to(device=device, dtype=dtype),
        weight.to(device=device, dtype=dtype),
        targets.to(device),
        token_weight.to(device),
    )


def loss_and_grads(fn, hidden, weight, scale=0.37):
    """Run fn(hidden, weight) -> loss, backprop ``scale * loss``; return (loss, d_hidden, d_weight)."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = fn(hidden, weight)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def run(
    backend,
    hidden,
    weight,
    targets,
    token_weight,
    softcap=None,
    z_loss=0.0,
    chunk_size=None,
    logit_scale=1.0,
    check_targets=None,
):
    options = {"logit_scale": logit_scale, "chunk_size": chunk_size, "check_targets": check_targets}
    with force_backend("loss", backend):
        return loss_and_grads(
            lambda h, w: linear_cross_entropy(h, w, targets, token_weight, softcap, z_loss, **options),
            hidden,
            weight,
        )


def run_ref(hidden, weight, targets, token_weight, softcap=None, z_loss=0.0, logit_scale=1.0):
    return loss_and_grads(
        lambda h, w: linear_cross_entropy_ref(
            h, w, targets, token_weight, softcap, z_loss, logit_scale=logit_scale
        ),
        hidden,
        weight,
    )


def assert_close(got, want, rtol=1e-4, atol=1e-5):
    for g, w, name in zip(got, want, ("loss", "d_hidden", "d_weight")):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------------
# the reference itself
# --------------------------------------------------------------------------------------------------


def test_reference_matches_formula_fp64():
    hidden, weight, targets, tw = make_inputs(9, 8, 50, torch.float64)
    softcap, z = 2.5, 1e-2
    s = softcap * torch.tanh(hidden @ weight.T / softcap)
    lse = torch.logsumexp(s, -1)
    want = (tw.double() * (lse - s[torch.arange(9), targets] + z * lse**2)).sum()
    got = linear_cross_entropy_ref(hidden, weight, targets, tw, softcap, z)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_logit_scale_multiplies_the_logits_before_the_softcap_fp64():
    hidden, weight, targets, tw = make_inputs(9, 8, 50, torch.float64)
    softcap, z, scale = 2.5, 1e-2, 0.0625  # cohere's logit_scale
    s = softcap * torch.tanh(scale * (hidden @ weight.T) / softcap)
    lse = torch.logsumexp(s, -1)
    want = (tw.double() * (lse - s[torch.arange(9), targets] + z * lse**2)).sum()
    got = linear_cross_entropy_ref(hidden, weight, targets, tw, softcap, z, logit_scale=scale)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # without a softcap, scaling the logits is scaling the hidden states
    torch.testing.assert_close(
        linear_cross_entropy_ref(hidden, weight, targets, tw, logit_scale=scale),
        linear_cross_entropy_ref(hidden * scale, weight, targets, tw),
        rtol=1e-12,
        atol=1e-12,
    )


# --------------------------------------------------------------------------------------------------
# fp32 against the reference: odd vocab sizes, softcap / z-loss, several chunks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n, v, softcap, z_loss, chunk_size, logit_scale",
    [
        (13, 1000, None, 0.0, None, 1.0),  # one chunk, one masked vocab block
        (13, 257, 4.0, 0.0, 4, 1.0),  # softcap, 4 chunks (last one short)
        (10, 1000, None, 1e-3, 3, 1.0),  # z-loss, 4 chunks
        (6, 5000, 6.0, 1e-2, 5, 1.0),  # both; V=5000 spans two 4096-wide blocks, the second masked
        (1, 257, 3.0, 1e-3, None, 1.0),  # N = 1
        (13, 1000, None, 0.0, 4, 1 / 8.0),  # granite: logits / logits_scaling
        (10, 257, 4.0, 1e-3, 3, 2.5),  # a scale > 1 together with the softcap and z-loss
        (6, 5000, 6.0, 0.0, None, 0.0625),  # cohere's logit_scale with a softcap, two vocab blocks
    ],
)
def test_linear_cross_entropy_fp32_matches_reference(backend, n, v, softcap, z_loss, chunk_size, logit_scale):
    hidden, weight, targets, tw = make_inputs(n, 16, v, seed=n + v)
    got = run(backend, hidden, weight, targets, tw, softcap, z_loss, chunk_size, logit_scale)
    want = run_ref(hidden, weight, targets, tw, softcap, z_loss, logit_scale)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    assert_close(got, want)


def test_kernel_online_lse_across_many_masked_blocks():
    """BLOCK_V = 128 over V = 1000: 8 blocks, the last one 104 wide; loss and dlogits vs the reference."""
    hidden, weight, targets, tw = make_inputs(7, 16, 1000, seed=3)
    for softcap, z, a in ((None, 0.0, 1.0), (5.0, 1e-2, 1.0), (5.0, 1e-2, 3.0)):
        loss, d_h, d_w = linear_cross_entropy_fwd(
            hidden,
            weight,
            targets,
            tw,
            softcap,
            z,
            logit_scale=a,
            backend="triton",
            chunk_size=3,
            block_v=128,
        )
        want = loss_and_grads(
            lambda h, w: linear_cross_entropy_ref(h, w, targets, tw, softcap, z, logit_scale=a),
            hidden,
            weight,
            scale=1.0,
        )
        assert_close((loss, d_h, d_w), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_gives_the_same_result_as_one_chunk(backend):
    hidden, weight, targets, tw = make_inputs(11, 8, 300, seed=5)
    one = run(backend, hidden, weight, targets, tw, 3.0, 1e-3, chunk_size=None)
    for chunk in (1, 2, 4, 10):
        assert_close(run(backend, hidden, weight, targets, tw, 3.0, 1e-3, chunk_size=chunk), one, 1e-5, 1e-6)


# --------------------------------------------------------------------------------------------------
# low precision: bounded by what plain PyTorch gets in the same dtype (vs an fp64 truth)
# --------------------------------------------------------------------------------------------------


def torch_same_dtype(hidden, weight, targets, tw, softcap, z_loss, logit_scale=1.0):
    # The usual path: logits in the input dtype, loss math in fp32.
    logits = (hidden @ weight.T).float() * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    per_token = F.cross_entropy(logits, targets, reduction="none")
    return (tw * (per_token + z_loss * torch.logsumexp(logits, -1) ** 2)).sum()


def check_relative_error(
    backend, dtype, n, h, v, softcap, z_loss, device="cpu", seed=0, scale=1.0, logit_scale=1.0
):
    """err(ours) <= 2 * err(torch in dtype) + tiny, all against an fp64 truth.

    With scale != 1 (grad_output != 1) our gradients, made in the forward and rounded to ``dtype``, are
    rounded once more when scaled in the backward: the bound then allows one extra unit roundoff of
    the largest gradient. (The trainer avoids it by folding its normaliser into token_weight.)
    """
    hidden, weight, targets, tw = make_inputs(n, h, v, dtype, seed=seed, device=device)
    truth = loss_and_grads(
        lambda a, b: linear_cross_entropy_ref(a, b, targets, tw, softcap, z_loss, logit_scale=logit_scale),
        hidden.double(),
        weight.double(),
        scale,
    )
    base = loss_and_grads(
        lambda a, b: torch_same_dtype(a, b, targets, tw, softcap, z_loss, logit_scale), hidden, weight, scale
    )
    with force_backend("loss", backend):
        got = loss_and_grads(
            lambda a, b: linear_cross_entropy(a, b, targets, tw, softcap, z_loss, logit_scale=logit_scale),
            hidden,
            weight,
            scale,
        )
    assert got[1].dtype == dtype and got[2].dtype == dtype
    unit_roundoff = torch.finfo(dtype).eps / 2
    for i, (g, b, t, name) in enumerate(zip(got, base, truth, ("loss", "d_hidden", "d_weight"))):
        tiny = 1e-6 * t.abs().max().item() + 1e-9
        if i > 0 and scale != 1.0:
            tiny += unit_roundoff * t.abs().max().item()
        assert_error_within_twice_torch(f"{name} ({dtype})", max_abs_error(g, t), max_abs_error(b, t), tiny)


@pytest.mark.parametrize(
    "softcap, z_loss, logit_scale", [(None, 0.0, 1.0), (20.0, 1e-3, 1.0), (20.0, 1e-3, 4.0)]
)
def test_fp16_error_within_twice_torch(softcap, z_loss, logit_scale):
    check_relative_error(
        "triton", torch.float16, 48, 32, 1000, softcap, z_loss, seed=1, logit_scale=logit_scale
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp16_scaled_backward_error_bounded(seed):
    check_relative_error("triton", torch.float16, 48, 32, 1000, 20.0, 1e-3, seed=seed, scale=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("logit_scale", [1.0, 0.25])
def test_chunked_backend_low_precision_error_within_twice_torch(dtype, logit_scale):
    # bf16 through Triton is checked on CUDA only: the triton 3.9 interpreter converts fp32 -> bf16 by
    # truncation (round toward zero, even with fp_downcast_rounding="rtne"), which a GPU does not.
    check_relative_error("chunked", dtype, 48, 32, 1000, 20.0, 1e-3, seed=2, logit_scale=logit_scale)


@needs_cuda
@pytest.mark.parametrize(
    "softcap, z_loss, logit_scale", [(None, 0.0, 1.0), (30.0, 1e-4, 1.0), (30.0, 1e-4, 0.0625)]
)
def test_bf16_cuda_error_within_twice_torch(softcap, z_loss, logit_scale):
    check_relative_error(
        "triton", torch.bfloat16, 300, 256, 32003, softcap, z_loss, device="cuda", logit_scale=logit_scale
    )


@needs_cuda
def test_bf16_cuda_scaled_backward_and_chunks_bounded():
    check_relative_error("triton", torch.bfloat16, 300, 256, 32003, 30.0, 1e-4, device="cuda", scale=1e-3)


# --------------------------------------------------------------------------------------------------
# autocast: bf16/fp16 GEMM operands, fp32 accumulation; the folded normaliser; fp32 d_weight sums
# --------------------------------------------------------------------------------------------------


class _RecordGemmDtypes(TorchDispatchMode):
    """Records the dtypes of the two matrix operands of every mm / addmm that runs."""

    GEMMS = frozenset({"aten.mm.default", "aten.mm.out", "aten.addmm.default", "aten.addmm_.default",
             "aten.addmm.out", "aten.addmm.dtype", "aten.addmm.dtype_out"})  # fmt: skip

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in self.GEMMS:
            a, b = (args[0], args[1]) if name.startswith("aten.mm") else (args[1], args[2])
            self.seen.append((name, a.dtype, b.dtype))
        return func(*args, **(kwargs or {}))


def torch_autocast_loss(hidden, weight, targets, tw, softcap, z_loss, logit_scale=1.0):
    """What plain PyTorch does under autocast: F.linear in the autocast dtype, the loss in fp32."""
    logits = F.linear(hidden, weight).float() * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    per_token = F.cross_entropy(logits, targets, reduction="none")
    return (tw * (per_token + z_loss * torch.logsumexp(logits, -1) ** 2)).sum()


def check_autocast(backend, autocast_dtype, n, h, v, device="cpu", chunk_size=None, logit_scale=1.0):
    """fp32 master hidden/weight under autocast: every GEMM's operands are in the autocast dtype, the
    gradients come back fp32, and loss and gradients are within twice torch's autocast error of the
    fp64 truth (on the unrounded fp32 inputs)."""
    softcap, z_loss = 20.0, 1e-3
    hidden, weight, targets, tw = make_inputs(n, h, v, torch.float32, seed=n, device=device)
    truth = loss_and_grads(
        lambda a, b: linear_cross_entropy_ref(a, b, targets, tw, softcap, z_loss, logit_scale=logit_scale),
        hidden.double(),
        weight.double(),
        1.0,
    )
    with torch.autocast(device_type=device, dtype=autocast_dtype):
        base = loss_and_grads(
            lambda a, b: torch_autocast_loss(a, b, targets, tw, softcap, z_loss, logit_scale),
            hidden,
            weight,
            1.0,
        )
        with force_backend("loss", backend), _RecordGemmDtypes() as probe:
            got = loss_and_grads(
                lambda a, b: linear_cross_entropy(
                    a, b, targets, tw, softcap, z_loss, logit_scale=logit_scale, chunk_size=chunk_size
                ),
                hidden,
                weight,
                1.0,
            )
    n_chunks = math.ceil(n / chunk_size) if chunk_size else 1
    assert len(probe.seen) >= 3 * n_chunks, probe.seen  # logits, d_hidden, d_weight per chunk
    assert all(a == b == autocast_dtype for _, a, b in probe.seen), probe.seen
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for g, b, t, name in zip(got, base, truth, ("loss", "d_hidden", "d_weight")):
        tiny = 1e-6 * t.abs().max().item() + 1e-9
        assert_error_within_twice_torch(
            f"{name} ({autocast_dtype} autocast)", max_abs_error(g, t), max_abs_error(b, t), tiny
        )


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_autocast_bf16_gemms_run_in_bf16_within_the_bf16_bound(chunk_size):
    check_autocast("chunked", torch.bfloat16, 40, 32, 1000, chunk_size=chunk_size, logit_scale=0.5)


def test_autocast_fp16_triton_gemms_run_in_fp16_within_the_fp16_bound():
    check_autocast("triton", torch.float16, 40, 32, 1000, chunk_size=16)


def test_reference_backend_follows_autocast_too():
    """The reference sees the operands rounded to the autocast dtype, like the fused backends."""
    hidden, weight, targets, tw = make_inputs(12, 16, 300, torch.float32, seed=3)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        with force_backend("loss", "reference"):
            ref = linear_cross_entropy(hidden, weight, targets, tw, 5.0)
        with force_backend("loss", "chunked"):
            chunked = linear_cross_entropy(hidden, weight, targets, tw, 5.0)
    rounded = linear_cross_entropy_ref(hidden.bfloat16(), weight.bfloat16(), targets, tw, 5.0)
    assert ref.dtype == torch.float32
    torch.testing.assert_close(ref, rounded.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked, ref, rtol=1e-3, atol=1e-3)  # bf16 dlogits/logit rounding only


@pytest.mark.parametrize("backend", BACKENDS)
def test_normaliser_folded_into_token_weights_gives_the_normalised_gradient(backend):
    """``loss(h, w, t, lw / total)`` backpropagated as is == ``loss(h, w, t, lw) / total``: in fp32
    to rounding, and in fp16 within twice torch's error with no allowance for a rounded scale."""
    hidden, weight, targets, tw = make_inputs(30, 16, 500, seed=8)
    total = float(tw.sum()) * 3.7  # any normaliser (the global weight sum of a step over ranks)
    folded = run(backend, hidden, weight, targets, tw / total, 4.0, 1e-3, chunk_size=7)
    with force_backend("loss", backend):
        divided = loss_and_grads(
            lambda h, w: linear_cross_entropy(h, w, targets, tw, 4.0, 1e-3, chunk_size=7) / total,
            hidden,
            weight,
            scale=1.0,
        )
    folded_loss = folded[0] * 0.37  # run() backpropagated 0.37 * loss: undo for the comparison
    assert_close((folded_loss / 0.37, folded[1] / 0.37, folded[2] / 0.37), divided, rtol=1e-5, atol=1e-7)
    h16, w16 = hidden.half(), weight.half()
    truth = loss_and_grads(
        lambda a, b: linear_cross_entropy_ref(a, b, targets, tw, 4.0, 1e-3) / total,
        h16.double(),
        w16.double(),
        1.0,
    )
    base = loss_and_grads(lambda a, b: torch_same_dtype(a, b, targets, tw / total, 4.0, 1e-3), h16, w16, 1.0)
    with force_backend("loss", backend):
        got = loss_and_grads(
            lambda a, b: linear_cross_entropy(a, b, targets, tw / total, 4.0, 1e-3), h16, w16, 1.0
        )
    for g, b, t, name in zip(got, base, truth, ("loss", "d_hidden", "d_weight")):
        tiny = 1e-6 * t.abs().max().item() + 1e-12
        assert_error_within_twice_torch(
            f"{name} (fp16, folded)", max_abs_error(g, t), max_abs_error(b, t), tiny
        )


class _RecordTensorDtypes(TorchDispatchMode):
    """Records (shape, dtype) of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[tuple[int, ...], torch.dtype]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.add((tuple(t.shape), t.dtype))
        return out


@pytest.mark.parametrize("grad_weight_dtype", [None, torch.float32])
def test_grad_weight_dtype_sums_bf16_chunks_in_fp32(grad_weight_dtype):
    """bf16 weights over 256 one-row chunks: with grad_weight_dtype=fp32 the [V, H] sum is fp32 (seen
    as an fp32 [V, H] tensor), d_weight still bf16, and closer to the truth than bf16 summing, which
    rounds 256 times (the rest of the error is the bf16 dlogits both share)."""
    n, h, v = 256, 16, 200
    hidden, weight, targets, tw = make_inputs(n, h, v, torch.bfloat16, seed=4)
    truth = loss_and_grads(
        lambda a, b: linear_cross_entropy_ref(a, b, targets, tw), hidden.double(), weight.double(), 1.0
    )

    def ours(dtype, chunk_size=1):
        with force_backend("loss", "chunked"):
            return loss_and_grads(
                lambda a, b: linear_cross_entropy(
                    a, b, targets, tw, chunk_size=chunk_size, grad_weight_dtype=dtype
                ),
                hidden,
                weight,
                1.0,
            )

    with _RecordTensorDtypes() as rec:
        small = ours(grad_weight_dtype, chunk_size=128)  # two chunks are enough to see the accumulator
    assert small[2].dtype == torch.bfloat16
    assert (((v, h), torch.float32) in rec.seen) == (grad_weight_dtype is torch.float32)
    if grad_weight_dtype is torch.float32:
        mean_error = lambda g: (g.double() - truth[2]).abs().mean().item()
        # measured: 2.6e-3 (fp32 sum) vs 5.4e-3 (bf16 sum)
        assert mean_error(ours(torch.float32)[2]) < 0.7 * mean_error(ours(None)[2])


def test_grad_weight_dtype_must_be_floating():
    hidden, weight, targets, tw = make_inputs(4, 8, 50)
    with pytest.raises(TypeError, match="grad_weight_dtype must be a floating dtype"):
        linear_cross_entropy(hidden, weight, targets, tw, grad_weight_dtype=torch.int32)


@needs_cuda
def test_bf16_autocast_fp32_master_weights_at_qwen_vocab_cuda():
    """V = 151,936 (Qwen2.5) in bf16 under autocast with fp32 master weights: bf16 GEMMs, fp32
    gradients, within twice torch autocast's error of the fp64 truth; several chunks."""
    check_autocast("triton", torch.bfloat16, 1200, 896, 151936, device="cuda", chunk_size=500)


@needs_cuda
def test_fp32_grad_weight_sums_straight_from_cublas_cuda():
    """CUDA torch >= 2.8 adds bf16 GEMM products into an fp32 accumulator directly (addmm out_dtype);
    without it each chunk would need a [V, H] bf16 temporary (1.1 GB at V=151,936, H=3,584)."""
    assert lce._gemm_accumulates_into_fp32("cuda", torch.bfloat16)
    assert lce._gemm_accumulates_into_fp32("cuda", torch.float16)
    assert not lce._gemm_accumulates_into_fp32("cpu", torch.bfloat16)
    hidden, weight, targets, tw = make_inputs(64, 32, 1000, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), _RecordGemmDtypes() as probe:
        loss_and_grads(lambda a, b: linear_cross_entropy(a, b, targets, tw, chunk_size=16), hidden, weight)
    assert sum(name == "aten.addmm.dtype_out" for name, _, _ in probe.seen) == 4, probe.seen


@needs_cuda
def test_cuda_call_does_not_sync_and_bad_targets_poison_not_crash():
    hidden, weight, targets, tw = make_inputs(64, 32, 1000, device="cuda")
    hidden.requires_grad_()
    weight.requires_grad_()
    with force_backend("loss", "triton"), torch.autocast("cuda", dtype=torch.bfloat16):
        linear_cross_entropy(hidden, weight, targets, tw).backward()  # warm-up: compile, probe once
        torch.cuda.synchronize()
        bad = targets.clone()
        bad[5] = 1000
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = linear_cross_entropy(hidden, weight, bad, tw)  # no host check of CUDA targets: no sync
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isnan(loss) and torch.isnan(weight.grad).any() and torch.isnan(hidden.grad[5]).all()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_cross_entropy(hidden, weight, bad, tw, check_targets=True)


# --------------------------------------------------------------------------------------------------
# edge cases: N = 0, zero weights, what never enters
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_empty_input_gives_zero_loss_and_zero_gradients(backend):
    hidden, weight, targets, tw = make_inputs(0, 8, 100)
    loss, d_h, d_w = run(backend, hidden, weight, targets, tw, 3.0, 1e-3)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and loss.item() == 0.0
    assert d_h.shape == (0, 8)
    assert d_w.shape == (100, 8) and not d_w.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_tokens_contribute_nothing(backend):
    hidden, weight, targets, tw = make_inputs(8, 16, 257, seed=7)
    tw = tw.clone()
    tw[[0, 5]] = 0.0
    loss, d_h, d_w = run(backend, hidden, weight, targets, tw, 4.0, 1e-2)
    assert not d_h[[0, 5]].any()  # exactly zero rows
    keep = torch.tensor([1, 2, 3, 4, 6, 7])
    sub = run(backend, hidden[keep], weight, targets[keep], tw[keep], 4.0, 1e-2)
    assert_close((loss, d_h[keep], d_w), sub, 1e-5, 1e-6)


def test_only_trained_positions_enter_the_loss():
    """A packed row of T tokens, labels -100 except on counselor tokens: the caller gathers hidden at
    loss_index, so non-trained positions get exactly zero gradient and cannot change the loss."""
    g = torch.Generator().manual_seed(11)
    t_len, h, v = 24, 8, 97
    labels = torch.full((t_len,), -100)
    trained = torch.tensor([3, 4, 5, 12, 13, 20])
    labels[trained] = torch.randint(0, v, (len(trained),), generator=g)
    loss_index = (labels != -100).nonzero().squeeze(1)
    loss_weight = torch.rand(len(loss_index), generator=g)
    weight = torch.randn(v, h, generator=g)

    def loss_of(hidden_row):
        hidden_row = hidden_row.clone().requires_grad_()
        with force_backend("loss", "triton"):
            loss = linear_cross_entropy(hidden_row[loss_index], weight, labels[loss_index], loss_weight)
        loss.backward()
        return loss.detach(), hidden_row.grad

    row = torch.randn(t_len, h, generator=g)
    loss, grad = loss_of(row)
    untrained = torch.ones(t_len, dtype=torch.bool)
    untrained[trained] = False
    assert not grad[untrained].any() and grad[trained].abs().sum(1).gt(0).all()
    perturbed = row.clone()
    perturbed[untrained] += 100.0 * torch.randn(int(untrained.sum()), h, generator=g)
    assert torch.equal(loss_of(perturbed)[0], loss)


# --------------------------------------------------------------------------------------------------
# memory: no [N, V] buffer beyond one chunk
# --------------------------------------------------------------------------------------------------


def test_chunk_rows_respects_the_budget():
    for n, v, size in [(8192, 151936, 2), (8192, 151936, 4), (100, 32000, 2), (5, 10**9, 2), (7, 3, 4)]:
        rows = chunk_rows(n, v, size)
        assert 1 <= rows <= n
        assert rows == 1 or rows * v * size <= LOGITS_CHUNK_BYTES
        # balanced: every chunk but the last is `rows`, and the last is not much shorter
        n_chunks = math.ceil(n / rows)
        assert n - (n_chunks - 1) * rows > rows - n_chunks
    assert chunk_rows(0, 1000, 2) == 0
    assert chunk_rows(10, 1000, 4, budget_bytes=4000 * 3) == 3  # 4 chunks of <= 3 rows
    # The CPU budget is smaller than the CUDA one, so CPU chunks are never larger.
    assert logits_chunk_bytes(torch.device("cpu")) <= logits_chunk_bytes(torch.device("cuda"))
    assert logits_chunk_bytes(torch.device("cuda")) == LOGITS_CHUNK_BYTES


class _RecordTensors(TorchDispatchMode):
    """Records (op, shape, bytes) of every tensor any aten op returns, views included."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), tuple(t.shape), t.numel() * t.element_size()))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_logits_buffer_larger_than_a_chunk(backend):
    n, h, v, chunk = 40, 16, 600, 6
    hidden, weight, targets, tw = make_inputs(n, h, v)
    hidden.requires_grad_()
    weight.requires_grad_()
    with force_backend("loss", backend), _RecordTensors() as rec:
        loss = linear_cross_entropy(hidden, weight, targets, tw, 3.0, 1e-3, chunk_size=chunk)
        loss.backward()
    # The full logits would be n * v * 4 = 96,000 bytes. The biggest tensors allowed: a [chunk, V]
    # chunk (fp32 here; the chunked backend's temporaries are fp32 too) and the [V, H] weight gradient.
    limit = max(chunk * v * 4, v * h * 4)
    assert limit < n * v * 4
    biggest = max(rec.seen, key=lambda r: r[2])
    assert biggest[2] <= limit, biggest
    assert any(shape == (chunk, v) for _, shape, _ in rec.seen)  # the chunk really went through torch


# --------------------------------------------------------------------------------------------------
# dispatch, errors, autograd behaviour
# --------------------------------------------------------------------------------------------------


def test_dispatch_defaults_and_forcing(monkeypatch):
    hidden, weight, targets, tw = make_inputs(5, 8, 64)
    calls = []
    for name in ("triton", "chunked"):
        real = lce._ROW_FNS[name]
        spy = lambda *a, _n=name, _f=real, **k: (calls.append(_n), _f(*a, **k))
        monkeypatch.setitem(lce._ROW_FNS, name, spy)
    real_ref = lce.linear_cross_entropy_ref
    spy_ref = lambda *a, **k: (calls.append("reference"), real_ref(*a, **k))[1]
    monkeypatch.setattr(lce, "linear_cross_entropy_ref", spy_ref)

    linear_cross_entropy(hidden, weight, targets, tw)  # CPU: the interpreter is never the default
    assert calls == ["chunked"]
    for name in ("triton", "chunked", "reference"):
        calls.clear()
        with force_backend("loss", name):
            linear_cross_entropy(hidden, weight, targets, tw)
        assert calls == [name]
    calls.clear()
    monkeypatch.setenv("SOULCHAT_LOSS_BACKEND", "reference")
    linear_cross_entropy(hidden, weight, targets, tw)
    assert calls == ["reference"]
    monkeypatch.setenv("SOULCHAT_LOSS_BACKEND", "cublas")
    with pytest.raises(ValueError, match="unknown loss backend"):
        linear_cross_entropy(hidden, weight, targets, tw)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("bad", [-1, 64, -100])
def test_out_of_range_targets_raise(backend, bad):
    hidden, weight, targets, tw = make_inputs(5, 8, 64)
    targets = targets.clone()
    targets[3] = bad
    with force_backend("loss", backend), pytest.raises(ValueError, match=r"outside the vocabulary \[0, 64\)"):
        linear_cross_entropy(hidden, weight, targets, tw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-100, 64, 10**6])
def test_unchecked_out_of_range_target_is_nan_not_a_crash(backend, bad):
    """What CUDA targets get by default (no host check there): NaN loss, NaN gradients for the row and
    d_weight, never an out-of-bounds read; the other rows' d_hidden stay right."""
    hidden, weight, targets, tw = make_inputs(5, 8, 64)
    targets = targets.clone()
    targets[3] = bad
    loss, d_h, d_w = run(backend, hidden, weight, targets, tw, check_targets=False)
    assert torch.isnan(loss) and torch.isnan(d_h[3]).all() and torch.isnan(d_w).any()
    keep = torch.tensor([0, 1, 2, 4])
    want = run_ref(hidden[keep], weight, targets[keep], tw[keep])
    torch.testing.assert_close(d_h[keep], want[1], rtol=1e-4, atol=1e-5)


def test_check_target_range_on_host_tensors():
    check_target_range(torch.tensor([0, 5, 63]), 64)
    with pytest.raises(ValueError, match=r"2 target\(s\) outside the vocabulary \[0, 64\), e.g. 64"):
        check_target_range(torch.tensor([0, 64, 3, -1]), 64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logit_scale_raises(bad):
    hidden, weight, targets, tw = make_inputs(5, 8, 64)
    with pytest.raises(ValueError, match="logit_scale must be a finite number"):
        linear_cross_entropy(hidden, weight, targets, tw, logit_scale=bad)


def test_bad_shapes_raise():
    hidden, weight, targets, tw = make_inputs(5, 8, 64)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        linear_cross_entropy(hidden, weight[:, :4], targets, tw)
    with pytest.raises(ValueError, match=r"must be \[N=5\]"):
        linear_cross_entropy(hidden, weight, targets[:4], tw)
    with pytest.raises(ValueError, match=r"gather the hidden states"):
        linear_cross_entropy(hidden[None], weight, targets, tw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_and_no_grad(backend, monkeypatch):
    hidden, weight, targets, tw = make_inputs(6, 8, 100, seed=4)
    want = run_ref(hidden, weight, targets, tw)
    seen = []
    real = lce.linear_cross_entropy_fwd

    def spy(*a, **k):
        seen.append((k["grad_hidden"], k["grad_weight"]))
        return real(*a, **k)

    monkeypatch.setattr(lce, "linear_cross_entropy_fwd", spy)
    with force_backend("loss", backend):
        h = hidden.clone().requires_grad_()
        (linear_cross_entropy(h, weight, targets, tw) * 0.37).backward()  # frozen lm-head
        torch.testing.assert_close(h.grad, want[1], rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            loss = linear_cross_entropy(hidden.requires_grad_(), weight.requires_grad_(), targets, tw)
        torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=1e-5)
    assert seen == [(True, False), (False, False)]


def test_mixed_dtypes_cast_weight_to_hidden_dtype():
    hidden, weight, targets, tw = make_inputs(6, 8, 100, seed=9)
    got = loss_and_grads(
        lambda h, w: linear_cross_entropy(h.half(), w, targets, tw), hidden.half().float(), weight
    )
    assert got[2].dtype == torch.float32  # the fp32 master weight gets an fp32 gradient
    want = run_ref(hidden.half().float(), weight.half().float(), targets, tw)
    assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_backward_twice_raises():
    hidden, weight, targets, tw = make_inputs(4, 8, 50)
    hidden.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, targets, tw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


# ----------------------------------------------------------------------------------------------------
# The lm-head's cast to the GEMM dtype: once per weight_cast_scope (an optimizer step), never stale
# ----------------------------------------------------------------------------------------------------


def test_linear_cross_entropy_weight_cast_once_per_scope(monkeypatch):
    hidden, weight, targets, tw = make_inputs(6, 8, 40)
    weight = weight.float().requires_grad_()
    casts = []
    real_cast = lce._cast_weight
    monkeypatch.setattr(lce, "_cast_weight", lambda w, d: casts.append(d) or real_cast(w, d))

    def micro_batches(n=3):
        grads = []
        for _ in range(n):
            h = hidden.float().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16), force_backend("loss", "chunked"):
                linear_cross_entropy(h, weight, targets, tw).backward()
            grads.append(h.grad)
        return grads

    unscoped = micro_batches()
    assert casts == [torch.bfloat16] * 3  # no scope: one copy per call, as before
    casts.clear()
    weight.grad = None
    with lce.weight_cast_scope():
        scoped = micro_batches()
    assert casts == [torch.bfloat16]  # one copy for the three micro-batches
    assert all(torch.equal(a, b) for a, b in zip(unscoped, scoped))
    assert lce._cast_slot is None  # the copy is released when the scope closes

    # An in-place update inside the scope (the optimizer step) makes a fresh copy, never a stale one.
    casts.clear()
    with lce.weight_cast_scope():
        micro_batches(1)
        with torch.no_grad():
            weight.mul_(0.5)
        (after,) = micro_batches(1)
    assert casts == [torch.bfloat16, torch.bfloat16]
    (fresh,) = micro_batches(1)
    assert torch.equal(after, fresh)
