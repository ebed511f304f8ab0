"""The options of ``python -m soulchat.data construct``: its own section (``ConstructConfig``) and the
command that parses them with the sections it shares with chat, evaluate and training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

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


def construct_command() -> Command:
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
