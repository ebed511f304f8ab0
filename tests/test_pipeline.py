"""prepare() end to end on a tiny corpus: report accounting, cache hits and misses, atomic writes, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from soulchat.options import ConfigError, DataConfig
from soulchat.data import pipeline
from soulchat.data import workers as worker_pool
from soulchat.data.__main__ import main
from soulchat.data.assets import default_corpus_path, default_tokenizer_path, load_tokenizer
from soulchat.data.conversation import DataError
from soulchat.data.heldout import is_heldout
from soulchat.data.packing import IGNORE_INDEX, assemble_ref, pack
from soulchat.data.pipeline import prepare
from soulchat.data.readers import detect_format, read_conversations
from soulchat.data.render import render_and_tokenize
from soulchat.data.store import PackedStore, StoreWriter, _NpyAppender

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CLIENT = [
    "我最近总是失眠，晚上睡不着。",
    "工作压力很大，老板总是批评我。",
    "我不知道该怎么和父母沟通。",
    "I feel lonely at school.",
]
COUNSELOR = [
    "听起来你最近真的很辛苦，失眠会让白天也很难熬。能多说说吗？",
    "被批评的感觉一定不好受，你已经很努力了。",
    "和父母沟通确实不容易，我们可以慢慢来。",
    "That sounds hard. Would you like to tell me more about it?",
]


def _record(i: int, n_turns: int) -> dict:
    messages = []
    for t in range(n_turns):
        role = "user" if t % 2 == 0 else "assistant"
        text = (CLIENT if role == "user" else COUNSELOR)[(i + t) % 4]
        messages.append({"role": role, "content": f"{text}（{i}-{t}）"})
    return {"id": i, "topic": "情绪", "messages": messages}


def write_corpus(path: Path, n_good: int = 10, long_turns: int = 14, bad: bool = True) -> dict:
    """JSONL corpus: n_good valid dialogues (the last one long), plus three bad records when ``bad``."""
    lines = [json.dumps(_record(i, 4 + i % 3), ensure_ascii=False) for i in range(n_good - 1)]
    lines.append(json.dumps(_record(n_good - 1, long_turns), ensure_ascii=False))  # gets split
    expected = {"good": n_good}
    if bad:
        lines.insert(2, '{"id": 100, "messages": [{"role": "user", "content": "broken"')  # malformed JSON
        unknown_role = [{"role": "patient", "content": "嗨"}, {"role": "assistant", "content": "你好"}]
        lines.insert(4, json.dumps({"id": 101, "messages": unknown_role}, ensure_ascii=False))
        client_only = [{"role": "user", "content": "只有来访者说话。"}]  # nothing to train
        lines.append(json.dumps({"id": 102, "messages": client_only}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return expected


def _build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CLIENT + COUNSELOR, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    bundled = default_tokenizer_path()
    if (bundled / "tokenizer.json").is_file():
        return bundled
    out = tmp_path_factory.mktemp("tokenizer")
    _build_tiny_tokenizer().save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def max_length(tokenizer) -> int:
    """A max length that only the long dialogue of write_corpus exceeds, whatever the tokenizer."""

    def n_tokens(rec):
        text = tokenizer.apply_chat_template(rec["messages"], tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    short = max(n_tokens(_record(i, 4 + i % 3)) for i in range(9))
    long = n_tokens(_record(9, 14))
    assert long > 2 * short, "the long dialogue must need a split"
    return (short + long) // 2  # bundled tokenizer: short <= 169, long 397 -> 283


_CALL_ARGS = ("seed", "force", "progress", "verbose")


def _options(**kw) -> DataConfig:
    """The DataConfig of these tests: no held-out split unless asked for (the default holds out 5%)."""
    return DataConfig(**{"template": "auto", "eval_fraction": 0.0, **kw})


def _prepare(corpus, out, tok, **kw):
    opts = dict(max_length=192, row_size=384, on_error="skip", progress=False, verbose=True)
    opts.update(kw)
    call = {k: opts.pop(k) for k in _CALL_ARGS if k in opts}
    return prepare(_options(data=[corpus], cache_dir=str(out), **opts), tok, **call)


def test_prepare_end_to_end(tmp_path, tokenizer, max_length, capsys):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus)
    row_size = 2 * max_length
    store = _prepare(corpus, tmp_path / "cache", tokenizer, max_length=max_length, row_size=row_size)
    report = store.report

    # Accounting: 13 records = 10 good + malformed + unknown role (readers) + client-only (render).
    assert report["conversations_read"] == 13
    assert report["dropped"] == {
        "read:malformed_json": 1,
        "read:unknown_role": 1,
        "render:no_trained_tokens": 1,
    }
    assert report["conversations_trained"] == 10
    assert report["conversations_read"] == report["conversations_trained"] + report["conversations_dropped"]
    assert report["conversations_split"] == 1 and report["windows"] >= 2
    assert report["sequences"] == 9 + report["windows"] == store.num_sequences
    assert report["tokens"] == store.num_tokens == int(store.seq_offsets[-1])
    assert report["trained_tokens"] == int(store.trained.sum())
    assert report["rows"] == len(store) >= report["rows_lower_bound"] == -(-store.num_tokens // row_size)
    assert 0 < report["fill_efficiency"] <= 1
    assert json.loads((store.path / "report.json").read_text()) == report
    out = capsys.readouterr().out
    assert "conversations read" in out and "fill efficiency" in out

    # Sequences fit max_length, rows fit row_size, every sequence sits in exactly one row.
    assert np.diff(store.seq_offsets).max() <= max_length
    assert store.row_lengths.max() <= row_size
    assert sorted(np.asarray(store.row_seqs).tolist()) == list(range(store.num_sequences))
    labels_total = 0
    for r in range(len(store)):
        batch = store.micro_batch(r)
        ref = assemble_ref(
            store.tokens, store.trained, store.weight, store.seq_offsets, store.row_sequences(r)
        )
        for key in ("input_ids", "position_ids", "cu_seqlens", "labels", "loss_index", "loss_weight"):
            np.testing.assert_array_equal(batch[key], ref[key])
        assert len(batch["input_ids"]) == store.row_tokens(r)
        labels_total += len(batch["loss_index"])
    firsts = store.trained[np.asarray(store.seq_offsets[:-1])].sum()
    assert labels_total == report["trained_tokens"] - int(firsts)

    # The trained tokens of a sequence decode to counselor text only (content + end marker).
    seq = 0
    b, e = int(store.seq_offsets[seq]), int(store.seq_offsets[seq + 1])
    ids = np.asarray(store.tokens[b:e])
    mask = np.asarray(store.trained[b:e]).astype(bool)
    trained_text = tokenizer.decode(ids[mask].tolist())
    context_text = tokenizer.decode(ids[~mask].tolist())
    assert any(c[:6] in trained_text for c in COUNSELOR)
    assert not any(c[:6] in trained_text for c in CLIENT)
    assert any(c[:6] in context_text for c in CLIENT)


def test_prepare_cache_hit_and_misses(tmp_path, tokenizer, capsys, monkeypatch):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, bad=False)
    out = tmp_path / "cache"
    first = _prepare(corpus, out, tokenizer)
    key = first.key
    capsys.readouterr()

    # Same inputs and options: loaded from the cache, the readers are never called.
    import soulchat.data.readers as readers

    def no_reading(*args, **kwargs):
        raise AssertionError("a cache hit must not read the corpus")

    with monkeypatch.context() as m:
        m.setattr(readers, "read_conversations", no_reading)
        again = _prepare(corpus, out, tokenizer)
    assert "cache hit" in capsys.readouterr().out
    assert again.key == key and again.report == first.report

    # Any option change rebuilds...
    reseeded = _prepare(corpus, out, tokenizer, seed=1)
    assert "cache hit" not in capsys.readouterr().out and reseeded.key != key
    # ...and so does a change of the data (same size, different content).
    text = corpus.read_text(encoding="utf-8")
    corpus.write_text(text.replace("失眠", "焦虑"), encoding="utf-8")
    changed = _prepare(corpus, out, tokenizer, seed=1)
    assert changed.key != reseeded.key
    # force=True rebuilds even on a match.
    forced = _prepare(corpus, out, tokenizer, seed=1, force=True)
    assert "cache hit" not in capsys.readouterr().out and forced.key == changed.key


def test_concurrent_prepares_build_once(tmp_path, tokenizer, capsys):
    # Every rank of a job may call prepare(): the lock lets one build while the others wait, then hit.
    import threading

    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, bad=False)
    stores: list[PackedStore] = []
    threads = [
        threading.Thread(target=lambda: stores.append(_prepare(corpus, tmp_path / "cache", tokenizer)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = capsys.readouterr().out
    assert len(stores) == 2 and stores[0].key == stores[1].key
    assert out.count("preparing 1 file") == 1 and out.count("cache hit") == 1


def test_prepare_failure_keeps_previous_cache(tmp_path, tokenizer):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus)
    out = tmp_path / "cache"
    good = _prepare(corpus, out, tokenizer)
    with pytest.raises(DataError, match="corpus.jsonl"):
        _prepare(corpus, out, tokenizer, on_error="raise")
    # The old store is intact and no temporary directory is left behind.
    assert PackedStore(out).key == good.key
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.lock", "cache", "corpus.jsonl"]


def test_prepare_rejects_bad_options(tmp_path, tokenizer):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, bad=False)
    with pytest.raises(ConfigError, match=r"--row-size \(64\) is smaller than --max-length \(192\)"):
        _prepare(corpus, tmp_path / "c", tokenizer, row_size=64)
    with pytest.raises(ValueError, match="no trainable conversation"):
        only_client = tmp_path / "client.jsonl"
        only_client.write_text(json.dumps({"id": 1, "messages": [{"role": "user", "content": "hi"}]}) + "\n")
        _prepare(only_client, tmp_path / "c", tokenizer)
    assert not (tmp_path / "c").exists()


def test_cli_synth_and_prepare(tmp_path, tokenizer_dir, capsys):
    data = tmp_path / "synth.json"
    assert main(["synth", "--dialogues", "30", "--out", str(data), "--seed", "3"]) == 0
    assert len(json.loads(data.read_text(encoding="utf-8"))) == 30
    args = ["prepare", "--data", str(data), "--tokenizer", str(tokenizer_dir), "--max-length", "512",
            "--row-size", "1024", "--out", str(tmp_path / "cache"), "--loss-weighting", "turn",
            "--eval-fraction", "0", "--no-progress"]  # no split: every turn is counted below
    assert main(args) == 0
    store = PackedStore(tmp_path / "cache")
    assert store.report["conversations_read"] == 30
    assert store.options["loss_weighting"] == "turn" and store.row_size == 1024
    # Turn weighting: each counselor turn's weights sum to 1, so the total is the number of turns trained.
    records = json.loads(data.read_text(encoding="utf-8"))
    counselor_turns = sum(m["role"] == "assistant" for r in records for m in r["messages"])
    trained_turns = counselor_turns - store.report["counselor_turns_dropped"]
    assert float(np.asarray(store.weight, dtype=np.float64).sum()) == pytest.approx(trained_turns, rel=1e-5)
    capsys.readouterr()
    assert main(args) == 0
    assert "cache hit" in capsys.readouterr().out


def test_cli_bad_input_skip_and_raise(tmp_path, tokenizer_dir, capsys):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus)
    base = ["prepare", "--data", str(corpus), "--tokenizer", str(tokenizer_dir), "--max-length", "192",
            "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main([*base, "--out", str(tmp_path / "b"), "--on-error", "skip"]) == 0
    report = PackedStore(tmp_path / "b").report
    assert report["dropped"]["read:malformed_json"] == 1 and report["dropped"]["read:unknown_role"] == 1
    # An extra role name makes the "patient" record readable.
    assert main([*base, "--out", str(tmp_path / "c"), "--on-error", "skip", "--client-role", "patient"]) == 0
    report = PackedStore(tmp_path / "c").report
    assert "read:unknown_role" not in report["dropped"] and report["conversations_trained"] == 11


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "soulchat.data", "prepare", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--max-length" in out.stdout and "--loss-weighting" in out.stdout


def test_bundled_assets_paths():
    corpus, tok = default_corpus_path(), default_tokenizer_path()
    if not corpus.is_file() or not (tok / "tokenizer.json").is_file():
        pytest.skip("bundled assets not present")
    assert corpus.name == "sample_corpus.json" and tok.is_dir()


# ------------------------------------------------------------------------------------------------
# Store internals


def test_npy_appender_streams_many_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(_NpyAppender, "FLUSH_ELEMENTS", 7)
    app = _NpyAppender(tmp_path / "x.npy", np.dtype(np.int32))
    chunks = [np.arange(i, dtype=np.int32) for i in range(20)]
    for c in chunks:
        app.append(c)
    app.close()
    loaded = np.load(tmp_path / "x.npy", mmap_mode="r")
    np.testing.assert_array_equal(loaded, np.concatenate(chunks))


def test_store_writer_abort_and_replace(tmp_path):
    out = tmp_path / "store"
    with pytest.raises(RuntimeError):
        with StoreWriter(out) as w:
            w.add(np.array([1, 2, 3], dtype=np.int32), np.array([0, 1, 1], np.uint8), np.ones(3, np.float32))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []

    def build(n_seqs: int) -> PackedStore:
        with StoreWriter(out) as w:
            for i in range(n_seqs):
                w.add(np.full(i + 1, i, dtype=np.int32), np.ones(i + 1, np.uint8), np.ones(i + 1, np.float32))
            return w.finish(8, 0, {"key": f"k{n_seqs}"})

    assert build(5).num_sequences == 5
    store = build(7)  # replaces the previous store
    assert store.key == "k7" and store.num_sequences == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert store.row_lengths.sum() == sum(range(1, 8)) and store.row_lengths.max() <= 8
    batch = store.micro_batch([0, 1])
    assert len(batch["input_ids"]) == store.row_tokens(0) + store.row_tokens(1)
    with pytest.raises(IndexError):
        store.micro_batch(len(store))

    # A directory that is not a store is never replaced.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a soulchat cache"):
        StoreWriter(other)
    assert (other / "notes.txt").read_text() == "keep me"

    # A damaged store is reported, not misread.
    os.remove(out / "row_seqs.npy")
    with pytest.raises(ValueError, match="rerun prepare"):
        PackedStore(out)


def test_labels_never_cross_rows_in_store(tmp_path):
    # Sequences whose every token is trained: the first token of each sequence is never a label.
    with StoreWriter(tmp_path / "s") as w:
        for i in range(6):
            w.add(np.arange(10 * i, 10 * i + 5, dtype=np.int32), np.ones(5, np.uint8), np.ones(5, np.float32))
        store = w.finish(12, 1, {"key": "x"})
    for r in range(len(store)):
        batch = store.micro_batch(r)
        cu = batch["cu_seqlens"]
        assert np.all(batch["labels"][cu[1:] - 1] == IGNORE_INDEX)
        assert len(batch["loss_index"]) == 4 * (len(cu) - 1)


# ------------------------------------------------------------------------------------------------
# Held-out split by conversation

N_SPLIT = 200  # conversations in the split corpus; every 10th is long and gets split into windows
FRACTION = 0.25


def _split_records() -> list[dict]:
    recs = [_record(i, 14 if i % 10 == 0 else 4 + i % 3) for i in range(N_SPLIT)]
    recs[7]["messages"].insert(0, {"role": "system", "content": "你是一位温暖的心理咨询师。"})
    recs[8]["messages"].append({"role": "user", "content": "谢谢。"})  # trailing client turn, kept in json
    return recs


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _long_ids() -> list[str]:
    return [str(i) for i in range(0, N_SPLIT, 10)]


@pytest.fixture(scope="module")
def split_seed() -> int:
    """An eval seed that puts long (split) conversations on both sides."""
    for seed in range(100):
        sides = {is_heldout(i, FRACTION, seed) for i in _long_ids()}
        if sides == {True, False}:
            return seed
    raise AssertionError("no seed splits the long conversations")


@pytest.fixture(scope="module")
def split_corpus(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("split") / "corpus.jsonl", _split_records())


@pytest.fixture(scope="module")
def split_store(tmp_path_factory, split_corpus, tokenizer, max_length, split_seed) -> PackedStore:
    out = tmp_path_factory.mktemp("split_cache") / "cache"
    return _prepare(split_corpus, out, tokenizer, max_length=max_length, row_size=2 * max_length,
                    eval_fraction=FRACTION, eval_seed=split_seed, verbose=False)


def _sequences(store: PackedStore) -> Counter:
    """Multiset of a store's sequences as token tuples (the store keeps no conversation ids)."""
    off = np.asarray(store.seq_offsets)
    return Counter(tuple(np.asarray(store.tokens[off[i]:off[i + 1]]).tolist()) for i in range(len(off) - 1))


