"""Integrity benchmark: what verifying a packed store and a checkpoint costs.

- store_open: PackedStore(path) on a store of --tokens tokens (sizes + the CRC-32 of 64 sampled 64 KiB
  blocks per array, the default on every open), and store_full_verify: the CRC-32 of every byte (what an
  open does for files <= 64 MiB, or modified after meta.json);
- checkpoint_seal / checkpoint_verify: the manifest of a --checkpoint-mb checkpoint (file_record of every
  file) and its verification on --resume (sizes + checksums), on files just written (page cache warm).

Rows go to bench/results/integrity.{jsonl,csv}.

    python -m bench.bench_integrity [--tokens 100000000] [--checkpoint-mb 100] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/bench_integrity.py` from the repo root
    sys.path.insert(0, str(ROOT))

import numpy as np

from bench.common import write_rows
from soulchat.data import store as store_module
from soulchat.data.store import PackedStore, StoreWriter
from soulchat.integrity import check_checksums, check_sizes, file_record

SEQUENCE = 4096  # tokens per synthetic sequence (= the row size: one sequence per row)


def build_store(path: Path, tokens: int) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 150_000, SEQUENCE, dtype=np.int32)
    trained = (rng.random(SEQUENCE) < 0.6).astype(np.uint8)
    weight = trained.astype(np.float32)
    with StoreWriter(path) as writer:
        for _ in range(max(1, tokens // SEQUENCE)):
            writer.add(ids, trained, weight)
        writer.finish(SEQUENCE, 0, {"key": "bench"})


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_store(tmp: Path, tokens: int) -> list[dict]:
    path = tmp / "store"
    build_store(path, tokens)
    nbytes = sum((path / f"{name}.npy").stat().st_size for name in store_module.ARRAYS)
    open_s = min(timed(lambda: PackedStore(path)) for _ in range(5))
    meta = PackedStore(path).meta
    full = store_module.FULL_CHECK_BYTES
    store_module.FULL_CHECK_BYTES = 1 << 62  # every file checked whole
    try:
        full_s = timed(lambda: store_module.verify_arrays(path, meta))
    finally:
        store_module.FULL_CHECK_BYTES = full
    common = {"tokens": tokens, "bytes": nbytes}
    return [
        {"case": "store_open", **common, "seconds": open_s, "gb_per_s": None},
        {"case": "store_full_verify", **common, "seconds": full_s, "gb_per_s": nbytes / full_s / 1e9},
    ]


def bench_checkpoint(tmp: Path, megabytes: int) -> list[dict]:
    ck = tmp / "checkpoint"
    ck.mkdir()
    # Two shards, the metadata and the small state files: the shape of a 1-process DCP checkpoint.
    sizes = {"__0_0.distcp": megabytes << 19, "__1_0.distcp": megabytes << 19, ".metadata": 200_000}
    sizes |= {"trainer.json": 2_000, "rng/rank0.json": 30_000, "rng/rank0.safetensors": 5_200}
    for name, size in sizes.items():
        (ck / name).parent.mkdir(exist_ok=True)
        (ck / name).write_bytes(os.urandom(size))
    files: dict = {}
    seal_s = timed(lambda: files.update({name: file_record(ck / name) for name in sizes}))
    verify_s = timed(lambda: (check_sizes(ck, files), check_checksums(ck, files)))
    nbytes = sum(sizes.values())
    return [
        {"case": "checkpoint_seal", "bytes": nbytes, "seconds": seal_s, "gb_per_s": nbytes / seal_s / 1e9},
        {"case": "checkpoint_verify", "bytes": nbytes, "seconds": verify_s, "gb_per_s": nbytes / verify_s / 1e9},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000_000, help="tokens in the benchmarked store")
    parser.add_argument("--checkpoint-mb", type=int, default=100, help="size of the benchmarked checkpoint")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no result file (a quick check)")
    args = parser.parse_args(argv)
    tokens, megabytes = (200_000, 2) if args.smoke else (args.tokens, args.checkpoint_mb)
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_store(Path(tmp), tokens) + bench_checkpoint(Path(tmp), megabytes)
    for row in rows:
        rate = f", {row['gb_per_s']:.2f} GB/s" if row["gb_per_s"] else ""
        print(f"{row['case']:18} {row['bytes'] / 1e6:9.1f} MB  {row['seconds'] * 1e3:9.1f} ms{rate}")
    if not args.smoke:
        write_rows("integrity", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
