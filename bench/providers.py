"""What the kernel benchmarks time: each provider is one way a user could compute DWF.

  <backend>   dwf_product with that dwf_kernels backend (cpu, cuda, triton; reference)
  eager       the plain chain a user would write: w = F[0] * F[1] * ...; sumsq = (F * F).sum()
  compile     torch.compile of that same chain (Inductor fuses it as best it can)

Modes: forward (w and sumsq), backward (all factor gradients with the penalty term, from a given
grad_w and grad_sumsq), full (forward + backward + penalty, what one training step needs) and sgd
(backward + SGD-momentum update of the factors: a backend runs the fused dwf_sgd_step; eager and
compile differentiate their chain and step torch.optim.SGD, as a user of either would; in sgd mode
only, "<backend>-unfused" is that backend's fused backward followed by torch.optim.SGD's step, the
pair the fused step replaces; on CUDA with torch.optim.SGD(fused=True), its fastest form).

check_case runs a case once and compares what it computed with the reference backend's result on
the same inputs, so a benchmark never times a provider that computes something wrong.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import dwf_kernels

MODES = ("forward", "backward", "full", "sgd")


def versions() -> dict:
    """torch and triton versions, for labelling results."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"torch": torch.__version__, "triton": triton_version}


def traffic_bytes(mode: str, depth: int, n: int, element_size: int) -> int:
    """Bytes the fused algorithm must move (docs/design.md, Kernel contract): the roofline's numerator."""
    elements = {"forward": depth + 1, "backward": 2 * depth + 1, "full": 3 * depth + 2, "sgd": 4 * depth + 1}[mode]
    return elements * n * element_size


def eager_chain(factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = factors[0]
    for d in range(1, factors.shape[0]):
        w = w * factors[d]
    return w, (factors * factors).sum()


def forward_fn(provider: str) -> Callable:
    if provider == "eager":
        return eager_chain
    if provider == "compile":
        # Compiled afresh for each case (static shapes, its best code): dynamo's caches are per code
        # object and stop recompiling after a limit, after which it would silently run eagerly.
        torch._dynamo.reset()
        return torch.compile(eager_chain, dynamic=False)
    return lambda f: dwf_kernels.dwf_product(f, return_sumsq=True, backend=provider)


def make_case(
    provider: str, mode: str, factors: torch.Tensor, lam: float = 1e-3, lr: float = 1e-6
) -> Callable[[], object]:
    """A zero-argument callable doing one `mode` step of `provider` on `factors`.

    It returns what it computed: (w, sumsq) forward, the factor gradients backward and full; the sgd
    step returns nothing and updates its `.factors` in place. grad_w is drawn from torch's global
    generator (seed it to give two providers' cases the same grad_w).
    """
    depth = factors.shape[0]
    grad_w = torch.randn(factors.shape[1:], dtype=factors.dtype, device=factors.device)
    grad_sumsq = torch.tensor(lam / depth, dtype=torch.float32, device=factors.device)
    if mode == "sgd":
        forward = None if provider.endswith("-unfused") else forward_fn(provider)
        return _sgd_case(provider, forward, factors, grad_w, grad_sumsq, lr)
    forward = forward_fn(provider)
    if mode == "forward":
        f = factors.detach()
        return lambda: forward(f)
    if mode == "backward" and provider not in ("eager", "compile"):
        # Factors that do not require grad: with requires_grad (and grad mode on) dwf_product_backward
        # computes a differentiable result with torch ops instead of the fused kernel.
        f = factors.detach()
        return lambda: dwf_kernels.dwf_product_backward(f, grad_w, grad_sumsq, backend=provider)
    f = factors.detach().requires_grad_(True)
    if mode == "backward":
        w, sumsq = forward(f)  # one graph, differentiated again and again
        return lambda: torch.autograd.grad([w, sumsq], [f], [grad_w, grad_sumsq], retain_graph=True)

    def full():
        w, sumsq = forward(f)
        return torch.autograd.grad([w, sumsq], [f], [grad_w, grad_sumsq])

    return full


def _sgd_case(provider: str, forward: Callable, factors, grad_w, grad_sumsq, lr: float) -> Callable[[], object]:
    """The step callable; its `.factors` are the tensor it updates (for the tests).

    The timed default lr=1e-6 keeps the repeatedly updated factors in range."""
    momentum = 0.9
    f = factors.detach().clone()
    if provider.endswith("-unfused"):
        param = torch.nn.Parameter(f)
        optimizer = torch.optim.SGD([param], lr=lr, momentum=momentum, fused=True if f.is_cuda else None)
        backend = provider.removesuffix("-unfused")

        def step():
            param.grad = dwf_kernels.dwf_product_backward(param.detach(), grad_w, grad_sumsq, backend=backend)
            optimizer.step()

    elif provider not in ("eager", "compile"):
        state = {"buffer": None}

        def step():
            state["buffer"] = dwf_kernels.dwf_sgd_step(
                f, grad_w, grad_sumsq, state["buffer"], lr=lr, momentum=momentum, backend=provider
            )

    else:
        param = torch.nn.Parameter(f)
        optimizer = torch.optim.SGD([param], lr=lr, momentum=momentum)
        graph_input = factors.detach().clone().requires_grad_(True)  # the graph's saved tensors stay unmodified
        w, sumsq = forward(graph_input)

        def step():
            (param.grad,) = torch.autograd.grad([w, sumsq], [graph_input], [grad_w, grad_sumsq], retain_graph=True)
            optimizer.step()

    step.factors = f
    return step


def _flat(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for item in result for t in _flat(item)]


def check_case(provider: str, mode: str, factors: torch.Tensor) -> None:
    """Runs `provider`'s `mode` once on a copy of `factors` and asserts it matches the reference
    backend (fp32 within 1e-4 relative, bf16/fp16 within their rounding; the sgd step's update)."""
    results = []
    for name in (provider, "reference"):
        f = factors.detach().clone()
        torch.manual_seed(12345)  # the same grad_w for both
        case = make_case(name, mode, f, lr=0.1)  # a large step, so a wrong update shows
        out = case()
        if mode == "sgd":
            out = [case.factors.double() - factors.double()]  # the update itself, not the factors
        results.append([t.detach().double() for t in _flat(out)])
        del case, out
    narrow = factors.dtype in (torch.bfloat16, torch.float16)
    rtol, atol = (2e-2, 1e-2) if narrow else (1e-4, 1e-6)
    if narrow and provider in ("eager", "compile"):
        # The plain chain rounds every partial product to bf16/fp16 (the kernels and the reference
        # accumulate in fp32): up to about D roundings of 2^-8 (bf16) per factor gradient.
        rtol = max(rtol, factors.shape[0] * torch.finfo(factors.dtype).eps)
    if mode == "sgd":
        atol = 1.6e-2 if narrow else 1e-5  # the update is ~0.1 x gradient: two bf16 ulps of the factors
    got, expected = results
    assert len(got) == len(expected), f"{provider} {mode}: {len(got)} outputs, the reference gives {len(expected)}"
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol, msg=lambda m: f"{provider} {mode} vs reference: {m}")