def _windows_by_conversation(corpus: Path, tokenizer, store: PackedStore) -> dict[str, list[tuple]]:
    """Every conversation tokenized on its own, as the store was built: id -> its sequences (windows)."""
    o = store.options
    convs = list(read_conversations([corpus], on_error="skip"))
    out: dict[str, list[tuple]] = {c.id: [] for c in convs}
    for seq in render_and_tokenize(convs, tokenizer, o["template"], o["max_length"], o["overflow"],
                                   o["loss_weighting"]):
        out[seq.id.split("#w")[0]].append(tuple(seq.input_ids.tolist()))
    return out


def test_is_heldout_is_a_stable_seeded_hash_of_the_id():
    ids = [str(i) for i in range(20_000)]
    held = {i for i in ids if is_heldout(i, 0.1, seed := 5)}
    assert held == {i for i in reversed(ids) if is_heldout(i, 0.1, seed)}  # order plays no part
    assert abs(len(held) / len(ids) - 0.1) < 0.01
    # A larger fraction only adds conversations; another seed picks others; 0 holds out nothing.
    assert held < {i for i in ids if is_heldout(i, 0.3, seed)}
    other = {i for i in ids if is_heldout(i, 0.1, seed + 1)}
    assert len(held & other) < 0.2 * len(held)
    assert not any(is_heldout(i, 0.0, seed) for i in ids)
    assert is_heldout(7, 0.5, 1) == is_heldout("7", 0.5, 1)  # ids are compared as strings


