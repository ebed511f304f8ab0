"""Build a SoulChat-style corpus: ``python -m soulchat.data construct --data QA --model M --out FILE``.

Each single-turn counseling record (a client's question, a counselor's answer, optionally a topic and an
id) is rewritten by a generator into a multi-turn empathetic dialogue, checked, and appended to ``--out``
as one SoulChatCorpus record per line, which ``python -m soulchat.data prepare`` reads as is::

    {"id": "<source id>", "topic": "婚恋", "messages": [{"role": "user", ...}, {"role": "assistant", ...}],
     "source_id": "<source id>", "prompt_version": "soulchat-construct-1@<sha>", "generator": "hf:<model>",
     "language": "zh", "attempts": 1}

- Input: JSON arrays, JSONL or parquet/arrow files of Q&A records (soulchat.data.readers' streaming
  readers), fields ``question``, ``answer``, ``topic``, ``id`` or others named by ``--columns
  question=title,answer=answer_text,topic=category,id=qid``. A record without an id gets
  ``<file name>:<index>``. Ids must be unique: resuming relies on them.
- Generators: ``--model DIR`` alone, a local Hugging Face model through soulchat.inference (prompts
  batched, ``--backend vllm`` where installed); with ``--endpoint URL``, any OpenAI-compatible server
  (soulchat.endpoint: ``--model`` is then the served model's name, the key comes from the variable named
  by ``--api-key-env``, ``--concurrency`` requests at a time, ``--timeout``, ``--request-retries`` with
  backoff).
- Prompts: soulchat.data.construct_prompts (versioned, zh/en by ``--language``, ``--prompt FILE``,
  ``--few-shot`` examples from the bundled corpus).
- Checks: soulchat.data.construct_screen. A generation that fails one (or was cut at
  ``--max-new-tokens``) is generated again, up to ``--retries`` more times with a new seed; the record
  is then rejected with the reason of its last attempt. Duplicates and near duplicates of dialogues
  already written are rejected without a retry (the source repeats an earlier one).
- Accounting: every record read ends in exactly one of ``--out`` (written) and ``<out>.rejected.jsonl``
  (rejected, with the reason, the detail and the last generation, for review). The report
  (``<out>.report.json`` unless ``--report``) holds this run's counts, with read = already done +
  written + rejected checked, the rejections by reason, and the totals of both files.
- Faults: records are appended and flushed one line at a time. A rerun with the same input resumes:
  records whose source id is in either file are skipped, a last line cut by a kill (no newline) is
  dropped and its record done again, so nothing is duplicated and nothing is left out. One run at a time
  per ``--out`` (a lock file). When ``DOWN_AFTER`` (8) records in a row get no answer from the
  endpoint, the run stops with one line and leaves them for the rerun. With sampling, a record generated after a resume may differ from what an
  uninterrupted run would have written (its batch differs); the set of records does not.

This module runs it (``run_construct``, ``main``); the options are in construct_options, the input in
construct_sources, the generators and the retries of failed checks in construct_generation, the output
files with resuming and duplicates in construct_output.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from soulchat.commandline import ConfigError
from soulchat.data.construct_generation import (
    Attempted,
    EndpointGenerator,
    LocalGenerator,
    Request,
    attempt_all,
)
from soulchat.data.construct_options import ConstructConfig, construct_command
from soulchat.data.construct_output import Output
from soulchat.data.construct_prompts import (
    FewShot,
    PromptSet,
    build_prompt,
    derive_seed,
    language_of,
    load_prompts,
)
from soulchat.data.construct_sources import BadSource, Source, read_sources
from soulchat.options import DataConfig, GenerationConfig

# Reasons a record gets no answer at all (soulchat.endpoint.ChatClient, after its request retries).
TRANSPORT_FAILURES = frozenset({"request_timeout", "connection_error", "server_error", "rate_limited", "bad_response"})
# That many records in a row without an answer stop the run, unmarked, rather than reject a whole
# corpus while a server is down; fewer are rejected and counted (an isolated timeout, a bad answer).
DOWN_AFTER = 8


def run_construct(options: dict[str, Any]) -> dict[str, Any]:
    """Everything ``construct`` does except printing; ``options``: the parsed sections. The report."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    cfg: ConstructConfig = options["construct"]
    data: DataConfig = options["data"]
    gen: GenerationConfig = options["generation"]
    if cfg.endpoint is not None and options["evaluate"].backend != "hf":
        raise ConfigError("--backend vllm generates with a local model: drop it with --endpoint")
    prompts = load_prompts(cfg.prompt)
    if cfg.language != "auto":
        prompts.for_language(cfg.language, "--language")
    elif set(prompts.languages) != {"zh", "en"}:
        raise ValueError(f"--prompt {prompts.path} has only {sorted(prompts.languages)} prompts: pass --language "
                         f"{next(iter(prompts.languages))}")  # fmt: skip
    fewshot = FewShot() if cfg.few_shot else None
    counts: Counter = Counter(dict.fromkeys(("read", "already_done", "written", "rejected", "attempts", "retries"), 0))
    # First pass: check the whole input before anything is loaded or written (a bad record under
    # --on-error raise stops here), and collect the ids to count the work.
    ids = []
    for item in read_sources(data.data, data.columns, cfg.limit):
        if isinstance(item, BadSource) and data.on_error == "raise":
            raise ValueError(item.message + " (or pass --on-error skip: bad records are rejected and counted)")
        ids.append(item.id)
    generator = EndpointGenerator(options) if cfg.endpoint is not None else LocalGenerator(options)
    try:
        out = Output(Path(cfg.out), cfg.near_dup_threshold, counts)
    except BaseException:
        generator.close()
        raise
    try:
        todo = sum(i not in out.done for i in ids)
        del ids
        try:
            with tqdm(total=todo, desc="construct", unit="dialogue", file=sys.stderr, dynamic_ncols=True,
                      disable=not options["train"].progress) as bar:  # fmt: skip
                chunk: list[Source] = []

                def flush() -> None:
                    _run_chunk(chunk, generator, prompts, fewshot, cfg, gen.seed, out, counts)
                    bar.update(len(chunk))
                    bar.set_postfix(written=counts["written"], rejected=counts["rejected"], refresh=False)
                    chunk.clear()

                for item in read_sources(data.data, data.columns, cfg.limit):
                    counts["read"] += 1
                    if item.id in out.done:
                        counts["already_done"] += 1
                        continue
                    if isinstance(item, BadSource):
                        out.reject(item.id, item.reason, item.message)
                        counts["rejected"] += 1
                        counts[f"rejected:{item.reason}"] += 1
                        bar.update(1)
                        continue
                    chunk.append(item)
                    if len(chunk) >= generator.chunk:
                        flush()
                if chunk:
                    flush()
                _release_held(out, counts)
        finally:
            generator.close()
    finally:
        out.close()
    if counts["read"] != counts["already_done"] + counts["written"] + counts["rejected"]:
        raise RuntimeError(f"construct accounting does not add up: {dict(counts)}")  # a bug, never data
    seconds = time.perf_counter() - t0
    produced = counts["written"] + counts["rejected"]
    return {
        "counts": {k: v for k, v in sorted(counts.items()) if ":" not in k},
        "rejected_by_reason": {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("rejected:")},
        "failed_attempts_by_reason": {k.split(":", 1)[1]: v for k, v in sorted(counts.items())
                                      if k.startswith("failed_attempt:")},
        "accounting": "read = already_done + written + rejected (this run)",
        "totals": out.totals(),
        "out": str(out.out),
        "rejected_file": str(out.rejected),
        "generator": generator.name,
        "prompt": {"version": prompts.version, "path": prompts.path, "language": cfg.language,
                   "few_shot": cfg.few_shot},
        "generation": {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample,
                       "temperature": gen.temperature, "top_p": gen.top_p, "seed": gen.seed},
        "checks": {"min_turns": cfg.min_turns, "max_turns": cfg.max_turns, "min_chars": cfg.min_chars,
                   "max_chars": cfg.max_chars, "retries": cfg.retries, "near_dup_threshold": cfg.near_dup_threshold},
        "seconds": seconds,
        "records_per_s": produced / seconds if seconds > 0 else 0.0,
    }  # fmt: skip


