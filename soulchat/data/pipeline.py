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

Rendering and tokenizing, the bulk of the time, can run in worker processes (``workers``, --workers):
reading and the held-out routing stay in the calling process, batches of conversations go to the
workers, and their sequences and counters come back in order, so the output does not depend on the
number of workers (which is therefore not part of the key).

A second run with the same key loads the cache and skips all the work (it says so). Concurrent calls
for the same ``out_dir`` (every rank of a job, say) serialize on a lock file next to it: the first one
builds, the others then find the cache and load it.

The report (printed as a table, stored in meta.json and report.json) accounts for every conversation:
``conversations_read == conversations_trained + sum(dropped.values())`` is checked before anything is
written.

Held-out split (``eval_fraction > 0``): whole conversations are held out for evaluation, never rows, so
the windows of a conversation split at --max-length all land on the same side. A conversation is held
out when a hash of (eval_seed, its id) falls below ``eval_fraction`` (``is_heldout``): the choice depends
on nothing else (not on reading order, other records, the tokenizer or the training seed), and a
conversation keeps its side when the corpus grows. Records sharing an id share a side. The held-out
conversations are packed into their own store, ``<out_dir>/eval`` (``store.heldout``), and written as a
SoulChatCorpus JSON array, ``<out_dir>/heldout.json`` (``store.heldout_path``), for
``python -m soulchat.evaluate --data``. Both are committed with the training store in one atomic swap.
In the report, conversation counts (read, trained, dropped, split) cover both sides and
``conversations_trained == train + held-out``; the sequence/token/row figures at the top level describe
the training store that prepare() returns; ``report["train"]`` and ``report["heldout"]`` hold the same
figures per side.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import numbers
import os
import pickle
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from soulchat.data.store import HELDOUT_DIR, HELDOUT_FILE, PackedStore, StoreWriter, read_meta

PIPELINE_VERSION = 1
DEFAULT_OUT = Path("cache") / "data"
DEFAULT_MAX_LENGTH = 1024
_FULL_HASH_BYTES = 64 << 20  # files up to this size are hashed whole
_EDGE_BYTES = 1 << 20  # larger files: first and last MiB (+ size and mtime)
# Modules whose code decides what ends up in the cache.
_CODE_MODULES = ("conversation", "readers", "render", "packing", "store", "pipeline")
# Conversations read before they are routed to the training or held-out side; each side then renders
# its share in tokenizer batches of 256. Large enough that the held-out side's batches are not tiny.
_ROUTE_CHUNK = 4096
# Worker processes (workers > 1): conversations per task sent to the pool, tasks in flight per worker,
# and the most workers the default picks. With workers=None, a corpus of up to _AUTO_POOL_AFTER
# conversations is rendered in-process: starting the pool costs about 2-2.5 s (each worker unpickles the
# tokenizer, importing transformers), while one process renders ~600-850 conversations/s, so W workers
# break even at about 2.5 s * 850/s * W/(W-1) conversations: ~2,400 for 8 workers, ~4,200 for 2 (measured
# on a shared 2-core EPYC). Larger corpora start the pool with their first route chunk.
_TASK_SIZE = 512
_IN_FLIGHT_PER_WORKER = 2
_MAX_DEFAULT_WORKERS = 8
_AUTO_POOL_AFTER = 2500
# Canonical role -> the role name written to heldout.json (SoulChatCorpus / OpenAI names).
_CORPUS_ROLE = {"system": "system", "client": "user", "counselor": "assistant"}


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
# Held-out split


def check_eval_options(eval_fraction: Any, eval_seed: Any) -> tuple[float, int]:
    """(eval_fraction, eval_seed) as (float, int); a TypeError/ValueError names the flag and the range."""
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, numbers.Real):
        raise TypeError(f"eval_fraction={eval_fraction!r}: must be a number in [0, 1) (--eval-fraction)")
    if not (math.isfinite(eval_fraction) and 0.0 <= eval_fraction < 1.0):
        raise ValueError(
            f"eval_fraction={eval_fraction!r}: must be in [0, 1), the fraction of conversations held out "
            "for evaluation (--eval-fraction); 0 holds out nothing"
        )
    if isinstance(eval_seed, bool) or not isinstance(eval_seed, numbers.Integral):
        raise TypeError(f"eval_seed={eval_seed!r}: must be an integer (--eval-seed)")
    return float(eval_fraction), int(eval_seed)


