"""The packed store verifies itself on open: a damaged cache is rebuilt by prepare or refused with the
fix, never read silently; leftovers of killed writers are cleaned."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from soulchat.data import store as store_module
from soulchat.data.pipeline import prepare
from soulchat.data.store import META_FILE, PackedStore, StoreError, StoreWriter, read_meta
from soulchat.data.synth import write_synthetic
from soulchat.options import DataConfig

VOCAB = 1000


def build_store(path: Path, sequences: int = 40, seed: int = 0) -> PackedStore:
    rng = np.random.default_rng(seed)
    with StoreWriter(path) as writer:
        for _ in range(sequences):
            n = int(rng.integers(3, 30))
            trained = (rng.random(n) < 0.5).astype(np.uint8)
            writer.add(rng.integers(0, VOCAB, n).astype(np.int32), trained, trained.astype(np.float32))
        return writer.finish(64, seed, {"key": "k"})


def overwrite_keeping_mtime(file: Path, data: bytes) -> None:
    st = file.stat()
    file.write_bytes(data)
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def store_path(tmp_path) -> Path:
    build_store(tmp_path / "store")
    return tmp_path / "store"


def test_meta_records_size_and_checksums_of_every_array(store_path):
    store = PackedStore(store_path)
    for name in store_module.ARRAYS:
        record = store.meta["arrays"][name]
        assert record["bytes"] == (store_path / f"{name}.npy").stat().st_size
        assert len(record["crc32"]) == len(record["sample_crc32"]) == 8
    assert store.meta["max_token_id"] == int(np.max(store.tokens))
    assert read_meta(store_path) == store.meta


DAMAGE = {
    "tokens 0 bytes": (lambda p: (p / "tokens.npy").write_bytes(b""), "tokens.npy has 0 bytes"),
    "tokens truncated": (
        lambda p: (p / "tokens.npy").write_bytes((p / "tokens.npy").read_bytes()[:-4]),
        "tokens.npy has",
    ),
    "tokens overwritten same size": (
        lambda p: overwrite_keeping_mtime(p / "tokens.npy", _same_size_other_ids(p / "tokens.npy")),
        "tokens.npy does not match its checksum",
    ),
    "ids out of vocabulary": (
        lambda p: _set_token(p / "tokens.npy", 10 * VOCAB),
        "tokens.npy does not match its checksum",
    ),
    "weight deleted": (lambda p: (p / "weight.npy").unlink(), "weight.npy is missing"),
    "meta without records": (
        lambda p: (p / META_FILE).write_text(
            json.dumps({k: v for k, v in json.loads((p / META_FILE).read_text()).items() if k != "arrays"})
        ),
        "has no record of its arrays",
    ),
}


def _same_size_other_ids(file: Path) -> bytes:
    arr = np.load(file)
    return (
        file.read_bytes()[: len(file.read_bytes()) - arr.nbytes]
        + ((arr + 1) % VOCAB).astype(np.int32).tobytes()
    )


def _set_token(file: Path, value: int) -> None:
    arr = np.load(file, mmap_mode="r+")
    arr[len(arr) // 2] = value
    arr.flush()
    del arr


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_store_is_refused_with_the_fix(kind, store_path, capsys):
    damage, message = DAMAGE[kind]
    damage(store_path)
    with pytest.raises(StoreError, match=message) as err:
        PackedStore(store_path)
    assert "rerun prepare" in str(err.value) and "\n" not in str(err.value)
    assert read_meta(store_path) is None  # prepare's cache check treats it as absent: it rebuilds
    assert "is damaged" in capsys.readouterr().err


def test_large_files_are_sampled_unless_modified_after_meta(store_path, monkeypatch):
    monkeypatch.setattr(store_module, "FULL_CHECK_BYTES", 0)  # every file counts as large
    monkeypatch.setattr(store_module, "SAMPLE_BYTES", 16)
    monkeypatch.setattr(store_module, "SAMPLE_BLOCKS", 4)
    tokens = store_path / "tokens.npy"
    # Rebuild so that the sampled checksums are recorded with these block sizes.
    shutil.rmtree(store_path)
    build_store(store_path)
    meta = store_path / META_FILE
    sealed = meta.stat().st_mtime_ns - 10**10  # as if prepare ran 10 s ago (mtimes tick every few ms)
    for file in store_path.iterdir():
        os.utime(file, ns=(sealed, sealed if file == meta else sealed - 10**9))
    PackedStore(store_path)
    original = tokens.read_bytes()

    overwrite_keeping_mtime(tokens, _same_size_other_ids(tokens))  # rewritten whole: the sample sees it
    with pytest.raises(StoreError, match="sampled checksum"):
        PackedStore(store_path)

    # One byte between the sampled blocks, written with the mtime kept: the sample cannot see it ...
    changed = bytearray(original)
    gap = 128 + 20  # after the header, inside no sampled block (blocks start at 0, ~1/3, ~2/3, end)
    changed[gap] ^= 0xFF
    overwrite_keeping_mtime(tokens, bytes(changed))
    PackedStore(store_path)
    # ... but an ordinary write gives it an mtime after meta.json's, and then the whole file is checked.
    tokens.write_bytes(bytes(changed))
    with pytest.raises(StoreError, match="tokens.npy does not match its checksum"):
        PackedStore(store_path)


def test_check_vocabulary_names_the_largest_id(store_path):
    store = PackedStore(store_path)
    store.check_vocabulary(VOCAB)
    with pytest.raises(StoreError, match=f"token id {store.meta['max_token_id']} is outside the 10-token"):
        store.check_vocabulary(10, "the model")


def test_store_without_meta_is_replaced_not_refused(store_path):
    (store_path / META_FILE).unlink()
    store = build_store(store_path, seed=1)
    assert store.meta["seed"] == 1
    # A directory with anything else in it is still never replaced.
    (store_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a soulchat cache"):
        StoreWriter(store_path)


def test_stale_temp_dirs_of_dead_processes_are_cleaned_on_open(store_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(dead.stdout)
    here = socket.gethostname()
    parent = store_path.parent
    stale = [
        parent / f".store.old-{dead_pid}-abcd1234-{here}",
        parent / f".store.tmp-{dead_pid}-abcd1234-{here}",
        parent / f".store.old-{dead_pid}-abcd1234",  # the name an older soulchat wrote
    ]
    kept = [
        parent / f".store.tmp-{os.getppid()}-abcd1234-{here}",  # a live writer
        parent / f".store.tmp-{dead_pid}-abcd1234-other-host",  # pid of another node: cannot tell
    ]
    for d in stale + kept:
        d.mkdir()
        (d / "tokens.npy").write_bytes(b"x")
    PackedStore(store_path)
    assert [d.exists() for d in stale] == [False] * len(stale)
    assert [d.exists() for d in kept] == [True] * len(kept)


# --------------------------------------------------------------------------------------------------
# Through prepare: a damaged cache is rebuilt, identically
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "synth.json"
    write_synthetic(path, 40, seed=5)
    return path


def _prepare(corpus: Path, out: Path) -> PackedStore:
    options = DataConfig(data=[corpus], cache_dir=str(out), max_length=512, workers=1, eval_fraction=0.0)
    return prepare(options, None, progress=False, verbose=True)


@pytest.mark.parametrize("kind", ["tokens 0 bytes", "tokens overwritten same size", "ids out of vocabulary",
                                  "meta deleted"])  # fmt: skip
def test_prepare_rebuilds_a_damaged_cache(kind, corpus, tmp_path, capsys):
    out = tmp_path / "cache"
    good = _prepare(corpus, out)
    tokens = np.array(good.tokens)
    if kind == "meta deleted":
        (out / META_FILE).unlink()
    else:
        DAMAGE[kind][0](out)
    capsys.readouterr()
    rebuilt = _prepare(corpus, out)
    said = capsys.readouterr()
    assert "preparing 1 file" in said.out and "cache hit" not in said.out
    if kind != "meta deleted":
        assert "is damaged" in said.err
    np.testing.assert_array_equal(np.array(rebuilt.tokens), tokens)
    assert rebuilt.key == good.key
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.lock", "cache"]


# --------------------------------------------------------------------------------------------------
# Checksums and the largest token id, computed without mapping the arrays
# --------------------------------------------------------------------------------------------------

SAMPLED = store_module.SAMPLE_BLOCKS * store_module.SAMPLE_BYTES  # 4 MiB: larger files are sampled


def _sampled_blocks(data: bytes) -> bytes:
    """The sampled checksum's input by its definition: SAMPLE_BLOCKS blocks of SAMPLE_BYTES, evenly
    spread with the first and last included, back to back."""
    size, block = len(data), store_module.SAMPLE_BYTES
    starts = np.linspace(0, size - block, store_module.SAMPLE_BLOCKS).astype(np.int64)
    return b"".join(data[s : s + block] for s in starts)


@pytest.mark.parametrize("size", [0, 1, 100_003, SAMPLED, SAMPLED + 1, 3 * SAMPLED + 12_345])
def test_checksums_are_the_crc32_of_the_bytes_and_of_the_sampled_blocks(size, tmp_path):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    file = tmp_path / "a.npy"
    file.write_bytes(data)
    record = store_module._array_record(file)
    sampled = data if size <= SAMPLED else _sampled_blocks(data)
    assert record == {
        "bytes": size,
        "crc32": f"{zlib.crc32(data):08x}",
        "sample_crc32": f"{zlib.crc32(sampled):08x}",
    }
    if size > SAMPLED:
        assert record["sample_crc32"] != record["crc32"]


def test_checksums_recorded_by_earlier_stores_are_unchanged(tmp_path):
    # Values that the memory-mapped checksum of the previous release recorded for these exact bytes:
    # a store written then must still verify.
    big, small = tmp_path / "big.npy", tmp_path / "small.npy"
    big.write_bytes(np.arange(1_500_000, dtype=np.uint32).tobytes())  # 6 MB: sampled
    small.write_bytes(np.arange(300_000, dtype=np.uint32).tobytes())  # 1.2 MB: whole
    assert store_module._array_record(big) == {
        "bytes": 6_000_000, "crc32": "cd59accf", "sample_crc32": "7d8eae54"
    }  # fmt: skip
    assert store_module._array_record(small) == {
        "bytes": 1_200_000, "crc32": "ae6a5a31", "sample_crc32": "ae6a5a31"
    }  # fmt: skip


def test_meta_keeps_its_record_format(store_path):
    meta = json.loads((store_path / META_FILE).read_text())
    assert meta["format_version"] == store_module.FORMAT_VERSION == 2
    assert set(meta["arrays"]) == set(store_module.ARRAYS)
    for record in meta["arrays"].values():
        assert set(record) == {"bytes", "crc32", "sample_crc32"}
        assert isinstance(record["bytes"], int)
        assert len(record["crc32"]) == len(record["sample_crc32"]) == 8
    assert type(meta["max_token_id"]) is int


def test_max_token_id_is_the_maximum_over_every_flush(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module._NpyAppender, "FLUSH_ELEMENTS", 5)
    rng = np.random.default_rng(3)
    sequences = [rng.integers(0, 50, int(rng.integers(1, 9))).astype(np.int32) for _ in range(30)]
    sequences[7][0] = 977  # the largest id, in an early flush: later flushes must not forget it
    sequences[20][-1] = 640
    with StoreWriter(tmp_path / "store") as writer:
        for ids in sequences:
            writer.add(ids, np.ones(len(ids), np.uint8), np.ones(len(ids), np.float32))
        store = writer.finish(16, 0, {"key": "k"})
    assert store.meta["max_token_id"] == int(np.max(store.tokens)) == 977
    np.testing.assert_array_equal(np.asarray(store.tokens), np.concatenate(sequences))


def test_max_token_id_of_an_empty_store_is_minus_one(tmp_path):
    with StoreWriter(tmp_path / "store") as writer:
        store = writer.finish(16, 0, {"key": "k"})
    assert store.num_tokens == 0 and store.meta["max_token_id"] == -1
    assert store.meta["arrays"]["tokens"]["bytes"] == store_module._NpyAppender.HEADER_BYTES


def test_npy_appender_keeps_the_maximum_of_what_it_wrote(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module._NpyAppender, "FLUSH_ELEMENTS", 3)
    app = store_module._NpyAppender(tmp_path / "w.npy", np.dtype(np.float32))
    assert app.maximum is None
    for chunk in ([0.5, 2.25], [], [-1.0], [1.0, 0.0, 0.75, 2.0]):
        app.append(np.array(chunk, np.float32))
    app.close()
    assert app.maximum == 2.25 == float(np.load(tmp_path / "w.npy").max())


def test_commit_maps_no_array(tmp_path, monkeypatch):
    """The commit checksums and measures the arrays without mapping them: a map of the ~800 MiB of a
    full-corpus store counts in prepare's resident memory."""
    rng = np.random.default_rng(0)
    with StoreWriter(tmp_path / "store") as writer:
        for _ in range(20):
            ids = rng.integers(0, VOCAB, 9).astype(np.int32)
            writer.add(ids, np.ones(9, np.uint8), np.ones(9, np.float32))
        writer.pack(32, 0)

        def no_map(*args, **kwargs):
            raise AssertionError("commit mapped or loaded an array")

        with monkeypatch.context() as patch:
            patch.setattr(np, "memmap", no_map)
            patch.setattr(np, "load", no_map)
            patch.setattr(store_module, "PackedStore", lambda path: path)  # the reopen maps, by design
            committed = writer.commit({"key": "k"})
    assert committed == tmp_path / "store"
    store = PackedStore(committed)
    assert store.meta["max_token_id"] == int(np.max(store.tokens))


