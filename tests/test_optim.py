"""FusedSGD trains DWF models exactly like torch.optim.SGD, without factor gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import KERNEL_BACKENDS, TORCH_CPU_FMA
from torch import nn

import dwf_kernels
from dwf_kernels import _fusion
from dwf_kernels.optim import FusedSGD, LazyFactorGrad

CPU_FMA = TORCH_CPU_FMA  # the CPU kernels' SGD step rounds as torch.optim.SGD's (helpers.py)
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
            grad = layer.factors.grad
            assert isinstance(grad, LazyFactorGrad) and grad.status == "consumed", "never materialized"
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


@pytest.mark.parametrize("multi_tensor", [True, False], ids=["multi", "per-layer"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_optimizer_state_holds_what_torch_sgds_holds(momentum, multi_tensor):
    """Per-parameter state as torch.optim.SGD keeps it, whichever update a parameter takes (fused
    DWF layer, the plain one-call update, torch's own for bfloat16, no gradient): none without
    momentum, a momentum buffer for each parameter that had a gradient with it."""
    states = []
    for cls, options in ((FusedSGD, {"multi_tensor": multi_tensor}), (torch.optim.SGD, {"foreach": False})):
        model = _model("cpu")
        extra = nn.Linear(5, 3).to(torch.bfloat16)  # torch's own update
        unused = nn.Parameter(torch.zeros(4))  # never gets a gradient
        params = [*model.parameters(), *extra.parameters(), unused]
        optimizer = cls(params, lr=0.1, momentum=momentum, **options)
        x, y = _batch("cpu")
        for _ in range(2):
            optimizer.zero_grad()
            out = model(x)
            loss = nn.functional.cross_entropy(out, y) + extra(out.to(torch.bfloat16)).float().square().mean()
            loss.backward()
            optimizer.step()
        state = optimizer.state_dict()["state"]
        states.append([(i, sorted(s)) for i, s in state.items()])  # in torch's order too
        assert len(optimizer.state) == len(state)
    assert states[0] == states[1]
    assert states[0] == ([] if momentum == 0 else [(i, ["momentum_buffer"]) for i in range(len(params) - 1)])


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
    """Under a live FusedSGD the factor gradient is lazy (and reads as the dense one); without one,
    and in copies of the model, it is an ordinary tensor again."""
    model = _model("cpu")
    optimizer = FusedSGD(model.parameters(), lr=0.1)
    x, y = _batch("cpu")
    clone = copy.deepcopy(model)
    nn.functional.cross_entropy(clone(x), y).backward()
    assert type(clone[0].factors.grad) is torch.Tensor, "a deep copy must not stay bound to the original's optimizer"
    nn.functional.cross_entropy(model(x), y).backward()
    grad = model[0].factors.grad
    assert isinstance(grad, LazyFactorGrad) and grad.status == "lazy"
    assert torch.equal(grad, clone[0].factors.grad)
    assert grad.status == "dense", "reading it formed it once"
    del optimizer
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert type(model[0].factors.grad) is torch.Tensor


def test_copying_model_and_optimizer_together_keeps_training_fused():
    models, optimizers = _twins()
    _train(models[0], optimizers[0], "cpu", steps=2)
    _train(models[1], optimizers[1], "cpu", steps=2)
    model_copy, optimizer_copy = copy.deepcopy((models[0], optimizers[0]))
    layers = [layer for layer in model_copy if isinstance(layer, dwf_kernels.nn.DWFLayer)]
    assert all(_fusion.fused_by(layer.factors) == [optimizer_copy] for layer in layers)
    _train(model_copy, optimizer_copy, "cpu", steps=2)
    _train(models[1], optimizers[1], "cpu", steps=2)
    assert all(layer.factors.grad.status == "consumed" for layer in layers), "the copy trains fused"
    _assert_same_parameters(model_copy, models[1], exact=CPU_FMA)


def test_eval_forward_with_grad_enabled_holds_nothing():
    model = _model("cpu")
    optimizer = FusedSGD(model.parameters(), lr=0.1)
    x, _ = _batch("cpu")
    model(x)  # no backward: no gradient
    assert all(p.grad is None for p in model.parameters())
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


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "autocast-bf16"])
def test_torch_compile_trains_through_the_fused_step(autocast):
    # A compiled model (fullgraph: no graph break) with FusedSGD: the backward leaves lazy factor
    # gradients, which step() applies fused; the same training as eager FusedSGD and as
    # torch.optim.SGD, to rounding (the compiled graph may order the dense ops' sums differently).
    eager = _model("cpu")
    models, optimizers = _twins()
    eager_optimizer = FusedSGD(eager.parameters(), lr=0.1, momentum=0.9)
    x, y = _batch("cpu")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for model, optimizer in zip(models, optimizers, strict=True):
        compiled = torch.compile(model, fullgraph=True)
        for _ in range(3):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                loss = nn.functional.cross_entropy(compiled(x), y) + dwf_kernels.penalty(model, 1e-2)
            loss.backward()
            factors = [layer.factors for _, layer in dwf_kernels.model.dwf_layers(model)]
            lazy = optimizer is optimizers[0]
            assert all(isinstance(f.grad, LazyFactorGrad) == lazy for f in factors)
            optimizer.step()
            if lazy:  # applied by the fused step, never formed
                assert all(f.grad.status == "consumed" for f in factors)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()
    for _ in range(3):
        eager_optimizer.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = nn.functional.cross_entropy(eager(x), y) + dwf_kernels.penalty(eager, 1e-2)
        loss.backward()
        eager_optimizer.step()
    tolerance = {} if autocast is None else {"rtol": 2e-2, "atol": 2e-3}
    for (name, p), q, r in zip(models[0].named_parameters(), models[1].parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, r, msg=lambda m, name=name: f"{name} against eager: {m}", **tolerance)
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name} against torch: {m}", **tolerance)


def test_torch_compile_gradients_read_like_eager_ones():
    # Under compile the lazy gradient is the same object as in eager mode: reading it forms the
    # exact factor gradient; layers no FusedSGD updates get the ordinary one.
    models = [_model("cpu"), _model("cpu")]
    optimizer = FusedSGD(models[0].parameters(), lr=0.1)  # noqa: F841 (its life puts the layers in fused mode)
    x, y = _batch("cpu")
    torch._dynamo.reset()
    for model in models:
        compiled = torch.compile(model, fullgraph=True)
        (nn.functional.cross_entropy(compiled(x), y) + dwf_kernels.penalty(model, 1e-2)).backward()
    torch._dynamo.reset()
    for (_, a), (_, b) in zip(
        dwf_kernels.model.dwf_layers(models[0]), dwf_kernels.model.dwf_layers(models[1]), strict=True
    ):
        assert isinstance(a.factors.grad, LazyFactorGrad) and not isinstance(b.factors.grad, LazyFactorGrad)
        torch.testing.assert_close(a.factors.grad.clone(), b.factors.grad)


def _compiled_grads(model_fn, x, fused, steps=1):
    """Factor gradients of a compiled model_fn(x).sum() (formed: .clone() of a lazy one), with a
    live FusedSGD or none."""
    torch._dynamo.reset()
    model = model_fn()
    optimizer = FusedSGD(model.parameters(), lr=0.1) if fused else None
    compiled = torch.compile(model, fullgraph=True)
    for _ in range(steps):
        model.zero_grad()
        compiled(x).pow(2).sum().backward()
    grads = [(p.grad.clone(), type(p.grad)) for p in model.parameters()]
    del optimizer
    torch._dynamo.reset()
    return grads


class _Twice(nn.Module):
    """A DWF layer applied twice, and a second layer sharing the first one's factors (tied)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = dwf_kernels.nn.DWFLinear.from_dense(nn.Linear(8, 8), 2)
        self.b = dwf_kernels.nn.DWFLinear.from_dense(nn.Linear(8, 8), 2)
        self.b.factors = self.a.factors

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x))))) + 1e-2 * self.a.factors.square().sum()