def test_split_keeps_every_conversation_on_one_side(split_store, split_corpus, tokenizer, split_seed):
    heldout = split_store.heldout
    assert heldout is not None and heldout.path == split_store.path / "eval"
    windows = _windows_by_conversation(split_corpus, tokenizer, split_store)
    held_ids = {c.id for c in read_conversations([split_store.heldout_path])}
    assert held_ids == {i for i in windows if is_heldout(i, FRACTION, split_seed)}

    # Each store holds exactly the windows of its side's conversations: nothing shared, nothing lost.
    expect_train = Counter(w for i, ws in windows.items() if i not in held_ids for w in ws)
    expect_held = Counter(w for i in held_ids for w in windows[i])
    assert _sequences(split_store) == expect_train
    assert _sequences(heldout) == expect_held
    assert not set(expect_train) & set(expect_held)
    # Split conversations (several windows) exist on both sides, with all their windows on one side.
    long_held = [i for i in _long_ids() if i in held_ids]
    long_train = [i for i in _long_ids() if i not in held_ids]
    assert long_held and long_train and all(len(windows[i]) >= 2 for i in _long_ids())
    assert split_store.report["heldout"]["conversations_split"] == len(long_held)
    assert split_store.report["train"]["conversations_split"] == len(long_train)

    # The held-out store is a complete packed store: every sequence in one row, rows fit.
    assert sorted(np.asarray(heldout.row_seqs).tolist()) == list(range(heldout.num_sequences))
    assert heldout.row_lengths.max() <= heldout.row_size == split_store.row_size
    batch = heldout.micro_batch(0)
    assert len(batch["input_ids"]) == heldout.row_tokens(0) and len(batch["loss_index"]) > 0


