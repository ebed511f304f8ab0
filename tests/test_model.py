"""The packed model path against plain transformers, conversation by conversation."""

from __future__ import annotations

import contextlib
import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM

from soulchat.attention import (
    ATTENTION_NAME,
    UnsupportedModelError,
    register_attention,
    varlen_attention_forward,
)
from soulchat.data.packing import assemble_ref
from soulchat.fused_kernels import apply_fused_kernels, fused_kernels_enabled
from soulchat.kernels.dispatch import force_backend
from soulchat.loading import backbone, decoder_layers, tiny_qwen2_config
from soulchat.model import PackedCausalLM
from soulchat.optimizer import parameter_groups
from soulchat.runlog import matmul_flops

VOCAB = 101


# The PyTorch reference attention kernel (see tests/conftest.py): these tests are about the glue.
pytestmark = pytest.mark.usefixtures("reference_attention")


def tiny_lm(seed: int = 0, **overrides) -> torch.nn.Module:
    register_attention()
    config = tiny_qwen2_config(
        VOCAB,
        eos_token_id=0,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **overrides,
    )
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION_NAME, dtype=torch.float32)
    lm.config.use_cache = False
    return lm


def random_conversations(lengths, seed: int, weighted: bool):
    """Token ids, trained flags and loss weights of conversations of the given lengths."""
    rng = np.random.default_rng(seed)
    convs = []
    for n in lengths:
        ids = rng.integers(1, VOCAB, n).astype(np.int32)
        trained = rng.random(n) < 0.6
        trained[0] = False  # a conversation starts with a prompt, never a target
        weight = np.where(trained, rng.uniform(0.2, 2.0, n) if weighted else 1.0, 0.0).astype(np.float32)
        convs.append((ids, trained, weight))
    return convs


def packed_batch(convs) -> dict[str, torch.Tensor]:
    tokens = np.concatenate([c[0] for c in convs])
    trained = np.concatenate([c[1] for c in convs]).astype(np.uint8)
    weight = np.concatenate([c[2] for c in convs])
    offsets = np.zeros(len(convs) + 1, dtype=np.int64)
    np.cumsum([len(c[0]) for c in convs], out=offsets[1:])
    batch = assemble_ref(tokens, trained, weight, offsets, np.arange(len(convs)))
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def reference_loss(lm, convs) -> torch.Tensor:
    """Plain transformers (SDPA), one conversation at a time, labels masked to trained tokens."""
    total = torch.zeros(())
    for ids, trained, weight in convs:
        ids_t = torch.from_numpy(ids.astype(np.int64))
        logits = lm(input_ids=ids_t[None]).logits[0]  # [L, V]
        target_mask = torch.from_numpy(trained[1:])
        if not target_mask.any():
            continue
        per_token = torch.nn.functional.cross_entropy(
            logits[:-1][target_mask], ids_t[1:][target_mask], reduction="none"
        )
        total = total + (per_token * torch.from_numpy(weight[1:][trained[1:]])).sum()
    return total


@contextlib.contextmanager
def fused_backends(name: str | None):
    """Force the fused RMSNorm and SwiGLU to one backend ("triton" runs in the interpreter on a CPU)."""
    with force_backend("rms_norm", name), force_backend("swiglu", name):
        yield


