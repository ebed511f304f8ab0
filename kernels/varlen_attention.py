"""Causal attention over packed conversations (variable-length, no padding).

A packed row holds many conversations back to back; ``cu_seqlens`` marks where each one starts, and
attention never crosses a boundary: token j of a conversation attends to tokens 0..j of that same
conversation only. Layout (the packed micro-batch contract in README.md):

    q: [T, Hq, D], k/v: [T, Hkv, D], cu_seqlens: int32 [S+1] (0 first, T last), max_seqlen: host int
    -> out: [T, Hq, D], same dtype as q

Hq must be a multiple of Hkv (grouped-query attention; Hkv=1 is multi-query attention). Every token
must belong to a conversation (``cu_seqlens[-1] == T``): row padding is a conversation of its own.

Two optional score transforms, with Hugging Face's meaning (transformers 5.24):

- ``window`` (``config.sliding_window``): query i sees keys j with ``i - window < j <= i``, i.e.
  ``window`` keys including itself (``masking_utils.sliding_window_overlay``: ``kv_idx > q_idx -
  sliding_window``; its flash path passes ``window_size=(sliding_window - 1, ...)``). Positions count
  from each conversation's start, so a window never reaches into the previous conversation. Causal only.
- ``softcap`` (Gemma 2 ``attn_logit_softcapping``): scores = softcap * tanh(scores / softcap), applied
  after the softmax scale and before the mask (``gemma2.eager_attention_forward``).

Backends, fastest first (chosen per call by ``soulchat.kernels.dispatch``):
``flash`` (flash-attn's ``flash_attn_varlen_func``), ``torch_varlen``
(``torch.nn.attention.varlen.varlen_attn``), ``triton`` (the kernels below) and ``reference``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import os

import torch
import torch.nn.functional as F

from soulchat.kernels.dispatch import (
    forced_backend,
    resolve_backend,
    triton_interpreted,
    triton_runs_on,
    triton_usable,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the reference still works without it
    triton = None
    tl = None

_jit = triton.jit if triton is not None else (lambda fn: fn)

_WHERE = "soulchat.kernels.varlen_attention"

# --------------------------------------------------------------------------------------------------
# Reference: plain PyTorch, one scaled_dot_product_attention per conversation. The truth for tests.
# --------------------------------------------------------------------------------------------------


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention within each conversation, one SDPA (or, with a softcap, eager attention) per
    conversation; kv heads are shared for GQA."""
    _check_inputs(q, k, v, cu_seqlens)
    _check_features(causal, window, softcap)
    total, num_q_heads, head_dim = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    bounds = cu_seqlens.tolist()  # host copy: fine for the reference, which loops in Python anyway
    if bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(
            f"{_WHERE}: cu_seqlens must rise from 0 to T={total} (every token in one conversation); "
            f"got {bounds[:4]}...{bounds[-2:]}. Make row padding a conversation of its own."
        )
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # [L, H, D] -> [1, H, L, D]
        qs, ks, vs = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        if softcap is None:
            out = _sdpa_one_conversation(qs, ks, vs, scale, causal, window)
        else:
            visible = _visible_keys(end - start, causal, window, q.device)
            out = _softcapped_one_conversation(qs, ks, vs, scale, softcap, visible)
        pieces.append(out.squeeze(0).transpose(0, 1))
    if not pieces:
        return q.new_zeros(q.shape)
    return torch.cat(pieces, dim=0)


