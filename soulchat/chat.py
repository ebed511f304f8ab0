"""Talk to a counselor model: ``python -m soulchat.chat --model DIR``.

Modes:
  interactive (default)   multi-turn chat in the terminal, the reply streamed token by token;
                          /reset starts over, /exit (or Ctrl-D) quits, Ctrl-C stops a reply
  --prompt TEXT           one counselor reply to TEXT, printed to stdout
  --input F --output G    F: one conversation per line (any format soulchat's readers accept, e.g.
                          {"messages": [{"role": "user", "content": ...}, ...]}) ending with the
                          client's turn; G: one JSON object per line {"id", "reply"} (or {"id", "error"})

The prompt is rendered exactly as in training (soulchat.data.render.render_prompt) with the template the
model was trained with: ``--template`` if given, else the template named in the export's training
config (``soulchat_config.json`` in the model directory, or the run's ``config.json`` next to an
``export`` directory), else the tokenizer's own chat template ("auto"). History that no longer fits the
context window loses its oldest client/counselor exchanges first; the system prompt is always kept.
Models load from local directories only (never downloaded); ``--trust-remote-code`` is off by default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from soulchat.data.conversation import Conversation, DataError, Turn
from soulchat.data.render import TEMPLATES, TemplateError, render_conversation, render_prompt

# The paper's sampling settings for its chat demo (temperature 0.95, top-p 0.75).
DEFAULT_TEMPERATURE = 0.95
DEFAULT_TOP_P = 0.75
DEFAULT_TOP_K = 50  # transformers' default; --top-k 0 samples by top-p and temperature alone
DEFAULT_MAX_NEW_TOKENS = 256
FALLBACK_CONTEXT = 2048  # when neither the model config nor the tokenizer states a context length
TRAINING_CONFIG_FILE = "soulchat_config.json"  # the training config, saved next to an exported model

SAFETY_NOTE = (
    "Note: you are talking to an AI language model, not a counsellor. It can be wrong and it is no "
    "replacement for professional help. If you are in crisis or thinking about harming yourself, "
    "contact your local emergency number or a crisis hotline now.\n"
    "提示：这是一个AI语言模型，不是心理咨询师，可能出错，不能替代专业的心理咨询或医疗帮助。"
    "如果你正处于危机中或有伤害自己的想法，请立即拨打当地急救电话或心理危机干预热线。"
)
HELP = "commands: /reset (start a new conversation), /exit or /quit (leave; Ctrl-D too), /help"


class ContextTooLong(ValueError):
    """Even the newest client turn (with the system prompt) does not fit the context window."""


# ==================================================================================================
# Loading: model, tokenizer, template, stop tokens, context window
# ==================================================================================================


@dataclass
class ChatModel:
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

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        # Rendered prompts carry their own special tokens (add_special_tokens=False, as in training).
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def read_training_config(model_dir: str | Path) -> dict[str, Any] | None:
    """The soulchat training config of an exported model, or None.

    Looks for ``<model>/soulchat_config.json``, then, for the layout ``<run>/export`` that training
    writes, ``<run>/config.json`` when it is a soulchat training config (has "data" and "train" sections).
    """
    model_dir = Path(model_dir)
    candidates = [model_dir / TRAINING_CONFIG_FILE]
    if model_dir.name == "export":
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


def _end_marker_id(tokenizer, template: str) -> int | None:
    """The token the template puts right after a counselor reply (<|im_end|>, eos, <|eot_id|>, ...)."""
    probe = [Turn("client", "你好"), Turn("counselor", "嗯。")]
    rendered = render_conversation(probe, tokenizer, template)
    start, end = rendered.spans[-1]
    span = rendered.text[start:end]
    marker = span[span.rfind("嗯。") + len("嗯。") :]
    if not marker:
        return None
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def _stop_ids(model, tokenizer, template: str) -> list[int]:
    ids: list[int] = []

    def add(value: Any) -> None:
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, int) and v >= 0 and v not in ids:
                ids.append(v)

    add(tokenizer.eos_token_id)
    add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    add(_end_marker_id(tokenizer, template))
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
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible (use --device cpu)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_chat_model(
    model_dir: str,
    template: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    max_context: int | None = None,
) -> ChatModel:
    """Load a local Hugging Face causal LM + tokenizer for chat and evaluation (never downloads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"--model {path}: not a directory; pass a local Hugging Face model directory (e.g. the "
            "<output-dir>/export written by soulchat.train); nothing is downloaded"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: no config.json; pass a Hugging Face model directory")
    if max_context is not None and max_context < 2:
        raise ValueError(f"--max-context must be at least 2 tokens, got {max_context}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ValueError(f"--model {path}: could not load its tokenizer: {err}") from err
    torch_device = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        local_files_only=True,
        trust_remote_code=trust_remote_code,
        dtype=pick_dtype(dtype, torch_device),
    )
    model.to(torch_device).eval()
    training_config = read_training_config(path)
    name, source = resolve_template(tokenizer, template, training_config)
    stop_ids = _stop_ids(model, tokenizer, name)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    return ChatModel(
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
    )


# ==================================================================================================
# Prompting and generation
# ==================================================================================================


@dataclass
class GenerationOptions:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = True
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K  # 0 disables top-k filtering
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")

    def generate_kwargs(self) -> dict[str, Any]:
        # Everything explicit, so a model's own generation_config.json (which may sample, or set a
        # repetition penalty) does not silently change the decoding.
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
            "num_beams": 1,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        out["repetition_penalty"] = self.repetition_penalty
        return out


def check_no_control_tokens(cm: ChatModel, turns: Sequence[Turn], where: str) -> None:
    """A control-token string typed into a message (e.g. "<|im_end|>") would end the turn early."""
    for turn in turns:
        for token in cm.control_tokens:
            if token in turn.text:
                raise ValueError(
                    f"{where}: a {turn.role} message contains the control token {token!r}, which would be "
                    "read as the template's own marker; remove it from the text"
                )


def fit_context(
    cm: ChatModel, turns: Sequence[Turn], max_new_tokens: int, where: str = "conversation"
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
    budget = cm.context_window - max_new_tokens
    if budget < 1:
        raise ContextTooLong(
            f"{where}: --max-new-tokens {max_new_tokens} leaves no room for a prompt in the context window "
            f"of {cm.context_window} tokens; lower --max-new-tokens"
        )
    system = turns[:1] if turns[0].role == "system" else []
    body = turns[len(system) :]
    dropped = 0
    while True:
        ids = cm.encode(render_prompt(system + body, cm.tokenizer, cm.template))
        if len(ids) <= budget:
            return ids, dropped
        if len(body) < 3:
            raise ContextTooLong(
                f"{where}: the last client message needs a {len(ids)}-token prompt, more than the "
                f"{budget} tokens left in the context window of {cm.context_window} after --max-new-tokens "
                f"{max_new_tokens}; shorten the message or lower --max-new-tokens"
            )
        body = body[2:]  # the oldest client turn and the counselor's reply to it
        dropped += 1


class _StopFlag:
    """A stopping criterion that ends generation when ``event`` is set (Ctrl-C in the chat)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def _decode_reply(cm: ChatModel, new_ids: list[int]) -> str:
    """Text of generated ids up to (not including) the first stop token."""
    for i, token in enumerate(new_ids):
        if token in cm.stop_ids:
            new_ids = new_ids[:i]
            break
    return cm.tokenizer.decode(new_ids, skip_special_tokens=True).strip()


@torch.no_grad()
def generate_batch(
    cm: ChatModel,
    prompts: Sequence[Sequence[int]],
    options: GenerationOptions,
    streamer: Any = None,
    stop_event: threading.Event | None = None,
) -> list[str]:
    """One generate() call over prompts left-padded to a batch; the reply text of each."""
    from transformers import StoppingCriteriaList

    # ids/mask: [B, P]; left padding so every prompt ends where generation starts.
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), cm.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    device = cm.device
    extra: dict[str, Any] = {}
    if streamer is not None:
        extra["streamer"] = streamer
    if stop_event is not None:
        extra["stopping_criteria"] = StoppingCriteriaList([_StopFlag(stop_event)])
    out = cm.model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        eos_token_id=cm.stop_ids,
        pad_token_id=cm.pad_id,
        **options.generate_kwargs(),
        **extra,
    )
    new = out[:, width:].tolist()  # [B, <= max_new_tokens]
    return [_decode_reply(cm, row) for row in new]


def generate_replies(
    cm: ChatModel,
    prompts: Sequence[Sequence[int]],
    options: GenerationOptions,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Replies to many prompts, in their order, generated ``batch_size`` at a time.

    Prompts are batched in order of length (longest first, ties in input order) so a batch wastes
    little on padding; the order is fixed by the inputs, so runs with the same seed are identical.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, text in zip(chunk, generate_batch(cm, [prompts[i] for i in chunk], options)):
            replies[i] = text
        if progress is not None:
            progress(len(chunk))
    return replies


# ==================================================================================================
# A chat session (history, trimming, streaming)
# ==================================================================================================


@dataclass
class Reply:
    text: str
    dropped_exchanges: int  # oldest client/counselor exchanges removed from the history to fit
    interrupted: bool = False


class ChatSession:
    """Multi-turn history: optional system prompt, then client/counselor exchanges."""

    def __init__(self, cm: ChatModel, options: GenerationOptions, system: str | None = None) -> None:
        self.cm = cm
        self.options = options
        self.system = [Turn("system", system)] if system and system.strip() else []
        check_no_control_tokens(cm, self.system, "--system")
        self.history: list[Turn] = []

    def reset(self) -> None:
        self.history = []

    def respond(
        self,
        message: str,
        on_text: Callable[[str], None] | None = None,
        stop_event: threading.Event | None = None,
    ) -> Reply:
        """The counselor's reply to ``message``; with ``on_text``, the text is streamed to it as it comes.

        Raises ContextTooLong / ValueError (control tokens) without changing the history.
        """
        turns = self.system + self.history + [Turn("client", message)]
        check_no_control_tokens(self.cm, turns[-1:], "your message")
        prompt, dropped = fit_context(self.cm, turns, self.options.max_new_tokens, "your message")
        if on_text is None:
            text = generate_batch(self.cm, [prompt], self.options, stop_event=stop_event)[0]
        else:
            text = self._stream(prompt, on_text, stop_event)
        interrupted = stop_event is not None and stop_event.is_set()
        # What the model saw is the new history: the dropped exchanges are gone for good.
        self.history = self.history[2 * dropped :] + [Turn("client", message)]
        if text:
            self.history.append(Turn("counselor", text))
        else:  # an immediately stopped reply: forget the message too, to keep turns alternating
            self.history.pop()
        return Reply(text, dropped, interrupted)

    def _stream(
        self, prompt: list[int], on_text: Callable[[str], None], stop_event: threading.Event | None
    ) -> str:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.cm.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["text"] = generate_batch(self.cm, [prompt], self.options, streamer, stop_event)[0]
            except BaseException as err:  # noqa: BLE001  (any error is re-raised in the caller's thread)
                result["error"] = err
                streamer.end()  # unblock the reader below

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        chunks = iter(streamer)
        while True:
            try:
                for chunk in chunks:
                    on_text(chunk)
                break
            except KeyboardInterrupt:
                if stop_event is None:
                    raise
                # Ctrl-C: generation stops at its next step; keep draining so the thread can finish
                # and the partial reply (already on screen) is kept.
                stop_event.set()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["text"]


# ==================================================================================================
# Modes
# ==================================================================================================


def interactive(
    cm: ChatModel, options: GenerationOptions, system: str | None, stdout: TextIO | None = None
) -> None:
    """Read messages with input() until /exit or end of input; stream each reply to ``stdout``."""
    stdout = stdout if stdout is not None else sys.stdout  # looked up now: tests and callers redirect it
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())

    def say(text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=stdout, flush=True)

    say(
        f"soulchat — {cm.path} (template {cm.template!r} from {cm.template_source}; "
        f"context {cm.context_window} tokens)"
    )
    say(SAFETY_NOTE)
    say(HELP)
    session = ChatSession(cm, options, system)
    while True:
        say()
        try:
            message = input("you> ")
        except EOFError:  # Ctrl-D
            say()
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave like Ctrl-D
            say()
            break
        message = message.strip()
        if not message:
            continue
        if message.startswith("/"):
            command = message.split()[0].lower()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                say("(conversation reset)")
                continue
            say(HELP)
            continue
        say("counselor> ", end="")
        stop = threading.Event()
        try:
            reply = session.respond(message, lambda s: say(s, end=""), stop)
        except (ContextTooLong, ValueError) as err:
            say(f"\n(error: {err})")
            continue
        except KeyboardInterrupt:  # before the reply started streaming: nothing was generated
            say("\n(reply stopped)")
            continue
        say()
        if reply.interrupted:
            say("(reply stopped)")
        if reply.dropped_exchanges:
            say(f"(the {reply.dropped_exchanges} oldest exchange(s) were dropped to fit the context window)")
    say("bye")


def answer_file(
    cm: ChatModel,
    options: GenerationOptions,
    input_path: str,
    output: TextIO,
    fmt: str = "auto",
    system: str | None = None,
    batch_size: int = 8,
) -> dict[str, int]:
    """One counselor reply per conversation of ``input_path`` (each must end with a client turn).

    Writes ``{"id", "reply", "dropped_exchanges"}`` per conversation, or ``{"id", "error"}`` when the
    conversation cannot fit the context window. Bad records raise DataError naming the line.
    """
    from soulchat.data.readers import read_conversations

    conversations: list[Conversation] = list(read_conversations([input_path], fmt=fmt))
    prompts: list[list[int]] = []
    rows: list[dict[str, Any]] = []
    for conv in conversations:
        where = conv.source or conv.id
        turns = list(conv.turns)
        if turns[-1].role != "client":
            raise DataError(
                f"{where}: the conversation ends with a {turns[-1].role} turn; --input conversations must "
                "end with the client's message that the counselor should answer",
                reason="no_client_turn_last",
                where=where,
            )
        if system and turns[0].role != "system":
            turns = [Turn("system", system), *turns]
        check_no_control_tokens(cm, turns, where)
        row: dict[str, Any] = {"id": conv.id}
        try:
            prompt, dropped = fit_context(cm, turns, options.max_new_tokens, where)
        except ContextTooLong as err:
            row["error"] = str(err)
        else:
            row["dropped_exchanges"] = dropped
            row["_prompt"] = len(prompts)
            prompts.append(prompt)
        rows.append(row)
    replies = generate_replies(cm, prompts, options, batch_size)
    for row in rows:
        index = row.pop("_prompt", None)
        if index is not None:
            row = {"id": row["id"], "reply": replies[index], "dropped_exchanges": row["dropped_exchanges"]}
        output.write(json.dumps(row, ensure_ascii=False) + "\n")
    output.flush()
    return {"conversations": len(rows), "replies": len(prompts), "errors": len(rows) - len(prompts)}


# ==================================================================================================
# Command line
# ==================================================================================================


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared with soulchat.evaluate: which model, how to load it, how to prompt it."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="local Hugging Face model directory (e.g. <output-dir>/export from soulchat.train)",
    )
    parser.add_argument(
        "--template",
        choices=TEMPLATES,
        default=None,
        help="prompt format; default: the template the model was trained with (its training "
        "config), else the tokenizer's chat template (auto)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run (default: %(default)s = CUDA when available)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weights dtype (default: %(default)s = bfloat16 on CUDA, float32 on the CPU)",
    )
    parser.add_argument(
        "--max-context",
        type=int,
        default=None,
        metavar="N",
        help="context window in tokens (default: the model's max_position_embeddings, capped "
        "by the tokenizer's model_max_length)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model directory's own Python code to run (off by default)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help="longest reply in tokens (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: %(default)s)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help="sampling temperature (default: %(default)s, the paper's)",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=DEFAULT_TOP_P,
        help="nucleus sampling probability mass (default: %(default)s, the paper's)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        help="sample among the k most likely tokens, 0 = off (default: %(default)s)",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="transformers' repetition penalty, 1.0 = off (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m soulchat.chat",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument(
        "--system", default=None, help="system prompt (default: none, as in the SoulChat corpus)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prompt", default=None, metavar="TEXT", help="answer one client message and exit")
    mode.add_argument(
        "--input",
        default=None,
        metavar="FILE",
        help="answer every conversation of FILE (JSONL/JSON, any supported format, each ending "
        "with a client turn) and exit",
    )
    parser.add_argument(
        "--output",
        default="-",
        metavar="FILE",
        help="with --input: where to write the replies as JSONL (default: stdout)",
    )
    parser.add_argument(
        "--format",
        default="auto",
        help="with --input: the file's format (auto, soulchat, openai, sharegpt, smile, "
        "cpsycound, xtuner; default: detected)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="with --input: conversations generated together (default: %(default)s)",
    )
    return parser


def options_from_args(args: argparse.Namespace, do_sample: bool) -> GenerationOptions:
    return GenerationOptions(
        max_new_tokens=args.max_new_tokens,
        do_sample=do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
    )


def load_from_args(args: argparse.Namespace) -> ChatModel:
    return load_chat_model(
        args.model,
        template=args.template,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        max_context=args.max_context,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in front of the chat
    try:
        options = options_from_args(args, do_sample=not args.greedy)
        if args.input is None and args.output != "-":
            raise ValueError("--output is only used with --input")
        cm = load_from_args(args)
        torch.manual_seed(args.seed)
        if args.prompt is not None:
            turns = ([Turn("system", args.system)] if args.system else []) + [Turn("client", args.prompt)]
            check_no_control_tokens(cm, turns, "--prompt")
            prompt, _ = fit_context(cm, turns, options.max_new_tokens, "--prompt")
            print(generate_batch(cm, [prompt], options)[0], flush=True)
        elif args.input is not None:
            with contextlib.ExitStack() as stack:
                out = (
                    sys.stdout
                    if args.output == "-"
                    else stack.enter_context(open(args.output, "w", encoding="utf-8"))
                )
                counts = answer_file(cm, options, args.input, out, args.format, args.system, args.batch_size)
            print(
                f"{counts['replies']} replies to {counts['conversations']} conversations"
                + (f", {counts['errors']} did not fit the context window" if counts["errors"] else ""),
                file=sys.stderr,
            )
        else:
            interactive(cm, options, args.system)
    except (DataError, TemplateError, ContextTooLong, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
