"""Streaming readers: corpus files in any supported format -> validated Conversations.

Formats (``fmt``; "auto" sniffs each file with detect_format):

- "soulchat"  SoulChatCorpus: ``{"id", "topic", "messages": [{"role": "user"|"assistant", "content"}]}``
- "openai"    ``{"messages": [{"role": "system"|"user"|"assistant", "content"}]}``
- "sharegpt"  ``{"conversations": [{"from": "system"|"human"|"gpt", "value"}]}``
- "smile"     a list of ``{"role": "client"|"counselor", "content"}`` (or of strings ``"<role>：<text>"``),
              bare or under "messages" / "dialogue" / "conversation"
- "xtuner"    EmoLLM: ``{"conversation": [{"system"?, "input", "output"}, ...]}``
- "cpsycound" plain text: lines ``来访者：…`` / ``心理咨询师：…`` (ASCII ":" too), continuation lines join
              the previous turn, dialogues separated by blank lines

Every JSON format may be one JSON array or JSONL (one record per line). A JSON array is streamed with
``json.JSONDecoder.raw_decode`` over a chunked buffer, so a 0.9 GB corpus never sits in memory as one
``json.load`` object tree (bench/bench_reading.py measures both).

Bad input raises DataError naming the file, the line or record, what is wrong and the fix. With
``on_error="skip"`` the bad record is dropped and ``counter[reason] += 1``; the counter receives only
drop reasons (it never counts good records), so ``records seen = conversations yielded + sum(counter
values)``. One thing cannot be skipped: a JSON *array* whose structure is broken (malformed JSON between
records, or a truncated file) gives no safe point to resume from, so it raises even with "skip" (JSONL
can skip a bad line; convert to JSONL if your data has such damage).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from soulchat.data.arrow import ARROW_SUFFIXES, is_arrow_file, iter_arrow_records, saved_dataset_files
from soulchat.data.conversation import (
    SKIP_HINT,
    Conversation,
    DataError,
    RoleMap,
    Turn,
    validate_conversation,
)
from soulchat.data.file_errors import DamagedFile, naming

log = logging.getLogger(__name__)

FORMATS = ("soulchat", "openai", "sharegpt", "smile", "cpsycound", "xtuner")
DEFAULT_CHUNK_SIZE = 1 << 20  # bytes per read of a JSON array; 1 MiB keeps refills rare and cheap
MAX_RECORD_CHARS = 64 << 20  # a single JSON record larger than this is treated as malformed



class _NonFiniteNumber(ValueError):
    """A NaN / Infinity / -Infinity literal: not JSON, and never a number to train on."""


def _refuse_constant(name: str) -> float:
    raise _NonFiniteNumber(name)


# strict=False: raw control characters in strings parse (validation then refuses the harmful ones, with
# the record named); NaN/Infinity literals are refused. _LENIENT parses them, only to find a refused
# record's end so that reading can go on past it under --on-error skip.
_DECODER = json.JSONDecoder(strict=False, parse_constant=_refuse_constant)
_LENIENT = json.JSONDecoder(strict=False)
# Python's JSON scanner recurses once per nesting level: a record nested deeper than the recursion limit
# (about 1000 levels) raises RecursionError, reported as a bad record.
_RECORD_ERRORS = (_NonFiniteNumber, RecursionError)
_WS = re.compile(r"[ \t\n\r]*")
_SEP = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # how surrogateescape represents an undecodable byte
_SPEAKER = re.compile(r"^\s*([^\s:：]{1,16})\s*[:：]\s*(.*)$", re.DOTALL)  # "来访者：text" / "client: text"
_DATA_SUFFIXES = (".json", ".jsonl", ".txt", ".json.gz", ".jsonl.gz", *ARROW_SUFFIXES)
_FIRST_LINE_LIMIT = 64 << 20  # a first line longer than this is taken for a one-line JSON array


def _open_binary(path: str):
    """The file's bytes; a .gz file is decompressed as it is read (streamed, never whole in memory)."""
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


def _has_data_suffix(path: Path) -> bool:
    return path.name.endswith(_DATA_SUFFIXES)


# --------------------------------------------------------------------------------------------------
# Streaming JSON array
# --------------------------------------------------------------------------------------------------


class _BrokenArray(DataError):
    """Structural damage in a JSON array: never skippable (there is no safe point to resume from)."""


