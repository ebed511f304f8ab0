"""`python -m soulchat.data construct`: parsing, checks, retries, rejection reasons, duplicates, resume after
a kill -9, the endpoint path against real HTTP servers on loopback (a scripted one for exact answers and
failures, soulchat.endpoint's server with the inference layer behind it), and the local tiny model.

The tiny model writes noise, so its runs assert the mechanics (every record rejected, by a counted
reason, after the retries); the scripted server answers with well-formed, broken or failing replies to
exercise each path exactly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from soulchat.data.__main__ import main
from soulchat.data.assets import default_corpus_path
from soulchat.data.construct_prompts import build_prompt, load_prompts
from soulchat.data.construct_screen import (
    DedupIndex,
    DialogueRules,
    Rejection,
    check_dialogue,
    crisis_signs,
    diagnoses_or_prescribes,
    parse_dialogue,
)
from soulchat.data.conversation import Turn

CORPUS = json.loads(default_corpus_path().read_text(encoding="utf-8"))
RULES = DialogueRules(4, 24, 2, 1000)
RETRYABLE = {"empty_generation", "no_dialogue", "empty_turn", "starts_with_counselor", "not_alternating",
             "ends_with_client", "too_few_turns", "too_many_turns", "turn_too_short", "turn_too_long",
             "invalid_text", "diagnosis", "prescription", "crisis_without_help", "hit_max_new_tokens"}  # fmt: skip


def write_qa(path: Path, n: int, start: int = 0) -> list[str]:
    """n single-turn Q&A records made from the sample corpus (first client and counselor message)."""
    ids = []
    with open(path, "w", encoding="utf-8") as f:
        for rec in CORPUS[start : start + n]:
            ids.append(f"qa-{rec['id']}")
            f.write(json.dumps({"qid": ids[-1], "title": rec["messages"][0]["content"],
                                "answer_text": rec["messages"][1]["content"], "topic": rec["topic"]},
                               ensure_ascii=False) + "\n")  # fmt: skip
    return ids


QA_COLUMNS = ["--columns", "question=title,answer=answer_text,id=qid"]


def exit_code(argv: list[str]) -> int:
    """main's exit status; option errors exit through SystemExit(2) as argparse's do."""
    try:
        return main(argv)
    except SystemExit as done:
        return done.code


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# A scripted OpenAI-compatible server: real HTTP on loopback, answers chosen per request by the test
# --------------------------------------------------------------------------------------------------

_QUESTION = re.compile(r"(?:原提问：|Original question: )(.*?)\n\n(?:原回答：|Original answer: )(.*?)\n\n", re.DOTALL)


def good_dialogue(user_message: str, extra_client: str = "") -> str:
    question, answer = _QUESTION.search(user_message).groups()
    if "原提问" in user_message:
        return (f"好的，以下是改写后的对话：\n话题：情绪\n用户：{question}\n心理咨询师：听起来这件事让你很不好受，能多说一点吗？\n"
                f"用户：{extra_client or '是的，我一直放不下。'}\n**心理咨询师**：{answer}")  # fmt: skip
    return (f"Topic: emotions\nClient: {question}\nCounselor: That sounds really hard. Can you tell me more?\n"
            f"Client: {extra_client or 'Yes, it keeps coming back.'}\nCounselor: {answer}")  # fmt: skip


def completion(text: str, finish: str = "stop") -> dict:
    return {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]}  # fmt: skip


class Scripted:
    """``behave(body, n)`` -> (status, dict | bytes, delay seconds); n counts requests for the same prompt."""

    def __init__(self, behave) -> None:
        self.behave = behave
        self.requests: list[dict] = []
        self.per_prompt: Counter = Counter()
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.requests.append(body)
                    key = body["messages"][-1]["content"]
                    n = owner.per_prompt[key]
                    owner.per_prompt[key] += 1
                status, payload, delay = owner.behave(body, n)
                time.sleep(delay)
                data = payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (timeout test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def construct_args(qa: Path, out: Path, url: str, *extra: str) -> list[str]:
    return ["construct", "--data", str(qa), *QA_COLUMNS, "--model", "scripted", "--endpoint", url,
            "--out", str(out), "--no-progress", "--request-retries", "0", "--backoff", "0", *extra]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Parsing and checks
# --------------------------------------------------------------------------------------------------


def test_parse_dialogue_labels_preamble_topic_and_continuations():
    zh = load_prompts().languages["zh"]
    text = ("好的，以下是对话：\n\n话题：婚恋\n用户：我失恋了。\n**心理咨询师**：听起来很痛。\n能说说吗？\n"
            "来访者: 他走了。\n- 咨询师：这很难熬。")  # fmt: skip
    parsed = parse_dialogue(text, zh.labels)
    assert [t.role for t in parsed.turns] == ["client", "counselor", "client", "counselor"]
    assert parsed.turns[1].text == "听起来很痛。\n能说说吗？"
    assert parsed.topic == "婚恋" and parsed.preamble
    assert zh.canonical_topic("心理学知识（科普）") == "心理学知识"
    en = load_prompts().languages["en"]
    assert en.canonical_topic("work stress") == "职场" and en.canonical_topic("weather") is None
    with pytest.raises(Rejection) as err:
        parse_dialogue("这是一段没有标签的噪声", zh.labels)
    assert err.value.reason == "no_dialogue"
    with pytest.raises(Rejection) as err:
        parse_dialogue("  \n", zh.labels)
    assert err.value.reason == "empty_generation"


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        ([("counselor", "你好呀。"), ("client", "嗯嗯嗯。"), ("counselor", "说说吧。"), ("client", "好的好的。")],
         "starts_with_counselor"),
        ([("client", "我很难过。"), ("client", "真的很难过。"), ("counselor", "我在听。"), ("client", "谢谢你。")],
         "not_alternating"),
        ([("client", "我很难过。"), ("counselor", "我在听。"), ("client", "谢谢你。")], "ends_with_client"),
        ([("client", "我很难过。"), ("counselor", "我在听。")], "too_few_turns"),
        ([("client", "我很难过。"), ("counselor", "我")] * 2, "turn_too_short"),
        ([("client", "我很难过。"), ("counselor", "听" * 1001)] * 2, "turn_too_long"),
        ([("client", "我很难过。"), ("counselor", "我在\x00听。")] * 2, "invalid_text"),
        ([("client", "我最近总是很低落。"), ("counselor", "听你这么说，你这是典型的抑郁症。")] * 2, "diagnosis"),
        ([("client", "I feel low all the time."), ("counselor", "You have clinical depression, I think.")] * 2,
         "diagnosis"),
        ([("client", "我睡不着。"), ("counselor", "你可以每晚睡前服用两片安眠药。")] * 2, "prescription"),
        ([("client", "I can't sleep."), ("counselor", "Try 10 mg of melatonin tonight.")] * 2, "prescription"),
        ([("client", "我真的不想活了。"), ("counselor", "我听到你很痛苦。"), ("client", "嗯。。"),
          ("counselor", "我们慢慢聊。")], "crisis_without_help"),
    ],
)  # fmt: skip
def test_check_dialogue_rejects_by_reason(turns, reason):
    with pytest.raises(Rejection) as err:
        check_dialogue([Turn(r, t) for r, t in turns], RULES)
    assert err.value.reason == reason


def test_check_dialogue_accepts_help_after_a_safety_question_and_every_bundled_dialogue():
    # A crisis sign answered first with a safety question, then with help a turn later: accepted.
    turns = [Turn("client", "我真的不想活了。"), Turn("counselor", "谢谢你告诉我。你现在安全吗？"),
             Turn("client", "我一个人在家。"), Turn("counselor", "请马上拨打心理援助热线或120，好吗？")]  # fmt: skip
    check_dialogue(turns, RULES)
    # The sample corpus is written as good practice: the screens must let all 126 dialogues through.
    for rec in CORPUS:
        check_dialogue([Turn("client" if m["role"] == "user" else "counselor", m["content"])
                        for m in rec["messages"]], RULES)  # fmt: skip


def test_crisis_screen_catches_every_bundled_crisis_message():
    messages = json.loads((default_corpus_path().parent / "crisis_prompts.json").read_text("utf-8"))["messages"]
    assert len(messages) == 16
    assert all(crisis_signs(m["message"]) for m in messages), [m["id"] for m in messages if not crisis_signs(m["message"])]
    assert crisis_signs("今天天气很好，我和朋友去爬山了。") is None
    assert diagnoses_or_prescribes("建议你去医院精神科，请医生做专业的评估。") is None


def test_dedup_exact_and_near_duplicates():
    index = DedupIndex(0.8)
    turns = [Turn("client" if m["role"] == "user" else "counselor", m["content"]) for m in CORPUS[0]["messages"]]
    verdict, key, sig = index.check(turns)
    assert verdict is None
    index.add(key, sig, turns)
    spaced = [Turn(t.role, "  " + t.text + " ") for t in turns]
    assert index.check(spaced)[0] == "duplicate"
    edited = [Turn(t.role, t.text.replace("胡思乱想", "乱想")) for t in turns]
    assert index.check(edited)[0] == "near_duplicate"
    other = [Turn("client" if m["role"] == "user" else "counselor", m["content"]) for m in CORPUS[1]["messages"]]
    assert index.check(other)[0] is None
    assert DedupIndex(1.0).check(edited)[0] is None


def test_prompt_file_is_versioned_and_checked(tmp_path):
    bundled = load_prompts()
    assert bundled.version.startswith("soulchat-construct-1@")
    zh = bundled.languages["zh"]
    system, user = build_prompt(zh, "问{x}题", "答", None, CORPUS[:1], 4, 24)
    assert "问{x}题" in user and "未标注" in user and "用户：" in user and system
    data = json.loads(Path(bundled.path).read_text(encoding="utf-8"))
    data["languages"]["zh"]["instruction"] += "{nonsense}"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown placeholders \['nonsense'\]"):
        load_prompts(str(bad))
    del data["languages"]["en"]
    data["languages"]["zh"]["instruction"] = data["languages"]["zh"]["instruction"].replace("{nonsense}", "")
    only_zh = tmp_path / "zh.json"
    only_zh.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    edited = load_prompts(str(only_zh))
    assert edited.version.split("@")[0] == "soulchat-construct-1" and edited.version != bundled.version


# --------------------------------------------------------------------------------------------------
# The endpoint path, scripted answers
# --------------------------------------------------------------------------------------------------


def test_construct_endpoint_writes_dialogues_that_prepare_reads(tmp_path, capsys):
    qa, out = tmp_path / "qa.jsonl", tmp_path / "out" / "dialogues.jsonl"
    ids = write_qa(qa, 6)
    with Scripted(lambda body, n: (200, completion(good_dialogue(body["messages"][-1]["content"])), 0)) as server:
        assert main(construct_args(qa, out, server.url, "--seed", "7", "--concurrency", "3")) == 0
        seeds = {r["seed"] for r in server.requests}
    assert len(server.requests) == 6 and len(seeds) == 6  # one request per record, a seed per record
    records = read_jsonl(out)
    assert [r["source_id"] for r in records] == ids  # input order, whatever the answer order
    for rec, source in zip(records, CORPUS):
        assert rec["id"] == rec["source_id"] and rec["topic"] == source["topic"]  # the source's topic wins
        assert rec["prompt_version"] == load_prompts().version
        assert rec["generator"] == f"openai:scripted@{server.url}"
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"] * 2
        assert rec["messages"][0]["content"] == source["messages"][0]["content"]
        assert rec["language"] == ("zh" if re.search("[\u4e00-\u9fff]", source["messages"][0]["content"]) else "en")
    report = json.loads(Path(f"{out}.report.json").read_text(encoding="utf-8"))
    assert report["counts"]["read"] == 6 and report["counts"]["written"] == 6 and report["counts"]["rejected"] == 0
    assert report["counts"]["preamble_dropped"] == sum(r["language"] == "zh" for r in records)
    assert "read 6 = already done 0 + written 6 + rejected 0" in capsys.readouterr().out
    # prepare reads the output as is.
    cache = tmp_path / "cache"
    assert main(["prepare", "--data", str(out), "--out", str(cache), "--eval-fraction", "0", "--no-progress",
                 "--max-length", "512"]) == 0  # fmt: skip
    from soulchat.data.store import PackedStore

    store = PackedStore(cache)
    assert store.report["conversations_read"] == 6


def test_construct_retries_then_rejects_by_reason(tmp_path):
    qa, out = tmp_path / "qa.jsonl", tmp_path / "dialogues.jsonl"
    ids = write_qa(qa, 7)
    plan = {  # source index -> the answers of its successive attempts
        0: ["noise without any labels", "GOOD"],
        1: ["noise"] * 3,
        2: ["心理咨询师：你好。\n用户：我很难过。\n心理咨询师：我在听。"] * 3,
        3: ["CRISIS"] * 3,  # (source 4's answer, the dialogue's last turn, names a doctor: help)
        4: ["DIAG"] * 3,
        5: ["CUT", "GOOD"],
        6: ["GOOD"],
    }
    questions = {rec["messages"][0]["content"]: i for i, rec in enumerate(CORPUS[:7])}

    def behave(body, n):
        user = body["messages"][-1]["content"]
        index = questions[_QUESTION.search(user).group(1)]
        answer = plan[index][n]
        if answer == "GOOD":
            return 200, completion(good_dialogue(user)), 0
        if answer == "CUT":
            return 200, completion(good_dialogue(user)[:60], "length"), 0
        if answer == "DIAG":
            return 200, completion(good_dialogue(user).replace("听起来这件事让你很不好受", "你这是典型的抑郁症")
                                   .replace("That sounds really hard", "You have clinical depression")), 0
        if answer == "CRISIS":
            return 200, completion(good_dialogue(user, extra_client="我真的不想活了。")
                                   .replace("Yes, it keeps coming back.", "I want to die.")), 0
        return 200, completion(answer), 0

    with Scripted(behave) as server:
        assert main(construct_args(qa, out, server.url, "--retries", "2", "--language", "zh")) == 0
    written = read_jsonl(out)
    rejected = {r["source_id"]: r for r in read_jsonl(Path(f"{out}.rejected.jsonl"))}
    assert [r["source_id"] for r in written] == [ids[0], ids[5], ids[6]]
    assert [r["attempts"] for r in written] == [2, 2, 1]
    assert {k: v["reason"] for k, v in rejected.items()} == {
        ids[1]: "no_dialogue", ids[2]: "starts_with_counselor", ids[3]: "crisis_without_help", ids[4]: "diagnosis"}
    assert all(v["attempts"] == 3 and v["generation"] for v in rejected.values())
    report = json.loads(Path(f"{out}.report.json").read_text(encoding="utf-8"))
    c = report["counts"]
    assert c["read"] == 7 == c["written"] + c["rejected"]
    assert c["attempts"] == len(server.requests) == 2 + 3 * 4 + 2 + 1
    assert report["failed_attempts_by_reason"]["hit_max_new_tokens"] == 1
    assert report["failed_attempts_by_reason"]["no_dialogue"] == 1 + 3
    assert report["totals"] == {"written": 3, "rejected": 4, "rejected_by_reason": {
        "crisis_without_help": 1, "diagnosis": 1, "no_dialogue": 1, "starts_with_counselor": 1}}


def test_construct_rejects_duplicates_without_retry(tmp_path):
    qa, out = tmp_path / "qa.jsonl", tmp_path / "dialogues.jsonl"
    ids = write_qa(qa, 3)
    source = CORPUS[0]["messages"]
    fixed = good_dialogue(f"原提问：{source[0]['content']}\n\n原回答：{source[1]['content']}\n\n")
    # The same dialogue with other spacing; then with one word changed (~0.9 similar in 5-grams).
    answers = [fixed, "  " + fixed.replace("\n", "\n "), fixed.replace("确实很难熬", "真的很难熬")]

    def behave(body, n):
        return 200, completion(answers[len(server.requests) - 1]), 0

    with Scripted(behave) as server:
        assert main(construct_args(qa, out, server.url, "--concurrency", "1", "--batch-size", "1",
                                   "--language", "zh")) == 0
    assert [r["source_id"] for r in read_jsonl(out)] == ids[:1]
    rejected = read_jsonl(Path(f"{out}.rejected.jsonl"))
    assert [(r["source_id"], r["reason"], r["attempts"]) for r in rejected] == [
        (ids[1], "duplicate", 1), (ids[2], "near_duplicate", 1)]


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("500", "server_error"),
        ("429", "rate_limited"),
        ("truncated", "bad_response"),
        ("no_choices", "bad_response"),
        ("timeout", "request_timeout"),
    ],
)
def test_construct_server_failures_are_retried_then_counted(tmp_path, behaviour, reason):
    qa, out = tmp_path / "qa.jsonl", tmp_path / "dialogues.jsonl"
    ids = write_qa(qa, 2)

    def behave(body, n):
        if behaviour == "500":
            return 500, {"error": {"message": "overloaded"}}, 0
        if behaviour == "429":
            return 429, {"error": {"message": "slow down"}}, 0
        if behaviour == "truncated":
            return 200, json.dumps(completion(good_dialogue(body["messages"][-1]["content"])),
                                   ensure_ascii=False).encode()[:50], 0
        if behaviour == "no_choices":
            return 200, {"id": "x", "object": "chat.completion"}, 0
        return 200, completion("late"), 1.0  # answered after the client's 0.3 s timeout

    with Scripted(behave) as server:
        args = construct_args(qa, out, server.url, "--timeout", "0.3")
        args[args.index("--request-retries") + 1] = "1"
        assert main(args) == 0
        assert len(server.requests) == 4  # each record: the request and one retry
    rejected = read_jsonl(Path(f"{out}.rejected.jsonl"))
    assert [(r["source_id"], r["reason"], r["attempts"]) for r in rejected] == [(i, reason, 1) for i in ids]
    assert not read_jsonl(out)


def test_construct_unfixable_answers_and_bad_options_are_one_line_errors(tmp_path, capsys):
    qa, out = tmp_path / "qa.jsonl", tmp_path / "dialogues.jsonl"
    write_qa(qa, 2)
    with Scripted(lambda body, n: (401, {"error": {"message": "invalid api key"}}, 0)) as server:
        env = os.environ.pop("SOULCHAT_TEST_KEY", None)
        assert main(construct_args(qa, out, server.url, "--api-key-env", "SOULCHAT_TEST_KEY")) == 2
        if env is not None:
            os.environ["SOULCHAT_TEST_KEY"] = env
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --endpoint") and "HTTP 401: invalid api key" in err and "SOULCHAT_TEST_KEY" in err
    assert len(err.splitlines()) == 1
    fresh = tmp_path / "fresh.jsonl"
    for argv, message in [
        (["construct", "--data", str(qa), "--model", "m"], "--out is required"),
        (["construct", "--data", str(qa), "--model", "m", "--out", str(fresh), "--columns", "messages=x"],
         "construct reads single-turn Q&A records"),
        (["construct", "--data", str(qa), "--model", "m", "--out", str(fresh), "--max-turns", "2"],
         "--max-turns (2) is below --min-turns (4)"),
        (["construct", "--data", str(qa), "--model", "m", "--out", str(fresh), "--endpoint", "localhost:1"],
         "must be an http:// or https:// URL"),
        (["construct", "--data", str(qa), *QA_COLUMNS, "--model", str(tmp_path / "none"), "--out", str(fresh)],
         "not a directory; pass a local Hugging Face model directory"),
    ]:  # fmt: skip
        assert exit_code(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not fresh.exists()  # nothing is written before the input, the options and the model are good
    # --columns question= is construct's: prepare refuses it rather than ignore it.
    assert main(["prepare", "--data", str(qa), "--columns", "question=title", "--out", str(tmp_path / "c"),
                 "--no-progress"]) == 2  # fmt: skip
    assert "only `python -m soulchat.data construct` reads" in capsys.readouterr().err


def test_construct_bad_input_raises_or_is_counted(tmp_path, capsys):
    qa, out = tmp_path / "qa.jsonl", tmp_path / "dialogues.jsonl"
    write_qa(qa, 2)
    with open(qa, "a", encoding="utf-8") as f:
        f.write('{"qid": "broken", "title": \n')  # malformed JSON, line 3
        f.write(json.dumps({"qid": "no-answer", "title": "我很焦虑"}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"qid": "qa-0", "title": "重复的编号", "answer_text": "嗯"}, ensure_ascii=False) + "\n")
    with Scripted(lambda body, n: (200, completion(good_dialogue(body["messages"][-1]["content"])), 0)) as server:
        assert main(construct_args(qa, out, server.url)) == 2
        err = capsys.readouterr().err
        assert f"{qa}:3: malformed JSON" in err and "--on-error skip" in err and len(err.strip().splitlines()) == 1
        assert not out.exists() and not server.requests  # the input is checked before anything else
        assert main(construct_args(qa, out, server.url, "--on-error", "skip")) == 0
    rejected = {r["source_id"]: r["reason"] for r in read_jsonl(Path(f"{out}.rejected.jsonl"))}
    assert rejected == {"qa.jsonl:2": "malformed_json", "qa.jsonl:3": "missing_answer",
                        "qa.jsonl:4": "duplicate_source_id"}  # fmt: skip
    assert len(read_jsonl(out)) == 2


# --------------------------------------------------------------------------------------------------
# Resume after kill -9
# --------------------------------------------------------------------------------------------------


def test_construct_resumes_after_kill_without_duplicates_or_gaps(tmp_path):
    qa, out = tmp_path / "qa.jsonl", tmp_path / "dialogues.jsonl"
    ids = write_qa(qa, 12)

    def behave(body, n):
        user = body["messages"][-1]["content"]
        question = _QUESTION.search(user).group(1)
        if question == CORPUS[3]["messages"][0]["content"]:
            return 200, completion("noise"), 0.2  # one record is rejected, so the rejects file resumes too
        return 200, completion(good_dialogue(user)), 0.2

    with Scripted(behave) as server:
        args = construct_args(qa, out, server.url, "--concurrency", "1", "--batch-size", "1", "--retries", "0")
        proc = subprocess.Popen([sys.executable, "-m", "soulchat.data", *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while len(read_jsonl(out)) < 4 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        before = out.read_bytes()
        done_before = len(read_jsonl(out)) + len(read_jsonl(Path(f"{out}.rejected.jsonl")))
        assert 4 <= done_before < 12
        # A record cut mid-write, as a kill during the write leaves it: dropped and done again on resume.
        with open(out, "ab") as f:
            f.write(b'{"id": "qa-99", "topic": "\xe5\xa9')
        requests_before = len(server.requests)
        assert main(args) == 0
        assert len(server.requests) - requests_before == 12 - done_before
    written = read_jsonl(out)
    rejected = read_jsonl(Path(f"{out}.rejected.jsonl"))
    assert out.read_bytes().startswith(before)  # appended: the first run's lines are unchanged
    every = [r["source_id"] for r in written] + [r["source_id"] for r in rejected]
    assert sorted(every) == sorted(ids) and len(every) == len(set(every))  # no duplicates, no gaps
    assert [r["source_id"] for r in rejected] == [ids[3]]
    report = json.loads(Path(f"{out}.report.json").read_text(encoding="utf-8"))
    c = report["counts"]
    assert c["read"] == 12 and c["already_done"] == done_before and c["written_partial_line_dropped"] == 1
    assert c["read"] == c["already_done"] + c["written"] + c["rejected"]
    assert report["totals"]["written"] == 11 and report["totals"]["rejected"] == 1
    # A third run has nothing left to do.
    with Scripted(lambda body, n: (500, {}, 0)) as server:
        assert main(construct_args(qa, out, server.url)) == 0
        assert not server.requests


# --------------------------------------------------------------------------------------------------
# The bundled tiny model: locally and behind soulchat.endpoint's server
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(trained_tiny_model_dir, one_torch_thread):
    return trained_tiny_model_dir


def test_construct_local_tiny_model_rejects_noise_after_retries(tmp_path, tiny_model):
    qa, out = tmp_path / "qa.jsonl", tmp_path / "dialogues.jsonl"
    ids = write_qa(qa, 3)
    args = ["construct", "--data", str(qa), *QA_COLUMNS, "--model", str(tiny_model), "--out", str(out),
            "--no-progress", "--few-shot", "0", "--max-new-tokens", "12", "--retries", "1", "--batch-size", "3",
            "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    rejected = read_jsonl(Path(f"{out}.rejected.jsonl"))
    assert sorted(r["source_id"] for r in rejected) == sorted(ids) and not read_jsonl(out)
    assert all(r["reason"] in RETRYABLE and r["attempts"] == 2 and "generation" in r for r in rejected)
    report = json.loads(Path(f"{out}.report.json").read_text(encoding="utf-8"))
    assert report["counts"]["attempts"] == 6 and report["counts"]["retries"] == 3
    assert report["generator"] == f"hf:{tiny_model}"
    # A context window too small for the prompt: counted, not generated, not retried.
    small = tmp_path / "small.jsonl"
    assert main([*args[:8], str(small), *args[9:], "--max-context", "64"]) == 0
    rejected = read_jsonl(Path(f"{small}.rejected.jsonl"))
    assert [r["reason"] for r in rejected] == ["prompt_too_long"] * 3 and all(r["attempts"] == 1 for r in rejected)


def test_construct_through_the_endpoint_server_with_the_tiny_model(tmp_path, tiny_model):
    from soulchat.endpoint import ChatClient, serve
    from soulchat.inference import load_model
    from soulchat.options import GenerationConfig

    lm = load_model(str(tiny_model), device="cpu")
    server = serve(lm, GenerationConfig(), name="tiny")
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        answer = ChatClient(url, "tiny", timeout=60, retries=0).complete(
            [{"role": "user", "content": "你好"}], max_tokens=4, temperature=0.0, top_p=1.0, seed=0)
        assert isinstance(answer.text, str) and answer.reason is None and not answer.finished  # cut at 4 tokens
        qa, out = tmp_path / "qa.jsonl", tmp_path / "dialogues.jsonl"
        ids = write_qa(qa, 2, start=1)
        args = ["construct", "--data", str(qa), *QA_COLUMNS, "--model", "tiny", "--endpoint", url, "--out",
                str(out), "--no-progress", "--few-shot", "0", "--max-new-tokens", "12", "--retries", "1",
                "--timeout", "60", "--concurrency", "2"]  # fmt: skip
        assert main(args) == 0
    finally:
        server.shutdown()
        server.server_close()
    rejected = read_jsonl(Path(f"{out}.rejected.jsonl"))
    assert sorted(r["source_id"] for r in rejected) == sorted(ids)
    assert all(r["reason"] in RETRYABLE and r["attempts"] == 2 for r in rejected)
    report = json.loads(Path(f"{out}.report.json").read_text(encoding="utf-8"))
    assert report["counts"]["read"] == 2 == report["counts"]["rejected"] and report["counts"]["attempts"] == 4


def test_construct_limit_extends_and_seed_fixes_the_requests(tmp_path):
    qa = tmp_path / "qa.jsonl"
    ids = write_qa(qa, 6)

    def run(out: Path, *extra: str) -> list[tuple[str, int]]:
        with Scripted(lambda body, n: (200, completion(good_dialogue(body["messages"][-1]["content"])), 0)) as server:
            assert main(construct_args(qa, out, server.url, "--few-shot", "2", *extra)) == 0
        return [(r["messages"][-1]["content"], r["seed"]) for r in server.requests]

    a = tmp_path / "a.jsonl"
    first = run(a, "--limit", "2", "--seed", "3")
    assert [r["source_id"] for r in read_jsonl(a)] == ids[:2]
    second = run(a, "--limit", "4", "--seed", "3")
    assert [r["source_id"] for r in read_jsonl(a)] == ids[:4] and len(second) == 2
    report = json.loads(Path(f"{a}.report.json").read_text(encoding="utf-8"))
    assert report["counts"]["read"] == 4 and report["counts"]["already_done"] == 2
    # The same --seed: the same prompts (few-shot examples chosen per record) and request seeds.
    again = run(tmp_path / "b.jsonl", "--limit", "4", "--seed", "3", "--concurrency", "1")
    assert sorted(again) == sorted(first + second)
    other = run(tmp_path / "c.jsonl", "--limit", "4", "--seed", "4")
    assert {s for _, s in other}.isdisjoint({s for _, s in again})
    assert sorted(u for u, _ in other) != sorted(u for u, _ in again)  # other examples in the prompts


def test_construct_refused_connection_is_counted(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    qa, out = tmp_path / "qa.jsonl", tmp_path / "dialogues.jsonl"
    ids = write_qa(qa, 2)
    assert main(construct_args(qa, out, f"http://127.0.0.1:{port}/v1")) == 0
    assert [(r["source_id"], r["reason"]) for r in read_jsonl(Path(f"{out}.rejected.jsonl"))] == [
        (i, "connection_error") for i in ids]


def test_construct_stops_when_the_server_is_down_and_resumes(tmp_path, capsys):
    qa, out = tmp_path / "qa.jsonl", tmp_path / "dialogues.jsonl"
    ids = write_qa(qa, 10)
    questions = [rec["messages"][0]["content"] for rec in CORPUS[:10]]

    def behave(body, n):  # the first record is answered, then the server fails every request
        user = body["messages"][-1]["content"]
        if _QUESTION.search(user).group(1) == questions[0]:
            return 200, completion(good_dialogue(user)), 0
        return 503, {"error": {"message": "unavailable"}}, 0

    with Scripted(behave) as server:
        assert main(construct_args(qa, out, server.url, "--batch-size", "4", "--concurrency", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert "8 records in a row got no answer (last: server_error: HTTP 503: unavailable)" in err
    assert len(err.splitlines()) == 1
    assert [r["source_id"] for r in read_jsonl(out)] == ids[:1]
    assert not read_jsonl(Path(f"{out}.rejected.jsonl"))  # the failed records are not marked done
    with Scripted(lambda body, n: (200, completion(good_dialogue(body["messages"][-1]["content"])), 0)) as server:
        assert main(construct_args(qa, out, server.url)) == 0
        assert len(server.requests) == 9
    assert [r["source_id"] for r in read_jsonl(out)] == ids


@pytest.mark.parametrize("kind", ["json", "parquet"])
def test_construct_reads_json_arrays_and_parquet(tmp_path, kind):
    rows = [{"question": rec["messages"][0]["content"], "answer": rec["messages"][1]["content"],
             "topic": rec["topic"]} for rec in CORPUS[:3]]  # fmt: skip
    if kind == "json":
        qa = tmp_path / "qa.json"
        qa.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    else:
        import pyarrow  # the test extra's
        import pyarrow.parquet as pq

        qa = tmp_path / "qa.parquet"
        pq.write_table(pyarrow.Table.from_pylist(rows), qa)
    out = tmp_path / "dialogues.jsonl"
    with Scripted(lambda body, n: (200, completion(good_dialogue(body["messages"][-1]["content"])), 0)) as server:
        args = construct_args(qa, out, server.url)
        del args[args.index("--columns") : args.index("--columns") + 2]  # the default field names
        assert main(args) == 0
    records = read_jsonl(out)
    assert [r["source_id"] for r in records] == [f"{qa.name}:{i}" for i in range(3)]  # ids from positions
    assert [r["topic"] for r in records] == [rec["topic"] for rec in CORPUS[:3]]
