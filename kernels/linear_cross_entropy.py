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

    logits = hidden_chunk @ weight.T               (torch / cuBLAS, input dtype, fp32 accumulate)
    a kernel computes per row the online log-sum-exp over vocab blocks, the row loss, and overwrites
        the logits buffer with dloss/dlogits     (softmax - onehot, times w, softcap + z-loss chain rule)
    grad_hidden[chunk] = dlogits @ weight
    grad_weight       += dlogits.T @ hidden_chunk

All of it happens in the forward; the backward only scales the saved gradients by grad_output. So
the peak extra memory is one chunk of logits plus the gradients themselves (measured in
bench/bench_linear_cross_entropy.py against full logits + F.cross_entropy).

Precision: the row math (max, sum of exponentials, log, loss) is fp32. The matmuls run in the input
dtype with fp32 accumulation inside each GEMM. grad_weight is accumulated across chunks in the
weight's dtype (fp32 weights: fp32); for bf16/fp16 this adds one rounding per chunk (a handful with
the default budget) instead of a [V, H] fp32 accumulator, which would cost 2.2 GB at V=151,936,
H=3,584 and by itself break the memory goal.

Backends (``soulchat.kernels.dispatch``, op "loss", env ``SOULCHAT_LOSS_BACKEND``):
  "triton"    the chunked algorithm with the Triton row kernel; chosen automatically on CUDA. On a CPU
              it runs under TRITON_INTERPRET=1 only when forced (the interpreter is a test tool, far
              slower than "chunked").
  "chunked"   the same chunked algorithm with the row math in plain PyTorch (CPU default, baseline).
  "reference" full fp32 logits + F.cross_entropy; the truth, for tests and small inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from soulchat.kernels.dispatch import forced_backend, resolve_backend, triton_importable, triton_runs_on

if triton_importable():
    import triton
    import triton.language as tl
else:  # pragma: no cover - the chunked and reference backends still work
    triton = None
    tl = None

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

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def _check_target_range(targets: torch.Tensor, vocab: int) -> None:
    """Raise if any target is outside [0, V). One tiny reduction; on CUDA it syncs the device once."""
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

    Computes in fp32 (fp64 when the inputs are fp64, so tests can build an fp64 truth); returns a
    0-dim tensor in that dtype.
    """
    _check_inputs(hidden, weight, targets, token_weight)
    _check_target_range(targets, weight.shape[0])
    compute = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
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

if triton is not None:

    @triton.jit
    def _tanh(x):
        # tanh from exp: stable at both ends (exp -> inf gives 1, exp -> 0 gives -1) and avoids
        # libdevice, which the interpreter cannot run.
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
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

        # Target logit, read before pass 2 overwrites the row. An out-of-range target (only possible
        # when the launcher's range check was skipped) never reads out of bounds: its loss is NaN.
        valid = (target >= 0) & (target < V)
        s_t = tl.load(row_ptr + target, mask=valid, other=0.0).to(tl.float32) * logit_scale
        if HAS_SOFTCAP:
            s_t = softcap * _tanh(s_t / softcap)
        loss = w * (lse - s_t + z_loss * lse * lse)
        loss = tl.where(valid, loss, float("nan"))
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
    # 4096 fp32 lanes per block keeps a row's loop at ~37 iterations for V=151,936 with 8 warps.
    block_v = block_v or min(4096, triton.next_power_of_2(vocab))
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
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss sum and (unscaled) gradients, chunk by chunk.

    hidden: [N, H], weight: [V, H] (same dtype), targets: [N] int64, token_weight: [N] fp32.
    Returns (loss: 0-dim fp32, d_hidden: [N, H] | None, d_weight: [V, H] | None), gradients of the loss
    sum in the input dtypes. ``backend`` picks the row math: "triton" or "chunked" (plain PyTorch).
    """
    row_fn = _ROW_FNS[backend]
    n, h = hidden.shape
    vocab = weight.shape[0]
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    targets = targets.contiguous().long()
    token_weight = token_weight.contiguous().float()
    compute_grad = grad_hidden or grad_weight

    loss_rows = torch.empty(n, dtype=torch.float32, device=hidden.device)  # [N]
    d_hidden = torch.empty_like(hidden) if grad_hidden else None  # [N, H]
    d_weight = torch.zeros_like(weight) if grad_weight else None  # [V, H]
    rows = max(1, chunk_size or chunk_rows(n, vocab, hidden.element_size(), logits_chunk_bytes(hidden.device)))  # N = 0: no chunk runs
    for start in range(0, n, rows):
        end = min(n, start + rows)
        h_chunk = hidden[start:end]
        # logits: [rows, V], overwritten in place by dloss/dlogits
        logits = _chunk_logits(h_chunk, weight)
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
            torch.mm(logits, weight, out=d_hidden[start:end])
        if d_weight is not None:
            d_weight.addmm_(logits.T, h_chunk)
        del logits
    return loss_rows.sum(), d_hidden, d_weight


