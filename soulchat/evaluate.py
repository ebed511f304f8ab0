"""Score a counselor model on held-out conversations: ``python -m soulchat.evaluate --model DIR --data PATH``.

Measurements, on every counselor turn of the conversations read:

1. Generation (the paper's automatic metrics). For each counselor turn, a reply is generated from the
   turns before it (rendered exactly as in training; the oldest exchanges are dropped when the context
   does not fit: soulchat.inference) and scored against the reference reply with BLEU and ROUGE-1/2/L in
   the ``--metrics`` mode (soulchat.scoring: ``soulchat-char``, the default, ``chatglm`` or
   ``jieba-bleu``). Decoding is greedy by default so the scores are reproducible; --sample samples with
   the paper's settings (temperature 0.95, top-p 0.75) from --seed. Replies are generated in batches of
   prompts of similar length (``--backend hf``), or by vLLM (``--backend vllm``, when installed); the
   report records the new tokens and tokens/s.
2. Teacher forcing, no generation: the mean cross-entropy of the counselor tokens (content and
   end-of-turn marker, exactly the tokens training puts the loss on) computed by the training loss itself
   (``soulchat.model.PackedCausalLM`` on packed micro-batches) and its perplexity (``soulchat.runlog.
   perplexity``, the trainer's).
3. Optional, ``--judge DIR``: every generated reply scored 1-5 on the paper's human-evaluation dimensions
   (Content, Empathy, Helpfulness, Safety) by a local causal LM through a fixed rubric (soulchat.judge),
   with a per-topic breakdown. Optional, ``--crisis-check``: replies to a bundled set of crisis messages,
   checked for pointing to human help (soulchat.safety). Neither is clinical validation.

The report (--out, JSON) holds the metrics, counts, the metric mode and tokenization, model, data, seed,
decoding options, judge and rubric, and library versions; a short table is printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from soulchat.cli import exit_on_option_error, require_output_file, run_cli
from soulchat.commandline import Command, ConfigError, Section, check_types, option
from soulchat.data.conversation import Conversation, DataError
from soulchat.data.render import thinking_value, tokenize_conversation
from soulchat.inference import (
    MODEL_SECTION,
    ON_ERROR_HELP,
    ContextTooLong,
    InferenceConfig,
    LoadedModel,
    VllmGenerator,
    check_no_control_tokens,
    check_text,
    describe_generation,
    fit_context,
    generate_replies,
    load_from_options,
    packed_loss,
)
from soulchat.options import DataConfig, GenerationConfig, TrainConfig
from soulchat.scoring import DEFAULT_METRIC_MODE, METRIC_KEYS, mode_description, score_replies

REPORT_METRICS = (*METRIC_KEYS, "loss", "perplexity")
# Packed micro-batch for the loss: 4096 tokens hold a few SoulChatCorpus conversations (~600 tokens each
# with a Qwen2 tokenizer) and keep the activations of a 7B model well under 1 GiB per layer in bf16.
DEFAULT_TOKENS_PER_MICRO_BATCH = 4096


@dataclass
class EvaluateConfig:
    """What ``python -m soulchat.evaluate`` alone needs: which measurements, how scored, where written."""

    section: ClassVar[str] = "evaluate"

    max_conversations: int | None = option("evaluate only the first N conversations; unset = all", None)
    metrics: Literal["soulchat-char", "chatglm", "jieba-bleu"] = option(
        "how BLEU/ROUGE tokenize and average: soulchat-char (CJK characters and words, corpus BLEU-1..4), "
        "chatglm (jieba-word ROUGE, character BLEU-4 with nltk method3, as ChatGLM-6B and LLaMA-Factory), "
        "jieba-bleu (jieba-word BLEU-1..4, as EmoLLM)",
        DEFAULT_METRIC_MODE,
    )
    punctuation: Literal["drop", "keep"] = option(
        "--metrics soulchat-char: punctuation/symbols dropped, or kept as tokens", "drop"
    )
    bleu_smoothing: Literal["none", "exp", "floor", "add-k"] = option(
        "--metrics soulchat-char: sacrebleu smoothing method for BLEU", "none"
    )
    backend: Literal["hf", "vllm"] = option(
        "generation backend: hf (transformers generate, prompts batched by length) or vllm (needs the vllm "
        "package and a GPU)",
        "hf",
    )
    judge: str | None = option(
        "also score every reply 1-5 on Content, Empathy, Helpfulness and Safety with the local causal LM in "
        "this directory (soulchat.judge; never downloaded)",
        None,
    )
    judge_language: Literal["auto", "zh", "en"] = option(
        "rubric language: auto = zh when the client's message has CJK characters", "auto"
    )
    crisis_check: bool = option(
        "also answer the bundled crisis messages and report whether each reply points to human help (by "
        "--judge when given, else keyword rules; not clinical validation)",
        False,
    )
    skip_generation: bool = option("only the teacher-forced loss", False)
    skip_loss: bool = option("only the generation metrics", False)
    samples: int = option("generated replies copied into the report as examples", 5)
    generations: str | None = option(
        "also write every generated reply with its reference (and judge answer) to this JSONL file", None
    )
    out: str | None = option("write the JSON report here", None)

    def __post_init__(self) -> None:
        check_types(self)
        if self.max_conversations is not None and self.max_conversations < 1:
            raise ConfigError(f"--max-conversations must be >= 1, got {self.max_conversations}")
        if self.samples < 0:
            raise ConfigError(f"--samples must be >= 0, got {self.samples}")
        if self.skip_generation and self.skip_loss:
            raise ConfigError("--skip-generation and --skip-loss together leave nothing to evaluate")
        if self.skip_generation and (self.judge or self.crisis_check):
            raise ConfigError("--judge and --crisis-check score generated replies: drop --skip-generation")
        require_output_file(self.generations, "--generations", "generations.jsonl")
        require_output_file(self.out, "--out", "report.json")


EVALUATE = Command(
    "python -m soulchat.evaluate",
    __doc__,
    [
        MODEL_SECTION,
        InferenceConfig,
        Section(TrainConfig, only=("device", "tokens_per_micro_batch", "progress"),
                defaults={"tokens_per_micro_batch": DEFAULT_TOKENS_PER_MICRO_BATCH},
                help={"device": "where to generate and score: auto = CUDA when available",
                      "tokens_per_micro_batch": "tokens per packed micro-batch of the counselor-token loss"}),
        Section(GenerationConfig, defaults={"do_sample": False}, aliases={"do_sample": (("--sample", True),)}),
        Section(DataConfig, only=("data", "format", "on_error"), required=("data",),
                help={"on_error": ON_ERROR_HELP}),
        EvaluateConfig,
    ],
)  # fmt: skip


# ==================================================================================================
# Generation
# ==================================================================================================


@dataclass
class Example:
    conversation: str  # conversation id
    turn: int  # index of the counselor turn in the conversation's turns
    prompt: list[int]  # prompt token ids (context that fits the window)
    reference: str
    last_client: str
    dropped_exchanges: int
    topic: str | None = None


def build_examples(
    lm: LoadedModel, conversations: Sequence[Conversation], max_new_tokens: int, counts: Counter
) -> list[Example]:
    """One example per counselor turn: its preceding context as a prompt, its text as the reference."""
    examples = []
    for conv in conversations:
        where = conv.source or conv.id
        for i, turn in enumerate(conv.turns):
            if turn.role != "counselor":
                continue
            counts["counselor_turns"] += 1
            context = conv.turns[:i]
            try:
                check_no_control_tokens(lm, conv.turns[: i + 1], where)
            except ValueError:
                counts["skipped_control_token"] += 1  # training drops such conversations too
                continue
            try:
                prompt, dropped = fit_context(lm, context, max_new_tokens, f"{where} turn {i}")
            except ContextTooLong:
                counts["skipped_context_too_long"] += 1
                continue
            counts["history_exchanges_dropped"] += dropped
            examples.append(Example(conv.id, i, prompt, turn.text, context[-1].text, dropped, conv.topic))
    return examples


def generate_for_evaluation(
    lm: LoadedModel, prompts: list[list[int]], gen: GenerationConfig, backend: str, progress: bool,
    counts: Counter,
) -> tuple[list[str], float]:  # fmt: skip
    """(replies, seconds) by the chosen backend; counts["generated_tokens"] adds up the new tokens."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    torch.manual_seed(gen.seed)
    if backend == "vllm":
        replies = VllmGenerator(lm, gen.seed).generate(prompts, gen, counts)
    else:
        with tqdm(total=len(prompts), desc="generate", unit="reply", file=sys.stderr, disable=not progress,
                  dynamic_ncols=True) as bar:  # fmt: skip
            replies = generate_replies(lm, prompts, gen, gen.batch_size, bar.update, counts)
    return replies, time.perf_counter() - t0


