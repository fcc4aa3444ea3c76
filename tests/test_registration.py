"""The custom ops meet PyTorch: opcheck on every op, torch.compile(fullgraph=True) equals eager."""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_BACKENDS, OP_FAMILIES, make_factors

from dwf_kernels import backends, dwf_product


def _sample_inputs(device):
    """(factors, out_dtype, with_sumsq) samples covering dtypes, mixed precision and depths."""
    yield make_factors(3, (5, 7), torch.float32, device), None, True
    yield make_factors(1, (9,), torch.float64, device), None, False
    yield make_factors(4, (33,), torch.float32, device), torch.bfloat16, True
    yield make_factors(9, (2, 3), torch.float16, device), None, True


@pytest.mark.parametrize("ops,devices", OP_FAMILIES)
def test_opcheck_forward_and_backward(ops, devices):
    for device in devices:
        for factors, out_dtype, with_sumsq in _sample_inputs(device):
            for requires_grad in (False, True):
                f = factors.clone().requires_grad_(requires_grad)
                torch.library.opcheck(ops.forward.default, (f, out_dtype, with_sumsq))
            grad_w = make_factors(1, factors.shape[1:], out_dtype or factors.dtype, device, seed=3)[0]
            acc = torch.float64 if factors.dtype == torch.float64 else torch.float32
            for grad_sumsq in (None, torch.tensor(0.5, dtype=acc, device=device)):
                torch.library.opcheck(ops.backward.default, (factors, grad_w, grad_sumsq))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph_matches_eager(device, backend):
    lam, depth = 0.05, 3

    def loss_fn(factors, x):
        w, sumsq = dwf_product(factors, return_sumsq=True, backend=backend)
        return (x @ w).square().mean() + lam / depth * sumsq

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    x = make_factors(1, (8, 6), torch.float32, device, seed=4)[0]
    results = []
    for fn in (loss_fn, compiled):
        factors = make_factors(depth, (6, 5), torch.float32, device, seed=5).requires_grad_(True)
        loss = fn(factors, x)
        loss.backward()
        results.append((loss.detach(), factors.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_compiled_graph_holds_one_fused_op(device, backend):
    """Dynamo captures dwf_product as a single custom-op node (no graph break, no decomposition)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda f: dwf_product(f, return_sumsq=True, backend=backend), backend=capture, fullgraph=True)
    fn(make_factors(4, (10,), torch.float32, device))
    (graph,) = graphs
    op = backends.REGISTRY[backend].ops.forward
    calls = [n for n in graph.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls if "dwf" in str(n.target)] == [op.default] or [
        n.target for n in calls if "dwf" in str(n.target)
    ] == [op], [n.target for n in calls]
