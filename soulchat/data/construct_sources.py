"""construct's input: single-turn Q&A records (JSON arrays, JSONL, parquet/arrow) read through the
readers' streaming parsers, each a ``Source`` or a ``BadSource`` naming what is wrong with it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Source:
    id: str
    question: str
    answer: str
    topic: str | None
    where: str


@dataclass
class BadSource:
    id: str  # the record's position, <file name>:<index> (its own id may be the problem)
    reason: str
    message: str


def _is_json_array(path: str) -> bool:
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _records(path: str) -> Iterator[tuple[int, str, object]]:
    """(index, where, record or DataError) of one file, through the readers' streaming parsers."""
    from soulchat.data.arrow import is_arrow_file, iter_arrow_records
    from soulchat.data.readers import iter_json_array, iter_jsonl

    if is_arrow_file(path):
        for index, rec in iter_arrow_records(path):
            yield index, f"{path}[row {index}]", rec
    elif path.endswith(".txt"):
        from soulchat.data.conversation import DataError

        raise DataError(f"{path}: construct reads Q&A records from JSON, JSONL or parquet files, not text",
                        reason="unknown_format", where=path)  # fmt: skip
    elif _is_json_array(path):
        for index, rec in iter_json_array(path):
            yield index, f"{path}[record {index}]", rec
    else:
        for index, lineno, rec in iter_jsonl(path):
            yield index, f"{path}:{lineno}", rec


def read_sources(paths: list[str], columns: str | None, limit: int | None) -> Iterator[Source | BadSource]:
    """The first ``limit`` records of the input, each a Source or a BadSource naming what is wrong."""
    from soulchat.data.conversation import DataError
    from soulchat.data.readers import expand_paths, parse_columns

    mapping = parse_columns(columns)
    for field in ("messages", "role", "content"):
        if field in mapping:
            raise ValueError(f"--columns {field}=...: construct reads single-turn Q&A records; map question, "
                             "answer, topic and id")  # fmt: skip
    keys = {f: mapping.get(f, f) for f in ("question", "answer", "topic", "id")}
    seen: dict[str, str] = {}
    count = 0
    for path in expand_paths(paths):
        name = Path(path).name
        for index, where, rec in _records(path):
            if limit is not None and count >= limit:
                return
            count += 1
            position = f"{name}:{index}"
            if isinstance(rec, DataError):
                yield BadSource(position, rec.reason, str(rec))
                continue
            item = _source(rec, where, position, keys)
            if isinstance(item, Source):
                if item.id in seen:
                    item = BadSource(position, "duplicate_source_id",
                                     f"{where}: id {item.id!r} was already used by {seen[item.id]}; source ids "
                                     "must be unique (resuming relies on them): fix the ids")  # fmt: skip
                else:
                    seen[item.id] = where
            yield item


def _source(rec: object, where: str, position: str, keys: dict[str, str]) -> Source | BadSource:
    if not isinstance(rec, dict):
        return BadSource(position, "bad_record_shape", f"{where}: expected a JSON object, found {type(rec).__name__}")
    values = {}
    for field in ("question", "answer"):
        value = rec.get(keys[field])
        if not isinstance(value, str) or not value.strip():
            found = "missing" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
            return BadSource(
                position, f"missing_{field}",
                f"{where}: no {field} text in field {keys[field]!r} ({found}; keys: {sorted(rec)[:8]}); name the "
                f"field with --columns {field}=FIELD",
            )  # fmt: skip
        values[field] = value
    rid = rec.get(keys["id"])
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip()):
        return BadSource(position, "bad_id", f"{where}: id {rid!r} is not a non-empty string or integer")
    topic = rec.get(keys["topic"])
    return Source(position if rid is None else str(rid), values["question"], values["answer"],
                  topic.strip() or None if isinstance(topic, str) else None, where)  # fmt: skip