def test_split_fraction_is_roughly_respected(split_store):
    n_held = split_store.report["conversations_heldout"]
    assert split_store.report["conversations_trained"] == N_SPLIT
    assert 0.15 * N_SPLIT <= n_held <= 0.35 * N_SPLIT  # binomial(200, 0.25): 50 +- 6


def test_split_does_not_depend_on_reading_order(tmp_path, split_store, tokenizer, max_length, split_seed):
    # The same records, reversed and spread over a JSON array and a JSONL file.
    recs = _split_records()[::-1]
    first = tmp_path / "a.json"
    first.write_text(json.dumps(recs[:80], ensure_ascii=False), encoding="utf-8")
    second = _write_jsonl(tmp_path / "b.jsonl", recs[80:])
    store = prepare(_options(data=[second, first], cache_dir=str(tmp_path / "cache"), max_length=max_length,
                             row_size=2 * max_length, eval_fraction=FRACTION, eval_seed=split_seed),
                    tokenizer, progress=False, verbose=False)
    ids = lambda s: sorted(c.id for c in read_conversations([s.heldout_path]))  # noqa: E731
    assert ids(store) == ids(split_store)
    assert _sequences(store.heldout) == _sequences(split_store.heldout)
    assert _sequences(store) == _sequences(split_store)


