"""Export: the trained model as a Hugging Face model directory, the LoRA adapter, the merged model.

<output-dir>/export/    a full fine-tune, or with --export-merged the base with the adapter merged in:
                        safetensors + config + the tokenizer with the trained chat template +
                        soulchat_config.json (``AutoModelForCausalLM.from_pretrained`` loads it; chat
                        and evaluate read the template from it)
<output-dir>/adapter/   a LoRA run: adapter_config.json + adapter_model.safetensors
                        (``PeftModel.from_pretrained``), the tokenizer, soulchat_config.json;
                        base/ = the frozen base model when it is the built-in random one

Every directory is written to <name>.tmp and renamed when complete, like checkpoints. Every rank calls
the export functions (the full weights are gathered from all of them); rank 0 writes.
This module sits above soulchat.checkpoint and soulchat.lora: both are imported here, never the reverse.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from soulchat.distributed import Runtime, barrier
from soulchat.loading import build_model
from soulchat.lora import ADAPTER_DIR, BASE_DIR, load_adapter_model, peft_model
from soulchat.model import PackedCausalLM
from soulchat.train_options import Config

EXPORT_DIR = "export"  # <output-dir>/export: the Hugging Face model directory (full or merged)


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
    out = Path(cfg.train.output_dir) / EXPORT_DIR
    tmp = out.with_name(EXPORT_DIR + ".tmp")
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
    attach_chat_template(tokenizer, cfg.data.template)
    tokenizer.save_pretrained(str(tmp))
    # The training config travels with the model (soulchat.chat reads the template from it).
    (tmp / "soulchat_config.json").write_text(cfg.to_json(), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    barrier(rt)
    return out


def attach_chat_template(tokenizer, template: str) -> None:
    """Give the exported tokenizer the chat template that renders like the one trained with, so that
    apply_chat_template(..., add_generation_prompt=True) produces exactly the prompt format trained on."""
    if template == "auto":
        return  # the tokenizer's own template is what training rendered with
    from soulchat.data.render import builtin_chat_template

    tokenizer.chat_template = builtin_chat_template(tokenizer, template)


# --------------------------------------------------------------------------------------------------
# LoRA: the adapter directory, and the merged model


def export_lora(cfg, rt, model: nn.Module, tokenizer) -> Path | None:
    """Write the adapter directory (and the merged model with --export-merged); every rank calls it.

    Returns the merged model directory with --export-merged (what chat and evaluate load like any
    model), else the adapter directory; None on ranks other than 0.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # The trainable weights only, gathered on rank 0 (every rank takes part in the gather).
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    trained = get_model_state_dict(model, options=options)
    if not rt.main:
        barrier(rt)
        return None
    out = Path(cfg.train.output_dir) / ADAPTER_DIR
    tmp = out.with_name(ADAPTER_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lm = model.lm
    shell = peft_model(lm)
    base_path = Path(cfg.model.model).expanduser().resolve() if cfg.model.model else None
    if base_path is None:  # the built-in model is random: its frozen base travels with the adapter
        base_path = out / BASE_DIR
        _save_builtin_base(cfg, tokenizer, tmp / BASE_DIR, dtype=_frozen_dtype(lm))
    shell.peft_config["default"].base_model_name_or_path = str(base_path)
    # PeftModel's keys are base_model.model.<HF name>; ours are lm.<HF name> (the same module tree).
    state = {"base_model.model." + k.removeprefix("lm."): v for k, v in trained.items()}
    # save_embedding_layers=False: a trained lm head is saved as modules_to_save anyway; "auto" would
    # look for the base's config to guess whether the vocabulary changed (it never does here).
    shell.save_pretrained(str(tmp), state_dict=state, safe_serialization=True, save_embedding_layers=False)
    attach_chat_template(tokenizer, cfg.data.template)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "soulchat_config.json").write_text(cfg.to_json(), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    result = out
    if cfg.lora.export_merged:
        result = _export_merged(cfg, out, tokenizer, lm)
    barrier(rt)
    return result


def _frozen_dtype(lm: nn.Module):
    return next(p for p in lm.parameters() if not p.requires_grad).dtype


def _save_builtin_base(cfg, tokenizer, path: Path, dtype) -> None:
    """The built-in model's initial weights, rebuilt as training built them (build_model on the CPU,
    the run's seed, the frozen dtype: the same random model), as a Hugging Face model directory."""
    base = build_model(cfg.model, tokenizer, seed=cfg.train.seed, device="cpu", load_kwargs={"dtype": dtype})
    base.config._attn_implementation = None  # loaders pick their own (sdpa)
    base.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))


def _export_merged(cfg, adapter_dir: Path, tokenizer, lm: nn.Module) -> Path:
    """Base + adapter merged by peft (merge_and_unload), written by the full fine-tune's export."""
    # With --load-in-4bit the merge goes into the bf16 base weights read from --model again: merging
    # into NF4 would re-quantise every sum. The adapter on the 4-bit base is what trained exactly.
    dtype = _frozen_dtype(lm)
    if cfg.lora.load_in_4bit or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.bfloat16
    merged, _ = load_adapter_model(adapter_dir, merge=True, dtype=dtype)
    if cfg.lora.lora_train_lm_head and getattr(merged.config, "tie_word_embeddings", False):
        # The trained lm head is its own copy now: the export must not re-tie it to the embedding.
        merged.config.tie_word_embeddings = False
    one_process = Runtime(0, 1, 0, merged.device, "none", dtype)
    return export_model(cfg, one_process, PackedCausalLM(merged), tokenizer)
