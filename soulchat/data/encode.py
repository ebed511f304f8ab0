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

Offsets without asking the tokenizer for them
---------------------------------------------
Asking for offsets costs the tokenizer itself: ``encode_batch`` converts every token's byte offsets to
character offsets through a hash map of every byte of the text, and keeps each token's string;
``encode_batch_fast`` does neither (on the bundled tokenizer ~6% less tokenizer CPU, and its encodings
are ~5x cheaper to free). For a byte-level BPE (``_byte_lengths``: a ByteLevel pre-tokenizer that adds
no prefix space, all 256 of its byte characters in the vocabulary, no byte fallback or subword affixes,
added tokens that strip nothing) each token is a run of the text's UTF-8 bytes, one per character of its
vocabulary string, so the offsets follow from the ids alone: a table of byte lengths, a cumulative sum,
and the tokenizer's rule from bytes to characters (a token covers every character it holds a byte of,
so the two tokens of a character split in two both cover all of it; ``_char_offsets``). A text whose
token bytes do not add up to its own is tokenized again with offsets; the probes, the first texts and
one in 512 afterwards are tokenized with offsets too and must match exactly (OffsetCheckError
otherwise). Masks then come from every offset, for a whole batch at once (``_batch_masks``).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from soulchat.data.chat_template import TemplateError
from soulchat.data.pieces import Pieces, every_pre_tokenizer, piece_independent, same_tokens
from soulchat.data.templates import Span

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as HFTokenizer

_CHECK_FIRST = 16  # texts masked both ways before the query path is trusted alone ...
_CHECK_EVERY = 512  # ... then one text in this many


def _checked(n: int) -> bool:
    """Whether the n-th text (from 1) of a shortcut is also done the long way and compared."""
    return n <= _CHECK_FIRST or n % _CHECK_EVERY == 0

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


def _byte_lengths(tokenizer_json: dict) -> np.ndarray | None:
    """The UTF-8 length of each token id's text for a byte-level BPE (see the module docstring), else None.

    Ids no text can produce (vocabulary strings outside the byte alphabet, unused ids) get a length no text
    has, so a text holding one fails the per-text byte count and is tokenized again with offsets.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    ok, _ = _ordered_offsets(tokenizer_json)
    model = tokenizer_json.get("model") or {}
    pre_tokenizer = tokenizer_json.get("pre_tokenizer")
    has_byte_level = not every_pre_tokenizer(pre_tokenizer, lambda pre: pre.get("type") != "ByteLevel")
    # add_prefix_space writes a space byte the text does not have before every piece.
    prefix_space = not every_pre_tokenizer(pre_tokenizer, lambda pre: not (pre.get("type") == "ByteLevel"
                                                                           and pre.get("add_prefix_space")))
    if (not ok or not has_byte_level or prefix_space or model.get("byte_fallback")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")):
        return None
    vocab: dict[str, int] = model.get("vocab") or {}
    alphabet = set(ByteLevel.alphabet())
    if not alphabet <= vocab.keys():
        return None  # a byte without a token: BPE could emit an unknown token
    added = tokenizer_json.get("added_tokens", [])
    size = 1 + max([*vocab.values(), *(t["id"] for t in added)], default=-1)
    unusable = 1 << 40
    lengths = np.full(size, unusable, dtype=np.int64)
    for token, i in vocab.items():
        lengths[i] = len(token) if token and alphabet.issuperset(token) else unusable
    for t in added:
        lengths[t["id"]] = len(t["content"].encode("utf-8")) or unusable
    return lengths


def _char_offsets(texts: list[str], raws: list[bytes], ids: np.ndarray, counts: np.ndarray,
                  byte_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Character offsets [T, 2] of the tokens of a batch of texts laid end to end, from their byte
    lengths, as the tokenizer computes them; whether each text's tokens hold exactly its bytes (bool
    [len(texts)]); and each text's first character in the batch ([len(texts) + 1], the total last).

    ``ids``: every text's ids end to end, ``counts``: tokens per text, ``raws``: each text in UTF-8.
    Positions restart at each text, so a text whose token bytes do not add up (its offsets are then
    wrong, and clipped into the batch) leaves the others right.
    """
    n_bytes = np.fromiter(map(len, raws), dtype=np.int64, count=len(raws))
    byte_base = np.zeros(len(raws) + 1, dtype=np.int64)
    np.cumsum(n_bytes, out=byte_base[1:])
    first_token = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=first_token[1:])

    lengths = byte_lengths[ids]
    cum = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cum[1:])
    exact = cum[first_token[1:]] - cum[first_token[:-1]] == n_bytes
    # Each token's end in the batch's bytes: its end within its text plus the text's first byte.
    ends = cum[1:] + np.repeat(byte_base[:-1] - cum[first_token[:-1]], counts)
    # The character holding each byte of the batch. A token covers every character it holds a byte of
    # (the parts of a character split over two tokens each cover all of it): from the character of its
    # first byte to the one of its last.
    data = np.frombuffer(b"".join(raws), dtype=np.uint8)
    char_of = np.cumsum((data & 0xC0) != 0x80, dtype=np.int32) - 1  # a batch holds far fewer than 2**31 bytes
    char_base = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)), out=char_base[1:])
    offsets = np.zeros((len(ids), 2), dtype=np.int64)
    if len(data):
        last = len(data) - 1
        offsets[:, 0] = char_of[np.clip(ends - lengths, 0, last)]
        offsets[:, 1] = char_of[np.clip(ends - 1, 0, last)] + 1
    return offsets, exact, char_base


