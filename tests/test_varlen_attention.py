"""varlen_attention: every backend against the per-conversation reference.

Without CUDA the Triton kernels run in the interpreter (tests/conftest.py), which is slow: shapes are
small on purpose (tens to a few hundred tokens, 1-4 heads). bf16 runs only on CUDA: the triton 3.9
interpreter computes bf16 tl.dot wrongly.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_checks import assert_error_within_twice_torch, max_abs_error, outputs_and_grads

from soulchat.kernels import varlen_attention as va
from soulchat.kernels.dispatch import env_var, force_backend, triton_runs_on
from soulchat.kernels.varlen_attention import varlen_attention, varlen_attention_backend, varlen_attention_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["flash", "torch_varlen", "triton", "reference"]

needs_triton = pytest.mark.skipif(
    va.triton is None or not triton_runs_on(DEVICE), reason="Triton needs CUDA or TRITON_INTERPRET=1"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _available(backend: str, q: torch.Tensor, window=None, softcap=None) -> bool:
    """Whether `backend` can run inputs like `q` here when forced (the dispatcher's own predicates)."""
    with force_backend("attention", backend):
        return va._backend_fits(backend, q, window, softcap)


def make_inputs(lens, num_q_heads, num_kv_heads, head_dim, dtype=torch.float32, seed=0):
    """Fresh random q, k, v, grad_out (never zeros) and cu_seqlens for conversations of `lens`."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)

    def rand(heads):
        return torch.randn(total, heads, head_dim, generator=gen).to(DEVICE, dtype)

    q, k, v, grad_out = rand(num_q_heads), rand(num_kv_heads), rand(num_kv_heads), rand(num_q_heads)
    cu_seqlens = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return q, k, v, grad_out, cu_seqlens, max(lens)


def run(backend, q, k, v, grad_out, cu_seqlens, max_seqlen, causal=True, window=None, softcap=None):
    """Output and (dq, dk, dv) of `backend` on fresh leaf copies of q, k, v."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    with force_backend("attention", backend):
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=causal, window=window, softcap=softcap)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return [out.detach(), *grads]


