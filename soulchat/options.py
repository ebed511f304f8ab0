"""Options: one dataclass per concern, validated where it is built; every CLI is generated from them.

A section is a dataclass (``ModelConfig``, ``DataConfig``, ``OptimConfig``, ``TrainConfig``,
``CheckpointConfig``, ``GenerationConfig``, ``PrepareConfig``) whose fields carry their help text; a
command is a list of sections (``Command``). Every field is a command-line flag (``lr`` -> ``--lr``,
``tokens_per_step`` -> ``--tokens-per-step``) with that help, and a key of an optional YAML/TOML/JSON
``--config`` file. Precedence: built-in defaults < config file < flags. A config file may group keys by
section (``optim: {lr: 1e-4}``) or list them flat (``lr: 1e-4``); field names are unique within a
command, so both spellings mean the same thing.

Values are checked once, in each section's ``__post_init__``: types strictly (a bool is not an int, a
float must be finite), then ranges, with messages that name the flag. The same checks run whether the
value came from a flag, a config file or Python.

Defaults describe the embedded smoke run (`python -m soulchat.train` with no arguments: a tiny random
Qwen2 on the bundled sample corpus, on the CPU). Where a good value depends on whether a real model is
being fine-tuned (the learning rate), the field defaults to ``None`` and ``Config`` resolves it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal


class ConfigError(ValueError):
    """An impossible or malformed configuration; the message says which field and how to fix it."""


def _help(
    text: str,
    default: Any = dataclasses.MISSING,
    *,
    aliases: Sequence[str] = (),
    metavar: str | None = None,
    **kwargs: Any,
) -> Any:
    """A dataclass field carrying its CLI help text (and older flag spellings that still work)."""
    metadata = {"help": text, "aliases": tuple(aliases), "metavar": metavar}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def flag_of(name: str) -> str:
    """The command-line spelling of a field: ``tokens_per_step`` -> ``--tokens-per-step``."""
    return "--" + name.replace("_", "-")


# --------------------------------------------------------------------------------------------------
# Field types: one description used by the type check, the config-file reader and the parser
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldType:
    base: type  # str, int, float or bool
    optional: bool  # None allowed
    choices: tuple[Any, ...] | None  # Literal[...] values
    is_list: bool  # list[base]

    def describe(self) -> str:
        if self.choices is not None:
            text = f"one of {list(self.choices)}"
        else:
            text = f"a list of {self.base.__name__}" if self.is_list else self.base.__name__
        return text + (" or null" if self.optional else "")


def field_type(cls: type, name: str) -> FieldType:
    hint = typing.get_type_hints(cls)[name]
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        return FieldType(type(choices[0]), optional, choices, False)
    if origin is list:
        return FieldType(typing.get_args(hint)[0], optional, None, True)
    return FieldType(hint, optional, None, False)


def _strict_value(value: Any, base: type) -> Any:
    """``value`` as ``base`` when it already is one (an int is a float; a bool is never a number), else
    raise ValueError. Floats must be finite: inf/nan reach no learning rate, fraction or temperature."""
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError("must be a finite number")
            return float(value)
    elif isinstance(value, base):
        return value
    raise ValueError(f"expects {base.__name__}")


def check_types(section: Any) -> None:
    """Check (and normalise int -> float, one path -> [path]) every field of a section instance."""
    cls = type(section)
    for f in dataclasses.fields(cls):
        t = field_type(cls, f.name)
        value = getattr(section, f.name)
        if value is None:
            _require(t.optional, f"{flag_of(f.name)} cannot be empty (null); expects {t.describe()}")
            continue
        if t.is_list and isinstance(value, (str, Path)):
            value = [value]
        items = list(value) if t.is_list and isinstance(value, (list, tuple)) else None
        try:
            if t.is_list:
                if items is None:
                    raise ValueError(f"expects {t.describe()}")
                value = [str(v) if isinstance(v, Path) else _strict_value(v, t.base) for v in items]
            else:
                value = _strict_value(value, t.base)
        except ValueError as err:
            raise ConfigError(f"{flag_of(f.name)} {err}, got {getattr(section, f.name)!r}") from None
        if t.choices is not None and value not in t.choices:
            raise ConfigError(f"{flag_of(f.name)} must be one of {list(t.choices)}, got {value!r}")
        object.__setattr__(section, f.name, value)


def _not_a_file(path: str | None, flag: str, what: str) -> None:
    _require(
        path is None or not Path(path).exists() or Path(path).is_dir(),
        f"{flag} {path} is a file, not a directory: pass the {what} directory (it is created if missing)",
    )


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    section: ClassVar[str] = "model"

    model: str | None = _help(
        "local Hugging Face causal-LM directory to fine-tune (never downloaded); unset = the built-in "
        "tiny random Qwen2 model, for smoke runs",
        None,
    )
    tokenizer: str | None = _help(
        "tokenizer directory; unset = the --model directory, or the bundled tokenizer for the built-in model",
        None,
    )
    trust_remote_code: bool = _help(
        "allow the model directory's own Python code to run (needed by some architectures); off by default "
        "because it executes code from the checkpoint",
        False,
    )
    mixed_precision: Literal["auto", "bf16", "fp32"] = _help(
        "compute dtype: auto = bf16 on CUDA (fp32 master weights, fp32 gradient reduction), fp32 on the CPU",
        "auto",
    )
    activation_checkpointing: bool = _help(
        "recompute each decoder layer in the backward pass: less activation memory, ~30% more compute",
        False,
    )
    compile: bool = _help("torch.compile each decoder layer", False)
    fused_kernels: Literal["auto", "on", "off"] = _help(
        "fused Triton RMSNorm and SwiGLU in place of transformers' modules (Llama/Qwen2-family models; "
        "other modules keep their forward, with a note): auto = on for CUDA without --compile (inductor "
        "fuses these itself); on = also on the CPU, where the kernels fall back to PyTorch",
        "auto",
    )

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("model", "tokenizer"):
            value = getattr(self, name)
            _require(
                value is None or value.strip() != "",
                f"--{name} must be a directory path (or left unset), got {value!r}",
            )


# The choices below are the data package's (readers.FORMATS, render.TEMPLATES, render.OVERFLOW,
# render.LOSS_WEIGHTING), spelled out so reading options imports no tokenizer code; a test keeps them equal.
@dataclass
class DataConfig:
    section: ClassVar[str] = "data"

    data: list[str] = _help(  # noqa: RUF009 (_help returns a dataclasses.field)
        "conversation files or directories (JSON/JSONL in any supported format); empty = the bundled "
        "sample corpus",
        [],
        metavar="PATH",
    )
    format: Literal["auto", "soulchat", "openai", "sharegpt", "smile", "cpsycound", "xtuner"] = _help(
        "input format: auto = detected per file", "auto"
    )
    template: Literal["auto", "soulchat", "chatml"] = _help(
        "chat rendering: auto = the tokenizer's own chat template; soulchat = the paper's "
        "用户：/心理咨询师： format; chatml = <|im_start|> turns",
        "auto",
    )
    render_mode: Literal["auto", "conversation", "per-turn"] = _help(
        "how conversations become training samples: conversation = whole conversations, every counselor "
        "turn trained at once (needs a prefix-stable template); per-turn = one sample per counselor turn, "
        "the generation prompt of the turns before it then the reply, exactly the inference context (for "
        "templates that rewrite history, e.g. Qwen3's think blocks); auto = conversation when the template "
        "is prefix-stable, per-turn otherwise",
        "auto",
    )
    max_length: int = _help(
        "longest conversation in tokens; longer ones are split or dropped (--overflow)", 1024
    )
    row_size: int | None = _help(
        "packed row length in tokens, at least --max-length; unset = --max-length (train: the packed row "
        "is the micro-batch, --tokens-per-micro-batch)",
        None,
    )
    overflow: Literal["split", "drop"] = _help(
        "what to do with a conversation longer than --max-length: split it at turn boundaries into "
        "windows, or drop it",
        "split",
    )
    loss_weighting: Literal["token", "turn", "conversation"] = _help(
        "weight of each counselor token in the loss: token = 1 each; turn = each counselor turn sums to 1; "
        "conversation = each conversation sums to 1",
        "token",
    )
    eval_fraction: float = _help(
        "fraction of conversations held out for evaluation, whole (all windows of a split one), chosen by "
        "a hash of --eval-seed and the conversation id; 0 = no held-out set",
        0.05,
    )
    eval_seed: int = _help("seed of the held-out choice (it does not move with --seed)", 0)
    workers: int | None = _help(
        "processes that render and tokenize; 1 = this process, tokenizing on every core in a background "
        "thread; the output is the same for every N; unset = 1 on up to 4 CPUs, else min(8, CPUs) "
        "(in-process for corpora under ~2,500 conversations)",
        None,
    )
    on_error: Literal["raise", "skip"] = _help(
        "a malformed record stops preparation (raise) or is dropped and counted by reason (skip)", "raise"
    )
    counselor_role: list[str] = _help(  # noqa: RUF009
        "extra raw role names meaning the counselor, on top of the built-in ones (repeatable)",
        [],
        metavar="NAME",
    )
    client_role: list[str] = _help(  # noqa: RUF009
        "extra raw role names meaning the client, on top of the built-in ones (repeatable)",
        [],
        metavar="NAME",
    )
    cache_dir: str | None = _help(
        "where the tokenized, packed data is cached (by content hash); unset = <output-dir>/data for "
        "train, cache/data for prepare",
        None,
    )
    columns: str | None = _help(
        "record fields under other names, FIELD=COLUMN,... with FIELD one of messages, role, content, id, "
        "topic (JSON keys and parquet/arrow columns alike), e.g. messages=conversations,role=from,content=value",
        None,
    )

    def __post_init__(self) -> None:
        check_types(self)
        _require(self.max_length >= 2, f"--max-length must be at least 2 tokens, got {self.max_length}")
        _require(
            self.row_size is None or self.row_size >= self.max_length,
            f"--row-size ({self.row_size}) is smaller than --max-length ({self.max_length}): a sequence of "
            "--max-length tokens would not fit a row; raise --row-size or lower --max-length",
        )
        _require(
            0.0 <= self.eval_fraction < 1.0,
            f"--eval-fraction must be in [0, 1), got {self.eval_fraction}",
        )
        _require(
            self.workers is None or self.workers >= 1,
            f"--workers: must be a positive integer (1 renders in-process), got {self.workers}",
        )
        for name in ("counselor_role", "client_role"):
            _require(
                all(r.strip() for r in getattr(self, name)),
                f"{flag_of(name)} names must not be empty, got {getattr(self, name)!r}",
            )
        _not_a_file(self.cache_dir, "--cache-dir", "cache")
        if self.columns is not None:
            from soulchat.data.readers import parse_columns

            try:
                parse_columns(self.columns)
            except ValueError as err:
                raise ConfigError(f"--columns: {err}") from None

    def role_map(self):
        """The data package's RoleMap: the built-in role names plus --counselor-role / --client-role."""
        from soulchat.data.conversation import RoleMap

        defaults = RoleMap()
        return RoleMap(
            counselor=(*defaults.counselor, *self.counselor_role),
            client=(*defaults.client, *self.client_role),
        )


