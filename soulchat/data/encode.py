"""Tokenization with character offsets, and the token rule that turns character spans into a mask.

The rendered text is always tokenized with ``add_special_tokens=False``, as ``apply_chat_template``
does, so a chat template that writes its own bos gets exactly one.

Token rule at span edges: a token is trained iff its character range lies inside a counselor span.
A token straddling a span edge (a byte-level BPE merge of the header's last character with the first
character of the reply, for example) is not trained, so a header character is never a target; such
tokens are counted as ``stats["straddling_tokens"]`` (0 for the usual chat templates, whose headers end
in a special token or a newline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from soulchat.data.templates import Span, TemplateError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as HFTokenizer



class _Encoder:
    """Batched tokenization with untrimmed character offsets, add_special_tokens=False.

    Uses a private copy of the fast tokenizer's Rust backend without its post-processor: with
    add_special_tokens=False a post-processor adds no tokens, but a ByteLevel one trims the offsets of
    " word" tokens to "word", which would hide a header space inside a counselor span. The copy also has
    truncation and padding off whatever the tokenizer was last called with. Its ids are checked against
    ``tokenizer(text, add_special_tokens=False)`` on the probes; on any difference the tokenizer itself
    is used instead.
    """

    def __init__(self, tokenizer: HFTokenizer) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not getattr(tokenizer, "is_fast", True):
            raise TemplateError(
                f"{type(tokenizer).__name__} is not a fast (Rust `tokenizers`) tokenizer; rendering needs "
                "character offsets: load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
            )
        from tokenizers import Tokenizer

        self.raw = Tokenizer.from_str(backend.to_str())
        self.raw.post_processor = None
        self.raw.no_truncation()
        self.raw.no_padding()
        self.use_raw = True

    def __call__(self, tokenizer: HFTokenizer, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        # ids: int32 [L]; offsets: int64 [L, 2]
        if not texts:
            return []
        if self.use_raw:
            encs = self.raw.encode_batch(texts, add_special_tokens=False)
            return [
                (np.asarray(e.ids, dtype=np.int32), np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2))
                for e in encs
            ]
        out = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=False)
        return [
            (np.asarray(ids, dtype=np.int32), np.asarray(offs, dtype=np.int64).reshape(-1, 2))
            for ids, offs in zip(out["input_ids"], out["offset_mapping"])
        ]

    def check_against(self, tokenizer: HFTokenizer, texts: list[str]) -> None:
        for text, (ids, _) in zip(texts, self(tokenizer, texts)):
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids.tolist() != list(expected):
                self.use_raw = False
                return


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


