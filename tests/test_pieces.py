"""Window tokens put together from the pieces of the whole text equal tokenizing the window, or are not used."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
from test_encode import PIECES, TOKENIZERS
from test_render import LONG, QWEN25, conv_of, make_tokenizer
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from soulchat.data import pieces as pieces_module
from soulchat.data.encode import Encoder
from soulchat.data.pieces import PieceCheckError, Pieces, piece_independent
from soulchat.data.plans import plan_for
from soulchat.data.render import render_and_tokenize, render_conversation


def _tokens(enc: Encoder, tok, text: str) -> tuple[list[int], list[list[int]]]:
    e = enc(tok, [text])[0]
    return e.ids.tolist(), e.offsets.tolist()


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_texts_put_together_from_pieces_equal_their_tokens(name):
    tok = TOKENIZERS[name]()
    enc = Encoder(tok)
    assert enc.pieces is not None
    rng = random.Random(1)
    for _ in range(60):
        whole = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 60)))
        table = enc.pieces.table(whole, enc(tok, [whole])[0])
        assert table is not None  # the tokens fall on the pieces as split here
        # A text made of the same pieces in another order, and of new ones (tokenized when missing).
        parts = [whole[s:e] for s, e, _ in enc.pieces.split(whole)]
        rng.shuffle(parts)
        other = "".join(parts[: rng.randint(0, len(parts))]) + rng.choice(["", "新的一句", "<|im_end|>x"])
        ids, offsets = enc.pieces.assemble(other, table)
        assert (ids.tolist(), offsets.tolist()) == _tokens(enc, tok, other), other
        assert enc.pieces.length(other, table) == len(ids)


def _tokenizer_with(added: list[dict], **changes) -> PreTrainedTokenizerFast:
    spec = json.loads(make_tokenizer().backend_tokenizer.to_str())
    next_id = max(t["id"] for t in spec["added_tokens"]) + 1000
    for i, token in enumerate(added):
        spec["added_tokens"].append({"id": next_id + i, "content": token["content"], "single_word": False,
                                     "lstrip": False, "rstrip": False, "normalized": False, "special": False,
                                     **token})
    spec.update(changes)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))


def test_split_matches_the_tokenizer_on_overlapping_and_normalized_added_tokens():
    # "<|a|>b" is longer than "<|a|>" (leftmost-longest); "咨询" is matched in a second pass (normalized).
    tok = _tokenizer_with([{"content": "<|a|>"}, {"content": "<|a|>b"}, {"content": "咨询", "normalized": True}])
    enc = Encoder(tok)
    assert enc.pieces is not None
    text = "x<|a|>bb<|a|>心理咨询师<|a|><|a|>b<|im_end|>咨询"
    table = enc.pieces.table(text, enc(tok, [text])[0])
    assert table is not None
    ids, offsets = enc.pieces.assemble("<|a|>b心理" + text, table)
    assert (ids.tolist(), offsets.tolist()) == _tokens(enc, tok, "<|a|>b心理" + text)


@pytest.mark.parametrize("case", ["lstrip", "rstrip", "single_word", "normalized_with_normalizer",
                                  "metaspace_first", "encode_special_tokens"])
def test_tokenizers_whose_pieces_depend_on_their_neighbours_are_not_split(case):
    spec = json.loads(make_tokenizer().backend_tokenizer.to_str())
    special = False
    if case in ("lstrip", "rstrip", "single_word"):
        spec["added_tokens"][2][case] = True
    elif case == "normalized_with_normalizer":
        spec["added_tokens"][2]["normalized"] = True
        spec["normalizer"] = {"type": "NFC"}
    elif case == "metaspace_first":
        spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}
    else:
        special = True
    assert not piece_independent(spec, special)
    assert piece_independent(json.loads(make_tokenizer().backend_tokenizer.to_str()))


def _over_long(n: int = 3):
    tok = make_tokenizer(chat_template=QWEN25, eos_token="<|im_end|>")
    convs = [conv_of(*LONG, system="你是一位温暖的心理咨询师。" if i % 2 else None, cid=f"c{i}") for i in range(n)]
    max_length = len(tok(render_conversation(convs[0], tok, "auto").text, add_special_tokens=False)["input_ids"]) // 3
    return tok, convs, max_length


def _sequences(tok, convs, max_length, render_mode="auto", use_pieces=True):
    plan = plan_for(tok, "auto")
    saved = plan.encoder.pieces
    if not use_pieces:
        plan.encoder.pieces = None
    try:
        stats = Counter()
        out = list(render_and_tokenize(convs, tok, "auto", max_length, loss_weighting="turn", stats=stats,
                                       render_mode=render_mode))
    finally:
        plan.encoder.pieces = saved
    return [(tc.id, tc.input_ids.tolist(), tc.trained.tolist(), tc.weight.tolist()) for tc in out], stats


@pytest.mark.parametrize("render_mode", ["conversation", "per-turn"])
def test_windows_from_pieces_equal_windows_measured_by_tokenizing(render_mode):
    tok, convs, max_length = _over_long()
    with_pieces, stats = _sequences(tok, convs, max_length, render_mode)
    by_tokenizing, stats_tokenizing = _sequences(tok, convs, max_length, render_mode, use_pieces=False)
    assert with_pieces == by_tokenizing and stats == stats_tokenizing
    assert stats["split"] == len(convs) if render_mode == "conversation" else stats["samples_shortened"] > 0


def test_windows_past_the_spot_checks_are_not_tokenized(monkeypatch):
    tok, convs, max_length = _over_long()
    plan = plan_for(tok, "auto")
    monkeypatch.setattr(plan.encoder.pieces, "put_together", pieces_module._CHECK_FIRST)
    calls = Counter()
    real_encode = type(plan.encoder).encode

    def counting(self, tokenizer, texts):
        calls["texts"] += len(texts)
        return real_encode(self, tokenizer, texts)

    monkeypatch.setattr(type(plan.encoder), "encode", counting)
    out, stats = _sequences(tok, convs, max_length, "conversation")
    assert stats["windows"] >= 3 * len(convs)
    # One batch call tokenizes the whole conversations; no window (nor candidate) is tokenized.
    assert calls["texts"] == len(convs)


def test_a_wrong_piece_is_caught_by_the_spot_check():
    tok = make_tokenizer(chat_template=QWEN25, eos_token="<|im_end|>")
    enc = Encoder(tok)
    text = "<|im_start|>user\n我最近总是失眠。<|im_end|>\n"
    table = enc.pieces.table(text, enc(tok, [text])[0])
    piece = "user\n我最近总是失眠。"
    ids, offsets = table[piece]
    table[piece] = (ids[::-1].copy(), offsets)
    enc.pieces.put_together = 0
    with pytest.raises(PieceCheckError, match="bug in soulchat"):
        enc.pieces.window(text, table, lambda t: _tokens(enc, tok, t))
    # The first windows and one in _CHECK_EVERY are checked.
    checked = []
    enc.pieces.put_together = 0

    def tokenize(t):
        checked.append(enc.pieces.put_together)
        return tuple(np.asarray(x) for x in _tokens(enc, tok, t))

    good = enc.pieces.table(text, enc(tok, [text])[0])
    for _ in range(2 * pieces_module._CHECK_EVERY):
        enc.pieces.window(text, good, tokenize)
    every = pieces_module._CHECK_EVERY
    assert checked == [*range(1, pieces_module._CHECK_FIRST + 1), every, 2 * every]


def test_tokens_that_do_not_fall_on_the_pieces_turn_the_lookup_off():
    tok = make_tokenizer(chat_template=QWEN25, eos_token="<|im_end|>")
    enc = Encoder(tok)
    text = "<|im_start|>user\n你好<|im_end|>"
    encoded = enc(tok, [text])[0]
    assert enc.pieces.table(text, encoded) is not None
    assert enc.pieces.table(text + "x", encoded) is None  # a text these tokens are not of
    assert enc.pieces.table("<|im_start|>" + text[len("<|im_start|>"):].replace("user", "usr"), encoded) is None


def test_pieces_are_off_when_the_probes_disagree(monkeypatch):
    tok = make_tokenizer(chat_template=QWEN25, eos_token="<|im_end|>")
    real = Pieces.assemble

    def wrong(self, text, table):
        ids, offsets = real(self, text, table)
        return ids[:-1], offsets[:-1]

    monkeypatch.setattr(Pieces, "assemble", wrong)
    plan = plan_for(tok, "chatml")  # a new plan: its probes are checked with the wrong assembly
    assert plan.encoder.pieces is None


def test_a_tokenizer_without_added_tokens_has_one_piece_per_text():
    spec = json.loads(make_tokenizer().backend_tokenizer.to_str())
    spec["added_tokens"] = []
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    enc = Encoder(tok)
    text = "我最近总是失眠。<|im_end|>"  # not an added token here: plain text
    assert enc.pieces.split(text) == [(0, len(text), -1)]
    table = enc.pieces.table(text, enc(tok, [text])[0])
    assert table is not None and enc.pieces.length(text, table) == len(enc(tok, [text])[0])
