"""RMSNorm forward and forward+backward: the Triton kernels vs plain PyTorch (eager and compiled).

Shapes are one packed micro-batch of 16K tokens at the hidden sizes of Qwen2.5-0.5B/1.5B/7B (896, 1536,
3584). Bandwidth is effective GB/s over the bytes the op must move at least (every implementation is
charged the same bytes):
    forward:           read x, write y                         (2 x T x H elements)
    forward+backward:  the forward, then read dy and x, write dx (5 x T x H elements)
The weight, rstd and dweight are O(H) or O(T) and ignored.

    python -m bench.bench_rms_norm            # CUDA: measures, writes bench/results/rms_norm.{jsonl,csv}
    python -m bench.bench_rms_norm --smoke    # CPU: tiny shapes in the Triton interpreter, writes nothing
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `soulchat` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import cuda_available, time_ms, write_rows

EPS = 1e-6


def implementations(smoke: bool) -> dict:
    from soulchat.kernels.dispatch import force_backend
    from soulchat.kernels.rms_norm import rms_norm, rms_norm_ref

    def triton_fn(x, w):
        with force_backend("rms_norm", "triton"):
            return rms_norm(x, w, EPS)

    impls = {"soulchat_triton": triton_fn, "torch_eager": lambda x, w: rms_norm_ref(x, w, EPS)}
    if not smoke:  # torch.compile of the reference: the strongest "no custom kernel" baseline
        compiled = torch.compile(rms_norm_ref, dynamic=False)
        impls["torch_compile"] = lambda x, w: compiled(x, w, EPS)
    return impls


def bench_shape(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device, smoke: bool) -> list:
    from soulchat.kernels.rms_norm import rms_norm_ref

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype).requires_grad_()
    dy = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    with torch.no_grad():
        truth = rms_norm_ref(x.float(), w.float(), EPS)
    element = x.element_size()
    bytes_fwd = 2 * tokens * hidden * element
    bytes_fwd_bwd = 5 * tokens * hidden * element
    shape = {"op": "rms_norm", "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "hidden": hidden}
    rows = []
    for name, fn in implementations(smoke).items():
        row = {"impl": name, **shape}
        try:
            with torch.no_grad():
                row["max_abs_err_vs_fp32_ref"] = (fn(x, w).float() - truth).abs().max().item()

            def forward(fn=fn):
                with torch.no_grad():
                    fn(x, w)

            def forward_backward(fn=fn):
                torch.autograd.grad(fn(x, w), (x, w), dy)

            forward_backward()  # compile / first launch outside the timed region
            modes = (("fwd", forward, bytes_fwd), ("fwd+bwd", forward_backward, bytes_fwd_bwd))
            for mode, call, nbytes in modes:
                ms = time_ms(call, warmup=1, repeats=2) if smoke else time_ms(call)
                gb_per_s = round(nbytes / (ms * 1e-3) / 1e9, 1)
                rows.append({**row, "mode": mode, "ms": round(ms, 4), "gb_per_s": gb_per_s})
                print(f"{name:16s} {mode:8s} T={tokens} H={hidden} {ms:8.3f} ms {gb_per_s:8.1f} GB/s "
                      f"err={row['max_abs_err_vs_fp32_ref']:.2e}")
        except Exception as exc:  # a baseline that fails (e.g. compile unavailable) is recorded, not fatal
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            rows.append({**row, "mode": "skipped", "error": msg})
            print(f"{name:16s} skipped: {msg}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per packed micro-batch")
    parser.add_argument("--hidden", type=int, nargs="+", default=[896, 1536, 3584], help="hidden sizes")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument(
        "--smoke", action="store_true",
        help="tiny shapes on the CPU (Triton interpreter), checks the code paths, writes nothing",
    )
    args = parser.parse_args(argv)

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before soulchat.kernels imports triton
        rows = bench_shape(33, 200, torch.float32, torch.device("cpu"), smoke=True)
        print(f"smoke run: {sum('error' not in r for r in rows)} timed rows, nothing written")
        return 0 if all("error" not in r for r in rows) else 1

    if not cuda_available():
        print("bench_rms_norm: no CUDA GPU here; nothing measured (use --smoke for a CPU code-path check)")
        return 0

    dtype = getattr(torch, args.dtype)
    print(f"rms_norm on {torch.cuda.get_device_name()}, {args.dtype}")
    rows = []
    for hidden in args.hidden:
        rows += bench_shape(args.tokens, hidden, dtype, torch.device("cuda"), smoke=False)
    jsonl, csv_path = write_rows("rms_norm", rows)
    print(f"wrote {jsonl} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