def _stack():
    torch.manual_seed(0)
    return dwf_kernels.factorize(nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(16, 16), nn.Tanh())]), 2)


@pytest.mark.parametrize(
    "model_fn,x", [(_stack, torch.randn(8, 16)), (_Twice, torch.randn(4, 8))], ids=["stack", "twice"]
)
def test_torch_compile_factor_gradients_equal_the_unfused_ones(model_fn, x):
    # The compiled backward may reuse any buffer it thinks dead, and read any tensor it holds:
    # dL/dw kept for the lazy gradient must survive it (stack), and factors whose gradient the
    # graph sums (a layer used twice, tied, read by other ops) get the exact dense sum (twice).
    fused, plain = _compiled_grads(model_fn, x, True, steps=2), _compiled_grads(model_fn, x, False, steps=2)
    eager = model_fn()
    for _ in range(2):
        eager.zero_grad()
        eager(x).pow(2).sum().backward()
    for i, ((a, _), (b, _), c) in enumerate(zip(fused, plain, eager.parameters(), strict=True)):
        torch.testing.assert_close(a, b, msg=lambda m, i=i: f"parameter {i}, fused vs unfused compiled: {m}")
        torch.testing.assert_close(a, c.grad, msg=lambda m, i=i: f"parameter {i}, fused compiled vs eager: {m}")
    kinds = [kind for _, kind in fused]
    if model_fn is _stack:  # each layer's factors feed that layer only: lazy
        assert kinds[0::2] == [LazyFactorGrad] * 4, kinds


def test_torch_compile_backward_without_the_factors_leaves_nothing_behind():
    # backward(inputs=[bias]) runs the compiled backward, which files dL/dw for the factors, whose
    # gradient is then not accumulated: the next backward must not count it.
    models = [_model("cpu"), _model("cpu")]
    optimizer = FusedSGD(models[0].parameters(), lr=0.1, momentum=0.9)  # noqa: F841 (fused mode)
    x, y = _batch("cpu")
    torch._dynamo.reset()
    for model in models:
        compiled = torch.compile(model)
        bias = model[-1].bias
        nn.functional.cross_entropy(compiled(x), y).backward(inputs=[bias])
        model.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
    torch._dynamo.reset()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a.grad.clone(), b.grad, msg=lambda m, name=name: f"{name}: {m}")


