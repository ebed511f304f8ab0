"""Hugging Face-ecosystem inputs read locally: parquet, save_to_disk directories, .gz, column mapping,
SMILE as JSONL. Parquet/arrow need pyarrow (the `datasets` extra): those tests skip without it."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import replace

import pytest

from soulchat.options import ConfigError, DataConfig
from soulchat.data.conversation import DataError
from soulchat.data.readers import detect_format, parse_columns, read_conversations


def _sharegpt(i: int) -> dict:
    return {"id": i, "conversations": [{"from": "human", "value": f"我睡不着 {i}。"},
                                       {"from": "gpt", "value": f"多久了？{i}"}]}


def _renamed(i: int) -> dict:
    """A record whose fields no built-in format names: needs --columns."""
    return {"uid": f"u{i}", "dialog": [{"speaker": "user", "text": f"我很焦虑 {i}。"},
                                      {"speaker": "assistant", "text": f"慢慢说。{i}"}]}


COLUMNS = "messages=dialog,role=speaker,content=text,id=uid"


def _texts(convs) -> list[list[str]]:
    return [[t.text for t in c.turns] for c in convs]


# ------------------------------------------------------------------------------------------------
# gzip and SMILE JSONL (no extra needed)


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.json.gz"])
def test_gzipped_json_and_jsonl(tmp_path, name):
    recs = [_sharegpt(i) for i in range(5)]
    path = tmp_path / name
    text = json.dumps(recs, ensure_ascii=False) if name.endswith(".json.gz") else \
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)
    assert detect_format(path) == "sharegpt"
    convs = list(read_conversations([path]))
    assert [c.id for c in convs] == [str(i) for i in range(5)]
    assert _texts(convs)[3] == ["我睡不着 3。", "多久了？3"]
    # A directory finds them too.
    assert len(list(read_conversations([tmp_path]))) == 5


def test_smile_jsonl_one_list_of_messages_per_line(tmp_path):
    lines = [[{"role": "client", "content": f"我最近压力很大 {i}。"}, {"role": "counselor", "content": f"嗯，说说看。{i}"}]
             for i in range(3)]
    path = tmp_path / "smile.jsonl"
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    assert detect_format(path) == "smile"
    convs = list(read_conversations([path]))
    assert _texts(convs) == [[m["content"] for m in x] for x in lines]
    # The same content as one JSON array of dialogues, on one line or pretty-printed, is still an array.
    for text in (json.dumps(lines, ensure_ascii=False), json.dumps(lines, ensure_ascii=False, indent=1)):
        path.write_text(text + "\n", encoding="utf-8")
        assert _texts(read_conversations([path])) == _texts(convs)


def test_column_mapping_on_json(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(_renamed(i), ensure_ascii=False) + "\n" for i in range(3)), encoding="utf-8")
    with pytest.raises(DataError):
        list(read_conversations([path]))  # unknown shape without the mapping
    convs = list(read_conversations([path], columns=COLUMNS))
    assert [c.id for c in convs] == ["u0", "u1", "u2"]
    assert _texts(convs)[1] == ["我很焦虑 1。", "慢慢说。1"]
    with pytest.raises(DataError, match=r"r.jsonl: record has no column 'nope' \(--columns messages=nope\)"):
        list(read_conversations([path], columns="messages=nope"))
    counter: Counter = Counter()  # with --format given, each record is skipped and counted
    assert list(read_conversations([path], fmt="openai", columns="messages=nope", on_error="skip",
                                   counter=counter)) == []
    assert counter == {"missing_field": 3}


@pytest.mark.parametrize("spec", ["messages", "speaker=from", "messages=a,messages=b", "role="])
def test_bad_column_mapping_is_refused(spec):
    with pytest.raises(ValueError, match="--columns"):
        parse_columns(spec)
    with pytest.raises(ConfigError, match="--columns"):
        DataConfig(columns=spec)


def test_column_mapping_parses():
    assert parse_columns(COLUMNS) == {"messages": "dialog", "role": "speaker", "content": "text", "id": "uid"}
    assert DataConfig(columns=COLUMNS).columns == COLUMNS


# ------------------------------------------------------------------------------------------------
# parquet and arrow (pyarrow)


@pytest.fixture
def pa():
    return pytest.importorskip("pyarrow")


def test_parquet_streams_in_batches(tmp_path, pa, monkeypatch):
    import pyarrow.parquet as pq

    import soulchat.data.arrow as arrow

    monkeypatch.setattr(arrow, "_BATCH_ROWS", 3)  # several batches, across row groups
    recs = [_sharegpt(i) for i in range(10)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(recs), path, row_group_size=4)
    assert detect_format(path) == "sharegpt"
    convs = list(read_conversations([path]))
    assert [c.id for c in convs] == [str(i) for i in range(10)]
    assert convs[7].source == f"{path}[row 7]"
    renamed = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist([_renamed(i) for i in range(4)]), renamed)
    assert [c.id for c in read_conversations([renamed], columns=COLUMNS)] == ["u0", "u1", "u2", "u3"]


def _save_to_disk_by_hand(pa, directory, recs, shards=2):
    """The layout datasets.Dataset.save_to_disk writes: Arrow IPC stream shards listed in state.json."""
    directory.mkdir()
    names = []
    per = -(-len(recs) // shards)
    for k in range(shards):
        name = f"data-{k:05d}-of-{shards:05d}.arrow"
        table = pa.Table.from_pylist(recs[k * per:(k + 1) * per])
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=2):
                writer.write_batch(batch)
        names.append({"filename": name})
    (directory / "state.json").write_text(json.dumps({"_data_files": names}), encoding="utf-8")
    (directory / "dataset_info.json").write_text(json.dumps({"features": {}}), encoding="utf-8")


def test_save_to_disk_directory_by_hand(tmp_path, pa):
    recs = [_sharegpt(i) for i in range(7)]
    _save_to_disk_by_hand(pa, tmp_path / "ds", recs)
    convs = list(read_conversations([tmp_path / "ds"]))
    assert [c.id for c in convs] == [str(i) for i in range(7)]  # state.json's metadata is not data
    assert len(list(read_conversations([tmp_path]))) == 7  # found inside a data directory too


def test_dataset_dict_root_is_refused_naming_the_splits(tmp_path, pa):
    root = tmp_path / "dd"
    root.mkdir()
    _save_to_disk_by_hand(pa, root / "train", [_sharegpt(0)], shards=1)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}), encoding="utf-8")
    with pytest.raises(DataError, match=r"a datasets.DatasetDict with splits \['train'\].*dd/train"):
        list(read_conversations([root]))
    assert len(list(read_conversations([root / "train"]))) == 1


def test_save_to_disk_written_by_datasets(tmp_path, pa):
    datasets = pytest.importorskip("datasets")
    recs = [_renamed(i) for i in range(6)]
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    convs = list(read_conversations([tmp_path / "ds"], columns=COLUMNS))
    assert [c.id for c in convs] == [f"u{i}" for i in range(6)]


def test_prepare_reads_parquet(tmp_path, pa):
    import pyarrow.parquet as pq

    from soulchat.data.pipeline import prepare

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([_renamed(i) for i in range(8)]), path)
    options = DataConfig(eval_fraction=0.0, columns=COLUMNS, max_length=128)
    options = replace(options, data=[path], cache_dir=str(tmp_path / "cache"))
    store = prepare(options, None, progress=False, verbose=False)
    assert store.report["conversations_trained"] == 8
    assert store.options["columns"] == COLUMNS


# ------------------------------------------------------------------------------------------------
# Damaged Hugging Face-ecosystem inputs: one line naming the file and what to do


def test_save_to_disk_shard_listed_but_missing_is_an_error_or_a_counted_shard(tmp_path, pa, caplog):
    import re

    from soulchat.data.pipeline import format_report, prepare

    recs = [_sharegpt(i) for i in range(5)]
    _save_to_disk_by_hand(pa, tmp_path / "ds", recs)  # shards of 3 and 2 records
    missing = tmp_path / "ds" / "data-00001-of-00002.arrow"
    missing.unlink()
    with pytest.raises(DataError, match=rf"state.json: lists the shard {missing.name}, which is missing from "):
        list(read_conversations([tmp_path / "ds"]))
    counter, notes = Counter(), Counter()
    convs = list(read_conversations([tmp_path / "ds"], on_error="skip", counter=counter, notes=notes))
    assert [c.id for c in convs] == ["0", "1", "2"] and notes["missing_shard"] == 1 and not counter
    assert re.search(rf"{re.escape(str(missing))}: listed in .*state.json but missing", caplog.text)
    # prepare: an error under raise (before anything is written), the shard in the report under skip.
    with pytest.raises(DataError, match="missing_shard|which is missing"):
        prepare(DataConfig(data=[str(tmp_path / "ds")], cache_dir=str(tmp_path / "c1"), eval_fraction=0.0,
                           max_length=128), None, progress=False, verbose=False)
    options = DataConfig(data=[str(tmp_path / "ds")], cache_dir=str(tmp_path / "c2"), eval_fraction=0.0,
                         max_length=128, on_error="skip")
    report = prepare(options, None, progress=False, verbose=False).report
    assert report["shards_missing"] == 1 and report["conversations_read"] == 3
    assert "whole shards missing (not read, conversations unknown)  1" in format_report(report)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("state.json", "{not json", r"state.json:1: not valid JSON \(Expecting property name"),
        ("state.json", "[1, 2]", r"state.json: holds a JSON array, not the object of a datasets save_to_disk"),
        ("state.json", '{"_data_files": [{"filename": 3}]}', r'state.json: "_data_files" must be a list of'),
        ("state.json", '{"_data_files": [{"filename": "../x.arrow"}]}', r'state.json: "_data_files" must be'),
        ("dataset_dict.json", '["train"]', r"dataset_dict.json: holds a JSON array, not the object of a datasets"),
    ],
)
def test_garbage_save_to_disk_metadata_is_one_line_naming_it(tmp_path, pa, name, content, expected):
    _save_to_disk_by_hand(pa, tmp_path / "ds", [_sharegpt(0)], shards=1)
    (tmp_path / "ds" / name).write_text(content, encoding="utf-8")
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match=expected) as err:
            list(read_conversations([tmp_path / "ds"], on_error=on_error))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("bad.parquet", b"PAR1 not really a parquet file", r"bad.parquet: not a readable parquet file \(pyarrow: "),
        ("data-00000-of-00001.arrow", b"\0" * 64, r"\.arrow: not a readable Arrow \(datasets save_to_disk shard\)"),
    ],
)
def test_garbage_parquet_or_arrow_is_one_line_naming_the_file(tmp_path, pa, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    for fmt in ("auto", "sharegpt"):  # found while sniffing the format, or while reading
        for on_error in ("raise", "skip"):
            with pytest.raises(DataError, match=expected) as err:
                list(read_conversations([path], fmt=fmt, on_error=on_error))
            assert str(err.value).startswith(str(path)) and "re-export it, or remove it from --data" in str(err.value)
