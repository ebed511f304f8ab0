"""LoRA and QLoRA: parameter-efficient fine-tuning on the packed path, built with ``peft``.

peft injects its adapter layers (``lora.Linear``, ``lora.Linear4bit``) into the Hugging Face model in
place; soulchat then wraps that same module tree in ``PackedCausalLM`` exactly as for full fine-tuning,
so packed varlen attention, the fused counselor-only loss, FSDP2/DDP, activation checkpointing,
``--compile``, gradient accumulation, checkpoints and ``--resume`` all run unchanged. The outer
``PeftModel`` shell is kept beside the training module (never inside it, so no parameter has two
names) and is used only to write the adapter directory.

dtype rules:
- frozen base weights are stored in the compute dtype: bf16 on CUDA (``--mixed-precision auto``),
  fp32 on the CPU or with ``--mixed-precision fp32``; with ``--load-in-4bit`` the decoder layers'
  linear weights are NF4 (double quantised, bf16 compute) and the rest of the base is bf16;
- trainable weights (the LoRA A/B matrices, and the lm head with ``--lora-train-lm-head``) are fp32
  master weights, and only they reach AdamW (fp32 moments);
- compute is bf16 on CUDA: autocast with one process or DDP, FSDP2's ``param_dtype`` under FSDP (every
  parameter of a unit is all-gathered in bf16, so fp32 adapters and bf16 frozen weights can share a
  unit); gradients are reduced in fp32.

Public API:
    LoraConfig                                    the options section (``--lora-*``, ``--load-in-4bit``)
    base_load_kwargs(cfg, rt, builtin_model) -> dict   dtype / 4-bit kwargs for loading the base
    apply_lora(lm, cfg, seed) -> nn.Module        inject adapters, freeze the base, fp32 trainables
    default_target_modules(lm) -> list[str]       the per-family default targets
    load_adapter_model(adapter_dir, ...) -> (model, tokenizer)   base + adapter for chat / evaluate

The adapter directory and the merged model are written by soulchat.export (export_lora); checkpoints
of a model with frozen parameters hold its trainable ones only (soulchat.checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from soulchat.data.file_errors import naming, read_json_file
from soulchat.options import ConfigError, LoraConfig

ADAPTER_DIR = "adapter"  # <output-dir>/adapter: the peft adapter directory
BASE_DIR = "base"  # <output-dir>/adapter/base: the frozen base of the built-in (random) model


if TYPE_CHECKING:
    from torch import nn


class QuantizationUnavailable(ConfigError):
    """--load-in-4bit cannot run here (no CUDA, no bitsandbytes, several processes)."""


# ==================================================================================================
# Loading the base model
# ==================================================================================================


def base_load_kwargs(cfg: LoraConfig, rt, builtin_model: bool) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` / ``from_config`` of the frozen base (empty = full
    fine-tuning: fp32 master weights). See the dtype rules at the top of this file.

    Raises QuantizationUnavailable (one line) when --load-in-4bit cannot run here.
    """
    import torch

    if not cfg.enabled:
        return {}
    kwargs: dict[str, Any] = {"dtype": rt.compute_dtype}  # frozen: stored as computed
    if not cfg.load_in_4bit:
        return kwargs
    if rt.device.type != "cuda":
        raise QuantizationUnavailable(
            "--load-in-4bit needs a CUDA GPU (bitsandbytes NF4 kernels); this run is on the "
            f"{rt.device.type}: drop --load-in-4bit to train LoRA on a bf16/fp32 base"
        )
    if rt.world_size > 1:
        raise QuantizationUnavailable(
            f"--load-in-4bit runs in one process ({rt.world_size} were started): 4-bit weights are not "
            "sharded or broadcast by soulchat; use one GPU, or LoRA without --load-in-4bit under torchrun"
        )
    if builtin_model:
        raise QuantizationUnavailable(
            "--load-in-4bit quantizes a pretrained --model; the built-in tiny random model has nothing "
            "to quantize: pass --model DIR"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise QuantizationUnavailable(
            "--load-in-4bit needs bitsandbytes: pip install 'soulchat[lora]' bitsandbytes (CUDA build)"
        ) from err
    from transformers import BitsAndBytesConfig

    kwargs["dtype"] = torch.bfloat16
    kwargs["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,  # quantises the fp32 absmax constants too: ~0.37 bits/param saved
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    kwargs["device_map"] = {"": rt.device.index or 0}  # quantised while loading, straight onto the GPU
    return kwargs


# ==================================================================================================
# Adapters
# ==================================================================================================


def default_target_modules(lm: nn.Module) -> list[str]:
    """Short names of every ``nn.Linear`` (or bitsandbytes 4-bit linear) inside the decoder layers.

    For Llama/Qwen2/Mistral this is q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj;
    another family gets its own projections by the same rule. The lm head and the embeddings are
    outside the decoder layers and never targeted.
    """
    from soulchat.loading import decoder_layers

    names: list[str] = []
    for layer in decoder_layers(lm):
        for name, module in layer.named_modules():
            if _is_linear(module) and name:
                short = name.rsplit(".", 1)[-1]
                if short not in names:
                    names.append(short)
    if not names:
        raise ValueError(
            f"{type(lm).__name__}: no linear layers found inside its decoder layers for LoRA; name them "
            "with --lora-target-modules"
        )
    return names


def _is_linear(module: nn.Module) -> bool:
    from torch import nn

    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")  # bitsandbytes (subclasses of nn.Linear)


def _check_targets(lm: nn.Module, targets: list[str]) -> None:
    """Every requested name must match at least one linear layer (peft's own message names no flag)."""
    module_names = [n for n, m in lm.named_modules() if _is_linear(m)]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in module_names):
            close = sorted({n.rsplit(".", 1)[-1] for n in module_names})
            raise ValueError(
                f"--lora-target-modules {target}: no linear layer of {type(lm).__name__} has that name; "
                f"its linear layers are named {close}"
            )


def apply_lora(lm: nn.Module, cfg: LoraConfig, seed: int = 0) -> nn.Module:
    """Inject peft LoRA adapters into ``lm`` in place; freeze everything else. Returns ``lm`` itself
    (the module tree PackedCausalLM wraps), with the peft shell reachable through ``peft_model(lm)``.

    The adapters' initialisation (peft: A kaiming-uniform, B zero) is drawn from ``seed`` on a forked
    RNG: the same adapters whatever ran before (the fused-kernel probe draws random numbers), and the
    global RNG stream of the run is left as it was.

    Call after the fused-kernel swap (it recognises plain nn.Linear projections) and before
    activation checkpointing, torch.compile and sharding.
    """
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = list(cfg.lora_target_modules) or default_target_modules(lm)
    _check_targets(lm, targets)
    modules_to_save = None
    if cfg.lora_train_lm_head:
        modules_to_save = [_head_name(lm)]
    peft_config = PeftLoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        modules_to_save=modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with _known_peft_warnings(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        shell = get_peft_model(lm, peft_config)
    inner = shell.get_base_model()
    assert inner is lm, "peft injects adapters in place"
    for p in inner.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 master weights for everything AdamW updates
    # A plain attribute, not a submodule: the parameters keep one name (lm.model.layers...).
    inner.__dict__["_soulchat_peft"] = shell
    return inner


@contextlib.contextmanager
def _known_peft_warnings():
    """Silence two warnings that do not apply here. With tied embeddings a trained lm head is
    deliberately its own copy (the embedding stays frozen, the merged export unties them), which peft
    warns about; and peft still calls transformers' deprecated is_gradient_checkpointing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        warnings.filterwarnings("ignore", message=".*no longer tied after merging.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def peft_model(lm: nn.Module):
    """The PeftModel shell around an ``apply_lora``-ed model (None for a full fine-tune)."""
    return lm.__dict__.get("_soulchat_peft")


def _head_name(lm: nn.Module) -> str:
    head = lm.get_output_embeddings()
    for name, module in lm.named_modules():
        if module is head:
            return name
    raise ValueError(f"{type(lm).__name__}: cannot find its lm head module for --lora-train-lm-head")


def trainable_summary(model: nn.Module) -> str:
    """'LoRA: 12,288 trainable parameters of 1,126,528 (1.09%)', counted once per parameter."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return f"LoRA: {trainable:,} trainable parameters of {total:,} ({100 * trainable / max(1, total):.2f}%)"


# ==================================================================================================
# Loading base + adapter (chat, evaluate, the merged export)
# ==================================================================================================


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_adapter_model(
    adapter_dir: str | Path,
    *,
    base: str | Path | None = None,
    device: str = "cpu",
    dtype=None,
    merge: bool = False,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
):
    """(model, tokenizer): the base model of ``adapter_dir`` with its LoRA adapter, in eval mode.

    base: the base model directory; unset = ``base_model_name_or_path`` of adapter_config.json (the
    ``--model`` of the run, or ``<adapter>/base`` for the built-in model). merge: fold the adapter into
    the base weights and return a plain transformers model (peft ``merge_and_unload``); otherwise a
    ``PeftModel``. dtype: of the base weights (unset = as stored). load_in_4bit: the base in NF4 (CUDA).
    The tokenizer is the adapter directory's (it carries the trained chat template).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir).expanduser()
    if not is_adapter_dir(adapter_dir):
        raise FileNotFoundError(
            f"{adapter_dir} is not an adapter directory (no adapter_config.json): pass <output-dir>/adapter "
            "of a --lora-rank run"
        )
    config = check_adapter(adapter_dir)
    if base is not None:
        base_path = Path(base).expanduser()
        if not (base_path / "config.json").is_file():
            raise FileNotFoundError(
                f"--base-model {base_path}: no config.json there; pass the local Hugging Face directory of "
                f"the model the adapter {adapter_dir} was trained on"
            )
    else:
        base_path = _recorded_base(adapter_dir, config)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if load_in_4bit:
        import torch

        from soulchat.distributed import Runtime

        rt = Runtime(0, 1, 0, torch.device(device), "none", torch.bfloat16)
        kwargs.update(base_load_kwargs(LoraConfig(lora_rank=1, load_in_4bit=True), rt, builtin_model=False))
    model = AutoModelForCausalLM.from_pretrained(str(base_path), **kwargs)
    if not load_in_4bit:
        model.to(device)
    # merge_and_unload warns about the untied head too (peft >= 0.22)
    with _known_peft_warnings(), _adapter_load_errors(adapter_dir, base_path):
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        if merge:
            model = model.merge_and_unload()
    model.eval()
    tok_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_path
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    return model, tokenizer


def _recorded_base(adapter_dir: Path, config: dict[str, Any]) -> Path:
    recorded = config.get("base_model_name_or_path")
    candidates = [Path(recorded).expanduser()] if isinstance(recorded, str) and recorded else []
    candidates.append(adapter_dir / BASE_DIR)  # the built-in base, when the run directory moved
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(
        f"{adapter_dir}: its base model {recorded!r} is not a local model directory (moved?): pass "
        "--base-model DIR, the directory of the model the adapter was trained on (nothing is downloaded)"
    )


# ==================================================================================================
# Checking an adapter directory before peft reads it: peft would look a missing weights file up on the
# Hugging Face hub (a network call, then a misleading "Repo id must be in the form ..." or a DNS error),
# print a bare JSON decode error for a damaged config, and a page of state_dict size mismatches when
# the config's rank is not the weights' rank.
# ==================================================================================================

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter directory soulchat cannot load exactly; the message names the file and the fix."""


def check_adapter(adapter_dir: Path) -> dict[str, Any]:
    """The parsed adapter_config.json of ``adapter_dir`` once it, and the rank of every LoRA matrix in
    its weights file, are consistent; else AdapterError naming the file."""
    path = adapter_dir / "adapter_config.json"
    redo = "re-export the adapter (<output-dir>/adapter of a --lora-rank run) or restore the file from it"
    config = read_json_file(path, dict, "a LoRA adapter (its settings)")
    if config.get("peft_type") != "LORA":
        raise AdapterError(
            f"{path}: peft_type is {config.get('peft_type')!r}; soulchat loads LoRA adapters only"
        )
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{path}: \"r\" (the LoRA rank) must be a positive integer, got {rank!r}: {redo}")
    pattern = config.get("rank_pattern") or {}
    ranks = pattern.values() if isinstance(pattern, dict) else ()
    allowed = {rank} | {v for v in ranks if isinstance(v, int)}
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        other = sorted(p.name for p in adapter_dir.glob("adapter_model.*"))
        found = f" (found {', '.join(other)}: soulchat reads safetensors only)" if other else ""
        raise AdapterError(
            f"{adapter_dir}: no {ADAPTER_WEIGHTS}, the adapter's weights{found}: pass the complete "
            "<output-dir>/adapter of a --lora-rank run; nothing is downloaded"
        )
    from safetensors import safe_open

    with naming(weights), safe_open(str(weights), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safetensors file, not a dict)
            if key.endswith(".lora_A.weight") and f.get_slice(key).get_shape()[0] not in allowed:
                raise AdapterError(
                    f"{weights}: {key} has rank {f.get_slice(key).get_shape()[0]} but {path.name} says "
                    f"r={rank}: the settings and the weights come from different runs; {redo}"
                )
    return config


@contextlib.contextmanager
def _adapter_load_errors(adapter_dir: Path, base_path: Path):
    """peft's errors for weights that do not fit the base model, as one line naming both directories."""
    try:
        with naming(adapter_dir / ADAPTER_WEIGHTS):
            yield
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise AdapterError(
            f"{adapter_dir}: its weights do not fit the base model {base_path} ({first}): pass --base-model "
            "DIR, the model the adapter was trained on"
        ) from None
