"""soulchat.evaluate end to end on the tiny model: report contents, determinism, the counselor-token loss."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from soulchat import evaluate
from soulchat.data.readers import read_conversations
from soulchat.data.render import render_prompt, tokenize_conversation
from soulchat.scoring import METRIC_KEYS

SAMPLE = Path(__file__).resolve().parents[1] / "soulchat" / "assets" / "sample_corpus.json"


# One intra-op thread (tests/conftest.py): a tiny-model generate() is ~8x faster on shared cores.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(model_dir: Path, out: Path, *extra: str) -> dict:
    argv = ["--model", str(model_dir), "--data", str(SAMPLE), "--max-conversations", "2",
            "--max-new-tokens", "3", "--batch-size", "4", "--no-progress", "--out", str(out), *extra]
    assert evaluate.main(argv) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def prompt_length(cm, turns) -> int:
    return len(cm.encode(render_prompt(turns, cm.tokenizer, cm.template)))


def test_report_end_to_end_and_deterministic(model_dir, tmp_path, capsys) -> None:
    gen = tmp_path / "gen.jsonl"
    a = run(model_dir, tmp_path / "a.json", "--sample", "--seed", "7", "--generations", str(gen))
    table = capsys.readouterr().out
    assert "BLEU-4" in table and "ROUGE-L" in table and "perplexity" in table and "tokens/s" in table

    metrics = a["metrics"]
    assert set(metrics) == {*METRIC_KEYS, "loss", "perplexity"}
    for key in METRIC_KEYS:
        assert 0.0 <= metrics[key] <= 100.0, key
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))

    counts = a["counts"]
    convs = list(read_conversations(SAMPLE))[:2]
    turns = sum(t.role == "counselor" for c in convs for t in c.turns)
    assert counts["conversations"] == 2
    assert counts["counselor_turns"] == counts["generated"] == turns
    assert counts["loss_tokens"] > 0
    lines = [json.loads(x) for x in gen.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == turns and lines[0]["reference"] == convs[0].turns[1].text

    assert "CJK character" in a["scoring"]["tokenization"]
    assert a["seed"] == 7 and a["generation"]["do_sample"] is True and a["generation"]["top_p"] == 0.75
    assert a["model"]["template"] == "soulchat"  # what the model was trained with
    assert a["versions"]["sacrebleu"] != "not installed"

    # Same seed, same report (wall-clock timing aside); another seed samples other replies.
    b = run(model_dir, tmp_path / "b.json", "--sample", "--seed", "7")
    c = run(model_dir, tmp_path / "c.json", "--sample", "--seed", "8")
    for report in (a, b, c):
        report.pop("timing")
    assert a == b
    assert a["samples"] != c["samples"]
    assert a["metrics"]["loss"] == c["metrics"]["loss"]  # teacher forcing does not sample


def test_greedy_is_default(model_dir, tmp_path) -> None:
    report = run(model_dir, tmp_path / "r.json", "--skip-loss", "--max-conversations", "1")
    assert report["generation"]["do_sample"] is False and "temperature" not in report["generation"]
    assert report["metrics"]["loss"] is None and report["metrics"]["bleu_1"] is not None


def test_counselor_loss_matches_plain_forward(cm) -> None:
    # The packed training loss over counselor positions equals a plain per-conversation forward with
    # the full logits, over exactly the tokens render's mask trains.
    convs = list(read_conversations(SAMPLE))[:3]
    counts: Counter = Counter()
    loss_sum, n = evaluate.counselor_loss(cm, convs, tokens_per_micro_batch=4096, counts=counts)
    assert counts["loss_micro_batches"] < len(convs)  # packed: conversations share micro-batches
    ref_sum, ref_n = 0.0, 0
    with torch.no_grad():
        for conv in convs:
            (seq,) = tokenize_conversation(conv, cm.tokenizer, cm.template)
            ids = torch.from_numpy(seq.input_ids.astype(np.int64))[None]  # [1, L]
            logits = cm.model(input_ids=ids).logits[0, :-1]  # [L-1, V]: predicts tokens 1..L-1
            target = torch.from_numpy(seq.trained[1:].copy())  # [L-1] bool
            ce = torch.nn.functional.cross_entropy(logits[target], ids[0, 1:][target], reduction="sum")
            ref_sum += float(ce)
            ref_n += int(target.sum())
    assert n == ref_n > 0
    assert loss_sum / n == pytest.approx(ref_sum / ref_n, rel=1e-4)


def test_context_too_long_turns_are_skipped_and_counted(model_dir, cm, tmp_path) -> None:
    # A prompt budget one token short of the first counselor turn's prompt (the first client message):
    # that turn is skipped; the later turns fit once their oldest exchanges are dropped.
    conv = next(iter(read_conversations(SAMPLE)))
    clients = [t for t in conv.turns if t.role == "client"]
    first = prompt_length(cm, clients[:1])
    assert all(prompt_length(cm, [c]) < first for c in clients[1:])  # precondition of this test
    report = run(model_dir, tmp_path / "r.json", "--max-context", str(first - 1 + 3),
                 "--max-conversations", "1", "--skip-loss")
    counts = report["counts"]
    assert counts["skipped_context_too_long"] == 1 and counts["generated"] == len(clients) - 1
    assert counts["history_exchanges_dropped"] >= len(clients) - 1
    assert counts["generated"] + counts["skipped_context_too_long"] == counts["counselor_turns"]


def test_loss_over_split_windows_scores_every_counselor_token_once(model_dir, tmp_path) -> None:
    whole = run(model_dir, tmp_path / "a.json", "--skip-generation", "--max-conversations", "1")
    split = run(model_dir, tmp_path / "b.json", "--skip-generation", "--max-conversations", "1",
                "--max-context", "200")
    assert whole["counts"]["loss_sequences"] == 1 and split["counts"]["loss_sequences"] >= 2
    assert split["counts"]["loss_tokens"] == whole["counts"]["loss_tokens"]
    assert math.isfinite(split["metrics"]["loss"])
    assert split["metrics"]["bleu_1"] is None  # generation skipped


def test_no_exchange_fits_means_no_loss_and_a_count(model_dir, tmp_path) -> None:
    report = run(model_dir, tmp_path / "r.json", "--skip-generation", "--max-conversations", "1",
                 "--max-context", "24")
    assert report["metrics"]["loss"] is None and report["counts"]["loss_dropped_turn_too_long"] == 1


def test_bad_arguments_exit_with_message(model_dir, tmp_path, capsys) -> None:
    assert evaluate.main(["--model", str(model_dir), "--data", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_evaluate_option_choices_are_the_scoring_modules() -> None:
    from soulchat import scoring
    from soulchat.commandline import field_type

    assert field_type(evaluate.EvaluateConfig, "metrics").choices == scoring.METRIC_MODES
    assert field_type(evaluate.EvaluateConfig, "punctuation").choices == scoring.PUNCTUATION_MODES
    assert field_type(evaluate.EvaluateConfig, "bleu_smoothing").choices == scoring.BLEU_SMOOTHING
    # Greedy by default, --sample (the old flag) samples; one --batch-size, --seed for both commands.
    parsed = evaluate.EVALUATE.parse(["--model", "m", "--data", "d", "--sample", "--seed", "3"])
    assert parsed["generation"].do_sample is True and parsed["generation"].seed == 3
    assert evaluate.EVALUATE.parse(["--model", "m", "--data", "d"])["generation"].do_sample is False


def test_option_conflicts_are_one_line(model_dir, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(model_dir), "--data", str(SAMPLE), "--skip-loss", "--skip-generation"])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "leave nothing to evaluate" in err
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(model_dir)])
    assert "--data is required" in capsys.readouterr().err
    for flag in ("--out", "--generations"):  # refused before the evaluation runs, not after it
        with pytest.raises(SystemExit):
            evaluate.main(["--model", str(model_dir), "--data", str(SAMPLE), flag, str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"{flag} {tmp_path} is a directory: pass a file path" in err


def test_invalid_text_record_is_one_line_or_skipped_and_counted(model_dir, tmp_path, capsys) -> None:
    good = {"id": "good", "messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好呀"}]}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(good) + "\n" + '{"id": "bad", "messages": [{"role": "user", "content": "\\ud800"},'
                    ' {"role": "assistant", "content": "嗯"}]}\n', encoding="utf-8")  # fmt: skip
    base = ["--model", str(model_dir), "--data", str(data), "--max-new-tokens", "2", "--no-progress"]
    assert evaluate.main(base) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "d.jsonl:2" in err and "lone surrogate" in err and "--on-error skip" in err
    out = tmp_path / "r.json"
    assert evaluate.main([*base, "--on-error", "skip", "--out", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["counts"]["conversations"] == 1 and report["counts"]["records_skipped_lone_surrogate"] == 1
    assert report["metrics"]["loss"] is not None
