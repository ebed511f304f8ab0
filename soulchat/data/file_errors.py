"""The one place where a library's failure to read a file becomes soulchat's one-line error.

Readers hand the bytes of a data file to gzip, pyarrow and json, and a save_to_disk directory's metadata
to json; a LoRA adapter's weights go to safetensors (and then peft). Those raise their own exceptions,
which name neither the file nor the fix (``EOFError: Compressed file ended before the end-of-stream
marker was reached``, ``Parquet magic bytes not found in footer``, ``Not an Arrow file``, a bare JSON
decode message). ``naming(path)`` wraps the reading of one file and
turns exactly those exception types into a ``DamagedFile`` naming the file, the place when it is known,
what is wrong and what to do. Anything else passes through untouched: an unexpected exception is a bug
to see, not a damaged file to report.

A damaged file is never skipped, even with ``--on-error skip``: its records past the damage cannot be
counted, so dropping "the rest of the file" would lose an unknown number of conversations.
``read_json_file`` reads a small JSON metadata file (state.json, dataset_dict.json, dataset_info.json)
and checks the type of its top-level value.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from soulchat.data.conversation import DataError

_GZIP_MAGIC = b"\x1f\x8b"


class DamagedFile(DataError):
    """A file its library cannot read (truncated, corrupt, not the format its name says): never skipped."""


def _library_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "this file's bytes are damaged", for the libraries present."""
    import gzip

    kinds: list[type[BaseException]] = [EOFError, zlib.error, gzip.BadGzipFile]
    with contextlib.suppress(ImportError):
        import pyarrow

        kinds.append(pyarrow.ArrowException)  # ArrowInvalid, ArrowIOError, ... (pyarrow.lib)
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        kinds.append(SafetensorError)
    return tuple(kinds)


def damaged(path: str | Path, error: BaseException, where: str = "") -> DamagedFile:
    """Our error for ``error`` raised by a library while reading ``path``; ``where``: the last place read
    ("after path:12"), when known."""
    import gzip

    path = str(path)
    first = " ".join(str(error).split())[:200] or type(error).__name__
    after = f" ({where})" if where else ""
    if isinstance(error, (EOFError, zlib.error, gzip.BadGzipFile)):
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic != _GZIP_MAGIC:
            message = (
                f"{path}: not gzip data although the name ends in .gz (it starts with {magic!r}: plain "
                "text?); compress it with gzip, or drop .gz from its name"
            )
        elif isinstance(error, EOFError):
            message = (
                f"{path}: the gzip stream ends early{after} (truncated file?); re-download or "
                f"re-compress it (gzip -t checks a file)"
            )
        elif "Not a gzipped file" in str(error):
            message = (
                f"{path}: bytes that are not gzip data follow the compressed data{after} ({first}); "
                "re-compress the file (gzip -t checks a file)"
            )
        else:
            message = f"{path}: the gzip data are corrupt{after} ({first}); re-download or re-compress it"
        reason = "damaged_gzip"
    elif isinstance(error, json.JSONDecodeError):
        message = (
            f"{path}:{error.lineno}: not valid JSON ({error.msg} at line {error.lineno} column "
            f"{error.colno}); restore or re-create the file"
        )
        reason = "malformed_json"
    elif path.endswith(".safetensors"):
        message = f"{path}: not a readable safetensors file ({first}); re-create it from its run"
        reason = "damaged_file"
    else:  # pyarrow
        kind = "parquet" if path.endswith(".parquet") else "Arrow (datasets save_to_disk shard)"
        message = (
            f"{path}: not a readable {kind} file (pyarrow: {first}); re-export it, or remove it from --data"
        )
        reason = "damaged_file"
    return DamagedFile(message, reason=reason, where=path)


@contextlib.contextmanager
def naming(path: str | Path, last_read: Callable[[], str] | None = None) -> Iterator[None]:
    """Inside: a library's error for ``path``'s bytes is raised as DamagedFile naming it. ``last_read``
    returns the last place read (for "after ..."), when the caller tracks one."""
    try:
        yield
    except DataError:
        raise
    except _library_errors() as error:
        where = last_read() if last_read is not None else ""
        raise damaged(path, error, f"after {where}" if where else "") from error


def read_json_file(path: Path, expected: type, what: str) -> Any:
    """The top-level value of a small JSON metadata file, which must be an ``expected`` (dict or list);
    else DamagedFile naming the file. ``what``: what the file is, for the message."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise DamagedFile(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); restore or re-create {what}",
            reason="malformed_json",
            where=str(path),
        ) from None
    except json.JSONDecodeError as error:
        raise damaged(path, error) from None
    if not isinstance(value, expected):
        raise DamagedFile(
            f"{path}: holds a JSON {_json_type(value)}, not the {_json_type(expected())} of {what}; restore "
            "or re-create it",
            reason="malformed_json",
            where=str(path),
        )
    return value


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )
