"""The on-disk packed cache: flat token arrays + packed rows, memory-mapped for training.

A store is a directory of plain ``.npy`` files and one ``meta.json``::

    tokens.npy       int32   [total]   token ids of all sequences, back to back
    trained.npy      uint8   [total]   1 where the token is a counselor target
    weight.npy       float32 [total]   loss weight of each trained token (0 elsewhere)
    seq_offsets.npy  int64   [n+1]     sequence i is tokens[seq_offsets[i]:seq_offsets[i+1]]
    row_offsets.npy  int64   [R+1]     row r holds sequences row_seqs[row_offsets[r]:row_offsets[r+1]]
    row_seqs.npy     int64   [n]
    meta.json                          cache key, options, report, sizes and checksums (written last)

With a held-out split (``prepare(..., eval_fraction=f)``) the store directory also holds::

    eval/            a complete store of its own: the held-out conversations, packed the same way
    heldout.json     the same conversations as a SoulChatCorpus JSON array (for soulchat.evaluate)

``store.heldout`` opens ``eval/`` (None without a split) and ``store.heldout_path`` names ``heldout.json``.
Both are written inside the parent's temporary directory and swapped in with it, in one step.

Everything is opened with ``np.load(mmap_mode="r")``: opening a store of any size is instant, every rank
maps the same pages, and a micro-batch reads only the bytes of its row.

Opening verifies the store against meta.json: every array file's size (a stat), its CRC-32 when the file is
small (<= 64 MiB) or was modified after meta.json (written last, so a later mtime means the array was
rewritten, or copied without its times), else the CRC-32 of 64 sampled 64 KiB blocks. A full checksum of
every open would read the whole store (0.9 GB for 100M tokens, 6 GB for the full corpus) before the first
step and on every rank, which the memory map exists to avoid. A mismatch raises StoreError (a ValueError)
naming the file and the fix; ``read_meta`` treats such a store as absent, so ``prepare`` rebuilds it.
Checksums use plain reads, never a map: prepare checksums every array it wrote, and mapped pages would
count in its resident memory.

Writes are atomic: ``StoreWriter`` fills a hidden temporary directory next to the target and swaps it in
with ``os.replace`` only when every file (meta.json last) is complete, so a killed ``prepare`` leaves the
previous cache (or none), never a half-written one.
"""

from __future__ import annotations

import array
import json
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from soulchat.data.packing import assemble, pack
from soulchat.integrity import crc32_read, file_crc32, write_json_durably

FORMAT_VERSION = 2  # 2: meta.json records the size and CRC-32 (whole and sampled) of every array
META_FILE = "meta.json"
HELDOUT_DIR = "eval"  # the held-out store, inside the training store's directory
HELDOUT_FILE = "heldout.json"  # the held-out conversations as a SoulChatCorpus JSON array
ARRAYS: dict[str, np.dtype] = {
    "tokens": np.dtype(np.int32),
    "trained": np.dtype(np.uint8),
    "weight": np.dtype(np.float32),
    "seq_offsets": np.dtype(np.int64),
    "row_offsets": np.dtype(np.int64),
    "row_seqs": np.dtype(np.int64),
}
STORE_FILES = {f"{name}.npy" for name in ARRAYS} | {META_FILE, "report.json", HELDOUT_DIR, HELDOUT_FILE}
FULL_CHECK_BYTES = 64 << 20  # files up to this size are checksummed whole on every open (~20 ms at 3 GB/s)
SAMPLE_BLOCKS = 64  # else this many blocks ...
SAMPLE_BYTES = 64 << 10  # ... of this size, evenly spread, first and last included: 4 MiB read per file


class StoreError(ValueError):
    """A store that does not match its meta.json (damaged, truncated, rewritten); the message says the fix."""


