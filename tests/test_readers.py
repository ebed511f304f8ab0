"""Readers: every format, auto-detection, role maps, bad input (raise and skip), JSON array streaming."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soulchat.data.conversation import Conversation, DataError, RoleMap, Turn, validate_conversation
from soulchat.data.readers import detect_format, iter_json_array, iter_jsonl, read_conversations
from soulchat.options import DataConfig

SOULCHAT = [
    {
        "id": 7,
        "topic": "成长",
        "messages": [
            {"role": "user", "content": "我最近总是睡不着，很焦虑。"},
            {"role": "assistant", "content": "听起来你最近压力很大，能说说发生了什么吗？"},
            {"role": "user", "content": "工作上的事情。"},
            {"role": "assistant", "content": "嗯，我在听。"},
        ],
    },
    {
        "id": 8,
        "topic": "婚恋",
        "messages": [
            {"role": "user", "content": "我和男朋友分手了。"},
            {"role": "assistant", "content": "分手一定很难受。"},
        ],
    },
]


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def roles_texts(conv: Conversation) -> list[tuple[str, str]]:
    return [(t.role, t.text) for t in conv.turns]


def read_all(path, **kw) -> list[Conversation]:
    return list(read_conversations(path, **kw))


# ---------------------------------------------------------------------------------------------- formats


def test_soulchat_array_and_jsonl_parse_the_same(tmp_path):
    arr = read_all(write_json(tmp_path / "c.json", SOULCHAT))
    lines = read_all(write_jsonl(tmp_path / "c.jsonl", SOULCHAT))
    assert [roles_texts(c) for c in arr] == [roles_texts(c) for c in lines]
    assert [c.id for c in arr] == ["7", "8"] and [c.topic for c in arr] == ["成长", "婚恋"]
    assert roles_texts(arr[0])[:2] == [
        ("client", "我最近总是睡不着，很焦虑。"),
        ("counselor", "听起来你最近压力很大，能说说发生了什么吗？"),
    ]
    assert arr[1].source == f"{tmp_path / 'c.json'}[record 1]"
    assert lines[1].source == f"{tmp_path / 'c.jsonl'}:2"


def test_openai_with_system_message(tmp_path):
    rec = {
        "messages": [
            {"role": "system", "content": "你是一位心理咨询师。"},
            {"role": "user", "content": "你好"},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "你好，"}, {"type": "text", "text": "请讲。"}],
            },
        ]
    }
    path = write_jsonl(tmp_path / "o.jsonl", [rec, rec])
    assert detect_format(path) == "openai"
    convs = read_all(path)
    assert len(convs) == 2
    assert roles_texts(convs[0]) == [
        ("system", "你是一位心理咨询师。"),
        ("client", "你好"),
        ("counselor", "你好，请讲。"),
    ]
    assert convs[1].id == f"{path}:1" and convs[1].topic is None


def test_sharegpt_array(tmp_path):
    rec = {
        "id": "a1",
        "conversations": [
            {"from": "system", "value": "sys"},
            {"from": "human", "value": "h1"},
            {"from": "gpt", "value": "g1"},
        ],
    }
    path = write_json(tmp_path / "s.json", [rec])
    assert detect_format(path) == "sharegpt"
    (conv,) = read_all(path)
    assert roles_texts(conv) == [("system", "sys"), ("client", "h1"), ("counselor", "g1")] and conv.id == "a1"


def test_smile_shapes(tmp_path):
    dialogue = [{"role": "client", "content": "c1"}, {"role": "counselor", "content": "k1"}]
    expected = [("client", "c1"), ("counselor", "k1")]
    nested = write_json(tmp_path / "nested.json", [dialogue, dialogue])  # array of dialogues
    lines = write_jsonl(tmp_path / "lines.jsonl", [dialogue])  # one dialogue per line
    wrapped = write_jsonl(tmp_path / "wrapped.jsonl", [{"dialogue": dialogue}])
    single = write_json(tmp_path / "single.json", dialogue)  # the whole file is one dialogue
    strings = write_json(tmp_path / "strings.json", [["来访者：c1", "心理咨询师：k1"]])
    for path, n in ((nested, 2), (lines, 1), (wrapped, 1), (single, 1), (strings, 1)):
        assert detect_format(path) == "smile", path
        convs = read_all(path)
        assert len(convs) == n and all(roles_texts(c) == expected for c in convs), path


def test_cpsycound_text(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text(
        "来访者：我最近很难过。\n"
        "不知道该怎么办。\n"  # continuation of the client turn
        "心理咨询师: 我在这里陪着你。\n"  # ASCII colon
        "\n\n"
        "来访者：第二段对话\n"
        "心理咨询师：好的：我们慢慢说。\n",  # a colon inside the text is not a speaker
        encoding="utf-8",
    )
    assert detect_format(path) == "cpsycound"
    a, b = read_all(path)
    assert roles_texts(a) == [
        ("client", "我最近很难过。\n不知道该怎么办。"),
        ("counselor", "我在这里陪着你。"),
    ]
    assert roles_texts(b) == [("client", "第二段对话"), ("counselor", "好的：我们慢慢说。")]
    assert a.source == f"{path}:1" and b.source == f"{path}:6"


def test_xtuner_system_from_first_step(tmp_path):
    rec = {
        "conversation": [
            {"system": "你是心理咨询师", "input": "i1", "output": "o1"},
            {"input": "i2", "output": "o2"},
        ]
    }
    path = write_jsonl(tmp_path / "x.jsonl", [rec])
    assert detect_format(path) == "xtuner"
    (conv,) = read_all(path)
    assert roles_texts(conv) == [
        ("system", "你是心理咨询师"),
        ("client", "i1"),
        ("counselor", "o1"),
        ("client", "i2"),
        ("counselor", "o2"),
    ]


def test_explicit_format_overrides_detection(tmp_path):
    path = write_json(tmp_path / "c.json", SOULCHAT)
    assert len(read_all(path, fmt="openai")) == 2  # same record layout, read fine
    with pytest.raises(DataError, match=r"no 'conversations' key") as exc:
        read_all(path, fmt="sharegpt")
    assert exc.value.reason == "missing_field"


def test_directory_and_many_paths(tmp_path):
    write_json(tmp_path / "a.json", SOULCHAT)
    write_jsonl(tmp_path / "b.jsonl", SOULCHAT[:1])
    assert len(read_all(tmp_path)) == 3
    assert len(read_all([tmp_path / "a.json", tmp_path / "b.jsonl"])) == 3


def test_role_map_override(tmp_path):
    rec = {"messages": [{"role": "patient", "content": "p"}, {"role": "Doctor", "content": "d"}]}
    path = write_jsonl(tmp_path / "r.jsonl", [rec])
    with pytest.raises(DataError, match="unknown role 'patient'") as exc:
        read_all(path)
    assert exc.value.reason == "unknown_role" and f"{path}:1" in str(exc.value)
    role_map = RoleMap(counselor=("doctor",), client=("patient",))
    (conv,) = read_all(path, role_map=role_map)
    assert roles_texts(conv) == [("client", "p"), ("counselor", "d")]
    # An override replaces the defaults of that role.
    assert RoleMap(counselor=("doctor",)).canonical("user", "x") == "client"
    with pytest.raises(DataError):
        RoleMap(counselor=("doctor",)).canonical("assistant", "x")
    with pytest.raises(ValueError, match="both"):
        RoleMap(counselor=("user",))


def test_options_taken_whole(tmp_path):
    # The data options reach the readers as one object: role names, --on-error, --format, --columns.
    recs = [{"id": 1, "dialog": [{"role": "patient", "content": "p"}, {"role": "doctor", "content": "d"}]},
            {"id": 2, "dialog": [{"role": "doctor", "content": "the counselor first"}]}]
    path = write_jsonl(tmp_path / "r.jsonl", recs)
    options = DataConfig(counselor_role=["doctor"], client_role=["patient"], on_error="skip",
                         format="openai", columns="messages=dialog")
    counter: Counter = Counter()
    (conv,) = read_conversations([path], options, counter=counter)
    assert roles_texts(conv) == [("client", "p"), ("counselor", "d")]
    assert counter == {"starts_with_counselor": 1}
    with pytest.raises(DataError, match="unknown role 'patient'"):
        list(read_conversations([path], DataConfig(format="openai", columns="messages=dialog")))
    # A keyword stands in for the option of its name.
    with pytest.raises(DataError, match="no 'messages' key"):
        list(read_conversations([path], options, columns={}, on_error="raise"))
    # A format passed where the options go is refused, not read as options.
    with pytest.raises(TypeError, match="options must be a DataConfig"):
        list(read_conversations([path], "openai"))


def test_role_map_in_text_format(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("patient: hi\ndoctor: hello\n", encoding="utf-8")
    (conv,) = read_all(path, fmt="cpsycound", role_map=RoleMap(counselor=("doctor",), client=("patient",)))
    assert roles_texts(conv) == [("client", "hi"), ("counselor", "hello")]


def test_empty_array_and_bom(tmp_path):
    empty = tmp_path / "e.json"
    empty.write_text("  [ ]\n", encoding="utf-8")
    assert read_all(empty) == []
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(SOULCHAT).encode())
    assert len(read_all(bom)) == 2


# ---------------------------------------------------------------------------------------------- bad input


def msgs(*pairs: tuple[str, str]) -> dict:
    return {"id": 1, "topic": "情绪", "messages": [{"role": r, "content": c} for r, c in pairs]}


GOOD = msgs(("user", "u"), ("assistant", "a"))
BAD_RECORDS = {
    "unknown_role": msgs(("user", "u"), ("therapist", "a")),
    "empty_content": msgs(("user", "  \n"), ("assistant", "a")),
    "starts_with_counselor": msgs(("assistant", "a"), ("user", "u")),
    "consecutive_client": msgs(("user", "u"), ("user", "u2"), ("assistant", "a")),
    "consecutive_counselor": msgs(("user", "u"), ("assistant", "a"), ("assistant", "a2")),
    "system_not_first": msgs(("user", "u"), ("system", "s"), ("assistant", "a")),
    "no_turns": msgs(),
    "missing_field": {"id": 1, "messages": [{"role": "user"}]},
}


@pytest.mark.parametrize("reason", sorted(BAD_RECORDS))
@pytest.mark.parametrize("container", ["json", "jsonl"])
def test_bad_record_raises_naming_file_and_record(tmp_path, reason, container):
    records = [GOOD, GOOD, BAD_RECORDS[reason], GOOD]
    if container == "json":
        path = write_json(tmp_path / "bad.json", records)
        location = f"{path}[record 2]"
    else:
        path = write_jsonl(tmp_path / "bad.jsonl", records)
        location = f"{path}:3"
    with pytest.raises(DataError) as exc:
        read_all(path, fmt="soulchat")
    assert exc.value.reason == reason
    assert location in str(exc.value)
    assert "--on-error skip" in str(exc.value)  # the message always names a fix


def test_validation_messages_name_the_fix():
    conv = Conversation(
        [Turn("client", "a"), Turn("client", "b"), Turn("counselor", "c")], "1", source="f.json[record 3]"
    )
    with pytest.raises(DataError, match=r"f\.json\[record 3\].*merge consecutive client messages"):
        validate_conversation(conv)
    ok = Conversation(
        [Turn("system", "s"), Turn("client", "a"), Turn("counselor", "b"), Turn("client", "c")], "2"
    )
    assert validate_conversation(ok) is ok  # ending on the client is allowed
    with pytest.raises(DataError, match="only a system turn") as exc:
        validate_conversation(Conversation([Turn("system", "s")], "3"))
    assert exc.value.reason == "no_turns"


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"messages": [\n' + json.dumps(GOOD) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON") as exc:
        read_all(path)
    assert exc.value.reason == "malformed_json"
    counter = Counter()
    assert len(read_all(path, on_error="skip", counter=counter)) == 2
    assert counter == {"malformed_json": 1}


def test_non_utf8_jsonl_reports_line_and_byte_offset(tmp_path):
    good = (json.dumps(GOOD) + "\n").encode()
    bad = (
        json.dumps(msgs(("user", "你好"), ("assistant", "a")), ensure_ascii=False)
        .encode()
        .replace("好".encode(), b"\xba\xc3")
        + b"\n"
    )
    path = tmp_path / "gbk.jsonl"
    path.write_bytes(good + bad + good)
    with pytest.raises(DataError) as exc:
        read_all(path)
    assert exc.value.reason == "non_utf8"
    assert f"{path}:2" in str(exc.value)
    offset = len(good) + bad.index(b"\xba")
    assert f"byte offset {offset}" in str(exc.value)
    counter = Counter()
    assert len(read_all(path, on_error="skip", counter=counter)) == 2 and counter == {"non_utf8": 1}


def test_non_utf8_inside_json_array_record_is_skippable(tmp_path):
    body = json.dumps([GOOD, msgs(("user", "你好"), ("assistant", "a")), GOOD], ensure_ascii=False).encode()
    data = body.replace("好".encode(), b"\xff")
    path = tmp_path / "bad.json"
    path.write_bytes(data)
    offset = data.index(b"\xff")
    for chunk_size in (3, 1 << 20):
        with pytest.raises(DataError) as exc:
            read_all(path, chunk_size=chunk_size)
        assert exc.value.reason == "non_utf8"
        assert f"{path}[record 1]" in str(exc.value) and f"byte offset {offset}" in str(exc.value)
        counter = Counter()
        assert len(read_all(path, on_error="skip", counter=counter, chunk_size=chunk_size)) == 2
        assert counter == {"non_utf8": 1}


def test_non_utf8_text_drops_the_dialogue(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(
        "来访者：一\n心理咨询师：二\n\n来访者：".encode() + b"\xff\xfe\n" + "心理咨询师：四\n".encode()
    )
    with pytest.raises(DataError, match=rf"{path}:4: non-UTF-8"):
        read_all(path, fmt="cpsycound")
    counter = Counter()
    assert len(read_all(path, fmt="cpsycound", on_error="skip", counter=counter)) == 1
    assert counter == {"non_utf8": 1}


def test_text_without_speaker(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("来访者：一\n心理咨询师：二\n\n旁白：三\n心理咨询师：四\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:4: dialogue does not start with a known speaker") as exc:
        read_all(path)
    assert exc.value.reason == "unknown_role"


def test_skip_counts_every_reason(tmp_path):
    records = [GOOD] + [BAD_RECORDS[r] for r in sorted(BAD_RECORDS)] + [GOOD, "not an object"]
    path = write_json(tmp_path / "mixed.json", records)
    counter = Counter()
    convs = read_all(path, fmt="soulchat", on_error="skip", counter=counter)
    assert len(convs) == 2
    assert counter == Counter({r: 1 for r in BAD_RECORDS}) + Counter({"bad_record_shape": 1})
    assert len(convs) + sum(counter.values()) == len(records)  # nothing lost silently


def test_truncated_array_raises_even_with_skip(tmp_path):
    text = json.dumps([GOOD] * 5, ensure_ascii=False)
    path = tmp_path / "t.json"
    path.write_text(text[: len(text) - 20], encoding="utf-8")
    seen = 0
    with pytest.raises(DataError, match="ends early") as exc:
        for _ in read_conversations(path, on_error="skip", chunk_size=16):
            seen += 1
    assert exc.value.reason == "truncated_json" and seen == 4  # records before the cut were read


def test_broken_array_raises_even_with_skip(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(
        "[\n" + json.dumps(GOOD) + ",\n" + '{"id": 2, "messages": [}' + ",\n" + json.dumps(GOOD) + "\n]",
        encoding="utf-8",
    )
    with pytest.raises(DataError, match=rf"{path}:3 .*broken.*even with --on-error skip") as exc:
        read_all(path, on_error="skip", fmt="soulchat")
    assert exc.value.reason == "malformed_json"
    path.write_text("[" + json.dumps(GOOD) + " " + json.dumps(GOOD) + "]", encoding="utf-8")
    with pytest.raises(DataError, match="expected ',' or ']'"):
        read_all(path, on_error="skip", fmt="soulchat")
    path.write_text("[" + json.dumps(GOOD) + "] x", encoding="utf-8")
    with pytest.raises(DataError, match="extra data"):
        read_all(path, fmt="soulchat")


def test_undetectable_and_missing_files(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just some text\nwithout speakers\n", encoding="utf-8")
    with pytest.raises(DataError, match="pass --format"):
        detect_format(path)
    with pytest.raises(DataError, match="no such file"):
        read_all(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="on_error"):
        read_all(path, on_error="ignore")


# ---------------------------------------------------------------------------------------------- streaming


TRICKY = [
    {
        "id": 0,
        "topic": "情绪",
        "messages": [
            {
                "role": "user",
                "content": '引号"反斜杠\\换行\n制表\t😀 emoji 😀 (a surrogate pair when ensure_ascii)',
            },
            {"role": "assistant", "content": "\u4f60\u597d，" + "长" * 300},
        ],
    },
    12345678901234567890,
    -1.5e-10,
    '\\"]},[{',
    [[], {}, [[1, 2], {"k": "v"}]],
    None,
    True,
    {"嵌套": {"a": [1, "二", 3.0]}},
]


@pytest.mark.parametrize("ensure_ascii", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 7, 64, 1 << 20])
def test_json_array_streaming_across_chunk_boundaries(tmp_path, chunk_size, ensure_ascii):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(TRICKY, ensure_ascii=ensure_ascii, indent=2), encoding="utf-8")
    assert [obj for _, obj in iter_json_array(path, chunk_size=chunk_size)] == json.loads(
        path.read_text("utf-8")
    )


text = st.text(st.characters(exclude_categories=("Cs",)))  # lone surrogates cannot be written as UTF-8
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(json_values, max_size=6),
    chunk_size=st.integers(1, 40),
    indent=st.sampled_from([None, 0, 2]),
)
def test_json_array_streaming_matches_json_loads(tmp_path, values, chunk_size, indent):
    path = tmp_path / "h.json"
    path.write_text(json.dumps(values, ensure_ascii=False, indent=indent), encoding="utf-8")
    assert [obj for _, obj in iter_json_array(path, chunk_size=chunk_size)] == json.loads(
        path.read_text("utf-8")
    )


def test_conversations_identical_for_every_chunk_size(tmp_path):
    path = write_json(tmp_path / "c.json", SOULCHAT * 20)
    reference = [roles_texts(c) for c in read_all(path)]
    for chunk_size in (1, 3, 17, 256):
        assert [roles_texts(c) for c in read_all(path, chunk_size=chunk_size)] == reference


def test_iter_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text("\n" + json.dumps(GOOD) + "\n\n   \n" + json.dumps(GOOD) + "\n", encoding="utf-8")
    assert [(i, line) for i, line, _ in iter_jsonl(path)] == [(0, 2), (1, 5)]
