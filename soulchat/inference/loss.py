"""The training loss on counselor tokens, for evaluation: ``packed_loss`` scores tokenized conversations
exactly as the trainer's held-out evaluation does."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from soulchat.inference.loading import LoadedModel


@contextlib.contextmanager
def _packed_attention(model: torch.nn.Module) -> Iterator[None]:
    """Route attention through soulchat's varlen kernel while packed rows are scored, then restore the
    model's own implementation: generation needs a padding mask, which the varlen implementation does
    not build (see soulchat.attention), and packed rows need the conversation boundaries SDPA ignores."""
    from soulchat.attention import ATTENTION_NAME, register_attention

    register_attention()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def packed_loss(
    lm: LoadedModel,
    sequences: Sequence[Any],
    tokens_per_micro_batch: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, int, int]:
    """(sum of cross-entropy over trained tokens, number of those tokens, micro-batches run).

    ``sequences``: soulchat.data.render.TokenizedConversation (input_ids, trained). They are packed
    best-fit-decreasing into micro-batches of ``max(tokens_per_micro_batch, longest sequence)`` tokens and
    scored by ``PackedCausalLM`` -- the module, the fused lm-head loss and the labels of training -- with
    every trained token weighted 1, as the trainer's held-out evaluation does. Attention never crosses a
    conversation boundary, so the loss does not depend on which conversations share a micro-batch.
    """
    from soulchat.data.packing import assemble, pack, to_torch
    from soulchat.model import PackedCausalLM

    if tokens_per_micro_batch < 1:
        raise ValueError(f"--tokens-per-micro-batch must be >= 1, got {tokens_per_micro_batch}")
    if not sequences:
        return 0.0, 0, 0
    lengths = np.array([len(s.input_ids) for s in sequences], dtype=np.int64)
    tokens = np.concatenate([s.input_ids for s in sequences]).astype(np.int32)
    trained = np.concatenate([s.trained for s in sequences]).astype(np.uint8)
    ones = np.ones(len(tokens), dtype=np.float32)
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    row_offsets, row_seqs = pack(lengths, max(tokens_per_micro_batch, int(lengths.max())), seed=0)
    packed = PackedCausalLM(lm.model)
    loss_sum, n_tokens, batches = 0.0, 0, 0
    with _packed_attention(lm.model):
        for r in range(len(row_offsets) - 1):
            seq_ids = row_seqs[row_offsets[r] : row_offsets[r + 1]]
            batch = assemble(tokens, trained, ones, offsets, seq_ids)
            if len(batch["loss_index"]):
                loss_sum += float(packed(**to_torch(batch, lm.device)))
                n_tokens += len(batch["loss_index"])
                batches += 1
            if progress is not None:
                progress(len(seq_ids))
    return loss_sum, n_tokens, batches
