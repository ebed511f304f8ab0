"""Conversations -> rendered text with counselor character spans -> token ids, trained flags, loss weights.

Templates
---------
- ``"auto"``: the tokenizer's own chat template, through ``tokenizer.apply_chat_template``.
- ``"soulchat"``: the paper's plain format for base models. Turns are joined by "\\n" as ``用户：<client>``
  and ``心理咨询师：<counselor>`` (full-width colons); every counselor turn ends with the tokenizer's eos
  token, which is trained so the model learns to stop; a system prompt, if any, is the first line.
- ``"chatml"``: ``<|im_start|>role\\ncontent<|im_end|>\\n`` with roles system/user/assistant; the
  tokenizer must know ``<|im_start|>`` and ``<|im_end|>`` as single tokens.
Canonical roles map as client -> "user", counselor -> "assistant". The built-in templates start with
the bos token exactly when the tokenizer itself adds one (``add_special_tokens=True``); the rendered
text is always tokenized with ``add_special_tokens=False``, as ``apply_chat_template`` does, so a chat
template that writes its own bos gets exactly one.

What is trained
---------------
The counselor's content and the end-of-turn marker right after it (eos, ``<|im_end|>``, ``<|eot_id|>``,
...). Never role headers, client turns, system prompts, or the whitespace a template puts between turns.
Whitespace that a template puts between the generation prompt and the content (" " in Llama-2-style
``[/INST] reply``) is trained too: it is not part of the prompt, so the model has to produce it.

The counselor mask works for any chat template, without ``{% generation %}`` markers (HF's assistant
mask silently returns all zeros for templates such as Qwen2.5's). For counselor turn ``i`` the text
``P_i`` = render(turns[:i], add_generation_prompt=True) is exactly what the model sees at inference, and
``S_i`` = render(turns[:i + 1]). The counselor span is ``S_i[len(P_i):]`` minus anything before the
content and minus trailing whitespace. The rendering must be consistent: ``S_i`` starts with ``P_i``, the
full text starts with ``S_i``, and the content appears in between; otherwise TemplateError (templates
that rewrite earlier turns, e.g. strip reasoning from past replies, train on a context the model never
sees at inference). Rendering these prefixes costs ``2 x counselor turns`` template renders, so for each
tokenizer the template is probed once and "compiled" into constant pieces (header / separator / end
marker strings): a conversation is then rendered once by the template and once by the pieces, and only
when the two differ (a template that trims content, say) does it take the prefix path. The first
conversations and then one in 512 are also checked against the prefix path. (Measured on the sample
corpus, 7 turns per conversation, with a Qwen2.5-style template: about 1.0 ms per conversation with
the pieces against 5.5 ms through prefix renders; the built-in templates take 0.03 ms.)
Turns after the last counselor turn are dropped before rendering: they would be context for nothing.

Token rule at span edges: a token is trained iff its character range lies inside a counselor span.
A token straddling a span edge (a byte-level BPE merge of the header's last character with the first
character of the reply, for example) is not trained, so a header character is never a target; such
tokens are counted as ``stats["straddling_tokens"]`` (0 for the usual chat templates, whose headers end
in a special token or a newline).

Loss weights (``loss_weighting``): ``"token"`` 1.0 per trained token; ``"turn"`` 1/n over the n trained
tokens of each counselor turn (each turn sums to 1); ``"conversation"`` 1/n over the n trained tokens of
the conversation (each conversation sums to 1; the windows of a split conversation sum to 1 together).

Over-long conversations (more than ``max_length`` tokens) are never cut silently:
``overflow="split"`` cuts at turn boundaries into windows. Each window starts at a client turn, ends after
a counselor turn, and trains the counselor turns not trained by an earlier window (each counselor turn is
trained in exactly one window). It trains as many turns as fit, keeps the system prompt when it fits, then
keeps as much preceding context (untrained) as fits. Training turns comes first, so windows are few
(about total tokens / max_length) and a window's first trained reply sees only the context left over.
A counselor turn that does not fit even with just its own client turn is dropped (and counted).
``overflow="drop"`` drops the conversation. Window lengths are measured exactly (render + tokenize).

Stats keys (``render_and_tokenize(..., stats=Counter())``):
- ``rendered``: conversations taken in. Invariant: ``rendered == trained + sum(dropped:*)``.
- ``trained``: conversations that produced at least one sequence.
- ``dropped:<reason>``: conversations that produced none. Reasons: ``no_trained_tokens`` (no counselor
  turn, or none of its tokens trainable), ``too_long`` (overflow="drop"), ``turn_too_long`` (split, but
  no counselor turn fits), ``control_token_in_text`` (a turn's text contains a special-token string such
  as ``<|im_end|>``, which would tokenize as the control token itself).
- ``split``: over-long conversations split into windows; ``windows``: sequences they produced.
- ``turns_dropped:turn_too_long``: counselor turns dropped because they do not fit alone.
- ``sequences``: TokenizedConversations yielded (``trained - split + windows``).
- ``tokens``, ``trained_tokens``: token totals over yielded sequences.
- ``straddling_tokens``: tokens partly inside a counselor span, left untrained (see the token rule).
"""

