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
"""

from __future__ import annotations

import fcntl
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from soulchat.data.construct_prompts import (
    FewShot,
    PromptSet,
    build_prompt,
    derive_seed,
    language_of,
    load_prompts,
)
from soulchat.commandline import Command, ConfigError, Section, check_types, option
from soulchat.options import DataConfig, GenerationConfig, ModelConfig, TrainConfig


@dataclass
class ConstructConfig:
    """What ``construct`` alone needs: where to write, which endpoint, retries, prompt and checks."""

    section: ClassVar[str] = "construct"

    out: str | None = option("output JSONL file of dialogues (appended to; a rerun resumes)", None)
    endpoint: str | None = option(
        "OpenAI-compatible API base URL (e.g. http://127.0.0.1:8000/v1); unset = generate with the local "
        "--model directory",
        None,
    )
    api_key_env: str = option("environment variable holding the endpoint's API key (sent when set)", "OPENAI_API_KEY")
    concurrency: int = option("--endpoint: requests in flight at once", 4)
    timeout: float = option("--endpoint: seconds to wait for one answer", 120.0)
    request_retries: int = option(
        "--endpoint: retries of a request that timed out, failed to connect, got 429/5xx or a malformed "
        "answer (exponential backoff from --backoff seconds)",
        3,
    )
    backoff: float = option("--endpoint: seconds before the first request retry (doubling after)", 1.0)
    retries: int = option("regenerations of a dialogue that fails a check, before the record is rejected", 2)
    limit: int | None = option("read only the first N input records (done ones included); unset = all", None)
    prompt: str | None = option("prompt file (JSON, the shape of soulchat/assets/construct_prompts.json)", None)
    language: Literal["auto", "zh", "en"] = option(
        "prompt language: auto = zh when the question has CJK characters", "auto"
    )
    few_shot: int = option("example dialogues from the bundled corpus in each prompt", 1)
    min_turns: int = option("fewest messages in a dialogue (client and counselor together)", 4)
    max_turns: int = option("most messages in a dialogue", 24)
    min_chars: int = option("shortest message in characters", 2)
    max_chars: int = option("longest message in characters", 1000)
    near_dup_threshold: float = option(
        "estimated Jaccard similarity (character 5-grams, MinHash) at which a dialogue is a near duplicate "
        "of one already written; 1 = exact duplicates only",
        0.8,
    )
    report: str | None = option("JSON report file; unset = <out>.report.json", None)

    def __post_init__(self) -> None:
        check_types(self)
        for name, low in (("concurrency", 1), ("few_shot", 0), ("retries", 0), ("request_retries", 0),
                          ("min_turns", 2), ("min_chars", 1)):  # fmt: skip
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")
        if self.timeout <= 0 or self.backoff < 0:
            raise ConfigError(f"--timeout must be > 0 and --backoff >= 0, got {self.timeout}, {self.backoff}")
        if self.max_turns < self.min_turns:
            raise ConfigError(f"--max-turns ({self.max_turns}) is below --min-turns ({self.min_turns})")
        if self.max_chars < self.min_chars:
            raise ConfigError(f"--max-chars ({self.max_chars}) is below --min-chars ({self.min_chars})")
        if not 0 < self.near_dup_threshold <= 1:
            raise ConfigError(f"--near-dup-threshold must be in (0, 1], got {self.near_dup_threshold}")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"--endpoint {self.endpoint!r}: must be an http:// or https:// URL, e.g. "
                              "http://127.0.0.1:8000/v1")  # fmt: skip
        if self.out is not None and Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out} is a directory: pass a .jsonl file path")


def _command() -> Command:
    # soulchat.inference and soulchat.evaluate import torch (~3 s): only when construct runs.
    from soulchat.evaluate import EvaluateConfig
    from soulchat.inference import InferenceConfig

    return Command(
        "python -m soulchat.data construct",
        "Rewrite single-turn counseling Q&A into multi-turn SoulChat-style dialogues (JSONL that prepare reads).",
        [
            Section(ModelConfig, only=("model", "trust_remote_code"), required=("model",),
                    help={"model": "local Hugging Face model directory that writes the dialogues (never "
                                   "downloaded); with --endpoint, the model name sent to the server"}),
            InferenceConfig,
            Section(TrainConfig, only=("device", "progress"),
                    help={"device": "where the local model generates: auto = CUDA when available"}),
            Section(GenerationConfig, defaults={"max_new_tokens": 1024, "top_k": 0},
                    help={"top_k": "sample among the k most likely tokens, 0 = off (sent to an --endpoint "
                                   "only when set: OpenAI's own API refuses it)",
                          "repetition_penalty": "transformers' repetition penalty, 1.0 = off (sent to an "
                                                "--endpoint only when set)",
                          "batch_size": "records generated together (with --endpoint: records handled "
                                        "together, at least --concurrency)"}),
            Section(DataConfig, only=("data", "on_error", "columns"), required=("data",),
                    help={"data": "single-turn Q&A files or directories (JSON array, JSONL, parquet/arrow)",
                          "columns": "Q&A fields under other names, FIELD=COLUMN,... with FIELD one of "
                                     "question, answer, topic, id, e.g. question=title,answer=answer_text",
                          "on_error": "a malformed input record stops the run naming it (raise) or is "
                                      "rejected and counted by reason (skip)"}),
            Section(EvaluateConfig, only=("backend",),
                    help={"backend": "local generation backend: hf (transformers generate) or vllm (needs "
                                     "the vllm package and a GPU)"}),
            Section(ConstructConfig, required=("out",)),
        ],
    )  # fmt: skip


# ==================================================================================================
# Input: single-turn Q&A records
# ==================================================================================================


@dataclass
class Source:
    id: str
    question: str
    answer: str
    topic: str | None
    where: str


@dataclass
class BadSource:
    id: str  # the record's position, <file name>:<index> (its own id may be the problem)
    reason: str
    message: str


def _is_json_array(path: str) -> bool:
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _records(path: str) -> Iterator[tuple[int, str, object]]:
    """(index, where, record or DataError) of one file, through the readers' streaming parsers."""
    from soulchat.data.arrow import is_arrow_file, iter_arrow_records
    from soulchat.data.readers import iter_json_array, iter_jsonl

    if is_arrow_file(path):
        for index, rec in iter_arrow_records(path):
            yield index, f"{path}[row {index}]", rec
    elif path.endswith(".txt"):
        from soulchat.data.conversation import DataError

        raise DataError(f"{path}: construct reads Q&A records from JSON, JSONL or parquet files, not text",
                        reason="unknown_format", where=path)  # fmt: skip
    elif _is_json_array(path):
        for index, rec in iter_json_array(path):
            yield index, f"{path}[record {index}]", rec
    else:
        for index, lineno, rec in iter_jsonl(path):
            yield index, f"{path}:{lineno}", rec