def _heldout_threshold(eval_fraction: float) -> int:
    # A conversation is held out when its 64-bit hash is below fraction * 2**64.
    return int(eval_fraction * 2.0**64)


def _split_hash(conversation_id: str, eval_seed: int) -> int:
    # blake2b, 8-byte digest: about 0.5 us per id, uniform, and the same on every machine and Python
    # (unlike hash(), which is salted per process).
    key = f"{eval_seed}:{conversation_id}".encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big")


def is_heldout(conversation_id: str, eval_fraction: float, eval_seed: int = 0) -> bool:
    """True when the conversation with this id belongs to the held-out side of the split.

    Deterministic in (id, eval_fraction, eval_seed) only; raising the fraction only adds conversations
    to the held-out side.
    """
    eval_fraction, eval_seed = check_eval_options(eval_fraction, eval_seed)
    return _split_hash(str(conversation_id), eval_seed) < _heldout_threshold(eval_fraction)


class _ConversationJsonWriter:
    """Streams conversations into a SoulChatCorpus-format JSON array (read back by the "soulchat" reader).

    Record: ``{"id", "topic", "messages": [{"role": "system"|"user"|"assistant", "content"}]}``, the
    conversation exactly as read (ids are strings; trailing client turns are kept).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._file = open(path, "w", encoding="utf-8")
        self._file.write("[")

    def add(self, conv) -> None:
        record = {
            "id": conv.id,
            "topic": conv.topic,
            "messages": [{"role": _CORPUS_ROLE[t.role], "content": t.text} for t in conv.turns],
        }
        sep = "\n" if self.count == 0 else ",\n"
        try:
            self._file.write(sep + json.dumps(record, ensure_ascii=False))
        except UnicodeEncodeError:  # a lone surrogate (from a "\ud800" escape): keep it as an escape
            self._file.write(sep + json.dumps(record))
        self.count += 1

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.write("\n]\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


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
    heldout = report.get("heldout")
    trained = f"{report['conversations_trained']:,}"
    if heldout:
        trained += f" (train {report['train']['conversations']:,} + held-out {heldout['conversations']:,})"
    rows: list[tuple[str, str]] = [
        ("conversations read", f"{report['conversations_read']:,}"),
        ("  trained", trained),
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
    ]
    if heldout:
        rows += [
            (f"held out (fraction {report['eval_fraction']:g}, seed {report['eval_seed']})",
             f"{heldout['conversations']:,} conversations -> {HELDOUT_FILE}, {HELDOUT_DIR}/"),
            ("  sequences", f"{heldout['sequences']:,} ({heldout['conversations_split']:,} split)"),
            ("  tokens", f"{heldout['tokens']:,} ({heldout['trained_tokens']:,} counselor)"),
            ("  rows", f"{heldout['rows']:,} (fill {heldout['fill_efficiency']:.2%})"),
        ]
    rows.append(("time", f"{report['seconds']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _part_report(stats: Counter, tokens_in_store: int, rows: int, row_size: int, part: str) -> dict[str, Any]:
    """Figures of one side (training or held-out) from its render counters and its packed store."""
    tokens = int(stats["tokens"])
    if tokens != tokens_in_store:
        raise RuntimeError(
            f"token accounting is off ({part}): render counted {tokens}, the store holds {tokens_in_store}"
        )
    trained_tokens = int(stats["trained_tokens"])
    lower_bound = -(-tokens // row_size)
    return {
        "conversations": int(stats["trained"]),
        "conversations_split": int(stats["split"]),
        "windows": int(stats["windows"]),
        "sequences": int(stats["sequences"]),
        "tokens": tokens,
        "trained_tokens": trained_tokens,
        "trained_fraction": trained_tokens / tokens if tokens else 0.0,
        "rows": int(rows),
        "rows_lower_bound": int(lower_bound),
        "fill_efficiency": tokens / (rows * row_size) if rows else 0.0,
        "packing_efficiency": lower_bound / rows if rows else 1.0,
    }


def _build_report(read: int, reader_drops: Counter, stats: Counter, train: dict[str, Any],
                  heldout: dict[str, Any] | None, row_size: int, eval_fraction: float, eval_seed: int | None,
                  seconds: float) -> dict[str, Any]:
    """The whole report. ``stats``: render counters of both sides together; ``train``/``heldout``:
    _part_report of each side (``heldout`` None without a split)."""
    dropped: Counter = Counter({f"read:{reason}": n for reason, n in reader_drops.items()})
    for key, n in stats.items():
        if key.startswith("dropped:") and n:
            dropped[f"render:{key.split(':', 1)[1]}"] += n
    trained = int(stats["trained"])
    n_heldout = heldout["conversations"] if heldout else 0
    report = {
        # Conversations: both sides together.
        "conversations_read": int(read),
        "conversations_trained": trained,
        "conversations_heldout": n_heldout,
        "conversations_dropped": int(sum(dropped.values())),
        "dropped": dict(sorted(dropped.items())),
        "conversations_split": int(stats["split"]),
        "windows": int(stats["windows"]),
        "counselor_turns_dropped": int(stats["turns_dropped:turn_too_long"]),
        "straddling_tokens": int(stats["straddling_tokens"]),
        # Sequences, tokens, rows: the training store (the one prepare() returns), as without a split.
        **{k: train[k] for k in ("sequences", "tokens", "trained_tokens", "trained_fraction", "rows")},
        "row_size": int(row_size),
        **{k: train[k] for k in ("rows_lower_bound", "fill_efficiency", "packing_efficiency")},
        "eval_fraction": eval_fraction,
        "eval_seed": eval_seed,
        "train": train,
        "heldout": heldout,
        "seconds": seconds,
    }
    # Every conversation read is accounted for exactly once, and every kept one sits on one side.
    if report["conversations_read"] != trained + report["conversations_dropped"]:
        raise RuntimeError(
            f"conversation accounting is off: read {read} != trained {trained} + dropped "
            f"{report['conversations_dropped']} ({dict(dropped)}); this is a bug, please report it"
        )
    if trained != train["conversations"] + n_heldout:
        raise RuntimeError(
            f"split accounting is off: trained {trained} != train {train['conversations']} + held-out "
            f"{n_heldout}; this is a bug, please report it"
        )
    if int(stats["tokens"]) != train["tokens"] + (heldout["tokens"] if heldout else 0):
        raise RuntimeError(f"token accounting is off: render counted {stats['tokens']} over both sides")
    return report


# ------------------------------------------------------------------------------------------------
# Worker processes


def default_workers() -> int:
    """min(8, the CPUs this process may run on)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(_MAX_DEFAULT_WORKERS, n))


