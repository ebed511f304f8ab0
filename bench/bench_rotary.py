"""Rotary embedding (RoPE) of packed q and k, forward and forward+backward: the Triton kernels vs plain
PyTorch (transformers' formula, eager and compiled).

Shapes are one packed micro-batch of 16K tokens of conversations 100-600 tokens long (positions restart
per conversation), with the attention shapes of Qwen2.5-1.5B (Hq=12, Hkv=2, D=128) and 7B (Hq=28, Hkv=4,
D=128). Bandwidth is effective GB/s over the bytes the op must move at least (every implementation is
charged the same bytes):
    forward:           read q, k; write q_rot, k_rot                       (2 x (q + k))
    forward+backward:  the forward, then read dq_rot, dk_rot; write dq, dk (4 x (q + k))
The torch implementations also build the cos/sin tables per call (as transformers does once per step);
the Triton kernel computes them in registers.

    python -m bench.bench_rotary            # CUDA: measures, writes bench/results/rotary.{jsonl,csv}
    python -m bench.bench_rotary --smoke    # CPU: tiny shapes in the Triton interpreter, writes nothing
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `soulchat` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from bench.common import kernel_bench_parser, measure_fwd_bwd, run_kernel_bench

THETA = 1_000_000.0  # Qwen2.5's rope_theta


def packed_positions(total: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """position_ids of a packed row: conversations of ~300 tokens (100..600), restarting at 0."""
    rng = np.random.default_rng(seed)
    pieces, left = [], total
    while left > 0:
        n = min(left, int(np.clip(rng.lognormal(math.log(300), 0.45), 100, 600)))
        pieces.append(np.arange(n))
        left -= n
    return torch.from_numpy(np.concatenate(pieces)).to(device)


def implementations(smoke: bool) -> dict:
    from soulchat.kernels.dispatch import force_backend
    from soulchat.kernels.rotary import apply_rotary, apply_rotary_ref

    def triton_fn(q, k, pos):
        with force_backend("rotary", "triton"):
            return apply_rotary(q, k, pos, THETA)

    def eager(q, k, pos):
        return apply_rotary_ref(q, k, pos, THETA)

    impls = {"soulchat_triton": triton_fn, "torch_eager": eager}
    if not smoke:
        compiled = torch.compile(apply_rotary_ref, dynamic=False)
        impls["torch_compile"] = lambda q, k, pos: compiled(q, k, pos, THETA)
    return impls


def bench_shape(tokens, n_q_heads, n_k_heads, head_dim, dtype, device, smoke: bool) -> list[dict]:
    from soulchat.kernels.rotary import apply_rotary_ref

    gen = torch.Generator().manual_seed(0)

    def rand(heads):
        return torch.randn(tokens, heads, head_dim, generator=gen).to(device, dtype)

    q, k = rand(n_q_heads).requires_grad_(), rand(n_k_heads).requires_grad_()
    dq_rot, dk_rot = rand(n_q_heads), rand(n_k_heads)
    pos = packed_positions(tokens, device)
    with torch.no_grad():
        truth = apply_rotary_ref(q.float(), k.float(), pos, THETA)
    qk_bytes = q.numel() * q.element_size() + k.numel() * k.element_size()
    shape = {"op": "rotary", "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
             "num_q_heads": n_q_heads, "num_kv_heads": n_k_heads, "head_dim": head_dim}
    nbytes = {"fwd": 2 * qk_bytes, "fwd+bwd": 4 * qk_bytes}
    impls, label = implementations(smoke), f"T={tokens} Hq={n_q_heads} Hkv={n_k_heads} D={head_dim}"
    return measure_fwd_bwd(
        impls, (q, k, pos), (dq_rot, dk_rot), truth, shape=shape, nbytes=nbytes, label=label, smoke=smoke
    )


def main(argv: list[str] | None = None) -> int:
    args = kernel_bench_parser(__doc__.splitlines()[0]).parse_args(argv)
    shapes = [(args.tokens, hq, hkv, d) for hq, hkv, d in ((12, 2, 128), (28, 4, 128))]  # Qwen2.5-1.5B, 7B
    return run_kernel_bench("rotary", args, bench_shape, smoke_shape=(40, 3, 1, 16), shapes=shapes)


if __name__ == "__main__":
    sys.exit(main())