def test_compiling_the_step_runs_it_eagerly():
    # torch.compile(optimizer.step): FusedSGD.step() is excluded from compilation, so it runs as
    # it does eagerly.
    models, optimizers = _twins()
    x, y = _batch("cpu")
    torch._dynamo.reset()
    for model, optimizer in zip(models, optimizers, strict=True):
        step = torch.compile(optimizer.step) if isinstance(optimizer, FusedSGD) else optimizer.step
        for _ in range(3):
            optimizer.zero_grad()
            (nn.functional.cross_entropy(model(x), y) + dwf_kernels.penalty(model, 1e-2)).backward()
            step()
    torch._dynamo.reset()
    _assert_same_parameters(models[0], models[1], exact=TORCH_CPU_FMA)


def test_reading_a_lazy_gradient_of_the_reference_backend():
    # The reference backend forms the gradient by autograd, which is off where the lazy gradient is
    # read (inside its __torch_dispatch__): it must still give the exact gradient.
    models = [_model("cpu"), _model("cpu")]
    optimizer = FusedSGD(models[0].parameters(), lr=0.1, backend="reference")  # noqa: F841 (fused mode)
    x, y = _batch("cpu")
    grads = []
    with dwf_kernels.use_backend("reference"):
        for model in models:
            loss = nn.functional.cross_entropy(model(x), y) + dwf_kernels.penalty(model, 1e-2)
            grads.append(torch.autograd.grad(loss, [layer.factors for _, layer in dwf_kernels.model.dwf_layers(model)]))
    for lazy, dense in zip(*grads, strict=True):
        assert isinstance(lazy, LazyFactorGrad) and not isinstance(dense, LazyFactorGrad)
        torch.testing.assert_close(lazy * 1, dense)


