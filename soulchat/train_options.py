"""The training run's options: ``Config``, every section of ``TRAIN_COMMAND`` (``python -m soulchat.train``),
with the defaults that depend on the kind of run and the checks that need more than one section.

The sections themselves are declared in soulchat.options (they are shared with prepare, chat, evaluate
and construct); how sections become flags and config-file keys is soulchat.commandline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from soulchat.commandline import Command, require
from soulchat.options import (
    CheckpointConfig,
    DataConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)

# Values of the fields left unset (None), by run kind. The built-in model starts from random weights and
# must visibly learn within a couple of CPU minutes: a large learning rate, small steps (more updates
# per token: 2k-token steps reached a lower loss than 4k-token ones for the same compute) and six
# passes over the 126-conversation sample corpus (~52k tokens; loss 8.3 -> ~5.4 in ~150 steps).
# Fine-tuning a pretrained model wants the usual full fine-tuning rate, GPU-sized rows and one pass.
BUILTIN_DEFAULTS = {"lr": 5e-3, "epochs": 6.0, "tokens_per_micro_batch": 1024, "tokens_per_step": 2048}
FINETUNE_DEFAULTS = {"lr": 2e-5, "epochs": 1.0, "tokens_per_micro_batch": 8192, "tokens_per_step": 65536}
# Fine-tuning learning rate when --lr is unset: LoRA updates a low-rank delta from a zero start and is
# usually trained ~10x hotter than a full fine-tune (peft/TRL recipes use 1e-4..3e-4; full: 2e-5).
LORA_FINETUNE_LR = 2e-4

TRAIN_COMMAND = Command(
    "python -m soulchat.train",
    "Fine-tune a causal LM into an empathetic counselor on packed multi-turn conversations. "
    "Run under torchrun for several processes. Precedence: defaults < --config file < flags.",
    [ModelConfig, DataConfig, OptimConfig, TrainConfig, CheckpointConfig, LoraConfig],
)
SECTIONS: dict[str, type] = {s.name: s.cls for s in TRAIN_COMMAND.sections}


@dataclass
class Config:
    """The training run: every section of ``TRAIN_COMMAND``, with the checks that need more than one."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        defaults = BUILTIN_DEFAULTS if self.model.model is None else FINETUNE_DEFAULTS
        if self.lora.enabled and self.model.model is not None:
            defaults = {**defaults, "lr": LORA_FINETUNE_LR}
        if self.optim.lr is None:
            self.optim.lr = defaults["lr"]
        for name in ("epochs", "tokens_per_micro_batch", "tokens_per_step"):
            if getattr(self.train, name) is None:
                setattr(self.train, name, defaults[name])
        t = self.train
        require(
            t.tokens_per_step >= t.tokens_per_micro_batch
            and t.tokens_per_step % t.tokens_per_micro_batch == 0,
            f"--tokens-per-step ({t.tokens_per_step}) must be a positive multiple of "
            f"--tokens-per-micro-batch ({t.tokens_per_micro_batch})",
        )
        # In training a packed row is one micro-batch: --row-size is that size, or must agree with it.
        require(
            self.data.row_size in (None, t.tokens_per_micro_batch),
            f"--row-size ({self.data.row_size}) differs from --tokens-per-micro-batch "
            f"({t.tokens_per_micro_batch}): in training a packed row is one micro-batch; leave --row-size "
            "unset or set both to the same value",
        )
        self.data.row_size = t.tokens_per_micro_batch
        require(
            self.data.max_length <= t.tokens_per_micro_batch,
            f"--max-length ({self.data.max_length}) must fit in one packed row: raise "
            f"--tokens-per-micro-batch ({t.tokens_per_micro_batch}) or lower --max-length",
        )

    @property
    def builtin_model(self) -> bool:
        return self.model.model is None

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "config") -> Config:
        """Build from sectioned and/or flat keys; unknown keys are an error naming the closest field."""
        return cls(**TRAIN_COMMAND.from_dict(values, where))


def build_parser() -> argparse.ArgumentParser:
    return TRAIN_COMMAND.parser()


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Defaults < --config file < flags, then validate."""
    return Config(**TRAIN_COMMAND.parse(argv))