def hf_visible_keys(length, causal, window, device):
    """[L, L] boolean mask from Hugging Face's own mask functions (transformers.masking_utils), so the
    window's meaning is checked against the library the models come from, not restated here."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    if not causal:
        return torch.ones(length, length, dtype=torch.bool, device=device)
    mask_fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    positions = torch.arange(length, device=device)
    return mask_fn(0, 0, positions[:, None], positions[None, :])


def math_attention(q, k, v, cu_seqlens, causal=True, window=None, softcap=None):
    """Textbook attention in the inputs' dtype (scores, softmax and P@V all rounded to that dtype),
    one conversation at a time, with an explicit boolean mask and Gemma 2's eager soft-cap order
    (scale, then softcap * tanh(s / softcap), then the mask).

    This is "plain PyTorch in the same dtype" for the error bounds. CPU SDPA is not used for it: its
    fused fp16 kernel keeps P and dS in fp32, which no flash-style kernel does by design.
    """
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    bounds = cu_seqlens.tolist()
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1)
        ks = k[start:end].repeat_interleave(group, 1).transpose(0, 1)
        vs = v[start:end].repeat_interleave(group, 1).transpose(0, 1)
        scores = (qs * scale) @ ks.transpose(1, 2)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        visible = hf_visible_keys(end - start, causal, window, q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
        pieces.append((scores.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(pieces)


def assert_close_all(got, want, atol, rtol, names=("out", "dq", "dk", "dv")):
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


# Odd shapes on purpose: lengths 0 (an empty conversation), 1 and 2; 127/129 straddle block edges;
# many short plus one long; a single conversation; head dims 64, 80 (not a power of two), 96, 128;
# MHA, GQA (4 q heads on 2 kv heads) and MQA (1 kv head).
CASES = {
    "short_lengths_mqa": ([5, 1, 0, 2, 40], 2, 1, 64),
    "gqa_head_dim_80": ([33, 17], 4, 2, 80),
    "lengths_127_129": ([127, 129], 1, 1, 64),
    "many_short_one_long": ([3, 1, 4, 1, 5, 9, 2, 6, 70], 2, 2, 64),
    "single_conversation_d128": ([37], 2, 2, 128),
    "single_conversation_d96_mqa": ([21], 2, 1, 96),
}


# --------------------------------------------------------------------------------------------------
# Triton kernels vs the reference
# --------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_varlen_attention_triton_fp32_matches_reference(case):
    lens, hq, hkv, d = CASES[case]
    inputs = make_inputs(lens, hq, hkv, d, torch.float32, seed=len(case))
    got = run("triton", *inputs)
    want = run("reference", *inputs)
    assert_close_all(got, want, atol=1e-4, rtol=1e-4)


@needs_triton
def test_varlen_attention_triton_noncausal_matches_reference():
    inputs = make_inputs([19, 1, 45], 2, 1, 64, torch.float32, seed=7)
    got = run("triton", *inputs, causal=False)
    assert_close_all(got, run("reference", *inputs, causal=False), atol=1e-4, rtol=1e-4)


def _low_precision_errors(backend, lens, hq, hkv, d, dtype, seed, window=None, softcap=None):
    """Max abs errors of `backend` and of plain same-dtype PyTorch against an fp64 reference.

    All three see the same rounded inputs, so the errors measure the computation alone.
    """
    q, k, v, grad_out, cu_seqlens, max_seqlen = make_inputs(lens, hq, hkv, d, dtype, seed=seed)
    features = dict(window=window, softcap=softcap)
    exact = run("reference", *(x.double() for x in (q, k, v, grad_out)), cu_seqlens, max_seqlen, **features)
    got = run(backend, q, k, v, grad_out, cu_seqlens, max_seqlen, **features)
    plain = outputs_and_grads(
        lambda a, b, c: math_attention(a, b, c, cu_seqlens, **features), (q, k, v), grad_out
    )
    for a, b in zip(got, plain):
        assert a.dtype == dtype and b.dtype == dtype
    err_kernel = [max_abs_error(a, e) for a, e in zip(got, exact)]
    err_torch = [max_abs_error(b, e) for b, e in zip(plain, exact)]
    return err_kernel, err_torch


def _assert_error_bound(err_kernel, err_torch, tiny=1e-5):
    for name, ek, et in zip(("out", "dq", "dk", "dv"), err_kernel, err_torch):
        assert_error_within_twice_torch(name, ek, et, tiny)


@needs_triton
@pytest.mark.parametrize("case", ["short_lengths_mqa", "gqa_head_dim_80", "lengths_127_129"])
def test_varlen_attention_triton_fp16_error_bound(case):
    lens, hq, hkv, d = CASES[case]
    _assert_error_bound(*_low_precision_errors("triton", lens, hq, hkv, d, torch.float16, seed=3))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch_varlen", "flash"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["short_lengths_mqa", "gqa_head_dim_80", "many_short_one_long"])
def test_varlen_attention_cuda_low_precision_error_bound(backend, dtype, case):
    lens, hq, hkv, d = CASES[case]
    if not _available(backend, torch.empty(1, 1, d, dtype=dtype, device=DEVICE)):
        pytest.skip(f"{backend} cannot run {dtype} here (flash-attn missing, or an older GPU)")
    _assert_error_bound(*_low_precision_errors(backend, lens, hq, hkv, d, dtype, seed=11))


# Multi-block rows the interpreter cannot run in bf16: lengths 1, 300, 1000, 2049 in one row (every
# block kind: single-token, tails, many full blocks, 2049 = 2048 + 1), Qwen2.5-shaped GQA groups.
LONG_ROW = [1, 300, 1000, 2049]
LONG_ROW_FEATURES = {"plain": (None, None), "window": (256, None), "window_softcap": (512, 30.0)}


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("features", list(LONG_ROW_FEATURES))
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("heads", [(28, 4), (14, 2)], ids=["gqa_28_4", "gqa_14_2"])
@pytest.mark.parametrize("backend", ["triton", "torch_varlen", "flash"])
def test_varlen_attention_cuda_bf16_long_rows_error_bound(backend, heads, head_dim, features):
    window, softcap = LONG_ROW_FEATURES[features]
    probe = torch.empty(1, 1, head_dim, dtype=torch.bfloat16, device=DEVICE)
    if not _available(backend, probe, window, softcap):
        pytest.skip(f"{backend} cannot run bf16 D={head_dim} window={window} softcap={softcap} here")
    errors = _low_precision_errors(backend, LONG_ROW, *heads, head_dim, torch.bfloat16, 13, window, softcap)
    _assert_error_bound(*errors)


@needs_triton
@pytest.mark.parametrize("window, softcap", [(None, None), (5, 2.0)])
def test_varlen_attention_fwd_saves_logsumexp(window, softcap):
    q, k, v, _, cu_seqlens, max_seqlen = make_inputs([9, 30], 2, 1, 64, torch.float32, seed=5)
    scale = 0.125
    features = (window or 0, softcap or 0.0)  # the launcher's "none": 0 and 0.0
    out, lse = va.varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale, True, *features)
    assert lse.shape == (2, q.shape[0]) and lse.dtype == torch.float32
    # lse[h, t] = logsumexp over the (capped) scores of the keys t may see: its own conversation, up
    # to t, within the window.
    want = torch.empty_like(lse)
    for start, end in zip(cu_seqlens.tolist()[:-1], cu_seqlens.tolist()[1:]):
        ks = k[start:end].repeat_interleave(2, 1)
        scores = torch.einsum("ihd,jhd->hij", q[start:end], ks) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        visible = hf_visible_keys(end - start, True, window, q.device)
        want[:, start:end] = scores.masked_fill(~visible, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Sliding windows and soft-capping: the reference against Hugging Face's masks and Gemma 2's order
# --------------------------------------------------------------------------------------------------

# (lens, Hq, Hkv, D, window, softcap): windows of 1 (only itself), smaller than, equal to and larger
# than the conversations; lengths 1, 2, 127, 129 and many short plus one long.
FEATURE_CASES = {
    "window_1": ([1, 2, 9], 2, 1, 64, 1, None),
    "window_smaller": ([127, 1, 129], 2, 1, 64, 48, None),
    "window_equal_length": ([2, 40, 17], 2, 2, 64, 40, None),
    "window_larger": ([3, 1, 4, 1, 5, 9, 2, 6, 70], 4, 2, 80, 500, None),
    "softcap": ([1, 2, 33], 2, 1, 64, None, 5.0),
    "window_and_softcap": ([3, 1, 4, 1, 5, 9, 2, 6, 70], 2, 2, 64, 16, 2.0),
    # long enough for full (unmasked) blocks between the window's far edge and the diagonal
    "window_with_full_blocks": ([300, 5], 2, 1, 64, 100, None),
    "gqa_7_window_softcap": ([130, 3], 7, 1, 64, 33, 2.0),
}


def feature_inputs(case, dtype, seed=None):
    """Inputs of a FEATURE_CASES entry, q scaled so a cap of 2-5 actually bends the scores
    (|s| ~ 3-10 before the cap), and the case's window and softcap."""
    lens, hq, hkv, d, window, softcap = FEATURE_CASES[case]
    q, k, v, grad_out, cu_seqlens, max_seqlen = make_inputs(lens, hq, hkv, d, torch.float32, seed=len(case))
    q, k, v, grad_out = (x.to(dtype) for x in (q * 4, k, v, grad_out))
    return (q, k, v, grad_out, cu_seqlens, max_seqlen), dict(window=window, softcap=softcap)