def test_a_bad_hyper_parameter_set_after_construction_changes_nothing():
    # A step refused for one group's hyper-parameters must not have updated (and consumed the
    # lazy gradients of) the groups before it: fixing the value and stepping again then works.
    models, _ = _twins()
    model, reference = models
    layers = [layer for _, layer in dwf_kernels.model.dwf_layers(model)]
    optimizer = FusedSGD(
        [{"params": layers[0].parameters()}, {"params": [p for layer in layers[1:] for p in layer.parameters()]}],
        lr=0.1,
        momentum=0.9,
    )
    twin = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, foreach=False)
    x, y = _batch("cpu")
    for m, opt in ((model, optimizer), (reference, twin)):
        opt.zero_grad()
        (nn.functional.cross_entropy(m(x), y) + dwf_kernels.penalty(m, 1e-2)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.param_groups[1]["lr"] = -0.1
    with pytest.raises(ValueError, match="FusedSGD param group 1: lr must be >= 0; got -0.1"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    optimizer.param_groups[1]["lr"] = 0.1
    optimizer.step()
    twin.step()
    _assert_same_parameters(model, reference, exact=TORCH_CPU_FMA)


@pytest.mark.parametrize("refusal", ["stepped-twice", "stale"])
def test_a_refused_gradient_in_a_later_group_changes_nothing(refusal):
    """Every group's DWF gradients are checked before any group is updated: a step refused for a
    later group's gradient (already applied, or of factors changed since) leaves the earlier groups'
    parameters and the optimizer state as they were."""
    model = _model("cpu")
    first = list(model[0].parameters())  # a DWF layer and its bias
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    optimizer = FusedSGD([{"params": first}, {"params": rest}], lr=0.1, momentum=0.9)
    factors = [p for name, p in model.named_parameters() if name.endswith("factors")]
    x, y = _batch("cpu")
    for _ in range(2):  # the second time with momentum buffers in the state
        optimizer.zero_grad()
        _loss(model, x, y).backward()
        optimizer.step()
    if refusal == "stale":  # (else: stepped again on the backward pass just applied)
        optimizer.zero_grad()
        _loss(model, x, y).backward()
        with torch.no_grad():
            factors[-1].mul_(1.0)  # changed in place after the backward pass
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    match = "already applied" if refusal == "stepped-twice" else "were changed in place"
    with pytest.raises(RuntimeError, match=match):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    after = optimizer.state_dict()
    assert after["state"].keys() == state["state"].keys()
    for key, entry in state["state"].items():
        assert torch.equal(after["state"][key]["momentum_buffer"], entry["momentum_buffer"])
    if refusal == "stale":  # the earlier group's gradient is still there to apply
        assert model[0].factors.grad.status == "lazy"


def test_a_step_refused_for_its_backend_changes_nothing():
    """A backend that cannot run the factors (the cuda backend, CPU tensors) is refused before any
    group is updated: no parameter moves, no state entry appears, the gradients stay unapplied."""
    model = _model("cpu")
    factors = [p for name, p in model.named_parameters() if name.endswith("factors")]
    others = [p for name, p in model.named_parameters() if not name.endswith("factors")]
    optimizer = FusedSGD([{"params": others}, {"params": factors}], lr=0.1, momentum=0.9, backend="cuda")
    x, y = _batch("cpu")
    _loss(model, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="backend 'cuda' runs CUDA tensors"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert len(optimizer.state) == 0
    assert all(p.grad.status == "lazy" for p in factors)


def test_a_refused_first_step_adds_no_state():
    model = _model("cpu")
    factors = [p for name, p in model.named_parameters() if name.endswith("factors")]
    others = [p for name, p in model.named_parameters() if not name.endswith("factors")]
    optimizer = FusedSGD([{"params": others}, {"params": factors}], lr=0.1, momentum=0.9)
    x, y = _batch("cpu")
    _loss(model, x, y).backward()
    with torch.no_grad():
        factors[0].mul_(1.0)
    with pytest.raises(RuntimeError, match="were changed in place"):
        optimizer.step()
    assert len(optimizer.state) == 0 and optimizer.state_dict()["state"] == {}


@pytest.mark.parametrize("multi_tensor", [True, False], ids=["multi", "per-layer"])
def test_a_model_converted_after_its_buffers_were_made_trains_as_with_torch_sgd(multi_tensor):
    # model.double() mid-training leaves the float32 momentum buffers (torch.optim.SGD keeps them
    # too, and its update adds them into the float64 parameters). The fused step cannot update such
    # a buffer along with the factors: those layers get torch's update of the dense gradient, the
    # results torch.optim.SGD's, and no step is refused (nor half applied, biases in a group of their own).
    models = [_model("cpu"), _model("cpu")]

    def groups(model):
        biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
        return [{"params": biases}, {"params": [p for p in model.parameters() if all(p is not b for b in biases)]}]

    optimizers = [FusedSGD(groups(models[0]), lr=0.1, momentum=0.9, multi_tensor=multi_tensor)]
    optimizers.append(torch.optim.SGD(groups(models[1]), lr=0.1, momentum=0.9, foreach=False))
    x, y = _batch("cpu")
    for step in range(4):
        if step == 2:
            for model in models:
                model.double()
            x = x.double()
        for model, optimizer in zip(models, optimizers, strict=True):
            optimizer.zero_grad()
            (nn.functional.cross_entropy(model(x), y) + dwf_kernels.penalty(model, 1e-2)).backward()
            optimizer.step()
        _assert_same_parameters(models[0], models[1], exact=CPU_FMA)
    buffers = [optimizer.state_dict()["state"] for optimizer in optimizers]
    assert buffers[0].keys() == buffers[1].keys()
    for key, state in buffers[0].items():
        assert state["momentum_buffer"].dtype == torch.float32  # kept, as torch keeps it
        if CPU_FMA:
            assert torch.equal(state["momentum_buffer"], buffers[1][key]["momentum_buffer"])
        else:
            torch.testing.assert_close(state["momentum_buffer"], buffers[1][key]["momentum_buffer"])


def test_hyper_parameters_are_taken_as_torch_sgd_takes_them():
    """NumPy scalars (a schedule computing in NumPy), ints and a bool momentum, as torch.optim.SGD
    takes them, with the same results."""
    np = pytest.importorskip("numpy")

    def loop(model, sgd):
        optimizer = sgd(model.parameters(), lr=np.float32(0.1), momentum=np.float64(0.9), weight_decay=0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: np.float32(0.5) ** epoch)
        x, y = _batch("cpu")
        for _ in range(3):
            optimizer.zero_grad()
            _loss(model, x, y).backward()
            optimizer.step()
            schedule.step()
        assert isinstance(optimizer.param_groups[0]["lr"], np.floating)

    _both(loop)

    def loop_int(model, sgd):
        optimizer = sgd(model.parameters(), lr=1, momentum=True, dampening=np.int64(0))
        x, y = _batch("cpu")
        for _ in range(2):
            optimizer.zero_grad()
            (_loss(model, x, y) * 1e-3).backward()
            optimizer.step()

    _both(loop_int)


def test_a_hyper_parameter_the_step_would_refuse_is_refused_at_construction():
    """NaN passes torch.optim.SGD's checks (and turns every parameter into NaN); FusedSGD refuses it
    when the group is added, naming the group and the argument, and keeps no group it refused."""
    params = list(_model("cpu").parameters())
    for name in ("lr", "momentum", "weight_decay", "dampening"):
        with pytest.raises(ValueError, match=f"FusedSGD param group 0: {name} must be a number >= 0, not NaN; got nan"):
            FusedSGD(params, **{"lr": 0.1, name: float("nan")})
    optimizer = FusedSGD(params[:2], lr=0.1)
    with pytest.raises(ValueError, match="FusedSGD param group 1: lr must be a number >= 0, not NaN; got nan"):
        optimizer.add_param_group({"params": params[2:], "lr": float("nan")})
    with pytest.raises(TypeError, match="FusedSGD param group 1: momentum must be a real number; got str"):
        optimizer.add_param_group({"params": params[2:], "momentum": "0.9"})
    with pytest.raises(TypeError, match="weight_decay must be a real number; got torch.Tensor"):
        optimizer.add_param_group({"params": params[2:], "weight_decay": torch.tensor(0.1)})
    assert len(optimizer.param_groups) == 1
    optimizer.add_param_group({"params": params[2:]})
    optimizer.param_groups[1]["lr"] = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="param group 1: lr must be a number or a one-element tensor"):
        optimizer.step()


# Ordinary PyTorch patterns: the factor gradient is an ordinary (lazy) gradient, so each behaves as
# with torch.optim.SGD. Each loop runs once with FusedSGD and once with torch.optim.SGD.


def _both(loop, options=None, exact=CPU_FMA):
    """Runs loop(model, optimizer_class) on a FusedSGD twin and a torch.optim.SGD twin; compares them."""
    models = [_model("cpu"), _model("cpu")]
    loop(models[0], FusedSGD)
    loop(models[1], lambda *a, **k: torch.optim.SGD(*a, foreach=False, **k))
    _assert_same_parameters(models[0], models[1], exact)
    return models


def _loss(model, x, y, lam=1e-2):
    return nn.functional.cross_entropy(model(x), y) + dwf_kernels.penalty(model, lam)


def test_model_zero_grad_and_a_skipped_nan_batch():
    """A backward whose loss is not finite is skipped; model.zero_grad() clears its gradient."""

    def loop(model, sgd):
        optimizer = sgd(model.parameters(), lr=0.1, momentum=0.9)
        x, y = _batch("cpu")
        for i in range(5):
            model.zero_grad()
            xi = x.clone()
            if i == 2:
                xi[0, 0, 0, 0] = float("nan")
            loss = _loss(model, xi, y)
            loss.backward()
            if not torch.isfinite(loss):
                continue
            optimizer.step()

    models = _both(loop)
    assert all(torch.isfinite(p).all() for p in models[0].parameters())


@pytest.mark.parametrize("zero_grad", ["model", "model-keep-tensors", "optimizer"])
def test_backward_without_step_fgsm(zero_grad):
    """An input-gradient pass (FGSM) backpropagates into the parameters too; clearing afterwards
    leaves only the training backward."""

    def loop(model, sgd):
        optimizer = sgd(model.parameters(), lr=0.1, momentum=0.9)
        x, y = _batch("cpu")
        for _ in range(4):
            x_in = x.clone().requires_grad_(True)
            _loss(model, x_in, y).backward()
            x_adv = (x + 0.1 * x_in.grad.sign()).detach()
            if zero_grad == "model":
                model.zero_grad()
            elif zero_grad == "model-keep-tensors":
                model.zero_grad(set_to_none=False)
            else:
                optimizer.zero_grad()
            _loss(model, x_adv, y).backward()
            optimizer.step()

    _both(loop)


@pytest.mark.parametrize("holder", ["variable", "scheduler"])
def test_a_second_optimizer_while_fused_sgd_lives(holder):
    """torch.optim.SGD trains the model while a FusedSGD of it is still alive."""
    model, reference = _model("cpu"), _model("cpu")
    fused = FusedSGD(model.parameters(), lr=0.5)
    keep = fused if holder == "variable" else torch.optim.lr_scheduler.StepLR(fused, step_size=1)
    del fused
    _train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "cpu")
    _train(reference, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9), "cpu")
    _assert_same_parameters(model, reference, exact=True)
    assert keep is not None