def check_workers(workers: Any) -> int | None:
    """workers as an int >= 1, or None (the default); a TypeError/ValueError names the flag."""
    if workers is None:
        return None
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral):
        raise TypeError(f"workers={workers!r}: must be a positive integer or None (--workers)")
    if workers < 1:
        raise ValueError(f"workers={workers!r}: must be >= 1 (--workers); 1 renders in-process")
    return int(workers)


_WORKER: dict[str, Any] = {}


def _worker_init(tokenizer_spec: tuple[str, Any], render_options: dict[str, Any]) -> None:
    # Runs before the tokenizer exists in this process: the tokenizer arrives as a path or as pickled
    # bytes, and is only built here, after its Rust thread pool has been told to stay single-threaded
    # (the workers are the parallelism).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    kind, value = tokenizer_spec
    _WORKER["tokenizer"] = pickle.loads(value) if kind == "pickle" else load_tokenizer(value)
    _WORKER["options"] = render_options


def _worker_render(conversations: list) -> tuple[list, Counter]:
    from soulchat.data.render import render_and_tokenize

    stats: Counter = Counter()
    opts = _WORKER["options"]
    sequences = list(render_and_tokenize(conversations, _WORKER["tokenizer"], opts["template"],
                                         opts["max_length"], overflow=opts["overflow"],
                                         loss_weighting=opts["loss_weighting"], stats=stats))
    return sequences, stats


