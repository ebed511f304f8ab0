"""Processes and devices for soulchat.train: one process, or ``torchrun`` (FSDP / DDP over NCCL or gloo).

``setup_runtime`` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), picks the device and the
compute dtype and initialises the process group; the helpers below are the few collectives the trainer,
the checkpoints and the export need (each is a no-op with one process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from soulchat.options import ConfigError
from soulchat.train_options import Config


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    parallel: str  # "fsdp" | "ddp" | "none" (always "none" for one process)
    compute_dtype: torch.dtype

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(cfg: Config) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible (use --device cpu)")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    parallel = cfg.train.parallel
    if world_size > 1:
        if parallel == "none":
            raise ConfigError(
                f"--parallel none runs one process, but {world_size} were started: use --parallel fsdp or ddp"
            )
        if not dist.is_initialized():
            # nccl for GPUs; gloo is the CPU backend (tests, debugging).
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None
            )
    else:
        parallel = "none"
    if cfg.train.cpu_threads is not None:
        torch.set_num_threads(cfg.train.cpu_threads)
    elif not use_cuda:
        torch.set_num_threads(1)  # see --cpu-threads: one thread per process is the robust CPU default
    mp = cfg.model.mixed_precision
    compute_dtype = torch.bfloat16 if mp == "bf16" or (mp == "auto" and use_cuda) else torch.float32
    return Runtime(rank, world_size, local_rank, device, parallel, compute_dtype)


def all_reduce_sum(values: list[float], rt: Runtime) -> list[float]:
    """Sum a few host numbers over ranks in one collective (float64 so token counts stay exact)."""
    if not rt.distributed:
        return list(values)
    device = rt.device if rt.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def log(rt: Runtime, message: str) -> None:
    if rt.main:
        print(message, flush=True)
