"""The on-disk packed cache: flat token arrays + packed rows, memory-mapped for training.

A store is a directory of plain ``.npy`` files and one ``meta.json``::

    tokens.npy       int32   [total]   token ids of all sequences, back to back
    trained.npy      uint8   [total]   1 where the token is a counselor target
    weight.npy       float32 [total]   loss weight of each trained token (0 elsewhere)
    seq_offsets.npy  int64   [n+1]     sequence i is tokens[seq_offsets[i]:seq_offsets[i+1]]
    row_offsets.npy  int64   [R+1]     row r holds sequences row_seqs[row_offsets[r]:row_offsets[r+1]]
    row_seqs.npy     int64   [n]
    meta.json                          cache key, options, report, sizes (written last)

With a held-out split (``prepare(..., eval_fraction=f)``) the store directory also holds::

    eval/            a complete store of its own: the held-out conversations, packed the same way
    heldout.json     the same conversations as a SoulChatCorpus JSON array (for soulchat.evaluate)

``store.heldout`` opens ``eval/`` (None without a split) and ``store.heldout_path`` names ``heldout.json``.
Both are written inside the parent's temporary directory and swapped in with it, in one step.

Everything is opened with ``np.load(mmap_mode="r")``: opening a store of any size is instant, every rank
maps the same pages, and a micro-batch reads only the bytes of its row.

Writes are atomic: ``StoreWriter`` fills a hidden temporary directory next to the target and swaps it in
with ``os.replace`` only when every file (meta.json last) is complete, so a killed ``prepare`` leaves the
previous cache (or none), never a half-written one.
"""

from __future__ import annotations

import array
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from soulchat.data.packing import assemble, pack

FORMAT_VERSION = 1
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


class PackedStore:
    """Read side of the cache: ``len(store)`` rows, ``store.micro_batch(r)`` -> packed micro-batch."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a packed store (no {META_FILE}): run `python -m soulchat.data prepare`"
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.path}: store format {self.meta.get('format_version')} is not {FORMAT_VERSION}: "
                "rerun prepare to rebuild the cache"
            )
        arrays = {}
        for name, dtype in ARRAYS.items():
            file = self.path / f"{name}.npy"
            try:
                arr = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise ValueError(f"{file}: cannot be read ({e}): delete {self.path} and rerun prepare") from e
            if arr.dtype != dtype or arr.ndim != 1:
                raise ValueError(
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
            raise ValueError(
                f"{self.path}: array sizes disagree (corrupt cache): delete it and rerun prepare"
            )
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


def is_store(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """meta.json of the store at ``path``, or None if there is no (readable) store there."""
    try:
        return json.loads((Path(path) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------
# Writing


class _NpyAppender:
    """Streams a 1-D array of unknown final length into a ``.npy`` file.

    The header has a fixed size (128 bytes) so it can be rewritten with the true length at the end;
    the data is never held in memory as a whole (a 2.3M-conversation corpus is ~0.7G tokens).
    """

    HEADER_BYTES = 128
    FLUSH_ELEMENTS = 1 << 22

    def __init__(self, path: Path, dtype: np.dtype):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.count = 0
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
            self._file.write(np.concatenate(self._pending).tobytes())
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
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
        self._tokens.append(input_ids)
        self._trained.append(trained)
        self._weight.append(weight)
        self._lengths.append(n)

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
            "num_sequences": int(len(lengths)),
            "num_tokens": int(seq_offsets[-1]),
        }
        return self._packed["num_rows"]

    def commit(self, meta: dict[str, Any]) -> PackedStore:
        """Write meta.json (and report.json when ``meta`` has a report), then swap the store in."""
        if not hasattr(self, "_packed"):
            raise RuntimeError("call pack() before commit()")
        full_meta = {**self._packed, **meta}
        if "report" in meta:
            _write_json_durably(self.tmp_dir / "report.json", meta["report"])
        # meta.json last: its presence marks a complete store.
        _write_json_durably(self.tmp_dir / META_FILE, full_meta)
        self._commit()
        self._done = True
        return PackedStore(self.out_dir)

    def finish(self, row_size: int, seed: int, meta: dict[str, Any]) -> PackedStore:
        """``pack`` then ``commit``."""
        self.pack(row_size, seed)
        return self.commit(meta)

    def _commit(self) -> None:
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(self.out_dir, old)
        os.replace(self.tmp_dir, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        for appender in (self._tokens, self._trained, self._weight):
            appender.abort()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._done = True


def _write_json_durably(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _replaceable(path: Path) -> bool:
    """Only an existing store or an empty directory may be replaced: never a user's other files."""
    return path.is_dir() and (is_store(path) or not any(path.iterdir()))


def _remove_stale_temp_dirs(out_dir: Path) -> None:
    """Delete leftovers of killed writers (their pid is gone) next to ``out_dir``."""
    for prefix in (f".{out_dir.name}.tmp-", f".{out_dir.name}.old-"):
        for leftover in out_dir.parent.glob(prefix + "*"):
            try:
                pid = int(leftover.name[len(prefix) :].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
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