def _visible_keys(length: int, causal: bool, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [L, L], True where query i may see key j (None: every key, non-causal)."""
    if not causal:
        return None
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    visible = j <= i
    if window is not None:
        visible &= j > i - window
    return visible


def _sdpa_one_conversation(qs, ks, vs, scale: float, causal: bool, window: int | None) -> torch.Tensor:
    # SDPA shares each kv head among its query heads itself (enable_gqa) instead of materialising
    # repeated k/v: with 4-D inputs and no repeat, the CPU takes its flash kernel (one 2048-token row,
    # tiny model: 294 -> 95 ms forward+backward). A window no shorter than the conversation is plain
    # causal attention, which keeps that fast path.
    length = qs.shape[2]
    narrow = window is not None and window < length
    mask = _visible_keys(length, causal, window, qs.device) if narrow else None
    return F.scaled_dot_product_attention(
        qs, ks, vs, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
        enable_gqa=qs.shape[1] != ks.shape[1],
    )


def _softcapped_one_conversation(qs, ks, vs, scale: float, softcap: float, visible) -> torch.Tensor:
    """Eager attention with Gemma 2's logit soft-cap (SDPA has none); softmax in at least fp32 like HF
    eager (fp64 inputs stay fp64: they are the tests' truth)."""
    group = qs.shape[1] // ks.shape[1]
    ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
    scores = (qs @ ks.transpose(-1, -2)) * scale  # [1, H, L, L]
    scores = softcap * torch.tanh(scores / softcap)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(qs.dtype, torch.float32)).to(qs.dtype)
    return probs @ vs


def _check_features(causal: bool, window: int | None, softcap: float | None) -> None:
    """window/softcap values every backend can take; errors name the argument and the fix."""
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(
                f"{_WHERE}: window must be a positive int (keys a query sees, itself included, like "
                f"config.sliding_window) or None; got {window!r}"
            )
        if not causal:
            raise ValueError(
                f"{_WHERE}: window={window} needs causal=True (a sliding window here is causal, as in "
                f"Hugging Face's sliding_attention layers)"
            )
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(
            f"{_WHERE}: softcap must be a positive float (config.attn_logit_softcapping) or None; "
            f"got {softcap!r}"
        )


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """Shape/dtype/device checks shared by every backend; errors say what is wrong and the fix."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"{_WHERE}: q, k, v must be [T, H, D] (packed tokens, heads, head dim); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}. Flatten the batch into the token axis first."
        )
    if k.shape != v.shape:
        raise ValueError(f"{_WHERE}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"{_WHERE}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on tokens T and head dim D"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"{_WHERE}: query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]}) for GQA"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{_WHERE}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them alike")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"{_WHERE}: cu_seqlens must be a 1-D int32 tensor [S+1] from 0 to T; got "
            f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)} (use cu_seqlens.to(torch.int32))"
        )
    if cu_seqlens.device != q.device or k.device != q.device or v.device != q.device:
        raise ValueError(
            f"{_WHERE}: q, k, v, cu_seqlens must be on one device; got q {q.device}, k {k.device}, "
            f"v {v.device}, cu_seqlens {cu_seqlens.device}"
        )


# --------------------------------------------------------------------------------------------------
# Triton kernels. Programs own blocks of one conversation: the grid is (cdiv(max_seqlen, BLOCK), S,
# heads), built from max_seqlen (a host int) and S (a shape), so there is no device->host sync. Each
# program loops over its conversation's blocks with the grid's stride: with a right max_seqlen that is
# one block (or none: programs past the end return at once, for SoulChat rows of 100-600-token
# conversations about half of them), and an understated max_seqlen costs parallelism, never rows.
#
# Per (query block, key block) pair the work is one of three kinds, decided on the host-free block
# ranges below: skipped (the block is entirely outside the causal triangle or the window), full (every
# pair visible and no tail: no mask at all, most of the work for long conversations) or edge (the
# diagonal, the conversation's tail and the window's far edge: masked).
#
# The softmax runs in base 2 (exp2 is one instruction): scores are pre-multiplied by scale*log2(e), or,
# with a soft-cap, capped in natural units and then multiplied by log2(e). Token offsets are int64 so
# T*H*D may pass 2**31; positions inside a conversation stay int32.
# --------------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634


@_jit
def _tanh(x):
    # triton.language has no tanh. From e = exp(-2|x|) it never overflows; near 0 its absolute error
    # is about one ulp of 1 (6e-8 in fp32), below the rounding of the capped scores.
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@_jit
def _logits(qk, qk_scale, cap_scale, cap_log2e, HAS_SOFTCAP: tl.constexpr):
    """Base-2 logits from raw q.k products, and t = tanh(s / softcap) (the soft-cap's gradient is
    1 - t**2; without a cap the second value is unused)."""
    if HAS_SOFTCAP:
        t = _tanh(qk * cap_scale)  # cap_scale = softmax_scale / softcap
        s = t * cap_log2e  # cap_log2e = softcap * log2(e)
    else:
        t = qk
        s = qk * qk_scale
    return s, t


@_jit
def _visible(q_pos, k_pos, seqlen, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """True where the query at q_pos may see the key at k_pos (positions in one conversation; the two
    broadcast to the tile). A window of W keys: k_pos > q_pos - W."""
    keep = (q_pos < seqlen) & (k_pos < seqlen)
    if CAUSAL:
        keep = keep & (k_pos <= q_pos)
    if HAS_WINDOW:
        keep = keep & (k_pos > q_pos - window)
    return keep


@_jit
def _key_block_ranges(q_lo, q_hi, seqlen, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Key blocks seen by queries [q_lo, q_hi) as lo <= a <= b <= hi (lo, a, b multiples of BLOCK_N):
    [a, b) are full blocks; [lo, a) (the window's far edge) and [b, hi) (diagonal, tail) are masked.
    Without full blocks a = b = lo, so the last range covers everything."""
    if CAUSAL:
        hi = q_hi
        b = ((q_lo + 1) // BLOCK_N) * BLOCK_N  # every key of a block before b is <= q_lo
    else:
        hi = seqlen
        b = (seqlen // BLOCK_N) * BLOCK_N
    if HAS_WINDOW:
        lo = (tl.maximum(q_lo - window + 1, 0) // BLOCK_N) * BLOCK_N
        a = tl.cdiv(tl.maximum(q_hi - window, lo), BLOCK_N) * BLOCK_N  # keys > (q_hi - 1) - window
    else:
        lo = 0
        a = 0
    empty = a >= b
    return lo, tl.where(empty, lo, a), tl.where(empty, lo, b), hi


@_jit
def _query_block_ranges(k_lo, seqlen, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query blocks that see keys [k_lo, k_lo + BLOCK_N), as lo <= a <= b <= hi: [a, b) full, the rest
    masked (a tail key block is masked everywhere)."""
    if CAUSAL:
        lo = (k_lo // BLOCK_M) * BLOCK_M
        a = tl.cdiv(k_lo + BLOCK_N - 1, BLOCK_M) * BLOCK_M  # every query of a block from a on sees all keys
    else:
        lo = 0
        a = 0
    if HAS_WINDOW:
        hi = tl.minimum(seqlen, k_lo + BLOCK_N - 1 + window)
        b = (tl.minimum(seqlen, k_lo + window) // BLOCK_M) * BLOCK_M  # last query - first key < window
    else:
        hi = seqlen
        b = (seqlen // BLOCK_M) * BLOCK_M
    empty = (a >= b) | (k_lo + BLOCK_N > seqlen)
    return lo, tl.where(empty, lo, a), tl.where(empty, lo, b), hi


@_jit
def _fwd_key_block(
    acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, n_start, q_pos, seqlen, window,
    qk_scale, cap_scale, cap_log2e, offs_n, offs_d,
    HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One key block of the online softmax: updated (acc, l_i, m_i)."""
    cols = n_start + offs_n
    kv_mask = (offs_d < HEAD_DIM)[None, :]
    if MASKED:
        kv_mask = kv_mask & (cols < seqlen)[:, None]
    # k, v: [BLOCK_N, BLOCK_D]
    k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    # s: [BLOCK_M, BLOCK_N]
    s, _ = _logits(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), qk_scale, cap_scale, cap_log2e,
                   HAS_SOFTCAP)
    if MASKED:
        s = tl.where(_visible(q_pos[:, None], cols[None, :], seqlen, window, CAUSAL, HAS_WINDOW), s,
                     float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # A row may see nothing yet (a window's far edge, a padding row): keep its max at -inf but
        # subtract 0, so exp2 gives 0 instead of NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@_jit
def _varlen_attention_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS,
    qk_scale,  # softmax_scale * log2(e)
    cap_scale, cap_log2e,  # softmax_scale / softcap, softcap * log2(e) (used with HAS_SOFTCAP)
    window,  # keys a query sees, itself included (used with HAS_WINDOW)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    GROUP: tl.constexpr,  # query heads per kv head
    PACK: tl.constexpr,  # query heads of one group this program serves (divides GROUP)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM; the extra lanes are masked
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows: (position, head) pairs, BLOCK_M // PACK positions x PACK heads
    BLOCK_N: tl.constexpr,
):
    # GQA: the PACK heads that share a kv head sit in one tile's rows (row r = position r // PACK,
    # head r % PACK), so every K/V tile loaded serves all of them: K/V are read once per group
    # instead of once per query head (GROUP = 7 for Qwen2.5: 7x fewer K/V loads).
    POSITIONS: tl.constexpr = BLOCK_M // PACK
    seq = tl.program_id(1)
    head0 = tl.program_id(2) * PACK
    kv_head = head0 // GROUP
    seq_start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - seq_start  # int32: in-sequence indices and masks stay 32-bit
    start = seq_start.to(tl.int64)  # token offset of the sequence: 64-bit pointer arithmetic

    rows = tl.arange(0, BLOCK_M)
    heads = head0 + rows % PACK
    row_in_tile = rows < POSITIONS * PACK  # BLOCK_M need not be a multiple of PACK (7: 126 of 128 rows)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_base = K + start * stride_kt + kv_head * stride_kh
    v_base = V + start * stride_vt + kv_head * stride_vh

    # The last query blocks see the most keys under the causal mask: start them first.
    first = tl.num_programs(0) - 1 - tl.program_id(0)
    for block in range(first, tl.cdiv(seqlen, POSITIONS), tl.num_programs(0)):
        m_start = block * POSITIONS
        q_pos = m_start + rows // PACK
        row_ok = row_in_tile & (q_pos < seqlen)
        # q: [BLOCK_M, BLOCK_D]
        io_offsets = (start + q_pos)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(Q + io_offsets, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (base-2 logits)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        lo, a, b, hi = _key_block_ranges(m_start, tl.minimum(m_start + POSITIONS, seqlen), seqlen, window,
                                         CAUSAL, HAS_WINDOW, BLOCK_N)
        if HAS_WINDOW:
            for n_start in range(lo, a, BLOCK_N):
                acc, l_i, m_i = _fwd_key_block(
                    acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, n_start, q_pos, seqlen, window,
                    qk_scale, cap_scale, cap_log2e, offs_n, offs_d,
                    HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION)
        for n_start in range(a, b, BLOCK_N):
            acc, l_i, m_i = _fwd_key_block(
                acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, n_start, q_pos, seqlen, window,
                qk_scale, cap_scale, cap_log2e, offs_n, offs_d,
                HEAD_DIM, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION)
        for n_start in range(b, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_key_block(
                acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, n_start, q_pos, seqlen, window,
                qk_scale, cap_scale, cap_log2e, offs_n, offs_d,
                HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION)
        # Every real row sees at least itself (l_i > 0); rows past the end or the tile are not stored.
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_offsets = (start + q_pos)[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(O + o_offsets, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        # Natural-log LSE, [Hq, T] like flash-attn's softmax_lse.
        lse = (m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453
        tl.store(LSE + heads * stride_lh + start + q_pos, lse, mask=row_ok)


@_jit
def _varlen_attention_bwd_preprocess_kernel(
    O, DO, DELTA, T,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_delta_h,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # delta[h, t] = sum_d dO[t, h, d] * O[t, h, d]: the softmax-gradient row term, computed once.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(O + rows * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + head * stride_delta_h + offs_m, delta, mask=offs_m < T)


@_jit
def _dkdv_query_block(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
    m_start, k_pos, seqlen, window, qk_scale, cap_scale, cap_log2e, offs_m0, offs_d,
    HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, PARTS: tl.constexpr,
):
    """One query block's contribution to this key block's (dk, dv), for one query head. PARTS: "dkdv"
    both, "dk" or "dv" one of them (the other accumulator is untouched)."""
    q_pos = m_start + offs_m0
    q_mask = (offs_d < HEAD_DIM)[None, :]
    if MASKED:
        q_mask = q_mask & (q_pos < seqlen)[:, None]
    # q, do: [BLOCK_M, BLOCK_D]
    q = tl.load(q_base + q_pos[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_base + q_pos[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0)
    if MASKED:
        lse = tl.load(lse_base + q_pos, mask=q_pos < seqlen, other=0.0)
        delta = tl.load(delta_base + q_pos, mask=q_pos < seqlen, other=0.0)
    else:
        lse = tl.load(lse_base + q_pos)
        delta = tl.load(delta_base + q_pos)
    # Transposed scores (keys on rows), so dK/dV accumulate without transposing results.
    # s_t, p_t: [BLOCK_N, BLOCK_M]
    s_t, t_t = _logits(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION), qk_scale, cap_scale, cap_log2e,
                       HAS_SOFTCAP)
    p_t = tl.math.exp2(s_t - lse[None, :] * 1.4426950408889634)  # lse to base 2, like the scores
    if MASKED:
        p_t = tl.where(_visible(q_pos[None, :], k_pos[:, None], seqlen, window, CAUSAL, HAS_WINDOW), p_t, 0.0)
    if PARTS != "dk":
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    if PARTS != "dv":
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)  # d(softcap * tanh(s / softcap)) / ds
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@_jit
def _varlen_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS,
    qk_scale, softmax_scale, cap_scale, cap_log2e, window,
    heads_per_part,  # query heads of the group each program sums over; the group is cut into parts
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lh,  # LSE and DELTA share [Hq, T] strides
    stride_dkp, stride_dkt, stride_dkh,  # DK, DV: [parts, T, Hkv, D] (fp32 partial sums) or [T, Hkv, D]
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PARTS: tl.constexpr,  # "dkdv": both gradients; "dk" / "dv": one (two launches, half the accumulators)
    BLOCK_M: tl.constexpr,  # query block (inner loop)
    BLOCK_N: tl.constexpr,  # key block (this program's)
):
    # One program owns one key block of one kv head and sums over its part of the GROUP query heads
    # that read it; the launcher adds the parts up. No atomics: dK/dV are deterministic.
    seq = tl.program_id(1)
    parts = tl.cdiv(GROUP, heads_per_part)
    kv_head = tl.program_id(2) // parts
    part = tl.program_id(2) % parts
    g_lo = part * heads_per_part
    g_hi = tl.minimum(g_lo + heads_per_part, GROUP)
    seq_start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - seq_start  # int32: in-sequence indices and masks stay 32-bit
    start = seq_start.to(tl.int64)  # token offset of the sequence: 64-bit pointer arithmetic

    offs_n0 = tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    for block in range(tl.program_id(0), tl.cdiv(seqlen, BLOCK_N), tl.num_programs(0)):
        n_start = block * BLOCK_N
        k_pos = n_start + offs_n0
        kv_mask = (k_pos < seqlen)[:, None] & d_ok[None, :]
        # k, v: [BLOCK_N, BLOCK_D]
        k = tl.load(K + (start + k_pos)[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + (start + k_pos)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        lo, a, b, hi = _query_block_ranges(n_start, seqlen, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
        for g in range(g_lo, g_hi):
            head = kv_head * GROUP + g
            q_base = Q + start * stride_qt + head * stride_qh
            do_base = DO + start * stride_dot + head * stride_doh
            lse_base = LSE + head * stride_lh + start
            delta_base = DELTA + head * stride_lh + start
            for m_start in range(lo, a, BLOCK_M):
                dk, dv = _dkdv_query_block(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                    m_start, k_pos, seqlen, window, qk_scale, cap_scale, cap_log2e, offs_m0, offs_d,
                    HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, PARTS)
            for m_start in range(a, b, BLOCK_M):
                dk, dv = _dkdv_query_block(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                    m_start, k_pos, seqlen, window, qk_scale, cap_scale, cap_log2e, offs_m0, offs_d,
                    HEAD_DIM, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, PARTS)
            for m_start in range(b, hi, BLOCK_M):
                dk, dv = _dkdv_query_block(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                    m_start, k_pos, seqlen, window, qk_scale, cap_scale, cap_log2e, offs_m0, offs_d,
                    HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, PARTS)
        out_offsets = (part.to(tl.int64) * stride_dkp + (start + k_pos)[:, None] * stride_dkt
                       + kv_head * stride_dkh + offs_d[None, :])
        if PARTS != "dv":
            tl.store(DK + out_offsets, (dk * softmax_scale).to(DK.dtype.element_ty), mask=kv_mask)
        if PARTS != "dk":
            tl.store(DV + out_offsets, dv.to(DV.dtype.element_ty), mask=kv_mask)


@_jit
def _dq_key_block(
    dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, n_start, q_pos, seqlen, window,
    qk_scale, cap_scale, cap_log2e, offs_n0, offs_d,
    HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One key block's contribution to this query block's dq."""
    cols = n_start + offs_n0
    kv_mask = (offs_d < HEAD_DIM)[None, :]
    if MASKED:
        kv_mask = kv_mask & (cols < seqlen)[:, None]
    k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    # s, p, dp: [BLOCK_M, BLOCK_N]
    s, t = _logits(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), qk_scale, cap_scale, cap_log2e,
                   HAS_SOFTCAP)
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(_visible(q_pos[:, None], cols[None, :], seqlen, window, CAUSAL, HAS_WINDOW), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@_jit
def _varlen_attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS,
    qk_scale, softmax_scale, cap_scale, cap_log2e, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lh, stride_dqt, stride_dqh,
    GROUP: tl.constexpr,
    PACK: tl.constexpr,  # query heads of one group this program serves (divides GROUP), as the forward
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows: (position, head) pairs, BLOCK_M // PACK positions x PACK heads
    BLOCK_N: tl.constexpr,  # key block (inner loop)
):
    # GQA packed like the forward: row r of a tile is position r // PACK, head r % PACK, so each K/V
    # tile loaded serves the PACK heads that share it (K/V read once per group, not once per head).
    POSITIONS: tl.constexpr = BLOCK_M // PACK
    seq = tl.program_id(1)
    head0 = tl.program_id(2) * PACK
    kv_head = head0 // GROUP
    seq_start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - seq_start  # int32: in-sequence indices and masks stay 32-bit
    start = seq_start.to(tl.int64)  # token offset of the sequence: 64-bit pointer arithmetic

    rows = tl.arange(0, BLOCK_M)
    heads = head0 + rows % PACK
    row_in_tile = rows < POSITIONS * PACK
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_base = K + start * stride_kt + kv_head * stride_kh
    v_base = V + start * stride_vt + kv_head * stride_vh

    first = tl.num_programs(0) - 1 - tl.program_id(0)
    for block in range(first, tl.cdiv(seqlen, POSITIONS), tl.num_programs(0)):
        m_start = block * POSITIONS
        q_pos = m_start + rows // PACK
        row_ok = row_in_tile & (q_pos < seqlen)
        q_mask = row_ok[:, None] & d_ok[None, :]
        # q, do: [BLOCK_M, BLOCK_D]
        q = tl.load(Q + (start + q_pos)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=q_mask, other=0.0)
        do_offsets = (start + q_pos)[:, None] * stride_dot + heads[:, None] * stride_doh + offs_d[None, :]
        do = tl.load(DO + do_offsets, mask=q_mask, other=0.0)
        lse = tl.load(LSE + heads * stride_lh + start + q_pos, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + heads * stride_lh + start + q_pos, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        lo, a, b, hi = _key_block_ranges(m_start, tl.minimum(m_start + POSITIONS, seqlen), seqlen, window,
                                         CAUSAL, HAS_WINDOW, BLOCK_N)
        if HAS_WINDOW:
            for n_start in range(lo, a, BLOCK_N):
                dq = _dq_key_block(
                    dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, n_start, q_pos, seqlen,
                    window, qk_scale, cap_scale, cap_log2e, offs_n0, offs_d,
                    HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION)
        for n_start in range(a, b, BLOCK_N):
            dq = _dq_key_block(
                dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, n_start, q_pos, seqlen,
                window, qk_scale, cap_scale, cap_log2e, offs_n0, offs_d,
                HEAD_DIM, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION)
        for n_start in range(b, hi, BLOCK_N):
            dq = _dq_key_block(
                dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, n_start, q_pos, seqlen,
                window, qk_scale, cap_scale, cap_log2e, offs_n0, offs_d,
                HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION)
        tl.store(DQ + (start + q_pos)[:, None] * stride_dqt + heads[:, None] * stride_dqh + offs_d[None, :],
                 (dq * softmax_scale).to(DQ.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------------
# Launchers: checks, block sizes, grids.
# On CUDA the block sizes are autotuned once per (head dim, GQA group, causal/window/softcap flags,
# dtypes) from a few configs, pruned per GPU and head dim before any is timed. Lengths are never in
# the key and never constexpr: a new max_seqlen or T changes only the grid, never the compiled kernel.
# Under the interpreter (CPU tests) fixed mid-size blocks keep the numpy emulation fast (64/32 blocks
# took ~20% less CPU time for the test file than 32/16).
# --------------------------------------------------------------------------------------------------

# Unequal query/key blocks under the interpreter on purpose: the CUDA configs mix them too, so the
# CPU tests cover the block-boundary logic for BLOCK_M != BLOCK_N.
_INTERPRETER_BLOCKS = {
    "fwd": {"BLOCK_M": 64, "BLOCK_N": 32},
    "dkdv": {"BLOCK_M": 32, "BLOCK_N": 64},
    "dk": {"BLOCK_M": 16, "BLOCK_N": 64},
    "dv": {"BLOCK_M": 32, "BLOCK_N": 32},
    "dq": {"BLOCK_M": 64, "BLOCK_N": 32},
}
_FLAG_KEY = ["HEAD_DIM", "GROUP", "CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP"]
# The forward and dQ pack up to this many heads of a group into one tile's rows; every config has
# BLOCK_M >= it, so a tile always holds at least one position.
_MAX_PACK = 16


# (BLOCK_M, BLOCK_N, num_warps, num_stages) each kernel's autotuner may try, chosen from the sm_90 and
# sm_80 compiles of kernels/compile_check.py (bench/results/compile.md; tests/test_hopper_compile.py
# keeps them honest): only configs that spill no register at head dim 128 stay, best guesses first.
# Dropped for spilling on sm_90 at D=128: fwd 128x128/8 warps (96-120 B per thread), 128x64/4 and
# 128x32/4 (300-400 B); dq 128x64/8 and 64x64/4 (44-52 B), 32x32/4 (8 B at D=64, group 1: ptxas
# held it to 128 registers); dK/dV every tile of 32+ query rows
# (60 B to 3 KB). The last entry of each list fits every head dim up to 256.
_HOPPER_CONFIGS = {
    "fwd": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
    "dq": [(64, 64, 8, 2), (128, 32, 8, 2), (32, 16, 4, 1)],
    "dkdv": [(16, 128, 8, 2), (16, 16, 4, 1)],
}
# Without wgmma (sm_80/sm_86/sm_89: mma.sync) the accumulators take more registers: at D=128 with a
# GQA group of 7 the forward spilled 44-116 B at 64x32/4 warps and up, dQ 152 B at 64x32.
_AMPERE_CONFIGS = {
    "fwd": [(32, 32, 4, 1)],
    "dq": [(32, 32, 4, 1), (32, 16, 4, 1)],
    "dkdv": [(16, 32, 4, 1), (16, 16, 4, 1)],
}
# A window's masks and the soft-cap's tanh(s) (live through the backward) cost registers. On sm_90 at
# D=128: dK/dV 16x128 spills 40 B with a window, 20-32 B with both; the forward's 128x64/8 warps/2
# stages 64 B with a window (group 7) and 32x32 4 B with both; dQ 64x64/8 warps 32 B with both,
# 32x16 8 B with a window (group 1) and, with triton 3.6, 32x32 4 B (D=64, group 7).
_FEATURE_DROPS = {"fwd": {(128, 64, 8, 2), (32, 32, 4, 1)},
                  "dq": {(64, 64, 8, 2), (32, 16, 4, 1)},
                  "dkdv": {(16, 128, 8, 2)}}
# With a soft-cap on top, triton 3.6 spilled 4 B in the forward's 128x64/8 warps/3 stages (group 7).
_SOFTCAP_DROPS = {"fwd": {(128, 64, 8, 3)}}
# fp32 runs as 3xTF32 (three MMAs per tile, operands split in registers): only small tiles stay
# spill-free at D=128 (fwd 32x32: 84 B spilled, 64x32: 300 B; dK/dV 32x16: 8 B, 16x32: 900 B; dQ
# 16x16 and 16x32 with 4 warps spilled 4-12 B at D=64 or 128 depending on group and flags, 8 warps
# none; dK/dV 16x16 with 4 warps 8-40 B with a window under triton 3.6, with 8 warps none). They use
# mma.sync TF32 tensor cores on both architectures.
_FP32_CONFIGS = {
    "fwd": [(16, 32, 4, 1)],
    "dq": [(16, 32, 8, 1)],
    "dkdv": [(16, 16, 8, 1)],
}
# On sm_90, bf16/fp16 dK/dV run as two launches, one per gradient ("dk", "dv"): with one fp32
# accumulator instead of two a program keeps 16-32 query rows x 64-128 keys on wgmma without
# spilling, where the fused kernel fits only 16x128 (plain causal) or 16x16 without wgmma (with a
# window or a soft-cap). dV keeps 32 query rows in every case, dK 16. The price:
# the scores are computed twice and q/dO read twice (5 MMAs per tile pair instead of 4). dK needs dP
# too and stays nearer the limit: at group 7, 32x64 spilled 56-120 B (any stage count), 32x128 4-28 B
# (1-3 stages; 3 stages only under window + soft-cap with triton 3.9, also plain with 3.6). dV
# 32x128 spilled 8 B under window + soft-cap with triton 3.6.
_HOPPER_SPLIT_CONFIGS = {
    "dk": [(16, 128, 8, 2), (16, 64, 8, 2)],
    "dv": [(32, 128, 8, 2), (32, 64, 8, 2)],
}
_FEATURE_DROPS["dk"] = set()
_FEATURE_DROPS["dv"] = set()
_SOFTCAP_DROPS["dv"] = {(32, 128, 8, 2)}


def split_dkdv(capability: int, dtype: torch.dtype) -> bool:
    """Whether dK and dV are computed by separate launches (see _HOPPER_SPLIT_CONFIGS)."""
    return capability >= 90 and dtype != torch.float32


def launch_configs(name: str, capability: int, head_dim: int, dtype: torch.dtype, window: bool = False,
                   softcap: bool = False) -> list[tuple[int, int, int, int]]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) configs kernel ``name`` ("fwd", "dq", "dkdv", or the
    split backward's "dk" and "dv") may be launched with on sm_<capability> for this head dim, dtype
    and features (never empty)."""
    if dtype == torch.float32:  # never split (split_dkdv)
        return list(_FP32_CONFIGS.get(name, _FP32_CONFIGS["dkdv"]))
    if name in _HOPPER_SPLIT_CONFIGS:
        configs = _HOPPER_SPLIT_CONFIGS[name]
    else:
        configs = (_HOPPER_CONFIGS if capability >= 90 else _AMPERE_CONFIGS)[name]
    if head_dim > 128:
        return configs[-1:]  # shared memory and registers grow with D: the smallest tile only
    if window or softcap:
        configs = [c for c in configs if c not in _FEATURE_DROPS[name]] or configs[-1:]
    if softcap:
        configs = [c for c in configs if c not in _SOFTCAP_DROPS.get(name, ())] or configs[-1:]
    return list(configs)


def _configs(pairs: list[tuple[int, int, int, int]]) -> list:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs
    ]


def _config_tuple(config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _prune_for(name: str, configs: list, meta: dict, capability: int) -> list:
    """``configs`` restricted to ``launch_configs`` for kernel ``name``'s meta-parameters on
    sm_<capability>."""
    dtype = torch.float32 if meta.get("DOT_PRECISION") == _dot_precision(torch.float32) else torch.bfloat16
    wanted = launch_configs(name, capability, meta.get("HEAD_DIM", 128), dtype,
                            bool(meta.get("HAS_WINDOW")), bool(meta.get("HAS_SOFTCAP")))
    held = {_config_tuple(c): c for c in configs}
    kept = [held[t] for t in wanted if t in held]  # in launch_configs's order
    return kept or configs[-1:]


def _all_configs(name: str) -> list[tuple[int, int, int, int]]:
    """Every config kernel ``name``'s autotuner holds; each launch prunes them to ``launch_configs``."""
    if name in _HOPPER_SPLIT_CONFIGS:
        return list(_HOPPER_SPLIT_CONFIGS[name])
    return list(dict.fromkeys(_HOPPER_CONFIGS[name] + _AMPERE_CONFIGS[name] + _FP32_CONFIGS[name]))


# SOULCHAT_TRITON_AUTOTUNE=0 keeps only the first config of each list (the compile table's best
# guess): one compile per key instead of up to four, for time-boxed runs such as bench/device_check.py
# (one attention key took ~31 s to autotune with triton 3.6 over the former 17 configs).
AUTOTUNE_ENV = "SOULCHAT_TRITON_AUTOTUNE"


def _prune_configs(name: str, configs: list, named_args: dict, **kwargs) -> list:
    """The autotuner's early prune (before anything is compiled or timed): ``launch_configs`` here."""
    major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    kept = _prune_for(name, configs, {**named_args, **kwargs}, 10 * major + minor)
    return kept[:1] if os.environ.get(AUTOTUNE_ENV, "1") == "0" else kept


@functools.cache
def _tuned_kernels() -> dict:
    """Autotuned wrappers of the kernels, built on first CUDA use (never under the interpreter)."""

    def tuned(name, kernel, key=_FLAG_KEY):
        prune = {"early_config_prune": functools.partial(_prune_configs, name)}
        return triton.autotune(_configs(_all_configs(name)), key=key, prune_configs_by=prune)(kernel)

    return {
        "fwd": tuned("fwd", _varlen_attention_fwd_kernel, key=[*_FLAG_KEY, "PACK"]),
        "dkdv": tuned("dkdv", _varlen_attention_bwd_dkdv_kernel),
        "dk": tuned("dk", _varlen_attention_bwd_dkdv_kernel),
        "dv": tuned("dv", _varlen_attention_bwd_dkdv_kernel),
        "dq": tuned("dq", _varlen_attention_bwd_dq_kernel, key=[*_FLAG_KEY, "PACK"]),
    }


def _kernel(name: str, plain) -> tuple[object, dict]:
    """The kernel to launch and the meta-parameters to pass it (none when autotuned)."""
    if triton_interpreted():
        return plain, dict(_INTERPRETER_BLOCKS[name])
    return _tuned_kernels()[name], {}


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs run on tensor cores as 3xTF32: each operand is split into a TF32 head and a TF32
    remainder and three TF32 products are summed in fp32 (head*head + head*rest + rest*head). The
    dropped rest*rest term and the remainders' own rounding leave a relative error per product of about
    2**-21 (plain TF32: 2**-11, ~1e-3), so fp32 attention stays within a few fp32 roundings of exact
    products, at three tensor-core MMAs per tile instead of the scalar FMA loops of "ieee" (which on
    sm_90 compiled to no tensor-core instruction and spilled 50-110 KB per thread at D=128). On a GPU
    tests/test_varlen_attention.py holds fp32 outputs and gradients to 1e-4 of the reference, which
    plain TF32 (~1e-3) would miss; the interpreter computes dots in fp32 whatever the setting, and
    tests/test_hopper_compile.py checks the PTX uses TF32 MMAs. fp16/bf16 ignore the setting."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _dkdv_launches(q: torch.Tensor) -> tuple[str, ...]:
    """("dk", "dv") where the backward splits them (Hopper, bf16/fp16), else ("dkdv",)."""
    if q.is_cuda:
        major, minor = torch.cuda.get_device_capability(q.device)
        if split_dkdv(10 * major + minor, q.dtype):
            return ("dk", "dv")
    return ("dkdv",)


def _forward_pack(group: int) -> int:
    """Query heads of one group the forward serves per program: the largest divisor of the group up to
    _MAX_PACK (Qwen2.5's 7 -> 7, 14 -> 14, 32 -> 16), so a tile keeps >= BLOCK_M / 16 positions."""
    return max(d for d in range(1, min(group, _MAX_PACK) + 1) if group % d == 0)


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    # ~4 programs per SM keep every SM busy through the uneven tail of a varlen row; the interpreter
    # has no SMs, and a small number there makes the CPU tests cut GQA groups into parts.
    if device.type != "cuda":
        return 8
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _dkdv_heads_per_part(group: int, total: int, num_kv_heads: int, device: torch.device) -> int:
    """Query heads each dK/dV program sums over. Key blocks x kv heads alone give few programs for
    large GQA groups (T=4096, Hkv=2: 128 programs of 7 heads each on a 132-SM H100), so the group is
    cut into parts, each summed into its own fp32 buffer and added in a fixed order afterwards."""
    base = max(1, triton.cdiv(total, 64) * num_kv_heads)
    parts = min(group, max(1, triton.cdiv(_programs_wanted(device), base)))
    return triton.cdiv(group, parts)


def _feature_args(softmax_scale: float, window: int, softcap: float) -> dict:
    """Kernel arguments for the window (0: none) and soft-cap (0.0: none)."""
    return dict(
        cap_scale=softmax_scale / softcap if softcap else 0.0,
        cap_log2e=softcap * _LOG2E,
        window=window,
        HAS_WINDOW=window > 0,
        HAS_SOFTCAP=softcap > 0,
    )


def _check_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: int, causal: bool, window: int, softcap: float) -> None:
    _check_inputs(q, k, v, cu_seqlens)
    _check_features(causal, window or None, softcap or None)
    if triton is None or not triton_runs_on(q.device):
        raise RuntimeError(
            f"{_WHERE}: the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported); got {q.device}. Use the reference backend instead."
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{_WHERE}: the Triton kernels take fp16, bf16 or fp32 inputs, not {q.dtype}")
    if q.shape[2] > 256:
        raise ValueError(f"{_WHERE}: head dim {q.shape[2]} > 256 is not supported by the Triton kernels")
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(
            f"{_WHERE}: max_seqlen must be a non-negative host int (the longest conversation), got "
            f"{max_seqlen!r}; take it from the packed micro-batch, not from a device tensor"
        )


def _check_cu_seqlens_on_host(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """Full boundary check when cu_seqlens is a CPU tensor (free there; on CUDA it would cost a sync).

    The kernels themselves stay right with an understated max_seqlen (each program loops over its
    conversation's blocks with the grid's stride), but flash-attn and torch's varlen_attn do not:
    a wrong value is refused wherever that costs nothing.
    """
    if cu_seqlens.device.type != "cpu":
        return
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != total or min(lengths, default=0) < 0:
        raise ValueError(
            f"{_WHERE}: cu_seqlens must rise from 0 to T={total}; got {bounds[:4]}...{bounds[-2:]}"
        )
    if max(lengths, default=0) > max_seqlen:
        raise ValueError(
            f"{_WHERE}: max_seqlen={max_seqlen} is below the longest conversation ({max(lengths)} tokens); "
            f"pass the micro-batch's max_seqlen"
        )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # Token and head strides are passed to the kernels; only the head dim must be dense.
    return x if x.stride(-1) == 1 else x.contiguous()


def _blocks(length: int, block: int) -> int:
    # At least one program per conversation even for max_seqlen=0: the kernels loop to the real length.
    return max(1, triton.cdiv(length, block))


def varlen_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
    causal: bool = True,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward. Returns out [T, Hq, D] (q's dtype) and the log-sum-exp lse [Hq, T] fp32 (of the
    capped scores). ``window`` 0 and ``softcap`` 0.0 mean none."""
    _check_triton(q, k, v, cu_seqlens, max_seqlen, causal, window, softcap)
    _check_cu_seqlens_on_host(cu_seqlens, q.shape[0], max_seqlen)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    total, num_q_heads, head_dim = q.shape
    num_seqs = cu_seqlens.numel() - 1
    out = torch.empty((total, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((num_q_heads, total), dtype=torch.float32, device=q.device)
    if total == 0 or num_seqs == 0:
        return out, lse
    cu_seqlens = cu_seqlens.contiguous()
    group = num_q_heads // k.shape[1]
    pack = _forward_pack(group)
    kernel, meta = _kernel("fwd", _varlen_attention_fwd_kernel)

    def grid(m):
        return (_blocks(max_seqlen, m["BLOCK_M"] // pack), num_seqs, num_q_heads // pack)

    kernel[grid](
        q, k, v, out, lse, cu_seqlens,
        qk_scale=softmax_scale * _LOG2E,
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
        stride_vt=v.stride(0), stride_vh=v.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_lh=lse.stride(0),
        GROUP=group,
        PACK=pack,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        CAUSAL=causal,
        DOT_PRECISION=_dot_precision(q.dtype),
        **_feature_args(softmax_scale, window, softcap),
        **meta,
    )
    return out, lse


def varlen_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
    causal: bool = True,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: (dq, dk, dv) shaped and typed like (q, k, v)."""
    _check_triton(q, k, v, cu_seqlens, max_seqlen, causal, window, softcap)
    if grad_out.shape != q.shape or out.shape != q.shape:
        raise ValueError(
            f"{_WHERE}: grad_out {tuple(grad_out.shape)} and out {tuple(out.shape)} must match "
            f"q {tuple(q.shape)}"
        )
    if lse.shape != (q.shape[1], q.shape[0]) or lse.dtype != torch.float32:
        raise ValueError(
            f"{_WHERE}: lse must be the fp32 [Hq, T] log-sum-exp from varlen_attention_fwd; "
            f"got {lse.dtype} {tuple(lse.shape)}"
        )
    q, k, v, out, grad_out = (_last_dim_contiguous(x) for x in (q, k, v, out, grad_out))
    grad_out = grad_out.to(q.dtype)
    lse = lse.contiguous()
    cu_seqlens = cu_seqlens.contiguous()
    total, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    num_seqs = cu_seqlens.numel() - 1
    dq = torch.empty((total, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if total == 0 or num_seqs == 0:
        return dq, torch.zeros_like(k), torch.zeros_like(v)
    block_d = triton.next_power_of_2(head_dim)
    group = num_q_heads // num_kv_heads

    # delta: [Hq, T] fp32
    delta = torch.empty_like(lse)
    pre_block = 16 if triton_interpreted() else 64
    _varlen_attention_bwd_preprocess_kernel[(triton.cdiv(total, pre_block), num_q_heads)](
        out, grad_out, delta, total,
        out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1), delta.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=pre_block,
    )

    common = dict(
        qk_scale=softmax_scale * _LOG2E, softmax_scale=softmax_scale,
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
        stride_vt=v.stride(0), stride_vh=v.stride(1), stride_dot=grad_out.stride(0),
        stride_doh=grad_out.stride(1), stride_lh=lse.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype),
        **_feature_args(softmax_scale, window, softcap),
    )

    heads_per_part = _dkdv_heads_per_part(group, total, num_kv_heads, q.device)
    parts = triton.cdiv(group, heads_per_part)
    # One part writes dK/dV in the inputs' dtype directly; several write fp32 partial sums, added up
    # below in a fixed order (deterministic, no atomics).
    part_dtype = k.dtype if parts == 1 else torch.float32
    dk = torch.empty((parts, total, num_kv_heads, head_dim), dtype=part_dtype, device=k.device)
    dv = torch.empty_like(dk)
    def grid_kv(m):
        return (_blocks(max_seqlen, m["BLOCK_N"]), num_seqs, num_kv_heads * parts)

    for which in _dkdv_launches(q):
        kernel, meta = _kernel(which, _varlen_attention_bwd_dkdv_kernel)
        kernel[grid_kv](
            q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens,
            heads_per_part=heads_per_part,
            stride_dkp=dk.stride(0), stride_dkt=dk.stride(1), stride_dkh=dk.stride(2), PARTS=which,
            **common, **meta,
        )
    dk, dv = (x[0] if parts == 1 else x.sum(0).to(k.dtype) for x in (dk, dv))

    kernel, meta = _kernel("dq", _varlen_attention_bwd_dq_kernel)
    pack = _forward_pack(group)

    def grid_q(m):
        return (_blocks(max_seqlen, m["BLOCK_M"] // pack), num_seqs, num_q_heads // pack)

    kernel[grid_q](
        q, k, v, grad_out, lse, delta, dq, cu_seqlens,
        stride_dqt=dq.stride(0), stride_dqh=dq.stride(1), PACK=pack,
        **common, **meta,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# Custom ops, so torch.compile treats the kernels as opaque nodes with known output shapes. The
# window and soft-cap travel as plain numbers (0 / 0.0: none), which every schema version accepts.
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("soulchat::varlen_attention_fwd", mutates_args=())
def _varlen_attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
    causal: bool,
    window: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap)


@_varlen_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap):
    total, num_q_heads, head_dim = q.shape
    out = q.new_empty((total, num_q_heads, head_dim))
    lse = q.new_empty((num_q_heads, total), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("soulchat::varlen_attention_bwd", mutates_args=())
def _varlen_attention_bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
    causal: bool,
    window: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return varlen_attention_bwd(
        grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap
    )


@_varlen_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.options = (max_seqlen, softmax_scale, causal, window, softcap)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _varlen_attention_bwd_op(grad_out, q, k, v, out, lse, cu_seqlens, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None


_varlen_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Library backends and the public function.
# --------------------------------------------------------------------------------------------------

_HALF = (torch.float16, torch.bfloat16)


def _load_flash_attn_varlen_func():
    """flash-attn's varlen entry point, or None when flash-attn is missing or fails to load."""
    if not torch.cuda.is_available():
        return None
    try:
        return importlib.import_module("flash_attn").flash_attn_varlen_func
    except Exception:  # ImportError, or a binary built for another torch/CUDA
        return None


def _load_torch_varlen_attn():
    try:
        return importlib.import_module("torch.nn.attention.varlen").varlen_attn
    except (ImportError, AttributeError):
        return None


# Resolved once at import, not per call: torch.compile then sees plain module constants instead of
# tracing imports and signature inspection.
_FLASH_VARLEN_FUNC = _load_flash_attn_varlen_func()
_TORCH_VARLEN_ATTN = _load_torch_varlen_attn()


def _parameters(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters) if fn is not None else frozenset()


_FLASH_PARAMS = _parameters(_FLASH_VARLEN_FUNC)
_TORCH_VARLEN_PARAMS = _parameters(_TORCH_VARLEN_ATTN)


def _flash_kernels_fit(q: torch.Tensor) -> bool:
    """Flash-attention 2 kernels (flash-attn or PyTorch's copy): sm80+, fp16/bf16, D % 8 == 0, D <= 256."""
    if not q.is_cuda or q.dtype not in _HALF or q.shape[-1] % 8 != 0 or q.shape[-1] > 256:
        return False
    return torch.cuda.get_device_capability(q.device)[0] >= 8


def _flash_available(q: torch.Tensor) -> bool:
    return _flash_kernels_fit(q) and _FLASH_VARLEN_FUNC is not None


def _torch_varlen_available(q: torch.Tensor) -> bool:
    return (
        _flash_kernels_fit(q)
        and _TORCH_VARLEN_ATTN is not None
        and torch.backends.cuda.is_flash_attention_available()
    )


def _triton_available(q: torch.Tensor) -> bool:
    # The one rule for every op (dispatch.triton_usable: CUDA, or the interpreter when forced, never
    # bf16 there), plus the kernels' own limit on the head dim.
    return triton_usable("attention", q.device, q.dtype) and q.shape[-1] <= 256


def _flash_window_size(causal: bool, window: int | None) -> tuple[int, int]:
    """flash-attention's (left, right) key counts around the query: a window of W keys, the query
    included, is W - 1 keys to the left; -1 is unbounded."""
    if window is not None:
        return (window - 1, 0)
    return (-1, 0) if causal else (-1, -1)


def _missing_feature(backend: str, window: int | None, softcap: float | None) -> str | None:
    """Why ``backend`` cannot compute this window/softcap exactly here, or None when it can."""
    if backend == "flash":
        if window is not None and "window_size" not in _FLASH_PARAMS:
            return "sliding windows need flash-attn >= 2.3 (window_size)"
        if softcap is not None and "softcap" not in _FLASH_PARAMS:
            return "attention soft-capping needs flash-attn >= 2.6 (softcap)"
    if backend == "torch_varlen":
        if softcap is not None:
            return "torch.nn.attention.varlen.varlen_attn has no attention soft-capping"
        if window is not None and "window_size" not in _TORCH_VARLEN_PARAMS:
            return "this torch's varlen_attn has no window_size (torch >= 2.10 has one)"
    return None


def _flash(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap) -> torch.Tensor:
    kwargs: dict = {"dropout_p": 0.0, "softmax_scale": softmax_scale, "causal": causal}
    # Only the features asked for are passed, so flash-attn releases without them still run the rest.
    if window is not None:
        kwargs["window_size"] = _flash_window_size(causal, window)
    if softcap is not None:
        kwargs["softcap"] = softcap
    return _FLASH_VARLEN_FUNC(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window) -> torch.Tensor:
    params = _TORCH_VARLEN_PARAMS
    kwargs: dict = {"scale": softmax_scale}
    # torch >= 2.10 spells causal as window_size=(-1, 0); earlier releases had is_causal.
    if "window_size" in params:
        kwargs["window_size"] = _flash_window_size(causal, window)
    else:
        kwargs["is_causal"] = causal
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # no native GQA: share kv heads by copying them (costs memory, stays correct)
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return _TORCH_VARLEN_ATTN(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


_BACKEND_DEVICE_CHECKS = {
    "flash": _flash_available,
    "torch_varlen": _torch_varlen_available,
    "triton": _triton_available,
    "reference": lambda q: True,
}


def varlen_attention_backend(q: torch.Tensor, window: int | None = None, softcap: float | None = None) -> str:
    """The backend ``varlen_attention`` uses for inputs like ``q`` and these features (for logs and
    benchmarks). A backend that cannot compute the window/softcap exactly is never chosen; forced, it
    raises with the reason."""
    forced = forced_backend("attention")
    if forced in _BACKEND_DEVICE_CHECKS:
        missing = _missing_feature(forced, window, softcap)
        if missing is not None:
            raise RuntimeError(
                f"{_WHERE}: the attention backend {forced!r} was forced (set_backend or "
                f"SOULCHAT_ATTENTION_BACKEND) but cannot do window={window}, softcap={softcap}: {missing}. "
                f"Unset the override or force triton or reference."
            )
    return resolve_backend(
        "attention",
        [
            (name, functools.partial(_backend_fits, name, q, window, softcap))
            for name in _BACKEND_DEVICE_CHECKS
        ],
    )


def _backend_fits(name: str, q: torch.Tensor, window: int | None, softcap: float | None) -> bool:
    return _BACKEND_DEVICE_CHECKS[name](q) and _missing_feature(name, window, softcap) is None


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention within each packed conversation. q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D].

    ``cu_seqlens`` int32 [S+1] rises from 0 to T; ``max_seqlen`` is the longest conversation (a host
    int from packing, so no device sync). Never understate it: the Triton kernels stay right (only
    slower) and refuse it when cu_seqlens is on the CPU, where checking is free, but flash-attn and
    torch's varlen_attn trust it. ``softmax_scale`` defaults to 1/sqrt(D). ``window`` (keys a query
    sees, itself included: HF ``sliding_window``; causal only) and ``softcap`` (scores = softcap *
    tanh(scores / softcap), Gemma 2) are optional; see the module docstring. The backend is chosen by
    ``soulchat.kernels.dispatch`` among those that can compute the features asked for (override: env
    ``SOULCHAT_ATTENTION_BACKEND`` or
    ``set_backend("attention", name)`` with flash | torch_varlen | triton | reference).
    """
    _check_inputs(q, k, v, cu_seqlens)
    _check_features(causal, window, softcap)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    backend = varlen_attention_backend(q, window, softcap)
    if backend == "flash":
        return _flash(q, k, v, cu_seqlens, max_seqlen, scale, causal, window, softcap)
    if backend == "torch_varlen":
        return _torch_varlen(q, k, v, cu_seqlens, max_seqlen, scale, causal, window)
    if backend == "triton":
        features = (int(window or 0), float(softcap or 0.0))  # the custom op's "none": 0 and 0.0
        out, _ = _varlen_attention_fwd_op(
            q, k, v, cu_seqlens, int(max_seqlen), float(scale), bool(causal), *features
        )
        return out
    return varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, scale, causal, window, softcap)