def test_heldout_json_reads_back_as_the_heldout_conversations(split_store, split_corpus, split_seed):
    path = split_store.heldout_path
    assert path == split_store.path / "heldout.json" and detect_format(path) == "soulchat"
    expected = [c for c in read_conversations([split_corpus]) if is_heldout(c.id, FRACTION, split_seed)]
    got = list(read_conversations([path]))  # what `python -m soulchat.evaluate --data` reads
    assert [(c.id, c.topic, c.turns) for c in got] == [(c.id, c.topic, c.turns) for c in expected]
    assert len(got) == split_store.report["heldout"]["conversations"]
    # The raw records use the corpus's own role names, so any tool that reads SoulChatCorpus reads it.
    roles = {m["role"] for r in json.loads(path.read_text(encoding="utf-8")) for m in r["messages"]}
    assert roles <= {"system", "user", "assistant"} and {"user", "assistant"} <= roles


def test_split_report_accounting(tmp_path, tokenizer, max_length, capsys):
    # Bad records (dropped by the readers and by render) next to a split: both invariants hold.
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, n_good=40)
    store = _prepare(corpus, tmp_path / "cache", tokenizer, max_length=max_length,
                     row_size=2 * max_length, eval_fraction=0.3, eval_seed=1)
    r = store.report
    train, held = r["train"], r["heldout"]
    assert r["conversations_read"] == 43 == r["conversations_trained"] + r["conversations_dropped"]
    assert r["conversations_trained"] == train["conversations"] + held["conversations"] == 40
    assert r["conversations_heldout"] == held["conversations"] > 0
    assert r["dropped"] == {"read:malformed_json": 1, "read:unknown_role": 1, "render:no_trained_tokens": 1}
    assert r["conversations_split"] == train["conversations_split"] + held["conversations_split"] == 1
    assert r["windows"] == train["windows"] + held["windows"]
    # Top-level sequence/token/row figures describe the training store, as without a split.
    for key in ("sequences", "tokens", "trained_tokens", "rows", "fill_efficiency"):
        assert r[key] == train[key]
    for part, s in ((train, store), (held, store.heldout)):
        assert part["sequences"] == s.num_sequences and part["tokens"] == s.num_tokens
        assert part["trained_tokens"] == int(s.trained.sum()) and part["rows"] == len(s)
        assert part["rows"] >= part["rows_lower_bound"] == -(-s.num_tokens // store.row_size)
    assert store.heldout.report == held and store.heldout.key == store.key
    assert (r["eval_fraction"], r["eval_seed"]) == (0.3, 1)
    assert json.loads((store.path / "report.json").read_text()) == r
    assert len(json.loads(store.heldout_path.read_text(encoding="utf-8"))) == held["conversations"]
    out = capsys.readouterr().out
    assert f"(train {train['conversations']} + held-out {held['conversations']})" in out
    assert "held out (fraction 0.3, seed 1)" in out


def test_split_options_change_the_cache_key(tmp_path, tokenizer, capsys, monkeypatch):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, n_good=30, bad=False)
    out = tmp_path / "cache"
    plain = _prepare(corpus, out, tokenizer)
    assert plain.options["eval_fraction"] == 0.0 and plain.options["eval_seed"] is None
    # Without a split the eval seed is unused: changing it still hits the cache.
    capsys.readouterr()
    assert _prepare(corpus, out, tokenizer, eval_seed=9).key == plain.key
    assert "cache hit" in capsys.readouterr().out

    split = _prepare(corpus, out, tokenizer, eval_fraction=0.3)
    reseeded = _prepare(corpus, out, tokenizer, eval_fraction=0.3, eval_seed=1)
    wider = _prepare(corpus, out, tokenizer, eval_fraction=0.4, eval_seed=1)
    assert len({plain.key, split.key, reseeded.key, wider.key}) == 4
    assert wider.options["eval_fraction"] == 0.4 and wider.options["eval_seed"] == 1
    assert wider.heldout.options == wider.options

    # A cache hit of a split store serves both parts without reading the corpus.
    import soulchat.data.readers as readers

    def no_reading(*args, **kwargs):
        raise AssertionError("a cache hit must not read the corpus")

    held = wider.heldout.num_sequences
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(readers, "read_conversations", no_reading)
        again = _prepare(corpus, out, tokenizer, eval_fraction=0.4, eval_seed=1)
    assert "cache hit" in capsys.readouterr().out
    assert again.key == wider.key and again.heldout.num_sequences == held
    assert again.heldout_path.is_file()

    # Going back to no split replaces the whole directory: no stale held-out part is left behind.
    plain_again = _prepare(corpus, out, tokenizer)
    assert plain_again.heldout is None and plain_again.heldout_path is None
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (
        out / n for n in ("meta.json", "report.json", "tokens.npy", "trained.npy", "weight.npy",
                          "seq_offsets.npy", "row_offsets.npy", "row_seqs.npy")))


