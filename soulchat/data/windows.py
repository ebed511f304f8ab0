"""Windows of an over-long conversation: cut at turn boundaries so that each fits ``max_length`` tokens.

Over-long conversations (more than ``max_length`` tokens) are never cut silently:
``overflow="split"`` cuts at turn boundaries into windows. Each window starts at a client turn, ends after
a counselor turn, and trains the counselor turns not trained by an earlier window (each counselor turn is
trained in exactly one window). It trains as many turns as fit, keeps the system prompt when it fits, then
keeps as much preceding context (untrained) as fits. Training turns comes first, so windows are few
(about total tokens / max_length) and a window's first trained reply sees only the context left over.
A counselor turn that does not fit even with just its own client turn is dropped (and counted).
``overflow="drop"`` drops the conversation. Window lengths are measured exactly: rendered, and
tokenized or, where the tokenizer allows, looked up piece by piece in the whole text's tokens
(soulchat/data/pieces.py).

Per-turn rendering (soulchat/data/render.py) has one sample per counselor turn; an over-long sample keeps
the latest context that fits (``shorten_context``): the reply with its client turn, the system prompt when
it fits, then as many earlier turns as fit.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from soulchat.data.conversation import Conversation, Turn, where
from soulchat.data.encode import Encoded
from soulchat.data.pieces import PieceCheckError
from soulchat.data.templates import RenderedConversation, Span

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as HFTokenizer

    from soulchat.data.plans import Plan


def split_windows(
    plan: Plan,
    tokenizer: HFTokenizer,
    conv: Conversation,
    turns: list[Turn],
    rendered: RenderedConversation,
    encoded: Encoded,
    max_length: int,
    stats: Counter,
) -> list[tuple[Encoded, list[Span]]]:
    """Windows of an over-long conversation, each <= max_length tokens, as (tokens, trained spans).

    A unit is a counselor turn with the client turn(s) before it. Window (a, b) holds units a..b (plus the
    system prompt when kept) and trains units first..b, where first is the first unit not yet trained.
    Every length is measured exactly (render + tokenize); per-unit token counts of the whole conversation
    only guess where to start looking, so few windows are measured.
    """
    name = where(conv)
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
    per_unit = np.diff(encoded.tokens_starting_before(cuts))
    cum = np.concatenate([[0], np.cumsum(per_unit)])

    def estimate(a: int, b: int) -> int:
        return int(cum[b + 1] - cum[a])

    measure = _Measure(plan, tokenizer, rendered, encoded)

    def window(a: int, b: int, with_system: bool) -> RenderedConversation:
        turns_ab = (system if with_system else []) + body[unit_bounds[a][0] : unit_bounds[b][1]]
        return plan.render(tokenizer, turns_ab, f"{name} window of turns {a}..{b}")

    def length(a: int, b: int, with_system: bool) -> int:
        return measure.length((a, b, with_system), lambda: window(a, b, with_system))

    def fits(a: int, b: int, with_system: bool) -> bool:
        return length(a, b, with_system) <= max_length

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
        overhead = length(first, first, with_system) - estimate(first, first)
        guess_b = first
        while guess_b + 1 < m and estimate(first, guess_b + 1) + overhead <= max_length:
            guess_b += 1
        b = largest(first, m - 1, guess_b, lambda x: fits(first, x, with_system))
        guess_ctx = 0
        while guess_ctx < first and estimate(first - guess_ctx - 1, b) + overhead <= max_length:
            guess_ctx += 1
        ctx = largest(0, first, guess_ctx, lambda c: fits(first - c, b, with_system))
        tokens, r = measure.tokens((first - ctx, b, with_system))
        windows.append((tokens, r.spans[ctx:]))  # context units' spans are not trained
        first = b + 1
    return windows


def shorten_context(
    plan: Plan, tokenizer: HFTokenizer, conv: Conversation, turns: list[Turn], max_length: int,
    sample: RenderedConversation | None = None, encoded: Encoded | None = None,
) -> tuple[Encoded, list[Span]] | None:
    """An over-long per-turn sample (training ``turns[-1]``) with the latest context that fits max_length.

    Context is cut at turn boundaries (before a client turn); the system prompt is kept when it fits with
    the reply's own client turn. Returns (tokens, trained spans), or None when even the client turn
    and the reply alone do not fit. Every length is measured exactly, by bisection: about log2(turns)
    renders. ``sample``/``encoded``: the whole sample and its tokens, whose pieces give the lengths (see
    ``_Measure``).
    """
    name = where(conv)
    system = [turns[0]] if turns[0].role == "system" else []
    body = turns[len(system) :]
    cuts = [j for j, t in enumerate(body) if t.role == "client"]  # context starts, earliest first
    measure = _Measure(plan, tokenizer, sample, encoded)

    def length(cut: int, with_system: bool) -> int:
        def render() -> RenderedConversation:
            window = (system if with_system else []) + body[cut:]
            return plan.sample(tokenizer, window, f"{name} turn {len(turns) - 1} (context from turn {cut})")

        return measure.length((cut, with_system), render)

    with_system = bool(system)
    if length(cuts[-1], with_system) > max_length and system:
        with_system = False
    if length(cuts[-1], with_system) > max_length:
        return None
    lo, hi = 0, len(cuts) - 1  # cuts[hi] fits; find the earliest cut that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if length(cuts[mid], with_system) <= max_length:
            hi = mid
        else:
            lo = mid + 1
    tokens, r = measure.tokens((cuts[hi], with_system))
    return tokens, r.spans


class _Measure:
    """Exact token lengths of candidate windows, by key; their tokens for the windows kept.

    With the tokenizer's pieces (soulchat/data/pieces.py) and the whole text's tokens falling on its
    pieces, a candidate's length is looked up piece by piece, and a kept window's tokens are put together
    from them (spot-checked against tokenizing it); otherwise each candidate is tokenized.
    """

    def __init__(self, plan: Plan, tokenizer: HFTokenizer, whole: RenderedConversation | None,
                 encoded: Encoded | None) -> None:
        self.plan, self.tokenizer = plan, tokenizer
        pieces = plan.encoder.pieces
        self.table = (pieces.table(whole.text, encoded)
                      if pieces is not None and whole is not None and encoded is not None else None)
        self.pieces = pieces if self.table is not None else None
        self.measured: dict[tuple, tuple[int, RenderedConversation, Encoded | None]] = {}

    def _tokenize(self, text: str) -> Encoded:
        return self.plan.encoder(self.tokenizer, [text])[0]

    def _ids_and_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        encoded = self._tokenize(text)
        return encoded.ids, encoded.offsets

    def length(self, key: tuple, render) -> int:
        """The tokens of the window ``render()`` gives (rendered once per key)."""
        if key not in self.measured:
            r = render()
            if self.pieces is not None:
                self.measured[key] = (self.pieces.length(r.text, self.table), r, None)
            else:
                encoded = self._tokenize(r.text)
                self.measured[key] = (len(encoded), r, encoded)
        return self.measured[key][0]

    def tokens(self, key: tuple) -> tuple[Encoded, RenderedConversation]:
        """The tokens and render of a measured window."""
        n, r, encoded = self.measured[key]
        if encoded is None:
            ids, offsets = self.pieces.window(r.text, self.table, self._ids_and_offsets)
            encoded = Encoded(ids, offsets=offsets)
            if len(encoded) != n:
                raise PieceCheckError(f"a window measured {n} tokens and holds {len(encoded)}: this is a bug in "
                                      "soulchat, please report it")
        return encoded, r
