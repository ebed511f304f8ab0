"""Token masks from a few offset queries per span equal the masks from every offset, or are not used."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from test_render import DIALOGUE, conv_of, make_tokenizer

from soulchat.data import encode
from soulchat.data.assets import load_tokenizer
from soulchat.data.encode import OffsetCheckError, _Encoder, _mask, _ordered_offsets
from soulchat.data.pipeline import prepare
from soulchat.data.render import render_and_tokenize
from soulchat.options import DataConfig

# Common and rare CJK (extension B: four UTF-8 bytes, split over several byte-level tokens), emoji,
# combining marks, letters, digits, spaces, newlines and the control tokens the templates write.
PIECES = ["我", "你", "心理", "咨询师", "𠀀", "𠀁", "龘", "😀", "👩‍👩‍👧", "e\u0301", "café", " hello", "  ", "\n",
          "\n\n", "123", "：", "，", "?", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "a", "Ġ", "\t"]
TOKENIZERS = {
    "bundled": lambda: load_tokenizer(None),
    "gpt2_regex": lambda: make_tokenizer("gpt2"),
    "qwen_regex": lambda: make_tokenizer("qwen"),
}


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40)))


def _random_spans(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """Sorted, disjoint spans with edges anywhere (inside a character's tokens, at 0, at the end)."""
    edges = sorted(rng.sample(range(n + 1), k=min(n + 1, 2 * rng.randint(0, 4))))
    return [(edges[i], edges[i + 1]) for i in range(0, len(edges) - 1, 2)]


@pytest.fixture(params=sorted(TOKENIZERS))
def encoder_and_tokenizer(request):
    tok = TOKENIZERS[request.param]()
    enc = _Encoder(tok)
    assert enc.queries, "these tokenizers have ordered offsets: the test would not exercise the queries"
    return enc, tok


def test_query_masks_equal_full_masks_on_random_texts_and_spans(encoder_and_tokenizer):
    enc, tok = encoder_and_tokenizer
    rng = random.Random(0)
    texts = [_random_text(rng) for _ in range(300)] + ["", "我", "<|im_end|>"]
    compared = straddling = 0
    for text, encoded in zip(texts, enc(tok, texts)):
        assert encoded._queries
        offsets = encoded.offsets
        for _ in range(6):
            spans = _random_spans(rng, len(text))
            got = encode._mask_by_queries(encoded._encoding, len(encoded), len(text), spans)
            want = _mask(offsets, spans)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
            assert got[2] == want[2], (text, spans)
            positions = sorted(rng.randint(0, len(text)) for _ in range(3))
            np.testing.assert_array_equal(
                encoded.tokens_starting_before(positions),
                np.searchsorted(offsets[:, 0], positions, side="left"),
            )
            compared += 1
            straddling += want[2]
    assert compared > 1000 and straddling > 50  # edges inside multi-token characters were exercised


def test_offsets_are_ordered_only_for_pipelines_that_keep_every_character():
    base = json.loads(load_tokenizer(None).backend_tokenizer.to_str())
    assert _ordered_offsets(base) == (True, None)

    def variant(**changes):
        return _ordered_offsets({**base, **changes})

    assert variant(normalizer={"type": "NFC"}) == (True, "NFC")
    assert variant(normalizer={"type": "Lowercase"})[0] is False
    assert variant(normalizer={"type": "Sequence", "normalizers": [{"type": "Strip"}]})[0] is False
    assert variant(pre_tokenizer={"type": "Whitespace"})[0] is False  # drops the spaces
    removed = {"type": "Split", "pattern": {"String": " "}, "behavior": "Removed", "invert": False}
    assert variant(pre_tokenizer={"type": "Sequence", "pretokenizers": [removed]})[0] is False
    assert variant(pre_tokenizer={"type": "Metaspace"})[0] is False  # may add a zero-width "▁"
    assert variant(model={**base["model"], "type": "WordPiece"})[0] is False
    stripping = [{**base["added_tokens"][0], "lstrip": True}, *base["added_tokens"][1:]]
    assert variant(added_tokens=stripping)[0] is False


def test_nfc_tokenizer_uses_queries_only_on_text_already_in_nfc():
    tok = load_tokenizer(None)
    enc = _Encoder(tok)
    enc.queries, enc._form = True, "NFC"  # as for a tokenizer.json with an NFC normalizer
    composed, decomposed = enc(tok, ["café 我", "cafe\u0301 我"])
    assert composed._queries and not decomposed._queries
    trained, _, _ = decomposed.mask([(0, 5)])  # the full-offsets path
    np.testing.assert_array_equal(trained, _mask(decomposed.offsets, [(0, 5)])[0])


def test_a_difference_found_by_the_both_ways_check_stops_with_a_bug_report(monkeypatch):
    tok = load_tokenizer(None)
    enc = _Encoder(tok)
    (encoded,) = enc(tok, ["<|im_start|>assistant\n我理解你。<|im_end|>"])
    assert encoded._check  # the first texts are always checked
    real = encode._mask_by_queries

    def off_by_one(*args):
        trained, index, straddling = real(*args)
        return trained, index, straddling + 1

    monkeypatch.setattr(encode, "_mask_by_queries", off_by_one)
    with pytest.raises(OffsetCheckError, match="bug in soulchat"):
        encoded.mask([(22, 29)])


def test_checks_cover_the_first_texts_then_one_in_512():
    tok = load_tokenizer(None)
    enc = _Encoder(tok)
    checked = [e._check for e in enc(tok, ["我"] * (2 * encode._CHECK_EVERY))]
    expected = [i < encode._CHECK_FIRST or (i + 1) % encode._CHECK_EVERY == 0 for i in range(len(checked))]
    assert checked == expected


def test_probe_disagreement_turns_queries_off(monkeypatch):
    tok = make_tokenizer("qwen", chat_template=None, eos_token="<|im_end|>")
    monkeypatch.setattr(encode, "_mask_by_queries", lambda encoding, n, text_len, spans: (
        np.zeros(n, dtype=bool), np.full(n, -1, dtype=np.int64), 0))
    seqs = list(render_and_tokenize([conv_of(*DIALOGUE)], tok, "chatml", None))
    from soulchat.data.plans import _plan_for

    assert _plan_for(tok, "chatml").encoder.queries is False
    assert seqs and seqs[0].trained.any()  # masked from every offset, so still right


def _store_bytes(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.rglob("*.npy"))}


@pytest.mark.parametrize("render_mode,max_length", [("auto", 1024), ("auto", 200), ("per-turn", 200)])
def test_stores_are_byte_identical_with_and_without_queries(tmp_path, monkeypatch, render_mode, max_length):
    # max_length 200 splits the bundled conversations into windows / shorten per-turn contexts, which
    # count tokens through the same queries.
    options = DataConfig(render_mode=render_mode, max_length=max_length, workers=1)
    stats = {}
    for name, queries in (("queries", True), ("full", False)):
        tok = load_tokenizer(None)
        if not queries:
            monkeypatch.setattr(encode, "_ordered_offsets", lambda spec: (False, None))
        store = prepare(None, tok, tmp_path / name, options, progress=False, verbose=False)
        stats[name] = store.report
    assert _store_bytes(tmp_path / "queries") == _store_bytes(tmp_path / "full")
    assert stats["queries"]["tokens"] > 0
    if max_length == 200:  # the windows / shortened-context paths ran
        key = "conversations_split" if render_mode == "auto" else "samples_shortened"
        assert stats["queries"][key] > 0
