"""Bad input is refused before any kernel runs, with a message naming the argument (docs/design.md, Argument checks)."""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_BACKENDS, make_factors

from dwf_kernels import _extension, backends, dwf_product, dwf_product_backward, dwf_sgd_step
from dwf_kernels._validate import IO_DTYPES, MAX_DEPTH, acc_dtype

ALL_BACKENDS = KERNEL_BACKENDS + [pytest.param("cpu", "reference", id="cpu-reference")]


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_zero_dim_factors(device, backend):
    with pytest.raises(ValueError, match=r"factors must have a leading depth axis.*0-d tensor"):
        dwf_product(torch.tensor(2.0, device=device), backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("depth", [0, 17])
def test_depth_out_of_range(device, backend, depth):
    with pytest.raises(ValueError, match=rf"factors.shape\[0\] is the depth D and must be in \[1, 16\]; got D={depth}"):
        dwf_product(torch.ones(depth, 3, device=device), backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64], ids=str)
def test_non_floating_dtype(device, backend, dtype):
    with pytest.raises(TypeError, match="factors must be float16, bfloat16, float32 or float64"):
        dwf_product(torch.ones(2, 3, device=device, dtype=dtype), backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_unsupported_out_dtype(device, backend):
    with pytest.raises(ValueError, match="out_dtype must equal the factors' dtype"):
        dwf_product(torch.ones(2, 3, device=device, dtype=torch.bfloat16), out_dtype=torch.float32, backend=backend)
    with pytest.raises(TypeError, match="out_dtype must be a torch.dtype"):
        dwf_product(torch.ones(2, 3, device=device), out_dtype="bf16", backend=backend)


def test_factors_not_a_tensor():
    with pytest.raises(TypeError, match="factors must be a torch.Tensor"):
        dwf_product([[1.0, 2.0]])


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_grad_w_shape_mismatch(device, backend):
    factors = make_factors(3, (4, 5), torch.float32, device)
    with pytest.raises(
        ValueError, match=r"grad_w must have the weight shape factors.shape\[1:\] = \(4, 5\); got \(5, 4\)"
    ):
        dwf_product_backward(factors, torch.ones(5, 4, device=device), backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_grad_w_dtype_mismatch(device, backend):
    factors = make_factors(3, (4,), torch.bfloat16, device)
    with pytest.raises(TypeError, match="grad_w must have the dtype of w.*factors bfloat16 and grad_w float32"):
        dwf_product_backward(factors, torch.ones(4, device=device), backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_bad_grad_sumsq(device, backend):
    factors = make_factors(3, (4,), torch.float32, device)
    with pytest.raises(ValueError, match="grad_sumsq must be a one-element tensor or None"):
        dwf_product_backward(factors, torch.ones(4, device=device), torch.ones(2, device=device), backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_mixed_devices(device, backend):
    factors = make_factors(3, (4,), torch.float32, device)
    with pytest.raises(ValueError, match=rf"grad_w must be on the factors' device {device}.*got meta"):
        dwf_product_backward(factors, torch.ones(4, device="meta"), backend=backend)
    with pytest.raises(ValueError, match=rf"grad_sumsq must be on the factors' device {device}.*got meta"):
        dwf_product_backward(factors, torch.ones(4, device=device), torch.ones((), device="meta"), backend=backend)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"backend must be one of \['cuda', 'cpu', 'triton', 'reference'\]"):
        dwf_product(torch.ones(2, 3), backend="fast")


def test_backend_for_the_wrong_device():
    with pytest.raises(RuntimeError, match=r"backend 'cuda' runs CUDA tensors only, got a cpu tensor; use one of \["):
        backends.resolve_backend("cpu", "cuda")


def test_cuda_tensor_with_a_build_without_cuda(monkeypatch):
    """A build without CUDA kernels names the backends that serve CUDA tensors instead."""
    monkeypatch.setattr(_extension, "KERNEL_DEVICES", frozenset({"cpu"}))
    with pytest.raises(
        RuntimeError, match=r"built without CUDA kernels.*use one of \[.*'reference'\] for cuda tensors"
    ):
        backends.resolve_backend("cuda", "cuda")
    assert backends.resolve_backend("cuda", None) != "cuda"  # auto falls back to what is there


def test_extension_ops_check_arguments_too():
    """Direct torch.ops calls (bypassing the front door) are refused in C++ with the same kind of message."""
    if not _extension.LOADED:
        pytest.skip("C++ extension not loaded")
    with pytest.raises(RuntimeError, match=rf"factors.shape\[0\] is the depth D and must be in \[1, {MAX_DEPTH}\]"):
        torch.ops.dwf_kernels.dwf_forward(torch.ones(MAX_DEPTH + 1, 3), None, True)
    with pytest.raises(RuntimeError, match="out_dtype must equal the factors' dtype"):
        torch.ops.dwf_kernels.dwf_forward(torch.ones(2, 3, dtype=torch.float64), torch.float16, True)
    with pytest.raises(RuntimeError, match=r"grad_w must have the weight shape"):
        torch.ops.dwf_kernels.dwf_backward(torch.ones(2, 3), torch.ones(4), None)
    with pytest.raises(RuntimeError, match="factors must be float16, bfloat16, float32 or float64"):
        torch.ops.dwf_kernels.dwf_forward(torch.ones(2, 3, dtype=torch.int32), None, True)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_tensors_are_refused(device, backend, layout):
    def sparse(t):
        return t.to_sparse() if layout == "coo" else t.to_sparse_csr()

    factors = make_factors(2, (3, 4), torch.float32, device)
    with pytest.raises(TypeError, match=r"factors must be a dense \(strided\) tensor; got layout torch.sparse"):
        dwf_product(sparse(factors), backend=backend)
    with pytest.raises(TypeError, match=r"grad_w must be a dense \(strided\) tensor"):
        dwf_product_backward(factors, sparse(torch.ones(3, 4, device=device)), backend=backend)
    with pytest.raises(TypeError, match=r"grad_w must be a dense \(strided\) tensor"):
        dwf_sgd_step(factors, sparse(torch.ones(3, 4, device=device)), lr=0.1, backend=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("value", ["no", 0, 1, None])
def test_return_sumsq_must_be_a_bool(device, backend, value):
    with pytest.raises(TypeError, match="return_sumsq must be a bool"):
        dwf_product(torch.ones(2, 3, device=device), return_sumsq=value, backend=backend)


def _aliasing_cases(device):
    """(factors, grad_w, grad_sumsq, momentum_buffer, message): each writes over something it reads."""
    f = make_factors(2, (3, 4), torch.float32, device)
    g = torch.ones(3, 4, device=device)
    flat = torch.zeros(2 * 24, device=device)
    buffer = torch.zeros(2, 3, 4, device=device)
    yield f, g, None, f, r"factors and momentum_buffer share memory"  # dwf_sgd_step(f, gw, None, f, ...)
    yield f, g, None, f.view(2, 12).view(2, 3, 4), r"factors and momentum_buffer share memory"
    yield f, f[1], None, None, r"factors and grad_w share memory"
    yield f, g, f[0, 0, :1], None, r"factors and grad_sumsq share memory"
    yield f, buffer[1], None, buffer, r"momentum_buffer and grad_w share memory"
    yield flat[:24].view(2, 3, 4), g, None, flat[20:44].view(2, 3, 4), r"factors and momentum_buffer share memory"


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_sgd_step_refuses_overlapping_outputs_and_inputs(device, backend):
    """The step writes factors and buffer in place: any overlap with what it reads is refused before
    a kernel runs (the result would depend on the order of the memory accesses)."""
    for factors, grad_w, grad_sumsq, buffer, message in _aliasing_cases(device):
        before = factors.clone()
        with pytest.raises(ValueError, match=message):
            dwf_sgd_step(factors, grad_w, grad_sumsq, buffer, lr=0.1, momentum=0.9, backend=backend)
        assert torch.equal(factors, before), message  # refused before anything was written
    flat = torch.zeros(2 * 24, device=device)  # disjoint parts of one storage are fine
    factors, buffer = flat[:24].view(2, 3, 4), flat[24:].view(2, 3, 4)
    factors.copy_(make_factors(2, (3, 4), torch.float32, device))
    dwf_sgd_step(factors, torch.ones(3, 4, device=device), None, buffer, lr=0.1, momentum=0.9, backend=backend)


@pytest.mark.skipif(not _extension.LOADED, reason="C++ extension not loaded")
def test_extension_sgd_step_op_refuses_overlap_too():
    """A direct torch.ops call skips the Python checks; the C++ op refuses aliasing itself."""
    sgd_step_op = backends.REGISTRY["cpu"].ops.sgd_step
    for factors, grad_w, grad_sumsq, buffer, _message in _aliasing_cases("cpu"):
        buffer = buffer if buffer is not None else torch.zeros_like(factors)
        with pytest.raises(RuntimeError, match="share memory"):
            sgd_step_op(factors, buffer, grad_w, grad_sumsq, 0.1, 0.9, 0.0, 0.0, False, False, False)


def _accepted(fn, *args, **kwargs) -> bool:
    try:
        fn(*args, **kwargs)
    except (TypeError, ValueError, RuntimeError):
        return False
    return True


@pytest.mark.skipif("cpu" not in _extension.KERNEL_DEVICES, reason="C++ extension not loaded")
def test_python_and_cpp_limits_agree():
    """The front door (plain Python, before any kernel) and the C++ ops called directly accept
    exactly the same depths and (factor, w / grad_w) dtype pairs, and sumsq has the same dtype:
    each side defines its limits once (dwf_kernels/_validate.py; csrc/dwf_math.h and dwf_dispatch.h)."""
    ops = backends.REGISTRY["cpu"].ops
    for depth in (0, 1, MAX_DEPTH, MAX_DEPTH + 1):
        factors = torch.ones(depth, 3)
        front_door = _accepted(dwf_product, factors, backend="reference")
        assert front_door == _accepted(ops.forward, factors, None, True) == (1 <= depth <= MAX_DEPTH), depth
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for factor_dtype in (*floats, torch.int32):
        factors = torch.ones(2, 3, dtype=factor_dtype)
        for io_dtype in (*floats, torch.int32):
            expected = io_dtype in IO_DTYPES.get(factor_dtype, ())
            grad_w = torch.ones(3, dtype=io_dtype)
            pair = f"factors {factor_dtype}, w / grad_w {io_dtype}"
            assert _accepted(dwf_product, factors, out_dtype=io_dtype, backend="reference") == expected, pair
            assert _accepted(ops.forward, factors, io_dtype, True) == expected, pair
            assert _accepted(dwf_product_backward, factors, grad_w, backend="reference") == expected, pair
            assert _accepted(ops.backward, factors, grad_w, None) == expected, pair
    for dtype in floats:
        _, sumsq = ops.forward(torch.ones(2, 3, dtype=dtype), None, True)
        assert sumsq.dtype == acc_dtype(dtype), dtype


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_compiled_sgd_step_refuses_overlap_when_it_runs(device, backend):
    """Traced tensors have no addresses: under torch.compile the ops refuse aliasing at run time."""
    torch._dynamo.reset()
    factors = make_factors(2, (3, 4), torch.float32, device)
    step = torch.compile(
        lambda f, g: dwf_sgd_step(f, g, None, f, lr=0.1, momentum=0.9, backend=backend), fullgraph=True
    )
    with pytest.raises((RuntimeError, ValueError), match="share memory"):
        step(factors, torch.ones(3, 4, device=device))