def read_sources(paths: list[str], columns: str | None, limit: int | None) -> Iterator[Source | BadSource]:
    """The first ``limit`` records of the input, each a Source or a BadSource naming what is wrong."""
    from soulchat.data.conversation import DataError
    from soulchat.data.readers import expand_paths, parse_columns

    mapping = parse_columns(columns)
    for field in ("messages", "role", "content"):
        if field in mapping:
            raise ValueError(f"--columns {field}=...: construct reads single-turn Q&A records; map question, "
                             "answer, topic and id")  # fmt: skip
    keys = {f: mapping.get(f, f) for f in ("question", "answer", "topic", "id")}
    seen: dict[str, str] = {}
    count = 0
    for path in expand_paths(paths):
        name = Path(path).name
        for index, where, rec in _records(path):
            if limit is not None and count >= limit:
                return
            count += 1
            position = f"{name}:{index}"
            if isinstance(rec, DataError):
                yield BadSource(position, rec.reason, str(rec))
                continue
            item = _source(rec, where, position, keys)
            if isinstance(item, Source):
                if item.id in seen:
                    item = BadSource(position, "duplicate_source_id",
                                     f"{where}: id {item.id!r} was already used by {seen[item.id]}; source ids "
                                     "must be unique (resuming relies on them): fix the ids")  # fmt: skip
                else:
                    seen[item.id] = where
            yield item


