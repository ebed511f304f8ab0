"""Rotary position embedding (RoPE) for packed q and k, with the Qwen2/Llama conventions.

    q: [T, Hq, D], k: [T, Hkv, D], position_ids: int [T]  ->  (q_rot, k_rot), same shapes and dtypes

The "rotate_half" layout of transformers: the first and second halves of the head dim form the pairs,

    out[:D/2] = x[:D/2] * cos - x[D/2:] * sin,   out[D/2:] = x[D/2:] * cos + x[:D/2] * sin,
    angle[t, i] = position_ids[t] * inv_freq[i],  inv_freq[i] = 1 / theta^(2i / D),  i < D/2.

Positions are given per token, so packed rows simply pass positions that restart at 0 at each
conversation; nothing here knows about boundaries. Instead of ``theta`` the caller may pass
precomputed ``cos``/``sin`` [T, D] (the per-token tables transformers' rotary embedding returns);
they are constants here (no gradient flows to them).

The kernels compute the angles themselves (no table in memory): each program takes a block of tokens,
makes cos/sin for their D/2 frequencies once and rotates every q and k head with them, writing new
tensors (q and k are left untouched: autograd may still need them elsewhere). The angle is the same fp32
product transformers forms (``position.float() * inv_freq``), then reduced to [-pi, pi] in fp64 so the
result does not depend on how the GPU's fp32 cos/sin treat arguments of thousands of radians. The
backward is the same kernel with the inverse rotation (sin negated): the rotation is orthogonal.

Backends (``soulchat.kernels.dispatch``, op "rotary", env ``SOULCHAT_ROTARY_BACKEND``):
  "triton"     the kernels below; chosen automatically on CUDA for fp32/fp16/bf16. On a CPU they run
               under TRITON_INTERPRET=1 only when forced (the interpreter is a test tool).
  "reference"  ``apply_rotary_ref``, plain PyTorch exactly as transformers computes it; the truth.
"""

from __future__ import annotations

import functools
import math

import torch

from soulchat.kernels.dispatch import forced_backend, resolve_backend, triton_runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the reference still works without it
    triton = None
    tl = None

_jit = triton.jit if triton is not None else (lambda fn: fn)

_WHERE = "soulchat.kernels.rotary"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# 2*pi split into two fp32-exact parts (Cody-Waite): turns * hi is exact in fp64 for any realistic
# number of turns, so the reduction error is ~turns * 1e-14 rad instead of the ~1e-7 relative error of
# an fp32 2*pi. Both are exact fp32 values, so they survive being fp32 constants inside the kernel.
# (Kernels may read module globals only as constexpr.)
_constexpr = tl.constexpr if tl is not None else (lambda value: value)
_TWO_PI_HI_VALUE = float(torch.tensor(2 * math.pi, dtype=torch.float32))
_TWO_PI_HI = _constexpr(_TWO_PI_HI_VALUE)
_TWO_PI_LO = _constexpr(float(torch.tensor(2 * math.pi - _TWO_PI_HI_VALUE, dtype=torch.float32)))
_INV_TWO_PI = _constexpr(1.0 / (2 * math.pi))


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(
            f"{_WHERE}: q must be [T, Hq, D] and k [T, Hkv, D] (packed tokens, heads, head dim); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}. Flatten the batch into the token axis first."
        )
    total, _, head_dim = q.shape
    if k.shape[0] != total or k.shape[2] != head_dim:
        raise ValueError(f"{_WHERE}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on T and D")
    if head_dim % 2 != 0:
        raise ValueError(f"{_WHERE}: head dim D={head_dim} must be even (RoPE rotates pairs of dims)")
    if q.dtype != k.dtype or not q.is_floating_point():
        raise TypeError(f"{_WHERE}: q and k must share one floating dtype, got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"{_WHERE}: q is on {q.device} but k on {k.device}")
    if (cos is None) != (sin is None):
        raise ValueError(f"{_WHERE}: pass both cos and sin, or neither")
    if cos is None:
        if position_ids is None:
            raise ValueError(f"{_WHERE}: pass position_ids [T] (or precomputed cos and sin [T, D])")
        if position_ids.shape != (total,) or position_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{_WHERE}: position_ids must be int64 [T={total}], got {position_ids.dtype} "
                f"{tuple(position_ids.shape)}; use the packed micro-batch's position_ids (restarting at 0 "
                f"per conversation), flattened"
            )
        if position_ids.device != q.device:
            raise ValueError(f"{_WHERE}: position_ids on {position_ids.device}, q on {q.device}")
    else:
        if position_ids is not None:
            raise ValueError(
                f"{_WHERE}: pass position_ids or cos/sin, not both (the tables already hold the positions)"
            )
        for name, t in (("cos", cos), ("sin", sin)):
            if t.shape != (total, head_dim) or not t.is_floating_point() or t.device != q.device:
                raise ValueError(
                    f"{_WHERE}: {name} must be a floating [T={total}, D={head_dim}] tensor on {q.device}, "
                    f"got {t.dtype} {tuple(t.shape)} on {t.device} (drop transformers' [1, T, D] batch dim)"
                )
            if t.requires_grad and torch.is_grad_enabled():
                raise ValueError(
                    f"{_WHERE}: {name} requires grad, but the tables are constants here; pass {name}.detach()"
                )


