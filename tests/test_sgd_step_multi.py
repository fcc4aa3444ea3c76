"""dwf_sgd_step_multi, the fused step over many layers in one call, and FusedSGD's use of it: the
same results as one dwf_sgd_step per layer (bitwise on every backend), one op call per set of
layers, and its argument checks."""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_BACKENDS, TORCH_CPU_FMA, make_factors
from torch import nn

import dwf_kernels
from dwf_kernels import _extension, _group_step, backends, dwf_sgd_step, dwf_sgd_step_multi
from dwf_kernels.optim import FusedSGD

ALL_BACKENDS = KERNEL_BACKENDS + [pytest.param("cpu", "reference", id="cpu-reference")]
OPTIONS = [
    pytest.param({"lr": 0.1}, id="plain"),
    pytest.param({"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}, id="nesterov-wd"),
    pytest.param({"lr": 0.2, "momentum": 0.5, "dampening": 0.3, "maximize": True}, id="dampening-maximize"),
]
# Layers of one set: sizes below and above the CPU kernels' chunk of 16384 elements, and empty.
SHAPES = [(64, 64), (7,), (300, 100), (0,), (129, 257), ()]


def _layers(dtype, grad_dtype, depth, device, seed=0):
    factors = [make_factors(depth, shape, dtype, device, seed=seed + i) for i, shape in enumerate(SHAPES)]
    grad_w = [make_factors(1, shape, grad_dtype, device, seed=100 + seed + i)[0] for i, shape in enumerate(SHAPES)]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad_sumsq = [torch.tensor(0.01 * i, dtype=acc, device=device) if i % 2 else None for i in range(len(SHAPES))]
    return factors, grad_w, grad_sumsq


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "dtype,grad_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
    ],
    ids=str,
)
@pytest.mark.parametrize("depth", [1, 4, 9])
@pytest.mark.parametrize("options", OPTIONS)
def test_multi_step_equals_one_step_per_layer_bitwise(device, backend, dtype, grad_dtype, depth, options):
    factors, grad_w, grad_sumsq = _layers(dtype, grad_dtype, depth, device)
    each = [f.clone() for f in factors]
    together = [f.clone() for f in factors]
    buffers_each = [None] * len(factors)
    buffers_together = None
    for _ in range(3):  # the first step makes the buffers, the next ones read them
        for i, f in enumerate(each):
            buffers_each[i] = dwf_sgd_step(f, grad_w[i], grad_sumsq[i], buffers_each[i], backend=backend, **options)
        buffers_together = dwf_sgd_step_multi(
            together, grad_w, grad_sumsq, buffers_together, backend=backend, **options
        )
    for i, (a, b) in enumerate(zip(each, together, strict=True)):
        assert torch.equal(a, b), f"layer {i} differs"
    if options.get("momentum", 0):
        assert all(torch.equal(a, b) for a, b in zip(buffers_each, buffers_together, strict=True))
    else:
        assert buffers_together is None


