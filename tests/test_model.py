"""factorize / penalty / collapse / sparsity_report on whole models (ResNet-18, an MLP)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.utils.checkpoint
import torchvision
from torch import nn

import dwf_kernels
from dwf_kernels import collapse, factorize, penalty, sparsity_report
from dwf_kernels.nn import DWFConv2d, DWFLayer, DWFLinear


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))


def _resnet() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


MODELS = [pytest.param(_mlp, (5, 1, 8, 8), id="mlp"), pytest.param(_resnet, (2, 3, 32, 32), id="resnet18")]


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("make,input_shape", MODELS)
def test_dense_init_keeps_outputs(make, input_shape):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(input_shape)
    before = model(x)
    n_layers = _count(model, (nn.Linear, nn.Conv2d))
    factorize(model, depth=4, init="dense")
    assert _count(model, DWFLayer) == n_layers and _count(model, (nn.Linear, nn.Conv2d)) == 0
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,input_shape", MODELS)
def test_collapse_outputs_equal_the_factorized_model(make, input_shape):
    torch.manual_seed(0)
    model = factorize(make(), depth=3).eval()
    # Zero some factor entries, as training does, so the collapsed model holds exact zeros.
    with torch.no_grad():
        for _, layer in dwf_kernels.model.dwf_layers(model):
            layer.factors[1].masked_fill_(torch.rand_like(layer.factors[1]) < 0.5, 0.0)
    x = torch.randn(input_shape)
    collapsed = collapse(model)
    assert _count(collapsed, DWFLayer) == 0 and _count(collapsed, (nn.Linear, nn.Conv2d)) == _count(model, DWFLayer)
    torch.testing.assert_close(collapsed(x), model(x), rtol=1e-5, atol=1e-6)
    assert _count(model, DWFLayer) > 0  # the original is untouched
    report = sparsity_report(collapsed)
    assert 0.45 < report.total.sparsity < 0.55


@pytest.mark.parametrize("make,input_shape", MODELS)
def test_state_dict_round_trip_into_fresh_model(make, input_shape):
    torch.manual_seed(0)
    model = factorize(make(), depth=2).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = factorize(make(), depth=2).eval()
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(input_shape)
    torch.testing.assert_close(fresh(x), model(x))


def test_one_sgd_step_with_penalty_matches_reference_backend():
    lam, depth = 1e-2, 4
    torch.manual_seed(0)
    template = factorize(_mlp(), depth=depth)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    results = []
    for backend in (None, "reference"):
        model = factorize(_mlp(), depth=depth)
        model.load_state_dict(template.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with dwf_kernels.use_backend(backend):
            loss = nn.functional.cross_entropy(model(x), y) + penalty(model, lam)
            loss.backward()
            opt.step()
        results.append((loss.detach(), [p.detach().clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for fused, ref in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-7)
    assert not torch.equal(results[0][1][0], template[1].factors)  # the step changed the factors


def test_penalty_equals_weight_decay_on_the_factors():
    """(lam/D) sum ||F||^2 added to a mean loss == SGD weight_decay 2 lam / D on the factors."""
    lam, depth = 0.05, 3
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    a = factorize(_mlp(), depth=depth)
    b = factorize(_mlp(), depth=depth)
    b.load_state_dict(a.state_dict())
    factor_params = lambda m: [p for n, p in m.named_parameters() if n.endswith("factors")]  # noqa: E731
    other_params = lambda m: [p for n, p in m.named_parameters() if not n.endswith("factors")]  # noqa: E731
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(
        [{"params": factor_params(b), "weight_decay": 2 * lam / depth}, {"params": other_params(b)}], lr=0.1
    )
    (nn.functional.cross_entropy(a(x), y) + penalty(a, lam)).backward()
    nn.functional.cross_entropy(b(x), y).backward()
    opt_a.step()
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


def test_penalty_uses_the_last_forward_without_another_pass(monkeypatch):
    model = factorize(_mlp(), depth=2)
    model(torch.randn(2, 1, 8, 8))
    expected = sum(0.1 / 2 * m.factors.detach().square().sum() for _, m in dwf_kernels.model.dwf_layers(model))

    def no_second_pass(*args, **kwargs):
        raise AssertionError("penalty ran another pass over the factors")

    monkeypatch.setattr(dwf_kernels._holder, "_product_and_sumsq", no_second_pass)  # what a fresh sum would run
    torch.testing.assert_close(penalty(model, 0.1), expected)


def test_penalty_before_any_forward_and_without_dwf_layers():
    model = factorize(_mlp(), depth=2)
    expected = sum(0.1 / 2 * m.factors.detach().square().sum() for _, m in dwf_kernels.model.dwf_layers(model))
    torch.testing.assert_close(penalty(model, 0.1), expected)
    assert penalty(_mlp(), 0.1).item() == 0.0


def test_factorize_include_exclude():
    model = factorize(torchvision.models.resnet18(num_classes=10), depth=2, exclude=["fc", "conv1"])
    assert isinstance(model.fc, nn.Linear) and isinstance(model.conv1, nn.Conv2d)
    assert isinstance(model.layer1[0].conv1, DWFConv2d)
    model = factorize(_mlp(), depth=2, include=[nn.Linear], exclude=["3"])
    assert isinstance(model[1], DWFLinear) and isinstance(model[3], nn.Linear) and isinstance(model[5], DWFLinear)
    mha = nn.MultiheadAttention(8, 2)  # its out_proj is a Linear subclass whose .weight MHA reads directly
    assert not isinstance(factorize(nn.Sequential(mha), depth=2)[0].out_proj, DWFLayer)
    with pytest.raises(ValueError, match="init must be 'dwf' or 'dense'"):
        factorize(_mlp(), depth=2, init="zeros")


def test_factorized_model_moves_across_dtypes():
    model = factorize(_mlp(), depth=3).double()
    assert model[1].factors.dtype == torch.float64 and model[1].factors.shape == (3, 32, 64)
    assert model(torch.randn(2, 1, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_sparsity_report_counts():
    dense = nn.Sequential(nn.Linear(10, 4, bias=False), nn.Conv2d(1, 2, 3, bias=False))
    with torch.no_grad():
        dense[0].weight.zero_()
        dense[0].weight[0, :5] = 1.0  # 5 of 40 nonzero
        dense[1].weight.fill_(1e-9)  # below the threshold: all 18 count as zero...
        dense[1].weight[0, 0, 0, 0] = 2.0  # ...but one
    report = sparsity_report(dense)
    assert [(r.name, r.weights, r.nonzeros) for r in report.layers] == [("0", 40, 5), ("1", 18, 1)]
    assert report.total.weights == 58 and report.total.nonzeros == 6
    assert report.total.compression == pytest.approx(58 / 6) and report.layers[0].sparsity == pytest.approx(0.875)
    text = str(report)
    assert "total" in text and "9.7x" in text and "87.50%" in text
    dwf = factorize(nn.Sequential(nn.Linear(10, 4, bias=False)), depth=2, init="dense")
    with torch.no_grad():
        dwf[0].factors.copy_(dwf_kernels.init.exact_factors(dense[0].weight, 2))
    assert sparsity_report(dwf).total.nonzeros == 5
    assert sparsity_report(collapse(dwf)).total.nonzeros == 5
    assert report.as_dict()["layers"][-1]["compression"] == pytest.approx(58 / 6)


# --- non-finite weights are not zeros -------------------------------------------------------------


def test_sparsity_report_counts_nan_and_inf_as_nonzeros():
    """A diverged model: NaN and Inf weights are neither zeros nor a compression."""
    dense = nn.Sequential(nn.Linear(10, 4, bias=False))
    with torch.no_grad():
        dense[0].weight.zero_()
        dense[0].weight[0, :3] = float("nan")
        dense[0].weight[1, 0] = float("inf")
        dense[0].weight[2, 0] = 1.0
    report = sparsity_report(dense)
    total = report.total
    assert (total.weights, total.nonzeros, total.nonfinite) == (40, 5, 4)
    assert total.compression == pytest.approx(8.0) and total.sparsity == pytest.approx(35 / 40)
    assert report.as_dict()["layers"][-1]["nonfinite"] == 4
    assert "4 weights are NaN or Inf" in str(report)
    diverged = factorize(nn.Sequential(nn.Linear(10, 4, bias=False)), depth=2)
    with torch.no_grad():
        diverged[0].factors.fill_(float("nan"))
    for model in (diverged, collapse(diverged)):
        report = sparsity_report(model)
        assert report.total.nonfinite == 40 and report.total.nonzeros == 40
        assert report.total.compression == 1.0 and report.total.sparsity == 0.0
    assert torch.isnan(collapse(diverged)[0].weight).all()  # NaN is not collapsed to zero either


@pytest.mark.parametrize("threshold", ["1e-3", None, True, float("nan"), -1.0, float("inf")])
def test_threshold_must_be_a_finite_nonnegative_number(threshold):
    model = factorize(_mlp(), depth=2)
    error = TypeError if isinstance(threshold, (str, bool)) or threshold is None else ValueError
    for fn in (collapse, sparsity_report):
        with pytest.raises(error, match="threshold must be a"):
            fn(model, threshold)


# --- penalty: checkpointing, reuse after a backward -----------------------------------------------


class _Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool | None) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.use_reentrant = use_reentrant

    def forward(self, x):
        if self.use_reentrant is None:
            h = self.a(x).relu()
        else:
            h = torch.utils.checkpoint.checkpoint(lambda t: self.a(t).relu(), x, use_reentrant=self.use_reentrant)
        return self.b(h)


def _train_three_steps(use_reentrant, optimizer_cls):
    torch.manual_seed(0)
    model = factorize(_Checkpointed(use_reentrant), depth=3)
    opt = optimizer_cls(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        # The input requires grad: use_reentrant=True gives no gradient to anything otherwise.
        x = torch.randn(16, 6, generator=gen).requires_grad_(True)
        y = torch.randint(0, 3, (16,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y) + penalty(model, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, dwf_kernels.optim.FusedSGD], ids=["SGD", "FusedSGD"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_penalty_gradient_flows_under_activation_checkpointing(use_reentrant, optimizer_cls):
    """The reentrant checkpoint runs the first forward without grad; the penalty still has its
    gradient (one more pass over the factors), so training equals the run without checkpointing."""
    expected = _train_three_steps(None, optimizer_cls)
    for p, q in zip(_train_three_steps(use_reentrant, optimizer_cls), expected, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-mode"])
def test_penalty_after_a_backward_takes_a_fresh_sum(fused):
    """The recorded sum belongs to a graph the backward freed: penalty() computes the sum again
    (from the current factors) instead of failing in the next backward. In fused mode (a live
    FusedSGD) the product's own backward marks the record used; otherwise a hook on its node."""
    model = factorize(_mlp(), depth=2)
    optimizer = dwf_kernels.optim.FusedSGD(model.parameters(), lr=0.1) if fused else None
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    model.zero_grad()
    penalty(model, 0.1).backward()
    layer = model[1]
    torch.testing.assert_close(layer.factors.grad, 2 * 0.1 / 2 * layer.factors.detach())
    with torch.no_grad():  # and after a step the penalty is of the new factors, not the old ones
        for m in model.modules():
            if isinstance(m, DWFLayer):
                m.factors.mul_(0.5)
    expected = sum(0.1 / 2 * m.factors.detach().square().sum() for _, m in dwf_kernels.model.dwf_layers(model))
    torch.testing.assert_close(penalty(model, 0.1).detach(), expected)
    assert optimizer is None or type(layer.factors.grad).__name__ == "LazyFactorGrad"


