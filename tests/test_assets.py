"""The bundled assets: the sample corpus (soulchat/assets/sample_corpus.json) and the tiny tokenizer
(soulchat/assets/tokenizer/, built by soulchat.data.build_tokenizer)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from soulchat.data import build_tokenizer as bt

SAMPLE = bt.DEFAULT_CORPUS
TOKENIZER_DIR = bt.DEFAULT_OUT
TOPICS = (
    "婚恋", "情绪", "人际", "家庭", "治疗", "成长",
    "行为", "自我", "社会", "职场", "心理学知识", "性心理",
)
HAN = re.compile(bt.HAN_CLASS)


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    with open(SAMPLE, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)


def _is_chinese(record: dict) -> bool:
    text = "".join(m["content"] for m in record["messages"])
    return len(HAN.findall(text)) > 0.2 * len(text)


# --------------------------------------------------------------------------------------------------
# Sample corpus
# --------------------------------------------------------------------------------------------------


def test_sample_corpus_shape(corpus):
    assert isinstance(corpus, list) and len(corpus) >= 120
    assert [r["id"] for r in corpus] == list(range(len(corpus))), "ids must be 0..N-1 in file order"
    for r in corpus:
        assert set(r) == {"id", "topic", "messages"}, r["id"]


def test_sample_corpus_topics(corpus):
    counts = Counter(r["topic"] for r in corpus)
    assert set(counts) == set(TOPICS), counts
    assert min(counts.values()) >= 10, counts


def test_sample_corpus_languages(corpus):
    zh = sum(_is_chinese(r) for r in corpus)
    en = len(corpus) - zh
    assert en > 0 and zh > 0
    assert 0.55 <= zh / len(corpus) <= 0.8, (zh, en)
    # Every topic appears in both languages, and languages are interleaved rather than in two blocks.
    for topic in TOPICS:
        langs = {_is_chinese(r) for r in corpus if r["topic"] == topic}
        assert langs == {True, False}, topic
    first_half = sum(_is_chinese(r) for r in corpus[: len(corpus) // 2])
    assert abs(first_half - zh / 2) <= 3


@pytest.mark.parametrize("rule", ["count", "alternation", "content"])
def test_sample_corpus_turn_rules(corpus, rule):
    for r in corpus:
        msgs = r["messages"]
        where = f"{SAMPLE.name}[id {r['id']}]"
        if rule == "count":
            assert 4 <= len(msgs) <= 12, where
        elif rule == "alternation":
            roles = [m["role"] for m in msgs]
            assert roles[0] == "user" and roles[-1] == "assistant", where
            assert roles == ["user", "assistant"] * (len(msgs) // 2), where
        else:
            for m in msgs:
                assert set(m) == {"role", "content"}, where
                assert isinstance(m["content"], str) and m["content"].strip() == m["content"] != "", where


def test_sample_corpus_shows_crisis_handling(corpus):
    # English conversations that meet a crisis point to a crisis line and to emergency services.
    crisis = [r for r in corpus if not _is_chinese(r)
              and any("988" in m["content"] for m in r["messages"] if m["role"] == "assistant")]
    assert len(crisis) >= 2
    for r in crisis:
        counselor = " ".join(m["content"] for m in r["messages"] if m["role"] == "assistant")
        assert "emergency" in counselor, r["id"]


def test_sample_corpus_reads_through_readers(corpus):
    from soulchat.data.readers import read_conversations

    convs = list(read_conversations(SAMPLE))
    assert len(convs) == len(corpus)
    assert [c.topic for c in convs] == [r["topic"] for r in corpus]
    assert all(c.turns[0].role == "client" and c.turns[-1].role == "counselor" for c in convs)


# --------------------------------------------------------------------------------------------------
# Bundled tokenizer
# --------------------------------------------------------------------------------------------------


def test_tokenizer_files_small():
    names = sorted(p.name for p in TOKENIZER_DIR.iterdir())
    assert names == ["tokenizer.json", "tokenizer_config.json"]
    assert sum(p.stat().st_size for p in TOKENIZER_DIR.iterdir()) < 1 << 20


def test_tokenizer_special_tokens(tokenizer):
    for i, tok in enumerate(bt.SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(tok) == i
        assert tokenizer.encode(tok, add_special_tokens=False) == [i]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
    assert tokenizer.model_max_length == 2048
    assert 3000 <= len(tokenizer) <= 6000
    # A special token written inside text stays one id, next to ordinary tokens.
    ids = tokenizer.encode("你好<|im_end|>hi", add_special_tokens=False)
    assert ids.count(2) == 1 and tokenizer.decode(ids) == "你好<|im_end|>hi"


@pytest.mark.parametrize(
    "text",
    [
        "最近总是睡不好，脑子里一直转着工作上的事。",
        "I keep replaying the meeting in my head, and I can't fall asleep.",
        "混合 mixed text：我 feel 很累…  tabs\tand\nnewlines\r\n",
        "emoji 😢🌧️, rare 𠀀 and 齉, accents café, Ελληνικά, العربية",
        "  leading and trailing spaces  ",
        "",
    ],
)
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_tokenizer_chinese_characters_are_single_tokens(tokenizer, corpus):
    chars = sorted({ch for r in corpus for m in r["messages"] for ch in HAN.findall(m["content"])})
    assert len(chars) > 500
    split = [ch for ch in chars if len(tokenizer.encode(ch, add_special_tokens=False)) != 1]
    assert not split, split[:20]
    # In running text too: a Chinese sentence costs one token per character.
    sentence = next(m["content"] for r in corpus if _is_chinese(r) for m in r["messages"])
    ids = tokenizer.encode(sentence, add_special_tokens=False)
    assert len(ids) <= len(sentence)


def test_tokenizer_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "你是一位温和的心理咨询师。"},
        {"role": "user", "content": "我这几天心情很低落。"},
        {"role": "assistant", "content": "听起来这几天很不容易，愿意多说一些吗？"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\n你是一位温和的心理咨询师。<|im_end|>\n"
        "<|im_start|>user\n我这几天心情很低落。<|im_end|>\n"
        "<|im_start|>assistant\n听起来这几天很不容易，愿意多说一些吗？<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # The generation block marks exactly the assistant content and its <|im_end|>.
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == messages[2]["content"] + "<|im_end|>"
    with pytest.raises(Exception, match="system, user or assistant"):
        tokenizer.apply_chat_template([{"role": "counselor", "content": "hi"}], tokenize=False)


def test_bundled_tokenizer_matches_a_rebuild(tmp_path):
    # The shipped files are what build_tokenizer makes from the shipped corpus (a stale tokenizer after
    # a corpus edit fails here; rebuild with `python -m soulchat.data.build_tokenizer`). Compared
    # through the parsed model, so a different JSON layout of another tokenizers version does not matter.
    bt.build(SAMPLE, bt.DEFAULT_VOCAB_SIZE, tmp_path)

    def model(d: Path) -> tuple[dict, list]:
        m = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        return m["vocab"], [tuple(x.split(" ")) if isinstance(x, str) else tuple(x) for x in m["merges"]]

    assert model(tmp_path) == model(TOKENIZER_DIR)
    config = "tokenizer_config.json"
    assert (tmp_path / config).read_text() == (TOKENIZER_DIR / config).read_text()


# --------------------------------------------------------------------------------------------------
# build_tokenizer on a small sample
# --------------------------------------------------------------------------------------------------

SMALL_TEXTS = [
    "user\n", "我和室友因为打扫卫生的事情闹得很僵，回到宿舍就觉得压抑。",
    "assistant\n", "每天回到住的地方却感到压抑，这真的很消耗人。",
    "你愿意说说你们之间发生了什么吗？",
    "user\n", "My sister and I stopped talking after an argument about our parents.",
    "assistant\n", "It sounds like the silence with your sister weighs on you.",
    "What do you miss most about her?",
] * 3 + ["罕见的字：齉、龘、𠀀。"]


def test_build_tokenizer_deterministic(tmp_path):
    for name in ("a", "b"):
        bt.save(bt.train_tokenizer(SMALL_TEXTS, vocab_size=300), tmp_path / name)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_build_tokenizer_covers_every_character_even_with_a_small_budget():
    # 300 leaves the trainer about 40 merges, far fewer than the characters need: the rest are appended.
    tok = bt.train_tokenizer(SMALL_TEXTS, vocab_size=300)
    chars = sorted({ch for t in SMALL_TEXTS for ch in HAN.findall(t)})
    assert tok.get_vocab_size() > 300
    assert all(len(tok.encode(ch).ids) == 1 for ch in chars)
    for text in SMALL_TEXTS + ["unseen 文字 and ünïcödé 🙂"]:
        assert tok.decode(tok.encode(text).ids) == text
    assert [tok.token_to_id(t) for t in bt.SPECIAL_TOKENS] == [0, 1, 2]


def test_build_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab-size"):
        bt.train_tokenizer(SMALL_TEXTS, vocab_size=100)
