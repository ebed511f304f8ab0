"""Templates: how a conversation becomes text, and where its counselor replies lie in that text.

- ``"auto"``: the tokenizer's own chat template, through ``tokenizer.apply_chat_template``.
- ``"soulchat"``: the paper's plain format for base models. Turns are joined by "\\n" as ``用户：<client>``
  and ``心理咨询师：<counselor>`` (full-width colons); every counselor turn ends with the tokenizer's eos
  token, which is trained so the model learns to stop; a system prompt, if any, is the first line.
- ``"chatml"``: ``<|im_start|>role\\ncontent<|im_end|>\\n`` with roles system/user/assistant; the
  tokenizer must know ``<|im_start|>`` and ``<|im_end|>`` as single tokens.
Canonical roles map as client -> "user", counselor -> "assistant". The built-in templates start with
the bos token exactly when the tokenizer itself adds one (``add_special_tokens=True``).

Counselor spans of a chat template, without ``{% generation %}`` markers (HF's assistant mask silently
returns all zeros for templates such as Qwen2.5's): for counselor turn ``i`` the text ``P_i`` =
render(turns[:i], add_generation_prompt=True, thinking flags) is exactly what the model sees at
inference, and ``S_i`` = render(turns[:i + 1]). The span is ``S_i[len(P_i):]`` up to the end of the
reply's end marker (``reply_completion``): everything the model generates after the prompt, reasoning and
think block included. The rendering must be consistent: ``S_i`` starts with ``P_i``, the full text
starts with ``S_i``, and the content appears in between; otherwise TemplateError.

A template that is not prefix-stable fails the check "the full text starts with ``S_i``"
(``RewritesHistory``), as does one whose ``P_i`` opens a think block that ``S_i`` lacks (DeepSeek-R1
distills, QwQ); it is trained per turn instead (``reply_completion`` on each sample, see
soulchat/data/render.py). ``--thinking`` reaches the template as ``thinking_flags``.

Constant pieces (``TemplatePieces``: header / separator / end-marker strings) define the built-in
templates and are learnt from a chat template's renders of the probe conversations (``learn_pieces``),
so that most conversations need a single template render (soulchat/data/plans.py decides when to trust
them).

The tokenizer's chat template itself is rendered by soulchat/data/chat_template.py (``apply_template``,
with its verified fast render); this module builds on it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from soulchat.data.chat_template import (
    CANONICAL_ROLE,
    TEMPLATE_FIX,
    TemplateError,
    apply_template,
    first_difference,
)
from soulchat.data.conversation import THINK_CLOSE, THINK_OPEN, DataError, Turn, split_reasoning
from soulchat.dataspec import TEMPLATES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as HFTokenizer

SOULCHAT_CLIENT = "用户："
SOULCHAT_COUNSELOR = "心理咨询师："
PER_TURN_FIX = "pass --render-mode per-turn (each reply trained in the exact context it is generated in)"

Span = tuple[int, int]  # [start, end) character offsets into the rendered text


class RewritesHistory(TemplateError):
    """The template is not prefix-stable: a turn renders differently once later turns follow.

    Whole-conversation rendering cannot train such a template exactly; per-turn rendering can.
    """


@dataclass
class RenderedConversation:
    text: str
    spans: list[Span]  # one per counselor turn, in order: content + end-of-turn marker


# ------------------------------------------------------------------------------------------------
# Constant pieces of a template: the built-in templates are defined by them; a chat template is probed
# into them so that most conversations need a single template render.


@dataclass(frozen=True)
class TemplatePieces:
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
) -> TemplatePieces:
    # Every turn renders as prefix + content + suffix + after; turns are joined by `joiner`.
    roles = tuple(CANONICAL_ROLE)
    return TemplatePieces(
        head={r: bos + prefix[r] for r in roles},
        sep={(a, b): suffix[a] + after + joiner + prefix[b] for a in roles for b in roles},
        tail={r: suffix[r] + after for r in roles},
        gen={r: suffix[r] + after + joiner + prefix["counselor"] for r in roles},
        lead=0,
        end_marker=suffix["counselor"],
    )


def spans_by_prefixes(
    tokenizer: HFTokenizer, turns: Sequence[Turn], full: str, where: str, thinking: bool | None = None,
    reasoning_field: bool = False,
) -> list[Span]:
    """Counselor spans of ``full`` from prefix renders (the ground truth, 2 renders per counselor turn)."""
    spans: list[Span] = []
    for i, turn in enumerate(turns):
        if turn.role != "counselor":
            continue
        require_context(i, where)
        prompt = apply_template(tokenizer, turns[:i], True, where, thinking, reasoning_field)
        upto = apply_template(tokenizer, turns[: i + 1], False, where, thinking, reasoning_field)
        text, span = reply_completion(prompt, upto, turn.text, i, where)
        if not upto.startswith(text):
            raise RewritesHistory(
                f"{where}: the chat template's generation prompt opens a think block that its render of "
                f"counselor turn {i} does not hold (prompt ends {prompt[-40:]!r}, the turn renders as "
                f"{upto[max(0, span[0] - 40) :][:80]!r}), as DeepSeek-R1 distills and QwQ do: the reply the "
                f"model generates after that prompt is trained only per turn; {PER_TURN_FIX}"
            )
        if not full.startswith(upto):
            cut = first_difference(full, upto)
            raise RewritesHistory(
                f"{where}: the chat template renders inconsistently: it rewrites earlier turns once later "
                f"turns follow (e.g. it strips reasoning from past replies, or renders the last reply "
                f"differently); counselor turn {i} reads {upto[max(0, cut - 30) :][:60]!r} alone but "
                f"{full[max(0, cut - 30) :][:60]!r} in the whole conversation. Training on it would teach a "
                f"context the model never sees at inference; {PER_TURN_FIX}, or {TEMPLATE_FIX}"
            )
        spans.append(span)
    return spans


def require_context(i: int, where: str) -> None:
    if i == 0:
        raise DataError(
            f"{where}: counselor turn {i} has no client turn before it; run validate_conversation()",
            reason="starts_with_counselor",
            where=where,
        )


# ------------------------------------------------------------------------------------------------
# Reasoning and the trained completion of a reply

THINKING_FIX = (
    "pass --thinking on (the generation prompt then leaves the model to reason), or remove the reasoning"
)


def reply_completion(prompt: str, upto: str, text: str, i: int, where: str) -> tuple[str, Span]:
    """Counselor turn ``i`` as one trained sample: (the generation prompt then every character the model
    generates after it, the trained span of that text).

    ``prompt`` is the generation prompt rendered from the turns before it (exactly what the model sees at
    inference) and ``upto`` the render up to and with that turn. Everything after the prompt is trained:
    the reasoning, the closing ``</think>`` and the template's separator after it (a template's empty think
    block when the reply has no reasoning and thinking is on), the reply, and its end marker (the turn
    closer, without the whitespace between turns). When the template renders the reply after the prompt,
    that is the template's text. When the prompt opens a think block that the render of the reply lacks
    (DeepSeek-R1 distills and QwQ strip reasoning from every reply; DeepSeek-V3.1 renders replies after an
    empty ``</think>``), the model's own text is put together: the reasoning, then ``</think>`` as the
    template renders it (V3.1), or ``"\n</think>\n\n"`` after an opener that ends in a newline (the form
    R1 and QwQ generate), then the reply as the template renders it.
    """
    reasoning, content = split_reasoning(text)
    if not content.strip():
        raise DataError(
            f"{where}: counselor turn {i} holds reasoning and no reply after </think>; "
            "add the reply or drop the record",
            reason="empty_content",
            where=where,
        )
    if upto.startswith(prompt):
        end = len(prompt) + _reply_end(upto[len(prompt) :], text, reasoning, content, i, where)
        return upto[:end], (len(prompt), end)
    opener = _opened_think(prompt, upto)
    if opener is None:
        if reasoning is not None:
            raise TemplateError(
                f"{where}: counselor turn {i} holds reasoning, but the chat template's generation prompt "
                f"for it ends {prompt[-40:]!r} and does not lead into it (thinking is off); {THINKING_FIX}"
            )
        raise TemplateError(
            f"{where}: the chat template renders inconsistently: the conversation up to counselor "
            f"turn {i} does not start with the generation prompt for that turn (prompt ends "
            f"{prompt[-60:]!r}, the turn renders as {upto[max(0, len(prompt) - 60) :][:80]!r})."
            f" Training text would differ from what the model sees at inference; {TEMPLATE_FIX}"
        )
    rest = upto[len(prompt) - len(opener) :]
    if rest.startswith(THINK_CLOSE):
        generated = (reasoning or "") + rest
    else:
        # The template renders no think block here, so its whitespace before the reply (R1 keeps the
        # "\n\n" after "</think>" of the data) belongs to the closer written here.
        closer = "\n" + THINK_CLOSE + "\n\n" if opener.endswith("\n") else THINK_CLOSE
        generated = (reasoning or "") + closer + rest.lstrip()
    end = _reply_end(generated, text, None, content, i, where, skip=len(reasoning or "") + len(THINK_CLOSE))
    return prompt + generated[:end], (len(prompt), len(prompt) + end)


def _opened_think(prompt: str, upto: str) -> str | None:
    """The think opener that ends ``prompt`` (``"<think>"`` and the whitespace after it) when the render of
    the turn has everything before it, else None."""
    at = prompt.rfind(THINK_OPEN)
    after = prompt[at + len(THINK_OPEN) :]
    if at < 0 or (after and not after.isspace()):
        return None
    return prompt[at:] if upto.startswith(prompt[:at]) else None


def _reply_end(delta: str, text: str, reasoning: str | None, content: str, i: int, where: str,
               skip: int = 0) -> int:
    """Where the trained completion ``delta`` (the text after the prompt) ends: after the reply's content
    and its end marker. The reasoning, when there is some, must lie in it before the content."""
    at = delta.find(text, skip)
    if at >= 0:
        size = len(text)
    else:
        if reasoning:
            found = delta.find(reasoning.strip(), skip)
            if found < 0:
                raise TemplateError(
                    f"{where}: the chat template drops the reasoning of counselor turn {i} from the reply it "
                    f"renders after the generation prompt ({delta[:80]!r}), so it cannot be trained; "
                    f"{THINKING_FIX}"
                )
            skip = found + len(reasoning.strip())
        at, size = delta.find(content, skip), len(content)
        if at < 0:
            content = content.strip()  # templates often trim message content
            at, size = delta.find(content, skip), len(content)
        if at < 0:
            raise TemplateError(
                f"{where}: the chat template changes the text of counselor turn {i} (rendered as "
                f"{delta[:80]!r}); the trained span cannot be located. {TEMPLATE_FIX}"
            )
    marker = delta[at + size :].rstrip()  # the turn closer, not the whitespace between turns
    return at + size + len(marker)


def learn_pieces(
    tokenizer: HFTokenizer, probes: Sequence[Sequence[Turn]], spans_of: list[list[Span]]
) -> TemplatePieces | None:
    """Constant pieces that rebuild the probe renders exactly; None when the template is not that simple."""
    head: dict[str, str] = {}
    sep: dict[tuple[str, str], str] = {}
    tail: dict[str, str] = {}
    leads: set[int] = set()
    markers: set[str] = set()

    def put(table: dict, key, value: str) -> bool:
        return table.setdefault(key, value) == value

    for turns, spans in zip(probes, spans_of):
        full = apply_template(tokenizer, turns, False, "probe")
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
    return TemplatePieces(head=head, sep=sep, tail=tail, gen={}, lead=leads.pop(), end_marker=marker)


def _bos_prefix(tokenizer: HFTokenizer) -> str:
    """The bos text when the tokenizer adds bos by itself (then the built-in templates write it)."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if bos is None or bos_id is None:
        return ""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    added = len(with_special) - len(without)
    return bos if added > 0 and with_special[0] == bos_id and without[:1] != [bos_id] else ""


