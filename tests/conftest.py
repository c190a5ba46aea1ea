"""Suite-wide settings: one intra-op thread (two threads are ~4x slower on the 2-core CI machines)
and Triton's interpreter when there is no GPU, set before anything imports triton."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
