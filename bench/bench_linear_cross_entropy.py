"""lm-head + weighted cross-entropy at the trained positions, forward and forward+backward: soulchat's
fused loss vs full logits + F.cross_entropy, and vs Liger-Kernel's fused linear cross-entropy.

    python -m bench.bench_linear_cross_entropy          # CUDA: writes bench/results/linear_cross_entropy.*
    python -m bench.bench_linear_cross_entropy --smoke  # CPU: tiny shape through every path, writes nothing

Shapes (--dtype, default bf16): N trained tokens (--tokens) gathered from the packed micro-batch, H
hidden, V vocabulary: H=3,584 (a 7B-class model) and H=896 (0.5B-class, where the lm-head is a large
share of the step), V=151,936 (Qwen2.5); each plain and with softcap=30, z_loss=1e-4.

Compared in the same run (same inputs, token weights all 1 so that Liger's unweighted sum is the same
loss):
  soulchat_triton   linear_cross_entropy, backend "triton" (chunked logits + Triton row kernel)
  chunked_torch     linear_cross_entropy, backend "chunked" (same chunks, row math in PyTorch)
  full_logits       logits = (hidden @ weight.T).float(); F.cross_entropy(reduction="none") * w, summed
  liger_fused       liger_kernel's LigerFusedLinearCrossEntropyLoss(reduction="sum"), when installed
                    (a line says so when it is not)

Time: bench.common.time_ms (triton.testing.do_bench median on CUDA). Peak memory: one call's
torch.cuda.max_memory_allocated() above what was allocated before it (inputs excluded; gradients and
temporaries included). TFLOP/s counts the GEMMs: 2NHV forward, 6NHV forward+backward.
Targets (issue "Correct and fast on the GPU"): soulchat_triton at least Liger's speed with <= 10% of
full_logits' peak memory.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `soulchat` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import kernel_bench_parser, measure_fwd_bwd, run_kernel_bench

HIDDEN_SIZES = (3584, 896)
VOCAB = 151936
OPTIONS = ((None, 0.0), (30.0, 1e-4))


def full_logits_loss(hidden, weight, targets, token_weight, softcap, z_loss):
    import torch.nn.functional as F

    logits = (hidden @ weight.T).float()  # [N, V]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    per_token = F.cross_entropy(logits, targets, reduction="none")
    if z_loss:
        per_token = per_token + z_loss * torch.logsumexp(logits, dim=-1).square()
    return (token_weight * per_token).sum()


def liger_loss(softcap, z_loss):
    """Liger's fused linear cross-entropy as ``fn(hidden, weight)``, or None when not installed."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=softcap, lse_square_scale=z_loss)

    def fn(hidden, weight, targets):
        out = loss_fn(weight, hidden, targets)
        return out if isinstance(out, torch.Tensor) else out[0]  # newer releases may return a tuple

    return fn


def implementations(targets, token_weight, softcap, z_loss, device) -> dict:
    from soulchat.kernels.dispatch import force_backend
    from soulchat.kernels.linear_cross_entropy import linear_cross_entropy

    def ours(backend):
        def fn(hidden, weight):
            with force_backend("loss", backend):
                return linear_cross_entropy(hidden, weight, targets, token_weight, softcap, z_loss)

        return fn

    impls = {
        "soulchat_triton": ours("triton"),
        "chunked_torch": ours("chunked"),
        "full_logits": lambda h, w: full_logits_loss(h, w, targets, token_weight, softcap, z_loss),
    }
    liger = liger_loss(softcap, z_loss) if device.type == "cuda" else None
    if liger is not None:
        impls["liger_fused"] = lambda h, w: liger(h, w, targets)
    elif device.type == "cuda":
        print("liger_fused: liger_kernel is not installed here; that baseline is skipped")
    return impls


def bench_shape(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, smoke: bool) -> list[dict]:
    from soulchat.kernels.linear_cross_entropy import linear_cross_entropy_ref

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    token_weight = torch.ones(n, device=device)
    flops = {"fwd": 2.0 * n * h * v, "fwd+bwd": 6.0 * n * h * v}
    rows = []
    for softcap, z_loss in OPTIONS:
        with torch.no_grad():
            truth = linear_cross_entropy_ref(
                hidden.float(), weight.float(), targets, token_weight, softcap, z_loss
            )
        shape = {"op": "linear_cross_entropy", "dtype": str(dtype).removeprefix("torch."), "n": n, "h": h, "v": v,
                 "softcap": softcap, "z_loss": z_loss}  # fmt: skip
        impls = implementations(targets, token_weight, softcap, z_loss, device)
        label = f"N={n} H={h} V={v} softcap={softcap} z={z_loss:g}"
        group = measure_fwd_bwd(
            impls, (hidden, weight), torch.ones((), device=device), truth, shape=shape, label=label, smoke=smoke,
            flops=flops,
        )  # fmt: skip
        summarize(group)
        rows += group
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def summarize(rows: list[dict]) -> None:
    """Print (and record in the rows) speed and peak memory of every method relative to full logits."""
    timed = {r["impl"]: r for r in rows if r["mode"] == "fwd+bwd"}
    full = timed.get("full_logits")
    if full is None or full.get("peak_mb") is None:
        return
    for r in timed.values():
        r["speedup_vs_full"] = round(full["ms"] / r["ms"], 3)
        r["memory_vs_full"] = round(r["peak_mb"] / max(full["peak_mb"], 1e-9), 4)
    ours, liger = timed.get("soulchat_triton"), timed.get("liger_fused")
    if ours is not None:
        verdict = "ok" if ours["memory_vs_full"] <= 0.10 else "MISSED"
        print(f"  -> soulchat_triton: {ours['speedup_vs_full']:.2f}x full logits, memory "
              f"{100 * ours['memory_vs_full']:.1f}% of it ({verdict} <= 10%)")  # fmt: skip
        if liger is not None:
            verdict = "ok" if ours["ms"] <= liger["ms"] else "MISSED"
            print(f"  -> vs liger_fused: {liger['ms'] / ours['ms']:.2f}x its speed ({verdict}), memory "
                  f"{ours['peak_mb']} vs {liger['peak_mb']} MiB")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = kernel_bench_parser(__doc__.splitlines()[0], tokens=8192)
    parser.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN_SIZES), help="hidden sizes H")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary size V")
    args = parser.parse_args(argv)
    shapes = [(args.tokens, h, args.vocab) for h in args.hidden]
    return run_kernel_bench(
        "linear_cross_entropy", args, bench_shape, smoke_shape=(37, 32, 1000), shapes=shapes
    )


if __name__ == "__main__":
    sys.exit(main())