def autograd_ops(loss: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind ``loss``: which functions the forward really went through."""
    seen, stack, names = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


# fused: "off" = transformers' own norms and MLPs; "reference" / "triton" = the modules swapped by
# apply_fused_kernels, with the kernels forced to that backend (Triton under the interpreter).
@pytest.mark.parametrize("fused", ["off", "reference", "triton"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_packed_loss_and_grads_equal_unpacked_transformers(tied, weighted, fused):
    # Odd lengths on purpose: 1 (no target at all), 2, and a long one next to short ones.
    convs = random_conversations([1, 2, 17, 5, 64, 9], seed=3, weighted=weighted)
    lm = tiny_lm(tie_word_embeddings=tied)
    ref_lm = copy.deepcopy(lm)  # before the swap: the reference is plain transformers
    ref_lm.set_attn_implementation("sdpa")
    if fused != "off":
        report = apply_fused_kernels(lm)
        layers = lm.config.num_hidden_layers
        assert (report.rms_norm, report.swiglu, report.notes) == (2 * layers + 1, layers, [])
        assert lm.state_dict().keys() == ref_lm.state_dict().keys()

    packed = PackedCausalLM(lm)
    with fused_backends(None if fused == "off" else fused):
        loss = packed(**{k: v for k, v in packed_batch(convs).items()})
        loss.backward()
    if fused == "triton":  # the kernels really ran (a forced backend never falls back silently)
        assert {"RMSNormFunctionBackward", "SwiGLUFunctionBackward"} <= autograd_ops(loss)
    ref = reference_loss(ref_lm, convs)
    ref.backward()

    assert loss.item() > 0
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    ref_params = dict(ref_lm.named_parameters())
    checked = 0
    for name, p in lm.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
        assert p.grad.abs().sum() > 0, name
        checked += 1
    assert checked == len(ref_params)


class OnePlusRMSNorm(nn.Module):
    """Gemma's convention, (1 + weight) * normalised x: looks like a Qwen2 norm from outside."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(hidden))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1 + self.weight) * h.to(x.dtype)


def test_fused_kernels_leave_other_modules_alone_with_a_note(caplog):
    lm = tiny_lm(hidden_act="gelu_pytorch_tanh")  # not a SwiGLU MLP
    lm.model.norm = OnePlusRMSNorm(lm.config.hidden_size, lm.config.rms_norm_eps)
    before = copy.deepcopy(lm)
    with caplog.at_level(logging.INFO, logger="soulchat.fused_kernels"):
        report = apply_fused_kernels(lm)
    layers = lm.config.num_hidden_layers
    assert (report.rms_norm, report.swiglu) == (2 * layers, 0)  # the decoder layers' Qwen2RMSNorms only
    assert len(report.notes) == 2
    assert any(n.startswith("Qwen2MLP (swiglu)") and "GELUTanh" in n for n in report.notes)
    assert any(n.startswith("OnePlusRMSNorm (rms_norm)") for n in report.notes)
    assert "Qwen2MLP (swiglu) keeps its transformers forward" in caplog.text
    assert "OnePlusRMSNorm (rms_norm) keeps its transformers forward" in caplog.text
    assert "forward" not in vars(lm.model.norm) and "forward" not in vars(lm.model.layers[0].mlp)
    assert "forward" in vars(lm.model.layers[0].input_layernorm)
    # Nothing changed what the model computes, and a second call changes nothing either.
    ids = torch.randint(1, VOCAB, (1, 11))
    with fused_backends("reference"):
        torch.testing.assert_close(lm(input_ids=ids).logits, before(input_ids=ids).logits)
    again = apply_fused_kernels(lm)
    assert (again.rms_norm, again.swiglu) == (report.rms_norm, report.swiglu)


def test_fused_kernels_setting_resolves_by_device():
    assert fused_kernels_enabled("auto", "cuda")
    assert not fused_kernels_enabled("auto", "cpu")  # the kernels would pick the PyTorch reference anyway
    assert not fused_kernels_enabled("auto", "cuda", compiled=True)  # inductor fuses these itself
    assert fused_kernels_enabled("on", "cpu") and fused_kernels_enabled("on", "cuda", compiled=True)
    assert not fused_kernels_enabled("off", "cuda")
    with pytest.raises(ValueError, match="auto, on or off"):
        fused_kernels_enabled("yes", "cuda")


def test_no_dense_mask_and_boundaries_reach_attention():
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")))
        return varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)

    lm = tiny_lm()
    batch = packed_batch(random_conversations([7, 12, 3], seed=1, weighted=False))
    AttentionInterface.register(ATTENTION_NAME, spy)
    try:
        PackedCausalLM(lm)(**batch)
    finally:
        register_attention()
    assert len(seen) == lm.config.num_hidden_layers
    for mask, cu, max_len in seen:
        assert mask is None  # no [T, T] mask was built
        assert cu.tolist() == [0, 7, 19, 22] and max_len == 12