class _JsonArrayStream:
    """Yields the top-level elements of a JSON array file one at a time.

    Bytes are read in ``chunk_size`` pieces and decoded to one ``str`` buffer; each element is parsed
    in place with ``raw_decode(buf, i)`` (C speed, no copy). A consumed prefix is dropped on each
    refill, so memory is one chunk plus the largest record. Undecodable bytes are decoded with
    surrogateescape and remembered by position: a record containing one is reported as "non_utf8"
    (skippable), while one between records breaks the array structure.
    """

    def __init__(self, path: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.path = path
        self.chunk_size = max(1, int(chunk_size))
        self.file = None  # opened by __iter__
        self.buf = ""
        self.base = 0  # absolute character index of buf[0]
        self.base_bytes = 0  # absolute byte offset of the next undecoded byte (end of buf + carry)
        self.line_base = 0  # newlines before buf[0]
        self.carry = b""  # trailing bytes of an incomplete UTF-8 character
        self.eof = False
        self.bad: list[tuple[int, int]] = []  # (absolute char index, byte offset) of undecodable bytes
        self.start = 0  # index in buf of the record being parsed (moves with refills)

    # -- buffer management ------------------------------------------------------------------------

    def refill(self, keep: int) -> int:
        """Drop buf[:keep], append the next chunk; return the new index of what was buf[keep]."""
        if keep:
            self.line_base += self.buf.count("\n", 0, keep)
            self.base += keep
            self.buf = self.buf[keep:]
            if self.bad and self.bad[0][0] < self.base:
                self.bad = [b for b in self.bad if b[0] >= self.base]
        data = self.carry + self.file.read(self.chunk_size)
        if len(data) == len(self.carry):
            self.eof = True
            cut = len(data)  # an incomplete trailing character is simply an undecodable byte
        else:
            cut = _complete_utf8_prefix(data)
        part, self.carry = data[:cut], data[cut:]
        try:
            text = part.decode("utf-8")
        except UnicodeDecodeError:
            text = part.decode("utf-8", "surrogateescape")
            start_char = self.base + len(self.buf)
            for m in _BAD_BYTE.finditer(text):
                nbytes = len(text[: m.start()].encode("utf-8", "surrogateescape"))
                self.bad.append((start_char + m.start(), self.base_bytes + nbytes))
        self.base_bytes += cut
        self.buf += text
        return 0

    def line_of(self, i: int) -> int:
        return self.line_base + self.buf.count("\n", 0, i) + 1

    def bad_in(self, start: int, end: int) -> tuple[int, int] | None:
        lo, hi = self.base + start, self.base + end
        for pos, offset in self.bad:
            if lo <= pos < hi:
                return pos, offset
        return None

    def skip_ws(self, i: int) -> int:
        """Index of the next non-whitespace character, reading more as needed; len(buf) at EOF."""
        while True:
            i = _WS.match(self.buf, i).end()
            if i < len(self.buf) or self.eof:
                return i
            i = self.refill(i)

    def broken(self, i: int, what: str, index: int) -> _BrokenArray:
        where = f"{self.path}:{self.line_of(i)}"
        bad = self.bad_in(i, i + 1)
        if bad is not None:
            what = f"undecodable (non-UTF-8) byte at byte offset {bad[1]} outside any string"
        return _BrokenArray(
            f"{where} (at record {index}): the JSON array is broken: {what}. A broken JSON array "
            f"cannot be resynchronised, so this is raised even with --on-error skip; repair or "
            f"re-export the file (or convert it to JSONL, where a bad line can be skipped)",
            reason="malformed_json",
            where=where,
        )

    # -- the element iterator ---------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[int, object]]:
        """Yield (record index, element); the element is a DataError for a non-UTF-8 record."""
        with _open_binary(self.path) as self.file:
            i = self.skip_ws(self.refill(0))
            if i < len(self.buf) and self.buf[i] == "\ufeff":  # UTF-8 byte order mark
                i = self.skip_ws(i + 1)
            if i >= len(self.buf) or self.buf[i] != "[":
                raise self.broken(i, "the file does not start with '['", 0)
            i = self.skip_ws(i + 1)
            if i >= len(self.buf):
                raise _truncated(self, i, 0)
            if self.buf[i] == "]":
                self.check_tail(i, 0)
                return
            scan = _DECODER.scan_once  # the C scanner behind raw_decode, without its wrapper
            sep = _SEP.match
            index = 0
            while True:
                buf = self.buf
                # Fast path: a complete value inside the buffer. Anything else (a value cut by the buffer
                # end, malformed JSON) goes to parse_slow, which refills or raises the precise error.
                self.start = i
                try:
                    try:
                        obj, end = scan(buf, i)
                    except (StopIteration, json.JSONDecodeError):
                        end = -1
                    if end < 0 or (len(buf) - end < 3 and not self.eof):
                        obj, end, i = self.parse_slow(i, index)
                        buf = self.buf
                except _RECORD_ERRORS as e:
                    obj, end, i = self.refused(e, self.start, index)
                    buf = self.buf
                if self.bad:
                    obj = self.check_utf8(obj, i, end, index)
                yield index, obj
                index += 1
                m = sep(buf, end)
                if m is not None and m.end() < len(buf):
                    i = m.end()
                    if buf[i] == "]":
                        raise self.trailing_comma(m.start(), index)
                    continue
                i = self.skip_ws(end)
                if i >= len(self.buf):
                    raise _truncated(self, i, index)
                c = self.buf[i]
                if c == "]":
                    self.check_tail(i, index)
                    return
                if c != ",":
                    raise self.broken(i, f"expected ',' or ']' after a record, found {c!r}", index)
                comma = i
                i = self.skip_ws(i + 1)
                if i >= len(self.buf):
                    raise _truncated(self, i, index)
                if self.buf[i] == "]":
                    raise self.trailing_comma(comma, index)

    def trailing_comma(self, i: int, index: int) -> _BrokenArray:
        return self.broken(i, f"a trailing comma after record {index - 1}, before the closing ']' (JSON allows "
                              "none): delete that comma", index)

    def refused(self, error: Exception, i: int, index: int) -> tuple[DataError, int, int]:
        """The record at buf[i] parses only as non-JSON: (its DataError, its end, its start)."""
        where = f"{self.path}[record {index}]"
        if isinstance(error, RecursionError):
            # Its end cannot be found without the same recursion: nothing to resume from.
            raise self.broken(i, f"record {index} is nested deeper than the JSON parser allows (about "
                                 f"{sys.getrecursionlimit()} levels); flatten it or remove it", index) from None
        line = self.line_of(i)
        _, end, i = self.parse_slow(i, index, _LENIENT)
        return DataError(
            f"{where} (line {line}): {error} is not a JSON number (NaN and Infinity are not JSON); write "
            f"null or a finite number {SKIP_HINT}",
            reason="non_finite_number",
            where=where,
        ), end, i

    def parse_slow(self, i: int, index: int, decoder: json.JSONDecoder = _DECODER) -> tuple[object, int, int]:
        """Parse the value at buf[i], reading more while the failure is only "ran out of buffer"."""
        while True:
            try:
                obj, end = decoder.raw_decode(self.buf, i)
            except json.JSONDecodeError as e:
                out_of_data = e.pos >= len(self.buf) - 16 or e.msg.startswith("Unterminated string")
                if self.eof and out_of_data:
                    raise _truncated(self, i, index) from None
                if self.eof or not out_of_data:
                    raise self.broken(e.pos, f"malformed JSON in record {index}: {e.msg}", index) from None
                if len(self.buf) - i > MAX_RECORD_CHARS:
                    raise self.broken(
                        i, f"record {index} is larger than {MAX_RECORD_CHARS} characters or never ends", index
                    ) from None
                i = self.start = self.refill(i)  # the record's start, wherever it fails later
                continue
            # A number near the buffer end might continue: "12" | "34", "1" | ".5", "1." | "5e-3".
            if len(self.buf) - end < 3 and not self.eof and not isinstance(obj, (dict, list)):
                i = self.start = self.refill(i)
                continue
            return obj, end, i

    def check_utf8(self, obj: object, start: int, end: int, index: int) -> object:
        bad = self.bad_in(start, end)
        if bad is None:
            return obj
        where = f"{self.path}[record {index}]"
        return DataError(
            f"{where} (line {self.line_of(start)}): non-UTF-8 byte at byte offset {bad[1]}; re-encode "
            f"the file as UTF-8 (e.g. iconv -f GB18030 -t UTF-8) {SKIP_HINT}",
            reason="non_utf8",
            where=where,
        )

    def check_tail(self, i: int, index: int) -> None:
        """Only whitespace may follow the closing ']' at buf[i]."""
        end = self.skip_ws(i + 1)
        if end < len(self.buf):
            raise self.broken(end, "extra data after the closing ']'", index)


def _truncated(stream: _JsonArrayStream, i: int, index: int) -> _BrokenArray:
    where = f"{stream.path}:{stream.line_of(i)}"
    return _BrokenArray(
        f"{where}: the JSON array ends early (truncated file?) after {index} complete records; records "
        f"up to there were read. Re-download or re-export the file; a truncated array cannot be "
        f"skipped past, even with --on-error skip",
        reason="truncated_json",
        where=where,
    )


def _complete_utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a multi-byte character."""
    n = len(data)
    for k in range(1, min(4, n) + 1):
        b = data[n - k]
        if b < 0x80:  # ASCII: everything before it is complete
            return n
        if b >= 0xC0:  # lead byte: complete if its sequence fits in the last k bytes
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return n if k >= need else n - k
    return n  # only continuation bytes: invalid anyway, let the decoder flag them


def iter_json_array(
    path: str | os.PathLike, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[tuple[int, object]]:
    """Stream the elements of a top-level JSON array: yields (index, element).

    An element whose bytes are not valid UTF-8 is yielded as a DataError(reason="non_utf8") instead;
    structural damage (malformed JSON, truncation) raises DataError.
    """
    return iter(_JsonArrayStream(os.fspath(path), chunk_size))


# --------------------------------------------------------------------------------------------------
# JSONL and text
# --------------------------------------------------------------------------------------------------


def _lines(f) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, line) of a binary file, for LF, CRLF and CR-only line endings.

    A file with CR-only endings (classic Mac) reads as one LF-"line": it is split at each CR. A CR
    inside an LF-terminated line is left alone (JSON text may hold one, and it is not a line end there).
    """
    lineno, offset = 0, 0
    for raw in f:
        if raw.endswith(b"\n") or b"\r" not in raw.rstrip(b"\r"):
            lineno += 1
            yield lineno, offset, raw
            offset += len(raw)
            continue
        parts = raw.split(b"\r")
        if parts[-1] == b"":  # the CR ending the last line
            parts.pop()
        for part in parts:
            lineno += 1
            yield lineno, offset, part + b"\n"
            offset += len(part) + 1


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, int, object]]:
    """Yield (record index, line number, parsed record) per non-blank line; a DataError for a bad line."""
    path = os.fspath(path)
    index = 0
    with _open_binary(path) as f:
        for lineno, line_offset, raw in _lines(f):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                obj: object = DataError(
                    f"{where}: non-UTF-8 byte at byte offset {line_offset + e.start} (column "
                    f"{e.start + 1} of the line); re-encode the file as UTF-8 {SKIP_HINT}",
                    reason="non_utf8",
                    where=where,
                )
            else:
                if lineno == 1 and text.startswith("\ufeff"):
                    text = text[1:]
                try:
                    obj, end = _DECODER.raw_decode(text, _WS.match(text).end())
                    if text[end:].strip():
                        raise json.JSONDecodeError("extra data after the record", text, end)
                except _NonFiniteNumber as e:
                    obj = DataError(
                        f"{where}: {e} is not a JSON number (NaN and Infinity are not JSON); write null or "
                        f"a finite number {SKIP_HINT}",
                        reason="non_finite_number",
                        where=where,
                    )
                except RecursionError:
                    obj = DataError(
                        f"{where}: the record is nested deeper than the JSON parser allows (about "
                        f"{sys.getrecursionlimit()} levels); flatten it or remove the line {SKIP_HINT}",
                        reason="nested_too_deep",
                        where=where,
                    )
                except json.JSONDecodeError as e:
                    obj = DataError(
                        f"{where}: malformed JSON at column {e.colno}: {e.msg}; each line must hold one "
                        f"complete JSON record; fix the line {SKIP_HINT}",
                        reason="malformed_json",
                        where=where,
                    )
            yield index, lineno, obj
            index += 1


