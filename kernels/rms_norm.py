"""RMSNorm with the Qwen2/Llama conventions, fused forward and backward.

    y = weight * cast(x * rsqrt(mean(x^2, -1) + eps))        x: [..., H], weight: [H]

Like transformers' ``Qwen2RMSNorm``: the statistics and the normalisation run in fp32, the normalised
value is cast back to the input dtype, and only then multiplied by the weight. The output dtype is
``promote_types(x.dtype, weight.dtype)`` (bf16 x with fp32 weights gives fp32, as in transformers).

Forward: one program per tile of rows; it also keeps ``rstd`` [rows] fp32 (4 bytes a row) for the
backward. Backward: each program walks a contiguous run of rows tile by tile, writes dx, and
accumulates its share of dweight in fp32 registers; the per-program partial sums [programs, H] are
added up by one torch ``sum`` at the end (no atomics, deterministic).

Backends (``soulchat.kernels.dispatch``, op "rms_norm", env ``SOULCHAT_RMS_NORM_BACKEND``):
  "triton"     the kernels below; chosen automatically on CUDA for fp32/fp16/bf16. On a CPU they run
               under TRITON_INTERPRET=1 only when forced, never in bf16 (``dispatch.triton_usable``).
  "reference"  ``rms_norm_ref``, plain PyTorch autograd; the truth.
"""

from __future__ import annotations

import torch

from soulchat.kernels.dispatch import (
    KERNEL_DTYPES,
    jit,
    resolve_backend,
    tl,
    triton,
    triton_runs_on,
    triton_usable,
)

_WHERE = "soulchat.kernels.rms_norm"
# A row lives in registers (H / 256 fp32 values per thread with 8 warps for each of x, dy, w, the
# dweight partial and the gradient). Compiled for sm_90 (kernels/compile_check.py,
# bench/results/compile-triton*.md), with 16 warps then: at 65536 the forward spilled 200-400 bytes
# per thread and the backward 5-8 KB, at 16384 the backward still 48-56 B; at 8192 (8 warps) nothing
# spills. Hidden sizes of the models this project targets are 896..8192; wider rows (the largest
# Llama's 16384) take the reference backend.
MAX_HIDDEN = 8192


def _check_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() < 1 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"{_WHERE}: x must be [..., H] and weight [H]; got x {tuple(x.shape)} and weight "
            f"{tuple(weight.shape)} (normalise over the last dim, with one weight per hidden unit)"
        )
    if not x.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"{_WHERE}: x and weight must be floating point, got {x.dtype} and {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{_WHERE}: x is on {x.device} but weight on {weight.device}; move them together")


