"""``PackedCausalLM``: the module soulchat trains, a Hugging Face causal LM on packed micro-batches.

Its forward returns the weighted loss sum of a packed micro-batch (the contract in the README). The
backbone runs with soulchat's packed attention (soulchat.attention); the loss is computed from the
backbone's last hidden state at the trained positions only, through the fused ``linear_cross_entropy``
(the [T, V] logits are never built), with the model's own logit scale and final soft-cap.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from soulchat.attention import check_packable, disable_attention_dropout, family, packed_forward, refuse
from soulchat.loading import backbone


class PackedCausalLM(nn.Module):
    """Wraps a Hugging Face causal LM; ``forward(micro_batch)`` returns the weighted loss SUM.

    It is a module (rather than a function) so that FSDP2's root pre-forward hook gathers the embedding,
    final norm and lm head around the whole computation, and DDP sees one forward per micro-batch.
    Construction refuses (``UnsupportedModelError``) what cannot be trained exactly and sets attention
    dropout to 0 with a note (``self.notes``); ``soulchat.check.preflight`` then proves the rest.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        check_packable(lm)
        head = lm.get_output_embeddings()
        if head is None or getattr(head, "bias", None) is not None:
            raise refuse(lm.config, "its lm head has a bias, which the fused loss does not add",
                         "pick a model whose lm head has no bias")
        self.notes = [n for n in [disable_attention_dropout(lm)] if n]
        # Some models soft-cap their final logits (Gemma 2); the fused loss applies the same cap.
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)
        # Some scale them first (granite, cohere, minicpm3, falcon_h1): the fused loss scales too.
        self.logit_scale = head_logit_scale(lm.config)

    def hidden_states(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        """The backbone's last hidden states of a packed row: [T] ids -> [T, H]."""
        with packed_forward():  # a layer that drops the boundaries is refused, not run across conversations
            out = backbone(self.lm)(
                input_ids=input_ids[None],
                position_ids=position_ids[None],
                cu_seq_lens_q=cu_seqlens,
                cu_seq_lens_k=cu_seqlens,
                max_length_q=max_seqlen,
                max_length_k=max_seqlen,
                use_cache=False,
            )
        return out.last_hidden_state[0]  # [T, H]

    def head_loss(self, hidden: torch.Tensor, targets: torch.Tensor, loss_weight: torch.Tensor) -> torch.Tensor:
        """Weighted cross-entropy sum of the lm head (scaled and soft-capped as the model does) at
        ``hidden`` [N, H] against ``targets`` [N], through the fused kernel: no [N, V] logits."""
        from soulchat.kernels.linear_cross_entropy import linear_cross_entropy

        weight = self.lm.get_output_embeddings().weight  # [V, H]
        scale = {}
        if self.logit_scale != 1.0:
            if _loss_kernel_accepts("logit_scale"):
                scale = {"logit_scale": self.logit_scale}
            else:  # W @ (s h) = s (W @ h): the same logits, scaled before the GEMM instead of after
                hidden = hidden * self.logit_scale
        return linear_cross_entropy(hidden, weight, targets, loss_weight, softcap=self.softcap, **scale)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        loss_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_weight: torch.Tensor | None = None,
        *,
        run: Any = None,
    ) -> Any:
        """input_ids/position_ids/labels: [T]; cu_seqlens int32 [S+1]; loss_index [N]; loss_weight [N].

        ``run``: a function of this module, called here instead of the loss, so that it runs with the
        root's parameters gathered under FSDP2 (the preflight probe's forwards); its result is returned.
        """
        if run is not None:
            return run(self)
        hidden = self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen)
        picked = hidden.index_select(0, loss_index)  # [N, H]: only trained positions reach the lm head
        targets = labels.index_select(0, loss_index)  # [N]
        return self.head_loss(picked, targets, loss_weight)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The arguments of ``PackedCausalLM.forward`` taken from a packed micro-batch dict."""
    return {
        k: batch[k]
        for k in (
            "input_ids",
            "position_ids",
            "cu_seqlens",
            "max_seqlen",
            "loss_index",
            "labels",
            "loss_weight",
        )
    }


def head_logit_scale(config: Any) -> float:
    """The factor the model's forward multiplies its logits by (1.0 for most families). Head transforms
    not listed here are caught by the preflight probe's loss check and refused."""
    if getattr(config, "logits_scaling", None):  # granite, granitemoe; minicpm3 (hidden / logits_scaling)
        return 1.0 / float(config.logits_scaling)
    if getattr(config, "logit_scale", None) is not None and family(config).startswith("cohere"):
        return float(config.logit_scale)
    if getattr(config, "lm_head_multiplier", None) is not None:  # falcon_h1
        return float(config.lm_head_multiplier)
    return 1.0


@functools.cache
def _loss_kernel_accepts(name: str) -> bool:
    from soulchat.kernels.linear_cross_entropy import linear_cross_entropy

    return name in inspect.signature(linear_cross_entropy).parameters