def _tokenizer_spec(tokenizer_arg: Any, tok) -> tuple[str, Any]:
    """How workers get the tokenizer: pickled once here, else the path it was loaded from.

    A fast tokenizer pickles as its JSON serialization plus its configuration (chat template, special
    tokens), and unpickles in ~1 s; loading it from its directory with AutoTokenizer imports torch
    first, about 4 s per worker.
    """
    try:
        return ("pickle", pickle.dumps(tok, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception as e:  # any pickling failure: fall back to the path, if there is one
        if tokenizer_arg is None:
            return ("path", str(default_tokenizer_path()))
        if isinstance(tokenizer_arg, (str, os.PathLike)):
            return ("path", os.fspath(tokenizer_arg))
        raise TypeError(
            f"the tokenizer ({type(tok).__name__}) cannot be pickled for the worker processes ({e}): pass "
            "it as a directory, or workers=1 (--workers 1)"
        ) from e


class _Pool:
    """Renders conversation batches in worker processes; results are handed back in submission order.

    At most ``_IN_FLIGHT_PER_WORKER * workers`` tasks are in flight, so reading stays at most that far
    ahead of writing (memory stays bounded on a corpus of any size). A worker's exception is re-raised
    here, by ``submit`` or ``drain``, with its type and message.
    """

    def __init__(self, workers: int, tokenizer_spec: tuple[str, Any], render_options: dict[str, Any]) -> None:
        from concurrent.futures import ProcessPoolExecutor

        # Not fork: the parent's tokenizer may already run Rust threads, which a fork would not carry.
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        self._executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                             initargs=(tokenizer_spec, render_options))
        self._pending: deque = deque()
        self._limit = _IN_FLIGHT_PER_WORKER * workers

    def submit(self, conversations: list, consume) -> None:
        """Render ``conversations`` in a worker, then call ``consume(sequences, stats)`` in order."""
        for i in range(0, len(conversations), _TASK_SIZE):
            future = self._executor.submit(_worker_render, conversations[i:i + _TASK_SIZE])
            self._pending.append((future, consume))
            while len(self._pending) > self._limit:
                self._pop()

    def _pop(self) -> None:
        future, consume = self._pending.popleft()
        consume(*future.result())

    def drain(self) -> None:
        while self._pending:
            self._pop()

    def close(self) -> None:
        for future, _ in self._pending:
            future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)


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
    eval_fraction: float = 0.0,
    eval_seed: int = 0,
    workers: int | None = None,
) -> PackedStore:
    """Read, render, tokenize and pack a corpus into a PackedStore at ``out_dir`` (cached).

    data_paths: files or directories (default: the bundled sample corpus). tokenizer: a tokenizer object
    or a local directory (default: the bundled tokenizer). template: "auto" | "soulchat" | "chatml"
    (default: "auto" when the tokenizer has a chat template, else "soulchat"). max_length: longest
    sequence in tokens; longer conversations are split at turn boundaries (overflow="split") or dropped
    ("drop"). row_size: packed row length in tokens (default: max_length; must be >= max_length).
    on_error: "raise" on the first bad record, or "skip" and count it. force: rebuild even on a cache hit.
    eval_fraction: in [0, 1); each conversation is held out with this probability, decided by a hash of
    (eval_seed, its id) (``is_heldout``). The returned store then holds only the training conversations;
    ``store.heldout`` is the held-out conversations' store and ``store.heldout_path`` their JSON file
    (both None when eval_fraction is 0). seed: the row shuffle of both stores; it does not move the split.
    workers: processes that render and tokenize (1: in this process). Default None: min(8, CPUs), once
    the corpus has more than a couple of thousand conversations (smaller ones stay in-process). The
    output is the same for every value, so it is not part of the cache key.
    """
    from soulchat.data.conversation import RoleMap

    say = print if verbose else (lambda *a, **k: None)
    eval_fraction, eval_seed = check_eval_options(eval_fraction, eval_seed)
    workers = check_workers(workers)
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
        "eval_fraction": eval_fraction,
        # The seed only matters with a split: without one, changing it must not miss the cache.
        "eval_seed": eval_seed if eval_fraction > 0 else None,
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
        split = f", eval_fraction={eval_fraction:g}, eval_seed={eval_seed}" if eval_fraction > 0 else ""
        say(f"preparing {len(files)} file(s) -> {out_dir} (template={template}, max_length={max_length}, "
            f"row_size={row_size}{split})")
        store = _build(data_paths, tok, template, max_length, overflow, loss_weighting,
                       dict(fmt=fmt, role_map=role_map, on_error=on_error), progress, out_dir, row_size, seed,
                       eval_fraction, eval_seed, {"key": key, "options": options, "files": files},
                       workers, tokenizer)
    say(format_report(store.report))
    return store


