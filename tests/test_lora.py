"""LoRA and QLoRA: options, gradients against peft on plain Hugging Face models, the update, exports,
resume, one vs two processes, 4-bit errors (and 4-bit training on a GPU).

Models are tiny random Qwen2 / Llama configs built here (fp32 on the CPU); end-to-end runs use the
built-in model with the bundled tokenizer and corpus. Also a torchrun worker:
``python -m torch.distributed.run --nproc-per-node 2 tests/test_lora.py OUT_DIR MODE...``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import dist_invariance  # the packed micro-batches and fake tokenizer of the invariance tests

from soulchat import lora, train
from soulchat.attention import ATTENTION_NAME, register_attention
from soulchat.data.packing import to_torch
from soulchat.distributed import Runtime, setup_runtime
from soulchat.loading import tiny_qwen2_config
from soulchat.model import PackedCausalLM
from soulchat.options import ConfigError
from soulchat.train_options import LORA_FINETUNE_LR, build_parser, parse_args

VOCAB = dist_invariance.VOCAB
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(family: str, seed: int = 0, attn: str = ATTENTION_NAME):
    """A random fp32 causal LM: Qwen2 (q/k/v biases, tied embeddings) or Llama (no biases, untied)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    register_attention()
    if family == "qwen2":
        config = tiny_qwen2_config(
            VOCAB, eos_token_id=0, hidden_size=64, intermediate_size=96, num_hidden_layers=2
        )
    else:
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, attention_dropout=0.0,
            eos_token_id=0, bos_token_id=0, pad_token_id=0,
        )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.config.use_cache = False
    return model


def lora_options(*extra: str) -> lora.LoraConfig:
    return parse_args(["--lora-rank", "4", "--lora-dropout", "0", *extra]).lora


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------------
# Options and targets
# --------------------------------------------------------------------------------------------------


