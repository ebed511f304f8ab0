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

import argparse
import math
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `soulchat` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from bench.common import cuda_available, time_ms, write_rows

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
    rows = []
    for name, fn in implementations(smoke).items():
        row = {"impl": name, **shape}
        try:
            with torch.no_grad():
                out = fn(q, k, pos)
            errors = [(o.float() - t).abs().max().item() for o, t in zip(out, truth)]
            row["max_abs_err_vs_fp32_ref"] = max(errors)

            def forward(fn=fn):
                with torch.no_grad():
                    fn(q, k, pos)

            def forward_backward(fn=fn):
                torch.autograd.grad(fn(q, k, pos), (q, k), (dq_rot, dk_rot))

            forward_backward()  # compile / first launch outside the timed region
            modes = (("fwd", forward, 2 * qk_bytes), ("fwd+bwd", forward_backward, 4 * qk_bytes))
            for mode, call, nbytes in modes:
                ms = time_ms(call, warmup=1, repeats=2) if smoke else time_ms(call)
                gb_per_s = round(nbytes / (ms * 1e-3) / 1e9, 1)
                rows.append({**row, "mode": mode, "ms": round(ms, 4), "gb_per_s": gb_per_s})
                print(f"{name:16s} {mode:8s} T={tokens} Hq={n_q_heads} Hkv={n_k_heads} D={head_dim} "
                      f"{ms:8.3f} ms {gb_per_s:8.1f} GB/s err={row['max_abs_err_vs_fp32_ref']:.2e}")
        except Exception as exc:  # a baseline that fails (e.g. compile unavailable) is recorded, not fatal
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            rows.append({**row, "mode": "skipped", "error": msg})
            print(f"{name:16s} skipped: {msg}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per packed micro-batch")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument(
        "--smoke", action="store_true",
        help="tiny shapes on the CPU (Triton interpreter), checks the code paths, writes nothing",
    )
    args = parser.parse_args(argv)

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before soulchat.kernels imports triton
        rows = bench_shape(40, 3, 1, 16, torch.float32, torch.device("cpu"), smoke=True)
        print(f"smoke run: {sum('error' not in r for r in rows)} timed rows, nothing written")
        return 0 if all("error" not in r for r in rows) else 1

    if not cuda_available():
        print("bench_rotary: no CUDA GPU here; nothing measured (use --smoke for a CPU code-path check)")
        return 0

    dtype = getattr(torch, args.dtype)
    print(f"rotary on {torch.cuda.get_device_name()}, {args.dtype}")
    rows = []
    for hq, hkv, d in ((12, 2, 128), (28, 4, 128)):  # Qwen2.5-1.5B, Qwen2.5-7B
        rows += bench_shape(args.tokens, hq, hkv, d, dtype, torch.device("cuda"), smoke=False)
    jsonl, csv_path = write_rows("rotary", rows)
    print(f"wrote {jsonl} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
