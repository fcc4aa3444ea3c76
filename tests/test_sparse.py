"""Sparse inference: SparseLinear equals the dense Linear to rounding, the kernel's op contract,
and sparsify's choices and refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dwf_kernels
from dwf_kernels import _extension
from dwf_kernels.sparse import SparseLinear, sparsify

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
    conv, linear = report.layers
    assert conv.dense_seconds is None and conv.sparse_seconds is None  # convolutions stay dense
    assert linear.dense_seconds > 0 and linear.sparse_seconds > 0
    text = str(report)
    assert "compressed file:" in text and "sparse us" in text
    assert report.as_dict()["file_bytes"] == report.file_bytes
    plain = dwf_kernels.sparsity_report(model, 0.05)
    assert plain.file_bytes is None and "compressed file" not in str(plain)
    with pytest.raises(TypeError, match="file_size"):
        dwf_kernels.sparsity_report(model, 0.05, file_size="yes")
