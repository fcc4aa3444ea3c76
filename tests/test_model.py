"""factorize / penalty / collapse / sparsity_report on whole models (ResNet-18, an MLP)."""

from __future__ import annotations

import io

import pytest
import torch
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

    monkeypatch.setattr(dwf_kernels.model, "dwf_product", no_second_pass)
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
        dwf[0].factors.copy_(dwf_kernels.model._dense_to_factors(dense[0].weight, 2))
    assert sparsity_report(dwf).total.nonzeros == 5
    assert sparsity_report(collapse(dwf)).total.nonzeros == 5
    assert report.as_dict()["layers"][-1]["compression"] == pytest.approx(58 / 6)