def test_multi_step_bumps_versions_and_refuses_bad_arguments():
    factors, grad_w, grad_sumsq = _layers(torch.float32, torch.float32, 3, "cpu")
    versions = [f._version for f in factors]
    buffers = dwf_sgd_step_multi(factors, grad_w, grad_sumsq, lr=0.1, momentum=0.9)
    assert all(f._version > v for f, v in zip(factors, versions, strict=True))
    with pytest.raises(ValueError, match=r"grad_w must have one entry per factors tensor \(6\); got 5"):
        dwf_sgd_step_multi(factors, grad_w[:5], grad_sumsq, buffers, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum_buffers must have one entry per factors tensor"):
        dwf_sgd_step_multi(factors, grad_w, grad_sumsq, buffers[:2], lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match="factors must be a list of tensors"):
        dwf_sgd_step_multi(factors[0], grad_w, grad_sumsq, lr=0.1)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        dwf_sgd_step_multi(factors, grad_w, grad_sumsq, lr=-1.0)
    before = [f.clone() for f in factors]
    bad_grad_w = list(grad_w)
    bad_grad_w[3] = torch.ones(5)  # the empty layer's dL/dw with the wrong shape
    for backend in ("cpu", "reference") if _extension.LOADED else ("reference",):
        with pytest.raises((RuntimeError, ValueError), match="grad_w"):
            dwf_sgd_step_multi(factors, bad_grad_w, grad_sumsq, lr=0.1, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(factors, before, strict=True)), "no layer may be updated"
    assert dwf_sgd_step_multi([], [], [], lr=0.1, momentum=0.9) == []


@pytest.mark.skipif(not _extension.LOADED, reason="C++ extension not loaded")
def test_opcheck_multi_step():
    op = torch.ops.dwf_kernels.dwf_sgd_step_multi
    factors, grad_w, grad_sumsq = _layers(torch.float32, torch.float32, 3, "cpu")
    buffers = [torch.zeros_like(f) for f in factors]
    torch.library.opcheck(op.default, (factors, buffers, grad_w, grad_sumsq, 0.1, 0.9, 0.0, 0.0, False, False, True))
    torch.library.opcheck(op.default, (factors, [], grad_w, grad_sumsq, 0.1, 0.0, 0.0, 0.0, False, False, False))
    with pytest.raises(RuntimeError, match="momentum_buffers must have no entries when momentum is 0"):
        op(factors, buffers, grad_w, grad_sumsq, 0.1, 0.0, 0.0, 0.0, False, False, False)


def _many_layers(seed=0):
    torch.manual_seed(seed)
    blocks = [m for _ in range(12) for m in (nn.Linear(32, 32), nn.ReLU())]
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 32), *blocks, nn.Linear(32, 5)
    )
    return dwf_kernels.factorize(model, 4)


def _train(model, optimizer, steps=4, autocast=None):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 2, 8, 8, generator=gen), torch.randint(0, 5, (16,), generator=gen)
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = nn.functional.cross_entropy(model(x), y) + dwf_kernels.penalty(model, 1e-2)
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "autocast-bf16"])
def test_fused_sgd_steps_all_layers_in_one_call_with_the_per_layer_results(monkeypatch, autocast):
    backend = dwf_kernels.available_backends("cpu")[0]
    calls = {"multi": 0, "single": 0}
    chosen = backends.REGISTRY[backend]
    multi, single = chosen.sgd_step_multi, chosen.sgd_step

    def count_multi(*args):
        calls["multi"] += 1
        return multi(*args)

    def count_single(*args):
        calls["single"] += 1
        return single(*args)

    monkeypatch.setattr(chosen, "sgd_step_multi", count_multi)
    monkeypatch.setattr(chosen, "sgd_step", count_single)
    models = [_many_layers(), _many_layers()]
    optimizers = [
        FusedSGD(models[0].parameters(), lr=0.1, momentum=0.9, multi_tensor=True),
        FusedSGD(models[1].parameters(), lr=0.1, momentum=0.9, multi_tensor=False),
    ]
    _train(models[0], optimizers[0], autocast=autocast)
    layers = len(dwf_kernels.model.dwf_layers(models[0]))
    assert layers == 15
    # One call per step: all layers share device, dtypes and buffer state (depth 4 everywhere).
    assert calls == {"multi": 4, "single": 0 if chosen.multi_native else 4 * layers}, calls
    calls.update(multi=0, single=0)
    _train(models[1], optimizers[1], autocast=autocast)
    assert calls == {"multi": 0, "single": 4 * layers}, calls
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b), name
    assert optimizers[0].state_dict()["state"].keys() == optimizers[1].state_dict()["state"].keys()