class OffsetCheckError(RuntimeError):
    """Masks from offset queries, or offsets from byte lengths, differ from what every offset the
    tokenizer gives says: a bug in soulchat."""


class Encoded:
    """One text's token ids, with its mask against character spans; offsets are read only if needed.

    ids: int32 [L]. ``offsets`` (int64 [L, 2]) is built on first use; ``mask`` and
    ``tokens_starting_before`` use a few offset queries instead when the offsets are ordered and covering.
    A mask computed with its whole batch (``_batch_masks``) comes with the tokens, in ``_memo``.
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
        # (spans, mask, the sum over spans of the tokens starting before each span's end) of the last
        # mask from queries, or given with the tokens (``_wrap_by_bytes`` masks a whole batch at once).
        self._memo = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = np.asarray(self._encoding.offsets, dtype=np.int64).reshape(-1, 2)
        return self._offsets

    def mask(self, spans: Sequence[Span]) -> tuple[np.ndarray, np.ndarray, int]:
        """(trained bool [L], span index int64 [L] or -1, straddling tokens): see ``_mask``."""
        if self._memo is not None and self._memo[0] is spans:
            return self._memo[1]
        if not self._queries:
            return _mask(self.offsets, spans)
        ends: list[int] = []
        got = _mask_by_queries(self._encoding, len(self.ids), self._text_len, spans, ends)
        if self._check:
            if not self.queries_agree(spans, got):
                raise OffsetCheckError(
                    "the token mask from offset queries differs from the mask from every offset "
                    f"(spans {list(spans)[:4]}...): this is a bug in soulchat, please report it"
                )
            self._check_starting_before(ends, [e for _, e in spans])
        self._memo = (spans, got, sum(ends))
        return got

    def tokens_before_span_ends(self, spans: Sequence[Span]) -> int:
        """The sum over spans of the tokens starting before each span's end (from the mask's queries)."""
        if self._memo is not None and self._memo[0] is spans:
            return self._memo[2]
        if not self._queries:
            return int(self.tokens_starting_before([e for _, e in spans]).sum())
        self.mask(spans)
        return self._memo[2]

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


class Encoder:
    """Batched tokenization, add_special_tokens=False, giving ``Encoded`` texts.

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
        # Offsets from the ids alone (module docstring); None: asked from the tokenizer.
        self.byte_lengths = _byte_lengths(tokenizer_json)
        self._by_bytes = 0  # texts given offsets from byte lengths (drives their spot checks)
        # Windows of over-long texts from the pieces of the whole text (soulchat/data/pieces.py).
        self.pieces = (Pieces(tokenizer_json.get("added_tokens", []), self.raw)
                       if piece_independent(tokenizer_json, self.raw.encode_special_tokens) else None)
        self._encoded = 0  # texts encoded with offset queries (drives the both-ways checks)

    def __call__(self, tokenizer: HFTokenizer, texts: list[str]) -> list[Encoded]:
        return self.wrap(texts, self.encode(tokenizer, texts))

    def encode(self, tokenizer: HFTokenizer, texts: list[str]):
        """The tokenizer's raw output for ``texts``; ``wrap`` turns it into ``Encoded`` texts.

        Split so that a tokenizing thread holds the GIL as little as possible: the Rust call releases
        it, and everything per text (ids to numpy, the checks) happens in ``wrap``, in the caller's thread.
        """
        if not texts:
            return []
        if not self.use_raw:
            return tokenizer(texts, return_offsets_mapping=True, add_special_tokens=False)
        if self.byte_lengths is not None:
            return self.raw.encode_batch_fast(texts, add_special_tokens=False)
        return self.raw.encode_batch(texts, add_special_tokens=False)

    def wrap(self, texts: list[str], raw, spans_of: list[Sequence[Span]] | None = None) -> list[Encoded]:
        """``encode``'s output as ``Encoded`` texts; ``spans_of`` (each text's spans), when given, may be
        masked ahead for the whole batch (``mask`` with those very span lists then costs nothing)."""
        if not texts:
            return []
        if not self.use_raw:
            return [Encoded(np.asarray(ids, dtype=np.int32),
                             offsets=np.asarray(offs, dtype=np.int64).reshape(-1, 2))
                    for ids, offs in zip(raw["input_ids"], raw["offset_mapping"])]
        if self.byte_lengths is not None:
            return self._wrap_by_bytes(texts, raw, spans_of)
        return self._wrap_with_offsets(texts, raw)

    def _wrap_with_offsets(self, texts: list[str], raw) -> list[Encoded]:
        """Texts tokenized with offsets (encode_batch): masks from offset queries where they are exact."""
        out = []
        for text, e in zip(texts, raw):
            queries = self.queries and (self._form is None or unicodedata.is_normalized(self._form, text))
            check = False
            if queries:
                self._encoded += 1
                check = _checked(self._encoded)
            ids = e.ids
            out.append(Encoded(np.fromiter(ids, np.int32, len(ids)), encoding=e, queries=queries, check=check,
                                text_len=len(text)))
        return out

    def _by_bytes_or_none(self, texts: list[str], raw, spans_of: list[Sequence[Span]] | None = None
                          ) -> list[Encoded | None]:
        """Texts tokenized without offsets (encode_batch_fast), given offsets from their byte lengths;
        None for a text whose token bytes do not add up to its own (or that a normalizer would change).
        ``spans_of``: each text's spans, masked for the whole batch at once (``_batch_masks``)."""
        id_lists = [e.ids for e in raw]
        # fromiter with a count: ~40% faster than np.array on a list of Python ints.
        ids = [np.fromiter(x, np.int32, len(x)) for x in id_lists]
        counts = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        raws = [t.encode("utf-8") for t in texts]
        flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        offsets, exact, char_base = _char_offsets(texts, raws, flat, counts, self.byte_lengths)
        if self._form is not None:
            exact &= np.fromiter((unicodedata.is_normalized(self._form, t) for t in texts), bool, len(texts))
        # Masks need every offset of the batch in order: only when every text's are right (a text
        # whose are not is tokenized again and masked on its own).
        memos = _batch_masks(offsets, counts, char_base, spans_of) if spans_of is not None and exact.all() else None
        local = offsets - np.repeat(char_base[:-1], counts)[:, None]
        out: list[Encoded | None] = []
        start = 0
        for i, (text_ids, ok) in enumerate(zip(ids, exact.tolist())):
            end = start + len(text_ids)
            if ok:
                encoded = Encoded(text_ids, offsets=local[start:end])
                if memos is not None:
                    encoded._memo = (spans_of[i], *memos[i])
                out.append(encoded)
            else:
                out.append(None)
            start = end
        return out

    def _wrap_by_bytes(self, texts: list[str], raw, spans_of: list[Sequence[Span]] | None = None
                       ) -> list[Encoded]:
        out = self._by_bytes_or_none(texts, raw, spans_of)
        again = [i for i, e in enumerate(out) if e is None]
        checked = []
        for i, e in enumerate(out):
            if e is not None:
                self._by_bytes += 1
                if _checked(self._by_bytes):
                    checked.append(i)
        if again or checked:
            redo = [texts[i] for i in again + checked]
            with_offsets = self._wrap_with_offsets(redo, self.raw.encode_batch(redo, add_special_tokens=False))
            for i, e in zip(again, with_offsets):
                out[i] = e
            for i, e in zip(checked, with_offsets[len(again):]):
                if not _same_ids_and_offsets(out[i], e) or (spans_of is not None
                                                             and not _memo_agrees(out[i], e, spans_of[i])):
                    raise OffsetCheckError(
                        "token offsets from byte lengths, or a batch's masks, differ from the tokenizer's "
                        f"offsets (text {texts[i][:60]!r}...): this is a bug in soulchat, please report it"
                    )
        return out

    def check_byte_lengths(self, texts: list[str]) -> None:
        """On the probes: offsets from byte lengths must equal the tokenizer's exactly, else ask for them."""
        if self.byte_lengths is None or not texts:
            return
        fast = self._by_bytes_or_none(texts, self.raw.encode_batch_fast(texts, add_special_tokens=False))
        slow = self._wrap_with_offsets(texts, self.raw.encode_batch(texts, add_special_tokens=False))
        if not all(f is not None and _same_ids_and_offsets(f, e) for f, e in zip(fast, slow)):
            self.byte_lengths = None

    def check_queries(self, encodings: list[Encoded], spans_of: list[Sequence[Span]]) -> None:
        """On the probes: masks from offset queries must equal masks from every offset, else use the latter."""
        if not all(e.queries_agree(spans) for e, spans in zip(encodings, spans_of)):
            self.queries = False
            for e in encodings:  # the probes themselves are then validated from every offset too
                e._queries = False

    def check_against(self, tokenizer: HFTokenizer, texts: list[str]) -> None:
        """On the probes: the private copy must give the tokenizer's own ids, else the tokenizer is used."""
        self.check_byte_lengths(texts)
        for text, encoded in zip(texts, self(tokenizer, texts)):
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            if encoded.ids.tolist() != list(expected):
                self.use_raw = False
                self.pieces = None  # the pieces are the raw tokenizer's
                self.byte_lengths = None  # ... and so are the ids the byte lengths read
                return

    def check_pieces(self, texts: list[str], encodings: list[Encoded]) -> None:
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
    inside, k, straddling = _mask_flags(offsets, np.asarray(spans, dtype=np.int64))
    return inside, np.where(inside, k, -1), int(np.count_nonzero(straddling))


