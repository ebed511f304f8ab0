"""Two nodes: two torchrun agents (one process each, gloo) meet at a c10d rendezvous on the loopback and
train like one process. A cluster launch is the same command on each node with the head node's address
(see README: "Training on several nodes")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from test_train import REPO, _checkpoint_weights, free_port, run_args, step_losses, subprocess_env

from soulchat import train

pytestmark = pytest.mark.usefixtures("reference_attention")

STEPS = ["--steps", "3", "--no-export", "--eval-fraction", "0"]
TIMEOUT_S = 300  # a few seconds of training; the rest is two interpreters importing torch on a busy CPU


def agent(node_rank: int, port: int, args: list[str]) -> subprocess.Popen:
    """One node's torchrun agent. c10d assigns the ranks; is_host says which agent serves the store
    (both match 127.0.0.1, so it is given instead of guessed)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node_rank), "--max-restarts", "0",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "soulchat-multinode",
        "--rdzv-conf", f"is_host={int(node_rank == 0)},join_timeout=120",
        "-m", "soulchat.train", *args,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: a hung run is killed whole, workers included
    )  # fmt: skip


def wait_all(procs: list[subprocess.Popen]) -> list[str]:
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-6000:]
    return outputs


@pytest.mark.slow
def test_two_nodes_on_a_loopback_rendezvous_equal_one_process(tmp_path):
    cache = tmp_path / "cache"
    single = tmp_path / "single"
    train.main(run_args(single, cache, *STEPS))

    nodes = tmp_path / "nodes"  # one output directory, as on a cluster's shared file system
    args = run_args(nodes, cache, *STEPS, "--parallel", "ddp")
    port = free_port()
    outputs = wait_all([agent(0, port, args), agent(1, port, args)])
    assert any("2 process(es), parallel=ddp" in out for out in outputs), outputs

    a, b = step_losses(single), step_losses(nodes)
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)
    one = _checkpoint_weights(single / "checkpoints" / "step_000003")
    two = _checkpoint_weights(nodes / "checkpoints" / "step_000003")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    # Both nodes wrote their rank's RNG state into the one sealed checkpoint.
    assert sorted(p.name for p in (nodes / "checkpoints" / "step_000003" / "rng").glob("*.json")) == [
        "rank0.json",
        "rank1.json",
    ]
