"""Conversations -> token ids, trained flags and loss weights: the public rendering API.

The pieces live in their own modules: soulchat/data/chat_template.py (the tokenizer's chat template,
rendered), templates.py (the templates and counselor spans), plans.py (a template probed and validated
for one tokenizer), encode.py (tokenization with offsets and the token mask), windows.py (splitting
over-long conversations). This module renders, masks and weights.

Render modes (``render_mode``, ``--render-mode``)
-------------------------------------------------
- ``"conversation"``: one sequence per conversation, every counselor turn trained at once (a causal
  model gives each turn the same loss as its own sample, reading the conversation once). Exact only for a
  prefix-stable template: each turn renders the same whatever follows it. A template that rewrites
  history is refused (TemplateError naming ``--render-mode per-turn``).
- ``"per-turn"``: the paper's one-sample-per-turn layout. Counselor turn i becomes its own sequence:
  ``apply_chat_template(turns[:i], add_generation_prompt=True)`` (what the model sees at inference, and
  what ``render_prompt`` returns) followed by the reply and its end marker; only that reply is trained.
  Each sample is verified: the prompt must be a prefix of the template's render of ``turns[:i + 1]`` and
  the reply must follow it, otherwise TemplateError naming the conversation. Costs more tokens (about
  (T+1)/2 times for T turns; 2.3x on the bundled corpus), reported by prepare.
- ``"auto"`` (default): conversation when the template is prefix-stable on the probes (plain and with
  ``<think>`` reasoning, each with and without a system prompt), per-turn otherwise (Qwen3's think blocks,
  templates that strip reasoning from past replies or move the system prompt, generation prompts that
  open a think block the rendered reply lacks). ``resolve_render_mode`` says which.

What is trained
---------------
Every character the model generates after the inference prompt ``apply_chat_template(turns[:i],
add_generation_prompt=True, enable_thinking=...)``: the reply's reasoning (a ``<think>...</think>``
prefix of the counselor text; readers put a record's ``reasoning_content`` there, and templates that
render a message's ``reasoning_content`` get it back in that field), the closing
``</think>`` and the separator after it, the reply, and the end-of-turn marker right after it (eos,
``<|im_end|>``, ``<|eot_id|>``, ...). With thinking on and no reasoning in the data, that includes the
template's empty think block (``--thinking off`` leaves it in the prompt instead). Whitespace between the
prompt and the content (" " in Llama-2-style ``[/INST] reply``) is trained too. Never role headers, client
turns, system prompts, or the whitespace a template puts between turns. See templates.reply_completion
for templates whose prompt opens a think block that the rendered reply lacks (DeepSeek-R1, QwQ,
DeepSeek-V3.1 with thinking on). Turns after the last counselor turn are dropped before rendering: they
would be context for nothing.

Thinking (``thinking``, ``--thinking off|on``): passed to every render as ``enable_thinking`` and
``thinking`` (the names Qwen3 / GLM-4.x and DeepSeek-V3.1 read); None renders the template's default. A
value the template cannot express is refused (TemplateError): ``on`` for a template without a thinking
mode, ``off`` for one whose prompt always opens a think block.

Loss weights (``loss_weighting``): ``"token"`` 1.0 per trained token; ``"turn"`` 1/n over the n trained
tokens of each counselor turn (each turn sums to 1); ``"conversation"`` 1/n over the n trained tokens of
the conversation (each conversation sums to 1; the windows of a split conversation sum to 1 together).

Stats keys (``render_and_tokenize(..., stats=Counter())``):
- ``rendered``: conversations taken in. Invariant: ``rendered == trained + sum(dropped:*)``.
- ``trained``: conversations that produced at least one sequence.
- ``dropped:<reason>``: conversations that produced none. Reasons: ``no_trained_tokens`` (no counselor
  turn, or none of its tokens trainable), ``too_long`` (overflow="drop"), ``turn_too_long`` (split, but
  no counselor turn fits), ``control_token_in_text`` (a turn's text contains one of the template's own
  control tokens (the special tokens its renders hold, and the tokenizer's eos, bos, pad, unk, ...), such
  as ``<|im_end|>`` under a ChatML template, which would tokenize as the control token itself; other
  special tokens of the tokenizer are text to this template and tokenize as at inference).
- ``split``: over-long conversations split into windows; ``windows``: sequences they produced.
- ``turns_dropped:turn_too_long``: counselor turns dropped because they do not fit alone.
- ``sequences``: TokenizedConversations yielded (``trained - split + windows``).
- ``tokens``, ``trained_tokens``: token totals over yielded sequences.
- ``straddling_tokens``: tokens partly inside a counselor span, left untrained (see encode.py).
- ``conversation_tokens``, ``per_turn_tokens``: over trained conversations, the tokens of the whole
  conversation and of its per-turn samples (per-turn mode: the samples yielded, and the last reply's
  sample before any shortening as the whole; conversation mode: the full render, and the tokens up to the
  end of each reply, which is what per-turn samples of a prefix-stable template hold).
- ``samples_shortened``: per-turn samples over ``max_length`` whose earliest context was cut to fit
  (overflow="split"; see windows.shorten_context). With overflow="drop" one over-long sample drops its
  conversation (``dropped:too_long``); a reply that does not fit with its own client turn counts as
  ``turns_dropped:turn_too_long``. ``split``/``windows`` stay 0 in per-turn mode.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from soulchat.data.conversation import Conversation, Turn, where
from soulchat.data.encode import Encoded
from soulchat.data.plans import RENDER_MODES, plan_for
# Re-exported: the names callers of the rendering API use (chat, evaluate, checkpoint export).
from soulchat.data.chat_template import CANONICAL_ROLE, TemplateError, thinking_value
from soulchat.data.templates import RenderedConversation, Span, builtin_chat_template
from soulchat.data.windows import shorten_context, split_windows
from soulchat.dataspec import LOSS_WEIGHTING, OVERFLOW, TEMPLATES, THINKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as HFTokenizer

__all__ = [
    "CANONICAL_ROLE", "LOSS_WEIGHTING", "OVERFLOW", "RENDER_MODES", "TEMPLATES", "THINKING",
    "BatchRenderer", "RenderedConversation", "SequenceBatch", "Span", "TemplateError",
    "TokenizedConversation",
    "builtin_chat_template", "end_marker", "render_and_tokenize", "render_conversation", "render_prompt",
    "resolve_render_mode", "thinking_value", "tokenize_conversation",
]



@dataclass
class TokenizedConversation:
    input_ids: np.ndarray  # int32 [L]
    trained: np.ndarray  # bool [L]: counselor content + end-of-turn marker tokens (targets)
    weight: np.ndarray  # float32 [L]: loss weight of each trained token, 0 elsewhere
    id: str  # the conversation id; windows of a split conversation get "#w0", "#w1", ...
    topic: str | None
    # Position of its conversation in the input of render_and_tokenize (counted from first_index), so a
    # caller maps each sequence back to the conversation that made it, whatever the ids are.
    conversation_index: int = -1


class SequenceBatch:
    """The sequences of one batch of conversations, end to end in three arrays: what prepare writes.

    input_ids int32 [N], trained bool [N], weight float32 [N] hold the sequences one after another;
    lengths int64 [S] their lengths; names, topics and conversation_index one entry per sequence.
    Iterating gives each sequence as a TokenizedConversation (views into the arrays), in order.
    """

    __slots__ = ("conversation_index", "input_ids", "lengths", "names", "topics", "trained", "weight")

    def __init__(self, input_ids: np.ndarray, trained: np.ndarray, weight: np.ndarray, lengths: np.ndarray,
                 names: list[str], topics: list[str | None], conversation_index: list[int]) -> None:
        self.input_ids, self.trained, self.weight, self.lengths = input_ids, trained, weight, lengths
        self.names, self.topics, self.conversation_index = names, topics, conversation_index

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[TokenizedConversation]:
        start = 0
        for n, name, topic, index in zip(self.lengths.tolist(), self.names, self.topics, self.conversation_index):
            end = start + n
            yield TokenizedConversation(self.input_ids[start:end], self.trained[start:end],
                                        self.weight[start:end], name, topic, index)
            start = end

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state) -> None:
        for k, v in state.items():
            setattr(self, k, v)


# ------------------------------------------------------------------------------------------------
# Public API


def _as_turns(conv_or_turns: Conversation | Sequence[Turn]) -> tuple[list[Turn], str]:
    if isinstance(conv_or_turns, Conversation):
        return list(conv_or_turns.turns), where(conv_or_turns)
    return list(conv_or_turns), "conversation"


def render_conversation(
    conv: Conversation | Sequence[Turn], tokenizer: HFTokenizer, template: str, thinking: bool | None = None
) -> RenderedConversation:
    """The rendered text of a whole conversation and its counselor spans (content + end marker)."""
    turns, name = _as_turns(conv)
    return plan_for(tokenizer, template, thinking).render(tokenizer, turns, name)


def render_prompt(
    conv_turns: Conversation | Sequence[Turn], tokenizer: HFTokenizer, template: str,
    thinking: bool | None = None,
) -> str:
    """The generation prompt for the next counselor reply after ``conv_turns`` (ending with a client turn).

    Tokenize it with ``add_special_tokens=False``. It is exactly the text that precedes that reply in
    training (for "auto" the template is checked to guarantee this), so generation sees what training saw;
    ``thinking`` must be the value training ran with (``--thinking``, recorded in the run).
    """
    turns, name = _as_turns(conv_turns)
    if not turns or turns[-1].role != "client":
        raise ValueError(f"{name}: a prompt for the counselor's reply must end with a client turn")
    return plan_for(tokenizer, template, thinking).prompt(tokenizer, turns, name)


def end_marker(tokenizer: HFTokenizer, template: str, thinking: bool | None = None) -> str:
    """The text the template puts right after a counselor reply (``<|im_end|>``, eos, ``<|eot_id|>``, ...;
    "" when none), read from the per-turn sample of a one-reply conversation (valid for every template)."""
    reply = "嗯。"
    sample = plan_for(tokenizer, template, thinking).sample(
        tokenizer, [Turn("client", "你好"), Turn("counselor", reply)], "end-marker probe")
    ((start, end),) = sample.spans
    span = sample.text[start:end]
    return span[span.rfind(reply) + len(reply) :]


def _check_options(overflow: str, loss_weighting: str, max_length: int | None) -> None:
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow={overflow!r}: choose one of {OVERFLOW}")
    if loss_weighting not in LOSS_WEIGHTING:
        raise ValueError(f"loss_weighting={loss_weighting!r}: choose one of {LOSS_WEIGHTING}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length={max_length}: must be a positive number of tokens (or None)")


def resolve_render_mode(tokenizer: HFTokenizer, template: str, render_mode: str = "auto",
                        thinking: bool | None = None) -> str:
    """The render mode ``render_and_tokenize`` uses: "conversation" or "per-turn".

    "auto" is "conversation" when the template is prefix-stable, "per-turn" otherwise; "conversation" on
    a template that rewrites the history of a plain conversation raises TemplateError (naming the fix).
    """
    return plan_for(tokenizer, template, thinking).render_mode(render_mode)


def render_and_tokenize(
    conversations: Iterable[Conversation],
    tokenizer: HFTokenizer,
    template: str,
    max_length: int | None,
    overflow: str = "split",
    loss_weighting: str = "token",
    batch_size: int = 256,
    stats: Counter | None = None,
    first_index: int = 0,
    render_mode: str = "auto",
    thinking: bool | None = None,
) -> Iterator[TokenizedConversation]:
    """Render, mask, weight and tokenize conversations (in order; the sequences of one in order).

    Tokenizes ``batch_size`` conversations per call of the fast tokenizer. Counts into ``stats`` (see the
    module docstring for the keys). Each sequence's ``conversation_index`` is ``first_index`` + the
    position of its conversation in ``conversations``. ``render_mode``: see ``resolve_render_mode``;
    ``thinking``: ``--thinking`` (None: the template's default; see the module docstring).
    Raises TemplateError when the template cannot be used.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    renderer = BatchRenderer(tokenizer, template, max_length, overflow, loss_weighting, render_mode, thinking)
    stats = Counter() if stats is None else stats
    it = enumerate(conversations, first_index)
    while batch := list(itertools.islice(it, batch_size)):
        yield from renderer(batch, stats)


def _texts(ready: list[_Ready]) -> list[str]:
    return [r.text for *_, rs in ready for r in rs]


class BatchRenderer:
    """``render_and_tokenize`` in three steps, so that a caller can tokenize one batch while it renders
    the next: ``render`` (Python: template, spans), ``encode`` (the Rust tokenizer, which releases the GIL
    and counts nothing, so it may run in another thread), ``finish`` (masks, windows, weights, counters).
    ``render`` and ``finish`` count into the ``stats`` they are given and run in the calling thread.
    """

    def __init__(self, tokenizer: HFTokenizer, template: str, max_length: int | None, overflow: str = "split",
                 loss_weighting: str = "token", render_mode: str = "auto",
                 thinking: bool | None = None) -> None:
        _check_options(overflow, loss_weighting, max_length)
        self.tokenizer = tokenizer
        self.plan = plan_for(tokenizer, template, thinking)
        self.per_turn = self.plan.render_mode(render_mode) == "per-turn"
        self.max_length, self.overflow, self.loss_weighting = max_length, overflow, loss_weighting

    def render(self, batch: Sequence[tuple[int, Conversation]], stats: Counter) -> list[_Ready]:
        """Render (index, conversation) pairs; the dropped ones are counted and left out."""
        plan, tokenizer = self.plan, self.tokenizer
        ready: list[_Ready] = []
        for index, conv in batch:
            stats["rendered"] += 1
            turns = _trim_trailing(conv.turns)
            if turns is None:
                stats["dropped:no_trained_tokens"] += 1
            elif plan.has_control_token(turns):
                stats["dropped:control_token_in_text"] += 1
            elif self.per_turn:
                ready.append((index, conv, turns, plan.samples(tokenizer, turns, where(conv))))
            else:
                ready.append((index, conv, turns, [plan.render(tokenizer, turns, where(conv))]))
        return ready

    def __call__(self, batch: Sequence[tuple[int, Conversation]], stats: Counter) -> SequenceBatch:
        """The three steps in a row, in the calling thread: (index, conversation) pairs -> sequences."""
        ready = self.render(batch, stats)
        return self.finish(ready, self.encode(ready), stats)

    def encode(self, ready: list[_Ready]):
        """Tokenize every text of a rendered batch (in order): the tokenizer's raw output, for ``finish``."""
        return self.plan.encoder.encode(self.tokenizer, _texts(ready))

    def finish(self, ready: list[_Ready], encodings, stats: Counter) -> SequenceBatch:
        """The sequences of a rendered batch from ``encode``'s output, in order."""
        out_all = _Collected(self.loss_weighting)
        spans_of = [r.spans for *_, rs in ready for r in rs]
        encoded = iter(self.plan.encoder.wrap(_texts(ready), encodings, spans_of))
        for index, conv, turns, rendered in ready:
            encodings_of = [next(encoded) for _ in rendered]
            if self.per_turn:
                sequences = _per_turn_sequences(self.plan, self.tokenizer, conv, turns, rendered, encodings_of,
                                                self.max_length, self.overflow, stats)
            else:
                sequences = _conversation_sequences(self.plan, self.tokenizer, conv, turns, rendered[0],
                                                    encodings_of[0], self.max_length, self.overflow, stats)
            if sequences is None:  # dropped, counted by reason
                continue
            windows, conversation_tokens, per_turn_tokens, was_split = sequences
            kept, kept_tokens = out_all.add(conv, index, windows, stats, "#t" if self.per_turn else "#w")
            if not kept:
                stats["dropped:no_trained_tokens"] += 1
                continue
            stats["trained"] += 1
            stats["conversation_tokens"] += conversation_tokens
            stats["per_turn_tokens"] += kept_tokens if self.per_turn else per_turn_tokens
            if was_split:
                stats["split"] += 1
                stats["windows"] += kept
        return out_all.batch()


def tokenize_conversation(
    conv: Conversation,
    tokenizer: HFTokenizer,
    template: str,
    max_length: int | None = None,
    overflow: str = "split",
    loss_weighting: str = "token",
    stats: Counter | None = None,
    render_mode: str = "auto",
    thinking: bool | None = None,
) -> list[TokenizedConversation]:
    """One conversation (for chat/evaluation): its sequences as training makes them, [] when dropped."""
    return list(render_and_tokenize([conv], tokenizer, template, max_length, overflow, loss_weighting, 1,
                                    stats, render_mode=render_mode, thinking=thinking))


# ------------------------------------------------------------------------------------------------
# Internals of render_and_tokenize


def _trim_trailing(turns: Sequence[Turn]) -> list[Turn] | None:
    """Drop turns after the last counselor turn (context for nothing); None if there is no counselor turn."""
    for last in range(len(turns) - 1, -1, -1):
        if turns[last].role == "counselor":
            return list(turns[: last + 1])
    return None


_Window = tuple[Encoded, list[Span]]  # a tokenized text and its trained spans
# A rendered conversation waiting for its tokens: (index, conversation, turns, its texts).
_Ready = tuple[int, Conversation, list[Turn], list[RenderedConversation]]


def _conversation_sequences(
    plan, tokenizer, conv: Conversation, turns: list[Turn], rendered: RenderedConversation,
    encoding: Encoded, max_length: int | None, overflow: str, stats: Counter,
) -> tuple[list[_Window], int, int, bool] | None:
    """Whole-conversation mode: the conversation, or its windows when over-long; None when dropped.

    Also the tokens of the conversation, the tokens its per-turn samples would take (a per-turn sample of a
    prefix-stable template is the render up to the end of its reply, so its length is the number of
    tokens starting before that end), and whether it was split.
    """
    per_turn_tokens = encoding.tokens_before_span_ends(rendered.spans)
    if max_length is None or len(encoding) <= max_length:
        return [(encoding, rendered.spans)], len(encoding), per_turn_tokens, False
    if overflow == "drop":
        stats["dropped:too_long"] += 1
        return None
    windows = split_windows(plan, tokenizer, conv, turns, rendered, encoding, max_length, stats)
    if not windows:
        stats["dropped:turn_too_long"] += 1
        return None
    return windows, len(encoding), per_turn_tokens, True


def _per_turn_sequences(
    plan, tokenizer, conv: Conversation, turns: list[Turn], samples: list[RenderedConversation],
    encodings: list[Encoded], max_length: int | None, overflow: str, stats: Counter,
) -> tuple[list[_Window], int, int, bool] | None:
    """Per-turn mode: one sample per counselor turn (its context shortened when over-long); None when dropped.

    Also the tokens of the conversation (the sample of the last reply, before any shortening, is the
    whole conversation as the template renders it at its end), 0 (counted from the samples) and False.
    """
    counselor_at = [i for i, t in enumerate(turns) if t.role == "counselor"]
    windows: list[_Window] = []
    for i, sample, encoded in zip(counselor_at, samples, encodings):
        if max_length is None or len(encoded) <= max_length:
            windows.append((encoded, sample.spans))
            continue
        if overflow == "drop":
            stats["dropped:too_long"] += 1
            return None
        shortened = shorten_context(plan, tokenizer, conv, turns[: i + 1], max_length, sample, encoded)
        if shortened is None:
            stats["turns_dropped:turn_too_long"] += 1
            continue
        stats["samples_shortened"] += 1
        windows.append(shortened)
    if not windows:
        stats["dropped:turn_too_long"] += 1
        return None
    return windows, len(encodings[-1]), 0, False


class _Collected:
    """The sequences of a batch as they are masked, conversation by conversation; ``batch`` joins them
    and computes every loss weight at once (``loss_weighting``, see the module docstring)."""

    def __init__(self, loss_weighting: str) -> None:
        self.loss_weighting = loss_weighting
        self.ids: list[np.ndarray] = []
        self.trained: list[np.ndarray] = []
        self.span_index: list[np.ndarray] = []  # "turn": each token's span in its window, -1 outside
        self.n_spans: list[int] = []  # "turn": spans per window
        self.totals: list[int] = []  # "conversation": trained tokens of each window's conversation
        self.names: list[str] = []
        self.topics: list[str | None] = []
        self.index: list[int] = []

    def add(self, conv: Conversation, index: int, windows: list[_Window], stats: Counter,
            suffix: str = "#w") -> tuple[int, int]:
        """Mask the sequences of one conversation (one, its windows or its per-turn samples); those with a
        trained token are kept. Returns (sequences kept, their tokens)."""
        masked = []
        straddling_tokens = 0
        for encoded, spans in windows:
            trained, span_index, straddling = encoded.mask(spans)
            straddling_tokens += straddling
            n_trained = int(np.count_nonzero(trained))
            if n_trained:
                masked.append((encoded.ids, trained, span_index, len(spans), n_trained))
        if straddling_tokens:
            stats["straddling_tokens"] += straddling_tokens
        if not masked:
            return 0, 0
        total = sum(m[4] for m in masked)
        tokens = 0
        for w, (ids, trained, span_index, n_spans, _) in enumerate(masked):
            self.ids.append(ids)
            self.trained.append(trained)
            if self.loss_weighting == "turn":
                self.span_index.append(span_index)
                self.n_spans.append(n_spans)
            if self.loss_weighting == "conversation":
                self.totals.append(total)
            self.names.append(conv.id if len(windows) == 1 else f"{conv.id}{suffix}{w}")
            self.topics.append(conv.topic)
            self.index.append(index)
            tokens += len(ids)
        stats["sequences"] += len(masked)
        stats["tokens"] += tokens
        stats["trained_tokens"] += total
        return len(masked), tokens

    def batch(self) -> SequenceBatch:
        lengths = np.fromiter(map(len, self.ids), dtype=np.int64, count=len(self.ids))
        if not self.ids:
            return SequenceBatch(np.zeros(0, np.int32), np.zeros(0, bool), np.zeros(0, np.float32), lengths,
                                 [], [], [])
        ids = np.concatenate(self.ids, dtype=np.int32)
        trained = np.concatenate(self.trained)
        if self.loss_weighting == "token":
            weight = trained.astype(np.float32)
        elif self.loss_weighting == "turn":
            # 1/n over the n trained tokens of each span, spans numbered across the batch.
            first = np.zeros(len(self.n_spans), dtype=np.int64)
            np.cumsum(self.n_spans[:-1], out=first[1:])
            span = (np.concatenate(self.span_index) + np.repeat(first, lengths))[trained]
            per_span = np.bincount(span, minlength=int(first[-1]) + self.n_spans[-1])
            weight = np.zeros(len(ids), dtype=np.float32)
            weight[trained] = 1.0 / per_span[span]
        else:
            per_token = (1.0 / np.asarray(self.totals, dtype=np.float64)).astype(np.float32)
            weight = np.where(trained, np.repeat(per_token, lengths), np.float32(0.0))
        return SequenceBatch(ids, trained, weight, lengths, self.names, self.topics, self.index)