def _arrays_of(path: Path) -> dict[str, bytes]:
    return {name: (path / f"{name}.npy").read_bytes() for name in store_module.ARRAYS}


def test_add_batch_writes_what_adding_one_by_one_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module._NpyAppender, "FLUSH_ELEMENTS", 7)  # flushes inside and across batches
    rng = np.random.default_rng(5)
    sequences = []
    for _ in range(23):
        n = int(rng.integers(1, 12))
        trained = (rng.random(n) < 0.5).astype(np.uint8)
        sequences.append((rng.integers(0, VOCAB, n).astype(np.int32), trained, rng.random(n).astype(np.float32)))
    with StoreWriter(tmp_path / "one") as writer:
        for seq in sequences:
            writer.add(*seq)
        one = writer.finish(16, 3, {"key": "k"})
    with StoreWriter(tmp_path / "batched") as writer:
        for a, b in ((0, 1), (1, 9), (9, 9), (9, 23)):  # an empty batch among them
            part = sequences[a:b]
            writer.add_batch(*(np.concatenate([s[i] for s in part]) if part else np.zeros(0, dtype)
                               for i, dtype in enumerate((np.int32, np.uint8, np.float32))),
                             np.array([len(s[0]) for s in part], np.int64))
        batched = writer.finish(16, 3, {"key": "k"})
    assert _arrays_of(tmp_path / "one") == _arrays_of(tmp_path / "batched")
    assert batched.num_sequences == one.num_sequences == 23
    assert batched.meta["max_token_id"] == one.meta["max_token_id"]


@pytest.mark.parametrize("lengths, n", [([2, 0, 3], 5), ([2, 3], 6), ([-1, 6], 5)],
                         ids=["empty sequence", "lengths short of the arrays", "negative length"])
def test_add_batch_refuses_lengths_that_do_not_split_the_arrays(tmp_path, lengths, n):
    with StoreWriter(tmp_path / "store") as writer:
        with pytest.raises(ValueError, match="lengths must be positive and sum to"):
            writer.add_batch(np.zeros(n, np.int32), np.zeros(n, np.uint8), np.zeros(n, np.float32), lengths)
        assert writer.num_sequences == 0 and writer.num_tokens == 0
