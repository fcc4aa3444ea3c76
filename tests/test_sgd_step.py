"""dwf_sgd_step, the fused backward + SGD update, on every backend against torch.optim.SGD's math.

The reference backend is torch's own SGD (torch.optim.sgd.sgd) applied to the reference factor
gradients, so "matches the reference" means "is the step torch.optim.SGD takes".
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEPTHS, DTYPES, KERNEL_BACKENDS, OP_FAMILIES, TORCH_CPU_FMA, assert_close, make_factors

from dwf_kernels import _extension, backends, dwf_product_backward, dwf_sgd_step

ALL_BACKENDS = KERNEL_BACKENDS + [pytest.param("cpu", "reference", id="cpu-reference")]

OPTIONS = [
    pytest.param({"lr": 0.1}, id="plain"),
    pytest.param({"lr": 0.05, "momentum": 0.9}, id="momentum"),
    pytest.param({"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}, id="nesterov-wd"),
    pytest.param({"lr": 0.2, "momentum": 0.5, "dampening": 0.3, "maximize": True}, id="dampening-maximize"),
]

# Where torch's CPU kernels fuse (TORCH_CPU_FMA), the CPU kernels round every operation exactly as
# they do, so their results are bitwise torch.optim.SGD's (bf16/fp16: its fp32 step rounded once,
# which is what the reference defines). Triton's interpreter evaluates tl.fma as a*b+c with two
# roundings, so the interpreted Triton step differs by rounding only.
CPU_FMA = TORCH_CPU_FMA


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expected_step(factors, buffer, grad_w, grad_sumsq, options):
    """torch.optim.SGD's step in the arithmetic dtype (fp32 for bf16/fp16 factors), rounded once."""
    acc = _acc(factors.dtype)
    f = factors.to(acc).clone()
    b = None if buffer is None else buffer.to(acc).clone()
    w_dtype = grad_w.dtype if factors.dtype == torch.float32 else acc
    b = dwf_sgd_step(f, grad_w.to(w_dtype), grad_sumsq, b, backend="reference", **options)
    return f.to(factors.dtype), None if b is None else b.to(factors.dtype)


def _check_step(device, backend, factors, buffer, grad_w, grad_sumsq, options, exact):
    expected_f, expected_b = _expected_step(factors, buffer, grad_w, grad_sumsq, options)
    f = factors.clone()
    b = None if buffer is None else buffer.clone()
    returned = dwf_sgd_step(f, grad_w, grad_sumsq, b, backend=backend, **options)
    momentum = options.get("momentum", 0.0)
    if momentum == 0:
        assert returned is None
    else:
        assert returned.shape == factors.shape and returned.dtype == factors.dtype and returned.device == f.device
        if b is not None:
            assert returned is b  # updated in place
    if exact:
        assert torch.equal(f, expected_f), "factors differ from torch.optim.SGD's step"
        if momentum:
            assert torch.equal(returned, expected_b), "momentum buffer differs from torch.optim.SGD's"
    else:
        assert_close(f, expected_f, factors.dtype, "factors")
        if momentum:
            assert_close(returned, expected_b, factors.dtype, "momentum_buffer")
    return f, returned


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("options", OPTIONS)
def test_sgd_step_matches_torch_sgd(device, backend, dtype, depth, options):
    """The first step (buffer created) and a later one (buffer read), with and without the penalty."""
    shape = (1031,)
    factors = make_factors(depth, shape, dtype, device, seed=21)
    exact = (backend == "cpu" and CPU_FMA) or backend == "reference"
    for step, grad_sumsq in enumerate((None, torch.tensor(0.37, dtype=_acc(dtype), device=device))):
        grad_w = make_factors(1, shape, dtype, device, seed=22 + step)[0]
        first = options.get("momentum") and step == 0
        buffer = None if first else make_factors(depth, shape, dtype, device, seed=30 + step) * 0.1
        _check_step(device, backend, factors, buffer, grad_w, grad_sumsq, options, exact)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sgd_step_reads_a_narrow_grad_w(device, backend, out_dtype):
    """fp32 factors under autocast: grad_w arrives in bf16/fp16 and is read directly."""
    factors = make_factors(4, (13, 17), torch.float32, device, seed=23)
    grad_w = make_factors(1, (13, 17), out_dtype, device, seed=24)[0]
    buffer = make_factors(4, (13, 17), torch.float32, device, seed=25)
    options = {"lr": 0.1, "momentum": 0.9}
    exact = backend == "cpu" and CPU_FMA
    _check_step(device, backend, factors, buffer, grad_w, torch.tensor(0.2, device=device), options, exact)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(), (1,), (13, 17), (0,), (2, 0, 3)], ids=str)
def test_sgd_step_shapes(device, backend, shape):
    factors = make_factors(3, shape, torch.float32, device, seed=26)
    grad_w = make_factors(1, shape, torch.float32, device, seed=27)[0]
    options = {"lr": 0.1, "momentum": 0.9}
    f, buffer = _check_step(device, backend, factors, None, grad_w, None, options, exact=False)
    _check_step(device, backend, f, buffer, grad_w, None, options, exact=False)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("depth", [1, 2, 4, 13])
