"""Triton kernels of the fused backward + SGD step of one layer (docs/design.md, Kernel contract), and
its launcher; `_sgd_step_block` is also the per-block step of the multi-layer kernel
(_triton_multi_step.py). Imported only when triton is installed (see triton.py), after
_triton_kernels, whose gradient blocks it applies.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ._triton_kernels import _block_gradients_at, _device_guard, _extent, _to_acc, gradient_launch, row_align


@triton.jit
def _f64_from_bits(bits):
    # An integer argument arrives as i32 when its value fits, else i64: widen (sign-extending keeps
    # the 64-bit pattern) before reinterpreting the bits as fp64.
    return tl.cast(tl.cast(bits, tl.int64), tl.float64, bitcast=True)


@triton.jit
def _dwf_sgd_step_kernel(
    F,
    B,
    GW,
    grad_sumsq,
    n_units,
    neg_lr,
    momentum,
    one_minus_dampening,
    weight_decay,
    ROW_ALIGN: tl.constexpr,
    D: tl.constexpr,
    HAS_PENALTY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    INIT_BUFFER: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # The backward kernel's gradients, applied at once as torch.optim.SGD does (csrc/dwf_math.h
    # sgd_update: same order, `a.add(b, alpha=x)` as fma(b, x, a)); factors and buffer in place.
    if IS_FP64:
        # Triton passes float arguments as fp32; fp64 hyper-parameters arrive as their IEEE bit
        # patterns in integer arguments (no device tensor to fill per step, so no host-to-device
        # copy, which CUDA-graph capture would refuse).
        neg_lr = _f64_from_bits(neg_lr)
        momentum = _f64_from_bits(momentum)
        one_minus_dampening = _f64_from_bits(one_minus_dampening)
        weight_decay = _f64_from_bits(weight_decay)
    _sgd_step_block(
        F,
        B,
        GW,
        grad_sumsq,
        _extent(n_units, ROW_ALIGN),
        tl.program_id(0),
        neg_lr,
        momentum,
        one_minus_dampening,
        weight_decay,
        D,
        HAS_PENALTY,
        HAS_MOMENTUM,
        INIT_BUFFER,
        HAS_WEIGHT_DECAY,
        NESTEROV,
        MAXIMIZE,
        IS_FP64,
        BLOCK,
    )


@triton.jit
def _sgd_step_block(
    F,
    B,
    GW,
    grad_sumsq,
    n,
    block,
    neg_lr,
    momentum,
    one_minus_dampening,
    weight_decay,
    D: tl.constexpr,
    HAS_PENALTY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    INIT_BUFFER: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The fused step on block `block` of one layer (n: its int64 elements per factor)."""
    offs, mask, fs, grads = _block_gradients_at(F, GW, grad_sumsq, n, block, D, HAS_PENALTY, IS_FP64, BLOCK)
    for k in tl.static_range(D):
        grad = grads[k]
        if MAXIMIZE:
            grad = -grad
        if HAS_WEIGHT_DECAY:
            grad = tl.fma(fs[k], weight_decay, grad)
        if HAS_MOMENTUM:
            if INIT_BUFFER:
                buf = grad
            else:
                buf = _to_acc(tl.load(B + k * n + offs, mask=mask, other=0.0), IS_FP64)
                buf = tl.fma(grad, one_minus_dampening, buf * momentum)
            tl.store(B + k * n + offs, buf.to(B.dtype.element_ty), mask=mask)
            if NESTEROV:
                grad = tl.fma(buf, momentum, grad)
            else:
                grad = buf
        tl.store(F + k * n + offs, tl.fma(grad, neg_lr, fs[k]).to(F.dtype.element_ty), mask=mask)


def _f64_bits(x: float) -> int:
    """The IEEE-754 bit pattern of x as a signed 64-bit integer (see _f64_from_bits)."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def hyper_arguments(lr: float, momentum: float, dampening: float, weight_decay: float, is_fp64: bool) -> tuple:
    """The step kernels' four hyper-parameter arguments (-lr, momentum, 1 - dampening, weight_decay):
    floats, or for fp64 factors their bit patterns (see _f64_from_bits)."""
    values = (-float(lr), float(momentum), 1.0 - float(dampening), float(weight_decay))
    return tuple(_f64_bits(v) for v in values) if is_fp64 else values


def sgd_step(
    factors: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    grad_w: torch.Tensor,
    grad_sumsq: torch.Tensor | None,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    init_buffer: bool,
) -> None:
    """Launches the fused backward + SGD step: updates factors (and momentum_buffer) in place."""
    grad_w = grad_w.contiguous()
    depth = factors.shape[0]
    n = factors.numel() // depth
    if n == 0:
        return
    is_fp64 = factors.dtype == torch.float64
    has_penalty = grad_sumsq is not None
    values = hyper_arguments(lr, momentum, dampening, weight_decay, is_fp64)
    block, options = gradient_launch(depth, factors.element_size(), sgd=True)
    align = row_align(n, factors.element_size(), grad_w.element_size())
    with _device_guard(factors):
        _dwf_sgd_step_kernel[(triton.cdiv(n, block),)](
            factors,
            momentum_buffer if momentum != 0 else factors,  # any pointer when unused
            grad_w,
            grad_sumsq.reshape(()) if has_penalty else grad_w,
            n // align,
            *values,
            ROW_ALIGN=align,
            D=depth,
            HAS_PENALTY=has_penalty,
            HAS_MOMENTUM=momentum != 0,
            INIT_BUFFER=init_buffer,
            HAS_WEIGHT_DECAY=weight_decay != 0,
            NESTEROV=nesterov,
            MAXIMIZE=maximize,
            IS_FP64=is_fp64,
            BLOCK=block,
            **options,
        )