# --------------------------------------------------------------------------------------------------
# Reference: plain PyTorch, the same operations as transformers' Qwen2 rotary. The truth.
# --------------------------------------------------------------------------------------------------


def rotary_inv_freq(head_dim: int, theta: float, device: torch.device | str = "cpu", dtype=torch.float32):
    """inv_freq [D/2] = 1 / theta^(2i/D), computed as transformers does (fp32; fp64 on request).

    Computed on the CPU and then moved, like transformers' buffer: a GPU pow may round differently.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=dtype) / head_dim
    return (1.0 / (theta**exponents)).to(device)


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token tables cos, sin [T, D] in fp32 (fp64 if ``dtype`` is fp64), as transformers makes them."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = rotary_inv_freq(head_dim, theta, position_ids.device, compute)
    freqs = position_ids.to(compute)[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]: both halves of a pair share a frequency
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    theta: float = 10000.0,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE in plain PyTorch: tables cast to q's dtype, then ``x * cos + rotate_half(x) * sin``.

    This is transformers' ``apply_rotary_pos_emb`` with ``Qwen2RotaryEmbedding`` tables, in the packed
    [T, H, D] layout. fp64 inputs compute their tables in fp64 (an fp64 truth for tests).
    """
    _check_inputs(q, k, position_ids, cos, sin)
    if cos is None:
        cos, sin = rotary_cos_sin(position_ids, q.shape[-1], theta, q.dtype)
    cos = cos.to(q.dtype)[:, None, :]  # [T, 1, D], broadcast over heads
    sin = sin.to(q.dtype)[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# --------------------------------------------------------------------------------------------------
# Triton kernels. One program per block of BLOCK_T tokens: cos/sin for their D/2 frequencies are made
# once, then every q and k head is rotated with them. Tiles are [BLOCK_T, BLOCK_HEADS, BLOCK_HALF].
# --------------------------------------------------------------------------------------------------


@_jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    tokens,  # [BLOCK_T] int64 token indices
    token_mask,  # [BLOCK_T]
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    n_heads,
    half,
    cos1,  # [BLOCK_T, 1, BLOCK_HALF] fp32: cos for the first half of the head dim
    sin1,
    cos2,  # and for the second half (equal to cos1/sin1 unless given tables differ)
    sin2,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tokens[:, None, None]
    cols = tl.arange(0, BLOCK_HALF)[None, None, :]
    for h0 in range(0, n_heads, BLOCK_HEADS):
        heads = (h0 + tl.arange(0, BLOCK_HEADS))[None, :, None]
        mask = token_mask[:, None, None] & (heads < n_heads) & (cols < half)
        x_lo_ptr = x_ptr + t * stride_xt + heads * stride_xh + cols
        out_lo_ptr = out_ptr + t * stride_ot + heads * stride_oh + cols
        x1 = tl.load(x_lo_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_lo_ptr + half, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * cos1 - x2 * sin1
        o2 = x2 * cos2 + x1 * sin2
        tl.store(out_lo_ptr, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_lo_ptr + half, o2.to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _rotary_block(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, inv_freq_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cos, stride_sin, total, n_q_heads, n_k_heads, half,
    INVERSE: tl.constexpr,
    USE_TABLES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    token_mask = tokens < total
    cols = tl.arange(0, BLOCK_HALF)
    if USE_TABLES:
        table_mask = token_mask[:, None] & (cols[None, :] < half)
        cos_lo = cos_ptr + tokens[:, None] * stride_cos + cols[None, :]
        sin_lo = sin_ptr + tokens[:, None] * stride_sin + cols[None, :]
        cos1 = tl.load(cos_lo, mask=table_mask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_lo + half, mask=table_mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_lo, mask=table_mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_lo + half, mask=table_mask, other=0.0).to(tl.float32)
    else:
        pos = tl.load(pos_ptr + tokens, mask=token_mask, other=0).to(tl.float32)
        inv_freq = tl.load(inv_freq_ptr + cols, mask=cols < half, other=0.0)
        # The fp32 product transformers forms; from here on exact in fp64.
        angle = (pos[:, None] * inv_freq[None, :]).to(tl.float64)  # [BLOCK_T, BLOCK_HALF]
        turns = tl.floor(angle * _INV_TWO_PI + 0.5)
        reduced = ((angle - turns * _TWO_PI_HI) - turns * _TWO_PI_LO).to(tl.float32)  # in [-pi, pi]
        cos1 = tl.cos(reduced)
        sin1 = tl.sin(reduced)
        cos2 = cos1
        sin2 = sin1
    if INVERSE:
        # The transpose of [[c1, -s1], [s2, c2]] is [[c1, s2], [-s1, c2]]: the same formula with
        # sin1 -> -sin2 and sin2 -> -sin1 (for equal halves, simply the rotation by -angle).
        sin1, sin2 = -sin2, -sin1
    cos1 = cos1[:, None, :]  # [BLOCK_T, 1, BLOCK_HALF], broadcast over heads
    sin1 = sin1[:, None, :]
    cos2 = cos2[:, None, :]
    sin2 = sin2[:, None, :]
    _rotate_heads(q_ptr, q_out_ptr, tokens, token_mask, stride_qt, stride_qh, stride_qot, stride_qoh,
                  n_q_heads, half, cos1, sin1, cos2, sin2, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, tokens, token_mask, stride_kt, stride_kh, stride_kot, stride_koh,
                  n_k_heads, half, cos1, sin1, cos2, sin2, BLOCK_KH, BLOCK_HALF)


@_jit
def _rotary_fwd_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, inv_freq_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cos, stride_sin, total, n_q_heads, n_k_heads, half,
    USE_TABLES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
):
    _rotary_block(q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, inv_freq_ptr, cos_ptr, sin_ptr,
                  stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                  stride_cos, stride_sin, total, n_q_heads, n_k_heads, half,
                  False, USE_TABLES, BLOCK_T, BLOCK_HALF, BLOCK_QH, BLOCK_KH)


@_jit
def _rotary_bwd_kernel(
    dq_ptr, dk_ptr, dq_out_ptr, dk_out_ptr, pos_ptr, inv_freq_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cos, stride_sin, total, n_q_heads, n_k_heads, half,
    USE_TABLES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
):
    # Gradients of the outputs in, gradients of the inputs out: the inverse (transposed) rotation.
    _rotary_block(dq_ptr, dk_ptr, dq_out_ptr, dk_out_ptr, pos_ptr, inv_freq_ptr, cos_ptr, sin_ptr,
                  stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                  stride_cos, stride_sin, total, n_q_heads, n_k_heads, half,
                  True, USE_TABLES, BLOCK_T, BLOCK_HALF, BLOCK_QH, BLOCK_KH)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _cached_inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    # One small tensor per (D, theta, device); identical to transformers' fp32 inv_freq.
    return rotary_inv_freq(head_dim, theta, device, torch.float32)


def _check_triton(q: torch.Tensor, k: torch.Tensor) -> None:
    if triton is None or not triton_runs_on(q.device):
        raise RuntimeError(
            f"{_WHERE}: the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported); got {q.device}. Use the reference backend instead."
        )
    if q.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{_WHERE}: the Triton kernels take fp32/fp16/bf16, got {q.dtype}")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # Token and head strides go to the kernel (q/k may be views of a fused qkv projection);
    # only the head dim must be dense.
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(
    kernel,
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor | None,
    theta: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    block_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(q, k, position_ids, cos, sin)
    _check_triton(q, k)
    if block_tokens is not None and (block_tokens < 1 or block_tokens & (block_tokens - 1)):
        raise ValueError(f"{_WHERE}: block_tokens must be a power of 2, got {block_tokens}")
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    total, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if total == 0 or head_dim == 0 or (n_q_heads == 0 and n_k_heads == 0):
        return q_out, k_out
    half = head_dim // 2
    use_tables = cos is not None
    if use_tables:
        cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
        pos = inv_freq = cos  # unused pointers under USE_TABLES
    else:
        pos = position_ids.contiguous()
        inv_freq = _cached_inv_freq(head_dim, float(theta), q.device)
        cos = sin = inv_freq  # unused pointers without USE_TABLES
    block_half = max(16, triton.next_power_of_2(half))
    # About 4K fp32 elements per [BLOCK_T, BLOCK_HEADS, BLOCK_HALF] tile: x1, x2 and the two outputs
    # stay in registers. Qwen2.5-1.5B (Hq=12, Hkv=2, D=128): q tiles [4, 16, 64], k tiles [4, 2, 64].
    # The interpreter pays per program, not per element, so it gets 16x bigger tiles.
    budget = 4096 if q.device.type == "cuda" else 65536
    block_qh = min(max(1, budget // block_half), triton.next_power_of_2(max(1, n_q_heads)))
    block_kh = min(max(1, budget // block_half), triton.next_power_of_2(max(1, n_k_heads)))
    block_t = block_tokens or max(1, min(budget // (block_half * block_qh), triton.next_power_of_2(total)))
    kernel[(triton.cdiv(total, block_t),)](
        q, k, q_out, k_out, pos, inv_freq, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos.stride(0) if use_tables else 0, sin.stride(0) if use_tables else 0,
        total, n_q_heads, n_k_heads, half,
        USE_TABLES=use_tables, BLOCK_T=block_t, BLOCK_HALF=block_half, BLOCK_QH=block_qh, BLOCK_KH=block_kh,
        num_warps=4,
    )
    return q_out, k_out


def apply_rotary_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    theta: float = 10000.0,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    block_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: (q_rot [T, Hq, D], k_rot [T, Hkv, D]), new contiguous tensors in q's dtype.

    ``block_tokens`` forces the tokens per program (a power of 2; tests use it to cover masking).
    """
    return _launch(_rotary_fwd_kernel, q, k, position_ids, theta, cos, sin, block_tokens)


def apply_rotary_bwd(
    dq_rot: torch.Tensor,
    dk_rot: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    theta: float = 10000.0,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    block_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward: (dq, dk) from the output gradients, by the inverse rotation."""
    return _launch(_rotary_bwd_kernel, dq_rot, dk_rot, position_ids, theta, cos, sin, block_tokens)


# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, position_ids, theta, cos, sin):
        q_rot, k_rot = apply_rotary_fwd(q, k, position_ids, theta, cos, sin)
        # Only the positions (or tables) are kept: the backward needs no activations.
        ctx.save_for_backward(position_ids, cos, sin)
        ctx.theta = theta
        return q_rot, k_rot

    @staticmethod
    def backward(ctx, dq_rot, dk_rot):
        # An output unused by the loss arrives as zeros (autograd materialises them), never None.
        position_ids, cos, sin = ctx.saved_tensors
        dq, dk = apply_rotary_bwd(dq_rot, dk_rot, position_ids, ctx.theta, cos, sin)
        return dq, dk, None, None, None, None


def _triton_available(q: torch.Tensor) -> bool:
    if triton is None or not triton_runs_on(q.device) or q.dtype not in _KERNEL_DTYPES:
        return False
    # Under the interpreter the kernels are correct but far slower than PyTorch: on a CPU use them only
    # when asked for by name (tests).
    return q.device.type == "cuda" or forced_backend("rotary") == "triton"


def apply_rotary_backend(q: torch.Tensor) -> str:
    """The backend ``apply_rotary`` uses for inputs like ``q`` (for logs and benchmarks)."""
    return resolve_backend("rotary", [("triton", lambda: _triton_available(q)), ("reference", lambda: True)])


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    theta: float = 10000.0,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on packed q [T, Hq, D] and k [T, Hkv, D] -> (q_rot, k_rot), as transformers' Qwen2.

    Either ``position_ids`` int64 [T] (restarting at 0 per conversation) with ``theta``, or precomputed
    ``cos``/``sin`` [T, D] (constants: no gradient). Differentiable in q and k. Backend override: env
    ``SOULCHAT_ROTARY_BACKEND`` or ``set_backend("rotary", "triton" | "reference")``.
    """
    _check_inputs(q, k, position_ids, cos, sin)
    if apply_rotary_backend(q) == "triton":
        return RotaryFunction.apply(q, k, position_ids, float(theta), cos, sin)
    return apply_rotary_ref(q, k, position_ids, theta, cos, sin)