def _run_chunk(chunk: list[Source], generator: Any, prompts: PromptSet, fewshot: FewShot | None,
               cfg: ConstructConfig, seed: int, out: Output, counts: Counter) -> None:  # fmt: skip
    """Prompt, generate, check and write (or reject) the records of one chunk, in input order."""
    items, requests = [], []
    for src in chunk:
        language = language_of(src.question, cfg.language)
        items.append(Attempted(src, language))
        rng = random.Random(derive_seed(seed, src.id, "examples"))
        examples = fewshot.choose(language, src.topic, cfg.few_shot, rng) if fewshot is not None else []
        system, user = build_prompt(prompts.for_language(language, src.where), src.question, src.answer,
                                    src.topic, examples, cfg.min_turns, cfg.max_turns)  # fmt: skip
        requests.append(Request(src.id, system, user, 0))
    attempt_all(items, requests, generator, prompts, cfg, seed, counts)
    for item in items:  # in input order: the duplicate decisions do not depend on timing
        if item.turns is None and item.reason in TRANSPORT_FAILURES:
            # Held back: a few such records are counted as rejected, a long run of them means the server
            # is down, and then they are left for the rerun instead (never marked done).
            out.held.append(item)
            if len(out.held) >= DOWN_AFTER:
                raise RuntimeError(
                    f"--endpoint: {len(out.held)} records in a row got no answer (last: {item.reason}: "
                    f"{item.detail}); the server looks down or overloaded: fix it and rerun the same command "
                    f"to resume ({counts['written']} dialogues written in this run; these records are not "
                    "marked done)"
                )
            continue
        _release_held(out, counts)
        if item.turns is not None:
            verdict, key, sig = out.dedup.check(item.turns)
            if verdict is None:
                out.dedup.add(key, sig, item.turns)
                out.write({
                    "id": item.source.id,
                    "topic": item.topic,
                    "messages": [{"role": "user" if t.role == "client" else "assistant", "content": t.text}
                                 for t in item.turns],
                    "source_id": item.source.id,
                    "prompt_version": prompts.version,
                    "generator": generator.name,
                    "language": item.language,
                    "attempts": item.attempts,
                })  # fmt: skip
                counts["written"] += 1
                counts["topic_missing"] += item.topic is None
                continue
            item.reason, item.detail = verdict, "the dialogue repeats one already written"
        _reject(out, counts, item)


