"""Sparse inference: SparseLinear and SparseConv1d/2d equal the dense layers to rounding (eager and
compiled), the kernels' op contracts, and sparsify's choices and refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dwf_kernels
from dwf_kernels import _extension
from dwf_kernels.sparse import SparseConv1d, SparseConv2d, SparseLinear, sparsify

needs_kernel = pytest.mark.skipif("cpu" not in _extension.KERNEL_DEVICES, reason="needs dwf_kernels._C's CPU kernels")
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.bfloat16: (2e-2, 2e-2)}


def sparse_linear(in_features, out_features, density, dtype=torch.float32, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight.mul_(torch.rand(out_features, in_features) < density).add_(0.0)
    return linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [0, 1, 7, 8, 129])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_equals_the_dense_layer(dtype, batch, bias):
    linear = sparse_linear(300, 100, 0.02, dtype, bias)
    sparse = SparseLinear.from_dense(linear)
    x = torch.randn(batch, 300).to(dtype)
    with torch.no_grad():
        bias64 = None if linear.bias is None else linear.bias.double()
        expected = nn.functional.linear(x.double(), linear.weight.double(), bias64)
        rtol, atol = TOL[dtype]
        torch.testing.assert_close(sparse(x).double(), expected, rtol=rtol, atol=atol)
        assert sparse(x).dtype == dtype


@pytest.mark.parametrize("density", [0.0, 1.0, 0.3])
def test_empty_full_and_shaped_inputs(density):
    linear = sparse_linear(17, 9, density)
    sparse = SparseLinear.from_dense(linear)
    x = torch.randn(2, 3, 5, 17)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), linear(x), rtol=1e-5, atol=1e-5)
    assert sparse.nnz == int((linear.weight != 0).sum())


def test_to_dense_gives_back_the_layer_bitwise():
    linear = sparse_linear(50, 20, 0.1)
    back = SparseLinear.from_dense(linear).to_dense()
    assert torch.equal(back.weight, linear.weight) and torch.equal(back.bias, linear.bias)


def test_state_dict_round_trip_and_compressed_file(tmp_path):
    sparse = SparseLinear.from_dense(sparse_linear(40, 30, 0.05))
    other = SparseLinear.from_dense(sparse_linear(40, 30, 0.05, seed=1))
    dwf_kernels.save_compressed(sparse, tmp_path / "f")
    state = dwf_kernels.load_compressed(tmp_path / "f")
    buffers = (sparse.row_ptr, sparse.col, sparse.values, sparse.bias)
    fresh = SparseLinear(40, 30, *(torch.empty_like(t) for t in buffers))
    fresh.load_state_dict(state)
    x = torch.randn(4, 40)
    assert torch.equal(fresh(x), sparse(x)) and not torch.equal(other(x), sparse(x))


def test_bad_input_is_refused():
    sparse = SparseLinear.from_dense(sparse_linear(10, 4, 0.5))
    with pytest.raises(RuntimeError, match="for inference"):
        sparse(torch.randn(3, 10, requires_grad=True))
    with pytest.raises(ValueError, match="in_features=10"):
        sparse(torch.randn(3, 11))
    with pytest.raises(ValueError, match="torch.float32 on cpu"):
        sparse(torch.randn(3, 10, dtype=torch.float64))
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_dense(nn.Conv1d(1, 1, 1))


@needs_kernel
def test_the_op_checks_its_arguments_and_passes_opcheck():
    sparse = SparseLinear.from_dense(sparse_linear(10, 4, 0.5))
    op = torch.ops.dwf_kernels.sparse_linear
    x = torch.randn(9, 10)
    args = (sparse.row_ptr, sparse.col, sparse.values, sparse.bias)
    torch.library.opcheck(op, (x, *args))
    with pytest.raises(RuntimeError, match="row_ptr must run from 0 to nnz"):
        op(x, sparse.row_ptr + 1, *args[1:])
    with pytest.raises(RuntimeError, match="values are Double but input is Float"):
        op(x, sparse.row_ptr, sparse.col, sparse.values.double(), None)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(x.t().contiguous().t(), *args)
    with pytest.raises(RuntimeError, match=r"col must lie in \[0, 8\)"):
        op(x[:, :8].contiguous(), *args)  # fewer input columns than the weight reads
    with pytest.raises(RuntimeError, match="must not decrease"):
        op(x, torch.tensor([0, 3, 1, sparse.nnz, sparse.nnz]), *args[1:])


def test_sparsify_replaces_where_faster_and_reports():
    torch.manual_seed(0)
    layers = [sparse_linear(784, 300, 0.002), nn.ReLU(), sparse_linear(300, 100, 0.002), nn.ReLU(), nn.Linear(100, 10)]
    model = nn.Sequential(*layers)
    x = torch.randn(32, 784)
    with torch.no_grad():
        expected = model(x)
    report = []
    sparsify(model, x, min_speedup=1e-9, rounds=3, report=report)  # every layer counts as faster
    assert [type(m).__name__ for m in model] == ["SparseLinear", "ReLU", "SparseLinear", "ReLU", "SparseLinear"]
    assert [d.name for d in report] == ["0", "2", "4"] and all(d.replaced for d in report)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)

    dense = nn.Sequential(nn.Linear(8, 8))
    sparsify(dense, torch.randn(2, 8), min_speedup=1e9, rounds=3)
    assert type(dense[0]) is nn.Linear


def test_sparsify_refuses_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        sparsify("model", torch.zeros(1))
    with pytest.raises(ValueError, match="min_speedup"):
        sparsify(nn.Linear(2, 2), torch.zeros(1, 2), min_speedup=0)
    with pytest.raises(ValueError, match="rounds"):
        sparsify(nn.Linear(2, 2), torch.zeros(1, 2), rounds=0)


def test_sparsity_report_gives_file_size_and_measured_latency():
    torch.manual_seed(0)
    model = dwf_kernels.factorize(nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(36, 5)), depth=3)
    x = torch.randn(4, 1, 20)
    report = dwf_kernels.sparsity_report(model, 0.05, file_size=True, latency_input=x)
    collapsed = dwf_kernels.collapse(model, 0.05)
    assert report.file_bytes == len(dwf_kernels.compressed.compressed_bytes(collapsed))
    assert report.torch_save_bytes > report.file_bytes
    assert all(row.dense_seconds > 0 and row.sparse_seconds > 0 for row in report.layers)  # Conv1d and Linear
    text = str(report)
    assert "compressed file:" in text and "sparse us" in text
    assert report.as_dict()["file_bytes"] == report.file_bytes
    plain = dwf_kernels.sparsity_report(model, 0.05)
    assert plain.file_bytes is None and "compressed file" not in str(plain)
    with pytest.raises(TypeError, match="file_size"):
        dwf_kernels.sparsity_report(model, 0.05, file_size="yes")


def sparse_conv(cls, in_channels, out_channels, kernel_size, density, dtype=torch.float32, seed=0, **kwargs):
    torch.manual_seed(seed)
    conv = cls(in_channels, out_channels, kernel_size, **kwargs).to(dtype)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape) < density).add_(0.0)
    return conv


CONV2D_CASES = {
    "plain": dict(kernel_size=5),
    "padded": dict(kernel_size=3, padding=1),
    "strided": dict(kernel_size=3, stride=2, padding=(2, 1)),
    "dilated": dict(kernel_size=(3, 2), dilation=(2, 3), padding=(1, 3), stride=(1, 2)),
    "grouped": dict(kernel_size=3, groups=2, padding="same"),
    "depthwise": dict(kernel_size=3, groups=4, padding=1, bias=False),
    "valid": dict(kernel_size=(1, 4), padding="valid", stride=3),
    "padding wider than the kernel": dict(kernel_size=2, padding=3),
}


@pytest.mark.parametrize("case", list(CONV2D_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [0, 1, 5])
def test_sparse_conv2d_equals_the_dense_layer(case, dtype, batch):
    kwargs = CONV2D_CASES[case]
    conv = sparse_conv(nn.Conv2d, 4, 8, density=0.3, dtype=dtype, **kwargs)
    sparse = SparseConv2d.from_dense(conv)
    x = torch.randn(batch, 4, 11, 13).to(dtype)
    bias = None if conv.bias is None else conv.bias.double()
    expected = F.conv2d(x.double(), conv.weight.double(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    rtol, atol = TOL[dtype]
    with torch.no_grad():
        y = sparse(x)
        assert y.dtype == dtype and y.shape == expected.shape
        torch.testing.assert_close(y.double(), expected, rtol=rtol, atol=atol)
        if batch:
            torch.testing.assert_close(sparse(x[0]).double(), expected[0], rtol=rtol, atol=atol)  # unbatched
    assert sparse.nnz == int((conv.weight != 0).sum())


@pytest.mark.parametrize(
    "kwargs",
    [dict(kernel_size=3), dict(kernel_size=4, stride=2, padding=3, dilation=2, groups=2)],
    ids=["plain", "all"],
)
def test_sparse_conv1d_equals_the_dense_layer(kwargs):
    conv = sparse_conv(nn.Conv1d, 4, 6, density=0.4, **kwargs)
    sparse = SparseConv1d.from_dense(conv)
    x = torch.randn(3, 4, 30)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), conv(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sparse(x[0]), conv(x[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_sparse_conv_empty_and_full_kernels_and_channels_last_input(density):
    conv = sparse_conv(nn.Conv2d, 3, 5, 3, density, padding=1)
    sparse = SparseConv2d.from_dense(conv)
    x = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), conv(x), rtol=1e-5, atol=1e-5)
    assert sparse.nnz == int((conv.weight != 0).sum())


def test_sparse_conv_to_dense_and_state_dict_round_trip(tmp_path):
    conv = sparse_conv(nn.Conv2d, 4, 6, 3, 0.2, stride=2, padding="valid", dilation=2, groups=2)
    back = SparseConv2d.from_dense(conv).to_dense()
    assert type(back) is nn.Conv2d and torch.equal(back.weight, conv.weight) and torch.equal(back.bias, conv.bias)
    assert (back.stride, back.padding, back.dilation, back.groups) == (conv.stride, conv.padding, conv.dilation, 2)
    sparse = SparseConv2d.from_dense(conv)
    dwf_kernels.save_compressed(sparse, tmp_path / "f")
    buffers = (sparse.row_ptr, sparse.col, sparse.values, sparse.bias)
    fresh = SparseConv2d(conv, *(torch.zeros_like(t) for t in buffers))
    fresh.load_state_dict(dwf_kernels.load_compressed(tmp_path / "f"))
    x = torch.randn(2, 4, 12, 12)
    with torch.no_grad():
        assert torch.equal(fresh(x), sparse(x))


def test_sparse_conv_refuses_what_it_cannot_compute():
    with pytest.raises(TypeError, match="nn.Conv2d"):
        SparseConv2d.from_dense(nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        SparseConv2d.from_dense(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="pads unevenly"):
        SparseConv2d.from_dense(nn.Conv2d(1, 1, 4, padding="same"))
    sparse = SparseConv2d.from_dense(nn.Conv2d(3, 2, 3))
    with pytest.raises(ValueError, match=r"input must be \(batch, 3, height, width\)"):
        sparse(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"input must be \(batch, 3, height, width\)"):
        sparse(torch.randn(8, 8))
    with pytest.raises(RuntimeError, match="SparseConv2d is for inference"):
        sparse(torch.randn(1, 3, 8, 8, requires_grad=True))
    with pytest.raises(ValueError, match="float64"):
        sparse(torch.randn(1, 3, 8, 8, dtype=torch.float64))


@needs_kernel
def test_the_conv_op_checks_its_arguments_and_passes_opcheck():
    conv = sparse_conv(nn.Conv2d, 4, 6, 3, 0.3, groups=2)
    sparse = SparseConv2d.from_dense(conv)
    op = torch.ops.dwf_kernels.sparse_conv2d
    x = torch.randn(2, 4, 7, 8)
    csr = (sparse.row_ptr, sparse.col, sparse.values, sparse.bias)
    geometry = ([3, 3], [1, 2], [1, 0], [1, 1])
    torch.library.opcheck(op, (x, *csr, *geometry, 2))
    torch.testing.assert_close(
        op(x, *csr, *geometry, 2), F.conv2d(x, conv.weight, conv.bias, (1, 2), (1, 0), 1, 2), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(RuntimeError, match="contiguous"):
        op(x.transpose(2, 3), *csr, *geometry, 2)
    with pytest.raises(RuntimeError, match="stride must be two ints >= 1"):
        op(x, *csr, [3, 3], [0, 1], [1, 0], [1, 1], 2)
    with pytest.raises(RuntimeError, match="groups must be >= 1 and divide the 4 input channels"):
        op(x, *csr, *geometry, 3)
    with pytest.raises(RuntimeError, match=r"col must lie in \[0, 9\)"):
        op(x, *csr, *geometry, 4)  # 1 channel per group: fewer columns than the kernel reads
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        op(x, *csr, [3, 3], [1, 1], [0, 0], [4, 4], 2)
    with pytest.raises(RuntimeError, match="must not decrease"):
        op(x, torch.tensor([0, 3, 1, 5, 5, 5, sparse.nnz]), *csr[1:], *geometry, 2)


@needs_kernel
def test_sparse_modules_run_under_torch_compile_without_graph_breaks():
    torch._dynamo.reset()
    conv, linear = sparse_conv(nn.Conv2d, 1, 4, 3, 0.5, padding=1), sparse_linear(4 * 6 * 6, 5, 0.1)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), linear).eval()
    sparse = nn.Sequential(SparseConv2d.from_dense(conv), nn.ReLU(), nn.Flatten(), SparseLinear.from_dense(linear))
    compiled = torch.compile(sparse, fullgraph=True)
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x[:1]), model(x[:1]), rtol=1e-5, atol=1e-5)


def test_sparsify_converts_convolutions_where_faster_and_says_why_not():
    torch.manual_seed(0)
    model = nn.Sequential(
        sparse_conv(nn.Conv2d, 1, 8, 5, 0.05),
        nn.ReLU(),
        nn.Flatten(2),
        sparse_conv(nn.Conv1d, 8, 4, 3, 0.1),  # on (batch, 8, 24 * 24)
        nn.Flatten(),
        nn.Unflatten(1, (1, -1)),
        nn.Conv1d(1, 1, 3, padding=1, padding_mode="circular"),  # no sparse kernel for this padding
    )
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    report = []
    sparsify(model, x, min_speedup=1e-9, rounds=3, report=report)
    assert [(d.name, d.kind, d.replaced) for d in report] == [
        ("0", "Conv2d", True),
        ("3", "Conv1d", True),
        ("6", "Conv1d", False),
    ]
    assert "padding_mode" in report[2].reason and report[2].speedup is None
    assert type(model[0]) is SparseConv2d and type(model[3]) is SparseConv1d and type(model[6]) is nn.Conv1d
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", [1, "same"])
def test_sparse_modules_without_the_kernel_compute_the_same(monkeypatch, padding):
    """Where the CPU kernels are absent (or on another device): torch.sparse CSR and torch's dense
    convolution of the stored kernel."""
    conv = sparse_conv(nn.Conv2d, 3, 4, 3, 0.3, padding=padding)
    linear = sparse_linear(20, 6, 0.2)
    sparse_conv2d, sparse_lin = SparseConv2d.from_dense(conv), SparseLinear.from_dense(linear)
    monkeypatch.setattr(dwf_kernels.sparse, "_SPARSE_CONV2D", None)
    monkeypatch.setattr(dwf_kernels.sparse, "_SPARSE_LINEAR", None)
    x, v = torch.randn(2, 3, 8, 8), torch.randn(5, 20)
    with torch.no_grad():
        torch.testing.assert_close(sparse_conv2d(x), conv(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sparse_lin(v), linear(v), rtol=1e-5, atol=1e-5)


def test_sparse_modules_follow_autocast_like_the_dense_layers():
    conv = sparse_conv(nn.Conv2d, 3, 4, 3, 0.3, padding=1)
    linear = sparse_linear(4 * 6 * 6, 5, 0.1)
    dense = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), linear).eval()
    sparse = nn.Sequential(SparseConv2d.from_dense(conv), nn.ReLU(), nn.Flatten(), SparseLinear.from_dense(linear))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, y = dense(x), sparse(x)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        report = []
        sparsify(dense, x, min_speedup=1e-9, rounds=2, report=report)  # times the layers under autocast too
    assert all(d.replaced for d in report)


def test_sparsify_captures_in_eval_mode_and_restores_the_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5), nn.Flatten(), nn.Linear(288, 4))
    model.train()
    model[2].eval()  # a module's own mode, kept
    stats = (model[1].running_mean.clone(), model[1].num_batches_tracked.clone())
    sparsify(model, torch.randn(2, 3, 8, 8), min_speedup=1e-9, rounds=2)
    assert torch.equal(model[1].running_mean, stats[0]) and torch.equal(model[1].num_batches_tracked, stats[1])
    assert model.training and model[1].training and not model[2].training


def test_sparsify_replaces_a_shared_layer_everywhere_and_reports_conv3d():
    torch.manual_seed(0)
    shared = sparse_linear(6, 6, 0.3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = shared, shared
            self.c = nn.Conv3d(1, 1, 1)

        def forward(self, x):
            return self.b(self.a(x)) + self.c(x.reshape(-1, 1, 1, 2, 3)).reshape(x.shape)

    model = Twice()
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = model(x)
    report = []
    sparsify(model, x, min_speedup=1e-9, rounds=2, report=report)
    assert type(model.a) is SparseLinear and model.a is model.b
    assert [(d.name, d.replaced) for d in report] == [("a", True), ("c", False)]
    assert "no sparse kernel for Conv3d" in report[1].reason
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_sparsify_refuses_an_uncollapsed_dwf_model_and_sparsity_report_counts_sparse_modules():
    torch.manual_seed(0)
    model = dwf_kernels.factorize(nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3)), depth=2)
    with pytest.raises(ValueError, match="collapse it first"):
        sparsify(model, torch.randn(2, 10))
    collapsed = dwf_kernels.collapse(model, 0.3)
    before = dwf_kernels.sparsity_report(collapsed, 0.3)
    sparsify(collapsed, torch.randn(2, 10), min_speedup=1e-9, rounds=2)
    after = dwf_kernels.sparsity_report(collapsed, 0.3)
    assert [r.kind for r in after.layers] == ["SparseLinear", "SparseLinear"]
    assert [(r.weights, r.nonzeros) for r in after.layers] == [(r.weights, r.nonzeros) for r in before.layers]


def test_sparse_conv_keeps_channels_last_and_linear_refuses_a_scalar():
    conv = sparse_conv(nn.Conv2d, 3, 4, 3, 0.5, padding=1)
    x = torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert SparseConv2d.from_dense(conv)(x).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="in_features=10"):
        SparseLinear.from_dense(sparse_linear(10, 4, 0.5))(torch.tensor(1.0))


def test_sparsify_refuses_a_model_with_dwf_parametrized_weights():
    torch.manual_seed(0)
    attention = dwf_kernels.factorize(nn.MultiheadAttention(8, 2, batch_first=True), depth=2)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="collapse it first"):
        sparsify(attention, (x, x, x))
