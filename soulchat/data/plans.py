"""A template bound to one tokenizer (a plan): probed, validated and cached once per (tokenizer, template).

Rendering the prefixes of a chat template costs ``2 x counselor turns`` template renders, so for each
tokenizer the template is probed once and "compiled" into constant pieces (soulchat/data/templates.py):
a conversation is then rendered once by the template and once by the pieces, and only when the two
differ (a template that trims content, say) does it take the prefix path. The first conversations and
then one in 512 are also checked against the prefix path. (Measured on the sample corpus, 7 turns per
conversation, with a Qwen2.5-style template: about 1.0 ms per conversation with the pieces against
5.5 ms through prefix renders; the built-in templates take 0.03 ms.)

Prefix stability: a template is prefix-stable when every turn renders the same whatever follows it.
Qwen3's renders an empty think block only after the last user turn; DeepSeek-R1-style templates strip
``<think>`` reasoning from past replies (GLM-4.6 keeps it only in the last reply), or open a think block
in the generation prompt that no rendered reply holds (R1 distills, QwQ). The probes (plain and with
reasoning, each with and without a system prompt, rendered with the plan's ``--thinking``) find this
once; ``Plan.render_mode`` then picks the render mode: ``conversation`` (whole conversations, the
counselor spans of one render) or ``per-turn`` (``Plan.sample``: one sample per counselor turn, the
generation prompt of the turns before it then everything generated after it, verified per sample).
A plan is built per (tokenizer, template, thinking).

Validation on the probes: the template's control tokens must tokenize back as single tokens, bos must
not double, some counselor token must be trained; tokens straddling a span edge are warned about.
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from soulchat.data.chat_template import PROBES, PROBES_REASONING, TEMPLATE_FIX, TemplateError, apply_template
from soulchat.data.conversation import THINK_OPEN, Turn, split_reasoning
from soulchat.data.encode import Encoder
from soulchat.data.templates import (
    RenderedConversation,
    RewritesHistory,
    Span,
    TemplatePieces,
    builtin_format,
    learn_pieces,
    reply_completion,
    require_context,
    single_token_id,
    spans_by_prefixes,
    special_strings,
)
from soulchat.dataspec import RENDER_MODES, TEMPLATES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as HFTokenizer

_SPOT_CHECK_FIRST = 16  # conversations checked against the prefix path before trusting the pieces
_SPOT_CHECK_EVERY = 512

# ------------------------------------------------------------------------------------------------
# A template bound to one tokenizer: rendering, prompt, tokenization, validated once


@dataclass
class Plan:
    template: str
    encoder: Encoder
    pieces: TemplatePieces | None  # None: render every conversation through the prefix path
    # The template's own control tokens (``_control_re``), which must not occur in turn text: there they
    # would tokenize as the control token itself.
    control_re: re.Pattern[str] | None
    system_error: TemplateError | None = None  # raised when a conversation has a system turn
    rendered_fast: int = 0  # conversations rendered by the pieces (drives the spot checks)
    # Why whole conversations cannot be rendered exactly (None: the template is prefix-stable on every
    # probe). probe_error: the plain probe itself rewrites history, so conversation mode is refused.
    unstable: str | None = None
    probe_error: RewritesHistory | None = None
    system_rewrites: bool = False  # system_error is a RewritesHistory (per-turn rendering is exact)
    thinking: bool | None = None  # --thinking: passed to every render (None: the template's default)
    reasoning_field: bool = False  # reasoning reaches the template as reasoning_content (_reads_reasoning_field)

    # -- render mode ------------------------------------------------------------------------------

    def render_mode(self, requested: str) -> str:
        """The mode used for ``requested``: auto = conversation when prefix-stable, per-turn otherwise."""
        if requested not in RENDER_MODES:
            raise ValueError(f"render_mode={requested!r}: choose one of {RENDER_MODES}")
        if requested == "auto":
            return "conversation" if self.unstable is None else "per-turn"
        if requested == "conversation" and self.probe_error is not None:
            raise TemplateError(f"--render-mode conversation: {self.probe_error}")
        return requested

    # -- rendering --------------------------------------------------------------------------------

    def render(self, tokenizer: HFTokenizer, turns: Sequence[Turn], where: str) -> RenderedConversation:
        # A plan with probe_error has no pieces: each conversation is checked by its prefix renders (one
        # reply renders consistently even in Qwen3's template; chat reads the end marker from one).
        if self.system_error is not None and turns and turns[0].role == "system":
            raise TemplateError(f"{where}: {self.system_error}")
        if self.template != "auto":
            built = self.pieces.build(turns)
            assert built is not None  # built-in pieces know every role pair
            return built
        full = apply_template(tokenizer, turns, False, where, self.thinking, self.reasoning_field)
        built = self.pieces.build(turns) if self.pieces is not None else None
        if built is not None and built.text == full:
            self.rendered_fast += 1
            n = self.rendered_fast
            if n <= _SPOT_CHECK_FIRST or n % _SPOT_CHECK_EVERY == 0:
                spans = spans_by_prefixes(tokenizer, turns, full, where, self.thinking, self.reasoning_field)
                if spans != built.spans:
                    self.pieces = None
                    warnings.warn(
                        f"{where}: the chat template's constant pieces disagree with its prefix renders; "
                        "rendering every conversation through the (slower) prefix path from now on",
                        stacklevel=3,
                    )
                    return RenderedConversation(full, spans)
            return built
        spans = spans_by_prefixes(tokenizer, turns, full, where, self.thinking, self.reasoning_field)
        return RenderedConversation(full, spans)

    def prompt(self, tokenizer: HFTokenizer, turns: Sequence[Turn], where: str) -> str:
        # A template that moves the system prompt renders it exactly per turn: the prompt is still valid.
        if self.system_error is not None and not self.system_rewrites and turns and turns[0].role == "system":
            raise TemplateError(f"{where}: {self.system_error}")
        if self.template == "auto":
            return apply_template(tokenizer, turns, True, where, self.thinking, self.reasoning_field)
        text = self.pieces.prompt(turns)
        assert text is not None
        return text

    def sample(self, tokenizer: HFTokenizer, turns: Sequence[Turn], where: str) -> RenderedConversation:
        """The per-turn sample that trains ``turns[-1]`` (a counselor turn) in the context ``turns[:-1]``.

        Its text is the generation prompt rendered from ``turns[:-1]``, exactly what the model sees at
        inference, then everything the model generates after it (``templates.reply_completion``: reasoning,
        think block, reply, end marker); its one span is all of that. Verified: the prompt is a prefix of the
        template's render of ``turns`` (or, for a prompt that opens a think block, everything before it is),
        and the reply lies right after it.
        """
        i = len(turns) - 1
        require_context(i, where)
        prompt = self.prompt(tokenizer, turns[:i], where)
        if self.template == "auto":
            upto = apply_template(tokenizer, turns, False, where, self.thinking, self.reasoning_field)
        else:
            upto = self.pieces.build(turns).text
        text, span = reply_completion(prompt, upto, turns[i].text, i, where)
        return RenderedConversation(text, [span])

    def samples(
        self, tokenizer: HFTokenizer, turns: Sequence[Turn], where: str
    ) -> list[RenderedConversation]:
        """One per-turn sample per counselor turn of ``turns``, in order."""
        return [self.sample(tokenizer, turns[: i + 1], f"{where} counselor turn {i}")
                for i, t in enumerate(turns) if t.role == "counselor"]

    def has_control_token(self, turns: Sequence[Turn]) -> bool:
        """Whether a turn's text holds one of the template's control tokens (a reply's reasoning and its
        content are searched, not the <think> tags that delimit them)."""
        search = self.control_re.search if self.control_re is not None else None
        if search is None:
            return False
        for turn in turns:
            if turn.role == "counselor" and turn.text.startswith(THINK_OPEN):
                reasoning, content = split_reasoning(turn.text)
                if search(content) or (reasoning is not None and search(reasoning)):
                    return True
            elif search(turn.text):
                return True
        return False


def _build_plan(tokenizer: HFTokenizer, template: str, thinking: bool | None = None) -> Plan:
    encoder = Encoder(tokenizer)
    specials = special_strings(tokenizer)
    system_error = None
    unstable, probe_error, system_rewrites, reasoning_field = None, None, False, False
    if template in ("soulchat", "chatml"):
        if thinking:
            raise TemplateError(f"--thinking on: template {template!r} has no thinking mode; drop --thinking")
        pieces = builtin_format(tokenizer, template).pieces()
    elif template == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "template 'auto' uses the tokenizer's chat template, but this tokenizer has none: "
                "pass --template soulchat (base models) or --template chatml"
            )
        _check_thinking(tokenizer, thinking)
        reasoning_field = _reads_reasoning_field(tokenizer, thinking)
        spans_of: list[list[Span]] = []
        probes: list[list[Turn]] = []
        for probe in PROBES:
            try:
                full = apply_template(tokenizer, probe, False, "probe conversation", thinking)
                spans_of.append(spans_by_prefixes(tokenizer, probe, full, "probe conversation", thinking))
                probes.append(probe)
            except RewritesHistory as exc:
                if probe[0].role != "system":
                    probe_error = exc  # not prefix-stable on plain replies: per-turn only
                    unstable = str(exc)
                    break
                system_error, system_rewrites = _system_error(exc), True
                unstable = str(exc)
            except TemplateError as exc:
                if probe[0].role != "system":
                    raise
                system_error = _system_error(exc)
        if probe_error is None and unstable is None:
            unstable = _reasoning_instability(tokenizer, thinking, reasoning_field, system_error is None)
        pieces = learn_pieces(tokenizer, probes, spans_of) if probe_error is None else None
    else:
        raise TemplateError(f"unknown template {template!r}: choose one of {TEMPLATES}")

    plan = Plan(template, encoder, pieces, None, system_error, unstable=unstable,
                probe_error=probe_error, system_rewrites=system_rewrites, thinking=thinking,
                reasoning_field=reasoning_field)
    _validate_plan(tokenizer, plan, specials)
    return plan


def _check_thinking(tokenizer: HFTokenizer, thinking: bool | None) -> None:
    """Refuse a --thinking value the chat template cannot express (one without a thinking switch)."""
    if thinking is None:
        return
    turns = PROBES[0][:1]
    on = apply_template(tokenizer, turns, True, "probe conversation", True)
    if on != apply_template(tokenizer, turns, True, "probe conversation", False):
        return  # the template has a switch (enable_thinking / thinking)
    opens = on.rstrip().endswith(THINK_OPEN)
    if not thinking and opens:
        raise TemplateError(
            "--thinking off: the chat template's generation prompt opens a think block whatever "
            "enable_thinking says (as DeepSeek-R1 distills and QwQ do), so the model always reasons first: "
            "drop --thinking off (replies without reasoning are trained after an empty think block)"
        )
    if thinking and not opens:
        raise TemplateError(
            "--thinking on: the chat template has no thinking mode (enable_thinking / thinking change "
            "nothing in its generation prompt): drop --thinking on"
        )


def _system_error(exc: TemplateError) -> TemplateError:
    return TemplateError(
        f"the chat template cannot render a conversation with a system prompt consistently "
        f"({exc}); drop system prompts from the data, or {TEMPLATE_FIX}"
    )


def _reads_reasoning_field(tokenizer: HFTokenizer, thinking: bool | None) -> bool:
    """Whether the template renders a reply's ``reasoning_content`` (Qwen3, GLM-4.x, gpt-oss through
    transformers' ``thinking`` alias, ...): then reasoning is passed there, in the form the template
    writes it. Otherwise it stays a ``<think>`` prefix of the content (templates that strip it, DeepSeek-R1,
    QwQ, V3.1; or templates without reasoning, which render it as reply text)."""
    turns = PROBES_REASONING[0][:2]
    reasoning, _ = split_reasoning(turns[1].text)
    try:
        rendered = apply_template(tokenizer, turns, False, "reasoning probe", thinking, reasoning_field=True)
    except TemplateError:
        return False
    return reasoning in rendered


def _reasoning_instability(tokenizer: HFTokenizer, thinking: bool | None, reasoning_field: bool,
                           with_system: bool) -> str | None:
    """Why replies with <think> reasoning make the template unstable (it strips them from history)."""
    for probe in PROBES_REASONING if with_system else PROBES_REASONING[:1]:
        try:
            full = apply_template(tokenizer, probe, False, "reasoning probe", thinking, reasoning_field)
            spans_by_prefixes(tokenizer, probe, full, "reasoning probe", thinking, reasoning_field)
        except RewritesHistory as exc:
            return str(exc)
        except TemplateError:
            # Any other failure (reasoning with thinking off, say) is not instability: such data is refused
            # per conversation, with its own message naming the fix.
            continue
    return None


def _control_re(texts: Sequence[str], specials: list[str], tokenizer: HFTokenizer) -> re.Pattern[str] | None:
    """The template's own control tokens: the special tokens its renders hold, and the tokenizer's named
    ones (eos, bos, pad, unk, ...: generation stops at eos, and often at pad). Other special tokens of the
    tokenizer (``<|im_start|>`` under a Llama-3 template, say) are text to this template: such a text
    tokenizes as that token in training exactly as at inference, and is trained."""
    own = {s for s in specials if any(s in t for t in texts)}
    for key, value in (getattr(tokenizer, "special_tokens_map", None) or {}).items():
        if key != "additional_special_tokens":
            own.update(v for v in (value if isinstance(value, (list, tuple)) else [value])
                       if isinstance(v, str) and v in specials)
    return re.compile("|".join(map(re.escape, sorted(own, key=len, reverse=True)))) if own else None


def _validate_plan(tokenizer: HFTokenizer, plan: Plan, specials: list[str]) -> None:
    """Tokenize the probes: control tokens must survive as single tokens, bos must not double."""
    probes = [p for p in PROBES if plan.system_error is None or p[0].role != "system"]
    if plan.probe_error is None:
        rendered = [plan.render(tokenizer, p, "probe conversation") for p in probes]
    else:  # validated as it will be rendered: per turn
        rendered = [s for p in probes for s in plan.samples(tokenizer, p, "probe conversation")]
    texts = [r.text for r in rendered]
    prompts = [plan.prompt(tokenizer, p[:k], "probe conversation")
               for p in probes for k in range(1, len(p) + 1) if p[k - 1].role == "client"]
    plan.control_re = _control_re(texts + prompts, specials, tokenizer)
    plan.encoder.check_against(tokenizer, texts)
    plan.rendered_fast = 0  # the probes do not count towards the spot checks of real conversations
    encodings = plan.encoder(tokenizer, texts)
    plan.encoder.check_queries(encodings, [r.spans for r in rendered])
    plan.encoder.check_pieces(texts, encodings)
    for r, encoded in zip(rendered, encodings):
        ids = encoded.ids
        for special in specials:
            n_text = r.text.count(special)
            if n_text == 0:
                continue
            sid = single_token_id(tokenizer, special)
            n_ids = int(np.count_nonzero(ids == sid)) if sid is not None else 0
            if n_ids != n_text:
                raise TemplateError(
                    f"template {plan.template!r}: the rendered text holds {special!r} {n_text} times but "
                    f"tokenizes to that token {n_ids} times; the tokenizer does not read the template's "
                    f"control tokens back as tokens (is tokenizer.split_special_tokens set?). {TEMPLATE_FIX}"
                )
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
            raise TemplateError(f"template {plan.template!r}: the rendered text starts with two bos tokens")
        trained, _, straddling = encoded.mask(r.spans)
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


def plan_for(tokenizer: HFTokenizer, template: str, thinking: bool | None = None) -> Plan:
    """The plan for (tokenizer, template, thinking), built and validated once (again if the chat template
    changes). ``thinking``: ``--thinking`` (None: the template's default; ``templates.thinking_flags``)."""
    if template not in TEMPLATES:
        raise TemplateError(f"unknown template {template!r}: choose one of {TEMPLATES}")
    if thinking not in (None, False, True):
        raise ValueError(f"thinking={thinking!r}: None (the template's default), False or True")
    key = (template, str(getattr(tokenizer, "chat_template", None)) if template == "auto" else "", thinking)
    try:
        per_tok = _PLANS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache
        return _build_plan(tokenizer, template, thinking)
    plan = per_tok.get(key)
    if plan is None:
        plan = per_tok[key] = _build_plan(tokenizer, template, thinking)
    return plan
