"""Options: one dataclass per concern, validated where it is built; every CLI is generated from them.

A section is a dataclass (``ModelConfig``, ``DataConfig``, ``OptimConfig``, ``TrainConfig``,
``CheckpointConfig``, ``LoraConfig``, ``GenerationConfig``, ``PrepareConfig``) whose fields carry their
help text (``option(help, default)``); ``Config``, the training run (every section of
``TRAIN_COMMAND``), is soulchat.train_options. How sections become flags and config-file keys
(``Command``, ``Section``, argparse, YAML/TOML/JSON files) is soulchat.commandline; the choice lists, the
``--columns`` mapping and the role names the data options share with soulchat.data are soulchat.dataspec.

Values are checked once, in each section's ``__post_init__``: types strictly (a bool is not an int, a
float must be finite), then ranges, with messages that name the flag. The same checks run whether the
value came from a flag, a config file or Python.

Defaults describe the embedded smoke run (`python -m soulchat.train` with no arguments: a tiny random
Qwen2 on the bundled sample corpus, on the CPU). Where a good value depends on whether a real model is
being fine-tuned (the learning rate), the field defaults to ``None`` and ``Config`` resolves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from soulchat.commandline import ConfigError, check_types, flag_of, option, require
from soulchat.dataspec import (
    FormatChoice,
    LossWeightingChoice,
    OnErrorChoice,
    OverflowChoice,
    RenderModeChoice,
    RoleMap,
    TemplateChoice,
    ThinkingChoice,
    parse_columns,
)

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "GenerationConfig", "LoraConfig", "ModelConfig",
    "OptimConfig", "PrepareConfig", "TrainConfig",
]


def _not_a_file(path: str | None, flag: str, what: str) -> None:
    require(
        path is None or not Path(path).exists() or Path(path).is_dir(),
        f"{flag} {path} is a file, not a directory: pass the {what} directory (it is created if missing)",
    )


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    section: ClassVar[str] = "model"

    model: str | None = option(
        "local Hugging Face causal-LM directory to fine-tune (never downloaded); unset = the built-in "
        "tiny random Qwen2 model, for smoke runs",
        None,
    )
    tokenizer: str | None = option(
        "tokenizer directory; unset = the --model directory, or the bundled tokenizer for the built-in model",
        None,
    )
    trust_remote_code: bool = option(
        "allow the model directory's own Python code to run (needed by some architectures); off by default "
        "because it executes code from the checkpoint",
        False,
    )
    mixed_precision: Literal["auto", "bf16", "fp32"] = option(
        "compute dtype: auto = bf16 on CUDA (fp32 master weights, fp32 gradient reduction), fp32 on the CPU",
        "auto",
    )
    activation_checkpointing: bool = option(
        "recompute each decoder layer in the backward pass: less activation memory, ~30% more compute",
        False,
    )
    compile: bool = option("torch.compile each decoder layer", False)
    fused_kernels: Literal["auto", "on", "off"] = option(
        "fused Triton RMSNorm and SwiGLU in place of transformers' modules (Llama/Qwen2-family models; "
        "other modules keep their forward, with a note): auto = on for CUDA without --compile (inductor "
        "fuses these itself); on = also on the CPU, where the kernels fall back to PyTorch",
        "auto",
    )

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("model", "tokenizer"):
            value = getattr(self, name)
            require(
                value is None or value.strip() != "",
                f"--{name} must be a directory path (or left unset), got {value!r}",
            )


# The choice lists are soulchat.dataspec's, the ones the data package checks against.
@dataclass
class DataConfig:
    section: ClassVar[str] = "data"

    data: list[str] = option(  # noqa: RUF009 (option returns a dataclasses.field)
        "conversation files or directories (JSON/JSONL in any supported format); empty = the bundled "
        "sample corpus",
        [],
        metavar="PATH",
    )
    format: FormatChoice = option(
        "input format: auto = detected per file", "auto"
    )
    template: TemplateChoice = option(
        "chat rendering: auto = the tokenizer's own chat template; soulchat = the paper's "
        "用户：/心理咨询师： format; chatml = <|im_start|> turns",
        "auto",
    )
    render_mode: RenderModeChoice = option(
        "how conversations become training samples: conversation = whole conversations, every counselor "
        "turn trained at once (needs a prefix-stable template); per-turn = one sample per counselor turn, "
        "the generation prompt of the turns before it then the reply, exactly the inference context (for "
        "templates that rewrite history, e.g. Qwen3's think blocks); auto = conversation when the template "
        "is prefix-stable, per-turn otherwise",
        "auto",
    )
    thinking: ThinkingChoice | None = option(
        "reasoning models: render with thinking off or on (enable_thinking / thinking); everything the "
        "model generates after the prompt is trained, an empty think block included when the data has no "
        "reasoning and thinking is on; unset = the chat template's default. Recorded in the run and export, "
        "so chat and evaluate prompt the same way",
        None,
    )
    max_length: int = option(
        "longest conversation in tokens; longer ones are split or dropped (--overflow)", 1024
    )
    row_size: int | None = option(
        "packed row length in tokens, at least --max-length; unset = --max-length (train: the packed row "
        "is the micro-batch, --tokens-per-micro-batch)",
        None,
    )
    overflow: OverflowChoice = option(
        "what to do with a conversation longer than --max-length: split it at turn boundaries into "
        "windows, or drop it",
        "split",
    )
    loss_weighting: LossWeightingChoice = option(
        "weight of each counselor token in the loss: token = 1 each; turn = each counselor turn sums to 1; "
        "conversation = each conversation sums to 1",
        "token",
    )
    eval_fraction: float = option(
        "fraction of conversations held out for evaluation, whole (all windows of a split one), chosen by "
        "a hash of --eval-seed and the conversation id; 0 = no held-out set",
        0.05,
    )
    eval_seed: int = option("seed of the held-out choice (it does not move with --seed)", 0)
    workers: int | None = option(
        "processes that render and tokenize; 1 = this process, tokenizing on every core in a background "
        "thread; the output is the same for every N; unset = 1 on up to 4 CPUs, else min(8, CPUs) "
        "(in-process for corpora under ~2,500 conversations)",
        None,
    )
    on_error: OnErrorChoice = option(
        "a malformed record stops preparation (raise) or is dropped and counted by reason (skip)", "raise"
    )
    counselor_role: list[str] = option(  # noqa: RUF009
        "extra raw role names meaning the counselor, on top of the built-in ones (repeatable)",
        [],
        metavar="NAME",
    )
    client_role: list[str] = option(  # noqa: RUF009
        "extra raw role names meaning the client, on top of the built-in ones (repeatable)",
        [],
        metavar="NAME",
    )
    cache_dir: str | None = option(
        "where the tokenized, packed data is cached (by content hash); unset = <output-dir>/data for "
        "train, cache/data for prepare",
        None,
    )
    columns: str | None = option(
        "record fields under other names, FIELD=COLUMN,... with FIELD one of messages, role, content, id, "
        "topic (JSON keys and parquet/arrow columns alike), e.g. messages=conversations,role=from,content=value",
        None,
    )

    def __post_init__(self) -> None:
        check_types(self)
        require(self.max_length >= 2, f"--max-length must be at least 2 tokens, got {self.max_length}")
        require(
            self.row_size is None or self.row_size >= self.max_length,
            f"--row-size ({self.row_size}) is smaller than --max-length ({self.max_length}): a sequence of "
            "--max-length tokens would not fit a row; raise --row-size or lower --max-length",
        )
        require(
            0.0 <= self.eval_fraction < 1.0,
            f"--eval-fraction must be in [0, 1), got {self.eval_fraction}",
        )
        require(
            self.workers is None or self.workers >= 1,
            f"--workers: must be a positive integer (1 renders in-process), got {self.workers}",
        )
        for name in ("counselor_role", "client_role"):
            require(
                all(r.strip() for r in getattr(self, name)),
                f"{flag_of(name)} names must not be empty, got {getattr(self, name)!r}",
            )
        _not_a_file(self.cache_dir, "--cache-dir", "cache")
        if self.columns is not None:
            try:
                parse_columns(self.columns)
            except ValueError as err:
                raise ConfigError(f"--columns: {err}") from None

    def role_map(self) -> RoleMap:
        """The raw role names the readers map: the built-in ones plus --counselor-role / --client-role."""
        defaults = RoleMap()
        return RoleMap(
            counselor=(*defaults.counselor, *self.counselor_role),
            client=(*defaults.client, *self.client_role),
        )


@dataclass
class OptimConfig:
    section: ClassVar[str] = "optim"

    lr: float | None = option(
        "peak learning rate; unset = 5e-3 for the built-in tiny model, 2e-5 when fine-tuning --model", None
    )
    min_lr_ratio: float = option("final learning rate as a fraction of --lr", 0.1)
    schedule: Literal["cosine", "linear", "constant"] = option(
        "decay after warmup: cosine or linear down to --min-lr-ratio * lr, or constant", "cosine"
    )
    warmup_steps: int | None = option("linear warmup steps; unset = 5% of the run (at least 1)", None)
    weight_decay: float = option(
        "AdamW decoupled weight decay, applied to weight matrices only (never norms or biases)", 0.1
    )
    decay_embeddings: bool = option("apply weight decay to the embedding matrices too", False)
    beta1: float = option("AdamW beta1", 0.9)
    beta2: float = option("AdamW beta2", 0.95)
    eps: float = option("AdamW epsilon", 1e-8)
    grad_clip: float = option("clip the global gradient norm to this value (0 = no clipping)", 1.0)

    def __post_init__(self) -> None:
        check_types(self)
        require(self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}")
        require(
            0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}"
        )
        require(
            self.warmup_steps is None or self.warmup_steps >= 0,
            f"--warmup-steps must be >= 0, got {self.warmup_steps}",
        )
        require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        require(
            0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
            f"--beta1/--beta2 must be in [0, 1), got {self.beta1}, {self.beta2}",
        )
        require(self.eps > 0, f"--eps must be positive, got {self.eps}")
        require(self.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables clipping), got {self.grad_clip}")


@dataclass
class TrainConfig:
    section: ClassVar[str] = "train"

    steps: int | None = option("optimizer steps to run; unset = --epochs passes over the training rows", None)
    epochs: float | None = option(
        "passes over the training rows when --steps is unset; unset = 6 for the built-in model, 1 when "
        "fine-tuning --model",
        None,
    )
    tokens_per_micro_batch: int | None = option(
        "row size of a packed micro-batch (tokens per forward/backward on one rank); unset = 1024 for the "
        "built-in model, 8192 when fine-tuning --model",
        None,
    )
    tokens_per_step: int | None = option(
        "global tokens per optimizer step, over all ranks and accumulation micro-batches; a multiple of "
        "--tokens-per-micro-batch x number of processes; unset = 2048 for the built-in model, 65536 when "
        "fine-tuning --model",
        None,
    )
    seed: int = option("seed for model initialisation and the per-epoch shuffle of rows", 0)
    parallel: Literal["fsdp", "ddp", "none"] = option(
        "multi-process strategy under torchrun: fsdp (FSDP2, sharded) or ddp (replicated); none = single "
        "process",
        "fsdp",
    )
    device: Literal["auto", "cpu", "cuda"] = option("where to train: auto = CUDA when available", "auto")
    on_nonfinite: Literal["stop", "skip"] = option(
        "a NaN/Inf loss or gradient stops the run (naming the step) or skips that optimizer step", "stop"
    )
    eval_every: int | None = option(
        "evaluate on the held-out set every N steps (0 = only at the end); unset = 5 times per run", None
    )
    log_every: int = option("write a metrics line every N steps", 1)
    output_dir: str = option("run directory: checkpoints, export, metrics.jsonl, config", "runs/default")
    cpu_threads: int | None = option(
        "torch intra-op threads per process; unset = 1 when training on the CPU (on a shared 2-core VM, "
        "2 threads measured 12x slower than 1: OpenMP spin-waits under contention), torch's default on GPU",
        None,
    )
    tensorboard: bool = option("also write TensorBoard events when the tensorboard package is installed", True)
    progress: bool = option("show a progress bar (rank 0)", True)

    def __post_init__(self) -> None:
        check_types(self)
        require(self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        require(self.epochs is None or self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        require(
            self.tokens_per_micro_batch is None or self.tokens_per_micro_batch >= 16,
            f"--tokens-per-micro-batch must be at least 16, got {self.tokens_per_micro_batch}",
        )
        require(
            self.tokens_per_step is None or self.tokens_per_step >= 16,
            f"--tokens-per-step must be at least 16, got {self.tokens_per_step}",
        )
        require(
            self.cpu_threads is None or self.cpu_threads >= 1,
            f"--cpu-threads must be >= 1, got {self.cpu_threads}",
        )
        require(
            self.eval_every is None or self.eval_every >= 0,
            f"--eval-every must be >= 0, got {self.eval_every}",
        )
        require(self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}")
        require(self.output_dir.strip() != "", "--output-dir must not be empty")
        _not_a_file(self.output_dir, "--output-dir", "run")


@dataclass
class CheckpointConfig:
    section: ClassVar[str] = "checkpoint"

    save_every: int = option("save a checkpoint every N steps (0 = only at the end)", 0)
    keep_last: int = option("checkpoints to keep (older ones are deleted after a newer one is complete)", 2)
    resume: bool = option("continue from <output-dir>/checkpoints/latest", False)
    export: bool = option(
        "at the end, write a Hugging Face model directory (safetensors + config + tokenizer) to "
        "<output-dir>/export",
        True,
    )
    export_dtype: Literal["auto", "float32", "bfloat16"] = option(
        "dtype of the exported weights: auto = the dtype the model was loaded in (float32 for the built-in)",
        "auto",
    )
    resume_override: list[str] = option(  # noqa: RUF009 (option returns a dataclasses.field)
        "with --resume: options that may differ from the checkpoint's run and take effect from the resumed "
        "step on (steps, epochs, warmup-steps, schedule, min-lr-ratio, grad-clip, on-nonfinite); any other "
        "change that alters the run's math is refused (soulchat.resume)",
        [],
        metavar="FLAG",
    )

    def __post_init__(self) -> None:
        from soulchat.resume import OVERRIDE_NAMES

        if isinstance(self.resume_override, str):
            self.resume_override = [self.resume_override]
        check_types(self)
        require(self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every}")
        require(self.keep_last >= 1, f"--keep-last must be >= 1, got {self.keep_last}")
        self.resume_override = [name.removeprefix("--").replace("_", "-") for name in self.resume_override]
        for name in self.resume_override:
            require(
                name in OVERRIDE_NAMES,
                f"--resume-override {name}: only {', '.join(OVERRIDE_NAMES)} take effect on a resumed run; "
                "a change to any other option that alters the run's math needs a new --output-dir",
            )
        require(not self.resume_override or self.resume, "--resume-override is only used with --resume")


@dataclass
class GenerationConfig:
    """Decoding of replies (chat, evaluate). The sampling defaults are the SoulChat paper's."""

    section: ClassVar[str] = "generation"

    max_new_tokens: int = option("longest reply in tokens", 256)
    do_sample: bool = option(
        "sample replies (--temperature, --top-p, --top-k, from --seed); --no-do-sample = greedy decoding",
        True,
    )
    temperature: float = option("sampling temperature (the paper's)", 0.95)
    top_p: float = option("nucleus sampling probability mass (the paper's)", 0.75)
    top_k: int = option("sample among the k most likely tokens, 0 = off (50 is transformers' default)", 50)
    repetition_penalty: float = option("transformers' repetition penalty, 1.0 = off", 1.0)
    seed: int = option("random seed for sampling", 0)
    max_context: int | None = option(
        "context window in tokens; unset = the model's max_position_embeddings, capped by the tokenizer's "
        "model_max_length",
        None,
    )
    batch_size: int = option("conversations generated (and sequences scored) together", 8)

    def __post_init__(self) -> None:
        check_types(self)
        require(self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        require(
            not self.do_sample or self.temperature > 0,
            f"--temperature must be > 0 when sampling, got {self.temperature}",
        )
        require(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        require(
            self.repetition_penalty > 0, f"--repetition-penalty must be > 0, got {self.repetition_penalty}"
        )
        require(
            self.max_context is None or self.max_context >= 2,
            f"--max-context must be at least 2 tokens, got {self.max_context}",
        )
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")

    def generate_kwargs(self) -> dict[str, Any]:
        """transformers' generate() arguments. Everything explicit, so a model's own
        generation_config.json (which may sample, or set a repetition penalty) does not change decoding."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
            "num_beams": 1,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


@dataclass
class PrepareConfig:
    """What `python -m soulchat.data prepare` alone needs on top of the data options."""

    section: ClassVar[str] = "prepare"

    force: bool = option("rebuild even when the cache matches", False)

    def __post_init__(self) -> None:
        check_types(self)


@dataclass
class LoraConfig:
    section: ClassVar[str] = "lora"

    lora_rank: int = option(
        "LoRA adapter rank r: train low-rank updates B A (r x in, out x r) of the target linear layers "
        "on a frozen base (0 = off: full fine-tuning)",
        0,
    )
    lora_alpha: float | None = option(
        "LoRA scale numerator: the update is (alpha / rank) * B A; unset = 2 x --lora-rank", None
    )
    lora_dropout: float = option("dropout on the input of the LoRA branch (training only)", 0.05)
    lora_target_modules: list[str] = option(  # noqa: RUF009 (option returns a dataclasses.field)
        "names of the linear layers that get adapters (matched as the last component(s) of the module "
        "name, e.g. q_proj); empty = every nn.Linear inside the decoder layers, i.e. all attention and "
        "MLP projections (q/k/v/o_proj and gate/up/down_proj for Llama/Qwen2/Mistral), found by "
        "inspecting the model; the lm head and the embeddings never",
        [],
        metavar="NAME",
    )
    lora_train_lm_head: bool = option(
        "also train the lm head, fully (a trainable copy saved with the adapter; with tied embeddings "
        "the input embedding stays frozen and the merged export unties them)",
        False,
    )
    load_in_4bit: bool = option(
        "QLoRA: load the base model's decoder linear weights in 4-bit NF4 (bitsandbytes, double "
        "quantisation, bf16 compute); CUDA, one process",
        False,
    )
    export_merged: bool = option(
        "at the end, also write the base with the adapter merged in as a plain Hugging Face model "
        "directory (<output-dir>/export) next to the adapter (<output-dir>/adapter)",
        False,
    )

    def __post_init__(self) -> None:
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        check_types(self)
        require(
            isinstance(self.lora_rank, int) and self.lora_rank >= 0,
            f"--lora-rank must be a whole number >= 0 (0 = off), got {self.lora_rank!r}",
        )
        if self.lora_alpha is None and self.lora_rank > 0:
            self.lora_alpha = float(2 * self.lora_rank)
        require(
            self.lora_alpha is None or self.lora_alpha > 0,
            f"--lora-alpha must be positive, got {self.lora_alpha}",
        )
        require(0.0 <= self.lora_dropout < 1.0, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        for name in self.lora_target_modules:
            require(
                isinstance(name, str) and name.strip() != "" and name == name.strip(),
                f"--lora-target-modules: module names must be non-empty, got {name!r}",
            )
        if self.lora_rank == 0:
            for flag, on in (
                ("--load-in-4bit", self.load_in_4bit),
                ("--export-merged", self.export_merged),
                ("--lora-train-lm-head", self.lora_train_lm_head),
                ("--lora-target-modules", bool(self.lora_target_modules)),
                ("--lora-alpha", self.lora_alpha is not None),  # else set and silently unused
            ):
                require(not on, f"{flag} needs LoRA: pass --lora-rank R (e.g. 8 or 16)")

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0
