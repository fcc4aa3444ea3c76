"""The factor gradients' norm without the gradients: dwf_grad_sumsq on every backend against the
reference, and the readers that use it (clip_grad_norm_, GradScaler) keeping FusedSGD's step fused
and equal to torch.optim.SGD's."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, KERNEL_BACKENDS, OP_FAMILIES, SUMSQ_RTOL, make_factors
from torch import nn

import dwf_kernels
from dwf_kernels import dwf_grad_sumsq, dwf_product_backward
from dwf_kernels.optim import FusedSGD

SHAPES = [(), (0,), (13, 17), (45,), (40009,)]


def _expected(factors, grad_w, grad_sumsq) -> torch.Tensor:
    """||dL/dfactors||^2 from the reference backward, summed in fp64. The gradient as computed, in
    the accumulation dtype: for bf16/fp16 factors before it would be rounded to their dtype."""
    acc = torch.float64 if factors.dtype == torch.float64 else torch.float32
    grad = dwf_product_backward(factors.to(acc), grad_w.to(acc), grad_sumsq, backend="reference").double()
    return (grad * grad).sum().to(acc)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS + [pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("depth", [1, 2, 4, 9, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("penalty", [False, True], ids=["plain", "penalty"])
def test_grad_sumsq_matches_the_reference(device, backend, dtype, depth, shape, penalty):
    factors = make_factors(depth, shape, dtype, device, seed=1)
    grad_w = make_factors(1, shape, dtype, device, seed=2)[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad_sumsq = torch.tensor(0.37, dtype=acc, device=device) if penalty else None
    result = dwf_grad_sumsq(factors, grad_w, grad_sumsq, backend=backend)
    assert result.shape == () and result.dtype == acc and result.device == factors.device
    torch.testing.assert_close(
        result.cpu(), _expected(factors, grad_w, grad_sumsq).cpu(), rtol=SUMSQ_RTOL[dtype], atol=0
    )


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("io", [torch.bfloat16, torch.float16], ids=str)
def test_grad_sumsq_of_a_mixed_precision_weight_gradient(device, backend, io):
    factors = make_factors(4, (1003,), torch.float32, device, seed=3)
    grad_w = make_factors(1, (1003,), io, device, seed=4)[0]
    result = dwf_grad_sumsq(factors, grad_w, None, backend=backend)
    torch.testing.assert_close(result.cpu(), _expected(factors, grad_w, None).cpu(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_grad_sumsq_is_deterministic_and_propagates_nonfinite(device, backend):
    factors = make_factors(4, (300_007,), torch.float32, device, seed=5)
    grad_w = make_factors(1, (300_007,), torch.float32, device, seed=6)[0]
    results = [dwf_grad_sumsq(factors, grad_w, backend=backend) for _ in range(3)]
    assert all(torch.equal(r, results[0]) for r in results[1:])
    grad_w[1234] = float("inf")
    assert torch.isinf(dwf_grad_sumsq(factors, grad_w, backend=backend))
    grad_w[1234] = float("nan")
    assert torch.isnan(dwf_grad_sumsq(factors, grad_w, backend=backend))


def test_cpu_grad_sumsq_independent_of_thread_count():
    if "cpu" not in dwf_kernels.available_backends("cpu"):
        pytest.skip("C++ extension not loaded")
    factors = make_factors(4, (1_000_003,), torch.float32, "cpu", seed=7)
    grad_w = make_factors(1, (1_000_003,), torch.float32, "cpu", seed=8)[0]
    threads = torch.get_num_threads()
    try:
        sums = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            sums.append(dwf_grad_sumsq(factors, grad_w, torch.tensor(0.1), backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(s, sums[0]) for s in sums[1:])


@pytest.mark.parametrize("ops,devices", OP_FAMILIES)
def test_opcheck_grad_sumsq(ops, devices):
    for device in devices:
        for dtype, io in [
            (torch.float32, torch.float32),
            (torch.float32, torch.bfloat16),
            (torch.float64, torch.float64),
        ]:
            factors = make_factors(3, (5, 7), dtype, device)
            grad_w = make_factors(1, (5, 7), io, device, seed=3)[0]
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            for grad_sumsq in (None, torch.tensor(0.5, dtype=acc, device=device)):
                torch.library.opcheck(ops.grad_sumsq.default, (factors, grad_w, grad_sumsq))


def test_grad_sumsq_refuses_bad_arguments():
    factors = make_factors(3, (4,), torch.float32, "cpu")
    with pytest.raises(ValueError, match="grad_w"):
        dwf_grad_sumsq(factors, torch.zeros(5))
    with pytest.raises(ValueError, match="backend"):
        dwf_grad_sumsq(factors, torch.zeros(4), backend="nope")


# The readers: FusedSGD under clip_grad_norm_ and GradScaler, against torch.optim.SGD.


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 7 * 7, 33), nn.ReLU(), nn.Linear(33, 5)
    )
    return dwf_kernels.factorize(model, 4)


def _batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 2, 7, 7, generator=gen), torch.randint(0, 5, (8,), generator=gen)


def _loss(model, x, y, lam=1e-2):
    return nn.functional.cross_entropy(model(x), y) + dwf_kernels.penalty(model, lam)


def _factor_grads(model):
    return [p.grad for name, p in model.named_parameters() if name.endswith("factors")]


@pytest.mark.parametrize("foreach", [None, False], ids=["foreach-default", "per-tensor"])
@pytest.mark.parametrize("max_norm", [0.05, 100.0], ids=["clipping", "under-the-limit"])
@pytest.mark.parametrize("backend", [None, "reference"], ids=["default-backend", "reference"])
def test_clip_grad_norm_keeps_the_step_fused_and_equals_torch_sgd(foreach, max_norm, backend):
    runs = []
    for sgd in (FusedSGD, lambda *a, **k: torch.optim.SGD(*a, foreach=False, **k)):
        model = _model()
        optimizer = sgd(model.parameters(), lr=0.1, momentum=0.9)
        x, y = _batch()
        norms, statuses = [], []
        with dwf_kernels.use_backend(backend):
            for _ in range(4):
                optimizer.zero_grad()
                _loss(model, x, y).backward()
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=foreach))
                grads = _factor_grads(model)
                optimizer.step()
                statuses.append({getattr(g, "status", "dense") for g in grads})
        runs.append((model, norms, statuses))
    (fused, fused_norms, statuses), (plain, plain_norms, _) = runs
    assert all(s == {"consumed"} for s in statuses), statuses  # applied fused, never formed
    torch.testing.assert_close(torch.stack(fused_norms), torch.stack(plain_norms), rtol=1e-5, atol=0)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_clip_grad_norm_with_another_norm_type_forms_the_gradient():
    """Only the 2-norm has a fused pass; others read the dense gradient (and the step is unfused)."""
    model = _model()
    optimizer = FusedSGD(model.parameters(), lr=0.1)
    x, y = _batch()
    _loss(model, x, y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1, norm_type=float("inf"))
    assert {g.status for g in _factor_grads(model)} == {"dense"}
    optimizer.step()


@pytest.mark.parametrize("autocast", [None, torch.float16], ids=["fp32", "autocast-fp16"])
def test_grad_scaler_with_clipping_keeps_the_step_fused(autocast):
    """The standard recipe, scale / backward / unscale_ / clip / step / update, over steps that
    include an overflow (skipped, scale lowered), equal to torch.optim.SGD's, fused throughout."""
    runs = []
    for sgd in (FusedSGD, lambda *a, **k: torch.optim.SGD(*a, foreach=False, **k)):
        model = _model()
        optimizer = sgd(model.parameters(), lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
        x, y = _batch()
        scales, statuses = [], []
        for i in range(5):
            xi = x.clone()
            if i == 1:
                xi[0, 0, 0, 0] = float("inf")  # overflow: this step is skipped and the scale halves
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                loss = _loss(model, xi, y)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            grads = _factor_grads(model)
            scaler.step(optimizer)
            scaler.update()
            scales.append(scaler.get_scale())
            statuses.append({getattr(g, "status", "dense") for g in grads})
        runs.append((model, scales, statuses))
    (fused, fused_scales, statuses), (plain, plain_scales, _) = runs
    assert fused_scales == plain_scales == [2.0**16, 2.0**15, 2.0**15, 2.0**16, 2.0**16]
    # The skipped step leaves its lazy gradients unapplied; every other step applies them fused.
    assert statuses[1] == {"lazy"} and all(s == {"consumed"} for i, s in enumerate(statuses) if i != 1), statuses
    for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_grad_scaler_without_clipping_is_bitwise_torch_sgds():
    """Unscaling dL/dw by a power of two scales the factor gradient exactly: same bits as unscaling
    the dense gradient (on CPUs where the fused step itself is bitwise torch's)."""
    from helpers import TORCH_CPU_FMA

    runs = []
    for sgd in (FusedSGD, lambda *a, **k: torch.optim.SGD(*a, foreach=False, **k)):
        model = _model()
        optimizer = sgd(model.parameters(), lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        x, y = _batch()
        for _ in range(3):
            optimizer.zero_grad()
            scaler.scale(_loss(model, x, y)).backward()
            scaler.step(optimizer)
            scaler.update()
        runs.append(model)
    for (name, p), q in zip(runs[0].named_parameters(), runs[1].parameters(), strict=True):
        if TORCH_CPU_FMA:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}")
