"""The held-out split: which conversations are kept for evaluation, decided by a hash of their id.

Whole conversations are held out for evaluation, never rows, so the windows of a conversation split at
--max-length all land on the same side. A conversation is held out when a hash of (eval_seed, its id)
falls below ``eval_fraction`` (``is_heldout``): the choice depends on nothing else (not on reading order,
other records, the tokenizer or the training seed), and a conversation keeps its side when the corpus
grows. Records sharing an id share a side.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from typing import Any


def check_eval_options(eval_fraction: Any, eval_seed: Any) -> tuple[float, int]:
    """(eval_fraction, eval_seed) as (float, int); a TypeError/ValueError names the flag and the range."""
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, numbers.Real):
        raise TypeError(f"eval_fraction={eval_fraction!r}: must be a number in [0, 1) (--eval-fraction)")
    if not (math.isfinite(eval_fraction) and 0.0 <= eval_fraction < 1.0):
        raise ValueError(
            f"eval_fraction={eval_fraction!r}: must be in [0, 1), the fraction of conversations held out "
            "for evaluation (--eval-fraction); 0 holds out nothing"
        )
    if isinstance(eval_seed, bool) or not isinstance(eval_seed, numbers.Integral):
        raise TypeError(f"eval_seed={eval_seed!r}: must be an integer (--eval-seed)")
    return float(eval_fraction), int(eval_seed)


def _heldout_threshold(eval_fraction: float) -> int:
    # A conversation is held out when its 64-bit hash is below fraction * 2**64.
    return int(eval_fraction * 2.0**64)


def _split_hash(conversation_id: str, eval_seed: int) -> int:
    # blake2b, 8-byte digest: about 0.5 us per id, uniform, and the same on every machine and Python
    # (unlike hash(), which is salted per process).
    key = f"{eval_seed}:{conversation_id}".encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big")


def is_heldout(conversation_id: str, eval_fraction: float, eval_seed: int = 0) -> bool:
    """True when the conversation with this id belongs to the held-out side of the split.

    Deterministic in (id, eval_fraction, eval_seed) only; raising the fraction only adds conversations
    to the held-out side.
    """
    eval_fraction, eval_seed = check_eval_options(eval_fraction, eval_seed)
    return _split_hash(str(conversation_id), eval_seed) < _heldout_threshold(eval_fraction)


class HeldoutSplit:
    """The split of one prepare() run: ``holds_out(conv_id)`` for each conversation read."""

    def __init__(self, eval_fraction: float, eval_seed: int) -> None:
        self.eval_seed = int(eval_seed)
        self._threshold = _heldout_threshold(float(eval_fraction))

    def holds_out(self, conversation_id: str) -> bool:
        return _split_hash(conversation_id, self.eval_seed) < self._threshold