def test_cpu_layers_of_different_depths_and_dtypes_step_in_one_call(monkeypatch):
    # On CPU every backend takes any mix of depths and dtypes in one call (each layer its own
    # kernel), so the sets are only "with momentum buffers" and "without"; results as layer by layer.
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
        model[0] = dwf_kernels.nn.DWFLinear.from_dense(model[0], 2)
        model[1] = dwf_kernels.nn.DWFLinear.from_dense(model[1], 3)
        model[2] = dwf_kernels.nn.DWFLinear.from_dense(model[2], 3).double()
        return model

    sets = []
    original = _group_step._run_sgd_step_multi

    def record(chosen, factors, *args, **kwargs):
        sets.append(sorted((f.shape[0], str(f.dtype)) for f in factors))
        return original(chosen, factors, *args, **kwargs)

    monkeypatch.setattr(_group_step, "_run_sgd_step_multi", record)
    models = [make(), make()]
    optimizers = [FusedSGD(models[0].parameters(), lr=0.1, momentum=0.9)]
    optimizers.append(FusedSGD(models[1].parameters(), lr=0.1, momentum=0.9, multi_tensor=False))
    x = torch.randn(4, 8)
    for _ in range(3):  # the first step makes the momentum buffers, the next ones read them
        for model, optimizer in zip(models, optimizers, strict=True):
            optimizer.zero_grad()
            model[2](model[1](model[0](x)).double()).sum().backward()
            optimizer.step()
    assert sets == [[(2, "torch.float32"), (3, "torch.float32"), (3, "torch.float64")]] * 3
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b), name


def _same_sets(a, b) -> bool:
    """Two results of FusedSGD's sorting hold the same objects in the same places."""
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_sets(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_sets(a[k], b[k]) for k in a)
    if type(a) is torch.Tensor and type(b) is torch.Tensor and a is not b:  # a dL/dw of zeros made for the step
        return a.shape == b.shape and torch.equal(a, b)
    return a is b or (type(a) in (bool, str) and a == b)


