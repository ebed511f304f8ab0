"""The cache of prepare(): its key, and the lock that lets concurrent calls share one build.

The key covers everything the output depends on:

- the input files: resolved path, size and a SHA-256 of the content (whole file up to 64 MiB; above that
  the first and last MiB plus the modification time, so hashing a 0.9 GB corpus costs milliseconds);
- the tokenizer: its full serialization (vocabulary, merges, normalizer, ...), class, special tokens
  and chat template, plus the `tokenizers` version;
- the template and every option (max length, row size, format, role map, on-error, overflow, loss
  weighting, seed, split);
- the source of the data modules themselves (every file of soulchat/data/, and soulchat/dataspec.py),
  so a code change never serves a stale cache.

Concurrent calls for the same ``out_dir`` (every rank of a job, say) serialize on a lock file next to it
(``exclusive``): the first one builds, the others then find the cache and load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

PIPELINE_VERSION = 1
_FULL_HASH_BYTES = 64 << 20  # files up to this size are hashed whole
_EDGE_BYTES = 1 << 20  # larger files: first and last MiB (+ size and mtime)


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Path, size and a content hash (whole file if small, else first/last MiB + mtime)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file; check the --data path") from None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= _FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return {"path": str(path.resolve()), "size": st.st_size, "sha256": h.hexdigest()}
        h.update(f.read(_EDGE_BYTES))
        f.seek(st.st_size - _EDGE_BYTES)
        h.update(f.read(_EDGE_BYTES))
    return {
        "path": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "edge_sha256": h.hexdigest(),
    }


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """Everything about a tokenizer that changes the token ids or the rendered text."""
    import tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialized = backend.to_str()
    else:  # slow tokenizer: the vocabulary is the best available description
        serialized = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    return {
        "class": type(tokenizer).__name__,
        "serialized_sha256": hashlib.sha256(serialized.encode("utf-8")).hexdigest(),
        "special_tokens": special,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "bos_token": str(getattr(tokenizer, "bos_token", None)),
        "eos_token": str(getattr(tokenizer, "eos_token", None)),
        "tokenizers": tokenizers.__version__,
    }


def code_fingerprint() -> str:
    """A hash of every module of soulchat/data/ and of soulchat/dataspec.py (the role map and the
    --columns mapping the readers apply), so a code change never serves a stale cache."""
    h = hashlib.sha256()
    data_dir = Path(__file__).resolve().parent
    for path in [*sorted(data_dir.glob("*.py")), data_dir.parent / "dataspec.py"]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def cache_key(files: list[dict], tokenizer: dict, options: dict) -> str:
    blob = json.dumps(
        {"version": PIPELINE_VERSION, "files": files, "tokenizer": tokenizer, "options": options,
         "code": code_fingerprint()},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def exclusive(out_dir: Path):
    """Hold an exclusive lock on ``.<out_dir>.lock`` (POSIX flock; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; concurrent prepares of one out_dir are then the caller's job
        yield
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
