"""At most one host sync per optimizer step in the training loop.

A host sync is a point where the host waits for the device (``.item()``, ``float(t)``, ``.tolist()``,
an op whose output size depends on the data). On a GPU each one drains the queue of launched kernels,
so the host can no longer run ahead; the loop needs exactly one per step (the loss and the gradient
norm, which decide whether the update happens).

Counted on the CPU, where nothing actually waits, by ``SyncCounter``:
- at the dispatcher (a TorchDispatchMode): ``_local_scalar_dense`` (what ``item()``, ``float()``,
  ``int()``, ``bool()``, ``math.isfinite(t)`` and f-string formatting of a tensor dispatch to), and the
  ops whose output shape is read from the data (``nonzero``, ``masked_select``, ``unique``, indexing with
  a boolean mask, ``repeat_interleave`` without an output size), plus ``equal``/``is_nonzero``;
- in Python (those bypass the dispatcher for a CPU tensor): ``Tensor.tolist``, ``numpy``, ``cpu`` and
  ``__array__``.
Limits: a device-to-host copy written as ``.to("cpu")``/``copy_`` is invisible here (source and target
are both the host), as are ``torch.cuda.synchronize`` and waits inside C++ kernels. The model is a stub
with the PackedCausalLM call signature and no sync of its own: the CPU reference attention reads the
conversation boundaries on the host, which the GPU kernels do not, so the real model would count the
kernels' CPU fallbacks rather than the loop. AdamW is the fused one, as training builds it on CUDA (the
CPU default reads each step counter with ``.item()``; those counters live on the host there).
"""

from __future__ import annotations

import dist_invariance
import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from soulchat import train
from soulchat.distributed import setup_runtime
from soulchat.runlog import RunLog
from soulchat.train_options import parse_args

aten = torch.ops.aten
DATA_DEPENDENT = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}
HOST_READS = ("tolist", "numpy", "cpu", "__array__")


class SyncCounter(TorchDispatchMode):
    """Counts host syncs while active (see the module docstring for what is counted and what is not)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in DATA_DEPENDENT:
            self.syncs.append(str(func))
        elif func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        ):
            self.syncs.append("index with a boolean mask")
        return func(*args, **kwargs)

    def __enter__(self):
        self._originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, self._counting(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def _counting(self, name, original):
        def method(tensor, *args, **kwargs):
            self.syncs.append(f"Tensor.{name}")
            return original(tensor, *args, **kwargs)

        return method


class StubPackedLM(nn.Module):
    """PackedCausalLM's call signature, a weighted sum over the trained positions; no sync inside."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.table = nn.Parameter(torch.randn(dist_invariance.VOCAB, 8, generator=gen))
        self.head = nn.Parameter(torch.randn(8, generator=gen))

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen, loss_index, labels, loss_weight):
        picked = self.table.index_select(0, input_ids.index_select(0, loss_index))  # [N, 8]
        target = self.table.index_select(0, labels.index_select(0, loss_index))  # [N, 8]
        return (((picked - target) @ self.head) ** 2 * loss_weight).sum()


def test_sync_counter_catches_each_kind_of_sync():
    t = torch.tensor([0.5, 2.0])
    reads = [
        lambda: t[0].item(), lambda: float(t[1]), lambda: bool(t[0] > 0), lambda: t.tolist(),
        lambda: t.numpy(), lambda: t.cpu(), lambda: t.nonzero(), lambda: t[t > 1], lambda: np.asarray(t),
        lambda: f"{t[0]:.2f}",
    ]  # fmt: skip
    for read in reads:
        with SyncCounter() as counter:
            read()
        assert len(counter.syncs) >= 1, read
    with SyncCounter() as counter:
        (t * 2 + 1).sum().sqrt()  # device work only
    assert counter.syncs == []


class _Store:
    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def micro_batch(self, row: int) -> dict:
        return self.batches[row]


