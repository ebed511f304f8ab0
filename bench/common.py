"""Shared benchmark helpers: one timing function, one environment record, one result writer.

Every benchmark writes rows that carry the hardware, library versions, commit and date, so a number in
bench/results/ can always be traced to the machine and code that produced it.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Hardware, versions, commit and date for a result row."""
    import numpy

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _git_commit(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name()
            env["cuda"] = torch.version.cuda
        else:
            env["gpu"] = None
            env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    for name in ("triton", "transformers", "flash_attn"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    return env


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def time_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    On CUDA this is ``triton.testing.do_bench`` (median, with its L2 flush); on the CPU a plain
    ``perf_counter`` median over ``repeats`` runs after ``warmup`` runs.
    """
    if cuda_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def write_rows(name: str, rows: list[dict], results_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``rows`` (each merged with the environment record) to ``<name>.jsonl`` and ``<name>.csv``.

    Rows are appended to the JSONL file (a history) and the CSV holds the latest run only.
    """
    results_dir = results_dir or RESULTS_DIR
    results_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    full = [{**row, **{f"env_{k}": v for k, v in env.items()}} for row in rows]
    jsonl = results_dir / f"{name}.jsonl"
    with jsonl.open("a", encoding="utf-8") as f:
        for row in full:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    csv_path = results_dir / f"{name}.csv"
    fields: list[str] = []
    for row in full:
        fields += [k for k in row if k not in fields]
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(full)
    return jsonl, csv_path
