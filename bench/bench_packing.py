"""Packing benchmark: best-fit-decreasing rows vs plain padding, on SoulChatCorpus-shaped lengths.

    python -m bench.bench_packing            # full run: 2.3M sequences, rows of 4096 tokens
    python bench/bench_packing.py --n 200000 --ref-n 200000 --store-n 20000   # quick

Length model (token counts of whole rendered dialogues, one sequence per dialogue):
- messages per dialogue: soulchat.data.synth's distribution (76% at 5-7, mean 5.87, max 23), the
  published statistics of the released SoulChatCorpus;
- characters per message: gamma with the corpus means, client 41 (shape 4), counselor 90 (shape 5);
- tokens per character: lognormal around 0.7 (sigma 0.15) per message, a Chinese BPE's usual rate;
- template overhead: 3 tokens per message (role header, newline) + 1 end-of-turn token per counselor
  message.
This gives a mean of ~282 tokens per dialogue (p99 ~620, max ~1.5k; ~650M tokens for 2.3M sequences).
The real corpus holds 258k dialogues; 2.3M is the paper's sample count and stands in for a corpus of
that size.

Measured: pack() wall time on one core (median), rows vs the lower bound ceil(total / row), fill
efficiency; pack_ref() on --ref-n sequences (exact equality with pack() asserted); plain padding waste
(batches of 8, in corpus order and length-sorted); trl's BFD packer when trl is installed; row assembly
throughput (tokens/s) from a memory-mapped PackedStore.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `soulchat` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.common import time_ms, write_rows
from soulchat.data import synth
from soulchat.data.packing import (
    assemble,
    fill_efficiency,
    lower_bound_rows,
    pack,
    pack_ref,
    padded_waste,
)
from soulchat.data.store import PackedStore, StoreWriter

TOKENS_PER_CHAR = 0.7
LENGTH_MODEL = "synth message counts; gamma chars (41/90); 0.7 tok/char lognormal(0.15); +3/msg"
# The benchmark machine is shared (2 cores, several jobs): wall times swing with the load, so single-
# threaded work is also timed in process CPU time, which does not count time spent waiting for a core.
HEADER_TOKENS = 3


def soulchat_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Token counts of ``n`` SoulChatCorpus-shaped dialogues (model in the module docstring)."""
    rng = np.random.default_rng(seed)
    n_msgs = rng.choice(synth.MESSAGE_COUNTS, size=n, p=synth.MESSAGE_COUNT_P)  # [n]
    starts = np.cumsum(n_msgs) - n_msgs
    pos = np.arange(int(n_msgs.sum())) - np.repeat(starts, n_msgs)  # pos: [M] index inside the dialogue
    is_client = pos % 2 == 0
    chars = np.where(
        is_client,
        rng.gamma(4.0, synth.MEAN_CLIENT_CHARS / 4.0, size=pos.size),
        rng.gamma(5.0, synth.MEAN_COUNSELOR_CHARS / 5.0, size=pos.size),
    )
    ratio = TOKENS_PER_CHAR * rng.lognormal(-0.5 * 0.15**2, 0.15, size=pos.size)  # mean 0.7
    tokens = np.maximum(1, np.rint(chars * ratio)) + HEADER_TOKENS + (~is_client)  # [M]
    return np.add.reduceat(tokens, starts).astype(np.int64)


