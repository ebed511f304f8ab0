"""Checkpoints: nothing in them runs code, a damaged one is skipped for the newest complete one, and one
run at a time owns an output directory."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import REPO, run_args, step_losses, subprocess_env

from soulchat import checkpoint, train
from soulchat.checkpoint import CheckpointError, load_state, save_state
from soulchat.integrity import MANIFEST_FILE, file_record, read_manifest, write_manifest
from soulchat.run_lock import LOCK_FILE, RunLockError, run_lock
from soulchat.options import ConfigError
from soulchat.train_options import parse_args
from soulchat.resume import ResumeMismatch

pytestmark = pytest.mark.usefixtures("reference_attention")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, cache_dir) -> Path:
    """4 steps with a checkpoint every 2: step_000002 and step_000004, both complete."""
    out = tmp_path_factory.mktemp("saved") / "run"
    train.main(run_args(out, cache_dir, *COMMON))
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000002", "step_000004"]
    return out


COMMON = ["--steps", "4", "--save-every", "2", "--no-export"]


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _ran(marker: str) -> None:
    """What a planted pickle would call when unpickled: it leaves a marker file."""
    Path(marker).write_text("code from a checkpoint ran")


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_ran, (self.marker,))


def reseal(path: Path) -> None:
    """Rewrite the manifest for the files as they are now: an attacker's checkpoint is 'complete' too."""
    names = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_FILE]
    write_manifest(path, {name: file_record(path / name) for name in sorted(names)})


def resume(out: Path, cache_dir: Path):
    return train.main(run_args(out, cache_dir, *COMMON, "--resume"))


# --------------------------------------------------------------------------------------------------
# State files: JSON + safetensors
# --------------------------------------------------------------------------------------------------


def test_state_files_round_trip_exactly_without_pickle(tmp_path):
    state = {
        "step": 7,
        "loss": 0.1 + 0.2,  # a float that needs all 17 digits
        "pair": (1, None),
        "tensor": torch.randn(3, 2, dtype=torch.float64),
        "bytes": torch.randint(0, 255, (9,), dtype=torch.uint8),
        "nested": {"array": np.arange(5, dtype=np.uint32), "flag": True},
    }
    save_state(tmp_path / "s.json", state)
    back = load_state(tmp_path / "s.json")
    assert back["step"] == 7 and back["loss"] == 0.1 + 0.2 and back["pair"] == [1, None]
    assert torch.equal(back["tensor"], state["tensor"]) and torch.equal(back["bytes"], state["bytes"])
    assert back["nested"]["array"].dtype == np.uint32
    np.testing.assert_array_equal(back["nested"]["array"], np.arange(5))
    with pytest.raises(TypeError, match="cannot store Payload"):
        save_state(tmp_path / "bad.json", {"x": Payload(tmp_path / "m")})


def test_rng_state_restores_every_generator_exactly(tmp_path):
    save_state(tmp_path / "rng.json", checkpoint._rng_state())
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3))
    for _ in range(3):  # move every generator on
        random.random(), np.random.rand(), torch.rand(5)
    checkpoint._set_rng_state(load_state(tmp_path / "rng.json"))
    again = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3))
    assert expected[:4] == again[:4] and torch.equal(expected[4], again[4])


# --------------------------------------------------------------------------------------------------
# Planted payloads never run
# --------------------------------------------------------------------------------------------------


def _plant_in_metadata(ck: Path, marker: Path) -> None:
    (ck / ".metadata").write_bytes(pickle.dumps(Payload(marker)))


def _plant_in_trainer_state(ck: Path, marker: Path) -> None:
    (ck / checkpoint.TRAINER_STATE).write_bytes(pickle.dumps(Payload(marker)))


def _plant_in_rng_tensors(ck: Path, marker: Path) -> None:
    (ck / "rng" / "rank0.safetensors").write_bytes(pickle.dumps(Payload(marker)))


