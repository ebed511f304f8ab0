"""Cost of the preflight probe (soulchat.check.preflight) on a random-init model: tiny or Qwen2.5-1.5B-shaped.

    python -m bench.bench_preflight --shape tiny
    python -m bench.bench_preflight --shape 1.5b --dtype fp32     # ~6.2 GB of fp32 weights, CPU

Prints one JSON row: the shape, dtype, device, build time and the probe's own time (its 6 forwards of
<= 28 tokens: 4 packed rows, the model's own eager forward, the packed loss), with the measured errors.
No download: the 1.5B shape is a config (hidden 1536, 28 layers, 12/2 heads, MLP 8960, vocab 151,936).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from bench.common import environment
from soulchat.attention import ATTENTION_NAME, register_attention
from soulchat.check import preflight
from soulchat.loading import tiny_qwen2_config
from soulchat.model import PackedCausalLM

SHAPES = {
    "tiny": {},  # the built-in smoke model: hidden 128, 3 layers, vocab 4096
    "1.5b": {
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1e6,
    },
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    register_attention()
    overrides = SHAPES[args.shape]
    config = tiny_qwen2_config(overrides.pop("vocab_size", 4096), eos_token_id=0, **overrides)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION_NAME, dtype=torch.float32)
    model = PackedCausalLM(lm).to(args.device)
    built = time.perf_counter() - t0
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast = torch.autocast(args.device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with autocast:
        report = preflight(model, compute_dtype=dtype)
    row = {
        "bench": "preflight",
        "shape": args.shape,
        "dtype": args.dtype,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "build_s": round(built, 2),
        "preflight_s": round(report.seconds, 3),
        "errors": {k: float(f"{v:.3g}") for k, v in report.errors.items()},
        "bounds": {k: float(f"{v:.3g}") for k, v in report.bounds.items()},
        **environment(),
    }
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
