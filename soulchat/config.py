"""Training configuration: one dataclass per concern, validated where it is built.

Every field is a command-line flag (``lr`` -> ``--lr``, ``tokens_per_step`` -> ``--tokens-per-step``) with
its help text, and a key of an optional YAML/TOML config file. Precedence: built-in defaults < config
file < flags. A config file may group keys by section (``optim: {lr: 1e-4}``) or list them flat
(``lr: 1e-4``); field names are unique across sections so both spellings mean the same thing.

Defaults describe the embedded smoke run (`python -m soulchat.train` with no arguments: a tiny random
Qwen2 on the bundled sample corpus, on the CPU). Where a good value depends on whether a real model is
being fine-tuned (the learning rate), the field defaults to ``None`` and ``Config`` resolves it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """An impossible or malformed configuration; the message says which field and how to fix it."""


def _help(text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field carrying its CLI help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": text}, **kwargs)
    return field(default=default, metadata={"help": text}, **kwargs)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# LoRA section: defined with its logic in soulchat/lora.py (which needs the helpers above).
from soulchat.lora import LORA_FINETUNE_LR, LoraConfig

# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
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
        for name in ("model", "tokenizer"):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, str) and value.strip() != ""),
                f"--{name} must be a directory path (or left unset), got {value!r}",
            )


@dataclass
class DataConfig:
    data: list[str] = _help(  # noqa: RUF009 (_help returns a dataclasses.field)
        "conversation files (JSON/JSONL in any supported format); empty = the bundled sample corpus", []
    )
    format: str = _help("input format: auto, soulchat, openai, sharegpt, smile, cpsycound or xtuner", "auto")
    template: Literal["auto", "soulchat", "chatml"] = _help(
        "chat rendering: auto = the tokenizer's own chat template; soulchat = the paper's "
        "用户：/心理咨询师： format; chatml = <|im_start|> turns",
        "auto",
    )
    max_length: int = _help(
        "longest conversation in tokens; longer ones are split or dropped (--overflow)", 1024
    )
    overflow: Literal["split", "drop"] = _help(
        "what to do with a conversation longer than --max-length", "split"
    )
    loss_weighting: Literal["token", "turn", "conversation"] = _help(
        "weight of each counselor token in the loss: token = 1 each; turn = each counselor turn sums to 1; "
        "conversation = each conversation sums to 1",
        "token",
    )
    eval_fraction: float = _help(
        "fraction of conversations held out for evaluation (0 = no held-out set)", 0.05
    )
    on_error: Literal["raise", "skip"] = _help(
        "a malformed record stops preparation (raise) or is dropped and counted (skip)", "raise"
    )
    cache_dir: str | None = _help(
        "where the tokenized, packed data is cached (by content hash); unset = <output-dir>/data", None
    )

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        self.data = [str(p) for p in self.data]
        _require(self.max_length >= 2, f"--max-length must be at least 2 tokens, got {self.max_length}")
        _require(
            0.0 <= self.eval_fraction < 1.0,
            f"--eval-fraction must be in [0, 1), got {self.eval_fraction}",
        )


@dataclass
class OptimConfig:
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


@dataclass
class CheckpointConfig:
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

    def __post_init__(self) -> None:
        _require(self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every}")
        _require(self.keep_last >= 1, f"--keep-last must be >= 1, got {self.keep_last}")


# Values of the fields left unset (None), by run kind. The built-in model starts from random weights and
# must visibly learn within a couple of CPU minutes: a large learning rate, small steps (more updates
# per token: 2k-token steps reached a lower loss than 4k-token ones for the same compute) and six
# passes over the 126-conversation sample corpus (~52k tokens; loss 8.3 -> ~5.4 in ~150 steps).
# Fine-tuning a pretrained model wants the usual full fine-tuning rate, GPU-sized rows and one pass.
BUILTIN_DEFAULTS = {"lr": 5e-3, "epochs": 6.0, "tokens_per_micro_batch": 1024, "tokens_per_step": 2048}
FINETUNE_DEFAULTS = {"lr": 2e-5, "epochs": 1.0, "tokens_per_micro_batch": 8192, "tokens_per_step": 65536}

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "lora": LoraConfig,
}


@dataclass
class Config:
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
        # Checks that need more than one section.
        _require(
            self.data.max_length <= self.train.tokens_per_micro_batch,
            f"--max-length ({self.data.max_length}) must fit in one packed row: raise "
            f"--tokens-per-micro-batch ({self.train.tokens_per_micro_batch}) or lower --max-length",
        )

    @property
    def builtin_model(self) -> bool:
        return self.model.model is None

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> Config:
        """Build from sectioned and/or flat keys; unknown keys are an error naming the closest field."""
        per_section: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in values.items():
            if key in SECTIONS and isinstance(value, dict):
                for sub_key, sub_value in value.items():
                    name = _field_name(sub_key)
                    if name not in _section_fields(key):
                        valid = _section_fields(key)
                        raise ConfigError(
                            f"{where}: unknown key {sub_key!r} in section {key!r}{_suggest(name, valid)}; "
                            f"valid keys: {sorted(valid)}"
                        )
                    per_section[key][name] = sub_value
            else:
                name = _field_name(key)
                section = _FIELD_SECTION.get(name)
                if section is None:
                    raise ConfigError(f"{where}: unknown key {key!r}{_suggest(name, _FIELD_SECTION)}")
                per_section[section][name] = value
        try:
            sections = {
                name: SECTIONS[name](**{k: _coerce(SECTIONS[name], k, v, where) for k, v in kv.items()})
                for name, kv in per_section.items()
            }
        except TypeError as err:  # a value of the wrong shape reaching a dataclass
            raise ConfigError(f"{where}: {err}") from err
        return cls(**sections)


# --------------------------------------------------------------------------------------------------
# Field introspection (shared by the file loader and the CLI)
# --------------------------------------------------------------------------------------------------


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


_FIELD_SECTION: dict[str, str] = {}
for _section in SECTIONS:
    for _name in _section_fields(_section):
        assert _name not in _FIELD_SECTION, f"field name {_name!r} is used by two sections"
        _FIELD_SECTION[_name] = _section


def _field_name(key: str) -> str:
    return str(key).replace("-", "_")


def _suggest(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_info(cls: type, name: str) -> tuple[type, bool, tuple[Any, ...] | None, bool]:
    """(base type, optional?, literal choices, is list) of a dataclass field."""
    hint = typing.get_type_hints(cls)[name]
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
        origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), optional, choices, False
    if origin is list:
        return typing.get_args(hint)[0], optional, None, True
    return hint, optional, None, False


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """Convert a config-file value to the field's type, with an error naming the key."""
    base, optional, choices, is_list = _type_info(cls, name)
    flag = "--" + name.replace("_", "-")
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{where}: {name} ({flag}) cannot be empty")
    try:
        if is_list:
            items = value if isinstance(value, (list, tuple)) else [value]
            return [base(v) for v in items]
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes", "on")
            if not isinstance(value, (bool, int)):
                raise ValueError(value)
            return bool(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        converted = base(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {name} ({flag}) expects {base.__name__}, got {value!r}") from err
    if choices is not None and converted not in choices:
        raise ConfigError(f"{where}: {name} ({flag}) must be one of {list(choices)}, got {value!r}")
    return converted


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a .yaml/.yml/.toml/.json config file into a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (check the --config path)")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
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
            values = json.loads(text)
        else:
            raise ConfigError(
                f"config file {path}: unknown extension {suffix!r}; use .yaml, .yml, .toml or .json"
            )
    except ConfigError:
        raise
    except Exception as err:  # yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError
        raise ConfigError(f"config file {path} could not be parsed: {err}") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys to values, got {type(values).__name__}"
        )
    return values


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser(prog: str = "python -m soulchat.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a causal LM into an empathetic counselor on packed multi-turn conversations. "
        "Run under torchrun for several processes. Precedence: defaults < --config file < flags.",
    )
    parser.add_argument(
        "--config", default=None, help="YAML or TOML file with any of the fields below (flat or by section)"
    )
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            base, optional, choices, is_list = _type_info(cls, f.name)
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kwargs: dict[str, Any] = {
                "dest": f"{section}.{f.name}",
                # SUPPRESS: only flags actually given override the config file.
                "default": argparse.SUPPRESS,
                "help": f"{f.metadata['help']} (default: {default})".replace("%", "%%"),
            }
            if base is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
                continue
            kwargs["metavar"] = f.name.upper()
            if is_list:
                kwargs["nargs"] = "+"
                kwargs["metavar"] = "PATH"
            if choices is not None:
                kwargs["choices"] = choices
                kwargs.pop("metavar")
            if optional:
                kwargs["type"] = _optional(base)
            else:
                kwargs["type"] = base
            group.add_argument(flag, **kwargs)
    return parser


def _optional(base: type) -> typing.Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else base(text)

    parse.__name__ = base.__name__
    return parse


def parse_args(argv: list[str] | None = None) -> Config:
    """Defaults < --config file < flags, then validate."""
    namespace = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    where = "command line"
    if namespace.config:
        values = load_config_file(namespace.config)
        where = f"config file {namespace.config} + command line"
    # Normalise the file's keys into sections (unknown keys stay flat so from_dict names them),
    # then lay the flags over them.
    merged: dict[str, Any] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                merged[key][_field_name(sub_key)] = sub_value
        elif _field_name(key) in _FIELD_SECTION:
            merged[_FIELD_SECTION[_field_name(key)]][_field_name(key)] = value
        else:
            merged[key] = value
    for dest, value in vars(namespace).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            merged[section][name] = value
    return Config.from_dict(merged, where=where)
