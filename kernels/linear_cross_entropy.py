"""Fused lm-head + cross-entropy on the trained (counselor) positions only.

The caller gathers the final hidden states at the positions that carry a label (``loss_index`` of the
packed micro-batch), so this op only ever sees ``hidden: [N, H]`` with N = trained tokens, never the
full [T, H] row. It returns the WEIGHTED LOSS SUM

    sum_i w_i * (lse_i - s_i[t_i] + z_loss * lse_i^2),   s = softcap * tanh(z / softcap) (or s = z),
                                                          z = logit_scale * (hidden @ weight.T),
                                                          lse = logsumexp(s)

as a 0-dim fp32 tensor; the trainer divides by the global sum of weights.

The full [N, V] logits are never built. Rows are processed in chunks whose logits fit a byte budget
(``LOGITS_CHUNK_BYTES``); for each chunk:

    logits = hidden_chunk @ weight.T               (torch / cuBLAS, GEMM dtype, fp32 accumulate)
    a kernel computes per row the online log-sum-exp over vocab blocks, the row loss, and overwrites
        the logits buffer with dloss/dlogits     (softmax - onehot, times w, softcap + z-loss chain rule)
    grad_hidden[chunk] = dlogits @ weight
    grad_weight       += dlogits.T @ hidden_chunk

All of it happens in the forward; the backward only scales the saved gradients by grad_output. So
the peak extra memory is one chunk of logits plus the gradients themselves (measured in
bench/bench_linear_cross_entropy.py against full logits + F.cross_entropy).

Precision: the row math (max, sum of exponentials, log, loss) is fp32. The GEMMs run in the autocast
dtype under autocast (fp32 master weights: bf16 GEMMs, ~12x faster than fp32 on an H100 for the
~26.8 TFLOP of N=8,192, H=3,584, V=151,936), else in hidden's dtype, with fp32 accumulation inside each
GEMM. grad_weight is summed across chunks in the wider of the weight's and the GEMM dtype (fp32 master
weights: fp32, straight from cuBLAS where torch has ``addmm(out_dtype=)``); bf16 weights sum in bf16
(one rounding per chunk, a handful with the default budget) unless ``grad_weight_dtype=torch.float32``
asks for a [V, H] fp32 accumulator (2.2 GB at V=151,936, H=3,584).

Backends (``soulchat.kernels.dispatch``, op "loss", env ``SOULCHAT_LOSS_BACKEND``):
  "triton"    the chunked algorithm with the Triton row kernel; chosen automatically on CUDA. On a CPU
              it runs under TRITON_INTERPRET=1 only when forced, never in bf16
              (``dispatch.triton_usable``; the interpreter is a test tool, far slower than "chunked").
  "chunked"   the same chunked algorithm with the row math in plain PyTorch (CPU default, baseline).
  "reference" full fp32 logits + F.cross_entropy; the truth, for tests and small inputs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from soulchat.kernels.dispatch import jit, resolve_backend, tl, triton, triton_usable

# Bytes of one chunk's logits buffer. At V=151,936 in bf16 this is ~880 rows per chunk: GEMMs of
# [880, 3584] x [3584, 151936] are already at full tensor-core efficiency, and 256 MiB is a small
# fraction of the ~15 GB that full fp32 logits + F.cross_entropy peak at for N=8,192.
LOGITS_CHUNK_BYTES = 256 * 1024 * 1024
# On the CPU a chunk and its ~2 same-size temporaries should stay near the caches: with 8 MiB the
# packed tiny-model step peaked at 181-189 MiB instead of 271-284 MiB (bench/bench_train.py), at the
# same speed.
CPU_LOGITS_CHUNK_BYTES = 8 * 1024 * 1024


def logits_chunk_bytes(device: torch.device) -> int:
    """The logits budget of one chunk on ``device`` (read at call time, so tests can patch it)."""
    return LOGITS_CHUNK_BYTES if device.type == "cuda" else CPU_LOGITS_CHUNK_BYTES


def gemm_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the three GEMMs run in: the autocast dtype where autocast is on for hidden's device
    (fp32 master weights under bf16 autocast: bf16 GEMMs, as autocast would do for ``F.linear``), else
    hidden's dtype. fp64 is never cast, as autocast never casts it."""
    device_type = hidden.device.type
    if hidden.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _check_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_weight: torch.Tensor
) -> None:
    """Shape/dtype checks that never touch device memory (no sync)."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"linear_cross_entropy: hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}; gather the hidden states at the trained positions first "
            f"(hidden[loss_index])"
        )
    n, h = hidden.shape
    if weight.shape[1] != h:
        raise ValueError(
            f"linear_cross_entropy: hidden size mismatch, hidden is [N={n}, H={h}] but weight is "
            f"{tuple(weight.shape)}; weight must be the lm-head [V, H]"
        )
    if targets.shape != (n,) or token_weight.shape != (n,):
        raise ValueError(
            f"linear_cross_entropy: targets and token_weight must be [N={n}], got "
            f"{tuple(targets.shape)} and {tuple(token_weight.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"linear_cross_entropy: targets must be int64 (or int32), got {targets.dtype}")
    if weight.shape[0] == 0:
        raise ValueError("linear_cross_entropy: weight has V=0 rows; the lm-head needs a vocabulary")


def check_target_range(targets: torch.Tensor, vocab: int) -> None:
    """Raise ValueError if any target is outside [0, V).

    Free on CPU tensors (the trainer's labels are host arrays before they are copied to the device:
    check them there, ``check_target_range(torch.from_numpy(labels[loss_index]), V)``); on CUDA tensors
    it syncs the device once.
    """
    if targets.numel() == 0:
        return
    bad = (targets < 0) | (targets >= vocab)
    if bool(bad.any()):
        n_bad = int(bad.sum())
        first = int(targets[bad][0])
        raise ValueError(
            f"linear_cross_entropy: {n_bad} target(s) outside the vocabulary [0, {vocab}), e.g. {first}; "
            f"labels must be token ids of the model's lm-head (is the tokenizer larger than the model's "
            f"vocabulary, or was an ignore index like -100 left in after gathering?)"
        )


# ----------------------------------------------------------------------------------------------------
# Reference: full logits in fp32 (fp64 for fp64 inputs) + F.cross_entropy. The truth.
# ----------------------------------------------------------------------------------------------------


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weight: torch.Tensor,
    softcap: float | None = None,
    z_loss: float = 0.0,
    *,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """Weighted loss sum with the full [N, V] logits; differentiable by autograd.

    Computes in fp32 (fp64 when the inputs are fp64, so tests can build an fp64 truth) whatever the
    autocast state (the caller casts the operands first where it wants them rounded); returns a 0-dim
    tensor in that dtype. Checks the targets (one device sync on CUDA: a test tool).
    """
    _check_inputs(hidden, weight, targets, token_weight)
    check_target_range(targets, weight.shape[0])
    compute = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        # logits: [N, V]
        logits = hidden.to(compute) @ weight.to(compute).T
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ce = F.cross_entropy(logits, targets.long(), reduction="none")  # [N]
    per_token = ce
    if z_loss:
        per_token = per_token + z_loss * torch.logsumexp(logits, dim=-1).square()
    return (token_weight.to(compute) * per_token).sum()


# ----------------------------------------------------------------------------------------------------
# Triton row kernel: online log-sum-exp, row loss, and dloss/dlogits written over the logits.
# ----------------------------------------------------------------------------------------------------


@jit
def _tanh(x):
    # tanh from exp: stable at both ends (exp -> inf gives 1, exp -> 0 gives -1) and avoids
    # libdevice, which the interpreter cannot run.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@jit
def _linear_cross_entropy_fwd_kernel(
    logits_ptr,  # [n, V] input dtype; overwritten with dloss/dlogits when COMPUTE_GRAD
    targets_ptr,  # [n] int64
    token_weight_ptr,  # [n] fp32
    loss_ptr,  # [n] fp32 out: w * (lse - s[target] + z_loss * lse^2)
    stride_row,
    V,
    logit_scale,
    softcap,
    z_loss,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # One program per row. int64 row offset: n * V exceeds 2^31 for big chunks at V=151,936.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    w = tl.load(token_weight_ptr + row)
    cols = tl.arange(0, BLOCK_V)

    # Pass 1: running max m and running sum d of exp(s - m) over vocab blocks.
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        s = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32) * logit_scale
        if HAS_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)

    # Target logit, read before pass 2 overwrites the row. An out-of-range target (the range is not
    # checked on the device: no sync) never reads out of bounds; its weight becomes NaN, so its loss
    # and its whole gradient row are NaN (and with it d_weight): loud, never silently wrong.
    valid = (target >= 0) & (target < V)
    w = tl.where(valid, w, float("nan"))
    s_t = tl.load(row_ptr + target, mask=valid, other=0.0).to(tl.float32) * logit_scale
    if HAS_SOFTCAP:
        s_t = softcap * _tanh(s_t / softcap)
    loss = w * (lse - s_t + z_loss * lse * lse)
    tl.store(loss_ptr + row, loss)

    if COMPUTE_GRAD:
        # dloss/ds_j = w * ((1 + 2 z lse) p_j - [j == t]);  ds/dz = 1 - tanh^2 under softcap;
        # dz/dlogits = logit_scale.
        scale = w * (1.0 + 2.0 * z_loss * lse)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            z = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32) * logit_scale
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                s = softcap * t
            else:
                s = z
            g = scale * tl.exp(s - lse) - tl.where(offs == target, w, 0.0)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            g = g * logit_scale
            tl.store(row_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _rows_triton(
    logits: torch.Tensor,
    targets: torch.Tensor,
    token_weight: torch.Tensor,
    loss_out: torch.Tensor,
    logit_scale: float,
    softcap: float | None,
    z_loss: float,
    compute_grad: bool,
    block_v: int | None = None,
) -> None:
    """Row loss into ``loss_out`` and (if compute_grad) dloss/dlogits over ``logits``, via Triton."""
    n, vocab = logits.shape
    if n == 0:
        return
    default_block_v, _ = row_kernel_blocks(vocab)
    block_v = block_v or default_block_v
    _linear_cross_entropy_fwd_kernel[(n,)](
        logits,
        targets,
        token_weight,
        loss_out,
        logits.stride(0),
        vocab,
        float(logit_scale),
        float(softcap) if softcap is not None else 1.0,
        float(z_loss),
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )


def row_kernel_blocks(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the row kernel for a vocabulary of ``vocab``."""
    # 4096 fp32 lanes per block keeps a row's loop at ~37 iterations for V=151,936 with 8 warps.
    block_v = min(4096, triton.next_power_of_2(vocab))
    return block_v, 8 if block_v >= 2048 else 4


