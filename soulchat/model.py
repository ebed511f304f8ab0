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
fused ``linear_cross_entropy`` (the [T, V] logits are never built).

With ``--fused-kernels`` (on by default for CUDA) the RMSNorm modules and the gated MLPs of
Llama/Qwen2-family models call the fused ``rms_norm`` and ``swiglu`` kernels (see ``apply_fused_kernels``).
"""

from __future__ import annotations

import logging
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from soulchat.config import ModelConfig

logger = logging.getLogger(__name__)

ATTENTION_NAME = "soulchat_varlen"
ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN_TOKENIZER = ASSETS / "tokenizer"

# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


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

    Without ``cu_seq_lens_q`` (generation, a plain forward) it falls back to transformers' SDPA, so a
    model that trained with this implementation still works for ordinary use in the same process.
    """
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            scaling=scaling,
            dropout=dropout,
            sliding_window=sliding_window,
            softcap=softcap,
            **kwargs,
        )
    if query.shape[0] != 1:
        raise ValueError(
            f"{ATTENTION_NAME}: packed rows are one sequence (batch size 1), got batch {query.shape[0]}"
        )
    if dropout and module.training:
        raise NotImplementedError(
            f"{ATTENTION_NAME}: attention dropout ({dropout}) is not supported; set the model config's "
            "attention_dropout to 0"
        )
    if sliding_window is not None or softcap is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            f"{ATTENTION_NAME}: sliding-window attention, attention-logit soft-capping and attention "
            "sinks are not supported by the packed varlen kernel; disable them in the model config"
        )
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
    out = _varlen_attention(q, k, v, cu_seqlens, int(max_seqlen), softmax_scale=scaling, causal=True)
    return out.unsqueeze(0), None  # out: [1, T, Hq, D]


@torch.compiler.disable
def _varlen_attention(*args: Any, **kwargs: Any) -> torch.Tensor:
    """The kernel dispatcher, outside torch.compile (--compile): its reference backend loops over the
    conversations of the row in Python (data-dependent shapes that inductor mis-compiled in testing),
    and the fast backends are kernels of their own. torch.compile then fuses what is around attention."""
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
    """The tokenizer of ``--tokenizer``, else of ``--model``, else the bundled one."""
    from transformers import AutoTokenizer

    if cfg.tokenizer is not None:
        path, flag = _check_dir(cfg.tokenizer, "tokenizer directory", "--tokenizer"), "--tokenizer"
    elif cfg.model is not None:
        path, flag = _check_dir(cfg.model, "model directory", "--model"), "--model"
    else:
        path, flag = BUILTIN_TOKENIZER, "(bundled tokenizer)"
        if not path.is_dir():
            raise FileNotFoundError(f"the bundled tokenizer {path} is missing: reinstall soulchat")
    try:
        return AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load a tokenizer from {path} ({flag}): {err}. The directory needs the tokenizer "
            "files (tokenizer.json or the model's vocabulary files); pass --tokenizer DIR to use another"
        ) from err


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


def build_model(
    cfg: ModelConfig, tokenizer, seed: int, device: torch.device | str = "cpu", load_kwargs: dict | None = None
):
    """A causal LM with the packed attention implementation, fp32 weights, in train mode.

    ``device="meta"`` builds the structure without weights (for ranks that receive them by broadcast).
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
        if str(device) == "meta":
            config = AutoConfig.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=cfg.trust_remote_code
            )
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(
                    config,
                    attn_implementation=ATTENTION_NAME,
                    trust_remote_code=cfg.trust_remote_code,
                    **load,
                )
        else:
            try:
                # fp32 master weights: the optimizer updates fp32, compute is cast (bf16 on GPU).
                model = AutoModelForCausalLM.from_pretrained(
                    str(path),
                    local_files_only=True,
                    trust_remote_code=cfg.trust_remote_code,
                    attn_implementation=ATTENTION_NAME,
                    **load,
                )
            except ValueError as err:
                if "attn_implementation" in str(err) or ATTENTION_NAME in str(err):
                    raise ValueError(
                        f"the model in {path} does not support custom attention implementations "
                        f"(transformers' AttentionInterface), which packed training needs: {err}"
                    ) from err
                raise
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
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
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        head = lm.get_output_embeddings()
        if head is None or getattr(head, "bias", None) is not None:
            raise ValueError(f"{type(lm).__name__}: need an lm head without bias for the fused loss")
        # Some models soft-cap their final logits (Gemma 2); the fused loss applies the same cap.
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        loss_index: torch.Tensor,
        labels: torch.Tensor,
        loss_weight: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids/position_ids/labels: [T]; cu_seqlens int32 [S+1]; loss_index [N]; loss_weight [N]."""
        from soulchat.kernels.linear_cross_entropy import linear_cross_entropy

        out = backbone(self.lm)(
            input_ids=input_ids[None],
            position_ids=position_ids[None],
            cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens,
            max_length_q=max_seqlen,
            max_length_k=max_seqlen,
            use_cache=False,
        )
        hidden = out.last_hidden_state[0]  # [T, H]
        picked = hidden.index_select(0, loss_index)  # [N, H]: only trained positions reach the lm head
        targets = labels.index_select(0, loss_index)  # [N]
        weight = self.lm.get_output_embeddings().weight  # [V, H]
        return linear_cross_entropy(picked, weight, targets, loss_weight, softcap=self.softcap)


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
