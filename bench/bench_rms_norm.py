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

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `soulchat` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import kernel_bench_parser, measure_fwd_bwd, run_kernel_bench

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
    nbytes = {"fwd": 2 * tokens * hidden * element, "fwd+bwd": 5 * tokens * hidden * element}
    shape = {"op": "rms_norm", "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "hidden": hidden}
    impls, label = implementations(smoke), f"T={tokens} H={hidden}"
    return measure_fwd_bwd(impls, (x, w), dy, truth, shape=shape, nbytes=nbytes, label=label, smoke=smoke)


def main(argv: list[str] | None = None) -> int:
    parser = kernel_bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[896, 1536, 3584], help="hidden sizes")
    args = parser.parse_args(argv)
    shapes = [(args.tokens, hidden) for hidden in args.hidden]
    return run_kernel_bench("rms_norm", args, bench_shape, smoke_shape=(33, 200), shapes=shapes)


if __name__ == "__main__":
    sys.exit(main())