class PackedStore:
    """Read side of the cache: ``len(store)`` rows, ``store.micro_batch(r)`` -> packed micro-batch."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a packed store (no {META_FILE}): run `python -m soulchat.data prepare`"
            )
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise StoreError(f"{meta_path}: unreadable ({e}): {_fix(self.path)}") from None
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: store format {self.meta.get('format_version')} is not {FORMAT_VERSION}: "
                "rerun prepare to rebuild the cache"
            )
        problem = verify_arrays(self.path, self.meta)
        if problem:
            raise StoreError(f"{self.path}: {problem}: {_fix(self.path)}")
        _remove_stale_temp_dirs(self.path)
        arrays = {}
        for name, dtype in ARRAYS.items():
            file = self.path / f"{name}.npy"
            try:
                arr = np.load(file, mmap_mode="r")
            except (OSError, ValueError, EOFError) as e:
                raise StoreError(f"{file}: cannot be read ({e}): {_fix(self.path)}") from e
            if arr.dtype != dtype or arr.ndim != 1:
                raise StoreError(
                    f"{file}: expected 1-D {dtype}, got {arr.ndim}-D {arr.dtype}: delete {self.path} and "
                    "rerun prepare"
                )
            arrays[name] = arr
        self.tokens = arrays["tokens"]
        self.trained = arrays["trained"]
        self.weight = arrays["weight"]
        self.seq_offsets = arrays["seq_offsets"]
        self.row_offsets = arrays["row_offsets"]
        self.row_seqs = arrays["row_seqs"]
        total = len(self.tokens)
        consistent = (
            len(self.trained) == total
            and len(self.weight) == total
            and len(self.seq_offsets) >= 1
            and int(self.seq_offsets[-1]) == total
            and len(self.row_offsets) >= 1
            and int(self.row_offsets[-1]) == len(self.row_seqs) == len(self.seq_offsets) - 1
        )
        if not consistent:
            raise StoreError(f"{self.path}: array sizes disagree (corrupt cache): {_fix(self.path)}")
        self._row_lengths: np.ndarray | None = None
        self._heldout: PackedStore | None = None

    # -- sizes ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def num_rows(self) -> int:
        return len(self)

    @property
    def num_sequences(self) -> int:
        return len(self.seq_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def row_size(self) -> int:
        return int(self.meta["row_size"])

    @property
    def report(self) -> dict[str, Any]:
        return self.meta.get("report", {})

    @property
    def options(self) -> dict[str, Any]:
        return self.meta.get("options", {})

    @property
    def key(self) -> str:
        return self.meta.get("key", "")

    def check_vocabulary(self, vocab_size: int, what: str = "the model") -> None:
        """Raise StoreError when a token id of the store is not below ``vocab_size`` (the embedding rows of
        ``what``): training would fail with an IndexError at some step, or read another token's row."""
        top = int(self.meta["max_token_id"])
        if top >= vocab_size:
            raise StoreError(
                f"{self.path}: token id {top} is outside the {vocab_size}-token vocabulary of {what}: the "
                "cache was built with another tokenizer; rerun prepare with this model's tokenizer"
            )

    # -- held-out part ----------------------------------------------------------------------------

    @property
    def heldout(self) -> PackedStore | None:
        """The held-out conversations' own store (``<path>/eval``), or None when nothing is held out."""
        names = self.meta.get("heldout")
        if not names:
            return None
        if self._heldout is None:
            path = self.path / names["store"]
            if not (path / META_FILE).is_file():
                raise FileNotFoundError(
                    f"{self.path}: meta.json names a held-out store at {path}, which is missing: delete "
                    f"{self.path} and rerun prepare"
                )
            self._heldout = PackedStore(path)
        return self._heldout

    @property
    def heldout_path(self) -> Path | None:
        """``<path>/heldout.json`` (the held-out conversations, any reader reads it), or None."""
        names = self.meta.get("heldout")
        return self.path / names["json"] if names else None

    # -- rows -------------------------------------------------------------------------------------

    def row_sequences(self, r: int) -> np.ndarray:
        """Sequence ids of row ``r`` (int64 [k])."""
        r = self._check_row(r)
        return np.asarray(self.row_seqs[self.row_offsets[r] : self.row_offsets[r + 1]])

    def row_tokens(self, r: int) -> int:
        """Number of tokens in row ``r`` (<= row_size)."""
        return int(self.row_lengths[self._check_row(r)])

    @property
    def row_lengths(self) -> np.ndarray:
        """Tokens per row, int64 [R] (computed once, vectorised)."""
        if self._row_lengths is None:
            seq_lengths = np.diff(self.seq_offsets)
            per_seq = seq_lengths[np.asarray(self.row_seqs)]
            starts = np.asarray(self.row_offsets[:-1])
            self._row_lengths = (
                np.add.reduceat(per_seq, starts) if len(per_seq) else np.zeros(len(self), dtype=np.int64)
            )
        return self._row_lengths

    def micro_batch(self, r: int | Sequence[int]) -> dict[str, Any]:
        """Packed micro-batch (the contract in README.md) of row ``r``, or of several rows back to back."""
        if isinstance(r, (int, np.integer)):
            seq_ids = self.row_sequences(int(r))
        else:
            parts = [self.row_sequences(int(x)) for x in r]
            seq_ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return assemble(self.tokens, self.trained, self.weight, self.seq_offsets, seq_ids)

    def __getitem__(self, r: int) -> dict[str, Any]:
        return self.micro_batch(r)

    def _check_row(self, r: int) -> int:
        n = len(self)
        if not -n <= r < n:
            raise IndexError(f"row {r} out of range for a store of {n} rows")
        return r % n

    def __repr__(self) -> str:
        return (
            f"PackedStore({str(self.path)!r}, rows={len(self)}, sequences={self.num_sequences}, "
            f"tokens={self.num_tokens}, row_size={self.meta.get('row_size')})"
        )


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """meta.json of the store at ``path``, or None if there is no usable store there: none, or one that
    fails verification (said on stderr), which ``prepare`` then rebuilds rather than trusting it."""
    try:
        meta = json.loads((Path(path) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    problem = "" if not isinstance(meta, dict) else None
    if problem is None and meta.get("format_version") == FORMAT_VERSION:
        problem = verify_arrays(Path(path), meta)
    if problem is not None:
        print(
            f"warning: cache {path} is damaged ({problem or 'bad meta.json'}): it is rebuilt", file=sys.stderr
        )
        return None
    return meta


def verify_arrays(path: Path, meta: dict[str, Any]) -> str | None:
    """None when every array file matches what meta.json recorded at write time, else what is wrong."""
    records = meta.get("arrays")
    if not isinstance(records, dict) or set(records) != set(ARRAYS):
        return f"{META_FILE} has no record of its arrays"
    try:
        sealed = (path / META_FILE).stat().st_mtime_ns
    except OSError:
        return f"{META_FILE} is missing"
    for name in ARRAYS:
        file, record = path / f"{name}.npy", records[name]
        if not (isinstance(record, dict) and {"bytes", "crc32", "sample_crc32"} <= set(record)):
            return f"{META_FILE} has a bad record of {file.name}"
        try:
            st = file.stat()
        except OSError:
            return f"{file.name} is missing"
        if st.st_size != record["bytes"]:
            return f"{file.name} has {st.st_size} bytes, {record['bytes']} were written"
        whole = st.st_size <= FULL_CHECK_BYTES or st.st_mtime_ns > sealed
        if whole and _file_crc(file, st.st_size, None) != record["crc32"]:
            return f"{file.name} does not match its checksum (rewritten or damaged since prepare)"
        if not whole and _file_crc(file, st.st_size, SAMPLE_BLOCKS) != record["sample_crc32"]:
            return f"{file.name} does not match its sampled checksum (rewritten or damaged since prepare)"
    return None


def _array_record(file: Path) -> dict[str, Any]:
    size = file.stat().st_size
    return {
        "bytes": size,
        "crc32": _file_crc(file, size, None),
        "sample_crc32": _file_crc(file, size, SAMPLE_BLOCKS),
    }


def _file_crc(file: Path, size: int, blocks: int | None) -> str:
    """CRC-32 of the whole file (blocks=None) or of ``blocks`` SAMPLE_BYTES blocks spread over it, the
    blocks' bytes back to back (so a file of at most ``blocks`` blocks has its whole CRC as its sample).

    Read with plain reads, never mapped: prepare checksums ~800 MiB of arrays at commit, which a map
    would count in its resident memory.
    """
    if blocks is None or size <= blocks * SAMPLE_BYTES:
        return file_crc32(file)
    crc, buffer = 0, bytearray(SAMPLE_BYTES)
    with open(file, "rb", buffering=0) as f:
        for start in np.linspace(0, size - SAMPLE_BYTES, blocks).astype(np.int64):
            f.seek(int(start))
            crc = crc32_read(f, SAMPLE_BYTES, crc, buffer)
    return f"{crc:08x}"


def _fix(path: Path) -> str:
    return f"rerun prepare (it rebuilds a damaged cache) or delete {path}"


# ------------------------------------------------------------------------------------------------
# Writing


class _NpyAppender:
    """Streams a 1-D array of unknown final length into a ``.npy`` file.

    The header has a fixed size (128 bytes) so it can be rewritten with the true length at the end;
    the data is never held in memory as a whole (a 2.3M-conversation corpus is ~0.7G tokens).
    ``maximum`` is the largest value written (None while empty), kept per flushed chunk so that nobody
    has to read the file back for it.
    """

    HEADER_BYTES = 128
    # Elements held before a write: 1M keeps the three arrays' pending chunks at ~9 MiB together (4M took
    # ~70 MiB of a full-corpus prepare's peak, with the joined copies), and writes stay few and large.
    FLUSH_ELEMENTS = 1 << 20

    def __init__(self, path: Path, dtype: np.dtype):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.count = 0
        self.maximum: int | float | None = None
        self._pending: list[np.ndarray] = []
        self._pending_count = 0
        self._file = open(path, "wb")
        self._file.write(self._header(0))

    def _header(self, length: int) -> bytes:
        descr = np.lib.format.dtype_to_descr(self.dtype)
        text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': ({length},), }}"
        body_len = self.HEADER_BYTES - 10  # magic (6) + version (2) + header length (2)
        text = text.ljust(body_len - 1) + "\n"
        assert len(text) == body_len
        return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + text.encode("latin1")

    def append(self, arr: np.ndarray) -> None:
        arr = np.asarray(arr, dtype=self.dtype).reshape(-1)
        self._pending.append(arr)
        self._pending_count += len(arr)
        self.count += len(arr)
        if self._pending_count >= self.FLUSH_ELEMENTS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            chunk = np.concatenate(self._pending)
            self._file.write(memoryview(chunk))  # its buffer as is: no bytes copy
            if len(chunk):
                top = chunk.max().item()  # the chunk is in memory: ~1 ms per 4M elements
                self.maximum = top if self.maximum is None else max(self.maximum, top)
        self._pending, self._pending_count = [], 0

    def close(self) -> None:
        self._flush()
        self._file.seek(0)
        self._file.write(self._header(self.count))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


class StoreWriter:
    """Write side: ``add`` sequences, then ``finish`` packs them into rows and commits atomically.

    Use as a context manager: leaving the block with an exception deletes the temporary directory and
    leaves any previous store at ``out_dir`` untouched.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir).absolute()
        if self.out_dir.exists() and not _replaceable(self.out_dir):
            raise FileExistsError(
                f"{self.out_dir} exists and is not a soulchat cache: pick another --out or empty it"
            )
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_dirs(self.out_dir)
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.tmp-{_owner_tag()}"
        self.tmp_dir.mkdir()
        self._tokens = _NpyAppender(self.tmp_dir / "tokens.npy", ARRAYS["tokens"])
        self._trained = _NpyAppender(self.tmp_dir / "trained.npy", ARRAYS["trained"])
        self._weight = _NpyAppender(self.tmp_dir / "weight.npy", ARRAYS["weight"])
        self._lengths = array.array("q")  # int64 per sequence: 8 bytes each, not a Python int object
        self._done = False

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    @property
    def num_tokens(self) -> int:
        return self._tokens.count

    def child(self, name: str) -> StoreWriter:
        """A writer for a store nested at ``<out_dir>/<name>``, committed together with this one.

        It writes inside this writer's temporary directory: commit it (``finish``, or ``pack`` then
        ``commit``) before committing the parent, which then swaps both in at once; aborting the parent
        discards it.
        """
        return StoreWriter(self.tmp_dir / name)

    def file(self, name: str) -> Path:
        """Path of an extra file ``<out_dir>/<name>`` to write now; it is swapped in with the store."""
        return self.tmp_dir / name

    def add(self, input_ids: np.ndarray, trained: np.ndarray, weight: np.ndarray) -> None:
        """Append one sequence (equal-length 1-D arrays, at least one token)."""
        n = len(input_ids)
        if n == 0 or len(trained) != n or len(weight) != n:
            raise ValueError(
                f"sequence {len(self._lengths)}: input_ids, trained and weight must be non-empty and of "
                f"equal length, got {n}, {len(trained)}, {len(weight)}"
            )
        self.add_batch(input_ids, trained, weight, np.array([n], dtype=np.int64))

    def add_batch(self, input_ids: np.ndarray, trained: np.ndarray, weight: np.ndarray,
                  lengths: np.ndarray) -> None:
        """Append sequences given end to end: ``lengths`` (each at least 1) splits the 1-D arrays."""
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        n = int(lengths.sum())
        if (lengths < 1).any() or len(input_ids) != n or len(trained) != n or len(weight) != n:
            raise ValueError(
                f"sequences {len(self._lengths)}..: lengths must be positive and sum to the lengths of "
                f"input_ids, trained and weight; got sum {n}, {len(input_ids)}, {len(trained)}, {len(weight)}"
            )
        if not len(lengths):
            return
        self._tokens.append(input_ids)
        self._trained.append(trained)
        self._weight.append(weight)
        self._lengths.frombytes(lengths.tobytes())

    def pack(self, row_size: int, seed: int) -> int:
        """Close the token files, pack the sequences into rows of ``row_size`` tokens; returns the rows."""
        for appender in (self._tokens, self._trained, self._weight):
            appender.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int64) if self._lengths else np.zeros(0, np.int64)
        seq_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=seq_offsets[1:])
        row_offsets, row_seqs = pack(lengths, row_size, seed)
        np.save(self.tmp_dir / "seq_offsets.npy", seq_offsets)
        np.save(self.tmp_dir / "row_offsets.npy", row_offsets)
        np.save(self.tmp_dir / "row_seqs.npy", row_seqs)
        self._packed = {
            "format_version": FORMAT_VERSION,
            "row_size": int(row_size),
            "seed": int(seed),
            "num_rows": int(len(row_offsets) - 1),
            "num_sequences": len(lengths),
            "num_tokens": int(seq_offsets[-1]),
        }
        return self._packed["num_rows"]

    def commit(self, meta: dict[str, Any]) -> PackedStore:
        """Write meta.json (and report.json when ``meta`` has a report), then swap the store in."""
        if not hasattr(self, "_packed"):
            raise RuntimeError("call pack() before commit()")
        full_meta = {**self._packed, **meta, **self._integrity()}
        if "report" in meta:
            write_json_durably(self.tmp_dir / "report.json", meta["report"])
        # meta.json last: its presence marks a complete store.
        write_json_durably(self.tmp_dir / META_FILE, full_meta)
        self._commit()
        self._done = True
        return PackedStore(self.out_dir)

    def _integrity(self) -> dict[str, Any]:
        """What opening the store verifies: each array's size and checksums; and the largest token id (kept
        while writing: reading it back from tokens.npy would cost another pass over 4 bytes per token)."""
        top = self._tokens.maximum
        return {
            "arrays": {name: _array_record(self.tmp_dir / f"{name}.npy") for name in ARRAYS},
            "max_token_id": -1 if top is None else int(top),
        }

    def finish(self, row_size: int, seed: int, meta: dict[str, Any]) -> PackedStore:
        """``pack`` then ``commit``."""
        self.pack(row_size, seed)
        return self.commit(meta)

    def _commit(self) -> None:
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{_owner_tag()}"
            os.replace(self.out_dir, old)
        os.replace(self.tmp_dir, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        for appender in (self._tokens, self._trained, self._weight):
            appender.abort()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._done = True


def _replaceable(path: Path) -> bool:
    """Only an existing store (its meta.json lost included: nothing but store files in it) or an empty
    directory may be replaced: never a user's other files."""
    return path.is_dir() and all(p.name in STORE_FILES for p in path.iterdir())


def _owner_tag() -> str:
    """pid-random-host: the pid says whether the writer still runs, but only on its own host (a cache
    directory on a shared file system is seen by processes of several nodes)."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}-{socket.gethostname()}"


def _remove_stale_temp_dirs(out_dir: Path) -> None:
    """Delete leftovers of killed writers (their pid is gone) next to ``out_dir``: temp dirs of a killed
    prepare, and the previous store moved aside by a commit killed before it removed it."""
    here = socket.gethostname()
    for prefix in (f".{out_dir.name}.tmp-", f".{out_dir.name}.old-"):
        for leftover in out_dir.parent.glob(prefix + "*"):
            pid, _, rest = leftover.name[len(prefix) :].partition("-")
            host = rest.partition("-")[2] or here  # names without a host: written by an older soulchat
            if pid.isdigit() and host == here and not _pid_alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own earlier attempt in this process, already finished or failed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