@pytest.mark.parametrize("case", list(FEATURE_CASES))
def test_varlen_attention_reference_window_softcap_matches_hf_masks(case):
    inputs, features = feature_inputs(case, torch.float64)
    q, k, v, grad_out, cu_seqlens, max_seqlen = inputs
    got = run("reference", *inputs, **features)
    want = outputs_and_grads(
        lambda a, b, c: math_attention(a, b, c, cu_seqlens, **features), (q, k, v), grad_out
    )
    assert_close_all(got, want, atol=1e-10, rtol=1e-10)
    # and each feature changes the result (a silently ignored window or cap fails here)
    plain = run("reference", *inputs)
    window, softcap = features["window"], features["softcap"]
    if window is not None and window < max_seqlen or softcap is not None:
        assert not torch.allclose(got[0], plain[0])
    else:
        assert_close_all(got, plain, atol=1e-10, rtol=1e-10)


@needs_triton
@pytest.mark.parametrize("case", list(FEATURE_CASES))
def test_varlen_attention_triton_window_softcap_fp32_matches_reference(case):
    inputs, features = feature_inputs(case, torch.float32)
    want = run("reference", *inputs, **features)
    assert_close_all(run("triton", *inputs, **features), want, atol=1e-4, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("case", ["window_smaller", "softcap", "window_and_softcap"])
def test_varlen_attention_triton_window_softcap_fp16_error_bound(case):
    lens, hq, hkv, d, window, softcap = FEATURE_CASES[case]
    errors = _low_precision_errors("triton", lens, hq, hkv, d, torch.float16, 3, window, softcap)
    _assert_error_bound(*errors)


@needs_triton
@pytest.mark.parametrize("heads_per_part", [1, 2, 3])
def test_varlen_attention_triton_dkdv_group_parts_match_reference(monkeypatch, heads_per_part):
    # GQA group 3 cut into 3 parts of 1 head, 2 uneven parts (2 + 1), or kept whole.
    inputs = make_inputs([70, 1, 40], 3, 1, 64, torch.float32, seed=8)
    monkeypatch.setattr(va, "_dkdv_heads_per_part", lambda *args: heads_per_part)
    got = run("triton", *inputs, window=30)
    assert_close_all(got, run("reference", *inputs, window=30), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(got, run("triton", *inputs, window=30)))  # deterministic


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_attention_triton_dq_packs_the_gqa_group(monkeypatch, dtype):
    # Qwen2.5-7B's group of 7 query heads per kv head (126 of a 64-row tile's rows used: 9 positions x 7
    # heads), with a window: dQ runs one program per 7 heads, like the forward, and matches the
    # reference (fp32) or stays within twice plain PyTorch's fp16 error.
    launches = []
    real_kernel = va._kernel

    def spying_kernel(name, plain):
        kernel, meta = real_kernel(name, plain)

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append((name, kwargs.get("PACK"), grid({**meta, **kwargs})))
                    return kernel[grid](*args, **kwargs)

                return launch

        return Spy(), meta

    monkeypatch.setattr(va, "_kernel", spying_kernel)
    lens, hq, hkv, d = [45, 1, 20], 14, 2, 64
    if dtype == torch.float32:
        inputs = make_inputs(lens, hq, hkv, d, dtype, seed=21)
        got = run("triton", *inputs, window=12)
        assert_close_all(got, run("reference", *inputs, window=12), atol=1e-4, rtol=1e-4)
    else:
        _assert_error_bound(*_low_precision_errors("triton", lens, hq, hkv, d, dtype, seed=21, window=12))
    dq_launches = [(pack, grid) for name, pack, grid in launches if name == "dq"]
    assert dq_launches and all(pack == 7 and grid[2] == hq // 7 for pack, grid in dq_launches)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window, softcap", [(None, None), (30, 2.5)])
def test_varlen_attention_triton_split_dkdv_matches_reference(monkeypatch, dtype, window, softcap):
    # The Hopper backward's two launches (dK, then dV, each with its own accumulator and tiles), forced
    # here in the interpreter: the same gradients as the reference (fp32) or within twice plain
    # PyTorch's error (fp16), with the GQA group cut into parts.
    launches = []
    monkeypatch.setattr(va, "_dkdv_launches", lambda q: launches.append(1) or ("dk", "dv"))
    monkeypatch.setattr(va, "_dkdv_heads_per_part", lambda *args: 2)
    lens, hq, hkv, d = [70, 1, 40, 9], 6, 2, 64
    features = dict(window=window, softcap=softcap)
    if dtype == torch.float32:
        inputs = make_inputs(lens, hq, hkv, d, dtype, seed=31)
        got = run("triton", *inputs, **features)
        assert_close_all(got, run("reference", *inputs, **features), atol=1e-4, rtol=1e-4)
    else:
        _assert_error_bound(*_low_precision_errors("triton", lens, hq, hkv, d, dtype, seed=31, **features))
    assert launches


def test_varlen_attention_launch_shapes():
    # Heads per forward tile: the largest divisor of the group up to 16 (a tile keeps >= 1 position).
    assert [va._forward_pack(g) for g in (1, 4, 6, 7, 14, 28, 32, 96)] == [1, 4, 6, 7, 14, 14, 16, 16]
    if va.triton is not None:
        cpu = torch.device("cpu")
        # few programs (short row, 1 kv head) -> the group is cut; many -> kept whole
        assert va._dkdv_heads_per_part(7, 64, 1, cpu) == 1
        assert va._dkdv_heads_per_part(7, 64 * 64, 4, cpu) == 7


@pytest.mark.skipif(va.triton is None, reason="needs triton")
def test_varlen_attention_autotune_pruning():
    configs = va._configs(va._all_configs("fwd"))

    def kept(capability, **meta):
        pruned = va._prune_for("fwd", configs, meta, capability)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in pruned]

    hopper = kept(90, HEAD_DIM=128, DOT_PRECISION="tf32")
    ampere = kept(80, HEAD_DIM=128, DOT_PRECISION="tf32")
    assert hopper != ampere and (128, 64, 8) in hopper  # per architecture, from the compile table
    assert (128, 128, 8) not in hopper  # spilled at D=128 on sm_90
    for configs_kept in (hopper, ampere):
        assert all(w < 8 or m * n >= 64 * 64 for m, n, w in configs_kept)  # no 8 warps on a small tile
    assert kept(90, HEAD_DIM=256, DOT_PRECISION="tf32") == [(32, 32, 4)]  # large D: the smallest tile
    assert kept(90, HEAD_DIM=128, DOT_PRECISION="tf32x3") == [(16, 32, 4)]  # fp32: small tiles
    # dK/dV with a soft-cap drops the 16x128 tile that spills with it; never an empty list.
    dkdv = va._configs(va._all_configs("dkdv"))
    capped = va._prune_for("dkdv", dkdv, dict(HEAD_DIM=128, DOT_PRECISION="tf32", HAS_SOFTCAP=True), 90)
    assert [va._config_tuple(c) for c in capped] == [(16, 16, 4, 1)]



@pytest.mark.skipif(va.triton is None, reason="needs triton")
def test_varlen_attention_autotune_off_keeps_the_first_config(monkeypatch):
    configs = va._configs(va._all_configs("dq"))
    meta = dict(HEAD_DIM=128, DOT_PRECISION="tf32")
    tuned = va._prune_configs("dq", configs, meta)
    assert len(tuned) > 1
    monkeypatch.setenv(va.AUTOTUNE_ENV, "0")
    assert va._prune_configs("dq", configs, meta) == tuned[:1]


@needs_triton
@pytest.mark.parametrize("max_seqlen", [0, 1, 33])
def test_varlen_attention_triton_understated_max_seqlen_still_computes_every_row(monkeypatch, max_seqlen):
    # On CUDA, cu_seqlens cannot be checked without a sync: the kernels must be right anyway. Here the
    # host check (which would refuse) is switched off to show what a CUDA run gets.
    monkeypatch.setattr(va, "_check_cu_seqlens_on_host", lambda *args: None)
    q, k, v, grad_out, cu_seqlens, _ = make_inputs([150, 7, 90], 4, 2, 64, torch.float32, seed=12)
    got = run("triton", q, k, v, grad_out, cu_seqlens, max_seqlen, window=40)
    want = run("reference", q, k, v, grad_out, cu_seqlens, 150, window=40)
    assert_close_all(got, want, atol=1e-4, rtol=1e-4)


def test_varlen_attention_window_1_returns_own_value():
    # A query that sees only itself attends to its own value: out = v (per q head's kv head).
    q, k, v, _, cu_seqlens, max_seqlen = make_inputs([5, 1, 12], 4, 2, 64, seed=3)
    out = varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, window=1)
    torch.testing.assert_close(out, v.repeat_interleave(2, dim=1), atol=1e-6, rtol=1e-6)