# --------------------------------------------------------------------------------------------------
# Reference: plain PyTorch, the same operations as transformers' Qwen2RMSNorm. The truth.
# --------------------------------------------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` with the statistics in fp32.

    fp64 inputs compute in fp64, so tests can build an fp64 truth with the same function.
    """
    _check_inputs(x, weight)
    input_dtype = x.dtype
    compute = torch.promote_types(input_dtype, torch.float32)
    h = x.to(compute)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernels. Row offsets are int64: rows * H passes 2**31 for long packed rows of big models.
# --------------------------------------------------------------------------------------------------


@jit
def _rms_norm_fwd_kernel(
    x_ptr,  # [rows, H], row stride stride_x, unit column stride
    w_ptr,  # [H]
    y_ptr,  # [rows, H] out, promote(x, w) dtype
    rstd_ptr,  # [rows] fp32 out
    stride_x,
    stride_y,
    n_rows,
    H,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    cols = tl.arange(0, BLOCK_H)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < H)
    # Masked lanes load 0: they add nothing to the sum of squares.
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)  # [BLOCK_R]
    # Round the normalised value to the input dtype before the weight multiply, as transformers does.
    x_hat = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    y = x_hat * w[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@jit
def _rms_norm_bwd_kernel(
    dy_ptr,  # [rows, H]
    x_ptr,  # [rows, H]
    w_ptr,  # [H]
    rstd_ptr,  # [rows] fp32, from the forward
    dx_ptr,  # [rows, H] out, x's dtype
    dw_partial_ptr,  # [programs, H] fp32 out: this program's share of dweight
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    H,
    rows_per_program,
    COMPUTE_DW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < H
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    dw_acc = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
    # int64 bounds make the loop variable int64 too (in the interpreter it is a Python int).
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)[:, None]
        x_hat = x * rstd
        if COMPUTE_DW:
            # dweight sees the value the forward multiplied: x_hat rounded to the input dtype.
            dw_acc += dy * x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
        # The cast is the identity for autograd, so d x_hat = dy * w, and
        # dx = rstd * (d x_hat - x_hat * mean(d x_hat * x_hat)).
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=1) / H)[:, None])
        dx_row_ptr = dx_ptr + rows[:, None] * stride_dx + cols[None, :]
        tl.store(dx_row_ptr, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid.to(tl.int64) * H + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _blocks(rows: int, hidden: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_R rows, BLOCK_H lanes, num_warps) for a [rows, hidden] problem."""
    # At least 16 lanes, so H = 1 still gets an ordinary layout. About 4K elements per tile (H=1536:
    # 2 rows of 2048 lanes; H=128 q/k-norm rows: 32 rows) and ~256 elements per warp keep each thread
    # at a few registers per tensor. The interpreter pays per program, not per element: 16x bigger tiles.
    block_h = max(16, triton.next_power_of_2(hidden))
    budget = 4096 if device.type == "cuda" else 65536
    block_r = max(1, min(budget // block_h, triton.next_power_of_2(max(1, rows))))
    # At most 8 warps: with 16 (512 threads) ptxas may give a thread only 65536 / 512 = 128 registers,
    # and the backward spilled 4 B at H=896 with triton 3.6 (bench/results/compile-triton3.6.0.md).
    return block_r, block_h, min(8, max(1, block_r * block_h // 256))


def _check_triton(x: torch.Tensor, weight: torch.Tensor) -> None:
    _check_inputs(x, weight)
    if triton is None or not triton_runs_on(x.device):
        raise RuntimeError(
            f"{_WHERE}: the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported); got {x.device}. Use the reference backend instead."
        )
    if x.dtype not in KERNEL_DTYPES or weight.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{_WHERE}: the Triton kernels take fp32/fp16/bf16, got x {x.dtype} and weight {weight.dtype}"
        )
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(
            f"{_WHERE}: hidden size {x.shape[-1]} > {MAX_HIDDEN} is not supported by the Triton kernels; "
            f"use the reference backend"
        )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [rows, H] without a copy when possible; the kernels need a unit column stride."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] == 1 else x2.contiguous()


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward. x: [..., H], weight: [H] -> (y: [..., H] in promote(x, w), rstd: [rows] fp32)."""
    _check_triton(x, weight)
    hidden = x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty((rows, hidden), dtype=out_dtype, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows > 0 and hidden > 0:
        block_r, block_h, warps = _blocks(rows, hidden, x.device)
        _rms_norm_fwd_kernel[(triton.cdiv(rows, block_r),)](
            x2, weight.contiguous(), y, rstd, x2.stride(0), y.stride(0), rows, hidden, float(eps),
            BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps,
        )
    return y.view(x.shape), rstd


def _default_programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        # A few programs per SM hide memory latency; each one keeps a [H] fp32 dweight partial.
        return min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(rows, 4)  # the interpreter: few programs, same code path (several rows each)


def rms_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    compute_dweight: bool = True,
    programs: int | None = None,
    block_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton backward. dy, x: [..., H], weight: [H], rstd: [rows] fp32 from ``rms_norm_fwd``.

    Returns dx ([..., H], x's dtype) and dweight ([H], weight's dtype; None unless compute_dweight).
    ``programs`` forces the number of row-walking programs and ``block_rows`` (a power of 2) the rows
    per tile; tests use them to cover uneven splits and several tiles per program.
    """
    _check_triton(x, weight)
    if dy.shape != x.shape:
        raise ValueError(f"{_WHERE}: grad shape {tuple(dy.shape)} differs from x {tuple(x.shape)}")
    hidden = x.shape[-1]
    x2, dy2 = _rows(x), _rows(dy)
    rows = x2.shape[0]
    if rstd.shape != (rows,) or rstd.dtype != torch.float32:
        raise ValueError(
            f"{_WHERE}: rstd must be fp32 [{rows}] from rms_norm_fwd, got {rstd.dtype} {tuple(rstd.shape)}"
        )
    dx = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    if rows == 0 or hidden == 0:
        dweight = torch.zeros_like(weight) if compute_dweight else None
        return dx.view(x.shape), dweight
    programs = max(1, min(rows, programs or _default_programs(rows, x.device)))
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)  # no program left without rows
    # Without dweight the kernel never touches this pointer; dx stands in for it.
    dw_partial = dx
    if compute_dweight:
        dw_partial = torch.empty((programs, hidden), dtype=torch.float32, device=x.device)
    block_r, block_h, warps = _blocks(rows_per_program, hidden, x.device)
    if block_rows is not None:
        if block_rows < 1 or block_rows & (block_rows - 1):
            raise ValueError(f"{_WHERE}: block_rows must be a power of 2, got {block_rows}")
        block_r = block_rows
    _rms_norm_bwd_kernel[(programs,)](
        dy2, x2, weight.contiguous(), rstd, dx, dw_partial,
        dy2.stride(0), x2.stride(0), dx.stride(0), rows, hidden, rows_per_program,
        COMPUTE_DW=compute_dweight, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps,
    )
    dweight = dw_partial.sum(0).to(weight.dtype) if compute_dweight else None
    return dx.view(x.shape), dweight


# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = rms_norm_bwd(dy, x, weight, rstd, compute_dweight=ctx.needs_input_grad[1])
        return dx, dweight, None


def _triton_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    usable = all(triton_usable("rms_norm", x.device, dtype) for dtype in (x.dtype, weight.dtype))
    return usable and x.shape[-1] <= MAX_HIDDEN


def rms_norm_backend(x: torch.Tensor, weight: torch.Tensor) -> str:
    """The backend ``rms_norm`` uses for inputs like these (for logs and benchmarks)."""
    return resolve_backend(
        "rms_norm", [("triton", lambda: _triton_available(x, weight)), ("reference", lambda: True)]
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim, as transformers' Qwen2RMSNorm. x: [..., H], weight: [H] -> [..., H].

    Differentiable in x and weight. Backend override: env ``SOULCHAT_RMS_NORM_BACKEND`` or
    ``set_backend("rms_norm", "triton" | "reference")``.
    """
    _check_inputs(x, weight)
    if rms_norm_backend(x, weight) == "triton":
        return RMSNormFunction.apply(x, weight, float(eps))
    return rms_norm_ref(x, weight, eps)
