"""End-to-end training benchmark: four ways to fine-tune the same model on the same conversations.

    python -m bench.bench_train                                   # CPU: tiny model, synth + bundled data
    python bench/bench_train.py --data bundled --steps 4          # quick
    python -m bench.bench_train --device cuda --model-shape 1.5b  # GPU: Qwen2.5-1.5B-shaped, bf16, rows of 4096

Methods (one run, same model init, same optimizer, same conversations in every optimizer step):

1. ``hf_padded``: plain Hugging Face. Whole conversations as separate sequences, batches padded to their
   longest (``DataCollatorForSeq2Seq``), labels masked to counselor tokens (soulchat's render masks), SDPA
   attention, the model's own loss from ``labels``.
2. ``paper_per_turn``: the paper's layout. One sample per counselor turn (the whole preceding context, then
   that reply; loss only on that reply), padded the same way. For a causal model it trains exactly the
   same (context, target) pairs as 1 - the same loss - while re-reading the context once per turn.
3. ``hf_flattening``: Hugging Face padding-free. ``DataCollatorWithFlattening`` concatenates a batch into
   one row with restarting ``position_ids``; the model's own loss. Attention: ``flash_attention_2`` when
   flash-attn is installed (CUDA; boundaries from the collator's ``cu_seq_lens_*``), else SDPA. Recent
   transformers (checked with 5.24) notice the restarting position_ids when no attention mask is passed
   (``masking_utils.find_packed_sequence_indices``) and build a block-diagonal causal mask, so SDPA does
   NOT attend across conversations - at the price of a dense [T, T] mask per forward and a host sync to
   detect the packing. Releases without that detection silently attend across sequences with SDPA, so
   every run checks it: the first flattened micro-batch's logits are compared with each conversation run
   on its own (``flatten_max_logit_diff``, ``flatten_isolated``).
4. ``trl_sft``: TRL's ``SFTTrainer``, the trainer most users would pick, as they would configure it for
   this job: the same tokens and counselor masks as a pre-tokenized dataset (``input_ids`` +
   ``assistant_masks``, so TRL builds its labels from soulchat's mask), ``packing=True`` with its ``bfd``
   strategy (which turns on its padding-free path: rows of ``--row-size`` tokens with restarting
   ``position_ids``), its default loss (``nll``), ``--rows-per-step`` rows per optimizer step through
   gradient accumulation of one-row micro-batches, the same AdamW hyper-parameters and constant learning
   rate. TRL packs the whole dataset (every step's conversations in sampler order) itself and shuffles its
   rows, so its steps hold other conversations than soulchat's: its loss is reported, not compared step
   by step. Skipped with a line saying so when ``trl`` is not installed.
5. ``soulchat``: rows packed by the C++ best-fit-decreasing packer (``soulchat.data.packing``),
   ``soulchat.model.PackedCausalLM`` (varlen attention, fused lm-head + loss at counselor positions only),
   optimizer steps through ``soulchat.train.train_step``.

One optimizer step = the conversations a random sampler draws (a seeded permutation, a new one each epoch)
up to ``--rows-per-step`` x ``--row-size`` tokens. The Hugging Face methods take them in that order in
micro-batches of ``--batch-size`` sequences (default: about one row's tokens, row size / mean length);
soulchat packs the same conversations into rows with ``soulchat.data.packing.pack`` and assembles each row
(``assemble``, inside the timed step, as the trainer does). Every method's loss
is the SUM over the step's counselor targets divided by their COUNT: train_step does this itself; for the
Hugging Face methods the model's own loss gets ``num_items_in_batch`` = the step's counselor-target count,
which switches transformers' ``ForCausalLMLoss`` to sum / count (what its Trainer does under gradient
accumulation) instead of a mean per micro-batch. The same AdamW (soulchat.optimizer.parameter_groups), the same
constant learning rate and the same gradient clipping (soulchat.train.clip_grad_norm) for all methods.

Each method runs in a fresh child process so that its peak memory is its own: on the CPU the peak RSS
(``VmHWM``, reset through /proc/self/clear_refs once the model and data are loaded) minus the RSS at that
point - gradients, AdamW state, activations, logits and allocator slack of the training loop; on CUDA
``torch.cuda.max_memory_allocated`` minus the allocated bytes at that point. Throughput counts the steps
after ``--warmup-steps``; the wall time covers all steps. On the CPU the children run one torch thread
(``--threads``), and each row also carries ``trained_tokens_per_cpu_s`` (process CPU time), which other
jobs on a shared machine do not inflate.

Token counts per step: ``tokens_processed`` = the slots the model computes on (padding included for 1-2),
``real_tokens`` = the non-padding tokens among them (for 2 this counts every context again per turn),
``conversation_tokens`` = the step's conversations' own tokens (identical for all methods),
``trained_tokens`` = counselor targets (identical for all methods).

Rows go to bench/results/train.{jsonl,csv} (with hardware, versions, commit, date) and a chart of trained
tokens/s and peak memory per method to bench/results/train.png.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/bench_train.py` from the repo root
    sys.path.insert(0, str(ROOT))

import numpy as np

METHODS = ("hf_padded", "paper_per_turn", "hf_flattening", "trl_sft", "soulchat")
LABELS = {
    "hf_padded": "1. HF padded",
    "paper_per_turn": "2. paper per-turn",
    "hf_flattening": "3. HF flattening",
    "trl_sft": "4. TRL SFTTrainer",
    "soulchat": "5. soulchat",
}
# Methods that train the very conversations of every soulchat step, so their step losses must match it (2
# trains the same pairs too); TRL packs and shuffles on its own.
SAME_STEPS = ("hf_padded", "paper_per_turn", "hf_flattening")
IGNORE = -100

# Qwen2.5-0.5B / -1.5B shapes (their config.json), random weights; the vocabulary is Qwen's 151,936 so the
# lm head costs what it costs in the real model (the bundled tokenizer's ids all fall inside it).
QWEN_SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1e6,
             "max_position_embeddings": 32768, "tie_word_embeddings": True},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1e6,
             "max_position_embeddings": 32768, "tie_word_embeddings": True},
}

# Targets of the CPU run (tiny model): soulchat's trained tokens/s against methods 1 and 2, and its peak
# memory against method 1.
TARGET_SPEEDUP_VS_PADDED = 2.5
TARGET_SPEEDUP_VS_PER_TURN = 8.0
TARGET_MEMORY_RATIO = 0.5


# ==================================================================================================
# Data: conversations -> tokens + counselor masks -> packed rows -> the conversations of each step
# ==================================================================================================


def _data_path(data: str, workdir: Path, n_synth: int) -> Path:
    from soulchat.data.pipeline import default_corpus_path
    from soulchat.data.synth import write_synthetic

    if data == "synth":
        path = workdir / "synth.json"
        write_synthetic(path, n_synth, seed=0)
        return path
    if data == "bundled":
        return default_corpus_path()
    path = Path(data)
    if not path.exists():
        raise SystemExit(f"--data {data}: no such file (use synth, bundled or a path to a conversation file)")
    return path


def step_conversations(lengths: np.ndarray, steps: int, budget: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each step's conversations, as a random sampler would draw them: a seeded permutation (a new one
    per epoch), cut into consecutive groups of at most ``budget`` tokens. Returns (step_offsets [S+1],
    step_seqs [n]): step s is ``step_seqs[step_offsets[s]:step_offsets[s+1]]``, in sampler order."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    offsets = [0]
    queue: list[int] = []
    for _ in range(steps):
        used = 0
        while True:
            if not queue:
                queue = rng.permutation(len(lengths)).tolist()[::-1]  # pop() takes from the front
            n = int(lengths[queue[-1]])
            if used and used + n > budget:
                break
            order.append(queue.pop())
            used += n
        offsets.append(len(order))
    return np.asarray(offsets, dtype=np.int64), np.asarray(order, dtype=np.int64)


def prepare_plan(args: argparse.Namespace, data: str, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """Tokenize, draw the conversations of every step, pack each step's conversations into rows; saved
    as one .npz that every child reads."""
    from soulchat.data.packing import pack
    from soulchat.data.pipeline import default_template, load_tokenizer
    from soulchat.data.readers import read_conversations
    from soulchat.data.render import render_and_tokenize

    tokenizer = load_tokenizer()
    budget = args.rows_per_step * args.row_size
    # Enough synthetic dialogues for every step (~400 tokens each with the bundled tokenizer), +25%.
    n_synth = args.synth_dialogues or math.ceil(args.steps * budget / 400 * 1.25) + 64
    path = _data_path(data, workdir, n_synth)
    seqs = list(
        render_and_tokenize(
            read_conversations([path]), tokenizer, default_template(tokenizer), args.max_length, overflow="split"
        )
    )
    if not seqs:
        raise SystemExit(f"--data {data}: no conversation with a counselor turn")
    lengths = np.array([len(s.input_ids) for s in seqs], dtype=np.int64)
    seq_offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=seq_offsets[1:])
    step_offsets, step_seqs = step_conversations(lengths, args.steps, budget, args.seed)

    # soulchat's rows for each step: the C++ best-fit-decreasing packer over the step's conversations.
    # (The trainer packs the whole corpus once and shuffles the rows; a step then holds rows of similar
    # lengths, which would flatter the padded baselines. Packing per step keeps a random sampler's
    # mix for every method and costs soulchat nothing: packed rows carry no padding either way.)
    row_offsets, row_seqs, step_row_offsets = [0], [], [0]
    for s in range(args.steps):
        ids = step_seqs[step_offsets[s] : step_offsets[s + 1]]
        r_off, r_seqs = pack(lengths[ids], args.row_size, seed=args.seed + s)
        row_seqs.append(ids[r_seqs])
        row_offsets += (row_offsets[-1] + r_off[1:]).tolist()
        step_row_offsets.append(step_row_offsets[-1] + len(r_off) - 1)
    plan = workdir / f"plan_{data.replace('/', '_')}.npz"
    np.savez(
        plan,
        tokens=np.concatenate([s.input_ids for s in seqs]).astype(np.int32),
        trained=np.concatenate([s.trained for s in seqs]).astype(np.bool_),
        weight=np.concatenate([s.weight for s in seqs]).astype(np.float32),
        seq_offsets=seq_offsets,
        step_offsets=step_offsets,
        step_seqs=step_seqs,
        row_offsets=np.asarray(row_offsets, dtype=np.int64),
        row_seqs=np.concatenate(row_seqs),
        step_row_offsets=np.asarray(step_row_offsets, dtype=np.int64),
    )
    n_rows = step_row_offsets[-1]
    step_tokens = int(lengths[step_seqs].sum())
    info = {
        "data": data,
        "conversations": len(seqs),
        "mean_conversation_tokens": float(lengths.mean()),
        "max_conversation_tokens": int(lengths.max()),
        "conversations_per_step": len(step_seqs) / args.steps,
        "tokens_per_step": step_tokens / args.steps,
        "rows_per_step": n_rows / args.steps,
        "row_fill": step_tokens / (n_rows * args.row_size),
        "epochs": len(step_seqs) / len(seqs),
    }
    return plan, info


class Plan:
    """The child's view of the saved plan: conversations by id, each step's conversations and rows."""

    def __init__(self, path: str) -> None:
        z = np.load(path)
        self.tokens, self.trained, self.weight = z["tokens"], z["trained"], z["weight"]
        self.seq_offsets = z["seq_offsets"]
        self.step_offsets, self.step_seqs = z["step_offsets"], z["step_seqs"]
        self.row_offsets, self.row_seqs = z["row_offsets"], z["row_seqs"]
        self.step_row_offsets = z["step_row_offsets"]

    @property
    def steps(self) -> int:
        return len(self.step_offsets) - 1

    def step_conversations(self, step: int) -> np.ndarray:
        return self.step_seqs[self.step_offsets[step] : self.step_offsets[step + 1]]

    def step_rows(self, step: int) -> list[np.ndarray]:
        """The conversation ids of each packed row of the step."""
        rows = range(self.step_row_offsets[step], self.step_row_offsets[step + 1])
        return [self.row_seqs[self.row_offsets[r] : self.row_offsets[r + 1]] for r in rows]

    def conversation(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.seq_offsets[i], self.seq_offsets[i + 1]
        return self.tokens[a:b], self.trained[a:b]


# ==================================================================================================
# Model, optimizer, memory probes (child side)
# ==================================================================================================


def model_config(shape: str, tokenizer):
    from soulchat.loading import tiny_qwen2_config

    eos = tokenizer.eos_token_id
    ids = {
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    }
    if shape == "tiny":
        return tiny_qwen2_config(len(tokenizer), eos_token_id=eos, **ids)  # as soulchat.loading.build_model
    return tiny_qwen2_config(eos_token_id=eos, **ids, **QWEN_SHAPES[shape])


def save_model_config(shape: str, workdir: Path) -> Path:
    """Written once by the parent: every child builds its model from this very config (and the seed)."""
    from soulchat.data.pipeline import load_tokenizer

    path = workdir / "model"
    model_config(shape, load_tokenizer()).save_pretrained(str(path))
    return path


def build_lm(config_dir: str, attn: str, seed: int, device):
    """The same random weights for every method: the same config, the seed set right before the weights
    are drawn (checked afterwards through ``param_checksum``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from soulchat.attention import register_attention

    register_attention()
    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    lm.config.use_cache = False
    lm.train()
    return lm


def param_checksum(model) -> str:
    """A fingerprint of the initial weights (must be equal across methods)."""
    import torch

    seen, total = set(), torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.detach().double().abs().sum().cpu()
    return f"{total.item():.10e}"


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory of the training loop beyond what was resident when it started (bytes)."""

    def __init__(self, device) -> None:
        import torch

        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
            self.how = "cuda max_memory_allocated - allocated at start"
            return
        try:  # "5" resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.how = "VmHWM (reset at start) - VmRSS at start"
        except OSError:
            self.how = "VmHWM (not resettable: includes setup) - VmRSS at start"
        self.base = _status_kib("VmRSS") * 1024

    def delta(self) -> tuple[int, int]:
        """(peak - start, absolute peak) in bytes."""
        import torch

        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kib("VmHWM") * 1024
        return peak - self.base, peak


# ==================================================================================================
# The Hugging Face methods (1-3)
# ==================================================================================================


def _trained_runs(trained: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of trained tokens: one per counselor turn (content + end marker)."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], trained.astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2])]


def hf_features(plan: Plan, conv_ids: np.ndarray, per_turn: bool) -> list[dict[str, list[int]]]:
    """Hugging Face dataset rows: labels = the token where it is a counselor target, else -100.

    The model shifts labels itself (position j predicts labels[j + 1]), so these are the same targets as
    soulchat's pre-shifted ones. per_turn: one row per counselor turn, the context up to the end of that
    turn, labels only on that turn.
    """
    out = []
    for i in conv_ids.tolist():
        ids, trained = plan.conversation(i)
        if not per_turn:
            labels = np.where(trained, ids, IGNORE)
            out.append({"input_ids": ids.tolist(), "attention_mask": [1] * len(ids), "labels": labels.tolist()})
            continue
        for a, b in _trained_runs(trained):
            labels = np.full(b, IGNORE, dtype=np.int64)
            labels[a:b] = ids[a:b]
            out.append({"input_ids": ids[:b].tolist(), "attention_mask": [1] * b, "labels": labels.tolist()})
    return out


def hf_step_batches(plan: Plan, step: int, per_turn: bool, batch_size: int) -> list[list[dict]]:
    """The step's samples in sampler order, in micro-batches of ``batch_size``."""
    feats = hf_features(plan, plan.step_conversations(step), per_turn)
    return [feats[i : i + batch_size] for i in range(0, len(feats), batch_size)]


def flattening_attention(device) -> str:
    """flash_attention_2 where flash-attn runs (CUDA), else SDPA with transformers' packed-sequence mask."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def check_flattening(lm, features: list[dict], collator, device, autocast) -> float:
    """Max |logit difference| between one flattened forward and each sequence run on its own.

    Near 0 (float rounding) means attention stays inside each sequence; a cross-sequence leak shows up
    as O(1) differences on every sequence after the first.
    """
    import torch

    with torch.no_grad(), autocast:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(features).items()}
        batch.pop("labels")
        flat = lm(**batch).logits[0].float()  # [T, V]
        worst, start = 0.0, 0
        for f in features:
            ids = torch.tensor(f["input_ids"], device=device)[None]
            alone = lm(input_ids=ids).logits[0].float()  # [L, V]
            worst = max(worst, (flat[start : start + len(f["input_ids"])] - alone).abs().max().item())
            start += len(f["input_ids"])
    return worst


def run_hf(method: str, plan: Plan, args: argparse.Namespace, tokenizer, device, compute_dtype) -> dict:
    import contextlib

    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    from soulchat.optimizer import parameter_groups
    from soulchat.runlog import count_parameters
    from soulchat.train import clip_grad_norm

    per_turn = method == "paper_per_turn"
    flatten = method == "hf_flattening"
    attn = flattening_attention(device) if flatten else "sdpa"
    lm = build_lm(args.model_config, attn, args.seed, device)
    checksum = param_checksum(lm)
    optimizer = torch.optim.AdamW(
        parameter_groups(lm, args.weight_decay, False), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
        **({"fused": True} if device.type == "cuda" else {}),
    )
    if flatten:
        collator = DataCollatorWithFlattening(return_flash_attn_kwargs=attn == "flash_attention_2")
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE, return_tensors="pt")

    def autocast_ctx():
        if compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=compute_dtype)

    # Everything a dataset would hold is built before the clock starts: per-step sample lists.
    steps = [hf_step_batches(plan, s, per_turn, args.batch_size) for s in range(plan.steps)]
    extra: dict[str, Any] = {"attention": attn}
    if flatten:
        # Correctness probe on the first micro-batch (before training, not timed).
        diff = check_flattening(lm, steps[0][0], collator, device, autocast_ctx())
        extra["flatten_max_logit_diff"] = diff
        # A leak across sequences moves logits by O(0.1-1); rounding stays far below (bf16: ~1e-2).
        extra["flatten_isolated"] = diff < (1e-3 if compute_dtype == torch.float32 else 5e-2)

    memory = PeakMemory(device)
    records = []
    for s, micro_batches in enumerate(steps):
        # The step's normaliser: counselor targets after the shift (labels[1:] of every sample).
        n_trained = sum(sum(1 for x in f["labels"][1:] if x != IGNORE) for mb in micro_batches for f in mb)
        t0, c_start = time.perf_counter(), time.process_time()
        loss_sum = torch.zeros((), device=device)
        processed = real = 0
        collate_s = 0.0
        for mb in micro_batches:
            c0 = time.perf_counter()
            feats = [{k: f[k] for k in ("input_ids", "labels")} for f in mb] if flatten else mb
            batch = collator(feats)
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            collate_s += time.perf_counter() - c0
            processed += batch["input_ids"].numel()
            real += int(sum(len(f["input_ids"]) for f in mb))
            with autocast_ctx():
                out = lm(**batch, num_items_in_batch=n_trained, use_cache=False)  # loss: this batch's sum / n_trained
            out.loss.backward()
            loss_sum += out.loss.detach()
            del out
        loss = loss_sum.item()
        grad_norm = float(clip_grad_norm([p for p in lm.parameters() if p.grad is not None], args.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        records.append({
            "step": s + 1, "loss": loss, "grad_norm": grad_norm, "time_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c_start, "collate_s": collate_s, "tokens_processed": processed,
            "real_tokens": real, "trained_tokens": n_trained, "micro_batches": len(micro_batches),
        })
    peak_delta, peak = memory.delta()
    return {
        "records": records, "peak_delta": peak_delta, "peak": peak, "memory_how": memory.how, "checksum": checksum,
        "config": lm.config, "params_m": count_parameters(lm) / 1e6, **extra,
    }


# ==================================================================================================
# TRL SFTTrainer (method 4)
# ==================================================================================================


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None


def run_trl(plan: Plan, args: argparse.Namespace, tokenizer, device, compute_dtype) -> dict:
    """TRL's SFTTrainer with bfd packing (its padding-free path) and its default loss, on the same tokens and
    counselor masks; per-step time, loss and counted targets come from a callback and a counting collator."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from soulchat.runlog import count_parameters

    lm = build_lm(args.model_config, "sdpa", args.seed, device)
    checksum = param_checksum(lm)
    conv_ids = plan.step_seqs[: plan.step_offsets[-1]].tolist()  # every step's conversations, sampler order
    rows = []
    for i in conv_ids:
        ids, trained = plan.conversation(i)
        rows.append({"input_ids": ids.tolist(), "assistant_masks": trained.astype(np.int64).tolist()})
    config = SFTConfig(
        output_dir=str(Path(args.result).parent / "trl_out"), max_length=args.row_size, packing=True,
        packing_strategy="bfd", per_device_train_batch_size=1, gradient_accumulation_steps=args.rows_per_step,
        max_steps=plan.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=args.weight_decay, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        max_grad_norm=args.grad_clip, logging_steps=1, save_strategy="no", report_to=[], seed=args.seed,
        data_seed=args.seed, dataloader_num_workers=0, use_cpu=device.type == "cpu",
        bf16=compute_dtype == torch.bfloat16, disable_tqdm=True, dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=lm, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    counts = {"trained": 0, "processed": 0, "micro_batches": 0, "collate_s": 0.0}
    collate = trainer.data_collator

    def counting_collator(features):
        t0 = time.perf_counter()
        batch = collate(features)
        counts["collate_s"] += time.perf_counter() - t0
        counts["trained"] += int((batch["labels"][..., 1:] != IGNORE).sum())  # targets after the model's shift
        counts["processed"] += int(batch["input_ids"].numel())
        counts["micro_batches"] += 1
        return batch

    trainer.data_collator = counting_collator
    records: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t, self.c = time.perf_counter(), time.process_time()
            self.seen = dict(counts)

        def on_step_end(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now, cpu = time.perf_counter(), time.process_time()
            records.append({
                "step": len(records) + 1, "loss": float("nan"), "grad_norm": float("nan"), "time_s": now - self.t,
                "cpu_s": cpu - self.c, "collate_s": counts["collate_s"] - self.seen["collate_s"],
                "tokens_processed": counts["processed"] - self.seen["processed"],
                "real_tokens": counts["processed"] - self.seen["processed"],  # padding-free: no padding slots
                "trained_tokens": counts["trained"] - self.seen["trained"],
                "micro_batches": counts["micro_batches"] - self.seen["micro_batches"],
            })
            self.t, self.c, self.seen = now, cpu, dict(counts)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if records and logs and "loss" in logs:
                records[-1]["loss"] = float(logs["loss"])
                records[-1]["grad_norm"] = float(logs.get("grad_norm", float("nan")))

    trainer.add_callback(StepTimer())
    memory = PeakMemory(device)
    trainer.train()
    peak_delta, peak = memory.delta()
    return {
        "records": records, "peak_delta": peak_delta, "peak": peak, "memory_how": memory.how, "checksum": checksum,
        "config": lm.config, "params_m": count_parameters(lm) / 1e6, "attention": "sdpa (TRL padding-free bfd)",
    }


# ==================================================================================================
# soulchat (method 5)
# ==================================================================================================


def run_soulchat(plan: Plan, args: argparse.Namespace, tokenizer, device, compute_dtype) -> dict:
    import torch

    from soulchat.attention import ATTENTION_NAME
    from soulchat.data.packing import assemble
    from soulchat.distributed import Runtime
    from soulchat.kernels.linear_cross_entropy import linear_cross_entropy  # noqa: F401 (import cost out of the loop)
    from soulchat.kernels.varlen_attention import varlen_attention_backend
    from soulchat.model import PackedCausalLM
    from soulchat.optimizer import parameter_groups
    from soulchat.runlog import count_parameters
    from soulchat.train import train_step

    lm = build_lm(args.model_config, ATTENTION_NAME, args.seed, device)
    checksum = param_checksum(lm)
    model = PackedCausalLM(lm).to(device)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.weight_decay, False), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
        **({"fused": True} if device.type == "cuda" else {}),
    )
    rt = Runtime(rank=0, world_size=1, local_rank=0, device=device, parallel="none", compute_dtype=compute_dtype)
    probe = torch.empty(1, lm.config.num_attention_heads, lm.config.hidden_size // lm.config.num_attention_heads,
                        device=device, dtype=compute_dtype)

    memory = PeakMemory(device)
    records = []
    for s in range(plan.steps):
        t0, c_start = time.perf_counter(), time.process_time()
        # Row assembly is part of the step, as in soulchat.train (store.micro_batch in the loop).
        batches = [
            assemble(plan.tokens, plan.trained, plan.weight, plan.seq_offsets, row) for row in plan.step_rows(s)
        ]
        collate_s = time.perf_counter() - t0
        result = train_step(model, model, optimizer, batches, rt, args.grad_clip, "stop", s + 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tokens = sum(len(b["input_ids"]) for b in batches)
        records.append({
            "step": s + 1, "loss": result.loss, "grad_norm": result.grad_norm, "time_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c_start, "collate_s": collate_s, "tokens_processed": tokens,
            "real_tokens": tokens, "trained_tokens": result.trained_tokens, "micro_batches": len(batches),
        })
    peak_delta, peak = memory.delta()
    return {
        "records": records, "peak_delta": peak_delta, "peak": peak, "memory_how": memory.how, "checksum": checksum,
        "config": lm.config, "params_m": count_parameters(lm) / 1e6,
        "attention": f"{ATTENTION_NAME} ({varlen_attention_backend(probe)})",
    }


# ==================================================================================================
# Child process: one method, one JSON result
# ==================================================================================================


def step_flops(config, plan: Plan, step: int) -> float:
    """The useful training FLOPs of a step (same for every method): soulchat.runlog.matmul_flops over the
    step's conversations, lm head on counselor targets only."""
    from soulchat.runlog import matmul_flops

    ids = plan.step_conversations(step)
    lens = plan.seq_offsets[ids + 1] - plan.seq_offsets[ids]
    trained = sum(int(plan.conversation(int(i))[1][1:].sum()) for i in ids)
    return matmul_flops(config, int(lens.sum()), trained, int((lens.astype(np.int64) ** 2).sum()))


def child(args: argparse.Namespace) -> None:
    import torch

    from soulchat.data.pipeline import load_tokenizer
    from soulchat.runlog import peak_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    plan = Plan(args.plan)
    tokenizer = load_tokenizer()
    runners = {"soulchat": run_soulchat, "trl_sft": run_trl}
    run = runners.get(args.method) or functools.partial(run_hf, args.method)
    if args.profile:
        # Op-level profile of the whole run (setup included, so look at the training ops); it slows every
        # op down, so the throughput of a profiled run is not comparable to an unprofiled one.
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            res = run(plan, args, tokenizer, device, compute_dtype)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        Path(args.result).with_suffix(".profile.txt").write_text(
            prof.key_averages().table(sort_by=sort, row_limit=30)
        )
    else:
        res = run(plan, args, tokenizer, device, compute_dtype)

    recs = res.pop("records")
    config = res.pop("config")
    timed = recs[args.warmup_steps :] or recs
    t_timed = sum(r["time_s"] for r in timed)
    conv_tokens = sum(int((plan.seq_offsets[plan.step_conversations(s) + 1]
                           - plan.seq_offsets[plan.step_conversations(s)]).sum()) for s in range(plan.steps))

    def total(key: str, rs=recs) -> int:
        return int(sum(r[key] for r in rs))

    out = {
        "method": args.method,
        "steps": len(recs),
        "timed_steps": len(timed),
        "wall_s": sum(r["time_s"] for r in recs),
        "timed_s": t_timed,
        "timed_cpu_s": sum(r["cpu_s"] for r in timed),
        "collate_s": sum(r["collate_s"] for r in timed),
        "tokens_processed": total("tokens_processed"),
        "real_tokens": total("real_tokens"),
        "conversation_tokens": conv_tokens,
        "trained_tokens": total("trained_tokens"),
        "micro_batches": total("micro_batches"),
        "tokens_processed_per_s": total("tokens_processed", timed) / t_timed,
        "real_tokens_per_s": total("real_tokens", timed) / t_timed,
        "trained_tokens_per_s": total("trained_tokens", timed) / t_timed,
        # Process CPU time (all threads) is not inflated by other jobs waiting for the same cores.
        "trained_tokens_per_cpu_s": total("trained_tokens", timed) / max(1e-9, sum(r["cpu_s"] for r in timed)),
        "padding_fraction": 1.0 - total("real_tokens") / total("tokens_processed"),
        "first_loss": recs[0]["loss"],
        "final_loss": recs[-1]["loss"],
        "losses": [r["loss"] for r in recs],
        "peak_memory_mb": res.pop("peak_delta") / 2**20,
        "peak_memory_abs_mb": res.pop("peak") / 2**20,
        "memory_measure": res.pop("memory_how"),
        "init_checksum": res.pop("checksum"),
        "dtype": str(compute_dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        **res,
    }
    peak = peak_flops(device)
    if peak is not None:
        flops = sum(step_flops(config, plan, s) for s in range(args.warmup_steps, plan.steps)) or None
        out["mfu"] = flops / (t_timed * peak) if flops else None
    Path(args.result).write_text(json.dumps(out))


# ==================================================================================================
# Parent: data, children, comparison, rows, chart
# ==================================================================================================


def run_child(args: argparse.Namespace, method: str, plan: Path, workdir: Path) -> dict:
    result = workdir / f"result_{plan.stem}_{method}.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", "--method", method, "--plan", str(plan),
        "--model-config", str(workdir / "model"),
        "--result", str(result), "--device", args.device, "--model-shape", args.model_shape,
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--weight-decay", str(args.weight_decay),
        "--grad-clip", str(args.grad_clip), "--seed", str(args.seed), "--warmup-steps", str(args.warmup_steps),
        "--threads", str(args.threads), "--row-size", str(args.row_size), "--rows-per-step", str(args.rows_per_step),
    ] + (["--profile"] if args.profile else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not result.exists():
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"method {method} failed (exit {proc.returncode}); its output is above")
    profile = result.with_suffix(".profile.txt")
    if profile.exists():
        target = Path(args.out_dir) / f"train_profile_{plan.stem.removeprefix('plan_')}_{method}.txt"
        target.write_text(profile.read_text())
        print(f"  profile: {target}")
    return json.loads(result.read_text())


def compare(results: dict[str, dict], device_type: str) -> None:
    """Per-step loss differences to soulchat, and whether they are within tolerance."""
    ref = results.get("soulchat")
    # fp32 on the CPU: only summation order differs, the steps stay within ~1e-5; bf16 autocast differs more.
    tol = 2e-3 if device_type == "cpu" else 3e-2
    for name, r in results.items():
        r["loss_tolerance"] = tol
        if ref is None or name == "soulchat":
            r["max_step_loss_diff_vs_soulchat"] = 0.0 if name == "soulchat" else None
            r["same_loss_as_soulchat"] = True if name == "soulchat" else None
            continue
        if r["init_checksum"] != ref["init_checksum"]:
            print(f"WARNING: {name} started from different weights than soulchat "
                  f"({r['init_checksum']} vs {ref['init_checksum']}): its losses are not comparable")
        diffs = [abs(a - b) for a, b in zip(r["losses"], ref["losses"])]
        r["max_step_loss_diff_vs_soulchat"] = max(diffs)
        if name not in SAME_STEPS:  # other conversations in each step: nothing to compare step by step
            r["same_loss_as_soulchat"] = None
            continue
        r["same_loss_as_soulchat"] = max(diffs) <= tol and r["trained_tokens"] == ref["trained_tokens"]
        r["same_init_as_soulchat"] = r["init_checksum"] == ref["init_checksum"]


def targets(results: dict[str, dict]) -> list[str]:
    lines = []
    s = results.get("soulchat")
    if s is None:
        return lines
    for other, want in (("hf_padded", TARGET_SPEEDUP_VS_PADDED), ("paper_per_turn", TARGET_SPEEDUP_VS_PER_TURN)):
        if other in results:
            x = s["trained_tokens_per_s"] / results[other]["trained_tokens_per_s"]
            c = s["trained_tokens_per_cpu_s"] / results[other]["trained_tokens_per_cpu_s"]
            s[f"speedup_vs_{other}"] = x
            s[f"cpu_speedup_vs_{other}"] = c
            lines.append(f"  trained tokens/s vs {other}: {x:.2f}x (target >= {want}x): {'met' if x >= want else 'NOT met'}"
                         f"  [per CPU-second: {c:.2f}x]")
    if "hf_padded" in results:
        m = s["peak_memory_mb"] / results["hf_padded"]["peak_memory_mb"]
        s["memory_ratio_vs_hf_padded"] = m
        lines.append(f"  peak memory vs hf_padded: {m:.2f}x (target <= {TARGET_MEMORY_RATIO}x): "
                     f"{'met' if m <= TARGET_MEMORY_RATIO else 'NOT met'}")
    for other in ("hf_flattening", "trl_sft"):
        if other in results:
            s[f"speedup_vs_{other}"] = s["trained_tokens_per_s"] / results[other]["trained_tokens_per_s"]
            s[f"memory_ratio_vs_{other}"] = s["peak_memory_mb"] / results[other]["peak_memory_mb"]
            lines.append(f"  trained tokens/s vs {other}: {s[f'speedup_vs_{other}']:.2f}x, "
                         f"peak memory {s[f'memory_ratio_vs_{other}']:.2f}x")
    return lines


def print_table(data: str, info: dict, results: dict[str, dict]) -> None:
    print(f"\n== data={data}: {info['conversations']} conversations (mean {info['mean_conversation_tokens']:.0f} "
          f"tokens, max {info['max_conversation_tokens']}); per step {info['conversations_per_step']:.1f} conversations, "
          f"{info['tokens_per_step']:.0f} tokens, {info['rows_per_step']:.1f} packed rows; {info['epochs']:.2f} epochs; "
          f"HF micro-batches of {info['hf_batch_size']} sequences")
    head = (f"{'method':<16}{'wall s':>8}{'proc tok/s':>12}{'real tok/s':>12}{'trained/s':>11}{'pad':>7}"
            f"{'trained/cpu-s':>14}{'peak MB':>9}{'final loss':>12}{'max dloss':>11}  attention")
    print(head)
    for name, r in results.items():
        d = r.get("max_step_loss_diff_vs_soulchat")
        print(f"{name:<16}{r['wall_s']:>8.1f}{r['tokens_processed_per_s']:>12,.0f}{r['real_tokens_per_s']:>12,.0f}"
              f"{r['trained_tokens_per_s']:>11,.0f}{r['padding_fraction']:>7.1%}{r['trained_tokens_per_cpu_s']:>14,.0f}"
              f"{r['peak_memory_mb']:>9.0f}"
              f"{r['final_loss']:>12.5f}{'' if d is None else format(d, '.1e'):>11}  {r['attention']}"
              + (f" (logit diff {r['flatten_max_logit_diff']:.1e})" if "flatten_max_logit_diff" in r else "")
              + (f" mfu {r['mfu']:.1%}" if r.get("mfu") else ""))


def plot(all_results: dict[str, dict[str, dict]], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib, or the `bench` extra): no chart")
        return
    datasets = list(all_results)
    methods = [m for m in METHODS if any(m in r for r in all_results.values())]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(datasets))
    x = np.arange(len(methods))
    for ax, key, ylabel in (
        (axes[0], "trained_tokens_per_s", "trained (counselor) tokens / s"),
        (axes[1], "peak_memory_mb", "peak memory of the training loop (MiB)"),
    ):
        for j, data in enumerate(datasets):
            vals = [all_results[data].get(m, {}).get(key, 0.0) for m in methods]
            bars = ax.bar(x + (j - (len(datasets) - 1) / 2) * width, vals, width, label=data)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(x, [LABELS[m] for m in methods], rotation=15)
        ax.set_ylabel(ylabel)
        ax.legend(title="data")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"chart: {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="synth,bundled",
                   help="comma-separated: synth (SoulChatCorpus-shaped), bundled (the sample corpus) or a path")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default: cpu 6, cuda 20)")
    p.add_argument("--warmup-steps", type=int, default=None, help="steps left out of throughput (default: cpu 1, cuda 3)")
    p.add_argument("--model-shape", choices=("tiny", "0.5b", "1.5b"), default="tiny")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    p.add_argument("--row-size", type=int, default=None, help="packed row size (default: cpu 2048, cuda 4096)")
    p.add_argument("--rows-per-step", type=int, default=None,
                   help="tokens per optimizer step, in rows: each step draws conversations up to rows-per-step x "
                        "row-size tokens (default: cpu 2, cuda 8)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="sequences per Hugging Face micro-batch (0: about one packed row's tokens: "
                        "row size / mean conversation length)")
    p.add_argument("--max-length", type=int, default=1024, help="longest conversation (longer ones are split)")
    p.add_argument("--synth-dialogues", type=int, default=0, help="synthetic dialogues (0: enough for the steps)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="also write a torch.profiler op table per method next to the results "
                        "(train_profile_<data>_<method>.txt; profiled throughput is not comparable)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on the CPU - on a shared machine a multi-threaded op "
                        "waits for its slowest thread, and one busy core made 2-thread steps up to 20x slower "
                        "in trials; 0 on CUDA = torch's default)")
    # child-process plumbing
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--model-config", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0

    from bench.common import RESULTS_DIR, cuda_available, write_rows

    if args.device is None:
        args.device = "cuda" if cuda_available() else "cpu"
    if args.device.startswith("cuda") and not cuda_available():
        print("--device cuda: no CUDA device here; nothing measured (run on a GPU machine)")
        return 0
    gpu = args.device.startswith("cuda")
    args.steps = args.steps or (20 if gpu else 6)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (3 if gpu else 1)
    args.row_size = args.row_size or (4096 if gpu else 2048)
    args.rows_per_step = args.rows_per_step or (8 if gpu else 2)
    if args.threads is None:
        args.threads = 0 if gpu else 1
    if args.warmup_steps >= args.steps:
        raise SystemExit(f"--warmup-steps ({args.warmup_steps}) must be below --steps ({args.steps})")
    if args.max_length > args.row_size:
        raise SystemExit(f"--max-length ({args.max_length}) must fit in a row (--row-size {args.row_size})")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if "trl_sft" in methods and not trl_available():
        print("trl_sft: trl (or datasets) is not installed (pip install trl, or the `bench` extra): skipped")
        methods.remove("trl_sft")
    out_dir = Path(args.out) if args.out else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir = str(out_dir)
    auto_batch = args.batch_size == 0

    rows: list[dict] = []
    all_results: dict[str, dict[str, dict]] = {}
    summary_lines = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        workdir = Path(tmp)
        save_model_config(args.model_shape, workdir)
        for data in [d.strip() for d in args.data.split(",") if d.strip()]:
            plan, info = prepare_plan(args, data, workdir)
            if auto_batch:
                args.batch_size = max(1, round(args.row_size / info["mean_conversation_tokens"]))
            info["hf_batch_size"] = args.batch_size
            results = {}
            for method in methods:
                print(f"[{data}] {method} ...", flush=True)
                results[method] = run_child(args, method, plan, workdir)
            compare(results, "cuda" if gpu else "cpu")
            summary_lines += [f"[{data}]"] + targets(results)
            print_table(data, info, results)
            all_results[data] = results
            for r in results.values():
                row = {k: v for k, v in r.items() if k != "losses"}
                row.update(
                    data=data, device=args.device, model_shape=args.model_shape, row_size=args.row_size,
                    rows_per_step=args.rows_per_step, hf_batch_size=args.batch_size, lr=args.lr,
                    **{f"data_{k}": v for k, v in info.items() if k != "data"},
                    step_losses=json.dumps([round(x, 6) for x in r["losses"]]),
                )
                rows.append(row)
    print("\ntargets (soulchat vs the others, trained tokens/s and peak memory):")
    print("\n".join(summary_lines))
    jsonl, csv_path = write_rows("train", rows, results_dir=out_dir)
    print(f"rows: {jsonl}, {csv_path}")
    title = (f"{args.model_shape} model on {args.device} ({rows[0].get('dtype')}, {rows[0].get('torch_threads')} "
             f"thread(s)), {args.steps} steps of <= {args.rows_per_step} x {args.row_size} tokens; "
             f"peak memory = training loop above setup")
    plot(all_results, out_dir / "train.png", title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