def _plant_in_distcp_value(ck: Path, marker: Path) -> None:
    """Point one of DCP's non-tensor values (an optimizer hyper-parameter) at a torch.save'd payload."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = pickle.loads((ck / ".metadata").read_bytes())  # the attacker's side: plain pickle
    fqn = next(
        k
        for k, v in metadata.state_dict_metadata.items()
        if isinstance(v, BytesStorageMetadata) and "optim" in k
    )
    index = next(i for i in metadata.storage_data if i.fqn == fqn)
    info = metadata.storage_data[index]
    blob = io.BytesIO()
    torch.save(Payload(marker), blob)
    shard = ck / info.relative_path
    offset = shard.stat().st_size
    shard.write_bytes(shard.read_bytes() + blob.getvalue())
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(blob.getvalue()))
    (ck / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize(
    "plant",
    [_plant_in_metadata, _plant_in_trainer_state, _plant_in_rng_tensors, _plant_in_distcp_value],
    ids=["metadata", "trainer-state", "rng", "distcp-value"],
)
def test_planted_pickle_in_a_sealed_checkpoint_never_runs(plant, saved_run, cache_dir, tmp_path):
    out = copy_run(saved_run, tmp_path)
    ck = out / "checkpoints" / "step_000004"
    marker = tmp_path / "marker"
    plant(ck, marker)
    reseal(ck)  # the manifest matches: only the loader stands between the payload and the run
    with pytest.raises(CheckpointError, match="step_000004") as err:
        resume(out, cache_dir)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_refused_metadata_is_our_one_line_without_dcp_tracebacks(saved_run, cache_dir, tmp_path, caplog):
    # DCP's loader logs each failed metadata read on the root logger with a traceback before raising.
    out = copy_run(saved_run, tmp_path)
    ck = out / "checkpoints" / "step_000004"
    _plant_in_metadata(ck, tmp_path / "marker")
    reseal(ck)
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError) as err:
        resume(out, cache_dir)
    assert "refusing to load test_checkpoint._ran from a checkpoint's .metadata" in str(err.value)
    assert "rank local" not in str(err.value)  # DCP's fallback read, not the cause
    assert [r.getMessage() for r in caplog.records if r.exc_info or "metadata" in r.getMessage()] == []


def test_an_older_soulchat_trainer_pickle_is_never_read(saved_run, cache_dir, tmp_path):
    out = copy_run(saved_run, tmp_path)
    marker = tmp_path / "marker"
    for ck in (out / "checkpoints").glob("step_*"):
        torch.save({"step": Payload(marker)}, ck / "trainer.pt")
        (ck / "rng" / "rank0.pt").write_bytes(pickle.dumps(Payload(marker)))
    assert resume(out, cache_dir)["start_step"] == 4
    assert not marker.exists()


def test_safe_planner_refuses_a_pickled_object():
    blob = io.BytesIO()
    torch.save(Payload(Path("/nonexistent/marker")), blob)
    blob.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        checkpoint._SafeLoadPlanner().load_bytes(None, blob)


# --------------------------------------------------------------------------------------------------
# Integrity: the manifest marks a checkpoint complete; --resume falls back past damaged ones
# --------------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _overwrite_same_size(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


DAMAGE = {
    "distcp truncated": lambda ck: _truncate(next(ck.glob("*.distcp"))),
    "distcp overwritten": lambda ck: _overwrite_same_size(next(ck.glob("*.distcp"))),
    "metadata deleted": lambda ck: (ck / ".metadata").unlink(),
    "trainer state truncated": lambda ck: _truncate(ck / checkpoint.TRAINER_STATE),
    "rng state deleted": lambda ck: (ck / "rng" / "rank0.json").unlink(),
    "rng tensors truncated": lambda ck: _truncate(ck / "rng" / "rank0.safetensors"),
    "manifest deleted": lambda ck: (ck / MANIFEST_FILE).unlink(),
    "manifest truncated": lambda ck: _truncate(ck / MANIFEST_FILE),
}


def test_manifest_lists_every_file_of_a_checkpoint(saved_run):
    ck = saved_run / "checkpoints" / "step_000004"
    files = read_manifest(ck)
    on_disk = {str(p.relative_to(ck)) for p in ck.rglob("*") if p.is_file() and p.name != MANIFEST_FILE}
    assert set(files) == on_disk
    assert {".metadata", "trainer.json", "rng/rank0.json", "rng/rank0.safetensors", "config.json"} <= on_disk
    assert any(n.endswith(".distcp") for n in on_disk) and not list(ck.rglob("*.pt"))
    assert checkpoint.verify_checkpoint(ck) is None


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_latest_checkpoint_skips_each_kind_of_damage(kind, saved_run, tmp_path, capsys):
    out = copy_run(saved_run, tmp_path)
    DAMAGE[kind](out / "checkpoints" / "step_000004")
    cfg = train.parse_args(run_args(out, tmp_path, *COMMON))
    assert checkpoint.latest_checkpoint(cfg) == out / "checkpoints" / "step_000002"
    warning = capsys.readouterr().err
    assert "falling back to step_000002" in warning and "step_000004 is not usable" in warning


def test_resume_falls_back_to_the_newest_complete_checkpoint_bit_exactly(
    saved_run, cache_dir, tmp_path, capsys
):
    out = copy_run(saved_run, tmp_path)
    _truncate(next((out / "checkpoints" / "step_000004").glob("*.distcp")))
    summary = resume(out, cache_dir)
    assert summary["start_step"] == 2
    assert "falling back to step_000002" in capsys.readouterr().err
    assert step_losses(out) == step_losses(saved_run)  # exact: steps 3 and 4 redone identically
    assert checkpoint.verify_checkpoint(out / "checkpoints" / "step_000004") is None  # rewritten whole


def test_no_complete_checkpoint_is_one_line_exit_2(saved_run, tmp_path):
    out = copy_run(saved_run, tmp_path)
    for ck in (out / "checkpoints").glob("step_*"):
        (ck / MANIFEST_FILE).unlink()
    result = subprocess.run(
        [sys.executable, "-m", "soulchat.train", *run_args(out, tmp_path / "cache", *COMMON, "--resume")],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no complete checkpoint" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_save_leaves_no_manifest_parts_and_prunes_only_complete_checkpoints(saved_run, tmp_path, cache_dir):
    out = copy_run(saved_run, tmp_path)
    ck = out / "checkpoints"
    (ck / "step_000004" / MANIFEST_FILE).unlink()  # incomplete: it does not count towards --keep-last
    train.main(run_args(out, cache_dir, "--steps", "6", "--save-every", "2", "--no-export", "--resume",
                          "--resume-override", "steps"))  # the run is extended: its schedule changes
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_000004", "step_000006"]
    assert not list(ck.rglob(".manifest.rank*"))
    assert checkpoint.verify_checkpoint(ck / "step_000006") is None


# --------------------------------------------------------------------------------------------------
# One run per output directory
# --------------------------------------------------------------------------------------------------

HOLD_LOCK = "import sys; from soulchat.run_lock import run_lock\nwith run_lock(sys.argv[1]):\n    print('locked', flush=True); sys.stdin.read()"


def hold_lock(output_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(output_dir)],
        cwd=REPO, env=subprocess_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_run_lock_refuses_a_second_run_and_takes_over_a_dead_ones(tmp_path):
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        busy = f"in use by another training \\(pid {holder.pid} on "
        with pytest.raises(RunLockError, match=busy) as err, run_lock(out):
            pass
        assert "\n" not in str(err.value)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock: the kernel drops the flock
        holder.wait()
    with run_lock(out):
        assert f'"pid": {os.getpid()}' in (out / LOCK_FILE).read_text()
    with run_lock(out):  # released on exit: the same process takes it again
        pass


def test_second_training_in_one_output_dir_is_one_line_exit_2(tmp_path):
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "soulchat.train", *run_args(out, tmp_path / "cache", "--steps", "1")],
            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    finally:
        holder.stdin.close()
        holder.wait()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --output-dir {out} is in use by another training (pid {holder.pid} on "
        + result.stderr.split(f"pid {holder.pid} on ", 1)[1].strip()
    ]
    assert not (out / "metrics.jsonl").exists()  # nothing of the other run was touched


def test_run_lock_refuses_an_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunLockError, match="is a file, not a directory"), run_lock(tmp_path / "file"):
        pass


def test_trainer_state_without_its_fields_is_one_clear_error(saved_run, cache_dir, tmp_path):
    out = copy_run(saved_run, tmp_path)
    ck = out / "checkpoints" / "step_000004"
    (ck / checkpoint.TRAINER_STATE).write_text('{"step": 4}')
    reseal(ck)
    with pytest.raises(CheckpointError, match="trainer.json: not a soulchat trainer state"):
        resume(out, cache_dir)


# --------------------------------------------------------------------------------------------------
# --resume continues the saved run's math: a changed option is named, or taken with --resume-override
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changed, named",
    [
        (["--lr", "0.01"], "--lr 0.01 (was {lr})"),
        (["--seed", "3"], "--seed 3 (was 0)"),
        (["--loss-weighting", "turn"], '--loss-weighting "turn" (was "token")'),
        (["--beta2", "0.9", "--weight-decay", "0.5"], "--weight-decay 0.5 (was 0.1), --beta2 0.9 (was 0.95)"),
    ],
    ids=["lr", "seed", "loss-weighting", "two"],
)
def test_resume_with_a_changed_option_is_refused_naming_it(saved_run, cache_dir, tmp_path, changed, named):
    out = copy_run(saved_run, tmp_path)
    recorded = (out / "config.json").read_text()
    named = named.format(lr=json.loads(recorded)["optim"]["lr"])
    with pytest.raises(ResumeMismatch) as err:
        train.main(run_args(out, cache_dir, *COMMON, "--resume", *changed))
    assert named in str(err.value) and "step_000004 was saved by a run with other options" in str(err.value)
    assert "\n" not in str(err.value)
    assert (out / "config.json").read_text() == recorded  # the recorded config is still the one that ran


def test_resume_with_runtime_options_changed_is_accepted(saved_run, cache_dir, tmp_path):
    out = copy_run(saved_run, tmp_path)
    summary = train.main(run_args(out, cache_dir, *COMMON, "--resume", "--log-every", "3", "--keep-last", "3"))
    assert summary["start_step"] == 4
    assert json.loads((out / "config.json").read_text())["checkpoint"]["keep_last"] == 3


def test_resume_override_takes_the_new_schedule_from_the_resumed_step(saved_run, cache_dir, tmp_path):
    out = copy_run(saved_run, tmp_path)
    longer = ["--steps", "6", "--save-every", "2", "--no-export"]
    with pytest.raises(ResumeMismatch, match=r"--steps 6 \(was 4\); .* pass --resume-override steps"):
        train.main(run_args(out, cache_dir, *longer, "--resume"))
    summary = train.main(run_args(out, cache_dir, *longer, "--resume", "--resume-override", "steps"))
    assert summary["start_step"] == 4
    straight = tmp_path / "straight"
    train.main(run_args(straight, cache_dir, *longer))
    # Steps 5 and 6 follow the 6-step schedule exactly, as in a run that planned 6 steps from the start.
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    want = {r["step"]: r["lr"] for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert lrs[5] == want[5] and lrs[6] == want[6]
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 6
    with pytest.raises(ConfigError, match="--resume-override lr: only epochs, grad-clip"):  # honoured ones only
        parse_args(run_args(out, cache_dir, "--resume", "--resume-override", "lr"))