def _sortings(optimizer):
    """(sort_group's sets, the per-parameter loop's sets, or the error each raised) of the first group."""
    group = optimizer.param_groups[0]
    hyper = {k: group[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")}
    results = []
    for sort in (
        lambda: _group_step.sort_group(group, hyper, optimizer.state, None, True),
        lambda: _group_step._sort_each(group["params"], hyper, optimizer.state, None, True),
    ):
        try:
            results.append(sort())
        except RuntimeError as e:
            results.append(str(e))
    return results


@pytest.mark.skipif(_group_step._PLAIN_SGD_STEP_MULTI is None, reason="needs the one-call CPU update")
@pytest.mark.parametrize(
    "case",
    [
        "steady",
        "first-step",
        "new-parameter",
        "read-gradient",
        "unused-layer",
        "bf16-parameter",
        "sparse-gradient",
        "no-gradient",
        "stepped-twice",
        "stale",
        "converted",
    ],
)
def test_the_steady_state_sorting_sorts_as_the_per_parameter_loop(case):
    # The step sorts a CPU group with momentum whose every parameter is either a DWF layer with its
    # lazy gradient or a plain float tensor, all with momentum buffers, in a few list passes; every
    # other group goes to the loop, parameter by parameter. Either way: the same sets (or error).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Embedding(5, 6, sparse=case == "sparse-gradient"))
    model = dwf_kernels.factorize(model, 3)
    optimizer = FusedSGD(model.parameters(), lr=0.1, momentum=0.9)
    extra = nn.Parameter(torch.randn(3, dtype=torch.bfloat16 if case == "bf16-parameter" else torch.float32))
    if case == "bf16-parameter":  # from the start: it has a momentum buffer when sorted
        optimizer.param_groups[0]["params"].append(extra)
    x = torch.randn(4, 6)

    def backward():
        optimizer.zero_grad()
        out = model[0](x) if case == "unused-layer" else model[1](model[0](x).to(model[1].factors.dtype))
        (out.sum() + model[2](torch.tensor([1, 2])).sum() + dwf_kernels.penalty(model, 1e-2)).backward()
        extra.grad = torch.ones_like(extra)

    if case != "first-step":
        backward()
        optimizer.step()
    if case == "new-parameter":
        optimizer.param_groups[0]["params"].append(extra)
    backward()
    if case == "read-gradient":
        model[1].factors.grad.sum()
    elif case == "no-gradient":
        model[0].bias.grad = None
    elif case == "stepped-twice":
        optimizer.step()
    elif case == "stale":
        with torch.no_grad():
            model[0].factors.mul_(1.0)
    elif case == "converted":  # float64 factors with the float32 momentum buffers of before
        model[1].double()
        backward()
    fast, each = _sortings(optimizer)
    assert _same_sets(fast, each)
    steady = case in ("steady", "no-gradient")
    params = optimizer.param_groups[0]["params"]
    assert (_group_step._sort_steady_cpu(params, optimizer.state, None) is not None) == steady
    if steady:  # the layers in one set, the plain parameters in another, nothing left to torch
        fused, plain, *rest = fast
        assert [len(lists[0]) for _, lists, _ in fused] == [2] and rest == [[], [], [], []]
        # two biases and the embedding's weight (not a DWF layer)
        assert [len(lists[0]) for lists in plain.values()] == [3 if case == "steady" else 2]


def test_multi_tensor_must_be_a_bool():
    with pytest.raises(TypeError, match="multi_tensor must be True or False"):
        FusedSGD(nn.Linear(2, 2).parameters(), lr=0.1, multi_tensor="yes")


TRITON_BACKENDS = [p for p in KERNEL_BACKENDS if p.values[1] == "triton"]


@pytest.mark.parametrize("device,backend", TRITON_BACKENDS)
def test_triton_steps_many_layers_per_launch_bitwise(device, backend, monkeypatch):
    """Past one launch's slots: layers of two depths, two factor dtypes, with and without a penalty
    term, empty ones; each set in launches of up to MULTI_SLOTS layers, every layer as dwf_sgd_step
    updates it."""
    from dwf_kernels.backends import _triton_multi_step as K

    shapes = [(5, 3), (64,), (300,), (0,), (33, 7), (1,), (129,), (16, 16), (1000,), (2,), (8, 9, 3)]
    specs = [(d, t, s) for d in (2, 4) for t in (torch.float32, torch.bfloat16) for s in shapes[: 7 + d]]
    specs = [(3, torch.float64, (37,))] + specs + [(3, torch.float64, (5, 5))]  # fp64 sets first and last
    factors = [make_factors(d, s, t, device, seed=i) for i, (d, t, s) in enumerate(specs)]
    grad_w = [make_factors(1, s, t, device, seed=500 + i)[0] for i, (_, t, s) in enumerate(specs)]
    grad_sumsq = [
        torch.tensor(0.003 * i, dtype=torch.float64 if t == torch.float64 else torch.float32, device=device)
        if i % 3
        else None
        for i, (_, t, _) in enumerate(specs)
    ]
    launches = []
    kernel = K._dwf_sgd_step_multi_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(K, "_dwf_sgd_step_multi_kernel", Counting())
    options = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
    each = [f.clone() for f in factors]
    buffers_each = [None] * len(factors)
    together, buffers = [f.clone() for f in factors], None
    for _ in range(2):
        for i, f in enumerate(each):
            buffers_each[i] = dwf_sgd_step(f, grad_w[i], grad_sumsq[i], buffers_each[i], backend=backend, **options)
        buffers = dwf_sgd_step_multi(together, grad_w, grad_sumsq, buffers, backend=backend, **options)
    for i, (a, b) in enumerate(zip(each, together, strict=True)):
        assert torch.equal(a, b) and torch.equal(buffers_each[i], buffers[i]), f"layer {i} {specs[i]} differs"
    # Sets of (depth, dtype, penalty or not), empty layers left out, each in ceil(layers / slots) launches.
    sets: dict = {}
    for i, (d, t, _) in enumerate(specs):
        if factors[i].numel():
            sets[(d, t, grad_sumsq[i] is not None)] = sets.get((d, t, grad_sumsq[i] is not None), 0) + 1
    per_step = sum(-(-count // K.MULTI_SLOTS) for count in sets.values())
    assert len(launches) == 2 * per_step < len(specs), (len(launches), per_step)


@pytest.mark.parametrize("device,backend", TRITON_BACKENDS)
def test_triton_multi_step_refuses_a_bad_layer_before_any_launch(device, backend):
    factors, grad_w, grad_sumsq = _layers(torch.float32, torch.float32, 3, device)
    before = [f.clone() for f in factors]
    bad = list(grad_w)
    bad[4] = torch.ones(5, device=device)
    with pytest.raises(ValueError, match="grad_w"):
        dwf_sgd_step_multi(factors, bad, grad_sumsq, lr=0.1, momentum=0.9, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(factors, before, strict=True)), "no layer may be updated"


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_layers_that_share_written_memory_are_refused(device, backend):
    """The layers are stepped together (concurrently on a GPU, in parallel on the CPU): a tensor one
    layer writes must not be another layer's. Reads may share memory."""
    factors, grad_w, grad_sumsq = _layers(torch.float32, torch.float32, 3, device)
    buffers = [torch.zeros_like(f) for f in factors]
    before = [f.clone() for f in factors]
    inside = factors[0].view(-1)  # memory of layer 0's factors, for layer 1's tensors
    cases = {
        "the same factors twice": ([factors[0], factors[0]], [grad_w[0], grad_w[0]], [None, None], None),
        "a buffer that is another layer's factors": (
            factors[:2],
            grad_w[:2],
            grad_sumsq[:2],
            [buffers[0], inside[: buffers[1].numel()].view(buffers[1].shape)],
        ),
        "dL/dw that is a view of another layer's factors": (
            factors[:2],
            [grad_w[0], inside[: grad_w[1].numel()].view(grad_w[1].shape)],
            grad_sumsq[:2],
            buffers[:2],
        ),
    }
    for what, (f, g, s, b) in cases.items():
        with pytest.raises(ValueError, match="share memory"):
            dwf_sgd_step_multi(f, g, s, b, lr=0.1, momentum=0.9, backend=backend)
        assert all(torch.equal(x, y) for x, y in zip(factors, before, strict=True)), f"{what}: a layer was updated"
    # Two layers reading one dL/dw: allowed, and each steps as alone.
    shared = [f.clone() for f in (factors[0], factors[0])]
    dwf_sgd_step_multi(shared, [grad_w[0], grad_w[0]], [None, None], lr=0.1, backend=backend)
    alone = factors[0].clone()
    dwf_sgd_step(alone, grad_w[0], None, lr=0.1, backend=backend)
    assert torch.equal(shared[0], alone) and torch.equal(shared[1], alone)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_buffers_given_with_momentum_0_are_still_checked(device, backend):
    factors, grad_w, grad_sumsq = _layers(torch.float32, torch.float32, 3, device)
    with pytest.raises(ValueError, match="momentum_buffer must be a contiguous tensor with the factors' shape"):
        dwf_sgd_step_multi(
            factors[:1], grad_w[:1], grad_sumsq[:1], [torch.zeros(3, device=device)], lr=0.1, backend=backend
        )
    buffers = [torch.zeros_like(f) for f in factors]
    assert dwf_sgd_step_multi(factors, grad_w, grad_sumsq, buffers, lr=0.1, backend=backend) is None
    assert all(not b.any() for b in buffers), "momentum 0 leaves the buffers alone"


@pytest.mark.filterwarnings("error")  # refused before torch's warning that this will become an error
def test_fused_sgd_refuses_a_parameter_listed_twice():
    model = dwf_kernels.factorize(nn.Sequential(nn.Linear(4, 4)), 3)
    with pytest.raises(ValueError, match="holds the same parameter more than once"):
        FusedSGD([model[0].factors, model[0].factors], lr=0.1)
    with pytest.raises(ValueError, match="holds the same parameter more than once"):
        FusedSGD(p for p in [model[0].factors, model[0].bias, model[0].factors])
    with pytest.raises(ValueError, match="holds the same parameter more than once"):  # named, as torch takes them
        FusedSGD([*model.named_parameters(), ("again", model[0].factors)], lr=0.1)
    optimizer = FusedSGD([model[0].factors], lr=0.1)
    with pytest.raises(ValueError, match="holds the same parameter more than once"):
        optimizer.add_param_group({"params": [model[0].bias, model[0].bias]})
    assert len(optimizer.param_groups) == 1
    optimizer.add_param_group({"params": (p for p in [model[0].bias])})  # an iterator, read once
    assert optimizer.param_groups[1]["params"] == [model[0].bias]


# The parameters that are not DWF factors (biases, norms): FusedSGD updates the plain float32 and
# float64 CPU ones with one sgd_step_multi call, which must equal torch.optim.SGD bit for bit.

PLAIN_SHAPES = [(64,), (7,), (300, 100), (0,), (129, 257), (), (3, 5, 2)]
PLAIN_OPTIONS = [
    *OPTIONS,
    pytest.param({"lr": 0.1, "momentum": 0.9}, id="momentum"),
    pytest.param({"lr": 0.1, "weight_decay": 0.01, "maximize": True}, id="wd-maximize-no-momentum"),
]
needs_cpu_kernels = pytest.mark.skipif(
    "cpu" not in _extension.KERNEL_DEVICES, reason="the C++ extension's CPU kernels are not loaded"
)
needs_plain_step = pytest.mark.skipif(
    _group_step._PLAIN_SGD_STEP_MULTI is None,
    reason="FusedSGD updates plain parameters in one call only where ATen's CPU kernels use FMA",
)


def _plain_params(dtype, seed=0):
    """dtype None: float32 and float64 in turn (one op call takes both)."""
    gen = torch.Generator().manual_seed(seed)
    alternating = [(torch.float32, torch.float64)[i % 2] for i in range(len(PLAIN_SHAPES))]
    dtypes = [dtype] * len(PLAIN_SHAPES) if dtype else alternating
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=t)) for s, t in zip(PLAIN_SHAPES, dtypes, strict=True)]


@needs_plain_step
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, None], ids=["float32", "float64", "mixed"])
@pytest.mark.parametrize("options", PLAIN_OPTIONS)
@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
def test_plain_parameters_step_in_one_call_as_torch_sgd(dtype, options, foreach):
    ours, theirs = _plain_params(dtype), _plain_params(dtype)
    fused = FusedSGD(ours, **options)
    reference = torch.optim.SGD(theirs, foreach=foreach, **options)
    gen = torch.Generator().manual_seed(5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(4):  # the first step makes the buffers, the next ones read them
            for a, b in zip(ours, theirs, strict=True):
                a.grad = torch.randn(a.shape, generator=gen, dtype=a.dtype)
                b.grad = a.grad.clone()
            fused.step()
            reference.step()
    calls = {e.key: e.count for e in prof.key_averages() if e.key.startswith("dwf_kernels::")}
    assert calls == {"dwf_kernels::sgd_step_multi": 4}, calls
    _assert_as_torch(ours, theirs)
    assert fused.state_dict()["state"].keys() == reference.state_dict()["state"].keys()
    for a, b in zip(ours, theirs, strict=True):
        if options.get("momentum", 0):
            _assert_as_torch([fused.state[a]["momentum_buffer"]], [reference.state[b]["momentum_buffer"]])
        else:
            assert "momentum_buffer" not in fused.state[a]


def _assert_as_torch(ours, theirs):
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.shape == b.shape
        if TORCH_CPU_FMA:
            assert torch.equal(a, b), f"tensor {i} differs"
        else:  # torch's SIMD a*b+c rounds twice on CPUs without FMA; the kernels' once
            torch.testing.assert_close(a, b)


@needs_plain_step
def test_plain_parameters_the_one_call_cannot_serve_take_torch_sgd():
    # bf16 (torch rounds each op of its update) and a sparse gradient: never handed to the op; a
    # non-contiguous parameter, a non-contiguous gradient, a momentum buffer made non-contiguous
    # (state edited between steps): left alone by the op. All get torch's own update, with its
    # results; the first step makes their buffers as torch does.
    gen = torch.Generator().manual_seed(0)
    ours = [
        nn.Parameter(torch.randn(8, generator=gen).bfloat16()),
        nn.Parameter(torch.randn(6, 4, generator=gen).t()),
        nn.Parameter(torch.randn(5, 3, generator=gen)),
        nn.Parameter(torch.randn(4, generator=gen)),
        nn.Parameter(torch.randn(4, generator=gen)),
        nn.Parameter(torch.randn(3, 4, generator=gen)),
    ]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    fused, reference = FusedSGD(ours, lr=0.1, momentum=0.9), torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    for step in range(3):
        grads = [
            torch.randn(8, generator=gen).bfloat16(),
            torch.randn(4, 6, generator=gen),
            torch.randn(5, 3, generator=gen).to_sparse(),
            torch.randn(8, generator=gen)[::2],
            torch.randn(4, generator=gen),
            torch.randn(3, 4, generator=gen),
        ]
        for a, b, g in zip(ours, theirs, grads, strict=True):
            a.grad, b.grad = g.clone(), g.clone()  # clone keeps the strides
        if step == 2:
            for optimizer, p in ((fused, ours[5]), (reference, theirs[5])):
                buffer = optimizer.state[p]["momentum_buffer"]
                optimizer.state[p]["momentum_buffer"] = torch.empty(4, 3).t().copy_(buffer)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fused.step()
        reference.step()
        calls = {e.key: e.count for e in prof.key_averages() if e.key.startswith("dwf_kernels::")}
        assert calls == {"dwf_kernels::sgd_step_multi": 1}, calls
        for a, b in zip(ours, theirs, strict=True):
            buffers = [optimizer.state[p]["momentum_buffer"] for optimizer, p in ((fused, a), (reference, b))]
            _assert_as_torch(*([t.to_dense()] for t in buffers))  # the sparse gradient's buffer is sparse
    _assert_as_torch(ours, theirs)


@needs_cpu_kernels
def test_plain_step_op_refuses_bad_arguments_and_passes_opcheck():
    op = torch.ops.dwf_kernels.sgd_step_multi
    params = [torch.randn(s) for s in PLAIN_SHAPES]
    grads = [torch.randn(s) for s in PLAIN_SHAPES]
    buffers = [torch.zeros(s) for s in PLAIN_SHAPES]
    torch.library.opcheck(op.default, (params, buffers, grads, 0.1, 0.9, 0.0, 0.0, False, False, True))
    torch.library.opcheck(op.default, (params, [], grads, 0.1, 0.0, 0.0, 0.01, False, True, False))
    left = [*params[:6], params[6].bfloat16()]  # opcheck on a call that leaves one alone too
    torch.library.opcheck(op.default, (left, buffers, grads, 0.1, 0.9, 0.0, 0.0, False, False, True))
    before = [p.clone() for p in params]
    hyper = (0.1, 0.9, 0.0, 0.0, False, False, False)
    bad = [
        ("grads", (params, buffers, grads[:2]), r"grads \(2\) must have one entry per param \(7\)"),
        ("buffers", (params, buffers[:1], grads), "momentum_buffers must have one entry per param"),
        ("aliased", (params, [*buffers[:6], params[6]], grads), "momentum_buffer and param share memory"),
    ]
    for name, args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            op(*args, *hyper)
        assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True)), f"{name}: nothing may be updated"


