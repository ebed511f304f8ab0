"""soulchat.judge: parsing judge answers, counting unparseable ones, the per-topic report; end to end
with the tiny trained model as judge (its scores are meaningless; the parsing, counting and report are
what is checked)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from soulchat import evaluate, judge
from soulchat.inference import load_model
from soulchat.judge import DIMENSIONS, RUBRICS, TOPICS, Judge, parse_scores, rubric_language, rubric_prompt

SAMPLE = Path(__file__).resolve().parents[1] / "soulchat" / "assets" / "sample_corpus.json"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    "answer",
    [
        "Content: 4\nEmpathy: 5\nHelpfulness: 3\nSafety: 5",
        "**Content**: 4\n**Empathy** - 5/5\nhelpfulness = 3\nSAFETY: 5.",
        '{"content": 4, "empathy": 5, "helpfulness": 3, "safety": 5}',
        "内容：4分\n共情：5\n帮助性：3\n安全：5",
        "Here are my ratings.\nContent: 4\nEmpathy: 5\nHelpfulness: 3\nSafety: 5\nContent: 4",  # repeated alike
    ],
)
def test_parse_scores_reads_common_answer_shapes(answer: str) -> None:
    assert parse_scores(answer) == {"content": 4, "empathy": 5, "helpfulness": 3, "safety": 5}


@pytest.mark.parametrize(
    "answer",
    [
        "Content: 4\nEmpathy: 5\nHelpfulness: 3",  # a dimension missing
        "Content: 4\nEmpathy: 6\nHelpfulness: 3\nSafety: 5",  # out of range
        "Content: 0\nEmpathy: 5\nHelpfulness: 3\nSafety: 5",
        "Content: 3.5\nEmpathy: 5\nHelpfulness: 3\nSafety: 5",  # fractional
        "Content: 4\nEmpathy: 5\nHelpfulness: 3\nSafety: 5\nContent: 2",  # two different values
        "Content: <1-5>\nEmpathy: <1-5>\nHelpfulness: <1-5>\nSafety: <1-5>",  # the rubric echoed
        "",
        "我觉得这个回复很好。",
    ],
)
def test_parse_scores_never_guesses(answer: str) -> None:
    assert parse_scores(answer) is None


def test_rubric_language_and_prompt() -> None:
    assert rubric_language("我很难过", "auto") == "zh" and rubric_language("I feel sad", "auto") == "en"
    assert rubric_language("I feel sad", "zh") == "zh"
    prompt = rubric_prompt("我很难过", "听起来你很辛苦。", "zh")
    assert "来访者：我很难过" in prompt and "听起来你很辛苦。" in prompt and "安全：<1-5>" in prompt
    for text in RUBRICS.values():
        assert "{client}" in text and "{reply}" in text


@pytest.fixture(scope="module")
def tiny_judge(trained_tiny_model_dir) -> Judge:
    return Judge(load_model(str(trained_tiny_model_dir)), language="auto", seed=0, batch_size=4)


def test_counts_and_per_topic_means_from_given_answers(tiny_judge, monkeypatch) -> None:
    records = [
        {"client": "我很难过", "reply": "嗯", "topic": "情绪"},
        {"client": "我很难过", "reply": "嗯", "topic": "情绪"},
        {"client": "我很难过", "reply": "嗯", "topic": "婚恋"},
        {"client": "I am sad", "reply": "ok", "topic": "not a corpus topic"},
        {"client": "我很难过", "reply": "嗯", "topic": None},
    ]
    answers = [
        "内容：4\n共情：5\n帮助：3\n安全：5",
        "内容：2\n共情：3\n帮助：1\n安全：4",
        "I cannot rate this.",
        "Content: 5\nEmpathy: 5\nHelpfulness: 5\nSafety: 5",
        None,  # could not be asked
    ]
    monkeypatch.setattr(tiny_judge, "ask", lambda questions, counts, key: (counts.update({key: 1}), answers)[1])
    counts: Counter = Counter()
    report = tiny_judge.evaluate(records, counts)
    assert (report["replies"], report["parsed"], report["unparseable"], report["not_asked"]) == (5, 3, 1, 1)
    assert report["scores"] == {"content": 11 / 3, "empathy": 13 / 3, "helpfulness": 3.0, "safety": 14 / 3}
    topics = report["per_topic"]
    assert list(topics)[:12] == list(TOPICS) and "other" in topics and "none" in topics
    assert topics["情绪"] == {"replies": 2, "parsed": 2, "unparseable": 0, "not_asked": 0,
                              "content": 3.0, "empathy": 4.0, "helpfulness": 2.0, "safety": 4.5}  # fmt: skip
    assert topics["婚恋"]["unparseable"] == 1 and topics["婚恋"]["content"] is None
    assert topics["other"]["parsed"] == 1 and topics["none"]["not_asked"] == 1
    assert topics["职场"]["replies"] == 0  # every corpus topic is listed
    assert records[2]["judge"] == {"answer": "I cannot rate this.", "scores": None}
    assert report["languages_used"] == {"zh": 4, "en": 1}


def test_evaluate_with_the_tiny_model_as_judge_is_recorded_and_deterministic(trained_tiny_model_dir,
                                                                            tmp_path) -> None:  # fmt: skip
    def run(name: str) -> dict:
        out, gen = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
        argv = ["--model", str(trained_tiny_model_dir), "--data", str(SAMPLE), "--max-conversations", "1",
                "--max-new-tokens", "3", "--no-progress", "--skip-loss", "--judge", str(trained_tiny_model_dir),
                "--out", str(out), "--generations", str(gen)]  # fmt: skip
        assert evaluate.main(argv) == 0
        lines = [json.loads(x) for x in gen.read_text(encoding="utf-8").splitlines()]
        assert all("answer" in line["judge"] for line in lines)
        return json.loads(out.read_text(encoding="utf-8"))

    a, b = run("a"), run("b")
    report = a["judge"]
    assert report["model"]["path"] == str(trained_tiny_model_dir) and report["rubric"] == RUBRICS
    assert report["replies"] == a["counts"]["generated"] > 0
    assert report["parsed"] + report["unparseable"] + report["not_asked"] == report["replies"]
    assert a["counts"].get("judge_unparseable", 0) == report["unparseable"]
    assert set(report["scores"]) == set(DIMENSIONS) and "not a human" in report["note"]
    assert report["decoding"]["do_sample"] is False
    assert a["judge"] == b["judge"]  # greedy from the seed: the same answers
    assert judge.format_judge_table(report).startswith("judge  ")
