"""construct's generation: the two generators (a local model through soulchat.inference, or an
OpenAI-compatible server through soulchat.endpoint) and the attempts of each record, regenerated while a
check fails, up to ``--retries`` more times."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from soulchat.data.construct_options import ConstructConfig
from soulchat.data.construct_prompts import PromptSet, derive_seed
from soulchat.data.construct_sources import Source
from soulchat.options import GenerationConfig


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


def attempt_all(items: list[Attempted], requests: list[Request], generator: Any, prompts: PromptSet,
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
