"""Tokens of a window put together from the tokens of the whole text it was cut from.

An over-long conversation is split into windows at turn boundaries (soulchat/data/windows.py), and finding
them measures several candidate windows each; tokenizing every candidate took ~8% more tokenizer work
than the corpus itself at max_length 1024. Most of that work is not needed: the Rust tokenizer first
splits a text at its added tokens (``<|im_start|>``, ``<|im_end|>``, ...), then normalizes, pre-tokenizes
and tokenizes each piece between them on its own. A window's text is made of the same turns, rendered
with the same template, so its pieces are (almost all) pieces of the whole conversation's text: their
tokens can be looked up instead of computed, and only new pieces (a header the whole text does not
have) are tokenized.

That holds when (``piece_independent``): no added token strips whitespace or matches single words only
(such a token takes characters from its neighbours), no added token is matched after normalization
while there is a normalizer, the pre-tokenizers treat every piece alike (not Metaspace's prepend_scheme
"first", which treats the text's first piece differently) and special tokens are split out
(``encode_special_tokens`` off). The split here reproduces the tokenizer's: leftmost-longest matches,
first of the tokens with ``normalized=False``, then of the others.

Checked three ways, none silent: the probe texts are put together from their own pieces and compared
with their tokenization (a difference turns this off, ``Encoder.check_pieces``); a whole text's tokens
must fall on its pieces exactly as split here, or that conversation's windows are tokenized instead;
and the first windows, then one in 64, are tokenized too and compared (a difference is a bug and stops
prepare: ``PieceCheckError``).
"""

from __future__ import annotations

import re
from typing import Protocol

import numpy as np

_CHECK_FIRST = 16  # windows also tokenized and compared before the pieces are trusted alone ...
_CHECK_EVERY = 64  # ... then one window in this many

# Pre-tokenizers that treat each piece on its own, wherever it stands in the text.
_PIECEWISE_PRE_TOKENIZERS = {"ByteLevel", "Split", "Digits", "Punctuation", "UnicodeScripts", "Whitespace",
                             "WhitespaceSplit", "BertPreTokenizer", "CharDelimiterSplit"}


class Tokens(Protocol):
    """A tokenized text as read here (soulchat/data/encode.py's ``Encoded`` is one): this module sits
    below encode.py and never imports it."""

    @property
    def ids(self) -> np.ndarray: ...  # int32 [L]

    @property
    def offsets(self) -> np.ndarray: ...  # int64 [L, 2], character offsets into the text


# A table of pieces: piece text -> (token ids int32 [n], offsets int64 [n, 2] from the piece's start).
Table = dict[str, tuple[np.ndarray, np.ndarray]]


def piece_independent(tokenizer_json: dict, encode_special_tokens: bool = False) -> bool:
    """Whether a text's tokens are those of its pieces between added tokens, each tokenized alone."""
    if encode_special_tokens:
        return False
    added = tokenizer_json.get("added_tokens", [])
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
        return False
    if tokenizer_json.get("normalizer") is not None and any(t.get("normalized") for t in added):
        return False

    def piecewise(pre: dict) -> bool:
        if pre.get("type") == "Metaspace":
            return pre.get("prepend_scheme", "always") != "first"
        return pre.get("type") in _PIECEWISE_PRE_TOKENIZERS

    return every_pre_tokenizer(tokenizer_json.get("pre_tokenizer"), piecewise)


def every_pre_tokenizer(pre: dict | None, accept) -> bool:
    """Whether ``accept(p)`` holds for every pre-tokenizer of a tokenizer.json ``pre_tokenizer`` entry
    (None: there is none; a Sequence: each of its members)."""
    if pre is None:
        return True
    if pre.get("type") == "Sequence":
        return all(every_pre_tokenizer(p, accept) for p in pre.get("pretokenizers", []))
    return accept(pre)