def _rows_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    token_weight: torch.Tensor,
    loss_out: torch.Tensor,
    logit_scale: float,
    softcap: float | None,
    z_loss: float,
    compute_grad: bool,
    block_v: int | None = None,
) -> None:
    """The same row math as the Triton kernel in plain PyTorch (fp32 temporaries of one chunk)."""
    del block_v
    if logits.shape[0] == 0:
        return
    # s: [n, V] fp32
    s = logits.float()
    if logit_scale != 1.0:
        # in place on the fp32 copy of bf16/fp16 logits; out of place when s aliases fp32 logits
        s = s.mul_(logit_scale) if s is not logits else s * logit_scale
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s = softcap * t
    lse = torch.logsumexp(s, dim=-1)  # [n]
    # As in the kernel: an out-of-range target reads a clamped index and gets a NaN weight (no sync).
    valid = (targets >= 0) & (targets < s.shape[1])
    targets = targets.clamp(0, s.shape[1] - 1)
    token_weight = torch.where(valid, token_weight, float("nan"))
    s_t = s.gather(1, targets[:, None]).squeeze(1)
    loss_out.copy_(token_weight * (lse - s_t + z_loss * lse * lse))
    if compute_grad:
        g = torch.exp(s.sub_(lse[:, None])).mul_((token_weight * (1.0 + 2.0 * z_loss * lse))[:, None])
        g.scatter_add_(1, targets[:, None], -token_weight[:, None])
        if softcap is not None:
            g.mul_(1.0 - t * t)
        if logit_scale != 1.0:
            g.mul_(logit_scale)
        logits.copy_(g)


