"""The run's reports: metrics.jsonl (kept up to the resumed step), the summary file and its printout."""

from __future__ import annotations

import json

import torch

from soulchat.runlog import ProgressBar, RunLog, format_summary, peak_memory_gb, write_summary


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_run_log_writes_json_lines_and_keeps_only_steps_up_to_the_resumed_one(tmp_path):
    log = RunLog(tmp_path, enabled=True, resume_step=0, tensorboard=False)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    log.write({"step": 3, "eval_loss": 0.5})
    log.close()
    assert [r["step"] for r in _lines(log.path)] == [1, 2, 3, 3]
    (log.path).write_text(log.path.read_text() + "not json\n")  # a line cut by a kill -9
    resumed = RunLog(tmp_path, enabled=True, resume_step=2, tensorboard=False)
    assert _lines(resumed.path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    fresh = RunLog(tmp_path, enabled=True, resume_step=0, tensorboard=False)
    assert fresh.path.read_text() == ""  # a new run starts a new file


def test_run_log_of_other_ranks_writes_nothing(tmp_path):
    log = RunLog(tmp_path / "run", enabled=False, resume_step=0, tensorboard=True)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert not (tmp_path / "run").exists()
    bar = ProgressBar(enabled=False, total=3, initial=0)
    bar.update(1.0, 1e-3, 100.0)
    bar.close()
    assert bar.bar is None


def _summary(**extra):
    return {
        "steps": 4, "start_step": 0, "first_loss": 8.0, "last_loss": 6.5, "tokens": 1000, "trained_tokens": 400,
        "tokens_per_s": 250.0, "wall_time_s": 4.2, "checkpoint": "run/checkpoints/step_000004",
        "export": None, "heldout": None, "output_dir": "run", **extra,
    }  # fmt: skip


def test_summary_printout_and_file(tmp_path, capsys):
    text = format_summary(_summary(), tmp_path / "metrics.jsonl")
    assert "steps            0 -> 4" in text and "loss first->last 8.0000 -> 6.5000" in text
    assert "held-out" not in text and "export           (disabled)" in text
    assert "250 tokens/s (1000 tokens, 400 trained)" in text
    with_eval = _summary(eval_loss=5.0, eval_ppl=148.41, heldout="cache/heldout.json", export="run/export")
    text = format_summary(with_eval, tmp_path / "metrics.jsonl")
    assert "held-out         loss 5.0000, ppl 148.41 (conversations: cache/heldout.json)" in text
    assert "export           run/export" in text
    assert "n/a" in format_summary(_summary(first_loss=None, tokens_per_s=None), tmp_path / "m")
    write_summary(tmp_path, with_eval, tmp_path / "metrics.jsonl")
    assert json.loads((tmp_path / "summary.json").read_text()) == with_eval
    assert "summary" in capsys.readouterr().out


def test_peak_memory_is_a_positive_number_on_the_cpu():
    assert peak_memory_gb(torch.device("cpu")) > 0