@needs_cpu_kernels
def test_plain_step_op_leaves_alone_what_it_cannot_update_as_torch_does():
    """A param of another dtype or not contiguous, a gradient or momentum buffer not a contiguous
    tensor of its shape and dtype: left alone and its index returned (an int64 tensor, for torch's
    own update); the others updated exactly as without it."""
    op = torch.ops.dwf_kernels.sgd_step_multi
    hyper = (0.1, 0.9, 0.0, 0.0, False, False, False)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in PLAIN_SHAPES]
    grads = [torch.randn(s, generator=gen) for s in PLAIN_SHAPES]
    buffers = [torch.randn(s, generator=gen) for s in PLAIN_SHAPES]
    expected = [p.clone() for p in params[:6]]
    expected_buffers = [b.clone() for b in buffers[:6]]
    assert op(expected, expected_buffers, grads[:6], *hyper).tolist() == []
    shape = PLAIN_SHAPES[6]
    cases = [
        ("param dtype", torch.randn(shape).bfloat16(), grads[6], buffers[6]),
        ("param layout", torch.randn(2, 5, 3).transpose(0, 1), torch.randn(5, 2, 3), torch.zeros(5, 2, 3)),
        ("grad shape", params[6], torch.randn(30), buffers[6]),
        ("grad dtype", params[6], grads[6].double(), buffers[6]),
        ("grad layout", params[6], torch.randn(2, 5, 3).transpose(0, 1), buffers[6]),
        ("buffer dtype", params[6], grads[6], buffers[6].double()),
        ("buffer layout", params[6], grads[6], torch.randn(2, 5, 3).transpose(0, 1)),
    ]
    for name, param, grad, buffer in cases:
        ps, bs = [p.clone() for p in params[:6]] + [param], [b.clone() for b in buffers[:6]] + [buffer]
        untouched, untouched_buffer = param.clone(), buffer.clone()
        assert op(ps, bs, [*grads[:6], grad], *hyper).tolist() == [6], name
        assert torch.equal(ps[6], untouched) and torch.equal(bs[6], untouched_buffer), name
        assert all(torch.equal(a, b) for a, b in zip(ps[:6], expected, strict=True)), name
        assert all(torch.equal(a, b) for a, b in zip(bs[:6], expected_buffers, strict=True)), name
    # Without momentum the buffers are not read: only param and gradient decide.
    assert op([params[6].clone()], [], [grads[6]], 0.1, 0.0, 0.0, 0.0, False, False, False).tolist() == []


@needs_plain_step
def test_fused_sgd_step_is_two_op_calls_for_a_stack_of_layers():
    # O(sets), not O(layers): the DWF layers in one call, their biases in another, on CPU.
    torch.manual_seed(0)
    model = dwf_kernels.factorize(nn.Sequential(*[nn.Linear(16, 16) for _ in range(20)]), 4)
    twin = dwf_kernels.factorize(nn.Sequential(*[nn.Linear(16, 16) for _ in range(20)]), 4)
    twin.load_state_dict(model.state_dict())
    fused = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    reference = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x = torch.randn(8, 16)
    for step in range(3):
        for m, opt in ((model, fused), (twin, reference)):
            opt.zero_grad()
            (m(x).square().mean() + dwf_kernels.penalty(m, 1e-2)).backward()
            if m is model:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    opt.step()
            else:
                opt.step()
        calls = {e.key: e.count for e in prof.key_averages() if e.key.startswith("dwf_kernels::")}
        assert calls == {"dwf_kernels::dwf_sgd_step_multi": 1, "dwf_kernels::sgd_step_multi": 1}, (step, calls)
    _assert_as_torch(list(model.parameters()), list(twin.parameters()))
