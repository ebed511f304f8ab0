"""One run per output directory: ``run_lock`` keeps a second training out of an ``--output-dir`` in use.

Two runs writing the same checkpoints, metrics and export would corrupt each other's files; the second
one is refused with one line naming the first (pid, host, start time).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path

from soulchat.distributed import Runtime, all_reduce_sum

LOCK_FILE = ".soulchat-run.lock"


class RunLockError(ValueError):
    """Another run is using the output directory; the message names it (pid, host, start time)."""


@contextlib.contextmanager
def run_lock(output_dir: str | os.PathLike, rt: Runtime | None = None):
    """Hold an exclusive lock on ``<output_dir>/.soulchat-run.lock`` for the whole run.

    Rank 0 alone takes it (the output directory is one, shared by every node: per-node locks would
    conflict with each other on a shared file system, and without one the checkpoints could not be
    resumed anyway); the other ranks learn the outcome in one collective, so all of them stop together.
    The lock is a flock(2) on the open file, so it goes away with its process however that ends (kill
    -9 included): a lock file left by a dead run is simply taken over. The file holds the owner's pid,
    host and start time, for the message a second run prints.
    """
    main = rt is None or rt.main
    handle, problem = _acquire(Path(output_dir)) if main else (None, None)
    if rt is not None and rt.distributed:
        (failed,) = all_reduce_sum([1.0 if problem else 0.0], rt)
        if failed and not problem:
            problem = f"--output-dir {output_dir}: another run holds its lock (see rank 0's message)"
    if problem:
        raise RunLockError(problem)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # closing the file releases the flock


def _acquire(output_dir: Path):
    """(open lock file, None) when acquired, else (None, the one-line error)."""
    import fcntl

    if output_dir.exists() and not output_dir.is_dir():
        return None, f"--output-dir {output_dir} is a file, not a directory: pick a directory"
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open for the run: the flock lives on it)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        handle.seek(0)
        owner = handle.read().strip()
        handle.close()
        if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            return (
                None,
                f"{path}: cannot be locked ({e.strerror}); put --output-dir on a file system with locks",
            )
        return None, (
            f"--output-dir {output_dir} is in use by another training ({_describe_owner(owner)}); wait for it "
            "to finish, stop it, or pick another --output-dir"
        )
    handle.seek(0)
    handle.truncate()
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    handle.write(json.dumps(record) + "\n")
    handle.flush()
    return handle, None


def _describe_owner(text: str) -> str:
    try:
        owner = json.loads(text)
        return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
    except (ValueError, KeyError, TypeError):
        return "its process did not record itself yet"
