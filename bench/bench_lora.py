"""LoRA rows of the end-to-end benchmark: bench.bench_train's plan and harness, adapters in every method.

    python -m bench.bench_lora                                   # CPU: tiny model, synth + bundled data
    python -m bench.bench_lora --data bundled --steps 3          # quick
    python -m bench.bench_lora --device cuda --model-shape 1.5b  # GPU: bf16 frozen base
    python -m bench.bench_lora --device cuda --model-shape 7b --load-in-4bit --methods soulchat,hf_padded
                                                                 # the QLoRA row on a Qwen2-7B shape

Methods (the same conversations per optimizer step, the same base weights, the same LoRA options):

1. ``hf_padded``: peft on plain Hugging Face, whole conversations padded per micro-batch, the model's own
   loss (bench_train's method 1 with ``soulchat.lora.apply_lora`` on the model it builds).
2. ``trl_sft``: TRL ``SFTTrainer`` with a peft ``LoraConfig``, pre-tokenized conversations with a
   ``completion_mask`` of the counselor targets, padded batches, its own optimizer loop. Its sampler
   shuffles the step plan's conversations itself, so its per-step losses are not step-matched (the
   loss comparison does not apply to it); per-step trained tokens are the run's mean; padding is not
   counted (``tokens_processed`` = real tokens).
3. ``soulchat``: soulchat LoRA on the packed path (bench_train's method 4, same wrapping).

Every child runs bench_train's child with its model builder wrapped: the frozen base is cast to the
compute dtype (bf16 on CUDA), then ``soulchat.lora.apply_lora`` injects the adapters (fp32); with
``--load-in-4bit`` the random base is saved and reloaded in NF4 first (CUDA, bitsandbytes). Rows go to
bench/results/train_lora.{jsonl,csv} with hardware, versions, commit and date. Numbers measured on a
shared machine are distorted: measure on an idle one.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/bench_lora.py` from the repo root
    sys.path.insert(0, str(ROOT))

from bench import bench_train

METHODS = ("hf_padded", "trl_sft", "soulchat")
# The QLoRA row of the GPU check: a Qwen2-7B-shaped model (EmoLLM's Qwen2-7B LoRA recipe), random weights.
QWEN2_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1e6, "max_position_embeddings": 32768,
            "tie_word_embeddings": False}  # fmt: skip


# ==================================================================================================
# Child: bench_train's child with LoRA models
# ==================================================================================================


def lora_options(args: argparse.Namespace):
    from soulchat.options import LoraConfig

    return LoraConfig(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                      load_in_4bit=args.load_in_4bit)  # fmt: skip


def build_lora_lm(args: argparse.Namespace, build_lm, config_dir: str, attn: str, seed: int, device):
    """bench_train.build_lm, then the frozen base in the compute dtype (or NF4) and the adapters."""
    import torch

    from soulchat.lora import apply_lora

    lm = build_lm(config_dir, attn, seed, device)
    options = lora_options(args)
    if options.load_in_4bit:
        lm = _reload_4bit(lm, attn, device, options)
    elif torch.device(device).type == "cuda":
        lm.to(torch.bfloat16)
    return apply_lora(lm, options, seed=seed)  # the same adapters in every method


def _reload_4bit(lm, attn: str, device, options):
    import torch
    from transformers import AutoModelForCausalLM

    from soulchat.distributed import Runtime
    from soulchat.lora import base_load_kwargs

    rt = Runtime(0, 1, 0, torch.device(device), "none", torch.bfloat16)
    kwargs = base_load_kwargs(options, rt, builtin_model=False)
    with tempfile.TemporaryDirectory(prefix="bench_lora_base_") as tmp:
        lm.save_pretrained(tmp)
        quantized = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation=attn, **kwargs)
    quantized.config.use_cache = False
    quantized.train()
    return quantized


def run_trl(plan, args: argparse.Namespace, tokenizer, device, compute_dtype) -> dict:
    """TRL SFTTrainer + peft on the plan's conversations (see the module docstring for what differs)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from soulchat.lora import default_target_modules
    from soulchat.runlog import count_parameters

    lm = bench_train.build_lm(args.model_config, "sdpa", args.seed, device)
    checksum = bench_train.param_checksum(lm)
    if device.type == "cuda":
        lm.to(torch.bfloat16)
    rows, per_step = [], []
    for s in range(plan.steps):
        feats = bench_train.hf_features(plan, plan.step_conversations(s), per_turn=False)
        per_step.append(len(feats))
        rows += [{"input_ids": f["input_ids"], "completion_mask": [int(x != bench_train.IGNORE) for x in f["labels"]]}
                 for f in feats]  # fmt: skip
    accumulation = max(1, math.ceil(max(per_step) / args.batch_size))
    samples = plan.steps * accumulation * args.batch_size
    rows = (rows * math.ceil(samples / len(rows)))[:samples]  # one epoch of exactly max_steps steps
    trained_total = sum(sum(r["completion_mask"][1:]) for r in rows)
    real_total = sum(len(r["input_ids"]) for r in rows)
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_lora_trl_"), max_steps=plan.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=accumulation,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=args.weight_decay,
        max_grad_norm=args.grad_clip, adam_beta2=0.95, logging_steps=1, report_to=[], save_strategy="no",
        bf16=device.type == "cuda", use_cpu=device.type != "cuda", dataloader_num_workers=0, seed=args.seed,
        max_length=None, packing=False, completion_only_loss=True, disable_tqdm=True,
    )  # fmt: skip
    peft_config = PeftLoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank,
                                 lora_dropout=0.0, target_modules=default_target_modules(lm), task_type="CAUSAL_LM")  # fmt: skip

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.records: list[dict] = []
            self.t0 = self.c0 = 0.0

        def on_step_begin(self, *_, **__):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.records.append({"time_s": time.perf_counter() - self.t0, "cpu_s": time.process_time() - self.c0})

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs and self.records:
                self.records[-1].update(loss=float(logs["loss"]), grad_norm=float(logs.get("grad_norm", 0.0)))

    clock = StepClock()
    trainer = SFTTrainer(model=lm, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock])  # fmt: skip
    memory = bench_train.PeakMemory(device)
    trainer.train()
    peak_delta, peak = memory.delta()
    records = [
        {"step": i + 1, "loss": r.get("loss", float("nan")), "grad_norm": r.get("grad_norm", 0.0),
         "time_s": r["time_s"], "cpu_s": r["cpu_s"], "collate_s": 0.0,
         "tokens_processed": real_total // plan.steps, "real_tokens": real_total // plan.steps,
         "trained_tokens": trained_total // plan.steps, "micro_batches": accumulation}
        for i, r in enumerate(clock.records)
    ]  # fmt: skip
    return {
        "records": records, "peak_delta": peak_delta, "peak": peak, "memory_how": memory.how, "checksum": checksum,
        "config": trainer.model.config, "params_m": count_parameters(trainer.model) / 1e6, "attention": "sdpa",
        "step_matched": False,
    }


def child(args: argparse.Namespace) -> None:
    """bench_train.child with LoRA: its model builder wrapped, its HF runner extended with TRL."""
    if args.method == "trl_sft":  # TRL applies peft itself
        bench_train.run_hf = lambda method, *rest: run_trl(*rest)
    else:
        bench_train.build_lm = functools.partial(build_lora_lm, args, bench_train.build_lm)
    bench_train.child(args)


# ==================================================================================================
# Parent
# ==================================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    lora_flags = argparse.ArgumentParser(add_help=False)
    lora_flags.add_argument("--lora-rank", type=int, default=16)
    lora_flags.add_argument("--lora-alpha", type=float, default=None, help="unset = 2 x rank")
    lora_flags.add_argument("--load-in-4bit", action="store_true", help="QLoRA base (CUDA, bitsandbytes)")
    known, rest = lora_flags.parse_known_args(argv)
    shape = _take_model_shape(rest)
    if shape == "7b":  # bench_train knows up to 1.5b: register the 7B shape, parse as 1.5b, then restore
        bench_train.QWEN_SHAPES["7b"] = QWEN2_7B
        rest[rest.index("7b")] = "1.5b"
    if known.lora_alpha is None:
        known.lora_alpha = 2.0 * known.lora_rank
    if "--methods" not in rest and not any(a.startswith("--methods=") for a in rest):
        rest += ["--methods", ",".join(METHODS)]
    args = bench_train.parse_args(rest)
    for key, value in vars(known).items():
        setattr(args, key, value)
    if shape == "7b":
        args.model_shape = "7b"
    return args


def _take_model_shape(argv: list[str]) -> str | None:
    if "--model-shape" in argv and argv.index("--model-shape") + 1 < len(argv):
        return argv[argv.index("--model-shape") + 1]
    return None


def run_child(args: argparse.Namespace, method: str, plan: Path, workdir: Path) -> dict:
    """bench_train.run_child, re-pointed at this file and with the LoRA flags."""
    result = workdir / f"result_{plan.stem}_{method}.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", "--method", method, "--plan", str(plan),
        "--model-config", str(workdir / "model"), "--result", str(result), "--device", args.device,
        "--model-shape", args.model_shape, "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--weight-decay", str(args.weight_decay), "--grad-clip", str(args.grad_clip), "--seed", str(args.seed),
        "--warmup-steps", str(args.warmup_steps), "--threads", str(args.threads),
        "--lora-rank", str(args.lora_rank), "--lora-alpha", str(args.lora_alpha),
    ] + (["--load-in-4bit"] if args.load_in_4bit else [])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not result.exists():
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"method {method} failed (exit {proc.returncode}); its output is above")
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    from bench.common import RESULTS_DIR, cuda_available, write_rows

    if args.device is None:
        args.device = "cuda" if cuda_available() else "cpu"
    gpu = args.device.startswith("cuda")
    if gpu and not cuda_available():
        print("--device cuda: no CUDA device here; nothing measured (run on a GPU machine)")
        return 0
    if args.load_in_4bit and not gpu:
        raise SystemExit("--load-in-4bit needs --device cuda (bitsandbytes NF4)")
    args.steps = args.steps or (20 if gpu else 6)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (3 if gpu else 1)
    args.row_size = args.row_size or (4096 if gpu else 2048)
    args.rows_per_step = args.rows_per_step or (8 if gpu else 2)
    args.threads = (0 if gpu else 1) if args.threads is None else args.threads
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if "trl_sft" in methods:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl not installed: skipping the TRL SFTTrainer + peft row (pip install 'soulchat[bench]')")
            methods.remove("trl_sft")
    out_dir = Path(args.out) if args.out else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    auto_batch = args.batch_size == 0
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        workdir = Path(tmp)
        bench_train.save_model_config(args.model_shape, workdir)
        for data in [d.strip() for d in args.data.split(",") if d.strip()]:
            plan, info = bench_train.prepare_plan(args, data, workdir)
            if auto_batch:
                args.batch_size = max(1, round(args.row_size / info["mean_conversation_tokens"]))
            info["hf_batch_size"] = args.batch_size
            results = {}
            for method in methods:
                print(f"[{data}] lora {method} ...", flush=True)
                results[method] = run_child(args, method, plan, workdir)
            matched = {m: r for m, r in results.items() if r.get("step_matched", True)}
            bench_train.compare(matched, "cuda" if gpu else "cpu")
            bench_train.print_table(data, info, results)
            for method, r in results.items():
                row = {k: v for k, v in r.items() if k != "losses"}
                row.update(
                    method=f"lora_{method}", data=data, device=args.device, model_shape=args.model_shape,
                    lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, load_in_4bit=args.load_in_4bit,
                    row_size=args.row_size, rows_per_step=args.rows_per_step, hf_batch_size=args.batch_size,
                    lr=args.lr, step_losses=json.dumps([round(x, 6) for x in r["losses"]]),
                    **{f"data_{k}": v for k, v in info.items() if k != "data"},
                )  # fmt: skip
                rows.append(row)
    jsonl, csv_path = write_rows("train_lora", rows, results_dir=out_dir)
    print(f"rows: {jsonl}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
