"""Automatic reply metrics: BLEU and ROUGE, in three modes that say how the text is cut into tokens.

The SoulChat paper scores generated counselor replies against the reference replies with BLEU-1..4 and
ROUGE-1/2/L. Published tables of this field compute them in different ways, so soulchat offers the
common ones by name (``--metrics``), written into every report. The n-gram statistics always come from
maintained libraries (sacrebleu, rouge-score, nltk, rouge-chinese); this module only decides the tokens.

``soulchat-char`` (the default): soulchat's own, language-neutral scoring.
  Tokenization (``tokenize_for_scoring``), applied to hypotheses and references alike:
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
  each (reply, reference) pair with the tokens above, averaged over pairs.

``chatglm``: as ChatGLM-6B's ``ptuning/main.py`` and LLaMA-Factory's ``metric.py`` compute them, the
  numbers most Chinese fine-tuning papers report. Per reply: ROUGE-1/2/L F1 from ``rouge_chinese.Rouge``
  over ``jieba.cut`` words (joined by spaces; a reply or reference with no word scores 0, as
  LLaMA-Factory does); BLEU-4 from ``nltk`` ``sentence_bleu`` over the raw characters (``list(text)``,
  punctuation and spaces included) with ``SmoothingFunction().method3``. Each score x 100, rounded to 4
  decimals per reply, then averaged over replies. Only BLEU-4 exists in this mode.

``jieba-bleu``: BLEU on jieba words, as EmoLLM's ``evaluate/metric.py``: spaces removed, ``jieba.cut``
  words; BLEU-1..4 per reply from ``nltk`` ``sentence_bleu`` with weights (1), (1/2, 1/2), (1/3 x 3),
  (1/4 x 4) and ``SmoothingFunction().method1``, averaged over replies x 100; ROUGE-1/2/L F1 from
  ``rouge_chinese`` over the same words, averaged x 100.

All scores are in [0, 100].
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
METRIC_MODES = ("soulchat-char", "chatglm", "jieba-bleu")
DEFAULT_METRIC_MODE = "soulchat-char"
# The keys each mode computes (chatglm has BLEU-4 only, as its sources do).
MODE_KEYS = {
    "soulchat-char": METRIC_KEYS,
    "chatglm": ("bleu_4", *ROUGE_TYPES),
    "jieba-bleu": METRIC_KEYS,
}
_ROUGE_CHINESE_KEYS = {"rouge_1": "rouge-1", "rouge_2": "rouge-2", "rouge_l": "rouge-l"}

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


# --------------------------------------------------------------------------------------------------
# The published modes: jieba words, nltk sentence BLEU, rouge-chinese
# --------------------------------------------------------------------------------------------------


def _check_mode(mode: str) -> None:
    if mode not in METRIC_MODES:
        raise ValueError(f"--metrics {mode!r}: choose one of {METRIC_MODES}")


def _eval_import(what: str):
    """The optional scoring libraries, with the install line when one is missing."""
    import importlib

    try:
        return importlib.import_module(what)
    except ImportError as err:
        raise ValueError(
            f"--metrics chatglm/jieba-bleu need {what.split('.')[0]} ({err}): pip install 'soulchat[eval]'"
        ) from None


def jieba_words(text: str, drop_spaces: bool = False) -> list[str]:
    """jieba's words of ``text`` (default dictionary, accurate mode), whitespace-only pieces left out."""
    jieba = _eval_import("jieba")
    jieba.setLogLevel(60)  # no "Building prefix dict" lines on stderr
    if drop_spaces:
        text = text.replace(" ", "")
    return [w for w in jieba.cut(text) if w.strip()]