def _mask_flags(offsets: np.ndarray, span_arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_mask`` as flags: (inside [L], the last span starting at or before each token [L], straddling [L]).

    span_arr: [K, 2], K >= 1, sorted and disjoint. Holds for texts laid end to end too (their spans
    shifted alike): a token never lies inside or overlaps a span of another text.
    """
    starts, ends = offsets[:, 0], offsets[:, 1]
    k = np.searchsorted(span_arr[:, 0], starts, side="right") - 1  # last span starting at or before
    kk = np.maximum(k, 0)
    s, e = span_arr[kk, 0], span_arr[kk, 1]
    inside = (k >= 0) & (starts >= s) & (ends <= e) & (starts < e)
    # Straddling: overlaps some span without lying inside it. A token can only overlap span kk or the
    # next one (spans are disjoint and sorted by start).
    nxt = np.minimum(k + 1, len(span_arr) - 1)
    overlaps = ((k >= 0) & (starts < e) & (ends > s)) | ((k + 1 < len(span_arr)) & (ends > span_arr[nxt, 0]))
    return inside, k, overlaps & ~inside


def _batch_masks(offsets: np.ndarray, counts: np.ndarray, char_base: np.ndarray,
                 spans_of: list[Sequence[Span]]) -> list[tuple[tuple[np.ndarray, np.ndarray, int], int]]:
    """For texts laid end to end (offsets [T, 2] in the batch's characters, ordered; ``counts`` tokens and
    ``char_base`` first character per text): each text's ``_mask`` and its sum over spans of the tokens
    starting before each span's end (``tokens_before_span_ends``), computed for the batch at once."""
    n_spans = np.fromiter(map(len, spans_of), dtype=np.int64, count=len(spans_of))
    first_token = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=first_token[1:])
    first_span = np.zeros(len(spans_of) + 1, dtype=np.int64)
    np.cumsum(n_spans, out=first_span[1:])
    spans = np.array([span for text_spans in spans_of for span in text_spans], dtype=np.int64).reshape(-1, 2)
    spans += np.repeat(char_base[:-1], n_spans)[:, None]
    n = len(offsets)
    if len(spans) and n:
        inside, k, straddling = _mask_flags(offsets, spans)
        span_index = np.where(inside, k - np.repeat(first_span[:-1], counts), -1)
    else:
        inside, span_index, straddling = np.zeros(n, bool), np.full(n, -1, np.int64), np.zeros(n, bool)
    per_text = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(straddling, out=per_text[1:])
    straddling_of = (per_text[first_token[1:]] - per_text[first_token[:-1]]).tolist()
    # Tokens starting before each span's end, within its text: the batch's count less the texts' before.
    before = np.searchsorted(offsets[:, 0], spans[:, 1], side="left") - np.repeat(first_token[:-1], n_spans)
    per_span = np.zeros(len(spans) + 1, dtype=np.int64)
    np.cumsum(before, out=per_span[1:])
    before_of = (per_span[first_span[1:]] - per_span[first_span[:-1]]).tolist()
    out = []
    for a, b, straddling_i, before_i in zip(first_token[:-1].tolist(), first_token[1:].tolist(), straddling_of,
                                           before_of):
        out.append(((inside[a:b], span_index[a:b], straddling_i), before_i))
    return out


def _memo_agrees(encoded: Encoded, again: Encoded, spans: Sequence[Span]) -> bool:
    """Whether a batch's mask of ``encoded`` equals the mask of the same text tokenized with offsets."""
    if encoded._memo is None:
        return True
    (trained, span_index, straddling), before = encoded._memo[1], encoded._memo[2]
    want = _mask(again.offsets, spans)
    return (np.array_equal(trained, want[0]) and np.array_equal(span_index, want[1]) and straddling == want[2]
            and before == int(again.tokens_starting_before([e for _, e in spans]).sum()))


def _same_ids_and_offsets(a: Encoded, b: Encoded) -> bool:
    return same_tokens((a.ids, a.offsets), (b.ids, b.offsets))
