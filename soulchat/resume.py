"""What ``--resume`` may change: a checkpoint continues the run that saved it, with that run's math.

The checkpoint stores the config it ran with (``<checkpoint>/config.json``). On resume every option that
changes the steps still to come is compared with it, and a change is refused with one line naming each
changed flag with its old and new value. The optimizer and scheduler state come from the checkpoint, so a
changed ``--lr``, ``--beta1``, ``--beta2``, ``--eps`` or ``--weight-decay`` would be recorded but never
used (the loaded parameter groups carry the old values): refusing is the only honest answer.

Three kinds of options:
- RUNTIME: where and how fast the run executes or what it reports (device, parallel layout, kernels,
  logging, checkpointing): free to change.
- READ_AS: how the data files are found and read. The prepared data are compared as a whole (the store's
  key, its row count and the micro-batches per step); these flags may change when the data come out the
  same (a moved file), and are named when they do not.
- OVERRIDABLE: options read afresh by every run, which take effect from the resumed step on when named
  in ``--resume-override`` (the LR schedule is rebuilt from --steps/--epochs, --warmup-steps,
  --schedule and --min-lr-ratio; --grad-clip and --on-nonfinite are read at each step).
Everything else (the model, the LoRA settings, the optimizer's hyper-parameters, the seed, the data
layout) is refused: start a new --output-dir, or fine-tune the exported model with --model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RUNTIME: dict[str, set[str]] = {
    "model": {"trust_remote_code", "activation_checkpointing", "compile", "fused_kernels"},
    "data": {"workers", "cache_dir"},
    "train": {
        "parallel",
        "device",
        "eval_every",
        "log_every",
        "output_dir",
        "cpu_threads",
        "tensorboard",
        "progress",
    },
    "checkpoint": {"save_every", "keep_last", "resume", "export", "export_dtype", "resume_override"},
    "lora": {"export_merged"},
}
READ_AS: dict[str, set[str]] = {
    "data": {"data", "format", "on_error", "columns", "counselor_role", "client_role"},
}
OVERRIDABLE: dict[str, set[str]] = {
    "train": {"steps", "epochs", "on_nonfinite"},
    "optim": {"warmup_steps", "schedule", "min_lr_ratio", "grad_clip"},
}
# The --resume-override names: the flags without their dashes.
OVERRIDE_NAMES = tuple(sorted(name.replace("_", "-") for names in OVERRIDABLE.values() for name in names))


class ResumeMismatch(RuntimeError):
    """The resumed run's options or data differ from the checkpoint's; the message names them."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _changes(saved: dict[str, Any], now: dict[str, Any], kinds: dict[str, set[str]] | None,
             skip: tuple[dict[str, set[str]], ...]) -> list[tuple[str, str, Any, Any]]:  # fmt: skip
    """(section, field, old, new) for each field that differs, among ``kinds`` (None = all but ``skip``)."""
    out = []
    for section, fields in now.items():
        old_fields = saved.get(section)
        if not isinstance(old_fields, dict):
            continue  # a section the checkpoint's soulchat did not have
        for name, value in fields.items():
            if kinds is not None and name not in kinds.get(section, set()):
                continue
            if kinds is None and any(name in s.get(section, set()) for s in skip):
                continue
            if name in old_fields and old_fields[name] != value:
                out.append((section, name, old_fields[name], value))
    return out


def _describe(changes: list[tuple[str, str, Any, Any]]) -> str:
    return ", ".join(
        f"{_flag(name)} {json.dumps(new)} (was {json.dumps(old)})" for _, name, old, new in changes
    )


def check_resume(checkpoint: Path, cfg, saved_data: Any, data: dict[str, Any]) -> list[str]:
    """Refuse (ResumeMismatch) a resume of ``checkpoint`` whose options or data would not continue its
    run; returns the accepted overrides, described, for the log."""
    now = json.loads(cfg.to_json())
    path = checkpoint / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResumeMismatch(
            f"--resume: {path} cannot be read ({err}); delete {checkpoint} to resume from an older one"
        ) from None
    if not isinstance(saved, dict):
        saved = {}
    math = _changes(saved, now, None, (RUNTIME, READ_AS, OVERRIDABLE))
    if math:
        raise ResumeMismatch(
            f"--resume: {checkpoint} was saved by a run with other options: {_describe(math)}; the steps "
            "still to come would not continue that run. Resume with its values, or start a new --output-dir "
            "(to fine-tune the result, pass its export as --model)"
        )
    overrides = set(cfg.checkpoint.resume_override)
    schedule = _changes(saved, now, OVERRIDABLE, ())
    refused = [c for c in schedule if c[1].replace("_", "-") not in overrides]
    if refused:
        names = " ".join(f"--resume-override {c[1].replace('_', '-')}" for c in refused)
        raise ResumeMismatch(
            f"--resume: {checkpoint} was saved by a run with other options: {_describe(refused)}; resume "
            f"with its values, or pass {names} to continue with the new value(s) from step "
            f"{saved_step(checkpoint)} on"
        )
    if saved_data is not None and saved_data != data:
        read_as = _changes(saved, now, READ_AS, ())
        cause = (
            f"the data options changed: {_describe(read_as)}"
            if read_as
            else "the data files' contents changed since it was saved"
        )
        raise ResumeMismatch(
            f"--resume: {checkpoint} was trained on other prepared data ({cause}; saved {saved_data}, now "
            f"{data}); resume with the data it was trained on, or start a new --output-dir"
        )
    return [f"{_flag(name)} {json.dumps(new)} (was {json.dumps(old)})" for _, name, old, new in schedule]


def saved_step(checkpoint: Path) -> str:
    """The step number of a step_NNNNNN checkpoint directory, for messages."""
    digits = checkpoint.name.removeprefix("step_")
    return str(int(digits)) if digits.isdigit() else checkpoint.name
