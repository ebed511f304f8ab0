"""bench/device_check.py, the one command for a lent GPU machine, run here in its simulated mode.

The simulated run is the real driver with the python3 running the tests standing in for the device's:
every step runs except the CUDA ones (see the module docstring). Only quick sections run here (the
install section rebuilds the extension: its full simulated run is in README "The device check").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "device_check.py"

sys.path.insert(0, str(ROOT / "bench"))
import device_check  # noqa: E402


def _run(tmp_path, *args, simulate=True, path=None):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["OUT"] = str(tmp_path / "out")
    env[device_check.SIMULATE_ENV] = "1" if simulate else "0"
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_device_check_boxes_fit_the_command_limit():
    boxes = sum(device_check.BOXES.values())
    assert boxes + device_check.RESERVE_SECONDS <= device_check.TOTAL_SECONDS <= 540


def test_device_check_simulated_sections_write_three_files(tmp_path):
    done = _run(tmp_path, "--sections", "env,loss")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["device_check.jsonl", "device_check.log", "device_check.md"]
    rows = [json.loads(line) for line in (out / "device_check.jsonl").read_text().splitlines()]
    assert all(r["simulated"] is True and r["commit"] for r in rows)
    env_rows = [r for r in rows if r["kind"] == "env"]
    assert len(env_rows) == 1 and env_rows[0]["torch"] and "python" in env_rows[0]
    sections = {r["section"]: r for r in rows if r["kind"] == "section"}
    assert list(sections) == ["env", "loss"] and all(r["status"] == 0 for r in sections.values())
    # The CUDA measurement is the one step left out: the benchmark runs its smoke path.
    assert "--smoke" in (out / "device_check.log").read_text()
    summary = (out / "device_check.md").read_text()
    assert "| env | 0 |" in summary and "| loss | 0 |" in summary


def test_device_check_refuses_without_a_gpu_unless_simulated(tmp_path):
    done = _run(tmp_path, simulate=False, path=str(tmp_path))  # no nvidia-smi on this PATH
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and device_check.SIMULATE_ENV in done.stderr
    bad = _run(tmp_path, "--sections", "env,nope")
    assert bad.returncode == 2 and "nope" in bad.stderr