class Pieces:
    """Splits texts at added tokens like the tokenizer, and puts window tokens together from pieces.

    ``raw``: the Rust tokenizer whose pieces these are (``Encoder.raw``), for pieces not in a table.
    """

    def __init__(self, added_tokens: list[dict], raw) -> None:
        self.raw = raw
        self._passes = []
        for normalized in (False, True):
            group = {t["content"]: int(t["id"]) for t in added_tokens if bool(t.get("normalized")) == normalized
                     and t["content"]}
            if group:
                # Longest first: at one position the longest token matches (leftmost-longest).
                alternatives = sorted(group, key=len, reverse=True)
                self._passes.append((re.compile("|".join(map(re.escape, alternatives))), group))
        self.put_together = 0  # windows put together (drives the spot checks)

    def split(self, text: str) -> list[tuple[int, int, int]]:
        """The pieces of ``text``, in order: (start, end, added token id, or -1 for text between them)."""
        pieces = [(0, len(text), -1)]
        for regex, ids in self._passes:
            out = []
            for start, end, tid in pieces:
                if tid >= 0:
                    out.append((start, end, tid))
                    continue
                pos = start
                for m in regex.finditer(text, start, end):
                    if m.start() > pos:
                        out.append((pos, m.start(), -1))
                    out.append((m.start(), m.end(), ids[m.group()]))
                    pos = m.end()
                if pos < end:
                    out.append((pos, end, -1))
            pieces = out
        return pieces

    def table(self, text: str, encoded: Tokens) -> Table | None:
        """The tokens of each text piece of a tokenized text; None when its tokens do not fall on its
        pieces as split here, each piece covered exactly (then nothing is looked up: windows are tokenized)."""
        ids, offsets = encoded.ids, encoded.offsets
        starts = offsets[:, 0]
        n = len(ids)
        if n and np.any(starts[1:] < starts[:-1]):
            return None
        table: Table = {}
        t = 0
        for start, end, tid in self.split(text):
            if tid >= 0:
                if t >= n or ids[t] != tid or offsets[t, 0] != start or offsets[t, 1] != end:
                    return None
                t += 1
                continue
            u = int(np.searchsorted(starts, end, side="left"))
            # The piece's tokens must cover exactly its characters (a tokenizer that drops characters,
            # whitespace say, is not looked up: its windows are tokenized).
            if u <= t or starts[t] != start or offsets[t:u, 1].max() != end:
                return None
            piece = text[start:end]
            entry = (ids[t:u], offsets[t:u] - start)
            known = table.setdefault(piece, entry)
            if known is not entry and not (np.array_equal(known[0], entry[0])
                                           and np.array_equal(known[1], entry[1])):
                return None
            t = u
        return table if t == n else None

    def _fill(self, text: str, table: Table) -> list[tuple[int, int, int]]:
        """``split(text)``, after tokenizing its text pieces missing from ``table`` into it."""
        pieces = self.split(text)
        missing = list(dict.fromkeys(text[s:e] for s, e, tid in pieces if tid < 0 and text[s:e] not in table))
        if missing:
            for piece, e in zip(missing, self.raw.encode_batch(missing, add_special_tokens=False)):
                table[piece] = (np.array(e.ids, dtype=np.int32),
                                np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2))
        return pieces

    def length(self, text: str, table: Table) -> int:
        """The number of tokens of ``text``."""
        return sum(1 if tid >= 0 else len(table[text[s:e]][0]) for s, e, tid in self._fill(text, table))

    def assemble(self, text: str, table: Table) -> tuple[np.ndarray, np.ndarray]:
        """The token ids (int32 [L]) and offsets (int64 [L, 2]) of ``text``, put together from ``table``."""
        ids, offsets = [], []
        for s, e, tid in self._fill(text, table):
            if tid >= 0:
                ids.append(np.array([tid], dtype=np.int32))
                offsets.append(np.array([[s, e]], dtype=np.int64))
            else:
                piece_ids, piece_offsets = table[text[s:e]]
                ids.append(piece_ids)
                offsets.append(piece_offsets + s)
        if not ids:
            return np.zeros(0, np.int32), np.zeros((0, 2), np.int64)
        return np.concatenate(ids), np.concatenate(offsets)

    def window(self, text: str, table: Table, tokenize) -> tuple[np.ndarray, np.ndarray]:
        """``assemble``, spot-checked: the first windows and one in 64 are also tokenized,
        ``tokenize(text) -> (ids, offsets)``, and compared; a difference raises PieceCheckError."""
        got = self.assemble(text, table)
        self.put_together += 1
        if self.put_together <= _CHECK_FIRST or self.put_together % _CHECK_EVERY == 0:
            want = tokenize(text)
            if not same_tokens(got, want):
                raise PieceCheckError(
                    f"the tokens of a window put together from the pieces of its conversation differ from "
                    f"tokenizing it ({len(got[0])} vs {len(want[0])} tokens): this is a bug in soulchat, "
                    "please report it"
                )
        return got


    def reproduces(self, text: str, encoded: Tokens) -> bool:
        """Whether a tokenized text falls on its pieces and is put together from them exactly."""
        table = self.table(text, encoded)
        return table is not None and same_tokens(self.assemble(text, table), (encoded.ids, encoded.offsets))


def same_tokens(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether two (ids, offsets) pairs are equal."""
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


class PieceCheckError(RuntimeError):
    """A window put together from pieces differs from its tokenization: a bug in soulchat."""
