"""Shared benchmark helpers: one timing function, one environment record, one result writer.

Every benchmark writes rows that carry the hardware, library versions, commit and date, so a number in
bench/results/ can always be traced to the machine and code that produced it.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# SOULCHAT_RESULTS_DIR sends every benchmark's files elsewhere (bench/device_check.py collects them
# from a scratch folder into its own few files).
RESULTS_DIR = Path(os.environ.get("SOULCHAT_RESULTS_DIR") or Path(__file__).resolve().parent / "results")
# Prefix of every result file name, e.g. "gpu-", so a device run's files (gpu-varlen_attention.jsonl,
# gpu-train.csv, ...) stand apart from the committed CPU results.
RESULTS_PREFIX_ENV = "SOULCHAT_BENCH_PREFIX"


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
    for dist in ("triton", "transformers", "flash-attn", "peft", "liger-kernel", "trl"):
        try:  # installed distributions' versions, without importing them
            env[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[dist.replace("-", "_")] = None
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


def _with_environment(rows: list[dict]) -> list[dict]:
    env = environment()
    return [{**row, **{f"env_{k}": v for k, v in env.items()}} for row in rows]


def append_jsonl(name: str, rows: list[dict], results_dir: Path | None = None) -> Path:
    """Append ``rows`` (with the environment record) to ``<prefix><name>.jsonl``."""
    results_dir = results_dir or RESULTS_DIR
    results_dir.mkdir(parents=True, exist_ok=True)
    jsonl = results_dir / f"{os.environ.get(RESULTS_PREFIX_ENV, '')}{name}.jsonl"
    with jsonl.open("a", encoding="utf-8") as f:
        for row in _with_environment(rows):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return jsonl


def write_rows(
    name: str, rows: list[dict], results_dir: Path | None = None, jsonl: bool = True
) -> tuple[Path, Path]:
    """Write ``rows`` (each merged with the environment record) to ``<name>.jsonl`` and ``<name>.csv``,
    the names prefixed by ``$SOULCHAT_BENCH_PREFIX`` when it is set.

    Rows are appended to the JSONL file (a history; ``jsonl=False`` when the caller appended them
    already) and the CSV holds the latest run only.
    """
    results_dir = results_dir or RESULTS_DIR
    if jsonl:
        append_jsonl(name, rows, results_dir)
    name = os.environ.get(RESULTS_PREFIX_ENV, "") + name
    results_dir.mkdir(parents=True, exist_ok=True)
    full = _with_environment(rows)
    jsonl_path = results_dir / f"{name}.jsonl"
    csv_path = results_dir / f"{name}.csv"
    fields: list[str] = []
    for row in full:
        fields += [k for k in row if k not in fields]
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(full)
    return jsonl_path, csv_path


# --------------------------------------------------------------------------------------------------
# Kernel microbenchmarks (rms_norm, swiglu, linear_cross_entropy): one measuring loop, one command line.


def peak_memory_mb(fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory one ``fn()`` allocates above what was allocated before it (MiB); None off CUDA.

    The inputs are excluded; outputs, gradients and temporaries are included."""
    if not cuda_available():
        return None
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)