def cpu_ms(fn, warmup: int = 1, repeats: int = 5) -> float:
    """Median process CPU time of ``fn()`` in milliseconds (single-threaded work only)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        samples.append((time.process_time() - start) * 1e3)
    return float(np.median(samples))


def bench_pack(lengths: np.ndarray, row: int, seed: int) -> list[dict]:
    n = len(lengths)
    total = int(lengths.sum())
    rows_lb = lower_bound_rows(lengths, row)
    ms = time_ms(lambda: pack(lengths, row, seed), warmup=1, repeats=5)
    cpu = cpu_ms(lambda: pack(lengths, row, seed))
    row_offsets, _ = pack(lengths, row, seed)
    rows = len(row_offsets) - 1
    fill = fill_efficiency(lengths, row_offsets, row)
    print(
        f"pack (C++):  n={n:,} total={total:,} tokens  {ms / 1e3:.3f} s wall, {cpu / 1e3:.3f} s CPU  "
        f"rows={rows:,} (lower bound {rows_lb:,}, {rows / rows_lb:.5f}x)  fill={fill:.4%}"
    )
    return [
        {
            "bench": "pack",
            "impl": "cpp_bfd",
            "n": n,
            "row_size": row,
            "total_tokens": total,
            "seconds": ms / 1e3,
            "cpu_seconds": cpu / 1e3,
            "rows": rows,
            "rows_lower_bound": rows_lb,
            "fill_efficiency": fill,
            "fill_vs_lower_bound": rows_lb / rows,
        }
    ]


def bench_pack_ref(lengths: np.ndarray, row: int, seed: int, n_full: int) -> list[dict]:
    n = len(lengths)
    start = time.perf_counter()
    ref = pack_ref(lengths, row, seed)
    seconds = time.perf_counter() - start
    got = pack(lengths, row, seed)
    identical = bool(np.array_equal(ref[0], got[0]) and np.array_equal(ref[1], got[1]))
    assert identical, "pack() and pack_ref() disagree"
    rows = len(ref[0]) - 1
    extrapolated = seconds * n_full / n
    note = f" (~{extrapolated:.0f} s at n={n_full:,}, linear extrapolation)" if n < n_full else ""
    print(f"pack_ref (Python): n={n:,}  {seconds:.2f} s{note}  rows={rows:,}  identical to pack(): {identical}")
    return [
        {
            "bench": "pack",
            "impl": "python_ref_bfd",
            "n": n,
            "row_size": row,
            "total_tokens": int(lengths.sum()),
            "seconds": seconds,
            "seconds_extrapolated_full": extrapolated,
            "rows": rows,
            "rows_lower_bound": lower_bound_rows(lengths, row),
            "fill_efficiency": fill_efficiency(lengths, ref[0], row),
            "identical_to_cpp": identical,
        }
    ]


def bench_padding(lengths: np.ndarray, row: int, batch_size: int) -> list[dict]:
    out = []
    for label, sort in (("corpus_order", False), ("length_sorted", True)):
        w = padded_waste(lengths, batch_size, sort=sort)
        # Padded batch shapes: sorting removes padding but makes the batch size in tokens swing (and the
        # batches length-homogeneous); packed rows are always row_size.
        lens = np.sort(lengths)[::-1] if sort else lengths
        starts = np.arange(0, len(lens), batch_size)
        slots = np.maximum.reduceat(lens, starts) * np.diff(np.append(starts, len(lens)))
        p1, p99 = (int(x) for x in np.percentile(slots, [1, 99]))
        print(
            f"padding, batches of {batch_size} ({label}): {w['slots']:,} slots for {w['tokens']:,} tokens, "
            f"waste {w['waste']:.2%}; batch slots p1..p99 {p1:,}..{p99:,}"
        )
        out.append(
            {
                "bench": "padding",
                "impl": f"pad_batch{batch_size}_{label}",
                "n": len(lengths),
                "row_size": row,
                "total_tokens": w["tokens"],
                "slots": w["slots"],
                "waste": w["waste"],
                "fill_efficiency": 1 - w["waste"],
                "batch_slots_p1": p1,
                "batch_slots_p99": p99,
            }
        )
    return out


def bench_trl(lengths: np.ndarray, row: int) -> list[dict]:
    """trl.pack_dataset(strategy="bfd"): once with its default (BFD inside each datasets.map batch of
    1000 examples) and once over the whole dataset in one batch (its best fill)."""
    try:
        import datasets
        import pyarrow as pa
        import trl
        from trl import pack_dataset
    except ImportError:
        print("trl not installed: skipping the comparison with trl.pack_dataset(strategy='bfd')")
        return []
    datasets.disable_progress_bars()
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.ones(int(offsets[-1]), dtype=np.int32)))
    ds = datasets.Dataset(datasets.table.InMemoryTable(pa.Table.from_arrays([column], names=["input_ids"])))
    total = int(lengths.sum())
    ours = time_ms(lambda: pack(lengths, row, 0), warmup=1, repeats=5) / 1e3
    out = []
    for label, map_kwargs in (("map_batch_1000", {}), ("one_batch", {"batch_size": len(ds)})):
        start = time.perf_counter()
        packed = pack_dataset(ds, seq_length=row, strategy="bfd", map_kwargs=map_kwargs)
        seconds = time.perf_counter() - start
        rows = len(packed)
        fill = total / (rows * row)
        print(
            f"trl {trl.__version__} pack_dataset bfd ({label}): n={len(lengths):,}  {seconds:.2f} s "
            f"(ours {ours:.4f} s)  rows={rows:,}  fill={fill:.4%}"
        )
        out.append(
            {
                "bench": "pack",
                "impl": f"trl_pack_dataset_bfd_{label}",
                "n": len(lengths),
                "row_size": row,
                "total_tokens": total,
                "seconds": seconds,
                "seconds_ours_same_n": ours,
                "rows": rows,
                "rows_lower_bound": lower_bound_rows(lengths, row),
                "fill_efficiency": fill,
                "trl": trl.__version__,
            }
        )
    return out


def bench_assemble(lengths: np.ndarray, row: int, seed: int) -> list[dict]:
    """Assemble every row of a memory-mapped store (written just before, so its pages are cached)."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        with StoreWriter(Path(tmp) / "store") as writer:
            for n in lengths.tolist():
                writer.add(
                    rng.integers(0, 150_000, size=n, dtype=np.int32),
                    np.ones(n, dtype=np.uint8),
                    np.ones(n, dtype=np.float32),
                )
            store = writer.finish(row, seed, {"key": "bench", "report": {}, "options": {}})
        store = PackedStore(store.path)  # fresh memory maps

        def run_all() -> int:
            t = 0
            for r in range(len(store)):
                t += len(store.micro_batch(r)["input_ids"])
            return t

        tokens = run_all()
        ms = time_ms(run_all, warmup=1, repeats=3)
        cpu = cpu_ms(run_all, warmup=0, repeats=3)
        rate = tokens / (ms / 1e3)
        per_row_us = ms * 1e3 / len(store)
        # The C++ call alone (no store indexing in Python).
        seq_ids = [store.row_sequences(r) for r in range(len(store))]
        args = (store.tokens, store.trained, store.weight, store.seq_offsets)
        def run_bare() -> None:
            for s in seq_ids:
                assemble(*args, s)  # dropped at once, like a training loop would, so memory is reused

        ms_raw = time_ms(run_bare, warmup=1, repeats=3)
        cpu_raw = cpu_ms(run_bare, warmup=0, repeats=3)
        rate_raw = tokens / (ms_raw / 1e3)
    print(
        f"assemble from mmap store: {len(store):,} rows, {tokens:,} tokens: store.micro_batch "
        f"{rate / 1e6:.0f} M tokens/s wall ({tokens / cpu * 1e3 / 1e6:.0f} M/s CPU, "
        f"{per_row_us:.1f} us/row); "
        f"bare assemble() {rate_raw / 1e6:.0f} M tokens/s wall ({tokens / cpu_raw * 1e3 / 1e6:.0f} M/s CPU)"
    )
    return [
        {
            "bench": "assemble",
            "impl": "store.micro_batch",
            "n": len(lengths),
            "row_size": row,
            "rows": len(store),
            "total_tokens": tokens,
            "tokens_per_s": rate,
            "tokens_per_cpu_s": tokens / (cpu / 1e3),
            "us_per_row": per_row_us,
        },
        {
            "bench": "assemble",
            "impl": "packing.assemble",
            "n": len(lengths),
            "row_size": row,
            "rows": len(store),
            "total_tokens": tokens,
            "tokens_per_s": rate_raw,
            "tokens_per_cpu_s": tokens / (cpu_raw / 1e3),
            "us_per_row": ms_raw * 1e3 / len(store),
        },
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2_300_000, help="sequences to pack")
    p.add_argument("--row-size", type=int, default=4096, help="row capacity in tokens")
    p.add_argument("--ref-n", type=int, default=2_300_000, help="sequences for the pure-Python pack_ref")
    p.add_argument("--trl-n", type=int, default=100_000, help="sequences for trl's packer (if installed)")
    p.add_argument("--store-n", type=int, default=100_000, help="sequences in the assembly store")
    p.add_argument("--batch-size", type=int, default=8, help="batch size of the padding baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only, do not write bench/results")
    args = p.parse_args(argv)

    lengths = soulchat_lengths(args.n, args.seed)
    print(
        f"lengths: n={len(lengths):,} mean={lengths.mean():.1f} p50={np.median(lengths):.0f} "
        f"p99={np.percentile(lengths, 99):.0f} max={lengths.max()} tokens"
    )
    rows = bench_pack(lengths, args.row_size, args.seed)
    rows += bench_pack_ref(lengths[: args.ref_n], args.row_size, args.seed, args.n)
    rows += bench_padding(lengths, args.row_size, args.batch_size)
    rows += bench_trl(lengths[: args.trl_n], args.row_size)
    rows += bench_assemble(lengths[: args.store_n], args.row_size, args.seed)
    for row in rows:
        row["length_model"] = LENGTH_MODEL
    if not args.no_write:
        jsonl, csv_path = write_rows("packing", rows)
        md = write_summary(rows, args, csv_path.with_suffix(".md"))
        print(f"wrote {jsonl}, {csv_path} and {md}")


