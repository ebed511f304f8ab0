"""The device check: one command on a lent H100/H200, done inside 540 s, every result under $OUT.

    python3 bench/device_check.py                                  # the GPU machine, repository root
    SOULCHAT_GPU_CHECK_SIMULATE=1 .venv/bin/python bench/device_check.py   # anywhere, no GPU

It uses the machine's own ``python3`` (there a virtual environment holding torch 2.11, triton 3.6,
transformers, pytest, hypothesis, peft, pybind11; no new venv): it installs this repository into it
(editable, no dependencies, no build isolation, no index: the machine is offline) and, when a
git-ignored ``.whl/`` folder came along (``carry: [".whl"]``), those wheels into /tmp/site first.

Sections, each time-boxed, the boxes cut to what is left of the 540 s (they add up to 525 s):

    install   125 s   .whl wheels (30), the editable install (75: builds the C++ extension), imports (20)
    env        20 s   card, driver, CUDA, versions, commit (nvidia-smi and torch)
    tests     120 s   pytest -m "cuda and not slow" on the kernel test files, SOULCHAT_TRITON_AUTOTUNE=0
                      (each attention key compiles its compile-table first config only)
    attention  75 s   bench.bench_varlen_attention, one shape (Qwen2.5-7B heads: 28/4, D=128), this
                      project's kernels (autotuned over the spill-free configs: one key) against
                      torch's varlen_attn and flash-attn where installed
    loss       40 s   bench.bench_linear_cross_entropy, one shape (N=8192, H=3584, V=151936)
    train     145 s   bench.bench_train, 1.5B shape, 8 steps, method soulchat twice: the default attention
                      backend (70), then SOULCHAT_ATTENTION_BACKEND=triton (75; autotune off)

Writes at most three files under $OUT (/tmp/soulchat-device-check without $OUT): device_check.log (every
section's output), device_check.jsonl (one row per section with its status and wall time, one per
test, every benchmark row tagged with its section) and device_check.md (the summary). Benchmark rows
are read from a scratch results folder after each section, so a section stopped by its box keeps
the rows it wrote.

``SOULCHAT_GPU_CHECK_SIMULATE=1``: for a machine without a GPU, with the python3 running this script
standing in for the device's (a virtual environment with a CPU torch). Every step runs for real
except what needs CUDA: the kernel benchmarks run their ``--smoke`` path (CPU interpreter, no rows),
the tests run and skip, and training uses the tiny model on the CPU for 2 steps (the forced-Triton row
runs the kernels in the interpreter, fp32; 512-token rows). ``--sections a,b`` runs a subset.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOTAL_SECONDS = 540
RESERVE_SECONDS = 15  # writing the summary, process teardown
SIMULATE_ENV = "SOULCHAT_GPU_CHECK_SIMULATE"
KERNEL_TESTS = ["tests/test_varlen_attention.py", "tests/test_linear_cross_entropy.py",
                "tests/test_rms_norm.py", "tests/test_swiglu.py", "tests/test_dispatch.py"]
SECTIONS = ["install", "env", "tests", "attention", "loss", "train"]
# Seconds per step; with RESERVE_SECONDS they add up to TOTAL_SECONDS at most (tests/test_device_check.py).
BOXES = {"wheels": 30, "install": 75, "imports": 20, "env": 20, "tests": 120, "attention": 75, "loss": 40,
         "train_default": 70, "train_triton": 75}


class Check:
    def __init__(self, out: Path, simulate: bool):
        self.out = out
        self.simulate = simulate
        self.start = time.monotonic()
        self.log = (out / "device_check.log").open("a", encoding="utf-8")
        self.rows_path = out / "device_check.jsonl"
        self.scratch = Path(tempfile.mkdtemp(prefix="device_check_"))
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["SOULCHAT_RESULTS_DIR"] = str(self.scratch / "results")
        self.env.pop("SOULCHAT_BENCH_PREFIX", None)
        self.sections: list[dict] = []
        self.common = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "commit": _commit(), "simulated": simulate}

    # -- output ------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def row(self, row: dict) -> None:
        with self.rows_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({**self.common, **row}, ensure_ascii=False, default=str) + "\n")

    def left(self) -> float:
        return TOTAL_SECONDS - RESERVE_SECONDS - (time.monotonic() - self.start)

    # -- running -----------------------------------------------------------------------------------
    def run(self, section: str, box: float, argv: list[str], env: dict | None = None) -> tuple[int, str]:
        """Run ``argv`` time-boxed to min(box, what is left); its output goes to the log as it comes."""
        limit = min(box, self.left())
        if limit < 5:
            self.say(f"[{section}] skipped: {self.left():.0f} s left of the {TOTAL_SECONDS} s")
            return 125, ""
        self.say(f"[{section}] $ {' '.join(argv)}  (box {limit:.0f} s)")
        lines: list[str] = []
        proc = subprocess.Popen(argv, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        deadline = time.monotonic() + limit
        status = None
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.killpg(proc.pid, 9)  # the whole group: pytest workers, bench children
                proc.wait()
                status = 124
                self.say(f"[{section}] stopped at its {limit:.0f} s box")
                break
            if sel.select(timeout=min(remaining, 1.0)):
                line = proc.stdout.readline()
                if line == "":
                    status = proc.wait()
                    break
                lines.append(line)
                self.log.write(line)
                self.log.flush()
        sel.close()
        return status, "".join(lines)

    def section(self, name: str, fn) -> None:
        began = time.monotonic()
        try:
            status, detail = fn()
        except Exception as exc:  # a section that breaks is reported; the next ones still run
            status, detail = 1, f"{type(exc).__name__}: {exc}"
        seconds = round(time.monotonic() - began, 1)
        entry = {"section": name, "status": status, "seconds": seconds, "detail": detail}
        self.sections.append(entry)
        self.row({"kind": "section", **entry})
        self.say(f"[{name}] status {status} in {seconds} s{': ' + detail if detail else ''}")

    def collect_rows(self, section: str, extra: dict | None = None) -> int:
        """Benchmark rows written to the scratch results folder since the last call, tagged."""
        n = 0
        for path in sorted(glob.glob(str(self.scratch / "results" / "**" / "*.jsonl"), recursive=True)):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        self.row({"kind": "bench", "section": section, "file": Path(path).name,
                                  **(extra or {}), **json.loads(line)})
                        n += 1
            os.remove(path)
        return n

    # -- sections ----------------------------------------------------------------------------------
    def install(self) -> tuple[int, str]:
        py = sys.executable
        wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
        if wheels:
            status, _ = self.run("install", BOXES["wheels"], [
                py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                "--upgrade", "--target", "/tmp/site", *wheels])
            if status != 0:
                return status, "the carried wheels did not install"
            self.env["PYTHONPATH"] = "/tmp/site" + os.pathsep + self.env.get("PYTHONPATH", "")
        status, out = self.run("install", BOXES["install"], [
            py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "-e", "."])
        if status != 0:  # the cause in the summary too (e.g. a build requirement missing from this python)
            lines = [line.strip() for line in out.splitlines()]
            causes = [x for x in lines if re.search(r"\w+Error: ", x)] or [x for x in lines if "error:" in x]
            return status, "pip install -e . failed" + (f": {causes[-1][:200]}" if causes else " (see the log)")
        probe = ("import torch, soulchat._packer, soulchat.kernels.varlen_attention as va; "
                 "print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'triton', "
                 "va.triton.__version__ if va.triton else None)")
        status, out = self.run("install", BOXES["imports"], [py, "-c", probe])
        return status, out.strip().splitlines()[-1] if out.strip() else ""

    def record_env(self) -> tuple[int, str]:
        code = (
            "import json, shutil, subprocess; from bench.common import environment; env = environment()\n"
            "q = 'name,driver_version,memory.total,compute_cap,clocks.max.sm'\n"
            "if shutil.which('nvidia-smi'):\n"
            "    out = subprocess.run(['nvidia-smi', f'--query-gpu={q}', '--format=csv,noheader'],"
            " capture_output=True, text=True).stdout.strip().splitlines()\n"
            "    env['nvidia_smi'] = [dict(zip(q.split(','), (x.strip() for x in line.split(','))))"
            " for line in out]\n"
            "print('ENV ' + json.dumps(env))\n"
        )
        status, out = self.run("env", BOXES["env"], [sys.executable, "-c", code])
        for line in out.splitlines():
            if line.startswith("ENV "):
                self.row({"kind": "env", **json.loads(line[4:])})
        return status, ""

    def tests(self) -> tuple[int, str]:
        env = {**self.env, "SOULCHAT_TRITON_AUTOTUNE": "0"}
        argv = [sys.executable, "-m", "pytest", "-m", "cuda and not slow", "-v", "-p", "no:cacheprovider",
                "-o", "addopts=", *KERNEL_TESTS]
        status, out = self.run("tests", BOXES["tests"], argv, env=env)
        counts: dict[str, int] = {}
        for m in re.finditer(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", out, re.M):
            counts[m.group(2)] = counts.get(m.group(2), 0) + 1
            self.row({"kind": "test", "section": "tests", "test": m.group(1), "outcome": m.group(2)})
        return status, " ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items()))

    def bench(self, section: str, module: str, box: float, gpu_args: list[str]) -> tuple[int, str]:
        args = ["--smoke"] if self.simulate else gpu_args
        status, _ = self.run(section, box, [sys.executable, "-m", module, *args])
        return status, f"{self.collect_rows(section)} rows"

    def train(self) -> tuple[int, str]:
        if self.simulate:
            common = ["--device", "cpu", "--model-shape", "tiny", "--steps", "2", "--warmup-steps", "1",
                      "--data", "bundled", "--row-size", "512", "--rows-per-step", "1", "--max-length", "512"]
        else:
            common = ["--device", "cuda", "--model-shape", "1.5b", "--steps", "8", "--warmup-steps", "3",
                      "--data", "synth"]
        details, statuses = [], []
        for forced, box in ((None, BOXES["train_default"]), ("triton", BOXES["train_triton"])):
            out = self.scratch / "results" / f"train-{forced or 'default'}"
            env = dict(self.env)
            if forced:
                env["SOULCHAT_ATTENTION_BACKEND"] = forced
                env["SOULCHAT_TRITON_AUTOTUNE"] = "0"  # one compile per kernel: the compile table's first
                if self.simulate:
                    env["TRITON_INTERPRET"] = "1"  # the kernels on the CPU: the interpreter, fp32
            status, _ = self.run("train", box, [sys.executable, "-m", "bench.bench_train", *common,
                                                "--methods", "soulchat", "--out", str(out)], env=env)
            statuses.append(status)
            n = self.collect_rows("train", {"forced_attention_backend": forced})
            details.append(f"{forced or 'default'} attention: status {status}, {n} rows")
            for png in out.glob("*.png"):
                png.unlink()  # the plot stays behind: rows only
        return max(statuses, key=lambda s: s != 0), "; ".join(details)

    def summary(self) -> None:
        lines = [f"# device check, {self.common['date']}, commit {self.common['commit']}"
                 f"{' (simulated, no GPU)' if self.simulate else ''}", "",
                 f"{time.monotonic() - self.start:.0f} s of the {TOTAL_SECONDS} s box", "",
                 "| section | status | seconds | detail |", "|---|---|---|---|"]
        lines += [f"| {s['section']} | {s['status']} | {s['seconds']} | {s['detail']} |"
                  for s in self.sections]
        (self.out / "device_check.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.say("\n".join(lines))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {SECTIONS}")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        print(f"device_check: unknown sections {unknown}; choose from {SECTIONS}", file=sys.stderr)
        return 2
    simulate = os.environ.get(SIMULATE_ENV, "0") == "1"
    if not simulate and not shutil.which("nvidia-smi"):
        print(f"device_check: no nvidia-smi here; on a machine without a GPU set {SIMULATE_ENV}=1",
              file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT") or Path(tempfile.gettempdir()) / "soulchat-device-check")
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, simulate)
    check.say(f"device check: python {sys.executable}, commit {check.common['commit']}, "
              f"{'simulated' if simulate else 'GPU'}, sections {wanted}")
    plan = {
        "install": check.install,
        "env": check.record_env,
        "tests": check.tests,
        "attention": lambda: check.bench("attention", "bench.bench_varlen_attention", BOXES["attention"],
                                         ["--shapes", "4", "--impls",
                                          "soulchat_triton,torch_varlen,flash_attn"]),
        "loss": lambda: check.bench("loss", "bench.bench_linear_cross_entropy", BOXES["loss"],
                                    ["--hidden", "3584"]),
        "train": check.train,
    }
    for name in wanted:
        check.section(name, plan[name])
    check.summary()
    shutil.rmtree(check.scratch, ignore_errors=True)
    return 0 if all(s["status"] == 0 for s in check.sections) else 1


if __name__ == "__main__":
    sys.exit(main())
