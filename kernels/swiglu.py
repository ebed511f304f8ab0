"""SwiGLU gate of the Qwen2/Llama MLP, fused: ``silu(gate) * up`` and its backward.

    gate, up: [..., I]  ->  y = gate * sigmoid(gate) * up: [..., I]      (then down_proj(y))

transformers computes ``act_fn(gate_proj(x)) * up_proj(x)`` as two ops, rounding ``silu(gate)`` to the
input dtype in between and keeping it for the backward. Here one kernel reads gate and up and writes y,
all math in fp32 with one rounding at the end; the backward reads dy, gate, up and recomputes the
sigmoid instead of storing anything (the autograd node keeps only the two inputs, which the
projections' backward needs anyway):

    d_up = dy * silu(gate),   d_gate = dy * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))

gate and up may be strided views (e.g. the two halves of a fused gate_up projection): only the last
dim must be dense; rows are addressed by their stride.

Backends (``soulchat.kernels.dispatch``, op "swiglu", env ``SOULCHAT_SWIGLU_BACKEND``):
  "triton"     the kernels below; chosen automatically on CUDA for fp32/fp16/bf16. On a CPU they run
               under TRITON_INTERPRET=1 only when forced, never in bf16 (``dispatch.triton_usable``).
  "reference"  ``swiglu_ref``, plain PyTorch as transformers computes it; the truth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from soulchat.kernels.dispatch import (
    KERNEL_DTYPES,
    jit,
    resolve_backend,
    tl,
    triton,
    triton_runs_on,
    triton_usable,
)

_WHERE = "soulchat.kernels.swiglu"


def _check_inputs(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dim() < 1:
        raise ValueError(
            f"{_WHERE}: gate and up must have the same shape [..., I], got {tuple(gate.shape)} and "
            f"{tuple(up.shape)} (both are outputs of the MLP's gate and up projections)"
        )
    if gate.dtype != up.dtype or not gate.is_floating_point():
        raise TypeError(
            f"{_WHERE}: gate and up must share one floating dtype, got {gate.dtype} and {up.dtype}"
        )
    if gate.device != up.device:
        raise ValueError(f"{_WHERE}: gate is on {gate.device} but up on {up.device}")


# --------------------------------------------------------------------------------------------------
# Reference: plain PyTorch, as transformers' MLP computes it (silu rounded to the dtype, then times up).
# --------------------------------------------------------------------------------------------------


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in the inputs' dtype; differentiable by autograd."""
    _check_inputs(gate, up)
    return F.silu(gate) * up


# --------------------------------------------------------------------------------------------------
# Triton kernels. Tiles of [BLOCK_R rows, BLOCK_C columns]; row offsets are int64 (T * I passes
# 2**31 for long rows of big models, e.g. 16K tokens x 18,944).
# --------------------------------------------------------------------------------------------------


@jit
def _tile(rows_total, cols_total, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < rows_total) & (cols[None, :] < cols_total)
    return rows[:, None], cols[None, :], mask


