"""FusedSGD trains DWF models exactly like torch.optim.SGD, without factor gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import KERNEL_BACKENDS
from torch import nn

import dwf_kernels
from dwf_kernels import _build_info
from dwf_kernels.optim import FusedSGD

CPU_FMA = getattr(_build_info, "CPU_ISA", None) in ("avx2", "avx512")
ALL_BACKENDS = KERNEL_BACKENDS + [pytest.param("cpu", "reference", id="cpu-reference")]


def _model(device, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 7 * 7, 33), nn.ReLU(), nn.Linear(33, 5)
    )
    return dwf_kernels.factorize(model, 4).to(device)


def _batch(device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 2, 7, 7, generator=gen).to(device), torch.randint(0, 5, (8,), generator=gen).to(device)


def _train(model, optimizer, device, steps=4, lam=1e-2, backend=None):
    x, y = _batch(device)
    with dwf_kernels.use_backend(backend):
        for _ in range(steps):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y) + dwf_kernels.penalty(model, lam)
            loss.backward()
            optimizer.step()


def _assert_same_parameters(a, b, exact):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if exact:
            assert torch.equal(p, q), f"{name} differs"
        else:
            torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}")


def _twins():
    """The same model twice: one trained by FusedSGD, one by torch.optim.SGD (lr 0.1, momentum 0.9)."""
    models = [_model("cpu"), _model("cpu")]
    optimizers = [FusedSGD(models[0].parameters(), lr=0.1, momentum=0.9)]
    optimizers.append(torch.optim.SGD(models[1].parameters(), lr=0.1, momentum=0.9, foreach=False))
    return models, optimizers


OPTIONS = [
    pytest.param({"lr": 0.1}, id="plain"),
    pytest.param({"lr": 0.1, "momentum": 0.9}, id="momentum"),
    pytest.param({"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}, id="nesterov-wd"),
    pytest.param({"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "maximize": True}, id="dampening-maximize"),
]


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("options", OPTIONS)
def test_fused_sgd_trains_like_torch_sgd(device, backend, options):
    ours, theirs = _model(device), _model(device)
    fused = FusedSGD(ours.parameters(), backend=backend, **options)
    plain = torch.optim.SGD(theirs.parameters(), foreach=False, **options)
    _train(ours, fused, device, backend=backend)
    _train(theirs, plain, device, backend=backend)
    exact = backend == "reference" or (backend == "cpu" and CPU_FMA)
    _assert_same_parameters(ours, theirs, exact)
    for layer in ours.modules():
        if isinstance(layer, dwf_kernels.nn.DWFLayer):
            assert layer.factors.grad is None, "the factor gradient must never be materialized"
    if options.get("momentum"):
        for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(fused.state[p]["momentum_buffer"], plain.state[q]["momentum_buffer"])


def test_state_dict_is_torch_sgds():
    """A FusedSGD checkpoint resumes in torch.optim.SGD and the other way round, to the same result."""
    device = "cpu"
    options = {"lr": 0.1, "momentum": 0.9}
    reference = _model(device)
    _train(reference, torch.optim.SGD(reference.parameters(), foreach=False, **options), device, steps=6)

    first = _model(device)
    fused = FusedSGD(first.parameters(), **options)
    _train(first, fused, device, steps=3)
    second = copy.deepcopy(first)
    plain = torch.optim.SGD(second.parameters(), foreach=False, **options)
    plain.load_state_dict(fused.state_dict())
    del fused, first
    _train(second, plain, device, steps=3)
    _assert_same_parameters(second, reference, exact=CPU_FMA)

    third = _model(device)
    plain = torch.optim.SGD(third.parameters(), foreach=False, **options)
    _train(third, plain, device, steps=3)
    fused = FusedSGD(third.parameters(), **options)
    fused.load_state_dict(plain.state_dict())
    _train(third, fused, device, steps=3)
    _assert_same_parameters(third, reference, exact=CPU_FMA)


def test_gradient_accumulation_and_a_layer_used_twice():
    """Several backward passes before one step, and one layer applied twice, sum like autograd."""
    layers = []
    for _ in range(2):
        torch.manual_seed(3)
        layers.append(dwf_kernels.nn.DWFLinear(9, 9, depth=3))
    fused = FusedSGD(layers[0].parameters(), lr=0.1, momentum=0.9)
    plain = torch.optim.SGD(layers[1].parameters(), lr=0.1, momentum=0.9, foreach=False)
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(4, 9, generator=gen) for _ in range(3)]
    for layer, optimizer in zip(layers, (fused, plain), strict=True):
        for _ in range(2):
            optimizer.zero_grad()
            for x in xs:
                (layer(layer(x)).square().mean() + 0.01 * layer.last_sumsq).backward()
            optimizer.step()
    torch.testing.assert_close(layers[0].factors, layers[1].factors, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layers[0].bias, layers[1].bias, rtol=1e-6, atol=1e-7)


def test_ordinary_factor_gradients_are_applied_too():
    """A loss that differentiates `layer.weight`, and a penalty-only layer, take the unfused path."""
    models, optimizers = _twins()
    x, y = _batch("cpu")
    for model, optimizer in zip(models, optimizers, strict=True):
        for _ in range(3):
            optimizer.zero_grad()
            model(x)  # every layer records its sum of squares; the last layer's output goes unused,
            out = model[:4](x)  # so only its penalty has a gradient (and model[:4] runs twice)
            loss = out.square().mean() + model[3].weight.abs().sum() * 1e-3 + dwf_kernels.penalty(model, 1e-2)
            loss.backward()
            optimizer.step()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_zero_grad_without_set_to_none_keeps_momentum_running():
    """zero_grad(set_to_none=False) leaves zero gradients: the next step applies momentum alone."""
    models, optimizers = _twins()
    for model, optimizer in zip(models, optimizers, strict=True):
        _train(model, optimizer, "cpu", steps=2)
        optimizer.zero_grad(set_to_none=False)
        optimizer.step()
    _assert_same_parameters(models[0], models[1], exact=CPU_FMA)


def test_model_zero_grad_clears_like_optimizer_zero_grad():
    """model.zero_grad() cannot see the collected dL/dw; the step consumes them, so such loops step
    on each iteration's gradients alone, as with torch.optim.SGD."""
    models, optimizers = _twins()
    x, y = _batch("cpu")
    for model, optimizer in zip(models, optimizers, strict=True):
        for _ in range(3):
            model.zero_grad()
            (nn.functional.cross_entropy(model(x), y) + dwf_kernels.penalty(model, 1e-2)).backward()
            optimizer.step()
    _assert_same_parameters(models[0], models[1], exact=CPU_FMA)


