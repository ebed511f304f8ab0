"""Every family soulchat is offered: packed == per-conversation through the model's own forward, or refused.

Tiny random configs (hidden 64, 2 layers, the bundled tokenizer's vocabulary) of the causal-LM families
transformers ships. "exact" families must pass the preflight probe and give the packed loss and every
gradient of the per-conversation reference (the model's own eager forward, fp32, labels masked as the
packed ones); refused families must be refused with UnsupportedModelError, by the family pre-check
AND by the probe alone (the pre-check table emptied). The quick subset runs unmarked, the rest is slow.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import soulchat.attention as attention_module
from soulchat.attention import (
    ATTENTION_NAME,
    UnsupportedModelError,
    _attention_kernel_accepts,
    register_attention,
)
from soulchat.check import preflight
from soulchat.data.packing import assemble_ref
from soulchat.loading import BUILTIN_TOKENIZER
from soulchat.model import PackedCausalLM

pytestmark = pytest.mark.usefixtures("reference_attention")

VOCAB = len(AutoTokenizer.from_pretrained(str(BUILTIN_TOKENIZER)))
BASE = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "attention_dropout": 0.0,
    "pad_token_id": 0,  # library defaults (151329 for glm) lie outside the bundled vocabulary
    "bos_token_id": 1,
    "eos_token_id": 2,
}
WINDOW = 6  # shorter than the test's conversations (up to 30 tokens): the window really cuts
HAS_WINDOW = _attention_kernel_accepts("window")
HAS_SOFTCAP = _attention_kernel_accepts("softcap")
NO_WINDOW = "sliding-window attention .* is not in this build's attention kernel"
NO_SOFTCAP = "attention-logit soft-capping .* is not in this build's attention kernel"
MIXES = "mix tokens across conversation|carry state across|do not pass the packed boundaries|ignores the packed"

# family -> (config overrides, None for exact or a regex the refusal must match). Mixture-of-experts
# configs route with plain top-k (no jitter), dropout everywhere else is 0: deterministic.
FAMILIES: dict[str, tuple[str, dict, str | None]] = {
    "qwen2": ("qwen2", {}, None),
    "qwen2_window": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
        None if HAS_WINDOW else NO_WINDOW,
    ),
    "qwen3": ("qwen3", {}, None),
    "qwen3_moe": (
        "qwen3_moe",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1},
        None,
    ),
    "llama": ("llama", {}, None),
    "mistral": ("mistral", {}, None),  # its default window (4096) is longer than any row here
    "mistral_window": ("mistral", {"sliding_window": WINDOW}, None if HAS_WINDOW else NO_WINDOW),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "router_jitter_noise": 0.0}, None),
    "gemma": ("gemma", {}, None),
    "gemma2": (  # library defaults: attention soft-cap 50, final soft-cap 30, alternating windows
        "gemma2",
        {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]},
        None if HAS_WINDOW and HAS_SOFTCAP else f"{NO_WINDOW}|{NO_SOFTCAP}",
    ),
    "gemma2_full": (
        "gemma2",
        {"attn_logit_softcapping": None, "layer_types": ["full_attention", "full_attention"]},
        None,
    ),
    "gemma3_text": (
        "gemma3_text",
        {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]},
        None if HAS_WINDOW else NO_WINDOW,
    ),
    "phi3": ("phi3", {}, None),
    "glm": ("glm", {}, None),
    "glm4": ("glm4", {}, None),
    "internlm3": ("internlm3", {}, None),
    "olmo2": ("olmo2", {}, None),
    "deepseek_v3": (
        "deepseek_v3",
        {
            "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
            "v_head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1,
            "topk_group": 1, "moe_intermediate_size": 32, "first_k_dense_replace": 1, "head_dim": 8,
            "num_key_value_heads": 4,  # multi-head latent attention: as many kv heads as query heads
        },  # fmt: skip
        None,
    ),
    "smollm3": ("smollm3", {"no_rope_layers": [1, 0]}, None),
    "starcoder2": ("starcoder2", {"residual_dropout": 0.0, "embedding_dropout": 0.0}, None),
    "gpt_neox": ("gpt_neox", {"hidden_dropout": 0.0}, None),
    "granite": (  # lm-head scaling: logits / logits_scaling
        "granite",
        {"logits_scaling": 4.0, "embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2},
        None,
    ),
    "cohere": ("cohere", {"logit_scale": 0.0625}, None),  # logits * logit_scale
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "resid_pdrop": 0.0, "embd_pdrop": 0.0}, None),
    "opt": ("opt", {"ffn_dim": 96, "dropout": 0.0, "attention_dropout": 0.1, "word_embed_proj_dim": 64}, None),
    "stablelm": ("stablelm", {}, MIXES),
    "bloom": ("bloom", {"n_layer": 2, "n_head": 4}, MIXES),
    "lfm2": ("lfm2", {"layer_types": ["conv", "full_attention"]}, MIXES),
    "falcon_h1": (
        "falcon_h1",
        {
            "mamba_d_ssm": 64, "mamba_n_heads": 8, "mamba_d_head": 8, "mamba_d_state": 8,
            "mamba_chunk_size": 16, "lm_head_multiplier": 0.5,
        },  # fmt: skip
        MIXES,
    ),
    "phi": ("phi", {"resid_pdrop": 0.0, "embd_pdrop": 0.0}, "lm head has a bias"),
    "gpt_oss": (
        "gpt_oss",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "layer_types": ["sliding_attention", "full_attention"]},
        "attention sinks",
    ),
    "minicpm3": (  # lm-head scaling: hidden / (hidden_size / dim_model_base)
        "minicpm3",
        {
            "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
            "v_head_dim": 16, "num_key_value_heads": 4, "dim_model_base": 16, "scale_emb": 2.0,
        },  # fmt: skip
        None,
    ),
}
QUICK = {"qwen2", "qwen2_window", "gemma2", "granite", "lfm2", "stablelm", "opt"}


def family_params() -> list:
    return [pytest.param(n, marks=() if n in QUICK else (pytest.mark.slow,), id=n) for n in FAMILIES]


def build(name: str) -> torch.nn.Module:
    model_type, overrides, _ = FAMILIES[name]
    values = {**BASE, **overrides}
    if model_type in ("gpt2", "bloom"):  # their own names for the sizes
        values = {k: v for k, v in values.items() if k not in ("num_key_value_heads", "head_dim", "intermediate_size")}
    config = AutoConfig.for_model(model_type, **values)
    register_attention()
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION_NAME, dtype=torch.float32)
    lm.config.use_cache = False
    return lm


def conversations(seed: int = 3):
    """(ids, trained flags, weights) of conversations 1..30 tokens long: odd lengths on purpose."""
    rng = np.random.default_rng(seed)
    convs = []
    for n in (1, 2, 17, 5, 30, 9):
        ids = rng.integers(1, VOCAB, n).astype(np.int32)
        trained = rng.random(n) < 0.6
        trained[0] = False
        weight = np.where(trained, rng.uniform(0.2, 2.0, n), 0.0).astype(np.float32)
        convs.append((ids, trained, weight))
    return convs


def packed_batch(convs) -> dict:
    tokens = np.concatenate([c[0] for c in convs])
    trained = np.concatenate([c[1] for c in convs]).astype(np.uint8)
    weight = np.concatenate([c[2] for c in convs])
    offsets = np.zeros(len(convs) + 1, dtype=np.int64)
    np.cumsum([len(c[0]) for c in convs], out=offsets[1:])
    batch = assemble_ref(tokens, trained, weight, offsets, np.arange(len(convs)))
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def own_forward_loss(lm, convs) -> torch.Tensor:
    """One conversation at a time through the model's own forward (eager attention, its own masks and
    head), cross-entropy of its logits at the trained tokens, weighted like the packed loss."""
    total = torch.zeros(())
    for ids, trained, weight in convs:
        ids_t = torch.from_numpy(ids.astype(np.int64))
        logits = lm(input_ids=ids_t[None]).logits[0]  # [L, V]
        mask = torch.from_numpy(trained[1:])
        if not mask.any():
            continue
        per_token = torch.nn.functional.cross_entropy(logits[:-1][mask], ids_t[1:][mask], reduction="none")
        total = total + (per_token * torch.from_numpy(weight[1:][trained[1:]])).sum()
    return total


@pytest.mark.parametrize("name", family_params())
def test_family_packs_exactly_or_is_refused(name, monkeypatch):
    expected_refusal = FAMILIES[name][2]
    lm = build(name)
    if expected_refusal is not None:
        with pytest.raises(UnsupportedModelError) as refused:
            preflight(PackedCausalLM(lm))
        message = str(refused.value)
        assert re.search(expected_refusal, message), message
        assert message.startswith(f"{lm.config.model_type}: ") and "\n" not in message
        if expected_refusal == MIXES:  # the probe alone catches them too, without the family table
            monkeypatch.setattr(attention_module, "TOKEN_MIXING_FAMILIES", {})
            with pytest.raises(UnsupportedModelError, match=MIXES):
                preflight(PackedCausalLM(build(name)))
        return

    packed = PackedCausalLM(lm)
    report = preflight(packed)
    assert report.family == lm.config.model_type and all(report.errors[k] <= report.bounds[k] for k in report.errors)
    ref_lm = copy.deepcopy(lm)
    ref_lm.config._attn_implementation = "eager"
    convs = conversations()
    loss = packed(**packed_batch(convs))
    loss.backward()
    ref = own_forward_loss(ref_lm, convs)
    ref.backward()
    assert loss.item() > 0
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    ref_params = dict(ref_lm.named_parameters())
    checked = 0
    for pname, p in lm.named_parameters():
        ref_grad = ref_params[pname].grad
        if ref_grad is None:  # an expert no token was routed to: untouched in both
            assert p.grad is None or not p.grad.any(), pname
            continue
        # fp32 rounding, relative to the gradient's largest entry (the embedding's rows span 1e-8..7)
        error = float((p.grad - ref_grad).abs().max())
        assert error <= 1e-5 * float(ref_grad.abs().max()) + 1e-8, (pname, error)
        checked += 1
    assert checked >= len(ref_params) // 2


def test_attention_dropout_is_set_to_zero_with_a_note(caplog):
    lm = build("opt")  # attention_dropout 0.1 in its config
    assert lm.config.attention_dropout == 0.1
    packed = PackedCausalLM(lm)
    assert lm.config.attention_dropout == 0.0
    assert len(packed.notes) == 1 and "attention dropout [0.1] set to 0" in packed.notes[0]
    assert all(m.dropout == 0.0 for m in lm.modules() if type(m).__name__ == "OPTAttention")
    assert "attention dropout" in caplog.text


def test_head_scale_is_applied_by_the_fused_loss():
    packed = PackedCausalLM(build("granite"))
    assert packed.logit_scale == 0.25  # 1 / logits_scaling
    packed.logit_scale = 1.0  # as if the head scaling were skipped: the probe's loss check must fail
    with pytest.raises(UnsupportedModelError, match=r"^granite: preflight head loss vs own logits failed"):
        preflight(packed)


def test_probe_catches_a_leak_the_family_table_does_not_know():
    """A model whose attention silently ignores the boundaries (as a layer that drops the kwargs would)."""
    lm = build("qwen2")
    packed = PackedCausalLM(lm)

    def whole_row(module, query, key, value, attention_mask, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cu_seq_lens_q", "max_length_q")}
        # Plain assignment, not monkeypatch (which would restore True, the value inside the forward, at
        # teardown): PackedCausalLM.hidden_states puts the flag back when its forward ends.
        attention_module._packed_forward = False
        return attention_module.varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, whole_row)
    try:
        with pytest.raises(UnsupportedModelError, match=r"^qwen2: preflight isolation failed"):
            preflight(packed)
    finally:
        register_attention()


def test_probe_catches_a_non_causal_model():
    lm = build("qwen2")
    for layer in lm.model.layers:
        layer.self_attn.is_causal = False  # what the model's own eager forward reads
    packed = PackedCausalLM(lm)
    original = attention_module.varlen_attention_forward

    def bidirectional(module, query, key, value, attention_mask, **kwargs):
        from soulchat.kernels.varlen_attention import varlen_attention_ref

        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        out = varlen_attention_ref(q, k, v, kwargs["cu_seq_lens_q"], kwargs["max_length_q"], causal=False)
        return out.unsqueeze(0), None

    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, bidirectional)
    try:
        with pytest.raises(UnsupportedModelError, match=r"^qwen2: preflight causality failed"):
            preflight(packed)
    finally:
        AttentionInterface.register(ATTENTION_NAME, original)


def run_check_cli(argv, capsys) -> tuple[int, list[str], list[str]]:
    from soulchat.check import main

    capsys.readouterr()  # what saving the model printed
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


def test_check_cli_passes_an_exact_model_in_one_line(tmp_path, capsys):
    build("qwen2").save_pretrained(tmp_path)
    code, out, err = run_check_cli(["--model", str(tmp_path), "--device", "cpu"], capsys)
    assert code == 0 and err == [] and len(out) == 1, (out, err)
    assert re.match(r"preflight OK: qwen2 packs exactly on cpu in float32 \(\d+\.\d\d s; ", out[0]), out[0]


@pytest.mark.parametrize("name", ["lfm2", "phi"])
def test_check_cli_refuses_in_one_line_with_status_2(name, tmp_path, capsys):
    build(name).save_pretrained(tmp_path)
    code, out, err = run_check_cli(["--model", str(tmp_path), "--device", "cpu"], capsys)
    assert code == 2 and out == [] and len(err) == 1, (out, err)
    assert err[0].startswith(f"error: {FAMILIES[name][0]}: ") and re.search(FAMILIES[name][2], err[0])


def test_check_cli_without_weights_exits_2(tmp_path, capsys):
    build("qwen2").config.save_pretrained(tmp_path)
    code, out, err = run_check_cli(["--model", str(tmp_path), "--device", "cpu"], capsys)
    assert code == 2 and len(err) == 1 and "no weights" in err[0]


def test_preflight_bounds_follow_the_dtype():
    from soulchat.check import HIDDEN_EPS, SAME_EPS, machine_epsilon

    assert machine_epsilon(torch.bfloat16, torch.device("cpu")) == 2.0**-7
    assert machine_epsilon(torch.float32, torch.device("cpu")) == 2.0**-23
    packed = PackedCausalLM(build("qwen2"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = preflight(packed)
    assert report.dtype == "bfloat16"
    assert report.bounds["isolation"] == SAME_EPS * 2.0**-7
    assert report.bounds["isolation without A"] == HIDDEN_EPS * 2.0**-7
    assert all(report.errors[k] <= report.bounds[k] for k in report.errors)


@pytest.mark.slow
def test_preflight_under_fsdp2_on_two_ranks_then_training_is_unchanged(tmp_path):
    # Every rank runs the probe's forwards through the sharded model (collectives in step), the verdict
    # is the same on both, and FSDP2 still trains as one process does (the probe left its state alone).
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    sys.path.insert(0, str(tests))
    import dist_invariance

    single = dist_invariance.run("none", str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), str(tests), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(port), str(tests / "preflight_fsdp.py"), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=tests.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    errors = [json.loads((tmp_path / f"preflight-{rank}.json").read_text()) for rank in (0, 1)]
    assert errors[0] == errors[1] and errors[0]["isolation"] <= 4 * 2.0**-23
    sharded = torch.load(tmp_path / "fsdp-2.pt", weights_only=False)
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
