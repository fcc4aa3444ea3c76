"""Triton kernels for the fused DWF forward, backward and gradient norm (docs/design.md, Kernel contract), and
their launchers (the SGD step: _triton_sgd.py, _triton_multi_step.py).

Imported only when triton is installed (see triton.py). Under TRITON_INTERPRET=1, which must
be set before this module is imported, the same kernels run on CPU tensors for the tests.

Layout: factors are one contiguous (D, N) buffer; program p handles elements [p*BLOCK, (p+1)*BLOCK)
of every factor. Offsets are int64 (tensors past 2^31 elements). Loads are converted to the
accumulation type (fp32; fp64 for fp64) right after loading, so bf16/fp16 math is fp32 math.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .._validate import acc_dtype

# Elements per program and warps, chosen for bandwidth: 8 warps x 16 fp32 elements per thread in
# the forward (4 x 16-byte loads per factor in flight per thread); the backward holds D factors, D
# prefix products and D gradients live, so it takes fewer elements per thread as D grows. Fixed
# (no autotuning), so the partial-sum layout, and with it sumsq, never changes between runs.
_FORWARD_BLOCK = {True: 4096, False: 2048}  # keyed by D <= 8
_BACKWARD_BLOCK = {True: 2048, False: 1024}  # keyed by D <= 4
# 8 warps per program; enable_fp_fusion=False: no FMA contraction, so a*b + c rounds like the reference.
LAUNCH_OPTIONS = {"num_warps": 8, "enable_fp_fusion": False}
_REDUCE_BLOCK = 1024
_SGD_WIDE_MAX_DEPTH = 12  # see gradient_launch


def gradient_launch(depth: int, element_size: int, sgd: bool) -> tuple[int, dict]:
    """BLOCK and launch options of the backward (sgd=False) and the SGD step kernels.

    8 warps share a block, so 4-byte factors move 8 (D <= 4) or 4 (D > 4) elements, 16 bytes or
    more, per thread and access. 2-byte factors at D > 4 take 4 warps instead, so each thread still
    moves 8 elements (16 bytes) at a time; except the SGD step past D = 12, where 8 elements x (D
    factors, D prefix products, D buffers) no longer fit in 255 registers and 8 warps (8-byte
    accesses) avoid the spills.
    """
    block = _BACKWARD_BLOCK[depth <= 4]
    options = dict(LAUNCH_OPTIONS)
    if element_size == 2 and depth > 4 and not (sgd and depth > _SGD_WIDE_MAX_DEPTH):
        options["num_warps"] = 4
    return block, options


@triton.jit
def _extent(n_units, ROW_ALIGN: tl.constexpr):
    """The elements per factor, n = n_units * ROW_ALIGN, as int64.

    int64 because d * n indexes factor d of a (D, n) buffer and D * n can pass 2^31 while n alone
    does not (Triton passes an n below 2^31 as i32, and i32 * i32 would wrap). ROW_ALIGN is the
    largest of 16 / element size and 1 that divides n: the launcher passes n / ROW_ALIGN, so the
    compiler knows every factor row d * n starts 16-byte aligned and the mask is constant over
    ROW_ALIGN elements, and it emits 16-byte accesses whenever n allows them (n = 1000 in fp32, not
    only multiples of 16).
    """
    return tl.cast(n_units, tl.int64) * ROW_ALIGN


@triton.jit
def _to_acc(x, IS_FP64: tl.constexpr):
    if IS_FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _dwf_forward_kernel(
    F,
    W,
    partials,
    n_units,
    ROW_ALIGN: tl.constexpr,
    D: tl.constexpr,
    WITH_SUMSQ: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = _extent(n_units, ROW_ALIGN)
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    f = _to_acc(tl.load(F + offs, mask=mask, other=0.0), IS_FP64)
    w = f
    sq = f * f
    for d in tl.static_range(1, D):
        f = _to_acc(tl.load(F + d * n + offs, mask=mask, other=0.0), IS_FP64)
        w = w * f
        sq = sq + f * f
    tl.store(W + offs, w.to(W.dtype.element_ty), mask=mask)
    if WITH_SUMSQ:
        # Masked lanes loaded 0 and add nothing. One partial per program, in a fixed slot.
        tl.store(partials + pid, tl.sum(sq, axis=0))


@triton.jit
def _sum_partials_kernel(partials, out, m, BLOCK: tl.constexpr):
    # One program, fixed order: deterministic, no atomics. A while loop, not range(0, m, BLOCK):
    # Triton 3.6's interpreter cannot take a runtime scalar as a range bound (with NumPy >= 2.4).
    acc = tl.zeros([BLOCK], dtype=out.dtype.element_ty)
    start = tl.cast(m * 0, tl.int64)  # 64-bit offsets throughout, as in every kernel here
    while start < m:
        offs = start + tl.arange(0, BLOCK)
        acc = acc + tl.load(partials + offs, mask=offs < m, other=0.0)
        start += BLOCK
    tl.store(out, tl.sum(acc, axis=0))


@triton.jit
def _load_factors(F, offs, mask, n, D: tl.constexpr, IS_FP64: tl.constexpr):
    """All D factors and prefix[d] = f[0] * ... * f[d-1] (prefix[0] is unused), held in registers."""
    f0 = _to_acc(tl.load(F + offs, mask=mask, other=0.0), IS_FP64)
    fs = (f0,)
    prefix = (f0, f0)
    for d in tl.static_range(1, D):
        fd = _to_acc(tl.load(F + d * n + offs, mask=mask, other=0.0), IS_FP64)
        fs = fs + (fd,)
        if d >= 2:
            prefix = prefix + (prefix[d - 1] * fs[d - 1],)
    return fs, prefix


@triton.jit
def _factor_grads(fs, prefix, g, two_s, D: tl.constexpr, HAS_PENALTY: tl.constexpr):
    """(grad[0], ..., grad[D-1]) with grad[d] = g * prod_{k != d} f[k] (+ two_s * f[d]).

    The suffix product carries g: grad[d] = prefix[d] * (g * f[D-1] * ... * f[d+1]). No division
    (factors reach exactly 0), and the same association as autograd of the left-to-right chain.
    """
    grads = ()
    suffix = g
    for k in tl.static_range(D - 1, -1, -1):
        if k >= 1:
            grad = prefix[k] * suffix
            suffix = suffix * fs[k]
        else:
            grad = suffix
        if HAS_PENALTY:
            grad = grad + two_s * fs[k]
        grads = (grad,) + grads
    return grads


@triton.jit
def _block_gradients(
    F, GW, grad_sumsq, n, D: tl.constexpr, HAS_PENALTY: tl.constexpr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr
):
    """This program's elements: (offsets, mask, the D factors, their D gradients), in registers.

    n is the int64 element count of one factor (_extent)."""
    return _block_gradients_at(F, GW, grad_sumsq, n, tl.program_id(0), D, HAS_PENALTY, IS_FP64, BLOCK)


@triton.jit
def _block_gradients_at(
    F,
    GW,
    grad_sumsq,
    n,
    block,
    D: tl.constexpr,
    HAS_PENALTY: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """_block_gradients of block `block` of the layer (a program may serve another layer's blocks)."""
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    fs, prefix = _load_factors(F, offs, mask, n, D, IS_FP64)
    g = _to_acc(tl.load(GW + offs, mask=mask, other=0.0), IS_FP64)
    two_s = 2.0 * _to_acc(tl.load(grad_sumsq), IS_FP64) if HAS_PENALTY else 0.0
    return offs, mask, fs, _factor_grads(fs, prefix, g, two_s, D, HAS_PENALTY)


@triton.jit
def _dwf_backward_kernel(
    F,
    GW,
    GF,
    grad_sumsq,
    n_units,
    ROW_ALIGN: tl.constexpr,
    D: tl.constexpr,
    HAS_PENALTY: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = _extent(n_units, ROW_ALIGN)
    offs, mask, fs, grads = _block_gradients(F, GW, grad_sumsq, n, D, HAS_PENALTY, IS_FP64, BLOCK)
    for k in tl.static_range(D):
        tl.store(GF + k * n + offs, grads[k].to(GF.dtype.element_ty), mask=mask)


@triton.jit
def _dwf_grad_sumsq_kernel(
    F,
    GW,
    grad_sumsq,
    partials,
    n_units,
    ROW_ALIGN: tl.constexpr,
    D: tl.constexpr,
    HAS_PENALTY: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # The backward kernel's gradients, squared and summed; nothing stored but one partial per
    # program, in a fixed slot (masked lanes loaded 0: their gradients are 0 and add nothing).
    n = _extent(n_units, ROW_ALIGN)
    offs, mask, fs, grads = _block_gradients(F, GW, grad_sumsq, n, D, HAS_PENALTY, IS_FP64, BLOCK)
    sq = grads[0] * grads[0]
    for k in tl.static_range(1, D):
        sq = sq + grads[k] * grads[k]
    tl.store(partials + tl.program_id(0).to(tl.int64), tl.sum(sq, axis=0))


def row_align(n: int, *element_sizes: int) -> int:
    """ROW_ALIGN of _extent: the widest 16-byte vector (16 // element size elements) of the launch's
    tensors that divides n, else 1."""
    vector = 16 // min(element_sizes)
    while vector > 1 and n % vector:
        vector //= 2
    return vector if vector >= 16 // max(element_sizes) else 1


def _device_guard(t: torch.Tensor):
    # Triton launches on the current device: make it the tensors' (no-op when it already is).
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NO_GUARD


_NO_GUARD = contextlib.nullcontext()

# Launches are direct `kernel[grid](...)` calls: the custom ops that call these launchers are opaque
# to torch.compile (their fake kernels describe them), so no torch.library.wrap_triton is needed,
# and it would cost ~0.4 ms of Python per launch and add a kernel side-table entry per call.


def forward(factors: torch.Tensor, out_dtype: torch.dtype, with_sumsq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the forward: returns (w, sumsq); sumsq is 0 when with_sumsq is False."""
    factors = factors.contiguous()  # non-contiguous input: copied once
    depth = factors.shape[0]
    n = factors.numel() // depth
    is_fp64 = factors.dtype == torch.float64
    device = factors.device
    w = torch.empty(factors.shape[1:], dtype=out_dtype, device=device)
    # The reduction kernel writes sumsq when it is requested; otherwise it is 0.
    acc = acc_dtype(factors.dtype)
    sumsq = (torch.empty if with_sumsq and n > 0 else torch.zeros)((), dtype=acc, device=device)
    if n == 0:
        return w, sumsq
    block = _FORWARD_BLOCK[depth <= 8]
    programs = triton.cdiv(n, block)
    align = row_align(n, factors.element_size(), w.element_size())
    # Partials: none without sumsq (WITH_SUMSQ is a constexpr; w stands in for the pointer); with one
    # program its partial is the sum itself, written straight into sumsq (no reduction launch).
    if not with_sumsq:
        partials = w
    elif programs == 1:
        partials = sumsq
    else:
        partials = torch.empty(programs, dtype=acc, device=device)
    with _device_guard(factors):
        _dwf_forward_kernel[(programs,)](
            factors,
            w,
            partials,
            n // align,
            ROW_ALIGN=align,
            D=depth,
            WITH_SUMSQ=with_sumsq,
            IS_FP64=is_fp64,
            BLOCK=block,
            **LAUNCH_OPTIONS,
        )
        if with_sumsq and programs > 1:
            _sum_partials_kernel[(1,)](partials, sumsq, programs, BLOCK=_REDUCE_BLOCK, num_warps=4)
    return w, sumsq


def backward(factors: torch.Tensor, grad_w: torch.Tensor, grad_sumsq: torch.Tensor | None) -> torch.Tensor:
    """Launches the backward: all D factor gradients (plus the penalty term) in one pass."""
    factors = factors.contiguous()
    grad_w = grad_w.contiguous()
    depth = factors.shape[0]
    n = factors.numel() // depth
    grad_factors = torch.empty_like(factors, memory_format=torch.contiguous_format)
    if n == 0:
        return grad_factors
    block, options = gradient_launch(depth, factors.element_size(), sgd=False)
    align = row_align(n, factors.element_size(), grad_w.element_size())
    has_penalty = grad_sumsq is not None
    s = grad_sumsq.reshape(()) if has_penalty else grad_w  # any pointer when unused
    with _device_guard(factors):
        _dwf_backward_kernel[(triton.cdiv(n, block),)](
            factors,
            grad_w,
            grad_factors,
            s,
            n // align,
            ROW_ALIGN=align,
            D=depth,
            HAS_PENALTY=has_penalty,
            IS_FP64=factors.dtype == torch.float64,
            BLOCK=block,
            **options,
        )
    return grad_factors


def grad_sumsq(factors: torch.Tensor, grad_w: torch.Tensor, grad_sumsq: torch.Tensor | None) -> torch.Tensor:
    """Launches the backward's squared norm: one partial per program, summed in a fixed order."""
    factors = factors.contiguous()
    grad_w = grad_w.contiguous()
    depth = factors.shape[0]
    n = factors.numel() // depth
    acc = acc_dtype(factors.dtype)
    if n == 0:
        return torch.zeros((), dtype=acc, device=factors.device)
    block, options = gradient_launch(depth, factors.element_size(), sgd=False)
    programs = triton.cdiv(n, block)
    result = torch.empty((), dtype=acc, device=factors.device)
    partials = result if programs == 1 else torch.empty(programs, dtype=acc, device=factors.device)
    align = row_align(n, factors.element_size(), grad_w.element_size())
    has_penalty = grad_sumsq is not None
    with _device_guard(factors):
        _dwf_grad_sumsq_kernel[(programs,)](
            factors,
            grad_w,
            grad_sumsq.reshape(()) if has_penalty else grad_w,  # any pointer when unused
            partials,
            n // align,
            ROW_ALIGN=align,
            D=depth,
            HAS_PENALTY=has_penalty,
            IS_FP64=factors.dtype == torch.float64,
            BLOCK=block,
            **options,
        )
        if programs > 1:
            _sum_partials_kernel[(1,)](partials, result, programs, BLOCK=_REDUCE_BLOCK, num_warps=4)
    return result
