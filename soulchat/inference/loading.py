"""Loading a trained model for inference: model, tokenizer, template, stop tokens, context window.

A local Hugging Face directory only (never downloaded), or a LoRA run's adapter directory (merged into
its base). The template is ``--template`` if given, else the one named in the export's training config,
else the tokenizer's own chat template ("auto"); ``--thinking`` likewise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soulchat.data.render import TEMPLATES, TemplateError, end_marker, thinking_value
from soulchat.dataspec import THINKING
from soulchat.export import EXPORT_DIR
from soulchat.inference.config import InferenceConfig

FALLBACK_CONTEXT = 2048  # when neither the model config nor the tokenizer states a context length
TRAINING_CONFIG_FILE = "soulchat_config.json"  # the training config, saved next to an exported model


@dataclass
class LoadedModel:
    """A loaded model with everything needed to prompt it as it was trained."""

    model: Any  # a transformers causal LM, in eval mode
    tokenizer: Any
    template: str  # one of soulchat.data.render.TEMPLATES
    template_source: str  # where the template choice came from (for the banner and reports)
    context_window: int  # prompt + reply tokens the model may see
    stop_ids: list[int]  # generation stops at any of these (eos, the template's end-of-turn marker)
    pad_id: int
    path: str
    training_config: dict[str, Any] | None = None
    control_tokens: tuple[str, ...] = field(default_factory=tuple)
    thinking: str | None = None  # --thinking the prompts are built with ("off", "on"; None: template default)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        # Rendered prompts carry their own special tokens (add_special_tokens=False, as in training).
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def describe(self) -> dict[str, Any]:
        """The model part of a report."""
        return {
            "path": self.path,
            "type": getattr(self.model.config, "model_type", None),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "device": self.device.type,
            "template": self.template,
            "template_source": self.template_source,
            "thinking": self.thinking,
            "context_window": self.context_window,
        }


def read_training_config(model_dir: str | Path) -> dict[str, Any] | None:
    """The soulchat training config of an exported model, or None.

    Looks for ``<model>/soulchat_config.json``, then, for the layout ``<run>/export`` that training
    writes, ``<run>/config.json`` when it is a soulchat training config (has "data" and "train" sections).
    """
    model_dir = Path(model_dir)
    candidates = [model_dir / TRAINING_CONFIG_FILE]
    if model_dir.name == EXPORT_DIR:
        candidates.append(model_dir.parent / "config.json")
    for path in candidates:
        if not path.is_file():
            continue
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(values, dict) and (
            path.name == TRAINING_CONFIG_FILE or {"data", "train"} <= values.keys()
        ):
            values["_path"] = str(path)
            return values
    return None


def resolve_template(
    tokenizer, override: str | None, training_config: dict[str, Any] | None
) -> tuple[str, str]:
    """(template, where the choice came from): --template, else the training config, else the tokenizer."""
    if override is not None:
        if override not in TEMPLATES:
            raise ValueError(f"--template {override!r}: choose one of {TEMPLATES}")
        return override, "--template"
    if training_config is not None:
        data = training_config.get("data", training_config)
        name = data.get("template") if isinstance(data, dict) else None
        if name in TEMPLATES:
            return name, f"training config {training_config.get('_path', '')}".strip()
    if getattr(tokenizer, "chat_template", None):
        return "auto", "the tokenizer's chat template"
    raise TemplateError(
        "the model directory names no training template and its tokenizer has no chat template: pass "
        "--template soulchat (the paper's 用户：/心理咨询师： format, for base models) or --template chatml"
    )


def resolve_thinking(override: str | None, training_config: dict[str, Any] | None) -> str | None:
    """--thinking, else the training config's (so prompts are built as in training), else None (the
    template's default)."""
    if override is not None:
        thinking_value(override)  # validates
        return override
    if training_config is not None:
        data = training_config.get("data", training_config)
        recorded = data.get("thinking") if isinstance(data, dict) else None
        if recorded in THINKING:
            return recorded
    return None


def _end_marker_id(tokenizer, template: str, thinking: str | None = None) -> int | None:
    """The token the template puts right after a counselor reply (<|im_end|>, eos, <|eot_id|>, ...)."""
    marker = end_marker(tokenizer, template, thinking_value(thinking))
    if not marker:
        return None
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def _stop_ids(model, tokenizer, template: str, thinking: str | None = None) -> list[int]:
    ids: list[int] = []

    def add(value: Any) -> None:
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, int) and v >= 0 and v not in ids:
                ids.append(v)

    add(tokenizer.eos_token_id)
    add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    add(_end_marker_id(tokenizer, template, thinking))
    if not ids:
        raise ValueError(
            "the tokenizer has no eos token and the template no end-of-turn marker: generation would never "
            "stop; set eos_token in the tokenizer config"
        )
    return ids