def test_varlen_attention_rejects_bad_window_and_softcap():
    q, k, v, _, cu_seqlens, max_seqlen = make_inputs([4, 3], 2, 1, 64)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window must be a positive int"):
            varlen_attention(q, k, v, cu_seqlens, max_seqlen, window=bad)
    with pytest.raises(ValueError, match="needs causal=True"):
        varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=False, window=4)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap must be a positive float"):
            varlen_attention(q, k, v, cu_seqlens, max_seqlen, softcap=bad)


def _pretend_only(monkeypatch, backend):
    """Make the dispatcher believe `backend` (and the reference) run here, to test the feature rules."""
    for name in va._BACKEND_DEVICE_CHECKS:
        if name != "reference":
            monkeypatch.setitem(va._BACKEND_DEVICE_CHECKS, name, lambda q, ok=name == backend: ok)


def test_varlen_attention_dispatch_skips_backends_missing_a_feature(monkeypatch):
    q = torch.randn(3, 1, 64)
    _pretend_only(monkeypatch, "torch_varlen")
    monkeypatch.setattr(va, "_TORCH_VARLEN_PARAMS", frozenset({"window_size", "scale"}))
    assert varlen_attention_backend(q) == "torch_varlen"
    assert varlen_attention_backend(q, window=8) == "torch_varlen"
    assert varlen_attention_backend(q, softcap=30.0) == "reference"  # varlen_attn has no softcap
    monkeypatch.setattr(va, "_TORCH_VARLEN_PARAMS", frozenset({"is_causal", "scale"}))
    assert varlen_attention_backend(q, window=8) == "reference"
    with force_backend("attention", "torch_varlen"), pytest.raises(RuntimeError, match="cannot do window=8"):
        varlen_attention_backend(q, window=8)

    _pretend_only(monkeypatch, "flash")
    monkeypatch.setattr(va, "_FLASH_PARAMS", frozenset({"window_size", "causal"}))  # flash-attn 2.3-2.5
    assert varlen_attention_backend(q, window=8) == "flash"
    assert varlen_attention_backend(q, softcap=30.0) == "reference"
    with force_backend("attention", "flash"), pytest.raises(RuntimeError, match="flash-attn >= 2.6"):
        varlen_attention_backend(q, softcap=30.0)


