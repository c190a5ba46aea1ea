"""Kernel tests: Triton kernels against their PyTorch references.

Without a GPU the kernels run in Triton's CPU interpreter (`TRITON_INTERPRET=1`, set here before any
kernel launches; about 3 ms per program instance, so every case is tiny). On a CUDA machine the same
tests run compiled kernels on the GPU (benchmarks/gpu_check.sh).
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
