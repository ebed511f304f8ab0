"""The optimizer and its learning-rate schedule: AdamW over two parameter groups (weight decay on weight
matrices only), linear warmup then constant, linear or cosine decay.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from soulchat.distributed import Runtime
from soulchat.model import PackedCausalLM
from soulchat.train_options import Config


def parameter_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only; never on norms and biases (1-D), embeddings optional."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    lm = model.lm if isinstance(model, PackedCausalLM) else model
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is not None:
        embedding_ids |= {id(p) for p in head.parameters()}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or (id(p) in embedding_ids and not decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(cfg: Config, model: PackedCausalLM, rt: Runtime) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = parameter_groups(model, o.weight_decay, o.decay_embeddings)
    extra = {"fused": True} if rt.device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **extra)


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup, then decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(cfg: Config, optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.optim.warmup_steps
    if warmup is None:
        warmup = max(1, round(0.05 * total_steps))
    fn = functools.partial(
        lr_factor,
        total=total_steps,
        warmup=warmup,
        schedule=cfg.optim.schedule,
        min_ratio=cfg.optim.min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
