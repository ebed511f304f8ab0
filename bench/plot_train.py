"""Redraw bench/results/train.png from the committed rows of bench/bench_train.py.

    python -m bench.plot_train                       # the latest run in bench/results/train.jsonl
    python -m bench.plot_train --rows gpu-train.jsonl --out gpu-train.png

Takes the rows of the most recent run (its date and commit) in the JSONL history, so the chart always
matches a committed table: every method that run measured (five since TRL's SFTTrainer joined), per
data set, trained tokens/s and the training loop's peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_train import plot  # noqa: E402
from bench.common import RESULTS_DIR  # noqa: E402


def latest_run(rows: list[dict]) -> list[dict]:
    """The rows of the last (date, commit) in the history."""
    if not rows:
        raise SystemExit("plot_train: no rows")
    last = max((r.get("env_date", ""), r.get("env_commit", "")) for r in rows)
    return [r for r in rows if (r.get("env_date", ""), r.get("env_commit", "")) == last]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=str(RESULTS_DIR / "train.jsonl"))
    parser.add_argument("--out", default=str(RESULTS_DIR / "train.png"))
    args = parser.parse_args(argv)
    path = Path(args.rows)
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = latest_run([json.loads(line) for line in lines if line.strip()])
    results: dict[str, dict[str, dict]] = {}
    for r in rows:
        results.setdefault(r["data"], {})[r["method"]] = r
    first = rows[0]
    title = (f"{first['model_shape']} model on {first['device']} ({first.get('dtype')}, "
             f"{first.get('torch_threads')} thread(s)), {first['steps']} steps of <= {first['rows_per_step']} "
             f"x {first['row_size']} tokens; "
             f"peak memory = training loop above setup; {first['env_date']}, commit {first['env_commit']} "
             f"({path.name})")
    plot(results, Path(args.out), title)
    print(f"{len(rows)} rows: {', '.join(sorted({r['method'] for r in rows}))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
