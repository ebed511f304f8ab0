"""Benchmark: causal attention over packed SoulChat-shaped rows, forward and forward+backward.

    python -m bench.bench_varlen_attention          # CUDA: measures, writes bench/results/varlen_attention.*
    python bench/bench_varlen_attention.py --smoke  # CPU: tiny shapes through the code paths, no writes

Rows are T=16384 tokens of packed conversations with SoulChatCorpus-like lengths: the corpus averages
5.87 turns of ~41-character client and ~90-character counselor messages, i.e. ~400 characters plus
template tokens per conversation, which a Chinese-aware tokenizer turns into roughly 100-600 tokens.
Lengths are drawn from a log-normal (median 300, sigma 0.45) clipped to [100, 600], seeded.

Compared in the same run (bf16, head dims 64 and 128, Hq == Hkv, GQA with Hq/Hkv = 4, Qwen2.5-7B's
28/4 (group 7), and that shape with a 256-token sliding window):
  soulchat_triton   this project's Triton kernels (kernels/varlen_attention.py)
  torch_varlen      torch.nn.attention.varlen.varlen_attn (PyTorch's flash-attention 2 copy)
  flash_attn        flash_attn_varlen_func, if flash-attn is installed
  flex_attention    torch.compile'd flex_attention with a document-causal block mask; the mask is
                    rebuilt per micro-batch in training, so its build time is reported separately
  sdpa_padded       pad to [S, H, max_len, D], SDPA is_causal (right padding needs no extra mask for
                    the real tokens; a window adds an explicit mask), unpad; the pad/unpad copies are
                    timed as part of it

TFLOP/s counts useful FLOPs per conversation: forward 4 * D * Hq * (visible query-key pairs), i.e.
sum(L * (L + 1) / 2) causal (two matmuls over the lower triangle; fewer inside a window), backward 2.5x
that (five matmuls), so padded and varlen rows are comparable. Peak memory is the extra allocation
during one call above the inputs. The smoke run (CPU, Triton interpreter) covers the GQA and window
paths of this project's kernel and the padded baseline; the library baselines need CUDA.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `soulchat` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import kernel_bench_parser, run_kernel_bench, time_ms


def soulchat_lengths(total_tokens: int, seed: int = 0, low: int = 100, high: int = 600) -> list[int]:
    """Conversation lengths summing exactly to total_tokens (the last one is cut to fit)."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while sum(lengths) < total_tokens:
        length = int(np.clip(rng.lognormal(math.log(300), 0.45), low, high))
        lengths.append(min(length, total_tokens - sum(lengths)))
    return lengths


def visible_pairs(length: int, window: int | None) -> int:
    """Query-key pairs a causal conversation computes: query i sees min(i + 1, window) keys."""
    if window is None or window >= length:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


def causal_flops(lengths: list[int], num_q_heads: int, head_dim: int, window: int | None = None) -> float:
    """Forward FLOPs of causal (optionally windowed) attention counted per conversation."""
    return 4.0 * head_dim * num_q_heads * sum(visible_pairs(n, window) for n in lengths)


# --------------------------------------------------------------------------------------------------
# Implementations: each takes (q, k, v) in the packed layout [T, H, D] and returns [T, Hq, D].
# --------------------------------------------------------------------------------------------------


def make_soulchat(backend: str, cu_seqlens, max_seqlen, window):
    from soulchat.kernels.dispatch import force_backend
    from soulchat.kernels.varlen_attention import varlen_attention

    def attend(q, k, v):
        with force_backend("attention", backend):
            return varlen_attention(q, k, v, cu_seqlens, max_seqlen, window=window)

    return attend


def make_flash_attn(cu_seqlens, max_seqlen, window):
    from flash_attn import flash_attn_varlen_func

    window_size = (window - 1, 0) if window is not None else (-1, -1)  # W keys = W - 1 to the left

    def attend(q, k, v):
        return flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True, window_size=window_size
        )

    return attend


