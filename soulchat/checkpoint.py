"""Checkpoints for soulchat.train.

Checkpoints (``torch.distributed.checkpoint``, sharded, resumable with a different number of processes)
hold the model, optimizer, scheduler, data position and RNG state. They are written to a temporary
directory, sealed by a manifest and renamed when complete; nothing read back can run code. The Hugging
Face export is soulchat.export's; the lock on the output directory is soulchat.run_lock's.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import importlib
import io
import json
import logging
import os
import pathlib
import pickle
import random
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions

from soulchat.distributed import Runtime, all_reduce_sum, barrier
from soulchat.integrity import (
    MANIFEST_FILE,
    check_checksums,
    check_sizes,
    file_record,
    read_manifest,
    write_json_durably,
    write_manifest,
)
from soulchat.model import PackedCausalLM
from soulchat.train_options import Config

# ==================================================================================================
# Checkpoints: torch.distributed.checkpoint, written to a temp dir, sealed by a manifest, renamed
# ==================================================================================================
#
# <output>/checkpoints/step_000100/   DCP shards of model + optimizer (__*.distcp, .metadata),
#                                     trainer.json (step, scheduler, data position, history),
#                                     rng/rank*.json + rng/rank*.safetensors, config.json,
#                                     manifest.json (size + CRC-32 of every other file; written last)
# <output>/checkpoints/latest         text file naming the newest complete checkpoint directory
#
# A save writes step_N.tmp/, then (after every rank finished) seals it with manifest.json, renames it to
# step_N/ and only then rewrites `latest` (write + os.replace). A crash at any point leaves the previous
# complete checkpoint; leftover *.tmp directories are removed by the next save. --resume takes the newest
# step_N/ whose manifest verifies and says which newer ones it skipped and why.
#
# Nothing read from a checkpoint can run code: the trainer and RNG states are JSON + safetensors, DCP's
# pickled .metadata goes through an unpickler that admits only DCP's own metadata classes, and DCP's
# non-tensor values are read with torch.load(weights_only=True).

TRAINER_STATE = "trainer.json"
RNG_DIR = "rng"
_MANIFEST_PART = ".manifest.rank"  # per-rank shares of the checksums, merged by rank 0


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, incomplete, or not loadable safely); says which and why."""


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / "checkpoints"


def _step_dirs(root: Path) -> list[Path]:
    """step_N directories (complete or not; never the *.tmp ones), newest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]), reverse=True)


def latest_checkpoint(cfg: Config, rt: Runtime | None = None) -> Path | None:
    """The newest checkpoint whose manifest verifies (sizes and checksums of every file), or None.

    Each newer checkpoint that fails is named on stderr with the reason ("falling back"). With ``rt``
    under torchrun the checksums are split over the ranks (each reads 1/world of the bytes) and the
    verdict is agreed in one collective; without it every process verifies every file.
    """
    skipped: list[str] = []
    main = rt is None or rt.main
    for path in _step_dirs(checkpoint_root(cfg)):
        problem = verify_checkpoint(path, rt)
        if problem is None:
            if skipped and main:
                print(
                    f"warning: --resume: falling back to {path.name}: {'; '.join(skipped)}", file=sys.stderr
                )
            return path
        skipped.append(f"{path.name} is not usable ({problem})")
    if skipped and main:
        print(f"warning: --resume: {'; '.join(skipped)}", file=sys.stderr)
    return None


def verify_checkpoint(path: Path, rt: Runtime | None = None) -> str | None:
    """None when ``path`` is a complete, undamaged checkpoint, else the reason in a few words."""
    try:
        files = read_manifest(path)
    except ValueError as e:
        problem: str | None = str(e)
    else:
        missing = [kind for kind, ok in _required_kinds(files).items() if not ok]
        problem = f"its manifest lists no {', '.join(missing)}" if missing else check_sizes(path, files)
        if problem is None:
            names = sorted(files)
            if rt is not None and rt.distributed:
                names = names[rt.rank :: rt.world_size]
            problem = check_checksums(path, {n: files[n] for n in names})
    if rt is not None and rt.distributed:  # every rank must take the same decision
        (failed,) = all_reduce_sum([0.0 if problem is None else 1.0], rt)
        if failed and problem is None:
            problem = "a file failed its checksum on another rank"
    return problem


def _required_kinds(files: dict[str, Any]) -> dict[str, bool]:
    return {
        ".metadata": ".metadata" in files,
        ".distcp shards": any(n.endswith(".distcp") for n in files),
        TRAINER_STATE: TRAINER_STATE in files,
        "rng state": any(n.startswith(f"{RNG_DIR}/") for n in files),
    }


def _publish_checkpoint(tmp: Path, final: Path) -> None:
    """The commit point of a save: rename the finished temp dir, then move `latest` to it."""
    if final.exists():  # left by an earlier run that crashed before updating `latest`
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = final.parent / "latest.tmp"
    with open(pointer_tmp, "w", encoding="utf-8") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())  # the pointer must never name a directory whose rename was not persisted
    os.replace(pointer_tmp, final.parent / "latest")


def checkpoint_state_options(model: PackedCausalLM) -> StateDictOptions:
    """DCP state-dict options for save and load: a model with frozen parameters (LoRA) checkpoints only
    its trainable ones (the frozen base is rebuilt from --model or the seed on resume, and never
    changes), so a checkpoint of a 7B LoRA run holds megabytes, not 14 GB. strict=False because the
    frozen keys are absent on load; DCP itself still fails on any missing trainable key."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=True, strict=False) if frozen else StateDictOptions()


