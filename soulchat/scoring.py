"""Automatic reply metrics: BLEU-1..4 and ROUGE-1/2/L, character-level for Chinese.

The SoulChat paper scores generated counselor replies against the reference replies with BLEU-1..4 and
ROUGE-1/2/L. Chinese has no spaces between words, so scores are computed over characters there; other
scripts are scored over words. The metrics themselves come from maintained libraries (sacrebleu for
BLEU, Google's rouge-score for ROUGE); this module only decides how text is split into tokens, so both
libraries see exactly the same tokens.

Tokenization for scoring (``tokenize_for_scoring``), applied to hypotheses and references alike:
  1. Unicode NFKC normalisation (full-width Latin letters and digits become ASCII: "ＡＩ１" -> "AI1"),
     then lower-casing.
  2. Each CJK character is one token: Han ideographs (all CJK Unified Ideographs blocks and extensions,
     compatibility ideographs, 々 〆 〇), Hiragana and Katakana.
  3. Any other run of letters, digits, marks or underscores is one word token (English, numbers, Hangul
     words, ...); whitespace only separates tokens.
  4. Punctuation and symbols (any other non-space character: "，。！？、…", ".,!?", emoji) are dropped by
     default, because nearly every reply contains "，" and "。" and they would inflate every unigram
     score; with ``punctuation="keep"`` each such character is a token of its own.
Example: "我很难过，I feel sad." -> ["我", "很", "难", "过", "i", "feel", "sad"].

BLEU-n (n = 1..4) is corpus-level cumulative BLEU (Papineni et al. 2002): the brevity penalty over the
whole corpus times the geometric mean of the clipped 1..n-gram precisions, with no smoothing by default
(so BLEU-n is 0 when no n-gram of order <= n matches), computed by ``sacrebleu.metrics.BLEU`` with
``tokenize="none"`` over the tokens above. ROUGE-1/2/L is the F1 of ``rouge_score.rouge_scorer`` for
each (reply, reference) pair with the tokens above, averaged over pairs. All scores are in [0, 100].
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

PUNCTUATION_MODES = ("drop", "keep")
BLEU_SMOOTHING = ("none", "exp", "floor", "add-k")  # sacrebleu's smooth_method choices
BLEU_ORDERS = (1, 2, 3, 4)
ROUGE_TYPES = {
    "rouge_1": "rouge1",
    "rouge_2": "rouge2",
    "rouge_l": "rougeL",
}  # report key -> rouge-score name
METRIC_KEYS = tuple(f"bleu_{n}" for n in BLEU_ORDERS) + tuple(ROUGE_TYPES)

TOKENIZATION = (
    "NFKC-normalised and lower-cased; every CJK character (Han ideographs incl. extensions and "
    "compatibility ideographs, Hiragana, Katakana) is one token; any other run of letters/digits/marks/"
    "underscores is one word token; whitespace separates tokens; punctuation and symbols are {punct}"
)

# Han ideographs (BMP blocks, iteration/closing marks, compatibility, supplementary extensions B..H),
# Hiragana, Katakana (incl. the prolonged sound mark and phonetic extensions).
_CJK = (
    "\u3005-\u3007\u3021-\u3029\u3038-\u303b\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\U00020000-\U0003ffff\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff"
)
# Alternatives in order: one CJK character | a run of word characters that are not CJK | one other
# non-space character (punctuation, symbols, emoji).
_TOKEN_RE = re.compile(rf"(?P<cjk>[{_CJK}])|(?P<word>[^\W{_CJK}]+)|(?P<other>[^\w\s])")


def tokenization_description(punctuation: str = "drop") -> str:
    """The scoring tokenization in words, as written into evaluation reports."""
    _check_punctuation(punctuation)
    return TOKENIZATION.format(punct="dropped" if punctuation == "drop" else "kept, one token per character")


def _check_punctuation(punctuation: str) -> None:
    if punctuation not in PUNCTUATION_MODES:
        raise ValueError(f"punctuation={punctuation!r}: choose one of {PUNCTUATION_MODES}")


def tokenize_for_scoring(text: str, punctuation: str = "drop") -> list[str]:
    """Split ``text`` into scoring tokens (see the module docstring): CJK characters, words, punctuation."""
    _check_punctuation(punctuation)
    text = unicodedata.normalize("NFKC", text).lower()
    keep_other = punctuation == "keep"
    return [m.group() for m in _TOKEN_RE.finditer(text) if m.lastgroup != "other" or keep_other]


class ScoringTokenizer:
    """``tokenize_for_scoring`` behind the interface rouge-score expects (an object with ``tokenize``)."""

    def __init__(self, punctuation: str = "drop") -> None:
        _check_punctuation(punctuation)
        self.punctuation = punctuation

    def tokenize(self, text: str) -> list[str]:
        return tokenize_for_scoring(text, self.punctuation)


def corpus_bleu(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]],
    max_order: int = 4,
    smoothing: str = "none",
) -> float:
    """Corpus-level cumulative BLEU-``max_order`` in [0, 100] over pre-tokenized texts, one reference each."""
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references: one reference per reply"
        )
    if smoothing not in BLEU_SMOOTHING:
        raise ValueError(f"BLEU smoothing {smoothing!r}: choose one of {BLEU_SMOOTHING}")
    if not hypotheses:
        return 0.0
    from sacrebleu.metrics import BLEU

    # Tokens never contain whitespace, so joining with spaces and tokenize="none" (which splits on
    # whitespace) hands sacrebleu exactly our tokens.
    bleu = BLEU(tokenize="none", max_ngram_order=max_order, smooth_method=smoothing, force=True)
    score = bleu.corpus_score([" ".join(h) for h in hypotheses], [[" ".join(r) for r in references]])
    return float(score.score)


def mean_rouge(
    hypotheses: Sequence[str], references: Sequence[str], punctuation: str = "drop"
) -> dict[str, float]:
    """Mean per-pair ROUGE-1/2/L F1 in [0, 100], keys ``rouge_1``, ``rouge_2``, ``rouge_l``."""
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references: one reference per reply"
        )
    if not hypotheses:
        return {key: 0.0 for key in ROUGE_TYPES}
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES.values()), tokenizer=ScoringTokenizer(punctuation))
    sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hypotheses, references):
        scores = scorer.score(ref, hyp)  # rouge-score's argument order is (target, prediction)
        for key, name in ROUGE_TYPES.items():
            sums[key] += scores[name].fmeasure
    return {key: 100.0 * total / len(hypotheses) for key, total in sums.items()}


def reply_scores(
    hypotheses: Sequence[str],
    references: Sequence[str],
    punctuation: str = "drop",
    bleu_smoothing: str = "none",
) -> dict[str, float]:
    """BLEU-1..4 and ROUGE-1/2/L of generated replies against reference replies (keys ``METRIC_KEYS``)."""
    hyp_tokens = [tokenize_for_scoring(h, punctuation) for h in hypotheses]
    ref_tokens = [tokenize_for_scoring(r, punctuation) for r in references]
    out: dict[str, float] = {
        f"bleu_{n}": corpus_bleu(hyp_tokens, ref_tokens, n, bleu_smoothing) for n in BLEU_ORDERS
    }
    out.update(mean_rouge(hypotheses, references, punctuation))
    return out


def scoring_description(punctuation: str = "drop", bleu_smoothing: str = "none") -> dict[str, Any]:
    """How the scores were computed, for the evaluation report."""
    return {
        "tokenization": tokenization_description(punctuation),
        "punctuation": punctuation,
        "bleu": (
            "sacrebleu corpus BLEU over the tokens above (tokenize='none'), cumulative BLEU-n = corpus "
            "brevity penalty x geometric mean of clipped 1..n-gram precisions, "
            f"smoothing={bleu_smoothing!r}, one reference per reply, scale 0-100"
        ),
        "rouge": (
            "rouge-score RougeScorer (rouge1, rouge2, rougeL) with the tokens above, F1 per reply averaged "
            "over replies, scale 0-100"
        ),
    }