def _context_window(model, tokenizer, override: int | None) -> int:
    if override is not None:
        return override
    limits = []
    for value in (
        getattr(model.config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ):
        # Tokenizers without a limit report a huge sentinel (int(1e30)).
        if isinstance(value, int) and 0 < value < 10_000_000:
            limits.append(value)
    return min(limits) if limits else FALLBACK_CONTEXT


def _control_tokens(tokenizer) -> tuple[str, ...]:
    strings = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            strings.add(str(getattr(tok, "content", tok)))
    return tuple(sorted((s for s in strings if s), key=len, reverse=True))


def pick_device(name: str) -> torch.device:
    """``--device auto|cpu|cuda``: auto = CUDA when one is visible."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible (use --device cpu)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--dtype``: auto = bfloat16 on a CUDA device that supports it, else float32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _model_directory(model_dir: str | None, flag: str) -> Path:
    if model_dir is None:
        raise FileNotFoundError(
            f"{flag}: pass a local Hugging Face model directory (e.g. the <output-dir>/export written by "
            "soulchat.train); nothing is downloaded"
        )
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{flag} {path}: not a directory; pass a local Hugging Face model directory (e.g. the "
            "<output-dir>/export written by soulchat.train); nothing is downloaded"
        )
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{flag} {path}: no config.json (nor adapter_config.json); pass a Hugging Face model directory "
            "or a LoRA run's <output-dir>/adapter"
        )
    return path


def load_from_options(options: dict[str, Any]) -> LoadedModel:
    """The model of a parsed chat/evaluate command line ({section name: instance}, soulchat.options)."""
    inference: InferenceConfig = options["inference"]
    return load_model(
        options["model"].model,
        template=inference.template,
        thinking=inference.thinking,
        device=options["train"].device,
        dtype=inference.dtype,
        max_context=options["generation"].max_context,
        trust_remote_code=options["model"].trust_remote_code,
        base_model=inference.base_model,
    )


def load_model(
    model_dir: str | None,
    *,
    template: str | None = None,
    thinking: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_context: int | None = None,
    trust_remote_code: bool = False,
    flag: str = "--model",
    base_model: str | None = None,
) -> LoadedModel:
    """Load a local Hugging Face causal LM + tokenizer for chat, evaluation and judging (never downloads).

    ``template``: None = from the training config, else the tokenizer's chat template; ``thinking``
    ("off"/"on"): None = from the training config, else the template's default; ``flag`` names the
    option in error messages (``--judge`` for a judge model); ``base_model``: the base of a LoRA adapter
    directory (``--base-model``), unset = the one its adapter_config.json records.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soulchat.lora import is_adapter_dir, load_adapter_model

    path = _model_directory(model_dir, flag)
    if max_context is not None and max_context < 2:
        raise ValueError(f"--max-context must be at least 2 tokens, got {max_context}")
    torch_device = pick_device(device)
    if base_model is not None and not is_adapter_dir(path):
        raise ValueError(
            f"--base-model is only used when {flag} is a LoRA adapter directory, and {path} is a full model "
            "(no adapter_config.json): drop --base-model"
        )
    if is_adapter_dir(path):
        # A LoRA run's <output-dir>/adapter: its base with the adapter merged in, so PackedCausalLM and
        # generate() see one plain causal LM; the adapter directory carries the tokenizer and the
        # training config (template), read below like an export's.
        model, tokenizer = load_adapter_model(
            path, base=base_model, device="cpu", dtype=pick_dtype(dtype, torch_device), merge=True,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as err:
            raise ValueError(f"{flag} {path}: could not load its tokenizer: {err}") from err
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            dtype=pick_dtype(dtype, torch_device),
        )
    model.to(torch_device).eval()
    training_config = read_training_config(path)
    name, source = resolve_template(tokenizer, template, training_config)
    thinking = resolve_thinking(thinking, training_config)
    stop_ids = _stop_ids(model, tokenizer, name, thinking)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        template=name,
        template_source=source,
        context_window=_context_window(model, tokenizer, max_context),
        stop_ids=stop_ids,
        pad_id=pad_id,
        path=str(path),
        training_config=training_config,
        control_tokens=_control_tokens(tokenizer),
        thinking=thinking,
    )
