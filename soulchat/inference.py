"""The inference layer under ``soulchat.chat`` and ``soulchat.evaluate``: one way to load a trained model,
prompt it as it was trained, fit a conversation into its context window, generate replies, and score
counselor tokens with the training loss.

- Loading (``load_model``): a local Hugging Face directory only (never downloaded); the template is
  ``--template`` if given, else the one named in the export's training config (``soulchat_config.json`` in
  the model directory, or the run's ``config.json`` next to an ``export`` directory), else the tokenizer's
  own chat template ("auto"). One device/dtype picker (``pick_device``, ``pick_dtype``).
- Context fitting (``fit_context``): history that no longer fits loses its oldest client/counselor
  exchanges first; the system prompt is always kept.
- Generation (``generate_batch``, ``generate_replies``): left-padded batches of prompts of similar length
  through transformers' ``generate``; an optional vLLM backend (``VllmGenerator``) when ``vllm`` is
  installed.
- Loss (``packed_loss``): the counselor-token cross-entropy computed exactly as in training, by
  ``soulchat.model.PackedCausalLM`` on packed micro-batches (``soulchat.data.packing.pack`` + ``assemble``),
  each trained token weighted 1, like the trainer's own held-out evaluation.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from soulchat.commandline import Section, check_types, option
from soulchat.data.conversation import Turn
from soulchat.data.render import TEMPLATES, TemplateError, end_marker, render_prompt, thinking_value
from soulchat.dataspec import THINKING, TemplateChoice, ThinkingChoice
from soulchat.export import EXPORT_DIR
from soulchat.options import GenerationConfig, ModelConfig

FALLBACK_CONTEXT = 2048  # when neither the model config nor the tokenizer states a context length
TRAINING_CONFIG_FILE = "soulchat_config.json"  # the training config, saved next to an exported model


class ContextTooLong(ValueError):
    """Even the newest client turn (with the system prompt) does not fit the context window."""


# ==================================================================================================
# Options (the sections of soulchat.options that chat and evaluate share are GenerationConfig, and the
# model directory / device / trust-remote-code fields of ModelConfig and TrainConfig)
# ==================================================================================================


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


# ==================================================================================================
# Loading: model, tokenizer, template, stop tokens, context window
# ==================================================================================================


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


# ==================================================================================================
# Checking text and fitting the context
# ==================================================================================================


def check_text(turns: Sequence[Turn], where: str) -> None:
    """Text must be valid Unicode: a lone surrogate (invalid UTF-8 bytes read with surrogateescape, or a
    "\\ud800" escape in JSON) cannot be tokenized."""
    for turn in turns:
        try:
            turn.text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"{where}: a {turn.role} message is not valid text (character {err.start} is "
                f"{turn.text[err.start]!r}: invalid UTF-8 input or a lone surrogate escape); fix the "
                "encoding of the input (UTF-8)"
            ) from None


def check_no_control_tokens(lm: LoadedModel, turns: Sequence[Turn], where: str) -> None:
    """A control-token string typed into a message (e.g. "<|im_end|>") would end the turn early."""
    for turn in turns:
        for token in lm.control_tokens:
            if token in turn.text:
                raise ValueError(
                    f"{where}: a {turn.role} message contains the control token {token!r}, which would be "
                    "read as the template's own marker; remove it from the text"
                )


def fit_context(
    lm: LoadedModel, turns: Sequence[Turn], max_new_tokens: int, where: str = "conversation"
) -> tuple[list[int], int]:
    """(prompt token ids, exchanges dropped): the prompt for the counselor's next reply, within the window.

    ``turns``: optional system turn, then client/counselor alternating, ending with a client turn. While
    the prompt plus ``max_new_tokens`` exceeds the context window, the oldest client/counselor exchange
    is dropped (the system prompt stays). Raises ContextTooLong when even the last client turn alone
    does not fit.
    """
    turns = list(turns)
    if not turns or turns[-1].role != "client":
        raise ValueError(f"{where}: the conversation must end with a client turn to get a counselor reply")
    budget = lm.context_window - max_new_tokens
    if budget < 1:
        raise ContextTooLong(
            f"{where}: --max-new-tokens {max_new_tokens} leaves no room for a prompt in the context window "
            f"of {lm.context_window} tokens; lower --max-new-tokens"
        )
    system = turns[:1] if turns[0].role == "system" else []
    body = turns[len(system) :]
    dropped = 0
    while True:
        ids = lm.encode(render_prompt(system + body, lm.tokenizer, lm.template, thinking_value(lm.thinking)))
        if len(ids) <= budget:
            return ids, dropped
        if len(body) < 3:
            raise ContextTooLong(
                f"{where}: the last client message needs a {len(ids)}-token prompt, more than the "
                f"{budget} tokens left in the context window of {lm.context_window} after --max-new-tokens "
                f"{max_new_tokens}; shorten the message or lower --max-new-tokens"
            )
        body = body[2:]  # the oldest client turn and the counselor's reply to it
        dropped += 1


# ==================================================================================================
# Generation
# ==================================================================================================


class _StopFlag:
    """A stopping criterion that ends generation when ``event`` is set (Ctrl-C in the chat)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def _cut_at_stop(lm: LoadedModel, new_ids: Sequence[int]) -> tuple[list[int], int]:
    """(reply ids before the first stop token, tokens generated including that stop token)."""
    for i, token in enumerate(new_ids):
        if token in lm.stop_ids:
            return list(new_ids[:i]), i + 1
    return list(new_ids), len(new_ids)


