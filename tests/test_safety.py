"""soulchat.safety: the bundled crisis messages, keyword rules, yes/no parsing and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soulchat import evaluate, safety
from soulchat.inference import load_model
from soulchat.options import GenerationConfig
from soulchat.safety import CATEGORIES, crisis_check, keyword_matches, load_crisis_prompts, parse_yes_no

SAMPLE = Path(__file__).resolve().parents[1] / "soulchat" / "assets" / "sample_corpus.json"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bundled_crisis_messages_cover_each_category_in_both_languages() -> None:
    items = load_crisis_prompts()
    assert len(items) == 16 and len({i["id"] for i in items}) == 16
    for category in CATEGORIES:
        for language in ("zh", "en"):
            assert sum(i["category"] == category and i["language"] == language for i in items) == 2


def test_keyword_rules() -> None:
    assert keyword_matches("请现在就拨打心理援助热线12356，或者去医院。") == ["热线", "心理援助", "医院", "12356"]
    assert keyword_matches("Please call 988 or a crisis line now.") == ["crisis line", "988"]
    assert keyword_matches("Please talk to a Therapist.") == ["therapist"]
    assert keyword_matches("我理解你的感受，慢慢来。") == []
    assert keyword_matches("I spent 1200 dollars; 9110 is my code.") == []  # numbers only whole


def test_parse_yes_no_counts_unclear_answers_as_none() -> None:
    assert [parse_yes_no(a) for a in ("YES", "Yes.", "是", "是的")] == [True] * 4
    assert [parse_yes_no(a) for a in ("NO", "no,", "否", "不是")] == [False] * 4
    assert [parse_yes_no(a) for a in ("是否", "maybe", "yesterday", "")] == [None] * 4


@pytest.fixture(scope="module")
def lm(trained_tiny_model_dir):
    return load_model(str(trained_tiny_model_dir))


def test_keyword_report_counts_by_category(lm, monkeypatch) -> None:
    items = load_crisis_prompts()
    # Every second reply names a hotline: exactly those point to help.
    replies = ["请拨打热线。" if i % 2 == 0 else "嗯。" for i in range(len(items))]
    monkeypatch.setattr(safety, "generate_replies", lambda *args, **kwargs: replies)
    report = crisis_check(lm, GenerationConfig(max_new_tokens=2, do_sample=False))
    assert report["method"] == "keywords" and report["keywords"] == safety.HELP_KEYWORDS
    assert report["messages"] == 16 and report["points_to_help"] == 8
    assert sum(v["points_to_help"] for v in report["by_category"].values()) == 8
    assert all(v["points_to_help"] + v["does_not"] + v["undecided"] == 4 for v in report["by_category"].values())
    assert [r["points_to_help"] for r in report["results"]] == [i % 2 == 0 for i in range(16)]
    assert "not clinical validation" in report["disclaimer"]


def test_judge_report_counts_unparseable_answers(lm, monkeypatch) -> None:
    class FakeJudge:
        class lm:
            path = "fake-judge"

        def ask(self, questions, counts, key):
            assert len(questions) == 16 and "热线" in questions[0]  # the zh question about the zh message
            return ["YES", "no", "I am not sure", None] * 4

    monkeypatch.setattr(safety, "generate_replies", lambda *args, **kwargs: ["嗯。"] * 16)
    report = crisis_check(lm, GenerationConfig(max_new_tokens=2, do_sample=False), FakeJudge())
    assert report["method"] == "judge" and "fake-judge" in report["method_detail"]
    assert report["points_to_help"] == 4 and report["counts"]["unparseable"] == 4
    assert sum(v["undecided"] for v in report["by_category"].values()) == 8  # unparseable + not asked


def test_evaluate_crisis_check_end_to_end(trained_tiny_model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    argv = ["--model", str(trained_tiny_model_dir), "--data", str(SAMPLE), "--max-conversations", "1",
            "--max-new-tokens", "3", "--no-progress", "--skip-loss", "--crisis-check", "--out", str(out)]  # fmt: skip
    assert evaluate.main(argv) == 0
    report = json.loads(out.read_text(encoding="utf-8"))["crisis_check"]
    assert report["method"] == "keywords" and report["messages"] == len(report["results"]) == 16
    assert all(isinstance(r["reply"], str) and isinstance(r["points_to_help"], bool) for r in report["results"])
    assert "crisis check (keywords)" in capsys.readouterr().out


def test_empty_replies_are_undecided_and_said(lm, monkeypatch) -> None:
    # Empty replies answer nothing: never "0 of 16 point to help" as if 16 answers had ignored the crisis.
    replies = ["", "  \n", "请拨打热线。"] + [""] * 13
    monkeypatch.setattr(safety, "generate_replies", lambda *args, **kwargs: replies)
    report = crisis_check(lm, GenerationConfig(max_new_tokens=2, do_sample=False))
    assert report["empty_replies"] == 15 and report["counts"]["empty_replies"] == 15
    assert report["answered"] == 1 and report["points_to_help"] == 1
    assert sum(v["does_not"] for v in report["by_category"].values()) == 0
    assert sum(v["undecided"] for v in report["by_category"].values()) == 15
    table = safety.format_crisis_table(report)
    assert "15 of 16 messages got no reply to check (15 empty, 0 over the context)" in table


def test_judge_is_not_asked_about_empty_replies(lm, monkeypatch) -> None:
    class FakeJudge:
        class lm:
            path = "fake-judge"

        def ask(self, questions, counts, key):
            assert len(questions) == 8  # the eight non-empty replies only
            return ["no"] * len(questions)

    monkeypatch.setattr(safety, "generate_replies", lambda *args, **kwargs: ["", "嗯。"] * 8)
    report = crisis_check(lm, GenerationConfig(max_new_tokens=2, do_sample=False), FakeJudge())
    assert report["empty_replies"] == 8 and report["points_to_help"] == 0
    assert [r["points_to_help"] for r in report["results"]] == [None, False] * 8
