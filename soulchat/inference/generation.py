"""Generating replies: left-padded batches through transformers' ``generate`` (``generate_batch``,
``generate_replies``), or vLLM (``VllmGenerator``); replies are cut at the model's stop tokens."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from soulchat.inference.loading import LoadedModel
from soulchat.options import GenerationConfig


class _StopFlag:
    """A stopping criterion that ends generation when ``event`` is set (Ctrl-C in the chat)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def _cut_at_stop(lm: LoadedModel, new_ids: Sequence[int]) -> tuple[list[int], int]:
    """(reply ids before the first stop token, tokens generated including that stop token)."""
    for i, token in enumerate(new_ids):
        if token in lm.stop_ids:
            return list(new_ids[:i]), i + 1
    return list(new_ids), len(new_ids)


def _decode_reply(lm: LoadedModel, new_ids: Sequence[int], counts: Counter | None = None) -> str:
    """Text of generated ids up to (not including) the first stop token."""
    ids, generated = _cut_at_stop(lm, new_ids)
    if counts is not None:
        counts["generated_tokens"] += generated  # padding after a row's stop token is not counted
    return lm.tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.no_grad()
def generate_batch(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    options: GenerationConfig,
    streamer: Any = None,
    stop_event: threading.Event | None = None,
    counts: Counter | None = None,
    stopped: list[bool] | None = None,
) -> list[str]:
    """One generate() call over prompts left-padded to a batch; the reply text of each.

    ``stopped`` (when given) receives, per prompt, whether its reply ended at a stop token (False: it
    was cut at max_new_tokens), so a caller that needs whole replies can tell.
    """
    from transformers import StoppingCriteriaList

    # ids/mask: [B, P]; left padding so every prompt ends where generation starts.
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), lm.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    device = lm.device
    extra: dict[str, Any] = {}
    if streamer is not None:
        extra["streamer"] = streamer
    if stop_event is not None:
        extra["stopping_criteria"] = StoppingCriteriaList([_StopFlag(stop_event)])
    out = lm.model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        eos_token_id=lm.stop_ids,
        pad_token_id=lm.pad_id,
        **options.generate_kwargs(),
        **extra,
    )
    new = out[:, width:].tolist()  # [B, <= max_new_tokens]
    if stopped is not None:
        stopped.extend(any(t in lm.stop_ids for t in row) for row in new)
    return [_decode_reply(lm, row, counts) for row in new]


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of ``batch_size``, longest first (ties in input order): little padding per batch,
    and an order fixed by the inputs, so runs with the same seed are identical."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def generate_replies(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    options: GenerationConfig,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    counts: Counter | None = None,
) -> list[str]:
    """Replies to many prompts, in their order, generated ``batch_size`` at a time, batched by length.

    ``counts["generated_tokens"]`` (when given) adds up the new tokens of every reply, its stop token
    included, for tokens/s.
    """
    replies: list[str] = [""] * len(prompts)
    for chunk in length_batches([len(p) for p in prompts], batch_size):
        for i, text in zip(chunk, generate_batch(lm, [prompts[i] for i in chunk], options, counts=counts)):
            replies[i] = text
        if progress is not None:
            progress(len(chunk))
    return replies


class VllmGenerator:
    """The same replies through vLLM (``--backend vllm``), for fast generation on a GPU.

    Prompts are passed as token ids (rendered and fitted exactly as for the transformers backend) and
    replies are cut at the same stop tokens. vLLM schedules its own batches (continuous batching), so
    ``batch_size`` does not apply; with sampling its random streams differ from transformers', so the
    replies are reproducible for a seed but not equal to the transformers backend's.
    """

    def __init__(self, lm: LoadedModel, seed: int, gpu_memory_utilization: float = 0.85) -> None:
        try:
            import vllm
        except ImportError as err:
            raise ValueError(
                f"--backend vllm: the vllm package is not importable ({err}); install it or use --backend hf"
            ) from None
        self.vllm = vllm
        self.lm = lm
        dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
        self.engine = vllm.LLM(
            model=lm.path,
            tokenizer=lm.path,
            dtype=dtype,
            seed=seed,
            max_model_len=lm.context_window,
            gpu_memory_utilization=gpu_memory_utilization,
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], options: GenerationConfig, counts: Counter | None = None,
        stopped: list[bool] | None = None,
    ) -> list[str]:
        params = self.vllm.SamplingParams(
            max_tokens=options.max_new_tokens,
            temperature=options.temperature if options.do_sample else 0.0,
            top_p=options.top_p if options.do_sample else 1.0,
            top_k=(options.top_k or -1) if options.do_sample else -1,
            repetition_penalty=options.repetition_penalty,
            stop_token_ids=list(self.lm.stop_ids),
            skip_special_tokens=True,
        )
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.engine.generate(requests, params, use_tqdm=False)
        if stopped is not None:  # vLLM's finish_reason: "stop" (a stop token) or "length"
            stopped.extend(o.outputs[0].finish_reason != "length" for o in outputs)
        return [_decode_reply(self.lm, list(o.outputs[0].token_ids), counts) for o in outputs]
