"""Evaluation generation throughput: prompts batched by length vs in corpus order, and vLLM when installed.

    python -m bench.bench_generation --model runs/default/export            # a trained model directory
    python -m bench.bench_generation --model DIR --device cuda --batch-size 32 --max-new-tokens 128
    python -m bench.bench_generation --model DIR --backend vllm             # needs vllm and a GPU

The prompts are the ones ``soulchat.evaluate`` builds: one per counselor turn of the first
``--conversations`` conversations of ``--data`` (default: the bundled sample corpus), its preceding
context rendered with the model's template. Decoding is greedy, so the "length-sorted" and "corpus
order" rows generate the same replies (left padding does not change a greedy reply: tests/test_inference)
and differ only in padding and in how long a batch runs for its longest reply. Rows: backend, order, prompts, new tokens, seconds, tokens/s, prompt padding fraction. Numbers
from a shared machine are not comparable: measure on the target hardware.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `soulchat` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_rows
from soulchat import inference
from soulchat.data.readers import read_conversations
from soulchat.evaluate import build_examples
from soulchat.options import GenerationConfig

SAMPLE = Path(__file__).resolve().parents[1] / "soulchat" / "assets" / "sample_corpus.json"


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of prompt positions that are left padding when each batch pads to its longest prompt."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - sum(lengths) / padded if padded else 0.0


def in_order_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]


def run_hf(
    lm, prompts: list[list[int]], options: GenerationConfig, batches: list[list[int]]
) -> tuple[int, float]:
    counts: Counter = Counter()
    t0 = time.perf_counter()
    for batch in batches:
        inference.generate_batch(lm, [prompts[i] for i in batch], options, counts=counts)
    return counts["generated_tokens"], time.perf_counter() - t0


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a local Hugging Face model directory")
    parser.add_argument("--data", default=str(SAMPLE), help="conversations (default: the bundled sample)")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--backend", default="hf", choices=("hf", "vllm"))
    parser.add_argument("--no-write", action="store_true", help="print the rows, do not write bench/results")
    args = parser.parse_args(argv)

    lm = inference.load_model(args.model, device=args.device)
    conversations = list(read_conversations([args.data]))[: args.conversations]
    examples = build_examples(lm, conversations, args.max_new_tokens, Counter())
    prompts = [e.prompt for e in examples]
    lengths = [len(p) for p in prompts]
    options = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=False, batch_size=args.batch_size
    )
    common = {"model": args.model, "device": lm.device.type, "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "prompts": len(prompts)}  # fmt: skip
    rows = []
    if args.backend == "vllm":
        generator = inference.VllmGenerator(lm, seed=0)
        counts: Counter = Counter()
        t0 = time.perf_counter()
        generator.generate(prompts, options, counts)
        seconds = time.perf_counter() - t0
        rows.append({**common, "backend": "vllm", "order": "vllm scheduler", "new_tokens": counts["generated_tokens"],
                     "seconds": seconds, "tokens_per_s": counts["generated_tokens"] / seconds})  # fmt: skip
    else:
        run_hf(
            lm, prompts[: args.batch_size], options, [list(range(min(args.batch_size, len(prompts))))]
        )  # warmup
        for order, batches in (
            ("length-sorted", list(inference.length_batches(lengths, args.batch_size))),
            ("corpus order", in_order_batches(len(prompts), args.batch_size)),
        ):
            tokens, seconds = run_hf(lm, prompts, options, batches)
            rows.append({**common, "backend": "hf", "order": order, "new_tokens": tokens, "seconds": seconds,
                         "tokens_per_s": tokens / seconds, "prompt_padding": padding_fraction(lengths, batches)})  # fmt: skip
    for row in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    if not args.no_write:
        write_rows("generation", rows)
    return rows


if __name__ == "__main__":
    main()
