"""apply_rotary: the Triton kernels against the reference and against transformers' Qwen2 rotary.

Without CUDA the kernels run in the interpreter (tests/conftest.py), so shapes are small. bf16 runs only
on CUDA: the triton 3.9 interpreter rounds fp32 -> bf16 casts toward zero instead of to nearest.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_within_torch_error, count_calls, default_backend, outputs_and_grads

from soulchat.kernels import rotary as ro
from soulchat.kernels.dispatch import env_var, force_backend, triton_runs_on
from soulchat.kernels.rotary import (
    apply_rotary,
    apply_rotary_backend,
    apply_rotary_bwd,
    apply_rotary_fwd,
    apply_rotary_ref,
    rotary_cos_sin,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

needs_triton = pytest.mark.skipif(
    ro.triton is None or not triton_runs_on(DEVICE), reason="Triton needs CUDA or TRITON_INTERPRET=1"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def packed_positions(lengths):
    """position_ids of a packed row: 0..L-1 for each conversation, back to back."""
    return torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)


def make_inputs(total, n_q_heads, n_k_heads, head_dim, dtype=torch.float32, seed=0):
    """Fresh random q, k and upstream grads dq_rot, dk_rot (never zeros)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(heads):
        return torch.randn(total, heads, head_dim, generator=gen, dtype=torch.float64).to(DEVICE, dtype)

    return rand(n_q_heads), rand(n_k_heads), rand(n_q_heads), rand(n_k_heads)


def run(fn, q, k, dq_rot, dk_rot):
    """(q_rot, k_rot, dq, dk) of fn on fresh leaf copies."""
    return outputs_and_grads(fn, (q, k), (dq_rot, dk_rot))


def run_backend(backend, q, k, dq_rot, dk_rot, **kw):
    with force_backend("rotary", backend):
        return run(lambda a, b: apply_rotary(a, b, **kw), q, k, dq_rot, dk_rot)


def check_against_reference(total, hq, hk, d, dtype, positions, theta=10000.0, tables=False, seed=0):
    q, k, dq_rot, dk_rot = make_inputs(total, hq, hk, d, dtype, seed)
    if tables:
        cos, sin = rotary_cos_sin(positions, d, theta)
        kw, kw64 = {"cos": cos, "sin": sin}, {"cos": cos.double(), "sin": sin.double()}
    else:
        kw = kw64 = {"position_ids": positions, "theta": theta}
    got = run_backend("triton", q, k, dq_rot, dk_rot, **kw)
    same_dtype = run(lambda a, b: apply_rotary_ref(a, b, **kw), q, k, dq_rot, dk_rot)
    truth = run(lambda a, b: apply_rotary_ref(a, b, **kw64), q.double(), k.double(), dq_rot.double(),
                dk_rot.double())
    assert_within_torch_error(got, same_dtype, truth, names=("q_rot", "k_rot", "dq", "dk"))


# --------------------------------------------------------------------------------------------------
# transformers' Qwen2 rotary is the convention
# --------------------------------------------------------------------------------------------------


