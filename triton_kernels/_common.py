"""What every kernel module shares: the optional Triton import, the interpreter switch, dispatch.

Triton is optional (`pip install kvprune[triton]`); without it every dispatch function runs the
PyTorch reference. Under `TRITON_INTERPRET=1` the kernels run on CPU tensors (tests do this); there
`tl.dot` on bf16 operands returns garbage, so the kernels upcast their operands to fp32
(integration-notes.md section 6). Kernels call no other `@triton.jit` function: a helper decorated
before `TRITON_INTERPRET=1` was set cannot be called from an interpreted kernel.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = None
    tl = None

HAS_TRITON = triton is not None
BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: torch.Tensor, backend: str = "auto") -> bool:
    """Whether a dispatch function runs the Triton launcher for `tensor`.

    auto: Triton for CUDA tensors when triton is importable, the reference elsewhere (CPU tensors
    always take the reference, so `TRITON_INTERPRET=1` set by the kernel tests never slows down the
    rest of the suite); `KVPRESS_TRITON=0` in the environment turns auto off. triton: always the
    launcher (CPU tensors need `TRITON_INTERPRET=1`). torch: always the reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package (pip install kvprune[triton])")
        return True
    return HAS_TRITON and tensor.is_cuda and os.environ.get("KVPRESS_TRITON", "1") != "0"


def kernel_flags(dtype: torch.dtype) -> dict:
    """Compile-time flags for the operand dtype: upcast to fp32 in the interpreter (bf16 `tl.dot` is
    wrong there) and exact fp32 products for fp32 inputs (tf32 would not match the reference)."""
    upcast = interpreting()
    exact = upcast or dtype == torch.float32
    return {"UPCAST": upcast, "DOT_PRECISION": "ieee" if exact else "tf32"}


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a small stand-in on CPU, for the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4

