"""prepare(): corpus files -> conversations -> rendered, masked token ids -> packed rows -> on-disk cache.

One call does the whole data side of training and leaves a PackedStore (soulchat/data/store.py) that the
trainer memory-maps. Its options are one ``DataConfig`` (soulchat/options.py), taken whole.

The jobs it strings together live in their own modules: reading (readers.py), the held-out split
(heldout.py), rendering (render.py), worker processes (workers.py), writing held-out conversations
(corpus_json.py), packing and the store (packing.py, store.py), the cache key and lock (cache.py) and
the report (report.py).

A second run with the same cache key loads the cache and skips all the work (it says so). The number
of workers is not part of the key: the output does not depend on it.

Held-out split (``eval_fraction > 0``): the held-out conversations are packed into their own store,
``<out_dir>/eval`` (``store.heldout``), and written as a SoulChatCorpus JSON array,
``<out_dir>/heldout.json`` (``store.heldout_path``), for ``python -m soulchat.evaluate --data``. Both
are committed with the training store in one atomic swap.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from soulchat.options import DataConfig
from soulchat.data.assets import default_corpus_path, load_tokenizer
from soulchat.data.cache import cache_key, exclusive, file_fingerprint, tokenizer_fingerprint
from soulchat.data.conversation import RoleMap
from soulchat.data.corpus_json import ConversationJsonWriter
from soulchat.data.heldout import HeldoutSplit
from soulchat.data.paths import corpus_paths
from soulchat.data.report import BuildCounts, format_report, part_report
from soulchat.data.store import HELDOUT_DIR, HELDOUT_FILE, PackedStore, StoreWriter, read_meta
from soulchat.data.render import SequenceBatch, resolve_render_mode, thinking_value
from soulchat.data.templates import default_template
from soulchat.data.workers import AUTO_POOL_AFTER, Overlapped, Pool, default_workers, tokenizer_spec

DEFAULT_OUT = Path("cache") / "data"
DEFAULT_MAX_LENGTH = DataConfig.max_length
# Conversations read before they are routed to the training or held-out side; each side then renders
# its share in tokenizer batches of 256. Large enough that the held-out side's batches are not tiny.
_ROUTE_CHUNK = 4096

__all__ = ["DEFAULT_MAX_LENGTH", "DEFAULT_OUT", "corpus_paths", "default_corpus_path", "default_template",
           "format_report", "load_tokenizer", "prepare", "store_dir"]


def _progress(items: Iterator, enabled: bool, desc: str) -> Iterator:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, nothing in logs and CI.
    return iter(tqdm(items, desc=desc, unit=" conv", unit_scale=True, disable=None, file=sys.stderr))


def _key_options(options: DataConfig, row_size: int, role_map: RoleMap, seed: int) -> dict[str, Any]:
    """Every option the output depends on, as recorded in the cache key and meta.json."""
    splitting = options.eval_fraction > 0
    return {
        "template": options.template,
        "render_mode": options.render_mode,
        "thinking": options.thinking,
        "max_length": int(options.max_length),
        "row_size": int(row_size),
        "format": options.format,
        "role_map": {r: list(getattr(role_map, r)) for r in ("counselor", "client", "system")},
        "on_error": options.on_error,
        "overflow": options.overflow,
        "loss_weighting": options.loss_weighting,
        "seed": int(seed),
        "eval_fraction": float(options.eval_fraction),
        # The seed only matters with a split: without one, changing it must not miss the cache.
        "eval_seed": int(options.eval_seed) if splitting else None,
        "columns": options.columns,
    }


def store_dir(options: DataConfig) -> Path:
    """Where prepare() writes the store of ``options``: --cache-dir, else ``DEFAULT_OUT``."""
    return Path(options.cache_dir) if options.cache_dir is not None else DEFAULT_OUT


def prepare(
    options: DataConfig | None = None,
    tokenizer: Any = None,
    *,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    verbose: bool = True,
    timings: dict[str, float] | None = None,
) -> PackedStore:
    """Read, render, tokenize and pack a corpus into a PackedStore (cached), as ``options`` say.

    options: the data options, taken whole (default: ``DataConfig()``, which holds out 5%): data (files or
    directories; empty = the bundled sample corpus, ``corpus_paths``), cache_dir (where the store is
    written; unset = ``DEFAULT_OUT``, ``store_dir``), template, max_length (longer conversations are split
    at turn boundaries or dropped, ``overflow``), row_size (default max_length), format, on_error ("raise"
    on the first bad record, or "skip" and count it), loss_weighting, eval_fraction/eval_seed (each
    conversation is held out with that probability, decided by a hash of (eval_seed, its id),
    ``soulchat.data.heldout.is_heldout``; the returned store then holds only the training conversations,
    ``store.heldout`` is the held-out store and ``store.heldout_path`` their JSON file, both None when
    eval_fraction is 0), workers (processes that render and tokenize; None: min(8, CPUs) once the corpus
    has more than a couple of thousand conversations; the output is the same for every value),
    counselor_role/client_role (raw role names added to the built-in ones), columns.
    tokenizer: a tokenizer object or a local directory (default: the bundled tokenizer).
    seed: the row shuffle of both stores; it does not move the split. force: rebuild even on a cache hit.
    timings: a dict to fill with seconds per stage of an uncached build (see ``_StageTimer``); None (the
    default) times nothing.
    """
    options = DataConfig() if options is None else options
    say = print if verbose else (lambda *a, **k: None)
    row_size = options.max_length if options.row_size is None else options.row_size
    tok = load_tokenizer(tokenizer)
    out_dir = store_dir(options)

    key_options = _key_options(options, row_size, options.role_map(), seed)
    from soulchat.data.readers import expand_paths

    # Under --on-error skip a save_to_disk shard that is listed but missing is counted by the readers.
    listed = expand_paths(corpus_paths(options), [] if options.on_error == "skip" else None)
    files = [file_fingerprint(Path(p)) for p in listed]
    key = cache_key(files, tokenizer_fingerprint(tok), key_options)
    with exclusive(out_dir.absolute()):
        meta = read_meta(out_dir)
        if not force and meta is not None and meta.get("key") == key:
            store = PackedStore(out_dir)
            say(f"cache hit: {out_dir} (key {key[:12]}) matches the inputs and options; skipping prepare")
            say(format_report(store.report))
            return store
        split = (f", eval_fraction={options.eval_fraction:g}, eval_seed={options.eval_seed}"
                 if options.eval_fraction > 0 else "")
        render_mode = resolve_render_mode(tok, options.template, options.render_mode,
                                          thinking_value(options.thinking))
        thinking = f", thinking={options.thinking}" if options.thinking is not None else ""
        say(f"preparing {len(files)} file(s) -> {out_dir} (template={options.template}{thinking}, "
            f"render_mode={render_mode}, max_length={options.max_length}, row_size={row_size}{split})")
        build = _Build(options, row_size=row_size, seed=seed, render_mode=render_mode,
                       meta={"key": key, "options": key_options, "files": files}, tokenizer=tok,
                       tokenizer_arg=tokenizer, progress=progress, timings=timings)
        with _heap_frozen():
            store = _build(build)
    say(format_report(store.report))
    return store


@dataclass(frozen=True)
class _Build:
    """What prepare() decided for one uncached build: the options, and what it resolved from them."""

    options: DataConfig
    row_size: int
    seed: int  # the row shuffle
    render_mode: str  # resolved: "conversation" or "per-turn"
    meta: dict[str, Any]  # cache key, key options and input files, written to meta.json
    tokenizer: Any  # the loaded tokenizer
    tokenizer_arg: Any  # what the caller passed (a directory lets workers load their own copy)
    progress: bool
    timings: dict[str, float] | None

    @property
    def paths(self) -> list[Path]:
        return corpus_paths(self.options)

    @property
    def out_dir(self) -> Path:
        return store_dir(self.options)


class _Side:
    """One side of the split while it is built: its store writer and its render counters."""

    def __init__(self, name: str, writer: StoreWriter) -> None:
        self.name = name
        self.writer = writer
        self.stats: Counter = Counter()

    def add(self, batch: SequenceBatch, stats: Counter | None = None) -> None:
        if stats is not None:
            self.stats.update(stats)
        self.writer.add_batch(batch.input_ids, batch.trained.view(np.uint8), batch.weight, batch.lengths)


class _HeldoutSide(_Side):
    """The held-out side also writes each conversation that yields a sequence to heldout.json."""

    def __init__(self, writer: StoreWriter, json_writer: ConversationJsonWriter) -> None:
        super().__init__("heldout", writer)
        self.json = json_writer

    def consumer(self, conversations: list):
        """A consume(batch, stats) for the sequences rendered from ``conversations``."""

        def consume(batch: SequenceBatch, stats=None):
            last = -1
            for index in batch.conversation_index:
                # The windows of one conversation come in a row: write the conversation once.
                if index != last:
                    self.json.add(conversations[index])
                    last = index
            self.add(batch, stats)

        return consume


# Net allocations of tracked objects between young-generation collections during a build (Python's
# default is 700 or 2000). The build's objects die young by reference counting, or live in the batches
# in flight: each collection scans those survivors again, so fewer collections is less work.
_BUILD_GC_THRESHOLD = 10_000


@contextlib.contextmanager
def _heap_frozen() -> Iterator[None]:
    """Leave the objects alive before the build out of the garbage collector's scans while it runs,
    and collect the young generation less often.

    Imports (transformers, torch) leave ~1M tracked objects that every full collection walks; a build
    allocates millions of short-lived ones, so collections are frequent. Frozen, the collector's time
    on 50k conversations fell from 1.66 s to 0.45 s (of ~33 s, all on the serial Python side); with
    the young generation collected every 10,000 allocations, on 20k conversations from 0.20 s to 0.04 s.
    Freezing is skipped when the caller has frozen objects itself (``gc.unfreeze`` would release those
    too). The thresholds are restored afterwards.
    """
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], _BUILD_GC_THRESHOLD), *thresholds[1:])
    frozen = not gc.get_freeze_count()
    if frozen:
        gc.freeze()
    try:
        yield
    finally:
        if frozen:
            gc.unfreeze()
        gc.set_threshold(*thresholds)


class _StageTimer:
    """Seconds per stage of one build, into a caller's dict (prepare(timings=...)); for benchmarks.

    Stages as the calling process sees them: ``read`` (the readers: parse and validate), ``render``
    (render + mask + tokenize; in-process they run interleaved per batch of 256 and are not separated
    here; with a pool this is the time spent handing batches to the workers and waiting for them, so it
    overlaps the workers' work rather than measuring it), ``write`` (appending sequences to the store
    files), ``pack`` (best-fit decreasing + row files), ``commit`` (checksums, meta.json, the atomic swap),
    ``total`` (the whole build). Each is a sum of perf_counter intervals.
    """

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        for stage in ("read", "render", "write", "pack", "commit"):
            timings[stage] = 0.0

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] += time.perf_counter() - start

    def iterate(self, name: str, items: Iterable) -> Iterator:
        """``items``, with the time spent producing each one added to ``name``."""
        it = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.timings[name] += time.perf_counter() - start
                return
            self.timings[name] += time.perf_counter() - start
            yield item

    def consumer(self, consume):
        """``consume``, its time moved from ``render`` (which encloses it) to ``write``."""

        def timed(*args):
            start = time.perf_counter()
            consume(*args)
            spent = time.perf_counter() - start
            self.timings["write"] += spent
            self.timings["render"] -= spent

        return timed


def _build(build: _Build) -> PackedStore:
    """The uncached path of prepare(): stream, route to a side, tokenize, write, pack, commit.

    workers > 1: reading and routing stay here; conversation batches are rendered in worker processes
    and their sequences and counters merged back in submission order, so the store is the same as
    in-process. workers None: a pool of default_workers() (if more than one) once more than
    AUTO_POOL_AFTER conversations have been read, checked as each route chunk is read; as a chunk holds
    more than that, a corpus past the threshold uses the pool from its first chunk, a smaller one never.
    """
    from soulchat.data.readers import read_conversations

    start = time.perf_counter()
    options, tok, data_paths = build.options, build.tokenizer, build.paths
    row_size, seed, meta = build.row_size, build.seed, build.meta
    timer = _StageTimer(build.timings) if build.timings is not None else None
    reader_drops: Counter = Counter()
    reader_notes: Counter = Counter()  # kept records the readers warn about (exact duplicates)
    read = 0

    def conversations():
        nonlocal read
        parsed = read_conversations(data_paths, options, counter=reader_drops, notes=reader_notes)
        for conv in (parsed if timer is None else timer.iterate("read", parsed)):
            read += 1
            yield conv

    if options.workers is None:
        n_workers, pool_after = default_workers(), AUTO_POOL_AFTER
    else:
        n_workers, pool_after = options.workers, 0
    engine: Pool | Overlapped | None = None  # chosen when the first route chunk has been read

    eval_fraction, eval_seed = float(options.eval_fraction), int(options.eval_seed)
    split = HeldoutSplit(eval_fraction, eval_seed) if eval_fraction > 0 else None
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(StoreWriter(build.out_dir))
        train = _Side("train", writer)
        heldout: _HeldoutSide | None = None
        if split is not None:
            heldout_json = ConversationJsonWriter(writer.file(HELDOUT_FILE))
            stack.callback(heldout_json.abort)  # closes the file if anything below fails
            heldout = _HeldoutSide(stack.enter_context(writer.child(HELDOUT_DIR)), heldout_json)

        def render(convs: list, consume) -> None:
            if timer is not None:
                with timer.stage("render"):
                    return engine.submit(convs, timer.consumer(consume))
            return engine.submit(convs, consume)

        stream = _progress(conversations(), build.progress, "tokenize")
        while chunk := list(itertools.islice(stream, _ROUTE_CHUNK)):
            if engine is None:
                # A corpus larger than a route chunk is past pool_after here, a smaller one is all read.
                engine = (Pool(n_workers, tokenizer_spec(build.tokenizer_arg, tok), options)
                          if n_workers > 1 and read > pool_after else Overlapped(tok, options))
                stack.callback(engine.close)
            if split is None:
                kept, held = chunk, []
            else:
                kept, held = [], []
                for conv in chunk:
                    (held if split.holds_out(conv.id) else kept).append(conv)
            if kept:
                render(kept, train.add)
            if held:
                render(held, heldout.consumer(held))
        if engine is not None:
            with timer.stage("render") if timer is not None else contextlib.nullcontext():
                engine.drain()
            engine.close()  # the workers are done: free them before packing

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
        with timer.stage("pack") if timer is not None else contextlib.nullcontext():
            packed = {side.name: side.writer.pack(row_size, seed) for side in sides}
        parts = {side.name: part_report(side.stats, side.writer.num_tokens, packed[side.name], row_size,
                                        side.name) for side in sides}
        if heldout is not None:
            heldout.json.close()
            if heldout.json.count != parts["heldout"]["conversations"]:
                raise RuntimeError(
                    f"{HELDOUT_FILE} holds {heldout.json.count} conversations, the held-out store "
                    f"{parts['heldout']['conversations']}; this is a bug, please report it"
                )
        report = BuildCounts(
            read=read + sum(reader_drops.values()), reader_drops=reader_drops, stats=stats,
            train=parts["train"], heldout=parts.get("heldout"), row_size=row_size,
            eval_fraction=eval_fraction,
            eval_seed=eval_seed if split is not None else None, seconds=time.perf_counter() - start,
            reader_notes=reader_notes, render_mode=build.render_mode,
        ).report()
        with timer.stage("commit") if timer is not None else contextlib.nullcontext():
            if heldout is not None:
                heldout.writer.commit({**meta, "part": "heldout", "report": parts["heldout"]})
            names = {"store": HELDOUT_DIR, "json": HELDOUT_FILE} if split is not None else None
            committed = writer.commit({**meta, "part": "train", "heldout": names, "report": report})
        if timer is not None:
            timer.timings["total"] = time.perf_counter() - start
        return committed