@jit
def _swiglu_fwd_kernel(
    gate_ptr,  # [rows, I], row stride stride_g
    up_ptr,  # [rows, I]
    y_ptr,  # [rows, I] out
    stride_g,
    stride_u,
    stride_y,
    n_rows,
    I,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows, cols, mask = _tile(n_rows, I, BLOCK_R, BLOCK_C)
    g = tl.load(gate_ptr + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + rows * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _swiglu_bwd_kernel(
    dy_ptr,  # [rows, I]
    gate_ptr,  # [rows, I]
    up_ptr,  # [rows, I]
    dgate_ptr,  # [rows, I] out
    dup_ptr,  # [rows, I] out
    stride_dy,
    stride_g,
    stride_u,
    stride_dg,
    stride_du,
    n_rows,
    I,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows, cols, mask = _tile(n_rows, I, BLOCK_R, BLOCK_C)
    dy = tl.load(dy_ptr + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)  # recomputed: cheaper than storing and re-reading silu(gate)
    silu = g * sig
    # d silu / d g = sig + g * sig * (1 - sig) = sig * (1 + g * (1 - sig))
    dgate = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dgate_ptr + rows * stride_dg + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + rows * stride_du + cols, (dy * silu).to(dup_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _check_triton(gate: torch.Tensor) -> None:
    if triton is None or not triton_runs_on(gate.device):
        raise RuntimeError(
            f"{_WHERE}: the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported); got {gate.device}. Use the reference backend instead."
        )
    if gate.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{_WHERE}: the Triton kernels take fp32/fp16/bf16, got {gate.dtype}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., I] -> [rows, I] without a copy when possible (views of a fused gate_up stay views)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] == 1 else x2.contiguous()


def _blocks(rows: int, cols: int, device: torch.device) -> tuple[int, int, int]:
    # 1024 columns x 2 rows = 2K elements per program on a GPU (8 per thread with 8 warps): I=8960 is
    # 9 column blocks, the last one masked. Narrow rows get more rows per tile. The interpreter pays per
    # program, not per element, so it gets 16x bigger tiles.
    budget = 2048 if device.type == "cuda" else 32768
    block_c = max(16, min(1024, triton.next_power_of_2(cols)))
    block_r = max(1, min(budget // block_c, triton.next_power_of_2(max(1, rows))))
    return block_r, block_c, 8 if block_r * block_c >= 2048 else 4


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton forward. gate, up: [..., I] -> silu(gate) * up: [..., I] (new, contiguous)."""
    _check_inputs(gate, up)
    _check_triton(gate)
    width = gate.shape[-1]
    g2, u2 = _rows(gate), _rows(up)
    rows = g2.shape[0]
    y = torch.empty((rows, width), dtype=gate.dtype, device=gate.device)
    if rows > 0 and width > 0:
        block_r, block_c, warps = _blocks(rows, width, gate.device)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(width, block_c))
        _swiglu_fwd_kernel[grid](
            g2, u2, y, g2.stride(0), u2.stride(0), y.stride(0), rows, width,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
        )
    return y.view(gate.shape)


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward. dy, gate, up: [..., I] -> (d_gate, d_up), each [..., I] in the inputs' dtype."""
    _check_inputs(gate, up)
    _check_triton(gate)
    if dy.shape != gate.shape:
        raise ValueError(f"{_WHERE}: grad shape {tuple(dy.shape)} differs from gate {tuple(gate.shape)}")
    width = gate.shape[-1]
    dy2, g2, u2 = _rows(dy), _rows(gate), _rows(up)
    rows = g2.shape[0]
    dgate = torch.empty((rows, width), dtype=gate.dtype, device=gate.device)
    dup = torch.empty((rows, width), dtype=up.dtype, device=up.device)
    if rows > 0 and width > 0:
        block_r, block_c, warps = _blocks(rows, width, gate.device)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(width, block_c))
        _swiglu_bwd_kernel[grid](
            dy2, g2, u2, dgate, dup,
            dy2.stride(0), g2.stride(0), u2.stride(0), dgate.stride(0), dup.stride(0), rows, width,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
        )
    return dgate.view(gate.shape), dup.view(up.shape)


# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)  # inputs only; silu(gate) is recomputed in the backward
        return swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        return swiglu_bwd(dy, gate, up)


def _triton_available(gate: torch.Tensor) -> bool:
    return triton_usable("swiglu", gate.device, gate.dtype)


def swiglu_backend(gate: torch.Tensor) -> str:
    """The backend ``swiglu`` uses for inputs like ``gate`` (for logs and benchmarks)."""
    return resolve_backend(
        "swiglu", [("triton", lambda: _triton_available(gate)), ("reference", lambda: True)]
    )


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for gate, up: [..., I] -> [..., I]; differentiable in both.

    Backend override: env ``SOULCHAT_SWIGLU_BACKEND`` or ``set_backend("swiglu", "triton" | "reference")``.
    """
    _check_inputs(gate, up)
    if swiglu_backend(gate) == "triton":
        return SwiGLUFunction.apply(gate, up)
    return swiglu_ref(gate, up)