def save_checkpoint(
    cfg: Config,
    rt: Runtime,
    model: PackedCausalLM,
    optimizer,
    scheduler,
    step: int,
    trainer_state: dict[str, Any],
) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    root = checkpoint_root(cfg)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if rt.main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):  # an interrupted earlier save
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink()
        tmp.mkdir()
    barrier(rt)
    options = checkpoint_state_options(model)  # LoRA: trainable parameters only
    state = {
        "model": get_model_state_dict(model, options=options),
        "optim": get_optimizer_state_dict(model, optimizer, options=options),
    }
    with _single_process_dcp(rt):
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not rt.distributed)
    (tmp / RNG_DIR).mkdir(exist_ok=True)
    save_state(tmp / RNG_DIR / f"rank{rt.rank}.json", _rng_state())
    if rt.main:
        trainer = {"step": step, "scheduler": scheduler.state_dict(), "world_size": rt.world_size}
        save_state(tmp / TRAINER_STATE, {**trainer, **trainer_state})
        (tmp / "config.json").write_text(cfg.to_json(), encoding="utf-8")
    barrier(rt)  # every rank's files are written
    _seal(tmp, rt)
    if rt.main:
        _publish_checkpoint(tmp, final)
        complete = [p for p in _step_dirs(root) if (p / MANIFEST_FILE).is_file()]
        for old in complete[cfg.checkpoint.keep_last :]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier(rt)
    return final


def _seal(tmp: Path, rt: Runtime) -> None:
    """Checksum every file of the finished temp dir (each rank a share) and write manifest.json last."""
    names = sorted(
        str(p.relative_to(tmp))
        for p in tmp.rglob("*")
        if p.is_file() and not p.name.startswith(_MANIFEST_PART)
    )
    share = {name: file_record(tmp / name) for name in names[rt.rank :: rt.world_size]}
    if rt.distributed:
        write_json_durably(tmp / f"{_MANIFEST_PART}{rt.rank}.json", share)
        barrier(rt)
    if not rt.main:
        return
    files = dict(share)
    for rank in range(1, rt.world_size):
        part = tmp / f"{_MANIFEST_PART}{rank}.json"
        files.update(json.loads(part.read_text(encoding="utf-8")))
        part.unlink()
    (tmp / f"{_MANIFEST_PART}0.json").unlink(missing_ok=True)
    if sorted(files) != names:
        raise CheckpointError(f"{tmp}: the ranks' checksums do not cover its files; this is a bug")
    write_manifest(tmp, files)


