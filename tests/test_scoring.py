"""Reply metrics in each --metrics mode: tokenization, BLEU and ROUGE against hand-computed values."""

from __future__ import annotations

import math
import random

import pytest

from soulchat.scoring import (
    METRIC_KEYS,
    METRIC_MODES,
    MODE_KEYS,
    chatglm_scores,
    corpus_bleu,
    jieba_bleu_scores,
    jieba_words,
    mean_rouge,
    mode_description,
    reply_scores,
    score_replies,
    scoring_description,
    tokenize_for_scoring,
)

# Two (reply, reference) pairs scored by hand below.
#   pair 1: 我很难过 vs 我很伤心 -> [我 很 难 过] vs [我 很 伤 心]
#   pair 2: "sad, I feel." vs "i feel very sad" -> [sad i feel] vs [i feel very sad]
HYPS = ["我很难过", "sad, I feel."]
REFS = ["我很伤心", "i feel very sad"]


def test_tokenize_chinese_characters_are_tokens() -> None:
    assert tokenize_for_scoring("我很难过") == ["我", "很", "难", "过"]


def test_tokenize_mixed_text_words_lowercase_punctuation_dropped() -> None:
    text = "我很难过，I feel SAD today! 2023年"
    assert tokenize_for_scoring(text) == ["我", "很", "难", "过", "i", "feel", "sad", "today", "2023", "年"]


def test_tokenize_punctuation_kept_one_token_per_character() -> None:
    # NFKC turns the full-width comma into ","; "..." is three tokens, each character its own.
    assert tokenize_for_scoring("好，谢谢...", punctuation="keep") == ["好", ",", "谢", "谢", ".", ".", "."]


def test_tokenize_nfkc_full_width_latin_and_kana() -> None:
    assert tokenize_for_scoring("ＡＩ１号 カナ") == ["ai1", "号", "カ", "ナ"]
    # Hangul is written with spaces between words: scored as words, not characters.
    assert tokenize_for_scoring("안녕 하세요") == ["안녕", "하세요"]


def test_tokenize_rejects_unknown_punctuation_mode() -> None:
    with pytest.raises(ValueError, match="punctuation"):
        tokenize_for_scoring("x", punctuation="maybe")


def test_bleu_hand_computed() -> None:
    # Corpus counts: unigrams 2/4 + 3/3 -> p1 = 5/7; bigrams (我很) 1/3 + (i feel) 1/2 -> p2 = 2/5;
    # trigrams 0/2 + 0/1 -> p3 = 0. Lengths: hypotheses 4 + 3 = 7, references 4 + 4 = 8,
    # brevity penalty exp(1 - 8/7).
    hyp = [tokenize_for_scoring(h) for h in HYPS]
    ref = [tokenize_for_scoring(r) for r in REFS]
    bp = math.exp(1 - 8 / 7)
    assert corpus_bleu(hyp, ref, 1) == pytest.approx(100 * bp * 5 / 7, rel=1e-9)
    assert corpus_bleu(hyp, ref, 2) == pytest.approx(100 * bp * math.sqrt(5 / 7 * 2 / 5), rel=1e-9)
    assert corpus_bleu(hyp, ref, 3) == 0.0  # no trigram matches and no smoothing
    assert corpus_bleu(hyp, ref, 4) == 0.0


def test_rouge_hand_computed() -> None:
    # ROUGE-1 F1: pair 1 P = R = 2/4 -> 1/2; pair 2 P = 3/3, R = 3/4 -> 6/7. Mean 19/28.
    # ROUGE-2 F1: pair 1 P = R = 1/3 -> 1/3; pair 2 P = 1/2, R = 1/3 -> 2/5. Mean 11/30.
    # ROUGE-L F1: pair 1 LCS 2 -> 1/2; pair 2 LCS "i feel" = 2, P = 2/3, R = 2/4 -> 4/7. Mean 15/28.
    scores = mean_rouge(HYPS, REFS)
    assert scores["rouge_1"] == pytest.approx(100 * 19 / 28)
    assert scores["rouge_2"] == pytest.approx(100 * 11 / 30)
    assert scores["rouge_l"] == pytest.approx(100 * 15 / 28)


def test_reply_scores_keys_and_perfect_match() -> None:
    refs = ["你最近睡得怎么样？", "能多说说你的感受吗"]
    scores = reply_scores(refs, refs)
    assert tuple(scores) == METRIC_KEYS
    for key, value in scores.items():
        assert value == pytest.approx(100.0), key


def test_reply_scores_disjoint_and_empty_replies_score_zero() -> None:
    scores = reply_scores(["", "天气"], ["你好吗", "心情"])
    assert all(v == 0.0 for v in scores.values())


def test_bleu_matches_nltk_corpus_bleu() -> None:
    # An independent implementation of corpus BLEU (nltk is in the eval extra).
    from nltk.translate import bleu_score
    rng = random.Random(0)
    vocab = list("我你他很难过开心伤累")
    refs = [[rng.choice(vocab) for _ in range(rng.randint(6, 14))] for _ in range(12)]
    hyps = [r[: rng.randint(3, len(r))] + [rng.choice(vocab) for _ in range(rng.randint(0, 5))] for r in refs]
    for n in (1, 2, 3, 4):
        expected = bleu_score.corpus_bleu([[r] for r in refs], hyps, weights=[1 / n] * n)
        assert corpus_bleu(hyps, refs, n) == pytest.approx(100 * expected, rel=1e-9), n


