"""The training job: ``python -m soulchat.train`` (one process) or ``torchrun ... -m soulchat.train``.

With no arguments it fine-tunes the built-in tiny random Qwen2 on the bundled sample corpus on the CPU
(a smoke run of a couple of minutes). ``--help`` lists every option; ``--config run.yaml`` holds them.

One optimizer step, on every rank:
  1. take this rank's packed rows for the step (a deterministic, seeded per-epoch shuffle of the
     store's rows; the step's rows are the same whatever the number of processes),
  2. all-reduce the sum of loss weights of ALL the step's micro-batches on all ranks, once, before
     the first backward: each micro-batch's loss sum is divided by that global total, so the update
     is the mean over the step's trained tokens no matter how they are split into micro-batches
     and ranks,
  3. forward/backward each micro-batch (varlen attention over the packed conversations, the fused
     lm-head + cross-entropy at the trained positions only),
  4. clip, check for NaN/Inf (the loss and the gradient norm reach the host together: the step's one
     host sync), AdamW step, learning-rate schedule.

Sections: data -> step -> checkpoints -> the run: setup, loop, finish. Held-out evaluation
(soulchat.heldout_eval) and checkpoints each decide their own schedule. The model as each rank trains it
(FSDP2 / DDP) is built by soulchat.parallel, AdamW and its schedule by soulchat.optimizer; processes and
devices (Runtime, the collectives) are in soulchat.distributed; checkpoints in soulchat.checkpoint, the
Hugging Face export in soulchat.export, the output directory's lock in soulchat.run_lock;
metrics.jsonl, the progress bar and the summary in soulchat.runlog; options in soulchat.train_options
(the run's ``Config``) over the sections of soulchat.options.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from soulchat.check import preflight
from soulchat.checkpoint import checkpoint_root, latest_checkpoint, load_checkpoint, save_checkpoint
from soulchat.cli import run_cli
from soulchat.data.assets import default_corpus_path
from soulchat.data.packing import to_torch
from soulchat.distributed import Runtime, all_reduce_sum, barrier, log, setup_runtime
from soulchat.export import export_lora, export_model
from soulchat.heldout_eval import HeldOutEvaluator
from soulchat.kernels.linear_cross_entropy import weight_cast_scope
from soulchat.loading import load_tokenizer
from soulchat.model import PackedCausalLM, model_inputs
from soulchat.optimizer import build_optimizer, build_scheduler
from soulchat.options import ConfigError
from soulchat.parallel import autocast_context, build_parallel_model
from soulchat.resume import check_resume
from soulchat.run_lock import run_lock
from soulchat.runlog import (
    ProgressBar,
    RunLog,
    count_parameters,
    matmul_flops,
    peak_flops,
    peak_memory_gb,
    write_summary,
)
from soulchat.train_options import Config, parse_args

SAMPLE_CORPUS = default_corpus_path()


class TrainingError(RuntimeError):
    """The run cannot go on (NaN/Inf, a checkpoint that does not match); the message says why."""


# ==================================================================================================
# Data
# ==================================================================================================


def prepare_data(cfg: Config, tokenizer, rt: Runtime):
    """Tokenize + pack into rows of --tokens-per-micro-batch tokens (rank 0; cached by content hash).

    The other ranks wait, then open the same memory-mapped store (a cache hit).
    """
    from dataclasses import replace

    from soulchat.data.pipeline import corpus_paths, prepare

    for p in corpus_paths(cfg.data):
        if not Path(p).exists():
            raise FileNotFoundError(f"--data {p}: no such file or directory (check the path)")
    if cfg.data.template == "auto" and not getattr(tokenizer, "chat_template", None):
        source = cfg.model.tokenizer or cfg.model.model or "the bundled tokenizer"
        raise ConfigError(
            f"--template auto uses the tokenizer's chat template, but the tokenizer of {source} has none "
            "(a base model?): pass --template soulchat (the paper's plain format) or --template chatml"
        )
    # Held out by conversation id (all windows of a long conversation on one side), packed into
    # store.heldout and written as heldout.json for `python -m soulchat.evaluate --data`.
    # row_size is the micro-batch (Config makes it so).
    cache_dir = cfg.data.cache_dir or str(Path(cfg.train.output_dir) / "data")
    args = (replace(cfg.data, cache_dir=cache_dir), tokenizer)
    store = None
    if rt.main:
        store = prepare(*args, seed=cfg.train.seed, progress=cfg.train.progress, verbose=True)
    barrier(rt)
    if not rt.main:
        store = prepare(*args, seed=cfg.train.seed, progress=False, verbose=False)
    return store


class RowOrder:
    """Global order of training rows: epoch e is a seeded permutation, epochs back to back.

    Step s uses global positions [s * G, (s + 1) * G) with G = micro-batches per step over all ranks;
    rank r takes the contiguous slice [r * A, (r + 1) * A) of them (A = G / world). The set of rows of a
    step therefore does not depend on the number of processes, and the data position is just the step.
    """

    def __init__(self, num_rows: int, seed: int) -> None:
        self.num_rows = num_rows
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def row(self, position: int) -> int:
        epoch, index = divmod(position, self.num_rows)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_rows))
        return int(self._perm[1][index])

    def rows_for(self, step: int, rank: int, per_rank: int, world_size: int) -> list[int]:
        start = step * per_rank * world_size + rank * per_rank
        return [self.row(start + i) for i in range(per_rank)]


# ==================================================================================================
# One optimizer step
# ==================================================================================================


@dataclass
class StepResult:
    loss: float | None  # mean loss per unit of loss weight over the whole global step; None: no trained token
    grad_norm: float
    tokens: int  # global tokens in the step
    trained_tokens: int  # global tokens with a label
    weight_sum: float  # global sum of loss weights (== trained_tokens for token weighting)
    sum_sq_seqlens: int  # global sum of squared conversation lengths (attention FLOPs)
    skipped: bool


def train_step(
    model: PackedCausalLM,
    train_module: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[dict[str, Any]],
    rt: Runtime,
    grad_clip: float,
    on_nonfinite: str,
    step: int,
) -> StepResult:
    """Accumulate gradients over this rank's micro-batches (host numpy dicts), then one update.

    ``step`` is the 1-based step number, for messages.
    """
    # Global normaliser first, from the host arrays: no device sync, one collective for the step.
    local = [
        float(sum(float(b["loss_weight"].sum(dtype=np.float64)) for b in batches)),
        float(sum(len(b["input_ids"]) for b in batches)),
        float(sum(len(b["loss_index"]) for b in batches)),
        float(sum(int((np.diff(b["cu_seqlens"].astype(np.int64)) ** 2).sum()) for b in batches)),
    ]
    weight_sum, tokens, trained, sum_sq = all_reduce_sum(local, rt)
    if weight_sum == 0:
        # No trained token on any rank (every rank sees the same global sum, so all skip together): the
        # step has no loss to follow. optimizer.step() would still move the weights (decoupled weight
        # decay, and AdamW's moments carrying the previous steps' gradients), so the step is counted (the
        # data position and the lr schedule advance, as for a non-finite skip) but nothing runs.
        log(rt, f"warning: step {step}: no trained token (global loss weight 0), update skipped")
        return StepResult(None, 0.0, int(tokens), int(trained), weight_sum, int(sum_sq), True)
    # DDP and FSDP average gradients over ranks; scaling by the world size turns that into the sum. The
    # normaliser is folded into the token weights on the host (in fp64, then fp32): the fused loss then
    # backpropagates its own gradients as they are, with no extra pass over dW and no bf16 rounding of a
    # scale factor (a ~0.2% uniform error before).
    scale = rt.world_size / weight_sum

    loss_sum = torch.zeros((), dtype=torch.float32, device=rt.device)
    # One low-precision copy of the lm head per optimizer step, not one per micro-batch (the weights
    # change only at the step).
    with weight_cast_scope():
        for i, batch in enumerate(batches):
            scaled = (batch["loss_weight"].astype(np.float64) * scale).astype(np.float32)
            inputs = model_inputs(to_torch({**batch, "loss_weight": scaled}, rt.device))
            last = i == len(batches) - 1
            # DDP: all-reduce gradients only after the last micro-batch. FSDP reduce-scatters each one (its
            # sharded gradients accumulate; keeping full unsharded ones would cost the memory FSDP saves).
            sync = contextlib.nullcontext() if last or rt.parallel != "ddp" else train_module.no_sync()
            with sync:
                with autocast_context(rt):
                    micro_loss = train_module(**inputs)  # this micro-batch's share of the loss x world size
                micro_loss.backward()
            loss_sum += micro_loss.detach().float()

    params = [p for p in model.parameters() if p.grad is not None]
    loss, grad_norm = _fetch_loss_and_norm(loss_sum, clip_grad_norm(params, grad_clip), rt)

    skipped = False
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        if on_nonfinite == "stop":
            raise TrainingError(
                f"step {step}: non-finite {what}. Lower --lr, check the data of this step, or pass "
                "--on-nonfinite skip to skip such steps"
            )
        skipped = True
        log(rt, f"warning: step {step}: non-finite {what}, update skipped (--on-nonfinite skip)")
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, int(tokens), int(trained), weight_sum, int(sum_sq), skipped)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global gradient norm (over all shards) as a 0-d device tensor, the gradients clipped to ``max_norm``
    when it is positive. Nothing here waits for the device: the caller fetches the norm."""
    from torch.distributed.tensor import DTensor

    if not params:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # the per-shard norms combined over ranks
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _fetch_loss_and_norm(loss_sum: torch.Tensor, grad_norm: torch.Tensor, rt: Runtime) -> tuple[float, float]:
    """(global mean loss, gradient norm) on the host: the step's one wait for the device.

    The step cannot go on without both (a non-finite one stops or skips the update), so they come back
    together in one copy; the loss is summed over ranks on the device first (in fp64, as the host sum of
    the per-rank fp32 values was). Under torchrun the normaliser's all-reduce at the start of the step
    is the other point where the host meets the device (it needs the global weight sum on the host).
    """
    loss64 = loss_sum.double()
    if rt.distributed:
        dist.all_reduce(loss64)
    loss, norm = torch.stack([loss64 / rt.world_size, grad_norm.to(loss64.device, torch.float64)]).tolist()
    return loss, norm