def _source(rec: object, where: str, position: str, keys: dict[str, str]) -> Source | BadSource:
    if not isinstance(rec, dict):
        return BadSource(position, "bad_record_shape", f"{where}: expected a JSON object, found {type(rec).__name__}")
    values = {}
    for field in ("question", "answer"):
        value = rec.get(keys[field])
        if not isinstance(value, str) or not value.strip():
            found = "missing" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
            return BadSource(
                position, f"missing_{field}",
                f"{where}: no {field} text in field {keys[field]!r} ({found}; keys: {sorted(rec)[:8]}); name the "
                f"field with --columns {field}=FIELD",
            )  # fmt: skip
        values[field] = value
    rid = rec.get(keys["id"])
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip()):
        return BadSource(position, "bad_id", f"{where}: id {rid!r} is not a non-empty string or integer")
    topic = rec.get(keys["topic"])
    return Source(position if rid is None else str(rid), values["question"], values["answer"],
                  topic.strip() or None if isinstance(topic, str) else None, where)  # fmt: skip


# ==================================================================================================
# Generators
# ==================================================================================================


@dataclass
class Request:
    source_id: str
    system: str
    user: str
    seed: int


class LocalGenerator:
    """A local model through soulchat.inference (transformers generate, or vLLM)."""

    def __init__(self, options: dict[str, Any]) -> None:
        from soulchat.inference import VllmGenerator, load_from_options

        # load_from_options reads generation.max_context and the inference/train sections like chat does.
        self.lm = load_from_options(options)
        self.gen: GenerationConfig = options["generation"]
        backend = options["evaluate"].backend
        self.vllm = VllmGenerator(self.lm, self.gen.seed) if backend == "vllm" else None
        self.name = f"{backend}:{options['model'].model}"
        self.chunk = self.gen.batch_size

    def generate(self, requests: list[Request]) -> list[Any]:
        import torch

        from soulchat.data.conversation import Turn
        from soulchat.endpoint import Completion
        from soulchat.inference import ContextTooLong, check_no_control_tokens, fit_context, generate_batch

        out: list[Any] = [None] * len(requests)
        prompts, index = [], []
        for i, req in enumerate(requests):
            turns = [Turn("system", req.system), Turn("client", req.user)]
            try:
                check_no_control_tokens(self.lm, turns, req.source_id)
                prompt, _ = fit_context(self.lm, turns, self.gen.max_new_tokens, req.source_id)
            except ContextTooLong as err:
                out[i] = Completion(None, reason="prompt_too_long", detail=str(err))
                continue
            except ValueError as err:
                out[i] = Completion(None, reason="control_token_in_source", detail=str(err))
                continue
            prompts.append(prompt)
            index.append(i)
        if prompts:
            stopped: list[bool] = []
            torch.manual_seed(requests[index[0]].seed)
            if self.vllm is not None:
                texts = self.vllm.generate(prompts, self.gen, stopped=stopped)
            else:
                texts = generate_batch(self.lm, prompts, self.gen, stopped=stopped)
            for i, text, done in zip(index, texts, stopped):
                out[i] = Completion(text, done)
        return out

    def close(self) -> None:
        pass


