"""SwiGLU (silu(gate) * up) forward and forward+backward: the Triton kernels vs plain PyTorch (eager and
compiled).

Shapes are one packed micro-batch of 16K tokens at the MLP widths of Qwen2.5-0.5B/1.5B/7B (I = 4864, 8960,
18944). Bandwidth is effective GB/s over the bytes the op must move at least (every implementation is
charged the same bytes):
    forward:           read gate, up; write y                          (3 x T x I elements)
    forward+backward:  the forward, then read dy, gate, up; write d_gate, d_up (8 x T x I elements)

    python -m bench.bench_swiglu            # CUDA: measures, writes bench/results/swiglu.{jsonl,csv}
    python -m bench.bench_swiglu --smoke    # CPU: tiny shapes in the Triton interpreter, writes nothing
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


def implementations(smoke: bool) -> dict:
    from soulchat.kernels.dispatch import force_backend
    from soulchat.kernels.swiglu import swiglu, swiglu_ref

    def triton_fn(gate, up):
        with force_backend("swiglu", "triton"):
            return swiglu(gate, up)

    impls = {"soulchat_triton": triton_fn, "torch_eager": swiglu_ref}
    if not smoke:
        impls["torch_compile"] = torch.compile(swiglu_ref, dynamic=False)
    return impls


def bench_shape(tokens: int, width: int, dtype: torch.dtype, device: torch.device, smoke: bool) -> list[dict]:
    from soulchat.kernels.swiglu import swiglu_ref

    gen = torch.Generator().manual_seed(0)
    gate = (2 * torch.randn(tokens, width, generator=gen)).to(device, dtype).requires_grad_()
    up = torch.randn(tokens, width, generator=gen).to(device, dtype).requires_grad_()
    dy = torch.randn(tokens, width, generator=gen).to(device, dtype)
    with torch.no_grad():
        truth = swiglu_ref(gate.float(), up.float())
    elements = tokens * width * gate.element_size()
    dtype_name = str(dtype).removeprefix("torch.")
    shape = {"op": "swiglu", "dtype": dtype_name, "tokens": tokens, "intermediate": width}
    rows = []
    for name, fn in implementations(smoke).items():
        row = {"impl": name, **shape}
        try:
            with torch.no_grad():
                row["max_abs_err_vs_fp32_ref"] = (fn(gate, up).float() - truth).abs().max().item()

            def forward(fn=fn):
                with torch.no_grad():
                    fn(gate, up)

            def forward_backward(fn=fn):
                torch.autograd.grad(fn(gate, up), (gate, up), dy)

            forward_backward()  # compile / first launch outside the timed region
            modes = (("fwd", forward, 3 * elements), ("fwd+bwd", forward_backward, 8 * elements))
            for mode, call, nbytes in modes:
                ms = time_ms(call, warmup=1, repeats=2) if smoke else time_ms(call)
                gb_per_s = round(nbytes / (ms * 1e-3) / 1e9, 1)
                rows.append({**row, "mode": mode, "ms": round(ms, 4), "gb_per_s": gb_per_s})
                print(f"{name:16s} {mode:8s} T={tokens} I={width} {ms:8.3f} ms {gb_per_s:8.1f} GB/s "
                      f"err={row['max_abs_err_vs_fp32_ref']:.2e}")
        except Exception as exc:  # a baseline that fails (e.g. compile unavailable) is recorded, not fatal
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            rows.append({**row, "mode": "skipped", "error": msg})
            print(f"{name:16s} skipped: {msg}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per packed micro-batch")
    parser.add_argument("--width", type=int, nargs="+", default=[4864, 8960, 18944],
                        help="MLP intermediate sizes I")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument(
        "--smoke", action="store_true",
        help="tiny shapes on the CPU (Triton interpreter), checks the code paths, writes nothing",
    )
    args = parser.parse_args(argv)

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before soulchat.kernels imports triton
        rows = bench_shape(9, 1500, torch.float32, torch.device("cpu"), smoke=True)
        print(f"smoke run: {sum('error' not in r for r in rows)} timed rows, nothing written")
        return 0 if all("error" not in r for r in rows) else 1

    if not cuda_available():
        print("bench_swiglu: no CUDA GPU here; nothing measured (use --smoke for a CPU code-path check)")
        return 0

    dtype = getattr(torch, args.dtype)
    print(f"swiglu on {torch.cuda.get_device_name()}, {args.dtype}")
    rows = []
    for width in args.width:
        rows += bench_shape(args.tokens, width, dtype, torch.device("cuda"), smoke=False)
    jsonl, csv_path = write_rows("swiglu", rows)
    print(f"wrote {jsonl} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
