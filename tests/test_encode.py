"""Token masks from a few offset queries per span, and offsets from byte lengths, equal the masks and
offsets the tokenizer gives, or are not used."""

from __future__ import annotations

import json
import random
from dataclasses import replace

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
    enc.byte_lengths = None  # byte-level: offsets would come from byte lengths (tested below)
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
    enc.byte_lengths = None
    enc.queries, enc._form = True, "NFC"  # as for a tokenizer.json with an NFC normalizer
    composed, decomposed = enc(tok, ["café 我", "cafe\u0301 我"])
    assert composed._queries and not decomposed._queries
    trained, _, _ = decomposed.mask([(0, 5)])  # the full-offsets path
    np.testing.assert_array_equal(trained, _mask(decomposed.offsets, [(0, 5)])[0])


def test_a_difference_found_by_the_both_ways_check_stops_with_a_bug_report(monkeypatch):
    tok = load_tokenizer(None)
    enc = _Encoder(tok)
    enc.byte_lengths = None
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
    enc.byte_lengths = None
    checked = [e._check for e in enc(tok, ["我"] * (2 * encode._CHECK_EVERY))]
    expected = [i < encode._CHECK_FIRST or (i + 1) % encode._CHECK_EVERY == 0 for i in range(len(checked))]
    assert checked == expected


def test_probe_disagreement_turns_queries_off(monkeypatch):
    tok = make_tokenizer("qwen", chat_template=None, eos_token="<|im_end|>")
    monkeypatch.setattr(encode, "_byte_lengths", lambda spec: None)
    monkeypatch.setattr(encode, "_mask_by_queries", lambda encoding, n, text_len, spans: (
        np.zeros(n, dtype=bool), np.full(n, -1, dtype=np.int64), 0))
    seqs = list(render_and_tokenize([conv_of(*DIALOGUE)], tok, "chatml", None))
    from soulchat.data.plans import _plan_for

    assert _plan_for(tok, "chatml").encoder.queries is False
    assert seqs and seqs[0].trained.any()  # masked from every offset, so still right


def _store_bytes(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.rglob("*.npy"))}


@pytest.mark.parametrize("render_mode,max_length", [("auto", 1024), ("auto", 200), ("per-turn", 200)])
@pytest.mark.parametrize("loss_weighting", ["token", "turn"])
def test_stores_are_byte_identical_whichever_way_offsets_are_had(tmp_path, monkeypatch, render_mode, max_length,
                                                                 loss_weighting):
    # Offsets from byte lengths (the default here), from offset queries, or every offset from the
    # tokenizer. max_length 200 splits the bundled conversations into windows / shortens per-turn
    # contexts, which count tokens through the same offsets.
    options = DataConfig(render_mode=render_mode, max_length=max_length, workers=1, loss_weighting=loss_weighting)
    stats = {}
    for name in ("bytes", "queries", "full"):
        tok = load_tokenizer(None)
        if name == "queries":
            monkeypatch.setattr(encode, "_byte_lengths", lambda spec: None)
        if name == "full":
            monkeypatch.setattr(encode, "_ordered_offsets", lambda spec: (False, None))
        store = prepare(replace(options, cache_dir=str(tmp_path / name)), tok, progress=False, verbose=False)
        stats[name] = store.report
        from soulchat.data.plans import _plan_for

        encoder = _plan_for(tok, "auto").encoder
        assert (encoder.byte_lengths is not None, encoder.queries) == {
            "bytes": (True, True), "queries": (False, True), "full": (False, False)}[name]
    assert _store_bytes(tmp_path / "bytes") == _store_bytes(tmp_path / "queries") == _store_bytes(tmp_path / "full")
    assert stats["bytes"]["tokens"] > 0
    if max_length == 200:  # the windows / shortened-context paths ran
        key = "conversations_split" if render_mode == "auto" else "samples_shortened"
        assert stats["bytes"][key] > 0


# ------------------------------------------------------------------------------------------------
# Offsets from byte lengths


@pytest.fixture(params=["bundled", "gpt2_regex"])  # qwen_regex adds a prefix space: not byte-exact
def byte_encoder(request):
    tok = TOKENIZERS[request.param]()
    enc = _Encoder(tok)
    assert enc.byte_lengths is not None, "byte-level BPE tokenizers: offsets come from byte lengths"
    return enc, tok


def _with_offsets(enc, texts):
    """The same texts tokenized with the tokenizer's own offsets (encode_batch)."""
    return enc._wrap_with_offsets(texts, enc.raw.encode_batch(texts, add_special_tokens=False))


def test_offsets_from_byte_lengths_equal_the_tokenizers_on_random_batches(byte_encoder):
    # Rare CJK and emoji are split over several byte-level tokens; empty texts, a text of one control
    # token and batches of one all occur.
    enc, _ = byte_encoder
    rng = random.Random(1)
    texts = [_random_text(rng) for _ in range(400)] + ["", "我", "<|im_end|>", "𠀀𠀁😀", ""]
    split_characters = 0
    start = 0
    while start < len(texts):
        batch = texts[start:start + rng.choice([1, 7, 64])]
        start += len(batch)
        spans_of = [_random_spans(rng, len(t)) for t in batch]
        fast = enc._by_bytes_or_none(batch, enc.raw.encode_batch_fast(batch, add_special_tokens=False), spans_of)
        for text, spans, got, want in zip(batch, spans_of, fast, _with_offsets(enc, batch)):
            assert got is not None, text
            np.testing.assert_array_equal(got.ids, want.ids)
            np.testing.assert_array_equal(got.offsets, want.offsets)
            mask = _mask(want.offsets, spans)
            batch_mask, before = got._memo[1], got._memo[2]  # the whole batch's masks, at once
            np.testing.assert_array_equal(batch_mask[0], mask[0])
            np.testing.assert_array_equal(batch_mask[1], mask[1])
            assert batch_mask[2] == mask[2]
            assert before == int(want.tokens_starting_before([e for _, e in spans]).sum())
            if len(want.offsets) > 1:
                split_characters += int(np.count_nonzero(np.diff(want.offsets[:, 0]) == 0))
    assert split_characters > 20  # characters split over two tokens were exercised