class EndpointGenerator:
    """An OpenAI-compatible server (soulchat.endpoint.ChatClient), ``--concurrency`` requests at a time."""

    def __init__(self, options: dict[str, Any]) -> None:
        from soulchat.endpoint import ChatClient

        cfg: ConstructConfig = options["construct"]
        gen: GenerationConfig = options["generation"]
        extra: dict[str, Any] = {}
        if gen.do_sample and gen.top_k:
            extra["top_k"] = gen.top_k
        if gen.repetition_penalty != 1.0:
            extra["repetition_penalty"] = gen.repetition_penalty
        self.client = ChatClient(cfg.endpoint, options["model"].model, api_key_env=cfg.api_key_env,
                                 timeout=cfg.timeout, retries=cfg.request_retries, backoff=cfg.backoff,
                                 extra=extra)  # fmt: skip
        self.gen = gen
        self.pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="construct")
        self.name = f"openai:{options['model'].model}@{cfg.endpoint}"
        self.chunk = max(gen.batch_size, cfg.concurrency)

    def generate(self, requests: list[Request]) -> list[Any]:
        gen = self.gen

        def one(req: Request):
            messages = [{"role": "system", "content": req.system}, {"role": "user", "content": req.user}]
            return self.client.complete(messages, max_tokens=gen.max_new_tokens,
                                        temperature=gen.temperature if gen.do_sample else 0.0,
                                        top_p=gen.top_p if gen.do_sample else 1.0, seed=req.seed)  # fmt: skip

        return list(self.pool.map(one, requests))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# ==================================================================================================
# Output files: resume, append, account
# ==================================================================================================


def rejected_path(out: Path) -> Path:
    return out.with_name(out.name + ".rejected.jsonl")