@dataclass
class OptimConfig:
    section: ClassVar[str] = "optim"

    lr: float | None = _help(
        "peak learning rate; unset = 5e-3 for the built-in tiny model, 2e-5 when fine-tuning --model", None
    )
    min_lr_ratio: float = _help("final learning rate as a fraction of --lr", 0.1)
    schedule: Literal["cosine", "linear", "constant"] = _help(
        "decay after warmup: cosine or linear down to --min-lr-ratio * lr, or constant", "cosine"
    )
    warmup_steps: int | None = _help("linear warmup steps; unset = 5% of the run (at least 1)", None)
    weight_decay: float = _help(
        "AdamW decoupled weight decay, applied to weight matrices only (never norms or biases)", 0.1
    )
    decay_embeddings: bool = _help("apply weight decay to the embedding matrices too", False)
    beta1: float = _help("AdamW beta1", 0.9)
    beta2: float = _help("AdamW beta2", 0.95)
    eps: float = _help("AdamW epsilon", 1e-8)
    grad_clip: float = _help("clip the global gradient norm to this value (0 = no clipping)", 1.0)

    def __post_init__(self) -> None:
        check_types(self)
        _require(self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}")
        _require(
            0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}"
        )
        _require(
            self.warmup_steps is None or self.warmup_steps >= 0,
            f"--warmup-steps must be >= 0, got {self.warmup_steps}",
        )
        _require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        _require(
            0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
            f"--beta1/--beta2 must be in [0, 1), got {self.beta1}, {self.beta2}",
        )
        _require(self.eps > 0, f"--eps must be positive, got {self.eps}")
        _require(self.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables clipping), got {self.grad_clip}")