def _iter_text_blocks(path: str) -> Iterator[tuple[int, list[str] | DataError]]:
    """Yield (first line number, lines) per blank-line separated block of a UTF-8 text file."""
    block: list[str] = []
    start = 0
    bad: DataError | None = None
    with _open_binary(path) as f:
        for lineno, line_offset, raw in _lines(f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if bad is None:
                    where = f"{path}:{lineno}"
                    bad = DataError(
                        f"{where}: non-UTF-8 byte at byte offset {line_offset + e.start}; re-encode the "
                        f"file as UTF-8 (e.g. iconv -f GB18030 -t UTF-8) {SKIP_HINT}",
                        reason="non_utf8",
                        where=where,
                    )
                line = "x"  # keeps the block open so the whole dialogue is dropped
            if lineno == 1:
                line = line.lstrip("\ufeff")
            line = line.rstrip("\r\n")
            if line.strip():
                if not block:
                    start = lineno
                block.append(line)
                continue
            if block:
                yield start, (bad if bad is not None else block)
            block, bad, start = [], None, 0
    if block:
        yield start, (bad if bad is not None else block)


# --------------------------------------------------------------------------------------------------
# Record -> Conversation
# --------------------------------------------------------------------------------------------------


def _text_of(value: object, where: str, j: int) -> str:
    """Message content as a string; OpenAI-style content part lists are joined."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""  # validation reports it as empty content
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return "".join(str(p.get("text", "")) for p in value if p.get("type", "text") == "text")
    raise DataError(
        f"{where}: message {j} content is a {type(value).__name__}, expected a string; "
        f"fix the record {SKIP_HINT}",
        reason="bad_field",
        where=where,
    )


def _turns_from_messages(messages: object, where: str, role_map: RoleMap, key: str) -> list[Turn]:
    """[{role|from, content|value}] or ["<role>：<text>"] -> turns (roles mapped, not yet validated)."""
    if not isinstance(messages, list):
        raise DataError(
            f"{where}: {key!r} must be a list of messages, found {type(messages).__name__}; fix the record "
            f"or pick the right --format {SKIP_HINT}",
            reason="bad_field",
            where=where,
        )
    lookup = role_map._lookup
    turns = []
    for m in messages:
        # Fast path: {"role": <exact mapped name>, "content": <str>} (every SoulChatCorpus message).
        try:
            role = lookup[m["role"]]
            text = m["content"]
            if type(text) is str:
                turns.append(Turn(role, text))
                continue
        except (KeyError, TypeError):
            pass
        turns.append(_turn_from_message(m, len(turns), where, role_map))
    return turns


def _turn_from_message(m: object, j: int, where: str, role_map: RoleMap) -> Turn:
    """Any accepted message shape -> Turn, or a DataError saying what is missing."""
    if type(m) is dict:
        raw = m.get("role")
        if raw is None:
            raw = m.get("from")
        text = m.get("content")
        if text is None:
            text = m.get("value")
        if raw is None or (text is None and "content" not in m and "value" not in m):
            missing = "'role' (or 'from')" if raw is None else "'content' (or 'value')"
            raise DataError(
                f"{where}: message {j} has no {missing} key; fix the record or pick the right --format "
                f"{SKIP_HINT}",
                reason="missing_field",
                where=where,
            )
    elif isinstance(m, str):
        match = _SPEAKER.match(m)
        if match is None:
            raise DataError(
                f"{where}: message {j} is a string without a '<role>：' prefix; use "
                f"{{'role': ..., 'content': ...}} messages {SKIP_HINT}",
                reason="missing_field",
                where=where,
            )
        raw, text = match.group(1), match.group(2)
    else:
        raise DataError(
            f"{where}: message {j} is a {type(m).__name__}, expected an object with role and content; "
            f"fix the record {SKIP_HINT}",
            reason="bad_field",
            where=where,
        )
    role = role_map.canonical(raw, f"{where} message {j}")
    return Turn(role, _text_of(text, where, j))


def _turns_from_xtuner(conversation: object, where: str) -> list[Turn]:
    if not isinstance(conversation, list):
        raise DataError(
            f"{where}: 'conversation' must be a list of {{'input', 'output'}} objects; "
            f"fix the record {SKIP_HINT}",
            reason="bad_field",
            where=where,
        )
    turns = []
    for j, step in enumerate(conversation):
        if not isinstance(step, dict) or "input" not in step or "output" not in step:
            raise DataError(
                f"{where}: conversation step {j} needs 'input' and 'output' keys; fix the record {SKIP_HINT}",
                reason="missing_field",
                where=where,
            )
        # The system prompt is taken from the first step; EmoLLM repeats it or omits it later. A later
        # step with a different one has no place in the conversation: refused, not dropped.
        system = step.get("system")
        if j == 0 and system:
            turns.append(Turn("system", _text_of(system, where, j)))
        elif system and (not turns or turns[0].role != "system" or turns[0].text != system):
            raise DataError(
                f"{where}: conversation step {j} has a 'system' prompt that differs from the first step's; "
                f"a system prompt may only open the conversation: move it to step 0 or delete it {SKIP_HINT}",
                reason="system_not_first",
                where=where,
            )
        turns.append(Turn("client", _text_of(step["input"], where, j)))
        turns.append(Turn("counselor", _text_of(step["output"], where, j)))
    return turns


def _is_message(x: object) -> bool:
    """A single message (rather than a dialogue record): {"role"|"from": ...} or "<role>：<text>"."""
    if isinstance(x, dict):
        return ("role" in x or "from" in x) and ("content" in x or "value" in x)
    return isinstance(x, str) and _SPEAKER.match(x) is not None


COLUMN_FIELDS = ("messages", "role", "content", "id", "topic")


def parse_columns(spec: str | None) -> dict[str, str]:
    """"messages=conversations,role=from,content=value" -> {"messages": "conversations", ...}."""
    out: dict[str, str] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        field, sep, column = (x.strip() for x in part.partition("="))
        if not sep or field not in COLUMN_FIELDS or not column:
            raise ValueError(
                f"--columns {spec!r}: {part.strip()!r} must be FIELD=COLUMN with FIELD one of {COLUMN_FIELDS}, "
                "e.g. --columns messages=conversations,role=from,content=value"
            )
        if field in out:
            raise ValueError(f"--columns {spec!r}: {field} is mapped twice")
        out[field] = column
    return out


def _remap(rec: object, columns: dict[str, str], where: str) -> object:
    """A record with its mapped columns renamed to the fields the readers know (--columns)."""
    if not isinstance(rec, dict):
        return rec
    out = dict(rec)
    for field in ("messages", "id", "topic"):
        column = columns.get(field)
        if column is None or column == field:
            continue
        if column not in out:
            if field != "messages":
                continue  # id and topic are optional
            raise DataError(
                f"{where}: record has no column {column!r} (--columns messages={column}); its keys are "
                f"{sorted(rec)[:8]} {SKIP_HINT}",
                reason="missing_field",
                where=where,
            )
        out[field] = out.pop(column)
    role, content = columns.get("role"), columns.get("content")
    messages = out.get("messages")
    if (role or content) and isinstance(messages, list):
        out["messages"] = [_remap_message(m, role, content) for m in messages]
    return out


def _remap_message(m: object, role: str | None, content: str | None) -> object:
    if not isinstance(m, dict):
        return m
    m = dict(m)
    if role and role in m:
        m["role"] = m.pop(role)
    if content and content in m:
        m["content"] = m.pop(content)
    return m


def _check_id_kind(rid: object, id_kinds: dict[str, str], where: str) -> None:
    """Ids are compared as text, so 12 and "12" would name one conversation (one side of the held-out
    split, one id in heldout.json): the second kind of the same spelling is refused."""
    kind = "string" if isinstance(rid, str) else type(rid).__name__
    first = id_kinds.setdefault(str(rid), kind)
    if first != kind:
        raise DataError(
            f"{where}: id {rid!r} ({kind}) reads the same as an earlier {first} id {str(rid)!r}; ids of "
            f"different JSON types must not share a spelling: give the records distinct ids {SKIP_HINT}",
            reason="id_type_clash",
            where=where,
        )


def _record_to_conversation(
    rec: object, fmt: str, where: str, default_id: str, role_map: RoleMap,
    id_kinds: dict[str, str] | None = None, columns: dict[str, str] | None = None,
) -> Conversation:
    if columns:
        rec = _remap(rec, columns, where)
    if fmt == "smile" and isinstance(rec, list):
        return Conversation(_turns_from_messages(rec, where, role_map, "dialogue"), default_id, None, where)
    if not isinstance(rec, dict):
        raise DataError(
            f"{where}: expected a JSON object for --format {fmt}, found {type(rec).__name__}; fix the record "
            f"or pick the right --format {SKIP_HINT}",
            reason="bad_record_shape",
            where=where,
        )
    if fmt in ("soulchat", "openai"):
        key = "messages"
    elif fmt == "sharegpt":
        key = "conversations"
    elif fmt == "xtuner":
        key = "conversation"
    else:  # smile wrapped in an object
        key = next(
            (k for k in ("messages", "dialogue", "conversation", "conversations") if k in rec), "messages"
        )
    if key not in rec:
        raise DataError(
            f"{where}: record has no {key!r} key (keys: {sorted(rec)[:8]}); "
            f"pick the right --format or fix the "
            f"record {SKIP_HINT}",
            reason="missing_field",
            where=where,
        )
    if fmt == "xtuner":
        turns = _turns_from_xtuner(rec[key], where)
    else:
        turns = _turns_from_messages(rec[key], where, role_map, key)
    rid = rec.get("id")
    topic = rec.get("topic")
    if isinstance(rid, (dict, list, bool)):
        # str() of these is no id: {"a": 1} and [1, 2] would name a conversation "{'a': 1}", true "True".
        raise DataError(
            f"{where}: id {json.dumps(rid, ensure_ascii=False)[:80]} is a "
            f"{'boolean' if isinstance(rid, bool) else 'JSON ' + ('object' if isinstance(rid, dict) else 'array')}; "
            f"an id must be a string or a number: fix the record {SKIP_HINT}",
            reason="bad_id",
            where=where,
        )
    if rid is not None and id_kinds is not None:
        _check_id_kind(rid, id_kinds, where)
    return Conversation(
        turns,
        default_id if rid is None else str(rid),
        topic if isinstance(topic, str) else None,
        where,
    )


def _block_to_conversation(
    lines: list[str], path: str, start: int, index: int, role_map: RoleMap
) -> Conversation:
    """A cpsycound dialogue: speaker lines start a turn, other lines continue the previous turn."""
    lookup = role_map._lookup
    where = f"{path}:{start}"
    roles: list[str] = []
    texts: list[list[str]] = []
    for k, line in enumerate(lines):
        m = _SPEAKER.match(line)
        role = lookup.get(m.group(1).strip().lower()) if m else None
        if role is not None:
            roles.append(role)
            texts.append([m.group(2).strip()])
        elif m and (guess := _close_speaker(m.group(1), lookup)):
            raise DataError(
                f"{path}:{start + k}: unknown speaker {m.group(1)!r} (did you mean {guess!r}?); a line "
                f"'<speaker>：' must name a known role, else its reply would join the previous turn. Fix "
                f"the label or add it to the RoleMap (--counselor-role / --client-role) {SKIP_HINT}",
                reason="unknown_speaker",
                where=f"{path}:{start + k}",
            )
        elif texts:
            texts[-1].append(line.strip())
        else:
            raise DataError(
                f"{path}:{start + k}: dialogue does not start with a known speaker (e.g. '来访者：' or "
                f"'心理咨询师：'), found {line[:30]!r}; add the speaker to the RoleMap or fix the text "
                f"{SKIP_HINT}",
                reason="unknown_role",
                where=f"{path}:{start + k}",
            )
    turns = [Turn(r, "\n".join(t).strip()) for r, t in zip(roles, texts, strict=True)]
    return Conversation(turns, f"{path}:{index}", None, where)


def _close_speaker(label: str, lookup: dict[str, str]) -> str | None:
    """The known role name ``label`` is likely a typo of ("心里咨询师" -> "心理咨询师"), else None.

    Only labels this close to a role name count as speakers: a continuation line such as "比如：..." is
    text, not a speaker (difflib ratio >= 0.6, which 1 wrong character in 5 passes and 2 unrelated
    characters fail).
    """
    import difflib

    close = difflib.get_close_matches(label.strip().lower(), list(lookup), n=1, cutoff=0.6)
    return close[0] if close else None


# --------------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------------


def _classify(rec: object, path: str) -> str:
    if isinstance(rec, list) or _is_message(rec):
        return "smile"
    if isinstance(rec, dict):
        if "conversation" in rec:
            return "xtuner"
        if "conversations" in rec:
            return "sharegpt"
        if "dialogue" in rec:
            return "smile"
        if "messages" in rec:
            msgs = rec["messages"]
            roles = {m.get("role") for m in msgs if isinstance(m, dict)} if isinstance(msgs, list) else set()
            if roles & {"client", "counselor"}:
                return "smile"
            if "topic" in rec or "id" in rec:
                return "soulchat"
            return "openai"
    raise DataError(
        f"{path}: cannot detect the format from the first record (type {type(rec).__name__}, keys "
        f"{sorted(rec)[:8] if isinstance(rec, dict) else '-'}); pass --format, one of {FORMATS}",
        reason="unknown_format",
        where=path,
    )


def detect_format(path: str | os.PathLike, role_map: RoleMap | None = None,
                  columns: dict[str, str] | None = None) -> str:
    """Sniff the first bytes (and first record) of ``path`` and return one of FORMATS.

    columns: the --columns mapping, applied to the first record before it is classified.
    """
    path = os.fspath(path)
    if is_arrow_file(path):
        first_row = next(iter_arrow_records(path), None)
        if first_row is None:
            return "soulchat"  # no rows: any format reads it as nothing
        return _classify(_remap(first_row[1], columns, path) if columns else first_row[1], path)
    with _open_binary(path) as f:
        head = f.read(1 << 16).decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    if not head:
        raise DataError(
            f"{path}: the file is empty; remove it from the inputs", reason="empty_file", where=path
        )
    if head[0] in "[{":
        # Classify the first readable record; a few undecodable ones at the start are tolerated so that
        # "skip" mode can still drop them later.
        if _is_json_array(path):
            records = (rec for _, rec in iter_json_array(path))
        else:
            records = (rec for _, _, rec in iter_jsonl(path))
        first_error: DataError | None = None
        first: object = None
        try:
            for rec in itertools.islice(records, 100):
                if not isinstance(rec, DataError):
                    first = rec
                    break
                first_error = first_error or rec
        except DataError as e:
            first_error = e
        if first is not None:
            return _classify(_remap(first, columns, path) if columns else first, path)
        if first_error is not None:
            raise DataError(
                f"{path}: cannot detect the format, the first records are unreadable ({first_error}); "
                f"fix the "
                f"file or pass --format",
                reason=first_error.reason,
                where=path,
            )
        return "soulchat"  # an empty array: any JSON format reads it as nothing
    lookup = (role_map or RoleMap())._lookup
    for line in head.splitlines()[:50]:
        m = _SPEAKER.match(line)
        if m and m.group(1).strip().lower() in lookup:
            return "cpsycound"
    raise DataError(
        f"{path}: cannot detect the format (not JSON, and no '来访者：'/'心理咨询师：' speaker lines "
        f"in the first "
        f"lines); pass --format, one of {FORMATS}",
        reason="unknown_format",
        where=path,
    )


def _is_json_array(path: str) -> bool:
    """One JSON array, rather than JSONL. A file starting with "[" is JSONL when its first line is a
    complete JSON value followed by more lines: SMILE, one list of messages per line."""
    with _open_binary(path) as f:
        first = f.readline(_FIRST_LINE_LIMIT)
        text = first.decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
        while not text and first:  # leading blank lines
            first = f.readline(_FIRST_LINE_LIMIT)
            text = first.decode("utf-8", "replace").lstrip(" \t\r\n")
        if not text.startswith("["):
            return False
        if not first.endswith(b"\n"):
            return True  # the whole file is one line (or a first line too long to be a JSONL record)
        try:
            _LENIENT.raw_decode(text.rstrip())
        except (json.JSONDecodeError, RecursionError):
            return True  # an array spread over lines
        return not any(line.strip() for line in iter(lambda: f.readline(1 << 16), b""))


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def expand_paths(paths: str | os.PathLike | Iterable[str | os.PathLike],
                 missing: list[Path] | None = None) -> list[str]:
    """Files to read, in order: files as given; directories -> their .json/.jsonl/.txt files, sorted.

    A shard that a save_to_disk directory's state.json lists but that is absent raises DataError
    (reason "missing_shard"), unless ``missing`` is a list: then it is appended there (--on-error skip:
    the caller counts it) and the other shards are read.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = _files_of(p, missing)
            if not found and not missing:
                raise DataError(
                    f"{p}: directory holds no data files ({', '.join(_DATA_SUFFIXES)}, or a datasets "
                    "save_to_disk directory); pass the data files", "no_files"
                )
            out += found
        elif p.is_file():
            out.append(str(p))
        else:
            raise DataError(f"{p}: no such file; check the --data path", reason="missing_file", where=str(p))
    _refuse_repeats(out)
    return out


def _files_of(directory: Path, missing: list[Path] | None = None) -> list[str]:
    """Data files under ``directory``, sorted by path. In a datasets save_to_disk directory only its
    shards are data (not state.json / dataset_info.json); their zero-padded names sort in shard order.
    A listed shard that is absent: see expand_paths."""
    shards: set[Path] = set()
    saved: list[Path] = []
    for state in sorted(directory.rglob("state.json")):
        listed = saved_dataset_files(state.parent)
        if listed is not None:
            saved.append(state.parent)
            shards.update(listed)
            for shard in listed:
                if shard.is_file():
                    continue
                if missing is None:
                    raise DataError(
                        f"{state}: lists the shard {shard.name}, which is missing from {state.parent}: its "
                        "conversations cannot be read; restore it (or save the dataset again), or pass "
                        "--on-error skip to go on without that shard (counted as a dropped shard)",
                        reason="missing_shard",
                        where=str(shard),
                    )
                missing.append(shard)
    for root in directory.rglob("dataset_dict.json"):
        saved_dataset_files(root.parent)  # refuses a DatasetDict root, naming its splits
    found = []
    for q in directory.rglob("*"):
        if not q.is_file() or not _has_data_suffix(q):
            continue
        if any(d == q.parent or d in q.parents for d in saved) and q not in shards:
            continue
        found.append(str(q))
    return sorted(found)


def _refuse_repeats(files: list[str]) -> None:
    """The same file given twice (directly, through a directory, or by two spellings) would train its
    conversations twice: refused, naming both."""
    seen: dict[Path, str] = {}
    for name in files:
        real = Path(name).resolve()
        if real in seen:
            raise DataError(
                f"{name}: the same file as {seen[real]} is given twice (directly or inside a --data "
                "directory); pass each file once",
                reason="repeated_file",
                where=name,
            )
        seen[real] = name


def _raw_records(
    path: str, fmt: str, role_map: RoleMap, chunk_size: int, id_kinds: dict[str, str] | None = None,
    columns: dict[str, str] | None = None,
) -> Iterator[Conversation | DataError]:
    """Conversations (not yet validated) or DataErrors for one file, in file order."""
    if fmt == "cpsycound":
        for index, (start, block) in enumerate(_iter_text_blocks(path)):
            if isinstance(block, DataError):
                yield block
                continue
            try:
                yield _block_to_conversation(block, path, start, index, role_map)
            except DataError as e:
                yield e
        return
    if is_arrow_file(path):
        for index, rec in iter_arrow_records(path):
            try:
                yield _record_to_conversation(rec, fmt, f"{path}[row {index}]", f"{path}:{index}", role_map,
                                              id_kinds, columns)
            except DataError as e:
                yield e
        return
    if _is_json_array(path):
        records = iter_json_array(path, chunk_size)
        if fmt == "smile":
            first = next(records, None)
            if first is None:
                return
            if _is_message(first[1]):
                # The whole file is one dialogue: a bare list of messages.
                messages = [first[1]]
                for _, rec in records:
                    if isinstance(rec, DataError):
                        yield rec
                        return
                    messages.append(rec)
                try:
                    yield Conversation(
                        _turns_from_messages(messages, path, role_map, "dialogue"), path, None, path
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
                yield _record_to_conversation(
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
                yield _record_to_conversation(rec, fmt, f"{path}:{lineno}", f"{path}:{index}", role_map,
                                              id_kinds, columns)
            except DataError as e:
                yield e


def read_conversations(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    fmt: str = "auto",
    role_map: RoleMap | None = None,
    on_error: str = "raise",
    counter: Counter | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    notes: Counter | None = None,
    columns: dict[str, str] | str | None = None,
) -> Iterator[Conversation]:
    """Stream validated Conversations from one or more files (directories expand to their files).

    fmt: one of FORMATS or "auto" (detect_format per file). role_map: raw role names -> canonical roles.
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
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose 'auto' or one of {FORMATS}")
    role_map = role_map or RoleMap()
    if isinstance(columns, str):
        columns = parse_columns(columns)
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
        with naming(path, lambda: _place(last, path)):
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
                    if isinstance(item, _BrokenArray) or not skip:
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
    rest = where[len(path):] if where.startswith(path) else where
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
