"""Tokenization with character offsets, and the token rule that turns character spans into a mask.

The rendered text is always tokenized with ``add_special_tokens=False``, as ``apply_chat_template``
does, so a chat template that writes its own bos gets exactly one.

Token rule at span edges: a token is trained iff its character range lies inside a counselor span.
A token straddling a span edge (a byte-level BPE merge of the header's last character with the first
character of the reply, for example) is not trained, so a header character is never a target; such
tokens are counted as ``stats["straddling_tokens"]`` (0 for the usual chat templates, whose headers end
in a special token or a newline).

Masks without reading every offset
----------------------------------
Reading a text's offsets into Python costs more than its tokenization's share of the Python work: on
20k SoulChatCorpus-shaped conversations (7.7M tokens) ``Encoding.offsets`` plus the numpy conversion
took 4.7 s, against 10.2 s for the Rust tokenizer itself on two cores. When the tokenizer's pipeline
guarantees *ordered, covering* offsets, the mask needs only a few offsets per span, found by
``char_to_token`` / ``token_to_chars`` (``_mask_by_queries``: 0.1-0.3 s for the same corpus). Ordered and
covering means: token start and end offsets never decrease along the text, every token covers at least
one character and every character is covered. That holds (``_ordered_offsets``) for a BPE model behind
byte-level / splitting pre-tokenizers that drop no character, no normalizer (or NFC / NFKC on a text
already in that form, checked per text), and added tokens that strip no whitespace: each character's
bytes go to consecutive tokens, in order. Any other tokenizer, or text, takes the full-offsets path
(``_mask``). The first texts and one in 512 afterwards are masked both ways and compared; a difference
is a bug and stops prepare (nothing silently wrong).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from soulchat.data.pieces import Pieces, every_pre_tokenizer, piece_independent
from soulchat.data.templates import Span, TemplateError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as HFTokenizer

_CHECK_FIRST = 16  # texts masked both ways before the query path is trusted alone ...
_CHECK_EVERY = 512  # ... then one text in this many

# Pre-tokenizers that split text into pieces without dropping or adding characters (the "Removed"
# behaviour of Split / Punctuation drops them, so it is excluded below).
_SPLITTING_PRE_TOKENIZERS = {"ByteLevel", "Split", "Digits", "Punctuation", "UnicodeScripts"}
# Normalizers that are the identity on a text already in their form (unicodedata.is_normalized).
_FORM_NORMALIZERS = {"NFC", "NFKC"}


def _ordered_offsets(tokenizer_json: dict) -> tuple[bool, str | None]:
    """Whether this tokenizer's offsets are ordered and covering (see the module docstring).

    Returns (ok, form): ``form`` is the Unicode normal form a text must already be in ("NFC"/"NFKC"),
    or None when any text qualifies.
    """
    normalizer = tokenizer_json.get("normalizer")
    form = None
    if normalizer is not None:
        if normalizer.get("type") not in _FORM_NORMALIZERS:
            return False, None
        form = normalizer["type"]

    def splitting(pre: dict) -> bool:
        return pre.get("type") in _SPLITTING_PRE_TOKENIZERS and pre.get("behavior") != "Removed"

    if not every_pre_tokenizer(tokenizer_json.get("pre_tokenizer"), splitting):
        return False, None
    if (tokenizer_json.get("model") or {}).get("type") != "BPE":
        return False, None
    if any(t.get("lstrip") or t.get("rstrip") for t in tokenizer_json.get("added_tokens", [])):
        return False, None
    return True, form


class OffsetCheckError(RuntimeError):
    """The mask from offset queries differs from the mask from every offset: a bug in soulchat."""


class _Encoded:
    """One text's token ids, with its mask against character spans; offsets are read only if needed.

    ids: int32 [L]. ``offsets`` (int64 [L, 2]) is built on first use; ``mask`` and
    ``tokens_starting_before`` use a few offset queries instead when the offsets are ordered and covering.
    """

    __slots__ = ("ids", "_encoding", "_offsets", "_queries", "_check", "_text_len", "_memo")

    def __init__(self, ids: np.ndarray, *, encoding=None, offsets: np.ndarray | None = None,
                 queries: bool = False, check: bool = False, text_len: int = 0) -> None:
        self.ids = ids
        self._encoding = encoding
        self._offsets = offsets
        self._queries = queries
        self._check = check
        self._text_len = text_len
        self._memo = None  # (spans, mask, tokens starting before each span's end) of the last query mask

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = np.asarray(self._encoding.offsets, dtype=np.int64).reshape(-1, 2)
        return self._offsets

    def mask(self, spans: Sequence[Span]) -> tuple[np.ndarray, np.ndarray, int]:
        """(trained bool [L], span index int64 [L] or -1, straddling tokens): see ``_mask``."""
        if not self._queries:
            return _mask(self.offsets, spans)
        if self._memo is not None and self._memo[0] is spans:
            return self._memo[1]
        ends: list[int] = []
        got = _mask_by_queries(self._encoding, len(self.ids), self._text_len, spans, ends)
        if self._check:
            if not self.queries_agree(spans, got):
                raise OffsetCheckError(
                    "the token mask from offset queries differs from the mask from every offset "
                    f"(spans {list(spans)[:4]}...): this is a bug in soulchat, please report it"
                )
            self._check_starting_before(ends, [e for _, e in spans])
        self._memo = (spans, got, ends)
        return got

    def tokens_before_span_ends(self, spans: Sequence[Span]) -> int:
        """The sum over spans of the tokens starting before each span's end (from the mask's queries)."""
        if not self._queries:
            return int(self.tokens_starting_before([e for _, e in spans]).sum())
        self.mask(spans)
        return sum(self._memo[2])

    def queries_agree(self, spans: Sequence[Span], got=None) -> bool:
        """Whether the mask from offset queries equals the mask from every offset (True without queries)."""
        if not self._queries:
            return True
        got = _mask_by_queries(self._encoding, len(self.ids), self._text_len, spans) if got is None else got
        want = _mask(self.offsets, spans)
        return np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]

    def tokens_starting_before(self, positions: Sequence[int]) -> np.ndarray:
        """For each character position, how many tokens start before it (int64 [len(positions)])."""
        if not self._queries:
            return np.searchsorted(self.offsets[:, 0], np.asarray(positions, dtype=np.int64), side="left")
        n = len(self.ids)
        got = [_first_start_at_least(self._encoding, int(p), n, self._text_len) for p in positions]
        if self._check:
            self._check_starting_before(got, positions)
        return np.array(got, dtype=np.int64)

    def _check_starting_before(self, got: list[int], positions: Sequence[int]) -> None:
        want = np.searchsorted(self.offsets[:, 0], np.asarray(positions, dtype=np.int64), side="left")
        if not np.array_equal(np.asarray(got, dtype=np.int64), want):
            raise OffsetCheckError(
                f"token counts from offset queries {list(got)[:8]} differ from the offsets' "
                f"{want.tolist()[:8]}: this is a bug in soulchat, please report it"
            )


def _first_covering(encoding, pos: int, n: int, text_len: int) -> int:
    """The first token whose end lies after character ``pos`` (n past the text): the first covering it."""
    if pos >= text_len:
        return n
    t = encoding.char_to_token(pos)
    if t is None:  # impossible for covering offsets; the checks would catch a wrong guess
        raise OffsetCheckError(f"character {pos} is covered by no token: this is a bug in soulchat")
    return t


def _first_start_at_least(encoding, pos: int, n: int, text_len: int, covering: int | None = None) -> int:
    """The first token starting at or after character ``pos`` (n when none); ``covering``: the first
    token covering ``pos`` when already known."""
    t = _first_covering(encoding, pos, n, text_len) if covering is None else covering
    # Tokens covering pos that start before it (a merge across pos, or the other bytes of the character
    # before) come first; at most a few.
    while t < n and encoding.token_to_chars(t)[0] < pos:
        t += 1
    return t


def _mask_by_queries(encoding, n: int, text_len: int, spans: Sequence[Span],
                     ends: list[int] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """``_mask`` for ordered, covering offsets, from a few offset queries per span.

    With ordered offsets the tokens inside span [s, e) are the run [a, b): a = first token starting at
    or after s, b = first token ending after e. The tokens overlapping it are the run [f, c): f = first
    token ending after s, c = first token starting at or after e. Straddling tokens are those of the union
    of the overlap runs (consecutive runs meet in shared tokens only) not inside a span. ``ends``: a list
    to which each span's c (the tokens starting before its end) is appended.
    """
    trained = np.zeros(n, dtype=bool)
    span_index = np.full(n, -1, dtype=np.int64)
    overlapping = inside = 0
    previous_c = -1
    for k, (s, e) in enumerate(spans):
        f = _first_covering(encoding, s, n, text_len)
        a = _first_start_at_least(encoding, s, n, text_len, f)
        b = _first_covering(encoding, e, n, text_len)
        c = _first_start_at_least(encoding, e, n, text_len, b)
        if b > a:
            trained[a:b] = True
            span_index[a:b] = k
            inside += b - a
        overlapping += max(0, c - f) - max(0, previous_c - f)
        previous_c = c
        if ends is not None:
            ends.append(c)
    return trained, span_index, overlapping - inside


class _Encoder:
    """Batched tokenization, add_special_tokens=False, giving ``_Encoded`` texts.

    Uses a private copy of the fast tokenizer's Rust backend without its post-processor: with
    add_special_tokens=False a post-processor adds no tokens, but a ByteLevel one trims the offsets of
    " word" tokens to "word", which would hide a header space inside a counselor span. The copy also has
    truncation and padding off whatever the tokenizer was last called with. Its ids are checked against
    ``tokenizer(text, add_special_tokens=False)`` on the probes; on any difference the tokenizer itself
    is used instead (with full offsets).
    """

    def __init__(self, tokenizer: HFTokenizer) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not getattr(tokenizer, "is_fast", True):
            raise TemplateError(
                f"{type(tokenizer).__name__} is not a fast (Rust `tokenizers`) tokenizer; rendering needs "
                "character offsets: load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
            )
        from tokenizers import Tokenizer

        spec = backend.to_str()
        self.raw = Tokenizer.from_str(spec)
        self.raw.post_processor = None
        self.raw.no_truncation()
        self.raw.no_padding()
        self.use_raw = True
        tokenizer_json = json.loads(spec)
        self.queries, self._form = _ordered_offsets(tokenizer_json)
        # Windows of over-long texts from the pieces of the whole text (soulchat/data/pieces.py).
        self.pieces = (Pieces(tokenizer_json.get("added_tokens", []), self.raw)
                       if piece_independent(tokenizer_json, self.raw.encode_special_tokens) else None)
        self._encoded = 0  # texts encoded with offset queries (drives the both-ways checks)

    def __call__(self, tokenizer: HFTokenizer, texts: list[str]) -> list[_Encoded]:
        return self.wrap(texts, self.encode(tokenizer, texts))

    def encode(self, tokenizer: HFTokenizer, texts: list[str]):
        """The tokenizer's raw output for ``texts``; ``wrap`` turns it into ``_Encoded`` texts.

        Split so that a tokenizing thread holds the GIL as little as possible: the Rust call releases
        it, and everything per text (ids to numpy, the checks) happens in ``wrap``, in the caller's thread.
        """
        if not texts:
            return []
        if not self.use_raw:
            return tokenizer(texts, return_offsets_mapping=True, add_special_tokens=False)
        return self.raw.encode_batch(texts, add_special_tokens=False)

    def wrap(self, texts: list[str], raw) -> list[_Encoded]:
        if not texts:
            return []
        if not self.use_raw:
            return [_Encoded(np.asarray(ids, dtype=np.int32),
                             offsets=np.asarray(offs, dtype=np.int64).reshape(-1, 2))
                    for ids, offs in zip(raw["input_ids"], raw["offset_mapping"])]
        out = []
        for text, e in zip(texts, raw):
            queries = self.queries and (self._form is None or unicodedata.is_normalized(self._form, text))
            check = False
            if queries:
                self._encoded += 1
                check = self._encoded <= _CHECK_FIRST or self._encoded % _CHECK_EVERY == 0
            ids = e.ids
            # fromiter with a count: ~40% faster than np.array on a list of Python ints.
            out.append(_Encoded(np.fromiter(ids, np.int32, len(ids)), encoding=e, queries=queries, check=check,
                                text_len=len(text)))
        return out

    def check_queries(self, encodings: list[_Encoded], spans_of: list[Sequence[Span]]) -> None:
        """On the probes: masks from offset queries must equal masks from every offset, else use the latter."""
        if not all(e.queries_agree(spans) for e, spans in zip(encodings, spans_of)):
            self.queries = False
            for e in encodings:  # the probes themselves are then validated from every offset too
                e._queries = False

    def check_against(self, tokenizer: HFTokenizer, texts: list[str]) -> None:
        for text, encoded in zip(texts, self(tokenizer, texts)):
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            if encoded.ids.tolist() != list(expected):
                self.use_raw = False
                self.pieces = None  # the pieces are the raw tokenizer's
                return

    def check_pieces(self, texts: list[str], encodings: list[_Encoded]) -> None:
        """On the probes: texts put together from their own pieces must equal their tokens, else no pieces."""
        if self.pieces is None:
            return
        if not all(self.pieces.reproduces(text, encoded) for text, encoded in zip(texts, encodings)):
            self.pieces = None
            return
        self.pieces.put_together = 0  # the probes do not count towards the spot checks of real windows


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
