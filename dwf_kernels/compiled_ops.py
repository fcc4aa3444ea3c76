"""Python side of the compiled ops torch.ops.dwf_kernels.{dwf_forward, dwf_backward}.

Their schemas and CPU/CUDA kernels live in C++ (csrc/); Python adds what only Python can: the
fake implementations (for torch.compile / FakeTensor) and the autograd formula.
"""

from __future__ import annotations

import torch

from . import _autograd, _extension

if _extension.LOADED:
    _autograd.register("dwf_kernels::dwf_forward", "dwf_kernels::dwf_backward", torch.ops.dwf_kernels.dwf_backward)
    forward_op = torch.ops.dwf_kernels.dwf_forward
    backward_op = torch.ops.dwf_kernels.dwf_backward
else:
    forward_op = backward_op = None
