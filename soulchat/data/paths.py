"""Which files the --data paths name: the bundled sample corpus when there are none (``corpus_paths``),
files as given, directories expanded to their data files (a datasets ``save_to_disk`` directory to its
shards), each file at most once (``expand_paths``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from soulchat.data.arrow import ARROW_SUFFIXES, saved_dataset_files
from soulchat.data.assets import default_corpus_path
from soulchat.data.conversation import DataError

if TYPE_CHECKING:
    from soulchat.options import DataConfig

DATA_SUFFIXES = (".json", ".jsonl", ".txt", ".json.gz", ".jsonl.gz", *ARROW_SUFFIXES)


def corpus_paths(options: DataConfig) -> list[Path]:
    """The files and directories to read: ``--data``, or the bundled sample corpus when it is empty (every
    command decides that default here)."""
    return [Path(p) for p in options.data] if options.data else [default_corpus_path()]


def _has_data_suffix(path: Path) -> bool:
    return path.name.endswith(DATA_SUFFIXES)


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
                    f"{p}: directory holds no data files ({', '.join(DATA_SUFFIXES)}, or a datasets "
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