def test_eval_fraction_zero_keeps_the_unsplit_store(split_store, split_corpus, tmp_path, tokenizer,
                                                    max_length):
    store = _prepare(split_corpus, tmp_path / "cache", tokenizer, max_length=max_length,
                     row_size=2 * max_length, verbose=False)
    assert store.heldout is None and store.heldout_path is None and store.meta["heldout"] is None
    assert not (store.path / "eval").exists() and not (store.path / "heldout.json").exists()
    r = store.report
    assert r["heldout"] is None and r["conversations_heldout"] == 0 and r["eval_seed"] is None
    assert r["train"]["conversations"] == r["conversations_trained"] == N_SPLIT
    # Sequences in reading order, exactly as render produces them, packed by pack() as before.
    o = store.options
    convs = list(read_conversations([split_corpus]))
    seqs = [s.input_ids.tolist()
            for s in render_and_tokenize(convs, tokenizer, o["template"], o["max_length"])]
    off = np.asarray(store.seq_offsets)
    assert [np.asarray(store.tokens[off[i]:off[i + 1]]).tolist() for i in range(len(seqs))] == seqs
    row_offsets, row_seqs = pack(np.diff(off), store.row_size, o["seed"])
    np.testing.assert_array_equal(store.row_offsets, row_offsets)
    np.testing.assert_array_equal(store.row_seqs, row_seqs)
    # The split partitions exactly these sequences.
    assert _sequences(split_store) + _sequences(split_store.heldout) == _sequences(store)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_bad_eval_fraction_is_rejected(tmp_path, tokenizer, bad):
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [_record(0, 4)])
    with pytest.raises(ConfigError, match=r"--eval-fraction"):
        _prepare(corpus, tmp_path / "c", tokenizer, eval_fraction=bad)
    assert not (tmp_path / "c").exists()


def test_bad_eval_option_types_and_cli_are_rejected(tmp_path, tokenizer, tokenizer_dir, capsys):
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [_record(0, 4)])
    bad_types = ({"eval_fraction": "0.1"}, {"eval_fraction": True}, {"eval_fraction": 0.1, "eval_seed": 1.5})
    for kwargs in bad_types:
        with pytest.raises(ConfigError, match="--eval-"):
            _prepare(corpus, tmp_path / "c", tokenizer, **kwargs)
    base = ["prepare", "--data", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "c"),
            "--no-progress"]
    for value in ("1", "-0.5", "nan", "half"):
        with pytest.raises(SystemExit) as exc:
            main([*base, "--eval-fraction", value])
        assert exc.value.code == 2 and "--eval-fraction" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_split_that_leaves_a_side_empty_is_an_error(tmp_path, tokenizer):
    # One conversation: with a seed that holds it out nothing is left to train on, and vice versa.
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [_record(0, 4)])
    held_seed = next(s for s in range(100) if is_heldout("0", 0.5, s))
    kept_seed = next(s for s in range(100) if not is_heldout("0", 0.5, s))
    with pytest.raises(ValueError, match="leaving none to train on: lower --eval-fraction"):
        _prepare(corpus, tmp_path / "c", tokenizer, eval_fraction=0.5, eval_seed=held_seed)
    with pytest.raises(ValueError, match="held out none of the 1 trainable conversations"):
        _prepare(corpus, tmp_path / "c", tokenizer, eval_fraction=0.5, eval_seed=kept_seed)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.lock", "corpus.jsonl"]  # nothing half-written


def test_cli_prepare_with_eval_fraction(tmp_path, tokenizer_dir, capsys):
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", _split_records()[:60])
    args = ["prepare", "--data", str(corpus), "--tokenizer", str(tokenizer_dir), "--max-length", "512",
            "--out", str(tmp_path / "cache"), "--no-progress", "--eval-fraction", "0.3", "--eval-seed", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    store = PackedStore(tmp_path / "cache")
    assert f"--data {store.heldout_path}" in out and len(store.heldout) > 0
    held = [c.id for c in read_conversations([store.heldout_path])]
    assert held == [str(i) for i in range(60) if is_heldout(str(i), 0.3, 4)]
    assert store.options["eval_fraction"] == 0.3 and store.options["eval_seed"] == 4


# ------------------------------------------------------------------------------------------------
# Worker processes (workers > 1)


def _store_files(out: Path) -> dict[str, bytes]:
    """Every file of a prepared cache (the held-out store's too), less the timing in the reports."""
    files = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.suffix == ".json" and path.name != pipeline.HELDOUT_FILE:
            doc = json.loads(data)
            for report in (doc, doc.get("report") or {}):
                report.pop("seconds", None)
            data = json.dumps(doc, sort_keys=True).encode()
        files[str(path.relative_to(out))] = data
    return files


@pytest.mark.parametrize("eval_fraction", [0.0, 0.25])
def test_workers_output_is_identical_to_in_process(tmp_path, tokenizer, max_length, monkeypatch, capsys,
                                                   eval_fraction):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, n_good=300)  # the last dialogue gets split; three bad records are skipped
    # Small route chunks and tasks: many tasks in flight, merged back in order across several chunks.
    monkeypatch.setattr(pipeline, "_ROUTE_CHUNK", 128)
    monkeypatch.setattr(worker_pool, "_TASK_SIZE", 24)
    monkeypatch.setattr(worker_pool, "_BATCH", 16)  # in-process: many batches tokenized ahead
    stores = {}
    for workers in (1, 2):
        stores[workers] = _prepare(corpus, tmp_path / f"w{workers}", tokenizer, max_length=max_length,
                                   row_size=2 * max_length, eval_fraction=eval_fraction, workers=workers)
    one, two = stores[1], stores[2]
    assert one.report["conversations_split"] == 1 and one.report["windows"] >= 2
    assert one.report["conversations_trained"] == 300 and one.report["conversations_dropped"] == 3
    assert bool(one.report["heldout"]) == (eval_fraction > 0)
    assert {k: v for k, v in one.report.items() if k != "seconds"} == \
           {k: v for k, v in two.report.items() if k != "seconds"}
    files_one, files_two = _store_files(tmp_path / "w1"), _store_files(tmp_path / "w2")
    assert files_one.keys() == files_two.keys()
    assert any(name.endswith(".npy") for name in files_one)
    for name in files_one:
        assert files_one[name] == files_two[name], name
    for i in range(len(one)):
        a, b = one[i], two[i]
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
    # workers is not part of the cache key: the other count is a cache hit.
    capsys.readouterr()
    _prepare(corpus, tmp_path / "w2", tokenizer, max_length=max_length, row_size=2 * max_length,
             eval_fraction=eval_fraction, workers=1)
    assert "cache hit" in capsys.readouterr().out


def test_template_error_in_a_worker_surfaces_unchanged(tmp_path, tokenizer):
    import pickle

    from soulchat.data.render import TemplateError

    tok = pickle.loads(pickle.dumps(tokenizer))  # a copy whose chat template fails on one conversation
    tok.chat_template = (
        "{% for m in messages %}{% if 'BOOM' in m['content'] %}{{ raise_exception('no BOOM here') }}"
        "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    records = [_record(i, 4) for i in range(60)]
    records[45]["messages"][1]["content"] = "BOOM"
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", records)
    messages = {}
    for workers in (1, 2):
        with pytest.raises(TemplateError, match="no BOOM here") as err:
            _prepare(corpus, tmp_path / f"w{workers}", tok, template="auto", workers=workers)
        messages[workers] = str(err.value)
        assert not (tmp_path / f"w{workers}").exists()
    assert messages[1] == messages[2]
    assert "corpus.jsonl" in messages[2]  # names the conversation that failed


@pytest.mark.parametrize("bad, error", [(0, ConfigError), (-2, ConfigError), (1.5, ConfigError),
                                        (True, ConfigError), ("2", ConfigError)])
def test_bad_workers_is_rejected(tmp_path, tokenizer, bad, error):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, bad=False)
    with pytest.raises(error, match="workers"):
        _prepare(corpus, tmp_path / "c", tokenizer, workers=bad)
    assert not (tmp_path / "c").exists()