def _spy_library(monkeypatch, attribute):
    """Replace a library entry point by one that records its keyword arguments and returns zeros."""
    calls = []

    def spy(q, *args, **kwargs):
        calls.append(kwargs)
        return torch.zeros_like(q)

    monkeypatch.setattr(va, attribute, spy)
    return calls


def test_varlen_attention_library_backends_get_window_and_softcap(monkeypatch):
    q, k, v, _, cu_seqlens, max_seqlen = make_inputs([6, 11], 2, 1, 64, seed=2)
    _pretend_only(monkeypatch, "flash")
    monkeypatch.setattr(va, "_FLASH_PARAMS", frozenset({"window_size", "softcap"}))
    calls = _spy_library(monkeypatch, "_FLASH_VARLEN_FUNC")
    varlen_attention(q, k, v, cu_seqlens, max_seqlen, window=4, softcap=30.0)
    varlen_attention(q, k, v, cu_seqlens, max_seqlen)
    # a window of 4 keys, the query included, is 3 keys to its left
    assert calls[0]["window_size"] == (3, 0) and calls[0]["softcap"] == 30.0 and calls[0]["causal"]
    assert "window_size" not in calls[1] and "softcap" not in calls[1]  # older flash-attn still runs

    _pretend_only(monkeypatch, "torch_varlen")
    monkeypatch.setattr(va, "_TORCH_VARLEN_PARAMS", frozenset({"window_size", "enable_gqa", "scale"}))
    calls = _spy_library(monkeypatch, "_TORCH_VARLEN_ATTN")
    varlen_attention(q, k, v, cu_seqlens, max_seqlen, window=4)
    varlen_attention(q, k, v, cu_seqlens, max_seqlen)
    assert calls[0]["window_size"] == (3, 0) and calls[1]["window_size"] == (-1, 0)


