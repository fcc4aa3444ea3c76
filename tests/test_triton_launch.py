"""How the triton backend launches: directly, with no per-call state left in torch, and equal to its op.

The first test runs the compiled (non-interpreted) launch path without a GPU, in a subprocess where
TRITON_INTERPRET is unset and the launch itself is stubbed, to see what dwf_kernels and torch do
around a launch. The others run the kernels in the interpreter, like the rest of the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import DEVICES, make_factors

import dwf_kernels
from dwf_kernels.backends import triton as triton_backend

pytest.importorskip("triton")
# Where the triton backend serves: CUDA tensors on a GPU, CPU tensors under the interpreter.
TRITON_DEVICES = [d for d in DEVICES if "triton" in dwf_kernels.available_backends(d)]
on_triton_devices = pytest.mark.parametrize("device", TRITON_DEVICES)

LAUNCH_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from triton.runtime.jit import JITFunction
    launches = []
    JITFunction.run = lambda self, *args, **kwargs: launches.append(self.fn.__name__)
    import dwf_kernels
    from dwf_kernels import backends
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    backends.REGISTRY["triton"].serves = lambda device_type: True  # serve CPU tensors, launch stubbed
    f = torch.rand(4, 300, 100)
    g = f.detach().clone().requires_grad_(True)
    grad_w = torch.rand(300, 100)
    s = torch.tensor(1e-3)
    def sizes():
        return [len(getattr(kernel_side_table, name, ())) for name in ("id_to_kernel", "constant_args")]
    before = sizes()
    for _ in range(50):
        dwf_kernels.dwf_product(f, return_sumsq=True, backend="triton")
        dwf_kernels.dwf_product(g, return_sumsq=True, backend="triton")
        dwf_kernels.dwf_product_backward(f, grad_w, s, backend="triton")
        dwf_kernels.dwf_sgd_step(f.clone(), grad_w, s, None, lr=0.1, momentum=0.9, backend="triton")
    print(json.dumps({"before": before, "after": sizes(), "launches": len(launches), "kinds": sorted(set(launches))}))
    """
)


def test_launches_leave_no_per_call_state_in_torch():
    """No torch.library.wrap_triton on the eager path: torch's Triton kernel side table does not
    grow with the number of calls (it used to gain an entry per launch), and each call launches
    exactly its kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", LAUNCH_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["after"] == result["before"], result
    # Per iteration: 2 forwards (product + partial sums, 300*100 elements > one block), 1 backward, 1 step.
    assert result["launches"] == 50 * (2 * 2 + 1 + 1), result
    assert result["kinds"] == [
        "_dwf_backward_kernel",
        "_dwf_forward_kernel",
        "_dwf_sgd_step_kernel",
        "_sum_partials_kernel",
    ]


@on_triton_devices
@pytest.mark.parametrize("shape", [(1000,), (37, 3), (4096,)], ids=["n1000", "n111", "one-program"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_direct_calls_equal_the_op(device, shape, dtype):
    """The eager direct path and the custom op launch the same kernels: bitwise equal results,
    forward, backward through autograd, and the SGD step (vector widths from ROW_ALIGN included)."""
    factors = make_factors(3, shape, dtype, device)
    grad_w = make_factors(1, shape, dtype, device, seed=1)[0]
    s = torch.tensor(0.25, device=device)
    w, sumsq = dwf_kernels.dwf_product(factors, return_sumsq=True, backend="triton")
    w_op, sumsq_op = triton_backend.OPS.forward(factors, dtype, True)
    assert torch.equal(w, w_op) and torch.equal(sumsq, sumsq_op)

    leaf = factors.clone().requires_grad_(True)
    w, sumsq = dwf_kernels.dwf_product(leaf, return_sumsq=True, backend="triton")
    torch.autograd.backward([w, sumsq], [grad_w, s])
    assert torch.equal(leaf.grad, triton_backend.OPS.backward(factors, grad_w, s))

    direct, via_op = factors.clone(), factors.clone()
    buffer = dwf_kernels.dwf_sgd_step(direct, grad_w, s, None, lr=0.1, momentum=0.9, backend="triton")
    op_buffer = torch.empty_like(via_op)
    triton_backend.OPS.sgd_step(via_op, op_buffer, grad_w, s, 0.1, 0.9, 0.0, 0.0, False, False, True)
    assert torch.equal(direct, via_op) and torch.equal(buffer, op_buffer)


@on_triton_devices
def test_direct_sgd_step_bumps_versions_like_the_op(device):
    """A graph that saved the factors refuses to backpropagate after the step updated them in place."""
    factors = make_factors(2, (64,), torch.float32, device).requires_grad_(True)
    with torch.no_grad():
        values = factors.detach()
    loss = (factors * factors).sum()  # saves factors
    before = values._version
    dwf_kernels.dwf_sgd_step(values, torch.ones(64, device=device), None, None, lr=0.1, backend="triton")
    assert values._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@on_triton_devices
def test_fake_tensors_take_the_op(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert triton_backend.direct_call_ok(torch.ones(2, device=device))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.ones(2, 8, device=device))
        assert not triton_backend.direct_call_ok(fake)
        w = dwf_kernels.dwf_product(fake, backend="triton")  # the op's fake kernel answers
        assert w.shape == (8,)