def linear_cross_entropy_bwd(
    grad_output: torch.Tensor, d_hidden: torch.Tensor | None, d_weight: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Chain rule for a scalar output: scale the saved gradients in place (no new [V, H] buffer)."""
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
        logit_scale: float,
        softcap: float | None,
        z_loss: float,
        backend: str,
        chunk_size: int | None,
        need_grad_hidden: bool,
        need_grad_weight: bool,
    ) -> torch.Tensor:
        # Autocast would recast our matmuls; the dtypes are already decided by the caller.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            loss, d_hidden, d_weight = linear_cross_entropy_fwd(
                hidden,
                weight,
                targets,
                token_weight,
                softcap,
                z_loss,
                logit_scale=logit_scale,
                grad_hidden=need_grad_hidden,
                grad_weight=need_grad_weight,
                backend=backend,
                chunk_size=chunk_size,
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
        return d_hidden, d_weight, None, None, None, None, None, None, None, None, None


def _triton_available(device: torch.device, dtype: torch.dtype) -> bool:
    if dtype not in _KERNEL_DTYPES or not triton_runs_on(device):
        return False
    # Under the interpreter the kernel is correct but orders of magnitude slower than "chunked":
    # on a CPU use it only when asked for by name (tests).
    return device.type == "cuda" or forced_backend("loss") == "triton"


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
    check_targets: bool = True,
) -> torch.Tensor:
    """Weighted cross-entropy SUM of the lm-head at the trained positions (the caller normalises).

    hidden: [N, H] final hidden states gathered at the trained positions (``hidden[loss_index]``);
    weight: [V, H] lm-head (cast to hidden's dtype if it differs, as autocast would);
    targets: int64 [N] in [0, V); token_weight: float32 [N] (``loss_weight``).
    logit_scale: a scalar multiplying the logits before the soft-cap (the lm head's own scaling:
    granite ``1 / logits_scaling``, cohere ``logit_scale``, falcon_h1 ``lm_head_multiplier``, minicpm3
    ``dim_model_base / hidden_size``); applied in fp32 to the chunk's logits, inside the row kernel.
    softcap: final-logit soft-capping ``softcap * tanh(logits / softcap)``; z_loss: adds
    ``z_loss * lse^2`` per token, weighted like the loss. Returns a 0-dim fp32 tensor; gradients flow
    to hidden and weight only. N = 0 gives 0 with zero gradients.

    chunk_size forces the rows per chunk (default: ``chunk_rows`` under ``LOGITS_CHUNK_BYTES``).
    check_targets verifies 0 <= target < V and raises ValueError otherwise; on CUDA that is one device
    sync per call (a single reduction over N ints, microseconds next to the ~3 GEMMs of [N, H] x [H, V]).
    Pass False where a sync is unwelcome (CUDA graphs): an out-of-range target then gives a NaN loss on
    the Triton path, never an out-of-bounds access.

    The gradients are made in the forward (in the input dtype) and scaled by grad_output in the
    backward, which in bf16/fp16 rounds them a second time unless grad_output is 1 (or a power of 2).
    For the most accurate low-precision gradients fold the normaliser into the weights,
    ``linear_cross_entropy(h, w, t, loss_weight / total_weight)``, and backprop the result as is.
    """
    _check_inputs(hidden, weight, targets, token_weight)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be > 0 or None, got {softcap}")
    if not math.isfinite(logit_scale):
        raise ValueError(f"linear_cross_entropy: logit_scale must be a finite number, got {logit_scale}")
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    device, dtype = hidden.device, hidden.dtype
    backend = resolve_backend(
        "loss",
        [
            ("triton", lambda: _triton_available(device, dtype)),
            ("chunked", lambda: True),
            ("reference", lambda: True),
        ],
    )
    if backend == "reference":
        return linear_cross_entropy_ref(
            hidden, weight, targets, token_weight, softcap, z_loss, logit_scale=logit_scale
        ).float()
    if check_targets or backend == "chunked":
        # The PyTorch row math would index out of bounds (a crash on CUDA), so it always checks.
        _check_target_range(targets, weight.shape[0])
    grad_on = torch.is_grad_enabled()
    return LinearCrossEntropyFunction.apply(
        hidden,
        weight,
        targets,
        token_weight,
        float(logit_scale),
        softcap,
        float(z_loss),
        backend,
        chunk_size,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
    )