# --- factorize keeps sharing ----------------------------------------------------------------------


class _Tied(nn.Module):
    """Two Linears sharing one weight parameter (and the first one's bias used by a third)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_factorize_keeps_a_layer_used_twice_one_layer():
    layer = nn.Linear(6, 6)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    x = torch.randn(4, 6)
    expected = model(x)
    factorize(model, depth=3, init="dense")
    assert isinstance(model[0], DWFLinear) and model[0] is model[2]
    assert sum(p.numel() for p in model.parameters()) == 3 * 36 + 6
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    back = collapse(model)  # collapse keeps the sharing too
    assert back[0] is back[2] and isinstance(back[0], nn.Linear)


def test_factorize_ties_the_factors_of_tied_weights():
    model = _Tied()
    x = torch.randn(3, 5)
    expected = model(x)
    factorize(model, depth=2, init="dense")
    assert isinstance(model.a, DWFLinear) and isinstance(model.b, DWFLinear)
    assert model.a.factors is model.b.factors
    assert sum(p.numel() for p in model.parameters()) == 2 * 25 + 5  # one factor parameter, one bias
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert sparsity_report(model).total.weights == 25  # stored once
    back = collapse(model)
    assert back.a.weight is back.b.weight


def test_tied_factors_train_as_one_parameter():
    """One SGD step (penalty counted once) equals the plain chain with one factor tensor used twice."""
    torch.manual_seed(0)
    model = factorize(_Tied(), depth=2)
    f = model.a.factors.detach().clone().requires_grad_(True)
    bias = model.a.bias.detach().clone().requires_grad_(True)
    x, lam, lr = torch.randn(3, 5), 0.3, 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    (model(x).square().mean() + penalty(model, lam)).backward()
    opt.step()
    w = f[0] * f[1]
    loss = nn.functional.linear(torch.tanh(nn.functional.linear(x, w, bias)), w).square().mean()
    (loss + lam / 2 * (f * f).sum()).backward()
    assert model.a.factors is model.b.factors
    torch.testing.assert_close(model.a.factors.detach(), (f - lr * f.grad).detach(), rtol=1e-6, atol=1e-7)


def test_factorize_refuses_a_tie_it_cannot_keep():
    model = _Tied()
    with pytest.raises(ValueError, match=r"weight of 'a' is also a parameter of 'b'.*exclude 'a'"):
        factorize(model, depth=2, exclude=["b"])
    assert isinstance(model.a, nn.Linear)  # refused before anything changed


def test_a_tie_with_an_embedding_follows_the_embedding():
    emb = nn.Embedding(5, 5)
    head = nn.Linear(5, 5, bias=False)
    head.weight = emb.weight  # a language model's tied output layer
    report = []
    model = factorize(nn.Sequential(emb, head), depth=2, report=report)
    assert type(model[1]) is nn.Linear and model[1].weight is model[0].weight  # embeddings are opt-in
    assert [(r.name, r.converted) for r in report] == [("0.weight", False), ("1.weight", False)]
    assert report[1].note == "tied to 0.weight, left dense (a tie follows the embedding)"
    x = torch.tensor([[0, 3, 4]])
    expected = model(x)
    factorize(model, depth=2, init="dense", include=[nn.Embedding])
    assert isinstance(model[1], DWFLinear) and model[1].factors is model[0].parametrizations.weight.original
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


# --- argument checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [True, 2.0, "2"])
def test_factorize_depth_must_be_an_int(depth):
    with pytest.raises(TypeError, match=r"depth must be an int in \[1, 16\]"):
        factorize(_mlp(), depth)


def test_factorize_again_with_another_depth_is_refused():
    model = factorize(_mlp(), depth=2)
    with pytest.raises(ValueError, match=r"already holds DWF layers of depth 2 .*collapse"):
        factorize(model, depth=3)
    assert factorize(model, depth=2) is model and model[1].depth == 2  # the same depth: nothing to do
    again = factorize(collapse(model), depth=3, init="dense")
    assert again[1].depth == 3
