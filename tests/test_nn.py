"""DWF layers behave as their torch.nn counterparts holding the product of the factors."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from helpers import KERNEL_BACKENDS
from torch import nn

from dwf_kernels import nn as dwf_nn
from dwf_kernels import penalty

CONV_CASES = [
    (dwf_nn.DWFConv1d, nn.Conv1d, (2, 6, 19), dict(kernel_size=3, stride=2, padding=1)),
    (dwf_nn.DWFConv1d, nn.Conv1d, (2, 6, 19), dict(kernel_size=4, padding="same", dilation=2, padding_mode="circular")),
    (dwf_nn.DWFConv2d, nn.Conv2d, (2, 6, 11, 9), dict(kernel_size=3, padding=1, groups=3)),
    (
        dwf_nn.DWFConv2d,
        nn.Conv2d,
        (2, 6, 11, 9),
        dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), padding_mode="reflect"),
    ),
    (
        dwf_nn.DWFConv2d,
        nn.Conv2d,
        (2, 6, 11, 9),
        dict(kernel_size=3, dilation=2, padding=2, padding_mode="replicate", bias=False),
    ),
    (dwf_nn.DWFConv3d, nn.Conv3d, (1, 6, 5, 6, 7), dict(kernel_size=3, padding=1, stride=(1, 2, 1))),
]


def _dense_twin_of(layer: dwf_nn.DWFLayer, cls, **kwargs) -> nn.Module:
    dense = cls(**kwargs)
    with torch.no_grad():
        dense.weight.copy_(layer.weight)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    return dense


@pytest.mark.parametrize("dwf_cls,nn_cls,input_shape,kwargs", CONV_CASES)
@pytest.mark.parametrize("depth", [1, 3])
def test_conv_matches_torch_nn(dwf_cls, nn_cls, input_shape, kwargs, depth):
    torch.manual_seed(0)
    layer = dwf_cls(6, 9, depth=depth, **kwargs)
    assert len(list(layer.parameters())) == (2 if kwargs.get("bias", True) else 1)
    assert layer.factors.shape == (depth, *nn_cls(6, 9, **kwargs).weight.shape)
    dense = _dense_twin_of(layer, nn_cls, in_channels=6, out_channels=9, **kwargs)
    x = torch.randn(input_shape)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch_nn_and_weight_is_the_product(bias):
    torch.manual_seed(0)
    layer = dwf_nn.DWFLinear(20, 7, bias=bias, depth=4)
    torch.testing.assert_close(layer.weight, layer.factors.prod(0))
    dense = _dense_twin_of(layer, nn.Linear, in_features=20, out_features=7, bias=bias)
    x = torch.randn(3, 5, 20)
    torch.testing.assert_close(layer(x), dense(x))
    assert "depth=4" in repr(layer)


def test_layer_init_std_and_bias_bound():
    torch.manual_seed(0)
    layer = dwf_nn.DWFLinear(1000, 300, depth=4)
    assert layer.weight.std().item() == pytest.approx(1 / (3 * 1000) ** 0.5, rel=0.03)
    assert layer.bias.abs().max().item() <= 1 / 1000**0.5


def test_bad_depth():
    with pytest.raises(ValueError, match=r"depth must be an int in \[1, 16\]; got 0"):
        dwf_nn.DWFLinear(3, 4, depth=0)


def test_records_sumsq_of_the_forward():
    layer = dwf_nn.DWFLinear(6, 5, depth=3)
    assert layer.last_sumsq is None
    layer(torch.randn(2, 6))
    torch.testing.assert_close(layer.last_sumsq, layer.factors.detach().square().sum())
    torch.testing.assert_close(penalty(nn.Sequential(layer), 0.3), 0.3 / 3 * layer.factors.detach().square().sum())


def test_channels_last_input():
    torch.manual_seed(0)
    layer = dwf_nn.DWFConv2d(4, 8, 3, padding=1, depth=2)
    x = torch.randn(2, 4, 10, 10)
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), layer(x), rtol=1e-5, atol=1e-6)
    layer.to(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), layer(x), rtol=1e-5, atol=1e-6)


def test_autocast_bf16_on_cpu_writes_bf16_weight():
    torch.manual_seed(0)
    model = nn.Sequential(
        dwf_nn.DWFConv2d(3, 8, 3, depth=3), nn.ReLU(), nn.Flatten(), dwf_nn.DWFLinear(8 * 6 * 6, 5, depth=3)
    )
    x = torch.randn(4, 3, 8, 8)
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = model[0].dwf_weight()
        out = model(x)
    assert w.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
    (out.float().square().mean() + penalty(model, 1e-3)).backward()
    assert model[0].factors.grad.dtype == torch.float32 and torch.isfinite(model[0].factors.grad).all()


def test_deepcopy_and_pickle_after_forward():
    model = nn.Sequential(dwf_nn.DWFLinear(4, 3, depth=2))
    loss = model(torch.randn(2, 4)).sum() + penalty(model, 0.1)
    clone = copy.deepcopy(model)
    restored = pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    for other in (clone, restored):
        assert other[0].last_sumsq is None
        torch.testing.assert_close(other[0].factors, model[0].factors)
    loss.backward()  # the original's graph is intact
    assert model[0].factors.grad is not None


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph_model_with_penalty(device, backend):
    import dwf_kernels

    torch.manual_seed(0)
    model = nn.Sequential(dwf_nn.DWFLinear(12, 16, depth=3), nn.ReLU(), dwf_nn.DWFLinear(16, 4, depth=3)).to(device)
    x = torch.randn(8, 12, device=device)

    def step(m):
        return m(x).square().mean() + penalty(m, 1e-2)

    torch._dynamo.reset()
    with dwf_kernels.use_backend(backend):
        compiled = torch.compile(step, fullgraph=True)
        eager_loss = step(model)
        eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
        compiled_loss = compiled(model)
        compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-7)
    for g_c, g_e in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("in_features,out_features", [(0, 3), (3, 0)])
def test_zero_features_work_like_torch_nn(in_features, out_features):
    layer = dwf_nn.DWFLinear(in_features, out_features, depth=3)
    dense = nn.Linear(in_features, out_features)
    x = torch.randn(2, in_features, requires_grad=True)
    with torch.no_grad():
        dense.bias.copy_(layer.bias)
    torch.testing.assert_close(layer(x), dense(x))
    (layer(x).sum() + penalty(nn.Sequential(layer), 0.1)).backward()
    assert layer.factors.grad.shape == (3, out_features, in_features)
    conv = dwf_nn.DWFConv2d(0, 2, 3, depth=2)
    assert conv(torch.randn(1, 0, 5, 5)).shape == nn.Conv2d(0, 2, 3)(torch.randn(1, 0, 5, 5)).shape


def test_meta_device_layers_run_like_torch_nn():
    """Meta in, meta out (shape inference without memory), as torch.nn layers do."""
    layer = dwf_nn.DWFLinear(5, 4, depth=3, device="meta")
    out = layer(torch.empty(2, 5, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 4)
    assert penalty(nn.Sequential(layer), 0.1).device.type == "meta"
    conv = dwf_nn.DWFConv2d(3, 4, 3, depth=2, device="meta")
    assert conv(torch.empty(1, 3, 8, 8, device="meta")).shape == (1, 4, 6, 6)


@pytest.mark.parametrize("depth", [True, 2.5, "3", None])
def test_depth_must_be_an_int(depth):
    with pytest.raises(TypeError, match=r"depth must be an int in \[1, 16\]"):
        dwf_nn.DWFLinear(3, 4, depth=depth)


# --- conversion: from_dense / to_dense -------------------------------------------------------------

DENSE_LAYERS = [
    pytest.param(lambda: nn.Linear(7, 5), (3, 7), id="linear"),
    pytest.param(lambda: nn.Linear(7, 5, bias=False).double(), (3, 7), id="linear-fp64-nobias"),
    pytest.param(
        lambda: nn.Conv1d(4, 6, 4, padding="same", dilation=2, padding_mode="circular"), (2, 4, 9), id="conv1d"
    ),
    pytest.param(
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), groups=2, padding_mode="reflect"),
        (2, 4, 7, 6),
        id="conv2d",
    ),
    pytest.param(lambda: nn.Conv3d(2, 3, 3, padding=1, bias=False), (1, 2, 4, 5, 4), id="conv3d"),
]


@pytest.mark.parametrize("make,input_shape", DENSE_LAYERS)
def test_from_dense_exact_factors_compute_the_dense_layer(make, input_shape):
    torch.manual_seed(0)
    dense = make().eval()
    rng = torch.get_rng_state()
    layer = dwf_nn.converter_for(dense).from_dense(dense, 3, init="dense")
    assert torch.equal(torch.get_rng_state(), rng), "no initialization is run and thrown away"
    assert type(layer) is dwf_nn.DWF_CLASS_FOR[type(dense)] and layer.dense_cls is type(dense)
    assert layer.bias is dense.bias and not layer.training and layer.factors.dtype == dense.weight.dtype
    assert [name for name, _ in layer.named_parameters()] == ["factors", "bias"][: len(list(dense.parameters()))]
    x = torch.randn(input_shape, dtype=dense.weight.dtype)
    torch.testing.assert_close(layer(x), dense(x))

    rng = torch.get_rng_state()
    back = layer.to_dense(threshold=0.0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert type(back) is type(dense) and back.bias is dense.bias and not back.training
    assert repr(back) == repr(dense) and back.weight.is_contiguous() and back.weight.requires_grad
    torch.testing.assert_close(back.weight, dense.weight)
    assert torch.equal(back.weight, layer.weight)


@pytest.mark.parametrize("make,input_shape", DENSE_LAYERS)
def test_from_dense_dwf_init_draws_what_the_two_pass_conversion_drew(make, input_shape):
    """A seeded conversion gives the factors that constructing the layer (with its own init) and
    then drawing the DWF init gave, and leaves the generator where that left it."""
    from dwf_kernels import init as dwf_init

    dense = make()
    cls = dwf_nn.converter_for(dense)
    args = {name: getattr(dense, name) for name in cls.dense_args}
    torch.manual_seed(5)
    old = cls(**args, bias=dense.bias is not None, dtype=dense.weight.dtype, depth=4)
    dwf_init.dwf_init_(old.factors, dwf_init.default_target_std(dense.weight.shape))
    old_after = torch.rand(3)
    torch.manual_seed(5)
    new = cls.from_dense(dense, 4)
    assert torch.equal(new.factors, old.factors) and torch.equal(torch.rand(3), old_after)
    assert new.weight.std().item() == pytest.approx(dwf_init.default_target_std(dense.weight.shape), rel=1e-3)


def test_to_dense_threshold_and_shared_weight():
    layer = dwf_nn.DWFLinear(6, 4, depth=2)
    with torch.no_grad():
        layer.factors[0, 0, :3] = 1e-5
    dense = layer.to_dense(1e-4)
    assert (dense.weight[0, :3] == 0).all() and (dense.weight[0, 3:] != 0).all()
    assert layer.to_dense(weight=dense.weight).weight is dense.weight


def test_conversion_refuses_what_it_cannot_convert():
    class MyLinear(nn.Linear):
        pass

    with pytest.raises(TypeError, match=r"DWFLinear.from_dense converts a torch.nn.Linear .*got MyLinear"):
        dwf_nn.DWFLinear.from_dense(MyLinear(3, 3), 2)
    with pytest.raises(TypeError, match=r"DWFConv2d.from_dense converts a torch.nn.Conv2d .*got Conv1d"):
        dwf_nn.DWFConv2d.from_dense(nn.Conv1d(3, 3, 1), 2)
    assert dwf_nn.converter_for(MyLinear(3, 3)) is None and dwf_nn.converter_for(nn.ReLU()) is None
    with pytest.raises(ValueError, match="init must be 'dwf' or 'dense'; got 'zeros'"):
        dwf_nn.DWFLinear.from_dense(nn.Linear(3, 3), 2, init="zeros")
    with pytest.raises(ValueError, match=r"depth must be an int in \[1, 16\]; got 17"):
        dwf_nn.DWFLinear.from_dense(nn.Linear(3, 3), 17)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        dwf_nn.DWFLinear(3, 3, depth=2).to_dense(-1.0)


def test_conv_shows_and_uses_torch_nn_configuration():
    conv = dwf_nn.DWFConv2d(4, 6, 3, padding="same", padding_mode="reflect", depth=2)
    dense = nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect")
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(conv, name) == getattr(dense, name), name
    assert (conv.padding_mode, conv.transposed, conv.output_padding) == ("reflect", False, (0, 0))
    assert [name for name, _ in conv.named_modules()] == [""] and list(conv.state_dict()) == ["factors", "bias"]


def test_meta_device_layers_draw_no_random_numbers():
    rng = torch.get_rng_state()
    dwf_nn.DWFConv2d(3, 4, 3, depth=2, device="meta")
    assert torch.equal(torch.get_rng_state(), rng)
