"""prepare(): corpus files -> conversations -> rendered, masked token ids -> packed rows -> on-disk cache.

One call does the whole data side of training and leaves a PackedStore (soulchat/data/store.py) that the
trainer memory-maps. The result is cached under a key that covers everything the output depends on:

- the input files: resolved path, size and a SHA-256 of the content (whole file up to 64 MiB; above that
  the first and last MiB plus the modification time, so hashing a 0.9 GB corpus costs milliseconds);
- the tokenizer: its full serialization (vocabulary, merges, normalizer, ...), class, special tokens
  and chat template, plus the `tokenizers` version;
- the template and every option (max length, row size, format, role map, on-error, overflow, loss
  weighting, seed);
- the source of the data modules themselves (readers, render, packing, store, this file), so a code
  change never serves a stale cache.

A second run with the same key loads the cache and skips all the work (it says so). Concurrent calls
for the same ``out_dir`` (every rank of a job, say) serialize on a lock file next to it: the first one
builds, the others then find the cache and load it.

The report (printed as a table, stored in meta.json and report.json) accounts for every conversation:
``conversations_read == conversations_trained + sum(dropped.values())`` is checked before anything is
written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from soulchat.data.store import PackedStore, StoreWriter, read_meta

PIPELINE_VERSION = 1
DEFAULT_OUT = Path("cache") / "data"
DEFAULT_MAX_LENGTH = 1024
_FULL_HASH_BYTES = 64 << 20  # files up to this size are hashed whole
_EDGE_BYTES = 1 << 20  # larger files: first and last MiB (+ size and mtime)
# Modules whose code decides what ends up in the cache.
_CODE_MODULES = ("conversation", "readers", "render", "packing", "store", "pipeline")


# ------------------------------------------------------------------------------------------------
# Bundled assets


def default_corpus_path() -> Path:
    """The sample corpus shipped with the package (soulchat/assets/sample_corpus.json)."""
    return Path(str(resources.files("soulchat") / "assets" / "sample_corpus.json"))


def default_tokenizer_path() -> Path:
    """The tiny tokenizer shipped with the package (soulchat/assets/tokenizer/)."""
    return Path(str(resources.files("soulchat") / "assets" / "tokenizer"))


def load_tokenizer(tokenizer: Any = None):
    """A tokenizer object from an object (returned as is), a local directory, or None (the bundled one)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = Path(tokenizer) if tokenizer is not None else default_tokenizer_path()
    from transformers import AutoTokenizer

    if path.exists():
        return AutoTokenizer.from_pretrained(str(path))
    try:  # a hub name already in the local cache; never downloads
        return AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"tokenizer {str(path)!r} not found: pass --tokenizer with a local tokenizer directory "
            "(tokenizer.json + tokenizer_config.json)"
        ) from e


def default_template(tokenizer) -> str:
    """"auto" (the tokenizer's own chat template) when it has one, else the paper's "soulchat" format."""
    return "auto" if getattr(tokenizer, "chat_template", None) else "soulchat"


# ------------------------------------------------------------------------------------------------
# Cache key


def _expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file())
        else:
            out.append(p)
    return out


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
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in _CODE_MODULES:
        h.update(name.encode())
        h.update((here / f"{name}.py").read_bytes())
    return h.hexdigest()