from __future__ import annotations

import itertools
import json
import re
import warnings
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from soulchat.data.conversation import Conversation, DataError, Turn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as HFTokenizer

TEMPLATES = ("auto", "soulchat", "chatml")
OVERFLOW = ("split", "drop")
LOSS_WEIGHTING = ("token", "turn", "conversation")
CANONICAL_ROLE = {"system": "system", "client": "user", "counselor": "assistant"}

SOULCHAT_CLIENT = "用户："
SOULCHAT_COUNSELOR = "心理咨询师："
_TEMPLATE_FIX = "pass --template chatml or --template soulchat, or fix the tokenizer's chat template"
_SPOT_CHECK_FIRST = 16  # conversations checked against the prefix path before trusting the pieces
_SPOT_CHECK_EVERY = 512

Span = tuple[int, int]  # [start, end) character offsets into the rendered text


class TemplateError(ValueError):
    """The chosen template cannot render conversations consistently for this tokenizer."""


@dataclass
class TokenizedConversation:
    input_ids: np.ndarray  # int32 [L]
    trained: np.ndarray  # bool [L]: counselor content + end-of-turn marker tokens (targets)
    weight: np.ndarray  # float32 [L]: loss weight of each trained token, 0 elsewhere
    id: str  # the conversation id; windows of a split conversation get "#w0", "#w1", ...
    topic: str | None


@dataclass
class RenderedConversation:
    text: str
    spans: list[Span]  # one per counselor turn, in order: content + end-of-turn marker


# ------------------------------------------------------------------------------------------------
# Constant pieces of a template: the built-in templates are defined by them; a chat template is probed
# into them so that most conversations need a single template render.


@dataclass(frozen=True)
class _Pieces:
    head: dict[str, str]  # text before the first turn's content, by the first turn's role
    sep: dict[tuple[str, str], str]  # text between two contents, by (previous role, next role)
    tail: dict[str, str]  # text after the last content, by the last role
    gen: dict[str, str]  # text after the last content in a generation prompt, by the last role
    lead: int  # trained characters before each counselor content (template whitespace)
    end_marker: str  # trained text right after each counselor content

    def build(self, turns: Sequence[Turn]) -> RenderedConversation | None:
        """The rendered text and counselor spans, or None when a needed piece is unknown."""
        parts: list[str] = []
        spans: list[Span] = []
        pos = 0
        previous = None
        for turn in turns:
            piece = self.head.get(turn.role) if previous is None else self.sep.get((previous, turn.role))
            if piece is None:
                return None
            parts.append(piece)
            pos += len(piece)
            if turn.role == "counselor":
                spans.append((pos - self.lead, pos + len(turn.text) + len(self.end_marker)))
            parts.append(turn.text)
            pos += len(turn.text)
            previous = turn.role
        last = self.tail.get(previous) if previous is not None else None
        if last is None:
            return None
        parts.append(last)
        return RenderedConversation("".join(parts), spans)

    def prompt(self, turns: Sequence[Turn]) -> str | None:
        built = self.build(turns)
        gen = self.gen.get(turns[-1].role)
        if built is None or gen is None:
            return None
        return built.text[: len(built.text) - len(self.tail[turns[-1].role])] + gen


def _builtin_pieces(
    prefix: dict[str, str], suffix: dict[str, str], joiner: str, after: str, bos: str
) -> _Pieces:
    # Every turn renders as prefix + content + suffix + after; turns are joined by `joiner`.
    roles = tuple(CANONICAL_ROLE)
    return _Pieces(
        head={r: bos + prefix[r] for r in roles},
        sep={(a, b): suffix[a] + after + joiner + prefix[b] for a in roles for b in roles},
        tail={r: suffix[r] + after for r in roles},
        gen={r: suffix[r] + after + joiner + prefix["counselor"] for r in roles},
        lead=0,
        end_marker=suffix["counselor"],
    )


# Probe conversations: short distinct contents without surrounding whitespace (so trimming templates
# render them verbatim), with and without a system prompt, three counselor turns each.
_PROBE_SYSTEM = Turn("system", "你是一位温暖的心理咨询师。")
_PROBE_DIALOGUE = [
    Turn("client", "我最近总是失眠。"),
    Turn("counselor", "听起来你最近很辛苦，能多说说吗？"),
    Turn("client", "工作压力很大。"),
    Turn("counselor", "我理解这种压力。"),
    Turn("client", "谢谢你听我说。"),
    Turn("counselor", "不客气，我一直都在。"),
]
_PROBES = ([*_PROBE_DIALOGUE], [_PROBE_SYSTEM, *_PROBE_DIALOGUE])