def qwen2_rotary(q, k, positions, theta):
    """transformers' Qwen2RotaryEmbedding + apply_rotary_pos_emb on packed [T, H, D] q and k."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

    _, n_q_heads, head_dim = q.shape
    config = Qwen2Config(
        hidden_size=n_q_heads * head_dim,
        num_attention_heads=n_q_heads,
        num_key_value_heads=k.shape[1],
        rope_theta=theta,
        max_position_embeddings=4096,
    )
    rope = Qwen2RotaryEmbedding(config).to(q.device)
    cos, sin = rope(q, positions[None, :])  # [1, T, D] each, in q's dtype
    # transformers' layout is [B, H, T, D]: [T, H, D] -> [1, H, T, D] and back.
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return q_hf[0].transpose(0, 1), k_hf[0].transpose(0, 1), cos[0], sin[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_matches_transformers_qwen2(dtype):
    theta = 1_000_000.0  # Qwen2.5's rope_theta
    positions = packed_positions([9, 1, 30, 2000])[-60:]  # late positions too: large angles
    positions = torch.cat([packed_positions([9, 1, 30]), positions])
    q, k, _, _ = make_inputs(positions.numel(), 4, 2, 32, dtype, seed=1)
    q_hf, k_hf, cos_hf, sin_hf = qwen2_rotary(q, k, positions, theta)

    # The reference performs transformers' operations: bit for bit.
    q_ref, k_ref = apply_rotary_ref(q, k, positions, theta)
    assert torch.equal(q_ref, q_hf) and torch.equal(k_ref, k_hf)
    cos, sin = rotary_cos_sin(positions, 32, theta)
    assert torch.equal(cos.to(dtype), cos_hf) and torch.equal(sin.to(dtype), sin_hf)

    if triton_runs_on(DEVICE):
        # The kernel keeps cos/sin in fp32 and rounds once, so in fp16 it is closer to the truth than
        # transformers; against transformers it may differ by about one fp16 ulp of |q|.
        tol = {"rtol": 1e-5, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 4e-3}
        with force_backend("rotary", "triton"):
            for kw in ({"position_ids": positions, "theta": theta}, {"cos": cos_hf, "sin": sin_hf}):
                q_rot, k_rot = apply_rotary(q, k, **kw)
                torch.testing.assert_close(q_rot, q_hf, **tol)
                torch.testing.assert_close(k_rot, k_hf, **tol)


# --------------------------------------------------------------------------------------------------
# Triton against the reference
# --------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tables", [False, True], ids=["theta", "tables"])
@pytest.mark.parametrize(
    "lengths, hq, hk, d",
    [
        ([1], 1, 1, 2),  # T = 1, D = 2 (one pair)
        ([5, 8], 3, 1, 10),  # D/2 = 5: masked lanes; GQA 3:1
        ([7, 1, 12], 4, 2, 64),
        ([3, 2], 5, 5, 128),  # MHA, Qwen's head dim
    ],
)
def test_rotary_matches_reference(lengths, hq, hk, d, tables, dtype):
    positions = packed_positions(lengths)
    check_against_reference(positions.numel(), hq, hk, d, dtype, positions, tables=tables, seed=d + hq)


@needs_triton
def test_rotary_large_positions_theta():
    """Angles of thousands of radians: the kernel's fp64 range reduction keeps cos/sin accurate."""
    positions = torch.tensor([0, 1, 4095, 16383, 32767, 131071, 5, 70000], device=DEVICE)
    check_against_reference(8, 2, 1, 64, torch.float32, positions, theta=10000.0, seed=4)
    check_against_reference(8, 2, 1, 64, torch.float32, positions, theta=1_000_000.0, seed=5)