_ROW_FNS = {"triton": _rows_triton, "chunked": _rows_torch}


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def chunk_rows(n: int, vocab: int, itemsize: int, budget_bytes: int | None = None) -> int:
    """Rows per chunk so that one chunk's [rows, V] logits fit ``budget_bytes`` (at least one row).

    The chunks are then balanced (8,192 rows at 883 max -> 10 chunks of 820, not 9 x 883 + 245).
    """
    if n <= 0:
        return 0
    budget_bytes = LOGITS_CHUNK_BYTES if budget_bytes is None else budget_bytes
    rows = max(1, min(n, budget_bytes // max(1, vocab * itemsize)))
    n_chunks = math.ceil(n / rows)
    return math.ceil(n / n_chunks)


def _chunk_logits(hidden_chunk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """logits: [n, V] = hidden_chunk @ weight.T (the only [*, V] allocation of the op)."""
    return hidden_chunk @ weight.T


@functools.cache
def _gemm_accumulates_into_fp32(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc_fp32, a, b, out_dtype=torch.float32, out=acc_fp32)`` works here for
    ``dtype`` operands (bf16/fp16 on CUDA builds of torch >= 2.8: cuBLAS writes the fp32 sum straight
    into the accumulator).

    Probed once per process on a 2 x 2 case shaped like the real call (a transposed first operand,
    the accumulator as both input and output) with exact small integers: one device sync, once.
    """
    if device_type != "cuda":
        return False
    try:
        x = torch.ones(3, 2, device=device_type, dtype=dtype)  # like dlogits / h_chunk: [n, *]
        acc = torch.ones(2, 2, device=device_type, dtype=torch.float32)
        torch.addmm(acc, x.T, x, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return bool((acc == 4).all())  # 1 + (three products of 1)


def _add_chunk_grad_weight(d_weight: torch.Tensor, dlogits: torch.Tensor, h_chunk: torch.Tensor) -> None:
    """d_weight += dlogits.T @ h_chunk, summed across chunks in d_weight's dtype.

    dlogits: [n, V] and h_chunk: [n, H] in the GEMM dtype; d_weight: [V, H]. With a wider accumulator
    (fp32 over bf16 GEMMs) cuBLAS adds the fp32 product into it directly where torch can; elsewhere
    (CPU) each chunk's product is rounded once to the GEMM dtype and then added in fp32 (one [V, H]
    temporary in the GEMM dtype).
    """
    if d_weight.dtype == dlogits.dtype:
        d_weight.addmm_(dlogits.T, h_chunk)
    elif d_weight.dtype == torch.float32 and _gemm_accumulates_into_fp32(d_weight.device.type, dlogits.dtype):
        torch.addmm(d_weight, dlogits.T, h_chunk, out_dtype=torch.float32, out=d_weight)
    else:
        d_weight.add_(dlogits.T @ h_chunk)


# ----------------------------------------------------------------------------------------------------
# The lm-head in the GEMM dtype, made once per optimizer step
# ----------------------------------------------------------------------------------------------------

# One slot: (weakref to the weight, its version counter, dtype, the cast copy). Filled only inside
# weight_cast_scope(); None outside it.
_cast_slot: list | None = None


@contextlib.contextmanager
def weight_cast_scope() -> Iterator[None]:
    """Reuse the lm-head's cast to the GEMM dtype across the calls inside this block.

    fp32 master weights under bf16 autocast need a bf16 copy of the [V, H] head for the GEMMs (1.09 GB
    at V=151,936, H=3,584; reading 4 and writing 2 bytes per element each time). Without a scope every
    call makes its own. A trainer opens one scope per optimizer step around its micro-batches, so the
    copy is made once per step and freed when the scope closes. A cached copy is used only for the very
    same tensor at the same version counter: an in-place update inside the scope (an optimizer step, a
    load) makes a fresh copy, never a stale one.
    """
    global _cast_slot
    previous, _cast_slot = _cast_slot, []
    try:
        yield
    finally:
        _cast_slot = previous


def _cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.to(dtype).contiguous()


def _gemm_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [V, H] in ``dtype``, contiguous: itself when it already is, else a cast copy (cached for
    the enclosing weight_cast_scope, if any)."""
    if weight.dtype == dtype:
        return weight.contiguous()
    if _cast_slot is None:
        return _cast_weight(weight, dtype)
    if _cast_slot:
        ref, version, cached_dtype, cast = _cast_slot
        if ref() is weight and version == weight._version and cached_dtype == dtype:
            return cast
    cast = _cast_weight(weight, dtype)
    _cast_slot[:] = [weakref.ref(weight), weight._version, dtype, cast]
    return cast


def linear_cross_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weight: torch.Tensor,
    softcap: float | None = None,
    z_loss: float = 0.0,
    *,
    logit_scale: float = 1.0,
    grad_hidden: bool = True,
    grad_weight: bool = True,
    backend: str = "triton",
    chunk_size: int | None = None,
    block_v: int | None = None,
    compute_dtype: torch.dtype | None = None,
    grad_weight_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss sum and (unscaled) gradients, chunk by chunk.

    hidden: [N, H], weight: [V, H], targets: [N] int64, token_weight: [N] fp32. The GEMMs run in
    ``compute_dtype`` (default: hidden's dtype; both operands are cast to it) with fp32 accumulation
    inside each GEMM; the row math is fp32. d_weight is summed across chunks in ``grad_weight_dtype``
    (default: the wider of weight's dtype and compute_dtype, so fp32 master weights accumulate in fp32).
    Returns (loss: 0-dim fp32, d_hidden: [N, H] | None in hidden's dtype, d_weight: [V, H] | None in
    weight's dtype), gradients of the loss sum. ``backend`` picks the row math: "triton" or "chunked".
    """
    row_fn = _ROW_FNS[backend]
    n = hidden.shape[0]
    vocab = weight.shape[0]
    dtype = compute_dtype or hidden.dtype
    accumulate = grad_weight_dtype or torch.promote_types(weight.dtype, dtype)
    h_all = hidden.to(dtype).contiguous()  # [N, H]
    w_all = _gemm_weight(weight, dtype)  # [V, H]: a copy when the dtypes differ, reused in a cast scope
    targets = targets.contiguous().long()
    token_weight = token_weight.contiguous().float()
    compute_grad = grad_hidden or grad_weight

    loss_rows = torch.empty(n, dtype=torch.float32, device=hidden.device)  # [N]
    d_hidden = torch.empty_like(h_all) if grad_hidden else None  # [N, H]
    d_weight = torch.zeros_like(w_all, dtype=accumulate) if grad_weight else None  # [V, H]
    budget = logits_chunk_bytes(hidden.device)
    rows = max(1, chunk_size or chunk_rows(n, vocab, h_all.element_size(), budget))  # N = 0: no chunk runs
    for start in range(0, n, rows):
        end = min(n, start + rows)
        h_chunk = h_all[start:end]
        # logits: [rows, V], overwritten in place by dloss/dlogits
        logits = _chunk_logits(h_chunk, w_all)
        row_fn(
            logits,
            targets[start:end],
            token_weight[start:end],
            loss_rows[start:end],
            logit_scale,
            softcap,
            z_loss,
            compute_grad,
            block_v,
        )
        if d_hidden is not None:
            torch.mm(logits, w_all, out=d_hidden[start:end])
        if d_weight is not None:
            _add_chunk_grad_weight(d_weight, logits, h_chunk)
        del logits
    d_hidden = d_hidden.to(hidden.dtype) if d_hidden is not None else None
    d_weight = d_weight.to(weight.dtype) if d_weight is not None else None
    return loss_rows.sum(), d_hidden, d_weight


def linear_cross_entropy_bwd(
    grad_output: torch.Tensor, d_hidden: torch.Tensor | None, d_weight: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Chain rule for a scalar output: scale the saved gradients in place (no new [V, H] buffer).

    A bf16/fp16 gradient is multiplied by grad_output rounded to its dtype: exact when grad_output is
    1 (the normaliser folded into token_weight) or a power of 2; fp32 gradients are scaled in fp32.
    """
    scale = grad_output.float()
    if d_hidden is not None:
        d_hidden.mul_(scale.to(d_hidden.dtype))
    if d_weight is not None:
        d_weight.mul_(scale.to(d_weight.dtype))
    return d_hidden, d_weight


# ----------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        token_weight: torch.Tensor,
        fwd_options: dict,
    ) -> torch.Tensor:
        # The dtypes are decided by the caller (compute_dtype); autocast must not recast our GEMMs.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            loss, d_hidden, d_weight = linear_cross_entropy_fwd(
                hidden,
                weight,
                targets,
                token_weight,
                **fwd_options,
            )
        ctx.grads = (d_hidden, d_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy: backward ran twice; its gradients are computed in the forward "
                "and scaled in place, so retain_graph=True is not supported - run the forward again"
            )
        d_hidden, d_weight = linear_cross_entropy_bwd(grad_output, *ctx.grads)
        ctx.grads = None
        return d_hidden, d_weight, None, None, None


def _check_options(
    softcap: float | None,
    logit_scale: float,
    chunk_size: int | None,
    grad_weight_dtype: torch.dtype | None,
) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be > 0 or None, got {softcap}")
    if not math.isfinite(logit_scale):
        raise ValueError(f"linear_cross_entropy: logit_scale must be a finite number, got {logit_scale}")
    if grad_weight_dtype is not None and not grad_weight_dtype.is_floating_point:
        raise TypeError(
            f"linear_cross_entropy: grad_weight_dtype must be a floating dtype (e.g. torch.float32) or "
            f"None, got {grad_weight_dtype}"
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weight: torch.Tensor,
    softcap: float | None = None,
    z_loss: float = 0.0,
    *,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    check_targets: bool | None = None,
    grad_weight_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weighted cross-entropy SUM of the lm-head at the trained positions (the caller normalises).

    hidden: [N, H] final hidden states gathered at the trained positions (``hidden[loss_index]``);
    weight: [V, H] lm-head; targets: int64 [N] in [0, V); token_weight: float32 [N] (``loss_weight``).
    Returns a 0-dim fp32 tensor; gradients flow to hidden and weight only, in their own dtypes.
    N = 0 gives 0 with zero gradients.

    dtypes: follows autocast. Under ``torch.autocast`` (on hidden's device) both operands are cast to
    the autocast dtype for the three GEMMs, as autocast does for ``F.linear`` and as Liger and Cut
    Cross-Entropy do; without autocast they run in hidden's dtype (weight cast to it). Either way each
    GEMM accumulates in fp32 and the log-sum-exp and loss are fp32.
    logit_scale: a scalar multiplying the logits before the soft-cap (the lm head's own scaling:
    granite ``1 / logits_scaling``, cohere ``logit_scale``, falcon_h1 ``lm_head_multiplier``, minicpm3
    ``dim_model_base / hidden_size``); applied in fp32 to the chunk's logits, inside the row kernel.
    softcap: final-logit soft-capping ``softcap * tanh(logits / softcap)``; z_loss: adds
    ``z_loss * lse^2`` per token, weighted like the loss.
    chunk_size forces the rows per chunk (default: ``chunk_rows`` under ``logits_chunk_bytes``).
    grad_weight_dtype: the dtype d_weight is summed in across chunks. Default: the wider of weight's
    dtype and the GEMM dtype (fp32 master weights: fp32, no extra memory; bf16 weights: bf16, one
    rounding per chunk). ``torch.float32`` for bf16 weights costs a [V, H] fp32 buffer during the call
    (2.2 GB at V=151,936, H=3,584) and rounds to bf16 once at the end.

    check_targets: None (default) checks 0 <= target < V, raising ValueError, where that is free: when
    targets are on the CPU. CUDA targets are not checked on the host (that would sync the device every
    call): an out-of-range target there gives a NaN loss and NaN gradients, never an out-of-bounds
    access, so a trainer that stops on a non-finite loss stops. True always checks (one device sync on
    CUDA); False never checks. The trainer's labels are host arrays: ``check_target_range`` them there.

    Normalising: the gradients are made in the forward and scaled by grad_output in the backward. Fold
    the normaliser into the weights, ``linear_cross_entropy(h, w, t, loss_weight / total_weight)``, and
    backprop the result as is: grad_output is then 1, the scaling is exact in every dtype, and the
    result is the normalised loss (``loss(h, w, t, lw) / total`` backpropagated instead rounds the
    scale to bf16/fp16 for low-precision gradients).
    """
    _check_inputs(hidden, weight, targets, token_weight)
    _check_options(softcap, logit_scale, chunk_size, grad_weight_dtype)
    device, dtype = hidden.device, gemm_dtype(hidden)
    backend = resolve_backend(
        "loss",
        [
            ("triton", lambda: triton_usable("loss", device, dtype)),
            ("chunked", lambda: True),
            ("reference", lambda: True),
        ],
    )
    if check_targets or (check_targets is None and targets.device.type == "cpu"):
        check_target_range(targets, weight.shape[0])
    if backend == "reference":
        return linear_cross_entropy_ref(
            hidden.to(dtype),
            weight.to(dtype),
            targets,
            token_weight,
            softcap,
            z_loss,
            logit_scale=logit_scale,
        ).float()
    grad_on = torch.is_grad_enabled()  # forward() runs without grad mode: decide here
    fwd_options = {
        "grad_hidden": grad_on and hidden.requires_grad,
        "grad_weight": grad_on and weight.requires_grad,
        "softcap": softcap,
        "z_loss": float(z_loss),
        "logit_scale": float(logit_scale),
        "backend": backend,
        "chunk_size": chunk_size,
        "compute_dtype": dtype,
        "grad_weight_dtype": grad_weight_dtype,
    }
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, token_weight, fwd_options)
