"""Test-wide setup: Triton kernels run in the interpreter on machines without CUDA."""

import os
import warnings
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported anywhere in the test session.
    os.environ.setdefault("TRITON_INTERPRET", "1")


# --------------------------------------------------------------------------------------------------
# Shared fixtures (opt-in: nothing below is autouse)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def reference_attention():
    """Force the PyTorch reference attention kernel for one test.

    Under TRITON_INTERPRET=1 the dispatcher may pick the Triton attention kernel on a CPU: correct, but
    ~100x slower. Tests about the glue around the kernels use the reference (the truth the kernel tests
    compare against). Use as ``pytestmark = pytest.mark.usefixtures("reference_attention")``.
    """
    from soulchat.kernels.dispatch import force_backend

    with force_backend("attention", "reference"):
        yield


@pytest.fixture(scope="session")
def trained_tiny_model_dir(tmp_path_factory) -> Path:
    """The built-in tiny Qwen2 trained for 2 steps by soulchat.train on the bundled corpus, exported.

    Trained with the paper's "soulchat" template (so a loader must find that template in the run's
    training config), once per session in pytest's session temp dir.
    """
    from soulchat.kernels.dispatch import force_backend
    from soulchat.train import main as train

    run = tmp_path_factory.getbasetemp() / "soulchat_tiny_run"
    if (run / "export" / "config.json").is_file():
        return run / "export"
    argv = [
        "--steps", "2", "--tokens-per-micro-batch", "512", "--tokens-per-step", "512", "--max-length", "512",
        "--template", "soulchat", "--eval-fraction", "0", "--output-dir", str(run), "--no-progress",
        "--no-tensorboard",
    ]  # fmt: skip
    # With TRITON_INTERPRET=1 the Triton kernels would run in the interpreter (~80 s for this run
    # instead of ~3 s): train with the PyTorch backends.
    with force_backend("attention", "reference"), force_backend("loss", "chunked"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one-process checkpoint
        summary = train(argv)
    return Path(summary["export"])


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for the module: on a busy 2-core machine a tiny-model generate() takes
    ~0.16 s with one thread and ~1.2 s with the default two (measured on the shared CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The chat, evaluation and inference tests share the session's trained model (each module loads it once).
@pytest.fixture(scope="module")
def model_dir(trained_tiny_model_dir) -> Path:
    return trained_tiny_model_dir


@pytest.fixture(scope="module")
def cm(model_dir):
    from soulchat.inference import load_model

    return load_model(str(model_dir))