@dataclass
class TrainConfig:
    section: ClassVar[str] = "train"

    steps: int | None = _help("optimizer steps to run; unset = --epochs passes over the training rows", None)
    epochs: float | None = _help(
        "passes over the training rows when --steps is unset; unset = 6 for the built-in model, 1 when "
        "fine-tuning --model",
        None,
    )
    tokens_per_micro_batch: int | None = _help(
        "row size of a packed micro-batch (tokens per forward/backward on one rank); unset = 1024 for the "
        "built-in model, 8192 when fine-tuning --model",
        None,
    )
    tokens_per_step: int | None = _help(
        "global tokens per optimizer step, over all ranks and accumulation micro-batches; a multiple of "
        "--tokens-per-micro-batch x number of processes; unset = 2048 for the built-in model, 65536 when "
        "fine-tuning --model",
        None,
    )
    seed: int = _help("seed for model initialisation and the per-epoch shuffle of rows", 0)
    parallel: Literal["fsdp", "ddp", "none"] = _help(
        "multi-process strategy under torchrun: fsdp (FSDP2, sharded) or ddp (replicated); none = single "
        "process",
        "fsdp",
    )
    device: Literal["auto", "cpu", "cuda"] = _help("where to train: auto = CUDA when available", "auto")
    on_nonfinite: Literal["stop", "skip"] = _help(
        "a NaN/Inf loss or gradient stops the run (naming the step) or skips that optimizer step", "stop"
    )
    eval_every: int | None = _help(
        "evaluate on the held-out set every N steps (0 = only at the end); unset = 5 times per run", None
    )
    log_every: int = _help("write a metrics line every N steps", 1)
    output_dir: str = _help("run directory: checkpoints, export, metrics.jsonl, config", "runs/default")
    cpu_threads: int | None = _help(
        "torch intra-op threads per process; unset = 1 when training on the CPU (on a shared 2-core VM, "
        "2 threads measured 12x slower than 1: OpenMP spin-waits under contention), torch's default on GPU",
        None,
    )
    tensorboard: bool = _help("also write TensorBoard events when the tensorboard package is installed", True)
    progress: bool = _help("show a progress bar (rank 0)", True)

    def __post_init__(self) -> None:
        check_types(self)
        _require(self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        _require(self.epochs is None or self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        _require(
            self.tokens_per_micro_batch is None or self.tokens_per_micro_batch >= 16,
            f"--tokens-per-micro-batch must be at least 16, got {self.tokens_per_micro_batch}",
        )
        _require(
            self.tokens_per_step is None or self.tokens_per_step >= 16,
            f"--tokens-per-step must be at least 16, got {self.tokens_per_step}",
        )
        _require(
            self.cpu_threads is None or self.cpu_threads >= 1,
            f"--cpu-threads must be >= 1, got {self.cpu_threads}",
        )
        _require(
            self.eval_every is None or self.eval_every >= 0,
            f"--eval-every must be >= 0, got {self.eval_every}",
        )
        _require(self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}")
        _require(self.output_dir.strip() != "", "--output-dir must not be empty")
        _not_a_file(self.output_dir, "--output-dir", "run")


@dataclass
class CheckpointConfig:
    section: ClassVar[str] = "checkpoint"

    save_every: int = _help("save a checkpoint every N steps (0 = only at the end)", 0)
    keep_last: int = _help("checkpoints to keep (older ones are deleted after a newer one is complete)", 2)
    resume: bool = _help("continue from <output-dir>/checkpoints/latest", False)
    export: bool = _help(
        "at the end, write a Hugging Face model directory (safetensors + config + tokenizer) to "
        "<output-dir>/export",
        True,
    )
    export_dtype: Literal["auto", "float32", "bfloat16"] = _help(
        "dtype of the exported weights: auto = the dtype the model was loaded in (float32 for the built-in)",
        "auto",
    )
    resume_override: list[str] = _help(  # noqa: RUF009 (_help returns a dataclasses.field)
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
        _require(self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every}")
        _require(self.keep_last >= 1, f"--keep-last must be >= 1, got {self.keep_last}")
        self.resume_override = [name.removeprefix("--").replace("_", "-") for name in self.resume_override]
        for name in self.resume_override:
            _require(
                name in OVERRIDE_NAMES,
                f"--resume-override {name}: only {', '.join(OVERRIDE_NAMES)} take effect on a resumed run; "
                "a change to any other option that alters the run's math needs a new --output-dir",
            )
        _require(not self.resume_override or self.resume, "--resume-override is only used with --resume")


@dataclass
class GenerationConfig:
    """Decoding of replies (chat, evaluate). The sampling defaults are the SoulChat paper's."""

    section: ClassVar[str] = "generation"

    max_new_tokens: int = _help("longest reply in tokens", 256)
    do_sample: bool = _help(
        "sample replies (--temperature, --top-p, --top-k, from --seed); --no-do-sample = greedy decoding",
        True,
    )
    temperature: float = _help("sampling temperature (the paper's)", 0.95)
    top_p: float = _help("nucleus sampling probability mass (the paper's)", 0.75)
    top_k: int = _help("sample among the k most likely tokens, 0 = off (50 is transformers' default)", 50)
    repetition_penalty: float = _help("transformers' repetition penalty, 1.0 = off", 1.0)
    seed: int = _help("random seed for sampling", 0)
    max_context: int | None = _help(
        "context window in tokens; unset = the model's max_position_embeddings, capped by the tokenizer's "
        "model_max_length",
        None,
    )
    batch_size: int = _help("conversations generated (and sequences scored) together", 8)

    def __post_init__(self) -> None:
        check_types(self)
        _require(self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        _require(
            not self.do_sample or self.temperature > 0,
            f"--temperature must be > 0 when sampling, got {self.temperature}",
        )
        _require(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= 0, f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        _require(
            self.repetition_penalty > 0, f"--repetition-penalty must be > 0, got {self.repetition_penalty}"
        )
        _require(
            self.max_context is None or self.max_context >= 2,
            f"--max-context must be at least 2 tokens, got {self.max_context}",
        )
        _require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")

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

    force: bool = _help("rebuild even when the cache matches", False)

    def __post_init__(self) -> None:
        check_types(self)


# --------------------------------------------------------------------------------------------------
# Commands: a list of sections -> an argparse parser -> section instances
# --------------------------------------------------------------------------------------------------


# An extra flag: "--out" (means what the field's own flag means) or ("--greedy", False) (sets a constant).
Alias = str | tuple[str, Any]


@dataclass(frozen=True)
class Section:
    """A section as one command offers it: all its fields or ``only`` some, with this command's ``aliases``
    (field -> extra flags), ``defaults`` (field -> value, where commands differ by design), ``required``
    fields (unset after the config file and the flags -> an error naming the flag) and ``help`` (field ->
    this command's wording, where the shared one speaks of another command's job)."""

    cls: type
    only: tuple[str, ...] | None = None
    aliases: Mapping[str, tuple[Alias, ...]] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    help: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cls.section

    def fields(self) -> list[dataclasses.Field]:
        every = {f.name: f for f in dataclasses.fields(self.cls)}
        for name in (*(self.only or ()), *self.aliases, *self.defaults, *self.required, *self.help):
            assert name in every, f"{self.cls.__name__} has no field {name!r}"
        return [every[n] for n in self.only] if self.only is not None else list(every.values())

    def default(self, f: dataclasses.Field) -> Any:
        if f.name in self.defaults:
            return self.defaults[f.name]
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    def build(self, values: Mapping[str, Any]) -> Any:
        instance = self.cls(**{**self.defaults, **values})
        for name in self.required:
            _require(getattr(instance, name) not in (None, []), f"{flag_of(name)} is required")
        return instance


class OptionParser(argparse.ArgumentParser):
    """argparse, with its errors raised as one-line ConfigErrors (no usage block) and a --debug flag."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug",
            action="store_true",
            help="on an error, show the traceback (errors are one line without)",
        )

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


class Command:
    """One command line: its sections in order. ``parse(argv)`` -> {section name: section instance}."""

    def __init__(
        self, prog: str, description: str, sections: Sequence[type | Section], *, config_file: bool = True
    ) -> None:
        self.prog = prog
        self.description = description
        self.sections = tuple(s if isinstance(s, Section) else Section(s) for s in sections)
        self.config_file = config_file
        self.owner: dict[str, Section] = {}  # field name -> its section
        for section in self.sections:
            for f in section.fields():
                assert f.name not in self.owner, f"{prog}: field {f.name!r} is in two sections"
                self.owner[f.name] = section
        self.by_name = {s.name: s for s in self.sections}
        assert len(self.by_name) == len(self.sections), f"{prog}: a section is listed twice"

    # ---- parser -----------------------------------------------------------------------------------

    def parser(self) -> OptionParser:
        parser = OptionParser(
            prog=self.prog, description=self.description, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        self.add_arguments(parser)
        return parser

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Every field as a flag (with --config), on ``parser`` (e.g. a subcommand's)."""
        if self.config_file:
            parser.add_argument(
                "--config",
                default=None,
                metavar="FILE",
                help="YAML, TOML or JSON file with any of the options below (flat or by section); "
                "flags given on the command line override it",
            )
        for section in self.sections:
            group = parser.add_argument_group(section.name)
            for f in section.fields():
                _add_flag(group, section, f)

    def normalize_argv(self, argv: Sequence[str]) -> list[str]:
        """Attach a negative number to its flag (``--lr -1e-3`` -> ``--lr=-1e-3``).

        argparse takes a token starting with '-' for an option unless it looks like a negative number by
        its own rule (``-1`` and ``-0.5`` do, ``-1e-3`` and ``-inf`` do not); attached, every value reaches
        the field's validation and its message.
        """
        out: list[str] = []
        for i, token in enumerate(argv):
            if token == "--":  # everything after it is positional
                return [*out, *argv[i:]]
            last = out[-1] if out else ""
            if last.startswith("--") and "=" not in last and token.startswith("-") and _is_number(token):
                out[-1] = f"{last}={token}"
            else:
                out.append(token)
        return out

    # ---- values -----------------------------------------------------------------------------------

    def parse(self, argv: Sequence[str] | None = None) -> dict[str, Any]:
        """Defaults < --config file < flags, validated: {section name: instance}."""
        import sys

        argv = sys.argv[1:] if argv is None else argv
        return self.from_namespace(self.parser().parse_args(self.normalize_argv(argv)))

    def from_namespace(self, namespace: argparse.Namespace) -> dict[str, Any]:
        values: dict[str, Any] = {}
        where = "command line"
        config = getattr(namespace, "config", None) if self.config_file else None
        if config:
            values = load_config_file(config)
            where = f"config file {config} + command line"
        merged = self.sectioned(values, where)
        for dest, value in vars(namespace).items():
            if "." in dest:
                section, name = dest.split(".", 1)
                merged[section][name] = value  # a flag given on the command line wins over the file
        return self.build(merged, where)

    def from_dict(self, values: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
        """Sections from sectioned and/or flat keys (a config file, a saved config.json)."""
        return self.build(self.sectioned(values, where), where)

    def sectioned(self, values: Mapping[str, Any], where: str) -> dict[str, dict[str, Any]]:
        """{section: {field: value}} from sectioned and/or flat keys; unknown keys name the closest one."""
        out: dict[str, dict[str, Any]] = {name: {} for name in self.by_name}
        for key, value in values.items():
            if key in self.by_name and isinstance(value, Mapping):
                valid = {f.name for f in self.by_name[key].fields()}
                for sub_key, sub_value in value.items():
                    name = _field_name(sub_key)
                    if name not in valid:
                        raise ConfigError(
                            f"{where}: unknown key {sub_key!r} in section {key!r}{_suggest(name, valid)}; "
                            f"valid keys: {sorted(valid)}"
                        )
                    out[key][name] = sub_value
                continue
            name = _field_name(key)
            if name not in self.owner:
                raise ConfigError(f"{where}: unknown key {key!r}{_suggest(name, self.owner)}")
            out[self.owner[name].name][name] = value
        return out

    def build(self, values: Mapping[str, Mapping[str, Any]], where: str) -> dict[str, Any]:
        """Instances from {section: {field: value}}; text values are converted first (``_coerce``)."""
        out: dict[str, Any] = {}
        for name, section in self.by_name.items():
            fields = {k: _coerce(section.cls, k, v, where) for k, v in values.get(name, {}).items()}
            try:
                out[name] = section.build(fields)
            except ConfigError as err:
                raise ConfigError(
                    f"{where}: {err}" if where.startswith("config file") else str(err)
                ) from None
        return out


def _field_name(key: Any) -> str:
    return str(key).replace("-", "_")


def _suggest(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _add_flag(group: argparse._ArgumentGroup, section: Section, f: dataclasses.Field) -> None:
    t = field_type(section.cls, f.name)
    flag = flag_of(f.name)
    aliases = (*f.metadata.get("aliases", ()), *section.aliases.get(f.name, ()))
    names = [flag, *(a for a in aliases if isinstance(a, str))]
    kwargs: dict[str, Any] = {
        "dest": f"{section.name}.{f.name}",
        # SUPPRESS: only flags actually given override the config file.
        "default": argparse.SUPPRESS,
        "help": f"{section.help.get(f.name, f.metadata['help'])} (default: {section.default(f)})".replace("%", "%%"),
    }
    if t.base is bool and not t.is_list:
        group.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
    else:
        if t.is_list:
            # extend: `--data a b` and `--data a --data b` both give [a, b]
            kwargs.update(nargs="+", action="extend")
        elif t.choices is not None:
            kwargs["choices"] = t.choices
        if t.choices is None:
            kwargs["metavar"] = f.metadata.get("metavar") or f.name.upper()
        kwargs["type"] = _flag_parser(t.base, t.optional)
        group.add_argument(*names, **kwargs)
    for alias in aliases:
        if not isinstance(alias, str):
            alias_flag, value = alias
            same = (
                {True: flag, False: "--no-" + flag[2:]}.get(value, f"{flag} {value}")
                if t.base is bool
                else (f"{flag} {value}")
            )
            group.add_argument(
                alias_flag, action="store_const", const=value, dest=kwargs["dest"], default=argparse.SUPPRESS,
                help=f"same as {same}",
            )  # fmt: skip


def _flag_parser(base: type, optional: bool) -> typing.Callable[[str], Any]:
    """Text -> value for one flag; ranges and finiteness are the section's to check."""

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        if base is int:
            try:
                return int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expects an integer, got {text!r}") from None
        return base(text)

    parse.__name__ = base.__name__  # argparse names it in "invalid float value: 'x'"
    return parse


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """A config-file value in the field's type where the file format spells it as text (YAML 1.1 reads
    ``1e-4`` as a string, "none" is null); everything else is left to the section's strict type check."""
    t = field_type(cls, name)
    if value is None or not isinstance(value, str) or t.is_list:
        return value
    if t.optional and value.lower() in ("none", "null", ""):
        return None
    flag = flag_of(name)
    if t.base is bool:
        if value.lower() not in (*_TRUE, *_FALSE):
            raise ConfigError(f"{where}: {name} ({flag}) expects true or false, got {value!r}")
        return value.lower() in _TRUE
    if t.base in (int, float) and t.choices is None:
        try:
            number = float(value) if t.base is float else int(value)
        except ValueError:
            raise ConfigError(f"{where}: {name} ({flag}) expects {t.base.__name__}, got {value!r}") from None
        return number
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a .yaml/.yml/.toml/.json config file into a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (check the --config path)")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix in (".yaml", ".yml"):
            values = _load_yaml_unique(text, path)
        elif suffix == ".toml":
            try:
                import tomllib  # Python >= 3.11
            except ImportError:  # Python 3.10: the same parser as the `tomli` package
                try:
                    import tomli as tomllib
                except ImportError as err:
                    raise ConfigError(
                        f"config file {path}: reading TOML on Python 3.10 needs `pip install tomli` "
                        "(or use a .yaml config)"
                    ) from err
            values = tomllib.loads(text)
        elif suffix == ".json":
            values = json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, path))
        else:
            raise ConfigError(
                f"config file {path}: unknown extension {suffix!r}; use .yaml, .yml, .toml or .json"
            )
    except ConfigError:
        raise
    except Exception as err:  # yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError
        raise ConfigError(f"config file {path} could not be parsed: {' '.join(str(err).split())}") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys to values, got {type(values).__name__}"
        )
    return values


def _unique_keys(pairs: list[tuple[Any, Any]], path: Path, lines: list[int] | None = None) -> dict[Any, Any]:
    """A mapping of a config file; a key given twice is refused (YAML and JSON parsers keep the last one
    silently, so `lr` twice would train with whichever came last). TOML refuses it itself."""
    out: dict[Any, Any] = {}
    for i, (key, value) in enumerate(pairs):
        if key in out:
            at = "" if lines is None else f" (lines {lines[[k for k, _ in pairs].index(key)]} and {lines[i]})"
            raise ConfigError(f"config file {path}: key {key!r} is given twice{at}; keep one of them")
        out[key] = value
    return out


def _load_yaml_unique(text: str, path: Path) -> Any:
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        explicit = sum(k.tag != "tag:yaml.org,2002:merge" for k, _ in node.value)
        loader.flatten_mapping(node)  # "<<" merges go first: the mapping's own keys may override them
        pairs = [(loader.construct_object(k, deep=True), loader.construct_object(v, deep=True))
                 for k, v in node.value]  # fmt: skip
        own = len(pairs) - explicit
        _unique_keys(pairs[own:], path, [k.start_mark.line + 1 for k, _ in node.value[own:]])
        return dict(pairs)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


@dataclass
class LoraConfig:
    section: ClassVar[str] = "lora"

    lora_rank: int = _help(
        "LoRA adapter rank r: train low-rank updates B A (r x in, out x r) of the target linear layers "
        "on a frozen base (0 = off: full fine-tuning)",
        0,
    )
    lora_alpha: float | None = _help(
        "LoRA scale numerator: the update is (alpha / rank) * B A; unset = 2 x --lora-rank", None
    )
    lora_dropout: float = _help("dropout on the input of the LoRA branch (training only)", 0.05)
    lora_target_modules: list[str] = _help(  # noqa: RUF009 (_help returns a dataclasses.field)
        "names of the linear layers that get adapters (matched as the last component(s) of the module "
        "name, e.g. q_proj); empty = every nn.Linear inside the decoder layers, i.e. all attention and "
        "MLP projections (q/k/v/o_proj and gate/up/down_proj for Llama/Qwen2/Mistral), found by "
        "inspecting the model; the lm head and the embeddings never",
        [],
        metavar="NAME",
    )
    lora_train_lm_head: bool = _help(
        "also train the lm head, fully (a trainable copy saved with the adapter; with tied embeddings "
        "the input embedding stays frozen and the merged export unties them)",
        False,
    )
    load_in_4bit: bool = _help(
        "QLoRA: load the base model's decoder linear weights in 4-bit NF4 (bitsandbytes, double "
        "quantisation, bf16 compute); CUDA, one process",
        False,
    )
    export_merged: bool = _help(
        "at the end, also write the base with the adapter merged in as a plain Hugging Face model "
        "directory (<output-dir>/export) next to the adapter (<output-dir>/adapter)",
        False,
    )

    def __post_init__(self) -> None:
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        check_types(self)
        _require(
            isinstance(self.lora_rank, int) and self.lora_rank >= 0,
            f"--lora-rank must be a whole number >= 0 (0 = off), got {self.lora_rank!r}",
        )
        if self.lora_alpha is None and self.lora_rank > 0:
            self.lora_alpha = float(2 * self.lora_rank)
        _require(
            self.lora_alpha is None or self.lora_alpha > 0,
            f"--lora-alpha must be positive, got {self.lora_alpha}",
        )
        _require(0.0 <= self.lora_dropout < 1.0, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        for name in self.lora_target_modules:
            _require(
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
                _require(not on, f"{flag} needs LoRA: pass --lora-rank R (e.g. 8 or 16)")

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0


# --------------------------------------------------------------------------------------------------
# The training command
# --------------------------------------------------------------------------------------------------


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
        _require(
            t.tokens_per_step >= t.tokens_per_micro_batch
            and t.tokens_per_step % t.tokens_per_micro_batch == 0,
            f"--tokens-per-step ({t.tokens_per_step}) must be a positive multiple of "
            f"--tokens-per-micro-batch ({t.tokens_per_micro_batch})",
        )
        # In training a packed row is one micro-batch: --row-size is that size, or must agree with it.
        _require(
            self.data.row_size in (None, t.tokens_per_micro_batch),
            f"--row-size ({self.data.row_size}) differs from --tokens-per-micro-batch "
            f"({t.tokens_per_micro_batch}): in training a packed row is one micro-batch; leave --row-size "
            "unset or set both to the same value",
        )
        self.data.row_size = t.tokens_per_micro_batch
        _require(
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
