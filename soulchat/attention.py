"""Packed attention for unmodified Hugging Face models, and the families it refuses.

Packed rows reach the model as one sequence of T tokens (batch size 1) holding many conversations.
Two things make that work with an unmodified Hugging Face model:

1. Attention goes through transformers' ``AttentionInterface`` under the name ``soulchat_varlen``, which
   calls our ``varlen_attention`` with the row's ``cu_seqlens``. The boundaries travel as the standard
   flash-attention keyword arguments (``cu_seq_lens_q`` / ``max_length_q``), which every model that
   supports attention backends forwards untouched from ``model.model(...)`` down to the attention call.
2. No dense [T, T] mask is ever built: ``create_causal_mask`` returns ``None`` straight away for an
   attention implementation that has no entry in ``AttentionMaskInterface`` (transformers'
   ``_preprocess_mask_arguments`` "custom attention without equivalent mask creation" early exit),
   so we deliberately register none. Registering a mask function that returns None would be worse:
   transformers would first scan position_ids for packed sequences, one host sync per forward.

Exact or refused: sliding windows and attention soft-caps reach the kernel per layer; what the packed
path cannot compute exactly (token mixing outside attention, attention sinks, layers that drop the
boundaries) raises ``UnsupportedModelError`` with one line naming the family, and
``soulchat.check.preflight`` proves the rest on the user's own model before training.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

ATTENTION_NAME = "soulchat_varlen"

# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------


class UnsupportedModelError(ValueError):
    """soulchat cannot train this model exactly; the one-line message names the family (config.model_type),
    what is wrong and what to do. A ValueError, so the CLIs print it as one line and exit with status 2."""


def family(config: Any) -> str:
    """The model family as transformers names it (``config.model_type``), for messages."""
    if config is None:
        return "model"
    return getattr(config, "model_type", None) or type(config).__name__


def refuse(config: Any, what: str, fix: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{family(config)}: {what}; {fix}")


# Families whose layers mix tokens outside attention, or whose attention ignores the packed boundaries.
# These are refused before anything runs; the preflight probe (soulchat.check) catches them too, and
# catches families not listed here by what they compute.
TOKEN_MIXING_FAMILIES = {
    "lfm2": "its short convolutions mix tokens across conversation boundaries",
    "lfm2_moe": "its short convolutions mix tokens across conversation boundaries",
    "falcon_h1": "its mamba (state-space) layers carry state across conversation boundaries",
    "falcon_mamba": "its mamba (state-space) layers carry state across conversation boundaries",
    "mamba": "its mamba (state-space) layers carry state across conversation boundaries",
    "mamba2": "its mamba (state-space) layers carry state across conversation boundaries",
    "jamba": "its mamba (state-space) layers carry state across conversation boundaries",
    "bloom": "its alibi attention has its own mask and ignores the packed boundaries",
    "stablelm": "its decoder layers do not pass the packed boundaries down to attention",
    "falcon": "its attention does not go through transformers' attention interface",
}
PACKING_FIX = "soulchat cannot pack its conversations exactly: pick a model of another family"


def check_family(config: Any) -> None:
    """Refuse, before a model is even built, a family known to mix tokens across conversations."""
    why = TOKEN_MIXING_FAMILIES.get(family(config))
    if why is not None:
        raise refuse(config, why, PACKING_FIX)


def check_packable(lm: nn.Module) -> None:
    """Refuse, before anything runs, what the packed path cannot compute exactly (by family and by
    module: attention sinks)."""
    config = lm.config
    check_family(config)
    if any(name.endswith("sinks") for name, _ in lm.named_parameters()):
        raise refuse(
            config,
            "its attention has learned sinks (s_aux), which the packed attention kernels do not implement",
            "train it with another tool, or pick a model without attention sinks",
        )


# Config keys and module attributes that hold an attention-probability dropout rate.
_ATTENTION_DROPOUT_NAMES = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "attn_dropout")


def disable_attention_dropout(lm: nn.Module) -> str | None:
    """Set attention dropout to 0 in the config and every module (the packed kernels have none);
    returns a note when something was changed. Dropout elsewhere (hidden, residual) is per token and
    stays: it does not cross conversations."""
    rates = set()
    configs = [lm.config, *(getattr(lm.config, k, None) for k in getattr(lm.config, "sub_configs", {}) or {})]
    for config in (c for c in configs if c is not None):
        for name in _ATTENTION_DROPOUT_NAMES:
            value = getattr(config, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                rates.add(float(value))
                setattr(config, name, 0.0)
    for module in lm.modules():
        # An attention module's own "dropout" is its attention dropout (OPT: self.dropout = attention_dropout)
        is_attention = "Attention" in type(module).__name__
        for name in (*_ATTENTION_DROPOUT_NAMES, "dropout") if is_attention else _ATTENTION_DROPOUT_NAMES:
            value = getattr(module, name, None)
            if isinstance(value, nn.Dropout) and value.p > 0:
                rates.add(value.p)
                value.p = 0.0
            elif isinstance(value, float) and value > 0:
                rates.add(value)
                setattr(module, name, 0.0)
    if not rates:
        return None
    note = (
        f"{family(lm.config)}: attention dropout {sorted(rates)} set to 0 (the packed attention kernels have "
        "no dropout; hidden and residual dropout are unchanged)"
    )
    logger.warning(note)
    return note


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------

# True while PackedCausalLM runs its packed forward (``packed_forward()``): an attention call without the
# row's boundaries is then a layer that dropped them (it would attend across conversations), never a
# plain forward. Read only by ``_refuse_dropped_boundaries``, which runs outside torch.compile: a
# compiled decoder layer never reads (nor guards on, nor bakes in) this flag. The packed path with its
# boundaries never reaches that read at all (``cu_seq_lens_q`` is there), so training stays one graph
# per layer; only a call without boundaries (a plain forward, or a layer that dropped them) breaks out.
# An explicit keyword would not do: a layer that drops the boundaries drops every other keyword too.
_packed_forward = False


@contextlib.contextmanager
def packed_forward():
    """Within: attention calls belong to a packed forward, so one without boundaries is refused."""
    global _packed_forward
    previous, _packed_forward = _packed_forward, True
    try:
        yield
    finally:
        _packed_forward = previous


@torch.compiler.disable
def _refuse_dropped_boundaries(config: Any) -> None:
    """Outside torch.compile (see ``_packed_forward``): refuse when a packed forward lost its boundaries."""
    if _packed_forward:
        raise refuse(config, "its layers do not pass the packed boundaries (cu_seq_lens_q) down to "
                     "attention, so conversations would attend to each other", PACKING_FIX)


@functools.cache
def _attention_kernel_accepts(name: str) -> bool:
    """Whether this build's varlen_attention takes the keyword ``name`` (window, softcap)."""
    from soulchat.kernels.varlen_attention import varlen_attention

    return name in inspect.signature(varlen_attention).parameters


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [1, Hq, T, D], key/value [1, Hkv, T, D] -> [1, T, Hq, D].

    ``sliding_window`` (transformers' semantics: a query sees itself and the sliding_window - 1 keys
    before it) and ``softcap`` (attention-logit soft-cap) arrive per layer from the module, as each
    family's config sets them (Gemma 2/3 ``layer_types``, Qwen2 ``max_window_layers``, Mistral), and go
    to the kernel as they are. Without ``cu_seq_lens_q`` (generation, a plain forward) a batch of one
    unmasked sequence runs as one conversation through the same kernel; anything else falls back to
    transformers' SDPA, so a model that trained with this implementation still works for ordinary use.
    """
    config = getattr(module, "config", None)
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if kwargs.get("s_aux") is not None:
        raise refuse(
            config,
            "its attention has learned sinks (s_aux), which the packed attention kernels do not implement",
            "train it with another tool, or pick a model without attention sinks",
        )
    if cu_seqlens is None:
        _refuse_dropped_boundaries(config)
        if query.shape[0] == 1 and attention_mask is None and query.shape[2] == key.shape[2]:
            total = query.shape[2]
            cu_seqlens = torch.tensor([0, total], dtype=torch.int32, device=query.device)
            kwargs = {**kwargs, "cu_seq_lens_q": cu_seqlens, "max_length_q": total}
        else:
            return _sdpa_fallback(module, query, key, value, attention_mask, scaling, dropout,
                                  sliding_window, softcap, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(
            f"{ATTENTION_NAME}: packed rows are one sequence (batch size 1), got batch {query.shape[0]}"
        )
    if dropout and module.training:
        raise refuse(config, f"attention dropout {dropout} reached the packed attention kernel, which has "
                     "no dropout", "set the model config's attention_dropout to 0")
    # [1, H, T, D] -> [T, H, D]: a view, no copy.
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    if torch.is_autocast_enabled(q.device.type):
        # Under autocast with fp32 weights, rotary promotes q and k to fp32 while v stays in the
        # autocast dtype; SDPA casts all three to the autocast dtype, and so must we.
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    max_seqlen = kwargs.get("max_length_q")
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # a device sync; callers pass it
    max_seqlen = int(max_seqlen)
    options = _kernel_options(config, max_seqlen, sliding_window, softcap)
    out = _varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=scaling, causal=True, **options)
    return out.unsqueeze(0), None  # out: [1, T, Hq, D]


def _kernel_options(config: Any, max_seqlen: int, sliding_window: int | None, softcap: float | None) -> dict:
    """The window / soft-cap keywords for the kernel. A window no shorter than the longest conversation
    cuts nothing (query - key < max_seqlen <= window) and is dropped; a feature this build's kernel
    lacks is refused, never ignored."""
    options: dict[str, Any] = {}
    if sliding_window is not None and int(sliding_window) < max_seqlen:
        if not _attention_kernel_accepts("window"):
            raise refuse(config, f"sliding-window attention (window {sliding_window}, conversations up to "
                         f"{max_seqlen} tokens) is not in this build's attention kernel",
                         f"keep --max-length <= {sliding_window} or update soulchat")
        options["window"] = int(sliding_window)
    if softcap is not None:
        if not _attention_kernel_accepts("softcap"):
            raise refuse(config, f"attention-logit soft-capping ({softcap}) is not in this build's attention "
                         "kernel", "update soulchat, or set attn_logit_softcapping to null in config.json")
        options["softcap"] = float(softcap)
    return options


def _sdpa_fallback(module, query, key, value, attention_mask, scaling, dropout, sliding_window, softcap,
                   **kwargs):
    """transformers' SDPA for batched or masked plain forwards. SDPA knows neither soft-caps nor (without
    a mask, which this implementation never builds) windows: those are refused rather than ignored."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config = getattr(module, "config", None)
    if softcap is not None or (sliding_window is not None and key.shape[2] > sliding_window):
        raise refuse(config, f"a batched plain forward with attention soft-cap {softcap} / sliding window "
                     f"{sliding_window} cannot run through {ATTENTION_NAME}",
                     'reload the model with attn_implementation="eager" for batched generation')
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
        sliding_window=sliding_window, softcap=softcap, **kwargs,
    )


def _varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int, **options: Any) -> torch.Tensor:
    """The kernel dispatcher. The fast backends are custom ops (Triton, flash-attn, torch's varlen_attn)
    that torch.compile traces as opaque nodes, so a compiled decoder layer stays one graph; only the
    reference backend, which loops over the row's conversations in Python (data-dependent shapes that
    inductor mis-compiled in testing), runs outside the graph."""
    from soulchat.kernels.varlen_attention import varlen_attention, varlen_attention_backend

    if varlen_attention_backend(q, options.get("window"), options.get("softcap")) == "reference":
        return _reference_attention_outside_compile(q, k, v, cu_seqlens, max_seqlen, **options)
    return varlen_attention(q, k, v, cu_seqlens, max_seqlen, **options)


@torch.compiler.disable
def _reference_attention_outside_compile(*args: Any, **kwargs: Any) -> torch.Tensor:
    from soulchat.kernels.varlen_attention import varlen_attention

    return varlen_attention(*args, **kwargs)


def register_attention() -> None:
    """Make ``attn_implementation="soulchat_varlen"`` available (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