def test_packed_forward_under_bf16_autocast_matches_sdpa():
    # Under autocast with fp32 weights, rotary promotes q and k to fp32 while v is bf16: the packed
    # path must cast them alike (as SDPA does) and give the same loss as the unpacked SDPA model.
    lm = tiny_lm()
    convs = random_conversations([9, 5, 14], seed=4, weighted=False)
    batch = packed_batch(convs)
    ref_lm = copy.deepcopy(lm)
    ref_lm.set_attn_implementation("sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = PackedCausalLM(lm)(**batch)
        unpacked = reference_loss(ref_lm, convs)
    assert torch.isfinite(packed)
    torch.testing.assert_close(packed.float(), unpacked.float(), rtol=2e-2, atol=0.0)


def test_plain_forward_falls_back_to_sdpa():
    # Without cu_seqlens (generation, plain use) the same implementation is ordinary causal attention.
    lm = tiny_lm()
    ref_lm = copy.deepcopy(lm)
    ref_lm.set_attn_implementation("sdpa")
    ids = torch.randint(1, VOCAB, (2, 9))
    torch.testing.assert_close(lm(input_ids=ids).logits, ref_lm(input_ids=ids).logits)


def test_packed_attention_rejects_unsupported_features():
    lm = tiny_lm()
    attn = decoder_layers(lm)[0].self_attn
    q = torch.randn(1, 4, 5, 16)
    k = torch.randn(1, 2, 5, 16)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(UnsupportedModelError, match="^qwen2: .*attention sinks"):
        varlen_attention_forward(attn, q, k, k, None, s_aux=torch.zeros(4), cu_seq_lens_q=cu, max_length_q=5)
    attn.train()
    with pytest.raises(UnsupportedModelError, match="^qwen2: attention dropout 0.1"):
        varlen_attention_forward(attn, q, k, k, None, dropout=0.1, cu_seq_lens_q=cu, max_length_q=5)
    with pytest.raises(ValueError, match="batch size 1"):
        varlen_attention_forward(
            attn,
            q.expand(2, -1, -1, -1),
            k.expand(2, -1, -1, -1),
            k.expand(2, -1, -1, -1),
            None,
            cu_seq_lens_q=cu,
            max_length_q=5,
        )


def test_parameter_groups_skip_norms_biases_and_embeddings():
    lm = tiny_lm(tie_word_embeddings=False)
    model = PackedCausalLM(lm)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = parameter_groups(model, 0.1, decay_embeddings=False)
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "lm.model.layers.0.self_attn.q_proj.weight" in decayed
    assert "lm.model.layers.0.mlp.down_proj.weight" in decayed
    assert "lm.model.layers.0.self_attn.q_proj.bias" in skipped
    assert "lm.model.layers.0.input_layernorm.weight" in skipped
    assert "lm.model.norm.weight" in skipped
    assert {"lm.model.embed_tokens.weight", "lm.lm_head.weight"} <= skipped
    assert decayed.isdisjoint(skipped) and len(decayed) + len(skipped) == len(names)
    decay, _ = parameter_groups(model, 0.1, decay_embeddings=True)
    assert "lm.model.embed_tokens.weight" in {names[id(p)] for p in decay["params"]}


def test_structure_helpers():
    lm = tiny_lm()
    assert len(decoder_layers(lm)) == 2
    assert backbone(lm) is lm.model
    flops = matmul_flops(lm.config, tokens=100, trained_tokens=10, sum_sq_seqlens=100 * 100)
    assert flops > 0


def _compile_and_record(lm, backend: str):
    """Compile each decoder layer with a backend that keeps the FX graphs; run one packed step."""
    import torch._dynamo

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for layer in decoder_layers(lm):
        layer.compile(backend=record, dynamic=False)
    batch = packed_batch(random_conversations([7, 12, 3], seed=1, weighted=False))
    with force_backend("attention", backend):
        PackedCausalLM(lm)(**batch).backward()
    ops = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    torch._dynamo.reset()
    return ops, breaks


def test_compiled_layers_trace_the_attention_custom_op():
    # The Triton backend is a custom op: a compiled decoder layer holds it in its graph, unbroken.
    ops, breaks = _compile_and_record(tiny_lm(), "triton")
    assert "soulchat.varlen_attention_fwd.default" in ops
    assert breaks == 0


def test_reference_attention_stays_outside_compiled_graphs():
    # The reference loops over conversations in Python: it runs outside the graph (a graph break).
    ops, breaks = _compile_and_record(tiny_lm(), "reference")
    assert not any("varlen" in op for op in ops)
    assert breaks > 0


def test_plain_single_sequence_forward_keeps_the_sliding_window():
    # A plain forward of one unmasked sequence runs through the packed kernel as one conversation, so
    # a window (layer 1 of 2 here, by max_window_layers) is applied as the model's own eager forward does.
    lm = tiny_lm(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    ref_lm = copy.deepcopy(lm)
    ref_lm.config._attn_implementation = "eager"
    ids = torch.randint(1, VOCAB, (1, 13))
    torch.testing.assert_close(lm(input_ids=ids).logits, ref_lm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    no_window = tiny_lm()
    assert not torch.allclose(no_window(input_ids=ids).logits, ref_lm(input_ids=ids).logits, atol=1e-3)


def test_model_directory_without_weights_is_a_clear_error(tmp_path):
    from soulchat.loading import build_model
    from soulchat.options import ModelConfig

    tiny_lm().config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="has a config.json but no weights"):
        build_model(ModelConfig(model=str(tmp_path)), None, seed=0)


def test_family_that_mixes_tokens_is_refused_before_loading(tmp_path):
    from transformers import AutoConfig

    from soulchat.loading import build_model
    from soulchat.options import ModelConfig

    # falcon's layers pick their attention class from a dict without custom names (a KeyError there)
    AutoConfig.for_model("falcon", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="^falcon: its attention does not go through"):
        build_model(ModelConfig(model=str(tmp_path)), None, seed=0)


def test_packed_forward_flag_is_not_read_inside_compiled_code():
    """The flag that makes a packed forward refuse an attention call without boundaries is read outside
    torch.compile: a compiled attention call neither bakes it in nor guards on it, so flipping it never
    recompiles (error_on_recompile) and the refusal still comes from the current value."""
    import torch._dynamo

    from soulchat.attention import UnsupportedModelError, packed_forward

    lm = tiny_lm()
    attention = lm.model.layers[0].self_attn
    q = torch.randn(1, 4, 7, 16)
    k, v = torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)

    def call(q, k, v):
        return varlen_attention_forward(attention, q, k, v, None)[0]

    torch._dynamo.reset()
    compiled = torch.compile(call, backend="eager")
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            plain = compiled(q, k, v)  # a plain forward: one sequence, no boundaries
            torch.testing.assert_close(plain, call(q, k, v))
            refused = pytest.raises(UnsupportedModelError, match="do not pass the packed boundaries")
            with packed_forward(), refused:
                compiled(q, k, v)
            torch.testing.assert_close(compiled(q, k, v), plain)  # the flag is back to False
    finally:
        torch._dynamo.reset()
