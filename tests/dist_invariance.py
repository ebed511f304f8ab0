"""Worker for tests/test_train.py: two optimizer steps of one fixed global batch, per parallel mode.

Run in one process (imported by the test) or under
``python -m torch.distributed.run --nproc-per-node 2 tests/dist_invariance.py OUT_DIR MODE...``:
each rank takes its share of the step's micro-batches, and rank 0 saves the step losses, gradient
norms and the full (gathered) final weights to OUT_DIR/<mode>-<world>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from soulchat.data.packing import assemble_ref
from soulchat.distributed import setup_runtime
from soulchat.train import build_optimizer, build_parallel_model, train_step
from soulchat.train_options import parse_args

VOCAB = 97
MICRO_BATCHES = 4  # per global step
MICRO_TOKENS = 96


class FakeTokenizer:
    """What build_model needs of a tokenizer for the built-in model: its size and special ids."""

    eos_token_id = 0
    bos_token_id = None
    pad_token_id = None

    def __len__(self) -> int:
        return VOCAB


def conversations(step: int) -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """MICRO_BATCHES groups of conversations (each group fits MICRO_TOKENS), fixed by the step."""
    rng = np.random.default_rng(1000 + step)
    groups = []
    for _ in range(MICRO_BATCHES):
        group, used = [], 0
        while True:
            n = int(rng.integers(2, 40))
            if used + n > MICRO_TOKENS:
                break
            ids = rng.integers(1, VOCAB, n).astype(np.int32)
            trained = rng.random(n) < 0.5
            trained[0] = False
            # Turn-style weights, so that the normaliser is a sum of weights, not a token count.
            weight = np.where(trained, rng.uniform(0.25, 1.0, n), 0.0).astype(np.float32)
            group.append((ids, trained, weight))
            used += n
        groups.append(group)
    return groups


def micro_batch(convs) -> dict:
    tokens = np.concatenate([c[0] for c in convs])
    trained = np.concatenate([c[1] for c in convs]).astype(np.uint8)
    weight = np.concatenate([c[2] for c in convs])
    offsets = np.zeros(len(convs) + 1, dtype=np.int64)
    np.cumsum([len(c[0]) for c in convs], out=offsets[1:])
    return assemble_ref(tokens, trained, weight, offsets, np.arange(len(convs)))


def run(mode: str, out_dir: str, merge: bool = False) -> dict:
    """Two steps under ``mode`` ("none", "fsdp", "ddp"); ``merge`` packs the step into ONE micro-batch."""
    cfg = parse_args(
        [
            "--parallel",
            mode,
            "--device",
            "cpu",
            "--seed",
            "0",
            "--lr",
            "1e-2",
            "--warmup-steps",
            "0",
            "--schedule",
            "constant",
            "--grad-clip",
            "1.0",
            "--max-length",
            "64",
            # eps well above the fp32 rounding of near-zero gradients: Adam divides g by |g| + eps, and a
            # tiny eps would turn ~1e-9 rounding differences of vanishing gradients into full-size steps.
            "--eps",
            "1e-4",
            "--tokens-per-micro-batch",
            str(MICRO_TOKENS * (MICRO_BATCHES if merge else 1)),
            "--tokens-per-step",
            str(MICRO_TOKENS * MICRO_BATCHES),
            "--output-dir",
            out_dir,
        ]
    )
    rt = setup_runtime(cfg)
    model, train_module = build_parallel_model(cfg, FakeTokenizer(), rt)
    optimizer = build_optimizer(cfg, model, rt)
    losses, norms = [], []
    for step in range(2):
        groups = conversations(step)
        if merge:
            batches = [micro_batch([c for g in groups for c in g])]
        else:
            per_rank = MICRO_BATCHES // rt.world_size
            batches = [micro_batch(g) for g in groups[rt.rank * per_rank : (rt.rank + 1) * per_rank]]
        result = train_step(
            model, train_module, optimizer, batches, rt, cfg.optim.grad_clip, "stop", step + 1
        )
        losses.append(result.loss)
        norms.append(result.grad_norm)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result = {"losses": losses, "grad_norms": norms, "state": state, "world_size": rt.world_size}
    if rt.main:
        torch.save(result, Path(out_dir) / f"{mode}-{rt.world_size}.pt")
    return result


if __name__ == "__main__":
    out = sys.argv[1]
    for mode in sys.argv[2:]:
        run(mode, out)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
