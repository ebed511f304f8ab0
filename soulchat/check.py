"""The preflight probe: proves, on the user's own model, device and dtype, that packed training is exact.

A few short random conversations are packed into one row and run through ``PackedCausalLM``:

(a) isolation: the hidden states at conversation B's positions are the same with and without a
    conversation A before it, and when A's tokens (and length) change;
(b) causality: changing B's tokens after position t changes nothing before t;
(c) the loss: the backbone's hidden states of one sequence equal those of the model's own forward
    (transformers' eager attention with the model's own masks: windows, soft-caps), and the fused loss
    on those hidden states equals the model's own cross-entropy from its logits (which catches lm-head
    scaling, soft-caps, head bias and any extra final transform), and so does the packed loss itself.

Any failure raises ``UnsupportedModelError`` (a ValueError) with one line naming the family, the
property and what to do. ``preflight(model)`` is what ``train`` calls before step 1: under FSDP2 after
sharding, on every rank; every rank runs the same forwards on the same inputs (seeded on the host) and
the verdict is taken on errors max-reduced over ranks, so all ranks pass or all raise together.

``python -m soulchat.check --model DIR`` runs it standalone: one line, exit 0 (OK) or 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from soulchat.attention import family, refuse
from soulchat.loading import backbone, build_model
from soulchat.model import PackedCausalLM
from soulchat.options import ModelConfig

# Probe lengths: A, B, and the position in B after which its tokens change. Short (forwards of <= 28
# tokens) but longer than the 2-4 token convolutions of hybrid models and the few-token sliding
# windows of test configs, so both matter.
LEN_A, LEN_B, CUT_B = 11, 17, 9

# Bounds, relative to the dtype's machine epsilon (fp32 2^-23, TF32 matmuls 2^-10, fp16 2^-10,
# bf16 2^-7). Hidden states are compared per position, ||x - y|| / ||y||, maxed over positions.
# A leak is small on a random-init model: 4e-3 (bloom's alibi) and 6e-3 (falcon_h1's mamba) relative on
# the tiny fp32 models of the tests, below bf16's epsilon. So the sensitive checks compare rows of the
# SAME shape (A replaced by other tokens of its length; B's tail changed): every GEMM and attention
# block sees the same shapes and offsets, and a computation that keeps conversations apart gives B
# bit-identical states (measured 0.0 on every dense exact family in fp32). SAME_EPS = 4 leaves room
# for mixture-of-experts layers, whose expert GEMMs take their shapes from the routing of A's tokens
# (qwen3_moe, mixtral: 1.1 eps in fp32). In bf16 that is 0.031: a leak as small as a random model's
# would pass there, a trained model's (attention that really reads the previous conversation) not;
# the fp32 matrix of tests/test_families.py is where small leaks are caught.
SAME_EPS = 4
# Rows of other shapes (B alone against B after A, the model's own eager forward against ours) round
# differently. In fp32 the difference comes from the order of accumulation and grows with depth, ~1
# eps per layer (2-layer families <= 2.6e-7, ~2 eps; the 28-layer Qwen2.5-1.5B shape 3.0e-6, 25 eps):
# bound 4 eps per layer, at least 32 eps (28 layers: 1.3e-5). In fp16/bf16 both paths round their
# stored activations alike and that dominates (the 1.5B shape in bf16: 2.6e-2, 3.4 eps): 32 eps = 0.25.
HIDDEN_EPS = 32
HIDDEN_EPS_PER_LAYER = 4  # fp32 (and TF32) only
# The loss of the same hidden states through the fused kernel and through the model's own logits:
# only the lm-head GEMM rounds differently (logits kept in fp32 in the kernel, rounded to the dtype
# by transformers), ~1 eps relative on the mean; a missing logit scale or soft-cap is >= 5e-2.
HEAD_EPS = 4
# The end-to-end packed loss against the model's own forward: the hidden-state noise above, averaged.
LOSS_EPS = 16


@dataclass
class PreflightReport:
    family: str
    dtype: str
    device: str
    seconds: float
    errors: dict[str, float]  # measured, relative
    bounds: dict[str, float]
    notes: list[str]  # what PackedCausalLM changed (attention dropout set to 0)

    def summary(self) -> str:
        worst = ", ".join(f"{k} {v:.1e}/{self.bounds[k]:.0e}" for k, v in self.errors.items())
        notes = "".join(f"; note: {n}" for n in self.notes)
        return (
            f"preflight OK: {self.family} packs exactly on {self.device} in {self.dtype} "
            f"({self.seconds:.2f} s; error/bound: {worst}){notes}"
        )


def machine_epsilon(dtype: torch.dtype, device: torch.device) -> float:
    """The dtype's epsilon; fp32 on CUDA with TF32 matmuls allowed counts as TF32 (10 mantissa bits)."""
    if dtype == torch.float32 and device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return 2.0**-10
    return float(torch.finfo(dtype).eps)


def _compute_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def _relative(x: torch.Tensor, y: torch.Tensor) -> float:
    """max over positions of ||x_p - y_p|| / ||y_p||; x, y: [L, H]."""
    x, y = x.float(), y.float()
    num = (x - y).norm(dim=-1)
    den = y.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    return float((num / den).max())


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        local = getattr(p, "_local_tensor", p)  # a DTensor under FSDP2: its shard's device
        if local.device.type != "meta":
            return local.device
    return torch.device("cpu")


class _Rows:
    """Builds packed rows of given conversations on ``device``: the micro-batch contract of the README."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def row(self, *convs: torch.Tensor) -> dict[str, Any]:
        lengths = [len(c) for c in convs]
        ids = torch.cat(convs)
        positions = torch.cat([torch.arange(n) for n in lengths])
        cu = torch.zeros(len(convs) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        return {
            "input_ids": ids.to(self.device),
            "position_ids": positions.to(self.device),
            "cu_seqlens": cu.to(self.device),
            "max_seqlen": max(lengths),
        }


def _hidden(model: PackedCausalLM, row: dict[str, Any]) -> torch.Tensor:
    return model(run=lambda m: m.hidden_states(**row))


def _own_forward(model: PackedCausalLM, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's own forward on one sequence [L] (eager attention, its own masks), with the backbone's
    last hidden state, and the fused loss on that same hidden state; inside PackedCausalLM's forward."""

    def run(m: PackedCausalLM) -> dict[str, torch.Tensor]:
        captured = {}

        def keep(_module, _args, output):
            captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        def keep_head_input(_module, args):
            captured.setdefault("hidden", args[0])

        config = m.lm.config
        previous = config._attn_implementation
        config._attn_implementation = "eager"  # the setter reaches the sub-configs too
        # The backbone's output; a model that calls an inner module instead (OPT calls model.decoder)
        # gives what its lm head receives.
        handles = [
            backbone(m.lm).register_forward_hook(keep),
            m.lm.get_output_embeddings().register_forward_pre_hook(keep_head_input),
        ]
        try:
            out = m.lm(input_ids=ids[None], use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
            config._attn_implementation = previous
        logits = out.logits[0, :-1].float()  # [L-1, V]
        targets = ids[1:]
        own = torch.nn.functional.cross_entropy(logits, targets)  # what forward(labels=ids) returns
        hidden = captured["hidden"][0]  # [L, H]
        ones = torch.ones(len(targets), device=ids.device)
        fused = m.head_loss(hidden[:-1], targets, ones) / len(targets)
        return {"hidden": hidden, "own_loss": own, "fused_loss": fused}

    return model(run=run)


def _packed_loss(model: PackedCausalLM, rows: _Rows, ids: torch.Tensor) -> torch.Tensor:
    row = rows.row(ids)
    n = len(ids) - 1
    labels = torch.cat([ids[1:], ids.new_full((1,), -100)]).to(rows.device)
    loss = model(
        **row,
        loss_index=torch.arange(n, device=rows.device),
        labels=labels,
        loss_weight=torch.ones(n, device=rows.device),
    )
    return loss / n


def _reshard(model: nn.Module) -> None:
    """Under FSDP2 the root keeps its parameters gathered after a forward (it reshards after backward,
    and the probe has none): reshard every FSDP module, or an optimizer built next would hold the
    gathered tensors instead of the sharded parameters (the root's weights would then never update)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """The same verdict on every rank: errors max-reduced (a collective only when distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def preflight(model: PackedCausalLM, *, compute_dtype: torch.dtype | None = None, seed: int = 0) -> PreflightReport:
    """Prove packed training exact on ``model`` (a PackedCausalLM, FSDP2-sharded or not; under DDP pass
    the module inside the wrapper) or raise ``UnsupportedModelError``. Call it where training computes
    (inside the same autocast context); ``compute_dtype`` sets the bounds (default: the autocast dtype,
    else the parameters' dtype; pass the FSDP2 param_dtype under FSDP2). Collective-safe: call it on
    every rank. The model's train/eval mode is restored; no gradients are computed."""
    if not isinstance(model, PackedCausalLM):
        raise TypeError(f"preflight needs the PackedCausalLM (got {type(model).__name__}); under DDP pass .module")
    t0 = time.perf_counter()
    config = model.lm.config
    device = _device(model)
    dtype = compute_dtype or _compute_dtype(model, device)
    eps = machine_epsilon(dtype, device)
    layers = int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 1)
    per_layer = HIDDEN_EPS_PER_LAYER * layers if dtype == torch.float32 else 0
    hidden_bound = max(HIDDEN_EPS, per_layer) * eps
    vocab = model.lm.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)  # on the host: identical inputs on every rank

    def tokens(n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (n,), generator=gen)

    a, a_other, b = tokens(LEN_A), tokens(LEN_A), tokens(LEN_B)
    b_changed = torch.cat([b[:CUT_B], tokens(LEN_B - CUT_B)])
    rows = _Rows(device)
    was_training = model.training
    model.train(False)  # no dropout: the probe compares outputs exactly
    try:
        with torch.no_grad():
            h_b = _hidden(model, rows.row(b))
            h_ab = _hidden(model, rows.row(a, b))
            h_a_other_b = _hidden(model, rows.row(a_other, b))
            h_ab_changed = _hidden(model, rows.row(a, b_changed))
            own = _own_forward(model, b.to(device))
            packed_loss = _packed_loss(model, rows, b.to(device))
    finally:
        model.train(was_training)
        _reshard(model)
    errors = {
        "isolation": _relative(h_a_other_b[LEN_A:], h_ab[LEN_A:]),
        "isolation without A": _relative(h_ab[LEN_A:], h_b),
        "causality": _relative(h_ab_changed[: LEN_A + CUT_B], h_ab[: LEN_A + CUT_B]),
        "hidden vs own forward": _relative(h_b, own["hidden"]),
        "head loss vs own logits": _relative_scalar(own["fused_loss"], own["own_loss"]),
        "packed loss vs own forward": _relative_scalar(packed_loss, own["own_loss"]),
    }
    bounds = {
        "isolation": SAME_EPS * eps,
        "isolation without A": hidden_bound,
        "causality": SAME_EPS * eps,
        "hidden vs own forward": hidden_bound,
        "head loss vs own logits": HEAD_EPS * eps,
        "packed loss vs own forward": LOSS_EPS * eps,
    }
    measured = dict(zip(errors, _max_over_ranks(list(errors.values()), device)))
    for name, value in measured.items():
        if not math.isfinite(value):  # not a packing fault: the weights or the inputs' math overflow
            raise refuse(config, f"preflight {name} gave non-finite outputs ({value})",
                         "check the model's weights for NaN/Inf and the --mixed-precision setting")
        if not value <= bounds[name]:
            raise refuse(config, f"preflight {name} failed ({value:.2e} relative, bound {bounds[name]:.1e} "
                         f"in {str(dtype).removeprefix('torch.')})", _FIX[name])
    return PreflightReport(
        family(config),
        str(dtype).removeprefix("torch."),
        str(device),
        time.perf_counter() - t0,
        measured,
        bounds,
        list(model.notes),
    )


