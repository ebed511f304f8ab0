"""Streaming readers: corpus files in any supported format -> validated Conversations.

``read_conversations(paths, options)`` is the entry point: each file's format is ``options.format`` or
detected (formats.detect_format); its records are streamed (json_stream: a JSON array or JSONL; formats:
cpsycound text, parquet/arrow through arrow.py), mapped to Conversations by their format (formats.py) and
validated (conversation.validate_conversation). The files are the --data paths expanded (paths.py).

Bad input raises DataError naming the file, the line or record, what is wrong and the fix. With
``on_error="skip"`` the bad record is dropped and ``counter[reason] += 1``; the counter receives only
drop reasons (it never counts good records), so ``records seen = conversations yielded + sum(counter
values)``. One thing cannot be skipped: a JSON *array* whose structure is broken (malformed JSON between
records, or a truncated file) gives no safe point to resume from, so it raises even with "skip" (JSONL
can skip a bad line; convert to JSONL if your data has such damage).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from soulchat.data.arrow import is_arrow_file, iter_arrow_records
from soulchat.data.conversation import Conversation, DataError, RoleMap, validate_conversation
from soulchat.data.file_errors import DamagedFile, naming
from soulchat.data.formats import (
    block_to_conversation,
    detect_format,
    is_message,
    iter_text_blocks,
    record_to_conversation,
    turns_from_messages,
)
from soulchat.data.json_stream import (
    DEFAULT_CHUNK_SIZE,
    BrokenArray,
    is_json_array,
    iter_json_array,
    iter_jsonl,
)
from soulchat.data.paths import expand_paths
from soulchat.dataspec import COLUMN_FIELDS, FORMATS, parse_columns
from soulchat.options import DataConfig

# The readers' public names, wherever they live.
__all__ = [
    "COLUMN_FIELDS", "DEFAULT_CHUNK_SIZE", "FORMATS", "detect_format", "expand_paths", "iter_json_array",
    "iter_jsonl", "parse_columns", "read_conversations",
]

log = logging.getLogger(__name__)


def _raw_records(
    path: str, fmt: str, role_map: RoleMap, chunk_size: int, id_kinds: dict[str, str] | None = None,
    columns: dict[str, str] | None = None,
) -> Iterator[Conversation | DataError]:
    """Conversations (not yet validated) or DataErrors for one file, in file order."""
    if fmt == "cpsycound":
        for index, (start, block) in enumerate(iter_text_blocks(path)):
            if isinstance(block, DataError):
                yield block
                continue
            try:
                yield block_to_conversation(block, path, start, index, role_map)
            except DataError as e:
                yield e
        return
    if is_arrow_file(path):
        for index, rec in iter_arrow_records(path):
            try:
                yield record_to_conversation(rec, fmt, f"{path}[row {index}]", f"{path}:{index}", role_map,
                                              id_kinds, columns)
            except DataError as e:
                yield e
        return
    if is_json_array(path):
        records = iter_json_array(path, chunk_size)
        if fmt == "smile":
            first = next(records, None)
            if first is None:
                return
            if is_message(first[1]):
                # The whole file is one dialogue: a bare list of messages.
                messages = [first[1]]
                for _, rec in records:
                    if isinstance(rec, DataError):
                        yield rec
                        return
                    messages.append(rec)
                try:
                    yield Conversation(
                        turns_from_messages(messages, path, role_map, "dialogue"), path, None, path
                    )
                except DataError as e:
                    yield e
                return
            records = itertools.chain([first], records)
        for index, rec in records:
            if isinstance(rec, DataError):
                yield rec
                continue
            try:
                yield record_to_conversation(
                    rec, fmt, f"{path}[record {index}]", f"{path}:{index}", role_map, id_kinds, columns
                )
            except DataError as e:
                yield e
    else:
        for index, lineno, rec in iter_jsonl(path):
            if isinstance(rec, DataError):
                yield rec
                continue
            try:
                yield record_to_conversation(rec, fmt, f"{path}:{lineno}", f"{path}:{index}", role_map,
                                              id_kinds, columns)
            except DataError as e:
                yield e


def read_conversations(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    options: DataConfig | None = None,
    *,
    counter: Counter | None = None,
    notes: Counter | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    fmt: str | None = None,
    role_map: RoleMap | None = None,
    on_error: str | None = None,
    columns: dict[str, str] | str | None = None,
) -> Iterator[Conversation]:
    """Stream validated Conversations from one or more files (directories expand to their files).

    options: the data options the readers apply, taken whole: ``format`` ("auto": detect_format per
    file), ``on_error``, ``columns`` and ``role_map()`` (the built-in raw role names plus
    --counselor-role / --client-role); unset = ``DataConfig()``'s. ``fmt``, ``role_map``, ``on_error``
    and ``columns``, when given, stand in for the option of that name (a RoleMap can also replace the
    built-in names, which the options only add to).

    on_error: "raise" -> the first bad record raises DataError; "skip" -> bad records are dropped and
    counted as ``counter[reason] += 1`` (only drop reasons are counted; count yielded conversations
    yourself). Under "skip" a file whose format cannot be detected (an empty file, a notes.txt in a data
    directory) is skipped too and counted once, as ``empty_file`` / ``unknown_format``. A skipped-record
    summary is also logged per file, so nothing is lost silently. A broken JSON array (malformed between
    records, truncated) raises even with "skip", and so does a file given twice.

    columns: record fields under other names, ``{"messages": "conversations", "role": "from", "content":
    "value"}`` or the --columns string "messages=conversations,role=from,content=value" (fields:
    COLUMN_FIELDS); parquet columns and JSON keys alike.

    notes: receives counted warnings about records that are kept: ``duplicate_record`` for a record whose
    turns exactly repeat an earlier one's (it is trained again, as the data asks; deduplicate the data to
    avoid that). Logged per file as well.
    """
    if options is None:
        options = DataConfig()
    elif not isinstance(options, DataConfig):
        raise TypeError(
            f"read_conversations(paths, options): options must be a DataConfig, got {type(options).__name__} "
            "(pass fmt=, on_error=, role_map=, columns= by keyword)"
        )
    fmt = options.format if fmt is None else fmt
    on_error = options.on_error if on_error is None else on_error
    columns = options.columns if columns is None else columns
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose 'auto' or one of {FORMATS}")
    role_map = role_map or options.role_map()
    if isinstance(columns, str):
        columns = parse_columns(columns)
    if columns and {"question", "answer"} & set(columns):
        raise ValueError("--columns question=/answer= map single-turn Q&A records, which only "
                         "`python -m soulchat.data construct` reads; conversations map messages/role/content")
    skip = on_error == "skip"
    id_kinds: dict[str, str] = {}
    seen = _SeenTurns()
    missing: list[Path] | None = [] if skip else None
    files = expand_paths(paths, missing)
    for shard in missing or ():
        # Its conversations cannot be counted (the file is gone): the shard itself is (notes).
        if notes is not None:
            notes["missing_shard"] += 1
        log.warning("%s: listed in %s but missing: its conversations are not read (count unknown)", shard,
                    shard.parent / "state.json")
    for path in files:
        dropped: Counter = Counter()
        repeats = 0
        last = ""  # the last record read, for an error past it
        # A damaged file: one line naming it and the last record read (the lambda reads ``last`` when the
        # error happens, inside this iteration), never skipped.
        with naming(path, lambda: _place(last, path)):  # noqa: B023
            try:
                file_fmt = detect_format(path, role_map, columns) if fmt == "auto" else fmt
            except DataError as e:
                if not skip or isinstance(e, DamagedFile):
                    raise
                file_fmt, dropped[e.reason] = None, 1
            items = _raw_records(path, file_fmt, role_map, chunk_size, id_kinds, columns) if file_fmt else ()
            for item in items:
                if type(item) is not Conversation:
                    last = item.where
                    if isinstance(item, BrokenArray) or not skip:
                        raise item
                    dropped[item.reason] += 1
                    continue
                last = item.source
                try:
                    validate_conversation(item)
                except DataError as e:
                    if not skip:
                        raise
                    dropped[e.reason] += 1
                    continue
                if seen.repeated(item):
                    repeats += 1
                yield item
        if counter is not None:
            counter.update(dropped)
        if repeats:
            if notes is not None:
                notes["duplicate_record"] += repeats
            log.warning("%s: %d records repeat an earlier record's turns exactly (trained again)", path, repeats)
        if dropped:
            log.warning("%s: skipped %d bad records: %s", path, sum(dropped.values()), dict(dropped))


def _place(where: str, path: str) -> str:
    """"line 12" / "record 5" / "row 7" from a location "path:12" / "path[record 5]" / "path[row 7]"."""
    rest = where.removeprefix(path)
    if rest.startswith(":") and rest[1:].isdigit():
        return f"line {rest[1:]}"
    return rest.strip("[]")


class _SeenTurns:
    """Remembers a 64-bit hash of each conversation's turns (~60 bytes per conversation: 16 MB for the
    258k of SoulChatCorpus) to spot exact repeats.

    Python's own hash of the (roles, texts) tuple: 4x faster than a blake2b digest of the text, and two
    different conversations collide with probability 2**-64 per pair (about 2e-9 for the whole corpus);
    a collision would only count one record as a repeat in the warning, it is trained all the same.
    """

    def __init__(self) -> None:
        self._hashes: set[int] = set()

    def repeated(self, conv: Conversation) -> bool:
        turns = conv.turns
        key = hash((tuple([t.role for t in turns]), tuple([t.text for t in turns])))
        if key in self._hashes:
            return True
        self._hashes.add(key)
        return False
