"""Helpers shared by the kernel tests: the device and skip marks, seeded inputs, gradients on fresh
leaves, the comparison against the reference with the low-precision error bound, and the spies the
dispatch tests use.

Imported as ``from kernel_checks import ...``: tests/ has no __init__.py, so pytest (default import
mode) puts tests/ on sys.path before it imports a test module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from soulchat.kernels.dispatch import force_backend, triton_runs_on

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

needs_triton = pytest.mark.skipif(
    not triton_runs_on(DEVICE), reason="Triton needs CUDA or TRITON_INTERPRET=1 (and triton installed)"
)


def needs_cuda(test: Callable) -> Callable:
    """Mark a CUDA-only test: ``cuda`` (selected by ``pytest -m cuda``) and skipped without a GPU."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.cuda(skip(test))


def seeded_randn(
    gen: torch.Generator, shape: Sequence[int], dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0
) -> torch.Tensor:
    """``shift + scale * randn(shape)`` drawn in fp64 on the CPU (the same numbers for every dtype and
    device), then cast to ``dtype`` on DEVICE. Never zeros."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift
    return x.to(DEVICE, dtype)


def run_backend(
    op: str,
    backend: str,
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    inputs: Sequence[torch.Tensor],
    grad_outputs: torch.Tensor | Sequence[torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """``outputs_and_grads(fn, inputs, grad_outputs)`` with ``op`` forced to ``backend``."""
    with force_backend(op, backend):
        return outputs_and_grads(fn, inputs, grad_outputs)


def check_against_reference(
    op: str,
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    ref: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    inputs: Sequence[torch.Tensor],
    grad_outputs: torch.Tensor | Sequence[torch.Tensor],
    names: Sequence[str],
) -> None:
    """``op``'s Triton backend through ``fn`` against ``ref``: outputs and every input gradient within
    twice plain torch's error in the same dtype (``assert_within_torch_error``), vs an fp64 truth of
    ``ref`` on the same (rounded) inputs."""
    got = run_backend(op, "triton", fn, inputs, grad_outputs)
    same_dtype = outputs_and_grads(ref, inputs, grad_outputs)
    grads64 = [
        g.double() for g in (grad_outputs if isinstance(grad_outputs, (tuple, list)) else [grad_outputs])
    ]
    truth = outputs_and_grads(ref, [t.double() for t in inputs], grads64)
    assert_within_torch_error(got, same_dtype, truth, names)


def outputs_and_grads(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    inputs: Sequence[torch.Tensor],
    grad_outputs: torch.Tensor | Sequence[torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """(outputs..., d_input for each input) of ``fn(*inputs)``, run on fresh leaf copies of the inputs.

    The copies keep the caller's tensors out of the graph, so the same inputs can go through several
    implementations. ``fn`` returns one tensor or a tuple of them; ``grad_outputs`` matches it.
    """
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    grads = torch.autograd.grad(outs, leaves, grad_outputs)
    return (*(o.detach() for o in outs), *grads)


def max_abs_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest |got - truth|, computed in fp64 (truth is the fp64 reference)."""
    return (got.double() - truth).abs().max().item()


def assert_error_within_twice_torch(name: str, err_kernel: float, err_torch: float, tiny: float) -> None:
    """The low-precision bound: err(kernel) <= 2 * err(plain torch in the same dtype) + tiny.

    Both errors are against an fp64 reference that saw the same rounded inputs, so they measure the
    computation alone; a kernel may lose at most twice what the usual PyTorch path loses.
    """
    assert err_kernel <= 2 * err_torch + tiny, (
        f"{name}: kernel error {err_kernel:.3e} > 2 x torch error {err_torch:.3e} + {tiny:.1e}"
    )


def assert_within_torch_error(
    got: Sequence[torch.Tensor],
    same_dtype: Sequence[torch.Tensor],
    truth: Sequence[torch.Tensor],
    names: Sequence[str],
) -> None:
    """Per tensor: the shape of the truth and the dtype of plain torch, then the bound above with
    tiny = one ulp of max(1, |truth|).

    The floor is one ulp at unit scale or above: gradients are sums of O(1) terms, so where the result
    itself is tiny (rms_norm at H = 1, where dx cancels to ~eps) an ulp of the terms is the honest
    resolution.
    """
    for g, s, t, name in zip(got, same_dtype, truth, names):
        assert g.shape == t.shape and g.dtype == s.dtype, (name, g.shape, g.dtype, s.dtype)
        tiny = torch.finfo(g.dtype).eps * max(1.0, t.abs().max().item())
        assert_error_within_twice_torch(name, max_abs_error(g, t), max_abs_error(s, t), tiny)


def default_backend(device: torch.device) -> str:
    """What the dispatch picks unforced: Triton on CUDA; on a CPU the reference (the interpreter is
    never picked silently)."""
    return "triton" if device.type == "cuda" else "reference"


def count_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """Replace ``module.name`` by a spy that still calls it and appends 1 to the returned list per call."""
    calls: list[int] = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls
