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

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `soulchat` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import kernel_bench_parser, measure_fwd_bwd, run_kernel_bench


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
    nbytes = {"fwd": 3 * elements, "fwd+bwd": 8 * elements}
    impls, label = implementations(smoke), f"T={tokens} I={width}"
    return measure_fwd_bwd(impls, (gate, up), dy, truth, shape=shape, nbytes=nbytes, label=label, smoke=smoke)


def main(argv: list[str] | None = None) -> int:
    parser = kernel_bench_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--width", type=int, nargs="+", default=[4864, 8960, 18944], help="MLP intermediate sizes I"
    )
    args = parser.parse_args(argv)
    shapes = [(args.tokens, width) for width in args.width]
    return run_kernel_bench("swiglu", args, bench_shape, smoke_shape=(9, 1500), shapes=shapes)


if __name__ == "__main__":
    sys.exit(main())