def test_param_groups_and_lr_scheduler():
    models = [_model("cpu"), _model("cpu")]
    optimizers = []
    for model, cls in zip(models, (FusedSGD, torch.optim.SGD), strict=True):
        groups = [
            {"params": model[0].parameters(), "lr": 0.02},
            {"params": list(model[3].parameters()) + list(model[5].parameters())},
        ]
        extra = {} if cls is FusedSGD else {"foreach": False}
        optimizers.append(cls(groups, lr=0.1, momentum=0.9, **extra))
    for model, optimizer in zip(models, optimizers, strict=True):
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        for _ in range(3):
            _train(model, optimizer, "cpu", steps=1)
            scheduler.step()
    _assert_same_parameters(models[0], models[1], exact=CPU_FMA)


def test_layers_leave_fused_mode_with_their_optimizer():
    """Without a live FusedSGD, and in copies of the model, factors get ordinary gradients again."""
    model = _model("cpu")
    optimizer = FusedSGD(model.parameters(), lr=0.1)
    x, y = _batch("cpu")
    clone = copy.deepcopy(model)
    nn.functional.cross_entropy(clone(x), y).backward()
    assert clone[0].factors.grad is not None, "a deep copy must not stay bound to the original's optimizer"
    nn.functional.cross_entropy(model(x), y).backward()
    assert model[0].factors.grad is None
    del optimizer
    nn.functional.cross_entropy(model(x), y).backward()
    assert model[0].factors.grad is not None


def test_copying_model_and_optimizer_together_keeps_training_fused():
    models, optimizers = _twins()
    _train(models[0], optimizers[0], "cpu", steps=2)
    _train(models[1], optimizers[1], "cpu", steps=2)
    model_copy, optimizer_copy = copy.deepcopy((models[0], optimizers[0]))
    assert optimizer_copy._layers and all(
        layer.pending_grads.optimizer() is optimizer_copy for layer in optimizer_copy._layers.values()
    )
    _train(model_copy, optimizer_copy, "cpu", steps=2)
    _train(models[1], optimizers[1], "cpu", steps=2)
    assert model_copy[0].factors.grad is None, "the copy trains fused"
    _assert_same_parameters(model_copy, models[1], exact=CPU_FMA)


def test_eval_forward_with_grad_enabled_holds_nothing():
    model = _model("cpu")
    optimizer = FusedSGD(model.parameters(), lr=0.1)
    x, _ = _batch("cpu")
    model(x)  # no backward: nothing is collected, and nothing is kept alive
    assert all(layer.pending_grads.grad_w is None for layer in model if isinstance(layer, dwf_kernels.nn.DWFLayer))
    before = [p.clone() for p in model.parameters()]
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)), "no gradient, no update"


def test_autocast_bf16_reads_the_bf16_weight_gradient():
    models, optimizers = _twins()
    x, y = _batch("cpu")
    for model, optimizer in zip(models, optimizers, strict=True):
        for _ in range(3):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y) + dwf_kernels.penalty(model, 1e-2)
            loss.backward()
            optimizer.step()
    _assert_same_parameters(models[0], models[1], exact=CPU_FMA)


def test_torch_compile_falls_back_to_ordinary_gradients():
    models, optimizers = _twins()
    x, y = _batch("cpu")
    torch._dynamo.reset()
    for model, optimizer in zip(models, optimizers, strict=True):
        compiled = torch.compile(model)
        for _ in range(2):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(compiled(x), y) + dwf_kernels.penalty(model, 1e-2)
            loss.backward()
            optimizer.step()
    torch._dynamo.reset()
    _assert_same_parameters(models[0], models[1], exact=False)


def test_grad_scaler_is_refused():
    model = _model("cpu")
    optimizer = FusedSGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = _batch("cpu")
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="FusedSGD does not support torch.amp.GradScaler"):
        scaler.step(optimizer)
