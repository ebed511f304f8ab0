"""Model glue: the built-in tiny Qwen2, loading a local Hugging Face model, packed attention and loss.

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

The loss is computed from the backbone's last hidden state at the trained positions only, through the
fused ``linear_cross_entropy`` (the [T, V] logits are never built), with the model's own logit scale and
final soft-cap.

Exact or refused: sliding windows and attention soft-caps reach the kernel per layer; what the packed
path cannot compute exactly (token mixing outside attention, attention sinks, a head bias, layers that
drop the boundaries) raises ``UnsupportedModelError``, and ``soulchat.check.preflight`` proves the rest
on the user's own model before training.

With ``--fused-kernels`` (on by default for CUDA) the RMSNorm modules and the gated MLPs of
Llama/Qwen2-family models call the fused ``rms_norm`` and ``swiglu`` kernels (see ``apply_fused_kernels``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from soulchat.data.assets import default_tokenizer_path
from soulchat.options import ModelConfig

logger = logging.getLogger(__name__)

ATTENTION_NAME = "soulchat_varlen"
BUILTIN_TOKENIZER = default_tokenizer_path()

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

# True while PackedCausalLM runs its packed forward: an attention call without the row's boundaries is
# then a layer that dropped them (it would attend across conversations), never a plain forward.
_packed_forward = False


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
        if _packed_forward:
            raise refuse(config, "its layers do not pass the packed boundaries (cu_seq_lens_q) down to "
                         "attention, so conversations would attend to each other", PACKING_FIX)
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


# --------------------------------------------------------------------------------------------------
# Tokenizer and model loading
# --------------------------------------------------------------------------------------------------


def _check_dir(path: str, what: str, flag: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"{what} {p} does not exist: {flag} must be a local directory (nothing is downloaded)"
        )
    if not p.is_dir():
        raise NotADirectoryError(f"{what} {p} is a file: {flag} must be a Hugging Face model directory")
    return p


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of ``--tokenizer``, else of ``--model``, else the bundled one (soulchat.data.assets)."""
    from soulchat.data.assets import load_tokenizer as load

    return load(cfg.tokenizer, model=cfg.model, trust_remote_code=cfg.trust_remote_code)


def tiny_qwen2_config(vocab_size: int, eos_token_id: int | None = None, **overrides: Any) -> Any:
    """The built-in smoke-test model: a ~1.1M-parameter Qwen2 (hidden 128, 3 layers, 4 query / 2 kv
    heads, tied embeddings; half the parameters are the 4096 x 128 embedding of the bundled vocabulary).

    The same architecture and code path as Qwen2/2.5 checkpoints, small enough that the default run
    (~150 steps, ~300k tokens) takes about a minute on two CPU cores: ~4k tokens/s with one thread,
    where hidden 192 / 6 heads was 1.5x slower per token.
    """
    from transformers import Qwen2Config

    values: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "attention_dropout": 0.0,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
        "use_cache": True,
    }
    values.update(overrides)
    return Qwen2Config(**values)


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json", "*.bin.index.json")


def _check_weights(path: Path) -> None:
    """A model directory needs weights next to config.json (transformers would raise an OSError deep
    inside from_pretrained)."""
    if not any(next(path.glob(pattern), None) is not None for pattern in WEIGHT_FILES):
        raise FileNotFoundError(
            f"{path} has a config.json but no weights (model.safetensors, pytorch_model.bin or a sharded "
            "*.index.json): --model needs the directory written by save_pretrained, weights included"
        )


