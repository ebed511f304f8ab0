"""Held-out evaluation during training: the loss per counselor token over the whole held-out store, every
``--eval-every`` steps (``HeldOutEvaluator`` decides when it is due) and once at the end of the run."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from soulchat.data.packing import to_torch
from soulchat.distributed import Runtime, all_reduce_sum
from soulchat.model import PackedCausalLM, model_inputs
from soulchat.parallel import autocast_context
from soulchat.runlog import RunLog, perplexity
from soulchat.train_options import Config


@torch.no_grad()
def heldout_loss(model: PackedCausalLM, train_module: nn.Module, store, rt: Runtime) -> dict[str, float]:
    """Mean loss per counselor token (and perplexity) over the whole held-out store.

    Every counselor token weighs 1 here, whatever --loss-weighting, so the perplexity is per token.
    FSDP needs every rank in every forward: ranks past the end repeat row 0 and discard the result.
    """
    model.eval()
    n = len(store)
    loss_sum, count = 0.0, 0.0
    for i in range(math.ceil(n / rt.world_size)):
        index = i * rt.world_size + rt.rank
        real = index < n
        batch = store.micro_batch(index if real else 0)
        batch = dict(batch, loss_weight=np.ones(len(batch["loss_index"]), dtype=np.float32))
        with autocast_context(rt):
            value = train_module(**model_inputs(to_torch(batch, rt.device)))
        if real:
            loss_sum += float(value)
            count += len(batch["loss_index"])
    loss_sum, count = all_reduce_sum([loss_sum, count], rt)
    model.train()
    loss = loss_sum / count if count else float("nan")
    return {"eval_loss": loss, "eval_ppl": perplexity(loss), "eval_tokens": int(count)}


class HeldOutEvaluator:
    """Held-out loss every --eval-every steps during the run (unset: 5 times) and once at the end."""

    def __init__(self, cfg: Config, store, total_steps: int) -> None:
        self.store = store
        self.total_steps = total_steps
        every = cfg.train.eval_every
        self.every = every if every is not None else max(1, total_steps // 5)
        self.last: dict[str, float] = {}

    def due(self, step: int) -> bool:
        """A mid-run evaluation at ``step`` (the final one is ``run``'s caller's, after the loop)."""
        return (
            self.store is not None and bool(self.every) and step % self.every == 0 and step < self.total_steps
        )

    def run(self, step: int, model, train_module, rt: Runtime, runlog: RunLog) -> dict[str, float]:
        if self.store is None:
            return {}
        self.last = heldout_loss(model, train_module, self.store, rt)
        runlog.write({"step": step, **self.last})
        return self.last