def test_byte_lengths_only_for_byte_level_bpe():
    base = json.loads(load_tokenizer(None).backend_tokenizer.to_str())
    lengths = encode._byte_lengths(base)
    vocab = base["model"]["vocab"]
    assert lengths[vocab["Ġthe"]] == 4 and lengths[vocab["æĪĳ"]] == 3  # " the", "我"
    assert lengths[vocab["<|im_end|>"]] == len("<|im_end|>")

    def variant(**changes):
        return encode._byte_lengths({**base, **changes})

    model = base["model"]
    assert variant(model={**model, "byte_fallback": True}) is None
    assert variant(model={**model, "continuing_subword_prefix": "##"}) is None
    assert variant(model={**model, "vocab": {k: v for k, v in vocab.items() if k != "Ġ"}}) is None  # a byte missing
    assert variant(pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}) is None
    split_only = {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Isolated", "invert": False}
    assert variant(pre_tokenizer=split_only) is None  # no byte-level alphabet
    assert variant(normalizer={"type": "Lowercase"}) is None
    prefix = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    assert variant(pre_tokenizer={"type": "Sequence", "pretokenizers": [split_only, prefix]}) is None
    qwen_regex = json.loads(make_tokenizer("qwen").backend_tokenizer.to_str())
    assert encode._byte_lengths(qwen_regex) is None  # its ByteLevel adds a prefix space
    assert variant(normalizer={"type": "NFC"}) is not None  # identity on NFC text, checked per text
    odd = variant(model={**model, "vocab": {**vocab, "▁odd": len(lengths)}})
    assert odd[len(lengths)] > 1 << 30  # no text holds it: a text "with" it fails its byte count


def test_a_text_whose_token_bytes_do_not_add_up_is_tokenized_again_with_offsets():
    tok = load_tokenizer(None)
    enc = _Encoder(tok)
    texts = ["我理解你", "hello", "你好呀"]
    want = _with_offsets(enc, texts)
    me = tok.convert_tokens_to_ids("æĪĳ")  # "我"
    enc.byte_lengths = enc.byte_lengths.copy()
    enc.byte_lengths[me] += 1  # as if the table were wrong for this token
    fast = enc._by_bytes_or_none(texts, enc.raw.encode_batch_fast(texts, add_special_tokens=False), [[]] * 3)
    assert fast[0] is None and fast[1] is not None and fast[2] is not None
    assert fast[1]._memo is None  # one text's offsets are off: the batch is not masked at once
    got = enc(tok, texts)  # wrap: the first text again, with the tokenizer's offsets
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.ids, w.ids)
        np.testing.assert_array_equal(g.offsets, w.offsets)


def test_nfc_tokenizer_takes_offsets_from_byte_lengths_only_on_text_already_in_nfc():
    tok = load_tokenizer(None)
    enc = _Encoder(tok)
    enc._form = "NFC"
    composed, decomposed = enc._by_bytes_or_none(
        ["café 我", "cafe\u0301 我"], enc.raw.encode_batch_fast(["café 我", "cafe\u0301 我"], add_special_tokens=False))
    assert composed is not None and decomposed is None


def test_byte_offset_checks_cover_the_first_texts_then_one_in_512_and_stop_on_a_difference(monkeypatch):
    tok = load_tokenizer(None)
    enc = _Encoder(tok)
    asked = []
    real = enc._wrap_with_offsets

    def counting(texts, raw):
        asked.append(len(texts))
        return real(texts, raw)

    monkeypatch.setattr(enc, "_wrap_with_offsets", counting)
    texts = ["我理解你"] * (2 * encode._CHECK_EVERY)
    enc.wrap(texts, enc.encode(tok, texts))
    assert sum(asked) == encode._CHECK_FIRST + 2  # texts 1..16, 512 and 1024

    real_offsets = encode._char_offsets

    def shifted(*args):
        offsets, exact, base = real_offsets(*args)
        offsets[-1, 1] += 1
        return offsets, exact, base

    monkeypatch.setattr(encode, "_char_offsets", shifted)
    fresh = _Encoder(tok)
    with pytest.raises(OffsetCheckError, match="bug in soulchat"):
        fresh(tok, ["<|im_start|>assistant\n我理解你。<|im_end|>"])


def test_probe_disagreement_turns_byte_lengths_off(monkeypatch):
    tok = make_tokenizer("qwen", chat_template=None, eos_token="<|im_end|>")
    real = encode._char_offsets

    def shifted(*args):
        offsets, exact, base = real(*args)
        offsets[:, 1] += 1
        return offsets, exact, base

    monkeypatch.setattr(encode, "_char_offsets", shifted)
    seqs = list(render_and_tokenize([conv_of(*DIALOGUE)], tok, "chatml", None))
    from soulchat.data.plans import _plan_for

    assert _plan_for(tok, "chatml").encoder.byte_lengths is None
    assert seqs and seqs[0].trained.any()  # offsets from the tokenizer, so still right