def test_backward_with_inputs_gan_pattern():
    """Two models, two optimizers, each backward restricted to one model's parameters."""

    def loop(models, sgd):
        gen, disc = models
        opt_g = sgd(gen.parameters(), lr=0.05, momentum=0.9)
        opt_d = sgd(disc.parameters(), lr=0.1, momentum=0.9)
        noise = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
        real = torch.randn(8, 2, 7, 7, generator=torch.Generator().manual_seed(6))
        ones, zeros = torch.ones(8), torch.zeros(8)
        bce = nn.functional.binary_cross_entropy_with_logits
        for _ in range(3):
            fake = gen(noise).view(8, 2, 7, 7)
            d_loss = bce(disc(real)[:, 0], ones) + bce(disc(fake)[:, 0], zeros) + dwf_kernels.penalty(disc, 1e-2)
            opt_d.zero_grad()
            d_loss.backward(inputs=list(disc.parameters()))
            opt_d.step()
            g_loss = bce(disc(gen(noise).view(8, 2, 7, 7))[:, 0], ones)
            opt_g.zero_grad()
            g_loss.backward(inputs=list(gen.parameters()))
            opt_g.step()

    def make():
        torch.manual_seed(7)
        gen = dwf_kernels.factorize(nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 98)), 3)
        return gen, _model("cpu")

    twins = [make(), make()]
    loop(twins[0], FusedSGD)
    loop(twins[1], lambda *a, **k: torch.optim.SGD(*a, foreach=False, **k))
    for a, b in zip(twins[0], twins[1], strict=True):
        _assert_same_parameters(a, b, exact=CPU_FMA)


def test_two_fused_sgd_on_one_model():
    """Two FusedSGD over parts of one model, and a second FusedSGD over the same parameters that is
    created while the first trains on (the first must still update the factors)."""

    def loop(model, sgd):
        first = sgd(model[0].parameters(), lr=0.02, momentum=0.9)
        second = sgd(list(model[3].parameters()) + list(model[5].parameters()), lr=0.1, momentum=0.9)
        x, y = _batch("cpu")
        for _ in range(3):
            first.zero_grad()
            second.zero_grad()
            _loss(model, x, y).backward()
            first.step()
            second.step()
        later = sgd(model.parameters(), lr=0.05)
        for optimizer in (first, later):  # the older one first, with the newer alive
            for _ in range(2):
                model.zero_grad()
                _loss(model, x, y).backward()
                optimizer.step()

    _both(loop)