# --------------------------------------------------------------------------------------------------
# Isolation: a conversation never sees another one
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_varlen_attention_isolation_between_conversations(backend, window):
    if backend == "triton" and (va.triton is None or not triton_runs_on(DEVICE)):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    lens = [20, 17, 26]
    q, k, v, grad_out, cu_seqlens, max_seqlen = make_inputs(lens, 2, 1, 64, torch.float32, seed=9)
    base = run(backend, q, k, v, grad_out, cu_seqlens, max_seqlen, window=window)
    # Perturb only the middle conversation's q, k, v and its output gradient.
    middle = slice(20, 37)
    q2, k2, v2, g2 = q.clone(), k.clone(), v.clone(), grad_out.clone()
    for x in (q2, k2, v2, g2):
        x[middle] += torch.randn_like(x[middle])
    moved = run(backend, q2, k2, v2, g2, cu_seqlens, max_seqlen, window=window)
    outside = torch.ones(sum(lens), dtype=torch.bool, device=DEVICE)
    outside[middle] = False
    for name, a, b in zip(("out", "dq", "dk", "dv"), base, moved):
        assert torch.equal(a[outside], b[outside]), f"{name} of another conversation changed"
        assert not torch.allclose(a[middle], b[middle]), f"{name} of the perturbed conversation did not move"