def measure_fwd_bwd(
    impls: dict[str, Callable[..., Any]],
    inputs: Sequence[Any],
    grad_outputs: Any,
    truth: Any,
    *,
    shape: dict,
    label: str,
    smoke: bool,
    nbytes: dict[str, int] | None = None,
    flops: dict[str, float] | None = None,
) -> list[dict]:
    """Time each implementation's forward and forward+backward on one shape; one row per (impl, mode),
    with the peak memory of one call on CUDA (``peak_mb``).

    impls:        name -> fn; ``fn(*inputs)`` returns one tensor or a tuple of tensors
    inputs:       the arguments every implementation is called with (same tensors for all); the
                  backward differentiates those that require grad
    grad_outputs: the upstream gradient(s), shaped like fn's output(s)
    truth:        the fp32 reference output(s); each row records the max abs error against it
    shape:        columns every row of this shape carries (op, dtype, sizes)
    label:        the sizes as printed, e.g. "T=16384 H=896"
    nbytes:       {"fwd": ..., "fwd+bwd": ...}: the bytes each mode must move at least, for GB/s
                  (memory-bound ops)
    flops:        {"fwd": ..., "fwd+bwd": ...}: the floating-point work of each mode, for TFLOP/s
                  (GEMM-bound ops)

    An implementation that fails (e.g. torch.compile unavailable) is recorded as a "skipped" row with
    its error instead of stopping the run.
    """
    import torch

    truths = truth if isinstance(truth, (tuple, list)) else (truth,)
    wrt = tuple(t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad)
    rows = []
    for name, fn in impls.items():
        row = {"impl": name, **shape}
        try:
            with torch.no_grad():
                out = fn(*inputs)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            row["max_abs_err_vs_fp32_ref"] = max(
                (o.float() - t).abs().max().item() for o, t in zip(outs, truths)
            )

            def forward(fn=fn):
                with torch.no_grad():
                    fn(*inputs)

            def forward_backward(fn=fn):
                torch.autograd.grad(fn(*inputs), wrt, grad_outputs)

            forward_backward()  # compile / first launch outside the timed region
            for mode, call in (("fwd", forward), ("fwd+bwd", forward_backward)):
                ms = time_ms(call, warmup=1, repeats=2) if smoke else time_ms(call)
                timed = {"mode": mode, "ms": round(ms, 4), "peak_mb": peak_memory_mb(call)}
                rate = ""
                if nbytes is not None:
                    timed["gb_per_s"] = round(nbytes[mode] / (ms * 1e-3) / 1e9, 1)
                    rate += f" {timed['gb_per_s']:8.1f} GB/s"
                if flops is not None:
                    timed["tflops"] = round(flops[mode] / (ms * 1e-3) / 1e12, 1)
                    rate += f" {timed['tflops']:6.1f} TFLOP/s"
                rows.append({**row, **timed})
                print(
                    f"{name:16s} {mode:8s} {label} {ms:8.3f} ms{rate} peak={timed['peak_mb']} MiB "
                    f"err={row['max_abs_err_vs_fp32_ref']:.2e}"
                )
        except Exception as exc:  # a baseline that fails (e.g. compile unavailable) is recorded, not fatal
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            rows.append({**row, "mode": "skipped", "error": msg})
            print(f"{name:16s} skipped: {msg}")
    return rows


def kernel_bench_parser(description: str, tokens: int = 16384) -> argparse.ArgumentParser:
    """The options every kernel microbenchmark takes: --tokens, --dtype, --smoke (add the size option)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tokens", type=int, default=tokens, help="tokens per packed micro-batch")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on the CPU (Triton interpreter), checks the code paths, writes nothing",
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help="comma-separated indices into the benchmark's shape list (default: every shape)",
    )
    return parser


def run_kernel_bench(
    name: str,
    args: argparse.Namespace,
    bench_shape: Callable[..., list[dict]],
    smoke_shape: tuple,
    shapes: Sequence[tuple],
) -> int:
    """The body of a kernel microbenchmark's main(); returns its exit status.

    ``bench_shape(*shape, dtype, device, smoke=...)`` measures one shape. With ``args.smoke``: the
    one tiny ``smoke_shape`` in fp32 on the CPU (Triton interpreter), nothing written, status 1 if any
    implementation failed. Otherwise, on CUDA: every shape in ``args.dtype``, rows written to
    bench/results/<name>.{jsonl,csv} (see ``write_rows`` for the prefix); without CUDA it says so and
    returns 0.
    """
    import torch

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before soulchat.kernels imports triton
        rows = bench_shape(*smoke_shape, torch.float32, torch.device("cpu"), smoke=True)
        print(f"smoke run: {sum('error' not in r for r in rows)} timed rows, nothing written")
        return 0 if all("error" not in r for r in rows) else 1

    if not cuda_available():
        print(f"bench_{name}: no CUDA GPU here; nothing measured (use --smoke for a CPU code-path check)")
        return 0

    dtype = getattr(torch, args.dtype)
    if getattr(args, "shapes", None):
        shapes = [shapes[int(i)] for i in args.shapes.split(",")]
    print(f"{name} on {torch.cuda.get_device_name()}, {args.dtype}")
    rows = []
    for shape in shapes:
        shape_rows = bench_shape(*shape, dtype, torch.device("cuda"), smoke=False)
        rows += shape_rows
        # Each shape's rows reach the JSONL history as soon as they exist: a run stopped by a time box
        # keeps what it measured.
        append_jsonl(name, shape_rows)
    _, csv_path = write_rows(name, rows, jsonl=False)
    print(f"wrote {csv_path} and appended each shape's rows to its .jsonl")
    return 0
