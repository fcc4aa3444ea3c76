"""Argument checks of the front door, and the limits every backend shares.

Bad input is refused before any kernel runs; every message names the argument and says what was
expected (docs/design.md, Argument checks). The C++ ops repeat the essential checks for direct
torch.ops.dwf_kernels calls, with the same limits in csrc/dwf_math.h (kMaxDepth) and
csrc/dwf_dispatch.h (is_supported_out_dtype); tests/test_validation.py checks that they agree.
"""

from __future__ import annotations

import torch

# The deepest factorization: the kernels hold D factors per element in registers.
MAX_DEPTH = 16
# Factor dtype -> the dtypes w (forward) and grad_w (backward) may have: the factors' own, and
# for fp32 factors also bf16/fp16 (mixed precision).
IO_DTYPES = {
    torch.float16: (torch.float16,),
    torch.bfloat16: (torch.bfloat16,),
    torch.float32: (torch.float32, torch.bfloat16, torch.float16),
    torch.float64: (torch.float64,),
}
FACTOR_DTYPES = tuple(IO_DTYPES)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the arithmetic and of `sumsq`: fp64 for fp64 factors, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_factors(factors: torch.Tensor) -> None:
    if not isinstance(factors, torch.Tensor):
        raise TypeError(f"factors must be a torch.Tensor of shape (D, *weight_shape); got {type(factors).__name__}")
    _check_strided("factors", factors)
    if factors.dim() == 0:
        raise ValueError(
            "factors must have a leading depth axis: expected shape (D, *weight_shape) with "
            f"1 <= D <= {MAX_DEPTH}, got a 0-d tensor"
        )
    depth = factors.shape[0]
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(
            f"factors.shape[0] is the depth D and must be in [1, {MAX_DEPTH}]; got D={depth} "
            f"(factors.shape={tuple(factors.shape)})"
        )
    if factors.dtype not in FACTOR_DTYPES:
        raise TypeError(f"factors must be float16, bfloat16, float32 or float64; got {_dtype_name(factors.dtype)}")


def _check_strided(name: str, tensor: torch.Tensor) -> None:
    if tensor.layout != torch.strided:
        raise TypeError(
            f"{name} must be a dense (strided) tensor; got layout {tensor.layout} "
            f"(convert sparse input with {name}.to_dense())"
        )