# --------------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_attention_forced_backend_runs_or_raises(backend):
    dtype = torch.float16 if DEVICE.type == "cuda" else torch.float32
    q, k, v, _, cu_seqlens, max_seqlen = make_inputs([6, 11], 2, 1, 64, dtype, seed=2)
    if not _available(backend, q):
        with force_backend("attention", backend), pytest.raises(RuntimeError, match="forced"):
            varlen_attention(q, k, v, cu_seqlens, max_seqlen)
        return
    with force_backend("attention", backend):
        assert varlen_attention_backend(q) == backend
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen)
    assert out.shape == q.shape and out.dtype == q.dtype
    want = varlen_attention_ref(q.float(), k.float(), v.float(), cu_seqlens, max_seqlen)
    torch.testing.assert_close(out.float(), want, atol=2e-3 if dtype == torch.float16 else 1e-4, rtol=1e-3)


def test_varlen_attention_unknown_backend_raises():
    q, k, v, _, cu_seqlens, max_seqlen = make_inputs([4], 1, 1, 64)
    with force_backend("attention", "cudnn"), pytest.raises(ValueError, match="unknown attention backend"):
        varlen_attention(q, k, v, cu_seqlens, max_seqlen)


def test_varlen_attention_env_var_forces_backend(monkeypatch):
    q, k, v, _, cu_seqlens, max_seqlen = make_inputs([4, 3], 2, 2, 64)
    monkeypatch.setenv(env_var("attention"), "reference")
    assert env_var("attention") == "SOULCHAT_ATTENTION_BACKEND"
    assert varlen_attention_backend(q) == "reference"
    torch.testing.assert_close(
        varlen_attention(q, k, v, cu_seqlens, max_seqlen), varlen_attention_ref(q, k, v, cu_seqlens)
    )
    monkeypatch.setenv(env_var("attention"), "no_such_backend")
    with pytest.raises(ValueError, match="no_such_backend"):
        varlen_attention(q, k, v, cu_seqlens, max_seqlen)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only dispatch rules")
def test_varlen_attention_cpu_automatic_choice():
    q = torch.randn(3, 1, 64)
    # The interpreter is far slower than the reference: on the CPU Triton runs only when forced.
    assert varlen_attention_backend(q) == "reference"
    if triton_runs_on(q.device):
        with force_backend("attention", "triton"):
            assert varlen_attention_backend(q) == "triton"
    # bf16 never goes to the interpreter (its bf16 tl.dot is wrong), and forcing it there raises.
    q16 = q.bfloat16()
    assert varlen_attention_backend(q16) == "reference"
    with force_backend("attention", "triton"), pytest.raises(RuntimeError, match="cannot run here"):
        varlen_attention_backend(q16)