def make_flex(lengths, device, timings: dict, window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    total = sum(lengths)
    doc = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
    )

    def document_causal(b, h, q_idx, kv_idx):
        keep = (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
        return keep if window is None else keep & (q_idx - kv_idx < window)

    def build():
        return create_block_mask(document_causal, None, None, total, total, device=str(device))

    block_mask = build()
    timings["flex_block_mask_ms"] = time_ms(build)
    flex = torch.compile(flex_attention, dynamic=False)

    def attend(q, k, v):
        # [T, H, D] -> [1, H, T, D]
        q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        out = flex(q4, k4, v4, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
        return out.squeeze(0).transpose(0, 1)

    return attend


def make_sdpa_padded(lengths, device, window):
    num_seqs, max_len = len(lengths), max(lengths)
    lens = torch.tensor(lengths, device=device)
    # token j of conversation s sits at padded slot s * max_len + j
    starts = torch.cumsum(lens, 0) - lens
    seq_of = torch.repeat_interleave(torch.arange(num_seqs, device=device), lens)
    slot = seq_of * max_len + (torch.arange(sum(lengths), device=device) - starts[seq_of])

    def pad(x):  # [T, H, D] -> [S, H, max_len, D]
        out = x.new_zeros(num_seqs * max_len, *x.shape[1:])
        out[slot] = x
        return out.view(num_seqs, max_len, *x.shape[1:]).transpose(1, 2)

    mask = None
    if window is not None:  # [max_len, max_len]: causal and within the window
        i, j = torch.arange(max_len, device=device)[:, None], torch.arange(max_len, device=device)[None, :]
        mask = (j <= i) & (j > i - window)

    def attend(q, k, v):
        out = F.scaled_dot_product_attention(
            pad(q), pad(k), pad(v), attn_mask=mask, is_causal=mask is None,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out.transpose(1, 2).reshape(num_seqs * max_len, *q.shape[1:])[slot]

    return attend


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


def peak_extra_mib(fn) -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _short(exc: Exception) -> str:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def bench_shape(
    lengths, num_q_heads, num_kv_heads, head_dim, window, dtype, device, smoke: bool
) -> list[dict]:
    total = sum(lengths)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(heads):
        return torch.randn(total, heads, head_dim, generator=gen).to(device, dtype).requires_grad_()

    q, k, v = rand(num_q_heads), rand(num_kv_heads), rand(num_kv_heads)
    grad_out = torch.randn(total, num_q_heads, head_dim, generator=gen).to(device, dtype)
    cu_seqlens = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)
    max_seqlen = max(lengths)

    from soulchat.kernels.varlen_attention import varlen_attention_ref

    with torch.no_grad():
        truth = varlen_attention_ref(q.float(), k.float(), v.float(), cu_seqlens, max_seqlen, window=window)

    detached = (q.detach(), k.detach(), v.detach())  # forward-only runs build no autograd graph
    timings: dict = {}
    candidates = {
        "soulchat_triton": lambda: make_soulchat("triton", cu_seqlens, max_seqlen, window),
        "torch_varlen": lambda: make_soulchat("torch_varlen", cu_seqlens, max_seqlen, window),
        "flash_attn": lambda: make_flash_attn(cu_seqlens, max_seqlen, window),
        "flex_attention": lambda: make_flex(lengths, device, timings, window),
        "sdpa_padded": lambda: make_sdpa_padded(lengths, device, window),
    }
    if device.type == "cpu":  # the library baselines need CUDA; flex on a CPU would only compile
        candidates = {name: candidates[name] for name in ("soulchat_triton", "sdpa_padded")}
    if _IMPLS:
        candidates = {name: make for name, make in candidates.items() if name in _IMPLS}
    fwd_flops = causal_flops(lengths, num_q_heads, head_dim, window)
    shape = {
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": total,
        "num_seqs": len(lengths),
        "max_seqlen": max_seqlen,
        "mean_seqlen": round(total / len(lengths), 1),
        "head_dim": head_dim,
        "num_q_heads": num_q_heads,
        "num_kv_heads": num_kv_heads,
        "window": window,
    }
    rows = []
    for name, make in candidates.items():
        row = {"impl": name, **shape}
        try:
            attend = make()
            with torch.no_grad():
                out = attend(*detached)
            row["max_abs_err_vs_fp32_ref"] = (out.float() - truth).abs().max().item()
        except Exception as exc:  # a missing or unsupported baseline is recorded, not fatal
            rows.append({**row, "mode": "skipped", "error": _short(exc)})
            print(f"{name:16s} skipped: {_short(exc)}")
            continue
        if name == "flex_attention":
            row["flex_block_mask_ms"] = round(timings["flex_block_mask_ms"], 4)

        def forward():
            with torch.no_grad():
                attend(*detached)

        def forward_backward():
            torch.autograd.grad(attend(q, k, v), (q, k, v), grad_out)

        for mode, fn, flops in (("fwd", forward, fwd_flops), ("fwd+bwd", forward_backward, 3.5 * fwd_flops)):
            try:
                fn()  # compile / autotune outside the timed region
                ms = time_ms(fn, warmup=1, repeats=2) if smoke else time_ms(fn)
            except Exception as exc:
                rows.append({**row, "mode": mode, "error": _short(exc)})
                print(f"{name:16s} {mode:8s} skipped: {_short(exc)}")
                continue
            rows.append({
                **row,
                "mode": mode,
                "ms": round(ms, 4),
                "tflops": round(flops / (ms * 1e-3) / 1e12, 3),
                "peak_extra_mib": peak_extra_mib(fn),
            })
            print(f"{name:16s} {mode:8s} D={head_dim} Hq={num_q_heads} Hkv={num_kv_heads} window={window} "
                  f"{ms:8.3f} ms {rows[-1]['tflops']:7.1f} TFLOP/s err={row['max_abs_err_vs_fp32_ref']:.2e}")
    picked = _autotuned_configs() if device.type == "cuda" else {}
    for r in rows:
        if r["impl"] == "soulchat_triton" and picked:
            r["triton_configs"] = picked
    return rows


def _autotuned_configs() -> dict:
    """The config each of this project's attention kernels' autotuners last picked (for the rows)."""
    from soulchat.kernels import varlen_attention as va

    picked = {}
    for name, kernel in va._tuned_kernels().items():
        best = getattr(kernel, "best_config", None)
        if best is not None:
            picked[name] = f"{best.kwargs} warps={best.num_warps} stages={best.num_stages}"
    return picked


# --impls: the implementations to measure (default all); a time-boxed run skips flex_attention's compile.
_IMPLS: set[str] = set()


def main(argv: list[str] | None = None) -> int:
    parser = kernel_bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--impls", default="", help="comma-separated subset of the implementations")
    args = parser.parse_args(argv)
    _IMPLS.update(name for name in args.impls.split(",") if name)
    lengths = soulchat_lengths(args.tokens, seed=0)
    # (lengths, Hq, Hkv, D, window). Hidden size 2048: 32 heads of 64 or 16 heads of 128, GQA sharing
    # each kv head among 4 q heads; then Qwen2.5-7B's 28/4 (group 7) at D=128, without and with a
    # 256-token window (shorter than most conversations, so whole key blocks are skipped).
    shapes = [
        (lengths, 32, 32, 64, None), (lengths, 32, 8, 64, None),
        (lengths, 16, 16, 128, None), (lengths, 16, 4, 128, None),
        (lengths, 28, 4, 128, None), (lengths, 28, 4, 128, 256),
    ]
    # Smoke: GQA group 2 with a window shorter than some conversations, through every code path.
    smoke_shape = (soulchat_lengths(48, seed=0, low=5, high=30), 2, 1, 64, 12)
    if not args.smoke:
        print(f"{len(lengths)} conversations, {sum(lengths)} tokens, max {max(lengths)}, "
              f"mean {sum(lengths) / len(lengths):.0f}")
    return run_kernel_bench("varlen_attention", args, bench_shape, smoke_shape, shapes)


if __name__ == "__main__":
    sys.exit(main())