# ==================================================================================================
# Teacher-forced loss on counselor tokens
# ==================================================================================================


def counselor_loss(
    lm: LoadedModel,
    conversations: Sequence[Conversation],
    tokens_per_micro_batch: int,
    counts: Counter,
    progress: bool = False,
) -> tuple[float, int]:
    """(sum of cross-entropy over trained counselor tokens, number of those tokens).

    Each conversation is tokenized exactly as for training (same template and mask); conversations
    longer than the context window are split into windows at turn boundaries, each counselor turn
    scored once; the windows are packed and scored by the training loss (soulchat.inference.packed_loss).
    """
    from tqdm import tqdm

    stats: Counter = Counter()
    sequences = []
    for conv in conversations:
        sequences += tokenize_conversation(
            conv, lm.tokenizer, lm.template, lm.context_window, "split", "token", stats,
            thinking=thinking_value(lm.thinking),
        )
    counts["loss_sequences"] = len(sequences)
    for key, value in stats.items():
        if key.startswith("dropped:"):
            counts[f"loss_{key.replace(':', '_')}"] = value
    with tqdm(total=len(sequences), desc="loss", unit="seq", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:  # fmt: skip
        loss_sum, n_tokens, batches = packed_loss(lm, sequences, tokens_per_micro_batch, bar.update)
    counts["loss_micro_batches"] = batches
    return loss_sum, n_tokens


# ==================================================================================================
# The run
# ==================================================================================================


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    packages = ("soulchat", "torch", "transformers", "tokenizers", "sacrebleu", "rouge-score", "numpy",
                "nltk", "jieba", "rouge-chinese", "vllm")  # fmt: skip
    for package in packages:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def read_eval_conversations(
    paths: Sequence[str], fmt: str, on_error: str, max_conversations: int | None, counts: Counter
) -> list[Conversation]:
    from soulchat.data.readers import read_conversations

    dropped: Counter = Counter()
    stream = read_conversations(list(paths), fmt=fmt, on_error=on_error, counter=dropped)
    conversations = []
    for conv in itertools.islice(stream, max_conversations):
        try:
            check_text(conv.turns, conv.source or conv.id)  # a lone surrogate escape cannot be tokenized
        except ValueError as err:
            if on_error == "raise":
                raise DataError(f"{err} (or pass --on-error skip)", reason="invalid_text") from None
            dropped["invalid_text"] += 1
            continue
        conversations.append(conv)
    counts["conversations"] = len(conversations)
    for reason, n in dropped.items():
        counts[f"records_skipped_{reason}"] = n
    return conversations


def check_data_paths(data: DataConfig) -> None:
    for path in data.data:
        if not Path(path).exists():
            raise FileNotFoundError(f"--data {path}: no such file or directory")


def run_evaluation(options: dict[str, Any]) -> dict[str, Any]:
    """Everything `main` does except printing; ``options``: the parsed EVALUATE sections. The report."""
    from soulchat.runlog import perplexity

    t_start = time.perf_counter()
    gen: GenerationConfig = options["generation"]
    data: DataConfig = options["data"]
    cfg: EvaluateConfig = options["evaluate"]
    progress = options["train"].progress
    check_data_paths(data)
    lm = load_from_options(options)
    counts: Counter = Counter()
    conversations = read_eval_conversations(
        data.data, data.format, data.on_error, cfg.max_conversations, counts
    )
    if not conversations:
        raise DataError(
            f"--data {' '.join(data.data)}: no conversations to evaluate", reason="no_conversations"
        )

    metrics: dict[str, float | None] = dict.fromkeys(REPORT_METRICS)
    samples: list[dict[str, Any]] = []
    timing: dict[str, float] = {}
    extra: dict[str, Any] = {}

    # ---- generation + BLEU/ROUGE, judge, crisis check ------------------------------------------------
    if not cfg.skip_generation:
        t0 = time.perf_counter()
        examples = build_examples(lm, conversations, gen.max_new_tokens, counts)
        replies, seconds = generate_for_evaluation(
            lm, [e.prompt for e in examples], gen, cfg.backend, progress, counts
        )
        counts["generated"] = len(replies)
        counts["empty_replies"] = sum(1 for r in replies if not r.strip())
        timing["generate_s"] = seconds
        timing["tokens_per_s"] = counts["generated_tokens"] / seconds if seconds > 0 else 0.0
        if replies:
            references = [e.reference for e in examples]
            metrics.update(
                score_replies(replies, references, cfg.metrics, cfg.punctuation, cfg.bleu_smoothing)
            )
        records = [
            {"id": e.conversation, "turn": e.turn, "topic": e.topic, "client": e.last_client,
             "reference": e.reference, "reply": r, "dropped_exchanges": e.dropped_exchanges}
            for e, r in zip(examples, replies)
        ]  # fmt: skip
        judge = None
        if cfg.judge:
            from soulchat.judge import Judge

            judge = Judge.load(cfg.judge, options)
            extra["judge"] = judge.evaluate(records, counts)
        if cfg.crisis_check:
            from soulchat.safety import crisis_check

            extra["crisis_check"] = crisis_check(lm, gen, judge)
        samples = records[: cfg.samples]
        if cfg.generations:
            with open(cfg.generations, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
        timing["generation_s"] = time.perf_counter() - t0

    # ---- teacher-forced loss -----------------------------------------------------------------------
    if not cfg.skip_loss:
        t0 = time.perf_counter()
        tokens_per_micro_batch = options["train"].tokens_per_micro_batch
        loss_sum, n_tokens = counselor_loss(lm, conversations, tokens_per_micro_batch, counts, progress)
        counts["loss_tokens"] = n_tokens
        if n_tokens:
            metrics["loss"] = loss_sum / n_tokens
            metrics["perplexity"] = perplexity(metrics["loss"])
        timing["loss_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - t_start

    return {
        "metrics": metrics,
        "counts": dict(sorted(counts.items())),
        "scoring": mode_description(cfg.metrics, cfg.punctuation, cfg.bleu_smoothing),
        "loss": "mean cross-entropy (nats) per counselor token under teacher forcing, computed by the "
        "training loss (PackedCausalLM on packed micro-batches): the tokens trained on (counselor content "
        "+ end-of-turn marker), each weighted 1; perplexity = exp(min(loss, 50)), as in training",
        "model": lm.describe(),
        "data": {
            "paths": [str(p) for p in data.data],
            "format": data.format,
            "max_conversations": cfg.max_conversations,
            "on_error": data.on_error,
        },
        "generation": {
            **describe_generation(gen),
            "backend": cfg.backend,
            "batch_size": gen.batch_size,
            "skipped": cfg.skip_generation,
        },
        **extra,
        "seed": gen.seed,
        "versions": _versions(),
        "samples": samples,
        "timing": timing,  # wall-clock seconds and tokens/s: the only part of the report that differs between runs
    }


METRIC_LABELS = {
    "bleu_1": "BLEU-1",
    "bleu_2": "BLEU-2",
    "bleu_3": "BLEU-3",
    "bleu_4": "BLEU-4",
    "rouge_1": "ROUGE-1",
    "rouge_2": "ROUGE-2",
    "rouge_l": "ROUGE-L",
    "loss": "loss",
    "perplexity": "perplexity",
}


def format_table(report: dict[str, Any]) -> str:
    m, c = report["metrics"], report["counts"]
    lines = [
        f"model  {report['model']['path']} (template {report['model']['template']})",
        (
            f"data   {c.get('conversations', 0)} conversations, {c.get('counselor_turns', 0)} counselor "
            f"turns, {c.get('generated', 0)} replies generated, {c.get('loss_tokens', 0)} counselor tokens "
            "scored"
        ),
        f"scoring --metrics {report['scoring']['mode']}",
        "",
        f"{'metric':<12}{'value':>10}",
    ]
    if "tokens_per_s" in report["timing"]:
        speed = f"speed  {c.get('generated_tokens', 0)} new tokens, {report['timing']['tokens_per_s']:.1f} tokens/s"
        lines.insert(3, f"{speed} (--backend {report['generation']['backend']})")
    for key, label in METRIC_LABELS.items():
        value = m.get(key)
        lines.append(
            f"{label:<12}{'n/a' if value is None else format(value, '.4f' if key == 'loss' else '.2f'):>10}"
        )
    if "judge" in report:
        from soulchat.judge import format_judge_table

        lines += ["", format_judge_table(report["judge"])]
    if "crisis_check" in report:
        from soulchat.safety import format_crisis_table

        lines += ["", format_crisis_table(report["crisis_check"])]
    return "\n".join(lines)


# ==================================================================================================
# Command line
# ==================================================================================================


def build_parser() -> argparse.ArgumentParser:
    return EVALUATE.parser()


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, or 2 after one line on stderr (--debug shows the traceback)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    options = exit_on_option_error(lambda: EVALUATE.parse(argv), argv)
    if not options["train"].progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    report = run_evaluation(options)
    out = options["evaluate"].out
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(format_table(report))
    if out:
        print(f"report {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