@needs_triton
def test_rotary_general_tables_with_unequal_halves():
    """Given tables whose halves differ, the kernel follows the formula (and its exact transpose)."""
    gen = torch.Generator().manual_seed(7)
    cos = torch.randn(11, 12, generator=gen).to(DEVICE)
    sin = torch.randn(11, 12, generator=gen).to(DEVICE)
    q, k, dq_rot, dk_rot = make_inputs(11, 3, 2, 12, seed=8)
    got = run_backend("triton", q, k, dq_rot, dk_rot, cos=cos, sin=sin)
    tables64 = {"cos": cos.double(), "sin": sin.double()}
    want = run(lambda a, b: apply_rotary_ref(a, b, **tables64), q.double(), k.double(), dq_rot.double(),
               dk_rot.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# packing: positions restart per conversation, nothing else crosses a boundary
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_rotary_packed_equals_each_conversation_alone(backend):
    if backend == "triton" and not triton_runs_on(DEVICE):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    lengths = [5, 1, 12, 7]
    positions = packed_positions(lengths)
    q, k, dq_rot, dk_rot = make_inputs(sum(lengths), 3, 1, 16, seed=9)
    packed = run_backend(backend, q, k, dq_rot, dk_rot, position_ids=positions)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = run_backend(backend, q[part], k[part], dq_rot[part], dk_rot[part],
                            position_ids=torch.arange(n, device=DEVICE))
        for p, a in zip(packed, alone):
            assert torch.equal(p[part], a)  # per-token math: identical, not just close
        start += n


@needs_triton
@pytest.mark.parametrize("block_tokens", [1, 4, 16])
def test_rotary_token_blocks_and_inverse(block_tokens):
    """Any tokens-per-program split gives the same result; the backward kernel inverts the forward."""
    positions = packed_positions([6, 7])
    q, k, _, _ = make_inputs(13, 3, 2, 24, seed=10)
    q_rot, k_rot = apply_rotary_fwd(q, k, positions, block_tokens=block_tokens)
    q_ref, k_ref = apply_rotary_fwd(q, k, positions)
    assert torch.equal(q_rot, q_ref) and torch.equal(k_rot, k_ref)
    q_back, k_back = apply_rotary_bwd(q_rot, k_rot, positions, block_tokens=block_tokens)
    torch.testing.assert_close(q_back, q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_back, k, rtol=1e-6, atol=1e-6)


@needs_triton
def test_rotary_strided_views_of_a_fused_qkv():
    """q and k as views of one [T, Hq + 2 Hkv, D] projection: read through strides, no copy needed."""
    positions = packed_positions([4, 5])
    qkv = torch.randn(9, 4 + 2 + 2, 16, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    q, k = qkv[:, :4], qkv[:, 4:6]
    assert not q.is_contiguous()
    with force_backend("rotary", "triton"):
        q_rot, k_rot = apply_rotary(q, k, positions)
        q_c, k_c = apply_rotary(q.contiguous(), k.contiguous(), positions)
    assert torch.equal(q_rot, q_c) and torch.equal(k_rot, k_c)


@needs_triton
def test_rotary_only_q_used_in_loss():
    """When the loss ignores k_rot, autograd passes zeros for it; dk must come out zero, dq correct."""
    positions = packed_positions([3, 4])
    q, k, dq_rot, _ = make_inputs(7, 2, 1, 8, seed=12)
    q = q.requires_grad_()
    k = k.requires_grad_()
    with force_backend("rotary", "triton"):
        q_rot, _ = apply_rotary(q, k, positions)
    dq, dk = torch.autograd.grad(q_rot, (q, k), dq_rot, allow_unused=True)
    assert dk is None or dk.abs().sum() == 0
    want_dq = torch.autograd.grad(apply_rotary_ref(q, k, positions)[0], q, dq_rot)[0]
    torch.testing.assert_close(dq, want_dq, rtol=1e-6, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("tables", [False, True], ids=["theta", "tables"])
def test_rotary_bf16_matches_reference_cuda(tables):
    positions = packed_positions([300, 1, 700, 47])
    check_against_reference(positions.numel(), 12, 2, 128, torch.bfloat16, positions, 1_000_000.0, tables)


# --------------------------------------------------------------------------------------------------
# dispatch and errors
# --------------------------------------------------------------------------------------------------


def test_rotary_dispatch_default_and_forced(monkeypatch):
    positions = packed_positions([3, 2])
    q, k, _, _ = make_inputs(5, 2, 1, 8)
    calls = count_calls(monkeypatch, ro, "apply_rotary_fwd")
    want = apply_rotary_ref(q, k, positions)
    expected = default_backend(DEVICE)
    assert apply_rotary_backend(q) == expected
    apply_rotary(q, k, positions)
    assert len(calls) == (1 if expected == "triton" else 0)
    monkeypatch.setenv(env_var("rotary"), "reference")
    calls.clear()
    got = apply_rotary(q, k, positions)
    assert calls == [] and all(torch.equal(g, w) for g, w in zip(got, want))
    if triton_runs_on(DEVICE):
        monkeypatch.setenv(env_var("rotary"), "triton")
        got = apply_rotary(q, k, positions)
        assert calls == [1]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
        with pytest.raises(RuntimeError, match="forced"):
            apply_rotary(q.double(), k.double(), positions)
    monkeypatch.setenv(env_var("rotary"), "nope")
    with pytest.raises(ValueError, match="unknown rotary backend"):
        apply_rotary(q, k, positions)


def test_rotary_rejects_bad_inputs():
    q, k = torch.randn(4, 2, 8), torch.randn(4, 1, 8)
    pos = torch.arange(4)
    with pytest.raises(ValueError, match="must be even"):
        apply_rotary(torch.randn(4, 2, 7), torch.randn(4, 1, 7), pos)
    with pytest.raises(ValueError, match=r"\[T, Hq, D\]"):
        apply_rotary(q[None], k, pos)
    with pytest.raises(ValueError, match="position_ids must be int64"):
        apply_rotary(q, k, pos.float())
    with pytest.raises(ValueError, match="position_ids must be int64"):
        apply_rotary(q, k, pos[:3])
    cos, sin = rotary_cos_sin(pos, 8)
    with pytest.raises(ValueError, match="not both"):
        apply_rotary(q, k, pos, cos=cos, sin=sin)
    with pytest.raises(ValueError, match="requires grad"):
        apply_rotary(q, k, cos=cos.requires_grad_(), sin=sin)
    with pytest.raises(ValueError, match="pass position_ids"):
        apply_rotary(q, k)
