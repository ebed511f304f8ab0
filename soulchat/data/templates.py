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
render(turns[:i], add_generation_prompt=True) is exactly what the model sees at inference, and ``S_i`` =
render(turns[:i + 1]). The span is ``S_i[len(P_i):]`` minus anything before the content and minus
trailing whitespace (``_spans_by_prefixes``). The rendering must be consistent: ``S_i`` starts with
``P_i``, the full text starts with ``S_i``, and the content appears in between; otherwise TemplateError.

A template that is not prefix-stable fails the check "the full text starts with ``S_i``"
(``RewritesHistory``); it is trained per turn instead (``reply_span`` on each sample, see
soulchat/data/render.py).

Constant pieces (``_Pieces``: header / separator / end-marker strings) define the built-in templates and
are learnt from a chat template's renders of the probe conversations (``_learn_pieces``), so that most
conversations need a single template render (soulchat/data/plans.py decides when to trust them).

Chat templates are rendered by calling the compiled Jinja template directly (``_FastRender``), with
exactly what ``apply_chat_template`` passes it (the messages, tools/documents None, add_generation_prompt,
the special tokens map through transformers' ``_plain_template_data``): its per-call bookkeeping cost
more than the render itself (20k SoulChatCorpus-shaped conversations, bundled tokenizer: 1.87 s through
``apply_chat_template``, 0.73 s direct, the same text). It is kept exact three ways: it is used only when
transformers' private helpers import and the template is a string; when built (once per tokenizer and
template string) it must equal ``apply_chat_template`` on every prefix of the probe conversations, with
and without the generation prompt, raising when that raises, or it is not used for that tokenizer; and
the first 16 calls, then one in 512, are also rendered by ``apply_chat_template``, a difference raising
RuntimeError (a bug in the fast render, and earlier conversations may be affected).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from soulchat.data.conversation import DataError, Turn
from soulchat.dataspec import TEMPLATES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as HFTokenizer

CANONICAL_ROLE = {"system": "system", "client": "user", "counselor": "assistant"}

SOULCHAT_CLIENT = "用户："
SOULCHAT_COUNSELOR = "心理咨询师："
_TEMPLATE_FIX = "pass --template chatml or --template soulchat, or fix the tokenizer's chat template"
PER_TURN_FIX = "pass --render-mode per-turn (each reply trained in the exact context it is generated in)"

Span = tuple[int, int]  # [start, end) character offsets into the rendered text


class TemplateError(ValueError):
    """The chosen template cannot render conversations consistently for this tokenizer."""


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
# Replies with reasoning, in the <think>...</think> form of Qwen3 and DeepSeek-R1: a template that strips
# it from past replies renders plain probes consistently but is not prefix-stable on such data.
_PROBE_REASONING = [
    Turn("client", "我最近总是失眠。"),
    Turn("counselor", "<think>\n来访者说失眠，先共情。\n</think>\n\n听起来你最近很辛苦。"),
    Turn("client", "工作压力很大。"),
    Turn("counselor", "<think>\n压力来自工作。\n</think>\n\n我理解这种压力。"),
]

def _messages(turns: Sequence[Turn]) -> list[dict[str, str]]:
    return [{"role": CANONICAL_ROLE[t.role], "content": t.text} for t in turns]


def _apply(tokenizer: HFTokenizer, turns: Sequence[Turn], generation_prompt: bool, where: str) -> str:
    try:
        messages = _messages(turns)
    except Exception as exc:  # a role outside CANONICAL_ROLE
        raise _template_failed(exc, where) from exc
    fast = _fast_render_for(tokenizer) if turns and _plain_contents(messages) else None
    if fast is None:
        outcome = _outcome(_apply_chat_template, tokenizer, messages, generation_prompt)
    else:
        outcome = _outcome(fast.render, tokenizer, messages, generation_prompt)
        if fast.due_for_check():
            _check_fast(tokenizer, fast, outcome, messages, generation_prompt, where)
    text, exc = outcome
    if exc is not None:
        raise _template_failed(exc, where) from exc
    if not isinstance(text, str):
        raise TemplateError(f"{where}: apply_chat_template(tokenize=False) returned {type(text).__name__}")
    return text


