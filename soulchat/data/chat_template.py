"""The tokenizer's chat template, rendered: ``apply_template`` is the one way soulchat renders it.

A conversation reaches the template as messages with the canonical roles mapped as client -> "user",
counselor -> "assistant" (``CANONICAL_ROLE``); ``--thinking`` reaches it as ``thinking_flags``. The probe
conversations (``PROBES``, ``PROBES_REASONING``) verify the fast render below and are what
soulchat/data/plans.py learns a template's constant pieces from.

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
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from soulchat.data.conversation import Turn, split_reasoning
from soulchat.dataspec import THINKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as HFTokenizer

CANONICAL_ROLE = {"system": "system", "client": "user", "counselor": "assistant"}
TEMPLATE_FIX = "pass --template chatml or --template soulchat, or fix the tokenizer's chat template"


class TemplateError(ValueError):
    """The chosen template cannot render conversations consistently for this tokenizer."""


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
        f"(soulchat/data/chat_template.py): please report it with this message. Conversations rendered before "
        f"this one may be affected too, so this run stops instead of continuing silently wrong"
    )


def _describe_difference(got: _Outcome, want: _Outcome) -> str:
    (text_a, exc_a), (text_b, exc_b) = got, want
    if exc_a is None and exc_b is None and isinstance(text_a, str) and isinstance(text_b, str):
        cut = first_difference(text_a, text_b)
        return f"fast {text_a[max(0, cut - 30):][:60]!r}, apply_chat_template {text_b[max(0, cut - 30):][:60]!r}"

    def said(text, exc) -> str:
        return f"raised {type(exc).__name__}: {exc}" if exc is not None else f"returned {str(text)[:60]!r}"

    return f"fast {said(text_a, exc_a)}, apply_chat_template {said(text_b, exc_b)}"


def first_difference(a: str, b: str) -> int:
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
