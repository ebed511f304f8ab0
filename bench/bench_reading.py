"""Reading benchmark: stream a corpus-sized SoulChatCorpus JSON array vs json.load of the whole file.

Writes a synthetic corpus with the released corpus's shape and statistics (258,354 dialogues by
default, ~355 MB of UTF-8 JSON; soulchat.data.synth), then measures, each in a fresh Python process
so that peak RSS (ru_maxrss) belongs to that mode alone:

- stream_conversations: read_conversations() -> validated Conversations, consumed one at a time
- stream_conversations_nogc: the same with the cyclic GC disabled (what a pipeline can do around prepare)
- stream_json_only: iter_json_array() alone, i.e. the JSON parse without building Conversations
- json_load: json.load() of the whole file, the object tree kept (the non-streaming baseline)

Rows go to bench/results/reading.{jsonl,csv}. The synthetic file is deleted afterwards unless --keep.

    python -m bench.bench_reading [--dialogues 258354] [--chunk-size 1048576] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/bench_reading.py` from the repo root
    sys.path.insert(0, str(ROOT))

from bench.common import write_rows
from soulchat.data.synth import write_synthetic

# Each mode runs in a child interpreter; it prints one JSON line with its measurements.
# Memory comes from /proc/self/status: VmHWM (peak RSS) is reset by exec, unlike ru_maxrss, which a
# child inherits from the forking parent.
_CHILD = r"""
import gc, json, sys, time
def status_mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
mode, path, chunk_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
from soulchat.data.readers import iter_json_array, read_conversations
baseline = status_mib("VmRSS")  # interpreter + imports
records = turns = 0
if mode == "stream_conversations_nogc":
    gc.disable()
start = time.perf_counter()
cpu_start = time.process_time()
if mode.startswith("stream_conversations"):
    for conv in read_conversations(path, fmt="soulchat", chunk_size=chunk_size):
        records += 1
        turns += len(conv.turns)
elif mode == "stream_json_only":
    for _, rec in iter_json_array(path, chunk_size=chunk_size):
        records += 1
        turns += len(rec["messages"])
elif mode == "json_load":
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    records = len(data)
    turns = sum(len(r["messages"]) for r in data)
seconds = time.perf_counter() - start
cpu_seconds = time.process_time() - cpu_start
print(json.dumps({"records": records, "turns": turns, "seconds": seconds, "cpu_seconds": cpu_seconds,
                  "peak_rss_mb": status_mib("VmHWM"), "baseline_rss_mb": baseline}))
"""

MODES = ("stream_conversations", "stream_conversations_nogc", "stream_json_only", "json_load")


def run_mode(mode: str, path: Path, chunk_size: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(path), str(chunk_size)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dialogues", type=int, default=258_354, help="synthetic dialogues to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--chunk-size", type=int, default=1 << 20, help="bytes per read of the streaming reader"
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--dir", default=None, help="where to write the synthetic file (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic file")
    args = parser.parse_args()

    tmpdir = Path(args.dir or tempfile.mkdtemp(prefix="soulchat_bench_reading_"))
    tmpdir.mkdir(parents=True, exist_ok=True)
    path = tmpdir / f"synthetic_{args.dialogues}.json"
    start, cpu_start = time.perf_counter(), time.process_time()
    size = write_synthetic(path, args.dialogues, seed=args.seed)
    write_s, write_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    size_mb = size / 2**20
    print(
        f"wrote {args.dialogues} dialogues, {size_mb:.1f} MiB in {write_s:.1f} s "
        f"({write_cpu:.1f} s cpu) -> {path}"
    )

    rows = [
        {
            "mode": "synth_write",
            "dialogues": args.dialogues,
            "file_mib": round(size_mb, 1),
            "seconds": round(write_s, 2),
            "cpu_seconds": round(write_cpu, 2),
            "records_per_s": round(args.dialogues / write_s),
            "records_per_cpu_s": round(args.dialogues / write_cpu),
            "mib_per_s": round(size_mb / write_s, 1),
        }
    ]
    try:
        for mode in args.modes.split(","):
            r = run_mode(mode, path, args.chunk_size)
            row = {
                "mode": mode,
                "dialogues": r["records"],
                "turns": r["turns"],
                "file_mib": round(size_mb, 1),
                "chunk_size": args.chunk_size if mode.startswith("stream") else None,
                "seconds": round(r["seconds"], 2),
                "cpu_seconds": round(r["cpu_seconds"], 2),
                "records_per_s": round(r["records"] / r["seconds"]),
                "records_per_cpu_s": round(r["records"] / r["cpu_seconds"]),
                "mib_per_s": round(size_mb / r["seconds"], 1),
                "peak_rss_mib": round(r["peak_rss_mb"], 1),
                "baseline_rss_mib": round(r["baseline_rss_mb"], 1),
                "working_set_mib": round(r["peak_rss_mb"] - r["baseline_rss_mb"], 1),
            }
            rows.append(row)
            print(
                f"{mode:26s} {row['seconds']:6.2f} s wall {row['cpu_seconds']:6.2f} s cpu  "
                f"{row['records_per_cpu_s']:7d} rec/cpu-s  {row['records_per_s']:7d} rec/s  "
                f"{row['mib_per_s']:6.1f} MiB/s  peak RSS {row['peak_rss_mib']:8.1f} MiB "
                f"(+{row['working_set_mib']:.1f} over the bare interpreter)"
            )
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            if args.dir is None:
                tmpdir.rmdir()
    jsonl, csv_path = write_rows("reading", rows)
    print(f"rows -> {jsonl} and {csv_path}")


if __name__ == "__main__":
    main()
