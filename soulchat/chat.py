"""Talk to a counselor model: ``python -m soulchat.chat --model DIR``.

Modes:
  interactive (default)   multi-turn chat in the terminal, the reply streamed token by token;
                          /reset starts over, /exit (or Ctrl-D) quits, Ctrl-C stops a reply
  --prompt TEXT           one counselor reply to TEXT, printed to stdout
  --input F --output G    F: one conversation per line (any format soulchat's readers accept, e.g.
                          {"messages": [{"role": "user", "content": ...}, ...]}) ending with the
                          client's turn; G: one JSON object per line {"id", "reply"} (or {"id", "error"}),
                          written as the replies are generated. --on-error raise (default) stops at the
                          first bad record, naming its file:line, after writing every reply before it;
                          --on-error skip writes {"id", "error"} for it (or, for a line that is not a
                          record at all, counts it by reason) and goes on.

Loading, template choice, context fitting and generation are soulchat.inference's: the prompt is
rendered exactly as in training with the template the model was trained with. Models load from local
directories only (never downloaded); ``--trust-remote-code`` is off by default. Text that is not valid
Unicode (invalid UTF-8 bytes on the command line or on stdin, a lone surrogate escape in a record) is
reported, never sent to the tokenizer; an empty message generates nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TextIO

from soulchat.cli import exit_on_option_error, require_output_file, run_cli
from soulchat.commandline import Command, ConfigError, Section, check_types, option
from soulchat.data.conversation import Conversation, DataError, Turn
from soulchat.dataspec import ON_ERROR
from soulchat.inference import (
    MODEL_SECTION,
    ON_ERROR_HELP,
    ContextTooLong,
    InferenceConfig,
    LoadedModel,
    check_no_control_tokens,
    check_text,
    fit_context,
    generate_batch,
    generate_replies,
    load_from_options,
)
from soulchat.options import DataConfig, GenerationConfig, TrainConfig

SAFETY_NOTE = (
    "Note: you are talking to an AI language model, not a counsellor. It can be wrong and it is no "
    "replacement for professional help. If you are in crisis or thinking about harming yourself, "
    "contact your local emergency number or a crisis hotline now.\n"
    "提示：这是一个AI语言模型，不是心理咨询师，可能出错，不能替代专业的心理咨询或医疗帮助。"
    "如果你正处于危机中或有伤害自己的想法，请立即拨打当地急救电话或心理危机干预热线。"
)
HELP = "commands: /reset (start a new conversation), /exit or /quit (leave; Ctrl-D too), /help"
# With --input, replies are generated from a pool of this many batches at a time, sorted by length
# within the pool (less padding), and written before the next pool is read.
POOL_BATCHES = 8


class EmptyMessage(ValueError):
    """A message with no text (empty or whitespace only): nothing to answer."""


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

    def __init__(self, lm: LoadedModel, options: GenerationConfig, system: str | None = None) -> None:
        self.lm = lm
        self.options = options
        self.system = [Turn("system", system)] if system and system.strip() else []
        check_text(self.system, "--system")
        check_no_control_tokens(lm, self.system, "--system")
        self.history: list[Turn] = []

    def reset(self) -> None:
        self.history = []

    def check(self, message: str) -> None:
        """Raises EmptyMessage or ValueError (invalid text, a control token) for a message not to send."""
        if not message.strip():
            raise EmptyMessage("your message is empty: type what you want to say")
        turn = [Turn("client", message)]
        check_text(turn, "your message")
        check_no_control_tokens(self.lm, turn, "your message")

    def respond(
        self,
        message: str,
        on_text: Callable[[str], None] | None = None,
        stop_event: threading.Event | None = None,
    ) -> Reply:
        """The counselor's reply to ``message``; with ``on_text``, the text is streamed to it as it comes.

        Raises EmptyMessage, ContextTooLong / ValueError (invalid text, control tokens) without changing
        the history.
        """
        self.check(message)
        turns = self.system + self.history + [Turn("client", message)]
        prompt, dropped = fit_context(self.lm, turns, self.options.max_new_tokens, "your message")
        if on_text is None:
            text = generate_batch(self.lm, [prompt], self.options, stop_event=stop_event)[0]
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

        streamer = TextIteratorStreamer(self.lm.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["text"] = generate_batch(self.lm, [prompt], self.options, streamer, stop_event)[0]
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
    lm: LoadedModel, options: GenerationConfig, system: str | None, stdout: TextIO | None = None
) -> None:
    """Read messages with input() until /exit or end of input; stream each reply to ``stdout``."""
    stdout = stdout if stdout is not None else sys.stdout  # looked up now: tests and callers redirect it
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    if hasattr(sys.stdin, "reconfigure"):
        # Invalid UTF-8 bytes on stdin become lone surrogates (reported by ChatSession.check) instead of
        # a UnicodeDecodeError inside input() that would end the session.
        sys.stdin.reconfigure(errors="surrogateescape")

    def say(text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=stdout, flush=True)

    say(
        f"soulchat — {lm.path} (template {lm.template!r} from {lm.template_source}; "
        f"context {lm.context_window} tokens)"
    )
    say(SAFETY_NOTE)
    say(HELP)
    session = ChatSession(lm, options, system)
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
        try:
            session.check(message)
        except ValueError as err:
            say(f"(error: {err})")
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


def conversation_turns(lm: LoadedModel, conv: Conversation, system: str | None) -> list[Turn]:
    """The turns of an --input conversation to answer; DataError naming its file:line when it cannot be."""
    where = conv.source or conv.id
    turns = list(conv.turns)
    if turns[-1].role != "client":
        raise DataError(
            f"{where}: the conversation ends with a {turns[-1].role} turn; --input conversations must "
            "end with the client's message that the counselor should answer (or pass --on-error skip)",
            reason="no_client_turn_last",
            where=where,
        )
    if system and turns[0].role != "system":
        turns = [Turn("system", system), *turns]
    try:
        check_text(turns, where)
        check_no_control_tokens(lm, turns, where)
    except ValueError as err:
        reason = "invalid_text" if "not valid text" in str(err) else "control_token"
        raise DataError(f"{err} (or pass --on-error skip)", reason=reason, where=where) from None
    return turns


class _ReplyWriter:
    """Rows of --output in input order; replies are generated a pool at a time and written at once."""

    def __init__(self, lm: LoadedModel, options: GenerationConfig, output: TextIO, batch_size: int) -> None:
        self.lm, self.options, self.output, self.batch_size = lm, options, output, batch_size
        self.rows: list[tuple[dict[str, Any], list[int] | None]] = []
        self.prompts = 0
        self.counts: Counter = Counter()

    def add(self, row: dict[str, Any], prompt: list[int] | None = None) -> None:
        self.rows.append((row, prompt))
        if prompt is not None:
            self.prompts += 1
            if self.prompts >= self.batch_size * POOL_BATCHES:
                self.flush()

    def flush(self) -> None:
        prompts = [p for _, p in self.rows if p is not None]
        replies = iter(generate_replies(self.lm, prompts, self.options, self.batch_size))
        for row, prompt in self.rows:
            if prompt is not None:
                row = {"id": row["id"], "reply": next(replies), "dropped_exchanges": row["dropped_exchanges"]}
                self.counts["replies"] += 1
            self.output.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.output.flush()
        self.rows, self.prompts = [], 0


def answer_file(
    lm: LoadedModel,
    options: GenerationConfig,
    input_path: str,
    output: TextIO,
    fmt: str = "auto",
    system: str | None = None,
    batch_size: int = 8,
    on_error: str = "raise",
) -> dict[str, int]:
    """One counselor reply per conversation of ``input_path`` (each must end with a client turn).

    Writes ``{"id", "reply", "dropped_exchanges"}`` per conversation, or ``{"id", "error"}`` when it cannot
    fit the context window (or, with ``on_error="skip"``, is bad: ends with the counselor, holds a control
    token or invalid text), as the replies are generated. With ``on_error="raise"`` the first bad record
    raises DataError naming its file:line, after every reply before it has been written. Returns counts:
    conversations, replies, errors (context too long), skipped (by reason under ``skipped_<reason>``).
    """
    from soulchat.data.readers import read_conversations

    if on_error not in ON_ERROR:
        raise ValueError(f"--on-error {on_error!r}: choose one of {ON_ERROR}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    reader_drops: Counter = Counter()
    writer = _ReplyWriter(lm, options, output, batch_size)
    counts = writer.counts
    try:
        for conv in read_conversations([input_path], fmt=fmt, on_error=on_error, counter=reader_drops):
            counts["conversations"] += 1
            try:
                turns = conversation_turns(lm, conv, system)
            except DataError as err:
                if on_error == "raise":
                    raise
                counts[f"skipped_{err.reason}"] += 1
                writer.add({"id": conv.id, "error": str(err)})
                continue
            try:
                prompt, dropped = fit_context(lm, turns, options.max_new_tokens, conv.source or conv.id)
            except ContextTooLong as err:
                counts["errors"] += 1
                writer.add({"id": conv.id, "error": str(err)})
            else:
                writer.add({"id": conv.id, "dropped_exchanges": dropped}, prompt)
    except DataError:
        writer.flush()  # every reply before the bad record is kept
        raise
    writer.flush()
    for reason, n in reader_drops.items():
        counts[f"skipped_{reason}"] += n
    counts["skipped"] = sum(n for key, n in counts.items() if key.startswith("skipped_"))
    return {"conversations": 0, "replies": 0, "errors": 0, **counts}


def summary_line(counts: dict[str, int]) -> str:
    parts = [f"{counts['replies']} replies to {counts['conversations']} conversations"]
    if counts["errors"]:
        parts.append(f"{counts['errors']} did not fit the context window")
    if counts.get("skipped"):
        reasons = ", ".join(
            f"{key.removeprefix('skipped_')} {n}"
            for key, n in sorted(counts.items())
            if key.startswith("skipped_")
        )
        parts.append(f"{counts['skipped']} records skipped ({reasons})")
    return ", ".join(parts)


# ==================================================================================================
# Command line
# ==================================================================================================


@dataclass
class ChatConfig:
    """What ``python -m soulchat.chat`` alone needs: the mode and its files."""

    section: ClassVar[str] = "chat"

    system: str | None = option("system prompt; unset = none, as in the SoulChat corpus", None)
    prompt: str | None = option("answer one client message and exit", None)
    input: str | None = option(
        "answer every conversation of this file (JSONL/JSON, any supported format, each ending with a client "
        "turn) and exit",
        None,
    )
    output: str = option("with --input: where to write the replies as JSONL; - = stdout", "-")

    def __post_init__(self) -> None:
        check_types(self)
        if self.prompt is not None and self.input is not None:
            raise ConfigError("--prompt and --input are two modes: pass one of them")
        if self.input is None and self.output != "-":
            raise ConfigError("--output is only used with --input")
        require_output_file(self.output, "--output", "replies.jsonl")


CHAT = Command(
    "python -m soulchat.chat",
    __doc__,
    [
        MODEL_SECTION,
        InferenceConfig,
        Section(TrainConfig, only=("device",),
                help={"device": "where to generate: auto = CUDA when available"}),
        Section(GenerationConfig, aliases={"do_sample": (("--greedy", False),)}),
        Section(DataConfig, only=("format", "on_error"), help={"on_error": ON_ERROR_HELP}),
        ChatConfig,
    ],
)


def build_parser() -> argparse.ArgumentParser:
    return CHAT.parser()


def answer_prompt(lm: LoadedModel, options: GenerationConfig, text: str, system: str | None) -> str:
    """--prompt: the reply to one client message."""
    if not text.strip():
        raise EmptyMessage("--prompt is empty: pass the client's message")
    turns = ([Turn("system", system)] if system else []) + [Turn("client", text)]
    check_text(turns, "--prompt")
    check_no_control_tokens(lm, turns, "--prompt")
    prompt, _ = fit_context(lm, turns, options.max_new_tokens, "--prompt")
    return generate_batch(lm, [prompt], options)[0]


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, or 2 after one line on stderr (--debug shows the traceback)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    options = exit_on_option_error(lambda: CHAT.parse(argv), argv)
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in front of the chat
    gen: GenerationConfig = options["generation"]
    mode: ChatConfig = options["chat"]
    lm = load_from_options(options)
    torch.manual_seed(gen.seed)
    if mode.prompt is not None:
        print(answer_prompt(lm, gen, mode.prompt, mode.system), flush=True)
    elif mode.input is not None:
        data: DataConfig = options["data"]
        with contextlib.ExitStack() as stack:
            out = (
                sys.stdout
                if mode.output == "-"
                else stack.enter_context(open(mode.output, "w", encoding="utf-8"))
            )
            counts = answer_file(
                lm, gen, mode.input, out, data.format, mode.system, gen.batch_size, data.on_error
            )
        print(summary_line(counts), file=sys.stderr)
    else:
        interactive(lm, gen, mode.system)
    return 0


if __name__ == "__main__":
    sys.exit(main())