def load_checkpoint(path: Path, rt: Runtime, model: PackedCausalLM, optimizer, scheduler) -> dict[str, Any]:
    """Load a verified checkpoint in place (resharded to this world size); returns the trainer state.

    Raises CheckpointError (one line: the file and the fix) when something in it cannot be read safely.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = checkpoint_state_options(model)  # LoRA: trainable parameters only
    state = {
        "model": get_model_state_dict(model, options=options),
        "optim": get_optimizer_state_dict(model, optimizer, options=options),
    }
    reader = _SafeFileSystemReader(str(path))
    try:
        with _single_process_dcp(rt):
            dcp.load(  # in place, resharded
                state,
                storage_reader=reader,
                planner=_SafeLoadPlanner(),
                no_dist=not rt.distributed,
            )
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        # A refused .metadata is the cause; DCP's error around it adds a failed rank-local fallback.
        raise CheckpointError(
            f"--resume: {path} cannot be loaded ({_first_line(reader.refused or e)}); delete it to resume "
            "from an older one"
        ) from e
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optim"], options=options)
    trainer = load_state(path / TRAINER_STATE)
    try:
        scheduler.load_state_dict(trainer["scheduler"])
        int(trainer["step"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path / TRAINER_STATE}: not a soulchat trainer state ({_first_line(e)})"
        ) from e
    rng_file = path / RNG_DIR / f"rank{rt.rank}.json"
    if rng_file.is_file():  # absent when resuming with more processes than were saved
        _set_rng_state(load_state(rng_file))
    return trainer


def _first_line(error: BaseException) -> str:
    """The error in one line of at most 300 characters (DCP's own: the first failing rank's error)."""
    if isinstance(error, CheckpointException) and error.failures:
        error = error.failures[min(error.failures)][0]
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]


class _DropDcpRecords(logging.Filter):
    """DCP's loader logs each metadata read failure on the root logger with its traceback (two for one
    refused .metadata: the global read, then the rank-local fallback), and its own "dcp" logger logs the
    failure again; the raised error becomes our one line, so those records only bury it."""

    folder = os.path.dirname(torch.distributed.checkpoint.__file__) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(self.folder)


@contextlib.contextmanager
def _single_process_dcp(rt: Runtime):
    """DCP warns on every single-process save/load that it assumes a single process: we know."""
    dcp_logger = getattr(importlib.import_module("torch.distributed.checkpoint.logger"), "_dcp_logger", None)
    loggers = [logging.getLogger()] + ([dcp_logger] if isinstance(dcp_logger, logging.Logger) else [])
    quiet = _DropDcpRecords()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            if not rt.distributed:
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


# --------------------------------------------------------------------------------------------------
# DCP without code execution


class _MetadataUnpickler(pickle.Unpickler):
    """DCP pickles its .metadata file; this unpickler builds only DCP's metadata classes and torch's
    plain value types, so a planted payload (a __reduce__ naming os.system, say) is refused, not run."""

    _TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)

    def find_class(self, module: str, name: str):
        if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"):
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                return found
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch.serialization" and name == "_get_layout":  # a name -> torch.layout table look-up
            return torch.serialization._get_layout
        if module == "torch" and isinstance(getattr(torch, name, None), self._TORCH_VALUES):
            return getattr(torch, name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module in ("pathlib", "posixpath") and name in ("PosixPath", "PurePosixPath"):
            return getattr(pathlib, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's .metadata")


class _SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose .metadata goes through _MetadataUnpickler instead of pickle.load."""

    refused: pickle.UnpicklingError | None = None  # the first refusal, for the error message

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as err:
                self.refused = self.refused or err
                raise
        if not isinstance(metadata, Metadata):
            self.refused = self.refused or pickle.UnpicklingError(
                f"{self.path}/.metadata holds a {type(metadata).__name__}, not DCP metadata"
            )
            raise self.refused
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner reads DCP's non-tensor values with torch.load(weights_only=False): not here."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


# --------------------------------------------------------------------------------------------------
# State files: JSON for everything, tensors and arrays in a safetensors file beside it


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (dicts, lists, numbers, strings, tensors, numpy arrays) as ``path`` (JSON) plus,
    when it holds tensors or arrays, ``path.with_suffix('.safetensors')``. No pickle anywhere."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(value, np.ndarray):
            # Stored as int64/float64 with the dtype recorded: safetensors has no uint32 for every torch.
            wide = value.astype(np.float64 if value.dtype.kind == "f" else np.int64)
            tensors[key] = torch.from_numpy(np.ascontiguousarray(wide))
            return {"__ndarray__": key, "dtype": value.dtype.str}
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise TypeError(f"{path}: state key {key!r} holds a dict with non-string keys")
            return {k: encode(v, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [encode(v, f"{key}.{i}") for i, v in enumerate(value)]
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"{path}: cannot store {type(value).__name__} at {key!r} (JSON or tensors only)")

    encoded = encode(state, "state")
    if tensors:
        save_file(tensors, str(path.with_suffix(".safetensors")))
    write_json_durably(path, encoded)


def load_state(path: Path) -> dict[str, Any]:
    """Read what ``save_state`` wrote; raises CheckpointError naming the file when it is not that."""
    from safetensors.torch import load_file

    try:
        encoded = json.loads(path.read_text(encoding="utf-8"))
        tensor_file = path.with_suffix(".safetensors")
        tensors = load_file(str(tensor_file)) if tensor_file.is_file() else {}

        def decode(value: Any) -> Any:
            if isinstance(value, dict):
                if "__tensor__" in value:
                    return tensors[value["__tensor__"]]
                if "__ndarray__" in value:
                    return tensors[value["__ndarray__"]].numpy().astype(np.dtype(value["dtype"]))
                return {k: decode(v) for k, v in value.items()}
            if isinstance(value, list):
                return [decode(v) for v in value]
            return value

        state = decode(encoded)
        if not isinstance(state, dict):
            raise TypeError("not a JSON object")
        return state
    except Exception as e:  # JSON, UTF-8, safetensors header or a missing tensor: all one answer
        raise CheckpointError(
            f"{path}: not a soulchat state file ({_first_line(e)}); delete the checkpoint"
        ) from e


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]  # JSON turned the tuples into lists
    random.setstate((version, tuple(internal), gauss_next))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