def _template_failed(exc: Exception, where: str) -> TemplateError:
    # jinja's raise_exception(), a missing template, ...
    return TemplateError(
        f"{where}: the tokenizer's chat template failed: {type(exc).__name__}: {exc}. {_TEMPLATE_FIX}"
    )


def _apply_chat_template(tokenizer: HFTokenizer, messages: list[dict[str, str]], generation_prompt: bool):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


# ------------------------------------------------------------------------------------------------
# The fast render: the tokenizer's compiled chat template, called with exactly what apply_chat_template
# passes it, verified on the probes when built and spot-checked against apply_chat_template after.

_FAST_CHECK_FIRST = 16  # calls also rendered by apply_chat_template before trusting the fast render
_FAST_CHECK_EVERY = 512
_Outcome = tuple[object, Exception | None]  # (rendered text, None) or (None, what the render raised)


@dataclass
class _FastRender:
    template: str = field(repr=False)  # the chat template string it was compiled from
    compiled: object  # jinja2.Template, compiled (and cached) by transformers itself
    plain: object  # transformers' _plain_template_data: what every template variable goes through
    # (special_tokens_map, its plain copy passed to the template): one tuple, so threads never mix them
    variables: tuple[dict, dict] | None = None
    calls: int = 0  # renders so far (drives the spot checks)

    def render(self, tokenizer: HFTokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        # apply_chat_template passes {**special_tokens_map, **kwargs} (no kwargs here) through
        # _plain_template_data on every call; re-read per call so that a changed eos_token shows at once.
        special = _template_variables(tokenizer)
        variables = self.variables
        if variables is None or variables[0] != special:
            variables = self.variables = (special, self.plain(special))
        # The messages need no normalization: _messages gives fresh dicts of plain str, no None values and
        # no reasoning keys (which apply_chat_template would alias), so its copies would be equal.
        return self.compiled.render(
            messages=messages, tools=None, documents=None, add_generation_prompt=generation_prompt,
            **variables[1],
        )

    def due_for_check(self) -> bool:
        self.calls += 1
        return self.calls <= _FAST_CHECK_FIRST or self.calls % _FAST_CHECK_EVERY == 0


def _template_variables(tokenizer: HFTokenizer) -> dict[str, str]:
    return tokenizer.special_tokens_map


def _plain_contents(messages: list[dict[str, str]]) -> bool:
    # A str subclass or a non-str content would be converted by apply_chat_template: leave it to it.
    return all(type(m["content"]) is str for m in messages)


def _outcome(render, tokenizer: HFTokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> _Outcome:
    try:
        return render(tokenizer, messages, generation_prompt), None
    except Exception as exc:
        return None, exc


def _same_outcome(a: _Outcome, b: _Outcome) -> bool:
    """Same text, or both raised with the same type and message (so the same TemplateError text)."""
    (text_a, exc_a), (text_b, exc_b) = a, b
    if exc_a is None or exc_b is None:
        return exc_a is None and exc_b is None and type(text_a) is type(text_b) and text_a == text_b
    return type(exc_a) is type(exc_b) and str(exc_a) == str(exc_b)


_FAST_RENDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fast_render_for(tokenizer: HFTokenizer) -> _FastRender | None:
    """The verified fast render of the tokenizer's current chat template; None: use apply_chat_template."""
    try:
        template = tokenizer.get_chat_template()
        per_template = _FAST_RENDERS.setdefault(tokenizer, {})
    except Exception:  # no chat template, several without a default, not weak-referenceable, not HF
        return None
    if not isinstance(template, str):
        return None
    if template not in per_template:
        per_template[template] = _build_fast_render(tokenizer, template)
    return per_template[template]


def _build_fast_render(tokenizer: HFTokenizer, template: str) -> _FastRender | None:
    """The fast render, or None when it cannot be built or differs from apply_chat_template on a probe."""
    try:
        chat_template_utils = importlib.import_module("transformers.utils.chat_template_utils")
        compiled = chat_template_utils._compile_jinja_template(template)
        # transformers < 5.18 passes the template variables as they are (no _plain_template_data yet); the
        # probes below check that this render matches apply_chat_template either way.
        plain = getattr(chat_template_utils, "_plain_template_data", _as_given)
    except Exception:  # private helpers moved, or a template that does not compile (then the slow path raises)
        return None
    for candidate in (_untracked(compiled, template), compiled):
        if candidate is None:
            continue
        fast = _FastRender(template, candidate, plain)
        if all(_same_outcome(_outcome(fast.render, tokenizer, _messages(probe[:k]), generation_prompt),
                             _outcome(_apply_chat_template, tokenizer, _messages(probe[:k]), generation_prompt))
               for probe in (*_PROBES, _PROBE_REASONING) for k in range(1, len(probe) + 1)
               for generation_prompt in (False, True)):
            return fast
    return None  # e.g. a template variable this transformers passes and the fast render not


def _as_given(value):
    return value


_GENERATION_TAG = re.compile(r"\{%[-+]?\s*generation\b")


def _untracked(compiled, template: str):
    """The template compiled with ``{% generation %}`` blocks rendered in place, or None without any.

    transformers renders each such block (TRL-style training templates mark every assistant reply) as a
    macro call that records where it lands, for ``return_assistant_tokens_mask``; soulchat finds its spans
    itself, and the call was half of the render time of the bundled template. The block's body stays in
    its own scope (``nodes.Scope``, as inside the macro), in the same sandboxed environment with the same
    filters and globals; like the compiled template itself it is used only if it renders every probe as
    apply_chat_template does, and is spot-checked afterwards.
    """
    if not _GENERATION_TAG.search(template):
        return None
    try:
        import jinja2.ext
        import jinja2.nodes

        class InlineGeneration(jinja2.ext.Extension):
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.Scope(body, lineno=lineno)

        env = compiled.environment.overlay()
        env.extensions = {name: ext for name, ext in env.extensions.items() if "generation" not in ext.tags}
        env.add_extension(InlineGeneration)
        return env.from_string(template)
    except Exception:  # a jinja2 without these hooks: keep transformers' compiled template
        return None


def _check_fast(
    tokenizer: HFTokenizer, fast: _FastRender, got: _Outcome, messages: list[dict[str, str]],
    generation_prompt: bool, where: str,
) -> None:
    want = _outcome(_apply_chat_template, tokenizer, messages, generation_prompt)
    if _same_outcome(got, want):
        return
    digest = hashlib.sha1(fast.template.encode()).hexdigest()[:12]
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise RuntimeError(
        f"{where}: soulchat's fast render of the chat template of tokenizer {name!r} (template sha1 {digest}, "
        f"add_generation_prompt={generation_prompt}) differs from tokenizer.apply_chat_template: "
        f"{_describe_difference(got, want)}. This is a bug in soulchat's fast render "
        f"(soulchat/data/templates.py): please report it with this message. Conversations rendered before "
        f"this one may be affected too, so this run stops instead of continuing silently wrong"
    )


def _describe_difference(got: _Outcome, want: _Outcome) -> str:
    (text_a, exc_a), (text_b, exc_b) = got, want
    if exc_a is None and exc_b is None and isinstance(text_a, str) and isinstance(text_b, str):
        cut = _first_difference(text_a, text_b)
        return f"fast {text_a[max(0, cut - 30):][:60]!r}, apply_chat_template {text_b[max(0, cut - 30):][:60]!r}"

    def said(text, exc) -> str:
        return f"raised {type(exc).__name__}: {exc}" if exc is not None else f"returned {str(text)[:60]!r}"

    return f"fast {said(text_a, exc_a)}, apply_chat_template {said(text_b, exc_b)}"


def _first_difference(a: str, b: str) -> int:
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _spans_by_prefixes(tokenizer: HFTokenizer, turns: Sequence[Turn], full: str, where: str) -> list[Span]:
    """Counselor spans of ``full`` from prefix renders (the ground truth, 2 renders per counselor turn)."""
    spans: list[Span] = []
    for i, turn in enumerate(turns):
        if turn.role != "counselor":
            continue
        _require_context(i, where)
        prompt = _apply(tokenizer, turns[:i], True, where)
        upto = _apply(tokenizer, turns[: i + 1], False, where)
        span = reply_span(prompt, upto, turn.text, i, where)
        if not full.startswith(upto):
            cut = _first_difference(full, upto)
            raise RewritesHistory(
                f"{where}: the chat template renders inconsistently: it rewrites earlier turns once later "
                f"turns follow (e.g. it strips reasoning from past replies, or renders the last reply "
                f"differently); counselor turn {i} reads {upto[max(0, cut - 30) :][:60]!r} alone but "
                f"{full[max(0, cut - 30) :][:60]!r} in the whole conversation. Training on it would teach a "
                f"context the model never sees at inference; {PER_TURN_FIX}, or {_TEMPLATE_FIX}"
            )
        spans.append(span)
    return spans


def _require_context(i: int, where: str) -> None:
    if i == 0:
        raise DataError(
            f"{where}: counselor turn {i} has no client turn before it; run validate_conversation()",
            reason="starts_with_counselor",
            where=where,
        )


def reply_span(prompt: str, upto: str, content: str, i: int, where: str) -> Span:
    """The trained span of counselor turn ``i`` in ``upto`` (the render up to and with that turn).

    ``prompt`` is the generation prompt rendered from the turns before it, which must be a prefix of
    ``upto``. The span is the reply's content plus its end marker (the turn closer, without the
    whitespace between turns), plus the whitespace between the prompt and the content when nothing else
    lies between them.
    """
    if not upto.startswith(prompt):
        raise TemplateError(
            f"{where}: the chat template renders inconsistently: the conversation up to counselor "
            f"turn {i} does not start with the generation prompt for that turn (prompt ends "
            f"{prompt[-60:]!r}, the turn renders as {upto[max(0, len(prompt) - 60) :][:80]!r})."
            f" Training text would differ from what the model sees at inference; {_TEMPLATE_FIX}"
        )
    delta = upto[len(prompt) :]
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
    # Whitespace right after the prompt (" " in Llama-2's "[/INST] reply") is generated, so trained; text
    # the template puts between the prompt and the reply (Qwen3's empty think block) is context.
    before = delta[:at]
    lead = len(before) if before.isspace() else 0
    marker = delta[at + size :].rstrip()  # the turn closer, not the whitespace between turns
    start = len(prompt) + at
    return start - lead, start + size + len(marker)


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


def builtin_chat_template(tokenizer: HFTokenizer, template: str) -> str:
    """The Jinja chat template that renders exactly like the built-in ``template`` for this tokenizer.

    For exporting a fine-tuned model: ``tokenizer.chat_template = builtin_chat_template(tok, "soulchat")``
    makes ``apply_chat_template(..., add_generation_prompt=True)`` produce the prompt format trained on
    (bos included when the tokenizer adds one by itself).
    """
    if template not in ("soulchat", "chatml"):
        raise TemplateError(f"builtin_chat_template: {template!r} is not a built-in (soulchat, chatml)")
    return _builtin_format(tokenizer, template).jinja()



def default_template(tokenizer) -> str:
    """"auto" (the tokenizer's own chat template) when it has one, else the paper's "soulchat" format."""
    return "auto" if getattr(tokenizer, "chat_template", None) else "soulchat"
