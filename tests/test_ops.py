"""dwf_product and its backward on every backend against the pure-PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from helpers import DEPTHS, DTYPES, KERNEL_BACKENDS, SUMSQ_RTOL, assert_close, make_factors

import dwf_kernels
from dwf_kernels import dwf_product, dwf_product_backward

SHAPES = [(), (1,), (13, 17), (0,), (2, 0, 3), (40009,)]


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(device, backend, dtype, depth, shape):
    factors = make_factors(depth, shape, dtype, device)
    w, sumsq = dwf_product(factors, return_sumsq=True, backend=backend)
    w_ref, sumsq_ref = dwf_product(factors, return_sumsq=True, backend="reference")
    assert w.shape == shape and w.device == factors.device
    assert_close(w, w_ref, dtype, "w")
    expected_sumsq_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert sumsq.dtype == sumsq_ref.dtype == expected_sumsq_dtype and sumsq.shape == ()
    torch.testing.assert_close(sumsq.cpu(), sumsq_ref.cpu(), rtol=SUMSQ_RTOL[dtype], atol=0)
    assert torch.equal(dwf_product(factors, backend=backend), w)  # return_sumsq=False: same w


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("penalty", [False, True], ids=["plain", "penalty"])
def test_backward_matches_reference(device, backend, dtype, depth, shape, penalty):
    factors = make_factors(depth, shape, dtype, device, seed=1)
    grad_w = make_factors(1, shape, dtype, device, seed=2)[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad_sumsq = torch.tensor(0.37, dtype=acc, device=device) if penalty else None
    grad = dwf_product_backward(factors, grad_w, grad_sumsq, backend=backend)
    grad_ref = dwf_product_backward(factors, grad_w, grad_sumsq, backend="reference")
    assert grad.shape == factors.shape and grad.dtype == dtype and grad.is_contiguous()
    assert_close(grad, grad_ref, dtype, "grad_factors")


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("depth", [2, 4, 9])
def test_autograd_matches_reference(device, backend, depth):
    """Through autograd: loss uses w and the penalty; gradients flow into the factors."""
    lam = 0.03
    grads = []
    for name in (backend, "reference"):
        factors = make_factors(depth, (37, 5), torch.float32, device).requires_grad_(True)
        w, sumsq = dwf_product(factors, return_sumsq=True, backend=name)
        loss = (w * torch.linspace(-1, 1, w.numel(), device=device).view_as(w)).sum() + lam / depth * sumsq
        loss.backward()
        grads.append(factors.grad)
    assert_close(grads[0], grads[1], torch.float32, "factors.grad")


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("depth", [2, 4, 11])
def test_mixed_precision_out_dtype(device, backend, out_dtype, depth):
    """fp32 factors write a narrow w directly; the backward takes a narrow grad_w."""
    factors = make_factors(depth, (1031,), torch.float32, device, seed=3)
    w = dwf_product(factors, out_dtype=out_dtype, backend=backend)
    w_ref = dwf_product(factors, out_dtype=out_dtype, backend="reference")
    assert w.dtype == out_dtype
    assert_close(w, w_ref, out_dtype, "w")
    grad_w = make_factors(1, (1031,), out_dtype, device, seed=4)[0]
    s = torch.tensor(0.5, device=device)
    grad = dwf_product_backward(factors, grad_w, s, backend=backend)
    grad_ref = dwf_product_backward(factors, grad_w, s, backend="reference")
    assert grad.dtype == torch.float32
    assert_close(grad, grad_ref, torch.float32, "grad_factors")


def _special_factors(depth: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Every combination a factor column can hold: exact zeros (both signs), +-Inf, NaN, normals."""
    factors = make_factors(depth, (97,), torch.float64, "cpu", seed=5)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")], dtype=torch.float64)
    gen = torch.Generator().manual_seed(6)
    mask = torch.rand(factors.shape, generator=gen) < 0.3
    picks = specials[torch.randint(0, len(specials), factors.shape, generator=gen)]
    return torch.where(mask, picks, factors).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 8, 13])
