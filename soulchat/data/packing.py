"""Packing conversations into fixed-size rows, and rows into packed micro-batches.

``pack`` / ``assemble`` run in the C++ extension ``soulchat._packer`` (GIL released); ``pack_ref`` /
``assemble_ref`` are the plain-Python truth they are tested against, bit for bit.

The packing algorithm, fully specified (the C++ core and ``pack_ref`` follow it exactly):

1. Visit sequences by length descending, ties by index ascending.
2. Put each sequence into the open row with the smallest remaining capacity that still fits it
   (best fit). Among rows with equal remaining capacity take the one that reached that remaining
   capacity most recently (one stack per remaining value). If no open row fits, open a new row; rows
   are numbered in opening order. A row whose remaining capacity reaches 0 is closed.
3. A row lists its sequences in insertion order (longest first).
4. Shuffle the rows: splitmix64 seeded with ``seed mod 2**64``; Fisher-Yates from the last row down,
   ``j = next() % (i + 1)``; output row ``r`` is packed row ``perm[r]``.

Best-fit decreasing is within 11/9 OPT + 6/9 of the optimum in the worst case and within a fraction of a
percent of the lower bound ``ceil(sum / capacity)`` on conversation-length distributions (see
bench/results/packing.csv). Plain padding to the longest sequence of a batch is the thing it replaces.
"""

from __future__ import annotations

import bisect
import math
import operator
from typing import Any

import numpy as np

from soulchat import _packer

IGNORE_INDEX = -100
MAX_CAPACITY: int = _packer.MAX_CAPACITY
_U64 = (1 << 64) - 1


# ------------------------------------------------------------------------------------------------
# Input normalisation shared by the extension wrappers and the references, so both reject the same
# inputs with the same messages.


def _as_lengths(lengths: Any) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {arr.shape}: pass one length per sequence")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(
            f"lengths must be integers (int64), got dtype {arr.dtype}: convert with .astype(np.int64)"
        )
    if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
        raise ValueError("lengths do not fit int64")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _as_capacity(capacity: Any) -> int:
    try:
        cap = operator.index(capacity)
    except TypeError:
        raise ValueError(f"capacity must be an integer number of tokens, got {capacity!r}") from None
    if cap <= 0:
        raise ValueError(
            f"capacity must be positive, got {cap}: pass the row size in tokens (e.g. --row-size 4096)"
        )
    if cap > MAX_CAPACITY:
        raise ValueError(
            f"capacity {cap} exceeds the maximum row size {MAX_CAPACITY}: use a smaller --row-size"
        )
    return cap


def _as_seed(seed: Any) -> int:
    try:
        return operator.index(seed) & _U64
    except TypeError:
        raise ValueError(f"seed must be an integer, got {seed!r}") from None


def _check_lengths_ref(lengths: np.ndarray, capacity: int) -> None:
    bad = np.flatnonzero((lengths <= 0) | (lengths > capacity))
    if bad.size:
        i = int(bad[0])
        length = int(lengths[i])
        if length <= 0:
            raise ValueError(
                f"lengths[{i}] = {length}: every sequence needs at least one token; "
                "drop empty sequences before packing"
            )
        raise ValueError(
            f"lengths[{i}] = {length} exceeds capacity {capacity}: split the conversation "
            "(overflow='split') or raise --max-length / --row-size"
        )


# ------------------------------------------------------------------------------------------------
# The shuffle PRNG, shared by pack_ref (and usable by anything that must reproduce the row order).


def splitmix64(seed: int):
    """Infinite generator of splitmix64 outputs for ``seed`` (uint64)."""
    state = seed & _U64
    while True:
        state = (state + 0x9E3779B97F4A7C15) & _U64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
        yield z ^ (z >> 31)


def shuffle_permutation(num_rows: int, seed: int) -> list[int]:
    """Fisher-Yates permutation of ``range(num_rows)`` driven by splitmix64(seed)."""
    perm = list(range(num_rows))
    rng = splitmix64(seed)
    for i in range(num_rows - 1, 0, -1):
        j = next(rng) % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


# ------------------------------------------------------------------------------------------------
# pack