def write_summary(rows: list[dict], args: argparse.Namespace, path: Path) -> Path:
    """A short human-readable table of this run next to the CSV."""
    from bench.common import environment

    env = environment()
    lines = [
        "# Packing benchmark",
        "",
        f"`python -m bench.bench_packing --n {args.n} --row-size {args.row_size} --ref-n {args.ref_n} "
        f"--trl-n {args.trl_n} --store-n {args.store_n}`",
        "",
        f"{env['date']}, commit {env['commit']}, {env['cpu']} ({env['cpu_count']} cores, shared), "
        f"python {env['python']}, numpy {env['numpy']}. Wall times on a shared machine swing with its load; "
        "CPU time (process_time) is the steadier number for single-threaded work.",
        "",
        "Lengths: one sequence per SoulChatCorpus-shaped dialogue (model in bench/bench_packing.py).",
        "",
        "| what | n | wall s | CPU s | rows | lower bound | fill |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["bench"] == "pack":
            cpu = f"{r['cpu_seconds']:.3f}" if "cpu_seconds" in r else ""
            lines.append(
                f"| {r['impl']} | {r['n']:,} | {r['seconds']:.3f} | {cpu} | {r['rows']:,} | "
                f"{r['rows_lower_bound']:,} | {r['fill_efficiency']:.4%} |"
            )
    for r in rows:
        if r["bench"] == "padding":
            lines.append(f"| {r['impl']} | {r['n']:,} | | | | | {r['fill_efficiency']:.4%} |")
    lines += [
        "",
        "Padding baselines pad each batch of 8 to its longest sequence. Length-sorted batches waste almost "
        "nothing, but their size swings (padded slots per batch p1..p99: "
        + ", ".join(f"{r['impl']} {r['batch_slots_p1']:,}..{r['batch_slots_p99']:,}"
                    for r in rows if r["bench"] == "padding")
        + ") and each batch holds only near-equal lengths; packed rows are always the row size.",
    ]
    lines += ["", "| assembly from a memory-mapped store | rows | tokens | tokens/s wall | tokens/s CPU |",
              "|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["bench"] == "assemble":
            lines.append(
                f"| {r['impl']} | {r['rows']:,} | {r['total_tokens']:,} | {r['tokens_per_s'] / 1e6:.0f} M | "
                f"{r['tokens_per_cpu_s'] / 1e6:.0f} M |"
            )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    main()
