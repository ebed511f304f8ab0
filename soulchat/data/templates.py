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

from soulchat.data.conversation import THINK_CLOSE, THINK_OPEN, DataError, Turn, split_reasoning
from soulchat.dataspec import TEMPLATES, THINKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as HFTokenizer

CANONICAL_ROLE = {"system": "system", "client": "user", "counselor": "assistant"}

SOULCHAT_CLIENT = "用户："
SOULCHAT_COUNSELOR = "心理咨询师："
TEMPLATE_FIX = "pass --template chatml or --template soulchat, or fix the tokenizer's chat template"
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
PROBES = ([*_PROBE_DIALOGUE], [_PROBE_SYSTEM, *_PROBE_DIALOGUE])
# Replies with reasoning, in the <think>...</think> form of Qwen3 and DeepSeek-R1, with and without a system
# prompt: a template that strips it from past replies (DeepSeek-R1, GLM-4.6) renders plain probes
# consistently but is not prefix-stable on such data.
_PROBE_REASONING = [
    Turn("client", "我最近总是失眠。"),
    Turn("counselor", "<think>\n来访者说失眠，先共情。\n</think>\n\n听起来你最近很辛苦。"),
    Turn("client", "工作压力很大。"),
    Turn("counselor", "<think>\n压力来自工作。\n</think>\n\n我理解这种压力。"),
]
PROBES_REASONING = ([*_PROBE_REASONING], [_PROBE_SYSTEM, *_PROBE_REASONING])


def _messages(turns: Sequence[Turn], reasoning_field: bool = False) -> list[dict[str, str]]:
    """The template's messages; ``reasoning_field``: a reply's ``<think>`` reasoning is passed as its
    ``reasoning_content`` (and the content without it), for templates that read reasoning there."""
    messages = [{"role": CANONICAL_ROLE[t.role], "content": t.text} for t in turns]
    if reasoning_field:
        for m, t in zip(messages, turns):
            reasoning, content = split_reasoning(t.text) if t.role == "counselor" else (None, t.text)
            if reasoning is not None:
                m["content"], m["reasoning_content"] = content, reasoning
    return messages


def thinking_value(flag: str | None) -> bool | None:
    """``--thinking`` as the render layer takes it: "on" -> True, "off" -> False, unset -> None."""
    if flag is not None and flag not in THINKING:
        raise ValueError(f"--thinking {flag!r}: choose one of {THINKING} (or leave it unset)")
    return None if flag is None else flag == "on"


def thinking_flags(thinking: bool | None) -> dict[str, bool]:
    """The template variables that carry ``--thinking``: none for the template's default, else both names
    templates read it under (``enable_thinking``: Qwen3, GLM-4.x; ``thinking``: DeepSeek-V3.1)."""
    return {} if thinking is None else {"enable_thinking": thinking, "thinking": thinking}


def apply_template(
    tokenizer: HFTokenizer, turns: Sequence[Turn], generation_prompt: bool, where: str,
    thinking: bool | None = None, reasoning_field: bool = False,
) -> str:
    """The tokenizer's chat template rendered on ``turns`` (``thinking``: see ``thinking_flags``;
    ``reasoning_field``: see ``_messages``)."""
    try:
        messages = _messages(turns, reasoning_field)
    except Exception as exc:  # a role outside CANONICAL_ROLE
        raise _template_failed(exc, where) from exc
    fast = _fast_render_for(tokenizer) if turns and _plain_contents(messages) else None
    if fast is None:
        outcome = _outcome(_apply_chat_template, tokenizer, messages, generation_prompt, thinking)
    else:
        outcome = _outcome(fast.render, tokenizer, messages, generation_prompt, thinking)
        if fast.due_for_check():
            _check_fast(tokenizer, fast, outcome, messages, generation_prompt, where, thinking)
    text, exc = outcome
    if exc is not None:
        raise _template_failed(exc, where) from exc
    if not isinstance(text, str):
        raise TemplateError(f"{where}: apply_chat_template(tokenize=False) returned {type(text).__name__}")
    return text


def _template_failed(exc: Exception, where: str) -> TemplateError:
    # jinja's raise_exception(), a missing template, ...
    return TemplateError(
        f"{where}: the tokenizer's chat template failed: {type(exc).__name__}: {exc}. {TEMPLATE_FIX}"
    )


def _apply_chat_template(tokenizer: HFTokenizer, messages: list[dict[str, str]], generation_prompt: bool,
                         thinking: bool | None = None):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         **thinking_flags(thinking))


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

    def render(self, tokenizer: HFTokenizer, messages: list[dict[str, str]], generation_prompt: bool,
               thinking: bool | None = None) -> str:
        # apply_chat_template passes {**special_tokens_map, **kwargs} (kwargs: the thinking flags) through
        # _plain_template_data on every call; re-read per call so that a changed eos_token shows at once.
        special = {**_template_variables(tokenizer), **thinking_flags(thinking)}
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
    # A str subclass or a non-str content would be converted by apply_chat_template, and a reasoning key
    # aliased under other names: leave those to it.
    return all(type(m["content"]) is str and len(m) == 2 for m in messages)


def _outcome(render, tokenizer: HFTokenizer, messages: list[dict[str, str]], generation_prompt: bool,
             thinking: bool | None = None) -> _Outcome:
    try:
        return render(tokenizer, messages, generation_prompt, thinking), None
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

    def agrees(fast: _FastRender, messages: list[dict[str, str]], generation_prompt: bool,
               thinking: bool | None) -> bool:
        fast_outcome = _outcome(fast.render, tokenizer, messages, generation_prompt, thinking)
        slow_outcome = _outcome(_apply_chat_template, tokenizer, messages, generation_prompt, thinking)
        return _same_outcome(fast_outcome, slow_outcome)

    for candidate in (_untracked(compiled, template), compiled):
        if candidate is None:
            continue
        fast = _FastRender(template, candidate, plain)
        if all(agrees(fast, _messages(probe[:k]), generation_prompt, thinking)
               for probe in (*PROBES, *PROBES_REASONING) for k in range(1, len(probe) + 1)
               for generation_prompt in (False, True) for thinking in (None, False, True)):
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
    generation_prompt: bool, where: str, thinking: bool | None = None,
) -> None:
    want = _outcome(_apply_chat_template, tokenizer, messages, generation_prompt, thinking)
    if _same_outcome(got, want):
        return
    digest = hashlib.sha1(fast.template.encode()).hexdigest()[:12]
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise RuntimeError(
        f"{where}: soulchat's fast render of the chat template of tokenizer {name!r} (template sha1 {digest}, "
        f"add_generation_prompt={generation_prompt}, thinking flags {thinking_flags(thinking)}) differs from "
        f"tokenizer.apply_chat_template: "
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
            cut = _first_difference(full, upto)
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
