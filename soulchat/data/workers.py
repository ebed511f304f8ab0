"""How prepare() renders and tokenizes conversation batches: in this process, or in worker processes.

Both engines take batches with ``submit(conversations, consume)`` and hand back sequences and counters
in submission order (``consume(batch, stats)``, batch a render.SequenceBatch), so the output does not
depend on which one runs or on the number of workers. Reading and the held-out routing stay in the
calling process.

- ``Overlapped`` (workers=1): renders and masks in this process and tokenizes in one background thread,
  a batch ahead. The Rust tokenizer releases the GIL and spreads each batch over every core, so the
  Python work (read, render, mask, write: ~0.2 ms per conversation) runs while the tokenizer does.
- ``Pool`` (workers > 1): worker processes that each render, tokenize (one thread each) and mask.
  Conversations and sequences cross process boundaries (pickled, ~0.08 ms per conversation each way).

Which is faster depends on the cores. On C cores, per conversation, the tokenizer takes ~1 ms of CPU
and the rest ~0.2 ms: in one process the Python part is serial, so ``Overlapped`` reaches ~1.2/C ms
until C ~ 5, where 0.2 ms of serial Python becomes the limit; the pool adds its pickling but scales
past that. ``default_workers`` therefore picks 1 on up to 4 cores (measured on 2 cores:
bench/results/prepare.md) and a pool above.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
from collections import Counter, deque
from typing import Any

from soulchat.options import DataConfig
from soulchat.data.assets import default_tokenizer_path, load_tokenizer
from soulchat.data.render import BatchRenderer, SequenceBatch, thinking_value

# Conversations per task sent to the pool, tasks in flight per worker, and the most workers the default
# picks. With workers=None on more than 4 CPUs, a corpus of up to AUTO_POOL_AFTER conversations is
# rendered in-process:
# starting the pool costs about 2-2.5 s (each worker unpickles the tokenizer, importing transformers),
# while one process renders ~600-850 conversations/s, so W workers break even at about
# 2.5 s * 850/s * W/(W-1) conversations: ~2,400 for 8 workers, ~4,200 for 2 (measured on a shared 2-core
# EPYC). Larger corpora start the pool with their first route chunk.
_TASK_SIZE = 512
_IN_FLIGHT_PER_WORKER = 2
_MAX_DEFAULT_WORKERS = 8
AUTO_POOL_AFTER = 2500


# Up to this many CPUs one process (tokenizing in a background thread on every core) beats a pool.
_IN_PROCESS_UP_TO_CPUS = 4
# Conversations per batch of the in-process engine: one call of the Rust tokenizer.
_BATCH = 256
# Batches rendered ahead of the one being finished: the tokenizer thread always has one queued.
_AHEAD = 2


def available_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers() -> int:
    """1 (one process, tokenizing on every core) on up to 4 CPUs, else min(8, CPUs) worker processes."""
    n = available_cpus()
    return 1 if n <= _IN_PROCESS_UP_TO_CPUS else min(_MAX_DEFAULT_WORKERS, n)


_WORKER: dict[str, Any] = {}


def _renderer(tokenizer, options: DataConfig) -> BatchRenderer:
    return BatchRenderer(tokenizer, options.template, options.max_length, overflow=options.overflow,
                         loss_weighting=options.loss_weighting, render_mode=options.render_mode,
                         thinking=thinking_value(options.thinking))


def _worker_render(conversations: list, first_index: int) -> tuple[SequenceBatch, Counter]:
    """One task of a worker: its conversations rendered and tokenized as one batch."""
    stats: Counter = Counter()
    return _WORKER["renderer"](list(enumerate(conversations, first_index)), stats), stats


def _worker_init(tokenizer_spec: tuple[str, Any], options: DataConfig) -> None:
    # Runs before the tokenizer exists in this process: the tokenizer arrives as a path or as pickled
    # bytes, and is only built here, after its Rust thread pool has been told to stay single-threaded
    # (the workers are the parallelism).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    kind, value = tokenizer_spec
    tokenizer = pickle.loads(value) if kind == "pickle" else load_tokenizer(value)
    _WORKER["renderer"] = _renderer(tokenizer, options)
    gc.freeze()  # the imports' objects stay out of every collection (see pipeline._heap_frozen)


def tokenizer_spec(tokenizer_arg: Any, tok) -> tuple[str, Any]:
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


class Overlapped:
    """Renders batches in this process while one background thread tokenizes the batch before.

    ``submit``/``drain``/``close`` as ``Pool``. At most ``_AHEAD`` rendered batches wait for their
    tokens, so memory stays bounded. Exceptions from rendering raise in ``submit``; from tokenizing, when
    that batch is finished (``submit`` or ``drain``).
    """

    def __init__(self, tokenizer, options: DataConfig) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._renderer = _renderer(tokenizer, options)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="soulchat-tokenize")
        self._pending: deque = deque()

    def submit(self, conversations: list, consume) -> None:
        """Render ``conversations`` now, tokenize them in the background, ``consume`` them in order."""
        for i in range(0, len(conversations), _BATCH):
            stats: Counter = Counter()
            ready = self._renderer.render(list(enumerate(conversations[i:i + _BATCH], i)), stats)
            future = self._executor.submit(self._renderer.encode, ready)
            self._pending.append((ready, future, stats, consume))
            while len(self._pending) > _AHEAD:
                self._pop()

    def _pop(self) -> None:
        ready, future, stats, consume = self._pending.popleft()
        consume(self._renderer.finish(ready, future.result(), stats), stats)

    def drain(self) -> None:
        while self._pending:
            self._pop()

    def close(self) -> None:
        for _, future, _, _ in self._pending:
            future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)


class Pool:
    """Renders conversation batches in worker processes; results are handed back in submission order.

    At most ``_IN_FLIGHT_PER_WORKER * workers`` tasks are in flight, so reading stays at most that far
    ahead of writing (memory stays bounded on a corpus of any size). A worker's exception is re-raised
    here, by ``submit`` or ``drain``, with its type and message.
    """

    def __init__(self, workers: int, tokenizer_spec: tuple[str, Any], options: DataConfig) -> None:
        from concurrent.futures import ProcessPoolExecutor

        # Not fork: the parent's tokenizer may already run Rust threads, which a fork would not carry.
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        self._executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                             initargs=(tokenizer_spec, options))
        self._pending: deque = deque()
        self._limit = _IN_FLIGHT_PER_WORKER * workers

    def submit(self, conversations: list, consume) -> None:
        """Render ``conversations`` in workers, then call ``consume(batch, stats)`` in order.

        Each sequence's ``conversation_index`` is the position of its conversation in ``conversations``.
        """
        for i in range(0, len(conversations), _TASK_SIZE):
            future = self._executor.submit(_worker_render, conversations[i:i + _TASK_SIZE], i)
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