def _relative_scalar(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.float() - y.float()).abs() / y.float().abs().clamp_min(torch.finfo(torch.float32).tiny))


_MIXES = (
    "its layers mix tokens across conversations (convolutions, state-space layers, attention that "
    "ignores the packed boundaries): soulchat cannot pack it; pick a model of another family"
)
_FIX = {
    "isolation": _MIXES,
    "isolation without A": _MIXES,
    "causality": "its outputs depend on later tokens: soulchat trains causal LMs only",
    "hidden vs own forward": "the packed attention does not compute what the model's own attention does "
    "(an attention variant soulchat does not implement): pick a model of another family",
    "head loss vs own logits": "its lm head transforms the logits in a way the fused loss does not "
    "(a bias, a scale or a final transform): pick a model of another family",
    "packed loss vs own forward": "the packed loss differs from the model's own loss: pick a model of "
    "another family",
}


# --------------------------------------------------------------------------------------------------
# python -m soulchat.check --model DIR
# --------------------------------------------------------------------------------------------------

_CLI_FIELDS = ("model", "trust_remote_code", "mixed_precision")


def parse_args(argv: list[str] | None) -> tuple[ModelConfig, str]:
    parser = argparse.ArgumentParser(
        prog="python -m soulchat.check",
        description="Prove that soulchat trains a local model exactly (packed isolation, causality, loss).",
    )
    helps = {f.name: f.metadata.get("help", "") for f in fields(ModelConfig)}
    parser.add_argument("--model", required=True, help=helps["model"])
    parser.add_argument("--trust-remote-code", action="store_true", help=helps["trust_remote_code"])
    parser.add_argument(
        "--mixed-precision", choices=["auto", "bf16", "fp32"], default="auto", help=helps["mixed_precision"]
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where to run the probe: auto = cuda when available, else cpu")
    args = parser.parse_args(argv)
    cfg = ModelConfig(**{name: getattr(args, name) for name in _CLI_FIELDS})
    return cfg, args.device


def run_check(cfg: ModelConfig, device_name: str = "auto") -> PreflightReport:
    device = torch.device("cuda" if device_name == "auto" and torch.cuda.is_available() else
                          "cpu" if device_name == "auto" else device_name)
    dtype = torch.float32
    if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda"):
        dtype = torch.bfloat16
    lm = build_model(cfg, None, seed=0, device="cpu")
    model = PackedCausalLM(lm).to(device)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )
    with autocast:
        return preflight(model, compute_dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    """One line on stdout (OK, exit 0) or stderr (the refusal, exit 2); library chatter is silenced."""
    import logging

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("soulchat.attention").setLevel(logging.ERROR)  # its notes are in the OK line
    try:
        cfg, device = parse_args(argv)
        report = run_check(cfg, device)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:  # UnsupportedModelError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