def test_mismatched_lengths_rejected() -> None:
    with pytest.raises(ValueError, match="one reference per reply"):
        reply_scores(["a"], ["a", "b"])


def test_scoring_description_states_tokenization() -> None:
    desc = scoring_description("drop", "none")
    assert "CJK character" in desc["tokenization"] and "dropped" in desc["tokenization"]
    assert "smoothing='none'" in desc["bleu"]


# ------------------------------------------------------------------------------------------------
# Published modes. Two pairs, segmented by jieba as checked in the first test:
#   pair 1: 我很难过 vs 我很伤心      -> words [我 很 难过] vs [我 很 伤心]
#   pair 2: 我很难过 vs 我今天很难过  -> words [我 很 难过] vs [我 今天 很 难过]
ZH_HYPS = ["我很难过", "我很难过"]
ZH_REFS = ["我很伤心", "我今天很难过"]


def test_jieba_words_of_the_test_pairs() -> None:
    assert jieba_words("我很难过") == ["我", "很", "难过"]
    assert jieba_words("我今天很难过") == ["我", "今天", "很", "难过"]
    assert jieba_words("你好 世界") == ["你好", "世界"]  # whitespace pieces are not words


def test_chatglm_mode_hand_computed() -> None:
    # ROUGE on jieba words, F1 per pair, then the mean:
    #   ROUGE-1: pair 1 P = R = 2/3 -> 2/3; pair 2 P = 3/3, R = 3/4 -> 6/7.
    #   ROUGE-2: pair 1 (我 很) of 2 and 2 -> 1/2; pair 2 P = 1/2, R = 1/3 -> 2/5.
    #   ROUGE-L: pair 1 LCS 2 -> 2/3; pair 2 LCS 3 -> 6/7.
    # BLEU-4 on characters, nltk method3 (the k-th zero precision becomes 1 / (2^k x its denominator)):
    #   pair 1: [我 很 难 过] vs [我 很 伤 心]: p = 2/4, 1/3, 0/2 -> 1/4, 0/1 -> 1/4; BP = 1.
    #   pair 2: [我 很 难 过] vs [我 今 天 很 难 过]: p = 4/4, 2/3, 1/2, 0/1 -> 1/2; BP = exp(1 - 6/4).
    bleu_1 = (1 / 2 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25
    bleu_2 = math.exp(1 - 6 / 4) * (1 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25
    scores = chatglm_scores(ZH_HYPS, ZH_REFS)
    assert tuple(scores) == MODE_KEYS["chatglm"] == ("bleu_4", "rouge_1", "rouge_2", "rouge_l")
    # x100 rounded to 4 decimals per pair (as ChatGLM-6B does), so equal to 1e-4.
    assert scores["bleu_4"] == pytest.approx(100 * (bleu_1 + bleu_2) / 2, abs=1e-4)
    assert scores["rouge_1"] == pytest.approx(100 * (2 / 3 + 6 / 7) / 2, abs=1e-4)
    assert scores["rouge_2"] == pytest.approx(100 * (1 / 2 + 2 / 5) / 2, abs=1e-4)
    assert scores["rouge_l"] == pytest.approx(100 * (2 / 3 + 6 / 7) / 2, abs=1e-4)


def test_jieba_bleu_mode_hand_computed() -> None:
    # BLEU-n per pair on jieba words, nltk method1 (a zero precision becomes 0.1 / its denominator; a
    # hypothesis without n-grams of an order has denominator 1):
    #   pair 1: p = 2/3, 1/2, 0/1 -> 0.1, 0/1 -> 0.1; BP = 1.
    #   pair 2: p = 3/3, 1/2, 0/1 -> 0.1, 0/1 -> 0.1; BP = exp(1 - 4/3).
    p1, p2 = [2 / 3, 1 / 2, 0.1, 0.1], [1.0, 1 / 2, 0.1, 0.1]
    bp2 = math.exp(1 - 4 / 3)
    scores = jieba_bleu_scores(ZH_HYPS, ZH_REFS)
    assert tuple(scores) == METRIC_KEYS
    for n in (1, 2, 3, 4):
        first = math.prod(p1[:n]) ** (1 / n)
        second = bp2 * math.prod(p2[:n]) ** (1 / n)
        assert scores[f"bleu_{n}"] == pytest.approx(100 * (first + second) / 2, rel=1e-9), n
    assert scores["rouge_1"] == pytest.approx(100 * (2 / 3 + 6 / 7) / 2, rel=1e-6)
    assert scores["rouge_2"] == pytest.approx(100 * (1 / 2 + 2 / 5) / 2, rel=1e-6)


def test_published_modes_score_an_empty_side_zero() -> None:
    for scores in (chatglm_scores(["", "好"], ["我很伤心", ""]), jieba_bleu_scores([""], ["我很伤心"])):
        assert all(v == 0.0 for v in scores.values())


def test_score_replies_dispatches_on_the_mode_and_describes_it() -> None:
    assert score_replies(ZH_HYPS, ZH_REFS, "chatglm") == chatglm_scores(ZH_HYPS, ZH_REFS)
    assert score_replies(ZH_HYPS, ZH_REFS) == reply_scores(ZH_HYPS, ZH_REFS)  # soulchat-char is the default
    for mode in METRIC_MODES:
        assert mode_description(mode)["mode"] == mode
    assert "method3" in mode_description("chatglm")["bleu"]
    with pytest.raises(ValueError, match="--metrics"):
        score_replies(ZH_HYPS, ZH_REFS, "sacre")
    with pytest.raises(ValueError, match="one reference per reply"):
        chatglm_scores(["a"], [])
