"""Test-wide setup: Triton kernels run in the interpreter on machines without CUDA."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported anywhere in the test session.
    os.environ.setdefault("TRITON_INTERPRET", "1")
