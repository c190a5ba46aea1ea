"""What every kernel module shares: the optional Triton import, the interpreter switch, dispatch.

Triton is optional (`pip install kvprune[triton]`); without it every dispatch function runs the
PyTorch reference. Under `TRITON_INTERPRET=1` the kernels run on CPU tensors (tests do this); there
`tl.dot` on bf16 operands returns garbage, so the kernels upcast their operands to fp32
(integration-notes.md section 6). A kernel calls only `@triton.jit` helpers decorated in the same
import as itself (`online_softmax.py`): a helper decorated before `TRITON_INTERPRET=1` was set cannot
be called from an interpreted kernel (tests/kernels/conftest.py re-wraps triton.language's own).
"""

from __future__ import annotations

import contextlib
import functools
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
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# head dims the attention kernels take: larger tiles spill registers or overflow shared memory
# (tests/kernels/test_compile.py); fp32 operands take twice the room of bf16/fp16
MAX_HEAD_DIM = {torch.float32: 128, torch.float16: 256, torch.bfloat16: 256}


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
        return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def shared_memory_limit(device: torch.device) -> int:
    """Opt-in shared memory per block of a CUDA device, the limit Triton checks at launch (no limit
    elsewhere: the interpreter pipelines nothing)."""
    if device.type != "cuda":
        return 1 << 30
    return _shared_memory(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _shared_memory(index: int) -> int:
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(index)["max_shared_mem"]


def pipeline_stages(stage_bytes: int, fixed_bytes: int, limit: int, most: int = 3) -> int:
    """Software-pipelining depth: the most stages (up to `most`) whose buffers, `stage_bytes` each
    plus `fixed_bytes`, fit in `limit` bytes of shared memory."""
    for stages in range(most, 1, -1):
        if stages * stage_bytes + fixed_bytes <= limit:
            return stages
    return 1


def kernel_refusal(query: torch.Tensor, **others: torch.Tensor) -> str | None:
    """Why the attention kernels cannot take these operands (`None`: they can).

    They need one device, one operand dtype among fp32/fp16/bf16 (`tl.dot` takes two operands of
    the same type), and head dims up to `MAX_HEAD_DIM` of that dtype.
    """
    if query.dtype not in KERNEL_DTYPES:
        return f"query.dtype must be one of float32/float16/bfloat16 for the Triton kernels, got {query.dtype}"
    largest = MAX_HEAD_DIM[query.dtype]
    for name, tensor in {"query": query, **others}.items():
        if tensor.device != query.device:
            return f"{name} is on {tensor.device} but query is on {query.device}: the kernels need one device"
        if not tensor.is_floating_point():
            continue
        if tensor.dtype != query.dtype:
            return (f"{name}.dtype ({tensor.dtype}) must equal query.dtype ({query.dtype}) for the Triton kernels; "
                    f"the PyTorch reference (backend='torch') takes mixed dtypes")
        if not 1 <= tensor.shape[-1] <= largest:
            return (f"{name} head dim must be in [1, {largest}] for the Triton kernels in {query.dtype}, "
                    f"got {tensor.shape[-1]}")
    return None


def pick_triton(backend: str, query: torch.Tensor, **others: torch.Tensor) -> bool:
    """`use_triton`, then the operands: `auto` falls back to the reference for operands the kernels
    refuse (mixed dtypes, large head dims), `triton` raises `ValueError` naming the argument."""
    if not use_triton(query, backend):
        return False
    reason = kernel_refusal(query, **others)
    if reason is None:
        return True
    if backend == "triton":
        raise ValueError(reason)
    return False


def require_kernel_operands(query: torch.Tensor, **others: torch.Tensor) -> None:
    """Raise `ValueError` when the kernels cannot take these operands (see `kernel_refusal`)."""
    reason = kernel_refusal(query, **others)
    if reason is not None:
        raise ValueError(reason)


def on_device_of(tensor: torch.Tensor):
    """Launch context: kernels go to the current CUDA device, so make it the tensor's (with
    `device_map="auto"` a layer's tensors may sit on any GPU)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def check_attention_operands(query, key, value, slot_valid, query_valid=None) -> None:
    """Shapes shared by the attention launchers; `ValueError` naming the argument otherwise."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"query, key and value must be 4-d [B, H, len, D], got {query.dim()}, {key.dim()}, "
                         f"{value.dim()} dims")
    batch, q_heads, q_len, dim = query.shape
    if key.shape[0] != batch or key.shape[3] != dim:
        raise ValueError(f"key must be [B={batch}, Hkv, S, D={dim}], got {tuple(key.shape)}")
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value must be [{', '.join(map(str, key.shape[:3]))}, Dv], got {tuple(value.shape)}")
    if key.shape[1] == 0 or q_heads % key.shape[1]:
        raise ValueError(f"query heads ({q_heads}) must be a positive multiple of KV heads ({key.shape[1]})")
    if slot_valid.dtype != torch.bool or slot_valid.shape != key.shape[:3]:
        raise ValueError(f"slot_valid must be bool {tuple(key.shape[:3])}, got {slot_valid.dtype} "
                         f"{tuple(slot_valid.shape)}")
    if query_valid is not None and (query_valid.dtype != torch.bool or query_valid.shape != (batch, q_len)):
        raise ValueError(f"query_valid must be bool ({batch}, {q_len}), got {query_valid.dtype} "
                         f"{tuple(query_valid.shape)}")
