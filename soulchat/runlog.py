"""What a training run reports: metrics.jsonl (+ TensorBoard), the progress bar, summary.json and the
printed summary. Rank 0 writes; every other rank gets objects that do nothing, so callers never branch.
Also the numbers those reports hold: training FLOPs and MFU, parameter counts, perplexity.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn


class RunLog:
    """One JSON object per line in <output>/metrics.jsonl, mirrored to TensorBoard events when the
    tensorboard package is installed."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, resume_step: int, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # On resume keep the lines up to the checkpoint's step: the steps after it are redone.
        kept = []
        if resume_step > 0 and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class ProgressBar:
    """tqdm on stderr with the step's loss, lr and tokens/s; a no-op when disabled."""

    def __init__(self, *, enabled: bool, total: int, initial: int) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=sys.stderr)

    def update(self, loss: float | None, lr: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=_fmt(loss), lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


def write_summary(output_dir: str | Path, summary: dict[str, Any], metrics_path: Path) -> None:
    """<output>/summary.json, and the summary printed for people."""
    Path(output_dir, "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(format_summary(summary, metrics_path), flush=True)


def format_summary(summary: dict[str, Any], metrics_path: Path) -> str:
    s = summary
    lines = [
        "",
        "summary",
        f"  steps            {s['start_step']} -> {s['steps']}",
        f"  loss first->last {_fmt(s['first_loss'])} -> {_fmt(s['last_loss'])}",
    ]
    if "eval_loss" in s:
        lines.append(
            f"  held-out         loss {_fmt(s['eval_loss'])}, ppl {s['eval_ppl']:.2f} "
            f"(conversations: {s['heldout']})"
        )
    lines += [
        (
            f"  throughput       {_fmt(s['tokens_per_s'], '.0f')} tokens/s ({s['tokens']} tokens, "
            f"{s['trained_tokens']} trained)"
        ),
        f"  wall time        {s['wall_time_s']:.1f} s",
        f"  checkpoint       {s['checkpoint']}",
        f"  export           {s['export']}" if s["export"] else "  export           (disabled)",
        f"  metrics          {metrics_path}",
    ]
    return "\n".join(lines)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


# --------------------------------------------------------------------------------------------------
# FLOPs, parameters, perplexity


def matmul_flops(config: Any, tokens: int, trained_tokens: int, sum_sq_seqlens: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one step, for MFU.

    Linear layers: 2 FLOPs per weight per token forward. The lm head only runs on trained tokens.
    Causal attention: QK^T and PV, 2 * 2 * D per (query, key) pair, L^2/2 pairs per conversation.
    """
    h = config.hidden_size
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    inter = config.intermediate_size
    per_layer = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2 + 3 * h * inter
    dense = 2 * per_layer * layers * tokens
    head = 2 * h * config.vocab_size * trained_tokens
    attention = 2 * 2 * heads * head_dim * layers * sum_sq_seqlens / 2
    return 3.0 * (dense + head + attention)


# bf16 dense peak FLOP/s by device name substring (vendor data sheets), for MFU.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def count_parameters(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