def build_model(
    cfg: ModelConfig, tokenizer, seed: int, device: torch.device | str = "cpu", load_kwargs: dict | None = None
):
    """A causal LM with the packed attention implementation, fp32 weights, in train mode.

    ``device="meta"`` builds the structure without weights (for ranks that receive them by broadcast).
    ``tokenizer`` may be None for a ``cfg.model`` directory (then its size is not checked).
    Families that cannot be packed exactly raise ``UnsupportedModelError`` before anything is loaded.
    ``load_kwargs`` override the loading arguments (LoRA: the frozen base's dtype, 4-bit quantization).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    load = {"dtype": torch.float32, **(load_kwargs or {})}

    register_attention()
    if cfg.model is None:
        config = tiny_qwen2_config(
            len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id
            if tokenizer.bos_token_id is not None
            else tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
        config._attn_implementation = ATTENTION_NAME
        torch.manual_seed(seed)  # the built-in model is random: the seed makes it reproducible
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION_NAME, **load)
    else:
        path = _check_dir(cfg.model, "model directory", "--model")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json: --model must point at a Hugging Face model directory "
                "(config.json + *.safetensors/*.bin)"
            )
        config = AutoConfig.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
        check_family(config)
        try:
            if str(device) == "meta":
                with torch.device("meta"):
                    model = AutoModelForCausalLM.from_config(
                        config,
                        attn_implementation=ATTENTION_NAME,
                        trust_remote_code=cfg.trust_remote_code,
                        **load,
                    )
            else:
                _check_weights(path)
                # fp32 master weights: the optimizer updates fp32, compute is cast (bf16 on GPU).
                model = AutoModelForCausalLM.from_pretrained(
                    str(path),
                    local_files_only=True,
                    trust_remote_code=cfg.trust_remote_code,
                    attn_implementation=ATTENTION_NAME,
                    **load,
                )
        except (ValueError, KeyError) as err:
            if "attn_implementation" in str(err) or ATTENTION_NAME in str(err):
                raise refuse(
                    config,
                    f"it does not support custom attention implementations (transformers' "
                    f"AttentionInterface), which packed training needs ({type(err).__name__}: {err})",
                    PACKING_FIX,
                ) from err
            raise
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
            f"{model.get_input_embeddings().weight.shape[0]}: use the model's own tokenizer"
        )
    model.config.use_cache = False  # training: never build a KV cache
    model.train()
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (the unit of FSDP sharding and activation checkpointing)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__} (no _no_split_modules): "
            "FSDP and activation checkpointing need them"
        )
    return layers


def backbone(model: nn.Module) -> nn.Module:
    """The model without its lm head (``model.model`` for Qwen2/Llama): returns last hidden states."""
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if inner is None or inner is model:
        raise ValueError(f"cannot find the base model of {type(model).__name__}")
    return inner


# --------------------------------------------------------------------------------------------------
# Fused RMSNorm and SwiGLU in place of transformers' modules
# --------------------------------------------------------------------------------------------------
#
# After loading, each RMSNorm module and each gated MLP gets a new forward on the instance that calls
# soulchat.kernels.rms_norm / swiglu. Parameters, state-dict keys, hooks and the module tree stay as
# they were, so checkpoints, FSDP wrapping, activation checkpointing and the HF export are unaffected.
#
# Which modules qualify is decided by behaviour, not by class name: each class's own forward runs once
# on a small random CPU input (through a stand-in holding only the attributes the fused forward reads)
# and must give the kernels' reference result: bit for bit for RMSNorm on a bf16 input (which also pins
# the order of the cast and the weight multiply), to fp64 rounding for the MLP. That accepts the
# Llama/Qwen2/Qwen3/Mistral modules and refuses look-alikes (a (1 + weight) norm, a gelu MLP), which keep
# their transformers forward with a logged note. The probe never touches the model's weights, so it
# also works on the meta device (ranks that receive the weights by broadcast).
#
# Rotary embedding is deliberately NOT swapped. In transformers 5 every architecture applies RoPE inside
# its own attention forward, through its modeling module's global ``apply_rotary_pos_emb``, before it
# calls the attention interface: our "soulchat_varlen" function only ever receives q and k already
# rotated. Reaching RoPE would mean rebinding that module-level function (process-wide: every model of
# the family in the process would change, the plain-HF reference of the tests and a chat model
# included) or re-implementing each architecture's attention forward (a copy of transformers code that
# breaks with its releases, e.g. the past_key_values -> cache rename of 5.x). transformers' RoPE is
# already right for packed rows (its cos/sin come from our restarting position_ids), and it is the
# smallest of the three ops: (Hq + Hkv) * D = 1,792 values per token for Qwen2.5-1.5B, against
# 2 x 8,960 for the MLP gate and up that swiglu fuses.


@dataclass
class FusedKernels:
    """What ``apply_fused_kernels`` changed: module counts, and why the other candidates were kept."""

    rms_norm: int = 0  # RMSNorm modules now calling soulchat.kernels.rms_norm
    swiglu: int = 0  # MLPs now calling soulchat.kernels.swiglu
    notes: list[str] = field(default_factory=list)  # one per refused class

    def summary(self) -> str:
        text = f"fused RMSNorm in {self.rms_norm} modules, fused SwiGLU in {self.swiglu} MLPs"
        return "; ".join([text, *self.notes])


def fused_kernels_enabled(setting: str, device: torch.device | str, compiled: bool = False) -> bool:
    """Resolve ``--fused-kernels auto|on|off`` for a run on ``device``.

    auto = on for CUDA only: on the CPU the kernels' dispatch picks the PyTorch reference anyway (the
    swap would only add a Python call per module), and under ``--compile`` inductor generates fused
    kernels for these element-wise ops itself, where ours would be graph breaks.
    """
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"--fused-kernels must be auto, on or off, got {setting!r}")
    if setting != "auto":
        return setting == "on"
    return torch.device(device).type == "cuda" and not compiled


@torch.compiler.disable
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Outside torch.compile, like the attention kernel: the Triton launchers are not traceable."""
    from soulchat.kernels.rms_norm import rms_norm

    return rms_norm(x, weight, eps)