# ------------------------------------------------------------------------------------------------
# Tokenization with character offsets


class _Encoder:
    """Batched tokenization with untrimmed character offsets, add_special_tokens=False.

    Uses a private copy of the fast tokenizer's Rust backend without its post-processor: with
    add_special_tokens=False a post-processor adds no tokens, but a ByteLevel one trims the offsets of
    " word" tokens to "word", which would hide a header space inside a counselor span. The copy also has
    truncation and padding off whatever the tokenizer was last called with. Its ids are checked against
    ``tokenizer(text, add_special_tokens=False)`` on the probes; on any difference the tokenizer itself
    is used instead.
    """

    def __init__(self, tokenizer: HFTokenizer) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not getattr(tokenizer, "is_fast", True):
            raise TemplateError(
                f"{type(tokenizer).__name__} is not a fast (Rust `tokenizers`) tokenizer; rendering needs "
                "character offsets: load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
            )
        from tokenizers import Tokenizer

        self.raw = Tokenizer.from_str(backend.to_str())
        self.raw.post_processor = None
        self.raw.no_truncation()
        self.raw.no_padding()
        self.use_raw = True

    def __call__(self, tokenizer: HFTokenizer, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        # ids: int32 [L]; offsets: int64 [L, 2]
        if not texts:
            return []
        if self.use_raw:
            encs = self.raw.encode_batch(texts, add_special_tokens=False)
            return [
                (np.asarray(e.ids, dtype=np.int32), np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2))
                for e in encs
            ]
        out = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=False)
        return [
            (np.asarray(ids, dtype=np.int32), np.asarray(offs, dtype=np.int64).reshape(-1, 2))
            for ids, offs in zip(out["input_ids"], out["offset_mapping"])
        ]

    def check_against(self, tokenizer: HFTokenizer, texts: list[str]) -> None:
        for text, (ids, _) in zip(texts, self(tokenizer, texts)):
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids.tolist() != list(expected):
                self.use_raw = False
                return


def _mask(offsets: np.ndarray, spans: Sequence[Span]) -> tuple[np.ndarray, np.ndarray, int]:
    """Which tokens lie inside a span, and which span: (trained bool [L], span index int64 [L], straddling).

    offsets: [L, 2] character ranges; spans sorted and disjoint.
    """
    n = offsets.shape[0]
    if not spans or n == 0:
        return np.zeros(n, dtype=bool), np.full(n, -1, dtype=np.int64), 0
    starts, ends = offsets[:, 0], offsets[:, 1]
    span_arr = np.asarray(spans, dtype=np.int64)  # [K, 2]
    k = np.searchsorted(span_arr[:, 0], starts, side="right") - 1  # last span starting at or before
    kk = np.maximum(k, 0)
    s, e = span_arr[kk, 0], span_arr[kk, 1]
    inside = (k >= 0) & (starts >= s) & (ends <= e) & (starts < e)
    # Straddling: overlaps some span without lying inside it. A token can only overlap span kk or the
    # next one (spans are disjoint and sorted by start).
    nxt = np.minimum(k + 1, len(spans) - 1)
    overlaps = ((k >= 0) & (starts < e) & (ends > s)) | ((k + 1 < len(spans)) & (ends > span_arr[nxt, 0]))
    straddling = int(np.count_nonzero(overlaps & ~inside))
    return inside, np.where(inside, k, -1), straddling


# ------------------------------------------------------------------------------------------------
# A template bound to one tokenizer: rendering, prompt, tokenization, validated once


@dataclass
class _Plan:
    template: str
    encoder: _Encoder
    pieces: _Pieces | None  # None: render every conversation through the prefix path
    control_re: re.Pattern[str] | None  # special-token strings that must not occur in turn text
    system_error: TemplateError | None = None  # raised when a conversation has a system turn
    rendered_fast: int = 0  # conversations rendered by the pieces (drives the spot checks)

    # -- rendering --------------------------------------------------------------------------------

    def render(self, tokenizer: HFTokenizer, turns: Sequence[Turn], where: str) -> RenderedConversation:
        if self.system_error is not None and turns and turns[0].role == "system":
            raise TemplateError(f"{where}: {self.system_error}")
        if self.template != "auto":
            built = self.pieces.build(turns)
            assert built is not None  # built-in pieces know every role pair
            return built
        full = _apply(tokenizer, turns, False, where)
        built = self.pieces.build(turns) if self.pieces is not None else None
        if built is not None and built.text == full:
            self.rendered_fast += 1
            n = self.rendered_fast
            if n <= _SPOT_CHECK_FIRST or n % _SPOT_CHECK_EVERY == 0:
                spans = _spans_by_prefixes(tokenizer, turns, full, where)
                if spans != built.spans:
                    self.pieces = None
                    warnings.warn(
                        f"{where}: the chat template's constant pieces disagree with its prefix renders; "
                        "rendering every conversation through the (slower) prefix path from now on",
                        stacklevel=3,
                    )
                    return RenderedConversation(full, spans)
            return built
        return RenderedConversation(full, _spans_by_prefixes(tokenizer, turns, full, where))

    def prompt(self, tokenizer: HFTokenizer, turns: Sequence[Turn], where: str) -> str:
        if self.system_error is not None and turns and turns[0].role == "system":
            raise TemplateError(f"{where}: {self.system_error}")
        if self.template == "auto":
            return _apply(tokenizer, turns, True, where)
        text = self.pieces.prompt(turns)
        assert text is not None
        return text

    def has_control_token(self, turns: Sequence[Turn]) -> bool:
        return self.control_re is not None and any(self.control_re.search(t.text) for t in turns)


