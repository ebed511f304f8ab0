"""Benchmark: lm-head + weighted cross-entropy at the trained positions, forward + backward.

    python -m bench.bench_linear_cross_entropy          # CUDA: writes bench/results/linear_cross_entropy.*
    python bench/bench_linear_cross_entropy.py --smoke  # CPU: tiny shapes through every path, writes nothing

Shapes (bf16): N trained tokens gathered from the packed micro-batch, H hidden, V vocabulary:
  N=8,192  H=3,584  V=151,936   a 7B-class model with a Qwen2-size vocabulary
  N=4,096  H=896    V=151,936   a 0.5B-class model, where the lm-head is a large share of the step
each plain and with softcap=30, z_loss=1e-4.

Compared in the same run:
  soulchat_triton   linear_cross_entropy, backend "triton" (chunked logits + Triton row kernel)
  full_logits       logits = (hidden @ weight.T).float(); F.cross_entropy(reduction="none") * w, summed
  chunked_torch     linear_cross_entropy, backend "chunked" (same chunks, row math in PyTorch)

Time: median of triton.testing.do_bench (bench.common.time_ms) over forward + backward, grads reset to
None before each call. Peak memory: torch.cuda.max_memory_allocated() during one forward + backward
minus the memory allocated before it (inputs excluded; gradients and temporaries included).
TFLOP/s counts the three GEMMs of the op, 6 * N * H * V.
Targets: soulchat_triton at least as fast as full_logits with <= 10% of its peak memory.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `soulchat` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cuda_available, time_ms, write_rows

SHAPES = [(8192, 3584, 151936), (4096, 896, 151936)]
SMOKE_SHAPES = [(37, 32, 1000)]
OPTIONS = [(None, 0.0), (30.0, 1e-4)]


def full_logits_loss(hidden, weight, targets, token_weight, softcap, z_loss):
    import torch
    import torch.nn.functional as F

    logits = (hidden @ weight.T).float()  # [N, V]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    per_token = F.cross_entropy(logits, targets, reduction="none")
    if z_loss:
        per_token = per_token + z_loss * torch.logsumexp(logits, dim=-1).square()
    return (token_weight * per_token).sum()


def make_methods():
    from soulchat.kernels.dispatch import force_backend
    from soulchat.kernels.linear_cross_entropy import linear_cross_entropy

    def ours(backend):
        def fn(hidden, weight, targets, token_weight, softcap, z_loss):
            with force_backend("loss", backend):
                return linear_cross_entropy(hidden, weight, targets, token_weight, softcap, z_loss)

        return fn

    return {
        "soulchat_triton": ours("triton"),
        "full_logits": full_logits_loss,
        "chunked_torch": ours("chunked"),
    }


def measure(name, fn, n, h, v, softcap, z_loss, dtype, device, cuda):
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(n, h, device=device, generator=g)).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device, generator=g) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    token_weight = torch.rand(n, device=device, generator=g)

    def step():
        hidden.grad = None
        weight.grad = None
        loss = fn(hidden, weight, targets, token_weight, softcap, z_loss)
        (loss / n).backward()
        return loss

    loss = step().detach()  # warm-up (Triton compile) and the value for the cross-check
    peak_mb = None
    if cuda:
        hidden.grad = None
        weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    ms = time_ms(step) if cuda else time_ms(step, warmup=0, repeats=1)
    return {
        "method": name,
        "n": n,
        "h": h,
        "v": v,
        "dtype": str(dtype).removeprefix("torch."),
        "softcap": softcap,
        "z_loss": z_loss,
        "fwd_bwd_ms": round(ms, 3),
        "tflops": round(6 * n * h * v / (ms * 1e-3) / 1e12, 1),
        "peak_mb": None if peak_mb is None else round(peak_mb, 1),
        "loss": loss.item(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, nothing written")
    args = parser.parse_args(argv)

    cuda = cuda_available()
    if not cuda and not args.smoke:
        print(
            "bench_linear_cross_entropy: no CUDA GPU here, nothing measured "
            "(use --smoke to exercise the code)"
        )
        return 0
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

    import torch

    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    methods = make_methods()
    rows = []
    for n, h, v in SMOKE_SHAPES if args.smoke else SHAPES:
        for softcap, z_loss in OPTIONS:
            group = []
            for name, fn in methods.items():
                row = measure(name, fn, n, h, v, softcap, z_loss, dtype, device, cuda)
                group.append(row)
                print(
                    f"N={n:>5} H={h:>4} V={v:>6} softcap={softcap} z={z_loss:g} {name:<16} "
                    f"{row['fwd_bwd_ms']:>9.2f} ms {row['tflops']:>6.1f} TFLOP/s  peak {row['peak_mb']} MiB"
                )
            by = {r["method"]: r for r in group}
            ours, full = by["soulchat_triton"], by["full_logits"]
            rel = abs(ours["loss"] - full["loss"]) / max(1e-6, abs(full["loss"]))
            assert rel < 1e-2, f"loss mismatch vs full logits: {ours['loss']} vs {full['loss']}"
            if cuda:
                faster = ours["fwd_bwd_ms"] <= full["fwd_bwd_ms"]
                mem_ratio = ours["peak_mb"] / full["peak_mb"]
                print(
                    f"  -> speedup {full['fwd_bwd_ms'] / ours['fwd_bwd_ms']:.2f}x "
                    f"({'ok' if faster else 'MISSED'}), memory {100 * mem_ratio:.1f}% of full logits "
                    f"({'ok' if mem_ratio <= 0.10 else 'MISSED'})"
                )
                for r in group:
                    r["speedup_vs_full"] = round(full["fwd_bwd_ms"] / r["fwd_bwd_ms"], 3)
                    r["memory_vs_full"] = round(r["peak_mb"] / full["peak_mb"], 4)
            rows += group
            if cuda:
                torch.cuda.empty_cache()
    if args.smoke:
        print("smoke run: every method ran and agreed on the loss; nothing written")
        return 0
    jsonl, csv_path = write_rows("linear_cross_entropy", rows)
    print(f"wrote {jsonl} and {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