def _decode_reply(lm: LoadedModel, new_ids: Sequence[int], counts: Counter | None = None) -> str:
    """Text of generated ids up to (not including) the first stop token."""
    ids, generated = _cut_at_stop(lm, new_ids)
    if counts is not None:
        counts["generated_tokens"] += generated  # padding after a row's stop token is not counted
    return lm.tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.no_grad()
def generate_batch(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    options: GenerationConfig,
    streamer: Any = None,
    stop_event: threading.Event | None = None,
    counts: Counter | None = None,
    stopped: list[bool] | None = None,
) -> list[str]:
    """One generate() call over prompts left-padded to a batch; the reply text of each.

    ``stopped`` (when given) receives, per prompt, whether its reply ended at a stop token (False: it
    was cut at max_new_tokens), so a caller that needs whole replies can tell.
    """
    from transformers import StoppingCriteriaList

    # ids/mask: [B, P]; left padding so every prompt ends where generation starts.
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), lm.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    device = lm.device
    extra: dict[str, Any] = {}
    if streamer is not None:
        extra["streamer"] = streamer
    if stop_event is not None:
        extra["stopping_criteria"] = StoppingCriteriaList([_StopFlag(stop_event)])
    out = lm.model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        eos_token_id=lm.stop_ids,
        pad_token_id=lm.pad_id,
        **options.generate_kwargs(),
        **extra,
    )
    new = out[:, width:].tolist()  # [B, <= max_new_tokens]
    if stopped is not None:
        stopped.extend(any(t in lm.stop_ids for t in row) for row in new)
    return [_decode_reply(lm, row, counts) for row in new]


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of ``batch_size``, longest first (ties in input order): little padding per batch,
    and an order fixed by the inputs, so runs with the same seed are identical."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def generate_replies(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    options: GenerationConfig,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    counts: Counter | None = None,
) -> list[str]:
    """Replies to many prompts, in their order, generated ``batch_size`` at a time, batched by length.

    ``counts["generated_tokens"]`` (when given) adds up the new tokens of every reply, its stop token
    included, for tokens/s.
    """
    replies: list[str] = [""] * len(prompts)
    for chunk in length_batches([len(p) for p in prompts], batch_size):
        for i, text in zip(chunk, generate_batch(lm, [prompts[i] for i in chunk], options, counts=counts)):
            replies[i] = text
        if progress is not None:
            progress(len(chunk))
    return replies


