"""Loading: the tokenizer, the built-in tiny Qwen2, a local Hugging Face model directory (nothing is
downloaded), with soulchat's packed attention implementation; and where a model keeps its decoder
layers and its backbone.

Families that cannot be packed exactly are refused (``UnsupportedModelError``) before any weight is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from soulchat.attention import ATTENTION_NAME, PACKING_FIX, check_family, refuse, register_attention
from soulchat.data.assets import default_tokenizer_path
from soulchat.options import ModelConfig

BUILTIN_TOKENIZER = default_tokenizer_path()


def _check_dir(path: str, what: str, flag: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"{what} {p} does not exist: {flag} must be a local directory (nothing is downloaded)"
        )
    if not p.is_dir():
        raise NotADirectoryError(f"{what} {p} is a file: {flag} must be a Hugging Face model directory")
    return p


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of ``--tokenizer``, else of ``--model``, else the bundled one (soulchat.data.assets)."""
    from soulchat.data.assets import load_tokenizer as load

    return load(cfg.tokenizer, model=cfg.model, trust_remote_code=cfg.trust_remote_code)


def tiny_qwen2_config(vocab_size: int, eos_token_id: int | None = None, **overrides: Any) -> Any:
    """The built-in smoke-test model: a ~1.1M-parameter Qwen2 (hidden 128, 3 layers, 4 query / 2 kv
    heads, tied embeddings; half the parameters are the 4096 x 128 embedding of the bundled vocabulary).

    The same architecture and code path as Qwen2/2.5 checkpoints, small enough that the default run
    (~150 steps, ~300k tokens) takes about a minute on two CPU cores: ~4k tokens/s with one thread,
    where hidden 192 / 6 heads was 1.5x slower per token.
    """
    from transformers import Qwen2Config

    values: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "attention_dropout": 0.0,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
        "use_cache": True,
    }
    values.update(overrides)
    return Qwen2Config(**values)


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json", "*.bin.index.json")


def _check_weights(path: Path) -> None:
    """A model directory needs weights next to config.json (transformers would raise an OSError deep
    inside from_pretrained)."""
    if not any(next(path.glob(pattern), None) is not None for pattern in WEIGHT_FILES):
        raise FileNotFoundError(
            f"{path} has a config.json but no weights (model.safetensors, pytorch_model.bin or a sharded "
            "*.index.json): --model needs the directory written by save_pretrained, weights included"
        )


def build_model(
    cfg: ModelConfig, tokenizer, seed: int, device: torch.device | str = "cpu", load_kwargs: dict | None = None
):
    """A causal LM with the packed attention implementation, fp32 weights, in train mode.

    ``device="meta"`` builds the structure without weights (for ranks that receive them by broadcast).
    ``tokenizer`` may be None for a ``cfg.model`` directory (then its size is not checked).
    Families that cannot be packed exactly raise ``UnsupportedModelError`` before anything is loaded.
    ``load_kwargs`` override the loading arguments (LoRA: the frozen base's dtype, 4-bit quantization).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    load = {"dtype": torch.float32, **(load_kwargs or {})}

    register_attention()
    if cfg.model is None:
        config = tiny_qwen2_config(
            len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id
            if tokenizer.bos_token_id is not None
            else tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
        config._attn_implementation = ATTENTION_NAME
        torch.manual_seed(seed)  # the built-in model is random: the seed makes it reproducible
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION_NAME, **load)
    else:
        path = _check_dir(cfg.model, "model directory", "--model")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json: --model must point at a Hugging Face model directory "
                "(config.json + *.safetensors/*.bin)"
            )
        config = AutoConfig.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
        check_family(config)
        try:
            if str(device) == "meta":
                with torch.device("meta"):
                    model = AutoModelForCausalLM.from_config(
                        config,
                        attn_implementation=ATTENTION_NAME,
                        trust_remote_code=cfg.trust_remote_code,
                        **load,
                    )
            else:
                _check_weights(path)
                # fp32 master weights: the optimizer updates fp32, compute is cast (bf16 on GPU).
                model = AutoModelForCausalLM.from_pretrained(
                    str(path),
                    local_files_only=True,
                    trust_remote_code=cfg.trust_remote_code,
                    attn_implementation=ATTENTION_NAME,
                    **load,
                )
        except (ValueError, KeyError) as err:
            if "attn_implementation" in str(err) or ATTENTION_NAME in str(err):
                raise refuse(
                    config,
                    f"it does not support custom attention implementations (transformers' "
                    f"AttentionInterface), which packed training needs ({type(err).__name__}: {err})",
                    PACKING_FIX,
                ) from err
            raise
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
            f"{model.get_input_embeddings().weight.shape[0]}: use the model's own tokenizer"
        )
    model.config.use_cache = False  # training: never build a KV cache
    model.train()
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (the unit of FSDP sharding and activation checkpointing)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__} (no _no_split_modules): "
            "FSDP and activation checkpointing need them"
        )
    return layers


def backbone(model: nn.Module) -> nn.Module:
    """The model without its lm head (``model.model`` for Qwen2/Llama): returns last hidden states."""
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if inner is None or inner is model:
        raise ValueError(f"cannot find the base model of {type(model).__name__}")
    return inner
