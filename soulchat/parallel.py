"""The model as every rank trains it: loaded (rank 0 reads, the others receive by broadcast), the fused
kernels swapped in, LoRA adapters injected, activation checkpointing and torch.compile applied, wrapped
in ``PackedCausalLM`` and sharded (FSDP2) or replicated (DDP); and the autocast that goes with it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from soulchat.distributed import Runtime, log
from soulchat.fused_kernels import apply_fused_kernels, fused_kernels_enabled
from soulchat.loading import build_model, decoder_layers
from soulchat.lora import apply_lora, base_load_kwargs, trainable_summary
from soulchat.model import PackedCausalLM
from soulchat.train_options import Config


def build_parallel_model(cfg: Config, tokenizer, rt: Runtime) -> tuple[PackedCausalLM, nn.Module]:
    """(the PackedCausalLM, the module to call for training: itself, or its DDP wrapper).

    Under torchrun only rank 0 reads (or randomly initialises) the weights; the other ranks build the
    structure on the meta device and receive the weights by broadcast, so host memory holds one copy of
    the model, not one per process.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    on_meta = rt.distributed and not rt.main
    load_kwargs = base_load_kwargs(cfg.lora, rt, cfg.builtin_model)  # LoRA: frozen base dtype, 4-bit
    device = "meta" if on_meta else "cpu"
    lm = build_model(cfg.model, tokenizer, seed=cfg.train.seed, device=device, load_kwargs=load_kwargs)
    # Before compile and sharding: they then wrap the modules as they will run.
    if fused_kernels_enabled(cfg.model.fused_kernels, rt.device, cfg.model.compile):
        log(rt, f"fused kernels: {apply_fused_kernels(lm).summary()}")
    if cfg.lora.enabled:  # after the fused-kernel swap (it looks for nn.Linear projections)
        lm = apply_lora(lm, cfg.lora, seed=cfg.train.seed)
        log(rt, trainable_summary(lm))
    if cfg.model.activation_checkpointing:
        # Non-reentrant checkpointing inside each decoder layer; state-dict keys stay unchanged.
        # (transformers 5 renamed gradient_checkpointing_enable; older releases only have the old name.)
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.compile:
        for layer in decoder_layers(lm):
            layer.compile()
    model = PackedCausalLM(lm)

    if rt.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(rt.device.type, (rt.world_size,))  # explicit: --device cpu on a GPU host
        full_state = model.state_dict() if rt.main else {}
        mp_policy = MixedPrecisionPolicy(
            param_dtype=rt.compute_dtype if rt.compute_dtype != torch.float32 else None,
            reduce_dtype=torch.float32,
        )
        # One FSDP unit per decoder layer (all-gathered just before it runs), then the root holding
        # the embedding, the final norm and the lm head (tied weights stay one parameter there).
        for layer in decoder_layers(lm):
            fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
        fully_shard(model, mesh=mesh, mp_policy=mp_policy)
        if on_meta:
            model.to_empty(device=rt.device)
        set_model_state_dict(
            model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        _broadcast_buffers(model)  # non-persistent buffers (rotary tables) are not in the state dict
        return model, model

    if on_meta:
        model.to_empty(device=rt.device)
        lm.tie_weights()  # to_empty creates new tensors: re-tie the embedding and lm head
    model.to(rt.device)
    if rt.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's parameters and buffers when it is built.
        ddp = DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )
        return model, ddp
    return model, model


def _broadcast_buffers(model: nn.Module) -> None:
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def autocast_context(rt: Runtime):
    """bf16 autocast where FSDP's mixed-precision policy does not already cast (DDP, one process)."""
    if rt.compute_dtype == torch.float32 or rt.parallel == "fsdp":
        return contextlib.nullcontext()
    return torch.autocast(device_type=rt.device.type, dtype=rt.compute_dtype)