def _run(tmp_path, steps: int, batches: list[dict]) -> train.Run:
    cfg = parse_args(
        ["--device", "cpu", "--no-progress", "--steps", str(steps), "--grad-clip", "1.0",
         "--max-length", "64", "--tokens-per-micro-batch", str(dist_invariance.MICRO_TOKENS),
         "--tokens-per-step", str(2 * dist_invariance.MICRO_TOKENS), "--output-dir", str(tmp_path)]
    )  # fmt: skip
    rt = setup_runtime(cfg)
    model = StubPackedLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return train.Run(
        cfg=cfg, rt=rt, tokenizer=None, store=_Store(batches), model=model, train_module=model,
        optimizer=optimizer, scheduler=scheduler, order=train.RowOrder(len(batches), 0), per_rank=2,
        total_steps=steps, start_step=0, evaluator=train.HeldOutEvaluator(cfg, None, steps),
        checkpointer=train.Checkpointer(cfg, rt, model, optimizer, scheduler, {}),
        runlog=RunLog(tmp_path, enabled=True, resume_step=0, tensorboard=False),
    )  # fmt: skip


def test_training_loop_syncs_once_per_optimizer_step(tmp_path):
    groups = dist_invariance.conversations(0) + dist_invariance.conversations(1)
    run = _run(tmp_path, steps=3, batches=[dist_invariance.micro_batch(g) for g in groups])
    before = [p.detach().clone() for p in run.model.parameters()]
    with SyncCounter() as counter:
        totals = train.train_loop(run)
    assert len(counter.syncs) == 3, counter.syncs  # one per step: the loss and the gradient norm together
    assert counter.syncs == ["Tensor.tolist"] * 3
    assert totals.tokens > 0 and not any(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
    history = run.checkpointer.history
    assert history.first_loss > 0 and history.last_loss > 0


def test_step_without_trained_tokens_does_not_wait_for_the_device(tmp_path):
    batch = dist_invariance.micro_batch(dist_invariance.conversations(0)[0])
    batch["loss_weight"] = np.zeros_like(batch["loss_weight"])
    run = _run(tmp_path, steps=1, batches=[batch, batch])
    with SyncCounter() as counter:
        result = train.train_step(run.model, run.model, run.optimizer, [batch, batch], run.rt, 1.0, "stop", 1)
    assert result.skipped and counter.syncs == []


def test_nonfinite_step_is_decided_from_the_one_sync(tmp_path, capsys):
    batch = dist_invariance.micro_batch(dist_invariance.conversations(0)[0])
    run = _run(tmp_path, steps=1, batches=[batch, batch])
    with torch.no_grad():
        run.model.head.fill_(float("inf"))
    before = [p.detach().clone() for p in run.model.parameters()]
    with SyncCounter() as counter:
        result = train.train_step(run.model, run.model, run.optimizer, [batch, batch], run.rt, 1.0, "skip", 1)
    assert result.skipped and len(counter.syncs) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters(), strict=True))
    assert "non-finite" in capsys.readouterr().out


class StubFusedHeadLM(StubPackedLM):
    """The fused lm-head loss on bf16 hidden states with an fp32 head: the head is cast for each GEMM."""

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen, loss_index, labels, loss_weight):
        from soulchat.kernels.linear_cross_entropy import linear_cross_entropy

        hidden = self.table.index_select(0, input_ids.index_select(0, loss_index)).bfloat16()  # [N, 8]
        return linear_cross_entropy(hidden, self.table, labels.index_select(0, loss_index), loss_weight)


def test_lm_head_cast_once_per_optimizer_step(tmp_path, monkeypatch):
    import soulchat.kernels.linear_cross_entropy as lce
    from soulchat.kernels.dispatch import force_backend

    casts = []
    real_cast = lce._cast_weight
    monkeypatch.setattr(lce, "_cast_weight", lambda w, d: casts.append(d) or real_cast(w, d))
    groups = dist_invariance.conversations(0)
    batches = [dist_invariance.micro_batch(g) for g in groups[:2]]
    run = _run(tmp_path, steps=1, batches=batches)
    model = StubFusedHeadLM()
    with force_backend("loss", "chunked"):
        result = train.train_step(model, model, run.optimizer, batches, run.rt, 1.0, "stop", 1)
    assert not result.skipped and len(batches) == 2
    assert casts == [torch.bfloat16]  # two micro-batches, one bf16 copy of the head