class _Side:
    """One side of the split while it is built: its store writer and its render counters."""

    def __init__(self, name: str, writer: StoreWriter) -> None:
        self.name = name
        self.writer = writer
        self.stats: Counter = Counter()

    def add(self, sequences: Iterable) -> None:
        for seq in sequences:
            self.writer.add(seq.input_ids, seq.trained.view(np.uint8), seq.weight)


def _build(data_paths, tok, template, max_length, overflow, loss_weighting, read_options, progress,
           out_dir, row_size, seed, eval_fraction, eval_seed, meta, workers=1,
           tokenizer_arg=None) -> PackedStore:
    """The uncached path of prepare(): stream, route to a side, tokenize, write, pack, commit.

    workers > 1: reading and routing stay here; conversation batches are rendered in worker processes
    and their sequences and counters merged back in submission order, so the store is the same as
    in-process. workers None: a pool of default_workers() (if more than one) once more than
    _AUTO_POOL_AFTER conversations have been read, checked as each route chunk is read; as a chunk holds
    more than that, a corpus past the threshold uses the pool from its first chunk, a smaller one never.
    """
    from soulchat.data.conversation import Conversation
    from soulchat.data.readers import read_conversations
    from soulchat.data.render import render_and_tokenize

    start = time.perf_counter()
    reader_drops: Counter = Counter()
    read = 0

    def conversations():
        nonlocal read
        for conv in read_conversations(data_paths, counter=reader_drops, **read_options):
            read += 1
            yield conv

    def render(convs, side: _Side):
        return render_and_tokenize(convs, tok, template, max_length, overflow=overflow,
                                   loss_weighting=loss_weighting, stats=side.stats)

    if workers is None:
        n_workers = default_workers()
        pool_after = _AUTO_POOL_AFTER
    else:
        n_workers, pool_after = workers, 0
    pool: _Pool | None = None

    splitting = eval_fraction > 0
    threshold = _heldout_threshold(eval_fraction)
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(StoreWriter(out_dir))
        train = _Side("train", writer)
        heldout = heldout_json = None
        if splitting:
            heldout = _Side("heldout", stack.enter_context(writer.child(HELDOUT_DIR)))
            heldout_json = _ConversationJsonWriter(writer.file(HELDOUT_FILE))
            stack.callback(heldout_json.abort)  # closes the file if anything below fails

        def add_train(sequences, stats=None):
            if stats is not None:
                train.stats.update(stats)
            train.add(sequences)

        def add_heldout(held):
            last = -1

            def consume(sequences, stats=None):
                nonlocal last
                if stats is not None:
                    heldout.stats.update(stats)
                for seq in sequences:
                    k = int(seq.id.split("#", 1)[0])
                    if k != last:
                        heldout_json.add(held[k])
                        last = k
                    heldout.writer.add(seq.input_ids, seq.trained.view(np.uint8), seq.weight)

            return consume

        stream = _progress(conversations(), progress, "tokenize")
        while chunk := list(itertools.islice(stream, _ROUTE_CHUNK)):
            if pool is None and n_workers > 1 and read > pool_after:
                pool = _Pool(n_workers, _tokenizer_spec(tokenizer_arg, tok),
                             {"template": template, "max_length": max_length, "overflow": overflow,
                              "loss_weighting": loss_weighting})
                stack.callback(pool.close)
            if not splitting:
                kept, held = chunk, []
            else:
                kept, held = [], []
                for conv in chunk:
                    (held if _split_hash(conv.id, eval_seed) < threshold else kept).append(conv)
            if kept:
                if pool is not None:
                    pool.submit(kept, add_train)
                else:
                    add_train(render(kept, train))
            if held:
                # Render names a sequence after its conversation's id (id#wK for windows). Renaming the
                # held-out conversations to their index here maps each sequence back to the conversation
                # that made it, even when ids repeat, so heldout.json holds exactly the kept ones.
                tagged = [Conversation(c.turns, str(k), c.topic, c.source or c.id)
                          for k, c in enumerate(held)]
                if pool is not None:
                    pool.submit(tagged, add_heldout(held))
                else:
                    add_heldout(held)(render(tagged, heldout))
        if pool is not None:
            pool.drain()
            pool.close()  # the workers are done: free them before packing

        sides = [train] + ([heldout] if heldout else [])
        stats = sum((side.stats for side in sides), Counter())
        if stats["rendered"] != read:
            raise RuntimeError(f"render saw {stats['rendered']} conversations, the readers yielded {read}")
        drops = dict(reader_drops) | {k: v for k, v in stats.items() if k.startswith("dropped:")}
        if stats["trained"] == 0:
            raise ValueError(
                f"no trainable conversation in {[str(p) for p in data_paths]}: read "
                f"{read + sum(reader_drops.values())}, dropped by reason: {drops}"
            )
        if train.writer.num_sequences == 0:
            raise ValueError(
                f"eval_fraction={eval_fraction:g} (eval_seed={eval_seed}) held out all "
                f"{stats['trained']} trainable conversations of {[str(p) for p in data_paths]}, leaving "
                "none to train on: lower --eval-fraction"
            )
        if heldout is not None and heldout.writer.num_sequences == 0:
            raise ValueError(
                f"eval_fraction={eval_fraction:g} held out none of the {stats['trained']} trainable "
                f"conversations of {[str(p) for p in data_paths]} (each is held out with that probability, "
                f"by a hash of its id and eval_seed={eval_seed}): raise --eval-fraction, try another "
                "--eval-seed, or pass --eval-fraction 0 for no held-out set"
            )

        # C++ best-fit decreasing: 0.1 s of CPU per 2.3M sequences.
        parts = {side.name: _part_report(side.stats, side.writer.num_tokens, side.writer.pack(row_size, seed),
                                         row_size, side.name) for side in sides}
        if heldout is not None:
            heldout_json.close()
            if heldout_json.count != parts["heldout"]["conversations"]:
                raise RuntimeError(
                    f"{HELDOUT_FILE} holds {heldout_json.count} conversations, the held-out store "
                    f"{parts['heldout']['conversations']}; this is a bug, please report it"
                )
        report = _build_report(read + sum(reader_drops.values()), reader_drops, stats, parts["train"],
                               parts.get("heldout"), row_size, eval_fraction,
                               eval_seed if splitting else None, time.perf_counter() - start)
        if heldout is not None:
            heldout.writer.commit({**meta, "part": "heldout", "report": parts["heldout"]})
        names = {"store": HELDOUT_DIR, "json": HELDOUT_FILE} if splitting else None
        return writer.commit({**meta, "part": "train", "heldout": names, "report": report})
