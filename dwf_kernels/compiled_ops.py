"""Python side of the compiled ops torch.ops.dwf_kernels.{dwf_forward, dwf_backward, dwf_sgd_step}.

Their schemas, CPU/CUDA kernels and autograd formula live in C++ (csrc/); Python adds what only
Python can: the fake implementations (for torch.compile / FakeTensor).
"""

from __future__ import annotations

import torch

from . import _autograd, _extension

if _extension.LOADED:
    _autograd.register_fakes("dwf_kernels::dwf_forward", "dwf_kernels::dwf_backward", "dwf_kernels::dwf_sgd_step")
    forward_op = torch.ops.dwf_kernels.dwf_forward
    backward_op = torch.ops.dwf_kernels.dwf_backward
    sgd_step_op = torch.ops.dwf_kernels.dwf_sgd_step
else:
    forward_op = backward_op = sgd_step_op = None