@torch.compiler.disable
def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from soulchat.kernels.swiglu import swiglu

    return swiglu(gate, up)


def _fused_rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    # hidden_states: [..., H]; weight: [H]
    return _rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # x: [..., H] -> gate, up: [..., I] -> [..., H]
    return self.down_proj(_swiglu(self.gate_proj(x), self.up_proj(x)))


def _is_rms_norm_candidate(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and isinstance(getattr(module, "variance_epsilon", None), float)
        and not any(True for _ in module.children())
    )


def _is_mlp_candidate(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))


_rms_norm_verdicts: dict[type, str | None] = {}


def _rms_norm_mismatch(cls: type) -> str | None:
    """None when ``cls.forward`` computes exactly ``rms_norm_ref``; otherwise why it does not."""
    if cls not in _rms_norm_verdicts:
        from soulchat.kernels.rms_norm import rms_norm_ref

        gen = torch.Generator().manual_seed(0)
        x = (3 * torch.randn(4, 64, generator=gen)).to(torch.bfloat16)  # x: [rows, H]
        weight = (1 + 0.5 * torch.randn(64, generator=gen)).to(torch.bfloat16)
        stand_in = types.SimpleNamespace(weight=weight, variance_epsilon=1e-6)
        verdict = None
        try:
            out = cls.forward(stand_in, x)
        except Exception as err:  # noqa: BLE001 (any failure: it reads attributes we do not provide)
            verdict = f"its forward needs more than weight and variance_epsilon ({type(err).__name__}: {err})"
        else:
            expected = rms_norm_ref(x, weight, 1e-6)
            if not (
                isinstance(out, torch.Tensor) and out.dtype == expected.dtype and torch.equal(out, expected)
            ):
                verdict = "its forward is not weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)"
        _rms_norm_verdicts[cls] = verdict
    return _rms_norm_verdicts[cls]


def _mlp_mismatch(module: nn.Module) -> str | None:
    """None when the module's class computes ``down_proj(silu(gate_proj(x)) * up_proj(x))`` with its own
    activation; otherwise why not. Probed per module: the activation comes from the config."""
    from soulchat.kernels.swiglu import swiglu_ref

    act = getattr(module, "act_fn", None)
    gen = torch.Generator().manual_seed(0)
    projections = {}
    for name, (n_in, n_out) in {"gate_proj": (8, 16), "up_proj": (8, 16), "down_proj": (16, 8)}.items():
        proj = nn.Linear(n_in, n_out, dtype=torch.float64)
        with torch.no_grad():
            proj.weight.copy_(torch.randn(n_out, n_in, generator=gen, dtype=torch.float64))
            proj.bias.copy_(torch.randn(n_out, generator=gen, dtype=torch.float64))
        projections[name] = proj
    stand_in = types.SimpleNamespace(act_fn=act, **projections)
    x = torch.randn(3, 8, generator=gen, dtype=torch.float64)  # x: [rows, H]
    with torch.no_grad():
        try:
            out = type(module).forward(stand_in, x)
        except Exception as err:  # noqa: BLE001 (any failure: it reads attributes we do not provide)
            return (
                f"its forward needs more than gate_proj, up_proj, down_proj and act_fn "
                f"({type(err).__name__}: {err})"
            )
        gate, up = projections["gate_proj"](x), projections["up_proj"](x)
        expected = projections["down_proj"](swiglu_ref(gate, up))
    if not (isinstance(out, torch.Tensor) and torch.allclose(out, expected, rtol=1e-12, atol=1e-12)):
        return f"it does not compute down_proj(silu(gate_proj(x)) * up_proj(x)) (act_fn {type(act).__name__})"
    return None


