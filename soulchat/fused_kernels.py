"""``--fused-kernels``: the RMSNorm modules and gated SwiGLU MLPs of a loaded model call soulchat's fused
``rms_norm`` and ``swiglu`` kernels (on by default for CUDA; see ``fused_kernels_enabled``).
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)
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