def _reject(out: Output, counts: Counter, item: Attempted) -> None:
    out.reject(item.source.id, item.reason, item.detail, item.attempts, item.text)
    counts["rejected"] += 1
    counts[f"rejected:{item.reason}"] += 1


def _release_held(out: Output, counts: Counter) -> None:
    """Records whose requests failed, in a run short enough not to mean the server is down: rejected."""
    for held in out.held:
        _reject(out, counts, held)
    out.held.clear()


def format_summary(report: dict[str, Any]) -> str:
    c = report["counts"]
    lines = [
        (f"construct: read {c.get('read', 0):,} = already done {c.get('already_done', 0):,} + written "
         f"{c.get('written', 0):,} + rejected {c.get('rejected', 0):,} ({report['generator']}, prompt "
         f"{report['prompt']['version']})"),
        (f"  {c.get('attempts', 0):,} generations, {c.get('retries', 0):,} retries, "
         f"{report['records_per_s']:.2f} records/s"),
    ]
    if report["rejected_by_reason"]:
        lines.append("  rejected: " + ", ".join(f"{k} {v}" for k, v in report["rejected_by_reason"].items()))
    t = report["totals"]
    lines.append(f"  {report['out']}: {t['written']:,} dialogues in all; {report['rejected_file']}: {t['rejected']:,}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``python -m soulchat.data construct ...`` (argv without the subcommand)."""
    from soulchat.cli import exit_on_option_error

    command = construct_command()
    options = exit_on_option_error(lambda: command.parse(argv), argv)
    if not options["train"].progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    report = run_construct(options)
    cfg: ConstructConfig = options["construct"]
    path = Path(cfg.report or f"{cfg.out}.report.json")
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(format_summary(report))
    print(f"report {path}")
    return 0
