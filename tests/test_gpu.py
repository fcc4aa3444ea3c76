"""CUDA-only checks: tensors past 2^31 elements, CUDA graphs (torch.compile, a captured SGD step), streams.

Skipped without a GPU (the CPU and interpreter suites cover the same semantics); run by
bench/gpu_check.sh on a GPU machine.
"""

from __future__ import annotations

import fcntl
import os
import tempfile

import pytest
import torch
from helpers import KERNEL_BACKENDS, make_factors

from dwf_kernels import dwf_product, dwf_product_backward, dwf_sgd_step

CUDA_BACKENDS = [p for p in KERNEL_BACKENDS if p.values[0] == "cuda"]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def whole_gpu():
    """Tests that need tens of GiB take turns, also across the parallel pytest processes of
    bench/gpu_check.sh (an exclusive lock on a file), and give their memory back afterwards."""
    with open(os.path.join(tempfile.gettempdir(), "dwf-kernels-gpu-memory.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            torch.cuda.empty_cache()
            yield
        finally:
            torch.cuda.empty_cache()
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_past_two_to_the_31_elements(device, backend, whole_gpu):
    """64-bit indexing: every element of a weight with more than 2^31 entries is right."""
    n = 2**31 + 4099
    need = 8 * n * 2  # bf16: factors (2n), w, expected w, grad_w (n each), grad (2n), headroom
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB free GPU memory, {free / 2**30:.0f} GiB free")
    pattern = torch.arange(7, device=device, dtype=torch.float32)  # f1[i] = i mod 7, exact in bf16
    tile = lambda t: t.to(torch.bfloat16).repeat(n // 7 + 1)[:n]  # noqa: E731
    factors = torch.empty(2, n, dtype=torch.bfloat16, device=device)
    factors[0].fill_(1.5)
    factors[1].copy_(tile(pattern))
    w, sumsq = dwf_product(factors, return_sumsq=True, backend=backend)
    assert torch.equal(w, tile(1.5 * pattern))
    counts = [n // 7 + (1 if k < n % 7 else 0) for k in range(7)]
    exact = n * 2.25 + sum(c * k * k for k, c in enumerate(counts))
    assert abs(sumsq.item() / exact - 1) < 1e-5
    del w
    grad = dwf_product_backward(factors, torch.ones(n, dtype=torch.bfloat16, device=device), backend=backend)
    assert torch.equal(grad[0], factors[1]) and torch.equal(grad[1], factors[0])


def _check_three_factors(n: int, backend: str) -> None:
    """D = 3 bf16 factors of n elements, with exactly representable results: f0 = 1.5, f1[i] = i mod 7,
    f2 = 2. Forward, backward and an SGD step are compared element for element (the vector path
    whenever n allows it, the tail, and every factor row, whose offsets d * n pass 2^31)."""
    device = "cuda"
    need = 2 * n * (3 + 1 + 1 + 3 + 2)  # factors, pattern, ones, gradients, two temporaries (bf16)
    free, _ = torch.cuda.mem_get_info()
    if free < need * 1.1:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB free GPU memory, {free / 2**30:.0f} GiB free")
    pattern = (torch.arange(n, device=device) % 7).to(torch.bfloat16)
    factors = torch.empty(3, n, dtype=torch.bfloat16, device=device)
    factors[0].fill_(1.5)
    factors[1].copy_(pattern)
    factors[2].fill_(2.0)
    w = dwf_product(factors, backend=backend)
    assert torch.equal(w, pattern * 3)
    del w
    ones = torch.ones(n, dtype=torch.bfloat16, device=device)
    grad = dwf_product_backward(factors, ones, backend=backend)
    assert torch.equal(grad[0], pattern * 2) and torch.equal(grad[2], pattern * 1.5)
    assert bool((grad[1] == 3).all())
    del grad
    dwf_sgd_step(factors, ones, None, None, lr=0.25, backend=backend)
    assert torch.equal(factors[0], 1.5 - 0.5 * pattern)
    assert torch.equal(factors[1], pattern - 0.75)
    assert torch.equal(factors[2], 2.0 - 0.375 * pattern)


@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_depth_times_n_past_two_to_the_31(device, backend, whole_gpu):
    """n < 2^31 but D * n > 2^31: offsets of factor rows 2 and 3 must be 64-bit (n passes as i32)."""
    _check_three_factors(2**30 + 16, backend)


@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_vector_path_past_two_to_the_31(device, backend, whole_gpu):
    """n > 2^31 and a multiple of every vector width: the 16-byte paths past 2^31."""
    _check_three_factors(2**31 + 4096, backend)


@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_cuda_graphs_through_reduce_overhead(device, backend):
    factors = make_factors(4, (257, 33), torch.float32, device).requires_grad_(True)
    x = torch.randn(8, 257, device=device)

    def step(f):
        w, sumsq = dwf_product(f, return_sumsq=True, backend=backend)
        return (x @ w).square().mean() + 1e-3 * sumsq

    torch._dynamo.reset()
    graphed = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    expected = torch.autograd.grad(step(factors), factors)[0]
    for _ in range(3):  # warm-up, record, replay
        got = torch.autograd.grad(graphed(factors), factors)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_runs_on_the_current_stream(device, backend):
    factors = make_factors(3, (1 << 20,), torch.float32, device)
    expected = dwf_product(factors, backend="reference")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        w = dwf_product(factors, backend=backend)
    stream.synchronize()
    torch.testing.assert_close(w, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_sgd_step_replays_in_a_cuda_graph(device, backend):
    """The fused step reads the penalty scale on the device (no host sync), so it can be captured."""
    factors = make_factors(4, (4099,), torch.float32, device)
    start_buffer = make_factors(4, (4099,), torch.float32, device, seed=1)
    grad_w = make_factors(1, (4099,), torch.float32, device, seed=2)[0]
    s = torch.tensor(0.01, device=device)
    options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}
    expected, expected_buffer = factors.clone(), start_buffer.clone()
    for _ in range(3):
        dwf_sgd_step(expected, grad_w, s, expected_buffer, backend=backend, **options)

    f, buffer = factors.clone(), start_buffer.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles) outside the capture
        dwf_sgd_step(f, grad_w, s, buffer, backend=backend, **options)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dwf_sgd_step(f, grad_w, s, buffer, backend=backend, **options)
    f.copy_(factors)
    buffer.copy_(start_buffer)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(f, expected) and torch.equal(buffer, expected_buffer)


@pytest.mark.parametrize("multi_tensor", [True, False], ids=["multi", "per-layer"])
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_whole_training_step_with_fused_sgd_replays_in_a_cuda_graph(device, backend, multi_tensor):
    """Forward, backward and FusedSGD.step() of a DWF model captured as one CUDA graph (the pattern of
    torch's whole-network capture): each replay is one training step, equal to the eager steps."""
    from torch import nn

    import dwf_kernels
    from dwf_kernels.optim import FusedSGD

    torch.manual_seed(0)
    model = dwf_kernels.factorize(nn.Sequential(nn.Linear(33, 64), nn.ReLU(), nn.Linear(64, 10)), 4).to(device)
    twin = dwf_kernels.factorize(nn.Sequential(nn.Linear(33, 64), nn.ReLU(), nn.Linear(64, 10)), 4).to(device)
    twin.load_state_dict(model.state_dict())
    options = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "backend": backend, "multi_tensor": multi_tensor}
    opt, twin_opt = FusedSGD(model.parameters(), **options), FusedSGD(twin.parameters(), **options)
    x, y = torch.randn(16, 33, device=device), torch.randint(0, 10, (16,), device=device)

    def step(m, o):
        o.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(m(x), y) + dwf_kernels.penalty(m, 1e-3)
        loss.backward()
        o.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: kernels compiled, momentum buffers made
        for _ in range(3):
            step(model, opt)
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = nn.functional.cross_entropy(model(x), y) + dwf_kernels.penalty(model, 1e-3)
        loss.backward()
        opt.step()
    # The capture ran nothing; the replays are steps 4 to 6.
    for _ in range(3):
        graph.replay()
    for _ in range(6):
        step(twin, twin_opt)
    torch.cuda.synchronize()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
