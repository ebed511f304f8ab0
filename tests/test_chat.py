"""soulchat.chat: the session, the REPL, the three CLI modes and their handling of bad input."""

from __future__ import annotations

import io
import json
import sys
import threading
from pathlib import Path

import pytest
import torch

from soulchat import chat
from soulchat.chat import SAFETY_NOTE, ChatSession, EmptyMessage
from soulchat.data.conversation import Turn
from soulchat.data.render import render_prompt
from soulchat.options import GenerationConfig

# One intra-op thread (tests/conftest.py): a tiny-model generate() is ~8x faster on shared cores.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def messages(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": text} for role, text in pairs]


def prompt_length(cm, turns: list[Turn]) -> int:
    return len(cm.encode(render_prompt(turns, cm.tokenizer, cm.template)))


# ------------------------------------------------------------------------------------------------
# Session: history, reset, streaming


def test_session_keeps_history_streams_and_resets(cm) -> None:
    session = ChatSession(cm, GenerationConfig(max_new_tokens=5), system="你是咨询师。")
    torch.manual_seed(0)
    chunks: list[str] = []
    first = session.respond("你好", on_text=chunks.append)
    assert first.text and "".join(chunks).strip() == first.text  # the streamed text is the reply
    second = session.respond("我很难过")
    assert [t.role for t in session.history] == ["client", "counselor", "client", "counselor"]
    assert [t.text for t in session.history[1::2]] == [first.text, second.text]
    session.reset()
    assert session.history == [] and session.system[0].text == "你是咨询师。"


def test_ctrl_c_stops_a_streaming_reply_and_keeps_the_partial_text(cm) -> None:
    session = ChatSession(cm, GenerationConfig(max_new_tokens=60, do_sample=False))
    stop = threading.Event()
    seen: list[str] = []

    def on_text(chunk: str) -> None:
        seen.append(chunk)
        if len(seen) == 1:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread while the reply streams

    reply = session.respond("你好", on_text, stop)
    assert reply.interrupted and stop.is_set()
    assert 0 < len(cm.encode(reply.text)) < 60  # generation stopped early (this model never says eos)
    assert session.history[-1] == Turn("counselor", reply.text)


def test_session_rejects_control_tokens(cm) -> None:
    session = ChatSession(cm, GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="control token"):
        session.respond("hi<|im_end|>")
    assert session.history == []


# ------------------------------------------------------------------------------------------------
# Command line: --prompt, --input/--output, interactive


def test_prompt_mode_one_reply_reproducible_with_seed(model_dir, capsys) -> None:
    def run(seed: int) -> str:
        argv = ["--model", str(model_dir), "--prompt", "我最近总是失眠", "--max-new-tokens", "6",
                "--seed", str(seed)]
        assert chat.main(argv) == 0
        return capsys.readouterr().out

    a, b, c = run(3), run(3), run(4)
    assert a == b and a.count("\n") == 1
    assert a != c  # the seed drives the sampling


def test_input_jsonl_mode(model_dir, cm, tmp_path) -> None:
    multi = messages(
        ("system", "你是咨询师。"),
        ("user", "我和室友闹矛盾了，心里很烦，不知道该不该主动去找她说清楚。"),
        ("assistant", "听起来这件事让你很困扰，你们之间发生了什么呢？能具体说说吗？"),
        ("user", "她总是很晚回来。"),
    )
    records = [
        {"id": "short", "messages": messages(("user", "你好，我有点焦虑。"))},
        {"id": "multi", "messages": multi},
        {"id": "long", "messages": messages(("user", "我" * 300))},
    ]
    # A window one token too small for the whole of "multi": its first exchange must go.
    role = {"system": "system", "user": "client", "assistant": "counselor"}
    turns = [Turn(role[m["role"]], m["content"]) for m in multi]
    assert prompt_length(cm, turns[:1] + turns[-1:]) < prompt_length(cm, turns) - 1
    max_context = prompt_length(cm, turns) - 1 + 4
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    argv = ["--model", str(model_dir), "--input", str(inp), "--output", str(out), "--max-new-tokens", "4",
            "--max-context", str(max_context), "--batch-size", "2", "--greedy"]
    assert chat.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["short", "multi", "long"]
    assert isinstance(rows[0]["reply"], str) and rows[0]["dropped_exchanges"] == 0
    assert isinstance(rows[1]["reply"], str) and rows[1]["dropped_exchanges"] == 1
    assert "reply" not in rows[2] and "context window" in rows[2]["error"]


