"""The options of the commands that generate (chat, evaluate, construct): how a trained model is loaded
and prompted. The sections they share with training are soulchat.options' GenerationConfig and the
model directory / device / trust-remote-code fields of ModelConfig and TrainConfig."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from soulchat.commandline import Section, check_types, option
from soulchat.dataspec import TemplateChoice, ThinkingChoice
from soulchat.options import GenerationConfig, ModelConfig

# The model and input-error options of the commands that generate (chat, evaluate), worded for them.
MODEL_SECTION = Section(
    ModelConfig, only=("model", "trust_remote_code"), required=("model",),
    help={"model": "local Hugging Face model directory (a training run's <output-dir>/export, or a LoRA "
                   "run's <output-dir>/adapter); never downloaded"},
)  # fmt: skip
ON_ERROR_HELP = (
    "a malformed input record stops the run naming its file:line (raise) or is reported and counted (skip)"
)


@dataclass
class InferenceConfig:
    """How a trained model is loaded and prompted for chat, evaluation and judging."""

    section: ClassVar[str] = "inference"

    template: TemplateChoice | None = option(
        "prompt format; unset = the template the model was trained with (its training config), else the "
        "tokenizer's chat template (auto)",
        None,
    )
    thinking: ThinkingChoice | None = option(
        "reasoning models: the prompt with thinking off or on (enable_thinking); unset = as the model was "
        "trained (its training config's --thinking), else the template's default",
        None,
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "weights dtype: auto = bfloat16 on CUDA (when supported), float32 on the CPU", "auto"
    )
    base_model: str | None = option(
        "when --model is a LoRA adapter directory: the local directory of the model it was trained on; "
        "unset = the base recorded in its adapter_config.json (needed when that directory has moved)",
        None,
    )

    def __post_init__(self) -> None:
        check_types(self)


def describe_generation(options: GenerationConfig) -> dict[str, Any]:
    """The decoding options of a report (sampling parameters only when sampling)."""
    out: dict[str, Any] = {"max_new_tokens": options.max_new_tokens, "do_sample": options.do_sample}
    if options.do_sample:
        out.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
    out["repetition_penalty"] = options.repetition_penalty
    return out