def special_strings(tokenizer: HFTokenizer) -> list[str]:
    strings = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            strings.add(getattr(tok, "content", str(tok)))
    return sorted((s for s in strings if s), key=len, reverse=True)


def single_token_id(tokenizer: HFTokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


@dataclass(frozen=True)
class BuiltinFormat:
    """A built-in template: each turn is prefix + content + suffix + after; turns joined by joiner."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    joiner: str
    after: str
    bos: str

    def pieces(self) -> TemplatePieces:
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


def builtin_format(tokenizer: HFTokenizer, template: str) -> BuiltinFormat:
    if template == "soulchat":
        eos = getattr(tokenizer, "eos_token", None)
        if not eos or single_token_id(tokenizer, eos) is None:
            raise TemplateError(
                "template 'soulchat' ends every counselor turn with the tokenizer's eos token, but this "
                "tokenizer has no eos token (or it is not a single token): set tokenizer.eos_token"
            )
        prefix = {"system": "", "client": SOULCHAT_CLIENT, "counselor": SOULCHAT_COUNSELOR}
        suffix = {"system": "", "client": "", "counselor": eos}
        return BuiltinFormat(prefix, suffix, joiner="\n", after="", bos=_bos_prefix(tokenizer))
    if template == "chatml":
        for marker in ("<|im_start|>", "<|im_end|>"):
            if single_token_id(tokenizer, marker) is None:
                raise TemplateError(
                    f"template 'chatml' needs {marker} as one token, but this tokenizer splits it into "
                    f"several: use --template soulchat for a base model, or add the chatml tokens to the "
                    f"tokenizer (and resize the model's embeddings)"
                )
        prefix = {r: f"<|im_start|>{CANONICAL_ROLE[r]}\n" for r in CANONICAL_ROLE}
        suffix = {r: "<|im_end|>" for r in CANONICAL_ROLE}
        return BuiltinFormat(prefix, suffix, joiner="", after="\n", bos=_bos_prefix(tokenizer))
    raise TemplateError(f"unknown built-in template {template!r}: choose one of {TEMPLATES[1:]}")


def builtin_chat_template(tokenizer: HFTokenizer, template: str) -> str:
    """The Jinja chat template that renders exactly like the built-in ``template`` for this tokenizer.

    For exporting a fine-tuned model: ``tokenizer.chat_template = builtin_chat_template(tok, "soulchat")``
    makes ``apply_chat_template(..., add_generation_prompt=True)`` produce the prompt format trained on
    (bos included when the tokenizer adds one by itself).
    """
    if template not in ("soulchat", "chatml"):
        raise TemplateError(f"builtin_chat_template: {template!r} is not a built-in (soulchat, chatml)")
    return builtin_format(tokenizer, template).jinja()



def default_template(tokenizer) -> str:
    """"auto" (the tokenizer's own chat template) when it has one, else the paper's "soulchat" format."""
    return "auto" if getattr(tokenizer, "chat_template", None) else "soulchat"