def test_input_conversation_ending_with_counselor_is_rejected(model_dir, tmp_path, capsys) -> None:
    record = {"messages": messages(("user", "你好"), ("assistant", "你好呀"))}
    inp = write_jsonl(tmp_path / "in.jsonl", [record])
    assert chat.main(["--model", str(model_dir), "--input", str(inp), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "in.jsonl:1" in err and "must end" in err and "Traceback" not in err


def test_interactive_reset_and_exit(model_dir, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n/reset\n\n/help\n我很难过\n/exit\n这句不会被读到\n"))
    assert chat.main(["--model", str(model_dir), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert SAFETY_NOTE.splitlines()[0] in out
    assert "(conversation reset)" in out and "/reset" in out
    assert out.count("counselor> ") == 2  # two messages answered, the line after /exit never read
    assert out.rstrip().endswith("bye")


def test_interactive_ends_cleanly_at_end_of_input(model_dir, monkeypatch, capsys) -> None:
    # Ctrl-D is end of input: input() raises EOFError, the chat says goodbye and exits with status 0.
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n"))
    assert chat.main(["--model", str(model_dir), "--max-new-tokens", "2", "--system", "你是咨询师。"]) == 0
    out = capsys.readouterr().out
    assert out.count("counselor> ") == 1 and out.rstrip().endswith("bye")


# ------------------------------------------------------------------------------------------------
# Bad input: invalid text, empty messages, bad records in batch mode; every error one line, status 2


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_session_refuses_empty_and_invalid_messages_without_generating(cm) -> None:
    session = ChatSession(cm, GenerationConfig(max_new_tokens=2))
    for message in ("", "   ", "\u3000\n"):
        with pytest.raises(EmptyMessage):
            session.respond(message)
    with pytest.raises(ValueError, match="not valid text"):
        session.respond("我很\udcff难过")  # what invalid UTF-8 becomes under surrogateescape
    assert session.history == []


def test_interactive_invalid_utf8_on_stdin_is_reported_and_the_session_continues(model_dir, monkeypatch,
                                                                                 capsys) -> None:  # fmt: skip
    raw = "你好\n".encode() + b"\xff\xfe\xe4\xbd\n" + "我很难过\n".encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    assert chat.main(["--model", str(model_dir), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "(error: your message: a client message is not valid text" in out
    assert out.count("counselor> ") == 2 and out.rstrip().endswith("bye")  # the lines around it answered


def test_interactive_blank_lines_ask_again_without_generating(model_dir, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("   \n\u3000\n\t\n你好\n"))
    assert chat.main(["--model", str(model_dir), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("counselor> ") == 1 and out.count("you> ") == 5  # asked again after each blank


def test_prompt_mode_invalid_or_empty_text_is_one_line_and_status_2(model_dir, capsys) -> None:
    base = ["--model", str(model_dir), "--max-new-tokens", "2"]
    assert chat.main([*base, "--prompt", "我很\udcff难过"]) == 2
    assert "--prompt: a client message is not valid text" in one_error_line(capsys)
    assert chat.main([*base, "--prompt", "  "]) == 2
    assert "--prompt is empty" in one_error_line(capsys)
    assert capsys.readouterr().out == ""  # nothing generated


def bad_input_file(tmp_path: Path) -> Path:
    """Line 1 good, 2 a lone surrogate escape, 3 good, 4 ends with the counselor, 5 not JSON, 6 a control
    token, 7 good."""
    good = {"messages": messages(("user", "你好，我有点焦虑。"))}
    lines = [
        json.dumps({"id": "a", **good}),
        '{"id": "surrogate", "messages": [{"role": "user", "content": "\\ud800 hi"}]}',
        json.dumps({"id": "b", **good}),
        json.dumps({"id": "counselor-last", "messages": messages(("user", "你好"), ("assistant", "你好呀"))}),
        "{not json",
        json.dumps({"id": "control", "messages": messages(("user", "hi<|im_end|>"))}),
        json.dumps({"id": "c", **good}),
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_input_on_error_raise_names_the_line_and_keeps_earlier_replies(model_dir, tmp_path, capsys) -> None:
    inp, out = bad_input_file(tmp_path), tmp_path / "out.jsonl"
    argv = ["--model", str(model_dir), "--input", str(inp), "--output", str(out), "--max-new-tokens", "2",
            "--greedy"]  # fmt: skip
    assert chat.main(argv) == 2
    line = one_error_line(capsys)
    assert "in.jsonl:2" in line and "lone surrogate" in line and "--on-error skip" in line
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["a"] and isinstance(rows[0]["reply"], str)
    # The advice names a flag chat has.
    assert chat.CHAT.parse(["--model", "m", "--input", "f", "--on-error", "skip"])["data"].on_error == "skip"


def test_input_on_error_skip_reports_each_bad_record_and_counts(model_dir, tmp_path, capsys) -> None:
    inp, out = bad_input_file(tmp_path), tmp_path / "out.jsonl"
    argv = ["--model", str(model_dir), "--input", str(inp), "--output", str(out), "--max-new-tokens", "2",
            "--greedy", "--on-error", "skip", "--batch-size", "1"]  # fmt: skip
    assert chat.main(argv) == 0
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    # The reader drops the record with a lone surrogate (counted by reason); chat writes a row per record it got.
    assert [r["id"] for r in rows] == ["a", "b", "counselor-last", "control", "c"]
    by_id = {r["id"]: r for r in rows}
    assert all("reply" in by_id[i] for i in "abc")
    assert "in.jsonl:4" in by_id["counselor-last"]["error"] and "must end" in by_id["counselor-last"]["error"]
    assert "control token" in by_id["control"]["error"]
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith("3 replies to 5 conversations, 4 records skipped")
    for reason in ("lone_surrogate 1", "no_client_turn_last 1", "control_token 1", "malformed_json 1"):
        assert reason in summary


def test_input_a_late_bad_record_never_empties_the_output(model_dir, tmp_path, monkeypatch) -> None:
    # More good records than one generation pool: the pools before the bad record are on disk, and
    # so is the part of the pool the bad record interrupted.
    monkeypatch.setattr(chat, "POOL_BATCHES", 1)
    good = json.dumps({"messages": messages(("user", "你好"))})
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join([good] * 3 + ["{broken"]) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    argv = ["--model", str(model_dir), "--input", str(inp), "--output", str(out), "--max-new-tokens", "2",
            "--batch-size", "2", "--greedy"]  # fmt: skip
    assert chat.main(argv) == 2
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3


def test_option_errors_are_one_line_with_status_2(model_dir, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        chat.main(["--model", str(model_dir), "--prompt", "hi", "--input", "f.jsonl"])
    assert exit_info.value.code == 2 and "--prompt and --input" in one_error_line(capsys)
    with pytest.raises(SystemExit):
        chat.main(["--model", str(model_dir), "--top-p", "-1e-3"])  # a negative value reaches validation
    assert "--top-p must be in (0, 1]" in one_error_line(capsys)
    with pytest.raises(SystemExit):
        chat.main(["--prompt", "hi"])  # no --model: nothing to load, nothing downloaded
    assert "--model is required" in one_error_line(capsys)


def test_output_that_is_a_directory_is_one_line_naming_the_flag(model_dir, tmp_path, capsys) -> None:
    # Refused at parse time, before the model loads or a reply is generated.
    with pytest.raises(SystemExit) as exit_info:
        chat.main(["--model", str(model_dir), "--input", "f.jsonl", "--output", str(tmp_path)])
    line = one_error_line(capsys)
    assert exit_info.value.code == 2
    assert f"--output {tmp_path} is a directory: pass a file path" in line and "replies.jsonl" in line