def _messages(turns: Sequence[Turn]) -> list[dict[str, str]]:
    return [{"role": CANONICAL_ROLE[t.role], "content": t.text} for t in turns]


def _apply(tokenizer: HFTokenizer, turns: Sequence[Turn], generation_prompt: bool, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(
            _messages(turns), tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja's raise_exception(), a missing template, ...
        raise TemplateError(
            f"{where}: the tokenizer's chat template failed: {type(exc).__name__}: {exc}. {_TEMPLATE_FIX}"
        ) from exc
    if not isinstance(text, str):
        raise TemplateError(f"{where}: apply_chat_template(tokenize=False) returned {type(text).__name__}")
    return text


def _spans_by_prefixes(tokenizer: HFTokenizer, turns: Sequence[Turn], full: str, where: str) -> list[Span]:
    """Counselor spans of ``full`` from prefix renders (the ground truth, 2 renders per counselor turn)."""
    spans: list[Span] = []
    for i, turn in enumerate(turns):
        if turn.role != "counselor":
            continue
        if i == 0:
            raise DataError(
                f"{where}: counselor turn {i} has no client turn before it; run validate_conversation()",
                reason="starts_with_counselor",
                where=where,
            )
        prompt = _apply(tokenizer, turns[:i], True, where)
        upto = _apply(tokenizer, turns[: i + 1], False, where)
        if not upto.startswith(prompt):
            raise TemplateError(
                f"{where}: the chat template renders inconsistently: the conversation up to counselor "
                f"turn {i} does not start with the generation prompt for that turn (prompt ends "
                f"{prompt[-60:]!r}, the turn renders as {upto[max(0, len(prompt) - 60) :][:80]!r})."
                f" Training text would differ from what the model sees at inference; {_TEMPLATE_FIX}"
            )
        if not full.startswith(upto):
            cut = next((j for j, (a, b) in enumerate(zip(full, upto)) if a != b), min(len(full), len(upto)))
            raise TemplateError(
                f"{where}: the chat template renders inconsistently: it rewrites earlier turns once later "
                f"turns follow (e.g. it strips reasoning from past replies, or renders the last reply "
                f"differently); counselor turn {i} reads {upto[max(0, cut - 30) :][:60]!r} alone but "
                f"{full[max(0, cut - 30) :][:60]!r} in the whole conversation. Training on it would teach a "
                f"context the model never sees at inference; {_TEMPLATE_FIX}"
            )
        delta = upto[len(prompt) :]
        content = turn.text
        if delta.startswith(content):
            at, size = 0, len(content)
        else:
            at, size = delta.find(content), len(content)
            if at < 0:
                content = content.strip()  # templates often trim message content
                at, size = delta.find(content), len(content)
            if at < 0:
                raise TemplateError(
                    f"{where}: the chat template changes the text of counselor turn {i} (rendered as "
                    f"{delta[:80]!r}); the trained span cannot be located. {_TEMPLATE_FIX}"
                )
        lead = len(delta[:at]) - len(delta[:at].rstrip())  # whitespace after the prompt is generated too
        marker = delta[at + size :].rstrip()  # the turn closer, not the whitespace between turns
        start = len(prompt) + at
        spans.append((start - lead, start + size + len(marker)))
    return spans


def _learn_pieces(
    tokenizer: HFTokenizer, probes: Sequence[Sequence[Turn]], spans_of: list[list[Span]]
) -> _Pieces | None:
    """Constant pieces that rebuild the probe renders exactly; None when the template is not that simple."""
    head: dict[str, str] = {}
    sep: dict[tuple[str, str], str] = {}
    tail: dict[str, str] = {}
    leads: set[int] = set()
    markers: set[str] = set()

    def put(table: dict, key, value: str) -> bool:
        return table.setdefault(key, value) == value

    for turns, spans in zip(probes, spans_of):
        full = _apply(tokenizer, turns, False, "probe")
        cursor, previous, span_iter = 0, None, iter(spans)
        for turn in turns:
            at = full.find(turn.text, cursor)
            if at < 0:
                return None
            ok = put(head, turn.role, full[:at]) if previous is None else put(
                sep, (previous.role, turn.role), full[cursor:at]
            )
            if not ok:
                return None  # the piece depends on the position (e.g. round numbers)
            if turn.role == "counselor":
                start, end = next(span_iter)
                leads.add(at - start)
                markers.add(full[at + len(turn.text) : end])
            cursor, previous = at + len(turn.text), turn
        if not put(tail, previous.role, full[cursor:]):
            return None
    if len(leads) != 1 or len(markers) != 1:
        return None
    marker = markers.pop()
    closers = [v for (a, _), v in sep.items() if a == "counselor"] + [tail.get("counselor", "")]
    if not all(c.startswith(marker) for c in closers):
        return None
    return _Pieces(head=head, sep=sep, tail=tail, gen={}, lead=leads.pop(), end_marker=marker)


def _bos_prefix(tokenizer: HFTokenizer) -> str:
    """The bos text when the tokenizer adds bos by itself (then the built-in templates write it)."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if bos is None or bos_id is None:
        return ""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    added = len(with_special) - len(without)
    return bos if added > 0 and with_special[0] == bos_id and without[:1] != [bos_id] else ""


def _special_strings(tokenizer: HFTokenizer) -> list[str]:
    strings = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            strings.add(getattr(tok, "content", str(tok)))
    return sorted((s for s in strings if s), key=len, reverse=True)


def _single_token_id(tokenizer: HFTokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


@dataclass(frozen=True)
class _BuiltinFormat:
    """A built-in template: each turn is prefix + content + suffix + after; turns joined by joiner."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    joiner: str
    after: str
    bos: str

    def pieces(self) -> _Pieces:
        return _builtin_pieces(self.prefix, self.suffix, self.joiner, self.after, self.bos)

    def jinja(self) -> str:
        """The same rendering as a chat template (string literals as JSON, which Jinja reads the same)."""

        def out(text: str) -> str:
            return "{{ " + json.dumps(text) + " }}"

        def by_role(table: dict[str, str]) -> str:
            return (
                "{% if m['role'] == 'system' %}" + out(table["system"])
                + "{% elif m['role'] == 'user' %}" + out(table["client"])
                + "{% else %}" + out(table["counselor"]) + "{% endif %}"
            )

        return (
            out(self.bos)
            + "{% for m in messages %}{% if not loop.first %}" + out(self.joiner) + "{% endif %}"
            + by_role(self.prefix) + "{{ m['content'] }}" + by_role(self.suffix) + out(self.after)
            + "{% endfor %}{% if add_generation_prompt %}"
            + "{% if messages %}" + out(self.joiner) + "{% endif %}" + out(self.prefix["counselor"])
            + "{% endif %}"
        )


def _builtin_format(tokenizer: HFTokenizer, template: str) -> _BuiltinFormat:
    if template == "soulchat":
        eos = getattr(tokenizer, "eos_token", None)
        if not eos or _single_token_id(tokenizer, eos) is None:
            raise TemplateError(
                "template 'soulchat' ends every counselor turn with the tokenizer's eos token, but this "
                "tokenizer has no eos token (or it is not a single token): set tokenizer.eos_token"
            )
        prefix = {"system": "", "client": SOULCHAT_CLIENT, "counselor": SOULCHAT_COUNSELOR}
        suffix = {"system": "", "client": "", "counselor": eos}
        return _BuiltinFormat(prefix, suffix, joiner="\n", after="", bos=_bos_prefix(tokenizer))
    if template == "chatml":
        for marker in ("<|im_start|>", "<|im_end|>"):
            if _single_token_id(tokenizer, marker) is None:
                raise TemplateError(
                    f"template 'chatml' needs {marker} as one token, but this tokenizer splits it into "
                    f"several: use --template soulchat for a base model, or add the chatml tokens to the "
                    f"tokenizer (and resize the model's embeddings)"
                )
        prefix = {r: f"<|im_start|>{CANONICAL_ROLE[r]}\n" for r in CANONICAL_ROLE}
        suffix = {r: "<|im_end|>" for r in CANONICAL_ROLE}
        return _BuiltinFormat(prefix, suffix, joiner="", after="\n", bos=_bos_prefix(tokenizer))
    raise TemplateError(f"unknown built-in template {template!r}: choose one of {TEMPLATES[1:]}")


def _build_plan(tokenizer: HFTokenizer, template: str) -> _Plan:
    encoder = _Encoder(tokenizer)
    specials = _special_strings(tokenizer)
    control_re = re.compile("|".join(map(re.escape, specials))) if specials else None
    system_error = None
    if template in ("soulchat", "chatml"):
        pieces = _builtin_format(tokenizer, template).pieces()
    elif template == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "template 'auto' uses the tokenizer's chat template, but this tokenizer has none: "
                "pass --template soulchat (base models) or --template chatml"
            )
        spans_of: list[list[Span]] = []
        probes: list[list[Turn]] = []
        for probe in _PROBES:
            try:
                full = _apply(tokenizer, probe, False, "probe conversation")
                spans_of.append(_spans_by_prefixes(tokenizer, probe, full, "probe conversation"))
                probes.append(probe)
            except TemplateError as exc:
                if probe[0].role != "system":
                    raise
                system_error = TemplateError(
                    f"the chat template cannot render a conversation with a system prompt consistently "
                    f"({exc}); drop system prompts from the data, or {_TEMPLATE_FIX}"
                )
        pieces = _learn_pieces(tokenizer, probes, spans_of)
    else:
        raise TemplateError(f"unknown template {template!r}: choose one of {TEMPLATES}")

    plan = _Plan(template, encoder, pieces, control_re, system_error)
    _validate_plan(tokenizer, plan, specials)
    return plan


def _validate_plan(tokenizer: HFTokenizer, plan: _Plan, specials: list[str]) -> None:
    """Tokenize the probes: control tokens must survive as single tokens, bos must not double."""
    probes = [p for p in _PROBES if plan.system_error is None or p[0].role != "system"]
    rendered = [plan.render(tokenizer, p, "probe conversation") for p in probes]
    texts = [r.text for r in rendered]
    plan.encoder.check_against(tokenizer, texts)
    plan.rendered_fast = 0  # the probes do not count towards the spot checks of real conversations
    for r, (ids, offsets) in zip(rendered, plan.encoder(tokenizer, texts)):
        for special in specials:
            n_text = r.text.count(special)
            if n_text == 0:
                continue
            sid = _single_token_id(tokenizer, special)
            n_ids = int(np.count_nonzero(ids == sid)) if sid is not None else 0
            if n_ids != n_text:
                raise TemplateError(
                    f"template {plan.template!r}: the rendered text holds {special!r} {n_text} times but "
                    f"tokenizes to that token {n_ids} times; the tokenizer does not read the template's "
                    f"control tokens back as tokens (is tokenizer.split_special_tokens set?). {_TEMPLATE_FIX}"
                )
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
            raise TemplateError(f"template {plan.template!r}: the rendered text starts with two bos tokens")
        trained, _, straddling = _mask(offsets, r.spans)
        if not trained.any():
            raise TemplateError(f"template {plan.template!r}: no counselor token is trained on a probe")
        if straddling:
            warnings.warn(
                f"template {plan.template!r}: {straddling} tokens of a probe conversation straddle the edge "
                "of a counselor reply (the tokenizer merges header and reply characters); they are not "
                "trained. Counted as stats['straddling_tokens'].",
                stacklevel=4,
            )
    marker = plan.pieces.end_marker if plan.pieces is not None else None
    if marker == "":
        warnings.warn(
            f"template {plan.template!r} puts no end-of-turn marker after counselor replies: the model "
            "will not learn when to stop",
            stacklevel=4,
        )


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan_for(tokenizer: HFTokenizer, template: str) -> _Plan:
    """The plan for (tokenizer, template), built and validated once (again if the chat template changes)."""
    if template not in TEMPLATES:
        raise TemplateError(f"unknown template {template!r}: choose one of {TEMPLATES}")
    key = (template, str(getattr(tokenizer, "chat_template", None)) if template == "auto" else "")
    try:
        per_tok = _PLANS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache
        return _build_plan(tokenizer, template)
    plan = per_tok.get(key)
    if plan is None:
        plan = per_tok[key] = _build_plan(tokenizer, template)
    return plan


# ------------------------------------------------------------------------------------------------
# Public API


def _where(conv: Conversation) -> str:
    return f"conversation {conv.id!r}" + (f" ({conv.source})" if conv.source else "")


def _as_turns(conv_or_turns: Conversation | Sequence[Turn]) -> tuple[list[Turn], str]:
    if isinstance(conv_or_turns, Conversation):
        return list(conv_or_turns.turns), _where(conv_or_turns)
    return list(conv_or_turns), "conversation"


def render_conversation(
    conv: Conversation | Sequence[Turn], tokenizer: HFTokenizer, template: str
) -> RenderedConversation:
    """The rendered text of a whole conversation and its counselor spans (content + end marker)."""
    turns, where = _as_turns(conv)
    return _plan_for(tokenizer, template).render(tokenizer, turns, where)


def render_prompt(
    conv_turns: Conversation | Sequence[Turn], tokenizer: HFTokenizer, template: str
) -> str:
    """The generation prompt for the next counselor reply after ``conv_turns`` (ending with a client turn).

    Tokenize it with ``add_special_tokens=False``. It is exactly the text that precedes that reply in
    training (for "auto" the template is checked to guarantee this), so generation sees what training saw.
    """
    turns, where = _as_turns(conv_turns)
    if not turns or turns[-1].role != "client":
        raise ValueError(f"{where}: a prompt for the counselor's reply must end with a client turn")
    return _plan_for(tokenizer, template).prompt(tokenizer, turns, where)


def builtin_chat_template(tokenizer: HFTokenizer, template: str) -> str:
    """The Jinja chat template that renders exactly like the built-in ``template`` for this tokenizer.

    For exporting a fine-tuned model: ``tokenizer.chat_template = builtin_chat_template(tok, "soulchat")``
    makes ``apply_chat_template(..., add_generation_prompt=True)`` produce the prompt format trained on
    (bos included when the tokenizer adds one by itself).
    """
    if template not in ("soulchat", "chatml"):
        raise TemplateError(f"builtin_chat_template: {template!r} is not a built-in (soulchat, chatml)")
    return _builtin_format(tokenizer, template).jinja()


def _check_options(overflow: str, loss_weighting: str, max_length: int | None) -> None:
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow={overflow!r}: choose one of {OVERFLOW}")
    if loss_weighting not in LOSS_WEIGHTING:
        raise ValueError(f"loss_weighting={loss_weighting!r}: choose one of {LOSS_WEIGHTING}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length={max_length}: must be a positive number of tokens (or None)")


def render_and_tokenize(
    conversations: Iterable[Conversation],
    tokenizer: HFTokenizer,
    template: str,
    max_length: int | None,
    overflow: str = "split",
    loss_weighting: str = "token",
    batch_size: int = 256,
    stats: Counter | None = None,
) -> Iterator[TokenizedConversation]:
    """Render, mask, weight and tokenize conversations (in order; windows of a split one in order).

    Tokenizes ``batch_size`` conversations per call of the fast tokenizer. Counts into ``stats`` (see the
    module docstring for the keys). Raises TemplateError when the template cannot be used.
    """
    _check_options(overflow, loss_weighting, max_length)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    stats = Counter() if stats is None else stats
    plan = _plan_for(tokenizer, template)
    it = iter(conversations)
    while batch := list(itertools.islice(it, batch_size)):
        ready: list[tuple[Conversation, list[Turn], RenderedConversation]] = []
        for conv in batch:
            stats["rendered"] += 1
            turns = _trim_trailing(conv.turns)
            if turns is None:
                stats["dropped:no_trained_tokens"] += 1
            elif plan.has_control_token(turns):
                stats["dropped:control_token_in_text"] += 1
            else:
                ready.append((conv, turns, plan.render(tokenizer, turns, _where(conv))))
        encoded = plan.encoder(tokenizer, [r.text for _, _, r in ready])
        for (conv, turns, rendered), (ids, offsets) in zip(ready, encoded):
            was_split = max_length is not None and len(ids) > max_length
            if not was_split:
                windows = [(ids, offsets, rendered.spans)]
            elif overflow == "drop":
                stats["dropped:too_long"] += 1
                continue
            else:
                windows = _split(plan, tokenizer, conv, turns, rendered, offsets, max_length, stats)
                if not windows:
                    stats["dropped:turn_too_long"] += 1
                    continue
            out = _finish(conv, windows, loss_weighting, stats)
            if not out:
                stats["dropped:no_trained_tokens"] += 1
                continue
            stats["trained"] += 1
            if was_split:
                stats["split"] += 1
                stats["windows"] += len(out)
            yield from out


def tokenize_conversation(
    conv: Conversation,
    tokenizer: HFTokenizer,
    template: str,
    max_length: int | None = None,
    overflow: str = "split",
    loss_weighting: str = "token",
    stats: Counter | None = None,
) -> list[TokenizedConversation]:
    """One conversation (for chat/evaluation): its sequence, its windows when split, [] when dropped."""
    return list(
        render_and_tokenize([conv], tokenizer, template, max_length, overflow, loss_weighting, 1, stats)
    )


# ------------------------------------------------------------------------------------------------
# Internals of render_and_tokenize


def _trim_trailing(turns: Sequence[Turn]) -> list[Turn] | None:
    """Drop turns after the last counselor turn (context for nothing); None if there is no counselor turn."""
    for last in range(len(turns) - 1, -1, -1):
        if turns[last].role == "counselor":
            return list(turns[: last + 1])
    return None


def _finish(
    conv: Conversation,
    windows: list[tuple[np.ndarray, np.ndarray, list[Span]]],
    loss_weighting: str,
    stats: Counter,
) -> list[TokenizedConversation]:
    """Masks and weights for the sequences of one conversation (one, or its windows)."""
    masked = []
    for ids, offsets, spans in windows:
        trained, span_index, straddling = _mask(offsets, spans)
        stats["straddling_tokens"] += straddling
        if trained.any():
            masked.append((ids, trained, span_index, len(spans)))
    total = sum(int(np.count_nonzero(t)) for _, t, _, _ in masked)
    out = []
    for w, (ids, trained, span_index, n_spans) in enumerate(masked):
        if loss_weighting == "token":
            weight = trained.astype(np.float32)
        elif loss_weighting == "turn":
            per_turn = np.bincount(span_index[trained], minlength=n_spans)  # trained tokens per turn
            weight = np.zeros(len(ids), dtype=np.float32)
            weight[trained] = 1.0 / per_turn[span_index[trained]]
        else:
            weight = np.where(trained, np.float32(1.0 / total), np.float32(0.0)).astype(np.float32)
        name = conv.id if len(windows) == 1 else f"{conv.id}#w{w}"
        out.append(TokenizedConversation(ids, trained, weight, name, conv.topic))
        stats["sequences"] += 1
        stats["tokens"] += len(ids)
        stats["trained_tokens"] += int(np.count_nonzero(trained))
    return out


def _split(
    plan: _Plan,
    tokenizer: HFTokenizer,
    conv: Conversation,
    turns: list[Turn],
    rendered: RenderedConversation,
    offsets: np.ndarray,
    max_length: int,
    stats: Counter,
) -> list[tuple[np.ndarray, np.ndarray, list[Span]]]:
    """Windows of an over-long conversation, each <= max_length tokens, as (ids, offsets, trained spans).

    A unit is a counselor turn with the client turn(s) before it. Window (a, b) holds units a..b (plus the
    system prompt when kept) and trains units first..b, where first is the first unit not yet trained.
    Every length is measured exactly (render + tokenize); per-unit token counts of the whole conversation
    only guess where to start looking, so few windows are measured.
    """
    where = _where(conv)
    system = [turns[0]] if turns[0].role == "system" else []
    body = turns[len(system) :]
    unit_bounds: list[tuple[int, int]] = []  # [start, end) turn indices into body
    start = 0
    for i, turn in enumerate(body):
        if turn.role == "counselor":
            unit_bounds.append((start, i + 1))
            start = i + 1
    m = len(unit_bounds)

    # Token count of each unit in the whole rendering: tokens starting between the end of the previous
    # counselor span and the end of this one (the first unit also holds the system prompt and head).
    cuts = np.array([0] + [e for _, e in rendered.spans[:-1]] + [len(rendered.text)], dtype=np.int64)
    per_unit = np.diff(np.searchsorted(offsets[:, 0], cuts, side="left"))
    cum = np.concatenate([[0], np.cumsum(per_unit)])

    def estimate(a: int, b: int) -> int:
        return int(cum[b + 1] - cum[a])

    measured: dict[tuple[int, int, bool], tuple[np.ndarray, np.ndarray, RenderedConversation]] = {}

    def measure(a: int, b: int, with_system: bool):
        key = (a, b, with_system)
        if key not in measured:
            window = (system if with_system else []) + body[unit_bounds[a][0] : unit_bounds[b][1]]
            r = plan.render(tokenizer, window, f"{where} window of turns {a}..{b}")
            ids, offs = plan.encoder(tokenizer, [r.text])[0]
            measured[key] = (ids, offs, r)
        return measured[key]

    def fits(a: int, b: int, with_system: bool) -> bool:
        return len(measure(a, b, with_system)[0]) <= max_length

    def largest(lo: int, hi: int, guess: int, ok) -> int:
        """The largest x in [lo, hi] with ok(x), given ok(lo) and ok monotone (true then false)."""
        x = min(max(guess, lo), hi)
        if ok(x):
            while x < hi and ok(x + 1):
                x += 1
            return x
        x -= 1
        while x > lo and not ok(x):
            x -= 1
        return x

    windows = []
    first = 0
    while first < m:
        with_system = bool(system) and fits(first, first, True)
        if not with_system and not fits(first, first, False):
            stats["turns_dropped:turn_too_long"] += 1
            first += 1
            continue
        # Overhead of a window starting here (headers, system prompt) beyond the unit estimates.
        overhead = len(measure(first, first, with_system)[0]) - estimate(first, first)
        guess_b = first
        while guess_b + 1 < m and estimate(first, guess_b + 1) + overhead <= max_length:
            guess_b += 1
        b = largest(first, m - 1, guess_b, lambda x: fits(first, x, with_system))
        guess_ctx = 0
        while guess_ctx < first and estimate(first - guess_ctx - 1, b) + overhead <= max_length:
            guess_ctx += 1
        ctx = largest(0, first, guess_ctx, lambda c: fits(first - c, b, with_system))
        ids, offs, r = measure(first - ctx, b, with_system)
        windows.append((ids, offs, r.spans[ctx:]))  # context units' spans are not trained
        first = b + 1
    return windows