def test_zeros_inf_nan_like_reference(device, backend, dtype, depth):
    factors = _special_factors(depth, dtype, device)
    w, sumsq = dwf_product(factors, return_sumsq=True, backend=backend)
    w_ref, sumsq_ref = dwf_product(factors, return_sumsq=True, backend="reference")
    assert_close(w, w_ref, dtype, "w")
    assert torch.equal(torch.signbit(w[w == 0]), torch.signbit(w_ref[w_ref == 0])), "signs of zero products"
    assert torch.isnan(sumsq).item() == torch.isnan(sumsq_ref).item()
    grad_w = make_factors(1, (97,), dtype, device, seed=7)[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for grad_sumsq in (None, torch.tensor(0.25, dtype=acc, device=device)):
        grad = dwf_product_backward(factors, grad_w, grad_sumsq, backend=backend)
        grad_ref = dwf_product_backward(factors, grad_w, grad_sumsq, backend="reference")
        assert_close(grad, grad_ref, dtype, f"grad_factors (grad_sumsq={grad_sumsq})")


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_unrequested_sumsq_adds_no_penalty_term(device, backend):
    """With return_sumsq=False the backward has no 2*s*F term at all: Inf factors give no 0*Inf NaN."""
    factors = torch.tensor([[float("inf"), 2.0], [3.0, 0.5]], device=device, requires_grad=True)
    dwf_product(factors, backend=backend).sum().backward()
    expected = torch.tensor([[3.0, 0.5], [float("inf"), 2.0]])
    torch.testing.assert_close(factors.grad.cpu(), expected)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_non_contiguous_inputs(device, backend):
    base = make_factors(6, (40, 30), torch.float32, device, seed=8)
    factors = base[::2, :, ::3].transpose(1, 2)  # (3, 10, 40), strided and transposed
    assert not factors.is_contiguous()
    w, sumsq = dwf_product(factors, return_sumsq=True, backend=backend)
    w_ref, sumsq_ref = dwf_product(factors, return_sumsq=True, backend="reference")
    assert_close(w, w_ref, torch.float32, "w")
    torch.testing.assert_close(sumsq, sumsq_ref, rtol=1e-5, atol=0)
    grad_w = make_factors(1, (40, 10), torch.float32, device, seed=9)[0].t()  # non-contiguous too
    grad = dwf_product_backward(factors, grad_w, torch.tensor(1.5, device=device), backend=backend)
    grad_ref = dwf_product_backward(factors, grad_w, torch.tensor(1.5, device=device), backend="reference")
    assert_close(grad, grad_ref, torch.float32, "grad_factors")


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sumsq_is_bitwise_deterministic(device, backend, dtype):
    factors = make_factors(4, (300_007,), dtype, device, seed=10)
    results = [dwf_product(factors, return_sumsq=True, backend=backend)[1] for _ in range(5)]
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_cpu_sumsq_independent_of_thread_count():
    if "cpu" not in dwf_kernels.available_backends("cpu"):
        pytest.skip("C++ extension not loaded")
    factors = make_factors(4, (1_000_003,), torch.float32, "cpu", seed=11)
    threads = torch.get_num_threads()
    try:
        sums = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            sums.append(dwf_product(factors, return_sumsq=True, backend="cpu")[1])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(s, sums[0]) for s in sums[1:])


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("depth", [2, 3, 4])
def test_penalty_gradient_is_l2_on_factors(device, backend, depth):
    """Autograd of (lam/D) * sumsq equals autograd of (lam/D) * sum_d ||F_d||^2 written by hand."""
    lam = 0.1
    factors = make_factors(depth, (211,), torch.float32, device, seed=12).requires_grad_(True)
    _, sumsq = dwf_product(factors, return_sumsq=True, backend=backend)
    (lam / depth * sumsq).backward()
    by_hand = factors.detach().clone().requires_grad_(True)
    (lam / depth * sum((by_hand[d] ** 2).sum() for d in range(depth))).backward()
    torch.testing.assert_close(factors.grad, by_hand.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS + [pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("depth", [1, 3, 5])
def test_gradcheck_fp64(device, backend, depth):
    factors = make_factors(depth, (4, 3), torch.float64, device, seed=13).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: dwf_product(f, backend=backend), (factors,))
    assert torch.autograd.gradcheck(lambda f: dwf_product(f, return_sumsq=True, backend=backend), (factors,))


def test_use_backend_selects_and_restores():
    factors = make_factors(3, (10,), torch.float32, "cpu")
    assert dwf_kernels.current_backend() is None
    with dwf_kernels.use_backend("reference"):
        assert dwf_kernels.current_backend() == "reference"
        with dwf_kernels.use_backend(None):
            assert dwf_kernels.current_backend() is None
        torch.testing.assert_close(dwf_product(factors), factors.prod(0))
    assert dwf_kernels.current_backend() is None
    with pytest.raises(ValueError, match="backend must be one of"):
        with dwf_kernels.use_backend("fast"):
            pass


def test_available_backends_lists_fastest_first():
    names = dwf_kernels.available_backends("cpu")
    assert "reference" in names
    if "cpu" in names:
        assert names[0] == "cpu"
    assert dwf_kernels.available_backends("meta") == ["reference"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("depth", range(1, 17))  # every depth: each instantiation (or padded-slot case)
def test_cpu_kernels_round_exactly_like_the_reference(dtype, depth):
    """Same products in the same order, no FMA contraction: w and both gradients are bitwise equal."""
    if "cpu" not in dwf_kernels.available_backends("cpu"):
        pytest.skip("C++ extension not loaded")
    factors = make_factors(depth, (40009,), dtype, "cpu", seed=14)
    grad_w = make_factors(1, (40009,), dtype, "cpu", seed=15)[0]
    assert torch.equal(dwf_product(factors, backend="cpu"), dwf_product(factors, backend="reference"))
    for grad_sumsq in (None, torch.tensor(0.37, dtype=dtype)):
        assert torch.equal(
            dwf_product_backward(factors, grad_w, grad_sumsq, backend="cpu"),
            dwf_product_backward(factors, grad_w, grad_sumsq, backend="reference"),
        )


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def test_cpu_row_offsets_past_two_to_the_31():
    """D * n > 2^31 > n: factor row 15 starts at 15n ~ 2.26e9, so row offsets need 64 bits although n
    fits in 32. The factors are a fresh allocation left unwritten except at both ends of each row:
    4.8 GB of address space whose untouched pages read as the shared zero page; only w (300 MB) and
    those ends take memory."""
    if "cpu" not in dwf_kernels.available_backends("cpu"):
        pytest.skip("C++ extension not loaded")
    depth, n = 16, 2**27 + 2**24
    assert (depth - 1) * n > 2**31 > n
    if _available_memory() < 2 * 2**30:
        pytest.skip("needs ~2 GiB of available memory")
    factors = torch.empty(depth, n, dtype=torch.bfloat16)
    ends = {start: make_factors(depth, (16,), torch.bfloat16, "cpu", seed=start) for start in (0, n - 16)}
    for start, values in ends.items():
        factors[:, start : start + 16] = values
    w = dwf_product(factors, backend="cpu")
    for start, values in ends.items():
        assert torch.equal(w[start : start + 16], dwf_product(values, backend="reference")), f"w[{start}:]"


SERVES_CPU = [
    pytest.param(name, id=name)
    for name in dwf_kernels.available_backends("cpu")  # cpu, reference, triton (interpreted)
]


def _plain_product(factors: torch.Tensor) -> torch.Tensor:
    w = factors[0]
    for d in range(1, factors.shape[0]):
        w = w * factors[d]
    return w


@pytest.mark.parametrize("backend", SERVES_CPU)
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("with_sumsq", [False, True], ids=["w", "w+sumsq"])
def test_gradgradcheck_fp64(backend, depth, with_sumsq):
    """The backward is itself differentiable: second derivatives with respect to the factors and
    to the incoming gradients (w's and sumsq's) match finite differences."""
    factors = make_factors(depth, (3, 2), torch.float64, "cpu", seed=21).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda f: dwf_product(f, return_sumsq=with_sumsq, backend=backend), (factors,))


@pytest.mark.parametrize("backend", SERVES_CPU)
def test_double_backward_one_liner(backend):
    f = make_factors(3, (4,), torch.float64, "cpu", seed=22).requires_grad_(True)
    (g,) = torch.autograd.grad(dwf_product(f, backend=backend).sum(), f, create_graph=True)
    g.sum().backward()
    # d/df_j sum_d prod_{k != d} f_k = sum_{d != j} prod_{k != d, j} f_k
    f0, f1, f2 = f.detach()
    expected = torch.stack([f2 + f1, f2 + f0, f1 + f0])
    assert f.grad is not None
    torch.testing.assert_close(f.grad, expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("backend", SERVES_CPU)
@pytest.mark.parametrize("depth", [2, 3])
def test_maml_meta_gradient_matches_the_plain_chain(backend, depth):
    """One inner SGD step differentiated through (create_graph=True), penalty included: the
    meta-gradient equals the plain PyTorch chain's, second-order terms and all."""
    gen = torch.Generator().manual_seed(25)
    x, y, xv, yv = (torch.randn(8, n, generator=gen, dtype=torch.float64) for n in (5, 3, 5, 3))
    lam, inner_lr = 0.1, 0.3

    def product(f, fused):
        if fused:
            return dwf_product(f, return_sumsq=True, backend=backend)
        return _plain_product(f), (f * f).sum()

    def meta_gradient(fused, first_order=False):
        f = make_factors(depth, (3, 5), torch.float64, "cpu", seed=23).requires_grad_(True)
        w, sumsq = product(f, fused)
        inner = (x @ w.T - y).square().mean() + lam / depth * sumsq
        (g,) = torch.autograd.grad(inner, f, create_graph=not first_order)
        adapted = f - inner_lr * g
        outer = (xv @ product(adapted, fused)[0].T - yv).square().mean()
        return torch.autograd.grad(outer, f)[0]

    expected = meta_gradient(fused=False)
    torch.testing.assert_close(meta_gradient(fused=True), expected, rtol=1e-12, atol=1e-14)
    # Without the second-order terms the meta-gradient is far off: the comparison sees them.
    assert (meta_gradient(fused=False, first_order=True) - expected).norm() > 0.1 * expected.norm()


@pytest.mark.parametrize("backend", SERVES_CPU)
def test_dwf_product_backward_is_differentiable(backend):
    factors = make_factors(3, (2, 3), torch.float64, "cpu", seed=24).requires_grad_(True)
    grad_w = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    grad_sumsq = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda f, gw, gs: dwf_product_backward(f, gw, gs, backend=backend), (factors, grad_w, grad_sumsq)
    )


def test_first_order_backward_keeps_the_fused_op():
    """Only create_graph=True takes the differentiable formula; a plain backward runs the fused op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if "cpu" not in dwf_kernels.available_backends("cpu"):
        pytest.skip("C++ extension not loaded")

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    for create_graph in (False, True):
        f = make_factors(3, (6,), torch.float32, "cpu").requires_grad_(True)
        w, sumsq = dwf_product(f, return_sumsq=True, backend="cpu")
        with Calls() as calls:
            torch.autograd.grad((w.sum() + sumsq), f, create_graph=create_graph)
        fused = any("dwf_kernels.dwf_backward" in n for n in calls.names)
        assert fused == (not create_graph), calls.names
