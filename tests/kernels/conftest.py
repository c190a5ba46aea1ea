"""Kernel tests: Triton kernels against their PyTorch references.

Without a GPU the kernels run in Triton's CPU interpreter (`TRITON_INTERPRET=1`, set here before any
kernel launches; about 3 ms per program instance, so every case is tiny). On a CUDA machine the same
tests run compiled kernels on the GPU (benchmarks/gpu_check.sh).
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()


def _interpret_triton_language() -> None:
    """`TRITON_INTERPRET=1`, also when something imported triton before this file ran.

    `@triton.jit` reads the variable when it decorates, and `triton.language`'s own jit functions
    (`tl.sum`, `tl.max`, `tl.zeros`, ...) are decorated when it is first imported: transformers
    imports it (tests/conftest.py imports transformers), and an interpreted kernel cannot call a
    compiled-mode helper. Re-wrap those helpers for the interpreter.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        return
    wrapped = {}
    for module in (tl, tl.core, tl.standard, tl.math):
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                if value not in wrapped:
                    wrapped[value] = InterpretedFunction(value.fn)
                setattr(module, name, wrapped[value])


if not ON_GPU:
    _interpret_triton_language()


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