def pack_ref(lengths: Any, capacity: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pure-Python best-fit-decreasing packing; the specification ``pack`` is tested against.

    Returns ``(row_offsets int64 [R+1], row_seqs int64 [n])``: row ``r`` holds the sequences
    ``row_seqs[row_offsets[r]:row_offsets[r+1]]``.
    """
    lengths = _as_lengths(lengths)
    capacity = _as_capacity(capacity)
    seed = _as_seed(seed)
    _check_lengths_ref(lengths, capacity)
    lens = lengths.tolist()

    order = sorted(range(len(lens)), key=lambda i: (-lens[i], i))
    stacks: dict[int, list[int]] = {}  # remaining capacity -> open rows (last pushed on top)
    open_remaining: list[int] = []  # sorted remaining values that have a non-empty stack
    rows: list[list[int]] = []
    for i in order:
        length = lens[i]
        k = bisect.bisect_left(open_remaining, length)  # smallest remaining >= length
        if k < len(open_remaining):
            remaining = open_remaining[k]
            stack = stacks[remaining]
            row = stack.pop()
            if not stack:
                del open_remaining[k]
        else:
            remaining = capacity
            row = len(rows)
            rows.append([])
        rows[row].append(i)
        left = remaining - length
        if left > 0:
            stack = stacks.setdefault(left, [])
            if not stack:
                bisect.insort(open_remaining, left)
            stack.append(row)

    perm = shuffle_permutation(len(rows), seed)
    row_seqs = [i for r in perm for i in rows[r]]
    row_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(rows[r]) for r in perm], out=row_offsets[1:])
    return row_offsets, np.asarray(row_seqs, dtype=np.int64).reshape(-1)


def pack(lengths: Any, capacity: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing packing of sequences of ``lengths`` tokens into rows of ``capacity`` tokens.

    Same result as ``pack_ref``; runs in C++ with the GIL released: 0.15 s of CPU for 2.3M sequences
    into 4096-token rows (pack_ref: 39 s; bench/bench_packing.py). Raises ValueError naming the first
    bad length.
    """
    return _packer.pack(_as_lengths(lengths), _as_capacity(capacity), _as_seed(seed))


# ------------------------------------------------------------------------------------------------
# assemble


def _as_array(x: Any, name: str, dtype: np.dtype, kinds: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in kinds:
        raise ValueError(f"{name} must have dtype {np.dtype(dtype).name}, got {arr.dtype}")
    if arr.dtype == dtype and arr.flags.c_contiguous:
        return arr  # memory-mapped arrays pass through without a copy
    return np.ascontiguousarray(arr, dtype=dtype)


def _as_assemble_inputs(tokens, trained, weight, seq_offsets, seq_ids):
    tokens = _as_array(tokens, "tokens", np.int32, "iu")
    trained_arr = np.asarray(trained)
    if trained_arr.dtype == np.bool_ and trained_arr.ndim == 1 and trained_arr.flags.c_contiguous:
        trained = trained_arr
    else:
        trained = _as_array(trained_arr, "trained", np.uint8, "biu")
    weight = _as_array(weight, "weight", np.float32, "f")
    seq_offsets = _as_array(seq_offsets, "seq_offsets", np.int64, "iu")
    seq_ids = _as_array(seq_ids, "seq_ids", np.int64, "iu")
    return tokens, trained, weight, seq_offsets, seq_ids


def assemble_ref(tokens, trained, weight, seq_offsets, seq_ids) -> dict[str, Any]:
    """Pure-numpy packed micro-batch of the sequences ``seq_ids`` (the specification of ``assemble``).

    Sequence ``i`` is ``tokens[seq_offsets[i]:seq_offsets[i+1]]``. Returns the packed micro-batch contract (README.md):
    input_ids int64 [T], position_ids int64 [T] (0 at each sequence start), cu_seqlens int32 [S+1],
    max_seqlen int, labels int64 [T] (next token if trained and in the same sequence, else -100),
    loss_index int64 [N] (positions with a label), loss_weight float32 [N] (weight of the target token).
    """
    tokens, trained, weight, seq_offsets, seq_ids = _as_assemble_inputs(
        tokens, trained, weight, seq_offsets, seq_ids
    )
    total = tokens.shape[0]
    if trained.shape[0] != total or weight.shape[0] != total:
        raise ValueError(
            f"tokens, trained and weight must have the same length, got {total}, "
            f"{trained.shape[0]} and {weight.shape[0]}"
        )
    if seq_offsets.shape[0] < 1:
        raise ValueError("seq_offsets must hold n+1 >= 1 entries (it starts with 0)")
    num_seqs = seq_offsets.shape[0] - 1
    for s, i in enumerate(seq_ids.tolist()):
        if not 0 <= i < num_seqs:
            raise ValueError(
                f"seq_ids[{s}] = {i} is out of range [0, {num_seqs}): "
                "the row refers to a sequence the store does not hold"
            )
        begin, end = int(seq_offsets[i]), int(seq_offsets[i + 1])
        if begin < 0 or end <= begin or end > total:
            raise ValueError(
                f"seq_offsets[{i}:{i + 2}] = [{begin}, {end}] is not an increasing range inside "
                f"[0, {total}]: the offsets are corrupt (rebuild the cache)"
            )

    starts = seq_offsets[seq_ids]
    ends = seq_offsets[seq_ids + 1]
    seqlens = ends - starts  # [S]
    cu_seqlens = np.zeros(len(seq_ids) + 1, dtype=np.int64)
    np.cumsum(seqlens, out=cu_seqlens[1:])
    T = int(cu_seqlens[-1])
    if T >= 2**31 - 1:
        raise ValueError(f"micro-batch of {T} tokens does not fit int32 cu_seqlens: use smaller rows")

    # src[t] = index into the flat arrays of micro-batch position t.
    seq_of_pos = np.repeat(np.arange(len(seq_ids)), seqlens)  # [T]
    position_ids = np.arange(T, dtype=np.int64) - cu_seqlens[:-1][seq_of_pos]
    src = starts[seq_of_pos] + position_ids
    input_ids = tokens[src].astype(np.int64)

    # Position t predicts src[t] + 1, if that is inside the same sequence and trained.
    has_next = position_ids < (seqlens[seq_of_pos] - 1)
    nxt = np.where(has_next, src + 1, 0)
    target_trained = has_next & (trained[nxt] != 0) if T else has_next
    labels = np.where(target_trained, tokens[nxt].astype(np.int64), IGNORE_INDEX).astype(np.int64)
    loss_index = np.flatnonzero(target_trained).astype(np.int64)
    loss_weight = weight[src[loss_index] + 1].astype(np.float32)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids.astype(np.int64),
        "cu_seqlens": cu_seqlens.astype(np.int32),
        "max_seqlen": int(seqlens.max()) if len(seqlens) else 0,
        "labels": labels,
        "loss_index": loss_index,
        "loss_weight": loss_weight,
    }


def assemble(tokens, trained, weight, seq_offsets, seq_ids) -> dict[str, Any]:
    """Packed micro-batch of the sequences ``seq_ids`` (C++, GIL released); same result as
    ``assemble_ref``. Memory-mapped int32/uint8/float32/int64 inputs are read in place."""
    return _packer.assemble(*_as_assemble_inputs(tokens, trained, weight, seq_offsets, seq_ids))


def to_torch(batch: dict[str, Any], device: Any = None) -> dict[str, Any]:
    """The same micro-batch as torch tensors (``max_seqlen`` stays a Python int: no device sync).

    On CUDA the host tensors are pinned first so the copies can overlap with compute.
    """
    import torch

    out: dict[str, Any] = {}
    for name, value in batch.items():
        if isinstance(value, np.ndarray):
            t = torch.from_numpy(value)
            if device is not None and torch.device(device).type == "cuda":
                t = t.pin_memory().to(device, non_blocking=True)
            elif device is not None:
                t = t.to(device)
            out[name] = t
        else:
            out[name] = value
    return out


# ------------------------------------------------------------------------------------------------
# Accounting


def lower_bound_rows(lengths: Any, capacity: int) -> int:
    """No packing can use fewer rows than ``ceil(sum(lengths) / capacity)``."""
    return math.ceil(int(np.asarray(lengths, dtype=np.int64).sum()) / capacity)


def fill_efficiency(lengths: Any, row_offsets: np.ndarray, capacity: int) -> float:
    """Real tokens / (rows * capacity): the fraction of row slots that hold data."""
    rows = len(row_offsets) - 1
    return float(np.asarray(lengths, dtype=np.int64).sum()) / (rows * capacity) if rows else 1.0


def padded_waste(lengths: Any, batch_size: int, sort: bool = False) -> dict[str, float]:
    """What plain padding costs: batches of ``batch_size`` consecutive sequences (length-sorted if
    ``sort``), each padded to its longest sequence. Returns padded slots, real tokens and the fraction of
    slots that are padding."""
    lens = np.asarray(lengths, dtype=np.int64)
    if sort:
        lens = np.sort(lens)[::-1]
    n = len(lens)
    pad_to = np.zeros(0, dtype=np.int64)
    if n:
        groups = np.arange(0, n, batch_size)
        longest = np.maximum.reduceat(lens, groups)
        sizes = np.diff(np.append(groups, n))
        pad_to = longest * sizes
    slots = int(pad_to.sum())
    real = int(lens.sum())
    return {
        "slots": slots,
        "tokens": real,
        "waste": (slots - real) / slots if slots else 0.0,
    }