def test_lora_options_validate_and_reach_the_command_line():
    cfg = parse_args(["--lora-rank", "8"])
    assert cfg.lora.enabled and cfg.lora.lora_alpha == 16.0 and cfg.lora.lora_target_modules == []
    assert not parse_args([]).lora.enabled
    assert parse_args(["--lora-rank", "8", "--model", "some/dir"]).optim.lr == LORA_FINETUNE_LR
    assert parse_args(["--model", "some/dir"]).optim.lr == 2e-5  # full fine-tuning keeps its default
    help_text = build_parser().format_help()
    assert "--lora-rank" in help_text and "--load-in-4bit" in help_text and "--export-merged" in help_text
    assert "every nn.Linear inside the decoder layers" in " ".join(help_text.split())
    for argv, message in [
        (["--lora-rank", "-1"], "--lora-rank"),
        (["--lora-rank", "8", "--lora-dropout", "1.0"], "--lora-dropout"),
        (["--lora-rank", "8", "--lora-alpha", "0"], "--lora-alpha"),
        (["--load-in-4bit"], "--load-in-4bit needs LoRA"),
        (["--export-merged"], "--export-merged needs LoRA"),
        (["--lora-train-lm-head"], "--lora-train-lm-head needs LoRA"),
        (["--lora-alpha", "16"], "--lora-alpha needs LoRA: pass --lora-rank R"),  # else set and unused
        (["--lora-rank", "0", "--lora-alpha", "16"], "--lora-alpha needs LoRA"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_args(argv)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_default_targets_are_every_attention_and_mlp_projection(family):
    model = tiny_model(family)
    assert lora.default_target_modules(model) == LLAMA_TARGETS
    lm = lora.apply_lora(model, lora_options())
    wrapped = {n.rsplit(".", 1)[0] for n in trainable(lm) if ".lora_A." in n}
    layers = lm.config.num_hidden_layers
    assert len(wrapped) == layers * len(LLAMA_TARGETS)  # every projection of every layer, nothing else
    assert not any("lm_head" in n or "embed" in n for n in trainable(lm))
    with pytest.raises(ValueError, match="--lora-target-modules qkv: no linear layer"):
        lora.apply_lora(tiny_model(family), lora_options("--lora-target-modules", "qkv"))


def test_adapter_initialisation_depends_on_the_seed_only():
    first = trainable(lora.apply_lora(tiny_model("llama"), lora_options(), seed=7))
    model = tiny_model("llama")
    torch.randn(1000)  # other code drawing random numbers in between (the fused-kernel probe does)
    before = torch.get_rng_state()
    second = trainable(lora.apply_lora(model, lora_options(), seed=7))
    assert torch.equal(torch.get_rng_state(), before)  # the run's RNG stream is left as it was
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    other = trainable(lora.apply_lora(tiny_model("llama"), lora_options(), seed=8))
    name = "model.layers.0.mlp.up_proj.lora_A.default.weight"
    assert not torch.equal(first[name], other[name])


# --------------------------------------------------------------------------------------------------
# Gradients: soulchat's packed path vs peft on the unpacked Hugging Face model, per conversation
# --------------------------------------------------------------------------------------------------


def _conversations(seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    convs = []
    for n in (2, 17, 1 + 40, 9, 29):  # odd lengths, one of 2 tokens
        ids = rng.integers(1, VOCAB, n).astype(np.int32)
        trained = rng.random(n) < 0.6
        trained[0] = False
        weight = np.where(trained, rng.uniform(0.25, 1.0, n), 0.0).astype(np.float32)
        convs.append((ids, trained, weight))
    return convs


def _reference_loss(ref_model, convs) -> torch.Tensor:
    """Sum over conversations, each run alone through the plain HF model (eager attention): token t
    predicts token t + 1 where t + 1 is trained, with the weight of token t + 1."""
    total = torch.zeros(())
    for ids, trained, weight in convs:
        logits = ref_model(input_ids=torch.from_numpy(ids.astype(np.int64))[None]).logits[0]  # [L, V]
        targets = torch.from_numpy(ids[1:].astype(np.int64))
        mask = torch.from_numpy(trained[1:])
        w = torch.from_numpy(weight[1:])
        ce = torch.nn.functional.cross_entropy(logits[:-1].float(), targets, reduction="none")
        total = total + (ce * w * mask).sum()
    return total


@pytest.mark.usefixtures("reference_attention")
@pytest.mark.parametrize(
    "family, head", [("qwen2", False), ("llama", False), ("qwen2", True), ("llama", True)]
)
def test_packed_lora_gradients_equal_peft_on_unpacked_hf_model(family, head):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    extra = ("--lora-train-lm-head",) if head else ()
    options = lora_options(*extra)
    packed_lm = lora.apply_lora(tiny_model(family), options)
    # Our own reference: peft applied directly to the same weights, eager attention, no packing.
    with lora._known_peft_warnings():  # the tied head is trained as its own copy, as in apply_lora
        ref = get_peft_model(
            tiny_model(family, attn="eager"),
            PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LLAMA_TARGETS,
                           modules_to_save=["lm_head"] if head else None),
        )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    ours = trainable(packed_lm)
    theirs = trainable(ref)
    assert {"base_model.model." + n for n in ours} == set(theirs)
    with torch.no_grad():
        for name, p in ours.items():
            if ".lora_B." in name:  # peft starts B at 0: give every factor a gradient to compare
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            theirs["base_model.model." + name].copy_(p)

    convs = _conversations(seed=3 + len(family))
    batch = dist_invariance.micro_batch(convs)
    inputs = train.model_inputs(to_torch(batch, torch.device("cpu")))
    loss = PackedCausalLM(packed_lm)(**inputs)
    loss.backward()
    ref_loss = _reference_loss(ref, convs)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, p in ours.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(
            p.grad, theirs["base_model.model." + name].grad, rtol=1e-4, atol=1e-6, msg=name
        )
    # Frozen weights get no gradients at all (the fused loss gives none to a frozen lm head).
    assert all(p.grad is None for p in packed_lm.parameters() if not p.requires_grad)


# --------------------------------------------------------------------------------------------------
# The update: only adapter parameters change, only they reach AdamW
# --------------------------------------------------------------------------------------------------


def _lora_args(*extra: str) -> list[str]:
    micro = dist_invariance.MICRO_TOKENS
    return [
        "--device", "cpu", "--seed", "0", "--lr", "1e-2", "--warmup-steps", "0", "--schedule", "constant",
        "--grad-clip", "1.0", "--max-length", "64", "--eps", "1e-4", "--lora-rank", "4", "--lora-dropout", "0",
        "--tokens-per-micro-batch", str(micro),
        "--tokens-per-step", str(micro * dist_invariance.MICRO_BATCHES), *extra,
    ]  # fmt: skip


def _two_steps(mode: str, out_dir: str, *extra: str) -> dict:
    """Two optimizer steps of dist_invariance's fixed global batches under ``mode``, with LoRA."""
    cfg = parse_args(["--parallel", mode, "--output-dir", out_dir, *_lora_args(*extra)])
    rt = setup_runtime(cfg)
    model, train_module = train.build_parallel_model(cfg, dist_invariance.FakeTokenizer(), rt)
    optimizer = train.build_optimizer(cfg, model, rt)
    initial = {k: v.detach().clone() for k, v in _full_state(model).items()}
    losses = []
    per_rank = dist_invariance.MICRO_BATCHES // rt.world_size
    for step in range(2):
        groups = dist_invariance.conversations(step)[rt.rank * per_rank : (rt.rank + 1) * per_rank]
        batches = [dist_invariance.micro_batch(g) for g in groups]
        result = train.train_step(
            model, train_module, optimizer, batches, rt, cfg.optim.grad_clip, "stop", step + 1
        )
        losses.append(result.loss)
    return {
        "losses": losses,
        "initial": initial,
        "state": _full_state(model),
        "model": model,
        "optim": optimizer,
    }


def _full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@pytest.mark.usefixtures("reference_attention")
def test_only_adapter_parameters_change_and_reach_adamw(tmp_path):
    run = _two_steps("none", str(tmp_path))
    model, optimizer = run["model"], run["optim"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad} and in_optimizer
    adapter = [k for k in run["state"] if ".lora_A." in k or ".lora_B." in k]
    assert len(adapter) == 2 * 3 * len(LLAMA_TARGETS)  # A and B, 3 layers of the built-in model
    for name, value in run["state"].items():
        if name in adapter:
            assert not torch.equal(value, run["initial"][name]), f"{name} did not train"
        else:
            assert torch.equal(value, run["initial"][name]), f"frozen {name} changed"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the CPU: fp32 throughout


@pytest.mark.usefixtures("reference_attention")
def test_bf16_compute_keeps_frozen_base_in_bf16_and_adapters_fp32(tmp_path):
    cfg = parse_args(["--output-dir", str(tmp_path), "--mixed-precision", "bf16", *_lora_args()])
    rt = setup_runtime(cfg)
    model, _ = train.build_parallel_model(cfg, dist_invariance.FakeTokenizer(), rt)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    adapters = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and adapters == {torch.float32}
    optimizer = train.build_optimizer(cfg, model, rt)
    batches = [dist_invariance.micro_batch(g) for g in dist_invariance.conversations(0)]
    result = train.train_step(model, model, optimizer, batches, rt, 1.0, "stop", 1)
    assert np.isfinite(result.loss) and result.grad_norm > 0
    assert all(p.grad is None for p in model.parameters())  # zeroed; and no frozen parameter got one


@pytest.mark.slow
def test_two_processes_fsdp_and_ddp_give_the_same_adapter_weights(tmp_path):
    from test_train import torchrun

    single = _two_steps("none", str(tmp_path))
    torchrun(str(Path(__file__)), str(tmp_path), "fsdp", "ddp")
    adapter = [k for k in single["state"] if ".lora_" in k]
    for mode in ("fsdp", "ddp"):
        other = torch.load(tmp_path / f"lora-{mode}-2.pt", weights_only=False)
        np.testing.assert_allclose(other["losses"], single["losses"], rtol=1e-6)
        assert sorted(other["adapter"]) == sorted(adapter)
        for name in adapter:
            torch.testing.assert_close(
                other["adapter"][name], single["state"][name], rtol=1e-5, atol=1e-6, msg=name
            )
            assert not torch.equal(single["state"][name], single["initial"][name]), name


# --------------------------------------------------------------------------------------------------
# End to end: exports, resume, the command line
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora-data-cache")


def run_args(out: Path, cache: Path, *extra: str) -> list[str]:
    from test_train import run_args as train_run_args

    return train_run_args(out, cache, "--lora-rank", "8", *extra)


@pytest.mark.usefixtures("reference_attention")
@pytest.mark.parametrize("head", [False, True])
def test_merged_export_gives_the_logits_of_base_plus_adapter(tmp_path, cache_dir, head, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    extra = ["--lora-train-lm-head"] if head else []
    live: dict[str, torch.Tensor] = {}
    real_export = train.export_lora

    def keep_trained_weights(cfg, rt, model, tokenizer):
        live.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_export(cfg, rt, model, tokenizer)

    monkeypatch.setattr(train, "export_lora", keep_trained_weights)
    summary = train.main(run_args(tmp_path / "run", cache_dir, "--steps", "2", "--export-merged", *extra))
    adapter_dir, merged_dir = tmp_path / "run" / "adapter", tmp_path / "run" / "export"
    assert summary["export"] == str(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), local_files_only=True).eval()
    base = AutoModelForCausalLM.from_pretrained(str(adapter_dir / "base"), local_files_only=True)
    with lora._known_peft_warnings():  # peft's own loader (it warns about the untied head copy)
        with_adapter = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    loaded, tokenizer = lora.load_adapter_model(adapter_dir)  # soulchat's loader for chat / evaluate
    ids = torch.randint(1, len(tokenizer), (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
        # chat and evaluate take the adapter directory itself: base + adapter merged, the run's template.
        from soulchat.inference import load_model

        served = load_model(str(adapter_dir), device="cpu", dtype="float32")
        torch.testing.assert_close(served.model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert served.template_source.endswith("soulchat_config.json")
        # The adapter is not a no-op: the trained model differs from its base.
        plain = AutoModelForCausalLM.from_pretrained(str(adapter_dir / "base"), local_files_only=True).eval()
        assert not torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-4)
    # The saved base of the built-in model is the frozen base that trained, weight for weight.
    frozen = {
        k.removeprefix("lm.").replace(".base_layer", "").replace(".original_module", ""): v
        for k, v in live.items()
        if ".lora_" not in k and ".modules_to_save." not in k
    }
    base_state = plain.state_dict()
    assert set(base_state) == set(frozen)
    for name, value in base_state.items():
        assert torch.equal(value, frozen[name]), name
    # A trained lm head is untied from the (frozen) input embedding in the merged model.
    assert merged.config.tie_word_embeddings is (not head)
    tied = merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    assert tied is (not head)
    # The adapter directory holds the trained weights of the final checkpoint, bit for bit.
    from safetensors.torch import load_file
    from test_train import _checkpoint_weights

    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    checkpoint = _checkpoint_weights(tmp_path / "run" / "checkpoints" / "step_000002")
    assert saved and all(k.startswith("base_model.model.") for k in saved)
    for key, value in saved.items():
        name = "model.lm." + key.removeprefix("base_model.model.")
        name = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        name = name.replace(".modules_to_save.weight", ".modules_to_save.default.weight")
        if name not in checkpoint:  # peft saves modules_to_save as <module>.weight
            name = name.replace("lm_head.weight", "lm_head.modules_to_save.default.weight")
        assert torch.equal(value, checkpoint[name]), key
    assert json.loads((adapter_dir / "soulchat_config.json").read_text())["lora"]["lora_rank"] == 8


@pytest.mark.usefixtures("reference_attention")
def test_lora_resume_after_kill_equals_uninterrupted_run(tmp_path, cache_dir, monkeypatch):
    from test_train import _checkpoint_weights, step_losses

    # Dropout on (the default 0.05): resuming must also restore the RNG stream it draws from.
    common = ["--steps", "5", "--save-every", "2", "--no-export"]
    straight = tmp_path / "straight"
    train.main(run_args(straight, cache_dir, *common))
    run = tmp_path / "resumed"
    real_step = train.train_step

    def dies_at_step_4(*args, **kwargs):
        if kwargs.get("step", args[-1]) == 4:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.main(run_args(run, cache_dir, *common))
    monkeypatch.undo()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"
    summary = train.main(run_args(run, cache_dir, *common, "--resume"))
    assert summary["start_step"] == 2
    assert step_losses(run) == step_losses(straight)  # exact on the CPU
    a = _checkpoint_weights(straight / "checkpoints" / "step_000005")
    b = _checkpoint_weights(run / "checkpoints" / "step_000005")
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    # Checkpoints hold the trainable parameters (and at most the tied head), not the frozen base.
    assert not any(".base_layer." in k for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.usefixtures("reference_attention")
def test_activation_checkpointing_and_fused_kernels_give_the_same_lora_losses(tmp_path, cache_dir):
    from test_train import step_losses

    base = ["--steps", "2", "--no-export", "--eval-fraction", "0", "--lora-dropout", "0"]
    train.main(run_args(tmp_path / "plain", cache_dir, *base))
    train.main(run_args(tmp_path / "ckpt", cache_dir, *base, "--activation-checkpointing"))
    # The fused MLP forward calls its projections by name, so it runs peft's adapted ones.
    train.main(run_args(tmp_path / "fused", cache_dir, *base, "--fused-kernels", "on"))
    a = step_losses(tmp_path / "plain")
    for other in ("ckpt", "fused"):
        b = step_losses(tmp_path / other)
        assert a.keys() == b.keys() == {1, 2}, other
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-5), other


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_process_run_exports_the_adapter_of_the_one_process_run(tmp_path, cache_dir, parallel):
    from safetensors.torch import load_file
    from test_train import step_losses, torchrun

    common = ["--steps", "2", "--eval-fraction", "0", "--lora-dropout", "0", "--export-merged"]
    train.main(run_args(tmp_path / "one", cache_dir, *common))
    torchrun("-m", "soulchat.train", *run_args(tmp_path / "two", cache_dir, *common, "--parallel", parallel))
    a, b = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert a.keys() == b.keys() == {1, 2}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)
    for name in ("adapter/adapter_model.safetensors", "export/model.safetensors"):
        one, two = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert one.keys() == two.keys() and one
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")


@pytest.mark.slow
def test_fsdp_shards_bf16_frozen_and_fp32_adapter_weights_in_one_unit(tmp_path, cache_dir):
    """FSDP2 all-gathers every parameter of a decoder layer in the param dtype (bf16): frozen bf16 base
    weights and fp32 adapters share a unit (its uniform-dtype rule is about trainable parameters)."""
    from test_train import step_losses, torchrun

    common = ["--steps", "2", "--eval-fraction", "0", "--lora-dropout", "0", "--no-export",
              "--mixed-precision", "bf16", "--device", "cpu"]  # fmt: skip
    train.main(run_args(tmp_path / "one", cache_dir, *common))
    torchrun("-m", "soulchat.train", *run_args(tmp_path / "two", cache_dir, *common, "--parallel", "fsdp"))
    a, b = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert a.keys() == b.keys() == {1, 2}
    for step in a:  # bf16 compute: autocast (one process) and FSDP's cast round differently
        assert b[step] == pytest.approx(a[step], rel=2e-3)


@pytest.mark.slow
def test_lora_command_line_on_the_embedded_default(tmp_path):
    import subprocess

    from test_train import subprocess_env

    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "soulchat.train", "--lora-rank", "8", "--steps", "3", "--no-progress",
         "--output-dir", str(out)],
        check=False, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "LoRA:" in result.stdout and "trainable parameters" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["export"] == str(out / "adapter") and summary["last_loss"] < summary["first_loss"]
    model, _ = lora.load_adapter_model(out / "adapter")
    assert type(model).__name__ == "PeftModelForCausalLM"


# --------------------------------------------------------------------------------------------------
# QLoRA: refused where it cannot run; trains on a GPU
# --------------------------------------------------------------------------------------------------


def _runtime(device: str, world_size: int = 1) -> Runtime:
    return Runtime(0, world_size, 0, torch.device(device), "none", torch.bfloat16)


def test_4bit_is_refused_without_cuda_or_bitsandbytes(tmp_path, monkeypatch, capsys):
    options = parse_args(["--lora-rank", "8", "--load-in-4bit"]).lora
    with pytest.raises(lora.QuantizationUnavailable, match="needs a CUDA GPU"):
        lora.base_load_kwargs(options, _runtime("cpu"), builtin_model=False)
    with pytest.raises(lora.QuantizationUnavailable, match="runs in one process"):
        lora.base_load_kwargs(options, _runtime("cuda", world_size=2), builtin_model=False)
    with pytest.raises(lora.QuantizationUnavailable, match="pass --model DIR"):
        lora.base_load_kwargs(options, _runtime("cuda"), builtin_model=True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(lora.QuantizationUnavailable, match="needs bitsandbytes"):
        lora.base_load_kwargs(options, _runtime("cuda"), builtin_model=False)
    monkeypatch.undo()
    # The command line: one line, exit status 2.
    argv = [
        "soulchat.train",
        "--lora-rank",
        "8",
        "--load-in-4bit",
        "--device",
        "cpu",
        "--output-dir",
        str(tmp_path),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        train.cli()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --load-in-4bit needs a CUDA GPU") and "\n" not in err


@pytest.mark.cuda
def test_lora_on_gpu_keeps_the_frozen_base_in_bf16(tmp_path, cache_dir, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    seen = {}
    real_step = train.train_step

    def record_dtypes(model, *args, **kwargs):
        seen["frozen"] = {p.dtype for p in model.parameters() if not p.requires_grad}
        seen["trainable"] = {p.dtype for p in model.parameters() if p.requires_grad}
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", record_dtypes)
    summary = train.main(
        run_args(tmp_path / "run", cache_dir, "--steps", "2", "--device", "cuda", "--export-merged")
    )
    assert seen == {"frozen": {torch.bfloat16}, "trainable": {torch.float32}}
    assert (
        np.isfinite(summary["last_loss"]) and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    )


@pytest.mark.cuda
def test_qlora_trains_on_gpu_and_exports(tmp_path, cache_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from soulchat.loading import BUILTIN_TOKENIZER

    base_dir = tmp_path / "base"
    model = tiny_model("llama")
    model.config._attn_implementation = None
    model.save_pretrained(str(base_dir))
    args = run_args(tmp_path / "run", cache_dir, "--model", str(base_dir), "--tokenizer", str(BUILTIN_TOKENIZER),
                    "--steps", "2", "--load-in-4bit", "--export-merged", "--eval-fraction", "0", "--template", "chatml")  # fmt: skip
    summary = train.main(args)
    assert np.isfinite(summary["last_loss"])
    merged = AutoModelForCausalLM.from_pretrained(summary["export"], local_files_only=True)
    assert merged.config.model_type == "llama"
    quantized, _ = lora.load_adapter_model(tmp_path / "run" / "adapter", device="cuda", load_in_4bit=True)
    assert any(type(m).__name__ == "Linear4bit" for m in quantized.modules())


# --------------------------------------------------------------------------------------------------
# torchrun worker
# --------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    import torch.distributed as dist

    from soulchat.kernels.dispatch import force_backend

    out = sys.argv[1]
    with force_backend("attention", "reference"):
        for mode in sys.argv[2:]:
            result = _two_steps(mode, out)
            if dist.get_rank() == 0:
                adapter = {k: v for k, v in result["state"].items() if ".lora_" in k}
                torch.save({"losses": result["losses"], "adapter": adapter}, Path(out) / f"lora-{mode}-2.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Damaged or mismatched adapter directories: one line naming the file and the fix, never a download


@pytest.fixture(scope="module")
def small_adapter(trained_tiny_model_dir, tmp_path_factory) -> Path:
    """A rank-4 q_proj adapter on the session's trained tiny model, saved by peft itself."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(trained_tiny_model_dir), local_files_only=True)
    path = tmp_path_factory.mktemp("adapters") / "adapter"
    get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])).save_pretrained(str(path))
    return path


def damaged_copy(adapter: Path, where: Path, damage) -> Path:
    import shutil

    shutil.copytree(adapter, where)
    damage(where)
    return where


def chat_error(capsys, argv: list[str]) -> str:
    from soulchat import chat

    assert chat.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def set_config(key: str, value):
    def damage(path: Path) -> None:
        config = json.loads((path / "adapter_config.json").read_text())
        config[key] = value
        (path / "adapter_config.json").write_text(json.dumps(config))

    return damage


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda p: (p / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors, the adapter's weights"),
        (set_config("r", 8), "lora_A.weight has rank 4 but adapter_config.json says r=8"),
        (set_config("r", "4"), '"r" (the LoRA rank) must be a positive integer'),
        (set_config("peft_type", "IA3"), "soulchat loads LoRA adapters only"),
        (lambda p: (p / "adapter_config.json").write_text('{"r": 4,'), "adapter_config.json:1: not valid JSON"),
        (lambda p: (p / "adapter_config.json").write_text("[1, 2]"), "adapter_config.json: holds a JSON array"),
        (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x10" * 64),
         "adapter_model.safetensors: not a readable safetensors file"),
    ],
    ids=["no-weights", "rank-mismatch", "rank-not-int", "not-lora", "garbage-json", "json-list", "garbage-weights"],
)
def test_damaged_adapter_is_one_line_naming_the_file(small_adapter, tmp_path, capsys, monkeypatch, damage, expected):
    # A missing weights file made peft ask the Hugging Face hub: any network call fails this test.
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    adapter = damaged_copy(small_adapter, tmp_path / "adapter", damage)
    err = chat_error(capsys, ["--model", str(adapter), "--prompt", "hi", "--max-new-tokens", "2"])
    assert err.startswith(f"error: {adapter}") and expected in err


def test_moved_adapter_base_is_named_and_base_model_flag_loads_it(small_adapter, trained_tiny_model_dir, tmp_path,
                                                                  capsys):  # fmt: skip
    moved = damaged_copy(small_adapter, tmp_path / "adapter", set_config("base_model_name_or_path", "/gone/base"))
    argv = ["--model", str(moved), "--prompt", "hi", "--max-new-tokens", "2", "--seed", "1"]
    assert "its base model '/gone/base' is not a local model directory (moved?): pass --base-model DIR" in (
        chat_error(capsys, argv)
    )
    from soulchat import chat

    assert chat.main([*argv, "--base-model", str(trained_tiny_model_dir)]) == 0
    moved_reply = capsys.readouterr().out
    argv[1] = str(small_adapter)
    assert chat.main(argv) == 0
    assert capsys.readouterr().out == moved_reply  # the same model as with the recorded base
    assert "--base-model is only used when --model is a LoRA adapter directory" in chat_error(
        capsys, ["--model", str(trained_tiny_model_dir), "--base-model", str(trained_tiny_model_dir), "--prompt", "hi"]
    )
    assert f"--base-model {tmp_path}: no config.json there" in chat_error(
        capsys, [*argv, "--base-model", str(tmp_path)]
    )


def test_adapter_on_a_base_of_another_shape_is_one_line(small_adapter, trained_tiny_model_dir, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(trained_tiny_model_dir))
    config.update({"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "head_dim": 16})  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "other"))
    err = chat_error(capsys, ["--model", str(small_adapter), "--base-model", str(tmp_path / "other"), "--prompt", "hi"])
    assert f"{small_adapter}: its weights do not fit the base model {tmp_path / 'other'} (size mismatch for" in err
