"""Hugging Face-ecosystem files read locally and streamed: parquet, and ``datasets.save_to_disk`` shards.

Nothing is downloaded and no dataset is loaded whole: a parquet file is read one row group batch at a
time (``pyarrow.parquet.ParquetFile.iter_batches``), an ``.arrow`` shard of a ``save_to_disk`` directory
(Arrow IPC stream format) batch by batch through a memory map. Each row comes out as a plain dict, the
same record shape the JSON readers produce, so every format and column mapping applies unchanged.

pyarrow is an optional dependency (``pip install soulchat[datasets]``); without it these files are
refused with one line saying so.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from soulchat.data.conversation import DataError
from soulchat.data.file_errors import read_json_file

ARROW_SUFFIXES = (".parquet", ".arrow")
_BATCH_ROWS = 1024  # rows per batch turned into dicts: bounded memory, few Python calls
_STATE = "state.json"  # written by datasets.Dataset.save_to_disk next to its shards
_DICT = "dataset_dict.json"  # written by datasets.DatasetDict.save_to_disk at the root


def is_arrow_file(path: str | Path) -> bool:
    return Path(path).suffix in ARROW_SUFFIXES


def _pyarrow(path: str):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError(
            f"{path}: reading parquet/arrow files needs pyarrow: pip install 'soulchat[datasets]' (or convert "
            "the data to JSONL)",
            reason="missing_dependency",
            where=path,
        ) from None
    return pyarrow


def saved_dataset_files(directory: Path) -> list[Path] | None:
    """The shards of a ``save_to_disk`` directory in their order, as its state.json lists them (whether
    they exist or not: a listed shard that is missing is the caller's to refuse or count), or None if it
    is not one.

    A ``DatasetDict`` root (train/test/... splits) is refused: which split to train on is the caller's
    choice, so the split directory must be named.
    """
    if (directory / _DICT).is_file():
        meta = read_json_file(directory / _DICT, dict, "a datasets.DatasetDict (its list of splits)")
        splits = meta.get("splits", [])
        if not isinstance(splits, list) or not all(isinstance(x, str) for x in splits):
            raise DataError(f"{directory / _DICT}: \"splits\" must be a list of split names, got {splits!r}; "
                            "restore or re-create it", reason="malformed_json", where=str(directory / _DICT))
        raise DataError(
            f"{directory}: a datasets.DatasetDict with splits {splits}: pass the split to train on, e.g. "
            f"--data {directory / (splits[0] if splits else 'train')}",
            reason="dataset_dict",
            where=str(directory),
        )
    state = directory / _STATE
    if not state.is_file():
        return None
    files = read_json_file(state, dict, "a datasets save_to_disk directory (its list of shards)").get(
        "_data_files", []
    )
    entries = files if isinstance(files, list) else [None]
    names = [f.get("filename") if isinstance(f, dict) else None for f in entries]
    if not all(isinstance(n, str) and n and Path(n).name == n for n in names):
        raise DataError(
            f"{state}: \"_data_files\" must be a list of {{\"filename\": \"<shard>.arrow\"}} entries naming "
            f"files of {directory}, got {files!r:.200}; restore or re-create it (datasets save_to_disk "
            "writes it)",
            reason="malformed_json",
            where=str(state),
        )
    return [directory / n for n in names]


def iter_arrow_records(path: str) -> Iterator[tuple[int, dict]]:
    """(row index, row as a dict) of a parquet file or an Arrow IPC stream shard, streamed."""
    pa = _pyarrow(path)
    if path.endswith(".parquet"):
        batches = pa.parquet.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS)
        yield from _rows(batches)
        return
    with pa.memory_map(path, "r") as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:  # the random-access file format, as pyarrow.feather writes
            source.seek(0)
            reader = pa.ipc.open_file(source)
            yield from _rows(reader.get_batch(i) for i in range(reader.num_record_batches))
            return
        yield from _rows(reader)


def _rows(batches) -> Iterator[tuple[int, dict]]:
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield index, row
            index += 1