def rouge_chinese_f1(hyp_words: Sequence[str], ref_words: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F1 (0-1) of rouge-chinese over pre-cut words; 0 when either side has no word."""
    if not hyp_words or not ref_words:
        return dict.fromkeys(_ROUGE_CHINESE_KEYS, 0.0)
    rouge = _eval_import("rouge_chinese").Rouge()
    scores = rouge.get_scores(" ".join(hyp_words), " ".join(ref_words))[0]
    return {key: float(scores[name]["f"]) for key, name in _ROUGE_CHINESE_KEYS.items()}


def chatglm_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``--metrics chatglm``: per-reply jieba-word ROUGE F1 and character BLEU-4 (nltk, method3), x 100,
    rounded to 4 decimals per reply as ChatGLM-6B's ptuning/main.py does, averaged over replies."""
    _check_pairs(hypotheses, references)
    bleu = _eval_import("nltk.translate.bleu_score")
    smoothing = bleu.SmoothingFunction().method3
    sums = dict.fromkeys(MODE_KEYS["chatglm"], 0.0)
    for hyp, ref in zip(hypotheses, references):
        for key, value in rouge_chinese_f1(jieba_words(hyp), jieba_words(ref)).items():
            sums[key] += round(100 * value, 4)
        sums["bleu_4"] += round(100 * _sentence_bleu(bleu, list(ref), list(hyp), (0.25,) * 4, smoothing), 4)
    return {key: total / len(hypotheses) if hypotheses else 0.0 for key, total in sums.items()}


def jieba_bleu_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``--metrics jieba-bleu``: per-reply BLEU-1..4 over jieba words (nltk, method1) and ROUGE-1/2/L
    (rouge-chinese) over the same words, each averaged over replies x 100."""
    _check_pairs(hypotheses, references)
    bleu = _eval_import("nltk.translate.bleu_score")
    smoothing = bleu.SmoothingFunction().method1
    sums = dict.fromkeys(METRIC_KEYS, 0.0)
    for hyp, ref in zip(hypotheses, references):
        hyp_words, ref_words = jieba_words(hyp, drop_spaces=True), jieba_words(ref, drop_spaces=True)
        for n in BLEU_ORDERS:
            weights = (1.0 / n,) * n
            sums[f"bleu_{n}"] += 100 * _sentence_bleu(bleu, ref_words, hyp_words, weights, smoothing)
        for key, value in rouge_chinese_f1(hyp_words, ref_words).items():
            sums[key] += 100 * value
    return {key: total / len(hypotheses) if hypotheses else 0.0 for key, total in sums.items()}


def _sentence_bleu(bleu_module, reference: list[str], hypothesis: list[str], weights, smoothing) -> float:
    if not hypothesis or not reference:
        return 0.0  # nltk divides by the hypothesis length; an empty reply matches nothing
    return float(
        bleu_module.sentence_bleu([reference], hypothesis, weights=weights, smoothing_function=smoothing)
    )


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references: one reference per reply"
        )


def score_replies(
    hypotheses: Sequence[str],
    references: Sequence[str],
    mode: str = DEFAULT_METRIC_MODE,
    punctuation: str = "drop",
    bleu_smoothing: str = "none",
) -> dict[str, float]:
    """The metrics of ``mode`` (keys ``MODE_KEYS[mode]``); punctuation/smoothing apply to soulchat-char."""
    _check_mode(mode)
    if mode == "chatglm":
        return chatglm_scores(hypotheses, references)
    if mode == "jieba-bleu":
        return jieba_bleu_scores(hypotheses, references)
    return reply_scores(hypotheses, references, punctuation, bleu_smoothing)


def mode_description(mode: str, punctuation: str = "drop", bleu_smoothing: str = "none") -> dict[str, Any]:
    """How the scores of ``mode`` were computed, for the evaluation report."""
    _check_mode(mode)
    if mode == "soulchat-char":
        return {"mode": mode, **scoring_description(punctuation, bleu_smoothing)}
    if mode == "chatglm":
        return {
            "mode": mode,
            "as": "ChatGLM-6B ptuning/main.py and LLaMA-Factory metric.py",
            "tokenization": "ROUGE: jieba.cut words (whitespace pieces dropped); BLEU-4: raw characters",
            "bleu": "nltk sentence_bleu per reply, BLEU-4 only, SmoothingFunction().method3, x100 rounded "
            "to 4 decimals per reply, averaged over replies",
            "rouge": "rouge_chinese Rouge F1 per reply (0 for an empty side), x100 rounded to 4 decimals, "
            "averaged over replies",
        }
    return {
        "mode": mode,
        "as": "EmoLLM evaluate/metric.py (BLEU on jieba words)",
        "tokenization": "spaces removed, jieba.cut words (whitespace pieces dropped)",
        "bleu": "nltk sentence_bleu per reply, cumulative BLEU-n with uniform weights, "
        "SmoothingFunction().method1, averaged over replies x100",
        "rouge": "rouge_chinese Rouge F1 per reply over the same words (0 for an empty side), averaged x100",
    }