# ==================================================================================================
# Checkpoints: saved when due (the held-out evaluation, likewise, is soulchat.heldout_eval's)
# ==================================================================================================


@dataclass
class LossHistory:
    """The loss of the first and of the latest trained step (for the summary), saved in every checkpoint."""

    first_loss: float | None = None
    last_loss: float | None = None

    def record(self, loss: float | None) -> None:
        if loss is None:  # a step without trained tokens has no loss
            return
        if self.first_loss is None:
            self.first_loss = loss
        self.last_loss = loss

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"first_loss": self.first_loss}
        if self.last_loss is not None:
            state["last_loss"] = self.last_loss
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first_loss = state.get("first_loss", self.first_loss)
        self.last_loss = state.get("last_loss", self.last_loss)


class Checkpointer:
    """Saves every --save-every steps during the run and at the end; knows the last checkpoint.

    It owns what a checkpoint holds beside the model, optimizer and scheduler: the data identity, and
    ``history`` (the loop records each step's loss into it; ``resume`` restores it in place).
    """

    def __init__(self, cfg: Config, rt: Runtime, model, optimizer, scheduler, data_id: dict[str, Any]) -> None:
        self.cfg, self.rt = cfg, rt
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.data_id = data_id  # store key, rows and micro-batches per step: a resume must match them
        self.history = LossHistory()
        self.every = cfg.checkpoint.save_every

    def maybe_save(self, step: int, last_step: int) -> None:
        """A mid-run save at ``step`` when one is due (the final one is ``save``'s, after evaluation)."""
        if self.every and step % self.every == 0 and step < last_step:
            self.save(step)

    def save(self, step: int) -> Path:
        state = {"data": self.data_id, "history": self.history.state_dict()}
        return save_checkpoint(self.cfg, self.rt, self.model, self.optimizer, self.scheduler, step, state)

    def resume(self) -> int:
        """Load the latest checkpoint into the model, optimizer, scheduler and history; returns its step."""
        path = latest_checkpoint(self.cfg, self.rt)  # the newest whose manifest verifies
        if path is None:
            raise TrainingError(
                f"--resume: no complete checkpoint in {checkpoint_root(self.cfg)} (nothing was saved there yet?)"
            )
        trainer = load_checkpoint(path, self.rt, self.model, self.optimizer, self.scheduler)
        overrides = check_resume(path, self.cfg, trainer.get("data"), self.data_id)  # the run's math, or refused
        if self.rt.main:  # the config that runs from here on (written only once the resume is accepted)
            (Path(self.cfg.train.output_dir) / "config.json").write_text(self.cfg.to_json(), encoding="utf-8")
        if overrides:  # the rebuilt schedule from this step on: the loaded groups hold the old one's lr
            for group, base, factor in zip(
                self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas
            ):
                group["lr"] = base * factor(self.scheduler.last_epoch)
            log(self.rt, f"--resume-override: from step {trainer['step']} on {', '.join(overrides)}")
        self.history.load_state_dict(trainer.get("history", {}))
        log(self.rt, f"resumed from {path} at step {trainer['step']}")
        return trainer["step"]