def check_flag(name: str, value: object) -> None:
    """A switch argument: True or False, nothing else (a string such as "no" would be truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False); got {type(value).__name__} {value!r}")


def resolve_out_dtype(factors: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is None:
        return factors.dtype
    if not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"out_dtype must be a torch.dtype or None; got {type(out_dtype).__name__}")
    if out_dtype not in IO_DTYPES[factors.dtype]:
        raise ValueError(
            "out_dtype must equal the factors' dtype, or be bfloat16/float16 for float32 factors; got "
            f"factors {_dtype_name(factors.dtype)} and out_dtype {_dtype_name(out_dtype)}"
        )
    return out_dtype


def check_forward(factors: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    """Checks the forward arguments and returns the dtype of w."""
    check_factors(factors)
    return resolve_out_dtype(factors, out_dtype)


def check_backward(factors: torch.Tensor, grad_w: torch.Tensor, grad_sumsq: torch.Tensor | None) -> None:
    check_factors(factors)
    if not isinstance(grad_w, torch.Tensor):
        raise TypeError(f"grad_w must be a torch.Tensor; got {type(grad_w).__name__}")
    _check_strided("grad_w", grad_w)
    if grad_w.device != factors.device:
        raise ValueError(f"grad_w must be on the factors' device {factors.device}; got {grad_w.device}")
    if grad_w.shape != factors.shape[1:]:
        raise ValueError(
            f"grad_w must have the weight shape factors.shape[1:] = {tuple(factors.shape[1:])}; "
            f"got {tuple(grad_w.shape)}"
        )
    if grad_w.dtype not in IO_DTYPES[factors.dtype]:
        raise TypeError(
            "grad_w must have the dtype of w (the factors' dtype, or bfloat16/float16 for float32 factors); "
            f"got factors {_dtype_name(factors.dtype)} and grad_w {_dtype_name(grad_w.dtype)}"
        )
    if grad_sumsq is not None:
        if not isinstance(grad_sumsq, torch.Tensor) or grad_sumsq.numel() != 1:
            raise ValueError(f"grad_sumsq must be a one-element tensor or None; got {grad_sumsq!r}")
        _check_strided("grad_sumsq", grad_sumsq)
        if grad_sumsq.device != factors.device:
            raise ValueError(f"grad_sumsq must be on the factors' device {factors.device}; got {grad_sumsq.device}")
        if not grad_sumsq.dtype.is_floating_point:
            raise TypeError(f"grad_sumsq must be floating; got {_dtype_name(grad_sumsq.dtype)}")


def check_sgd_hyper(lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool) -> None:
    """torch.optim.SGD's rules for the step's hyper-parameters."""
    for name, value in (("lr", lr), ("momentum", momentum), ("dampening", dampening), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a Python float; got {type(value).__name__}")
        if value != value:
            raise ValueError(f"{name} must be a number >= 0, not NaN; got {value}")
        if not value >= 0.0:
            raise ValueError(f"{name} must be >= 0; got {value}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov momentum requires momentum > 0 and zero dampening")


def check_sgd_step(
    factors: torch.Tensor,
    grad_w: torch.Tensor,
    grad_sumsq: torch.Tensor | None,
    momentum_buffer: torch.Tensor | None,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
) -> None:
    """The fused SGD step's arguments: those of the backward, the buffer, and torch.optim.SGD's rules."""
    check_backward(factors, grad_w, grad_sumsq)
    if not factors.is_contiguous():
        raise ValueError("factors must be contiguous: the fused SGD step updates them in place")
    check_sgd_hyper(lr, momentum, dampening, weight_decay, nesterov)
    if momentum_buffer is not None:
        if not isinstance(momentum_buffer, torch.Tensor):
            raise TypeError(f"momentum_buffer must be a torch.Tensor or None; got {type(momentum_buffer).__name__}")
        _check_strided("momentum_buffer", momentum_buffer)
        if (
            momentum_buffer.shape != factors.shape
            or momentum_buffer.dtype != factors.dtype
            or momentum_buffer.device != factors.device
            or not momentum_buffer.is_contiguous()
        ):
            raise ValueError(
                "momentum_buffer must be a contiguous tensor with the factors' shape, dtype and device "
                f"({tuple(factors.shape)}, {_dtype_name(factors.dtype)}, {factors.device}); got "
                f"{tuple(momentum_buffer.shape)}, {_dtype_name(momentum_buffer.dtype)}, {momentum_buffer.device}"
            )
    check_no_overlap(
        (("factors", factors), ("momentum_buffer", momentum_buffer)), (("grad_w", grad_w), ("grad_sumsq", grad_sumsq))
    )


def check_layers_apart(
    factors: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor] | None,
    grad_w: list[torch.Tensor],
    grad_sumsq: list[torch.Tensor | None],
) -> None:
    """The multi-layer step's layers must not share memory where one of them writes: its kernels step
    the layers concurrently, so a tensor written by one layer and read or written by another (the
    same factors twice, a buffer that is another layer's factors) would make the result depend on
    the order of the accesses. Each layer's own tensors are checked by check_sgd_step. O(L log L):
    the address ranges sorted, each compared with those still open."""
    if torch.compiler.is_compiling():
        return
    spans = []
    for i, f in enumerate(factors):
        tensors = [("factors", f, True), ("grad_w", grad_w[i], False), ("grad_sumsq", grad_sumsq[i], False)]
        if momentum_buffers is not None:
            tensors.append(("momentum_buffers", momentum_buffers[i], True))
        for name, t, written in tensors:
            if isinstance(t, torch.Tensor) and t.numel():  # anything else: the layer's own checks say what
                first, end = _span(t)
                if first:  # tensors without memory (meta) have no address to compare
                    spans.append((first, end, written, i, name, t.device))
    spans.sort(key=lambda span: span[0])
    open_spans: list = []
    for span in spans:
        open_spans = [o for o in open_spans if o[1] > span[0]]
        for o in open_spans:
            if o[3] != span[3] and (o[2] or span[2]) and o[5] == span[5]:
                (a, b) = sorted((o, span), key=lambda x: x[3])
                raise ValueError(
                    f"{a[4]}[{a[3]}] and {b[4]}[{b[3]}] share memory, and the step writes "
                    f"{a[4] if a[2] else b[4]}[{a[3] if a[2] else b[3]}] in place while it steps the layers "
                    "together: pass each layer's own tensors (each factors tensor once)"
                )
        open_spans.append(span)


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses of the tensor's elements (first is 0 without memory)."""
    first = tensor.data_ptr()
    if tensor.is_contiguous():
        return first, first + tensor.nbytes
    if tensor.numel() == 0:
        return first, first
    extent = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return first, first + (extent + 1) * tensor.element_size()


def check_no_overlap(
    written: tuple[tuple[str, torch.Tensor | None], ...], read: tuple[tuple[str, torch.Tensor | None], ...]
) -> None:
    """Tensors an op writes in place must not share memory with each other or with what it reads:
    the kernels read and write element by element, so an alias would make the result depend on
    the order of the memory accesses (and differ between backends). Memory is compared by the
    address ranges of the elements: exact for the contiguous tensors the in-place ops write,
    conservative for interleaved strided views; tensors without memory (meta tensors,
    FakeTensors while tracing) overlap when they are views of one storage."""
    if torch.compiler.is_compiling():
        return  # traced tensors have no addresses; the ops check their real arguments when they run
    spans = [(name, t, *_span(t)) for name, t in written if t is not None]
    num_written = len(spans)
    spans += [(name, t, *_span(t)) for name, t in read if t is not None]
    for i in range(num_written):
        name_a, a, first_a, end_a = spans[i]
        for name_b, b, first_b, end_b in spans[i + 1 :]:
            if first_a and first_b:
                overlap = first_a < end_b and first_b < end_a and a.device == b.device
            else:
                overlap = a.numel() > 0 and b.numel() > 0 and torch._C._overlaps(a, b)
            if overlap:
                raise ValueError(
                    f"{name_a} and {name_b} share memory; {name_a} is updated in place, so it must "
                    f"not overlap {name_b}: pass separate tensors (e.g. {name_b}.clone())"
                )
