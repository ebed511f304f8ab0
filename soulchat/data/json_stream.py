"""JSON records out of a file, streamed: the elements of one JSON array, or one record per JSONL line.

A JSON array is parsed with ``json.JSONDecoder.raw_decode`` over a chunked buffer, so a 0.9 GB corpus
never sits in memory as one ``json.load`` object tree (bench/bench_reading.py measures both). A record
that cannot be read (malformed, non-UTF-8, NaN/Infinity, nested too deep) comes out as a DataError in its
place, naming the file and line or record, for the caller to raise or skip. Damage to an array's own
structure (between records, or a truncated file) gives no safe point to resume from: it raises
BrokenArray. ``.gz`` files are decompressed as they are read.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator

from soulchat.data.conversation import SKIP_HINT, DataError

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
_FIRST_LINE_LIMIT = 64 << 20  # a first line longer than this is taken for a one-line JSON array


def open_binary(path: str):
    """The file's bytes; a .gz file is decompressed as it is read (streamed, never whole in memory)."""
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


# --------------------------------------------------------------------------------------------------
# Streaming JSON array
# --------------------------------------------------------------------------------------------------


class BrokenArray(DataError):
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

    def broken(self, i: int, what: str, index: int) -> BrokenArray:
        where = f"{self.path}:{self.line_of(i)}"
        bad = self.bad_in(i, i + 1)
        if bad is not None:
            what = f"undecodable (non-UTF-8) byte at byte offset {bad[1]} outside any string"
        return BrokenArray(
            f"{where} (at record {index}): the JSON array is broken: {what}. A broken JSON array "
            f"cannot be resynchronised, so this is raised even with --on-error skip; repair or "
            f"re-export the file (or convert it to JSONL, where a bad line can be skipped)",
            reason="malformed_json",
            where=where,
        )

    # -- the element iterator ---------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[int, object]]:
        """Yield (record index, element); the element is a DataError for a non-UTF-8 record."""
        with open_binary(self.path) as self.file:
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

    def trailing_comma(self, i: int, index: int) -> BrokenArray:
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


def _truncated(stream: _JsonArrayStream, i: int, index: int) -> BrokenArray:
    where = f"{stream.path}:{stream.line_of(i)}"
    return BrokenArray(
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


def is_json_array(path: str) -> bool:
    """One JSON array, rather than JSONL. A file starting with "[" is JSONL when its first line is a
    complete JSON value followed by more lines: SMILE, one list of messages per line."""
    with open_binary(path) as f:
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
# JSONL
# --------------------------------------------------------------------------------------------------


def iter_lines(f) -> Iterator[tuple[int, int, bytes]]:
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
    with open_binary(path) as f:
        for lineno, line_offset, raw in iter_lines(f):
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