def test_sgd_step_zeros_inf_nan_like_torch(device, backend, dtype, depth):
    """Zeros of both signs, +-Inf and NaN in the factors propagate as in torch.optim.SGD."""
    base = make_factors(depth, (97,), torch.float64, "cpu", seed=5)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")], dtype=torch.float64)
    gen = torch.Generator().manual_seed(6)
    mask = torch.rand(base.shape, generator=gen) < 0.3
    picks = specials[torch.randint(0, len(specials), base.shape, generator=gen)]
    factors = torch.where(mask, picks, base).to(dtype=dtype, device=device)
    grad_w = make_factors(1, (97,), dtype, device, seed=7)[0]
    buffer = make_factors(depth, (97,), dtype, device, seed=8)
    for grad_sumsq in (None, torch.tensor(0.25, device=device)):
        _check_step(device, backend, factors, buffer, grad_w, grad_sumsq, {"lr": 0.1, "momentum": 0.9}, False)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_sgd_step_equals_backward_then_sgd_step(device, backend):
    """The fused step is exactly the backward op of the same backend followed by torch's SGD."""
    factors = make_factors(4, (4099,), torch.float32, device, seed=28)
    grad_w = make_factors(1, (4099,), torch.float32, device, seed=29)[0]
    s = torch.tensor(0.01, device=device)
    p = factors.clone().requires_grad_(True)
    torch_sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9, foreach=False)
    fused, buffer = factors.clone(), None
    for _ in range(3):
        p.grad = dwf_product_backward(p.detach(), grad_w, s, backend=backend)
        torch_sgd.step()
        buffer = dwf_sgd_step(fused, grad_w, s, buffer, lr=0.1, momentum=0.9, backend=backend)
    if backend == "cpu" and CPU_FMA:
        assert torch.equal(fused, p.detach()) and torch.equal(buffer, torch_sgd.state[p]["momentum_buffer"])
    else:
        assert_close(fused, p.detach(), torch.float32, "factors")


def test_sgd_step_front_door_checks_arguments():
    factors = torch.ones(2, 3, 4)
    grad_w = torch.ones(3, 4)
    with pytest.raises(ValueError, match="factors must be contiguous"):
        dwf_sgd_step(factors.transpose(1, 2), grad_w.t(), lr=0.1)
    with pytest.raises(TypeError, match="lr must be a Python float; got Tensor"):
        dwf_sgd_step(factors, grad_w, lr=torch.tensor(0.1))
    with pytest.raises(ValueError, match="momentum must be >= 0; got -0.5"):
        dwf_sgd_step(factors, grad_w, lr=0.1, momentum=-0.5)
    with pytest.raises(ValueError, match="nesterov momentum requires momentum > 0 and zero dampening"):
        dwf_sgd_step(factors, grad_w, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"momentum_buffer must be a contiguous tensor with the factors' shape"):
        dwf_sgd_step(factors, grad_w, None, torch.zeros(2, 3, 4, dtype=torch.float64), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"grad_w must have the weight shape"):
        dwf_sgd_step(factors, torch.ones(4, 3), lr=0.1)
    assert torch.equal(factors, torch.ones(2, 3, 4)), "a refused step must not touch the factors"


@pytest.mark.skipif(not _extension.LOADED, reason="C++ extension not loaded")
def test_extension_sgd_step_checks_arguments_too():
    sgd_step_op = backends.REGISTRY["cpu"].ops.sgd_step
    factors = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="momentum_buffer is required when momentum != 0"):
        sgd_step_op(factors, None, torch.ones(3), None, 0.1, 0.9, 0.0, 0.0, False, False, True)
    with pytest.raises(RuntimeError, match="factors must be contiguous"):
        sgd_step_op(
            torch.ones(2, 3, 4).transpose(1, 2), None, torch.ones(4, 3), None, 0.1, 0.0, 0.0, 0.0, False, False, False
        )