# --------------------------------------------------------------------------------------------------
# Input errors
# --------------------------------------------------------------------------------------------------


def test_varlen_attention_rejects_bad_inputs():
    q, k, v, _, cu_seqlens, max_seqlen = make_inputs([4, 3], 4, 2, 64)
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(q, k, v, cu_seqlens.long(), max_seqlen)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        varlen_attention(q[:, :3], k, v, cu_seqlens, max_seqlen)
    with pytest.raises(ValueError, match=r"\[T, H, D\]"):
        varlen_attention(q[None], k, v, cu_seqlens, max_seqlen)
    with pytest.raises(TypeError, match="dtypes differ"):
        varlen_attention(q, k.double(), v, cu_seqlens, max_seqlen)
    with force_backend("attention", "reference"), pytest.raises(ValueError, match="from 0 to T"):
        varlen_attention(q, k, v, cu_seqlens[:-1], max_seqlen)


@needs_triton
def test_varlen_attention_triton_rejects_bad_max_seqlen():
    q, k, v, _, cu_seqlens, _ = make_inputs([4, 3], 2, 1, 64)
    with pytest.raises(TypeError, match="host int"):
        va.varlen_attention_fwd(q, k, v, cu_seqlens, torch.tensor(4), 0.125, True)
    if DEVICE.type == "cpu":  # the boundary check is free only when cu_seqlens is on the host
        with pytest.raises(ValueError, match="below the longest conversation"):
            va.varlen_attention_fwd(q, k, v, cu_seqlens, 3, 0.125, True)
        with pytest.raises(ValueError, match="from 0 to T"):
            va.varlen_attention_fwd(q, k, v, cu_seqlens[:-1], 4, 0.125, True)


# --------------------------------------------------------------------------------------------------
# torch.compile sees through the custom op
# --------------------------------------------------------------------------------------------------


def _compile_case(compile_backend: str, attention_backend: str, window=None, softcap=None):
    q, k, v, _, cu_seqlens, max_seqlen = make_inputs([5, 20], 2, 1, 64, seed=4)
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def loss_fn(q, k, v):
        out = varlen_attention(q * 2, k, v, cu_seqlens, max_seqlen, window=window, softcap=softcap)
        return (out @ weight).square().sum()

    def loss_and_grads(fn):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        loss = fn(*leaves)
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    torch._dynamo.reset()
    with force_backend("attention", attention_backend):
        eager = loss_and_grads(loss_fn)
        # fullgraph: the custom op must trace without a graph break (the reference loops on host ints).
        compiled_fn = torch.compile(loss_fn, backend=compile_backend, fullgraph=attention_backend == "triton")
        compiled = loss_and_grads(compiled_fn)
    assert_close_all(compiled, eager, atol=1e-4, rtol=1e-4, names=("loss", "dq", "dk", "dv"))


@needs_triton
@pytest.mark.parametrize("window, softcap", [(0, 0.0), (4, 3.0)])
def test_varlen_attention_custom_op_registrations(window, softcap):
    q, k, v, grad_out, cu_seqlens, max_seqlen = make_inputs([3, 9], 2, 1, 64, seed=6)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(
        torch.ops.soulchat.varlen_attention_fwd.default,
        (q, k, v, cu_seqlens, max_seqlen, 0.125, True, window, softcap),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@needs_triton
@pytest.mark.parametrize("window, softcap", [(None, None), (6, 3.0)])
def test_varlen_attention_compile_aot_eager_matches_eager(window, softcap):
    _compile_case("aot_eager", "triton", window, softcap)


@pytest.mark.slow
@needs_triton
def test_varlen_attention_compile_inductor_matches_eager():
    # ~50 s on a 2-core CPU, nearly all of it inductor compiling the code around the custom op.
    _compile_case("inductor", "triton")
