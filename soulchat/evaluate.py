"""Score a counselor model on held-out conversations: ``python -m soulchat.evaluate --model DIR --data PATH``.

Two measurements, both on every counselor turn of the conversations read:

1. Generation (the paper's automatic metrics). For each counselor turn, a reply is generated from the
   turns before it (rendered exactly as in training by soulchat.data.render.render_prompt; the oldest
   exchanges are dropped when the context does not fit) and scored against the reference reply with
   BLEU-1..4 and ROUGE-1/2/L. Decoding is greedy by default so the scores are reproducible; --sample
   samples with the paper's settings (temperature 0.95, top-p 0.75) from --seed. Replies are generated in
   batches with left padding.
2. Teacher forcing, no generation: the mean cross-entropy of the counselor tokens (content and
   end-of-turn marker, exactly the tokens training puts the loss on, from
   soulchat.data.render.tokenize_conversation's mask) and its perplexity exp(loss).

Scoring tokenization (see soulchat.metrics): text is NFKC-normalised and lower-cased; every Chinese
(CJK) character is one token; other text is split into words at whitespace and punctuation;
punctuation/symbols are dropped (--punctuation keep makes each one a token). BLEU-n is sacrebleu's
corpus-level cumulative BLEU over those tokens, without smoothing; ROUGE is rouge-score's per-reply F1
with those tokens, averaged. All scores are on a 0-100 scale.

The report (--out, JSON) holds the metrics, counts, the tokenization, model, data, seed, decoding
options and library versions; a short table is printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soulchat.chat import (
    ChatModel,
    ContextTooLong,
    add_model_arguments,
    add_sampling_arguments,
    check_no_control_tokens,
    fit_context,
    generate_replies,
    load_from_args,
    options_from_args,
)
from soulchat.data.conversation import Conversation, DataError
from soulchat.data.render import TemplateError, tokenize_conversation
from soulchat.metrics import BLEU_SMOOTHING, METRIC_KEYS, PUNCTUATION_MODES, reply_scores, scoring_description

REPORT_METRICS = (*METRIC_KEYS, "loss", "perplexity")


# ==================================================================================================
# Generation and scoring
# ==================================================================================================


@dataclass
class Example:
    conversation: str  # conversation id
    turn: int  # index of the counselor turn in the conversation's turns
    prompt: list[int]  # prompt token ids (context that fits the window)
    reference: str
    last_client: str
    dropped_exchanges: int


def build_examples(
    cm: ChatModel, conversations: Sequence[Conversation], max_new_tokens: int, counts: Counter
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
                check_no_control_tokens(cm, conv.turns[: i + 1], where)
            except ValueError:
                counts["skipped_control_token"] += 1  # training drops such conversations too
                continue
            try:
                prompt, dropped = fit_context(cm, context, max_new_tokens, f"{where} turn {i}")
            except ContextTooLong:
                counts["skipped_context_too_long"] += 1
                continue
            counts["history_exchanges_dropped"] += dropped
            examples.append(Example(conv.id, i, prompt, turn.text, context[-1].text, dropped))
    return examples


# ==================================================================================================
# Teacher-forced loss on counselor tokens
# ==================================================================================================


@torch.no_grad()
def counselor_loss(
    cm: ChatModel, conversations: Sequence[Conversation], batch_size: int, counts: Counter, progress: bool
) -> tuple[float, int]:
    """(sum of cross-entropy over trained counselor tokens, number of those tokens).

    Each conversation is tokenized exactly as for training (same template and mask); conversations
    longer than the context window are split into windows at turn boundaries, each counselor turn
    scored once. Only the hidden states of scored positions go through the lm head.
    """
    from tqdm import tqdm

    from soulchat.model import backbone

    stats: Counter = Counter()
    sequences = []
    for conv in conversations:
        sequences += tokenize_conversation(
            conv, cm.tokenizer, cm.template, cm.context_window, "split", "token", stats
        )
    counts["loss_sequences"] = len(sequences)
    for key, value in stats.items():
        if key.startswith("dropped:"):
            counts[f"loss_{key.replace(':', '_')}"] = value
    model = cm.model
    body = backbone(model)
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    device = cm.device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].input_ids))
    loss_sum, n_tokens = 0.0, 0
    bar = tqdm(
        total=len(order), desc="loss", unit="seq", file=sys.stderr, disable=not progress, dynamic_ncols=True
    )
    for start in range(0, len(order), batch_size):
        batch = [sequences[i] for i in order[start : start + batch_size]]
        width = max(len(s.input_ids) for s in batch)
        # ids/mask: [B, L], right padding; target[b, j] = ids[b, j + 1] where that token is trained.
        ids = np.full((len(batch), width), cm.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        scored = np.zeros((len(batch), width), dtype=bool)
        for row, seq in enumerate(batch):
            n = len(seq.input_ids)
            ids[row, :n] = seq.input_ids
            mask[row, :n] = 1
            scored[row, : n - 1] = seq.trained[1:]
        rows, cols = np.nonzero(scored)
        if len(rows) == 0:
            bar.update(len(batch))
            continue
        ids_t = torch.from_numpy(ids).to(device)
        hidden = body(
            input_ids=ids_t, attention_mask=torch.from_numpy(mask).to(device), use_cache=False
        ).last_hidden_state
        rows_t, cols_t = torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)
        picked = hidden[rows_t, cols_t]  # [N, H]
        logits = head(picked).float()  # [N, V]
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        targets = ids_t[rows_t, cols_t + 1]  # [N]
        loss_sum += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        n_tokens += len(rows)
        bar.update(len(batch))
    bar.close()
    return loss_sum, n_tokens


# ==================================================================================================
# The run
# ==================================================================================================


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("soulchat", "torch", "transformers", "tokenizers", "sacrebleu", "rouge-score", "numpy"):
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
    conversations = list(itertools.islice(stream, max_conversations))
    counts["conversations"] = len(conversations)
    for reason, n in dropped.items():
        counts[f"records_skipped_{reason}"] = n
    return conversations


def run_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `main` does except printing; returns the report."""
    t_start = time.perf_counter()
    options = options_from_args(args, do_sample=args.sample)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_conversations is not None and args.max_conversations < 1:
        raise ValueError(f"--max-conversations must be >= 1, got {args.max_conversations}")
    for path in args.data:
        if not Path(path).exists():
            raise FileNotFoundError(f"--data {path}: no such file or directory")
    cm = load_from_args(args)
    counts: Counter = Counter()
    conversations = read_eval_conversations(
        args.data, args.format, args.on_error, args.max_conversations, counts
    )
    if not conversations:
        raise DataError(
            f"--data {' '.join(args.data)}: no conversations to evaluate", reason="no_conversations"
        )

    metrics: dict[str, float | None] = dict.fromkeys(REPORT_METRICS)
    samples: list[dict[str, Any]] = []
    timing: dict[str, float] = {}

    # ---- generation + BLEU/ROUGE -------------------------------------------------------------------
    if not args.skip_generation:
        t0 = time.perf_counter()
        examples = build_examples(cm, conversations, options.max_new_tokens, counts)
        from tqdm import tqdm

        bar = tqdm(
            total=len(examples),
            desc="generate",
            unit="reply",
            file=sys.stderr,
            disable=not args.progress,
            dynamic_ncols=True,
        )
        torch.manual_seed(args.seed)
        replies = generate_replies(cm, [e.prompt for e in examples], options, args.batch_size, bar.update)
        bar.close()
        counts["generated"] = len(replies)
        counts["empty_replies"] = sum(1 for r in replies if not r.strip())
        if replies:
            metrics.update(
                reply_scores(replies, [e.reference for e in examples], args.punctuation, args.bleu_smoothing)
            )
        records = [
            {
                "id": e.conversation,
                "turn": e.turn,
                "client": e.last_client,
                "reference": e.reference,
                "reply": r,
                "dropped_exchanges": e.dropped_exchanges,
            }
            for e, r in zip(examples, replies)
        ]
        samples = records[: args.samples]
        if args.generations:
            with open(args.generations, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
        timing["generation_s"] = time.perf_counter() - t0

    # ---- teacher-forced loss -----------------------------------------------------------------------
    if not args.skip_loss:
        t0 = time.perf_counter()
        loss_sum, n_tokens = counselor_loss(cm, conversations, args.batch_size, counts, args.progress)
        counts["loss_tokens"] = n_tokens
        if n_tokens:
            metrics["loss"] = loss_sum / n_tokens
            metrics["perplexity"] = math.exp(min(metrics["loss"], 700.0))
        timing["loss_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - t_start

    return {
        "metrics": metrics,
        "counts": dict(sorted(counts.items())),
        "scoring": scoring_description(args.punctuation, args.bleu_smoothing),
        "loss": "mean cross-entropy (nats) per counselor token under teacher forcing: the tokens trained "
        "on (counselor content + end-of-turn marker), each weighted 1; perplexity = exp(loss)",
        "model": {
            "path": cm.path,
            "type": getattr(cm.model.config, "model_type", None),
            "parameters": sum(p.numel() for p in cm.model.parameters()),
            "dtype": str(next(cm.model.parameters()).dtype).removeprefix("torch."),
            "device": cm.device.type,
            "template": cm.template,
            "template_source": cm.template_source,
            "context_window": cm.context_window,
        },
        "data": {
            "paths": [str(p) for p in args.data],
            "format": args.format,
            "max_conversations": args.max_conversations,
            "on_error": args.on_error,
        },
        "generation": {**options.describe(), "batch_size": args.batch_size, "skipped": args.skip_generation},
        "seed": args.seed,
        "versions": _versions(),
        "samples": samples,
        "timing": timing,  # wall-clock seconds: the only part of the report that differs between runs
    }


def format_table(report: dict[str, Any]) -> str:
    m, c = report["metrics"], report["counts"]
    names = {
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
    lines = [
        f"model  {report['model']['path']} (template {report['model']['template']})",
        (
            f"data   {c.get('conversations', 0)} conversations, {c.get('counselor_turns', 0)} counselor "
            f"turns, {c.get('generated', 0)} replies generated, {c.get('loss_tokens', 0)} counselor tokens "
            "scored"
        ),
        "",
        f"{'metric':<12}{'value':>10}",
    ]
    for key, label in names.items():
        value = m.get(key)
        lines.append(
            f"{label:<12}{'n/a' if value is None else format(value, '.4f' if key == 'loss' else '.2f'):>10}"
        )
    return "\n".join(lines)


# ==================================================================================================
# Command line
# ==================================================================================================


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m soulchat.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help="held-out conversation files or directories (any supported format)",
    )
    parser.add_argument(
        "--format",
        default="auto",
        help="input format: auto, soulchat, openai, sharegpt, smile, cpsycound or xtuner "
        "(default: detected per file)",
    )
    parser.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="a malformed record stops the run (raise) or is skipped and counted (skip)",
    )
    parser.add_argument(
        "--max-conversations",
        type=int,
        default=None,
        metavar="N",
        help="evaluate only the first N conversations (default: all)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="replies generated (and sequences scored) together (default: %(default)s)",
    )
    parser.add_argument(
        "--sample",
        action="store_true",
        help="sample replies (temperature/top-p/top-k below, from --seed) instead of greedy decoding",
    )
    add_sampling_arguments(parser)
    parser.add_argument(
        "--punctuation",
        choices=PUNCTUATION_MODES,
        default="drop",
        help="punctuation/symbols when scoring: drop them, or keep each as a token (default: %(default)s)",
    )
    parser.add_argument(
        "--bleu-smoothing",
        choices=BLEU_SMOOTHING,
        default="none",
        help="sacrebleu smoothing method for BLEU (default: %(default)s)",
    )
    parser.add_argument("--skip-generation", action="store_true", help="only the teacher-forced loss")
    parser.add_argument("--skip-loss", action="store_true", help="only the generation metrics")
    parser.add_argument(
        "--samples",
        type=int,
        default=5,
        help="generated replies copied into the report as examples (default: %(default)s)",
    )
    parser.add_argument(
        "--generations",
        default=None,
        metavar="FILE",
        help="also write every generated reply with its reference to FILE (JSONL)",
    )
    parser.add_argument("--out", default=None, metavar="FILE", help="write the JSON report here")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        if args.skip_generation and args.skip_loss:
            raise ValueError("--skip-generation and --skip-loss together leave nothing to evaluate")
        report = run_evaluation(args)
    except (DataError, TemplateError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(format_table(report))
    if args.out:
        print(f"report {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