# ==================================================================================================
# The run: setup -> loop -> finish
# ==================================================================================================


@dataclass
class Run:
    """Everything the loop needs, built by ``setup``."""

    cfg: Config
    rt: Runtime
    tokenizer: Any
    store: Any  # the training PackedStore (its .heldout: the held-out one, or None)
    model: PackedCausalLM
    train_module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    order: RowOrder
    per_rank: int  # micro-batches per step on each rank
    total_steps: int
    start_step: int
    evaluator: HeldOutEvaluator
    checkpointer: Checkpointer  # also holds the loss history it saves
    runlog: RunLog
    t_start: float = 0.0


@dataclass
class LoopTotals:
    tokens: int = 0
    trained_tokens: int = 0
    seconds: float = 0.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run training; returns the summary (also written to <output>/summary.json on rank 0)."""
    cfg = parse_args(argv)
    rt = setup_runtime(cfg)
    try:
        with run_lock(cfg.train.output_dir, rt):  # one run per --output-dir
            run = setup(cfg, rt)
            totals = train_loop(run)
            return finish(run, totals)
    finally:
        if rt.distributed and dist.is_initialized():
            dist.destroy_process_group()


def setup(cfg: Config, rt: Runtime) -> Run:
    t_start = time.perf_counter()
    out_dir = Path(cfg.train.output_dir)
    if rt.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.checkpoint.resume:  # a resumed run writes it once the checkpoint's options match
            (out_dir / "config.json").write_text(cfg.to_json(), encoding="utf-8")
    torch.manual_seed(cfg.train.seed)

    micro_per_step = cfg.train.tokens_per_step // cfg.train.tokens_per_micro_batch
    if micro_per_step % rt.world_size:
        raise ConfigError(
            f"--tokens-per-step ({cfg.train.tokens_per_step}) must be a multiple of --tokens-per-micro-batch "
            f"({cfg.train.tokens_per_micro_batch}) x {rt.world_size} processes"
        )
    tokenizer = load_tokenizer(cfg.model)
    store = prepare_data(cfg, tokenizer, rt)
    per_rank = micro_per_step // rt.world_size
    total_steps = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * len(store) / micro_per_step))

    model, train_module = build_parallel_model(cfg, tokenizer, rt)
    store.check_vocabulary(model.lm.get_input_embeddings().num_embeddings, cfg.model.model or "the built-in model")
    optimizer = build_optimizer(cfg, model, rt)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    n_params = count_parameters(model)  # DTensor.numel() is the global size: right under FSDP too
    log(
        rt,
        f"model: {cfg.model.model or 'built-in tiny Qwen2 (random init)'}, {n_params / 1e6:.1f}M parameters, "
        f"{rt.world_size} process(es), parallel={rt.parallel}, device={rt.device.type}, "
        f"compute={str(rt.compute_dtype).removeprefix('torch.')}",
    )
    heldout = store.heldout
    log(
        rt,
        f"data: {len(store)} training rows of <= {cfg.train.tokens_per_micro_batch} tokens"
        f"{f', {len(heldout)} held-out rows ({store.heldout_path})' if heldout is not None else ''}; "
        f"{micro_per_step} "
        f"micro-batches per step ({per_rank} per process), {total_steps} steps",
    )

    data_id = {"store": store.key, "rows": len(store), "micro_per_step": micro_per_step}
    checkpointer = Checkpointer(cfg, rt, model, optimizer, scheduler, data_id)
    start_step = checkpointer.resume() if cfg.checkpoint.resume else 0
    if start_step >= total_steps:
        log(rt, f"nothing to do: the run already reached step {start_step} of {total_steps}")
    with autocast_context(rt):  # on the real (resumed, sharded) weights, as training computes; all ranks
        log(rt, preflight(model, compute_dtype=rt.compute_dtype).summary())
    runlog = RunLog(out_dir, enabled=rt.main, resume_step=start_step, tensorboard=cfg.train.tensorboard)
    return Run(
        cfg=cfg,
        rt=rt,
        tokenizer=tokenizer,
        store=store,
        model=model,
        train_module=train_module,
        optimizer=optimizer,
        scheduler=scheduler,
        order=RowOrder(len(store), cfg.train.seed),
        per_rank=per_rank,
        total_steps=total_steps,
        start_step=start_step,
        evaluator=HeldOutEvaluator(cfg, heldout, total_steps),
        checkpointer=checkpointer,
        runlog=runlog,
        t_start=t_start,
    )


def train_loop(run: Run) -> LoopTotals:
    """Steps start_step + 1 .. total_steps: train, log, and the mid-run evaluations and checkpoints."""
    cfg, rt = run.cfg, run.rt
    peak = peak_flops(rt.device)
    progress = ProgressBar(
        enabled=rt.main and cfg.train.progress, total=run.total_steps, initial=run.start_step
    )
    totals = LoopTotals()
    t_loop = time.perf_counter()
    for step in range(run.start_step + 1, run.total_steps + 1):
        t0 = time.perf_counter()
        rows = run.order.rows_for(step - 1, rt.rank, run.per_rank, rt.world_size)
        batches = [run.store.micro_batch(r) for r in rows]
        lr = run.optimizer.param_groups[0]["lr"]
        result = train_step(
            run.model, run.train_module, run.optimizer, batches, rt, cfg.optim.grad_clip,
            cfg.train.on_nonfinite, step,
        )  # fmt: skip
        run.scheduler.step()
        dt = time.perf_counter() - t0
        totals.tokens += result.tokens
        totals.trained_tokens += result.trained_tokens
        run.checkpointer.history.record(result.loss)

        if step % cfg.train.log_every == 0 or step == run.total_steps:
            run.runlog.write(step_record(step, result, lr, dt, run, peak))
        progress.update(result.loss, lr, result.tokens / dt)
        if run.evaluator.due(step):
            last = run.evaluator.run(step, run.model, run.train_module, rt, run.runlog)
            log(rt, f"step {step}: eval loss {last['eval_loss']:.4f}, ppl {last['eval_ppl']:.2f}")
        run.checkpointer.maybe_save(step, run.total_steps)
    progress.close()
    totals.seconds = time.perf_counter() - t_loop
    return totals


def step_record(step: int, result: StepResult, lr: float, dt: float, run: Run, peak: float | None) -> dict:
    """The metrics.jsonl line of one optimizer step."""
    record = {
        "step": step,
        "loss": result.loss,
        "lr": lr,
        "grad_norm": result.grad_norm,
        "tokens": result.tokens,
        "trained_tokens": result.trained_tokens,
        "tokens_per_s": result.tokens / dt,
        "trained_tokens_per_s": result.trained_tokens / dt,
        "step_time_s": dt,
        "peak_memory_gb": peak_memory_gb(run.rt.device),
    }
    if peak is not None:
        flops = matmul_flops(run.model.lm.config, result.tokens, result.trained_tokens, result.sum_sq_seqlens)
        record["mfu"] = flops / (dt * peak * run.rt.world_size)
    if result.skipped:
        record["skipped"] = True
    return record


def finish(run: Run, totals: LoopTotals) -> dict[str, Any]:
    """The final evaluation, checkpoint and export; the summary."""
    cfg, rt = run.cfg, run.rt
    final_step = max(run.start_step, run.total_steps)
    last_eval = run.evaluator.run(final_step, run.model, run.train_module, rt, run.runlog)
    if run.start_step < run.total_steps:
        checkpoint = run.checkpointer.save(run.total_steps)
    else:  # resumed at or past the end: the latest checkpoint already holds this state
        checkpoint = latest_checkpoint(cfg)
    export_fn = export_lora if cfg.lora.enabled else export_model  # LoRA: adapter (+ merged) dirs
    export = export_fn(cfg, rt, run.model, run.tokenizer) if cfg.checkpoint.export else None
    run.runlog.close()
    store = run.store
    summary = {
        "steps": run.total_steps,
        "start_step": run.start_step,
        "first_loss": run.checkpointer.history.first_loss,
        "last_loss": run.checkpointer.history.last_loss,
        **last_eval,
        "tokens": totals.tokens,
        "trained_tokens": totals.trained_tokens,
        "tokens_per_s": totals.tokens / totals.seconds if totals.seconds > 0 else None,
        "wall_time_s": time.perf_counter() - run.t_start,
        "checkpoint": str(checkpoint),
        "export": str(export) if export is not None else None,
        "heldout": str(store.heldout_path) if store.heldout_path is not None else None,
        "output_dir": cfg.train.output_dir,
    }
    if rt.main:
        write_summary(cfg.train.output_dir, summary, run.runlog.path)
    return summary


def cli() -> None:
    """Entry point: any error (bad option, path, data, template, NaN) becomes one line on stderr and exit
    status 2 instead of a traceback (--debug shows it)."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
