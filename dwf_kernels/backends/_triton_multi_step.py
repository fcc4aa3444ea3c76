"""The Triton multi-layer SGD step: the fused backward + SGD step of several layers in one launch.

Imported only when triton is installed (see triton.py), after _triton_sgd, whose per-block
step (`_sgd_step_block`) each slot runs: every layer gets exactly the single-layer kernel's
arithmetic. Under TRITON_INTERPRET=1 the kernel runs on CPU tensors for the tests.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_kernels import _device_guard, _extent, gradient_launch, row_align
from ._triton_sgd import _f64_from_bits, _sgd_step_block, hyper_arguments

# Layers per launch of the multi-layer step: each slot's pointers and sizes are kernel arguments (no
# device-side table to build and copy per step, so CUDA-graph capture of the step still works).
MULTI_SLOTS = 8


# Sizes not specialized: each combination of sizes divisible by 16 (or equal to 1) would compile anew.
@triton.jit(do_not_specialize=[f"{kind}{i}" for i in range(MULTI_SLOTS) for kind in ("N", "END")])
def _dwf_sgd_step_multi_kernel(
    F0,
    B0,
    GW0,
    S0,
    N0,
    END0,
    F1,
    B1,
    GW1,
    S1,
    N1,
    END1,
    F2,
    B2,
    GW2,
    S2,
    N2,
    END2,
    F3,
    B3,
    GW3,
    S3,
    N3,
    END3,
    F4,
    B4,
    GW4,
    S4,
    N4,
    END4,
    F5,
    B5,
    GW5,
    S5,
    N5,
    END5,
    F6,
    B6,
    GW6,
    S6,
    N6,
    END6,
    F7,
    B7,
    GW7,
    S7,
    N7,
    END7,
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
    """_dwf_sgd_step_kernel on up to MULTI_SLOTS layers in one launch: slot i (factors Fi, buffer Bi,
    dL/dw GWi, dL/dsumsq Si, Ni * ROW_ALIGN elements per factor) owns programs [END(i-1), ENDi); an
    unused slot has ENDi = END(i-1), so no program reaches it. Each block runs the single-layer
    kernel's code, so every layer is updated exactly as _dwf_sgd_step_kernel updates it."""
    if IS_FP64:
        neg_lr = _f64_from_bits(neg_lr)
        momentum = _f64_from_bits(momentum)
        one_minus_dampening = _f64_from_bits(one_minus_dampening)
        weight_decay = _f64_from_bits(weight_decay)
    pid = tl.program_id(0)
    if pid < END0:
        _sgd_step_block(
            F0,
            B0,
            GW0,
            S0,
            _extent(N0, ROW_ALIGN),
            pid - 0,
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
    elif pid < END1:
        _sgd_step_block(
            F1,
            B1,
            GW1,
            S1,
            _extent(N1, ROW_ALIGN),
            pid - END0,
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
    elif pid < END2:
        _sgd_step_block(
            F2,
            B2,
            GW2,
            S2,
            _extent(N2, ROW_ALIGN),
            pid - END1,
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
    elif pid < END3:
        _sgd_step_block(
            F3,
            B3,
            GW3,
            S3,
            _extent(N3, ROW_ALIGN),
            pid - END2,
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
    elif pid < END4:
        _sgd_step_block(
            F4,
            B4,
            GW4,
            S4,
            _extent(N4, ROW_ALIGN),
            pid - END3,
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
    elif pid < END5:
        _sgd_step_block(
            F5,
            B5,
            GW5,
            S5,
            _extent(N5, ROW_ALIGN),
            pid - END4,
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
    elif pid < END6:
        _sgd_step_block(
            F6,
            B6,
            GW6,
            S6,
            _extent(N6, ROW_ALIGN),
            pid - END5,
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
    elif pid < END7:
        _sgd_step_block(
            F7,
            B7,
            GW7,
            S7,
            _extent(N7, ROW_ALIGN),
            pid - END6,
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


def sgd_step_multi(
    factors: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    grad_w: list[torch.Tensor],
    grad_sumsq: list[torch.Tensor | None],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    init_buffer: bool,
) -> None:
    """sgd_step on every layer of the lists (momentum_buffers empty when momentum is 0), MULTI_SLOTS
    layers per launch: one launch per MULTI_SLOTS layers of the same depth, dtypes and penalty
    presence (layers of 0 elements have nothing to update). All on one device."""
    sets: dict[tuple, list[int]] = {}
    for i, f in enumerate(factors):
        if f.numel():
            key = (f.shape[0], f.dtype, grad_w[i].dtype, grad_sumsq[i] is not None)
            sets.setdefault(key, []).append(i)
    if not sets:
        return
    with _device_guard(factors[0]):
        for (depth, dtype, _, has_penalty), layers in sets.items():
            is_fp64 = dtype == torch.float64
            # Each set its own: a call may mix fp64 and narrower factors.
            values = hyper_arguments(lr, momentum, dampening, weight_decay, is_fp64)
            block, options = gradient_launch(depth, factors[layers[0]].element_size(), sgd=True)
            for start in range(0, len(layers), MULTI_SLOTS):
                chunk = layers[start : start + MULTI_SLOTS]
                ns = [factors[i].numel() // depth for i in chunk]
                align = row_align(math.gcd(*ns), factors[chunk[0]].element_size(), grad_w[chunk[0]].element_size())
                slots, end = [], 0
                for i, n in zip(chunk, ns, strict=True):
                    end += triton.cdiv(n, block)
                    gw = grad_w[i].contiguous()
                    slots += [
                        factors[i],
                        momentum_buffers[i] if momentum != 0 else factors[i],  # any pointer when unused
                        gw,
                        grad_sumsq[i].reshape(()) if has_penalty else gw,
                        n // align,
                        end,
                    ]
                # Unused slots: the first layer's tensors, and no programs (END stays at the total).
                slots += (slots[:4] + [slots[4], end]) * (MULTI_SLOTS - len(chunk))
                _dwf_sgd_step_multi_kernel[(end,)](
                    *slots,
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
