"""Worker for tests/test_families.py: the preflight probe under FSDP2 (2 processes, gloo, CPU) right
after sharding, then dist_invariance's two training steps, which must match one process without it.

``python -m torch.distributed.run --nproc-per-node 2 tests/preflight_fsdp.py OUT_DIR``: each rank writes
OUT_DIR/preflight-<rank>.json (its measured errors); rank 0 writes OUT_DIR/fsdp-2.pt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import dist_invariance

from soulchat.check import preflight

_build = dist_invariance.build_parallel_model


def build_then_preflight(cfg, tokenizer, rt):
    model, train_module = _build(cfg, tokenizer, rt)
    report = preflight(model, compute_dtype=rt.compute_dtype)  # the call train makes before step 1
    Path(sys.argv[1], f"preflight-{rt.rank}.json").write_text(json.dumps(report.errors))
    return model, train_module


if __name__ == "__main__":
    dist_invariance.build_parallel_model = build_then_preflight
    dist_invariance.run("fsdp", sys.argv[1])
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