class VllmGenerator:
    """The same replies through vLLM (``--backend vllm``), for fast generation on a GPU.

    Prompts are passed as token ids (rendered and fitted exactly as for the transformers backend) and
    replies are cut at the same stop tokens. vLLM schedules its own batches (continuous batching), so
    ``batch_size`` does not apply; with sampling its random streams differ from transformers', so the
    replies are reproducible for a seed but not equal to the transformers backend's.
    """

    def __init__(self, lm: LoadedModel, seed: int, gpu_memory_utilization: float = 0.85) -> None:
        try:
            import vllm
        except ImportError as err:
            raise ValueError(
                f"--backend vllm: the vllm package is not importable ({err}); install it or use --backend hf"
            ) from None
        self.vllm = vllm
        self.lm = lm
        dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
        self.engine = vllm.LLM(
            model=lm.path,
            tokenizer=lm.path,
            dtype=dtype,
            seed=seed,
            max_model_len=lm.context_window,
            gpu_memory_utilization=gpu_memory_utilization,
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], options: GenerationConfig, counts: Counter | None = None,
        stopped: list[bool] | None = None,
    ) -> list[str]:
        params = self.vllm.SamplingParams(
            max_tokens=options.max_new_tokens,
            temperature=options.temperature if options.do_sample else 0.0,
            top_p=options.top_p if options.do_sample else 1.0,
            top_k=(options.top_k or -1) if options.do_sample else -1,
            repetition_penalty=options.repetition_penalty,
            stop_token_ids=list(self.lm.stop_ids),
            skip_special_tokens=True,
        )
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.engine.generate(requests, params, use_tqdm=False)
        if stopped is not None:  # vLLM's finish_reason: "stop" (a stop token) or "length"
            stopped.extend(o.outputs[0].finish_reason != "length" for o in outputs)
        return [_decode_reply(self.lm, list(o.outputs[0].token_ids), counts) for o in outputs]


# ==================================================================================================
# The training loss on counselor tokens
# ==================================================================================================


@contextlib.contextmanager
def _packed_attention(model: torch.nn.Module) -> Iterator[None]:
    """Route attention through soulchat's varlen kernel while packed rows are scored, then restore the
    model's own implementation: generation needs a padding mask, which the varlen implementation does
    not build (see soulchat.attention), and packed rows need the conversation boundaries SDPA ignores."""
    from soulchat.attention import ATTENTION_NAME, register_attention

    register_attention()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def packed_loss(
    lm: LoadedModel,
    sequences: Sequence[Any],
    tokens_per_micro_batch: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, int, int]:
    """(sum of cross-entropy over trained tokens, number of those tokens, micro-batches run).

    ``sequences``: soulchat.data.render.TokenizedConversation (input_ids, trained). They are packed
    best-fit-decreasing into micro-batches of ``max(tokens_per_micro_batch, longest sequence)`` tokens and
    scored by ``PackedCausalLM`` -- the module, the fused lm-head loss and the labels of training -- with
    every trained token weighted 1, as the trainer's held-out evaluation does. Attention never crosses a
    conversation boundary, so the loss does not depend on which conversations share a micro-batch.
    """
    from soulchat.data.packing import assemble, pack, to_torch
    from soulchat.model import PackedCausalLM

    if tokens_per_micro_batch < 1:
        raise ValueError(f"--tokens-per-micro-batch must be >= 1, got {tokens_per_micro_batch}")
    if not sequences:
        return 0.0, 0, 0
    lengths = np.array([len(s.input_ids) for s in sequences], dtype=np.int64)
    tokens = np.concatenate([s.input_ids for s in sequences]).astype(np.int32)
    trained = np.concatenate([s.trained for s in sequences]).astype(np.uint8)
    ones = np.ones(len(tokens), dtype=np.float32)
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    row_offsets, row_seqs = pack(lengths, max(tokens_per_micro_batch, int(lengths.max())), seed=0)
    packed = PackedCausalLM(lm.model)
    loss_sum, n_tokens, batches = 0.0, 0, 0
    with _packed_attention(lm.model):
        for r in range(len(row_offsets) - 1):
            seq_ids = row_seqs[row_offsets[r] : row_offsets[r + 1]]
            batch = assemble(tokens, trained, ones, offsets, seq_ids)
            if len(batch["loss_index"]):
                loss_sum += float(packed(**to_torch(batch, lm.device)))
                n_tokens += len(batch["loss_index"])
                batches += 1
            if progress is not None:
                progress(len(seq_ids))
    return loss_sum, n_tokens, batches