def apply_fused_kernels(model: nn.Module) -> FusedKernels:
    """Make the RMSNorm modules and gated SwiGLU MLPs of ``model`` call the fused kernels (in place).

    Modules whose transformers forward differs from the kernels' semantics are left alone; each refused
    class gets one note in the returned report and in this module's log. Idempotent.
    """
    report = FusedKernels()
    refused: dict[str, str] = {}
    for module in model.modules():
        kind = getattr(module, "_soulchat_fused", None)
        if kind is not None:  # already swapped by an earlier call
            setattr(report, kind, getattr(report, kind) + 1)
            continue
        if _is_rms_norm_candidate(module):
            kind, why, forward = "rms_norm", _rms_norm_mismatch(type(module)), _fused_rms_norm_forward
        elif _is_mlp_candidate(module):
            kind, why, forward = "swiglu", _mlp_mismatch(module), _fused_mlp_forward
        else:
            continue
        if why is not None:
            refused.setdefault(f"{type(module).__name__} ({kind})", why)
            continue
        # An instance attribute wins over the class's forward in nn.Module.__call__ (hooks still run);
        # deepcopy rebinds the method to the copy.
        module.forward = types.MethodType(forward, module)
        module._soulchat_fused = kind
        setattr(report, kind, getattr(report, kind) + 1)
    for name, why in refused.items():
        note = f"{name} keeps its transformers forward: {why}"
        report.notes.append(note)
        logger.info("fused kernels: %s", note)
    return report


# --------------------------------------------------------------------------------------------------
# The packed loss module
# --------------------------------------------------------------------------------------------------


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
        global _packed_forward
        previous, _packed_forward = _packed_forward, True
        try:
            out = backbone(self.lm)(
                input_ids=input_ids[None],
                position_ids=position_ids[None],
                cu_seq_lens_q=cu_seqlens,
                cu_seq_lens_k=cu_seqlens,
                max_length_q=max_seqlen,
                max_length_k=max_seqlen,
                use_cache=False,
            )
        finally:
            _packed_forward = previous
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


# --------------------------------------------------------------------------------------------------
# Optimizer parameter groups and FLOPs
# --------------------------------------------------------------------------------------------------


def parameter_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only; never on norms and biases (1-D), embeddings optional."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    lm = model.lm if isinstance(model, PackedCausalLM) else model
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is not None:
        embedding_ids |= {id(p) for p in head.parameters()}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or (id(p) in embedding_ids and not decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def matmul_flops(config: Any, tokens: int, trained_tokens: int, sum_sq_seqlens: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one step, for MFU.

    Linear layers: 2 FLOPs per weight per token forward. The lm head only runs on trained tokens.
    Causal attention: QK^T and PV, 2 * 2 * D per (query, key) pair, L^2/2 pairs per conversation.
    """
    h = config.hidden_size
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    inter = config.intermediate_size
    per_layer = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2 + 3 * h * inter
    dense = 2 * per_layer * layers * tokens
    head = 2 * h * config.vocab_size * trained_tokens
    attention = 2 * 2 * heads * head_dim * layers * sum_sq_seqlens / 2
    return 3.0 * (dense + head + attention)


# bf16 dense peak FLOP/s by device name substring (vendor data sheets), for MFU.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def count_parameters(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