def cache_key(files: list[dict], tokenizer: dict, options: dict) -> str:
    blob = json.dumps(
        {"version": PIPELINE_VERSION, "files": files, "tokenizer": tokenizer, "options": options,
         "code": code_fingerprint()},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------
# Report


def format_report(report: dict[str, Any]) -> str:
    """The report as a short two-column table."""
    rows: list[tuple[str, str]] = [
        ("conversations read", f"{report['conversations_read']:,}"),
        ("  trained", f"{report['conversations_trained']:,}"),
        ("  split (-> windows)", f"{report['conversations_split']:,} (-> {report['windows']:,})"),
        ("  dropped", f"{report['conversations_dropped']:,}"),
    ]
    for reason, n in sorted(report["dropped"].items(), key=lambda kv: -kv[1]):
        rows.append((f"    {reason}", f"{n:,}"))
    if report.get("counselor_turns_dropped"):
        rows.append(("counselor turns dropped (too long)", f"{report['counselor_turns_dropped']:,}"))
    rows += [
        ("sequences", f"{report['sequences']:,}"),
        ("tokens", f"{report['tokens']:,}"),
        ("  counselor (trained) tokens", f"{report['trained_tokens']:,} ({report['trained_fraction']:.1%})"),
        ("rows", f"{report['rows']:,} x {report['row_size']} tokens "
                 f"(lower bound {report['rows_lower_bound']:,})"),
        ("fill efficiency", f"{report['fill_efficiency']:.2%} "
                            f"(rows vs lower bound {report['packing_efficiency']:.2%})"),
        ("time", f"{report['seconds']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _build_report(read: int, reader_drops: Counter, stats: Counter, lengths_total: int, rows: int,
                  row_size: int, seconds: float) -> dict[str, Any]:
    dropped: Counter = Counter({f"read:{reason}": n for reason, n in reader_drops.items()})
    for key, n in stats.items():
        if key.startswith("dropped:") and n:
            dropped[f"render:{key.split(':', 1)[1]}"] += n
    trained = int(stats["trained"])
    tokens = int(stats["tokens"])
    trained_tokens = int(stats["trained_tokens"])
    lower_bound = -(-lengths_total // row_size)
    report = {
        "conversations_read": int(read),
        "conversations_trained": trained,
        "conversations_dropped": int(sum(dropped.values())),
        "dropped": dict(sorted(dropped.items())),
        "conversations_split": int(stats["split"]),
        "windows": int(stats["windows"]),
        "counselor_turns_dropped": int(stats["turns_dropped:turn_too_long"]),
        "straddling_tokens": int(stats["straddling_tokens"]),
        "sequences": int(stats["sequences"]),
        "tokens": tokens,
        "trained_tokens": trained_tokens,
        "trained_fraction": trained_tokens / tokens if tokens else 0.0,
        "rows": int(rows),
        "row_size": int(row_size),
        "rows_lower_bound": int(lower_bound),
        "fill_efficiency": tokens / (rows * row_size) if rows else 0.0,
        "packing_efficiency": lower_bound / rows if rows else 1.0,
        "seconds": seconds,
    }
    # Every conversation read is accounted for exactly once.
    if report["conversations_read"] != trained + report["conversations_dropped"]:
        raise RuntimeError(
            f"conversation accounting is off: read {read} != trained {trained} + dropped "
            f"{report['conversations_dropped']} ({dict(dropped)}); this is a bug, please report it"
        )
    if tokens != lengths_total:
        raise RuntimeError(
            f"token accounting is off: render counted {tokens}, the store holds {lengths_total}"
        )
    return report


# ------------------------------------------------------------------------------------------------
# prepare


def _progress(items: Iterator, enabled: bool, desc: str) -> Iterator:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, nothing in logs and CI.
    return iter(tqdm(items, desc=desc, unit=" conv", unit_scale=True, disable=None, file=sys.stderr))


@contextlib.contextmanager
def _exclusive(out_dir: Path):
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


def prepare(
    data_paths: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
    tokenizer: Any = None,
    template: str | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    row_size: int | None = None,
    out_dir: str | os.PathLike = DEFAULT_OUT,
    fmt: str = "auto",
    role_map=None,
    on_error: str = "raise",
    overflow: str = "split",
    loss_weighting: str = "token",
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    verbose: bool = True,
) -> PackedStore:
    """Read, render, tokenize and pack a corpus into a PackedStore at ``out_dir`` (cached).

    data_paths: files or directories (default: the bundled sample corpus). tokenizer: a tokenizer object
    or a local directory (default: the bundled tokenizer). template: "auto" | "soulchat" | "chatml"
    (default: "auto" when the tokenizer has a chat template, else "soulchat"). max_length: longest
    sequence in tokens; longer conversations are split at turn boundaries (overflow="split") or dropped
    ("drop"). row_size: packed row length in tokens (default: max_length; must be >= max_length).
    on_error: "raise" on the first bad record, or "skip" and count it. force: rebuild even on a cache hit.
    """
    from soulchat.data.conversation import RoleMap

    say = print if verbose else (lambda *a, **k: None)
    if data_paths is None:
        data_paths = [default_corpus_path()]
    elif isinstance(data_paths, (str, os.PathLike)):
        data_paths = [data_paths]
    data_paths = [Path(p) for p in data_paths]
    if max_length is None or max_length < 1:
        raise ValueError(f"max_length={max_length}: pass a positive number of tokens (--max-length)")
    row_size = max_length if row_size is None else row_size
    if row_size < max_length:
        raise ValueError(
            f"row_size={row_size} is smaller than max_length={max_length}: a sequence of max_length tokens "
            "would not fit a row; raise --row-size or lower --max-length"
        )
    role_map = role_map or RoleMap()
    tok = load_tokenizer(tokenizer)
    template = template or default_template(tok)
    out_dir = Path(out_dir)

    options = {
        "template": template,
        "max_length": int(max_length),
        "row_size": int(row_size),
        "format": fmt,
        "role_map": {r: list(getattr(role_map, r)) for r in ("counselor", "client", "system")},
        "on_error": on_error,
        "overflow": overflow,
        "loss_weighting": loss_weighting,
        "seed": int(seed),
    }
    files = [file_fingerprint(p) for p in _expand_paths(data_paths)]
    key = cache_key(files, tokenizer_fingerprint(tok), options)
    with _exclusive(out_dir.absolute()):
        meta = read_meta(out_dir)
        if not force and meta is not None and meta.get("key") == key:
            store = PackedStore(out_dir)
            say(f"cache hit: {out_dir} (key {key[:12]}) matches the inputs and options; skipping prepare")
            say(format_report(store.report))
            return store
        say(f"preparing {len(files)} file(s) -> {out_dir} (template={template}, max_length={max_length}, "
            f"row_size={row_size})")
        store = _build(data_paths, tok, template, max_length, overflow, loss_weighting,
                       dict(fmt=fmt, role_map=role_map, on_error=on_error), progress, out_dir, row_size, seed,
                       {"key": key, "options": options, "files": files})
    say(format_report(store.report))
    return store


def _build(data_paths, tok, template, max_length, overflow, loss_weighting, read_options, progress,
           out_dir, row_size, seed, meta) -> PackedStore:
    """The uncached path of prepare(): stream, tokenize, write, pack, commit."""
    from soulchat.data.readers import read_conversations
    from soulchat.data.render import render_and_tokenize

    start = time.perf_counter()
    reader_drops: Counter = Counter()
    stats: Counter = Counter()
    read = 0

    def conversations():
        nonlocal read
        for conv in read_conversations(data_paths, counter=reader_drops, **read_options):
            read += 1
            yield conv

    with StoreWriter(out_dir) as writer:
        sequences = render_and_tokenize(
            _progress(conversations(), progress, "tokenize"), tok, template, max_length,
            overflow=overflow, loss_weighting=loss_weighting, stats=stats,
        )
        for seq in sequences:
            writer.add(seq.input_ids, seq.trained.view(np.uint8), seq.weight)
        if stats["rendered"] != read:
            raise RuntimeError(f"render saw {stats['rendered']} conversations, the readers yielded {read}")
        if writer.num_sequences == 0:
            raise ValueError(
                f"no trainable conversation in {[str(p) for p in data_paths]}: read "
                f"{read + sum(reader_drops.values())}, dropped by reason: "
                f"{dict(reader_drops) | {k: v for k, v in stats.items() if k.startswith('dropped:')}}"
            )
        rows = writer.pack(row_size, seed)  # C++ best-fit decreasing: 0.1 s of CPU per 2.3M sequences
        report = _build_report(read + sum(reader_drops.values()), reader_drops, stats, writer.num_tokens,
                               rows, row_size, time.perf_counter() - start)
        return writer.commit({**meta, "report": report})