def _read_done(path: Path, counts: Counter, kind: str) -> Iterator[dict[str, Any]]:
    """The records of an output file of an earlier run; a last line cut by a kill is removed first."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        f.seek(0, 2)
        size = f.tell()
        if size:
            f.seek(max(0, size - 1))
            if f.read(1) != b"\n":  # the last record was being written when the run died
                f.seek(0)
                data_end = 0
                for line in f:
                    if line.endswith(b"\n"):
                        data_end += len(line)
                f.truncate(data_end)
                counts[f"{kind}_partial_line_dropped"] += 1
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                rec = None
            if not isinstance(rec, dict) or not isinstance(rec.get("source_id"), str):
                raise ValueError(
                    f"{path}:{lineno}: not a construct record (malformed JSON or no source_id): the file was "
                    "edited or is not construct's output; fix or remove that line, or write to a new --out"
                )
            yield rec


def _messages_to_turns(messages: list[dict[str, str]]):
    from soulchat.data.conversation import Turn

    return [Turn("client" if m["role"] == "user" else "counselor", m["content"]) for m in messages]


class Output:
    """The two output files, the ids already done, and the duplicate index over written dialogues."""

    def __init__(self, out: Path, threshold: float, counts: Counter) -> None:
        from soulchat.data.construct_screen import DedupIndex

        out.parent.mkdir(parents=True, exist_ok=True)
        self.lock = open(out.with_name(out.name + ".lock"), "w")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--out {out}: another construct run is writing it; wait for it or pick another --out") from None
        self.out, self.rejected = out, rejected_path(out)
        self.dedup = DedupIndex(threshold)
        self.held: list[Attempted] = []  # request failures not yet written (see _run_chunk)
        self.done: dict[str, str] = {}
        for rec in _read_done(out, counts, "written"):
            self._mark(rec["source_id"], "written", out)
            turns = _messages_to_turns(rec["messages"])
            key, sig = self.dedup.check(turns)[1:]
            self.dedup.add(key, sig, turns)
        for rec in _read_done(self.rejected, counts, "rejected"):
            self._mark(rec["source_id"], "rejected", self.rejected)
        self.f_out = open(out, "a", encoding="utf-8")  # noqa: SIM115
        self.f_rej = open(self.rejected, "a", encoding="utf-8")  # noqa: SIM115

    def _mark(self, source_id: str, kind: str, path: Path) -> None:
        if source_id in self.done:
            raise ValueError(f"{path}: source id {source_id!r} appears twice in the output files ({self.done[source_id]} "
                             "and " + kind + "); remove one of the lines")  # fmt: skip
        self.done[source_id] = kind

    @staticmethod
    def _append(f, rec: dict[str, Any]) -> None:
        # One write of one whole line, flushed: a kill leaves at most the last line cut (dropped on resume).
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()

    def write(self, rec: dict[str, Any]) -> None:
        self._append(self.f_out, rec)
        self.done[rec["source_id"]] = "written"

    def reject(self, source_id: str, reason: str, detail: str = "", attempts: int = 0,
               generation: str | None = None) -> None:  # fmt: skip
        rec = {"source_id": source_id, "reason": reason, "detail": detail, "attempts": attempts}
        if generation is not None:
            rec["generation"] = generation[:4000]
        self._append(self.f_rej, rec)
        self.done[source_id] = "rejected"

    def close(self) -> None:
        import os

        for f in (self.f_out, self.f_rej):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self.lock.close()

    def totals(self) -> dict[str, Any]:
        reasons: Counter = Counter()
        written = 0
        for rec in _read_done(self.out, Counter(), "written"):
            written += 1
        for rec in _read_done(self.rejected, Counter(), "rejected"):
            reasons[rec["reason"]] += 1
        return {"written": written, "rejected": sum(reasons.values()), "rejected_by_reason": dict(sorted(reasons.items()))}


# ==================================================================================================
# The run
# ==================================================================================================


# Reasons a record gets no answer at all (soulchat.endpoint.ChatClient, after its request retries).
TRANSPORT_FAILURES = frozenset({"request_timeout", "connection_error", "server_error", "rate_limited", "bad_response"})
# That many records in a row without an answer stop the run, unmarked, rather than reject a whole
# corpus while a server is down; fewer are rejected and counted (an isolated timeout, a bad answer).
DOWN_AFTER = 8


@dataclass
class Attempted:
    source: Source
    language: str
    text: str | None = None
    turns: list | None = None
    topic: str | None = None
    reason: str | None = None
    detail: str = ""
    attempts: int = 0


def _attempt_all(items: list[Attempted], requests: list[Request], generator: Any, prompts: PromptSet,
                 cfg: ConstructConfig, seed: int, counts: Counter) -> None:  # fmt: skip
    """Generate and check every item, regenerating failed checks up to --retries times."""
    from soulchat.data.construct_screen import DialogueRules, Rejection, check_dialogue, parse_dialogue

    rules = DialogueRules(cfg.min_turns, cfg.max_turns, cfg.min_chars, cfg.max_chars)
    pending = list(range(len(requests)))
    for attempt in range(cfg.retries + 1):
        if not pending:
            return
        for i in pending:
            requests[i].seed = derive_seed(seed, items[i].source.id, f"attempt {attempt}")
        completions = generator.generate([requests[i] for i in pending])
        again = []
        for i, done in zip(pending, completions):
            item = items[i]
            item.attempts += 1
            counts["attempts"] += 1
            if done.text is None:  # the request itself failed (after its own retries): not regenerated
                item.reason, item.detail, item.text = done.reason, done.detail, None
                counts[f"failed_attempt:{done.reason}"] += 1
                continue
            item.text = done.text
            lang = prompts.for_language(item.language, item.source.where)
            try:
                if not done.finished:
                    raise Rejection("hit_max_new_tokens", f"the generation reached --max-new-tokens {generator.gen.max_new_tokens}")
                parsed = parse_dialogue(done.text, lang.labels)
                check_dialogue(parsed.turns, rules)
            except Rejection as rej:
                item.reason, item.detail = rej.reason, rej.detail
                counts[f"failed_attempt:{rej.reason}"] += 1
                if attempt < cfg.retries:
                    again.append(i)
                continue
            item.reason, item.detail, item.turns = None, "", parsed.turns
            item.topic = item.source.topic or lang.canonical_topic(parsed.topic)
            counts["preamble_dropped"] += parsed.preamble
        counts["retries"] += len(again)
        pending = again


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
    _attempt_all(items, requests, generator, prompts, cfg, seed, counts)
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

    command = _command()
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