def test_autograd_grad_of_the_parameters_is_the_dense_gradient():
    model, reference = _model("cpu"), _model("cpu")
    optimizer = FusedSGD(model.parameters(), lr=0.1)
    x, y = _batch("cpu")
    grads = torch.autograd.grad(_loss(model, x, y), list(model.parameters()))
    expected = torch.autograd.grad(_loss(reference, x, y), list(reference.parameters()))
    for (name, _), g, e in zip(model.named_parameters(), grads, expected, strict=True):
        assert torch.equal(g, e), name
    assert all(p.grad is None for p in model.parameters()), "autograd.grad accumulates nothing"
    del optimizer


def test_factor_grad_reads_the_dense_gradient():
    """Code that reads factors.grad (logging, an element-wise op) sees the gradient torch.optim.SGD
    would. (Clipping and GradScaler, which need only its norm and a scale: tests/test_grad_norm.py.)"""

    def loop(model, sgd):
        optimizer = sgd(model.parameters(), lr=0.1, momentum=0.9)
        x, y = _batch("cpu")
        for _ in range(3):
            optimizer.zero_grad()
            _loss(model, x, y).backward()
            model.grads = [p.grad.abs().max() for p in model.parameters()]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5, norm_type=1.0)
            optimizer.step()

    models = _both(loop)
    for a, b in zip(models[0].grads, models[1].grads, strict=True):
        assert torch.equal(a, b)


def test_accumulation_over_micro_batches():
    def loop(model, sgd):
        optimizer = sgd(model.parameters(), lr=0.1, momentum=0.9)
        x, y = _batch("cpu")
        for _ in range(3):
            optimizer.zero_grad()
            for part in range(4):
                (_loss(model, x[2 * part : 2 * part + 2], y[2 * part : 2 * part + 2]) / 4).backward()
            optimizer.step()

    # Summing dL/dw before forming the factor gradient rounds differently from summing the factor
    # gradients of each micro-batch.
    _both(loop, exact=False)


def test_a_layer_used_twice_and_zero_grad_keeping_tensors():
    def loop(model, sgd):
        optimizer = sgd(model.parameters(), lr=0.1, momentum=0.9)
        x, y = _batch("cpu")
        for _ in range(3):
            optimizer.zero_grad(set_to_none=False)
            hidden = model[:5](x)
            out = model[5](hidden) + model[5](hidden.flip(0))
            (nn.functional.cross_entropy(out, y) + dwf_kernels.penalty(model, 1e-2)).backward()
            optimizer.step()

    _both(loop, exact=False)


def test_stepping_twice_on_one_backward_is_refused():
    model = _model("cpu")
    optimizer = FusedSGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _batch("cpu")
    _loss(model, x, y).backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match=r"step\(\) was called again on the same backward pass"):
        optimizer.step()


