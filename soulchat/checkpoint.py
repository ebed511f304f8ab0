"""Checkpoints and export for soulchat.train.

Checkpoints (``torch.distributed.checkpoint``, sharded, resumable with a different number of processes)
hold the model, optimizer, scheduler, data position and RNG state; the export is a Hugging Face model
directory (safetensors + config + tokenizer with the trained chat template) that soulchat.chat and
``from_pretrained`` load. Both are written to a temporary directory and renamed when complete.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soulchat.config import Config
from soulchat.distributed import Runtime, barrier
from soulchat.lora import checkpoint_state_options
from soulchat.model import PackedCausalLM

# ==================================================================================================
# Checkpoints: torch.distributed.checkpoint, written to a temp dir and renamed when complete
# ==================================================================================================
#
# <output>/checkpoints/step_000100/   DCP shards of model + optimizer, trainer.pt (step, scheduler,
#                                     data position, history), rng/rank*.pt, config.json
# <output>/checkpoints/latest         text file naming the newest COMPLETE checkpoint directory
#
# A save writes step_N.tmp/, then (after every rank finished) renames it to step_N/ and only then
# rewrites `latest` (write + os.replace). A crash at any point leaves `latest` naming the previous
# complete checkpoint; leftover *.tmp directories are removed by the next save.


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / "checkpoints"


def latest_checkpoint(cfg: Config) -> Path | None:
    pointer = checkpoint_root(cfg) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_root(cfg) / pointer.read_text(encoding="utf-8").strip()
    return path if (path / "trainer.pt").is_file() else None


def _publish_checkpoint(tmp: Path, final: Path) -> None:
    """The commit point of a save: rename the finished temp dir, then move `latest` to it."""
    if final.exists():  # left by an earlier run that crashed before updating `latest`
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = final.parent / "latest.tmp"
    with open(pointer_tmp, "w", encoding="utf-8") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())  # the pointer must never name a directory whose rename was not persisted
    os.replace(pointer_tmp, final.parent / "latest")


def save_checkpoint(
    cfg: Config,
    rt: Runtime,
    model: PackedCausalLM,
    optimizer,
    scheduler,
    step: int,
    trainer_state: dict[str, Any],
) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    root = checkpoint_root(cfg)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if rt.main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):  # an interrupted earlier save
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink()
        tmp.mkdir()
    barrier(rt)
    options = checkpoint_state_options(model)  # LoRA: trainable parameters only
    state = {
        "model": get_model_state_dict(model, options=options),
        "optim": get_optimizer_state_dict(model, optimizer, options=options),
    }
    with _single_process_dcp(rt):
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not rt.distributed)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank{rt.rank}.pt")
    if rt.main:
        torch.save(
            {"step": step, "scheduler": scheduler.state_dict(), "world_size": rt.world_size, **trainer_state},
            tmp / "trainer.pt",
        )
        (tmp / "config.json").write_text(cfg.to_json(), encoding="utf-8")
    barrier(rt)  # every rank's files are written
    if rt.main:
        _publish_checkpoint(tmp, final)
        complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in complete[: -cfg.checkpoint.keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier(rt)
    return final


def load_checkpoint(path: Path, rt: Runtime, model: PackedCausalLM, optimizer, scheduler) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = checkpoint_state_options(model)  # LoRA: trainable parameters only
    state = {
        "model": get_model_state_dict(model, options=options),
        "optim": get_optimizer_state_dict(model, optimizer, options=options),
    }
    with _single_process_dcp(rt):
        dcp.load(state, checkpoint_id=str(path), no_dist=not rt.distributed)  # in place, resharded
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optim"], options=options)
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    scheduler.load_state_dict(trainer["scheduler"])
    rng_file = path / "rng" / f"rank{rt.rank}.pt"
    if rng_file.is_file():  # absent when resuming with more processes than were saved
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer


@contextlib.contextmanager
def _single_process_dcp(rt: Runtime):
    """DCP warns on every single-process save/load that it assumes a single process: we know."""
    with warnings.catch_warnings():
        if not rt.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ==================================================================================================
# Export to a Hugging Face model directory
# ==================================================================================================


def export_model(cfg: Config, rt: Runtime, model: PackedCausalLM, tokenizer) -> Path | None:
    """Gather the full weights on rank 0 and write safetensors + config + tokenizer (+ chat template).

    The directory loads with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    Written to export.tmp and renamed, like checkpoints.
    """
    from huggingface_hub import save_torch_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Every rank takes part in the gather; only rank 0 receives the tensors (on the CPU).
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not rt.main:
        barrier(rt)
        return None
    lm = model.lm
    out = Path(cfg.train.output_dir) / "export"
    tmp = out.with_name("export.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.checkpoint.export_dtype)
    if dtype is None:  # auto: what the checkpoint was stored in (fp32 for the built-in model)
        dtype = getattr(lm.config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    state = {k.removeprefix("lm."): v.to(dtype).contiguous() for k, v in full.items()}
    # Tied parameters (embedding == lm head) are saved once; from_pretrained re-ties them.
    seen: dict[int, str] = {}
    for name, param in lm.named_parameters(remove_duplicate=False):
        if id(param) in seen and name in state:
            del state[name]
        seen.setdefault(id(param), name)
    save_torch_state_dict(state, str(tmp), max_shard_size="5GB", metadata={"format": "pt"})

    config = lm.config.__class__.from_dict(lm.config.to_dict())
    config.architectures = [type(lm).__name__]
    config.use_cache = True
    config.dtype = dtype
    config._attn_implementation = None  # loaders pick their own (sdpa by default)
    config.save_pretrained(str(tmp))
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.save_pretrained(str(tmp))
    _attach_chat_template(tokenizer, cfg.data.template)
    tokenizer.save_pretrained(str(tmp))
    # The training config travels with the model (soulchat.chat reads the template from it).
    (tmp / "soulchat_config.json").write_text(cfg.to_json(), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    barrier(rt)
    return out


def _attach_chat_template(tokenizer, template: str) -> None:
    """Give the exported tokenizer the chat template that renders like the one trained with, so that
    apply_chat_template(..., add_generation_prompt=True) produces exactly the prompt format trained on."""
    if template == "auto":
        return  # the tokenizer's own template is what training rendered with
    from soulchat.data.render import builtin_chat_template

    tokenizer.chat_template = builtin_chat_template(tokenizer, template)