@pytest.mark.parametrize("ops,devices", OP_FAMILIES)
def test_opcheck_sgd_step(ops, devices):
    for device in devices:
        for dtype, grad_dtype, momentum, init in (
            (torch.float32, torch.float32, 0.9, True),
            (torch.float32, torch.bfloat16, 0.9, False),
            (torch.float64, torch.float64, 0.0, False),
            (torch.float16, torch.float16, 0.5, False),
        ):
            factors = make_factors(3, (5, 7), dtype, device)
            buffer = make_factors(3, (5, 7), dtype, device, seed=1) if momentum else None
            grad_w = make_factors(1, (5, 7), grad_dtype, device, seed=2)[0]
            for grad_sumsq in (None, torch.tensor(0.5, device=device, dtype=_acc(dtype))):
                args = (factors, buffer, grad_w, grad_sumsq, 0.1, momentum, 0.0, 1e-4, False, False, init)
                torch.library.opcheck(ops.sgd_step.default, args)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_sgd_step_under_torch_compile_fullgraph(device, backend):
    """A compiled optimizer step that calls the op: one graph, the same in-place update as eager."""
    factors = make_factors(3, (257,), torch.float32, device, seed=31)
    grad_w = make_factors(1, (257,), torch.float32, device, seed=32)[0]
    s = torch.tensor(0.01, device=device)
    start_buffer = make_factors(3, (257,), torch.float32, device, seed=33)

    def step(f, b):
        dwf_sgd_step(f, grad_w, s, b, lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    expected, expected_buffer = factors.clone(), start_buffer.clone()
    f, buffer = factors.clone(), start_buffer.clone()
    for _ in range(2):
        step(expected, expected_buffer)
        compiled(f, buffer)
    torch._dynamo.reset()
    assert_close(f, expected, torch.float32, "factors")
    assert_close(buffer, expected_buffer, torch.float32, "momentum_buffer")


@pytest.mark.skipif("cpu" not in _extension.KERNEL_DEVICES, reason="CPU kernels not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_sgd_step_reads_every_form_of_grad_sumsq(dtype):
    """dL/dsumsq as the CPU op reads it in place (a one-element tensor of the arithmetic dtype, at a
    storage offset too) and as it converts it (another dtype, a negative view): the step of its
    value, bit for bit (0.375 is exact in every dtype)."""
    factors = make_factors(4, (1031,), dtype, "cpu", seed=31)
    grad_w = make_factors(1, (1031,), dtype, "cpu", seed=32)[0]
    buffer = make_factors(4, (1031,), dtype, "cpu", seed=33)
    options = {"lr": 0.1, "momentum": 0.9}
    acc = _acc(dtype)
    value = torch.tensor(0.375, dtype=acc)
    expected = factors.clone()
    dwf_sgd_step(expected, grad_w, value, buffer.clone(), backend="cpu", **options)
    unchanged = factors.clone()
    dwf_sgd_step(unchanged, grad_w, torch.tensor(0.0, dtype=acc), buffer.clone(), backend="cpu", **options)
    assert not torch.equal(expected, unchanged)  # the value matters
    forms = {
        "0-d": value.clone(),
        "(1,) at an offset": torch.tensor([5.0, 0.375, 7.0], dtype=acc)[1:2],
        "other dtype": value.to(torch.float64 if acc == torch.float32 else torch.float32),
        "negative view": torch._neg_view(-value),
    }
    for name, grad_sumsq in forms.items():
        assert grad_sumsq.item() == 0.375, name
        f = factors.clone()
        dwf_sgd_step(f, grad_w, grad_sumsq, buffer.clone(), backend="cpu", **options)
        assert torch.equal(f, expected), name


@pytest.mark.skipif("cpu" not in _extension.KERNEL_DEVICES, reason="CPU kernels not built")
def test_in_place_ops_count_their_update_whoever_calls_them():
    """The C++ ops that update in place bump the version counters of what they write in the
    dispatcher, as torch's own in-place ops do: a direct torch.ops call is seen by autograd too."""
    ops = torch.ops.dwf_kernels
    hyper = (0.1, 0.9, 0.0, 0.0, False, False, True)
    factors, buffer, grad_w = torch.randn(3, 4, 5), torch.zeros(3, 4, 5), torch.randn(4, 5)
    param, plain_buffer, grad = torch.randn(7), torch.zeros(7), torch.randn(7)
    calls = [
        (lambda: ops.dwf_sgd_step(factors, buffer, grad_w, None, *hyper), [factors, buffer], [grad_w]),
        (lambda: ops.dwf_sgd_step_multi([factors], [buffer], [grad_w], [None], *hyper), [factors, buffer], [grad_w]),
        (lambda: ops.sgd_step_multi([param], [plain_buffer], [grad], *hyper), [param, plain_buffer], [grad]),
    ]
    for call, written, read in calls:
        before_written, before_read = [t._version for t in written], [t._version for t in read]
        call()
        assert all(t._version > v for t, v in zip(written, before_written, strict=True)), "written: counted"
        assert [t._version for t in read] == before_read, "read only: not counted"
    # Under no_grad and inference_mode as well (normal tensors keep counting there, as for torch's ops).
    for mode in (torch.no_grad, torch.inference_mode):
        version = factors._version
        with mode():
            ops.dwf_sgd_step(factors, buffer, grad_w, None, *hyper)
        assert factors._version > version
    # A refused call changes nothing, its version counters included.
    version = factors._version
    with pytest.raises(RuntimeError, match="momentum_buffer"):
        ops.dwf_sgd_step(factors, torch.zeros(2), grad_w, None, *hyper)
    assert factors._version == version
    # Inference tensors have no version counter: updated, not counted, no error.
    with torch.inference_mode():
        frozen, frozen_buffer = torch.randn(3, 4, 5), torch.zeros(3, 4, 5)
    start = frozen.clone()
    with torch.no_grad():
        ops.dwf_sgd_step(frozen, frozen_buffer, grad_w, None, *hyper)
    assert not torch.equal(frozen, start)
    # What the counters are for: a backward through a tensor the op changed since is refused.
    leaf = torch.randn(3, 4, 5, requires_grad=True)
    saved = leaf * 1
    out = (saved * saved).sum()
    with torch.no_grad():
        ops.dwf_sgd_step(saved, buffer, grad_w, None, *hyper)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