def test_a_gradient_outliving_the_step_is_refused():
    """torch would reuse a gradient of factors that changed since; the lazy gradient refuses."""
    model = _model("cpu")
    optimizer = FusedSGD(model.parameters(), lr=0.1)
    x, y = _batch("cpu")
    grads = torch.autograd.grad(_loss(model, x, y), list(model.parameters()))
    _loss(model, x, y).backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="before its factors were changed in place"):
        grads[0].sum()
    with pytest.raises(RuntimeError, match="already applied by FusedSGD.step"):
        model[0].factors.grad.sum()
    _loss(model, x, y).backward()  # adds to the applied gradient (no zero_grad()): refused when used
    with pytest.raises(RuntimeError, match="already applied by FusedSGD.step"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with pytest.raises(RuntimeError, match=r"a backward pass ran after step\(\) without the gradients being cleared"):
        optimizer.step()
    optimizer.zero_grad()
    _loss(model, x, y).backward()
    optimizer.step()


def test_the_fused_step_counts_as_an_in_place_update():
    """Autograd sees the fused step's update (version counters), on every backend."""
    for backend in [name for name in dwf_kernels.available_backends("cpu")]:
        factors, buffer = torch.randn(3, 4, 5), torch.zeros(3, 4, 5)
        versions = factors._version, buffer._version
        dwf_kernels.dwf_sgd_step(factors, torch.randn(4, 5), None, buffer, lr=0.1, momentum=0.9, backend=backend)
        assert factors._version > versions[0] and buffer._version > versions[1], backend


def test_checkpointed_dwf_block():
    from torch.utils.checkpoint import checkpoint

    def loop(model, sgd):
        optimizer = sgd(model.parameters(), lr=0.1, momentum=0.9)
        x, y = _batch("cpu")
        for _ in range(3):
            optimizer.zero_grad()
            hidden = checkpoint(model[:4], x, use_reentrant=False)
            logits = model[5](model[4](hidden))
            (nn.functional.cross_entropy(logits, y) + 1e-2 * model[5].last_sumsq).backward()
            optimizer.step()

    _both(loop)


def test_lr_as_a_tensor_works_like_torch_sgd():
    def loop(model, sgd):
        optimizer = sgd(model.parameters(), lr=torch.tensor(0.1), momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        for _ in range(3):
            _train(model, optimizer, "cpu", steps=1)
            scheduler.step()

    _both(loop)


def test_unknown_backend_is_refused_at_construction():
    model = _model("cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        FusedSGD(model.parameters(), lr=0.1, backend="cuda-fast")


@pytest.mark.parametrize("autocast", [None, torch.float16], ids=["fp32", "autocast-fp16"])
def test_grad_scaler_works_like_torch_sgd(autocast):
    """GradScaler unscales the factor gradients (which forms them) and skips a step with inf."""

    def loop(model, sgd):
        optimizer = sgd(model.parameters(), lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1)
        x, y = _batch("cpu")
        for i in range(4):
            xi = x.clone()
            if i == 1:
                xi[0, 0, 0, 0] = float("inf")  # this step is skipped
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                loss = _loss(model, xi, y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        model.scale = scaler.get_scale()

    models = _both(loop)
    assert models[0].scale == models[1].scale == 2.0**18


def test_create_graph_gives_the_ordinary_differentiable_gradient():
    """A gradient penalty (create_graph=True) differentiates the factor gradient: it is then the
    ordinary dense one, with a graph, and training matches torch.optim.SGD."""
    model, reference = _model("cpu"), _model("cpu")
    optimizer = FusedSGD(model.parameters(), lr=0.1)
    x, y = _batch("cpu")
    grads = torch.autograd.grad(_loss(model, x, y), list(model.parameters()), create_graph=True)
    expected = torch.autograd.grad(_loss(reference, x, y), list(reference.parameters()), create_graph=True)
    for g, e in zip(grads, expected, strict=True):
        assert type(g) is torch.Tensor and g.grad_fn is not None
        assert torch.equal(g, e)
    del optimizer

    def loop(model, sgd):
        optimizer = sgd(model.parameters(), lr=0.1, momentum=0.9)
        x, y = _batch("cpu")
        for _ in range(3):
            optimizer.zero_grad()
            loss = _loss(model, x, y)
            grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
            (loss + 0.1 * sum(g.square().sum() for g in grads)).backward()
            optimizer.step()

    # Bitwise where the C++ CPU kernels serve. Without them (no extension built) the reference
    # backend's differentiable gradient sums the second-order terms in another order than plain
    # autograd does: equal to rounding (a few ulp).
    _both(loop, exact=CPU_FMA and "cpu" in dwf_kernels._extension.KERNEL_DEVICES)


def test_the_lazy_gradient_reads_like_the_dense_one(tmp_path):
    model, reference = _model("cpu"), _model("cpu")
    optimizer = FusedSGD(model.parameters(), lr=0.1)
    x, y = _batch("cpu")
    _loss(model, x, y).backward()
    _loss(reference, x, y).backward()
    grad, dense = model[3].factors.grad, reference[3].factors.grad
    assert isinstance(grad, LazyFactorGrad) and grad.status == "lazy"
    assert grad.shape == dense.shape and grad.dtype == dense.dtype and grad.device == dense.device
    assert torch.equal(grad[1], dense[1]) and torch.equal(grad.view(-1), dense.view(-1))
    assert (grad.numpy() == dense.numpy()).all() and grad.tolist() == dense.tolist()
    assert grad.sum().item() == dense.sum().item() and torch.equal(grad.data, dense)
    assert type(copy.deepcopy(grad)) is torch.Tensor and torch.equal(copy.deepcopy(grad), dense)
    torch.save(grad, tmp_path / "grad.pt")
    assert torch.equal(torch.load(tmp_path / "grad.pt"), dense)
    grad.view(-1).mul_(2)  # in-place through a view changes the gradient, as for a dense one
    assert torch.equal(grad, 2 * dense)
    del optimizer


def test_foreach_zero_grad_keeping_tensors_after_a_fused_step():
    def loop(model, sgd):
        optimizer = sgd(model.parameters(), lr=0.1, momentum=0.9)
        optimizer.defaults["foreach"] = True  # zero_grad then zeroes with one _foreach_zero_
        x, y = _batch("cpu")
        for _ in range(3):
            optimizer.zero_grad(set_to_none=False)
            _loss(model, x, y).backward()
            optimizer.step()

    _both(loop)


def test_model_conversions_convert_the_factor_gradient():
    """model.double() / .to() convert parameter gradients too: a lazy one as the dense gradient it
    stands for; one FusedSGD has applied stays refused, and training goes on after it."""
    model, reference = _model("cpu"), _model("cpu")
    optimizer = FusedSGD(model.parameters(), lr=0.1)
    x, y = _batch("cpu")
    _loss(model, x, y).backward()
    _loss(reference, x, y).backward()
    model.double().to(memory_format=torch.channels_last)
    reference.double()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.grad.dtype == torch.float64 and torch.equal(p.grad, q.grad)
    optimizer.zero_grad()
    _loss(model, x.double(), y).backward()
    optimizer.step()
    model.float()
    grad = model[0].factors.grad
    assert grad.dtype == torch.float32 and grad.status == "consumed"
    with pytest.raises(RuntimeError, match="already applied by FusedSGD.step"):
        grad.sum()
    _train(model, optimizer, "cpu", steps=2)


def test_functional_call_with_tensors_gives_ordinary_gradients():
    """functional_call swaps tensors in for the parameters (MAML-style inner loops): those are not
    what FusedSGD updates, and get ordinary gradients equal to the plain chain's."""
    from torch.func import functional_call

    model, reference = _model("cpu"), _model("cpu")
    optimizer = FusedSGD(model.parameters(), lr=0.1)
    x, y = _batch("cpu")
    grads = []
    for m in (model, reference):
        params = {name: p.detach().clone().requires_grad_(True) for name, p in m.named_parameters()}
        loss = nn.functional.cross_entropy(functional_call(m, params, (x,)), y) + dwf_kernels.penalty(m, 1e-2)
        loss.backward()
        grads.append([p.grad for p in params.values()])
    for g, e in zip(*grads, strict=True):
        assert type(g) is torch.Tensor and torch.equal(g, e)
    del optimizer


# The link between layers and optimizers is on the factors Parameter (dwf_kernels._fusion).


def test_a_layer_shared_by_two_models_and_tied_layers_are_fused():
    shared = dwf_kernels.nn.DWFLinear(6, 6, depth=3)
    tied = dwf_kernels.nn.DWFLinear(6, 6, depth=3)
    tied.factors = shared.factors  # tied weights: one factor parameter, two layers
    first, second = nn.Sequential(shared, nn.ReLU()), nn.Sequential(nn.Tanh(), shared, tied)
    optimizer = FusedSGD(first.parameters(), lr=0.1)
    assert _fusion.fused_by(shared.factors) == [optimizer]
    x = torch.randn(4, 6)
    for layer in (shared, tied):
        layer(x)
        assert "FusedDWFProduct" in type(layer.last_sumsq.grad_fn).__name__, "fused forward"
    first(x).sum().backward()
    grad = shared.factors.grad
    assert isinstance(grad, LazyFactorGrad) and grad.status == "lazy"
    optimizer.step()
    assert grad.status == "consumed"
    del optimizer
    shared.zero_grad()
    out = second(x)
    assert "FusedDWFProduct" not in type(tied.last_sumsq.grad_fn).__name__
    out.sum().backward()
    assert type(shared.factors.grad) is torch.Tensor, "without a live FusedSGD the gradient is ordinary"


def test_a_factors_parameter_assigned_later_follows_its_optimizer():
    layer = dwf_kernels.nn.DWFLinear(5, 4, depth=2)
    layer.factors = nn.Parameter(layer.factors.detach().clone())
    optimizer = FusedSGD(layer.parameters(), lr=0.1)
    layer(torch.randn(3, 5)).sum().backward()
    assert isinstance(layer.factors.grad, LazyFactorGrad)
    layer.factors = nn.Parameter(layer.factors.detach().clone())  # not what the optimizer updates
    layer(torch.randn(3, 5)).sum().backward()
    assert type(layer.factors.grad) is torch.Tensor
    del optimizer


def test_pickling_model_and_optimizer_together_keeps_training_fused(tmp_path):
    models, optimizers = _twins()
    _train(models[0], optimizers[0], "cpu", steps=2)
    _train(models[1], optimizers[1], "cpu", steps=2)
    torch.save((optimizers[0], models[0]), tmp_path / "both.pt")  # the optimizer first
    optimizer_copy, model_copy = torch.load(tmp_path / "both.pt", weights_only=False)
    alone = torch.load(tmp_path / "both.pt", weights_only=False)[1]
    layers = [layer for layer in model_copy if isinstance(layer, dwf_kernels.nn.DWFLayer)]
    assert all(_fusion.fused_by(layer.factors) == [optimizer_copy] for layer in layers)
    assert all(_fusion.fused_by(layer.factors) == [] for layer in alone if isinstance(layer, dwf_kernels.nn.DWFLayer))
    _train(model_copy, optimizer_copy, "cpu", steps=2)
    _train(models[1], optimizers[1], "cpu", steps=2)
    assert all(layer.factors.grad.status == "consumed" for layer in layers)
    _assert_same_parameters(model_copy, models[1], exact=CPU_FMA)


def test_saved_factor_parameters_load_with_weights_only(tmp_path):
    model = _model("cpu")
    optimizer = FusedSGD(model.parameters(), lr=0.1)
    torch.save(list(model.parameters()), tmp_path / "params.pt")
    loaded = torch.load(tmp_path / "params.pt", weights_only=True)
    for p, q in zip(model.parameters(), loaded, strict=True):
        assert torch.equal(p, q)
    assert _fusion.fused_by(loaded[0]) == [] and _fusion.fused_by(model[0].factors) == [optimizer]


@pytest.mark.parametrize("switch", ["swap", "overwrite"])
def test_conversions_that_replace_parameters_keep_fused_mode(switch):
    set_switch = getattr(torch.__future__, f"set_{switch}_module_params_on_conversion")
    model = _model("cpu")
    optimizer = FusedSGD(model.parameters(), lr=0.1)
    set_switch(True)
    try:
        model.double()
    finally:
        set_switch(False)
    x, y = _batch("cpu")
    _loss(model, x.double(), y).backward()
    assert isinstance(model[0].factors.grad, LazyFactorGrad)
    del optimizer


def test_torch_sgd_arguments_fused_sgd_cannot_honour_are_refused():
    params = list(_model("cpu").parameters())
    FusedSGD(params, lr=0.1, fused=None, differentiable=False)  # torch.optim.SGD's defaults
    with pytest.raises(ValueError, match="differentiable=True"):
        FusedSGD(params, lr=0.1, differentiable=True)
    with pytest.raises(ValueError, match="fused=True selects torch.optim.SGD's own fused kernel"):
        FusedSGD(params, lr=0.1, fused=True)
