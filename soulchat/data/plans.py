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
``<think>`` reasoning from past replies. The probes (plain, with a system prompt, with reasoning) find
this once; ``_Plan.render_mode`` then picks the render mode: ``conversation`` (whole conversations, the
counselor spans of one render) or ``per-turn`` (``_Plan.sample``: one sample per counselor turn, the
generation prompt of the turns before it then the reply, verified per sample).

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

from soulchat.data.conversation import Turn
from soulchat.data.encode import _Encoder
from soulchat.data.templates import (
    _PROBE_REASONING,
    _PROBES,
    _TEMPLATE_FIX,
    TEMPLATES,
    RenderedConversation,
    RewritesHistory,
    Span,
    TemplateError,
    _apply,
    _require_context,
    _builtin_format,
    _learn_pieces,
    _Pieces,
    _single_token_id,
    _spans_by_prefixes,
    _special_strings,
    reply_span,
)
from soulchat.dataspec import RENDER_MODES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as HFTokenizer

_SPOT_CHECK_FIRST = 16  # conversations checked against the prefix path before trusting the pieces
_SPOT_CHECK_EVERY = 512

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
    # Why whole conversations cannot be rendered exactly (None: the template is prefix-stable on every
    # probe). probe_error: the plain probe itself rewrites history, so conversation mode is refused.
    unstable: str | None = None
    probe_error: RewritesHistory | None = None
    system_rewrites: bool = False  # system_error is a RewritesHistory (per-turn rendering is exact)

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
        # A template that moves the system prompt renders it exactly per turn: the prompt is still valid.
        if self.system_error is not None and not self.system_rewrites and turns and turns[0].role == "system":
            raise TemplateError(f"{where}: {self.system_error}")
        if self.template == "auto":
            return _apply(tokenizer, turns, True, where)
        text = self.pieces.prompt(turns)
        assert text is not None
        return text

    def sample(self, tokenizer: HFTokenizer, turns: Sequence[Turn], where: str) -> RenderedConversation:
        """The per-turn sample that trains ``turns[-1]`` (a counselor turn) in the context ``turns[:-1]``.

        Its text is the generation prompt rendered from ``turns[:-1]``, exactly what the model sees at
        inference, then the reply and its end marker; its one span is that reply. Verified: the prompt is
        a prefix of the template's render of ``turns``, and the reply lies right after it.
        """
        i = len(turns) - 1
        _require_context(i, where)
        prompt = self.prompt(tokenizer, turns[:i], where)
        if self.template == "auto":
            upto = _apply(tokenizer, turns, False, where)
        else:
            upto = self.pieces.build(turns).text
        start, end = reply_span(prompt, upto, turns[i].text, i, where)
        return RenderedConversation(upto[:end], [(start, end)])

    def samples(
        self, tokenizer: HFTokenizer, turns: Sequence[Turn], where: str
    ) -> list[RenderedConversation]:
        """One per-turn sample per counselor turn of ``turns``, in order."""
        return [self.sample(tokenizer, turns[: i + 1], f"{where} counselor turn {i}")
                for i, t in enumerate(turns) if t.role == "counselor"]

    def has_control_token(self, turns: Sequence[Turn]) -> bool:
        return self.control_re is not None and any(self.control_re.search(t.text) for t in turns)


def _build_plan(tokenizer: HFTokenizer, template: str) -> _Plan:
    encoder = _Encoder(tokenizer)
    specials = _special_strings(tokenizer)
    control_re = re.compile("|".join(map(re.escape, specials))) if specials else None
    system_error = None
    unstable, probe_error, system_rewrites = None, None, False
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
            unstable = _reasoning_instability(tokenizer)
        pieces = _learn_pieces(tokenizer, probes, spans_of) if probe_error is None else None
    else:
        raise TemplateError(f"unknown template {template!r}: choose one of {TEMPLATES}")

    plan = _Plan(template, encoder, pieces, control_re, system_error, unstable=unstable,
                 probe_error=probe_error, system_rewrites=system_rewrites)
    _validate_plan(tokenizer, plan, specials)
    return plan


def _system_error(exc: TemplateError) -> TemplateError:
    return TemplateError(
        f"the chat template cannot render a conversation with a system prompt consistently "
        f"({exc}); drop system prompts from the data, or {_TEMPLATE_FIX}"
    )


def _reasoning_instability(tokenizer: HFTokenizer) -> str | None:
    """Why replies with <think> reasoning make the template unstable (it strips them from history)."""
    try:
        full = _apply(tokenizer, _PROBE_REASONING, False, "reasoning probe")
        _spans_by_prefixes(tokenizer, _PROBE_REASONING, full, "reasoning probe")
    except RewritesHistory as exc:
        return str(exc)
    except TemplateError:
        # Any other failure (a template that drops reasoning from every reply, say) is not instability:
        # such data is refused per conversation, with its own message.
        return None
    return None


def _validate_plan(tokenizer: HFTokenizer, plan: _Plan, specials: list[str]) -> None:
    """Tokenize the probes: control tokens must survive as single tokens, bos must not double."""
    probes = [p for p in _PROBES if plan.system_error is None or p[0].role != "system"]
    if plan.probe_error is None:
        rendered = [plan.render(tokenizer, p, "probe conversation") for p in probes]
    else:  # validated as it will be rendered: per turn
        rendered = [s for p in probes for s in plan.samples(tokenizer, p, "probe conversation")]
    texts = [r.text for r in rendered]
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


