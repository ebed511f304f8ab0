"""Malformed inputs a new user runs into: each is a clear error naming the place and the fix, or is
skipped and counted by reason under on_error="skip", or is read with a counted warning. Never silent."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace

import pytest

from soulchat.data.conversation import DataError
from soulchat.data.readers import read_conversations


def _msgs(client: str = "我最近总是失眠。", counselor: str = "听起来你很辛苦。") -> list[dict]:
    return [{"role": "user", "content": client}, {"role": "assistant", "content": counselor}]


def _rec(i, **kw) -> dict:
    return {"id": i, "topic": "t", "messages": _msgs(**kw)}


def _jsonl(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _read(paths, **kw):
    return list(read_conversations(paths if isinstance(paths, list) else [paths], **kw))


def _skip(paths, **kw):
    counter: Counter = Counter()
    convs = _read(paths, on_error="skip", counter=counter, **kw)
    return convs, counter


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# ------------------------------------------------------------------------------------------------
# JSON that Python's parser chokes on or accepts although it is not JSON


def test_deeply_nested_jsonl_line_is_a_bad_record(tmp_path):
    good = json.dumps(_rec(0), ensure_ascii=False)
    deep = '{"id": 1, "topic": "t", "messages": ' + _deep(5000) + "}"
    path = _jsonl(tmp_path / "d.jsonl", [good, deep, good.replace('"id": 0', '"id": 2')])
    with pytest.raises(DataError, match=r"d.jsonl:2: the record is nested deeper") as err:
        _read(path)
    assert err.value.reason == "nested_too_deep"
    convs, counter = _skip(path)
    assert [c.id for c in convs] == ["0", "2"] and counter == {"nested_too_deep": 1}


def test_deeply_nested_json_array_record_is_a_clear_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[" + json.dumps(_rec(0)) + ', {"id": 1, "messages": ' + _deep(5000) + "}]",
                    encoding="utf-8")
    for on_error in ("raise", "skip"):  # no end to resume from: never skippable
        with pytest.raises(DataError, match=r"record 1 is nested deeper than the JSON parser allows"):
            _read(path, on_error=on_error)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_number_literal_is_refused(tmp_path, literal):
    bad = '{"id": 1, "score": ' + literal + ', "topic": "t", "messages": ' + json.dumps(_msgs()) + "}"
    good = [json.dumps(_rec(i)) for i in (0, 2)]
    jsonl = _jsonl(tmp_path / "n.jsonl", [good[0], bad, good[1]])
    with pytest.raises(DataError, match=rf"n.jsonl:2: {literal} is not a JSON number") as err:
        _read(jsonl)
    assert err.value.reason == "non_finite_number"
    convs, counter = _skip(jsonl)
    assert [c.id for c in convs] == ["0", "2"] and counter == {"non_finite_number": 1}
    array = tmp_path / "n.json"
    array.write_text("[" + ", ".join([good[0], bad, good[1]]) + "]", encoding="utf-8")
    for chunk_size in (1 << 20, 7):  # whole buffer, and records cut by refills
        with pytest.raises(DataError, match=rf"n.json\[record 1\].*{literal} is not a JSON number"):
            _read(array, chunk_size=chunk_size)
        convs, counter = _skip(array, chunk_size=chunk_size)
        assert [c.id for c in convs] == ["0", "2"] and counter == {"non_finite_number": 1}


@pytest.mark.parametrize("tail", ["]", "\n]\n", "  ]"])
@pytest.mark.parametrize("chunk_size", [1 << 20, 5])
def test_trailing_comma_in_an_array_is_named(tmp_path, tail, chunk_size):
    path = tmp_path / "c.json"
    path.write_text("[" + json.dumps(_rec(0)) + ", " + json.dumps(_rec(1)) + "," + tail, encoding="utf-8")
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match=r"trailing comma after record 1, before the closing '\]'") as err:
            _read(path, on_error=on_error, chunk_size=chunk_size)
        assert "truncated" not in str(err.value)


# ------------------------------------------------------------------------------------------------
# Characters that must not reach the tokenizer


def test_lone_surrogate_is_refused_naming_the_record(tmp_path):
    good = json.dumps(_rec(0))
    bad = json.dumps(_rec(1, counselor="好的\ud800"))  # ensure_ascii writes the escape "\ud800"
    assert "\\ud800" in bad
    path = _jsonl(tmp_path / "s.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"s.jsonl:2: turn 1 \(counselor\) holds a lone surrogate") as err:
        _read(path)
    assert err.value.reason == "lone_surrogate"
    convs, counter = _skip(path)
    assert [c.id for c in convs] == ["0"] and counter == {"lone_surrogate": 1}
    # A surrogate pair (an emoji written with ensure_ascii) is one character and reads fine.
    emoji = _jsonl(tmp_path / "e.jsonl", [json.dumps(_rec(2, counselor="好的😀"))])
    assert _read(emoji)[0].turns[1].text == "好的😀"


@pytest.mark.parametrize("char, escaped", [("\x00", True), ("\x1b", True), ("\x00", False), ("\x7f", False)])
def test_control_characters_are_refused_by_reason(tmp_path, char, escaped):
    text = f"你好{char}[31m"
    line = json.dumps(_rec(1, client=text))
    if not escaped:  # the raw character in the file (strict=False parses it)
        line = json.dumps(_rec(1, client="PLACEHOLDER")).replace("PLACEHOLDER", text)
    path = _jsonl(tmp_path / "c.jsonl", [json.dumps(_rec(0)), line])
    with pytest.raises(DataError, match=r"c.jsonl:2: turn 0 \(client\) holds the control character "
                                         + re.escape(repr(char))):
        _read(path)
    convs, counter = _skip(path)
    assert [c.id for c in convs] == ["0"] and counter == {"control_character": 1}
    tabs = _jsonl(tmp_path / "t.jsonl", [json.dumps(_rec(2, client="一\t二\n三\r四"))])
    assert len(_read(tabs)) == 1  # tab, newline and CR are text


# ------------------------------------------------------------------------------------------------
# Files


def test_cr_only_line_endings_are_read(tmp_path):
    jsonl = tmp_path / "mac.jsonl"
    jsonl.write_bytes("\r".join(json.dumps(_rec(i), ensure_ascii=False) for i in range(3)).encode() + b"\r")
    assert [c.id for c in _read(jsonl)] == ["0", "1", "2"]
    text = tmp_path / "mac.txt"
    text.write_bytes("来访者：我睡不着。\r心理咨询师：多久了？\r\r来访者：我很焦虑。\r心理咨询师：慢慢说。\r".encode())
    convs = _read(text)
    assert [[t.text for t in c.turns] for c in convs] == [["我睡不着。", "多久了？"], ["我很焦虑。", "慢慢说。"]]
    # A bad line of a CR-only file is named by its line.
    jsonl.write_bytes(json.dumps(_rec(0)).encode() + b"\r{oops\r")
    with pytest.raises(DataError, match=r"mac.jsonl:2: malformed JSON"):
        _read(jsonl, fmt="soulchat")


def test_directory_with_notes_and_an_empty_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _jsonl(data / "a.jsonl", [json.dumps(_rec(0)), json.dumps(_rec(1))])
    (data / "empty.jsonl").write_text("", encoding="utf-8")
    (data / "notes.txt").write_text("to do: check the 2024 export\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty.jsonl: the file is empty"):
        _read(data)
    convs, counter = _skip(data)
    assert [c.id for c in convs] == ["0", "1"]
    assert counter == {"empty_file": 1, "unknown_format": 1}


def test_same_file_twice_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    path = _jsonl(data / "a.jsonl", [json.dumps(_rec(0))])
    for paths in ([path, path], [data, path], [path, tmp_path / "data" / ".." / "data" / "a.jsonl"]):
        for on_error in ("raise", "skip"):
            with pytest.raises(DataError, match=r"is given twice.*pass each file once") as err:
                _read(paths, on_error=on_error)
            assert err.value.reason == "repeated_file"


def test_exact_duplicate_records_are_kept_with_a_counted_warning(tmp_path, caplog):
    first = json.dumps(_rec(0))
    path = _jsonl(tmp_path / "dup.jsonl", [first, json.dumps(_rec(1, counselor="另一个回答。")), first,
                                           json.dumps(_rec(7))])  # other id, same turns: still a repeat
    notes: Counter = Counter()
    with caplog.at_level("WARNING"):
        convs = _read(path, notes=notes)
    assert [c.id for c in convs] == ["0", "1", "0", "7"]
    assert notes == {"duplicate_record": 2}
    assert "2 records repeat an earlier record's turns exactly" in caplog.text


def test_ids_of_different_types_with_one_spelling_do_not_merge(tmp_path):
    path = _jsonl(tmp_path / "ids.jsonl", [json.dumps(_rec(12)), json.dumps(_rec("12", counselor="别的。")),
                                           json.dumps(_rec(12, counselor="同一个 id。"))])
    with pytest.raises(DataError, match=r"ids.jsonl:2: id '12' \(string\) reads the same as an earlier int id"):
        _read(path)
    convs, counter = _skip(path)
    assert [c.id for c in convs] == ["12", "12"] and counter == {"id_type_clash": 1}  # same type: one id


# ------------------------------------------------------------------------------------------------
# Format-specific


def test_cpsycound_mistyped_speaker_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("来访者：我最近睡不好。\n比如：昨晚只睡了三个小时。\n心里咨询师：能多说说吗？\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"c.txt:3: unknown speaker '心里咨询师' \(did you mean '心理咨询师'\?\)") as err:
        _read(path)
    assert err.value.reason == "unknown_speaker"
    convs, counter = _skip(path)
    assert convs == [] and counter == {"unknown_speaker": 1}
    # A line with a colon that is no speaker label continues the turn, as before.
    path.write_text("来访者：我最近睡不好。\n比如：昨晚只睡了三个小时。\n心理咨询师：能多说说吗？\n", encoding="utf-8")
    (conv,) = _read(path)
    assert conv.turns[0].text == "我最近睡不好。\n比如：昨晚只睡了三个小时。"


def test_xtuner_system_on_a_later_step_is_refused(tmp_path):
    steps = [{"system": "你是咨询师。", "input": "你好", "output": "你好，请说。"},
             {"input": "我很累", "output": "辛苦了。"}]
    repeated = [dict(steps[0]), {**steps[1], "system": "你是咨询师。"}]
    changed = [dict(steps[0]), {**steps[1], "system": "你是一位医生。"}]
    late = [{"input": "你好", "output": "你好，请说。"}, {**steps[1], "system": "你是咨询师。"}]
    path = _jsonl(tmp_path / "x.jsonl", [json.dumps({"conversation": c}, ensure_ascii=False)
                                         for c in (steps, repeated, changed, late)])
    with pytest.raises(DataError, match=r"x.jsonl:3: conversation step 1 has a 'system' prompt") as err:
        _read(path)
    assert err.value.reason == "system_not_first"
    convs, counter = _skip(path)
    assert len(convs) == 2 and counter == {"system_not_first": 2}
    assert [t.role for t in convs[1].turns] == ["system", "client", "counselor", "client", "counselor"]


def test_prepare_reports_duplicates_and_skipped_files(tmp_path):
    from soulchat.options import DataConfig
    from soulchat.data.pipeline import format_report, prepare

    data = tmp_path / "data"
    data.mkdir()
    first = json.dumps(_rec(0), ensure_ascii=False)
    _jsonl(data / "a.jsonl", [first, json.dumps(_rec(1, counselor="另一个回答。")), first])
    (data / "notes.txt").write_text("to do\n", encoding="utf-8")
    options = DataConfig(eval_fraction=0.0, on_error="skip", max_length=128)
    options = replace(options, data=[data], cache_dir=str(tmp_path / "cache"))
    store = prepare(options, None, progress=False, verbose=False)
    report = store.report
    assert report["conversations_trained"] == 3  # the repeat is trained, as the data asks
    assert report["warnings"] == {"read:duplicate_record": 1}
    assert report["dropped"] == {"read:unknown_format": 1}
    assert "warning: read:duplicate_record (trained)" in format_report(report)


@pytest.mark.parametrize("rid, kind", [({"a": 1}, "JSON object"), ([1, 2], "JSON array"), (True, "boolean")])
def test_ids_that_are_objects_lists_or_booleans_are_refused_naming_the_record(tmp_path, rid, kind):
    path = _jsonl(tmp_path / "ids.jsonl", [json.dumps(_rec(0)), json.dumps(_rec(rid, counselor="别的。"))])
    with pytest.raises(DataError, match=rf"ids.jsonl:2: id .* is a {kind}; an id must be a string or a number"):
        _read(path)
    convs, counter = _skip(path)
    assert [c.id for c in convs] == ["0"] and counter == {"bad_id": 1}


# ------------------------------------------------------------------------------------------------
# Damaged compressed files: one line naming the file (and the last record read), never skipped


def _gz_records(n: int, array: bool) -> bytes:
    import gzip

    recs = [_rec(i, counselor=f"回答 {i}。") for i in range(n)]
    text = json.dumps(recs, ensure_ascii=False) if array else "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                      for r in recs)
    return gzip.compress(text.encode("utf-8"), mtime=0)


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_truncated_gzip_names_the_file_and_the_last_record_read(tmp_path, name):
    data = _gz_records(3000, array=name == "d.json")
    path = tmp_path / f"{name}.gz"
    path.write_bytes(data[: len(data) // 2])
    for on_error in ("raise", "skip"):  # what lies past the cut cannot be counted: never skipped
        with pytest.raises(DataError) as err:
            _read(path, on_error=on_error)
        message = str(err.value)
        assert message.startswith(f"{path}: the gzip stream ends early") and "truncated file?" in message
        if name.endswith(".jsonl"):  # the array's first 1 MiB read already fails: no record was read
            assert re.search(r"ends early \(after line \d+\)", message), message


def test_gz_that_is_plain_text_or_has_trailing_bytes_names_the_file(tmp_path):
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text(json.dumps(_rec(0)) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{re.escape(str(plain))}: not gzip data although the name ends in .gz"):
        _read(plain, on_error="skip")
    trailing = tmp_path / "trailing.jsonl.gz"
    trailing.write_bytes(_gz_records(5, array=False) + b"leftover bytes")
    with pytest.raises(DataError, match=rf"{re.escape(str(trailing))}: bytes that are not gzip data follow"):
        _read(trailing)
