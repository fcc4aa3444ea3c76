"""Test configuration: without a GPU, Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before dwf_kernels (which defines the @triton.jit kernels) is
imported; on a machine with a GPU the Triton tests run on CUDA tensors instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