def test_cli_workers(tmp_path, tokenizer_dir, capsys):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, bad=False)
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--data", str(corpus), "--out", str(tmp_path / "c"), "--workers", "0"])
    assert exc.value.code == 2
    assert "--workers: must be a positive integer" in capsys.readouterr().err
    assert main(["prepare", "--data", str(corpus), "--tokenizer", str(tokenizer_dir), "--out",
                 str(tmp_path / "c"), "--workers", "2", "--no-progress"]) == 0
    assert "store:" in capsys.readouterr().out


def test_prepare_freezes_the_heap_and_collects_less_only_while_it_builds(tmp_path, tokenizer, monkeypatch):
    import gc

    seen = []
    real_build = pipeline._build

    def spy(*args, **kwargs):
        seen.append((gc.get_freeze_count(), gc.get_threshold()))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_build", spy)
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, n_good=12, bad=False)
    assert gc.get_freeze_count() == 0
    thresholds = gc.get_threshold()
    _prepare(corpus, tmp_path / "c", tokenizer)
    assert seen[0][0] > 0 and gc.get_freeze_count() == 0
    # The young generation is collected less often while it builds, as the caller had it afterwards.
    assert seen[0][1] == (max(thresholds[0], pipeline._BUILD_GC_THRESHOLD), *thresholds[1:])
    assert gc.get_threshold() == thresholds
    # A caller that froze objects itself keeps them frozen.
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        _prepare(corpus, tmp_path / "c", tokenizer, force=True)
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_conversations_cross_to_workers_unchanged():
    import pickle

    from soulchat.data.conversation import Conversation, Turn

    conv = Conversation([Turn("system", "你好"), Turn("client", "我"), Turn("counselor", "嗯")], "7", None, "f:3")
    back = pickle.loads(pickle.dumps([conv, conv], protocol=pickle.HIGHEST_PROTOCOL))
    assert back == [conv, conv] and back[0].topic is None and back[0].turns[0].role == "system"


@pytest.mark.parametrize("cpus, expected", [(1, 1), (2, 1), (4, 1), (5, 5), (16, 8)])
def test_default_workers_is_one_process_on_few_cores(monkeypatch, cpus, expected):
    monkeypatch.setattr(worker_pool, "available_cpus", lambda: cpus)
    assert worker_pool.default_workers() == expected


def test_tokenizer_thread_error_surfaces_and_leaves_nothing(tmp_path, tokenizer, monkeypatch):
    from soulchat.data.render import BatchRenderer

    calls = {"n": 0}
    real = BatchRenderer.encode

    def fails_on_the_third_batch(self, ready):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("tokenizer out of memory")
        return real(self, ready)

    monkeypatch.setattr(BatchRenderer, "encode", fails_on_the_third_batch)
    monkeypatch.setattr(worker_pool, "_BATCH", 8)
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, n_good=60, bad=False)
    with pytest.raises(MemoryError, match="tokenizer out of memory"):
        _prepare(corpus, tmp_path / "c", tokenizer, workers=1)
    assert not (tmp_path / "c").exists()
    assert calls["n"] >= 3


def test_default_workers_stays_in_process_for_small_corpora(tmp_path, tokenizer, monkeypatch):
    assert 1 <= worker_pool.default_workers() <= 8

    def no_pool(*args, **kwargs):
        raise AssertionError("a small corpus must not start worker processes")

    monkeypatch.setattr(pipeline, "Pool", no_pool)
    monkeypatch.setattr(pipeline, "default_workers", lambda: 4)
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, n_good=50)
    store = _prepare(corpus, tmp_path / "c", tokenizer)  # workers=None
    assert store.report["conversations_trained"] == 50
    # Past the threshold, the default does start the pool.
    monkeypatch.setattr(pipeline, "AUTO_POOL_AFTER", 20)
    with pytest.raises(AssertionError, match="must not start"):
        _prepare(corpus, tmp_path / "c", tokenizer, force=True)


def test_cache_key_covers_the_option_vocabulary(monkeypatch):
    # The role map and --columns mapping the readers apply live in soulchat/dataspec.py: a change there
    # must miss the cache like a change to any module of soulchat/data/.
    from soulchat.data import cache

    before = cache.code_fingerprint()
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self: read_bytes(self) + (b"#" if self.name == "dataspec.py" else b""))
    assert cache.code_fingerprint() != before


def test_default_corpus_and_store_dir_are_decided_once():
    assert pipeline.corpus_paths(DataConfig()) == [default_corpus_path()]
    assert pipeline.corpus_paths(DataConfig(data=["a.json", "b"])) == [Path("a.json"), Path("b")]
    assert pipeline.store_dir(DataConfig()) == pipeline.DEFAULT_OUT
    assert pipeline.store_dir(DataConfig(cache_dir="x/y")) == Path("x/y")
