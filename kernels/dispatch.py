"""Backend choice for every kernel op, in one place.

Each op (``attention``, ``loss``, ``rms_norm``, ``swiglu``) has an ordered list of
backends, fastest first; the first one available on the inputs' device wins. One override per op
forces a backend, for tests and for users who want to compare:

- in code: ``set_backend("attention", "triton")`` or ``with force_backend("loss", "reference"): ...``
- in the environment: ``SOULCHAT_ATTENTION_BACKEND=reference`` (``SOULCHAT_<OP>_BACKEND``)

A forced backend that cannot run raises instead of silently falling back: a benchmark or test that
asked for the Triton kernel must never measure the reference by accident.

Where a Triton kernel may run is one rule for every op (``triton_usable``), and the kernel files take
``triton``, ``tl`` and ``jit`` from here (``None``/identity where triton is not installed, so the
reference backends still import).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence

import torch

_overrides: dict[str, str | None] = {}


def env_var(op: str) -> str:
    return f"SOULCHAT_{op.upper()}_BACKEND"


def set_backend(op: str, name: str | None) -> None:
    """Force ``op`` to use backend ``name`` (``None`` returns to automatic choice)."""
    _overrides[op] = name


@contextlib.contextmanager
def force_backend(op: str, name: str | None) -> Iterator[None]:
    previous = _overrides.get(op)
    _overrides[op] = name
    try:
        yield
    finally:
        _overrides[op] = previous


def forced_backend(op: str) -> str | None:
    """The backend forced for ``op`` by code or environment, if any (code wins)."""
    return _overrides.get(op) or os.environ.get(env_var(op)) or None


# A constant rather than a cached function: torch.compile traces through plain attribute reads
# without warnings, and whether triton is installed cannot change within a process.
TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


if TRITON_IMPORTABLE:
    import triton
    import triton.language as tl

    jit = triton.jit
else:  # triton is Linux-only; the reference backends still work without it
    triton = None
    tl = None

    def jit(fn):
        return fn


def triton_importable() -> bool:
    return TRITON_IMPORTABLE


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreted()


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The triton 3.9 interpreter computes bf16 tl.dot wrongly and rounds fp32 -> bf16 casts toward zero
# (a GPU rounds to nearest): bf16 is tested on CUDA only, never run interpreted.
INTERPRETER_DTYPES = (torch.float32, torch.float16)


def triton_usable(op: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``op``'s Triton kernel may run on ``device`` in ``dtype`` (the op's own shape limits
    come on top).

    On CUDA: fp32/fp16/bf16. On a CPU only under TRITON_INTERPRET=1, only when the backend is forced
    for ``op`` (the interpreter is a test tool, ~100x slower than the PyTorch backends: never the
    automatic choice), and never in bf16 (see INTERPRETER_DTYPES).
    """
    if not TRITON_IMPORTABLE or dtype not in KERNEL_DTYPES:
        return False
    if device.type == "cuda":
        return True
    return (
        device.type == "cpu"
        and triton_interpreted()
        and forced_backend(op) == "triton"
        and dtype in INTERPRETER_DTYPES
    )


def resolve_backend(op: str, candidates: Sequence[tuple[str, Callable[[], bool]]]) -> str:
    """Pick the backend for ``op`` from ``(name, is_available)`` pairs in preference order."""
    names = [name for name, _ in candidates]
    forced = forced_backend(op)
    if forced is not None:
        if forced not in names:
            raise ValueError(
                f"unknown {op} backend {forced!r} (from set_backend or {env_var(op)}); choose one of {names}"
            )
        available = dict(candidates)[forced]
        if not available():
            raise RuntimeError(
                f"the {op} backend {forced!r} was forced but cannot run here; unset {env_var(op)} "
                f"or choose one of {[n for n, ok in candidates if ok()]}"
            )
        return forced
    for name, available in candidates:
        if available():
            return name
    raise RuntimeError(f"no {op} backend can run here (tried {names})")
