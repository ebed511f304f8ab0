"""The training job: invariance of the update, resume, checkpoints, export, errors, the default command.

Runs are tiny (the built-in model, rows of 256 tokens, a handful of steps) and share one prepared-data
cache. Multi-process tests start ``python -m torch.distributed.run --nproc-per-node 2`` (gloo on CPU).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from soulchat import checkpoint, export, train
from soulchat.distributed import setup_runtime
from soulchat.model import PackedCausalLM
from soulchat.optimizer import lr_factor
from soulchat.options import ConfigError
from soulchat.resume import ResumeMismatch
from soulchat.train_options import parse_args

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
import dist_invariance  # the torchrun worker, also run in-process

# The PyTorch reference attention kernel (see tests/conftest.py): these tests are about the glue.
pytestmark = pytest.mark.usefixtures("reference_attention")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


def run_args(out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "--output-dir",
        str(out),
        "--cache-dir",
        str(cache),
        "--no-progress",
        "--no-tensorboard",
        "--max-length",
        "256",
        "--tokens-per-micro-batch",
        "256",
        "--tokens-per-step",
        "512",
        "--eval-every",
        "0",
        *extra,
    ]


def step_losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # let the kernels pick their normal CPU backends
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *args,
    ]
    result = subprocess.run(
        cmd, check=False, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def load_export(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    return state


# --------------------------------------------------------------------------------------------------
# The update does not depend on how the global batch is split
# --------------------------------------------------------------------------------------------------


def assert_same_update(a: dict, b: dict) -> None:
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-6)
    np.testing.assert_allclose(a["grad_norms"], b["grad_norms"], rtol=1e-5)
    assert set(a["state"]) == set(b["state"])
    for name, value in a["state"].items():
        torch.testing.assert_close(value, b["state"][name], rtol=1e-5, atol=1e-6, msg=name)


def test_accumulation_equals_one_big_micro_batch(tmp_path):
    four_micro = dist_invariance.run("none", str(tmp_path))
    one_big = dist_invariance.run("none", str(tmp_path), merge=True)
    assert four_micro["losses"][0] > 0 and four_micro["grad_norms"][0] > 0
    assert_same_update(four_micro, one_big)
    # The weights moved: the comparison above is not between two untouched initialisations.
    fresh = train.build_parallel_model(
        parse_args(["--device", "cpu"]), dist_invariance.FakeTokenizer(), setup_runtime(parse_args([]))
    )[0]
    init = fresh.state_dict()
    assert not torch.allclose(
        init["lm.model.layers.0.mlp.up_proj.weight"],
        four_micro["state"]["lm.model.layers.0.mlp.up_proj.weight"],
    )


def _tiny_training(tmp_path: Path, *extra: str):
    """The built-in model, its AdamW (weight decay 0.1) and the runtime, as dist_invariance builds them."""
    micro = str(dist_invariance.MICRO_TOKENS)
    cfg = parse_args(
        ["--device", "cpu", "--seed", "0", "--lr", "1e-2", "--weight-decay", "0.1", "--warmup-steps", "0",
         "--schedule", "constant", "--max-length", "64", "--tokens-per-micro-batch", micro, "--tokens-per-step",
         str(dist_invariance.MICRO_TOKENS * dist_invariance.MICRO_BATCHES), "--output-dir", str(tmp_path), *extra]
    )  # fmt: skip
    rt = setup_runtime(cfg)
    model, train_module = train.build_parallel_model(cfg, dist_invariance.FakeTokenizer(), rt)
    return cfg, rt, model, train_module, train.build_optimizer(cfg, model, rt)


def _optimizer_state(optimizer) -> list[torch.Tensor]:
    return [t.clone() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]


def test_step_without_trained_tokens_skips_the_update(tmp_path, capsys):
    """Every loss weight of the step is 0 (one micro-batch with trained tokens weighted 0, one whose
    conversations have no trained token at all): AdamW would still move the weights (decoupled weight
    decay, the moments of step 1), so the step must leave parameters and optimizer state as they were.
    It is counted and reported as skipped with no loss."""
    cfg, rt, model, train_module, optimizer = _tiny_training(tmp_path)
    step1 = [dist_invariance.micro_batch(g) for g in dist_invariance.conversations(0)]
    assert train.train_step(model, train_module, optimizer, step1, rt, 1.0, "stop", 1).loss > 0
    before_params = [p.detach().clone() for p in model.parameters()]
    before_state = _optimizer_state(optimizer)
    assert before_state and any(t.abs().sum() > 0 for t in before_state)  # moments that AdamW would apply

    groups = dist_invariance.conversations(1)
    zero_weighted = dist_invariance.micro_batch(groups[0])
    zero_weighted["loss_weight"] = np.zeros_like(zero_weighted["loss_weight"])
    untrained = dist_invariance.micro_batch([(ids, np.zeros_like(t), np.zeros_like(w)) for ids, t, w in groups[1]])
    assert len(zero_weighted["loss_index"]) > 0 and len(untrained["loss_index"]) == 0
    result = train.train_step(model, train_module, optimizer, [zero_weighted, untrained], rt, 1.0, "stop", 2)

    assert result.skipped and result.loss is None and result.grad_norm == 0.0 and result.weight_sum == 0
    assert result.trained_tokens == len(zero_weighted["loss_index"]) and result.tokens > 0
    for before, after in zip(before_params, model.parameters(), strict=True):
        assert torch.equal(before, after)
    for before, after in zip(before_state, _optimizer_state(optimizer), strict=True):
        assert torch.equal(before, after)
    assert all(p.grad is None for p in model.parameters())
    assert "step 2: no trained token (global loss weight 0), update skipped" in capsys.readouterr().out
    run = types.SimpleNamespace(rt=rt, model=model)
    record = json.loads(json.dumps(train.step_record(2, result, 1e-2, 0.5, run, peak=None)))
    assert record["skipped"] is True and record["loss"] is None and record["tokens"] == result.tokens
    history = train.LossHistory()
    for loss in (None, 2.0, None, 1.5, None):
        history.record(loss)
    assert (history.first_loss, history.last_loss) == (2.0, 1.5)


@pytest.mark.slow
def test_two_processes_fsdp_and_ddp_equal_one_process(tmp_path):
    single = dist_invariance.run("none", str(tmp_path))
    torchrun(str(TESTS / "dist_invariance.py"), str(tmp_path), "fsdp", "ddp")
    for mode in ("fsdp", "ddp"):
        assert_same_update(single, torch.load(tmp_path / f"{mode}-2.pt", weights_only=False))


def test_rank_shards_partition_each_step_whatever_the_world_size():
    order = train.RowOrder(num_rows=10, seed=3)
    for step in range(7):  # crosses epoch boundaries (4 rows per step, 10 rows)
        one = order.rows_for(step, 0, per_rank=4, world_size=1)
        two = order.rows_for(step, 0, 2, 2) + order.rows_for(step, 1, 2, 2)
        four = [r for rank in range(4) for r in order.rows_for(step, rank, 1, 4)]
        assert one == two == four
    epoch0 = [order.row(i) for i in range(10)]
    epoch1 = [order.row(i) for i in range(10, 20)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1


def test_held_out_conversations_are_evaluated_and_never_trained(tmp_path, cache_dir):
    from soulchat.data.readers import read_conversations

    summary = train.main(run_args(tmp_path / "run", cache_dir, "--steps", "1", "--no-export",
                                  "--eval-fraction", "0.1"))  # fmt: skip
    assert math.isfinite(summary["eval_loss"]) and summary["eval_ppl"] > 1.0
    heldout = [c.id for c in read_conversations([summary["heldout"]])]
    sample = [c.id for c in read_conversations([str(train.SAMPLE_CORPUS)])]
    assert 0 < len(heldout) < len(sample) and set(heldout) <= set(sample)
    # The run's store (the cache it just wrote) accounts for the same held-out conversations.
    report = json.loads((cache_dir / "report.json").read_text(encoding="utf-8"))
    assert report["conversations_heldout"] == len(heldout)
    assert report["heldout"]["rows"] > 0


def test_lr_schedule_warmup_then_decay():
    f = [lr_factor(s, total=100, warmup=10, schedule="cosine", min_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[10:])) and f[-1] == pytest.approx(0.1, abs=1e-3)
    lin = [lr_factor(s, 100, 0, "linear", 0.0) for s in (0, 50, 100)]
    assert lin == pytest.approx([1.0, 0.5, 0.0])


def test_evaluation_and_checkpoints_keep_their_own_schedule():
    cfg = parse_args(["--eval-every", "3", "--save-every", "4", "--steps", "10"])
    due = [s for s in range(1, 11) if train.HeldOutEvaluator(cfg, object(), 10).due(s)]
    assert due == [3, 6, 9]  # the final evaluation (step 10) follows the loop
    assert not any(train.HeldOutEvaluator(cfg, None, 10).due(s) for s in range(1, 11))  # no held-out set
    every_fifth = train.HeldOutEvaluator(parse_args([]), object(), 10)  # unset: 5 times per run
    assert [s for s in range(1, 11) if every_fifth.due(s)] == [2, 4, 6, 8]
    only_at_end = train.HeldOutEvaluator(parse_args(["--eval-every", "0"]), object(), 10)
    assert not any(only_at_end.due(s) for s in range(1, 11))
    checkpointer = train.Checkpointer(cfg, None, None, None, None, {})
    saved = []
    checkpointer.save = saved.append
    for step in range(1, 11):
        checkpointer.maybe_save(step, last_step=10)
    assert saved == [4, 8]  # the final save (step 10) follows the final evaluation


def test_train_hands_every_data_option_to_prepare(tmp_path, monkeypatch):
    import soulchat.data.pipeline as pipeline
    from soulchat.loading import load_tokenizer

    calls = []
    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: calls.append((a, k)) or "store")
    argv = [
        "--output-dir", str(tmp_path / "run"), "--eval-seed", "7", "--workers", "2", "--client-role", "patient",
        "--counselor-role", "doctor", "--eval-fraction", "0.2", "--seed", "3", "--no-progress",
        "--tokens-per-micro-batch", "1024",
    ]  # fmt: skip
    cfg = parse_args(argv)
    rt = setup_runtime(cfg)
    assert train.prepare_data(cfg, load_tokenizer(cfg.model), rt) == "store"
    (options, _), kwargs = calls[0]
    out_dir, paths = pipeline.store_dir(options), pipeline.corpus_paths(options)
    same = dataclasses.replace(cfg.data, cache_dir=options.cache_dir) == options  # cfg.data, whole
    assert out_dir == tmp_path / "run" / "data" and same and kwargs["seed"] == 3
    assert options.eval_seed == 7 and options.workers == 2 and options.eval_fraction == 0.2
    assert options.row_size == 1024 and "patient" in options.role_map().client
    assert "doctor" in options.role_map().counselor and paths == [train.SAMPLE_CORPUS]


def test_run_loop_fits_one_screen():
    import inspect

    assert len(inspect.getsource(train.train_loop).splitlines()) <= 80


# --------------------------------------------------------------------------------------------------
# Resume and atomic checkpoints
# --------------------------------------------------------------------------------------------------


def test_resume_after_kill_and_interrupted_save_equals_uninterrupted_run(tmp_path, cache_dir, monkeypatch):
    common = ["--steps", "6", "--save-every", "3", "--no-export"]
    straight = tmp_path / "straight"
    train.main(run_args(straight, cache_dir, *common))
    expected = step_losses(straight)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]

    # 1. Killed during step 5: the checkpoint of step 3 is the latest.
    run = tmp_path / "resumed"
    real_step = train.train_step

    def dies_at_step_5(*args, **kwargs):
        if kwargs.get("step", args[-1]) == 5:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train.main(run_args(run, cache_dir, *common))
    monkeypatch.setattr(train, "train_step", real_step)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"

    # 2. Leftovers of a save that died while writing (a partial temp dir) must not matter.
    partial = run / "checkpoints" / "step_000006.tmp"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\0" * 10)

    # 3. Resume, and die again at the final save: after the temp dir is complete, before the rename.
    def crash_before_rename(tmp, final):
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(checkpoint, "_publish_checkpoint", crash_before_rename)
    with pytest.raises(KeyboardInterrupt):
        train.main(run_args(run, cache_dir, *common, "--resume"))
    monkeypatch.undo()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert (run / "checkpoints" / "step_000006.tmp").is_dir()

    # 4. Resume again: from step 3, bit-identical to the run that was never interrupted.
    summary = train.main(run_args(run, cache_dir, *common, "--resume"))
    assert summary["start_step"] == 3
    assert step_losses(run) == expected  # exact equality on the CPU
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000006"
    assert not list((run / "checkpoints").glob("*.tmp"))

    # Same final weights as the uninterrupted run.
    a = _checkpoint_weights(straight / "checkpoints" / "step_000006")
    b = _checkpoint_weights(run / "checkpoints" / "step_000006")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state


def test_resume_refuses_a_different_batch_layout_naming_the_flag(tmp_path, cache_dir):
    out = tmp_path / "run"
    train.main(run_args(out, cache_dir, "--steps", "1", "--no-export"))
    with pytest.raises(ResumeMismatch, match=r"--tokens-per-step 1024 \(was 512\)"):
        train.main(
            run_args(out, cache_dir, "--steps", "2", "--no-export", "--resume", "--tokens-per-step", "1024")
        )
    with pytest.raises(train.TrainingError, match="no complete checkpoint"):
        train.main(run_args(tmp_path / "empty", cache_dir, "--steps", "1", "--resume"))


# --------------------------------------------------------------------------------------------------
# NaN / Inf
# --------------------------------------------------------------------------------------------------


def _nan_on_third_forward(monkeypatch):
    real_forward = PackedCausalLM.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        loss = real_forward(self, *args, **kwargs)
        if not torch.is_grad_enabled():  # the preflight probe's forwards, before step 1
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 3 else loss  # step 2's first micro-batch

    monkeypatch.setattr(PackedCausalLM, "forward", forward)


def test_nonfinite_loss_stops_naming_the_step(tmp_path, cache_dir, monkeypatch):
    _nan_on_third_forward(monkeypatch)
    with pytest.raises(train.TrainingError, match="step 2: non-finite loss"):
        train.main(
            run_args(tmp_path / "run", cache_dir, "--steps", "3", "--no-export", "--eval-fraction", "0")
        )


def test_nonfinite_step_is_skipped_on_request(tmp_path, cache_dir, monkeypatch):
    _nan_on_third_forward(monkeypatch)
    out = tmp_path / "run"
    summary = train.main(
        run_args(
            out, cache_dir, "--steps", "3", "--no-export", "--eval-fraction", "0", "--on-nonfinite", "skip"
        )
    )
    records = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert records[2].get("skipped") and not records[1].get("skipped") and not records[3].get("skipped")
    assert np.isfinite(summary["last_loss"])


# --------------------------------------------------------------------------------------------------
# Options that must not change the result
# --------------------------------------------------------------------------------------------------


def test_activation_checkpointing_and_fused_kernels_give_the_same_losses(tmp_path, cache_dir, capsys):
    base = ["--steps", "2", "--no-export", "--eval-fraction", "0"]
    train.main(run_args(tmp_path / "plain", cache_dir, *base))
    assert "fused kernels" not in capsys.readouterr().out  # auto: off on the CPU
    train.main(run_args(tmp_path / "ckpt", cache_dir, *base, "--activation-checkpointing"))
    # On the CPU the fused modules run the kernels' PyTorch reference: this checks the wiring (the
    # kernels themselves are compared in tests/test_model.py, Triton under the interpreter).
    train.main(run_args(tmp_path / "fused", cache_dir, *base, "--fused-kernels", "on"))
    assert "fused kernels: fused RMSNorm in 7 modules, fused SwiGLU in 3 MLPs" in capsys.readouterr().out
    a = step_losses(tmp_path / "plain")
    for other in ("ckpt", "fused"):
        b = step_losses(tmp_path / other)
        assert a.keys() == b.keys() == {1, 2}, other
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-5), other


# --------------------------------------------------------------------------------------------------
# Errors at the boundary
# --------------------------------------------------------------------------------------------------


def test_clear_errors_for_bad_paths_and_missing_chat_template(tmp_path, cache_dir, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.main(run_args(tmp_path / "a", cache_dir, "--model", str(tmp_path / "no-such-model")))
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        train.main(
            run_args(
                tmp_path / "a",
                cache_dir,
                "--model",
                str(tmp_path / "not-a-model"),
                "--tokenizer",
                str(REPO / "soulchat" / "assets" / "tokenizer"),
            )
        )
    with pytest.raises(FileNotFoundError, match="no-such.json"):
        train.main(run_args(tmp_path / "a", cache_dir, "--data", str(tmp_path / "no-such.json")))

    # A tokenizer without a chat template, with the default --template auto.
    plain = tmp_path / "plain-tokenizer"
    shutil.copytree(REPO / "soulchat" / "assets" / "tokenizer", plain)
    config_file = plain / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    for extra in plain.glob("chat_template*"):
        extra.unlink()
    with pytest.raises(ConfigError, match="has none"):
        train.main(run_args(tmp_path / "a", cache_dir, "--tokenizer", str(plain)))

    # The command line turns these into one readable line and exit status 2.
    monkeypatch.setattr(
        sys, "argv", ["soulchat.train", *run_args(tmp_path / "a", cache_dir, "--data", "missing.json")]
    )
    with pytest.raises(SystemExit) as exit_info:
        train.cli()
    assert exit_info.value.code == 2
    assert "error: --data missing.json" in capsys.readouterr().err


def test_exported_chat_templates_match_the_training_rendering():
    from transformers import AutoTokenizer

    from soulchat.data.conversation import Turn
    from soulchat.data.render import render_conversation, render_prompt

    turns = [
        Turn("system", "你是一位温暖的心理咨询师。"),
        Turn("client", "我最近总是失眠。"),
        Turn("counselor", "听起来你这段时间很辛苦。"),
        Turn("client", "是的，压力很大。"),
    ]
    roles = {"system": "system", "client": "user", "counselor": "assistant"}
    messages = [{"role": roles[t.role], "content": t.text} for t in turns]
    for template in ("soulchat", "chatml"):
        tokenizer = AutoTokenizer.from_pretrained(str(REPO / "soulchat" / "assets" / "tokenizer"))
        export.attach_chat_template(tokenizer, template)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert prompt == render_prompt(turns, tokenizer, template), template
        full = tokenizer.apply_chat_template(messages[:3], tokenize=False)
        assert full.rstrip("\n") == render_conversation(turns[:3], tokenizer, template).text.rstrip("\n"), (
            template
        )


# --------------------------------------------------------------------------------------------------
# End to end: the default command, FSDP across two processes, export, fine-tuning the export
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_command_end_to_end_and_export_loads_and_generates(tmp_path, cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "default"
    # The default command, shortened: the embedded model, corpus and row sizes; only fewer steps.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "soulchat.train",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--save-every",
            "2",
            "--no-progress",
            "--output-dir",
            str(out),
        ],
        check=False,
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "loss first->last" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["last_loss"] < summary["first_loss"]
    assert np.isfinite(summary["eval_loss"]) and summary["eval_ppl"] > 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("lr", "grad_norm", "tokens_per_s", "trained_tokens_per_s", "peak_memory_gb"):
        assert all(np.isfinite(r[key]) for r in steps), key
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert (
        json.loads((out / "checkpoints" / "step_000004" / "config.json").read_text())["train"]["steps"] == 4
    )

    # The export is a plain Hugging Face model directory, equal to the final checkpoint.
    export = out / "export"
    model = AutoModelForCausalLM.from_pretrained(str(export), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(export), local_files_only=True)
    exported = load_export(export)
    saved = _checkpoint_weights(out / "checkpoints" / "step_000004")
    for name, value in exported.items():
        torch.testing.assert_close(value, saved[f"model.lm.{name}"], rtol=0, atol=0, msg=name)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # re-tied
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "我最近总是失眠，怎么办？"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    generated = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]


@pytest.mark.slow
def test_fsdp_two_processes_end_to_end_then_resume_in_one_process(tmp_path, cache_dir):
    # Held-out rows rarely split evenly over two processes: the shorter rank pads its last evaluation.
    common = ["--steps", "4", "--no-export", "--eval-fraction", "0.04"]
    single = tmp_path / "single"
    single_summary = train.main(run_args(single, cache_dir, *common))

    # Two processes, FSDP2: a checkpoint at step 2 and the export at the end (gathered on rank 0).
    fsdp = tmp_path / "fsdp"
    torchrun(
        "-m",
        "soulchat.train",
        *run_args(
            fsdp,
            cache_dir,
            "--steps",
            "4",
            "--eval-fraction",
            "0.04",
            "--save-every",
            "2",
            "--parallel",
            "fsdp",
        ),
    )
    a, b = step_losses(single), step_losses(fsdp)
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)
    fsdp_summary = json.loads((fsdp / "summary.json").read_text())
    assert fsdp_summary["eval_tokens"] == single_summary["eval_tokens"] > 0
    assert fsdp_summary["eval_loss"] == pytest.approx(single_summary["eval_loss"], rel=1e-5)
    exported = load_export(fsdp / "export")
    reference = _checkpoint_weights(single / "checkpoints" / "step_000004")
    for name, value in exported.items():
        torch.testing.assert_close(value, reference[f"model.lm.{name}"], rtol=1e-4, atol=1e-5, msg=name)

    # The 2-process FSDP checkpoint of step 2 resumes in one process (DCP reshards it).
    shutil.rmtree(fsdp / "checkpoints" / "step_000004")
    (fsdp / "checkpoints" / "latest").write_text("step_000002\n")
    summary = train.main(run_args(fsdp, cache_dir, *common, "--resume"))
    assert summary["start_step"] == 2
    resumed = step_losses(fsdp)
    for step in (3, 4):
        assert resumed[step] == pytest.approx(a[step], rel=1e-5)

    # Real use: fine-tune the exported model directory as a local Hugging Face model.
    tuned = tmp_path / "tuned"
    summary = train.main(
        run_args(
            tuned,
            cache_dir,
            "--model",
            str(fsdp / "export"),
            "--steps",
            "2",
            "--eval-fraction",
            "0",
            "--lr",
            "1e-4",
        )
    )
    # It starts from the trained weights: its first loss is that of the trained model, not of a random one.
    assert summary["first_loss"] < a[1] - 0.5
    assert np.isfinite(summary["last_loss"])
    assert (tuned / "export" / "config.json").is_file()
